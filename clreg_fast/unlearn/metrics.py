"""Unlearning metrics: memorization, forget quality, membership inference, entanglement.

Two layers:

* pure functions on numbers (``knn_mixing``, ``ks_pvalue``, ``auc``, ``min_k_score``,
  ``extraction_strength``, ...), tested on hand-checked cases;
* model-level helpers that run a causal LM teacher-forced over examples
  (:func:`token_stats`, :func:`pooled_features`) and :func:`evaluate_model`, which returns one
  flat dict of metrics for a model.

Definitions (the answer is ``y``, its tokens include the final EOS; ``p`` = model probability
of the right token with the true prefix, i.e. teacher forcing). Every metric that carries an
OpenUnlearning name gives OpenUnlearning's number (locuslab/open-unlearning,
``src/evals/metrics/``); the full table with directions is ``docs/metrics.md``.

* ``value_acc``: share of fact-value tokens whose argmax prediction is right (value tokens are
  the ones ``value_mask`` marks; template tokens inflate whole-answer scores on a small model).
* ``value_prob``: mean over examples of ``P(value | prompt, answer prefix)``, the product of
  ``p`` over the value tokens.
* ``answer_prob``: mean over examples of ``P(y | x) ** (1 / |y|)`` (upstream ``probability``:
  EOS included).
* ``exact_mem``, ``extraction_strength``, ``mink_score``, ``mink_pp_score`` and the AUCs drop
  the answer's final EOS, as upstream ("-1 to ignore eos prediction").
* ``exact_mem``: mean over examples of the share of answer tokens predicted right.
* ``extraction_strength``: upstream's: mean of ``1 - k / n``, ``k`` the first index whose
  suffix is predicted right, ``n - 1`` when none is (so ``1/n`` when the last token is wrong);
  ``extraction_strength_strict``: ours, 0 in that case.
* ``forget_truth_ratio``: upstream's ``forget_Truth_Ratio``, the mean of ``min(R, 1/R)`` of the
  per-example ``R = P(perturbed) / P(paraphrased)`` (per-token-normalized probabilities, the
  perturbed ones by geometric mean); 1 = the model cannot tell true from false.
  ``forget_truth_ratio_mean``: the plain mean of ``R`` (reported until 2026-12-06).
* ``forget_quality``: two-sample KS-test p-value between the forget-set truth ratios of the
  model and of the oracle (a model never trained on the forget set); high = indistinguishable.
* ``mink_auc``: AUC of the Min-K% score (mean of the lowest ``max(1, int(0.4 n))`` token
  log-probabilities) separating forget (members) from never-trained holdout rows;
  ``mink_pp_auc``: the same with Min-K%++ (:func:`min_k_plus_plus_score`). ``privleak`` and
  ``privleak_mink_pp``: MUSE's ``(a - r) / r * 100`` on ``a = 1 - AUC``, ``r = 1 - oracle
  AUC``: 0 is ideal, **negative = membership leaks** (under-unlearning), positive =
  over-unlearning.
* ``knn_mixing``: entanglement of forget and retain features at one layer (see
  :func:`knn_mixing`); ``forget_retain_cos``: mean cosine between forget and retain features;
  ``retain_drift``: mean ``1 - cos`` between retain features now and before unlearning.
* ``entanglement_score`` (Zhao et al. 2024, lower = more separated), ``silhouette`` (cosine,
  forget/retain labels) and ``linear_probe_acc`` (cross-validated balanced accuracy of a
  logistic probe), all on L2-normalized features at that layer.
* Model utility (:func:`utility_metrics`, TOFU's 9 parts): the harmonic mean of probability,
  ROUGE-L recall of the greedy answer (``rouge-score``) and truth-ratio score ``max(0, 1 - R)``
  on the retain set, on real authors and on world facts (the last two: probability normalized
  against the perturbed answers, ``R`` against the original answer).
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

# The representation metrics live in the public package clreg_fast.metrics; imported here for
# evaluate_model and re-exported under their old names.
from clreg_fast.metrics.representation import (entanglement_score, feature_drift,  # noqa: F401
                                               forget_retain_silhouette, knn_mixing,
                                               linear_probe_accuracy, mean_cosine)
from clreg_fast.unlearn.data import IGNORE_INDEX, collate
from clreg_fast.unlearn.features import capture_layer

# --------------------------------------------------------------------------- pure functions


def ks_pvalue(sample, reference) -> float:
    """Two-sample Kolmogorov-Smirnov test p-value (scipy's ``ks_2samp``, two-sided)."""
    from scipy.stats import ks_2samp

    sample, reference = np.asarray(sample, float), np.asarray(reference, float)
    if sample.size == 0 or reference.size == 0:
        raise ValueError("ks_pvalue needs non-empty samples")
    return float(ks_2samp(sample, reference).pvalue)


def auc(positive_scores, negative_scores) -> float:
    """ROC AUC of scores where positives should score higher (ties count one half)."""
    pos = np.asarray(positive_scores, float)
    neg = np.asarray(negative_scores, float)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("auc needs at least one positive and one negative score")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


# OpenUnlearning adds this to the denominators of privleak, the truth ratio and the normalized
# probability; kept so that near-zero denominators give its numbers, not ours.
_UPSTREAM_EPS = 1e-10


def _check_auc(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be an AUC in [0, 1], got {value}")
    return value


def privleak(model_auc: float, oracle_auc: float) -> float:
    """MUSE's PrivLeak (OpenUnlearning ``privleak``), in percent, from membership-inference AUCs.

    MUSE reports AUCs as ``1 - AUC``; with ``a`` = ``1 - model_auc`` and ``r`` = ``1 -
    oracle_auc`` it is ``(a - r) / (r + 1e-10) * 100``. 0 is ideal (as distinguishable as the
    oracle); **negative = under-unlearning** (the model still tells forget rows from holdout
    rows better than the oracle: membership leaks); positive = over-unlearning (forget rows
    look *less* like members than never-seen rows). An oracle AUC of 1 makes the denominator
    1e-10 (huge values), as upstream.
    """
    a = 1.0 - _check_auc(model_auc, "model_auc")
    r = 1.0 - _check_auc(oracle_auc, "oracle_auc")
    return (a - r) / (r + _UPSTREAM_EPS) * 100.0


def _min_k_count(n: int, k: float) -> int:
    # The Min-K% authors' count (and OpenUnlearning's): int() truncates, at least one token.
    return max(1, int(n * k))


def min_k_score(token_logprobs, k: float = 0.4) -> float:
    """Min-K% membership score (OpenUnlearning ``MinKProbAttack`` with the sign flipped: higher =
    more member-like): mean of the lowest ``max(1, int(k * n))`` token log-probabilities."""
    lp = np.sort(np.asarray(token_logprobs, float))
    if lp.size == 0:
        raise ValueError("min_k_score needs at least one token")
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    return float(lp[: _min_k_count(lp.size, k)].mean())


def min_k_plus_plus_score(token_logprobs, vocab_mean, vocab_var, k: float = 0.4) -> float:
    """Min-K%++ membership score (OpenUnlearning ``MinKPlusPlusAttack``, sign flipped: higher =
    more member-like).

    Per token ``z = (log p(y_t) - mu_t) / sqrt(max(var_t, 1e-6))`` with ``mu_t = sum_v p_v log
    p_v`` and ``var_t = sum_v p_v (log p_v)^2 - mu_t^2`` the mean and variance of the
    log-probability of a token drawn from the model's own next-token distribution at that
    position; the score is the mean of the lowest ``max(1, int(k * n))`` values of ``z``.
    """
    lp = np.asarray(token_logprobs, float)
    mu, var = np.asarray(vocab_mean, float), np.asarray(vocab_var, float)
    if lp.ndim != 1 or lp.size == 0:
        raise ValueError("min_k_plus_plus_score needs a 1-D array of at least one token")
    if mu.shape != lp.shape or var.shape != lp.shape:
        raise ValueError(f"vocab_mean {mu.shape} and vocab_var {var.shape} must match the "
                         f"token log-probabilities {lp.shape}")
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    z = np.sort((lp - mu) / np.sqrt(np.maximum(var, 1e-6)))
    return float(z[: _min_k_count(z.size, k)].mean())


def _check_correct(correct, name: str) -> np.ndarray:
    c = np.asarray(correct, bool)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"{name} needs a 1-D match vector of at least one token")
    return c


def extraction_strength(correct) -> float:
    """Extraction strength as OpenUnlearning computes it: ``1 - k / n`` with ``k`` the smallest
    index in ``0 .. n-1`` whose suffix ``correct[k:]`` is all right (teacher-forced argmax).

    When even the last token is wrong no suffix matches and upstream's loop ends at ``k = n - 1``:
    the score is ``1 / n``, not 0 (see :func:`strict_extraction_strength`)."""
    c = _check_correct(correct, "extraction_strength")
    wrong = np.flatnonzero(~c)
    k = 0 if wrong.size == 0 else min(int(wrong[-1]) + 1, c.size - 1)
    return 1.0 - k / c.size


def strict_extraction_strength(correct) -> float:
    """Our variant of :func:`extraction_strength`: ``1 - k / n`` with ``k`` one past the last
    wrong position, so 0 when the last token is wrong (nothing is extractable: greedy decoding
    misses it even from the full true prefix). Differs from upstream only in that case."""
    c = _check_correct(correct, "strict_extraction_strength")
    wrong = np.flatnonzero(~c)
    k = 0 if wrong.size == 0 else int(wrong[-1]) + 1
    return 1.0 - k / c.size


def exact_memorization(correct) -> float:
    """Share of answer tokens whose teacher-forced argmax prediction is right."""
    c = _check_correct(correct, "exact_memorization")
    return float(c.mean())


def truth_ratio(correct_logprob: float, perturbed_logprobs: Sequence[float]) -> float:
    """TOFU's truth ratio ``R = P(perturbed) / (P(correct) + 1e-10)`` (OpenUnlearning
    ``truth_ratio``'s per-row score), each ``P`` the per-token-normalized probability
    ``exp(mean token log-prob)``, the perturbed ones combined by a geometric mean (the mean of
    their per-token mean log-probabilities). ``correct`` is the paraphrased answer on the forget
    and retain sets and the original answer on the real-world sets (world facts, real authors),
    as upstream's configurations choose."""
    if len(perturbed_logprobs) == 0:
        raise ValueError("truth_ratio needs at least one perturbed answer")
    wrong = math.exp(float(np.mean(perturbed_logprobs)))
    return float(wrong / (math.exp(float(correct_logprob)) + _UPSTREAM_EPS))


def forget_truth_ratio_score(ratios) -> float:
    """OpenUnlearning's ``forget_Truth_Ratio`` (aggregator ``closer_to_1_better``): mean of
    ``min(R, 1 / (R + 1e-10))``. 1 = the model finds true and perturbed answers equally likely
    (higher = more forgotten); near 0 = it strongly prefers one of them."""
    r = np.asarray(ratios, float)
    if r.size == 0:
        raise ValueError("forget_truth_ratio_score needs at least one ratio")
    if np.isnan(r).any() or (r < 0).any():
        raise ValueError("truth ratios must be non-negative numbers")
    return float(np.minimum(r, 1.0 / (r + _UPSTREAM_EPS)).mean())


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall of ``prediction`` against ``reference`` (the ``rouge-score`` package,
    stemmed, as TOFU reports it)."""
    if not isinstance(prediction, str) or not isinstance(reference, str):
        raise TypeError("prediction and reference must be strings")
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].recall)


_SCORER = None


def _rouge_scorer():
    global _SCORER
    if _SCORER is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise ImportError("ROUGE-L needs the rouge-score package: pip install rouge-score") from None
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative numbers (0 when any is 0), TOFU's model-utility aggregate."""
    v = np.asarray(list(values), float)
    if v.size == 0:
        raise ValueError("harmonic_mean needs at least one value")
    if np.isnan(v).any() or (v < 0).any():
        raise ValueError(f"harmonic_mean takes non-negative numbers, got {v.tolist()}")
    if (v == 0).any():
        return 0.0
    return float(v.size / (1.0 / v).sum())


def truth_ratio_utility(ratios) -> float:
    """TOFU's truth-ratio score for retain-like sets (OpenUnlearning aggregator ``true_better``):
    mean of ``max(0, 1 - R)``, ``R`` the truth ratio (high = the model prefers the true answer)."""
    r = np.asarray(ratios, float)
    if r.size == 0:
        raise ValueError("truth_ratio_utility needs at least one ratio")
    return float(np.maximum(0.0, 1.0 - r).mean())


def normalized_answer_prob(answer_logprob: float, perturbed_logprobs: Sequence[float]) -> float:
    """``p / (p + sum_j p_j + 1e-10)`` of per-token-normalized probabilities ``exp(mean token
    log-prob)`` (OpenUnlearning ``probability_w_options``): TOFU's probability on the
    real-world sets, the true answer against its perturbed versions."""
    if len(perturbed_logprobs) == 0:
        raise ValueError("normalized_answer_prob needs at least one perturbed answer")
    p = math.exp(float(answer_logprob))
    wrong = float(np.exp(np.asarray(perturbed_logprobs, float)).sum())
    return float(p / (p + wrong + _UPSTREAM_EPS))


# --------------------------------------------------------------------------- model level


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def token_stats(model, examples: Sequence[Dict], batch_size: int = 64, pad_id: int = 0,
                layer: Optional[int] = None, pooling: str = "mean",
                vocab_stats: bool = False) -> List[Dict]:
    """Teacher-forced per-example statistics over the answer tokens (the final EOS included).

    Each result has ``logprobs`` and ``correct`` (numpy, one entry per answer token) and
    ``value`` (bool mask of the value tokens among them). With ``layer`` (a decoder layer
    index, negative from the last) it also has ``feature``: the output of that decoder layer,
    the state CLReg trains on (for the last layer: before the final norm), pooled over the
    answer tokens (``mean``) or taken at the last answer token (``last``). With
    ``vocab_stats`` it also has ``vocab_mean`` and ``vocab_var`` (float64, per answer token):
    the mean and variance of ``log p_v`` under the model's next-token distribution ``p`` at
    that position (what Min-K%++ normalizes by).
    """
    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
    device = _device_of(model)
    # A hook on the decoder layer, as in training: ``output_hidden_states`` would give the
    # embeddings for layer -1 and the post-norm state for the last layer.
    capture = capture_layer(model, layer) if layer is not None else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    results: List[Dict] = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        batch = collate(chunk, pad_id)
        with capture as cap:
            out = model(input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device))
            hidden = cap[layer].float() if layer is not None else None
        logits = out.logits[:, :-1].float()
        targets = batch["labels"][:, 1:].to(device)
        mask = targets != IGNORE_INDEX
        logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        correct = logits.argmax(-1) == targets
        value = batch.get("value_mask")
        value = value[:, 1:].to(device) if value is not None else mask
        if layer is not None:
            # Answer-token positions in the input (labels are not shifted here).
            amask = (batch["labels"] != IGNORE_INDEX).to(device)
            if pooling == "mean":
                feats = (hidden * amask[..., None]).sum(1) / amask.sum(1, keepdim=True).clamp_min(1)
            else:
                last = (amask.long() * torch.arange(amask.shape[1], device=device)).argmax(1)
                feats = hidden[torch.arange(hidden.shape[0], device=device), last]
        for row in range(len(chunk)):
            m = mask[row]
            item = {"logprobs": logp[row][m].cpu().numpy(), "correct": correct[row][m].cpu().numpy(),
                    "value": value[row][m].cpu().numpy().astype(bool)}
            if layer is not None:
                item["feature"] = feats[row].cpu()
            if vocab_stats:
                item["vocab_mean"], item["vocab_var"] = _vocab_logprob_moments(logits[row][m])
            results.append(item)
    if was_training:
        model.train()
    return results


