"""clreg_fast.metrics against independent float64 computations (numpy, plain loops).

Each reference below is written from the metric's definition, row by row, never by calling the
package; the chunked kNN is also checked bit for bit against one unchunked similarity matrix.
"""
from __future__ import annotations

import math
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch

import clreg_fast.metrics as RM
from clreg_fast.metrics import representation as R

SIZES = [(1, 2, 3), (2, 1, 5), (3, 5, 1), (7, 23, 13), (17, 41, 4)]  # (Nf, Nr, D)
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _pair(nf, nr, d, seed=0, dtype=torch.float32, shift=0.4):
    g = torch.Generator().manual_seed(seed)
    f = (torch.randn(nf, d, generator=g, dtype=torch.float64) + shift).to(dtype)
    r = (torch.randn(nr, d, generator=g, dtype=torch.float64) - shift).to(dtype)
    # Rows of very different norms: a metric that forgets to normalize would show it.
    f = f * torch.linspace(0.2, 5.0, nf, dtype=torch.float64)[:, None].to(dtype)
    return f, r


def _np(x):
    return x.double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, float)


def _unit(x):
    x = _np(x)  # a row of zeros has no direction: it stays zero
    return np.array([row / np.linalg.norm(row) if np.any(row) else row for row in x])


def _cos(u, v):
    return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


# ----------------------------------------------------------------------------- references

def ref_entanglement(f, r, normalize=True, mu_of_means=False):
    f, r = (_unit(f), _unit(r)) if normalize else (_np(f), _np(r))
    mu_f = sum(f) / len(f)
    mu_r = sum(r) / len(r)
    mu = (mu_f + mu_r) / 2 if mu_of_means else sum(np.concatenate([f, r])) / (len(f) + len(r))
    within = (sum(np.sum((z - mu_r) ** 2) for z in r) / len(r)
              + sum(np.sum((z - mu_f) ** 2) for z in f) / len(f))
    between = 0.5 * (np.sum((mu_r - mu) ** 2) + np.sum((mu_f - mu) ** 2))
    return within / between


def ref_knn(f, r, k, include_self=False):
    """Per forget row: sort the similarities to every other row; the retain share of the k
    nearest with the rows tied at the k-th similarity shared in proportion."""
    f, r = _unit(f), _unit(r)
    rows = np.concatenate([f, r])
    is_retain = [False] * len(f) + [True] * len(r)
    shares = []
    for i, z in enumerate(f):
        sims = [(float(np.dot(z, other)), is_retain[j]) for j, other in enumerate(rows)
                if include_self or j != i]
        kth = sorted((s for s, _ in sims), reverse=True)[k - 1]
        above = [ret for s, ret in sims if s > kth]
        tied = [ret for s, ret in sims if s == kth]
        count = sum(above) + (k - len(above)) * sum(tied) / len(tied)
        shares.append(count / k)
    pool = len(f) - 1 + len(r)
    return float(np.mean(shares)) / (len(r) / pool)


def knn_one_matrix(f, r, k):
    """The same rule as knn_mixing on one unchunked (Nf, Nf + Nr) float64 matrix."""
    z = torch.nn.functional.normalize(torch.cat([f, r]).double(), dim=1)
    nf, nr = f.shape[0], r.shape[0]
    sim = z[:nf] @ z.T
    sim[torch.arange(nf), torch.arange(nf)] = -math.inf
    kth = sim.topk(k, dim=1).values[:, -1:]
    is_retain = torch.arange(nf + nr) >= nf
    above, tied = sim > kth, sim == kth
    count = ((above & is_retain).sum(1).double()
             + (k - above.sum(1)).double() * (tied & is_retain).sum(1).double()
             / tied.sum(1).double())
    return (count.sum().item() / (k * nf)) / (nr / (nf - 1 + nr))


