"""The multi-seed study: does CLReg help? (issue 25). Same models, data and metrics as
:mod:`clreg_fast.demo`, run over seeds and forget splits with a protocol fixed in advance.

    python -m clreg_fast.study select --model tiny --val-seeds 100,101 --out-dir DIR
    python -m clreg_fast.study test   --seeds 0,1,2,3,4 --out-dir DIR
    python -m clreg_fast.study report --out-dir DIR          # summary.json and plots again

Phases:

* ``select`` runs the grid (unlearning learning rate x CLReg weight x layer x temperature, each
  method also without CLReg at every learning rate) on the *validation* seeds only and writes
  ``protocol.json``: per method the chosen setting, by the rule of :func:`select_protocol`.
  It refuses to run once any test result exists in the folder.
* ``test`` refuses to run without ``protocol.json``; it runs, on the test seeds (disjoint from
  the validation seeds), the target, one oracle per forget split, and every method with and
  without CLReg at the protocol's settings over the learning-rate sweep; then ``report``.
* ``prepare`` only fine-tunes (and caches under ``--cache-dir``) the targets and oracles of
  ``--seeds``; it reads and writes no stage, so it can run beside ``select`` on a second core
  and ``test`` then finds its models in the cache.
* ``report`` aggregates the test results into ``summary.json`` (one per split,
  ``summary-split<P>.json``; ``summary.json`` is the primary split) and the plots.

Forget splits are percentages of the trained authors (TOFU's 1/5/10 %; the presets run 5 and 10,
where the target's forget quality can fall below 0.05, see :func:`study_preset`): the forget authors
are the first ``round(P% * n_authors)`` (at least 1) of the seed's author order, so the splits of
a seed are nested and the trained rows (forget + retain) are the same for every split: one
target per seed serves all its splits, one oracle per (seed, split).

Every stage (one model evaluated at one setting) writes its JSON as soon as it exists; a rerun
skips stages whose file is present (``--force`` redoes them), so a study can stop at any point
and resume in another session or on another machine from the committed folder. Fine-tuned
targets and oracles are cached by configuration under ``--cache-dir`` (not committed: a later
session re-trains them if it needs them). Layout and every file: ``docs/study.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from clreg_fast import demo
from clreg_fast.unlearn.english_authors import EnglishAuthorsConfig
from clreg_fast.unlearn.methods import METHODS as KNOWN_METHODS
from clreg_fast.unlearn.synthetic import SyntheticConfig

STUDY_VERSION = 1
SIZES = ("full", "micro")
# Keys of an arm's entry that are not evaluate_model metrics (left out of summary.json).
NOT_METRICS = frozenset({"sweep", "lr", "final_loss", "setting"})
# The trade-off plot's and the protocol's utility: TOFU's model utility where the configuration
# measures it, else (the tiny configuration) the retain split's value-token accuracy.
UTILITY_KEYS = ("model_utility", "retain_value_acc")


# --------------------------------------------------------------------------- configuration


@dataclass
class Grid:
    """The selection grid. Every method runs without CLReg at each ``lrs`` value and with
    CLReg at each (lr, weight, layer, temperature)."""

    lrs: Sequence[float]
    clreg_weights: Sequence[float]
    clreg_layers: Sequence[int]
    clreg_temperatures: Sequence[float]

    def __post_init__(self):
        for name in ("lrs", "clreg_weights", "clreg_layers", "clreg_temperatures"):
            values = list(getattr(self, name))
            if not values:
                raise ValueError(f"grid {name} must not be empty")
            if len(set(values)) != len(values):
                raise ValueError(f"grid {name} has duplicates: {values}")
            setattr(self, name, values)
        if any(v <= 0 for v in self.lrs + self.clreg_weights + self.clreg_temperatures):
            raise ValueError("grid learning rates, weights and temperatures must be > 0")

    def clreg_settings(self) -> List[Dict]:
        return [{"clreg_weight": w, "clreg_layer": layer, "clreg_temperature": t}
                for w, layer, t in itertools.product(self.clreg_weights, self.clreg_layers,
                                                     self.clreg_temperatures)]

    @classmethod
    def from_dict(cls, d: Dict) -> "Grid":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown grid keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class StudyConfig:
    base: demo.DemoConfig               # the model/data configuration (its seed is replaced)
    grid: Grid
    splits: Sequence[float] = (5, 10)       # forget split, % of the trained authors (see presets)
    primary_split: Optional[float] = None   # summary.json's split; None: the largest
    utility_tolerance: float = 0.02         # the protocol rule's relative utility margin
    forget_quality_bar: float = 0.05        # the target must score below it (flagged, not fatal)
    size: str = "full"
    n_boot: int = 10000
    # Validation (select) splits; None: the primary split only (a third of the cost of all).
    selection_splits: Optional[Sequence[float]] = None
    # The test phase's learning-rate sweep (the trade-off curve) on every split, or only on the
    # primary one (the other splits then run each method at the protocol's lr only).
    sweep_every_split: bool = False

    def __post_init__(self):
        self.splits = [float(p) for p in self.splits]
        if not self.splits or any(not 0 < p < 100 for p in self.splits):
            raise ValueError(f"splits must be percentages in (0, 100), got {self.splits}")
        if len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits has duplicates: {self.splits}")
        counts = [forget_count(self.base.data.n_authors, p) for p in self.splits]
        if len(set(counts)) != len(counts):
            raise ValueError(f"splits {self.splits} of {self.base.data.n_authors} authors give "
                             f"the same forget author counts {counts}")
        if self.primary_split is None:
            self.primary_split = max(self.splits)
        if float(self.primary_split) not in self.splits:
            raise ValueError(f"primary_split {self.primary_split} is not one of {self.splits}")
        self.primary_split = float(self.primary_split)
        if self.selection_splits is None:
            self.selection_splits = [self.primary_split]
        self.selection_splits = [float(p) for p in self.selection_splits]
        if not self.selection_splits or not set(self.selection_splits) <= set(self.splits):
            raise ValueError(f"selection_splits {self.selection_splits} must be among the "
                             f"splits {self.splits}")
        if not 0 <= self.utility_tolerance < 1:
            raise ValueError(f"utility_tolerance must be in [0, 1), got {self.utility_tolerance}")
        # Fail here, not after the first fine-tunings: an unknown name would reach the
        # unlearning loop only once a target and an oracle are trained.
        unknown = [m for m in self.base.methods if m not in KNOWN_METHODS]
        if unknown or not self.base.methods:
            raise ValueError(f"methods: unknown {unknown} in {list(self.base.methods)}; choose "
                             f"one or more of {', '.join(KNOWN_METHODS)}")

    @property
    def utility_key(self) -> str:
        return "model_utility" if self.base.utility_rows else "retain_value_acc"

    def describe(self) -> Dict:
        """What protocol.json records and ``test`` checks against (everything but seeds)."""
        return {"model": self.base.model, "size": self.size, "splits": self.splits,
                "primary_split": self.primary_split, "selection_splits": self.selection_splits,
                "sweep_every_split": self.sweep_every_split, "methods": list(self.base.methods),
                "grid": asdict(self.grid), "utility_key": self.utility_key,
                "utility_tolerance": self.utility_tolerance,
                "forget_quality_bar": self.forget_quality_bar,
                "measurement_layer": self.base.clreg_layer,
                # the seed varies; the device changes no result that the protocol depends on
                "base": demo._jsonable({**asdict(self.base), "seed": None, "device": None})}

    def fingerprint(self) -> str:
        blob = json.dumps({"version": STUDY_VERSION, **self.describe()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def stage_fingerprint(self) -> str:
        """What a stage file's result depends on besides its path (seed, split, method, lr,
        CLReg setting): the model/data configuration. Grid, splits, methods or the rule may
        change between runs in one folder (their stages are reused); this may not."""
        blob = json.dumps({"version": STUDY_VERSION, "base": self.describe()["base"]},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def forget_count(n_authors: int, percent: float) -> int:
    """Forget authors of a ``percent`` split: rounded, at least 1, at most ``n_authors - 1``."""
    count = max(1, int(round(percent * n_authors / 100.0)))
    if count >= n_authors:
        raise ValueError(f"a {percent:g}% split of {n_authors} authors leaves no retain author")
    return count


def study_preset(model: str = demo.TINY, size: str = "full") -> StudyConfig:
    """The study's configuration of ``--model MODEL --size SIZE``.

    ``full``: sized so that a 1% split has at least one author and the target's forget quality
    can fall below 0.05 (KS with >= 4 forget rows; the target check reports it per seed).
    ``micro`` (tiny only): a few authors and steps, for tests (seconds).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if model == demo.TINY:
        if size == "micro":
            base = demo.DemoConfig(
                data=SyntheticConfig(n_authors=10, n_forget_authors=1, n_holdout_authors=2,
                                     n_facts=2),
                hidden_size=64, num_layers=2, train_epochs=20, train_batch_size=4, max_steps=2,
                batch_size=4,
                clreg_layer=1, knn_k=1, lrs=(1e-3,), default_lr=1e-3, eval_batch_size=32)
            grid = Grid(lrs=[5e-4, 1e-3], clreg_weights=[0.5, 1.0], clreg_layers=[1],
                        clreg_temperatures=[0.1])
            return StudyConfig(base=base, grid=grid, splits=(10, 20), size=size, n_boot=2000)
        # TOFU's 200 authors, 6 facts each (every fact kind): 5% = 10 forget authors (60 rows),
        # 10% = 20 (120 rows). With 100 authors the target's forget quality was 0.071 at 5%
        # (30 rows) in one of 5 seeds (experiments/results/study-tiny-100-authors). No 1% split
        # (2 authors, 12 rows): on seed 100 one author's 6 rows scored 0.002-0.93.
        base = demo.DemoConfig(data=SyntheticConfig(n_authors=200, n_forget_authors=20,
                                                    n_holdout_authors=20, n_facts=6))
        grid = Grid(lrs=[2.5e-5, 5e-5, 1e-4, 2e-4], clreg_weights=[0.3, 1.0, 3.0],
                    clreg_layers=[1, 2], clreg_temperatures=[0.1, 0.5])
        return StudyConfig(base=base, grid=grid, splits=(5, 10), size=size)
    if size == "micro":
        raise ValueError("size 'micro' exists for the tiny model only")
    # SmolLM2-135M: 40 authors of 7 facts (every fact kind): 5% = 2 authors (14 rows), 10% =
    # 4 (28 rows). No 1% split (one author): on seed 100 with 4 facts, the target's forget
    # quality over one author's rows ranged 0.03-0.77, over 16 rows 0.003; TOFU's 200 authors
    # (1% = 2 authors of 20 facts) do not fit a CPU day.
    base = dataclasses.replace(
        demo.preset(model), data=EnglishAuthorsConfig(n_authors=40, n_forget_authors=4,
                                                      n_holdout_authors=8, n_facts=7))
    grid = Grid(lrs=[5e-5, 1e-4, 2e-4], clreg_weights=[0.3, 1.0], clreg_layers=[20, 23],
                clreg_temperatures=[0.1])
    return StudyConfig(base=base, grid=grid, splits=(5, 10), size=size)


