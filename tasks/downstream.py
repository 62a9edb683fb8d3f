"""Downstream tasks of self-supervised runs: load their feature stores once, score the global encoder per round."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from fedcore.aggregation.base import StateDict
from fedcore.config import DownstreamConfig
from fedcore.data.features import FeatureStore
from fedcore.errors import ConfigError, DataError
from fedcore.evaluation.downstream import RetrievalTask, retrieval_task, score_encoder
from tasks.federate import TrainSpec, fresh_model


@dataclass(frozen=True)
class DownstreamData:
    """The tasks and the normalised features ``(n, 1, n_mels, frames)`` of every dataset they read."""

    tasks: list[RetrievalTask]
    features: dict[str, torch.Tensor]


def dataset_folder(root: Path, dataset: str) -> Path:
    """The feature store of downstream dataset ``dataset``: ``<root>/<dataset>``."""
    return Path(root) / dataset


@task(name="load-downstream", cache_policy=NO_CACHE)
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
    shapes = {name: tuple(f.shape[1:]) for name, f in features.items()}
    tasks = [retrieval_task(c, stores[c.dataset], cfg.val_fraction, cfg.seed) for c in configs]
    print(f"downstream: {len(tasks)} tasks on {', '.join(f'{k} {v}' for k, v in shapes.items())}")
    return DownstreamData(tasks, features)


@task(name="score-downstream", cache_policy=NO_CACHE)
def downstream_task(spec: TrainSpec, state: StateDict, data: DownstreamData,
                    cfg: DownstreamConfig) -> dict[str, float]:
    """Scores of the global encoder ``state`` on every task (``<task>/knn<k>_val|test``, ``mean/...``)."""
    model = _encoder(spec)
    model.load_state_dict(state)
    return score_encoder(model, data.tasks, data.features, cfg, spec.federation.eval_batch_size)


def _encoder(spec: TrainSpec) -> torch.nn.Module:
    """A model instance of the run's architecture (SSLModel: forward gives the backbone's embedding)."""
    return fresh_model(spec, spec.federation.seed)
