"""Local training of audio-visual clients: per-modality tasks on one model, and distillation into a student.

A client's round trains one or more :data:`LOCAL_TASKS` on the same shuffled minibatches (their losses summed;
each task trains its own parameter groups of :class:`~fedcore.multimodal.models.AVModel`), and sends exactly the
groups it trained, so that the server aggregates each group over the clients that hold its modality
(:func:`fedcore.multimodal.aggregate.modality_wise`).

Tasks: ``audio`` (audio encoder + audio head, CE), ``visual`` (visual encoder + visual head, CE), ``av`` (both
encoders + fusion, CE of the fused logits; a client without video feeds zeros when the method zero-fills, as
MultiFL does), ``fusion`` (the fusion head alone on frozen encoders: Harmony's second stage).

Distillation (ModalityMirror phase 2, or any teacher → student): ``CE(s(x), y) + λ·T²·KL(softmax(t/T) ‖
softmax(s/T))`` with the teacher frozen (:func:`kd_loss`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedcore.aggregation.base import ClientUpdate
from fedcore.aggregation.state import StateDict, to_cpu_state
from fedcore.algorithms.base import LocalSettings, check_finite, check_generator, check_settings, epoch_batches
from fedcore.algorithms.mutual import distillation_kl
from fedcore.multimodal.models import AVModel, group_keys, seed_dropout
from fedcore.registry import Registry


@dataclass
class AVClientData:
    """One client's examples.

    ``audio``: log-mel ``(n, 1, n_mels, frames)``; ``visual``: ``(n, ...)``, or None when the client has no video;
    ``labels``: ``(n,)`` int64.
    """

    audio: torch.Tensor
    visual: torch.Tensor | None
    labels: torch.Tensor

    def __post_init__(self) -> None:
        n = int(self.labels.shape[0])
        if self.audio.ndim != 4 or int(self.audio.shape[0]) != n or n == 0:
            raise ValueError(f"AVClientData: 'audio' must be (n, 1, n_mels, frames) with one row per label, n >= 1. "
                             f"Got {tuple(self.audio.shape)!r} for {n} labels.")
        if self.visual is not None and int(self.visual.shape[0]) != n:
            raise ValueError(f"AVClientData: 'visual' must have one row per label. Got {tuple(self.visual.shape)!r} "
                             f"for {n} labels.")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def has_video(self) -> bool:
        """Whether the client holds the visual modality."""
        return self.visual is not None


@dataclass(frozen=True)
class LocalTask:
    """One supervised loss of a client's round and the parameter groups it trains."""

    groups: tuple[str, ...]
    #: Whether the task reads the visual input (a client without video zero-fills it or cannot run the task).
    needs_visual: bool
    loss: Callable[[AVModel, torch.Tensor, torch.Tensor | None], torch.Tensor]
    #: Groups run without gradient (frozen encoders) in this task.
    frozen: tuple[str, ...] = ()


LOCAL_TASKS: Registry[LocalTask] = Registry("av_task")