def seed_config(study: StudyConfig, seed: int, split: Optional[float]) -> demo.DemoConfig:
    """The demo configuration of one seed and forget split. ``split=None``: the seed's target
    (its data config names the largest split; the trained rows are the same for every split)."""
    n_authors = study.base.data.n_authors
    percent = max(study.splits) if split is None else split
    data = dataclasses.replace(study.base.data, seed=seed,
                               n_forget_authors=forget_count(n_authors, percent))
    return dataclasses.replace(study.base, data=data, seed=seed)


# --------------------------------------------------------------------------- stage files


def setting_id(method: str, lr: float, clreg: Optional[Dict]) -> str:
    """A stage's file name: the method, the learning rate and the CLReg setting (if any)."""
    name = f"{method}-lr{lr:g}"
    if clreg:
        name += (f"-clreg-w{clreg['clreg_weight']:g}-l{clreg['clreg_layer']}"
                 f"-t{clreg['clreg_temperature']:g}")
    return name


def cell_dir(out_dir: str, phase: str, seed: int, split: float) -> str:
    return os.path.join(out_dir, phase, f"seed-{seed}", f"split-{split:g}")


def _write_json(path: str, obj) -> None:
    """Write atomically: a stage file is either complete or absent (a killed run leaves no
    half-written file that a resume would take for done)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(demo._jsonable(obj), f, indent=1)
    os.replace(tmp, path)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _save_tensors(path: str, obj) -> None:
    import torch

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Runner:
    """Runs the stages of one phase for a set of seeds, skipping stages already on disk.

    ``unlearn_fn`` / ``train_fn`` are the functions that do the work (tests count calls).
    """

    def __init__(self, study: StudyConfig, out_dir: str, cache_dir: str, force: bool = False,
                 progress: bool = True, log: Optional[Callable[[str], None]] = None):
        self.study, self.out_dir, self.cache_dir = study, out_dir, cache_dir
        self.force, self.progress = force, progress
        self.log = log or (lambda text: print(text, flush=True))
        self.unlearn_fn = demo.unlearn_copy
        self.train_fn = demo.trained_model
        self.evaluate_fn = demo.evaluate_arm
        self.stages_run = 0
        self.stages_skipped = 0
        self._bar = None

    # -- bookkeeping

    def _done(self, path: str) -> bool:
        return os.path.exists(path) and not self.force

    def _timed(self, name: str, seconds: float, **extra) -> None:
        entry = {"stage": name, "seconds": round(seconds, 3),
                 "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
                     timespec="seconds"), **extra}
        with open(os.path.join(self.out_dir, "timings.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")

    def _tick(self, label: str, ran: bool) -> None:
        if ran:
            self.stages_run += 1
        else:
            self.stages_skipped += 1
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)

    # -- one (seed, split) cell

    def _cell_stages(self, phase: str, seed: int, split: float,
                     runs: List[Tuple[str, float, Optional[Dict]]]) -> List[str]:
        cell = cell_dir(self.out_dir, phase, seed, split)
        return ([os.path.join(cell, "oracle.json"), os.path.join(cell, "target.json")]
                + [os.path.join(cell, "arms", setting_id(m, lr, c) + ".json")
                   for m, lr, c in runs])

    def run_cells(self, phase: str, seeds: Sequence[int], splits: Sequence[float],
                  runs_of: Callable[[float], List[Tuple[str, float, Optional[Dict]]]],
                  feature_cell: Optional[Tuple[int, float]] = None,
                  feature_runs: Sequence[str] = ()) -> None:
        """Every stage of ``phase`` for ``seeds`` x ``splits``. ``runs_of(split)``: the (method,
        lr, CLReg setting or None) runs of a split. ``feature_cell``/``feature_runs``: where
        (seed, split) and for which setting ids to keep the features (entanglement picture)."""
        from tqdm.auto import tqdm

        self._claim_phase_dir(phase)
        total = sum(len(self._cell_stages(phase, s, p, runs_of(p)))
                    for s in seeds for p in splits)
        self._bar = tqdm(total=total, desc=f"{phase} stages", disable=not self.progress)
        try:
            for seed in seeds:
                target_state: Dict = {}  # the seed's target model, loaded when first needed
                for split in splits:
                    keep = feature_cell == (seed, split)
                    self._run_cell(phase, seed, split, runs_of(split), target_state,
                                   feature_runs if keep else None)
        finally:
            self._bar.close()
            self._bar = None

    def _claim_phase_dir(self, phase: str) -> None:
        """A stage counts as done when its file exists, so stages of another model/data
        configuration in the same folder (e.g. ``--size micro`` then ``full``) would be taken
        for this one's: mark the phase folder with the stage fingerprint and refuse a mismatch."""
        path = os.path.join(self.out_dir, phase, "stages.json")
        mine = self.study.stage_fingerprint()
        if os.path.exists(path):
            theirs = _read_json(path)["stage_fingerprint"]
            if theirs != mine:
                raise ValueError(
                    f"{os.path.dirname(path)} holds stages of another model/data configuration "
                    f"(stage fingerprint {theirs}, this one {mine}); use a new results folder")
        else:
            _write_json(path, {"stage_fingerprint": mine, "base": self.study.describe()["base"]})

    def _run_cell(self, phase, seed, split, runs, target_state, feature_runs) -> None:
        import torch

        cell = cell_dir(self.out_dir, phase, seed, split)
        stages = self._cell_stages(phase, seed, split, runs)
        features = (_load_features(os.path.join(cell, "features.pt"))
                    if feature_runs is not None else {})
        if all(self._done(p) for p in stages) and (
                feature_runs is None
                or {"oracle", "target", *feature_runs} <= set(features)):
            for p in stages:
                self._tick(os.path.relpath(p, self.out_dir), False)
            return
        cfg = seed_config(self.study, seed, split)
        splits, tokenizer, model_path = demo.prepare_data(cfg, None, None, self.log)
        pad = demo._pad_id(tokenizer)
        depth = cfg.num_layers if cfg.model == demo.TINY else demo._num_layers(model_path)
        # The measurement layer (the preset's clreg_layer) and every layer CLReg trains at.
        for layer in {cfg.clreg_layer} | {c["clreg_layer"] for _, _, c in runs if c}:
            demo.check_clreg_layer(dataclasses.replace(cfg, clreg_layer=layer), depth)
        label = f"{phase}/seed-{seed}/split-{split:g}"

        def keep_features(name, raw):
            if feature_runs is not None:
                features[name] = {"forget": raw["features"]["forget"],
                                  "retain": raw["features"]["retain"],
                                  "forget_ids": [ex["concept_id"] for ex in splits["forget"]]}
                # Saved at once: a run stopped inside this cell keeps the features it has, so
                # resuming does not redo the stages that made them.
                _save_tensors(os.path.join(cell, "features.pt"), features)

        # The oracle: trained on this split's retain authors, scored against itself.
        oracle_path = os.path.join(cell, "oracle.json")
        if self._done(oracle_path) and (feature_runs is None or "oracle" in features):
            oracle_raw = _read_json(oracle_path)["raw"]
            self._tick(label + "/oracle", False)
        else:
            t0 = time.time()
            oracle, cached = self.train_fn("oracle", splits["retain"], tokenizer, cfg,
                                           self.cache_dir, self.progress, model_path)
            t_train = time.time() - t0
            m, raw = self.evaluate_fn(oracle, cfg, splits, tokenizer, pad)
            demo.score_oracle_against_itself(m, raw)
            keep_features("oracle", raw)
            oracle_raw = {"forget_truth_ratios": raw["forget_truth_ratios"],
                          "mink_auc": raw.get("mink_auc"), "mink_pp_auc": raw.get("mink_pp_auc")}
            _write_json(oracle_path, {"metrics": m, "raw": oracle_raw,
                                      "forget_authors": cfg.data.n_forget_authors,
                                      "forget_rows": len(splits["forget"])})
            del oracle
            self._timed(label + "/oracle", time.time() - t0, train_seconds=round(t_train, 3),
                        cached_model=cached)
            self._tick(label + "/oracle", True)

        # The target: one per seed (all splits), evaluated on this split's forget/retain.
        target_path = os.path.join(cell, "target.json")
        reference_path = os.path.join(cell, "target_retain_features.pt")

        def target_model():
            if "model" not in target_state:
                t0 = time.time()
                tcfg = seed_config(self.study, seed, None)
                trained = splits["forget"] + splits["retain"]
                model, cached = self.train_fn("target", trained, tokenizer, tcfg,
                                              self.cache_dir, self.progress, model_path)
                target_state["model"] = model
                self._timed(f"{phase}/seed-{seed}/target-model", time.time() - t0,
                            cached_model=cached)
            return target_state["model"]

        if (self._done(target_path) and os.path.exists(reference_path)
                and (feature_runs is None or "target" in features)):
            self._tick(label + "/target", False)
        else:
            t0 = time.time()
            m, raw = self.evaluate_fn(target_model(), cfg, splits, tokenizer, pad, oracle_raw)
            keep_features("target", raw)
            _save_tensors(reference_path, raw["features"]["retain"].cpu())
            _write_json(target_path, {"metrics": m})
            self._timed(label + "/target", time.time() - t0)
            self._tick(label + "/target", True)
        reference = {"retain": torch.load(reference_path)}

        for method, lr, clreg in runs:
            name = setting_id(method, lr, clreg)
            path = os.path.join(cell, "arms", name + ".json")
            if self._done(path) and (feature_runs is None or name not in feature_runs
                                     or name in features):
                self._tick(f"{label}/{name}", False)
                continue
            t0 = time.time()
            # CLReg trains at its grid layer; every arm is *measured* with ``cfg`` (the
            # preset's clreg_layer), so with/without pairs, the target's reference features
            # (retain drift) and the entanglement metrics all compare one layer.
            acfg = dataclasses.replace(cfg, **(clreg or {}))
            model, history = self.unlearn_fn(target_model(), splits, acfg, method,
                                              clreg is not None, lr, pad, False)
            t_unlearn = time.time() - t0
            m, raw = self.evaluate_fn(model, cfg, splits, tokenizer, pad, oracle_raw, reference)
            del model
            if feature_runs is not None and name in feature_runs:
                keep_features(name, raw)
            m["lr"] = lr
            m["final_loss"] = history[-1]["loss"] if history else None
            _write_json(path, {"method": method, "lr": lr, "clreg": clreg, "metrics": m})
            self._timed(f"{label}/{name}", time.time() - t0,
                        unlearn_seconds=round(t_unlearn, 3))
            self._tick(f"{label}/{name}", True)