def ref_silhouette(f, r):
    rows = [(z, 0) for z in _np(f)] + [(z, 1) for z in _np(r)]
    scores = []
    for i, (z, label) in enumerate(rows):
        own = [1 - _cos(z, o) for j, (o, lo) in enumerate(rows) if lo == label and j != i]
        other = [1 - _cos(z, o) for o, lo in rows if lo != label]
        if not own:
            scores.append(0.0)
            continue
        a, b = np.mean(own), np.mean(other)
        scores.append((b - a) / max(a, b) if max(a, b) > 0 else 0.0)
    return float(np.mean(scores))


def ref_mean_cosine(a, b):
    return float(np.mean([_cos(u, v) for u in _np(a) for v in _np(b)]))


def ref_drift(before, after):
    return float(np.mean([1 - _cos(u, v) for u, v in zip(_np(before), _np(after))]))


# ----------------------------------------------------------------------------- entanglement

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nf,nr,d", SIZES)
def test_entanglement_score_matches_the_float64_loop(nf, nr, d, dtype):
    f, r = _pair(nf, nr, d, seed=nf * 100 + nr, dtype=dtype)
    got = RM.entanglement_score(f, r)
    want = ref_entanglement(f, r)  # on the same (already rounded) input values
    assert isinstance(got, float)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12) or (math.isinf(want) and got == want)


def test_entanglement_score_normalizes_and_pools_all_rows_for_mu():
    f, r = _pair(9, 31, 6, seed=3)
    got = RM.entanglement_score(f, r)
    assert got == pytest.approx(ref_entanglement(f, r), rel=1e-12)
    # Mutations: without the L2 normalization, or with mu the mean of the two set means, the
    # value is a different number (so the test above would catch either).
    assert abs(ref_entanglement(f, r, normalize=False) - got) > 1e-3 * got
    assert abs(ref_entanglement(f, r, mu_of_means=True) - got) > 1e-3 * got


def test_entanglement_score_orders_separation():
    tight_f, tight_r = _pair(30, 60, 8, seed=4, shift=3.0)
    mixed_f, mixed_r = _pair(30, 60, 8, seed=4, shift=0.0)
    assert RM.entanglement_score(tight_f, tight_r) < 1.0 < RM.entanglement_score(mixed_f, mixed_r)


# ----------------------------------------------------------------------------- kNN mixing

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nf,nr,d", SIZES)
def test_knn_mixing_matches_the_float64_loop(nf, nr, d, dtype):
    f, r = _pair(nf, nr, d, seed=nf + 7 * nr, dtype=dtype)
    pool = nf - 1 + nr
    for k in sorted({1, 2, min(5, pool), pool}):
        got = RM.knn_mixing(f, r, k=k)
        assert isinstance(got, float)
        assert got == pytest.approx(ref_knn(f, r, k), rel=1e-12), k