def _vocab_logprob_moments(logits: torch.Tensor):
    """Per row of ``logits`` (tokens, vocab): ``E_p[log p]`` and ``Var_p[log p]`` in float64,
    the variance as ``E_p[(log p)^2] - E_p[log p]^2`` as upstream computes it."""
    lp = torch.log_softmax(logits.double(), -1)
    p = lp.exp()
    # 0 * log 0 is 0; underflowed entries would otherwise give nan.
    plp = torch.where(p > 0, p * lp, torch.zeros_like(lp))
    mean = plp.sum(-1)
    second = torch.where(p > 0, plp * lp, torch.zeros_like(lp)).sum(-1)
    return mean.cpu().numpy(), (second - mean ** 2).cpu().numpy()


def pooled_features(model, examples: Sequence[Dict], layer: int, pooling: str = "mean",
                    batch_size: int = 64, pad_id: int = 0) -> torch.Tensor:
    """(N, hidden) features of decoder layer ``layer`` pooled over each answer."""
    stats = token_stats(model, examples, batch_size, pad_id, layer=layer, pooling=pooling)
    return torch.stack([s["feature"] for s in stats])


def _drop_final_token(arr):
    # OpenUnlearning's EM, ES, Min-K% and Min-K%++ drop each answer's last labelled token
    # ("-1 to ignore eos prediction"); in every encoding of this package it is the EOS.
    return arr[:-1]


