"""Depth-aware partial aggregation of early-exit clients (PAPERS.md §5; the paper's exact rule is not public).

Client c trains the layers 1..d_c of the backbone (its exit depth) and the exit heads it reaches, and sends only
those. For every entry of layer l the server takes the weighted mean over the clients that sent it,

    W^l = Σ_{c: d_c ≥ l} ω_c^l W_c^l / Σ_{c: d_c ≥ l} ω_c^l,   ω_c^l = n_c · g(l, d_c),

with g from :data:`DEPTH_WEIGHTS`: ``uniform`` (g = 1, HeteroFL-style) or ``depth`` (g = l / d_c, which up-weights
the clients for whom layer l is near their exit). Entries outside the layers (the token embedding, the exit
heads; ``layer_of(key) == 0``) are averaged over the clients that sent them with ω_c = n_c. An entry no client
sent keeps its value.

An exit e's own parts (its head and, under ``exit_norm: per_exit``, its LayerNorm N_e = (γ_e, β_e); ``exit_of(key)
== e``) are sent only by the clients S_e that trained that exit (d_c = e, or d_c >= e with deep supervision), so

    N_e = Σ_{c ∈ S_e} n_c N_{e,c} / Σ_{c ∈ S_e} n_c,   S_e ⊆ {c : d_c >= e},

weighted like the heads (n_c, no g: the norm belongs to the exit, not to a layer). With ``exit_of`` given, a
client that sends a part of an exit beyond its depth (e > d_c) is rejected like one that sends deeper layers.
Under ``exit_norm: shared`` the one final norm is outside the layers and the exits: every client sends it and it
is averaged over all of them with n_c. :func:`depth_aware` is this weighting of the one partial aggregation
(:func:`fedcore.aggregation.partial.aggregate_partial`, one group per entry), with the server rule of
``earlyexit.server`` as the rule: FedAvg gives W^l above, FedAdam steps from the old value towards it.

Updates are screened first, as every rule's are: a client whose update holds a non-finite value, a wrong shape or
dtype, a key the global state lacks or a layer beyond its exit is left out with its reason, and so is a client whose
training failed; fewer than ``min_accepted`` accepted clients raise :class:`~fedcore.errors.QuorumError` (the
round is not applied).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

from fedcore.aggregation.base import Aggregator, ClientUpdate
from fedcore.aggregation.partial import PartialAggregate, aggregate_partial
from fedcore.aggregation.state import StateDict
from fedcore.errors import AggregationError
from fedcore.registry import Registry

#: g(l, d): the depth factor of a client with exit depth d for layer l (1 <= l <= d).
DEPTH_WEIGHTS: Registry[Callable[[int, int], float]] = Registry("depth_weight")
DEPTH_WEIGHTS.register("uniform")(lambda: lambda layer, depth: 1.0)
DEPTH_WEIGHTS.register("depth")(lambda: lambda layer, depth: layer / depth)


def depth_aware(server: Aggregator, global_state: StateDict, updates: Sequence[ClientUpdate],
                depths: Mapping[int, int], layer_of: Callable[[str], int], weighting: str = "uniform", *,
                server_round: int = 1, failed: Mapping[int, str] | None = None,
                min_accepted: int = 1, exit_of: Callable[[str], int] | None = None) -> PartialAggregate:
    """The next global state: every entry aggregated by ``server`` over its senders, weighted ``n_c · g(l, d_c)``.

    See the module docstring and :func:`fedcore.aggregation.partial.aggregate_partial`.

    Parameters
    ----------
    server : Aggregator
        The server rule (``earlyexit.server``): FedAvg gives the weighted mean, FedAdam steps towards it (moments
        only for the entries some client reached).
    global_state : dict of str to Tensor
        The global state (not modified).
    updates : sequence of ClientUpdate
        Each holds the entries its client trained (a subset of the global keys).
    depths : mapping of int to int
        Exit depth d_c of every client of ``updates`` (>= 1).
    layer_of : callable
        ``layer_of(key)``: the backbone layer (1-based) an entry belongs to, or 0 for entries outside the layers.
    weighting : str
        A :data:`DEPTH_WEIGHTS` name.
    server_round : int, optional
        The round.
    failed : Mapping of int to str, optional
        Clients whose training raised, with the reason (rejected).
    min_accepted : int, default 1
        The quorum of accepted clients.
    exit_of : callable, optional
        ``exit_of(key)``: the exit an entry is part of (head, exit norm), or 0; a client sending a part of an exit
        deeper than its depth is rejected. Default: no such check.

    Returns
    -------
    PartialAggregate
        ``state``: the full next state (entries nobody sent keep their value); ``participants``: per entry.

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
            raise AggregationError(f"depth_aware: client {client} needs an exit depth >= 1 in 'depths'. "
                                   f"Got {depths.get(client)!r}.")

    def beyond_exit(update: ClientUpdate) -> str | None:
        depth = depths[update.client_id]
        deep = [k for k in update.state if layer_of(k) > depth]
        if deep:
            return f"exit depth {depth} but sent deeper layers {deep[:5]!r}"
        deeper_exits = [k for k in update.state if exit_of is not None and exit_of(k) > depth]
        return f"exit depth {depth} but sent parts of deeper exits {deeper_exits[:5]!r}" if deeper_exits else None

    def weight(update: ClientUpdate, key: Hashable) -> float:
        layer = layer_of(str(key))
        return update.num_examples * (g(layer, depths[update.client_id]) if layer > 0 else 1.0)

    return aggregate_partial(server, global_state, updates, server_round, weight_of=weight, failed=failed,
                             min_accepted=min_accepted, also=beyond_exit, where="depth_aware")
