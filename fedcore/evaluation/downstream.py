"""Downstream scoring of a frozen encoder: FASSL's per-round, per-task retrieval (PAPERS.md §4).

After every round FASSL (Rehman et al., 2024, arXiv:2402.02889) scores the new global encoder on every downstream
task and keeps, per task, the best round. A task here is a column (``label`` or ``speaker``) of a feature store:

- the rows of the store's ``split`` (``test``) are the **test queries**, the other rows the **retrieval index**;
- a stratified ``val_fraction`` of the index rows is held out as **validation queries** (searched against the
  rest of the index): the round is *selected* on them; the test split only reports [A];
- scores: kNN retrieval top-1 accuracy (cosine, k in ``ks``; Wu et al., CVPR 2018, arXiv:1805.01978), and
  optionally a logistic-regression linear probe, both on the frozen embeddings.

Each dataset is embedded once per round, however many tasks read it (FSDD digit and FSDD speaker share one pass).
Metric names: ``<task>/knn<k>_val``, ``<task>/knn<k>_test``, ``<task>/probe_val``, ``<task>/probe_test``, and
the means over tasks ``mean/<metric>_val``, ``mean/<metric>_test``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedcore.config import DownstreamConfig, DownstreamTaskConfig
from fedcore.data.features import FeatureStore
from fedcore.errors import ConfigError, DataError
from fedcore.evaluation.retrieval import embed, knn_accuracy, linear_probe_accuracy, stratified_holdout


@dataclass(frozen=True)
class RetrievalTask:
    """One downstream task over a dataset's rows.

    Attributes
    ----------
    name : str
    dataset : str
        Key of the dataset's features in the mapping passed to :func:`score_encoder`.
    labels : Tensor
        ``(n,)`` int64 class of every row of the dataset.
    index, test : numpy.ndarray
        Rows of the retrieval index and of the test queries.
    fit, val : numpy.ndarray
        ``index`` split into the validation index and the validation queries.
    classes : list of str
        Class names in label order.
    """

    name: str
    dataset: str
    labels: torch.Tensor
    index: np.ndarray
    test: np.ndarray
    fit: np.ndarray
    val: np.ndarray
    classes: list[str]


def retrieval_task(cfg: DownstreamTaskConfig, store: FeatureStore, val_fraction: float, seed: int) -> RetrievalTask:
    """Build task ``cfg`` from ``store``: its class column, the index/test rows and the validation hold-out.

    Raises
    ------
    ValueError
        If the store has no row of ``cfg.split``, or no other row, or the index holds one class only.
    """
    column = [store.label_names[i] for i in store.labels.tolist()] if cfg.label == "label" else list(store.speakers)
    classes = sorted(set(column))
    position = {name: i for i, name in enumerate(classes)}
    labels = np.array([position[name] for name in column], dtype=np.int64)
    test = np.flatnonzero(store.splits == cfg.split).astype(np.int64)
    index = np.flatnonzero(store.splits != cfg.split).astype(np.int64)
    if test.size == 0 or index.size == 0:
        raise ValueError(f"downstream: task {cfg.name!r} needs rows in split {cfg.split!r} (test queries) and in "
                         f"other splits (the index) of {cfg.dataset!r}. Got {test.size} and {index.size}.")
    if np.unique(labels[index]).size < 2:
        raise ValueError(f"downstream: task {cfg.name!r}: the index must hold at least 2 classes of "
                         f"{cfg.label!r}. Got {np.unique(labels[index]).tolist()}.")
    kept, held = stratified_holdout(labels[index], val_fraction, seed)
    return RetrievalTask(cfg.name, cfg.dataset, torch.from_numpy(labels), index, test, index[kept], index[held],
                         classes)


def _scores(train: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
            ks: Sequence[int], probe: float | None, split: str) -> dict[str, float]:
    found = knn_accuracy(train, train_labels, queries, query_labels, ks)
    scores = {f"knn{k}_{split}": float(found[k]) for k in ks}
    if probe is not None:
        scores[f"probe_{split}"] = float(linear_probe_accuracy(train, train_labels, queries, query_labels, c=probe))
    return scores


def score_task(task: RetrievalTask, embeddings: torch.Tensor, ks: Sequence[int],
               probe_c: float | None = None) -> dict[str, float]:
    """Validation and test scores of one task from its dataset's embeddings ``(n, d)``; probe when ``probe_c``."""
    rows = {name: torch.from_numpy(getattr(task, name)) for name in ("fit", "val", "index", "test")}
    scores = _scores(embeddings[rows["fit"]], task.labels[rows["fit"]], embeddings[rows["val"]],
                     task.labels[rows["val"]], ks, probe_c, "val")
    scores.update(_scores(embeddings[rows["index"]], task.labels[rows["index"]], embeddings[rows["test"]],
                          task.labels[rows["test"]], ks, probe_c, "test"))
    return scores


