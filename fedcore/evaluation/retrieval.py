"""Frozen-feature evaluation: embeddings of an encoder, kNN retrieval accuracy and a linear probe.

FASSL (Rehman et al., "Exploring Federated Self-Supervised Learning for General Purpose Audio Understanding",
ICASSP 2024 Workshops, arXiv:2402.02889) scores a federated self-supervised encoder by "audio retrieval" on its
frozen features: nearest neighbours in embedding space. A logistic-regression probe on the same frozen features
is the other standard frozen-feature protocol (linear evaluation). The kNN classifier follows
Wu et al., "Unsupervised feature learning via non-parametric instance discrimination", CVPR 2018,
arXiv:1805.01978, §3.4: cosine similarity s_i = cos(v_i, f̂) between a query f̂ and every index row v_i, the
top-k rows vote for their labels. Departure: Wu et al. weight each vote by exp(s_i / τ); here every neighbour has
one vote and the summed similarity only breaks ties (then the smaller label), which keeps the result hand-checkable
and free of a temperature.

:func:`stratified_holdout` draws a seeded, label-stratified split of a labelled set (e.g. validation queries held
out of a retrieval index).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedcore.evaluation.metrics import _check_batch_size, predict

#: Queries per block of the kNN similarity matrix; memory is O(chunk_size · len(index)).
KNN_CHUNK_SIZE = 1024


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _describe(value: object) -> str:
    """Shape and dtype of a tensor, or the repr of anything else (for error messages)."""
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)!r}, {value.dtype}"
    return repr(value)


def _check_labelled(where: str, names: tuple[str, str], features: torch.Tensor, labels: torch.Tensor) -> None:
    """Check a non-empty ``(n, d)`` floating tensor ``features`` and its ``(n,)`` integer ``labels``."""
    if (
        not isinstance(features, torch.Tensor)
        or features.ndim != 2
        or features.shape[0] == 0
        or not features.is_floating_point()
    ):
        raise ValueError(
            f"{where}: '{names[0]}' must be a non-empty 2-D floating-point tensor (n, d). Got {_describe(features)}."
        )
    if (
        not isinstance(labels, torch.Tensor)
        or labels.shape != features.shape[:1]
        or labels.is_floating_point()
        or labels.is_complex()
        or labels.dtype == torch.bool
    ):
        raise ValueError(
            f"{where}: '{names[1]}' must be an integer tensor (n,) with n = {features.shape[0]}. "
            f"Got {_describe(labels)}."
        )


def embed(encoder: nn.Module, features: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Embeddings of ``encoder`` on ``features``, in eval mode and under :func:`torch.inference_mode`.

    Parameters
    ----------
    encoder : torch.nn.Module
        Maps ``(n, 1, n_mels, frames)`` float32 to ``(n, d)`` (e.g. a model whose ``classifier`` is
        ``nn.Identity``); its training mode is restored afterwards.
    features : Tensor
        Log-mel ``(n, 1, n_mels, frames)`` float32, n >= 1 (batches are moved to the encoder's device).
    batch_size : int
        Examples per forward pass (>= 1).

    Returns
    -------
    Tensor
        Embeddings ``(n, d)`` float32 on CPU.

    Raises
    ------
    ValueError
        If ``features`` is not a non-empty 4-D tensor, ``batch_size`` < 1 or the encoder's output is not 2-D.
    """
    if not isinstance(features, torch.Tensor) or features.ndim != 4 or features.shape[0] == 0:
        raise ValueError(
            f"embed: 'features' must be a non-empty tensor (n, 1, n_mels, frames). Got {_describe(features)}."
        )
    _check_batch_size("embed", batch_size)
    embeddings = predict(encoder, features, batch_size)
    if embeddings.ndim != 2:
        raise ValueError(f"embed: 'encoder' must map features to (n, d). Got output {tuple(embeddings.shape)!r}.")
    return embeddings