def _load_features(path: str) -> Dict:
    if not os.path.exists(path):
        return {}
    import torch

    return torch.load(path)


# --------------------------------------------------------------------------- select


def selection_runs(study: StudyConfig) -> List[Tuple[str, float, Optional[Dict]]]:
    runs: List[Tuple[str, float, Optional[Dict]]] = []
    for method in study.base.methods:
        for lr in study.grid.lrs:
            runs.append((method, lr, None))
            runs.extend((method, lr, c) for c in study.grid.clreg_settings())
    return runs


def validation_table(study: StudyConfig, out_dir: str, seeds: Sequence[int]) -> List[Dict]:
    """One row per (validation seed, split, method, lr, CLReg setting) from ``select/`` only:
    the test seeds' folder is never read here."""
    rows = []
    for seed in seeds:
        for split in study.selection_splits:
            for method, lr, clreg in selection_runs(study):
                path = os.path.join(cell_dir(out_dir, "select", seed, split), "arms",
                                    setting_id(method, lr, clreg) + ".json")
                m = _read_json(path)["metrics"]
                rows.append({"seed": seed, "split": split, "method": method, "lr": lr,
                             "clreg": clreg, "forget_quality": m.get("forget_quality"),
                             "utility": m.get(study.utility_key)})
    return rows


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def select_protocol(rows: Sequence[Dict], methods: Sequence[str],
                    tolerance: float = 0.02) -> Dict:
    """The protocol rule. Per method, average forget quality and utility over the validation
    (seed, split) cells of every setting; a CLReg setting (lr, weight, layer, temperature) is
    *eligible* when its mean utility is at least ``(1 - tolerance)`` times that of the method
    without CLReg at the same lr; the chosen one has the highest mean forget quality (ties:
    higher utility, then grid order). No eligible setting: the one losing the least utility
    against its plain run, marked ``"fallback": true``. The plain arm runs at the chosen lr.
    """
    chosen: Dict[str, Dict] = {}
    for method in methods:
        cells: Dict[Tuple, Dict[str, List]] = {}
        order: List[Tuple] = []
        for row in rows:
            if row["method"] != method:
                continue
            clreg = row["clreg"]
            key = (row["lr"],) + ((clreg["clreg_weight"], clreg["clreg_layer"],
                                   clreg["clreg_temperature"]) if clreg else ())
            if key not in cells:
                cells[key] = {"fq": [], "u": []}
                order.append(key)
            cells[key]["fq"].append(row["forget_quality"])
            cells[key]["u"].append(row["utility"])
        plain = {k[0]: _mean(v["u"]) for k, v in cells.items() if len(k) == 1}
        candidates = []
        for index, key in enumerate(order):
            if len(key) == 1:
                continue
            fq, u, base = _mean(cells[key]["fq"]), _mean(cells[key]["u"]), plain.get(key[0])
            if base is None:
                raise ValueError(f"{method}: no run without CLReg at lr {key[0]:g}")
            if fq is None or u is None:
                continue
            candidates.append({"lr": key[0], "clreg_weight": key[1], "clreg_layer": key[2],
                               "clreg_temperature": key[3], "forget_quality": fq,
                               "utility": u, "plain_utility": base,
                               "eligible": u >= (1.0 - tolerance) * base, "_order": index})
        if not candidates:
            raise ValueError(f"{method}: no CLReg setting with forget quality and utility")
        eligible = [c for c in candidates if c["eligible"]]
        if eligible:
            best = max(eligible, key=lambda c: (c["forget_quality"], c["utility"], -c["_order"]))
            best = {**best, "fallback": False}
        else:
            # The least *relative* utility loss, the measure eligibility uses: the setting
            # that the smallest tolerance would have admitted.
            best = max(candidates, key=lambda c: (_utility_ratio(c), -c["_order"]))
            best = {**best, "fallback": True}
        best.pop("_order")
        best.pop("eligible")
        best["n_eligible"] = len(eligible)
        chosen[method] = best
    return chosen


