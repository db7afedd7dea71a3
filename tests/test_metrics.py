"""Unlearning metrics on small hand-checked cases."""
import math

import numpy as np
import pytest
import torch

from clreg_fast.unlearn import metrics as M
from clreg_fast.unlearn.data import encode_qa
from clreg_fast.unlearn.synthetic import WordTokenizer


# ----------------------------------------------------------------------------- kNN mixing

def test_knn_mixing_zero_for_separated_clusters():
    g = torch.Generator().manual_seed(0)
    forget = torch.randn(10, 8, generator=g) * 0.01 + torch.tensor([5.0] + [0.0] * 7)
    retain = torch.randn(30, 8, generator=g) * 0.01 + torch.tensor([0.0] * 7 + [5.0])
    assert M.knn_mixing(forget, retain, k=5) == 0.0


def test_knn_mixing_near_one_for_one_distribution():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 6, generator=g)
    value = M.knn_mixing(x[:600], x[600:], k=10)
    assert abs(value - 1.0) < 0.05


def test_knn_mixing_hand_computed():
    # forget rows 0,1 along +x; retain: one along +x (closer to row 0 than row 1 is), one along -x.
    forget = torch.tensor([[1.0, 0.0], [1.0, 0.3]])
    retain = torch.tensor([[1.0, 0.05], [-1.0, 0.0]])
    # k=1: row 0's nearest is retain[0]; row 1's nearest is retain[0] too (cos 0.97 vs 0.96).
    cos_r = (1.0 * 1.0 + 0.3 * 0.05) / (math.hypot(1, 0.3) * math.hypot(1, 0.05))
    cos_f = 1.0 / math.hypot(1, 0.3)
    assert cos_r > cos_f
    # mean retain share 1, pool retain share 2 / 3 -> 1.5
    assert M.knn_mixing(forget, retain, k=1) == pytest.approx(1.5)
    # k=2: row 0 -> {retain0, forget1}, row 1 -> {retain0, forget0}: share 1/2 -> 0.75
    assert M.knn_mixing(forget, retain, k=2) == pytest.approx(0.75)


def test_knn_mixing_ties_count_as_a_random_draw():
    """Equal similarities (a collapsed model maps rows to one point) are split as a random
    tie-break would split them on average, whatever order topk returns them in."""
    same = torch.ones(3, 4)
    # every row identical: as mixed as a random draw, exactly 1
    assert M.knn_mixing(same, torch.ones(40, 4), k=2) == pytest.approx(1.0)
    # row 0's nearest (k=1) is a tie between forget row 1 and retain row 0: half retain
    forget = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    retain = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert M.knn_mixing(forget, retain, k=1) == pytest.approx(0.5 / (2 / 3))


def test_knn_mixing_checks_inputs():
    with pytest.raises(ValueError, match="k must be"):
        M.knn_mixing(torch.randn(2, 3), torch.randn(2, 3), k=4)
    with pytest.raises(ValueError, match="features"):
        M.knn_mixing(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="2-D"):
        M.knn_mixing(torch.randn(3), torch.randn(2, 3))


def test_mean_cosine_and_drift():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0]])
    assert M.mean_cosine(a, b) == pytest.approx(0.5)  # cos 1 and cos 0
    assert M.feature_drift(a, a * 3) == pytest.approx(0.0, abs=1e-12)
    assert M.feature_drift(a, torch.tensor([[0.0, 1.0], [0.0, -1.0]])) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="shape"):
        M.feature_drift(a, b)


# ----------------------------------------------------------------------------- statistics

def test_ks_pvalue():
    x = np.linspace(0, 1, 50)
    assert M.ks_pvalue(x, x) == pytest.approx(1.0)
    assert M.ks_pvalue(x, x + 10) < 1e-10
    with pytest.raises(ValueError):
        M.ks_pvalue([], x)


def test_auc():
    assert M.auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert M.auc([0, 1], [3, 4]) == 0.0
    assert M.auc([1, 1], [1, 1]) == 0.5
    # 2 of 4 pairs won, one tied: (2 + 0.5) / 4
    assert M.auc([2, 1], [1, 0]) == pytest.approx(0.875)
    assert M.auc([2, 0.5], [1, 0.5]) == pytest.approx((2 + 0.5) / 4)
    with pytest.raises(ValueError):
        M.auc([], [1])


