"""Build a registered model with weights drawn from a caller's ``torch.Generator``.

The module's own initialisers (PyTorch defaults, e.g. Kaiming-uniform for conv and linear layers) run inside
:func:`torch.random.fork_rng` with the forked CPU RNG set to the state of ``generator``; afterwards ``generator``
is advanced exactly as the global RNG would have been, and the global RNG is restored untouched. So a generator
seeded ``s`` gives the same weights as ``torch.manual_seed(s)`` followed by building the model (the reference
benchmark's recipe), without touching global state. Calls of :func:`build_model` are serialised by a lock, so
worker threads may build their models concurrently; code running at the same time in other threads must not
draw from the global RNG (fedcore never does).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn

from fedcore.config import ModelConfig
from fedcore.models.registry import MODELS

_BUILD_LOCK = threading.Lock()


def build_model(
    cfg: ModelConfig, num_classes: int, input_shape: tuple[int, int, int], generator: torch.Generator
) -> nn.Module:
    """Build model ``cfg.name`` with deterministic initial weights.

    Parameters
    ----------
    cfg : ModelConfig
        Registry name and size options.
    num_classes : int
        Number of output logits.
    input_shape : tuple of int
        ``(channels, n_mels, frames)`` of one example (channels is 1 for log-mel).
    generator : torch.Generator
        CPU generator the weights are drawn from; it is advanced by the draws.

    Returns
    -------
    torch.nn.Module
        The model on CPU, float32, in training mode.

    Raises
    ------
    TypeError
        If ``generator`` is not a ``torch.Generator``.
    ValueError
        If ``generator`` is not a CPU generator, or the name or the arguments are invalid.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"build_model: 'generator' must be a torch.Generator. Got {generator!r}.")
    if generator.device.type != "cpu":
        raise ValueError(f"build_model: 'generator' must be a CPU generator. Got device {generator.device!r}.")
    factory = MODELS.get(cfg.name)
    with seeded_init(generator):
        model = factory(num_classes=num_classes, input_shape=tuple(input_shape), cfg=cfg)
    return model


@contextlib.contextmanager
def seeded_init(generator: torch.Generator) -> Iterator[None]:
    """Run module initialisers with the global CPU RNG set to ``generator``'s state (see the module docstring).

    On exit ``generator`` is advanced by the draws made inside and the global RNG is restored. Serialised by the
    same lock as :func:`build_model`, so worker threads may build models concurrently.
    """
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.random.set_rng_state(generator.get_state())
        yield
        generator.set_state(torch.random.get_rng_state())


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Count the scalar parameters of ``model`` (buffers such as BatchNorm statistics are not counted).

    Parameters
    ----------
    model : torch.nn.Module
        Any module.
    trainable_only : bool, default False
        Count only parameters with ``requires_grad``.

    Returns
    -------
    int
        Sum of ``numel()`` over the parameters.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