def _utility_ratio(candidate: Dict) -> float:
    """Utility with CLReg over utility without (a plain utility <= 0: the difference)."""
    base = candidate["plain_utility"]
    return candidate["utility"] / base if base > 0 else candidate["utility"] - base


RULE_TEXT = ("per method, mean over validation seeds and splits; among CLReg settings "
             "(lr, weight, layer, temperature) whose mean {utility} is at least (1 - {tol:g}) "
             "times that of the method without CLReg at the same lr, the highest mean forget "
             "quality (ties: higher utility, then grid order); none eligible: the smallest "
             "relative utility loss, marked fallback. The method without CLReg runs at the "
             "chosen lr.")


def run_select(study: StudyConfig, out_dir: str, val_seeds: Sequence[int], runner: Runner,
               ) -> Dict:
    if _has_test_results(out_dir):
        raise RuntimeError(f"{out_dir} already holds test results: the protocol must be fixed "
                           "before the test seeds run; start a new results folder")
    runner.run_cells("select", val_seeds, study.selection_splits,
                     lambda split: selection_runs(study))
    rows = validation_table(study, out_dir, val_seeds)
    chosen = select_protocol(rows, study.base.methods, study.utility_tolerance)
    protocol = {
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rule": RULE_TEXT.format(utility=study.utility_key, tol=study.utility_tolerance),
        "validation_seeds": list(val_seeds),
        "chosen": chosen,
        "study": study.describe(),
        "fingerprint": study.fingerprint(),
        "validation": rows,
    }
    _write_json(os.path.join(out_dir, "protocol.json"), protocol)
    return protocol


def run_prepare(study: StudyConfig, seeds: Sequence[int], runner: Runner) -> int:
    """Fine-tune and cache the targets and oracles of ``seeds`` (the expensive part of a
    ``test`` seed) without evaluating or unlearning anything: no stage file is read or
    written, so nothing here can inform the protocol. Returns how many models were trained."""
    from tqdm.auto import tqdm

    jobs = [(seed, split) for seed in seeds for split in [None, *study.splits]]
    trained = 0
    for seed, split in tqdm(jobs, desc="prepare models", disable=not runner.progress):
        cfg = seed_config(study, seed, split)
        splits, tokenizer, model_path = demo.prepare_data(cfg, None, None, runner.log)
        # forget + retain: the same rows in the same order at every split (tested), so this
        # is the model _run_cell would train and cache under the same key.
        role, rows = (("target", splits["forget"] + splits["retain"]) if split is None
                      else ("oracle", splits["retain"]))
        t0 = time.time()
        model, cached = runner.train_fn(role, rows, tokenizer, cfg, runner.cache_dir,
                                        runner.progress, model_path)
        del model
        name = (f"prepare/seed-{seed}/target-model" if split is None
                else f"prepare/seed-{seed}/split-{split:g}/oracle-model")
        if not cached:
            runner._timed(name, time.time() - t0)
            trained += 1
        runner._tick(name, not cached)
    return trained


def _has_test_results(out_dir: str) -> bool:
    test_dir = os.path.join(out_dir, "test")
    return os.path.isdir(test_dir) and any(
        name.endswith(".json") for _, _, files in os.walk(test_dir) for name in files)


# --------------------------------------------------------------------------- test


def load_protocol(out_dir: str) -> Dict:
    path = os.path.join(out_dir, "protocol.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: run the 'select' phase first (the "
                                "protocol is fixed on validation seeds before any test seed)")
    return _read_json(path)


def load_checked_protocol(study: StudyConfig, out_dir: str, seeds: Sequence[int]) -> Dict:
    """protocol.json, after checking that ``study`` is the configuration it was selected with
    and that no test seed was a validation seed (``test`` and ``report`` both: a report under
    another configuration would aggregate other arms than the protocol's)."""
    protocol = load_protocol(out_dir)
    if protocol["fingerprint"] != study.fingerprint():
        raise ValueError("the study configuration differs from the one protocol.json was "
                         "selected with (model, size, splits, grid, methods, rule); run test "
                         "and report with the protocol's settings (give no configuration "
                         "option) or select again in a new folder")
    overlap = sorted(set(seeds) & set(protocol["validation_seeds"]))
    if overlap:
        raise ValueError(f"test seeds {overlap} were validation seeds")
    return protocol


def chosen_clreg(protocol: Dict, method: str) -> Dict:
    c = protocol["chosen"][method]
    return {k: c[k] for k in ("clreg_weight", "clreg_layer", "clreg_temperature")}


def final_runs(study: StudyConfig, protocol: Dict,
               split: float) -> List[Tuple[str, float, Optional[Dict]]]:
    """Every method without and with its protocol CLReg setting at every grid lr (the
    trade-off curve; on the primary split only unless ``sweep_every_split``); the headline
    arms are those at the protocol's lr."""
    runs = []
    for method in study.base.methods:
        for lr in sweep_lrs(study, protocol, method, split):
            runs.append((method, lr, None))
            runs.append((method, lr, chosen_clreg(protocol, method)))
    return runs


def sweep_lrs(study: StudyConfig, protocol: Dict, method: str, split: float) -> List[float]:
    if study.sweep_every_split or split == study.primary_split:
        return list(study.grid.lrs)
    return [protocol["chosen"][method]["lr"]]


def run_test(study: StudyConfig, out_dir: str, seeds: Sequence[int], runner: Runner,
             make_plot: bool = True) -> Dict:
    protocol = load_checked_protocol(study, out_dir, seeds)
    feature_runs = [setting_id(m, lr, c)
                    for m, lr, c in final_runs(study, protocol, study.primary_split)
                    if lr == protocol["chosen"][m]["lr"]]
    runner.run_cells("test", seeds, study.splits,
                     lambda split: final_runs(study, protocol, split),
                     feature_cell=(seeds[0], study.primary_split), feature_runs=feature_runs)
    return report(study, out_dir, seeds, make_plot=make_plot)


def seed_metrics(study: StudyConfig, out_dir: str, protocol: Dict, seed: int,
                 split: float) -> Dict[str, Dict]:
    """The per-seed ``metrics.json`` of one (seed, split): demo's format (an unlearned arm holds
    its metrics at the protocol's lr and its ``sweep`` over the grid's lrs)."""
    cell = cell_dir(out_dir, "test", seed, split)

    def stage(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: run the test phase for seed {seed} "
                                    "first (it resumes where it stopped)")
        return _read_json(path)["metrics"]

    arms: Dict[str, Dict] = {"target": stage(os.path.join(cell, "target.json")),
                             "oracle": stage(os.path.join(cell, "oracle.json"))}
    for method in study.base.methods:
        for clreg in (None, chosen_clreg(protocol, method)):
            sweep = []
            for lr in sweep_lrs(study, protocol, method, split):
                sweep.append(stage(os.path.join(cell, "arms",
                                                setting_id(method, lr, clreg) + ".json")))
            lr = protocol["chosen"][method]["lr"]
            main = next(p for p in sweep if p["lr"] == lr)
            arms[method + ("+clreg" if clreg else "")] = {**main, "sweep": sweep}
    return arms


# --------------------------------------------------------------------------- aggregation