def test_privleak():
    # MUSE's convention since 2026-12-06 (was (auc - oracle) / oracle * 100 = +50 here):
    # on 1 - AUC, (0.25 - 0.5) / 0.5 * 100; negative = leaks.
    assert M.privleak(0.75, 0.5) == pytest.approx(-50.0)
    assert M.privleak(0.5, 0.5) == 0.0


def test_min_k_score():
    lp = [-1.0, -5.0, -2.0, -0.1, -3.0]
    # max(1, int(0.4 * 5)) = 2 lowest: -5, -3
    assert M.min_k_score(lp, 0.4) == pytest.approx(-4.0)
    assert M.min_k_score(lp, 1.0) == pytest.approx(np.mean(lp))
    assert M.min_k_score([-2.0], 0.4) == -2.0


def test_extraction_strength_and_exact_memorization():
    assert M.extraction_strength([1, 1, 1, 1]) == 1.0
    # Last token wrong: OpenUnlearning's loop falls through to k = n - 1, so 1/n (0 before
    # 2026-12-06, now the strict variant's value).
    assert M.extraction_strength([1, 1, 1, 0]) == pytest.approx(0.25)
    assert M.strict_extraction_strength([1, 1, 1, 0]) == 0.0
    assert M.extraction_strength([0, 1, 1, 1]) == pytest.approx(0.75)  # prefix of 1 suffices
    assert M.extraction_strength([1, 0, 1, 1]) == pytest.approx(0.5)
    assert M.exact_memorization([1, 0, 1, 1]) == pytest.approx(0.75)


def test_truth_ratio():
    # per-token mean log-probs: perturbed -2 and -4 (mean -3), paraphrased -1 -> exp(-2)
    assert M.truth_ratio(-1.0, [-2.0, -4.0]) == pytest.approx(math.exp(-2))
    with pytest.raises(ValueError):
        M.truth_ratio(-1.0, [])


# ----------------------------------------------------------------------------- model level

class Double(torch.nn.Module):
    def forward(self, x):
        return 2 * x


