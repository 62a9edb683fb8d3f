"""Partial aggregation: every update carries some entries of the model, each group is aggregated over its holders.

Clients need not send the whole model: an audio-only client sends its audio encoder and head, not the visual
encoder (modality-wise training); an early-exit client sends the layers up to its exit. An update says which
entries it carries (its state's keys) and, through :attr:`~fedcore.aggregation.base.ClientUpdate.weight`, with what
weight. :func:`aggregate_partial` splits the model's entries into *groups* (``group_of(key)``: a parameter group, a
layer, or each key alone) and, for every group some client sent, runs the round's rule over the updates that carry
it, restricted to the group's keys:

    W^G = rule({(W^G_c, ω_c^G) : c carries G}),    ω_c^G = weight_of(c, G)  (default n_c),

e.g. FedAvg's Σ ω_c W_c / Σ ω_c, or a robust rule's choice. A group no client sent keeps its value. Modality-wise
aggregation (ModalityMirror phase 1, Harmony; ``group_of`` = the parameter group) and depth-aware aggregation of
early exits (``weight_of`` = n_c · g(l, d_c); :mod:`fedcore.earlyexit.aggregate`) are two weightings of this one
procedure. A stateful rule (FedAdam) keeps its moments per key, so one instance serves every group.

The failure policy is the rules' own (:func:`~fedcore.aggregation.base.screen_round`): updates are screened whole
first, so a client with a malformed entry, a non-finite value in any group, a key the model lacks, part of a group
without the rest of it, or what ``also`` refuses is left out of every group with its reason, like a client whose
training failed; fewer than ``min_accepted`` accepted clients raise :class:`~fedcore.errors.QuorumError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

from fedcore.aggregation.base import Aggregator, ClientUpdate, screen_round
from fedcore.aggregation.state import StateDict

__all__ = ["PartialAggregate", "aggregate_partial"]


@dataclass(frozen=True)
class PartialAggregate:
    """The result of a partial aggregation.

    Attributes
    ----------
    state : dict of str to Tensor
        The full next global state (groups nobody sent keep their value).
    participants : dict
        Per group some client sent: the ids of the clients it was aggregated over (sorted).
    rejected : Mapping of int to str
        ``"client <id>: <reason>"`` of every client left out of the round (failed, screened out, refused).
    flagged : frozenset of int
        Rejected clients and clients a group's rule flagged.
    weights : dict of int to float
        Each accepted client's effective weight, averaged over the groups it sent.
    """

    state: StateDict
    participants: dict[Hashable, list[int]]
    rejected: Mapping[int, str] = dataclasses.field(default_factory=dict)
    flagged: frozenset[int] = frozenset()
    weights: dict[int, float] = dataclasses.field(default_factory=dict)


def aggregate_partial(
    aggregator: Aggregator, global_state: StateDict, updates: Sequence[ClientUpdate], server_round: int, *,
    group_of: Callable[[str], Hashable] = lambda key: key,
    weight_of: Callable[[ClientUpdate, Hashable], float] | None = None,
    failed: Mapping[int, str] | None = None, min_accepted: int = 1,
    also: Callable[[ClientUpdate], str | None] | None = None, where: str = "aggregate_partial",
) -> PartialAggregate:
    """Aggregate every group of ``global_state``'s entries over the updates that carry it (module docstring).

    Parameters
    ----------
    aggregator : Aggregator
        The round's rule, applied once per group to the group's keys.
    global_state : dict of str to Tensor
        w_t (not modified).
    updates : sequence of ClientUpdate
        Each carries whole groups: a subset of the global keys.
    server_round : int
        The round (>= 1).
    group_of : callable, default each key alone
        ``group_of(key)``: the group an entry belongs to.
    weight_of : callable, optional
        ``weight_of(update, group)``: the update's weight for that group (> 0); default its
        :attr:`~fedcore.aggregation.base.ClientUpdate.mass` (n_c unless the update says otherwise).
    failed : Mapping of int to str, optional
        Clients whose training raised, with the reason.
    min_accepted : int, default 1
        The quorum of accepted clients.
    also : callable, optional
        A caller's own check of an update (e.g. no layer beyond the client's exit): the reason to reject it, or None.
    where : str
        Name in messages.

    Raises
    ------
    QuorumError
        If fewer than ``min_accepted`` clients (and always: none) sent an acceptable update.
    AggregationError
        If a client id repeats (also between ``updates`` and ``failed``) or a weight is not > 0 (caller bugs).
    """
    keys_of: dict[Hashable, list[str]] = {}
    for key in global_state:
        keys_of.setdefault(group_of(key), []).append(key)

    def checked(update: ClientUpdate) -> str | None:
        missing = [k for g in sorted({group_of(k) for k in update.state if k in global_state}, key=str)
                   for k in keys_of[g] if k not in update.state]
        if missing:
            return f"must send all of a group or none of it; missing {missing[:5]!r}"
        return also(update) if also is not None else None

    accepted, rejected = screen_round(global_state, updates, server_round, failed=failed, min_accepted=min_accepted,
                                      partial=True, required_metrics=aggregator.required_metrics, also=checked,
                                      where=where)
    state = dict(global_state)
    participants: dict[Hashable, list[int]] = {}
    flagged = set(rejected)
    shares: dict[int, list[float]] = {}
    for group, keys in keys_of.items():
        holders = [u for u in accepted if keys[0] in u.state]
        if not holders:
            continue
        sub_updates = [ClientUpdate(u.client_id, {k: u.state[k] for k in keys}, u.num_examples, u.metrics,
                                    weight=weight_of(u, group) if weight_of is not None else u.weight)
                       for u in holders]
        result = aggregator.aggregate({k: global_state[k] for k in keys}, sub_updates, server_round)
        state.update(result.state)
        participants[group] = sorted(u.client_id for u in holders)
        flagged |= result.flagged
        for client, weight in result.weights.items():
            shares.setdefault(client, []).append(weight)
    weights = {client: sum(values) / len(values) for client, values in sorted(shares.items())}
    return PartialAggregate(state, participants, rejected, frozenset(flagged), weights)
