"""Unlearning objectives against small hand-checked cases."""
import math

import pytest
import torch

from clreg_fast import clreg_loss_reference
from clreg_fast.unlearn import methods as M

LOG4 = math.log(4.0)


def uniform_case():
    """Zero logits over V=4: every answer token costs log 4."""
    logits = torch.zeros(2, 4, 4)
    labels = torch.tensor([[-100, -100, 1, 2],    # 2 answer tokens after the shift
                           [-100, 3, 0, -100]])   # 2 answer tokens
    return logits, labels


def test_sequence_nll_uniform():
    logits, labels = uniform_case()
    nll, n = M.sequence_nll(logits, labels)
    torch.testing.assert_close(nll, torch.tensor([2 * LOG4, 2 * LOG4]))
    assert n.tolist() == [2, 2]


def test_sequence_nll_uses_the_causal_shift():
    # V=2; position 0 predicts the label at position 1 with p(token 1) = 3/4.
    logits = torch.zeros(1, 3, 2)
    logits[0, 0] = torch.tensor([0.0, math.log(3.0)])
    labels = torch.tensor([[-100, 1, -100]])
    nll, n = M.sequence_nll(logits, labels)
    torch.testing.assert_close(nll, torch.tensor([-math.log(0.75)]))
    assert n.tolist() == [1]
    # the label at position 0 is never predicted (nothing precedes it)
    nll0, n0 = M.sequence_nll(logits, torch.tensor([[1, -100, -100]]))
    assert n0.tolist() == [0] and nll0.item() == 0.0


def test_nll_gradascent_graddiff():
    logits, labels = uniform_case()
    assert M.nll_loss(logits, labels).item() == pytest.approx(LOG4)
    assert M.nll_loss(logits, labels, normalizer=8).item() == pytest.approx(4 * LOG4 / 8)
    assert M.gradascent_loss(logits, labels).item() == pytest.approx(-LOG4)
    retain_logits = torch.zeros(1, 3, 4)
    retain_logits[0, 0, 2] = math.log(3.0)  # p(2) = 3 / 6 = 1/2 at position 0
    retain_labels = torch.tensor([[-100, 2, -100]])
    value = M.graddiff_loss(logits, labels, retain_logits, retain_labels, gamma=2.0, alpha=0.5)
    assert value.item() == pytest.approx(-2 * LOG4 + 0.5 * math.log(2.0))


