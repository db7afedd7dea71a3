"""The unlearning loop's log files: ``metrics.jsonl`` (one flushed line per step) and
``metrics.csv`` (rewritten atomically), plus ``unlearn_config.json``, all in ``out_dir``."""
from __future__ import annotations

import csv
import json
import os
from typing import List, Optional


class MetricsLog:
    """Writes the per-step records of ``history`` (a list this object shares with the loop).

    ``out_dir=None`` (no output directory, or a rank other than 0) makes every method a no-op.
    A resumed run starts ``metrics.jsonl`` over from the checkpoint's history, dropping what the
    interrupted run logged after its checkpoint.
    """

    def __init__(self, out_dir: Optional[str], history: List[dict], config: dict):
        self.out_dir = out_dir
        self.history = history
        if out_dir is None:
            return
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "unlearn_config.json"), "w") as fh:
            json.dump(config, fh, indent=2)
        with open(os.path.join(out_dir, "metrics.jsonl"), "w") as fh:
            for record in history:
                fh.write(json.dumps(record) + "\n")

    def append(self, record: dict) -> None:
        """Add ``record`` to the history and to ``metrics.jsonl``."""
        self.history.append(record)
        if self.out_dir is None:
            return
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def write_csv(self) -> None:
        """Rewrite ``metrics.csv`` from the history (columns in order of first appearance)."""
        if self.out_dir is None or not self.history:
            return
        columns: List[str] = []
        for record in self.history:
            columns.extend(k for k in record if k not in columns)
        path = os.path.join(self.out_dir, "metrics.csv")
        with open(path + ".tmp", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.history)
        os.replace(path + ".tmp", path)
