"""Import every pluggable family, so that all registrations run, and expose the registries to config checks."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from fedcore.aggregation import AGGREGATORS
from fedcore.algorithms import LOCAL_ALGORITHMS
from fedcore.attacks import ATTACKS
from fedcore.config import register_registry
from fedcore.data.datasets import DATASETS
from fedcore.data.partition import PARTITIONERS
from fedcore.data.poison import POISONS
from fedcore.earlyexit.aggregate import DEPTH_WEIGHTS
from fedcore.earlyexit.models import EXIT_BACKBONES, EXIT_HEADS
from fedcore.earlyexit.tiers import EXIT_PLANS
from fedcore.errors import ConfigError
from fedcore.federation.schedules import LR_SCHEDULES
from fedcore.models import MODELS
from fedcore.models.assign import MODEL_ASSIGNMENTS
from fedcore.models.groups import PARAM_GROUPS
from fedcore.multimodal import AV_METHODS, FUSIONS, LOCAL_TASKS
from fedcore.registry import Registry
from fedcore.ssl import AUGMENTATIONS, SSL_METHODS

FAMILIES: dict[str, Registry[Any]] = {
    "aggregator": AGGREGATORS,
    "attack": ATTACKS,
    "augmentation": AUGMENTATIONS,
    "av_method": AV_METHODS,
    "av_task": LOCAL_TASKS,
    "dataset": DATASETS,
    "depth_weight": DEPTH_WEIGHTS,
    "exit_backbone": EXIT_BACKBONES,
    "exit_head": EXIT_HEADS,
    "exit_plan": EXIT_PLANS,
    "fusion": FUSIONS,
    "local_algorithm": LOCAL_ALGORITHMS,
    "lr_schedule": LR_SCHEDULES,
    "model": MODELS,
    "model_assignment": MODEL_ASSIGNMENTS,
    "param_group": PARAM_GROUPS,
    "partitioner": PARTITIONERS,
    "poison": POISONS,
    "ssl_method": SSL_METHODS,
}

for _family, _registry in FAMILIES.items():
    register_registry(_family, _registry)


def import_modules(names: Sequence[str]) -> None:
    """Import the user's plugin modules (``plugins.modules``): what they register joins its family.

    A module is found like any import (the project folder is on the path when a stage runs from it).

    Raises
    ------
    ConfigError
        If a module cannot be imported; the message names it and the error it raised.
    """
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as error:  # the user's code: any error is reported as a params problem
            raise ConfigError(f"plugins: module {name!r} could not be imported: {type(error).__name__}: {error}. "
                              "Fix: put it where Python finds it from the project folder (e.g. plugins/<name>.py, "
                              "listed as plugins.<name>).") from error
