"""The distillation plan: federated distillation of a frozen teacher into a student (ModalityMirror phase 2).

:class:`DistillPlan` is what :func:`fedcore.federation.engine.run_rounds` runs for the ``distill`` stage. Only the
clients that hold every input of the teacher take part (for an audio-visual teacher: the clients with video).
Each round ``t`` the sampled ones train the student from the global student with
``CE + λ·T²·KL(teacher ‖ student)`` (the :class:`~fedcore.multimodal.train.Distillation` objective in the one
client loop, the teacher frozen), the server combines the students with the aggregator of
``federation.aggregator`` (its state, e.g. FedAdam's moments, is checkpointed through :meth:`DistillPlan.stateful`),
and the student is scored on the audio-only test split (and the pooled held-out rows, ``val_audio_accuracy``).
The student before distillation is scored too: round 0, the floor.

The student's starting weights (``distill.student_init``): ``logged``, those of the model ``distill.student`` names
(by default the modality stage's audio branch: phase 1's audio encoder + audio head, so θ_student^0 = θ_branch, and
distillation refines phase 1 rather than starting over), or ``random``, the same architecture re-drawn from
``federation.seed`` (an ablation). Its local SGD runs at ``distill.lr`` (None: ``federation.lr``), a fresh optimiser
per client and round as in every plan; the default of the study is chosen on the held-out rows so that the first
round keeps what phase 1 learnt (issue 21: at lr 0.05 with momentum 0.9 the first round took an untrained-by-video
audio head from 0.43 to 0.17).
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from fedcore.aggregation.base import ClientUpdate
from fedcore.aggregation.state import StateDict, to_cpu_state
from fedcore.algorithms.base import LocalSettings
from fedcore.config import DistillConfig, FederationConfig, Params
from fedcore.federation.engine import Job, RoundResult
from fedcore.federation.sampling import client_generator, round_rng, sample_clients
from fedcore.models.spec import build, spec_of
from fedcore.multimodal.evaluate import evaluate_student
from fedcore.multimodal.train import AVClientData, AVData, train_student
from fedcore.plans.common import AggregatorPlan, params_fingerprint
from fedcore.plans.supervised import build_aggregator, local_settings

__all__ = ["AUDIO_INPUTS", "DistillPlan", "DistillSpec", "distill_settings", "run_fingerprint", "train_student_job"]

#: The inputs of an audio-only model (the student), in call order.
AUDIO_INPUTS = ("audio",)

#: Metrics the clients report, averaged over the accepted ones each round (``<name>_mean``).
CLIENT_METRICS = ("train_loss", "train_accuracy", "teacher_accuracy")


@dataclass(frozen=True)
class DistillSpec:
    """What a worker needs to distil on any client of a round (small, picklable)."""

    federation: FederationConfig
    distill: DistillConfig


def distill_settings(spec: DistillSpec, server_round: int) -> LocalSettings:
    """The student's local SGD settings of ``server_round``: ``distill.lr`` when set, else the federation's."""
    settings = local_settings(spec.federation, server_round)
    return settings if spec.distill.lr is None else dataclasses.replace(settings, lr=spec.distill.lr)


_local = threading.local()


def _worker_student(template: nn.Module) -> nn.Module:
    """The calling worker thread's copy of the student ``template`` (reused; each client loads its state into it)."""
    if getattr(_local, "template", None) is not template:
        _local.template, _local.student = template, copy.deepcopy(template)
    student: nn.Module = _local.student
    return student


def train_student_job(spec: DistillSpec, client_id: int, server_round: int, student: nn.Module,
                      student_state: StateDict, teacher: Callable[..., torch.Tensor],
                      teacher_inputs: Sequence[str], data: AVClientData) -> ClientUpdate:
    """One client's distillation round, on this worker's copy of ``student`` (the template is never trained)."""
    cfg = spec.distill
    return train_student(client_id=client_id, student=_worker_student(student), student_state=student_state,
                         teacher=teacher, teacher_inputs=teacher_inputs, data=data,
                         settings=distill_settings(spec, server_round),
                         generator=client_generator(spec.federation.seed, server_round, client_id),
                         lambd=cfg.lambd, temperature=cfg.temperature)


def run_fingerprint(params: Params, data_digest: str) -> str:
    """What a checkpoint must match to be resumed: the sections that change the result, and the data."""
    return params_fingerprint(params, ("aggregation", "distill", "modality"), data_digest)