def _fused_logits(model: AVModel, audio: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
    assert visual is not None
    return model(audio, visual)


def _frozen_fusion_logits(model: AVModel, audio: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
    assert visual is not None
    with torch.no_grad():
        audio_emb, visual_emb = model.audio(audio), model.visual(visual)
    logits: torch.Tensor = model.fusion(audio_emb, visual_emb)
    return logits


def _visual_logits(model: AVModel, audio: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
    assert visual is not None
    return model.visual_logits(visual)


LOCAL_TASKS.register("audio")(lambda: LocalTask(("audio", "audio_head"), False,
                                                lambda m, a, v: m.audio_logits(a)))
LOCAL_TASKS.register("visual")(lambda: LocalTask(("visual", "visual_head"), True, _visual_logits))
LOCAL_TASKS.register("av")(lambda: LocalTask(("audio", "visual", "fusion"), True, _fused_logits))
LOCAL_TASKS.register("fusion")(lambda: LocalTask(("fusion",), True, _frozen_fusion_logits, ("audio", "visual")))


def task_groups(tasks: Sequence[str]) -> tuple[str, ...]:
    """The parameter groups the ``tasks`` train (union, first-seen order)."""
    groups: list[str] = []
    for name in tasks:
        for group in LOCAL_TASKS.build(name).groups:
            if group not in groups:
                groups.append(group)
    return tuple(groups)


def train_av_client(*, client_id: int, model: AVModel, global_state: StateDict, data: AVClientData,
                    tasks: Sequence[str], settings: LocalSettings, generator: torch.Generator,
                    zero_fill: bool = False) -> ClientUpdate:
    """Train ``tasks`` on one client from ``global_state`` and return the trained groups' entries.

    Parameters
    ----------
    client_id : int
    model : AVModel
        Worker-owned instance; ``global_state`` is loaded (strict) and it is trained in place.
    global_state : dict of str to Tensor
        The full global state (not modified).
    data : AVClientData
    tasks : sequence of str
        :data:`LOCAL_TASKS` names, at least one; their losses are summed on every minibatch.
    settings : LocalSettings
        SGD settings (a new optimiser over the trained groups' parameters).
    generator : torch.Generator
        CPU generator of the batch order and of the dropout masks.
    zero_fill : bool
        A client without video feeds zeros to tasks that read the visual input (MultiFL); when False such a
        task is an error.

    Returns
    -------
    ClientUpdate
        ``state``: the entries (parameters and buffers) of the trained groups only; ``metrics``: ``train_loss``
        (summed task losses, sample-weighted mean over the last epoch), ``train_accuracy`` of the first task's
        logits, ``num_batches``.

    Raises
    ------
    ValueError
        If ``tasks`` is empty or names an unknown task, or a task needs video the client lacks without
        ``zero_fill``; if a hyperparameter is out of range.
    FloatingPointError
        If the loss is NaN or infinite.
    """
    check_settings(settings, "train_av_client")
    check_generator(generator, "train_av_client")
    if not tasks:
        raise ValueError(f"train_av_client: client {client_id}: 'tasks' must name at least one task. Got [].")
    built = [LOCAL_TASKS.build(name) for name in tasks]
    for name, task in zip(tasks, built, strict=True):
        if task.needs_visual and not data.has_video and not zero_fill:
            raise ValueError(f"train_av_client: client {client_id} has no video, so it cannot train task {name!r} "
                             f"(it needs the visual input). Fix: give it audio-only tasks, or zero_fill=True.")
    groups = task_groups(tasks)
    model.load_state_dict(global_state, strict=True)
    model.train()
    seed_dropout(model, generator)  # dropout masks from the client's generator: reproducible across threads
    frozen = {g for task in built for g in task.frozen} - set(groups)
    for group in frozen:  # frozen encoders: no BatchNorm statistics update either
        getattr(model, group).eval()
    params = [p for g in groups for p in getattr(model, g).parameters()]
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    visual_all = data.visual
    if visual_all is None and any(task.needs_visual for task in built):
        visual_all = torch.zeros((len(data), *model.visual_shape), dtype=data.audio.dtype)
    num_batches, loss_sum, correct, counted = 0, 0.0, 0, 0
    for epoch, step, index in epoch_batches(len(data), settings, generator):
        if step == 0:
            loss_sum, correct, counted = 0.0, 0, 0
        audio, labels = data.audio[index], data.labels[index]
        visual = None if visual_all is None else visual_all[index]
        optimizer.zero_grad(set_to_none=True)
        total: torch.Tensor | None = None
        first_logits: torch.Tensor | None = None
        for task in built:
            logits = task.loss(model, audio, visual)
            loss = F.cross_entropy(logits, labels)
            total = loss if total is None else total + loss
            first_logits = logits if first_logits is None else first_logits
        assert total is not None and first_logits is not None
        check_finite("train_av_client", client_id, float(total.detach()), epoch, step)
        total.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        num_batches += 1
        loss_sum += float(total.detach()) * index.numel()
        correct += int((first_logits.detach().argmax(dim=1) == labels).sum())
        counted += index.numel()
    seed_dropout(model, None)
    state = to_cpu_state(model)
    keys = group_keys(list(state), groups)
    metrics = {"train_loss": loss_sum / counted, "train_accuracy": correct / counted,
               "num_batches": float(num_batches)}
    return ClientUpdate(client_id=client_id, state={k: state[k] for k in keys}, num_examples=len(data),
                        metrics=metrics)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
            lambd: float, temperature: float) -> torch.Tensor:
    """``CE(student, y) + λ·T²·KL( softmax(teacher/T) ‖ softmax(student/T) )`` (batchmean; teacher detached)."""
    return F.cross_entropy(student_logits, labels) + lambd * distillation_kl(
        student_logits, teacher_logits, temperature, t2_scale=True)


def train_student(*, client_id: int, student: nn.Module, student_state: StateDict,
                  teacher: Callable[..., torch.Tensor], teacher_inputs: Sequence[str], data: AVClientData,
                  settings: LocalSettings, generator: torch.Generator, lambd: float,
                  temperature: float) -> ClientUpdate:
    """Distil the frozen ``teacher`` into ``student`` (audio input) on one client and return the student's state.

    Parameters
    ----------
    student : torch.nn.Module
        Maps log-mel audio to logits; ``student_state`` is loaded (strict) and it is trained in place.
    teacher : callable
        Frozen; called with the inputs named in ``teacher_inputs`` (``("audio",)`` or ``("audio", "visual")``)
        under ``torch.no_grad``.
    data : AVClientData
        Must hold video when the teacher reads it.
    lambd, temperature : float
        λ >= 0 and T > 0 of :func:`kd_loss`.

    Returns
    -------
    ClientUpdate
        The student's full state; metrics ``train_loss`` (KD loss), ``train_accuracy`` (student),
        ``teacher_accuracy`` (on the same batches), ``num_batches``.
    """
    check_settings(settings, "train_student")
    check_generator(generator, "train_student")
    if lambd < 0 or not temperature > 0:
        raise ValueError(f"train_student: 'lambd' must be >= 0 and 'temperature' > 0. Got {lambd!r}, "
                         f"{temperature!r}.")
    unknown = sorted(set(teacher_inputs) - {"audio", "visual"})
    if unknown or not teacher_inputs:
        raise ValueError(f"train_student: 'teacher_inputs' must name audio and/or visual. Got {teacher_inputs!r}.")
    if "visual" in teacher_inputs and not data.has_video:
        raise ValueError(f"train_student: client {client_id} has no video, which the teacher reads. "
                         "Fix: distil on the clients that hold every input of the teacher.")
    student.load_state_dict(student_state, strict=True)
    student.train()
    seed_dropout(student, generator)
    optimizer = torch.optim.SGD(student.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    sources = {"audio": data.audio, "visual": data.visual}
    num_batches, loss_sum, correct, teacher_correct, counted = 0, 0.0, 0, 0, 0
    for epoch, step, index in epoch_batches(len(data), settings, generator):
        if step == 0:
            loss_sum, correct, teacher_correct, counted = 0.0, 0, 0, 0
        labels = data.labels[index]
        with torch.no_grad():
            teacher_logits = teacher(*(sources[name][index] for name in teacher_inputs))  # type: ignore[index]
        optimizer.zero_grad(set_to_none=True)
        logits = student(data.audio[index])
        loss = kd_loss(logits, teacher_logits, labels, lambd=lambd, temperature=temperature)
        check_finite("train_student", client_id, float(loss.detach()), epoch, step)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        num_batches += 1
        loss_sum += float(loss.detach()) * index.numel()
        correct += int((logits.detach().argmax(dim=1) == labels).sum())
        teacher_correct += int((teacher_logits.argmax(dim=1) == labels).sum())
        counted += index.numel()
    seed_dropout(student, None)
    metrics = {"train_loss": loss_sum / counted, "train_accuracy": correct / counted,
               "teacher_accuracy": teacher_correct / counted, "num_batches": float(num_batches)}
    return ClientUpdate(client_id=client_id, state=to_cpu_state(student), num_examples=len(data), metrics=metrics)


@torch.no_grad()
def accuracy(predict: Callable[[slice], torch.Tensor], labels: torch.Tensor, batch_size: int) -> float:
    """Top-1 accuracy of ``predict(rows) -> logits`` over ``labels``, in batches of ``batch_size`` rows."""
    correct = 0
    for start in range(0, int(labels.shape[0]), batch_size):
        rows = slice(start, start + batch_size)
        correct += int((predict(rows).argmax(dim=1) == labels[rows]).sum())
    return correct / int(labels.shape[0])