def score_encoder(encoder: nn.Module, tasks: Sequence[RetrievalTask], features: Mapping[str, torch.Tensor],
                  cfg: DownstreamConfig, batch_size: int) -> dict[str, float]:
    """Every task's scores (``<task>/<metric>``) and their means over tasks (``mean/<metric>``).

    Parameters
    ----------
    encoder : torch.nn.Module
        Maps ``(n, 1, n_mels, frames)`` to embeddings ``(n, d)`` (an SSLModel, or any backbone); frozen here.
    tasks : sequence of RetrievalTask
    features : mapping of str to Tensor
        Normalised features ``(n, 1, n_mels, frames)`` of each dataset the tasks name.
    cfg : DownstreamConfig
        ``ks``, ``linear_probe`` and ``probe_c``.
    batch_size : int
        Batch size of the embedding pass.
    """
    embedded = {name: embed(encoder, features[name], batch_size) for name in sorted({t.dataset for t in tasks})}
    probe = cfg.probe_c if cfg.linear_probe else None
    metrics: dict[str, float] = {}
    per_metric: dict[str, list[float]] = {}
    for task in tasks:
        for key, value in score_task(task, embedded[task.dataset], cfg.ks, probe).items():
            metrics[f"{task.name}/{key}"] = value
            per_metric.setdefault(key, []).append(value)
    metrics.update({f"mean/{key}": sum(values) / len(values) for key, values in per_metric.items()})
    return metrics


def score_names(task_names: Sequence[str], cfg: DownstreamConfig) -> list[str]:
    """The names :func:`score_encoder` returns, in its order: per task then ``mean``, validation then test.

    A checkpoint stores rows with sorted keys, so a resumed run orders its summary by this list to write the
    same bytes as an uninterrupted one.
    """
    per_split = {split: [f"knn{k}_{split}" for k in cfg.ks] + ([f"probe_{split}"] if cfg.linear_probe else [])
                 for split in ("val", "test")}
    return [f"{name}/{key}" for name in [*task_names, "mean"] for split in ("val", "test")
            for key in per_split[split]]


def selection_key(task: str, cfg: DownstreamConfig, split: str = "val") -> str:
    """The metric that selects ``task``'s best round (``<task>/<select_metric>_val``)."""
    return f"{task}/{cfg.select_metric}_{split}"


__all__ = ["RetrievalTask", "retrieval_task", "score_encoder", "score_names", "score_task", "selection_key"]


@dataclass(frozen=True)
class DownstreamData:
    """The tasks and the normalised features ``(n, 1, n_mels, frames)`` of every dataset they read."""

    tasks: list[RetrievalTask]
    features: dict[str, torch.Tensor]


def dataset_folder(root: Path, dataset: str) -> Path:
    """The feature store of downstream dataset ``dataset``: ``<root>/<dataset>``."""
    return Path(root) / dataset


def load_downstream(root: Path, cfg: DownstreamConfig) -> DownstreamData:
    """Read every task's feature store under ``root`` and build the tasks (index, test and validation rows).

    Raises
    ------
    ConfigError
        If no task is declared.
    DataError
        If a dataset's feature store is missing or unreadable (the message names the tasks and the folder).
    """
    configs = cfg.task_configs()
    if not configs:
        raise ConfigError("downstream: 'tasks' must list at least one task when ssl.method is set. Got [].")
    stores: dict[str, FeatureStore] = {}
    for dataset in sorted({c.dataset for c in configs}):
        folder = dataset_folder(root, dataset)
        try:
            stores[dataset] = FeatureStore.load(folder, mmap=True)
        except DataError as error:
            names = [c.name for c in configs if c.dataset == dataset]
            raise DataError(f"downstream: tasks {names} need the feature store of {dataset!r} in {str(folder)!r} "
                            f"(the downstream data stage writes it). {error}") from error
    features = {name: torch.from_numpy(store.normalised(range(store.num_samples))) for name, store in stores.items()}
    tasks = [retrieval_task(c, stores[c.dataset], cfg.val_fraction, cfg.seed) for c in configs]
    return DownstreamData(tasks, features)
