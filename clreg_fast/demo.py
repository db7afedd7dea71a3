"""The default experiment: unlearning synthetic author facts with and without CLReg.

    python -m clreg_fast.demo            # full run (about 5 minutes on 2 CPU cores, first time)
    python -m clreg_fast.demo --quick    # CI-sized run

1. Generate a fictitious-author dataset (forget / retain / never-trained holdout authors,
   paraphrased and perturbed answers) with its own word-level tokenizer: nothing is downloaded.
2. Train a tiny random-init LLaMA on forget + retain (the *target*) and on retain only (the
   *oracle*); both are cached (``--cache-dir``) so reruns skip this.
3. Unlearn the forget authors from copies of the target with GradDiff and NPO, each with and
   without CLReg, over a sweep of learning rates (a forget/retain trade-off curve per arm).
4. Print a table, write ``metrics.json`` (one entry per arm: ``target``, ``oracle``,
   ``graddiff``, ``graddiff+clreg``, ``npo``, ``npo+clreg``; an unlearned arm's entry holds its
   metrics at the default learning rate and, under ``sweep``, those at every learning rate),
   ``run.json`` (configuration, timings) and ``tradeoff.png`` (forget vs retain value accuracy
   over the sweep; kNN mixing).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from clreg_fast.unlearn.data import build_examples, collate
from clreg_fast.unlearn.metrics import evaluate_model
from clreg_fast.unlearn.synthetic import SyntheticConfig, WordTokenizer, make_synthetic
from clreg_fast.unlearn.tiny_model import finetune, make_tiny_llama

CACHE_VERSION = 1
METHODS = ("graddiff", "npo")


@dataclass
class DemoConfig:
    data: SyntheticConfig = field(default_factory=SyntheticConfig)
    hidden_size: int = 128
    num_layers: int = 4
    train_epochs: int = 60
    train_lr: float = 3e-3
    train_batch_size: int = 32
    # Unlearning: every arm runs the same steps at each learning rate of the sweep.
    lrs: Sequence[float] = (2.5e-5, 5e-5, 1e-4, 2e-4)
    default_lr: float = 5e-5
    max_steps: int = 60
    batch_size: int = 8
    # CLReg at the output of a middle decoder layer, mean-pooled over the answer tokens.
    clreg_layer: int = 2
    clreg_pooling: str = "mean"
    clreg_weight: float = 1.0
    clreg_temperature: float = 0.1
    # kNN mixing neighbours: at most n_facts - 1, so an author's own rows can fill them all.
    knn_k: int = 5
    seed: int = 0


def quick_config(seed: int = 0) -> DemoConfig:
    return DemoConfig(
        data=SyntheticConfig(n_authors=16, n_forget_authors=3, n_holdout_authors=3, n_facts=4,
                             seed=seed),
        train_epochs=80, lrs=(5e-5, 2e-4), default_lr=2e-4, max_steps=30, knn_k=3, seed=seed)


# --------------------------------------------------------------------------- target / oracle


def _cache_key(cfg: DemoConfig, role: str) -> str:
    blob = json.dumps({"version": CACHE_VERSION, "role": role, "data": asdict(cfg.data),
                       "hidden": cfg.hidden_size, "layers": cfg.num_layers,
                       "epochs": cfg.train_epochs, "lr": cfg.train_lr,
                       "batch": cfg.train_batch_size, "seed": cfg.seed}, sort_keys=True)
    return f"{role}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def trained_model(role: str, examples: List[Dict], tokenizer: WordTokenizer, cfg: DemoConfig,
                  cache_dir: Optional[str], progress: bool):
    """Train (or load from the cache) the target or the oracle."""
    from transformers import LlamaForCausalLM

    path = os.path.join(cache_dir, _cache_key(cfg, role)) if cache_dir else None
    if path and os.path.exists(os.path.join(path, "config.json")):
        saved = WordTokenizer.load(os.path.join(path, "tokenizer.json"))
        if saved.vocab == tokenizer.vocab:
            model = LlamaForCausalLM.from_pretrained(path, attn_implementation="eager")
            return model.eval(), True
    model = make_tiny_llama(len(tokenizer), seed=cfg.seed, hidden_size=cfg.hidden_size,
                            num_layers=cfg.num_layers)
    finetune(model, examples, epochs=cfg.train_epochs, lr=cfg.train_lr,
             batch_size=cfg.train_batch_size, seed=cfg.seed, pad_id=tokenizer.pad_token_id,
             progress=progress, desc=f"train {role}")
    if path:
        tmp = path + f".tmp{os.getpid()}"
        model.save_pretrained(tmp)
        tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        try:
            os.replace(tmp, path)
        except OSError:  # another process cached it first
            shutil.rmtree(tmp, ignore_errors=True)
    return model, False


# --------------------------------------------------------------------------- unlearning


def make_unlearn_config(cfg: DemoConfig, method: str, clreg: bool, lr: float, progress: bool):
    from clreg_fast.unlearn.train import UnlearnConfig

    kwargs = dict(method=method, clreg_weight=cfg.clreg_weight if clreg else 0.0,
                  clreg_layer=cfg.clreg_layer, clreg_pooling=cfg.clreg_pooling,
                  clreg_temperature=cfg.clreg_temperature, lr=lr, max_steps=cfg.max_steps,
                  batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
    return UnlearnConfig(**kwargs)


# --------------------------------------------------------------------------- report

TABLE_COLUMNS = [
    ("forget_value_acc", "forget acc", "{:.3f}"),
    ("retain_value_acc", "retain acc", "{:.3f}"),
    ("holdout_value_acc", "holdout acc", "{:.3f}"),
    ("forget_quality", "forget Q", "{:.2g}"),
    ("forget_truth_ratio", "truth ratio", "{:.3f}"),
    ("forget_extraction_strength", "extract", "{:.3f}"),
    ("mink_auc", "MinK AUC", "{:.3f}"),
    ("privleak", "privleak%", "{:+.1f}"),
    ("knn_mixing", "kNN mix", "{:.3f}"),
    ("forget_retain_cos", "f/r cos", "{:.3f}"),
    ("retain_drift", "drift", "{:.4f}"),
]


def format_table(rows: Dict[str, Dict]) -> str:
    header = ["arm"] + [title for _, title, _ in TABLE_COLUMNS]
    lines = [header]
    for arm, m in rows.items():
        cells = [arm]
        for key, _, fmt in TABLE_COLUMNS:
            value = m.get(key)
            cells.append("-" if value is None or (isinstance(value, float) and math.isnan(value))
                         else fmt.format(value))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(line, widths))))
        if n == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


ARM_STYLE = {
    "graddiff": ("tab:blue", "--", "o"), "graddiff+clreg": ("tab:blue", "-", "s"),
    "npo": ("tab:orange", "--", "o"), "npo+clreg": ("tab:orange", "-", "s"),
}


def plot(results: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    for arm, entry in results.items():
        if arm not in ARM_STYLE:
            continue
        color, ls, marker = ARM_STYLE[arm]
        sweep = entry["sweep"]
        fx = [p["forget_value_acc"] for p in sweep]
        ry = [p["retain_value_acc"] for p in sweep]
        mix = [p["knn_mixing"] for p in sweep]
        ax1.plot(fx, ry, ls=ls, marker=marker, color=color, label=arm)
        ax2.plot(fx, mix, ls=ls, marker=marker, color=color, label=arm)
        for p, x, y in zip(sweep, fx, ry):
            ax1.annotate(f"{p['lr']:.2g}", (x, y), textcoords="offset points", xytext=(4, 4),
                         fontsize=7, color=color)
    for arm, marker in (("target", "*"), ("oracle", "P")):
        m = results[arm]
        ax1.scatter([m["forget_value_acc"]], [m["retain_value_acc"]], marker=marker, s=160,
                    color="black" if arm == "target" else "tab:green", zorder=5, label=arm)
        ax2.scatter([m["forget_value_acc"]], [m["knn_mixing"]], marker=marker, s=160,
                    color="black" if arm == "target" else "tab:green", zorder=5, label=arm)
    ax1.set_xlabel("forget value-token accuracy (lower = more forgotten)")
    ax1.set_ylabel("retain value-token accuracy (higher = better kept)")
    ax1.set_title("Forget/retain trade-off over the learning-rate sweep")
    ax2.set_xlabel("forget value-token accuracy")
    ax2.set_ylabel("kNN mixing of forget among retain features\n(1 = mixed, 0 = separated)")
    ax2.set_title("Entanglement at the CLReg layer")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def run(cfg: DemoConfig, out_dir: str, cache_dir: Optional[str], progress: bool = True,
        make_plot: bool = True, log=None) -> Dict:
    """Run the experiment; returns the per-arm metrics it writes to ``out_dir/metrics.json``
    (``run.json`` gets the configuration and timings)."""
    if log is None:
        def log(text):
            print(text, flush=True)
    t_start = time.time()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    os.makedirs(out_dir, exist_ok=True)
    rows, tokenizer = make_synthetic(cfg.data)
    splits = {name: build_examples(split_rows, tokenizer) for name, split_rows in rows.items()}
    pad = tokenizer.pad_token_id
    log(f"data: {len(splits['forget'])} forget, {len(splits['retain'])} retain, "
        f"{len(splits['holdout'])} holdout rows; vocabulary {len(tokenizer)} words")

    t0 = time.time()
    target, cached_t = trained_model("target", splits["forget"] + splits["retain"], tokenizer,
                                     cfg, cache_dir, progress)
    oracle, cached_o = trained_model("oracle", splits["retain"], tokenizer, cfg, cache_dir,
                                     progress)
    t_train = time.time() - t0
    log(f"target/oracle: {'cached' if cached_t and cached_o else 'trained'} in {t_train:.1f}s")

    def evaluate(model, oracle_raw=None, reference=None):
        return evaluate_model(model, splits, layer=cfg.clreg_layer, pooling=cfg.clreg_pooling,
                              oracle=oracle_raw, reference_features=reference, knn_k=cfg.knn_k,
                              pad_id=pad)

    oracle_m = evaluate(oracle)
    oracle_raw = oracle_m.pop("_raw")
    target_m = evaluate(target, oracle_raw)
    target_raw = target_m.pop("_raw")
    oracle_m = evaluate(oracle, oracle_raw)  # again, now with the oracle's own forget quality
    oracle_m.pop("_raw")
    reference = {"retain": target_raw["features"]["retain"]}

    from clreg_fast.unlearn.train import unlearn

    results: Dict[str, Dict] = {}
    arms = [(m, c) for m in METHODS for c in (False, True)]
    t0 = time.time()
    for method, clreg in arms:
        arm = method + ("+clreg" if clreg else "")
        sweep = []
        for lr in cfg.lrs:
            model = copy.deepcopy(target)
            ucfg = make_unlearn_config(cfg, method, clreg, lr, progress)
            unlearn(model, splits["forget"], splits["retain"], ucfg, pad_id=pad)
            m = evaluate(model, oracle_raw, reference)
            m.pop("_raw")
            m["lr"] = lr
            sweep.append(m)
            log(f"  {arm:15s} lr={lr:.0e}  forget acc {m['forget_value_acc']:.3f}  retain acc "
                f"{m['retain_value_acc']:.3f}  kNN mixing {m['knn_mixing']:.3f}")
        main = min(sweep, key=lambda p: abs(math.log(p["lr"] / cfg.default_lr)))
        results[arm] = {**main, "sweep": sweep}
    t_unlearn = time.time() - t0
    results["target"] = target_m
    results["oracle"] = oracle_m

    table = format_table({arm: results[arm] for arm in
                          ["target", "oracle"] + [m + s for m in METHODS for s in ("", "+clreg")]})
    log(f"\nAt lr={cfg.default_lr:g}, {cfg.max_steps} steps (CLReg: layer {cfg.clreg_layer}, "
        f"{cfg.clreg_pooling} pooling, weight {cfg.clreg_weight}, tau {cfg.clreg_temperature}):")
    log(table)
    run_info = {
        "config": {**asdict(cfg), "lrs": list(cfg.lrs)},
        "seconds": {"train_or_load": t_train, "unlearn_sweep": t_unlearn,
                    "total": time.time() - t_start},
        "cached_models": bool(cached_t and cached_o),
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(_jsonable(results), f, indent=2)
    with open(os.path.join(out_dir, "run.json"), "w") as f:
        json.dump(_jsonable(run_info), f, indent=2)
    if make_plot:
        plot(results, os.path.join(out_dir, "tradeoff.png"))
    log(f"\nwrote metrics.json, run.json" + (", tradeoff.png" if make_plot else "")
        + f" to {out_dir} in {time.time() - t_start:.1f}s")
    return results


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item"):
        return x.item()
    return x


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clreg_fast.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data and sweep (CI)")
    parser.add_argument("--out-dir", default=os.path.join("runs", "demo"),
                        help="where metrics.json, run.json and tradeoff.png go (default: %(default)s)")
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                           "clreg_fast", "demo"),
                        help="trained target/oracle models (default: %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="always retrain target/oracle")
    parser.add_argument("--no-plot", action="store_true", help="skip tradeoff.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--seed", type=int, default=0, help="data, model and unlearning seed")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the model is tiny, and more threads "
                             "slow it down badly on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    cfg = quick_config(args.seed) if args.quick else DemoConfig(
        data=SyntheticConfig(seed=args.seed), seed=args.seed)
    run(cfg, args.out_dir, None if args.no_cache else args.cache_dir,
        progress=not args.no_progress and sys.stderr.isatty(), make_plot=not args.no_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
