"""Local training of audio-visual clients as objectives of the one client loop: per-modality tasks, distillation.

Both run in :func:`fedcore.algorithms.base.train_client` (shuffled minibatches, SGD, the per-client metrics'
one definition); what is particular to them is an :class:`~fedcore.algorithms.base.Objective`:

- :class:`AVTasks`: a client's round trains one or more :data:`LOCAL_TASKS` on the same minibatches (their
  losses summed, each with its weight: ``Σ_task w_task·CE_task``, w = 1 unless the method says otherwise; each
  task trains its own parameter groups of :class:`~fedcore.multimodal.models.AVModel`, the optimiser's
  parameters), and :func:`train_av_client` sends exactly the groups it trained, so that the server aggregates
  each group over the clients that hold its modality (:func:`fedcore.multimodal.aggregate.modality_wise`).
  Tasks: ``audio`` (audio encoder + audio head, CE), ``visual`` (visual encoder + visual head, CE), ``av`` (both
  encoders + fusion, CE of the fused logits; a client without video feeds zeros when the method zero-fills, as
  MultiFL does; ModalityMirror's clients with video train ``av`` + w·``audio``, so they send the audio head too),
  ``fusion`` (the fusion head alone on frozen encoders: Harmony's second stage; the frozen
  encoders are put in eval mode for the round, so their BatchNorm statistics stay as sent).
- :class:`Distillation` (ModalityMirror phase 2, or any teacher → student): ``CE(s(x), y) + λ·T²·KL(softmax(t/T)
  ‖ softmax(s/T))`` with the teacher frozen inside the session (:func:`kd_loss`); :func:`train_student`.

The models' dropout masks come from the client's generator (:func:`~fedcore.multimodal.models.seed_dropout`) for
the round, so a round reproduces whatever thread runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedcore.aggregation.base import ClientUpdate
from fedcore.aggregation.state import StateDict
from fedcore.algorithms.base import (
    BatchLoss,
    LocalAlgorithm,
    LocalSettings,
    Objective,
    ObjectiveSession,
    check_generator,
    check_settings,
    train_client,
)
from fedcore.algorithms.mutual import distillation_kl
from fedcore.multimodal.models import AVModel, group_keys, seed_dropout
from fedcore.registry import Registry

#: The client-side rule of the audio-visual methods: plain local SGD (no extra term, no kept state).
PLAIN_SGD = LocalAlgorithm()

#: One batch of a client's rows: ``(audio, visual)`` (visual None for a client without video) and the labels.
AVInputs = tuple[torch.Tensor, torch.Tensor | None]


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

    def batch(self, index: torch.Tensor, device: torch.device) -> tuple[AVInputs, torch.Tensor]:
        """Rows ``index``: ``((audio, visual or None), labels)`` on ``device`` (what :func:`train_client` reads)."""
        visual = None if self.visual is None else self.visual[index].to(device, non_blocking=True)
        return ((self.audio[index].to(device, non_blocking=True), visual),
                self.labels[index].to(device, non_blocking=True))


@dataclass(frozen=True)
class AVData:
    """The clients' audio-visual training data, the validation and test splits, as tensors.

    ``val`` pools the clients' held-out rows (``partition.holdout_fraction``; None when there are none): the split
    hyperparameters are chosen on, while ``test`` only reports. ``video``: the ids of the clients that hold video.
    """

    train: list[AVClientData]
    test: AVClientData
    num_classes: int
    audio_shape: tuple[int, int, int]
    visual_shape: tuple[int, ...]
    video: list[int]
    val: AVClientData | None = None

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.train)


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
    logits: torch.Tensor = model(audio, visual)
    return logits


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


class _SeededSession(ObjectiveSession):
    """A session whose model draws its dropout masks from the client's generator until :meth:`finish`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._generator: torch.Generator | None = None

    def seed(self, generator: torch.Generator) -> None:
        """Point the model's dropout at ``generator`` (the loop's, the same for every batch of the round)."""
        if generator is not self._generator:
            seed_dropout(self.model, generator)
            self._generator = generator

    def finish(self) -> dict[str, float]:
        """Detach the generator (the model stays picklable and draws from the global RNG again)."""
        seed_dropout(self.model, None)
        return {}


