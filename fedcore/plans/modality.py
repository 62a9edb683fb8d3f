"""The modality plan: modality-wise audio-visual federated training (UniFL, MultiFL, Harmony, ModalityMirror phase 1).

:class:`ModalityPlan` is what :func:`fedcore.federation.engine.run_rounds` runs for the method of
``modality.method`` (:data:`~fedcore.multimodal.methods.AV_METHODS`). Each round ``t``:

- the round's phase (:meth:`AVMethod.schedule <fedcore.multimodal.methods.AVMethod.schedule>`) says which tasks
  each sampled client trains: those of a client with video, or of one without (``modality.missing_rate``; a
  client with no task this phase sits the round out), and their loss weights (ModalityMirror: a client with
  video adds ``modality.audio_loss_weight``·CE of the audio branch to its fused loss);
- each client trains its tasks (:func:`train_av_job`: the :class:`~fedcore.multimodal.train.AVTasks` objective in
  the one client loop) and sends exactly the parameter groups they trained;
- the server aggregates each group over the clients that sent it (:func:`~fedcore.multimodal.aggregate.modality_wise`
  with the aggregator of ``federation.aggregator``, whose state, e.g. FedAdam's moments, is checkpointed through
  :meth:`ModalityPlan.stateful`); a round in which no client trains leaves the model as it is;
- the new model is scored on the test split (and the pooled held-out rows, ``val_*``), audio-only as the method
  serves audio-only clients and audio-visual (:func:`~fedcore.multimodal.evaluate.evaluate_av`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from typing_extensions import override

from fedcore.aggregation.base import ClientUpdate
from fedcore.aggregation.partial import PartialAggregate
from fedcore.aggregation.state import StateDict, to_cpu_state
from fedcore.config import FederationConfig, ModalityConfig, ModelConfig, Params
from fedcore.federation.engine import Job, RoundResult
from fedcore.federation.sampling import client_generator, round_rng, sample_clients
from fedcore.federation.schedules import learning_rate
from fedcore.multimodal.aggregate import modality_wise
from fedcore.multimodal.evaluate import evaluate_av
from fedcore.multimodal.methods import AV_METHODS, AVMethod, Phase
from fedcore.multimodal.models import AVModel, build_av_model
from fedcore.multimodal.train import AVClientData, AVData, train_av_client
from fedcore.plans.common import AggregatorPlan, params_fingerprint
from fedcore.plans.supervised import build_aggregator, local_settings

__all__ = ["AVSpec", "ModalityPlan", "new_av_model", "run_fingerprint", "train_av_job"]


@dataclass(frozen=True)
class AVSpec:
    """What a worker needs to train any client of a round (small, picklable)."""

    model: ModelConfig
    modality: ModalityConfig
    federation: FederationConfig
    audio_shape: tuple[int, int, int]
    visual_shape: tuple[int, ...]
    num_classes: int

    @classmethod
    def of(cls, params: Params, data: AVData) -> AVSpec:
        """The spec of a run of ``params`` on ``data``."""
        return cls(params.model, params.modality, params.federation, data.audio_shape, data.visual_shape,
                   data.num_classes)


def new_av_model(spec: AVSpec, seed: int) -> AVModel:
    """The audio-visual model of ``spec`` with initial weights drawn from ``seed``."""
    cfg = spec.modality
    return build_av_model(audio_cfg=spec.model, audio_shape=spec.audio_shape, visual_shape=spec.visual_shape,
                          num_classes=spec.num_classes, fusion=cfg.fusion, embed_dim=cfg.embed_dim,
                          hidden_dim=cfg.hidden_dim, visual_width=cfg.visual_width, dropout=cfg.dropout,
                          generator=torch.Generator().manual_seed(seed))


_local = threading.local()


def _worker_model(spec: AVSpec) -> AVModel:
    """One model per architecture and worker thread, reused (every client loads its global state into it)."""
    key = (spec.model, spec.modality, spec.audio_shape, spec.visual_shape, spec.num_classes)
    cache: dict[Any, AVModel] | None = getattr(_local, "models", None)
    if cache is None:
        cache = _local.models = {}
    if key not in cache:
        cache[key] = new_av_model(spec, 0)
    return cache[key]


def train_av_job(spec: AVSpec, client_id: int, server_round: int, global_state: StateDict, data: AVClientData,
                 tasks: Sequence[str], zero_fill: bool, weights: Mapping[str, float] | None = None) -> ClientUpdate:
    """One client's round: its ``tasks`` (loss ``weights``) on its data from ``global_state``: the trained groups."""
    return train_av_client(client_id=client_id, model=_worker_model(spec), global_state=global_state, data=data,
                           tasks=tasks, settings=local_settings(spec.federation, server_round),
                           generator=client_generator(spec.federation.seed, server_round, client_id),
                           zero_fill=zero_fill, weights=weights)


