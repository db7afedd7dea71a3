"""Unlearning metrics: memorization, forget quality, membership inference, entanglement.

Two layers:

* pure functions on numbers (``knn_mixing``, ``ks_pvalue``, ``auc``, ``min_k_score``,
  ``extraction_strength``, ...), tested on hand-checked cases;
* model-level helpers that run a causal LM teacher-forced over examples
  (:func:`token_stats`, :func:`pooled_features`) and :func:`evaluate_model`, which returns one
  flat dict of metrics for a model.

Definitions (the answer is ``y``, its tokens include the final EOS; ``p`` = model probability
of the right token with the true prefix, i.e. teacher forcing):

* ``value_acc``: share of fact-value tokens whose argmax prediction is right (value tokens are
  the ones ``value_mask`` marks; template tokens inflate whole-answer scores on a small model).
* ``value_prob``: mean over examples of ``P(value | prompt, answer prefix)``, the product of
  ``p`` over the value tokens.
* ``answer_prob``: mean over examples of ``P(y | x) ** (1 / |y|)``.
* ``exact_mem``: mean over examples of the share of answer tokens predicted right.
* ``extraction_strength``: mean over examples of ``1 - k / |y|``, ``k`` the shortest answer
  prefix after which greedy decoding reproduces the rest (with teacher-forced argmax, that is
  one past the last wrong position).
* ``truth_ratio``: per example ``R = (prod_j P(perturbed_j)^(1/|y_j|))^(1/m) /
  P(paraphrased)^(1/|y|)``; reported is the mean of ``R`` (about 1 when the model does not know
  the fact, well below 1 when it does).
* ``forget_quality``: two-sample KS-test p-value between the forget-set truth ratios of the
  model and of the oracle (a model never trained on the forget set); high = indistinguishable.
* ``mink_auc``: AUC of the Min-K% score (mean of the lowest 40% token log-probabilities of the
  answer) separating forget (members) from never-trained holdout rows; ``privleak`` =
  ``(auc - oracle_auc) / oracle_auc * 100`` (0 is ideal, large positive leaks membership).
* ``knn_mixing``: entanglement of forget and retain features at one layer (see
  :func:`knn_mixing`); ``forget_retain_cos``: mean cosine between forget and retain features;
  ``retain_drift``: mean ``1 - cos`` between retain features now and before unlearning.
* ``entanglement_score`` (Zhao et al. 2024, lower = more separated), ``silhouette`` (cosine,
  forget/retain labels) and ``linear_probe_acc`` (cross-validated balanced accuracy of a
  logistic probe), all on L2-normalized features at that layer.
* Model utility (:func:`utility_metrics`, TOFU): the harmonic mean of probability, ROUGE-L
  recall of the greedy answer (``rouge-score``) and truth-ratio score ``max(0, 1 - R)`` on the
  retain set and on general-knowledge "world facts".
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


def privleak(model_auc: float, oracle_auc: float) -> float:
    """Relative membership-inference gap to the oracle, in percent (0 is ideal)."""
    if oracle_auc <= 0:
        raise ValueError(f"oracle_auc must be positive, got {oracle_auc}")
    return (model_auc - oracle_auc) / oracle_auc * 100.0


def min_k_score(token_logprobs, k: float = 0.4) -> float:
    """Min-K% membership score: mean of the lowest ``ceil(k * n)`` token log-probabilities."""
    lp = np.sort(np.asarray(token_logprobs, float))
    if lp.size == 0:
        raise ValueError("min_k_score needs at least one token")
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    return float(lp[: max(1, math.ceil(k * lp.size))].mean())


def extraction_strength(correct) -> float:
    """``1 - k / n`` with ``k`` one past the last wrong position of a teacher-forced argmax
    match vector (greedy decoding from the first ``k`` true tokens then reproduces the rest)."""
    c = np.asarray(correct, bool)
    if c.size == 0:
        raise ValueError("extraction_strength needs at least one token")
    wrong = np.flatnonzero(~c)
    k = 0 if wrong.size == 0 else int(wrong[-1]) + 1
    return 1.0 - k / c.size


def exact_memorization(correct) -> float:
    """Share of answer tokens whose teacher-forced argmax prediction is right."""
    c = np.asarray(correct, bool)
    if c.size == 0:
        raise ValueError("exact_memorization needs at least one token")
    return float(c.mean())


def truth_ratio(paraphrased_logprob: float, perturbed_logprobs: Sequence[float]) -> float:
    """``exp(mean(perturbed) - paraphrased)`` of per-token mean log-probabilities."""
    if len(perturbed_logprobs) == 0:
        raise ValueError("truth_ratio needs at least one perturbed answer")
    return float(math.exp(float(np.mean(perturbed_logprobs)) - paraphrased_logprob))


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
    """TOFU's truth-ratio score for retain-like sets: mean of ``max(0, 1 - R)``, ``R`` the truth
    ratio P(perturbed) / P(paraphrased) (high = the model prefers the true answer)."""
    r = np.asarray(ratios, float)
    if r.size == 0:
        raise ValueError("truth_ratio_utility needs at least one ratio")
    return float(np.maximum(0.0, 1.0 - r).mean())


def normalized_answer_prob(answer_logprob: float, perturbed_logprobs: Sequence[float]) -> float:
    """``p / (p + sum_j p_j)`` of per-token-mean probabilities: TOFU's probability on the
    world-facts set, the true answer against its perturbed versions."""
    if len(perturbed_logprobs) == 0:
        raise ValueError("normalized_answer_prob needs at least one perturbed answer")
    lps = np.asarray([answer_logprob] + list(perturbed_logprobs), float)
    lps -= lps.max()
    p = np.exp(lps)
    return float(p[0] / p.sum())


# --------------------------------------------------------------------------- model level


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def token_stats(model, examples: Sequence[Dict], batch_size: int = 64, pad_id: int = 0,
                layer: Optional[int] = None, pooling: str = "mean") -> List[Dict]:
    """Teacher-forced per-example statistics over the answer tokens.

    Each result has ``logprobs`` and ``correct`` (numpy, one entry per answer token) and
    ``value`` (bool mask of the value tokens among them). With ``layer`` (a decoder layer
    index, negative from the last) it also has ``feature``: the output of that decoder layer,
    the state CLReg trains on (for the last layer: before the final norm), pooled over the
    answer tokens (``mean``) or taken at the last answer token (``last``).
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
            results.append(item)
    if was_training:
        model.train()
    return results


