"""Client-side local training: the one training loop and the :class:`LocalAlgorithm` hooks that change it.

Local update of client k in round t+1 (McMahan et al., AISTATS 2017, arXiv:1602.05629, Alg. 1, ClientUpdate):
starting from w ← w_t, for each of E epochs and each minibatch b of size B (shuffled), take the SGD step

    w ← w − η ∇_w [ ℓ(w; b) + h(w, w_t) ],

with ℓ the mean cross-entropy of the batch and h the algorithm's extra term (:meth:`LocalAlgorithm.extra_loss`;
0 for FedAvg, the proximal term for FedProx). Departures from Alg. 1, as in the reference benchmark: SGD with
momentum and weight decay (the optimiser is created anew each round, so no momentum crosses rounds), and every
state-dict entry (BatchNorm buffers included) is returned to the server.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fedcore.aggregation.base import ClientUpdate
from fedcore.aggregation.state import StateDict, to_cpu_state
from fedcore.config import ModelConfig
from fedcore.models.build import build_model
from fedcore.registry import Registry

#: Prefix of the personal model's entries in a client's kept state (rules with a personal model).
PERSONAL_PREFIX = "personal/"


@dataclass
class BatchLoss:
    """What an objective returns for one minibatch (see :meth:`ObjectiveSession.loss`).

    Attributes
    ----------
    loss : Tensor
        The scalar minimised (backward, then the optimiser's step).
    correct : int or None
        Correct predictions in the batch (None: the objective predicts no label).
    reported : float or None
        The batch's ``train_loss`` (mean per example); None: ``loss`` itself. E.g. mutual learning minimises both
        models' losses at once but reports the shared model's cross-entropy.
    sums : dict of str to float
        Other per-client metrics, summed over the batch's examples (e.g. ``personal_train_loss`` × batch size);
        the client reports each divided by the examples counted, as ``train_loss``.
    """

    loss: torch.Tensor
    correct: int | None = None
    reported: float | None = None
    sums: dict[str, float] = field(default_factory=dict)


class ObjectiveSession:
    """The objective bound to one client's model for one round (see :meth:`Objective.start`).

    Its hooks shape :func:`train_client`, the one minibatch loop: :meth:`loss` per batch, :meth:`parameters` the
    optimiser trains, :meth:`after_step` after each step (a second model's step, FLOP counting, a target
    network's update), :meth:`finish` at the end (restore what the session changed).
    """

    def loss(self, inputs: Any, labels: torch.Tensor,
             generator: torch.Generator) -> BatchLoss | tuple[torch.Tensor, int | None] | None:
        """The batch's loss (a :class:`BatchLoss`, or ``(loss, correct)``); None for a batch it cannot use.

        A batch the objective cannot use (e.g. a contrastive loss on a batch of one) is skipped.
        """
        raise NotImplementedError

    def parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        """The parameters the client's optimiser trains: all of ``model``'s by default."""
        return model.parameters()

    def after_step(self) -> None:
        """Run after every optimiser step (e.g. BYOL's target update); does nothing by default."""
        return None

    def finish(self) -> dict[str, float]:
        """Run once after the last step (also when training raised); metrics to report besides the loop's."""
        return {}


class CrossEntropy(ObjectiveSession):
    """Supervised objective: mean cross-entropy of the model's logits against the labels."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, int | None]:
        """Cross-entropy and the number of correct argmax predictions."""
        logits = self.model(inputs)
        loss = F.cross_entropy(logits, labels)
        return loss, int((logits.detach().argmax(dim=1) == labels).sum())


class Objective:
    """What local training minimises: supervised cross-entropy here; self-supervised methods in fedcore.ssl.

    One instance may serve many clients at once from several threads, so per-round state (BYOL's target network)
    lives in the session :meth:`start` returns, never on the instance.
    """

    #: Whether the objective reads the labels (False for self-supervised methods).
    uses_labels: bool = True

    def start(self, model: nn.Module) -> ObjectiveSession:
        """Bind the objective to ``model`` (being trained) for one client's round."""
        return CrossEntropy(model)

    def build_model(self, cfg: ModelConfig, num_classes: int, input_shape: tuple[int, int, int],
                    generator: torch.Generator) -> nn.Module:
        """The model this objective trains, with weights drawn from ``generator``: the classifier ``cfg``."""
        return build_model(cfg, num_classes, input_shape, generator)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: The default objective: supervised cross-entropy.
SUPERVISED = Objective()


@dataclass(frozen=True)
class LocalSettings:
    """Hyperparameters of one client's local training in one round (SGD; see :func:`train_client`)."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float


@dataclass
class ClientJob:
    """Everything one client needs for one round.

    Attributes
    ----------
    client_id : int
    model : torch.nn.Module
        An instance of the shared (global) architecture, owned by the worker; trained in place.
    global_state : dict of str to Tensor
        The full global state w_t (CPU; not modified).
    sent_keys : sequence of str
        Entries the client sends and the server aggregates (``federation.send``).
    local_state : dict of str to Tensor or None
        What the rule kept from this client's last round (see :meth:`LocalAlgorithm.keeps_state`); for rules with
        a personal model, never None: before the first round it holds the personal model's initial weights.
    data : ClientData
    settings : LocalSettings
    generator : torch.Generator
        CPU generator of the batch order.
    personal_model : torch.nn.Module or None
        An instance of this client's personal architecture (rules with :attr:`LocalAlgorithm.personal`).
    objective : Objective
        What local training minimises (supervised cross-entropy, or a self-supervised method).
    """

    client_id: int
    model: nn.Module
    global_state: StateDict
    sent_keys: Sequence[str]
    local_state: StateDict | None
    data: ClientData
    settings: LocalSettings
    generator: torch.Generator
    personal_model: nn.Module | None = None
    objective: Objective = SUPERVISED


@dataclass
class ClientResult:
    """What one client's round produces: the update it sends and the state it keeps (None: nothing kept)."""

    update: ClientUpdate
    local_state: StateDict | None


class LocalAlgorithm:
    """Client-side rule, expressed as hooks into :func:`train_client`.

    The default hooks give plain local SGD (FedAvg's client). One instance may train many clients at once from
    several threads, so hooks must not keep per-client state on the instance: what a client keeps between
    rounds is returned in :class:`ClientResult` and stored by the caller (on disk, one file per client).
    Rules that train a model of the client's own (FML, FedMLAC, local-only) set :attr:`personal` and override
    :meth:`run`.
    """

    #: Aggregator used when ``federation.aggregator`` is null.
    default_aggregator: str = "fedavg"

    #: Whether each client trains a personal model of its own architecture (``personal`` params section).
    personal: bool = False

    def extra_loss(self, model: nn.Module, global_state: StateDict) -> torch.Tensor | None:
        """Term h(w, w_t) added to the batch loss before the backward pass; ``None`` for no term.

        Parameters
        ----------
        model : torch.nn.Module
            The client model being trained (its parameters are w).
        global_state : dict of str to Tensor
            w_t, the global state the client started from (CPU tensors; not modified).

        Returns
        -------
        Tensor or None
            A scalar tensor connected to the model's parameters, or ``None``.
        """
        return None

    def after_step(self, model: nn.Module) -> None:
        """Run after every optimiser step (e.g. to project or clip the weights); does nothing by default."""
        return None

    #: Whether the rule needs the client's own state from its last round (:meth:`start_state`'s ``local_state``).
    needs_local_state: bool = False

    def start_state(self, global_state: StateDict, local_state: StateDict | None, model: nn.Module) -> StateDict:
        """The state local training starts from; the global state by default.

        Parameters
        ----------
        global_state : dict of str to Tensor
            What the server sent, with the entries the client does not send already taken from ``local_state``.
        local_state : dict of str to Tensor or None
            The client's full state at the end of its last round; None before its first round.
        model : torch.nn.Module
            The model being trained (for its structure, e.g. the parameter groups); not modified.
        """
        return global_state

    def keeps_state(self, sends_everything: bool) -> bool:
        """Whether clients keep a state between rounds: when they do not send every entry, or the rule needs it."""
        return self.personal or self.needs_local_state or not sends_everything

    def has_global_model(self, sends_everything: bool) -> bool:
        """Whether one shared model can be tested on its own (False: the test metrics average the clients')."""
        return sends_everything

    def personal_state(self, global_state: StateDict, local_state: StateDict | None,
                       sent_keys: Sequence[str]) -> StateDict:
        """The state of a client's own model, for personalised evaluation.

        By default the global entries it receives plus the entries it keeps (all global when it keeps none).
        """
        if local_state is None:
            return global_state
        sent = set(sent_keys)
        return {key: (value if key in sent else local_state[key]) for key, value in global_state.items()}

    def run(self, job: ClientJob) -> ClientResult:
        """One client's round: pick the start state, train with :func:`train_client`, split what is sent."""
        start = self.personal_state(job.global_state, job.local_state, job.sent_keys)
        start = self.start_state(start, job.local_state, job.model)
        trained = train_client(client_id=job.client_id, model=job.model, global_state=start, data=job.data,
                               algorithm=self, settings=job.settings, generator=job.generator,
                               objective=job.objective)
        sent = ClientUpdate(job.client_id, {k: trained.state[k] for k in job.sent_keys}, trained.num_examples,
                            trained.metrics)
        keeps = self.keeps_state(len(job.sent_keys) == len(job.global_state))
        return ClientResult(sent, trained.state if keeps else None)


LOCAL_ALGORITHMS: Registry[LocalAlgorithm] = Registry("local_algorithm")


@dataclass
class ClientData:
    """One client's local training set.

    Parameters
    ----------
    features : Tensor
        Normalised log-mel ``(n, 1, n_mels, frames)`` float32.
    labels : Tensor
        Class indices ``(n,)`` int64.

    Raises
    ------
    TypeError
        If a field is not a tensor.
    ValueError
        If shapes or dtypes differ from the above, or ``n`` is 0.
    """

    features: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.features, torch.Tensor) or not isinstance(self.labels, torch.Tensor):
            raise TypeError(
                f"ClientData: 'features' and 'labels' must be torch tensors. "
                f"Got {type(self.features).__name__} and {type(self.labels).__name__}."
            )
        if self.features.ndim != 4 or self.features.shape[1] != 1 or self.features.dtype != torch.float32:
            raise ValueError(
                "ClientData: 'features' must be (n, 1, n_mels, frames) float32. "
                f"Got {tuple(self.features.shape)!r} {self.features.dtype}."
            )
        if self.labels.ndim != 1 or self.labels.dtype != torch.int64:
            raise ValueError(
                f"ClientData: 'labels' must be (n,) int64. Got {tuple(self.labels.shape)!r} {self.labels.dtype}."
            )
        if self.labels.shape[0] != self.features.shape[0] or self.labels.shape[0] == 0:
            raise ValueError(
                "ClientData: 'labels' must have one entry per feature row, at least one. "
                f"Got {self.labels.shape[0]} labels for {self.features.shape[0]} rows."
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``index``: ``(features, labels)`` on ``device``."""
        return (self.features[index].to(device, non_blocking=True),
                self.labels[index].to(device, non_blocking=True))


class Batches(Protocol):
    """A client's training rows as :func:`train_client` reads them (:class:`ClientData`, audio-visual rows, ...)."""

    def __len__(self) -> int: ...

    def batch(self, index: torch.Tensor, device: torch.device) -> tuple[Any, torch.Tensor]:
        """Rows ``index``: ``(inputs, labels)`` on ``device`` (inputs: what the objective's ``loss`` takes)."""
        ...


def check_settings(settings: LocalSettings, where: str = "train_client") -> None:
    """Raise ValueError when a local-training hyperparameter is out of range."""
    for name in ("epochs", "batch_size"):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: '{name}' must be an int >= 1. Got {value!r}.")
    if not (math.isfinite(settings.lr) and settings.lr > 0):
        raise ValueError(f"{where}: 'lr' must be a finite float > 0. Got {settings.lr!r}.")
    if not 0 <= settings.momentum < 1:
        raise ValueError(f"{where}: 'momentum' must be in [0, 1). Got {settings.momentum!r}.")
    if not (math.isfinite(settings.weight_decay) and settings.weight_decay >= 0):
        raise ValueError(f"{where}: 'weight_decay' must be a finite float >= 0. Got {settings.weight_decay!r}.")


def check_generator(generator: torch.Generator, where: str = "train_client") -> None:
    """Raise TypeError unless ``generator`` is a CPU ``torch.Generator``."""
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError(f"{where}: 'generator' must be a CPU torch.Generator. Got {generator!r}.")


def epoch_batches(num_examples: int, settings: LocalSettings,
                  generator: torch.Generator) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(epoch, step, index)`` for E epochs of shuffled minibatches (one ``randperm`` per epoch)."""
    for epoch in range(settings.epochs):
        order = torch.randperm(num_examples, generator=generator)
        for step, start in enumerate(range(0, num_examples, settings.batch_size)):
            yield epoch, step, order[start : start + settings.batch_size]


def check_finite(where: str, client_id: int, value: float, epoch: int, step: int) -> None:
    """Raise FloatingPointError naming the client, epoch and step when a training loss is NaN or infinite."""
    if not math.isfinite(value):
        raise FloatingPointError(
            f"{where}: client {client_id}: the training loss must be finite. Got {value!r} "
            f"at epoch {epoch + 1}, step {step + 1}. Lower 'lr' or check the features."
        )


def train_client(
    *,
    client_id: int,
    model: nn.Module,
    global_state: StateDict,
    data: Batches,
    algorithm: LocalAlgorithm,
    settings: LocalSettings,
    generator: torch.Generator,
    objective: Objective = SUPERVISED,
) -> ClientUpdate:
    """Train one client from the global state and return its update.

    Parameters
    ----------
    client_id : int
        Id of the client, reported in the update and in errors.
    model : torch.nn.Module
        A model instance of the global architecture, owned by the caller's worker; ``global_state`` is loaded
        into it (strict) and it is trained in place, on its own device.
    global_state : dict of str to Tensor
        w_t; not modified.
    data : Batches
        The local training set (n examples): :class:`ClientData`, or any rows with ``batch(index, device)``.
    algorithm : LocalAlgorithm
        Client-side rule (its hooks are called at every step).
    settings : LocalSettings
        E local epochs (>= 1); batch size B (>= 1; the last batch of an epoch may be smaller, none is dropped);
        SGD lr, momentum and weight decay (a new optimiser is created for this call).
    generator : torch.Generator
        CPU generator of the batch order (one ``randperm`` per epoch); see
        :func:`fedcore.federation.sampling.client_generator`; self-supervised objectives also draw their
        augmentations from it.
    objective : Objective
        The batch loss ℓ (supervised cross-entropy by default).

    Returns
    -------
    ClientUpdate
        ``state``: detached CPU copies of the trained state dict; ``num_examples``: n; ``metrics``:
        ``train_loss`` (sample-weighted mean of the objective over the last epoch, before each step, without the
        extra term), ``train_accuracy`` (share of correct predictions over the last epoch, same forward passes;
        absent when the objective predicts no label) and ``num_batches`` (optimiser steps over all epochs).
        Batches the objective cannot use (a contrastive batch of one) are skipped and not counted.

    Raises
    ------
    ValueError
        If a hyperparameter is out of range.
    FloatingPointError
        If the loss (with the extra term) is NaN or infinite at some step.
    ValueError
        If the objective could use no batch of the last epoch.
    """
    check_settings(settings)
    check_generator(generator)
    model.load_state_dict(global_state, strict=True)
    model.train()
    device = next(model.parameters()).device
    session = objective.start(model)
    try:
        optimizer = torch.optim.SGD(session.parameters(model), lr=settings.lr, momentum=settings.momentum,
                                    weight_decay=settings.weight_decay)
        num_examples = len(data)
        num_batches = 0
        loss_sum, num_correct, counted = 0.0, 0, 0
        sums: dict[str, float] = {}
        predicts = True
        for epoch, step, index in epoch_batches(num_examples, settings, generator):
            if step == 0:  # the metrics cover the last epoch
                loss_sum, num_correct, counted, sums = 0.0, 0, 0, {}
            inputs, labels = data.batch(index, device)
            optimizer.zero_grad(set_to_none=True)
            batch = session.loss(inputs, labels, generator)
            if batch is None:
                continue
            if not isinstance(batch, BatchLoss):
                batch = BatchLoss(*batch)
            extra = algorithm.extra_loss(model, global_state)
            total = batch.loss if extra is None else batch.loss + extra
            check_finite("train_client", client_id, float(total.detach()), epoch, step)
            total.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            algorithm.after_step(model)
            session.after_step()
            num_batches += 1
            size = index.numel()
            loss_sum += (float(batch.loss.detach()) if batch.reported is None else batch.reported) * size
            counted += size
            predicts = predicts and batch.correct is not None
            num_correct += batch.correct or 0
            for name, value in batch.sums.items():
                sums[name] = sums.get(name, 0.0) + value
    finally:
        finished = session.finish()
    if counted == 0:
        raise ValueError(f"train_client: client {client_id}: the objective used no batch of its {num_examples} "
                         f"examples (batch size {settings.batch_size}); it needs larger batches.")
    metrics = {"train_loss": loss_sum / counted}
    if predicts:
        metrics["train_accuracy"] = num_correct / counted
    metrics.update({name: value / counted for name, value in sums.items()})
    metrics["num_batches"] = float(num_batches)
    metrics.update(finished)
    return ClientUpdate(client_id=client_id, state=to_cpu_state(model), num_examples=num_examples, metrics=metrics)
