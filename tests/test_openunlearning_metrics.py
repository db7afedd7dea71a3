"""``clreg_fast.unlearn.metrics`` against OpenUnlearning's definitions.

Expected values are derived by hand from upstream's formulas (locuslab/open-unlearning,
``src/evals/metrics/``, read at commit d3d7cf9); each test names the upstream function or
configuration it mirrors. The models are lookup tables (the next-token distribution depends on
the current token only), so every log-probability is known in closed form.
"""
import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clreg_fast.unlearn import metrics as M

# vocabulary: 0 pad, 1 bos, 2 eos, 3 question, 4 "a", 5 "b", 6 "c", 7 "d"
PAD, BOS, EOS, Q, A, B, C, D = range(8)
V = 8


class TableLM(torch.nn.Module):
    """Next-token log-probabilities ``log table[current token]`` (rows need not sum to 1: the
    metrics take a log-softmax of the logits)."""

    def __init__(self, table):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.as_tensor(table, dtype=torch.float32).log())

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.logits[input_ids])


def unigram(probs):
    """A TableLM whose next-token distribution is ``probs`` (token -> p) after every token;
    the remaining mass is spread over the other tokens."""
    row = np.full(V, 0.0)
    for tok, p in probs.items():
        row[tok] = p
    rest = [t for t in range(V) if t not in probs]
    row[rest] = (1.0 - sum(probs.values())) / len(rest)
    return TableLM(np.tile(row, (V, 1))), row


def example(answer, paraphrased=None, perturbed=None):
    """``bos question answer eos``, labels on ``answer eos`` (as every encoder of the package)."""
    ex = {"input_ids": [BOS, Q] + list(answer) + [EOS],
          "labels": [-100, -100] + list(answer) + [EOS], "concept_id": 0}
    if paraphrased is not None or perturbed is not None:
        ex["alternatives"] = {"paraphrased": example(paraphrased) if paraphrased else None,
                              "perturbed": [example(p) for p in perturbed or []]}
    return ex


# ----------------------------------------------------------------------------- privleak

def test_privleak_is_muse_relative_gap_on_one_minus_auc():
    """Mirrors privacy.privleak: ``(a - r) / (r + 1e-10) * 100`` with a = 1 - AUC(model),
    r = 1 - AUC(oracle)."""
    assert M.privleak(0.9, 0.5) == pytest.approx(-80.0)   # (0.1 - 0.5) / 0.5: leaks
    assert M.privleak(0.2, 0.5) == pytest.approx(60.0)    # (0.8 - 0.5) / 0.5: over-unlearned
    assert M.privleak(0.5, 0.5) == 0.0
    # 0.7 vs 0.6: MUSE's -25 (the old definition gave (0.7 - 0.6) / 0.6 = +16.7)
    assert M.privleak(0.7, 0.6) == pytest.approx(-25.0)
    # oracle AUC 1: upstream's denominator is its 1e-10
    assert M.privleak(0.9, 1.0) == pytest.approx(0.1 / 1e-10 * 100)
    for bad in ((1.2, 0.5), (0.5, -0.1), (float("nan"), 0.5)):
        with pytest.raises(ValueError, match="AUC"):
            M.privleak(*bad)


