"""Training FLOPs of a client's local step, counted from the model itself (compute accounting of early exits).

An early-exit client trains only the first ``d`` layers of a transformer plus exit heads, so its compute per round
depends on ``d``. Rather than guessing it from a formula, :func:`count_flops` runs one step under
:class:`torch.utils.flop_counter.FlopCounterMode`, which intercepts every aten op at dispatch and adds up the
FLOPs of the ops it has a formula for; :func:`training_step_flops` does this for one forward + backward of
``loss_fn(model(inputs))`` without lasting effect on the model.

What is counted
---------------
Only matrix products: ``mm``, ``addmm``, ``bmm``, ``baddbmm``, convolutions (forward and backward) and scaled
dot-product attention (the fused kernels). The convention is **2 FLOPs per multiply-add**: a product
``(m, k) @ (k, n)`` costs ``2·m·k·n``; the bias of ``addmm`` is not counted. Elementwise ops (bias adds, residual
additions, activations), softmax, normalisation layers, reductions (the bias gradient) and the optimiser update are
*not* counted: the count is the matrix-product work, which dominates for transformers and CNNs.

Backward follows the autograd graph, so a layer costs only the products autograd actually runs. A linear layer
``y = x Wᵀ`` with ``N`` rows costs ``2·N·in·out`` forward; backward costs the weight gradient ``2·N·in·out`` when
``W`` requires grad plus the input gradient ``2·N·in·out`` when ``x`` needs a gradient (``x`` depends on something
trainable). Hence the first linear layer on raw inputs costs 1× forward in backward, later ones 2×, and frozen early
layers (``requires_grad=False``, fed by inputs that need no gradient) cost forward only; the first trainable layer
after them also skips its input gradient.

Scaled dot-product attention over ``(batch, heads, T_q, head_dim)`` queries and ``T_k`` keys costs
``2·2·batch·heads·T_q·T_k·head_dim`` forward (scores and weighted values). Its backward is counted as in
``torch.utils.flop_counter`` for the fused kernels: five products of that size (the scores are recomputed), i.e.
``2·batch·heads·T_q·T_k·(3·head_dim + 2·head_dim_v)``; the unfused "math" fallback shows up as plain ``bmm``
(four products in backward). Causal masks are ignored (full ``T_q × T_k`` products).

Two gaps of the stock counter in torch 2.11 are closed here for ``nn.MultiheadAttention`` /
``nn.TransformerEncoderLayer``:

- on CPU, ``scaled_dot_product_attention`` runs ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its
  ``_backward``), which has no formula in the stock registry, so attention scores and weighted values counted
  zero; :func:`count_flops` adds formulas for both (the same ones as torch's CUDA kernels);
- in eval mode without grad (or with nothing requiring grad), the layers take a fused "fast path"
  (``aten._transformer_encoder_layer_fwd``, ``aten._native_multi_head_attention``) whose products are invisible to
  the counter; :func:`count_flops` switches the fast path off (``torch.backends.mha.set_fastpath_enabled(False)``,
  a process-wide flag, restored on exit) so that the same layer is counted the same in train and eval mode.

Use
---
Per-client training FLOPs per round = (count of one batch) × (batches per round), e.g.
``training_step_flops(model, batch, loss_fn).times(num_batches).total``. The count depends only on shapes, the
depth trained and which parameters require grad, so the caller computes it once per (depth, batch size) and caches
it (a final smaller batch needs its own count).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["FlopCount", "count_flops", "training_step_flops"]


def _check_count(func: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{func}: '{name}' must be an int >= 0. Got {value!r}.")


@dataclass(frozen=True)
class FlopCount:
    """FLOPs (2 per multiply-add of a matrix product) of one forward and one backward pass.

    Parameters
    ----------
    forward : int
        FLOPs of the forward pass, >= 0.
    backward : int
        FLOPs of the backward pass, >= 0 (0 when no backward was run).

    Raises
    ------
    ValueError
        If a count is not an int >= 0.
    """

    forward: int
    backward: int

    def __post_init__(self) -> None:
        _check_count("FlopCount", "forward", self.forward)
        _check_count("FlopCount", "backward", self.backward)

    @property
    def total(self) -> int:
        """Forward plus backward FLOPs."""
        return self.forward + self.backward

    def __add__(self, other: object) -> FlopCount:
        if not isinstance(other, FlopCount):
            return NotImplemented
        return FlopCount(forward=self.forward + other.forward, backward=self.backward + other.backward)

    def times(self, k: int) -> FlopCount:
        """The count of ``k`` such steps (e.g. the batches of one local round).

        Parameters
        ----------
        k : int
            Number of steps, >= 0.

        Returns
        -------
        FlopCount
            Both counts multiplied by ``k``.

        Raises
        ------
        ValueError
            If ``k`` is not an int >= 0.
        """
        _check_count("FlopCount.times", "k", k)
        return FlopCount(forward=self.forward * k, backward=self.backward * k)


def _attention_flop(query_shape: Any, key_shape: Any, value_shape: Any, *_args: Any, out_shape: Any = None,
                    **_kwargs: Any) -> int:
    """Forward FLOPs of SDPA: ``Q Kᵀ`` and ``P V`` over ``(batch, heads, T, dim)`` shapes."""
    batch, heads, len_q, dim_q = query_shape
    len_k, dim_v = key_shape[-2], value_shape[-1]
    return int(2 * batch * heads * len_q * len_k * (dim_q + dim_v))


def _attention_backward_flop(grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *_args: Any,
                             out_shape: Any = None, **_kwargs: Any) -> int:
    """Backward FLOPs of fused SDPA: scores recomputed, then dP, dV, dQ and dK (as torch's CUDA formula)."""
    batch, heads, len_q, dim_q = query_shape
    len_k, dim_v = key_shape[-2], value_shape[-1]
    return int(2 * batch * heads * len_q * len_k * (3 * dim_q + 2 * dim_v))


# CPU SDPA kernels missing from torch's flop registry (torch 2.11); keyed by op packet like the registry itself.
_EXTRA_FORMULAS: dict[Any, Any] = {}
for _name, _formula in (("_scaled_dot_product_flash_attention_for_cpu", _attention_flop),
                        ("_scaled_dot_product_flash_attention_for_cpu_backward", _attention_backward_flop)):
    if hasattr(torch.ops.aten, _name):
        _EXTRA_FORMULAS[getattr(torch.ops.aten, _name)] = _formula


def _counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)


@contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    """Switch off the fused MHA / encoder-layer fast path (invisible to the counter), restoring it on exit."""
    was_enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was_enabled)


def count_flops(step: Callable[[], torch.Tensor], *, backward: bool = True) -> FlopCount:
    """Count the matrix-product FLOPs of ``loss = step()`` and, if ``backward``, of ``loss.backward()``.

    Both passes run for real under their own :class:`~torch.utils.flop_counter.FlopCounterMode`, with the fused
    MHA fast path switched off (see the module docstring for what is and is not counted). Gradients are
    accumulated into ``.grad`` as by any backward; :func:`training_step_flops` cleans up after itself.

    Parameters
    ----------
    step : callable
        Called once with no argument; returns the loss (a scalar tensor requiring grad when ``backward``).
    backward : bool, default True
        Also run and count ``loss.backward()``; otherwise the backward count is 0.

    Returns
    -------
    FlopCount
        Forward and backward FLOPs.

    Raises
    ------
    TypeError
        If ``step`` is not callable or does not return a tensor, or ``backward`` is not a bool.
    ValueError
        If ``backward`` and the loss is not a scalar or does not require grad.
    """
    if not callable(step):
        raise TypeError(f"count_flops: 'step' must be callable. Got {step!r}.")
    if not isinstance(backward, bool):
        raise TypeError(f"count_flops: 'backward' must be a bool. Got {backward!r}.")
    with _mha_fastpath_disabled():
        with _counter() as forward_counter:
            loss = step()
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"count_flops: 'step' must return a tensor. Got {type(loss).__name__}.")
        if not backward:
            return FlopCount(forward=int(forward_counter.get_total_flops()), backward=0)
        if loss.numel() != 1 or not loss.requires_grad:
            raise ValueError(
                "count_flops: 'step' must return a scalar tensor that requires grad when backward=True. "
                f"Got shape {tuple(loss.shape)!r}, requires_grad={loss.requires_grad!r}."
            )
        with _counter() as backward_counter:
            loss.backward()  # type: ignore[no-untyped-call]
    return FlopCount(forward=int(forward_counter.get_total_flops()), backward=int(backward_counter.get_total_flops()))


def training_step_flops(
    model: nn.Module, inputs: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]
) -> FlopCount:
    """Count the FLOPs of one training step ``loss_fn(model(inputs)).backward()``, leaving no trace.

    The step runs in train mode (as local training does). Whatever parameters require grad are the trained ones:
    freeze a layer (``requires_grad_(False)``) to count a client that does not train it. Afterwards the model is
    as before: every module's train/eval flag, the buffers (e.g. BatchNorm running statistics, which a train-mode
    forward updates), each parameter's ``.grad`` (``None`` for a model not trained yet; a pre-existing gradient is
    neither counted into nor changed) and the RNG state (dropout draws) are restored.

    Parameters
    ----------
    model : nn.Module
        The model, or the part of it a client trains (e.g. the first ``d`` layers plus exit heads).
    inputs : Tensor
        One batch, as passed to ``model``.
    loss_fn : callable
        Maps the model output to a scalar loss (e.g. ``lambda out: F.cross_entropy(out, labels)``).

    Returns
    -------
    FlopCount
        Forward and backward FLOPs of one batch; ``.times(num_batches)`` for a round.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module``, ``inputs`` not a tensor, ``loss_fn`` not callable, or the loss not a
        tensor.
    ValueError
        If the loss is not a scalar or does not require grad (e.g. no parameter requires grad).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"training_step_flops: 'model' must be an nn.Module. Got {type(model).__name__}.")
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"training_step_flops: 'inputs' must be a tensor. Got {type(inputs).__name__}.")
    if not callable(loss_fn):
        raise TypeError(f"training_step_flops: 'loss_fn' must be callable. Got {loss_fn!r}.")
    modes = [(module, module.training) for module in model.modules()]
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    params = list(model.parameters())
    grads = [param.grad for param in params]
    cuda_devices = sorted({t.get_device() for t in (*params, inputs) if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda_devices):
        try:
            for param in params:
                param.grad = None
            model.train()
            return count_flops(lambda: loss_fn(model(inputs)))
        finally:
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            for module, training in modes:
                module.training = training