def _tied_pair(seed):
    """Features on a coarse grid: many rows at exactly the same cosine (ties across the k-th
    position), the case topk alone would decide arbitrarily."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randint(-1, 2, (13, 3), generator=g).double()
    r = torch.randint(-1, 2, (29, 3), generator=g).double()
    f[f.abs().sum(1) == 0] = 1.0  # no zero rows
    r[r.abs().sum(1) == 0] = -1.0
    return f, r


@pytest.mark.parametrize("make", [lambda: _pair(23, 37, 5, seed=11), lambda: _tied_pair(12)],
                         ids=["continuous", "ties"])
def test_chunked_knn_equals_one_matrix_exactly(make):
    f, r = make()
    for k in (1, 3, 8):
        want = knn_one_matrix(f, r, k)
        assert want == pytest.approx(ref_knn(f, r, k), rel=1e-12)
        for chunk in (1, 2, 5, 22, 23, 1000, None):
            assert RM.knn_mixing(f, r, k=k, chunk_rows=chunk) == want, (k, chunk)


def test_knn_mixing_is_the_exact_neighbour_count_ratio():
    """Without ties the value is (retain neighbours in all) / (k Nf) / pool share, rounded once:
    a mean of per-row shares would round with the reduction order, so a CUDA run (another
    order) could differ from the CPU in the last bit."""
    for seed in range(6):
        nf, nr, k = 30 + seed, 50 + 2 * seed, 5
        f, r = _pair(nf, nr, 6, seed=70 + seed)
        z = torch.nn.functional.normalize(torch.cat([f, r]).double(), dim=1)
        sim = z[:nf] @ z.T
        sim[torch.arange(nf), torch.arange(nf)] = -math.inf
        total = int((sim.topk(k, dim=1).indices >= nf).sum())
        assert RM.knn_mixing(f, r, k=k) == (total / (k * nf)) / (nr / (nf - 1 + nr)), seed


def test_knn_mixing_excludes_each_row_itself():
    f, r = _pair(6, 9, 4, seed=13)
    got = RM.knn_mixing(f, r, k=2)
    # Mutation: a forget row counted as its own nearest neighbour lowers the retain share.
    assert got == pytest.approx(ref_knn(f, r, 2))
    assert ref_knn(f, r, 2, include_self=True) != pytest.approx(got)


def test_knn_mixing_query_subsample_is_seeded_and_exact_on_its_rows():
    f, r = _pair(40, 50, 4, seed=14)
    full = RM.knn_mixing(f, r, k=3)
    assert RM.knn_mixing(f, r, k=3, max_queries=40) == full
    assert RM.knn_mixing(f, r, k=3, max_queries=1000) == full
    sub = RM.knn_mixing(f, r, k=3, max_queries=10, seed=5)
    assert sub == RM.knn_mixing(f, r, k=3, max_queries=10, seed=5, chunk_rows=3)
    # The same 10 rows scored by the loop reference (each still searched in the full pool).
    chosen = torch.randperm(40, generator=torch.Generator().manual_seed(5))[:10]
    unit = torch.nn.functional.normalize(torch.cat([f, r]).double(), dim=1)
    shares = []
    for i in chosen.tolist():
        sims = unit[i] @ unit.T
        sims[i] = -math.inf
        top = sims.topk(3).indices
        shares.append(float((top >= 40).double().mean()))
    assert sub == pytest.approx(np.mean(shares) / (50 / 89), rel=1e-12)
    assert sub != RM.knn_mixing(f, r, k=3, max_queries=10, seed=6)


def test_knn_mixing_at_100k_rows_per_side_uses_small_blocks(monkeypatch):
    """100,000 forget and 100,000 retain rows: each similarity block stays within
    KNN_BLOCK_BYTES (an Nf x (Nf + Nr) float64 matrix would be 160 GB) and the peak RSS grows
    far less than one such matrix. The query subsample keeps the O(Nf N) time CI-sized; the
    blocks span all 200,000 rows either way."""
    n, d = 100_000, 4
    g = torch.Generator().manual_seed(15)
    x = torch.randn(2 * n, d, generator=g)
    shapes = []
    block = R._similarity_block

    def recording(queries, pool):
        shapes.append((queries.shape[0], pool.shape[0]))
        return block(queries, pool)

    monkeypatch.setattr(R, "_similarity_block", recording)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    value = RM.knn_mixing(x[:n], x[n:], k=5, max_queries=600)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    assert abs(value - 1.0) < 0.1  # one distribution: as mixed as a random draw
    assert sum(rows for rows, _ in shapes) == 600
    assert all(pool == 2 * n for _, pool in shapes)
    assert max(rows for rows, _ in shapes) == RM.knn_chunk_rows(2 * n)
    assert max(rows * pool * 8 for rows, pool in shapes) <= RM.KNN_BLOCK_BYTES
    assert grown < 512 * 2 ** 20  # the features themselves are 6.4 MB; one block 64 MiB


def test_knn_chunk_rows_bounds_the_block():
    assert RM.knn_chunk_rows(200_000) == RM.KNN_BLOCK_BYTES // (8 * 200_000)
    assert RM.knn_chunk_rows(10) == RM.KNN_BLOCK_BYTES // 80
    assert RM.knn_chunk_rows(10 ** 12) == 1


# ----------------------------------------------------------------------------- silhouette

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nf,nr,d", SIZES)
def test_silhouette_matches_the_pairwise_loop(nf, nr, d, dtype):
    f, r = _pair(nf, nr, d, seed=nf * 3 + nr, dtype=dtype)
    if nf + nr < 3:
        with pytest.raises(ValueError, match="3 rows"):
            RM.forget_retain_silhouette(f, r)
        return
    assert RM.forget_retain_silhouette(f, r) == pytest.approx(ref_silhouette(f, r), abs=1e-12)


def test_silhouette_equals_scikit_learn_cosine():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    for seed, (nf, nr, d) in enumerate([(5, 8, 3), (19, 44, 12), (1, 6, 4)]):
        f, r = _pair(nf, nr, d, seed=20 + seed)
        x = np.concatenate([_np(f), _np(r)])
        labels = np.r_[np.zeros(nf, int), np.ones(nr, int)]
        want = sklearn_metrics.silhouette_score(x, labels, metric="cosine")
        got = RM.forget_retain_silhouette(f, r)
        assert got == pytest.approx(want, abs=1e-12)
        # Mutation: Euclidean distances on the raw rows give another number.
        assert abs(sklearn_metrics.silhouette_score(x, labels) - got) > 1e-4


def test_silhouette_known_values():
    e = torch.eye(3, dtype=torch.float64)
    assert RM.forget_retain_silhouette(e[[0, 0]], e[[1, 1, 1]]) == pytest.approx(1.0)
    # forget {e1, e2}, retain {e1, e2}: own mean distance 1, other 0.5 -> -0.5 for every row.
    assert RM.forget_retain_silhouette(e[[0, 1]], e[[0, 1]]) == pytest.approx(-0.5)


def test_zero_rows_have_no_direction():
    """A row of zeros stays zero: cosine 0 with every row, cosine distance 1 to the others (and
    0 to itself), as scikit-learn's cosine distance treats it."""
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    f, r = _pair(6, 9, 4, seed=80, dtype=torch.float64)
    f[2], r[4], r[7] = 0.0, 0.0, 0.0
    x = np.concatenate([_np(f), _np(r)])
    labels = np.r_[np.zeros(6, int), np.ones(9, int)]
    want = sklearn_metrics.silhouette_score(x, labels, metric="cosine")
    assert RM.forget_retain_silhouette(f, r) == pytest.approx(want, abs=1e-12)
    assert RM.entanglement_score(f, r) == pytest.approx(ref_entanglement(f, r), rel=1e-12)
    for k in (1, 4, 14):
        assert RM.knn_mixing(f, r, k=k) == pytest.approx(ref_knn(f, r, k), rel=1e-12), k
    assert RM.mean_cosine(f, r) == pytest.approx(float(np.mean(_unit(f) @ _unit(r).T)), abs=1e-12)
    assert RM.feature_drift(r, r) == pytest.approx(2 / 9)  # the two zero rows: cosine 0
    zeros = torch.zeros(3, 4)
    assert RM.knn_mixing(zeros, zeros, k=2) == pytest.approx(1.0)  # every row tied
    assert RM.forget_retain_silhouette(zeros, zeros) == pytest.approx(0.0)