def memorization_metrics(stats: Sequence[Dict], min_k: float = 0.4) -> Dict[str, float]:
    """Aggregate :func:`token_stats` results of one split.

    ``value_acc``, ``value_prob`` and ``answer_prob`` use every answer token (the EOS too, as
    OpenUnlearning's ``probability``); ``exact_mem``, ``extraction_strength`` (upstream's, with
    its ``1/n`` fall-through), ``extraction_strength_strict`` (ours), ``mink_score`` and, when the
    stats have ``vocab_mean``, ``mink_pp_score`` drop the final EOS as upstream. An answer that
    is only an EOS scores as upstream scores an empty one: no exact-memorization value, 0 for
    the others.
    """
    if not stats:
        raise ValueError("no examples to score")
    value_correct = np.concatenate([s["correct"][s["value"]] for s in stats])
    kept = [_drop_final_token(s["correct"]) for s in stats]
    em = [exact_memorization(c) for c in kept if c.size]
    out = {
        "value_acc": float(value_correct.mean()) if value_correct.size else float("nan"),
        "value_prob": float(np.mean([math.exp(s["logprobs"][s["value"]].sum()) for s in stats])),
        "answer_prob": float(np.mean([math.exp(s["logprobs"].mean()) for s in stats])),
        "exact_mem": float(np.mean(em)) if em else float("nan"),
        "extraction_strength": float(np.mean([extraction_strength(c) if c.size else 0.0
                                              for c in kept])),
        "extraction_strength_strict": float(np.mean([
            strict_extraction_strength(c) if c.size else 0.0 for c in kept])),
        "mink_score": float(np.mean(_min_k_scores(stats, min_k))),
    }
    if all("vocab_mean" in s for s in stats):
        out["mink_pp_score"] = float(np.mean(_min_k_pp_scores(stats, min_k)))
    return out