def test_privleak_sign_with_a_leaking_and_an_over_unlearned_model():
    """Mirrors privacy.privleak over mia.mia_min_k (and mia_min_k_plus_plus): forget answers
    "a a", holdout answers "b b". The oracle finds both equally likely (AUC 0.5); the leaking
    model prefers the forget answers (AUC 1: privleak (0 - 0.5) / 0.5 = -100); the over-unlearned
    one prefers the holdout answers (AUC 0: privleak (1 - 0.5) / 0.5 = +100)."""
    forget = [example([A, A], paraphrased=[A], perturbed=[[B]]) for _ in range(2)]
    splits = {"forget": forget, "retain": [example([C])], "holdout": [example([B, B])] * 2}
    oracle, _ = unigram({A: 0.3, B: 0.3, EOS: 0.2})
    leaking, _ = unigram({A: 0.6, B: 0.1, EOS: 0.2})
    over, _ = unigram({A: 0.05, B: 0.6, EOS: 0.2})
    oracle_raw = M.evaluate_model(oracle, splits)["_raw"]
    assert oracle_raw["mink_auc"] == 0.5 and oracle_raw["mink_pp_auc"] == 0.5
    leak = M.evaluate_model(leaking, splits, oracle=oracle_raw)
    assert leak["mink_auc"] == 1.0 and leak["mink_pp_auc"] == 1.0
    assert leak["privleak"] == pytest.approx(-100.0)
    assert leak["privleak_mink_pp"] == pytest.approx(-100.0)
    gone = M.evaluate_model(over, splits, oracle=oracle_raw)
    assert gone["mink_auc"] == 0.0 and gone["mink_pp_auc"] == 0.0
    assert gone["privleak"] == pytest.approx(100.0)
    assert gone["privleak_mink_pp"] == pytest.approx(100.0)


# ----------------------------------------------------------------------------- EOS

def test_final_eos_is_dropped_from_em_es_and_min_k():
    """Mirrors utils.tokenwise_logprobs / tokenwise_vocab_logprobs ("-1 to ignore eos
    prediction") under memorization.exact_memorization, memorization.extraction_strength and
    mia.min_k: answer "a b" + EOS; the model predicts "a" then "b" right (p 0.7) but "c" instead
    of the EOS (p_eos 0.01). Without the EOS: EM 2/2, ES 1, Min-K% over [log .7, log .7]. With
    it (before 2026-12-06): EM 2/3, ES 0, Min-K% mean(log .01, log .7)."""
    table = np.full((V, V), 0.3 / 7)  # rows sum to 1: 0.7 + 7 x 0.3 / 7
    table[Q, A] = table[A, B] = table[B, C] = 0.7
    table[B, EOS] = 0.01
    table[B, [t for t in range(V) if t not in (C, EOS)]] = 0.29 / 6
    model = TableLM(table)
    (stats,) = M.token_stats(model, [example([A, B])])
    assert stats["correct"].tolist() == [True, True, False]  # the EOS is scored, then dropped
    agg = M.memorization_metrics([stats], min_k=0.4)
    assert agg["exact_mem"] == 1.0
    assert agg["extraction_strength"] == 1.0 and agg["extraction_strength_strict"] == 1.0
    # n = 2 kept tokens, max(1, int(0.4 * 2)) = 1 lowest: log 0.7
    assert agg["mink_score"] == pytest.approx(math.log(0.7), rel=1e-5)
    # the probability keeps the EOS, as upstream's evaluate_probability
    want_prob = math.exp((2 * math.log(0.7) + math.log(0.01)) / 3)
    assert agg["answer_prob"] == pytest.approx(want_prob, rel=1e-5)


# ----------------------------------------------------------------------------- ES

def _upstream_es(correct):
    """memorization.extraction_strength's loop, written out: the first k whose suffix matches;
    with no match the loop variable stays at n - 1."""
    n = len(correct)
    for k in range(n):
        if all(correct[k:]):
            break
    return 1 - k / n


def test_extraction_strength_falls_through_to_one_over_n():
    """Mirrors memorization.extraction_strength: with the last token wrong, no suffix matches
    and upstream reports 1/n; our variant (``strict_extraction_strength``) reports 0."""
    assert M.extraction_strength([1, 1, 0]) == pytest.approx(1 / 3)
    assert M.strict_extraction_strength([1, 1, 0]) == 0.0
    assert M.extraction_strength([0]) == 1.0 and M.strict_extraction_strength([0]) == 0.0
    assert M.extraction_strength([0, 1, 1]) == pytest.approx(2 / 3)
    assert M.extraction_strength([1, 0, 1, 1]) == pytest.approx(0.5)
    assert M.extraction_strength([1, 1, 1]) == 1.0
    for n in range(1, 7):
        for bits in itertools.product([0, 1], repeat=n):
            assert M.extraction_strength(bits) == pytest.approx(_upstream_es(bits)), bits
            if bits[-1]:  # the two agree unless the last token is wrong
                assert M.strict_extraction_strength(bits) == M.extraction_strength(bits)
    with pytest.raises(ValueError):
        M.extraction_strength([])