class DistillPlan(AggregatorPlan):
    """Rounds of distillation of ``teacher`` into ``student`` over ``data`` (see the module docstring).

    Parameters
    ----------
    params : Params
        The run's params (federation, aggregation, distill and modality sections).
    data : AVData
        The clients' audio-visual rows, the test and validation splits.
    student : torch.nn.Module
        The student's model (log-mel audio to logits; it carries its architecture spec), with the weights it starts
        from under ``distill.student_init: logged``; under ``random`` they are replaced, in place, by the spec's
        architecture drawn from ``federation.seed``. The plan scores and logs with it; each worker trains a copy.
    student_inputs : sequence of str
        The inputs the student takes (must be ``("audio",)``).
    teacher : callable
        The frozen teacher (a torch module is put in eval mode).
    teacher_inputs : sequence of str
        The inputs the teacher takes, in call order (``audio`` and/or ``visual``).
    name : str, optional
        How messages name the student (its URI).

    Raises
    ------
    ValueError
        If the student is not a trainable torch module of audio with a spec, or no client holds every input of the
        teacher.
    """

    stage = "distill"

    def __init__(self, params: Params, data: AVData, student: Any, student_inputs: Sequence[str], teacher: Any,
                 teacher_inputs: Sequence[str], *, name: str = "student") -> None:
        fed, cfg = params.federation, params.distill
        if not isinstance(student, nn.Module) or not any(p.requires_grad for p in student.parameters()):
            raise ValueError(f"distill: the student {name!r} must load as a trainable torch nn.Module (a model "
                             "logged by this project's stages, as the modality stage logs its audio branch). Got "
                             f"{type(student).__name__}.")
        if tuple(student_inputs) != AUDIO_INPUTS:
            raise ValueError(f"distill: the student must take audio alone. {name!r} takes {tuple(student_inputs)!r}.")
        if spec_of(student) is None:  # e.g. a pickled model loaded under mlflow.trust_pickle: no spec to log it with
            raise ValueError(f"distill: the student {name!r} must carry an architecture spec (model_spec.json), "
                             "since every round's student is logged as spec + safetensors. Got a model without one. "
                             "Fix: start from a model logged by this project's stages (e.g. the modality stage's "
                             "audio branch).")
        self.eligible = list(data.video) if "visual" in teacher_inputs else list(range(data.num_clients))
        if not self.eligible:
            raise ValueError(f"distill: no client holds every input of the teacher ({', '.join(teacher_inputs)}). "
                             "Fix: lower modality.missing_rate.")
        if isinstance(teacher, nn.Module):
            teacher.eval()
        if cfg.student_init == "random":  # same architecture, fresh weights (the spec was checked above)
            spec = spec_of(student)
            assert spec is not None
            student.load_state_dict(build(spec, torch.Generator().manual_seed(fed.seed)).state_dict())
        self.params, self.data = params, data
        self.student, self.teacher, self.teacher_inputs = student, teacher, tuple(teacher_inputs)
        self.rounds, self.min_accepted = cfg.rounds, fed.min_accepted
        self.spec = DistillSpec(fed, cfg)
        self.aggregator = build_aggregator(params)
        self.initial = to_cpu_state(student)

    @override
    def jobs(self, server_round: int, state: StateDict) -> tuple[list[int], list[Job]]:
        fed = self.params.federation
        picked = sample_clients(len(self.eligible), fed.client_fraction, fed.min_clients,
                                round_rng(fed.seed, server_round))
        sampled = [self.eligible[i] for i in picked]
        return sampled, [
            Job(c, server_round, train_student_job, (self.spec, c, server_round, self.student, state, self.teacher,
                                                     self.teacher_inputs, self.data.train[c]),
                threads=fed.client_threads)
            for c in sampled]

    @override
    def combine(self, state: StateDict, updates: Sequence[ClientUpdate], failed: Mapping[int, str],
                server_round: int, min_accepted: int) -> RoundResult:
        result = self.aggregator.aggregate(state, updates, server_round, failed=failed, min_accepted=min_accepted)
        kept = [u for u in updates if u.client_id not in result.rejected]
        metrics = {f"{name}_mean": sum(float(u.metrics[name]) for u in kept) / len(kept) for name in CLIENT_METRICS}
        metrics.update(num_clients=float(len(kept)), lr=distill_settings(self.spec, server_round).lr)
        return RoundResult({**state, **result.state}, result.rejected, metrics)

    def score(self, state: StateDict) -> dict[str, float]:
        """``audio_accuracy`` of the student ``state`` on the test split, and ``val_audio_accuracy``."""
        self.student.load_state_dict(state)
        batch = self.params.federation.eval_batch_size
        scores = evaluate_student(self.student, self.data.test, batch)
        if self.data.val is not None:
            scores["val_audio_accuracy"] = evaluate_student(self.student, self.data.val, batch)["audio_accuracy"]
        return scores

    @override
    def evaluate(self, state: StateDict, server_round: int, result: RoundResult) -> dict[str, float]:
        return self.score(state)

    @override
    def initial_metrics(self, state: StateDict) -> dict[str, float]:
        return self.score(state)