def _min_k_scores(stats: Sequence[Dict], min_k: float) -> List[float]:
    return [min_k_score(lp, min_k) if lp.size else 0.0
            for lp in (_drop_final_token(s["logprobs"]) for s in stats)]


def _min_k_pp_scores(stats: Sequence[Dict], min_k: float) -> List[float]:
    out = []
    for s in stats:
        lp = _drop_final_token(s["logprobs"])
        out.append(min_k_plus_plus_score(lp, _drop_final_token(s["vocab_mean"]),
                                         _drop_final_token(s["vocab_var"]), min_k)
                   if lp.size else 0.0)
    return out


def truth_ratios(model, examples: Sequence[Dict], batch_size: int = 64,
                 pad_id: int = 0) -> np.ndarray:
    """Per-example truth ratio ``P(perturbed) / P(paraphrased)`` (:func:`truth_ratio`) for
    examples with paraphrased and perturbed ``alternatives`` (others are skipped)."""
    paraphrased, perturbed, owners = [], [], []
    for i, ex in enumerate(examples):
        alt = ex.get("alternatives") or {}
        if alt.get("paraphrased") is None or not alt.get("perturbed"):
            continue
        paraphrased.append(alt["paraphrased"])
        perturbed.extend(alt["perturbed"])
        owners.append(len(alt["perturbed"]))
    if not paraphrased:
        raise ValueError("no example has both a paraphrased and perturbed answers")
    para = [s["logprobs"].mean() for s in token_stats(model, paraphrased, batch_size, pad_id)]
    pert = [s["logprobs"].mean() for s in token_stats(model, perturbed, batch_size, pad_id)]
    out, pos = [], 0
    for p, n in zip(para, owners):
        out.append(truth_ratio(p, pert[pos:pos + n]))
        pos += n
    return np.asarray(out)