class AVTasks(Objective):
    """The summed cross-entropies of per-modality ``tasks`` on an :class:`AVModel` (module docstring).

    Parameters
    ----------
    tasks : sequence of str
        :data:`LOCAL_TASKS` names, at least one.
    zero_fill : bool
        A batch without video feeds zeros ``(batch, *model.visual_shape)`` to the tasks that read it (MultiFL).
    weights : Mapping of str to float, optional
        Weight w_task >= 0 of each task's loss (a task not named weighs 1): the loss is ``Σ w_task·CE_task``.

    Reported: ``train_loss`` (the weighted sum of the task losses) and ``train_accuracy`` of the first task's logits.
    """

    def __init__(self, tasks: Sequence[str], zero_fill: bool = False,
                 weights: Mapping[str, float] | None = None) -> None:
        if not tasks:
            raise ValueError("AVTasks: 'tasks' must name at least one task. Got [].")
        weights = dict(weights or {})
        if unknown := sorted(set(weights) - set(tasks)):
            raise ValueError(f"AVTasks: 'weights' names tasks not trained: {unknown!r} (tasks {list(tasks)!r}).")
        if bad := {k: w for k, w in weights.items() if not float(w) >= 0}:
            raise ValueError(f"AVTasks: task weights must be >= 0. Got {bad!r}.")
        self.names = tuple(tasks)
        self.tasks = tuple(LOCAL_TASKS.build(name) for name in tasks)
        self.weights = tuple(float(weights.get(name, 1.0)) for name in tasks)
        self.groups = task_groups(tasks)
        self.zero_fill = zero_fill

    @property
    def needs_visual(self) -> bool:
        """Whether a task reads the visual input."""
        return any(task.needs_visual for task in self.tasks)

    def start(self, model: nn.Module) -> ObjectiveSession:
        """Bind to ``model`` (an :class:`AVModel` in train mode); frozen encoders go to eval mode."""
        if not isinstance(model, AVModel):
            raise TypeError(f"AVTasks: the model must be an AVModel. Got {type(model).__name__}.")
        return _AVSession(self, model)


class _AVSession(_SeededSession):
    def __init__(self, objective: AVTasks, model: AVModel) -> None:
        super().__init__(model)
        self.objective, self.av = objective, model
        frozen = {g for task in objective.tasks for g in task.frozen} - set(objective.groups)
        for group in frozen:  # frozen encoders: no BatchNorm statistics update either
            getattr(model, group).eval()

    def parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        """The trained groups' parameters (the frozen and unused groups are left alone)."""
        return [p for g in self.objective.groups for p in getattr(model, g).parameters()]

    def loss(self, inputs: AVInputs, labels: torch.Tensor, generator: torch.Generator) -> BatchLoss:
        """Σ over the tasks of w_task·CE(logits, labels); correct predictions of the first task."""
        self.seed(generator)
        audio, visual = inputs
        if visual is None and self.objective.needs_visual:  # only with zero_fill (checked by the caller)
            visual = torch.zeros((audio.shape[0], *self.av.visual_shape), dtype=audio.dtype, device=audio.device)
        total: torch.Tensor | None = None
        first: torch.Tensor | None = None
        for task, weight in zip(self.objective.tasks, self.objective.weights, strict=True):
            logits = task.loss(self.av, audio, visual)
            loss = F.cross_entropy(logits, labels)
            loss = loss if weight == 1.0 else weight * loss
            total = loss if total is None else total + loss
            first = logits if first is None else first
        assert total is not None and first is not None
        return BatchLoss(total, int((first.detach().argmax(dim=1) == labels).sum()))


def train_av_client(*, client_id: int, model: AVModel, global_state: StateDict, data: AVClientData,
                    tasks: Sequence[str], settings: LocalSettings, generator: torch.Generator,
                    zero_fill: bool = False, weights: Mapping[str, float] | None = None) -> ClientUpdate:
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
        :data:`LOCAL_TASKS` names, at least one; their losses are summed on every minibatch (:class:`AVTasks`).
    settings : LocalSettings
        SGD settings (a new optimiser over the trained groups' parameters).
    generator : torch.Generator
        CPU generator of the batch order and of the dropout masks.
    zero_fill : bool
        A client without video feeds zeros to tasks that read the visual input (MultiFL); when False such a
        task is an error.
    weights : Mapping of str to float, optional
        The loss weight of each task (a task not named weighs 1; :class:`AVTasks`).

    Returns
    -------
    ClientUpdate
        ``state``: the entries (parameters and buffers) of the trained groups only; ``metrics``: those of
        :func:`~fedcore.algorithms.base.train_client`: ``train_loss`` (weighted sum of the task losses, per
        example, last epoch), ``train_accuracy`` of the first task's logits, ``num_batches``.

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
    objective = AVTasks(tasks, zero_fill, weights)
    for name, task in zip(tasks, objective.tasks, strict=True):
        if task.needs_visual and not data.has_video and not zero_fill:
            raise ValueError(f"train_av_client: client {client_id} has no video, so it cannot train task {name!r} "
                             f"(it needs the visual input). Fix: give it audio-only tasks, or zero_fill=True.")
    trained = train_client(client_id=client_id, model=model, global_state=global_state, data=data,
                           algorithm=PLAIN_SGD, settings=settings, generator=generator, objective=objective)
    keys = group_keys(list(trained.state), objective.groups)
    return ClientUpdate(client_id=client_id, state={k: trained.state[k] for k in keys},
                        num_examples=trained.num_examples, metrics=trained.metrics)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
            lambd: float, temperature: float) -> torch.Tensor:
    """``CE(student, y) + λ·T²·KL( softmax(teacher/T) ‖ softmax(student/T) )`` (batchmean; teacher detached)."""
    return F.cross_entropy(student_logits, labels) + lambd * distillation_kl(
        student_logits, teacher_logits, temperature, t2_scale=True)