class LookupLM(torch.nn.Module):
    """A 'model' whose next-token distribution is a fixed table row of the current token, so
    its teacher-forced statistics can be computed by hand; its one decoder layer doubles the
    embedding."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.as_tensor(table, dtype=torch.float32).log())
        self.hidden = torch.nn.Embedding(len(table), 3)
        self.layers = torch.nn.ModuleList([Double()])

    def forward(self, input_ids, attention_mask=None):
        from types import SimpleNamespace
        self.layers[0](self.hidden(input_ids))
        return SimpleNamespace(logits=self.table[input_ids])


def test_token_stats_by_hand():
    # vocab: 0 pad, 1 bos, 2 eos, 3 "q", 4 "a", 5 "b"
    table = torch.full((6, 6), 0.02)
    table[1, 3] = 0.9   # after bos -> q
    table[3, 4] = 0.6   # after q -> a (p 0.6, argmax)
    table[4, 4] = 0.5   # after a -> a (argmax) ; true next is b with p 0.3
    table[4, 5] = 0.3
    table[5, 2] = 0.8   # after b -> eos
    table = table / table.sum(1, keepdim=True)
    model = LookupLM(table)
    ex = {"input_ids": [1, 3, 4, 5, 2], "labels": [-100, -100, 4, 5, 2],
          "value_mask": [0, 0, 0, 1, 0], "concept_id": 0}
    (s,) = M.token_stats(model, [ex], layer=0)
    expected_lp = np.log([table[3, 4].item(), table[4, 5].item(), table[5, 2].item()])
    np.testing.assert_allclose(s["logprobs"], expected_lp, rtol=1e-5)
    assert s["correct"].tolist() == [True, False, True]
    assert s["value"].tolist() == [False, True, False]
    # layer 0 outputs 2 * embedding; mean over the answer positions 2, 3, 4
    want = (model.hidden.weight[[4, 5, 2]] * 2).mean(0)
    torch.testing.assert_close(s["feature"], want.detach())
    agg = M.memorization_metrics([s])
    assert agg["value_acc"] == 0.0
    assert agg["value_prob"] == pytest.approx(table[4, 5].item(), rel=1e-5)
    # EM and ES drop the final EOS as OpenUnlearning does (since 2026-12-06; were 2/3 and 1/3
    # with it): kept [right, wrong] -> EM 1/2, ES upstream's fall-through 1/2, strict ES 0.
    assert agg["exact_mem"] == pytest.approx(1 / 2)
    assert agg["extraction_strength"] == pytest.approx(1 / 2)
    assert agg["extraction_strength_strict"] == 0.0
    assert agg["answer_prob"] == pytest.approx(math.exp(expected_lp.mean()), rel=1e-5)


def _tiny_llama_and_examples():
    from clreg_fast.unlearn.tiny_model import make_tiny_llama

    tok = WordTokenizer.from_texts(["who is x ? x is a b c d . e f g"], extra_words=["question",
                                                                                   "answer", ":"])
    model = make_tiny_llama(len(tok), seed=0, hidden_size=16, num_layers=2, num_heads=2)
    ex = []
    for i, (q, a, v) in enumerate([("who is x ?", "x is a b .", "b"), ("who is x ?", "x is c .", "c"),
                                   ("who is x ?", "x is d e .", "d e"), ("who is x ?", "x is f .", "f"),
                                   ("who is x ?", "x is g .", "g")]):
        e = encode_qa(tok, q, a, concept_id=i % 2, value=v)
        e["alternatives"] = {"paraphrased": encode_qa(tok, q, a),
                             "perturbed": [encode_qa(tok, q, "x is a ."), encode_qa(tok, q, "x is g .")]}
        ex.append(e)
    return model, ex


def test_batched_stats_match_one_by_one():
    model, ex = _tiny_llama_and_examples()
    together = M.token_stats(model, ex, batch_size=8, layer=1)
    for e, t in zip(ex, together):
        (alone,) = M.token_stats(model, [e], layer=1)
        np.testing.assert_allclose(t["logprobs"], alone["logprobs"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(t["feature"], alone["feature"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_token_stats_features_are_what_clreg_trains_on(pooling):
    """``layer`` means what it means for CLReg: the output of that decoder layer (negative
    indices from the last), pooled over the answer tokens, not the post-norm final state."""
    from clreg_fast.unlearn.data import answer_mask, collate
    from clreg_fast.unlearn.features import capture_layer, pool_features

    model, ex = _tiny_llama_and_examples()  # two decoder layers
    batch = collate(ex, pad_id=0)
    for layer, same_as in ((0, 0), (1, 1), (-1, 1), (-2, 0)):
        with torch.no_grad(), capture_layer(model, same_as) as cap:
            cap.run(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            want, _ = pool_features(cap[same_as], answer_mask(batch["labels"]), pooling)
        got = torch.stack([s["feature"] for s in M.token_stats(model, ex, layer=layer,
                                                                pooling=pooling)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"layer {layer}")


def test_evaluate_model_keys_and_oracle_comparison():
    model, ex = _tiny_llama_and_examples()
    splits = {"forget": ex[:2], "retain": ex[2:], "holdout": ex[:1]}
    own = M.evaluate_model(model, splits, layer=0, knn_k=1)
    raw = own.pop("_raw")
    again = M.evaluate_model(model, splits, layer=0, knn_k=1, oracle=raw,
                             reference_features={"retain": raw["features"]["retain"]})
    again.pop("_raw")
    for key in ("forget_value_acc", "retain_value_acc", "holdout_value_acc", "forget_truth_ratio",
                "mink_auc", "knn_mixing", "forget_retain_cos"):
        assert key in own and math.isfinite(own[key])
    # the same model against itself: identical truth ratios, no leak, no drift
    assert again["forget_quality"] == pytest.approx(1.0)
    assert again["privleak"] == pytest.approx(0.0)
    assert again["retain_drift"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="retain"):
        M.evaluate_model(model, {"forget": ex})