def evaluate_model(model, splits: Dict[str, Sequence[Dict]], layer: Optional[int] = None,
                   pooling: str = "mean", oracle: Optional[Dict] = None,
                   reference_features: Optional[Dict[str, torch.Tensor]] = None,
                   knn_k: int = 5, min_k: float = 0.4, batch_size: int = 64,
                   pad_id: int = 0) -> Dict:
    """All metrics of one model as a flat dict, plus ``"_raw"`` data for later comparisons.

    ``splits``: ``forget`` and ``retain`` (required) and ``holdout`` (optional) example lists.
    ``oracle``: the ``_raw`` entry of the oracle's own result; with it come ``forget_quality``,
    ``privleak`` and ``privleak_mink_pp``. Every key, its definition, the OpenUnlearning metric
    it mirrors and its direction: ``docs/metrics.md``. ``reference_features``: ``{"retain":
    tensor}`` of the model before unlearning; with it comes ``retain_drift``. ``layer``: the
    decoder layer (CLReg's) for the entanglement metrics.
    """
    for name in ("forget", "retain"):
        if not splits.get(name):
            raise ValueError(f"splits[{name!r}] must be a non-empty example list")
    metrics: Dict = {}
    raw: Dict = {"features": {}}
    for name, examples in splits.items():
        if not examples:
            continue
        # The vocabulary moments (Min-K%++) only where membership is scored.
        stats = token_stats(model, examples, batch_size, pad_id, layer=layer, pooling=pooling,
                            vocab_stats=name in ("forget", "holdout"))
        for key, value in memorization_metrics(stats, min_k).items():
            metrics[f"{name}_{key}"] = value
        raw[f"{name}_mink"] = _min_k_scores(stats, min_k)
        if name in ("forget", "holdout"):
            raw[f"{name}_mink_pp"] = _min_k_pp_scores(stats, min_k)
        if layer is not None:
            raw["features"][name] = torch.stack([s["feature"] for s in stats])
    tr = truth_ratios(model, splits["forget"], batch_size, pad_id)
    raw["forget_truth_ratios"] = tr.tolist()
    metrics["forget_truth_ratio"] = forget_truth_ratio_score(tr)
    metrics["forget_truth_ratio_mean"] = float(tr.mean())
    if splits.get("holdout"):
        metrics["mink_auc"] = auc(raw["forget_mink"], raw["holdout_mink"])
        metrics["mink_pp_auc"] = auc(raw["forget_mink_pp"], raw["holdout_mink_pp"])
    if oracle is not None:
        metrics["forget_quality"] = ks_pvalue(tr, oracle["forget_truth_ratios"])
        for auc_key, leak_key in (("mink_auc", "privleak"), ("mink_pp_auc", "privleak_mink_pp")):
            if auc_key in metrics and oracle.get(auc_key) is not None:
                metrics[leak_key] = privleak(metrics[auc_key], oracle[auc_key])
    raw["mink_auc"] = metrics.get("mink_auc")
    raw["mink_pp_auc"] = metrics.get("mink_pp_auc")
    if layer is not None:
        f, r = raw["features"]["forget"], raw["features"]["retain"]
        metrics["knn_mixing"] = knn_mixing(f, r, k=knn_k)
        metrics["forget_retain_cos"] = mean_cosine(f, r)
        metrics["entanglement_score"] = entanglement_score(f, r)
        if f.shape[0] + r.shape[0] >= 3:
            metrics["silhouette"] = forget_retain_silhouette(f, r)
        if min(f.shape[0], r.shape[0]) >= 2:
            metrics["linear_probe_acc"] = linear_probe_accuracy(f, r)
        if reference_features is not None and "retain" in reference_features:
            metrics["retain_drift"] = feature_drift(reference_features["retain"], r)
    metrics["_raw"] = raw
    return metrics