def test_npo_hand_values_and_gradient():
    beta = 0.1
    nll = torch.tensor([2.0, 1.0], requires_grad=True)
    ref = torch.tensor([1.0, 1.0])
    loss = M.npo_loss(nll, ref, beta)
    # -(2/beta) log sigmoid(beta (nll - ref)) = (2/beta) log(1 + exp(-beta (nll - ref)))
    expected = ((2 / beta) * math.log1p(math.exp(-beta * 1.0))
                + (2 / beta) * math.log(2.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/dx = -2 (1 - sigmoid(beta x)) / B
    sig = 1 / (1 + math.exp(-beta))
    torch.testing.assert_close(nll.grad, torch.tensor([-2 * (1 - sig) / 2, -2 * 0.5 / 2]))
    # equal model and reference: 2/beta log 2 (= 13.86 at beta 0.1), the NPO starting value
    assert M.npo_loss(ref, ref, beta).item() == pytest.approx(20 * math.log(2.0), rel=1e-6)
    assert M.npo_loss(ref, ref, beta, normalizer=4).item() == pytest.approx(10 * math.log(2.0),
                                                                            rel=1e-6)


def test_simnpo_hand_values():
    beta, delta = 4.5, 0.5
    nll = torch.tensor([6.0, 1.0])
    n = torch.tensor([3, 0])  # an empty answer counts as one token (no division by zero)
    loss = M.simnpo_loss(nll, n, beta, delta)
    term = lambda x: -(2 / beta) * math.log(1 / (1 + math.exp(-beta * x)))  # noqa: E731
    assert loss.item() == pytest.approx((term(2.0 - delta) + term(1.0 - delta)) / 2, rel=1e-6)


def test_control_vector_and_masked_mse():
    c = M.rmu_control_vector(16, steering=6.5, seed=3)
    assert c.norm().item() == pytest.approx(6.5, rel=1e-6)
    assert bool((c >= 0).all())
    torch.testing.assert_close(c, M.rmu_control_vector(16, 6.5, seed=3), rtol=0, atol=0)
    assert not torch.equal(c, M.rmu_control_vector(16, 6.5, seed=4))

    hidden = torch.tensor([[[1., 1.], [3., 3.], [2., 0.]],
                           [[0., 2.], [9., 9.], [9., 9.]]])
    mask = torch.tensor([[True, False, True], [True, False, False]])
    target = torch.zeros(2)
    # sequence 0: tokens 0 and 2 give mean_D 1 and 2 -> 1.5; sequence 1: token 0 gives 2
    assert M.masked_token_mse(hidden, target, mask).item() == pytest.approx(1.75)
    assert M.masked_token_mse(hidden, target, mask, normalizer=7).item() == pytest.approx(3.5 / 7)
    ref = hidden.clone()
    ref[0, 0] = torch.tensor([0., 0.])
    # only token (0, 0) differs: (1 + 1) / 2 = 1 averaged with token (0, 2) = 0 -> 0.5, then / 2
    assert M.masked_token_mse(hidden, ref, mask).item() == pytest.approx(0.25)
    loss = M.rmu_loss(hidden, mask, target, hidden, ref, mask, gamma=2.0, alpha=10.0)
    assert loss.item() == pytest.approx(2 * 1.75 + 10 * 0.25)


def test_clreg_term_matches_reference_and_falls_back():
    torch.manual_seed(0)
    forget, retain = torch.randn(6, 8), torch.randn(5, 8)
    w, b = torch.randn(4, 8), torch.randn(4)
    labels = torch.tensor([0, 1, 0, 2, 1, 3])
    loss, info = M.clreg_term(forget, labels, retain, w, b, temperature=0.2)
    torch.testing.assert_close(loss, clreg_loss_reference(forget, retain, w, b, labels=labels,
                                                          temperature=0.2))
    assert info == {"clreg_fallback": 0.0, "clreg_skipped": 0.0}

    distinct = torch.arange(6)
    loss, info = M.clreg_term(forget, distinct, retain, temperature=0.2)
    torch.testing.assert_close(loss, clreg_loss_reference(forget, retain, temperature=0.2))
    assert info["clreg_fallback"] == 1.0
    loss, info = M.clreg_term(forget, distinct, retain, fallback="skip")
    assert loss is None and info["clreg_skipped"] == 1.0
    loss, info = M.clreg_term(forget[:1], labels[:1], retain)
    assert loss is None and info["clreg_skipped"] == 1.0
    with pytest.raises(ValueError, match="fallback"):
        M.clreg_term(forget, labels, retain, fallback="ignore")


def test_clreg_term_extra_negatives_are_more_retain_columns():
    torch.manual_seed(1)
    forget, retain, queued = torch.randn(6, 8), torch.randn(5, 8), torch.randn(7, 8)
    labels = torch.tensor([0, 1, 0, 2, 1, 3])
    queued = torch.nn.functional.normalize(queued, dim=1)  # queue rows: normalized, no grad
    loss, _ = M.clreg_term(forget, labels, retain, temperature=0.2, extra_negatives=queued)
    expected = clreg_loss_reference(forget, torch.cat([retain, queued]), labels=labels,
                                    temperature=0.2)
    torch.testing.assert_close(loss, expected)
    assert float(loss) > float(M.clreg_term(forget, labels, retain, temperature=0.2)[0]) + 1e-3
    # an empty queue (the first step) is no queue
    empty, _ = M.clreg_term(forget, labels, retain, temperature=0.2,
                            extra_negatives=queued[:0])
    torch.testing.assert_close(empty, clreg_loss_reference(forget, retain, labels=labels,
                                                           temperature=0.2))


def test_bad_arguments():
    with pytest.raises(ValueError, match="beta"):
        M.npo_loss(torch.zeros(2), torch.zeros(2), beta=0)
    with pytest.raises(ValueError, match="same shape"):
        M.npo_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="logits must be"):
        M.sequence_nll(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        M.masked_token_mse(torch.zeros(1, 2, 3), torch.zeros(3), torch.ones(1, 3, dtype=torch.bool))
