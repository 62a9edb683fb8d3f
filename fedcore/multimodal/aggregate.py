"""Modality-wise aggregation: each parameter group is aggregated over the clients that trained it.

Clients send only the groups they trained (:func:`fedcore.multimodal.train.train_av_client`): an audio-only client
sends ``audio`` and ``audio_head``, an audio-visual one also ``visual`` and ``fusion``. For every group, the
server runs the configured aggregator (FedAvg by default: Σ n_k w_k / Σ n_k) over the updates that carry that
group, restricted to its keys; a group no client sent this round keeps its global value. This is ModalityMirror's
phase 1 ("audio encoder: FedAvg over every client with audio; video encoder and fusion: over the multimodal
clients") and Harmony's modality-wise stage.

This is the one partial aggregation (:func:`fedcore.aggregation.partial.aggregate_partial`) with a group per
parameter group and each client's n_k as its weight: its screening applies, so a client whose update is malformed,
holds a non-finite value in any group or part of a group without the rest is left out of every group, with its
reason, and so is a client whose training failed; fewer than ``min_accepted`` accepted clients raise
:class:`~fedcore.errors.QuorumError` (the round is not applied).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fedcore.aggregation.base import Aggregator, ClientUpdate
from fedcore.aggregation.partial import PartialAggregate, aggregate_partial
from fedcore.aggregation.state import StateDict
from fedcore.multimodal.models import group_of

__all__ = ["modality_wise"]


def modality_wise(aggregator: Aggregator, global_state: StateDict, updates: Sequence[ClientUpdate],
                  server_round: int, *, failed: Mapping[int, str] | None = None,
                  min_accepted: int = 1) -> PartialAggregate:
    """Aggregate each parameter group of ``global_state`` over the updates that carry it.

    Parameters
    ----------
    aggregator : Aggregator
        Applied once per group to the group's keys (its weighting and casting apply per group).
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
    PartialAggregate
        ``state``: the full next state; ``participants``: per group (``audio``, ``visual``, ...), the clients.

    Raises
    ------
    QuorumError
        If fewer than ``min_accepted`` clients (and always: none) sent an acceptable update.
    AggregationError
        If a client id repeats (also between ``updates`` and ``failed``).
    """
    return aggregate_partial(aggregator, global_state, updates, server_round, group_of=group_of, failed=failed,
                             min_accepted=min_accepted, where="modality_wise")