def test_extraction_strength_in_evaluate_model():
    """Mirrors memorization.extraction_strength on a model: the last kept token (before the
    EOS) is wrong, so upstream's score is 1/2 on the answer "a b" and ours is 0."""
    model, _ = unigram({A: 0.5, B: 0.1, EOS: 0.2})  # argmax is always "a"
    forget = [example([A, B], paraphrased=[A], perturbed=[[B]])]
    m = M.evaluate_model(model, {"forget": forget, "retain": [example([A])]})
    assert m["forget_extraction_strength"] == pytest.approx(0.5)
    assert m["forget_extraction_strength_strict"] == 0.0
    assert m["forget_exact_mem"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- Min-K%

def test_min_k_counts_max_one_int_k_n():
    """Mirrors mia.min_k.MinKProbAttack.compute_score: ``max(1, int(len * k))`` lowest tokens."""
    lp = [-1.0, -5.0, -2.0, -0.1]
    assert M.min_k_score(lp, 0.4) == -5.0              # int(1.6) = 1 (ceil gave 2: -3.5)
    assert M.min_k_score(lp + [-3.0], 0.4) == -4.0     # int(2.0) = 2: -5, -3
    assert M.min_k_score([-1.0, -2.0], 0.4) == -2.0    # int(0.8) = 0 -> at least 1
    assert M.min_k_score(lp, 1.0) == pytest.approx(np.mean(lp))


def _float64_min_k_pp(table, answer, k):
    """The Min-K%++ score of ``answer`` written out in float64 from the table's logits."""
    logits = np.log(np.asarray(table, float))
    context = [Q] + list(answer[:-1])   # the EOS is dropped: score the answer tokens only
    z = []
    for prev, tok in zip(context, answer):
        row = logits[prev] - logits[prev].max()
        logp = row - np.log(np.exp(row).sum())
        p = np.exp(logp)
        mu = (p * logp).sum()
        var = (p * logp ** 2).sum() - mu ** 2
        z.append((logp[tok] - mu) / math.sqrt(max(var, 1e-6)))
    z = sorted(z)
    return float(np.mean(z[: max(1, int(len(z) * k))]))


def test_min_k_plus_plus_matches_an_independent_float64_computation():
    """Mirrors mia.min_k_plus_plus.MinKPlusPlusAttack.compute_score (sign flipped: higher =
    member) and mia.utils.mia_auc: z-scores of each token's log-probability against the mean and
    variance of log p under the model's own distribution, mean of the lowest max(1, int(k n))."""
    rng = np.random.default_rng(0)
    table = rng.uniform(0.05, 1.0, size=(V, V)) ** 3
    model = TableLM(table)
    answers = [[A, B, C, D], [C, C, A], [D, A, B, B, C], [B, D], [A, A, A], [C, D, B]]
    stats = M.token_stats(model, [example(a) for a in answers], vocab_stats=True)
    for k in (0.2, 0.4, 1.0):
        got = [M.min_k_plus_plus_score(s["logprobs"][:-1], s["vocab_mean"][:-1],
                                       s["vocab_var"][:-1], k) for s in stats]
        want = [_float64_min_k_pp(table, a, k) for a in answers]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    agg = M.memorization_metrics(stats, min_k=0.4)
    want = [_float64_min_k_pp(table, a, 0.4) for a in answers]
    assert agg["mink_pp_score"] == pytest.approx(np.mean(want), rel=1e-5)
    # The AUC as upstream's mia_auc: roc_auc_score with forget labelled 0 and score -z.
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    forget = [example(a, paraphrased=a, perturbed=[[B]]) for a in answers[:3]]
    holdout = [example(a) for a in answers[3:]]
    m = M.evaluate_model(model, {"forget": forget, "retain": holdout, "holdout": holdout})
    labels = [0] * 3 + [1] * 3
    assert m["mink_pp_auc"] == pytest.approx(roc_auc_score(labels, [-w for w in want]))


def test_min_k_plus_plus_clamps_the_variance():
    """Mirrors the ``torch.clamp(sigma, min=1e-6)`` of MinKPlusPlusAttack (its ``sigma`` is the
    variance): z = [0.5 / sqrt(1e-6), -2 / sqrt(4)] = [500, -1] -> mean 249.5 with k = 1, the
    lowest one (-1) with k = 0.4."""
    assert M.min_k_plus_plus_score([-1.0, -3.0], [-1.5, -1.0], [0.0, 4.0], 1.0) == \
        pytest.approx(249.5)
    assert M.min_k_plus_plus_score([-1.0, -3.0], [-1.5, -1.0], [0.0, 4.0], 0.4) == \
        pytest.approx(-1.0)
    with pytest.raises(ValueError, match="match"):
        M.min_k_plus_plus_score([-1.0, -3.0], [-1.0], [1.0, 1.0])


# ----------------------------------------------------------------------------- truth ratio

def test_forget_truth_ratio_is_closer_to_one_better():
    """Mirrors evaluate truth_ratio with aggregator closer_to_1_better (forget_Truth_Ratio):
    mean(min(R, 1 / R)). Two rows on a unigram model (p_a 0.4, p_b 0.1): paraphrase "a" against
    perturbed "b", "b" gives R = sqrt(p_b / p_a) = 0.5 (the EOS factor cancels); the swapped row
    R = 2. forget_Truth_Ratio = mean(0.5, 0.5) = 0.5; the old report mean(R) = 1.25."""
    model, _ = unigram({A: 0.4, B: 0.1, EOS: 0.2})
    forget = [example([C], paraphrased=[A], perturbed=[[B], [B]]),
              example([C], paraphrased=[B], perturbed=[[A], [A]])]
    m = M.evaluate_model(model, {"forget": forget, "retain": [example([C])]})
    np.testing.assert_allclose(m["_raw"]["forget_truth_ratios"], [0.5, 2.0], rtol=1e-5)
    assert m["forget_truth_ratio"] == pytest.approx(0.5, rel=1e-5)
    assert m["forget_truth_ratio_mean"] == pytest.approx(1.25, rel=1e-5)
    assert M.forget_truth_ratio_score([0.5, 2.0, 1.0]) == pytest.approx(2 / 3)


def test_model_utility_has_tofus_nine_parts(monkeypatch):
    """Mirrors configs model_utility (hm_aggregate over retain_Q_A_Prob, retain_Q_A_ROUGE,
    retain_Truth_Ratio, ra_Q_A_Prob_normalised, ra_Q_A_ROUGE, ra_Truth_Ratio and the wf_ three),
    probability_w_options and truth_ratio (true_better). Unigram model p_a 0.4, p_b 0.1, p_c 0.2:
    rows answer "a", paraphrase "c", perturbed "b", "b".

    retain: truth ratio against the paraphrase, R = sqrt(p_b / p_c), score 1 - R;
    real authors / world: against the answer, R = sqrt(p_b / p_a) = 0.5, score 0.5; normalized
    probability sqrt(p_a) / (sqrt(p_a) + 2 sqrt(p_b)) = 0.5 (the EOS factor cancels)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    model, row = unigram({A: 0.4, B: 0.1, C: 0.2, EOS: 0.2})
    rows = [example([A], paraphrased=[C], perturbed=[[B], [B]])] * 2
    # ROUGE-L needs generation and a tokenizer; it is checked elsewhere: a fixed score here.
    monkeypatch.setattr(M, "rouge_l_of_model", lambda model, ex, *a, **k: np.full(len(ex), 0.8))
    out = M.utility_metrics(model, {"retain": rows, "real_authors": rows, "world": rows},
                            tokenizer=None, pad_id=PAD)
    retain_r = math.sqrt(0.1 / 0.2)
    assert out["retain_truth"] == pytest.approx(1 - retain_r, rel=1e-5)
    assert out["retain_prob"] == pytest.approx(math.sqrt(0.4 * 0.2), rel=1e-5)
    for name in ("real_authors", "world"):
        assert out[f"{name}_truth"] == pytest.approx(0.5, rel=1e-5)
        assert out[f"{name}_prob"] == pytest.approx(0.5, rel=1e-5)
    parts = [out[f"{s}_{k}"] for s in ("retain", "real_authors", "world")
             for k in ("prob", "rouge", "truth")]
    assert len(parts) == 9
    assert out["model_utility"] == pytest.approx(scipy_stats.hmean(parts))
    # The real-world sets need no paraphrase; the retain set does.
    bare = [example([A], perturbed=[[B]])]
    assert "world_truth" in M.utility_metrics(model, {"world": bare}, None, PAD)
    with pytest.raises(ValueError, match="paraphrased"):
        M.utility_metrics(model, {"retain": bare}, None, PAD)


def test_normalized_probability_and_truth_ratio_keep_upstreams_epsilon():
    """Mirrors probability_w_options (``correct / (correct + wrong + 1e-10)``) and truth_ratio
    (``wrong / (correct + 1e-10)``)."""
    assert M.normalized_answer_prob(math.log(0.5), [math.log(0.25)] * 2) == \
        pytest.approx(0.5 / (1.0 + 1e-10))
    assert M.truth_ratio(-1000.0, [-2.0]) == pytest.approx(math.exp(-2.0) / 1e-10)
    assert M.truth_ratio(math.log(0.5), [math.log(0.25)]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- ROUGE-L


class _LateAnswerLM(torch.nn.Module):
    """``generate`` writes 40 filler tokens ("d") before the answer "a b c", then EOS: the answer
    is only reached past 40 new tokens."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # greedy_answers reads the device

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        new = torch.tensor([D] * 40 + [A, B, C, EOS])[:max_new_tokens]
        return torch.cat([input_ids, new.expand(input_ids.shape[0], -1)], dim=1)


class _WordTokenizer:
    eos_token_id = EOS
    _words = {A: "alpha", B: "beta", C: "gamma", D: "delta"}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self._words[int(i)] for i in ids if int(i) in self._words)


def test_rouge_generates_as_many_tokens_as_upstream_by_default():
    """Mirrors utils.eval_text_similarity under configs generation/default.yaml (greedy,
    ``max_new_tokens: 200``), ``rougeL_recall``: the reference "a b c" is generated after 40
    filler tokens, so the recall is LCS 3 / 3 = 1 with upstream's budget; a 32-token cap (our
    default before 2026-12-06) cuts the answer off: recall 0."""
    pytest.importorskip("rouge_score")
    rows = [example([A, B, C])]
    model, tok = _LateAnswerLM(), _WordTokenizer()
    assert M.rouge_l_of_model(model, rows, tok, PAD).tolist() == [1.0]
    assert M.rouge_l_of_model(model, rows, tok, PAD, max_new_tokens=32).tolist() == [0.0]
    # 41 new tokens reach "alpha" only: LCS 1 of 3
    assert M.rouge_l_of_model(model, rows, tok, PAD, max_new_tokens=41).tolist() == \
        pytest.approx([1 / 3])
    # utility_metrics (retain/ra/wf ROUGE) passes the same budget on
    import inspect
    assert inspect.signature(M.utility_metrics).parameters["max_new_tokens"].default == 200