# ----------------------------------------------------------------------------- probe

def test_linear_probe_equals_the_direct_scikit_learn_pipeline():
    sk_lm = pytest.importorskip("sklearn.linear_model")
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    f, r = _pair(11, 37, 6, seed=30, shift=0.3)
    x = np.concatenate([_unit(f), _unit(r)])
    y = np.r_[np.zeros(11, int), np.ones(37, int)]
    want = cross_val_score(sk_lm.LogisticRegression(C=1.0, max_iter=2000,
                                                    class_weight="balanced"),
                           x, y, cv=StratifiedKFold(5, shuffle=True, random_state=3),
                           scoring="balanced_accuracy").mean()
    assert RM.linear_probe_accuracy(f, r, seed=3) == pytest.approx(want, abs=1e-12)
    assert RM.linear_probe_accuracy(f.bfloat16(), r.bfloat16(), seed=3) == pytest.approx(
        RM.linear_probe_accuracy(f.bfloat16().double(), r.bfloat16().double(), seed=3))


def test_linear_probe_separable_chance_and_row_cap():
    pytest.importorskip("sklearn")
    sep_f, sep_r = _pair(20, 60, 8, seed=31, shift=3.0)
    assert RM.linear_probe_accuracy(sep_f, sep_r) == pytest.approx(1.0)
    mixed_f, mixed_r = _pair(150, 150, 8, seed=32, shift=0.0)
    full = RM.linear_probe_accuracy(mixed_f, mixed_r, max_rows_per_set=None)
    assert 0.3 < full < 0.7
    capped = RM.linear_probe_accuracy(mixed_f, mixed_r, max_rows_per_set=40)
    assert capped == RM.linear_probe_accuracy(mixed_f, mixed_r, max_rows_per_set=40)
    assert capped != full  # the cap is applied (a seeded 40 + 40 row subsample)
    assert RM.linear_probe_accuracy(mixed_f, mixed_r, max_rows_per_set=150) == full
    # A cap below `folds` rows: as many folds as the capped sets allow (scikit-learn refused).
    assert 0.0 <= RM.linear_probe_accuracy(sep_f, sep_r, max_rows_per_set=3) <= 1.0