def pooled_features(model, examples: Sequence[Dict], layer: int, pooling: str = "mean",
                    batch_size: int = 64, pad_id: int = 0) -> torch.Tensor:
    """(N, hidden) features of decoder layer ``layer`` pooled over each answer."""
    stats = token_stats(model, examples, batch_size, pad_id, layer=layer, pooling=pooling)
    return torch.stack([s["feature"] for s in stats])


def memorization_metrics(stats: Sequence[Dict], min_k: float = 0.4) -> Dict[str, float]:
    """Aggregate :func:`token_stats` results of one split."""
    if not stats:
        raise ValueError("no examples to score")
    value_correct = np.concatenate([s["correct"][s["value"]] for s in stats])
    return {
        "value_acc": float(value_correct.mean()) if value_correct.size else float("nan"),
        "value_prob": float(np.mean([math.exp(s["logprobs"][s["value"]].sum()) for s in stats])),
        "answer_prob": float(np.mean([math.exp(s["logprobs"].mean()) for s in stats])),
        "exact_mem": float(np.mean([exact_memorization(s["correct"]) for s in stats])),
        "extraction_strength": float(np.mean([extraction_strength(s["correct"]) for s in stats])),
        "mink_score": float(np.mean([min_k_score(s["logprobs"], min_k) for s in stats])),
    }


