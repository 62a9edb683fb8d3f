"""The update-attack interface, the choice of malicious clients (the ground truth) and detection counts."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import torch

from fedcore.aggregation.base import ClientUpdate
from fedcore.aggregation.state import StateDict
from fedcore.registry import Registry


class UpdateAttack:
    """Replace the updates of malicious clients; the default (``none``) sends every update unchanged.

    Subclasses override :meth:`forge`. Attacks change only the entries named in ``keys`` (floating model parameters
    by default, see ``attack.include_buffers``); ``num_examples`` and the reported metrics are kept, as a
    malicious client would report plausible ones.
    """

    def corrupt(
        self,
        global_state: StateDict,
        updates: Sequence[ClientUpdate],
        malicious: Collection[int],
        keys: Sequence[str],
        generator: torch.Generator,
    ) -> list[ClientUpdate]:
        """Return ``updates`` with those of the ``malicious`` clients replaced by forged ones (same order).

        Parameters
        ----------
        global_state : dict of str to Tensor
            w_t, the state the clients started from.
        updates : sequence of ClientUpdate
            Every honest update of the round (an omniscient attacker sees them all, as ALIE assumes).
        malicious : collection of int
            Ids of the malicious clients; those not in ``updates`` are ignored.
        keys : sequence of str
            Floating entries the attack may change.
        generator : torch.Generator
            CPU generator for random attacks (see :func:`attack_generator`).
        """
        attackers = [u for u in updates if u.client_id in set(malicious)]
        if not attackers:
            return list(updates)
        forged = self.forge(global_state, updates, attackers, keys, generator)
        return [forged.get(u.client_id, u) for u in updates]

    def forge(
        self,
        global_state: StateDict,
        updates: Sequence[ClientUpdate],
        attackers: Sequence[ClientUpdate],
        keys: Sequence[str],
        generator: torch.Generator,
    ) -> dict[int, ClientUpdate]:
        """The forged update of each attacker, by client id (none: no change)."""
        return {}


def replaced(update: ClientUpdate, values: StateDict) -> ClientUpdate:
    """``update`` with the entries in ``values`` replaced (cast to the original dtypes)."""
    state = dict(update.state)
    for key, value in values.items():
        state[key] = value.to(update.state[key].dtype)
    return ClientUpdate(update.client_id, state, update.num_examples, dict(update.metrics))


def delta(update: ClientUpdate, global_state: StateDict, key: str) -> torch.Tensor:
    """w^k − w_t for entry ``key``, float64."""
    return update.state[key].detach().to(torch.float64) - global_state[key].detach().to(torch.float64)


def choose_malicious(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """The malicious clients: round(fraction × num_clients) ids drawn without replacement from ``seed``.

    The set is fixed for the whole run (the attacker controls these clients) and is the ground truth against
    which detection is scored.

    Raises
    ------
    ValueError
        If ``fraction`` is outside [0, 1] or ``num_clients`` < 1.
    """
    if num_clients < 1:
        raise ValueError(f"choose_malicious: 'num_clients' must be >= 1. Got {num_clients!r}.")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"choose_malicious: 'fraction' must be in [0, 1]. Got {fraction!r}.")
    count = int(round(fraction * num_clients))
    rng = np.random.default_rng([seed, 0x5EED])
    return frozenset(int(c) for c in rng.choice(num_clients, size=count, replace=False))


def attack_generator(seed: int, server_round: int) -> torch.Generator:
    """CPU generator of the random attacks of one round, independent of every other round (resumable)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + server_round + 7)


def detection_counts(
    flagged: Collection[int], malicious: Collection[int], sampled: Collection[int]
) -> dict[str, int]:
    """True positives, false positives and false negatives of ``flagged`` among the ``sampled`` clients."""
    present = set(malicious) & set(sampled)
    marked = set(flagged) & set(sampled)
    return {"tp": len(marked & present), "fp": len(marked - present), "fn": len(present - marked)}


ATTACKS: Registry[UpdateAttack] = Registry("attack")
ATTACKS.register("none")(UpdateAttack)

__all__ = ["ATTACKS", "UpdateAttack", "attack_generator", "choose_malicious", "delta", "detection_counts", "replaced"]