# ----------------------------------------------------------------------------- cosine, drift

@pytest.mark.parametrize("dtype", DTYPES)
def test_mean_cosine_and_drift_match_loops(dtype):
    f, r = _pair(7, 12, 5, seed=40, dtype=dtype)
    assert RM.mean_cosine(f, r) == pytest.approx(ref_mean_cosine(f, r), abs=1e-12)
    g = torch.Generator().manual_seed(41)
    after = (r.double() + 0.3 * torch.randn(r.shape, generator=g, dtype=torch.float64)).to(dtype)
    assert RM.feature_drift(r, after) == pytest.approx(ref_drift(r, after), abs=1e-12)
    assert RM.feature_drift(r, r * 4) == pytest.approx(0.0, abs=1e-12)
    assert RM.feature_drift(r, -r) == pytest.approx(2.0)


def test_representation_metrics_bundles_the_functions():
    pytest.importorskip("sklearn")
    f, r = _pair(8, 15, 6, seed=50)
    ref = r + 0.1
    out = RM.representation_metrics(f, r, reference_retain=ref, k=3)
    assert out == {"entanglement_score": RM.entanglement_score(f, r),
                   "knn_mixing": RM.knn_mixing(f, r, k=3),
                   "silhouette": RM.forget_retain_silhouette(f, r),
                   "linear_probe_acc": RM.linear_probe_accuracy(f, r),
                   "forget_retain_cos": RM.mean_cosine(f, r),
                   "retain_drift": RM.feature_drift(ref, r)}
    assert set(RM.representation_metrics(f, r, names=("knn_mixing",))) == {"knn_mixing"}
    assert set(RM.representation_metrics(f, r, names="knn_mixing")) == {"knn_mixing"}
    assert "retain_drift" not in RM.representation_metrics(f, r, names=("retain_drift",))
    # Too few rows for the probe: left out, not an error.
    assert "linear_probe_acc" not in RM.representation_metrics(f[:1], r, k=1)
    with pytest.raises(ValueError, match="unknown metric"):
        RM.representation_metrics(f, r, names=("knn",))


# ----------------------------------------------------------------------------- input checks

