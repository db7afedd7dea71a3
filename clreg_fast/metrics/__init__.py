"""Representation metrics of unlearning: how separated forget and retain features are.

* :func:`entanglement_score` -- Zhao et al. 2024's within/between-set variance ratio (lower =
  more separated);
* :func:`knn_mixing` -- retain share of each forget row's cosine k nearest neighbours, over the
  share a random draw would give (0 = separated, about 1 = mixed); chunked, never N x N;
* :func:`forget_retain_silhouette` -- cosine silhouette of the forget/retain labelling, exact in
  O(N D);
* :func:`linear_probe_accuracy` -- cross-validated balanced accuracy of a logistic probe;
* :func:`mean_cosine`, :func:`feature_drift` -- mean forget/retain cosine, retain drift;
* :func:`representation_metrics` -- several of them at once, keyed as ``evaluate_model`` does.

Definitions, directions, cost and sources: ``docs/representation_metrics.md``. Importing this
package imports torch and numpy only (scikit-learn is imported by the linear probe when called).
"""
from clreg_fast.metrics.representation import (KNN_BLOCK_BYTES, METRIC_NAMES,
                                               PROBE_MAX_ROWS_PER_SET, entanglement_score,
                                               feature_drift, forget_retain_silhouette,
                                               knn_chunk_rows, knn_mixing, linear_probe_accuracy,
                                               mean_cosine, representation_metrics)

__all__ = ["entanglement_score", "knn_mixing", "forget_retain_silhouette",
           "linear_probe_accuracy", "mean_cosine", "feature_drift", "representation_metrics",
           "knn_chunk_rows", "METRIC_NAMES", "KNN_BLOCK_BYTES", "PROBE_MAX_ROWS_PER_SET"]
