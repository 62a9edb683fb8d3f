"""Modality-wise aggregation: each parameter group is aggregated over the clients that trained it.

Clients send only the groups they trained (:func:`fedcore.multimodal.train.train_av_client`): an audio-only client
sends ``audio`` and ``audio_head``, an audio-visual one also ``visual`` and ``fusion``. For every group, the
server runs the configured aggregator (FedAvg by default: Σ n_k w_k / Σ n_k) over the updates that carry that
group, restricted to its keys; a group no client sent this round keeps its global value. This is ModalityMirror's
phase 1 ("audio encoder: FedAvg over every client with audio; video encoder and fusion: over the multimodal
clients") and Harmony's modality-wise stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedcore.aggregation.base import Aggregator, ClientUpdate
from fedcore.aggregation.state import StateDict
from fedcore.errors import AggregationError
from fedcore.multimodal.models import group_of


@dataclass(frozen=True)
class ModalityAggregate:
    """The new global state and, per group, the ids of the clients it was aggregated over (sorted)."""

    state: StateDict
    participants: dict[str, list[int]]


def modality_wise(aggregator: Aggregator, global_state: StateDict, updates: Sequence[ClientUpdate],
                  server_round: int) -> ModalityAggregate:
    """Aggregate each parameter group of ``global_state`` over the updates that carry it.

    Parameters
    ----------
    aggregator : Aggregator
        Applied once per group to the group's keys (its screening, weighting and casting apply per group).
    global_state : dict of str to Tensor
        The full global state w_t (not modified).
    updates : sequence of ClientUpdate
        Each carries every key of the groups its client trained, and no other key.
    server_round : int

    Returns
    -------
    ModalityAggregate

    Raises
    ------
    AggregationError
        If an update carries a key the global state lacks, or only part of a group's keys, or ``updates`` is
        empty.
    """
    if not updates:
        raise AggregationError(f"modality_wise: 'updates' must be non-empty in round {server_round}. Got [].")
    keys_of: dict[str, list[str]] = {}
    for key in global_state:
        keys_of.setdefault(group_of(key), []).append(key)
    for update in updates:
        extra = sorted(set(update.state) - set(global_state))
        if extra:
            raise AggregationError(f"modality_wise: client {update.client_id} sent keys the global state lacks: "
                                   f"{extra[:5]!r}.")
        for group in {group_of(key) for key in update.state}:
            missing = [k for k in keys_of[group] if k not in update.state]
            if missing:
                raise AggregationError(f"modality_wise: client {update.client_id} must send all of group "
                                       f"{group!r} or none of it. Missing {missing[:5]!r}.")
    state = dict(global_state)
    participants: dict[str, list[int]] = {}
    for group, keys in keys_of.items():
        holders = [u for u in updates if keys[0] in u.state]
        if not holders:
            continue
        sub_global = {k: global_state[k] for k in keys}
        sub_updates = [ClientUpdate(u.client_id, {k: u.state[k] for k in keys}, u.num_examples, u.metrics)
                       for u in holders]
        result = aggregator.aggregate(sub_global, sub_updates, server_round)
        state.update(result.state)
        participants[group] = sorted(u.client_id for u in holders if u.client_id not in result.rejected)
    return ModalityAggregate(state=state, participants=participants)
