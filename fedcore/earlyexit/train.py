"""Local training of an early-exit client: an objective of the one minibatch loop, and its compute accounting.

A client with exit depth d runs the stem and layers 1..d (never the layers above), minimises the cross-entropy
of the head at d (with ``deep_supervision``: the sum over every exit at or below d, as Fed-EE does), updates only
the entries it trains (:meth:`~fedcore.earlyexit.models.EarlyExitModel.trained_keys`: with ``exit_norm:
per_exit`` the norm of each exit it trains, never a deeper exit's) and sends exactly those.

:class:`ExitDepth` is that objective; :func:`fedcore.algorithms.base.train_client` (the one minibatch loop) runs
it through the hooks of its session (:class:`ExitSession`):

- ``loss``: the exits' loss up to d, and the correct predictions of the exit at d;
- ``parameters``: the entries up to d (every other parameter has ``requires_grad`` off while the client trains);
- ``after_step``: the training FLOPs of the batch just stepped, counted from the model
  (:func:`fedcore.earlyexit.flops.count_flops`) once per (architecture, depth, batch shape, deep supervision)
  and cached; the count's own forward and backward are timed apart, so they are not training time;
- ``finish``: ``requires_grad`` restored (also when training raised), and the metrics ``train_flops``,
  ``flops_per_example``, ``bytes_sent`` (the entries up to d), ``depth`` and ``flop_counting_seconds``.

:func:`train_exit_client` is one client's round: the objective run by ``train_client``, the trained entries
sent, and ``train_seconds`` measured around the call (without the counting).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fedcore.aggregation.base import ClientUpdate
from fedcore.aggregation.state import StateDict, state_nbytes
from fedcore.algorithms.base import (
    ClientData,
    LocalAlgorithm,
    LocalSettings,
    Objective,
    ObjectiveSession,
    train_client,
)
from fedcore.earlyexit.flops import count_flops
from fedcore.earlyexit.models import EarlyExitModel

#: The client-side rule of early-exit clients: plain local SGD (no extra term), the objective does the rest.
PLAIN_SGD = LocalAlgorithm()


def exit_loss(model: EarlyExitModel, inputs: torch.Tensor, labels: torch.Tensor, depth: int,
              deep_supervision: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The client's loss and the logits of its own exit (``depth``)."""
    logits = model.exit_logits(inputs, depth)
    if deep_supervision:
        loss = torch.stack([F.cross_entropy(out, labels) for out in logits.values()]).sum()
    else:
        loss = F.cross_entropy(logits[depth], labels)
    return loss, logits[depth]


_FLOPS: dict[tuple[object, ...], int] = {}
_FLOPS_LOCK = threading.Lock()


def step_flops(model: EarlyExitModel, inputs: torch.Tensor, labels: torch.Tensor, depth: int,
               deep_supervision: bool) -> int:
    """Training FLOPs (forward + backward) of one batch of this shape at ``depth``; cached per architecture.

    Runs one extra forward and backward under the counter on a cache miss (its gradients are discarded; the
    models here hold no dropout and no running statistics, so it changes nothing else).
    """
    shapes = tuple((name, tuple(p.shape), p.requires_grad) for name, p in model.named_parameters())
    key = (shapes, tuple(model.exits), depth, deep_supervision, tuple(inputs.shape))
    with _FLOPS_LOCK:
        if key in _FLOPS:
            return _FLOPS[key]
    count = count_flops(lambda: exit_loss(model, inputs, labels, depth, deep_supervision)[0]).total
    model.zero_grad(set_to_none=True)
    with _FLOPS_LOCK:
        _FLOPS[key] = count
    return count


class ExitSession(ObjectiveSession):
    """:class:`ExitDepth` bound to one client's model for one round (see the module docstring).

    Parameters
    ----------
    model : EarlyExitModel
        The client's model (being trained); the parameters above ``depth`` get ``requires_grad`` off until
        :meth:`finish`.
    depth : int
        The client's exit depth (one of ``model.exits``).
    deep_supervision : bool
        Sum the cross-entropies of every exit at or below ``depth``.
    """

    def __init__(self, model: EarlyExitModel, depth: int, deep_supervision: bool) -> None:
        self.model, self.depth, self.deep_supervision = model, depth, deep_supervision
        #: The entries the client trains and sends.
        self.keys = model.trained_keys(depth, deep_supervision)
        trained = set(self.keys)
        self._params = dict(model.named_parameters())
        self._previous = {name: p.requires_grad for name, p in self._params.items()}
        for name, parameter in self._params.items():
            parameter.requires_grad_(name in trained)
        self.flops, self.examples, self.counting_seconds = 0, 0, 0.0
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, int | None]:
        """The exits' loss up to the client's depth, and the correct predictions of its own exit."""
        loss, logits = exit_loss(self.model, inputs, labels, self.depth, self.deep_supervision)
        self._batch = (inputs, labels)
        return loss, int((logits.detach().argmax(dim=1) == labels).sum())

    def parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        """The parameters up to the client's depth (its exit head, or heads, included)."""
        return [self._params[k] for k in self.keys if k in self._params]

    def after_step(self) -> None:
        """Count the training FLOPs of the batch just stepped (the count's time is kept apart)."""
        assert self._batch is not None
        inputs, labels = self._batch
        tick = time.perf_counter()
        self.flops += step_flops(self.model, inputs, labels, self.depth, self.deep_supervision)
        self.counting_seconds += time.perf_counter() - tick
        self.examples += int(labels.shape[0])
        self._batch = None

    def finish(self) -> dict[str, float]:
        """Restore ``requires_grad``; the compute and communication of the round."""
        for name, parameter in self._params.items():
            parameter.requires_grad_(self._previous[name])
        state = self.model.state_dict()
        return {"train_flops": float(self.flops), "flops_per_example": self.flops / max(1, self.examples),
                "bytes_sent": float(state_nbytes({k: state[k] for k in self.keys})), "depth": float(self.depth),
                "flop_counting_seconds": self.counting_seconds}


