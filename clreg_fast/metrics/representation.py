"""How separated forget and retain features are: the representation metrics of unlearning.

Every function takes two feature matrices, ``forget`` (Nf, D) and ``retain`` (Nr, D), as torch
tensors (CPU or GPU, any floating dtype), numpy arrays or nested lists, and returns a Python
float. Rows are L2-normalized first (a row of zeros stays zero: it has no direction), so every
metric depends on feature directions only, as cosine-based measures do. Torch math runs in
float64 on the input's device (on the first input's device when they differ; on the CPU for
Apple's MPS, which has no float64); the linear probe moves the rows to CPU numpy for
scikit-learn, which is imported only when the probe is called.

Directions (definitions, cost and sources in ``docs/representation_metrics.md``):

* ``entanglement_score``: lower = more separated (0 for tight distinct clusters; large when
  both sets come from one distribution);
* ``knn_mixing``: 0 = separated, about 1 = as mixed as a random draw;
* ``forget_retain_silhouette``: up to 1 = separated, about 0 = overlapping;
* ``linear_probe_accuracy``: 1 = linearly separable, about 0.5 = chance;
* ``mean_cosine``: lower = further apart (no fixed value for "mixed");
* ``feature_drift``: 0 = the rows kept their directions since the reference.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np
import torch

__all__ = ["entanglement_score", "knn_mixing", "forget_retain_silhouette",
           "linear_probe_accuracy", "mean_cosine", "feature_drift", "representation_metrics",
           "knn_chunk_rows", "METRIC_NAMES", "KNN_BLOCK_BYTES", "PROBE_MAX_ROWS_PER_SET"]

# Bytes of one (chunk rows x pool rows) float64 similarity block in knn_mixing: 64 MiB keeps the
# working set small on any machine while a block still amortizes the per-call overhead.
KNN_BLOCK_BYTES = 64 * 2 ** 20
# The linear probe trains on at most this many rows of each set (a seeded subsample above it).
PROBE_MAX_ROWS_PER_SET = 20_000


# --------------------------------------------------------------------------- input checks


def _features(x, name: str, device: Optional[torch.device] = None) -> torch.Tensor:
    """``x`` as a (rows, D) float64 tensor (detached), with clear errors for bad input."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a tensor, an array or nested lists of numbers, "
                            f"got {type(x).__name__}") from err
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, features), got shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has no feature columns (shape {tuple(t.shape)})")
    if device is None:
        device = t.device if t.device.type != "mps" else torch.device("cpu")
    t = t.to(device=device, dtype=torch.float64)
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(1).sum())
        raise ValueError(f"{name} has non-finite values (NaN or inf) in {bad} row(s)")
    return t


