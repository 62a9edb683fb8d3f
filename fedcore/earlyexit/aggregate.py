"""Depth-aware partial aggregation of early-exit clients (PAPERS.md §5; the paper's exact rule is not public).

Client c trains the layers 1..d_c of the backbone (its exit depth) and the exit heads it reaches, and sends only
those. For every entry of layer l the server takes the weighted mean over the clients that sent it,

    W^l = Σ_{c: d_c ≥ l} ω_c^l W_c^l / Σ_{c: d_c ≥ l} ω_c^l,   ω_c^l = n_c · g(l, d_c),

with g from :data:`DEPTH_WEIGHTS`: ``uniform`` (g = 1, HeteroFL-style) or ``depth`` (g = l / d_c, which up-weights
the clients for whom layer l is near their exit). Entries outside the layers (the token embedding, the exit
heads; ``layer_of(key) == 0``) are averaged over the clients that sent them with ω_c = n_c. An entry no client
sent keeps its value. :func:`depth_aware_average` returns the averaged entries; a server optimiser (FedAdam)
may then step from the old values towards them (:func:`server_step`).

Updates are screened first (:func:`~fedcore.aggregation.base.screen_updates` with partial updates): a client whose
update holds a non-finite value, a wrong shape or dtype, a key the global state lacks or a layer beyond its exit is
left out with its reason, and so is a client whose training failed; fewer than ``min_accepted`` accepted clients
raise :class:`~fedcore.errors.QuorumError` (the round is not applied).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedcore.aggregation.base import Aggregator, ClientUpdate, screen_round
from fedcore.aggregation.state import StateDict
from fedcore.errors import AggregationError
from fedcore.registry import Registry

#: g(l, d): the depth factor of a client with exit depth d for layer l (1 <= l <= d).
DEPTH_WEIGHTS: Registry[Callable[[int, int], float]] = Registry("depth_weight")
DEPTH_WEIGHTS.register("uniform")(lambda: lambda layer, depth: 1.0)
DEPTH_WEIGHTS.register("depth")(lambda: lambda layer, depth: layer / depth)


@dataclass(frozen=True)
class PartialAggregate:
    """The averaged entries (only those some client sent) and, per entry, the clients averaged over."""

    state: StateDict
    participants: dict[str, list[int]]
    #: ``"client <id>: <reason>"`` of every client left out of the round (failed or screened out).
    rejected: Mapping[int, str] = field(default_factory=dict)

    def full_state(self, global_state: StateDict) -> StateDict:
        """``global_state`` with the averaged entries replaced (entries nobody sent keep their value)."""
        return {**global_state, **self.state}


def depth_aware_average(global_state: StateDict, updates: Sequence[ClientUpdate], depths: Mapping[int, int],
                        layer_of: Callable[[str], int], weighting: str = "uniform", *, server_round: int = 0,
                        failed: Mapping[int, str] | None = None, min_accepted: int = 1) -> PartialAggregate:
    """Average every entry over the clients that sent it, weighted ``n_c · g(layer, d_c)``.

    Parameters
    ----------
    global_state : dict of str to Tensor
        The global state (gives keys, dtypes and devices; not modified).
    updates : sequence of ClientUpdate
        Each holds the entries its client trained (a subset of the global keys).
    depths : mapping of int to int
        Exit depth d_c of every client of ``updates`` (>= 1).
    layer_of : callable
        ``layer_of(key)``: the backbone layer (1-based) an entry belongs to, or 0 for entries outside the layers.
    weighting : str
        A :data:`DEPTH_WEIGHTS` name.
    server_round : int, optional
        The round (for messages).
    failed : Mapping of int to str, optional
        Clients whose training raised, with the reason (rejected).
    min_accepted : int, default 1
        The quorum of accepted clients.

    Returns
    -------
    PartialAggregate

    Raises
    ------
    QuorumError
        If fewer than ``min_accepted`` clients (and always: none) sent an acceptable update.
    AggregationError
        If a client repeats (also between ``updates`` and ``failed``) or has no depth (caller bugs).
    """
    g = DEPTH_WEIGHTS.build(weighting)
    for update in updates:
        client = update.client_id
        if client not in depths or depths[client] < 1:
            raise AggregationError(f"depth_aware_average: client {client} needs an exit depth >= 1 in 'depths'. "
                                   f"Got {depths.get(client)!r}.")

    def beyond_exit(update: ClientUpdate) -> str | None:
        depth = depths[update.client_id]
        deep = [k for k in update.state if layer_of(k) > depth]
        return f"exit depth {depth} but sent deeper layers {deep[:5]!r}" if deep else None

    updates, rejected = screen_round(global_state, updates, server_round, failed=failed, min_accepted=min_accepted,
                                     partial=True, also=beyond_exit, where="depth_aware_average")
    state: StateDict = {}
    participants: dict[str, list[int]] = {}
    for key, reference in global_state.items():
        holders = sorted((u for u in updates if key in u.state), key=lambda u: u.client_id)
        if not holders:
            continue
        layer = layer_of(key)
        weights = [u.num_examples * (g(layer, depths[u.client_id]) if layer > 0 else 1.0) for u in holders]
        total = sum(weights)
        if reference.is_floating_point():
            acc = torch.zeros(reference.shape, dtype=torch.float64)
            for weight, update in zip(weights, holders, strict=True):
                acc += (weight / total) * update.state[key].detach().to("cpu", torch.float64)
            value = acc
        else:  # integer buffers (counters): the weighted mean, rounded
            acc = torch.zeros(reference.shape, dtype=torch.float64)
            for weight, update in zip(weights, holders, strict=True):
                acc += weight * update.state[key].to("cpu", torch.float64)
            value = torch.round(acc / total)
        state[key] = value.to(device=reference.device, dtype=reference.dtype)
        participants[key] = [u.client_id for u in holders]
    return PartialAggregate(state=state, participants=participants, rejected=rejected)


def server_step(server: Aggregator, global_state: StateDict, averaged: StateDict, server_round: int) -> StateDict:
    """Apply a server rule to the averaged entries: FedAvg keeps them, FedAdam steps from the old values.

    The average is handed to ``server`` as the one update of the round, restricted to the entries some client
    sent, so a server optimiser keeps moments only for entries that were trained.
    """
    if not averaged:
        return dict(global_state)
    keys = list(averaged)
    result = server.aggregate({k: global_state[k] for k in keys}, [ClientUpdate(0, averaged, 1, {})], server_round)
    return {**global_state, **result.state}