#: The inputs a teacher may read, by name, from a batch's ``(audio, visual)``.
TEACHER_INPUTS = ("audio", "visual")


class Distillation(Objective):
    """Knowledge distillation of a frozen ``teacher`` into the trained student (:func:`kd_loss`).

    Parameters
    ----------
    teacher : callable
        Frozen; called with the inputs named in ``teacher_inputs`` under ``torch.no_grad`` (a torch module is put
        in eval mode here, and no session trains it).
    teacher_inputs : sequence of str
        ``("audio",)`` or ``("audio", "visual")`` (a batch without video cannot feed the latter).
    lambd, temperature : float
        λ >= 0 and T > 0 of :func:`kd_loss`.

    Reported: ``train_loss`` (the KD loss), ``train_accuracy`` (student) and ``teacher_accuracy`` (the teacher on
    the same batches, per example over the last epoch, like the loop's metrics).
    """

    def __init__(self, teacher: Callable[..., torch.Tensor], teacher_inputs: Sequence[str], *, lambd: float,
                 temperature: float) -> None:
        if lambd < 0 or not temperature > 0:
            raise ValueError(f"Distillation: 'lambd' must be >= 0 and 'temperature' > 0. Got {lambd!r}, "
                             f"{temperature!r}.")
        unknown = sorted(set(teacher_inputs) - set(TEACHER_INPUTS))
        if unknown or not teacher_inputs:
            raise ValueError(f"Distillation: 'teacher_inputs' must name audio and/or visual. Got {teacher_inputs!r}.")
        if isinstance(teacher, nn.Module):
            teacher.eval()  # frozen: no dropout, no BatchNorm statistics update (its sessions never train it)
        self.teacher, self.teacher_inputs = teacher, tuple(teacher_inputs)
        self.lambd, self.temperature = float(lambd), float(temperature)

    def start(self, model: nn.Module) -> ObjectiveSession:
        """Bind to the student ``model``."""
        return _DistillSession(self, model)


class _DistillSession(_SeededSession):
    def __init__(self, objective: Distillation, student: nn.Module) -> None:
        super().__init__(student)
        self.objective = objective

    def loss(self, inputs: AVInputs, labels: torch.Tensor, generator: torch.Generator) -> BatchLoss:
        """The KD loss of the student on the batch's audio; the teacher's correct predictions as a sum."""
        self.seed(generator)
        objective = self.objective
        sources = dict(zip(TEACHER_INPUTS, inputs, strict=True))
        with torch.no_grad():
            teacher_logits = objective.teacher(*(sources[name] for name in objective.teacher_inputs))
        logits = self.model(sources["audio"])
        loss = kd_loss(logits, teacher_logits, labels, lambd=objective.lambd, temperature=objective.temperature)
        correct = int((logits.detach().argmax(dim=1) == labels).sum())
        teacher_correct = float((teacher_logits.argmax(dim=1) == labels).sum())
        return BatchLoss(loss, correct, sums={"teacher_accuracy": teacher_correct})


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
    objective = Distillation(teacher, teacher_inputs, lambd=lambd, temperature=temperature)
    if "visual" in objective.teacher_inputs and not data.has_video:
        raise ValueError(f"train_student: client {client_id} has no video, which the teacher reads. "
                         "Fix: distil on the clients that hold every input of the teacher.")
    return train_client(client_id=client_id, model=student, global_state=student_state, data=data,
                        algorithm=PLAIN_SGD, settings=settings, generator=generator, objective=objective)


@torch.no_grad()
def accuracy(predict: Callable[[slice], torch.Tensor], labels: torch.Tensor, batch_size: int) -> float:
    """Top-1 accuracy of ``predict(rows) -> logits`` over ``labels``, in batches of ``batch_size`` rows."""
    correct = 0
    for start in range(0, int(labels.shape[0]), batch_size):
        rows = slice(start, start + batch_size)
        correct += int((predict(rows).argmax(dim=1) == labels[rows]).sum())
    return correct / int(labels.shape[0])