def truth_ratios(model, examples: Sequence[Dict], batch_size: int = 64,
                 pad_id: int = 0) -> np.ndarray:
    """Per-example truth ratio for examples with paraphrased and perturbed ``alternatives``."""
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
    ``oracle``: the ``_raw`` entry of the oracle's own result; with it come ``forget_quality``
    and ``privleak``. ``reference_features``: ``{"retain": tensor}`` of the model before
    unlearning; with it comes ``retain_drift``. ``layer``: the decoder layer (CLReg's) for the
    entanglement metrics.
    """
    for name in ("forget", "retain"):
        if not splits.get(name):
            raise ValueError(f"splits[{name!r}] must be a non-empty example list")
    metrics: Dict = {}
    raw: Dict = {"features": {}}
    for name, examples in splits.items():
        if not examples:
            continue
        stats = token_stats(model, examples, batch_size, pad_id, layer=layer, pooling=pooling)
        for key, value in memorization_metrics(stats, min_k).items():
            metrics[f"{name}_{key}"] = value
        raw[f"{name}_mink"] = [min_k_score(s["logprobs"], min_k) for s in stats]
        if layer is not None:
            raw["features"][name] = torch.stack([s["feature"] for s in stats])
    tr = truth_ratios(model, splits["forget"], batch_size, pad_id)
    raw["forget_truth_ratios"] = tr.tolist()
    metrics["forget_truth_ratio"] = float(tr.mean())
    if splits.get("holdout"):
        metrics["mink_auc"] = auc(raw["forget_mink"], raw["holdout_mink"])
    if oracle is not None:
        metrics["forget_quality"] = ks_pvalue(tr, oracle["forget_truth_ratios"])
        if "mink_auc" in metrics and oracle.get("mink_auc") is not None:
            metrics["privleak"] = privleak(metrics["mink_auc"], oracle["mink_auc"])
    raw["mink_auc"] = metrics.get("mink_auc")
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


def rouge_l_of_model(model, examples: Sequence[Dict], tokenizer, pad_id: int,
                     max_new_tokens: int = 32, batch_size: int = 32) -> np.ndarray:
    """Per-example ROUGE-L recall of the model's greedy answer against the true answer."""
    eos = tokenizer.eos_token_id
    generated = greedy_answers(model, examples, pad_id, eos, max_new_tokens, batch_size)
    scores = []
    for ex, gen in zip(examples, generated):
        reference = tokenizer.decode(answer_ids(ex, eos), skip_special_tokens=True)
        scores.append(rouge_l_recall(tokenizer.decode(gen, skip_special_tokens=True), reference))
    return np.asarray(scores)


def utility_metrics(model, sets: Dict[str, Sequence[Dict]], tokenizer, pad_id: int,
                    batch_size: int = 32, max_new_tokens: int = 32) -> Dict[str, float]:
    """TOFU-style model utility: for each named set (``retain``, ``world``, ...) of examples with
    paraphrased/perturbed ``alternatives``, its probability, ROUGE-L recall and truth-ratio score;
    ``model_utility`` is the harmonic mean of all of them.

    Probability: ``P(a | q) ** (1 / |a|)`` averaged over rows, except on ``world`` (general
    knowledge the model had before fine-tuning), where it is normalized against the perturbed
    answers (:func:`normalized_answer_prob`), as TOFU does for its real-world sets.
    """
    out: Dict[str, float] = {}
    parts = []
    for name, examples in sets.items():
        if not examples:
            raise ValueError(f"utility set {name!r} is empty")
        if not all((ex.get("alternatives") or {}).get("paraphrased") and
                   ex["alternatives"].get("perturbed") for ex in examples):
            raise ValueError(f"every row of utility set {name!r} needs paraphrased and "
                             "perturbed answers")
        lp = [s["logprobs"].mean() for s in token_stats(model, examples, batch_size, pad_id)]
        para = [s["logprobs"].mean() for s in token_stats(
            model, [ex["alternatives"]["paraphrased"] for ex in examples], batch_size, pad_id)]
        flat = [alt for ex in examples for alt in ex["alternatives"]["perturbed"]]
        flat_lp = [s["logprobs"].mean() for s in token_stats(model, flat, batch_size, pad_id)]
        pert, pos = [], 0
        for ex in examples:
            n = len(ex["alternatives"]["perturbed"])
            pert.append(flat_lp[pos:pos + n])
            pos += n
        if name == "world":
            prob = float(np.mean([normalized_answer_prob(a, p) for a, p in zip(lp, pert)]))
        else:
            prob = float(np.mean(np.exp(lp)))
        rouge = float(rouge_l_of_model(model, examples, tokenizer, pad_id, max_new_tokens,
                                       batch_size).mean())
        tr = truth_ratio_utility([truth_ratio(a, p) for a, p in zip(para, pert)])
        out.update({f"{name}_prob": prob, f"{name}_rouge": rouge, f"{name}_truth": tr})
        parts += [prob, rouge, tr]
    out["model_utility"] = harmonic_mean(parts)
    return out