class ExitDepth(Objective):
    """Early-exit objective: the loss of the exits up to ``depth``, training only the layers up to it.

    Parameters
    ----------
    depth : int
        The client's exit depth (one of the model's exits).
    deep_supervision : bool, default False
        Sum the cross-entropies of every exit at or below ``depth`` (Fed-EE); otherwise the exit at ``depth`` only.
    """

    def __init__(self, depth: int, deep_supervision: bool = False) -> None:
        self.depth, self.deep_supervision = depth, deep_supervision

    def start(self, model: nn.Module) -> ExitSession:
        """Bind to ``model`` (an :class:`EarlyExitModel`) for one client's round."""
        if not isinstance(model, EarlyExitModel):
            raise TypeError(f"ExitDepth: 'model' must be an EarlyExitModel. Got {type(model).__name__}.")
        if self.depth not in model.exits:
            raise ValueError(f"ExitDepth: 'depth' must be one of the exits {model.exits}. Got {self.depth!r}.")
        return ExitSession(model, self.depth, self.deep_supervision)

    def __repr__(self) -> str:
        return f"ExitDepth(depth={self.depth}, deep_supervision={self.deep_supervision})"


def train_exit_client(*, client_id: int, model: EarlyExitModel, global_state: StateDict, data: ClientData,
                      depth: int, settings: LocalSettings, generator: torch.Generator,
                      deep_supervision: bool = False) -> ClientUpdate:
    """Train one early-exit client from ``global_state`` and return the entries it trained.

    Parameters
    ----------
    model : EarlyExitModel
        Worker-owned instance; ``global_state`` is loaded (strict) and it is trained in place.
    data : ClientData
        Inputs ``(n, 1, n_mels, frames)`` (or waveforms ``(n, 1, 1, samples)``) and labels.
    depth : int
        The client's exit depth (one of ``model.exits``).
    settings, generator
        Local SGD settings; the generator gives the batch order.
    deep_supervision : bool
        Sum the cross-entropies of every exit at or below ``depth``.

    Returns
    -------
    ClientUpdate
        ``state``: the trained entries only; ``metrics``: those of :func:`~fedcore.algorithms.base.train_client`
        (``train_loss`` of the objective and ``train_accuracy`` of its own exit over the last epoch,
        ``num_batches``), the session's (``train_flops`` counted, ``flops_per_example`` per example and epoch,
        ``bytes_sent``, ``depth``, ``flop_counting_seconds``) and ``train_seconds`` (wall, without the counting).
    """
    if depth not in model.exits:
        raise ValueError(f"train_exit_client: client {client_id}: 'depth' must be one of the exits {model.exits}. "
                         f"Got {depth!r}.")
    objective = ExitDepth(depth, deep_supervision)
    started = time.perf_counter()
    trained = train_client(client_id=client_id, model=model, global_state=global_state, data=data,
                           algorithm=PLAIN_SGD, settings=settings, generator=generator, objective=objective)
    seconds = time.perf_counter() - started
    metrics = {**trained.metrics, "train_seconds": seconds - trained.metrics["flop_counting_seconds"]}
    sent = {k: trained.state[k] for k in model.trained_keys(depth, deep_supervision)}
    return ClientUpdate(client_id=client_id, state=sent, num_examples=trained.num_examples, metrics=metrics)


@torch.no_grad()
def exit_accuracies(model: EarlyExitModel, data: ClientData, batch_size: int) -> dict[int, float]:
    """Top-1 accuracy of every exit on ``data`` (one pass through all layers)."""
    model.eval()
    correct = dict.fromkeys(model.exits, 0)
    for start in range(0, len(data), batch_size):
        inputs, labels = data.features[start:start + batch_size], data.labels[start:start + batch_size]
        for exit_, logits in model.exit_logits(inputs, model.exits[-1]).items():
            correct[exit_] += int((logits.argmax(dim=1) == labels).sum())
    return {e: c / len(data) for e, c in correct.items()}