def describe_values(values: Sequence[Optional[float]]) -> Dict:
    """``{"mean", "std", "values"}``: the mean and the sample standard deviation (n - 1) over the
    finite values; ``values`` keeps one entry per seed (None where a seed has none)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    mean = sum(finite) / len(finite) if finite else None
    std = (math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
           if len(finite) >= 2 else None)
    return {"mean": mean, "std": std,
            "values": [None if v is None or not math.isfinite(v) else float(v) for v in values]}


def paired_t_interval(diffs: Sequence[float], level: float = 0.95) -> Tuple[float, float]:
    """The paired t interval of the mean difference: mean +- t_{(1+level)/2, n-1} * sd / sqrt(n)."""
    from scipy import stats

    n = len(diffs)
    if n < 2:
        raise ValueError(f"a t interval needs at least 2 differences, got {n}")
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def paired_bootstrap_interval(diffs: Sequence[float], level: float = 0.95, n_boot: int = 10000,
                              seed: int = 0) -> Tuple[float, float]:
    """Percentile interval of the mean difference over ``n_boot`` resamples of the seeds (with
    replacement; each resample keeps a seed's with/without pair together)."""
    import numpy as np

    d = np.asarray(diffs, dtype=float)
    if d.size < 1:
        raise ValueError("a bootstrap interval needs at least 1 difference")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def paired_difference(with_clreg: Sequence[Optional[float]],
                      without: Sequence[Optional[float]], n_boot: int = 10000) -> Dict:
    """With minus without CLReg per seed (seeds where both are finite). ``ci_low``/``ci_high``:
    the 95% paired t interval (honest with 3-5 seeds, where a percentile bootstrap is too
    narrow); ``boot_low``/``boot_high``: the paired bootstrap's 95% percentile interval."""
    if len(with_clreg) != len(without):
        raise ValueError(f"paired values need equal lengths, got {len(with_clreg)} and "
                         f"{len(without)}")
    diffs = [float(a) - float(b) for a, b in zip(with_clreg, without)
             if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    out = {"mean_diff": sum(diffs) / len(diffs) if diffs else None, "ci_low": None,
           "ci_high": None, "boot_low": None, "boot_high": None, "n": len(diffs)}
    if len(diffs) >= 2:
        out["ci_low"], out["ci_high"] = paired_t_interval(diffs)
        out["boot_low"], out["boot_high"] = paired_bootstrap_interval(diffs, n_boot=n_boot)
    return out


def paired_line(method: str, key: str, d: Dict) -> str:
    """One paired difference for the console; an interval that cannot be computed (fewer than
    2 seeds with both values) reads "n/a", never a bare number that looks like a result."""
    if d["mean_diff"] is None:
        return f"{method}: +CLReg - without, {key}: n/a (no seed has both values)"
    ci = (f"[{d['ci_low']:+.3g}, {d['ci_high']:+.3g}]" if d["ci_low"] is not None
          else f"n/a (n={d['n']})")
    return f"{method}: +CLReg - without, {key}: {d['mean_diff']:+.3g}, 95% t interval {ci}"


def metric_names(per_seed: Sequence[Dict[str, Dict]]) -> List[str]:
    names = set()
    for arms in per_seed:
        for m in arms.values():
            names.update(k for k, v in m.items() if k not in NOT_METRICS
                         and (v is None or isinstance(v, (int, float)))
                         and not isinstance(v, bool))
    return sorted(names)


def aggregate(per_seed: Dict[int, Dict[str, Dict]], methods: Sequence[str], model: str,
              protocol: Dict, n_boot: int = 10000) -> Dict:
    """summary.json: ``{"model", "seeds", "protocol", "arms": {arm: {metric: {"mean", "std",
    "values"}}}, "paired": {method: {metric: {"mean_diff", "ci_low", "ci_high", ...}}}}``."""
    seeds = sorted(per_seed)
    tables = [per_seed[s] for s in seeds]
    names = metric_names(tables)
    arm_names = [a for a in ["target", "oracle"] + [m + s for m in methods
                                                    for s in ("", "+clreg")]
                 if all(a in t for t in tables)]
    arms = {}
    for arm in arm_names:
        arms[arm] = {k: describe_values([t[arm].get(k) for t in tables])
                     for k in names if any(k in t[arm] for t in tables)}
    paired = {}
    for method in methods:
        if method not in arm_names or method + "+clreg" not in arm_names:
            continue
        paired[method] = {
            k: paired_difference([t[method + "+clreg"].get(k) for t in tables],
                                 [t[method].get(k) for t in tables], n_boot=n_boot)
            for k in names if k in arms[method] and k in arms[method + "+clreg"]}
    return {"model": model, "seeds": seeds, "protocol": protocol, "arms": arms,
            "paired": paired}


def target_check(study: StudyConfig, per_split: Dict[float, Dict[int, Dict]]) -> Dict:
    """The target's forget quality against each (seed, split) oracle; ``ok``: below the bar
    in every cell (the issue: forget quality must be able to tell the target from the oracle);
    ``ok_by_split``: the same per split ("5", "10"), since one split can pass and another not."""
    cells = []
    for split, per_seed in per_split.items():
        for seed, arms in sorted(per_seed.items()):
            fq = arms["target"].get("forget_quality")
            cells.append({"seed": seed, "split": split, "forget_quality": fq,
                          "below_bar": fq is not None and fq < study.forget_quality_bar})
    by_split = {f"{split:g}": all(c["below_bar"] for c in cells if c["split"] == split)
                for split in per_split}
    return {"bar": study.forget_quality_bar, "ok": all(c["below_bar"] for c in cells),
            "ok_by_split": by_split, "cells": cells}


def report(study: StudyConfig, out_dir: str, seeds: Sequence[int], make_plot: bool = True,
           log: Optional[Callable[[str], None]] = None) -> Dict:
    """Aggregate the test stages on disk: per-seed ``metrics.json``, ``summary-split<P>.json``
    per split, ``summary.json`` (the primary split), ``target_check.json`` and the plots.
    Returns the primary split's summary."""
    log = log or (lambda text: print(text, flush=True))
    protocol = load_checked_protocol(study, out_dir, seeds)
    light_protocol = {k: v for k, v in protocol.items() if k != "validation"}
    per_split: Dict[float, Dict[int, Dict]] = {}
    summaries = {}
    for split in study.splits:
        per_seed = {}
        for seed in seeds:
            arms = seed_metrics(study, out_dir, protocol, seed, split)
            _write_json(os.path.join(cell_dir(out_dir, "test", seed, split), "metrics.json"),
                        arms)
            per_seed[seed] = arms
        per_split[split] = per_seed
        summary = aggregate(per_seed, study.base.methods, study.base.model, light_protocol,
                            n_boot=study.n_boot)
        summary["split"] = split
        summary["interval"] = ("ci_low/ci_high: 95% paired t interval over seeds; boot_low/"
                               "boot_high: 95% paired bootstrap percentile interval")
        summaries[split] = summary
        _write_json(os.path.join(out_dir, f"summary-split{split:g}.json"), summary)
    _write_json(os.path.join(out_dir, "summary.json"), summaries[study.primary_split])
    check = target_check(study, per_split)
    _write_json(os.path.join(out_dir, "target_check.json"), check)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(study, summaries, check, per_split, protocol,
                                 timing_table(out_dir)))
    with open(os.path.join(out_dir, "headline.md"), "w") as f:
        f.write(headline_markdown(summaries[study.primary_split]))
    bad = [c for c in check["cells"] if not c["below_bar"]]
    if bad:
        log(f"WARNING: the target's forget quality is not below {check['bar']} in "
            + ", ".join(f"seed {c['seed']} split {c['split']:g}% ({c['forget_quality']})"
                        for c in bad)
            + ": forget quality cannot tell the target from the oracle there")
    if make_plot:
        plot_tradeoff(study, per_split[study.primary_split],
                      os.path.join(out_dir, "tradeoff.png"))
        plot_privleak(summaries[study.primary_split], study.base.methods,
                      os.path.join(out_dir, "privleak.png"))
        cell = cell_dir(out_dir, "test", seeds[0], study.primary_split)
        features = _load_features(os.path.join(cell, "features.pt"))
        if features:
            results = per_split[study.primary_split][seeds[0]]
            by_arm = {"target": features.get("target"), "oracle": features.get("oracle")}
            for method in study.base.methods:
                lr = protocol["chosen"][method]["lr"]
                for arm, clreg in ((method, None), (method + "+clreg",
                                                     chosen_clreg(protocol, method))):
                    by_arm[arm] = features.get(setting_id(method, lr, clreg))
            demo.plot_entanglement({k: v for k, v in by_arm.items() if v is not None},
                                   results, study.base.methods, study.base.clreg_layer,
                                   os.path.join(out_dir, "entanglement.png"))
    return summaries[study.primary_split]


# --------------------------------------------------------------------------- summary.md

# The columns of summary.md: (metric key, header). The utility column is the study's utility key.
TABLE_METRICS = (("forget_quality", "forget quality ↑"), (None, "utility ↑"),
                 ("privleak", "privleak % (0 best)"),
                 ("forget_extraction_strength", "forget ES ↓"),
                 ("entanglement_score", "Entanglement Score ↓"))


# README's table: the issue's four measures (forget quality, utility, privleak, Entanglement
# Score) of the primary split.
HEADLINE_METRICS = (("forget_quality", "forget quality ↑"), (None, "utility ↑"),
                    ("privleak", "privleak % (0 best, < 0 leaks)"),
                    ("entanglement_score", "Entanglement Score ↓"))


def _columns(spec, util: str) -> Tuple[List[str], List[str]]:
    """``(keys, headers)`` of a table spec; the ``None`` key is the study's utility key."""
    return [k or util for k, _ in spec], [h if k else f"{util} ↑" for k, h in spec]


def _table_head(first: str, heads: Sequence[str]) -> List[str]:
    return [f"| {first} | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]


def _arm_rows(summary: Dict, keys: Sequence[str]) -> List[str]:
    """One row per arm: mean ± std of each key."""
    return [f"| {arm} | " + " | ".join(_mean_std(m.get(k)) for k in keys) + " |"
            for arm, m in summary["arms"].items()]


def _paired_rows(summary: Dict, keys: Sequence[str], label: str = "{method}") -> List[str]:
    """One row per method: the paired difference of each key with its interval."""
    return [f"| {label.format(method=method)} | "
            + " | ".join(_paired_cell(m.get(k)) for k in keys) + " |"
            for method, m in summary["paired"].items()]


def headline_markdown(summary: Dict) -> str:
    """``headline.md``: the primary split's arms (mean ± std) and paired differences (95% t
    interval) in the four headline measures, the rows README quotes verbatim (a test checks
    that README's rows are these)."""
    keys, heads = _columns(HEADLINE_METRICS, summary["protocol"]["study"]["utility_key"])
    lines = (_table_head("arm", heads) + _arm_rows(summary, keys)
             + _paired_rows(summary, keys, "paired: {method}, with - without"))
    return "\n".join(lines) + "\n"


def _fmt(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if x != 0 and abs(x) < 1e-2:
        return f"{x:.{digits}g}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits - 1}f}" if abs(x) >= 1 else f"{x:.{digits}f}"


def _mean_std(d: Optional[Dict]) -> str:
    if not d or d.get("mean") is None:
        return "n/a"
    return _fmt(d["mean"]) + ("" if d.get("std") is None else f" ± {_fmt(d['std'])}")


def _paired_cell(d: Optional[Dict]) -> str:
    if not d or d.get("mean_diff") is None:
        return "n/a"
    if d.get("ci_low") is None:
        return f"{d['mean_diff']:+.3g} (n={d['n']})"
    return f"{d['mean_diff']:+.3g} [{d['ci_low']:+.3g}, {d['ci_high']:+.3g}]"


def timing_entries(out_dir: str) -> List[Dict]:
    """The entries of ``out_dir/timings.jsonl`` (none if absent)."""
    path = os.path.join(out_dir, "timings.jsonl")
    if not os.path.exists(path):
        return []
    entries = []
    with open(path) as f:
        for line in f:
            try:
                entries.append(json.loads(line))
            except ValueError:  # a run killed mid-append leaves a partial last line
                continue
    return entries


def _median(values: Sequence[float]) -> float:
    """The upper median (a stage time that occurred)."""
    return sorted(values)[len(values) // 2]


def timing_table(out_dir: str) -> List[Dict]:
    """Wall time per (phase, stage kind) from timings.jsonl: count, total and median seconds."""
    groups: Dict[Tuple[str, str], List[float]] = {}
    for entry in timing_entries(out_dir):
        key = (entry["stage"].split("/", 1)[0], stage_kind(entry["stage"]))
        groups.setdefault(key, []).append(entry["seconds"])
    return [{"phase": phase, "kind": kind, "count": len(v), "total_s": round(sum(v), 1),
             "median_s": round(_median(v), 1)}
            for (phase, kind), v in sorted(groups.items())]


def summary_markdown(study: StudyConfig, summaries: Dict[float, Dict], check: Dict,
                     per_split: Dict[float, Dict[int, Dict]], protocol: Dict,
                     timings: Sequence[Dict]) -> str:
    """summary.md: every table of the study, read off the summaries (nothing recomputed but
    the sweep means), for README and people who would rather read than parse JSON."""
    util = study.utility_key
    keys, heads = _columns(TABLE_METRICS, util)
    primary = summaries[study.primary_split]
    lines = [f"# Study: {study.base.model}, test seeds {primary['seeds']}", "",
             "Written by `python -m clreg_fast.study report` from the stage files; every number "
             "is in `summary*.json`. Mean ± sample std over the test seeds; paired differences "
             "are with minus without CLReg per seed, with the 95% paired t interval.", "",
             "## Protocol (chosen on validation seeds "
             f"{protocol['validation_seeds']} before any test seed ran)", "",
             f"Rule: {protocol['rule']}", "",
             "| method | lr | CLReg weight | layer | temperature | validation forget quality | "
             f"validation {util} (without CLReg) | fallback |", "|---|---|---|---|---|---|---|---|"]
    for method, c in protocol["chosen"].items():
        lines.append(f"| {method} | {c['lr']:g} | {c['clreg_weight']:g} | {c['clreg_layer']} | "
                     f"{c['clreg_temperature']:g} | {_fmt(c['forget_quality'])} | "
                     f"{_fmt(c['utility'])} ({_fmt(c['plain_utility'])}) | "
                     f"{'yes' if c['fallback'] else 'no'} |")
    for split in study.splits:
        summary = summaries[split]
        star = " (primary: summary.json)" if split == study.primary_split else ""
        lines += ["", f"## Forget split {split:g}%{star}", ""]
        if not check["ok_by_split"].get(f"{split:g}", True):
            failed = [c["seed"] for c in check["cells"]
                      if c["split"] == split and not c["below_bar"]]
            lines += [f"**Target check failed in this split** (seeds {failed}): the target's "
                      f"forget quality is not below {check['bar']:g}, so forget quality (and "
                      "its paired difference) cannot tell a model that knows the forget set "
                      "from the oracle here. The other columns stand.", ""]
        lines += _table_head("arm", heads) + _arm_rows(summary, keys) + [""]
        lines += _table_head("paired: +CLReg - without", heads) + _paired_rows(summary, keys)
    # The trade-off over the lr sweep (primary split): each method's best lr may differ with
    # and without CLReg, which the paired rows at the protocol's lr do not show.
    per_seed = per_split[study.primary_split]
    lines += ["", f"## Learning-rate sweep, split {study.primary_split:g}% (mean over seeds: "
              f"forget quality / {util})", "",
              "| method | " + " | ".join(f"lr {lr:g}" for lr in study.grid.lrs) + " |",
              "|---" * (len(study.grid.lrs) + 1) + "|"]
    for method in study.base.methods:
        for arm in (method, method + "+clreg"):
            cells = []
            for lr in study.grid.lrs:
                points = [p for arms in per_seed.values() for p in arms[arm]["sweep"]
                          if p["lr"] == lr]
                fq = _mean([p.get("forget_quality") for p in points])
                ut = _mean([p.get(util) for p in points])
                cells.append("n/a" if fq is None else f"{_fmt(fq)} / {_fmt(ut)}")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", f"## Target check (target's forget quality < {check['bar']})", "",
              f"All cells below the bar: {'yes' if check['ok'] else 'NO'}", "",
              "| split | " + " | ".join(f"seed {s}" for s in primary["seeds"])
              + " | every seed below |", "|---" * (len(primary["seeds"]) + 2) + "|"]
    for split in study.splits:
        by_seed = {c["seed"]: c for c in check["cells"] if c["split"] == split}
        ok = check["ok_by_split"].get(f"{split:g}")
        lines.append(f"| {split:g}% | " + " | ".join(
            _fmt(by_seed[s]["forget_quality"]) if s in by_seed else "n/a"
            for s in primary["seeds"]) + f" | {'yes' if ok else 'NO'} |")
    if timings:
        lines += ["", "## Wall time (timings.jsonl; this folder's machine)", "",
                  "| phase | stage | count | total | median |", "|---|---|---|---|---|"]
        for t in timings:
            lines.append(f"| {t['phase']} | {t['kind']} | {t['count']} | "
                         f"{t['total_s'] / 60:.1f} min | {t['median_s']:.0f} s |")
        # In select and test the target's fine-tuning is timed inside the stage that first
        # needs it, so adding its row would count it twice; prepare times it on its own.
        totals: Dict[str, float] = {}
        for t in timings:
            if t["kind"] != "target-model" or t["phase"] == "prepare":
                totals[t["phase"]] = totals.get(t["phase"], 0.0) + t["total_s"]
        lines += ["", "Per phase (one core; `target-model` rows of select and test are inside "
                  "the stage that first needed the target, not added again): "
                  + ", ".join(f"{phase} {sec / 60:.0f} min" for phase, sec in totals.items())
                  + "."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plan


def stage_kind(stage: str) -> str:
    """``oracle``, ``target-model``, ``target`` (its evaluation), ``oracle-model`` (``prepare``'s
    fine-tuning alone) or ``run`` (unlearn + evaluate)."""
    last = stage.rsplit("/", 1)[-1]
    return last if last in ("oracle", "target-model", "target", "oracle-model") else "run"


def plan(study: StudyConfig, out_dir: str, val_seeds: Sequence[int],
         seeds: Sequence[int]) -> Dict[str, Dict]:
    """Stages of each phase, done (on disk) and pending, and the pending time estimated from
    the median seconds of each stage kind in ``timings.jsonl`` (None before any timing).
    Before protocol.json exists, the test phase is counted with a placeholder CLReg setting
    (same count). Target fine-tunings (one per seed, cached outside the folder) are counted
    per seed whose stages are not all done."""
    times: Dict[str, List[float]] = {}
    for entry in timing_entries(out_dir):
        times.setdefault(stage_kind(entry["stage"]), []).append(entry["seconds"])
    median = {k: _median(v) for k, v in times.items()}
    protocol_path = os.path.join(out_dir, "protocol.json")
    if os.path.exists(protocol_path):
        protocol = _read_json(protocol_path)
    else:
        setting = study.grid.clreg_settings()[0]
        protocol = {"chosen": {m: {"lr": study.grid.lrs[0], **setting}
                               for m in study.base.methods}}
    phases = {"select": (val_seeds, study.selection_splits, lambda p: selection_runs(study)),
              "test": (seeds, study.splits, lambda p: final_runs(study, protocol, p))}
    out = {}
    runner = Runner(study, out_dir, "", progress=False)
    for phase, (phase_seeds, splits, runs_of) in phases.items():
        counts = {"done": 0, "pending": 0, "pending_by_kind": {}, "pending_seconds": 0.0}
        for seed in phase_seeds or ():
            seed_pending = False
            for split in splits:
                for stage in runner._cell_stages(phase, seed, split, runs_of(split)):
                    if os.path.exists(stage):
                        counts["done"] += 1
                        continue
                    seed_pending = True
                    name = os.path.basename(stage)[:-len(".json")]
                    kind = name if name in ("oracle", "target") else "run"
                    counts["pending"] += 1
                    counts["pending_by_kind"][kind] = counts["pending_by_kind"].get(kind, 0) + 1
                    counts["pending_seconds"] += median.get(kind, 0.0)
            if seed_pending:
                counts["pending_by_kind"]["target-model"] = (
                    counts["pending_by_kind"].get("target-model", 0) + 1)
                counts["pending_seconds"] += median.get("target-model", 0.0)
        if not median:
            counts["pending_seconds"] = None
        out[phase] = counts
    return out


# --------------------------------------------------------------------------- plots


def plot_tradeoff(study: StudyConfig, per_seed: Dict[int, Dict], path: str) -> None:
    """``tradeoff.png``: forget quality against utility over the lr sweep, one panel per
    method, without (dashed) and with CLReg (solid); points: means over seeds, bars: the lowest
    to the highest seed (on the log axis a mean - std bar would often run below 0); target and
    oracle as reference points."""
    plt = demo._pyplot()
    methods = list(study.base.methods)
    ukey = study.utility_key
    floor = 1e-12  # forget quality is a p-value: keep 0 on the log axis

    def point_and_bar(values, lowest=-math.inf):
        """The mean and its (below, above) distances to the lowest and highest seed."""
        d = describe_values(values)
        finite = [v for v in d["values"] if v is not None]
        if d["mean"] is None:
            return float("nan"), (0.0, 0.0)
        mean = max(d["mean"], lowest)
        return mean, (mean - max(min(finite), lowest), max(max(finite), lowest) - mean)

    fig, axes = plt.subplots(1, len(methods), figsize=(5.2 * len(methods), 4.6), squeeze=False)
    seeds = sorted(per_seed)
    for ax, method in zip(axes[0], methods):
        for arm in (method, method + "+clreg"):
            color, ls, marker = demo._style(arm)
            xs, ys, xe, ye = [], [], [[], []], [[], []]
            for i, lr in enumerate(study.grid.lrs):
                x, (xlo, xhi) = point_and_bar([per_seed[s][arm]["sweep"][i].get(ukey)
                                               for s in seeds])
                y, (ylo, yhi) = point_and_bar([per_seed[s][arm]["sweep"][i].get("forget_quality")
                                               for s in seeds], lowest=floor)
                xs.append(x)
                ys.append(y)
                xe[0].append(xlo)
                xe[1].append(xhi)
                ye[0].append(ylo)
                ye[1].append(yhi)
            ax.errorbar(xs, ys, xerr=xe, yerr=ye, ls=ls, marker=marker, color=color,
                        label=arm, capsize=3)
            for lr, x, y in zip(study.grid.lrs, xs, ys):
                ax.annotate(f"{lr:.2g}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=color)
        for arm, marker, color in (("target", "*", "black"), ("oracle", "P", "tab:green")):
            u = describe_values([per_seed[s][arm].get(ukey) for s in seeds])["mean"]
            q = describe_values([per_seed[s][arm].get("forget_quality") for s in seeds])["mean"]
            ax.scatter([u], [max(q or floor, floor)], marker=marker, s=150, color=color,
                       label=arm, zorder=5)
        ax.set_yscale("log")
        ax.set_xlabel(ukey.replace("_", " ") + " (higher = better)")
        ax.set_ylabel("forget quality (higher = closer to the oracle)")
        ax.set_title(f"{method}: learning-rate sweep")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"{study.base.model}, split {study.primary_split:g}%, {len(seeds)} seeds "
                 "(mean; bars: lowest to highest seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_privleak(summary: Dict, methods: Sequence[str], path: str) -> None:
    """``privleak.png``: privleak (relative to the oracle, whose own is 0) per arm, mean and
    standard deviation over seeds."""
    plt = demo._pyplot()
    arms = [a for a in ["target"] + [m + s for m in methods for s in ("", "+clreg")]
            if a in summary["arms"] and "privleak" in summary["arms"][a]]
    means = [summary["arms"][a]["privleak"]["mean"] or 0.0 for a in arms]
    stds = [summary["arms"][a]["privleak"]["std"] or 0.0 for a in arms]
    fig, ax = plt.subplots(figsize=(1.2 * len(arms) + 2, 4.2))
    colors = ["black" if a == "target" else demo._style(a)[0] for a in arms]
    bars = ax.bar(range(len(arms)), means, yerr=stds, color=colors, capsize=4)
    for bar, arm in zip(bars, arms):
        if arm.endswith("+clreg"):
            bar.set_hatch("//")
    ax.axhline(0.0, color="tab:green", lw=1.5, label="oracle (0 by definition)")
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels(arms, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("privleak % (0 = the oracle's)")
    ax.set_title(f"Privacy leakage against the oracle, {len(summary['seeds'])} seeds")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct integers, got {text!r}")
    return values


def _float_list(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _record_invocation(out_dir: str, entry: Dict) -> None:
    path = os.path.join(out_dir, "run.json")
    info = _read_json(path) if os.path.exists(path) else {"invocations": []}
    info["invocations"].append({**entry, "machine": demo._machine()})
    _write_json(path, info)


STUDY_OPTIONS = ("model", "size", "splits", "primary_split", "grid", "tolerance", "methods",
                 "val_splits", "sweep_every_split")


def _base_from_dict(preset: demo.DemoConfig, recorded: Dict) -> demo.DemoConfig:
    """``preset`` with the fields ``describe()["base"]`` recorded (seed and device stay the
    preset's: they are not recorded). Fields the record lacks keep the preset's value, so a
    mismatch still shows in the fingerprint check."""
    names = {f.name for f in dataclasses.fields(preset)} - {"seed", "device", "data"}
    changes = {k: tuple(v) if isinstance(v, list) else v
               for k, v in recorded.items() if k in names}
    if "data" in recorded:
        changes["data"] = type(preset.data)(**recorded["data"])
    return dataclasses.replace(preset, **changes)


def study_from_protocol(protocol: Dict, device: Optional[str] = None) -> StudyConfig:
    """The study configuration protocol.json was selected with (``test`` and ``report`` take
    it from there, so they need only the seeds)."""
    d = protocol["study"]
    study = study_preset(d["model"], d["size"])
    # The model/data configuration as recorded, not today's preset: a folder selected before a
    # preset changed (e.g. study-tiny-100-authors) still reports and resumes.
    base = dataclasses.replace(_base_from_dict(study.base, d["base"]),
                               methods=tuple(d["methods"]), device=device)
    return dataclasses.replace(study, base=base, splits=d["splits"],
                               primary_split=d["primary_split"], grid=Grid.from_dict(d["grid"]),
                               utility_tolerance=d["utility_tolerance"],
                               selection_splits=d["selection_splits"],
                               sweep_every_split=d["sweep_every_split"],
                               forget_quality_bar=d["forget_quality_bar"])


def build_study(args) -> StudyConfig:
    explicit = any(getattr(args, k) is not None for k in STUDY_OPTIONS)
    protocol_path = os.path.join(args.out_dir, "protocol.json")
    if args.phase != "select" and not explicit and os.path.exists(protocol_path):
        return study_from_protocol(_read_json(protocol_path), args.device)
    model = args.model or demo.TINY
    model = demo.TINY if model.lower() == demo.TINY else model
    study = study_preset(model, args.size or "full")
    changes = {}
    if args.splits is not None:
        changes["splits"] = args.splits
    if args.primary_split is not None:
        changes["primary_split"] = args.primary_split
    if args.grid:
        with open(args.grid) as f:
            changes["grid"] = Grid.from_dict(json.load(f))
    if args.tolerance is not None:
        changes["utility_tolerance"] = args.tolerance
    if args.val_splits is not None:
        changes["selection_splits"] = args.val_splits
    if args.sweep_every_split:
        changes["sweep_every_split"] = True
    base_changes = {}
    if args.methods:
        base_changes["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.device:
        base_changes["device"] = args.device
    if base_changes:
        changes["base"] = dataclasses.replace(study.base, **base_changes)
    if "primary_split" not in changes and "splits" in changes:
        changes["primary_split"] = None
    if "selection_splits" not in changes and ("splits" in changes or "primary_split" in changes):
        changes["selection_splits"] = None
    return dataclasses.replace(study, **changes)


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m clreg_fast.study",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=("select", "test", "report", "plan", "prepare"),
                        help="plan: count the stages done and pending (runs nothing); "
                             "prepare: fine-tune and cache the --seeds' targets and oracles")
    parser.add_argument("--out-dir", required=True, help="the results folder (resumable)")
    parser.add_argument("--model", default=None,
                        help="tiny (default), smollm2-135m or an HF folder; test and report take "
                             "it (and every option of the study's configuration) from "
                             "protocol.json when none is given")
    parser.add_argument("--size", default=None, choices=SIZES,
                        help="full (the study, default) or micro (tiny only; tests)")
    parser.add_argument("--seeds", type=_int_list, default=None,
                        help="test seeds, e.g. 0,1,2,3,4 (test, report)")
    parser.add_argument("--val-seeds", type=_int_list, default=None,
                        help="validation seeds, e.g. 100,101 (select)")
    parser.add_argument("--splits", type=_float_list, default=None,
                        help="forget splits in %% of the trained authors (default: the "
                             "preset's, 5,10; TOFU also has 1)")
    parser.add_argument("--primary-split", type=float, default=None,
                        help="summary.json's split (default: the largest)")
    parser.add_argument("--val-splits", type=_float_list, default=None,
                        help="the splits select runs (default: the primary split)")
    parser.add_argument("--sweep-every-split", action="store_true", default=None,
                        help="test: the lr sweep on every split, not only the primary one")
    parser.add_argument("--grid", default=None,
                        help="JSON file: {lrs, clreg_weights, clreg_layers, clreg_temperatures}")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="the rule's relative utility margin (default 0.02)")
    parser.add_argument("--methods", default=None, help="comma-separated (default: preset's)")
    parser.add_argument("--device", default=None, help="cuda or cpu for every stage "
                        "(default: CPU, unlearning on CUDA when there is one)")
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                           "clreg_fast", "study"),
                        help="fine-tuned targets and oracles (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="redo stages already on disk")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    try:
        study = build_study(args)
    except (ValueError, TypeError, OSError) as err:  # OSError: an unreadable --grid file
        parser.error(str(err))
    os.makedirs(args.out_dir, exist_ok=True)
    runner = Runner(study, args.out_dir, args.cache_dir, force=args.force,
                    progress=not args.no_progress and sys.stderr.isatty())
    started = time.time()
    entry = {"command": " ".join([os.path.basename(sys.executable), "-m", "clreg_fast.study"]
                                 + list(sys.argv[1:] if argv is None else argv)),
             "phase": args.phase,
             "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                 timespec="seconds")}
    if args.phase == "plan":
        for phase, counts in plan(study, args.out_dir, args.val_seeds or (),
                                  args.seeds or ()).items():
            eta = counts["pending_seconds"]
            print(f"{phase}: {counts['done']} stages done, {counts['pending']} pending "
                  f"{counts['pending_by_kind']}"
                  + (f", about {eta / 60:.0f} min at the median stage times so far"
                     if eta is not None else ""))
        return 0
    if args.phase == "prepare":
        if not args.seeds:
            parser.error("prepare needs --seeds")
        trained = run_prepare(study, args.seeds, runner)
        print(f"prepare: {trained} models fine-tuned, "
              f"{runner.stages_skipped} already cached in {args.cache_dir}")
    elif args.phase == "select":
        if not args.val_seeds:
            parser.error("select needs --val-seeds")
        try:
            protocol = run_select(study, args.out_dir, args.val_seeds, runner)
        except (RuntimeError, ValueError) as err:
            parser.error(str(err))
        for method, c in protocol["chosen"].items():
            print(f"{method}: lr {c['lr']:g}, CLReg weight {c['clreg_weight']:g}, layer "
                  f"{c['clreg_layer']}, temperature {c['clreg_temperature']:g} (forget quality "
                  f"{c['forget_quality']:.3g}, utility {c['utility']:.3f} vs "
                  f"{c['plain_utility']:.3f}{', FALLBACK' if c['fallback'] else ''})")
    else:
        if not args.seeds:
            parser.error(f"{args.phase} needs --seeds")
        try:
            if args.phase == "test":
                summary = run_test(study, args.out_dir, args.seeds, runner,
                                   make_plot=not args.no_plot)
            else:
                summary = report(study, args.out_dir, args.seeds, make_plot=not args.no_plot)
        except (FileNotFoundError, ValueError) as err:
            parser.error(str(err))
        for method, by_metric in summary["paired"].items():
            for key in ("forget_quality", study.utility_key, "privleak", "entanglement_score"):
                if by_metric.get(key):
                    print(paired_line(method, key, by_metric[key]))
    entry.update(seconds=round(time.time() - started, 1), stages_run=runner.stages_run,
                 stages_skipped=runner.stages_skipped, fingerprint=study.fingerprint(),
                 seeds=args.seeds, val_seeds=args.val_seeds)
    _record_invocation(args.out_dir, entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
