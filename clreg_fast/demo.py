"""The experiment runner: unlearning fictitious-author facts with and without CLReg.

    python -m clreg_fast.demo                         # tiny model, synthetic authors (default)
    python -m clreg_fast.demo --quick                 # its CI size
    python -m clreg_fast.demo --model smollm2-135m    # SmolLM2-135M-Instruct, English authors
    python -m clreg_fast.demo --model smollm2-135m --quick

One runner, two configurations (``preset``):

* ``--model tiny`` (default; nothing is downloaded): synthetic authors with a word-level
  tokenizer, a random-init 4-layer LLaMA, GradDiff and NPO over a sweep of learning rates.
* ``--model smollm2-135m`` (or any local HF folder): the TOFU protocol on a pretrained LLM. The
  model is fetched once (see :mod:`clreg_fast.unlearn.models`); English fictitious authors
  (:mod:`clreg_fast.unlearn.english_authors`) are formatted with its chat template; only the
  upper decoder layers are trained (``train_layers``, stated in ``run.json``); GradDiff, NPO
  and SimNPO, each with and without CLReg; model utility (TOFU's 9 parts) on retain rows, real
  authors and world facts.

Steps: generate the data (and write it as TOFU JSON under ``OUT/data``); fine-tune the model on
forget + retain authors (the *target*) and on retain authors only (the *oracle*), both cached
(``--cache-dir``, keyed by the configuration); unlearn the forget authors from copies of the
target with every method, with and without CLReg; evaluate every arm. Writes
``metrics.json`` (one entry per arm: ``target``, ``oracle``, ``<method>``, ``<method>+clreg``;
an unlearned arm holds its metrics at the default learning rate and, under ``sweep``, those at
every learning rate), ``run.json`` (model, parameter count, configuration, timings, machine),
``tradeoff.png`` and ``entanglement.png`` (2-D PCA of forget vs retain features at the CLReg
layer, one panel per arm). The feature metrics pool each answer as CLReg does (``token``
pooling: the answer's mean, one row per example).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch

from clreg_fast.unlearn.data import build_examples, collate
from clreg_fast.unlearn.english_authors import (REAL_AUTHORS, WORLD_FACTS, EnglishAuthorsConfig,
                                                build_chat_examples, generate_english_authors,
                                                write_tofu_json)
from clreg_fast.unlearn.metrics import (evaluate_model, ks_pvalue, privleak, rouge_l_of_model,
                                       utility_metrics)
from clreg_fast.unlearn.synthetic import SyntheticConfig, WordTokenizer, make_synthetic
from clreg_fast.unlearn.tiny_model import finetune, make_tiny_llama

CACHE_VERSION = 2
TINY = "tiny"
METHODS = ("graddiff", "npo")


@dataclass
class DemoConfig:
    model: str = TINY                     # "tiny", a known name (smollm2-135m) or an HF folder
    data: Union[SyntheticConfig, EnglishAuthorsConfig] = field(default_factory=SyntheticConfig)
    methods: Sequence[str] = METHODS
    # The tiny model's size (ignored for a pretrained model).
    hidden_size: int = 128
    num_layers: int = 4
    # Fine-tuning of the target and the oracle.
    train_epochs: int = 60
    train_lr: float = 3e-3
    train_batch_size: int = 32
    # Upper decoder layers trained (fine-tuning and unlearning) with the final norm; None: every
    # parameter. Embeddings and the output head stay frozen when this is set.
    train_layers: Optional[int] = None
    # Unlearning: every arm runs the same steps at each learning rate of the sweep.
    lrs: Sequence[float] = (2.5e-5, 5e-5, 1e-4, 2e-4)
    default_lr: float = 5e-5
    max_steps: int = 60
    batch_size: int = 8
    # CLReg at the output of a decoder layer, pooled over the answer tokens.
    clreg_layer: int = 2
    clreg_pooling: str = "mean"
    clreg_weight: float = 1.0
    clreg_temperature: float = 0.1
    # kNN mixing neighbours: at most n_facts - 1, so an author's own rows can fill them all.
    knn_k: int = 5
    # Model utility (TOFU): retain rows scored (0: no utility), real-author and world-fact rows.
    utility_rows: int = 0
    world_facts: int = 0
    real_authors: int = 0
    max_new_tokens: int = 24
    eval_batch_size: int = 64
    system_prompt: str = ""               # chat template system turn ("" = empty turn)
    seed: int = 0
    # None: fine-tuning and evaluation on the CPU, unlearning on CUDA when there is one
    # (UnlearnConfig's default); "cuda" / "cpu": everything there.
    device: Optional[str] = None


def quick_config(seed: int = 0) -> DemoConfig:
    return preset(TINY, quick=True, seed=seed)


def preset(model: str = TINY, quick: bool = False, seed: int = 0) -> DemoConfig:
    """The configuration of ``--model MODEL [--quick]``."""
    if model == TINY:
        if not quick:
            return DemoConfig(data=SyntheticConfig(seed=seed), seed=seed)
        return DemoConfig(
            data=SyntheticConfig(n_authors=16, n_forget_authors=3, n_holdout_authors=3,
                                 n_facts=4, seed=seed),
            train_epochs=80, lrs=(5e-5, 2e-4), default_lr=2e-4, max_steps=30, knn_k=3, seed=seed)
    # A pretrained model (SmolLM2-135M: 30 layers): train the upper 12 decoder layers (18-29)
    # and put CLReg in the middle of them. Sized for a 2-core CPU (see README).
    common = dict(model=model, methods=("graddiff", "npo", "simnpo"), train_lr=3e-4,
                  train_batch_size=10, train_layers=12, batch_size=4, clreg_layer=23,
                  clreg_pooling="mean", clreg_weight=1.0, clreg_temperature=0.1,
                  lrs=(1e-4,), default_lr=1e-4, eval_batch_size=32, max_new_tokens=16,
                  seed=seed)
    if not quick:
        return DemoConfig(data=EnglishAuthorsConfig(n_authors=20, n_forget_authors=2,
                                                    n_holdout_authors=4, n_facts=4, seed=seed),
                          train_epochs=10, max_steps=10, knn_k=2, utility_rows=12,
                          world_facts=8, real_authors=8, **common)
    return DemoConfig(data=EnglishAuthorsConfig(n_authors=8, n_forget_authors=2,
                                                n_holdout_authors=2, n_facts=3, seed=seed),
                      train_epochs=5, max_steps=4, knn_k=2, utility_rows=4, world_facts=4,
                      real_authors=4, **common)


# --------------------------------------------------------------------------- data


def prepare_data(cfg: DemoConfig, out_dir: Optional[str], cache_dir: Optional[str], log):
    """``(splits, tokenizer, model_path)``: encoded ``forget``/``retain``/``holdout`` (and
    ``world`` for a pretrained model) examples; the tiny model has no path (None)."""
    if cfg.model == TINY:
        if not isinstance(cfg.data, SyntheticConfig):
            raise TypeError("the tiny model takes a SyntheticConfig as data")
        rows, tokenizer = make_synthetic(cfg.data)
        return ({name: build_examples(r, tokenizer) for name, r in rows.items()},
                tokenizer, None)
    from transformers import AutoTokenizer

    from clreg_fast.unlearn.models import default_cache_dir, resolve_model

    if not isinstance(cfg.data, EnglishAuthorsConfig):
        raise TypeError("a pretrained model takes an EnglishAuthorsConfig as data")
    path = resolve_model(cfg.model, cache_dir=default_cache_dir(), log=log)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = generate_english_authors(cfg.data)
    if cfg.world_facts:
        rows["world"] = WORLD_FACTS[: cfg.world_facts]
    if cfg.real_authors:
        rows["real_authors"] = REAL_AUTHORS[: cfg.real_authors]
    if out_dir:
        write_tofu_json(rows, os.path.join(out_dir, "data"))
    id_map: Dict = {}
    splits = {name: build_chat_examples(r, tokenizer, id_map, cfg.system_prompt)
              for name, r in rows.items()}
    return splits, tokenizer, path


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else tokenizer.eos_token_id


# --------------------------------------------------------------------------- target / oracle


def _cache_key(cfg: DemoConfig, role: str) -> str:
    blob = json.dumps({"version": CACHE_VERSION, "role": role, "model": cfg.model,
                       "data": asdict(cfg.data), "hidden": cfg.hidden_size,
                       "layers": cfg.num_layers, "epochs": cfg.train_epochs, "lr": cfg.train_lr,
                       "batch": cfg.train_batch_size, "train_layers": cfg.train_layers,
                       "system_prompt": cfg.system_prompt, "seed": cfg.seed}, sort_keys=True)
    return f"{role}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def set_trainable(model, train_layers: Optional[int]) -> str:
    """Freeze all but the upper ``train_layers`` decoder layers and the final norm (None: train
    everything); returns a description for run.json."""
    from clreg_fast.unlearn.features import decoder_layers

    if train_layers is None:
        model.requires_grad_(True)
        return "all parameters"
    layers = decoder_layers(model)
    if not 1 <= train_layers <= len(layers):
        raise ValueError(f"train_layers must be in [1, {len(layers)}], got {train_layers}")
    model.requires_grad_(False)
    for block in layers[len(layers) - train_layers:]:
        block.requires_grad_(True)
    norm = getattr(getattr(model, "model", None), "norm", None)
    if norm is not None:
        norm.requires_grad_(True)
    return (f"decoder layers {len(layers) - train_layers}-{len(layers) - 1} and the final norm "
            f"(embeddings, output head and layers 0-{len(layers) - train_layers - 1} frozen)")


def check_clreg_layer(cfg: DemoConfig, depth: int) -> None:
    """CLReg must read a layer that unlearning trains: below the ``train_layers`` upper layers
    every parameter up to it is frozen, its features carry no gradient, and the ``+clreg`` arms
    would silently equal the plain ones."""
    index = cfg.clreg_layer + depth if cfg.clreg_layer < 0 else cfg.clreg_layer
    if not 0 <= index < depth:
        raise ValueError(f"clreg_layer {cfg.clreg_layer} is out of range for a model with {depth} "
                         "decoder layers")
    if cfg.train_layers is not None and index < depth - cfg.train_layers:
        raise ValueError(f"clreg_layer {cfg.clreg_layer} is frozen: train_layers="
                         f"{cfg.train_layers} trains decoder layers {depth - cfg.train_layers}-"
                         f"{depth - 1} only, so CLReg there would change nothing")


def _num_layers(model_path: str) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_path).num_hidden_layers)


def _load_pretrained(path: str):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)


def trained_model(role: str, examples: List[Dict], tokenizer, cfg: DemoConfig,
                  cache_dir: Optional[str], progress: bool, model_path: Optional[str] = None):
    """Train (or load from the cache) the target or the oracle; returns ``(model, cached)``."""
    path = os.path.join(cache_dir, _cache_key(cfg, role)) if cache_dir else None
    if path and os.path.exists(os.path.join(path, "config.json")):
        if cfg.model != TINY:
            return _load_pretrained(path).to(cfg.device or "cpu").eval(), True
        saved = WordTokenizer.load(os.path.join(path, "tokenizer.json"))
        if saved.vocab == tokenizer.vocab:
            from transformers import LlamaForCausalLM
            model = LlamaForCausalLM.from_pretrained(path, attn_implementation="eager")
            return model.to(cfg.device or "cpu").eval(), True
    if cfg.model == TINY:
        model = make_tiny_llama(len(tokenizer), seed=cfg.seed, hidden_size=cfg.hidden_size,
                                num_layers=cfg.num_layers)
    else:
        model = _load_pretrained(model_path)
    if cfg.device:
        model.to(cfg.device)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    set_trainable(model, cfg.train_layers)
    finetune(model, examples, epochs=cfg.train_epochs, lr=cfg.train_lr,
             batch_size=cfg.train_batch_size, seed=cfg.seed, pad_id=_pad_id(tokenizer),
             progress=progress, desc=f"train {role}")
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])
    if path:
        tmp = path + f".tmp{os.getpid()}"
        model.save_pretrained(tmp)
        if cfg.model == TINY:
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
                  batch_size=cfg.batch_size, seed=cfg.seed, progress=progress,
                  device=cfg.device)
    return UnlearnConfig(**kwargs)


def unlearn_copy(target, splits: Dict[str, List[Dict]], cfg: DemoConfig, method: str,
                 clreg: bool, lr: float, pad_id: int, progress: bool):
    """Unlearn the forget split from a copy of ``target`` (``target`` is left as it is);
    returns ``(model, history)``."""
    from clreg_fast.unlearn.train import unlearn

    model = copy.deepcopy(target)
    set_trainable(model, cfg.train_layers)
    ucfg = make_unlearn_config(cfg, method, clreg, lr, progress)
    history = unlearn(model, splits["forget"], splits["retain"], ucfg, pad_id=pad_id)
    return model, history


# --------------------------------------------------------------------------- evaluation


def evaluation_sets(cfg: DemoConfig, splits: Dict[str, List[Dict]]):
    """``(eval_splits, utility_sets)``: what :func:`evaluate_model` scores and the TOFU model
    utility sets (empty when ``cfg.utility_rows`` is 0)."""
    eval_splits = {k: splits[k] for k in ("forget", "retain", "holdout") if splits.get(k)}
    utility_sets = {}
    if cfg.utility_rows:
        utility_sets["retain"] = splits["retain"][: cfg.utility_rows]
        for name in ("real_authors", "world"):  # TOFU's order: retain, real authors, world
            if splits.get(name):
                utility_sets[name] = splits[name]
    return eval_splits, utility_sets


def feature_pooling_of(cfg: DemoConfig) -> str:
    """The feature metrics take one row per answer: "token" pooling is scored on answer means."""
    return "mean" if cfg.clreg_pooling == "token" else cfg.clreg_pooling


def evaluate_arm(model, cfg: DemoConfig, splits: Dict[str, List[Dict]], tokenizer, pad_id: int,
                 oracle_raw: Optional[Dict] = None, reference: Optional[Dict] = None):
    """Every metric of one model: ``(metrics, raw)`` (``raw``: :func:`evaluate_model`'s
    ``_raw`` entry: features, truth ratios, membership scores)."""
    eval_splits, utility_sets = evaluation_sets(cfg, splits)
    m = evaluate_model(model, eval_splits, layer=cfg.clreg_layer, pooling=feature_pooling_of(cfg),
                       oracle=oracle_raw, reference_features=reference, knn_k=cfg.knn_k,
                       batch_size=cfg.eval_batch_size, pad_id=pad_id)
    raw = m.pop("_raw")
    m["extraction_strength"] = m["forget_extraction_strength"]
    if utility_sets:
        m.update(utility_metrics(model, utility_sets, tokenizer, pad_id, cfg.eval_batch_size,
                                 cfg.max_new_tokens))
        m["forget_rouge"] = float(rouge_l_of_model(
            model, splits["forget"], tokenizer, pad_id, cfg.max_new_tokens,
            cfg.eval_batch_size).mean())
    return m, raw


def score_oracle_against_itself(oracle_m: Dict, oracle_raw: Dict) -> Dict:
    """As TOFU reports the retain model: forget quality 1, privleak 0 (in place; returned)."""
    oracle_m["forget_quality"] = ks_pvalue(oracle_raw["forget_truth_ratios"],
                                           oracle_raw["forget_truth_ratios"])
    for auc_key, leak_key in (("mink_auc", "privleak"), ("mink_pp_auc", "privleak_mink_pp")):
        if oracle_raw.get(auc_key) is not None:
            oracle_m[leak_key] = privleak(oracle_raw[auc_key], oracle_raw[auc_key])
    return oracle_m


# --------------------------------------------------------------------------- report

TABLE_COLUMNS = [
    ("forget_value_acc", "forget acc", "{:.3f}"),
    ("retain_value_acc", "retain acc", "{:.3f}"),
    ("holdout_value_acc", "holdout acc", "{:.3f}"),
    ("forget_quality", "forget Q", "{:.2g}"),
    ("model_utility", "utility", "{:.3f}"),
    ("forget_truth_ratio", "truth ratio", "{:.3f}"),
    ("forget_rouge", "forget RL", "{:.3f}"),
    ("forget_extraction_strength", "extract", "{:.3f}"),
    ("mink_auc", "MinK AUC", "{:.3f}"),
    ("privleak", "privleak%", "{:+.1f}"),
    ("mink_pp_auc", "MinK++ AUC", "{:.3f}"),
    ("privleak_mink_pp", "privleak++%", "{:+.1f}"),
    ("entanglement_score", "ES", "{:.2f}"),
    ("knn_mixing", "kNN mix", "{:.3f}"),
    ("silhouette", "silh.", "{:+.3f}"),
    ("linear_probe_acc", "probe acc", "{:.3f}"),
    ("retain_drift", "drift", "{:.4f}"),
]


def format_table(rows: Dict[str, Dict]) -> str:
    present = [c for c in TABLE_COLUMNS if any(c[0] in m for m in rows.values())]
    present = present or TABLE_COLUMNS
    header = ["arm"] + [title for _, title, _ in present]
    lines = [header]
    for arm, m in rows.items():
        cells = [arm]
        for key, _, fmt in present:
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


METHOD_COLORS = {"graddiff": "tab:blue", "npo": "tab:orange", "simnpo": "tab:purple",
                 "gradascent": "tab:red", "rmu": "tab:brown"}


def _style(arm: str):
    method, _, extra = arm.partition("+")
    return METHOD_COLORS.get(method, "tab:gray"), ("-" if extra else "--"), ("s" if extra else "o")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(results: Dict, path: str) -> None:
    """``tradeoff.png``. With model utility: forget quality (log) against model utility, one
    point per arm, an arrow from each method to the method + CLReg. Without: forget vs retain
    value accuracy and kNN mixing along the learning-rate sweep."""
    plt = _pyplot()
    unlearned = [a for a, e in results.items() if "sweep" in e]
    if all("model_utility" in results[a] for a in results):
        fig, ax = plt.subplots(figsize=(7, 5.5))
        for arm in unlearned:
            color, _, marker = _style(arm)
            m = results[arm]
            ax.scatter([m["model_utility"]], [max(m["forget_quality"], 1e-12)], color=color,
                       marker=marker, s=70, label=arm, zorder=4)
            if "+" not in arm and arm + "+clreg" in results:
                n = results[arm + "+clreg"]
                ax.annotate("", xy=(n["model_utility"], max(n["forget_quality"], 1e-12)),
                            xytext=(m["model_utility"], max(m["forget_quality"], 1e-12)),
                            arrowprops=dict(arrowstyle="->", color=color, alpha=0.6))
        for arm, marker, color in (("target", "*", "black"), ("oracle", "P", "tab:green")):
            m = results[arm]
            ax.scatter([m["model_utility"]], [max(m["forget_quality"], 1e-12)], marker=marker,
                       s=180, color=color, label=arm, zorder=5)
        ax.set_yscale("log")
        ax.set_xlabel("model utility (harmonic mean over retain, real authors and world facts; "
                      "higher = better)")
        ax.set_ylabel("forget quality (KS p-value vs the oracle; higher = better)")
        ax.set_title("Forget quality / model utility trade-off (arrow: + CLReg)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    for arm in unlearned:
        color, ls, marker = _style(arm)
        sweep = results[arm]["sweep"]
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


def plot_entanglement(features: Dict[str, Dict], results: Dict, methods: Sequence[str],
                      layer: int, path: str) -> None:
    """``entanglement.png``: per arm, a 2-D PCA (fitted on that arm's L2-normalized forget +
    retain features at the CLReg layer) with retain rows in grey and forget rows coloured by
    author. Columns: target/oracle, then each method; rows: without / with CLReg."""
    from sklearn.decomposition import PCA

    plt = _pyplot()
    columns = [("target", "oracle")] + [(m, m + "+clreg") for m in methods]
    fig, axes = plt.subplots(2, len(columns), figsize=(3.6 * len(columns), 7.2), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for col, pair in enumerate(columns):
        for row, arm in enumerate(pair):
            ax = axes[row][col]
            if arm not in features:
                ax.axis("off")
                continue
            f, r, ids = (features[arm]["forget"], features[arm]["retain"],
                         features[arm]["forget_ids"])
            z = torch.nn.functional.normalize(torch.cat([f, r]).double(), dim=1).numpy()
            xy = PCA(n_components=2, random_state=0).fit_transform(z)
            nf = f.shape[0]
            ax.scatter(xy[nf:, 0], xy[nf:, 1], s=10, color="0.65", label="retain")
            authors = sorted(set(ids))
            # One legend entry for the forget rows: a per-author legend would cover a panel
            # at 20 authors, and tab10's colours repeat beyond 10.
            forget_label = ("forget (colour = author)" if len(authors) <= 10 else
                            f"forget ({len(authors)} authors, colours repeat)")
            for k, author in enumerate(authors):
                sel = [i for i, a in enumerate(ids) if a == author]
                ax.scatter(xy[sel, 0], xy[sel, 1], s=28, color=cmap(k % 10), marker="^",
                           label=forget_label if k == 0 else None)
            m = results.get(arm, {})
            es, mix = m.get("entanglement_score"), m.get("knn_mixing")
            ax.set_title(f"{arm}\nES {es:.2f}, kNN mix {mix:.2f}" if es is not None else arm,
                         fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    handles, labels = next(((h, lab) for ax in axes.flat
                            for h, lab in [ax.get_legend_handles_labels()] if h), ([], []))
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"Forget vs retain features at decoder layer {layer} (PCA per panel). First "
                 "column: target, oracle; then each method without (top) and with CLReg (bottom)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def _cpu_name() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _machine() -> Dict:
    import transformers

    return {"platform": platform.platform(), "processor": _cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def run(cfg: DemoConfig, out_dir: str, cache_dir: Optional[str], progress: bool = True,
        make_plot: bool = True, log=None) -> Dict:
    """Run the experiment; returns the per-arm metrics it writes to ``out_dir/metrics.json``
    (``run.json`` gets the model, configuration, timings and machine)."""
    from tqdm.auto import tqdm

    if log is None:
        def log(text):
            print(text, flush=True)
    t_start = time.time()
    seconds: Dict[str, float] = {}
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    os.makedirs(out_dir, exist_ok=True)
    splits, tokenizer, model_path = prepare_data(cfg, out_dir, cache_dir, log)
    check_clreg_layer(cfg, cfg.num_layers if cfg.model == TINY else _num_layers(model_path))
    pad = _pad_id(tokenizer)
    log(f"model {cfg.model}; data: {len(splits['forget'])} forget, {len(splits['retain'])} "
        f"retain, {len(splits['holdout'])} holdout rows"
        + (f", {len(splits['real_authors'])} real-author rows" if splits.get("real_authors")
           else "")
        + (f", {len(splits['world'])} world facts" if splits.get("world") else "")
        + f"; vocabulary {len(tokenizer)}")
    seconds["data"] = time.time() - t_start

    t0 = time.time()
    target, cached_t = trained_model("target", splits["forget"] + splits["retain"], tokenizer,
                                     cfg, cache_dir, progress, model_path)
    seconds["target"] = time.time() - t0
    t0 = time.time()
    oracle, cached_o = trained_model("oracle", splits["retain"], tokenizer, cfg, cache_dir,
                                     progress, model_path)
    seconds["oracle"] = time.time() - t0
    log(f"target/oracle: {'cached' if cached_t and cached_o else 'trained'} in "
        f"{seconds['target'] + seconds['oracle']:.1f}s")
    n_params = sum(p.numel() for p in target.parameters())
    trained = set_trainable(copy.deepcopy(target), cfg.train_layers)  # the description only
    features: Dict[str, Dict] = {}

    feature_pooling = feature_pooling_of(cfg)

    def evaluate(arm, model, oracle_raw=None, reference=None):
        m, raw = evaluate_arm(model, cfg, splits, tokenizer, pad, oracle_raw, reference)
        features[arm] = {"forget": raw["features"]["forget"], "retain": raw["features"]["retain"],
                         "forget_ids": [ex["concept_id"] for ex in splits["forget"]]}
        return m, raw

    t0 = time.time()
    oracle_m, oracle_raw = evaluate("oracle", oracle)
    score_oracle_against_itself(oracle_m, oracle_raw)
    target_m, target_raw = evaluate("target", target, oracle_raw)
    seconds["evaluate_target_oracle"] = time.time() - t0
    del oracle
    reference = {"retain": target_raw["features"]["retain"]}

    results: Dict[str, Dict] = {}
    arms = [(m, c) for m in cfg.methods for c in (False, True)]
    per_arm: Dict[str, Dict[str, float]] = {}
    bar = tqdm(arms, desc="arms", disable=not progress)
    for method, clreg in bar:
        arm = method + ("+clreg" if clreg else "")
        bar.set_postfix_str(arm)
        sweep = []
        t_unlearn = t_eval = 0.0
        for lr in cfg.lrs:
            t0 = time.time()
            model, history = unlearn_copy(target, splits, cfg, method, clreg, lr, pad, progress)
            t_unlearn += time.time() - t0
            t0 = time.time()
            m, _ = evaluate(f"{arm}@{lr:g}", model, oracle_raw, reference)
            t_eval += time.time() - t0
            m["lr"] = lr
            m["final_loss"] = history[-1]["loss"] if history else None
            sweep.append(m)
            log(f"  {arm:15s} lr={lr:.0e}  forget acc {m['forget_value_acc']:.3f}  retain acc "
                f"{m['retain_value_acc']:.3f}  forget Q {m['forget_quality']:.2g}"
                + (f"  utility {m['model_utility']:.3f}" if "model_utility" in m else "")
                + f"  ES {m['entanglement_score']:.2f}  kNN mixing {m['knn_mixing']:.3f}")
            del model
        main_point = min(sweep, key=lambda p: abs(math.log(p["lr"] / cfg.default_lr)))
        features[arm] = features[f"{arm}@{main_point['lr']:g}"]
        results[arm] = {**main_point, "sweep": sweep}
        per_arm[arm] = {"unlearn": t_unlearn, "evaluate": t_eval}
    seconds["arms"] = per_arm
    results["target"] = target_m
    results["oracle"] = oracle_m

    order = ["target", "oracle"] + [m + s for m in cfg.methods for s in ("", "+clreg")]
    table = format_table({arm: results[arm] for arm in order})
    log(f"\nAt lr={cfg.default_lr:g}, {cfg.max_steps} steps (CLReg: layer {cfg.clreg_layer}, "
        f"{cfg.clreg_pooling} pooling, weight {cfg.clreg_weight}, tau {cfg.clreg_temperature}):")
    log(table)
    seconds["total"] = time.time() - t_start
    run_info = {
        "model": cfg.model,
        "model_path": model_path,
        "n_params": n_params,
        "trained_parameters": trained,
        "feature_pooling": feature_pooling,  # of the entanglement metrics and the PCA panels
        "config": {**asdict(cfg), "lrs": list(cfg.lrs), "methods": list(cfg.methods)},
        "seconds": seconds,
        "cached_models": bool(cached_t and cached_o),
        "machine": _machine(),
        "command": " ".join(sys.argv),
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(_jsonable({arm: results[arm] for arm in order}), f, indent=2)
    with open(os.path.join(out_dir, "run.json"), "w") as f:
        json.dump(_jsonable(run_info), f, indent=2)
    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write(table + "\n")
    if make_plot:
        plot(results, os.path.join(out_dir, "tradeoff.png"))
        plot_entanglement(features, results, cfg.methods, cfg.clreg_layer,
                          os.path.join(out_dir, "entanglement.png"))
    log(f"\nwrote metrics.json, run.json, table.txt"
        + (", tradeoff.png, entanglement.png" if make_plot else "")
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
    parser = argparse.ArgumentParser(prog="python -m clreg_fast.demo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=TINY,
                        help="'tiny' (random-init, synthetic words), 'smollm2-135m' (fetched "
                             "once) or a local Hugging Face folder (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="small data and few steps (CI)")
    parser.add_argument("--out-dir", default=None,
                        help="where metrics.json, run.json and the plots go (default: runs/demo "
                             "for tiny, runs/demo-MODEL otherwise)")
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                           "clreg_fast", "demo"),
                        help="trained target/oracle models (default: %(default)s; fetched "
                             "models go to $CLREG_FAST_CACHE or ~/.cache/clreg_fast)")
    parser.add_argument("--no-cache", action="store_true", help="always retrain target/oracle")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--seed", type=int, default=0, help="data, model and unlearning seed")
    parser.add_argument("--device", default=None,
                        help="'cuda' or 'cpu' for everything (default: fine-tuning and "
                             "evaluation on the CPU, unlearning on CUDA when there is one)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default: %(default)s; on the busy shared 2-core "
                             "machine one thread was faster than two for both models)")
    for name, kind in (("clreg_layer", int), ("clreg_weight", float),
                       ("clreg_temperature", float), ("clreg_pooling", str), ("max_steps", int)):
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help=f"override the preset's {name}")
    parser.add_argument("--methods", default=None,
                        help="comma-separated unlearning methods (default: the preset's)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.clreg_pooling not in (None, "mean", "last", "token"):
        parser.error("--clreg-pooling must be mean, last or token")
    model = TINY if args.model.lower() == TINY else args.model
    torch.set_num_threads(args.threads)
    cfg = preset(model, quick=args.quick, seed=args.seed)
    overrides = {k: getattr(args, k) for k in ("clreg_layer", "clreg_weight", "clreg_temperature",
                                               "clreg_pooling", "max_steps")
                 if getattr(args, k) is not None}
    if args.methods:
        from clreg_fast.unlearn.methods import METHODS as KNOWN_METHODS

        overrides["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        bad = [m for m in overrides["methods"] if m not in KNOWN_METHODS]
        if bad or not overrides["methods"]:
            parser.error(f"--methods: unknown {bad}; choose from {', '.join(KNOWN_METHODS)}")
    if args.device:
        overrides["device"] = args.device
    cfg = dataclasses.replace(cfg, **overrides)
    out_dir = args.out_dir or os.path.join(
        "runs", "demo" if model == TINY else "demo-" + os.path.basename(model.rstrip("/")))
    run(cfg, out_dir, None if args.no_cache else args.cache_dir,
        progress=not args.no_progress and sys.stderr.isatty(), make_plot=not args.no_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