def knn_accuracy(
    index: torch.Tensor,
    index_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    ks: Sequence[int] = (1, 20),
    *,
    chunk_size: int = KNN_CHUNK_SIZE,
) -> dict[int, float]:
    """Top-1 accuracy of cosine k-nearest-neighbour classification of ``queries`` against ``index``.

    Rows are L2-normalised (an all-zero row stays zero, so its similarity to everything is 0) and compared in
    float64. Each query's neighbours are the first k index rows in the order of a stable descending sort of its
    similarities, so equal similarities prefer the lower index row. The prediction is the label with the most
    votes among the k neighbours; a tie goes to the tied label with the larger summed similarity, then to the
    smaller label.

    Parameters
    ----------
    index : Tensor
        Reference embeddings ``(n, d)``, floating point, n >= 1.
    index_labels : Tensor
        Integer labels ``(n,)`` of ``index``.
    queries : Tensor
        Query embeddings ``(m, d)``, floating point, m >= 1.
    query_labels : Tensor
        Integer labels ``(m,)`` of ``queries``.
    ks : sequence of int, default (1, 20)
        Neighbour counts (>= 1); a k above n uses all n index rows.
    chunk_size : int, default :data:`KNN_CHUNK_SIZE`
        Queries per block; memory is O(chunk_size · n). The result does not depend on it.

    Returns
    -------
    dict of int to float
        Accuracy in [0, 1] for each k of ``ks`` (keyed by k as given, before clipping to n).

    Raises
    ------
    ValueError
        If a tensor is not as described, the dimensions differ, ``ks`` is empty or holds a k < 1, or
        ``chunk_size`` < 1.
    """
    _check_labelled("knn_accuracy", ("index", "index_labels"), index, index_labels)
    _check_labelled("knn_accuracy", ("queries", "query_labels"), queries, query_labels)
    if queries.shape[1] != index.shape[1]:
        raise ValueError(
            f"knn_accuracy: 'queries' must have d = {index.shape[1]} columns like 'index'. Got {queries.shape[1]!r}."
        )
    ks = list(ks)
    if not ks or not all(_is_int(k) and k >= 1 for k in ks):
        raise ValueError(f"knn_accuracy: 'ks' must be a non-empty sequence of ints >= 1. Got {ks!r}.")
    if not _is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"knn_accuracy: 'chunk_size' must be an int >= 1. Got {chunk_size!r}.")

    # classes ascending (a vote tie left after the sums goes to the first column: the smaller label);
    # neighbour_class[i] is the column of index row i
    classes, neighbour_class = torch.unique(index_labels.cpu(), return_inverse=True)
    bank = F.normalize(index.detach().cpu().double(), dim=1)
    probes = F.normalize(queries.detach().cpu().double(), dim=1)
    targets = query_labels.cpu()
    k_max = min(max(ks), bank.shape[0])
    hits = dict.fromkeys(ks, 0)  # distinct ks, in order
    for start in range(0, probes.shape[0], chunk_size):
        similarity = probes[start : start + chunk_size] @ bank.T
        top_similarity, top_rows = torch.sort(similarity, dim=1, descending=True, stable=True)
        top_similarity, top_rows = top_similarity[:, :k_max], top_rows[:, :k_max]
        votes = F.one_hot(neighbour_class[top_rows], num_classes=len(classes)).double()  # (chunk, k_max, classes)
        chunk_targets = targets[start : start + chunk_size]
        for k in hits:  # a k above k_max slices all k_max neighbours
            counts = votes[:, :k].sum(dim=1)
            summed = (votes[:, :k] * top_similarity[:, :k, None]).sum(dim=1)
            predicted = classes[_vote(counts, summed)]
            hits[k] += int((predicted == chunk_targets).sum())
    return {k: hits[k] / probes.shape[0] for k in ks}


def _vote(counts: torch.Tensor, summed: torch.Tensor) -> torch.Tensor:
    """Column of the most votes per row, ties to the larger summed similarity, then to the first column."""
    tied = counts == counts.max(dim=1, keepdim=True).values
    score = summed.masked_fill(~tied, -math.inf)
    best = tied & (score == score.max(dim=1, keepdim=True).values)
    return best.to(torch.int64).argmax(dim=1)  # argmax returns the first maximal index