def run_fingerprint(params: Params, data_digest: str) -> str:
    """What a checkpoint must match to be resumed: the sections that change the result, and the data."""
    return params_fingerprint(params, ("model", "aggregation", "modality", "partition"), data_digest)


class ModalityPlan(AggregatorPlan):
    """Rounds of the audio-visual method of ``params.modality`` over ``data`` (see the module docstring).

    Parameters
    ----------
    params : Params
        The run's params (model, federation, aggregation and modality sections).
    data : AVData
        The clients' audio-visual rows (``data.video``: the clients with video), the test and validation splits.

    Raises
    ------
    ValueError
        If a phase of the method trains only clients with video and none has video.
    """

    stage = "modality"

    def __init__(self, params: Params, data: AVData) -> None:
        fed, cfg = params.federation, params.modality
        self.params, self.data = params, data
        self.rounds, self.min_accepted = fed.rounds, fed.min_accepted
        self.method: AVMethod = AV_METHODS.build(cfg.method)
        self.schedule: list[tuple[int, Phase]] = self.method.schedule(fed.rounds, cfg.fusion_rounds,
                                                                      cfg.audio_loss_weight)
        self.video = frozenset(data.video)
        if idle := [p.name for _, p in self.schedule if not p.plan(False) and not self.video]:
            raise ValueError(f"modality: {cfg.method}'s phase {idle[0]!r} trains only clients with video, and none "
                             f"has video (missing_rate {cfg.missing_rate}). Fix: lower modality.missing_rate.")
        self.spec = AVSpec.of(params, data)
        self.aggregator = build_aggregator(params)
        #: The server's instance: the initial weights, then each round's state for evaluation and logging.
        self.model = new_av_model(self.spec, fed.seed)
        self.initial = to_cpu_state(self.model)

    def phase(self, server_round: int) -> tuple[int, Phase]:
        """``(phase number from 1, phase)`` of ``server_round``."""
        return self.schedule[server_round - 1]

    @override
    def jobs(self, server_round: int, state: StateDict) -> tuple[list[int], list[Job]]:
        fed = self.params.federation
        _, phase = self.phase(server_round)
        sampled = sample_clients(self.data.num_clients, fed.client_fraction, fed.min_clients,
                                 round_rng(fed.seed, server_round))
        return sampled, [
            Job(c, server_round, train_av_job, (self.spec, c, server_round, state, self.data.train[c], tasks,
                                                self.method.zero_fill, phase.weights(c in self.video)),
                threads=fed.client_threads)
            for c in sampled if (tasks := phase.plan(c in self.video))]

    @override
    def combine(self, state: StateDict, updates: Sequence[ClientUpdate], failed: Mapping[int, str],
                server_round: int, min_accepted: int) -> RoundResult:
        # a round whose sampled clients have nothing to train in this phase leaves the model as it is
        result = (modality_wise(self.aggregator, state, updates, server_round, failed=failed,
                                min_accepted=min_accepted)
                  if updates or failed else PartialAggregate(state, {}))
        number, _ = self.phase(server_round)
        accepted = [u for u in updates if u.client_id not in result.rejected]
        metrics = {
            "phase": float(number),
            "train_loss_mean": sum(float(u.metrics["train_loss"]) for u in accepted) / max(1, len(accepted)),
            "num_clients": float(len(updates) + len(failed) - len(result.rejected)),
            "num_audio_clients": float(len(result.participants.get("audio", []))),
            "num_visual_clients": float(len(result.participants.get("visual", []))),
            "lr": learning_rate(self.params.federation, server_round),
        }
        record = {"participants": {str(group): clients for group, clients in result.participants.items()},
                  "flagged": sorted(result.flagged)}
        return RoundResult(result.state, result.rejected, metrics, record)

    @override
    def evaluate(self, state: StateDict, server_round: int, result: RoundResult) -> dict[str, float]:
        self.model.load_state_dict(state)
        batch = self.params.federation.eval_batch_size
        scores = evaluate_av(self.model, self.method, self.data.test, batch)
        if self.data.val is not None:
            scores.update({f"val_{k}": v for k, v in evaluate_av(self.model, self.method, self.data.val,
                                                                 batch).items()})
        return scores
