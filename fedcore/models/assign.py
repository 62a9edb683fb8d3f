"""Which personal architecture each client trains (FedMLAC's model heterogeneity), and its initial weights.

A rule maps ``num_clients`` clients to indices into the list of personal model configs (``personal.models``):

- ``seeded``: a balanced draw: the clients, in an order shuffled by ``numpy.random.default_rng(seed)``, take the
  models in turn, so every model serves ⌊K/M⌋ or ⌈K/M⌉ clients and which ones depends only on the seed;
- ``map``: an explicit ``{client id: index}`` map; unlisted clients get model 0.

The personal models' initial weights are drawn per client (:func:`personal_generator`), so that two clients with
the same architecture do not start from the same point, and a client's start does not depend on the others.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedcore.registry import Registry

#: Rules that assign personal architectures: ``rule(num_clients, num_models, seed, mapping) -> list of index``.
MODEL_ASSIGNMENTS: Registry[list[int]] = Registry("model_assignment")


def _check(num_clients: int, num_models: int) -> None:
    for name, value in (("num_clients", num_clients), ("num_models", num_models)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"assign_models: '{name}' must be an int >= 1. Got {value!r}.")


@MODEL_ASSIGNMENTS.register("seeded")
def seeded(num_clients: int, num_models: int, seed: int, mapping: Mapping[int, int]) -> list[int]:
    """Balanced seeded draw: client ``order[i]`` gets model ``i mod num_models``."""
    _check(num_clients, num_models)
    order = np.random.default_rng(seed).permutation(num_clients)
    assigned = [0] * num_clients
    for position, client in enumerate(order.tolist()):
        assigned[client] = position % num_models
    return assigned


@MODEL_ASSIGNMENTS.register("map")
def explicit(num_clients: int, num_models: int, seed: int, mapping: Mapping[int, int]) -> list[int]:
    """``mapping[client]`` for listed clients, 0 for the rest."""
    _check(num_clients, num_models)
    for client, index in mapping.items():
        if not 0 <= int(index) < num_models:
            raise ValueError(f"assign_models: map index of client {client!r} must be in 0..{num_models - 1}. "
                             f"Got {index!r}.")
    return [int(mapping.get(client, 0)) for client in range(num_clients)]


def assign_models(rule: str, num_clients: int, num_models: int, seed: int = 0,
                  mapping: Mapping[int, int] | None = None) -> list[int]:
    """Index of the personal model config of every client, by the rule registered as ``rule``."""
    return MODEL_ASSIGNMENTS.get(rule)(num_clients, num_models, seed, dict(mapping or {}))


def personal_generator(seed: int, client_id: int) -> torch.Generator:
    """CPU generator of client ``client_id``'s personal model initial weights (``seed``: ``personal.seed``)."""
    if isinstance(client_id, bool) or not isinstance(client_id, int) or client_id < 0:
        raise ValueError(f"personal_generator: 'client_id' must be an int >= 0. Got {client_id!r}.")
    return torch.Generator(device="cpu").manual_seed((int(seed) * 1_000_003 + 7_919 * (client_id + 1)) % 2**63)


__all__ = ["MODEL_ASSIGNMENTS", "assign_models", "personal_generator"]