def linear_probe_accuracy(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    c: float = 1.0,
    max_iter: int = 1000,
) -> float:
    """Test accuracy of a logistic-regression probe on standardised frozen features.

    Features are standardised with the training set's mean and standard deviation
    (:class:`sklearn.preprocessing.StandardScaler`), then :class:`sklearn.linear_model.LogisticRegression`
    (L2, lbfgs, deterministic) is fitted on the training set. A training set with one class predicts that class.

    Parameters
    ----------
    train : Tensor
        Training features ``(n, d)``, floating point, n >= 1.
    train_labels : Tensor
        Integer labels ``(n,)``.
    test : Tensor
        Test features ``(m, d)``, floating point, m >= 1.
    test_labels : Tensor
        Integer labels ``(m,)``.
    c : float, default 1.0
        Inverse L2 regularisation strength (> 0).
    max_iter : int, default 1000
        Iterations of lbfgs (>= 1).

    Returns
    -------
    float
        Share of test examples classified correctly, in [0, 1].

    Raises
    ------
    ValueError
        If a tensor is not as described, the dimensions differ, ``c`` <= 0 or ``max_iter`` < 1.
    """
    _check_labelled("linear_probe_accuracy", ("train", "train_labels"), train, train_labels)
    _check_labelled("linear_probe_accuracy", ("test", "test_labels"), test, test_labels)
    if test.shape[1] != train.shape[1]:
        raise ValueError(
            f"linear_probe_accuracy: 'test' must have d = {train.shape[1]} columns like 'train'. "
            f"Got {test.shape[1]!r}."
        )
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not (math.isfinite(c) and c > 0):
        raise ValueError(f"linear_probe_accuracy: 'c' must be a finite float > 0. Got {c!r}.")
    if not _is_int(max_iter) or max_iter < 1:
        raise ValueError(f"linear_probe_accuracy: 'max_iter' must be an int >= 1. Got {max_iter!r}.")
    # scikit-learn (with scipy) takes about a second to import: only the probe pays for it
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x_train, x_test = (x.detach().cpu().double().numpy() for x in (train, test))
    y_train, y_test = (y.cpu().numpy() for y in (train_labels, test_labels))
    classes = np.unique(y_train)
    if len(classes) == 1:
        predicted = np.full_like(y_test, classes[0])
    else:
        scaler = StandardScaler().fit(x_train)
        probe = LogisticRegression(C=float(c), max_iter=max_iter).fit(scaler.transform(x_train), y_train)
        predicted = probe.predict(scaler.transform(x_test))
    return float(np.mean(predicted == y_test))


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of positions ``0 … n-1`` into kept and held-out parts, stratified by label.

    One generator ``numpy.random.default_rng(seed)`` permutes the positions of each label, labels in ascending
    order; the first ``round(fraction · n_c)`` (half rounds up) of a label's ``n_c`` positions are held out, at
    least 1 when ``n_c >= 2`` and ``fraction > 0``, and at most ``n_c - 1``, so every label keeps a position.

    Parameters
    ----------
    labels : numpy.ndarray, shape (n,)
        Label of every position (any sortable dtype).
    fraction : float
        Held-out share per label, ``0 <= fraction < 1``.
    seed : int
        Seed of the generator (>= 0).

    Returns
    -------
    kept, held_out : numpy.ndarray
        Sorted int64 positions; disjoint, their union is ``0 … n-1``.

    Raises
    ------
    ValueError
        If ``labels`` is not 1-D, ``fraction`` is outside [0, 1) or ``seed`` is not an int >= 0.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"stratified_holdout: 'labels' must be a 1-D array. Got shape {labels.shape!r}.")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise ValueError(f"stratified_holdout: 'fraction' must be >= 0 and < 1. Got {fraction!r}.")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"stratified_holdout: 'seed' must be an int >= 0. Got {seed!r}.")
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        take = math.floor(fraction * len(members) + 0.5)
        if fraction > 0 and len(members) >= 2:
            take = max(take, 1)
        held.append(members[: min(take, len(members) - 1)])
    held_out = np.sort(np.concatenate(held)).astype(np.int64)
    kept = np.setdiff1d(np.arange(len(labels), dtype=np.int64), held_out, assume_unique=True)
    return kept, held_out
