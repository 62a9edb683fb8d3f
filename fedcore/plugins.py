"""Where each pluggable family lives, found by name; its module (and torch) imported on first use only.

:data:`FAMILIES` maps a family's kind (the ``registry=`` of a config field) to its
:class:`~fedcore.registry.Registry`. Looking a family up imports the one module that holds it, which registers its
built-in members; nothing else is imported. So checking a params file imports only the families its sections name:
the download, features, partition and poison stages check theirs without importing torch (about 2 s of every stage
otherwise), and the federate stage, which trains anyway, imports the families it uses. A user's plugin module
(``plugins.modules``) imports the family it registers into, so its members join the names before any check.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from fedcore.errors import ConfigError
from fedcore.registry import Registry

SOURCES: dict[str, tuple[str, str]] = {
    "aggregator": ("fedcore.aggregation", "AGGREGATORS"),
    "attack": ("fedcore.attacks", "ATTACKS"),
    "augmentation": ("fedcore.ssl", "AUGMENTATIONS"),
    "av_method": ("fedcore.multimodal", "AV_METHODS"),
    "av_task": ("fedcore.multimodal", "LOCAL_TASKS"),
    "dataset": ("fedcore.data.datasets", "DATASETS"),
    "depth_weight": ("fedcore.earlyexit.aggregate", "DEPTH_WEIGHTS"),
    "exit_backbone": ("fedcore.earlyexit.models", "EXIT_BACKBONES"),
    "exit_head": ("fedcore.earlyexit.models", "EXIT_HEADS"),
    "exit_plan": ("fedcore.earlyexit.tiers", "EXIT_PLANS"),
    "fusion": ("fedcore.multimodal", "FUSIONS"),
    "local_algorithm": ("fedcore.algorithms", "LOCAL_ALGORITHMS"),
    "lr_schedule": ("fedcore.federation.schedules", "LR_SCHEDULES"),
    "model": ("fedcore.models", "MODELS"),
    "model_assignment": ("fedcore.models.assign", "MODEL_ASSIGNMENTS"),
    "param_group": ("fedcore.models.groups", "PARAM_GROUPS"),
    "partitioner": ("fedcore.data.partition", "PARTITIONERS"),
    "poison": ("fedcore.data.poison", "POISONS"),
    "ssl_method": ("fedcore.ssl", "SSL_METHODS"),
}
"""Every pluggable family of fedcore: kind -> (module holding its registry, the registry's name there)."""


class _Families(Mapping[str, Registry[Any]]):
    """Read-only ``{kind: registry}`` over :data:`SOURCES`, importing a family's module when it is looked up."""

    def __getitem__(self, kind: str) -> Registry[Any]:
        module, attribute = SOURCES[kind]
        registry: Registry[Any] = getattr(importlib.import_module(module), attribute)
        return registry

    def __iter__(self) -> Iterator[str]:
        return iter(SOURCES)

    def __len__(self) -> int:
        return len(SOURCES)


FAMILIES: Mapping[str, Registry[Any]] = _Families()
"""Every pluggable family by kind; ``FAMILIES[kind]`` imports that family's module only."""


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