# --------------------------------------------------------------------------- generation, utility


def prompt_ids(example: Dict) -> List[int]:
    """The prompt tokens of an example: everything before the first answer label."""
    labels = example["labels"]
    n = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(labels))
    return list(example["input_ids"][:n])


def answer_ids(example: Dict, eos_id: Optional[int] = None) -> List[int]:
    """The answer tokens of an example, without a trailing EOS."""
    ids = [y for y in example["labels"] if y != IGNORE_INDEX]
    if eos_id is not None and ids and ids[-1] == eos_id:
        ids = ids[:-1]
    return ids


@torch.no_grad()
def greedy_answers(model, examples: Sequence[Dict], pad_id: int, eos_id: int,
                   max_new_tokens: int = 32, batch_size: int = 32) -> List[List[int]]:
    """Greedy continuations of each example's prompt (left-padded batches, KV cache), cut at
    the first EOS."""
    device = _device_of(model)
    was_training = model.training
    model.eval()
    out: List[List[int]] = []
    for start in range(0, len(examples), batch_size):
        prompts = [prompt_ids(ex) for ex in examples[start:start + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.as_tensor(p)
            mask[row, width - len(p):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad_id, eos_token_id=eos_id)
        for row in gen[:, width:].tolist():
            out.append(row[:row.index(eos_id)] if eos_id in row else row)
    if was_training:
        model.train()
    return out


# OpenUnlearning's generation default for ROUGE (configs/generation/default.yaml: greedy, 200 new
# tokens). A shorter cap can only lower ROUGE-L recall (the LCS cannot grow when the greedy
# answer is cut), so it is a lower bound on upstream's number.
UPSTREAM_MAX_NEW_TOKENS = 200


def rouge_l_of_model(model, examples: Sequence[Dict], tokenizer, pad_id: int,
                     max_new_tokens: int = UPSTREAM_MAX_NEW_TOKENS,
                     batch_size: int = 32) -> np.ndarray:
    """Per-example ROUGE-L recall of the model's greedy answer (at most ``max_new_tokens``,
    upstream's 200 by default) against the true answer (OpenUnlearning ``rouge``,
    ``rougeL_recall``)."""
    eos = tokenizer.eos_token_id
    generated = greedy_answers(model, examples, pad_id, eos, max_new_tokens, batch_size)
    scores = []
    for ex, gen in zip(examples, generated):
        reference = tokenizer.decode(answer_ids(ex, eos), skip_special_tokens=True)
        scores.append(rouge_l_recall(tokenizer.decode(gen, skip_special_tokens=True), reference))
    return np.asarray(scores)


# TOFU's real-world sets: probability normalized against the perturbed answers, truth ratio
# against the original answer (they have no paraphrase).
REAL_WORLD_SETS = ("real_authors", "world")


def utility_metrics(model, sets: Dict[str, Sequence[Dict]], tokenizer, pad_id: int,
                    batch_size: int = 32,
                    max_new_tokens: int = UPSTREAM_MAX_NEW_TOKENS) -> Dict[str, float]:
    """TOFU's model utility (OpenUnlearning ``model_utility``): for each named set its
    probability ``<name>_prob``, ROUGE-L recall ``<name>_rouge`` and truth-ratio score
    ``<name>_truth`` (mean of ``max(0, 1 - R)``); ``model_utility`` is the harmonic mean of all
    of them (TOFU's 9 parts with ``retain``, ``real_authors`` and ``world``).

    ``retain`` (and any other set not in :data:`REAL_WORLD_SETS`): probability ``P(a | q) **
    (1 / |a|)`` averaged over rows, truth ratio against the paraphrased answer (rows need
    paraphrased and perturbed answers). ``real_authors`` and ``world`` (knowledge the model had
    before fine-tuning): probability normalized against the perturbed answers
    (:func:`normalized_answer_prob`) and truth ratio against the original answer (rows need
    perturbed answers), as upstream's ``ra_*`` and ``wf_*`` metrics. ROUGE-L: greedy answers
    of at most ``max_new_tokens`` (upstream's 200 by default; fewer can only lower it).
    """
    out: Dict[str, float] = {}
    parts = []
    for name, examples in sets.items():
        if not examples:
            raise ValueError(f"utility set {name!r} is empty")
        real_world = name in REAL_WORLD_SETS
        for ex in examples:
            alt = ex.get("alternatives") or {}
            if not alt.get("perturbed") or (not real_world and not alt.get("paraphrased")):
                needs = "perturbed" if real_world else "paraphrased and perturbed"
                raise ValueError(f"every row of utility set {name!r} needs {needs} answers")
        lp = [s["logprobs"].mean() for s in token_stats(model, examples, batch_size, pad_id)]
        flat = [alt for ex in examples for alt in ex["alternatives"]["perturbed"]]
        flat_lp = [s["logprobs"].mean() for s in token_stats(model, flat, batch_size, pad_id)]
        pert, pos = [], 0
        for ex in examples:
            n = len(ex["alternatives"]["perturbed"])
            pert.append(flat_lp[pos:pos + n])
            pos += n
        if real_world:
            prob = float(np.mean([normalized_answer_prob(a, p) for a, p in zip(lp, pert)]))
            correct = lp
        else:
            prob = float(np.mean(np.exp(lp)))
            correct = [s["logprobs"].mean() for s in token_stats(
                model, [ex["alternatives"]["paraphrased"] for ex in examples], batch_size, pad_id)]
        rouge = float(rouge_l_of_model(model, examples, tokenizer, pad_id, max_new_tokens,
                                       batch_size).mean())
        tr = truth_ratio_utility([truth_ratio(c, p) for c, p in zip(correct, pert)])
        out.update({f"{name}_prob": prob, f"{name}_rouge": rouge, f"{name}_truth": tr})
        parts += [prob, rouge, tr]
    out["model_utility"] = harmonic_mean(parts)
    return out