def _normalize(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(t, dim=1)


def _normalized_pair(forget, retain, min_rows: int = 1):
    """L2-normalized float64 (forget, retain) on the forget input's device, after the checks
    every two-set metric shares."""
    f = _features(forget, "forget")
    r = _features(retain, "retain", device=f.device)
    if f.shape[1] != r.shape[1]:
        raise ValueError(f"forget and retain have {f.shape[1]} and {r.shape[1]} features")
    if f.shape[0] < min_rows or r.shape[0] < min_rows:
        raise ValueError(f"needs at least {min_rows} forget and {min_rows} retain rows, got "
                         f"{f.shape[0]} and {r.shape[0]}")
    return _normalize(f), _normalize(r)


def _is_int(x) -> bool:
    """A Python or numpy integer, not a bool (a size computed with numpy is welcome)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_k(k, pool: int) -> int:
    if not _is_int(k):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= pool:
        raise ValueError(f"k must be in [1, {pool}] (the pool size), got {k}")
    return int(k)


# --------------------------------------------------------------------------- the metrics


def entanglement_score(forget, retain) -> float:
    """Entanglement Score of Zhao et al. 2024 ("What makes unlearning hard and what to do about
    it"), on L2-normalized rows ``z``::

        ES = (mean_r ||z_r - mu_R||^2 + mean_f ||z_f - mu_F||^2)
             / (0.5 (||mu_R - mu||^2 + ||mu_F - mu||^2))

    ``mu_R``, ``mu_F`` the set means and ``mu`` the mean of all Nf + Nr rows pooled (not the
    mean of the two set means: with Nr >> Nf, ``mu`` sits near ``mu_R``), as the CLReg authors'
    own analysis code computes it. Within-set spread over between-set distance: lower = better
    separated (0 for two tight distinct clusters; large when both come from one distribution).
    ``inf`` when the set means coincide but rows spread, NaN when every row is the same.
    O((Nf + Nr) D) time and memory.
    """
    zf, zr = _normalized_pair(forget, retain)
    mu_f, mu_r = zf.mean(0), zr.mean(0)
    mu = torch.cat([zf, zr]).mean(0)
    within = ((zr - mu_r) ** 2).sum(1).mean() + ((zf - mu_f) ** 2).sum(1).mean()
    between = 0.5 * (((mu_r - mu) ** 2).sum() + ((mu_f - mu) ** 2).sum())
    if between.item() == 0.0:
        return math.inf if within.item() > 0 else float("nan")
    return (within / between).item()


def knn_chunk_rows(pool_rows: int, block_bytes: int = KNN_BLOCK_BYTES) -> int:
    """Query rows per similarity block of :func:`knn_mixing`: the most whose (rows x
    ``pool_rows``) float64 block fits in ``block_bytes`` (at least 1)."""
    return max(1, int(block_bytes) // (8 * max(1, int(pool_rows))))


def _similarity_block(queries: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """(chunk, pool rows) cosine similarities of normalized rows (a seam the tests record)."""
    return queries @ pool.T


def _retain_counts(sim: torch.Tensor, n_forget: int, k: int) -> torch.Tensor:
    """Per query row: how many of its ``k`` nearest pool rows are retain rows (columns from
    ``n_forget`` on), rows tied at the k-th similarity counted in proportion. ``sim`` holds
    -inf at each query's own column."""
    values, index = sim.topk(k + 1, dim=1)  # k + 1 <= pool + 1 columns: always available
    kth = values[:, k - 1:k]
    # Every row above the k-th value, and every row tied with it, is among the top k unless the
    # tie continues past position k: then the share is exact from the top k alone.
    counts = (index[:, :k] >= n_forget).sum(1).to(torch.float64)
    crossing = torch.nonzero(values[:, k] == values[:, k - 1]).flatten()
    if crossing.numel():
        # A tie that topk cut arbitrarily: split it as a random tie-break would on average.
        s, t = sim[crossing], kth[crossing]
        above, tied = s > t, s == t
        above_retain = above[:, n_forget:].sum(1).to(torch.float64)
        tied_retain = tied[:, n_forget:].sum(1).to(torch.float64)
        counts[crossing] = above_retain + ((k - above.sum(1)).to(torch.float64) * tied_retain
                                           / tied.sum(1).to(torch.float64))
    return counts


def knn_mixing(forget, retain, k: int = 5, *, chunk_rows: Optional[int] = None,
               max_queries: Optional[int] = None, seed: int = 0) -> float:
    """How entangled forget rows are with retain rows, by cosine k-nearest neighbours.

    For each forget row, take its ``k`` nearest rows (cosine similarity) in the pool of all
    other rows (forget and retain, itself excluded) and count the retain share among them
    (rows tied at the k-th similarity count in proportion, as a random tie-break would on
    average). The mean share is divided by the retain share of that pool, ``Nr / (Nf - 1 +
    Nr)``: about 1 means forget rows are as mixed with retain rows as a random draw, 0 that
    their neighbourhoods hold no retain row. Lower = more separated.

    Exact brute force, chunked: forget rows are processed ``chunk_rows`` at a time (default
    :func:`knn_chunk_rows`, a 64 MiB float64 block), so memory is O((Nf + Nr) D + chunk_rows
    (Nf + Nr)), never an Nf x (Nf + Nr) matrix; time is O(Nf (Nf + Nr) D). The result does not
    depend on ``chunk_rows``. ``max_queries``: average over a seeded uniform subsample of that
    many forget rows (neighbours are still searched among all rows), an unbiased estimate for
    sets too large to score every row (standard error at most ``0.5 / sqrt(max_queries)`` of
    the share); None scores every row.
    """
    zf, zr = _normalized_pair(forget, retain)
    nf, nr = zf.shape[0], zr.shape[0]
    pool = torch.cat([zf, zr])  # forget rows first: pool index >= nf means a retain row
    del zf, zr  # keep one copy of the features, not two
    pool_size = nf - 1 + nr
    k = _check_k(k, pool_size)
    if chunk_rows is None:
        chunk_rows = knn_chunk_rows(nf + nr)
    elif not _is_int(chunk_rows) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be None or an int >= 1, got {chunk_rows!r}")
    queries = torch.arange(nf, device=pool.device)
    if max_queries is not None:
        if not _is_int(max_queries) or max_queries < 1:
            raise ValueError(f"max_queries must be None or an int >= 1, got {max_queries!r}")
        if max_queries < nf:
            generator = torch.Generator().manual_seed(int(seed))  # CPU: same rows on any device
            chosen = torch.randperm(nf, generator=generator)[:max_queries].sort().values
            queries = chosen.to(pool.device)
    counts = torch.empty(queries.numel(), dtype=torch.float64, device=pool.device)
    for start in range(0, queries.numel(), chunk_rows):
        rows = queries[start:start + chunk_rows]
        sim = _similarity_block(pool[rows], pool)
        sim[torch.arange(rows.numel(), device=sim.device), rows] = -math.inf  # not its own
        counts[start:start + rows.numel()] = _retain_counts(sim, nf, k)
        del sim
    # Counts are whole numbers unless a tie was split, so their float64 sum is exact in any
    # order: the same neighbours give the same value for any chunking and on CPU or GPU (a
    # mean of counts / k would round differently with each device's reduction order).
    retain_share = counts.sum().item() / (k * counts.numel())
    return retain_share / (nr / pool_size)


def forget_retain_silhouette(forget, retain) -> float:
    """Silhouette score of the forget/retain labelling under cosine distance ``1 - cos``:
    the mean over all rows of ``(b - a) / max(a, b)``, ``a`` a row's mean distance to the other
    rows of its own set and ``b`` its mean distance to the other set (0 for a row alone in its
    set). 1 = separated, about 0 = overlapping, negative = rows closer to the other set.

    Exact for any N in O((Nf + Nr) D): on unit rows the mean cosine distance from ``z`` to a set
    is ``1 - z . (sum of the set) / size``, so no pairwise matrix is formed. Equals
    scikit-learn's ``silhouette_score(X, labels, metric="cosine")`` up to float64 rounding
    (scikit-learn clips each pair's distance into [0, 2], a change of at most ~1e-16 per pair).
    """
    zf, zr = _normalized_pair(forget, retain)
    nf, nr = zf.shape[0], zr.shape[0]
    if nf + nr < 3:
        raise ValueError(f"silhouette needs at least 3 rows, got {nf + nr}")
    sum_f, sum_r = zf.sum(0), zr.sum(0)

    def scores(z, own_sum, n_own, other_sum, n_other):
        # Own-set distances exclude the row itself: subtract its self-distance 1 - |z|^2.
        own_dist = n_own - z @ own_sum - (1.0 - (z * z).sum(1))
        a = own_dist / max(n_own - 1, 1)
        b = (n_other - z @ other_sum) / n_other
        top = torch.maximum(a, b)
        s = torch.where(top > 0, (b - a) / torch.where(top > 0, top, 1.0), 0.0)
        return s if n_own > 1 else torch.zeros_like(s)

    s = torch.cat([scores(zf, sum_f, nf, sum_r, nr), scores(zr, sum_r, nr, sum_f, nf)])
    return s.mean().item()


def linear_probe_accuracy(forget, retain, folds: int = 5, seed: int = 0,
                          max_rows_per_set: Optional[int] = PROBE_MAX_ROWS_PER_SET) -> float:
    """Cross-validated balanced accuracy of a logistic-regression probe telling forget from
    retain rows (scikit-learn ``LogisticRegression(C=1, class_weight="balanced",
    max_iter=2000)``; ``StratifiedKFold`` with ``min(folds, Nf, Nr)`` shuffled folds seeded by
    ``seed``, the set sizes counted after the cap below). 1 = linearly separable, about 0.5 =
    chance; the probe's error is ``1 - accuracy``. Balanced accuracy, so a 10% forget set
    cannot score 0.9 by "always retain".

    Sets larger than ``max_rows_per_set`` rows are subsampled to that many (seeded by ``seed``,
    without replacement); None uses every row. Cost: ``folds`` fits on up to
    ``2 max_rows_per_set`` rows of D features on the CPU.
    """
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_score
    except ImportError:
        raise ImportError("linear_probe_accuracy needs scikit-learn: pip install "
                          "scikit-learn") from None

    zf, zr = _normalized_pair(forget, retain)
    if not _is_int(folds) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    if max_rows_per_set is not None and (not _is_int(max_rows_per_set)
                                         or max_rows_per_set < 2):
        raise ValueError(f"max_rows_per_set must be None or an int >= 2, got {max_rows_per_set!r}")
    if min(zf.shape[0], zr.shape[0]) < 2:
        raise ValueError("linear_probe_accuracy needs at least 2 forget and 2 retain rows")
    rng = np.random.default_rng(seed)

    def capped(z):
        x = z.cpu().numpy()
        if max_rows_per_set is not None and x.shape[0] > max_rows_per_set:
            x = x[np.sort(rng.choice(x.shape[0], max_rows_per_set, replace=False))]
        return x

    xf, xr = capped(zf), capped(zr)
    # Each fold needs a row of each set: at most as many folds as the smaller (capped) set has.
    n_splits = min(int(folds), xf.shape[0], xr.shape[0])
    x = np.concatenate([xf, xr])
    y = np.r_[np.zeros(xf.shape[0], int), np.ones(xr.shape[0], int)]
    probe = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced")
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return float(cross_val_score(probe, x, y, cv=cv, scoring="balanced_accuracy").mean())


def mean_cosine(a, b) -> float:
    """Mean cosine similarity over all pairs of rows of ``a`` and ``b``, in O((Na + Nb) D):
    the mean of all pairwise dots of unit rows is the dot of the two mean unit rows."""
    za = _features(a, "a")
    zb = _features(b, "b", device=za.device)
    if za.shape[0] == 0 or zb.shape[0] == 0:
        raise ValueError("mean_cosine needs rows in both inputs")
    if za.shape[1] != zb.shape[1]:
        raise ValueError(f"a and b have {za.shape[1]} and {zb.shape[1]} features")
    return (_normalize(za).mean(0) @ _normalize(zb).mean(0)).item()


def feature_drift(before, after) -> float:
    """Mean ``1 - cos`` between matching rows of ``before`` and ``after`` (0 = unchanged,
    1 = orthogonal on average, up to 2 = reversed): retain drift, with the retain features
    before unlearning and now. O(N D)."""
    b = _features(before, "before")
    a = _features(after, "after", device=b.device)
    if a.shape != b.shape:
        raise ValueError(f"before and after differ in shape: {tuple(b.shape)} vs {tuple(a.shape)}")
    if a.shape[0] == 0:
        raise ValueError("feature_drift needs at least one row")
    return (1 - torch.nn.functional.cosine_similarity(a, b, dim=1)).mean().item()


METRIC_NAMES = ("entanglement_score", "knn_mixing", "silhouette", "linear_probe_acc",
                "forget_retain_cos", "retain_drift")


def representation_metrics(forget, retain, reference_retain=None, *, k: int = 5,
                           names=METRIC_NAMES, seed: int = 0) -> Dict[str, float]:
    """The named metrics of one (forget, retain) pair, keyed as ``evaluate_model`` keys them.

    ``names`` picks from :data:`METRIC_NAMES`; ``retain_drift`` needs ``reference_retain`` (the
    retain features before unlearning, row for row) and is left out without it. A metric whose
    sets are too small for it (``silhouette``: 3 rows in all; ``linear_probe_acc``: 2 rows per
    set) is left out rather than raising; bad input still raises.
    """
    names = (names,) if isinstance(names, str) else tuple(names)  # not its letters
    unknown = sorted(set(names) - set(METRIC_NAMES))
    if unknown:
        raise ValueError(f"unknown metric name(s) {unknown}; choose from {METRIC_NAMES}")
    zf = _features(forget, "forget")
    zr = _features(retain, "retain", device=zf.device)
    out: Dict[str, float] = {}
    if "entanglement_score" in names:
        out["entanglement_score"] = entanglement_score(zf, zr)
    if "knn_mixing" in names:
        out["knn_mixing"] = knn_mixing(zf, zr, k=k)
    if "silhouette" in names and zf.shape[0] + zr.shape[0] >= 3:
        out["silhouette"] = forget_retain_silhouette(zf, zr)
    if "linear_probe_acc" in names and min(zf.shape[0], zr.shape[0]) >= 2:
        out["linear_probe_acc"] = linear_probe_accuracy(zf, zr, seed=seed)
    if "forget_retain_cos" in names:
        out["forget_retain_cos"] = mean_cosine(zf, zr)
    if "retain_drift" in names and reference_retain is not None:
        out["retain_drift"] = feature_drift(reference_retain, zr)
    return out
