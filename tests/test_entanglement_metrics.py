"""The entanglement and utility measures on hand-made features with known answers."""
import math

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("rouge_score")

from clreg_fast.unlearn import metrics as M  # noqa: E402

E = torch.eye(4, dtype=torch.float64)


def _es_float64(f, r):
    """The Entanglement Score written out in numpy, row by row."""
    f = np.asarray(f, float)
    r = np.asarray(r, float)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    r = r / np.linalg.norm(r, axis=1, keepdims=True)
    mu_f, mu_r, mu = f.mean(0), r.mean(0), np.concatenate([f, r]).mean(0)
    within = np.mean([np.sum((z - mu_r) ** 2) for z in r]) + np.mean([np.sum((z - mu_f) ** 2) for z in f])
    return within / (0.5 * (np.sum((mu_r - mu) ** 2) + np.sum((mu_f - mu) ** 2)))


def test_entanglement_score_hand_computed():
    # Two tight, distinct clusters: no spread within, ES = 0.
    assert M.entanglement_score(E[[0, 0]], E[[1, 1]]) == pytest.approx(0.0)
    # forget {e1, -e1}: mu_F = 0, spread 1; retain {e2, e2}: mu_R = e2, spread 0;
    # mu = e2 / 2, between = 0.5 (0.25 + 0.25) -> ES = 1 / 0.25 = 4.
    assert M.entanglement_score(torch.stack([E[0], -E[0]]), E[[1, 1]]) == pytest.approx(4.0)
    # Rows are L2-normalized first: scaling a row changes nothing.
    assert M.entanglement_score(torch.stack([3 * E[0], -0.5 * E[0]]), 7 * E[[1, 1]]) == \
        pytest.approx(4.0)


def test_entanglement_score_matches_float64_formula_and_orders_mixing():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(9, 16, generator=g, dtype=torch.float64) + 2.0
    r = torch.randn(31, 16, generator=g, dtype=torch.float64) - 2.0
    assert M.entanglement_score(f, r) == pytest.approx(_es_float64(f, r), rel=1e-10)
    separated = M.entanglement_score(f, r)
    mixed_f = torch.randn(60, 16, generator=g, dtype=torch.float64)
    mixed_r = torch.randn(300, 16, generator=g, dtype=torch.float64)
    mixed = M.entanglement_score(mixed_f, mixed_r)
    assert separated < 1.0 < 20.0 < mixed  # one distribution: between-set distance ~ 0


