"""Modality-wise aggregation: each parameter group is aggregated over the clients that trained it.

Clients send only the groups they trained (:func:`fedcore.multimodal.train.train_av_client`): an audio-only client
sends ``audio`` and ``audio_head``, an audio-visual one also ``visual`` and ``fusion``. For every group, the
server runs the configured aggregator (FedAvg by default: Σ n_k w_k / Σ n_k) over the updates that carry that
group, restricted to its keys; a group no client sent this round keeps its global value. This is ModalityMirror's
phase 1 ("audio encoder: FedAvg over every client with audio; video encoder and fusion: over the multimodal
clients") and Harmony's modality-wise stage.

Updates are screened whole first (:func:`~fedcore.aggregation.base.screen_updates` with partial updates): a client
whose update is malformed or holds a non-finite value in any group is left out of every group, with its reason,
and so is a client whose training failed; fewer than ``min_accepted`` accepted clients raise
:class:`~fedcore.errors.QuorumError` (the round is not applied).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedcore.aggregation.base import Aggregator, ClientUpdate, screen_round
from fedcore.aggregation.state import StateDict
from fedcore.multimodal.models import group_of


@dataclass(frozen=True)
class ModalityAggregate:
    """The new global state and, per group, the ids of the clients it was aggregated over (sorted)."""

    state: StateDict
    participants: dict[str, list[int]]
    #: ``"client <id>: <reason>"`` of every client left out of the round (failed or screened out).
    rejected: Mapping[int, str] = dataclasses.field(default_factory=dict)


def modality_wise(aggregator: Aggregator, global_state: StateDict, updates: Sequence[ClientUpdate],
                  server_round: int, *, failed: Mapping[int, str] | None = None,
                  min_accepted: int = 1) -> ModalityAggregate:
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
    failed : Mapping of int to str, optional
        Clients whose training raised, with the reason (rejected).
    min_accepted : int, default 1
        The quorum of accepted clients.

    Returns
    -------
    ModalityAggregate

    Raises
    ------
    QuorumError
        If fewer than ``min_accepted`` clients (and always: none) sent an acceptable update.
    AggregationError
        If a client id repeats (also between ``updates`` and ``failed``).
    """
    keys_of: dict[str, list[str]] = {}
    for key in global_state:
        keys_of.setdefault(group_of(key), []).append(key)

    def partial_group(update: ClientUpdate) -> str | None:
        groups = sorted({group_of(key) for key in update.state})
        missing = [k for g in groups for k in keys_of[g] if k not in update.state]
        return f"must send all of a group or none of it; missing {missing[:5]!r}" if missing else None

    updates, rejected = screen_round(global_state, updates, server_round, failed=failed, min_accepted=min_accepted,
                                     partial=True, required_metrics=aggregator.required_metrics, also=partial_group,
                                     where="modality_wise")
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
    return ModalityAggregate(state=state, participants=participants, rejected=rejected)