def test_input_checks():
    ok = torch.randn(4, 3)
    cases = [
        (lambda: RM.entanglement_score(torch.randn(3), ok), ValueError, "2-D"),
        (lambda: RM.knn_mixing(ok, torch.randn(4, 5)), ValueError, "features"),
        (lambda: RM.mean_cosine(ok, torch.randn(4, 5)), ValueError, "features"),
        (lambda: RM.entanglement_score(torch.randn(0, 3), ok), ValueError, "rows"),
        (lambda: RM.knn_mixing(torch.randn(4, 0), torch.randn(4, 0)), ValueError, "no feature"),
        (lambda: RM.knn_mixing(ok, ok, k=8), ValueError, "k must be in \\[1, 7\\]"),
        (lambda: RM.knn_mixing(ok, ok, k=0), ValueError, "k must be"),
        (lambda: RM.knn_mixing(ok, ok, k=2.0), TypeError, "k must be an int"),
        (lambda: RM.knn_mixing(ok, ok, chunk_rows=0), ValueError, "chunk_rows"),
        (lambda: RM.knn_mixing(ok, ok, max_queries=0), ValueError, "max_queries"),
        (lambda: RM.forget_retain_silhouette(ok[:1], ok[:1]), ValueError, "3 rows"),
        (lambda: RM.linear_probe_accuracy(ok[:1], ok), ValueError, "at least 2"),
        (lambda: RM.linear_probe_accuracy(ok, ok, folds=1), ValueError, "folds"),
        (lambda: RM.feature_drift(ok, ok[:3]), ValueError, "shape"),
        (lambda: RM.feature_drift(ok[:0], ok[:0]), ValueError, "at least one row"),
        (lambda: RM.knn_mixing(ok.bool(), ok), TypeError, "real numbers"),
        (lambda: RM.knn_mixing(["a", "b"], ok), TypeError, "must be"),
    ]
    nan = ok.clone()
    nan[1, 2] = float("nan")
    inf = ok.clone()
    inf[3, 0] = float("inf")
    cases += [(lambda: RM.knn_mixing(nan, ok), ValueError, "non-finite values .* 1 row"),
              (lambda: RM.entanglement_score(ok, inf), ValueError, "retain has non-finite")]
    for call, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            call()


def test_accepts_numpy_lists_and_integer_rows():
    f = [[1, 0], [1, 1]]
    r = np.array([[0.0, 1.0], [-1.0, 0.0], [0.0, -2.0]])
    assert RM.knn_mixing(f, r, k=1) == pytest.approx(ref_knn(f, r, 1))
    # Sizes computed with numpy are integers too.
    two = np.int64(2)
    assert RM.knn_mixing(f, r, k=two, chunk_rows=two, max_queries=two) == RM.knn_mixing(f, r, k=2)
    assert 0 <= RM.linear_probe_accuracy(r, r, folds=two, max_rows_per_set=two) <= 1
    with pytest.raises(ValueError, match="chunk_rows"):
        RM.knn_mixing(f, r, k=1, chunk_rows=np.bool_(True))
    assert RM.entanglement_score(np.float32(f), r) == pytest.approx(ref_entanglement(f, r))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_inputs_give_the_cpu_values():
    f, r = _pair(300, 700, 32, seed=60, dtype=torch.bfloat16)
    fc, rc = f.cuda(), r.cuda()
    assert RM.knn_mixing(fc, rc, k=5) == RM.knn_mixing(f, r, k=5)
    assert RM.entanglement_score(fc, rc) == pytest.approx(RM.entanglement_score(f, r), rel=1e-12)
    assert RM.forget_retain_silhouette(fc, rc) == pytest.approx(
        RM.forget_retain_silhouette(f, r), abs=1e-12)
    assert RM.mean_cosine(fc, rc) == pytest.approx(RM.mean_cosine(f, r), abs=1e-12)
    assert RM.feature_drift(rc, rc * 2) == pytest.approx(0.0, abs=1e-12)
    # Exact kNN at the full scale: every one of 100,000 forget rows against 200,000 rows.
    x = torch.randn(200_000, 16, device="cuda")
    assert abs(RM.knn_mixing(x[:100_000], x[100_000:], k=5) - 1.0) < 0.02


@pytest.mark.slow  # a fresh interpreter importing torch: about 5 s on 2 busy cores
def test_importing_the_package_does_not_import_scikit_learn():
    code = ("import sys, torch\nimport clreg_fast, clreg_fast.metrics as m\n"
            "m.forget_retain_silhouette(torch.randn(5, 3), torch.randn(4, 3))\n"
            "m.knn_mixing(torch.randn(5, 3), torch.randn(4, 3))\n"
            "assert 'sklearn' not in sys.modules, 'sklearn imported'\n"
            "m.representation_metrics(torch.randn(5, 3), torch.randn(4, 3), "
            "names=('entanglement_score',))\nassert 'sklearn' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