def test_entanglement_score_checks_inputs():
    with pytest.raises(ValueError, match="features"):
        M.entanglement_score(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="rows"):
        M.entanglement_score(torch.ones(0, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="2-D"):
        M.entanglement_score(torch.ones(3), torch.ones(2, 3))


def test_silhouette_known_values():
    # Cosine distance 0 within, 1 across: every row scores 1.
    assert M.forget_retain_silhouette(E[[0, 0]], E[[1, 1, 1]]) == pytest.approx(1.0)
    # Hand: forget {e1, e2}, retain {e1, e2}: each row's own-set mean distance (one other
    # row at distance 1) is 1, the other set's mean (0 and 1) is 0.5: s = (0.5 - 1) / 1.
    assert M.forget_retain_silhouette(E[[0, 1]], E[[0, 1]]) == pytest.approx(-0.5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 8, generator=g)
    assert abs(M.forget_retain_silhouette(x[:100], x[100:])) < 0.05


def test_linear_probe_separable_and_chance():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(20, 8, generator=g) * 0.1 + E[0, :4].repeat(2).float() * 3
    r = torch.randn(60, 8, generator=g) * 0.1 - E[0, :4].repeat(2).float() * 3
    assert M.linear_probe_accuracy(f, r) == pytest.approx(1.0)
    x = torch.randn(400, 8, generator=g)
    assert 0.35 < M.linear_probe_accuracy(x[:100], x[100:]) < 0.65
    with pytest.raises(ValueError, match="at least 2"):
        M.linear_probe_accuracy(x[:1], x[1:])


def test_rouge_l_recall():
    # LCS "the cat sat" = 3 of the reference's 6 words.
    assert M.rouge_l_recall("the cat sat", "the cat sat on the mat") == pytest.approx(0.5)
    assert M.rouge_l_recall("The cat sat on the mat.", "the cat sat on the mat") == 1.0
    assert M.rouge_l_recall("cats", "cat") == 1.0  # stemmed, as TOFU scores
    assert M.rouge_l_recall("", "the cat") == 0.0
    with pytest.raises(TypeError):
        M.rouge_l_recall(None, "x")


def test_harmonic_mean_and_tofu_parts():
    assert M.harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert M.harmonic_mean([0.2, 0.2, 0.2]) == pytest.approx(0.2)
    assert M.harmonic_mean([0.9, 0.0]) == 0.0
    for bad in ([], [float("nan")], [-0.1]):
        with pytest.raises(ValueError):
            M.harmonic_mean(bad)
    assert M.truth_ratio_utility([0.5, 2.0, 0.0]) == pytest.approx((0.5 + 0 + 1) / 3)
    assert M.normalized_answer_prob(math.log(0.6), [math.log(0.2), math.log(0.2)]) == \
        pytest.approx(0.6)
    # OpenUnlearning's probability_w_options adds 1e-10 to the denominator: with every answer
    # at a per-token probability of e^-1000 the value is 0 (it was 0.5 before 2026-12-06).
    assert M.normalized_answer_prob(-1000.0, [-1000.0]) == 0.0
    with pytest.raises(ValueError):
        M.normalized_answer_prob(0.0, [])


# ----------------------------------------------------------------------------- model level

def _tiny_setup():
    pytest.importorskip("transformers")
    from clreg_fast.unlearn.data import build_examples
    from clreg_fast.unlearn.synthetic import SyntheticConfig, make_synthetic
    from clreg_fast.unlearn.tiny_model import make_tiny_llama

    rows, tok = make_synthetic(SyntheticConfig(n_authors=4, n_forget_authors=1,
                                               n_holdout_authors=0, n_facts=3))
    examples = build_examples(rows["forget"] + rows["retain"], tok)
    model = make_tiny_llama(len(tok), seed=3, hidden_size=32, num_layers=2)
    return model, tok, examples


def test_greedy_answers_match_a_plain_argmax_loop():
    model, tok, examples = _tiny_setup()
    # Prompts of different lengths in one batch: left padding must not change the answers.
    chosen = [examples[0], examples[4], examples[7]]
    got = M.greedy_answers(model, chosen, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                           max_new_tokens=6, batch_size=3)
    with torch.no_grad():
        for ex, answer in zip(chosen, got):
            ids = M.prompt_ids(ex)
            want = []
            for _ in range(6):
                nxt = int(model(input_ids=torch.tensor([ids + want])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                want.append(nxt)
            assert answer == want


def test_utility_metrics_are_the_harmonic_mean_of_their_parts():
    model, tok, examples = _tiny_setup()
    out = M.utility_metrics(model, {"retain": examples[3:9], "world": examples[:3]}, tok,
                            pad_id=tok.pad_token_id, max_new_tokens=8)
    parts = [out[f"{s}_{k}"] for s in ("retain", "world") for k in ("prob", "rouge", "truth")]
    assert all(0.0 <= p <= 1.0 for p in parts)
    assert out["model_utility"] == pytest.approx(M.harmonic_mean(parts))
    # A model that reproduces the answers scores ROUGE-L 1 on them: feed the answer as prompt.
    assert M.answer_ids(examples[0], tok.eos_token_id) == \
        [t for t in examples[0]["labels"] if t != -100][:-1]
    with pytest.raises(ValueError, match="empty"):
        M.utility_metrics(model, {"retain": []}, tok, pad_id=0)


def test_evaluate_model_reports_the_entanglement_measures():
    model, tok, examples = _tiny_setup()
    forget = [e for e in examples if e["concept_id"] == examples[0]["concept_id"]]
    retain = [e for e in examples if e["concept_id"] != examples[0]["concept_id"]]
    m = M.evaluate_model(model, {"forget": forget, "retain": retain}, layer=1, knn_k=2,
                         pad_id=tok.pad_token_id)
    raw = m.pop("_raw")
    f, r = raw["features"]["forget"], raw["features"]["retain"]
    assert m["entanglement_score"] == pytest.approx(M.entanglement_score(f, r))
    assert m["silhouette"] == pytest.approx(M.forget_retain_silhouette(f, r))
    assert m["linear_probe_acc"] == pytest.approx(M.linear_probe_accuracy(f, r))
