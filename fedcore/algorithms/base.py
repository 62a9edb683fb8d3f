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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedcore.aggregation.base import ClientUpdate
from fedcore.aggregation.state import StateDict, to_cpu_state
from fedcore.registry import Registry


class LocalAlgorithm:
    """Client-side rule, expressed as hooks into :func:`train_client`.

    The default hooks give plain local SGD (FedAvg's client). One instance may train many clients at once from
    several threads, so hooks must not keep per-client state on the instance.
    """

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


def _check_hyperparameters(epochs: int, batch_size: int, lr: float, momentum: float, weight_decay: float) -> None:
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"train_client: '{name}' must be an int >= 1. Got {value!r}.")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"train_client: 'lr' must be a finite float > 0. Got {lr!r}.")
    if not 0 <= momentum < 1:
        raise ValueError(f"train_client: 'momentum' must be in [0, 1). Got {momentum!r}.")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"train_client: 'weight_decay' must be a finite float >= 0. Got {weight_decay!r}.")


def train_client(
    *,
    client_id: int,
    model: nn.Module,
    global_state: StateDict,
    data: ClientData,
    algorithm: LocalAlgorithm,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    generator: torch.Generator,
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
    data : ClientData
        The local training set (n examples).
    algorithm : LocalAlgorithm
        Client-side rule (its hooks are called at every step).
    epochs : int
        E, local epochs (>= 1).
    batch_size : int
        B (>= 1); the last batch of an epoch may be smaller (no batch is dropped).
    lr, momentum, weight_decay : float
        SGD settings; a new optimiser is created for this call.
    generator : torch.Generator
        CPU generator of the batch order (one ``randperm`` per epoch); see
        :func:`fedcore.federation.sampling.client_generator`.

    Returns
    -------
    ClientUpdate
        ``state``: detached CPU copies of the trained state dict; ``num_examples``: n; ``metrics``:
        ``train_loss`` (sample-weighted mean cross-entropy over the last epoch, before each step, without the
        extra term), ``train_accuracy`` (share of correct predictions over the last epoch, same forward passes)
        and ``num_batches`` (optimiser steps over all epochs).

    Raises
    ------
    ValueError
        If a hyperparameter is out of range.
    FloatingPointError
        If the loss (with the extra term) is NaN or infinite at some step.
    """
    _check_hyperparameters(epochs, batch_size, lr, momentum, weight_decay)
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError(f"train_client: 'generator' must be a CPU torch.Generator. Got {generator!r}.")
    model.load_state_dict(global_state, strict=True)
    model.train()
    device = next(model.parameters()).device
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    num_examples = len(data)
    num_batches = 0
    loss_sum, num_correct = 0.0, 0
    for epoch in range(epochs):
        order = torch.randperm(num_examples, generator=generator)
        loss_sum, num_correct = 0.0, 0
        for start in range(0, num_examples, batch_size):
            index = order[start : start + batch_size]
            log_mel = data.features[index].to(device, non_blocking=True)
            labels = data.labels[index].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            logits = model(log_mel)
            loss = F.cross_entropy(logits, labels)
            extra = algorithm.extra_loss(model, global_state)
            objective = loss if extra is None else loss + extra
            objective_value = float(objective.detach())
            if not math.isfinite(objective_value):
                raise FloatingPointError(
                    f"train_client: client {client_id}: the training loss must be finite. Got {objective_value!r} "
                    f"at epoch {epoch + 1}, step {start // batch_size + 1}. Lower 'lr' or check the features."
                )
            objective.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            algorithm.after_step(model)
            num_batches += 1
            loss_sum += float(loss.detach()) * index.numel()
            num_correct += int((logits.detach().argmax(dim=1) == labels).sum())
    metrics = {
        "train_loss": loss_sum / num_examples,
        "train_accuracy": num_correct / num_examples,
        "num_batches": float(num_batches),
    }
    return ClientUpdate(client_id=client_id, state=to_cpu_state(model), num_examples=num_examples, metrics=metrics)
