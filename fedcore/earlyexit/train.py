"""Local training of an early-exit client, and its compute accounting.

A client with exit depth d runs the stem and layers 1..d (never the layers above), minimises the cross-entropy
of the head at d (with ``deep_supervision``: the sum over every exit at or below d, as Fed-EE does), updates only
the entries it trains (:meth:`~fedcore.earlyexit.models.EarlyExitModel.trained_keys`) and sends exactly those.
Its training FLOPs are counted from the model (:func:`fedcore.earlyexit.flops.count_flops`) for one batch of
each size it trains on, cached per (depth, batch size, deep supervision), times the number of such batches.
"""

from __future__ import annotations

import threading
import time

import torch
import torch.nn.functional as F

from fedcore.aggregation.base import ClientUpdate
from fedcore.aggregation.state import StateDict, state_nbytes, to_cpu_state
from fedcore.algorithms.base import (
    ClientData,
    LocalSettings,
    check_finite,
    check_generator,
    check_settings,
    epoch_batches,
)
from fedcore.earlyexit.flops import count_flops
from fedcore.earlyexit.models import EarlyExitModel


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

    Runs one extra forward and backward under the counter (its gradients are discarded).
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
        ``state``: the trained entries only; ``metrics``: ``train_loss``, ``train_accuracy`` (its own exit, last
        epoch), ``num_batches``, ``train_flops`` (counted), ``flops_per_example`` (per example and epoch),
        ``train_seconds`` (wall, without the counting), ``bytes_sent``, ``depth``.
    """
    check_settings(settings, "train_exit_client")
    check_generator(generator, "train_exit_client")
    if depth not in model.exits:
        raise ValueError(f"train_exit_client: client {client_id}: 'depth' must be one of the exits {model.exits}. "
                         f"Got {depth!r}.")
    started = time.perf_counter()
    model.load_state_dict(global_state, strict=True)
    model.train()
    keys = model.trained_keys(depth, deep_supervision)
    trained = set(keys)
    params = dict(model.named_parameters())
    previous = {name: p.requires_grad for name, p in params.items()}
    for name, parameter in params.items():
        parameter.requires_grad_(name in trained)
    try:
        optimizer = torch.optim.SGD([params[k] for k in keys if k in params], lr=settings.lr,
                                    momentum=settings.momentum, weight_decay=settings.weight_decay)
        flops, counting, num_batches, loss_sum, correct, counted = 0, 0.0, 0, 0.0, 0, 0
        for epoch, step, index in epoch_batches(len(data), settings, generator):
            if step == 0:
                loss_sum, correct, counted = 0.0, 0, 0
            inputs, labels = data.features[index], data.labels[index]
            tick = time.perf_counter()
            flops += step_flops(model, inputs, labels, depth, deep_supervision)
            counting += time.perf_counter() - tick  # the count's own forward/backward is not training time
            optimizer.zero_grad(set_to_none=True)
            loss, logits = exit_loss(model, inputs, labels, depth, deep_supervision)
            check_finite("train_exit_client", client_id, float(loss.detach()), epoch, step)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            num_batches += 1
            loss_sum += float(loss.detach()) * index.numel()
            correct += int((logits.detach().argmax(dim=1) == labels).sum())
            counted += index.numel()
    finally:
        for name, parameter in params.items():
            parameter.requires_grad_(previous[name])
    state = to_cpu_state(model)
    sent = {k: state[k] for k in keys}
    metrics = {"train_loss": loss_sum / counted, "train_accuracy": correct / counted,
               "num_batches": float(num_batches), "train_flops": float(flops),
               "flops_per_example": flops / (len(data) * settings.epochs),
               "train_seconds": time.perf_counter() - started - counting, "bytes_sent": float(state_nbytes(sent)),
               "depth": float(depth)}
    return ClientUpdate(client_id=client_id, state=sent, num_examples=len(data), metrics=metrics)


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
