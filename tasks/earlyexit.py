"""Tasks of the early-exit stage: the model and its initial weights, the parallel clients, plots.

Client training, aggregation and evaluation are the plan's (:mod:`fedcore.plans.earlyexit`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedcore.aggregation.state import StateDict
from fedcore.config import Params
from fedcore.earlyexit.models import EarlyExitModel
from fedcore.models.spec import ModelSpec, check_finite, exit_model_spec, read_state
from fedcore.plans.earlyexit import exit_model, exit_spec
from tasks.common import pyplot, save_figure
from tasks.tracking import MAX_WEIGHTS_BYTES, load_model


def new_model(params: Params, num_classes: int, input_shape: tuple[int, int, int], seed: int) -> EarlyExitModel:
    """The early-exit model of ``params`` with weights drawn from ``seed`` (initial backbone weights not loaded)."""
    return exit_model(exit_spec(params, num_classes, input_shape), seed)


def new_model_spec(params: Params, num_classes: int, input_shape: tuple[int, int, int]) -> ModelSpec:
    """The architecture spec of :func:`new_model`'s model (what the stage's logged models carry)."""
    return exit_model_spec(params.model, params.earlyexit, input_shape, num_classes)


def read_weights(spec: str, root: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint named by ``earlyexit.init``, read without running code from it.

    A ``.safetensors`` file (relative to ``root``; checked: complete, finite), an MLflow model URI (loaded by
    :func:`tasks.tracking.load_model`: rebuilt from its architecture spec; its state dict is returned), or, only
    with ``trust_pickle`` (``mlflow.trust_pickle``), a ``.pt``/``.pth`` file (``torch.load(weights_only=True)``)
    or an MLflow model without a spec.

    Raises
    ------
    ValueError
        If the file does not exist, is too large, damaged or of another kind, or holds no state dict of tensors.
    """
    if spec.startswith("models:/"):
        model = load_model(spec, trust_pickle=trust_pickle).model
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"earlyexit: 'init' {spec!r} must be a torch model. Got {type(model).__name__}.")
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    path = Path(spec) if Path(spec).is_absolute() else root / spec
    if not path.is_file():
        raise ValueError(f"earlyexit: 'init' must be random, a weights file or a models:/ URI. "
                         f"No file {str(path)!r}.")
    if path.stat().st_size > MAX_WEIGHTS_BYTES:
        raise ValueError(f"earlyexit: 'init' {str(path)!r} must be at most {MAX_WEIGHTS_BYTES} bytes. "
                         f"Got {path.stat().st_size}.")
    if path.suffix == ".safetensors":
        return read_state(path.read_bytes(), f"earlyexit: 'init' {str(path)!r}")
    if path.suffix not in (".pt", ".pth"):
        raise ValueError(f"earlyexit: 'init' must be a .safetensors (or, trusted, .pt/.pth) file. Got {path.name!r}.")
    if not trust_pickle:
        raise ValueError(
            f"earlyexit: 'init' {str(path)!r} is a torch pickle (.pt/.pth), which this project loads only when "
            "'mlflow.trust_pickle: true'. Fix: convert it to safetensors once, where you trust it: python -c "
            "\"import sys, torch, safetensors.torch as st; s = torch.load(sys.argv[1], map_location='cpu', "
            "weights_only=True); s = s.get('state_dict', s); st.save_file({k: v.contiguous() for k, v in s.items()}, "
            "sys.argv[2])\" model.pt model.safetensors, and set earlyexit.init to the .safetensors file.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"earlyexit: {str(path)!r} must hold a state dict of tensors.")
    check_finite(state, f"earlyexit: 'init' {str(path)!r}")
    return state


def initial_state(params: Params, num_classes: int, input_shape: tuple[int, int, int],
                  root: Path) -> tuple[StateDict, list[str]]:
    """The starting global state and the backbone keys the checkpoint did not provide.

    Random weights from ``federation.seed``, with the backbone then taken from ``earlyexit.init`` unless random
    (:meth:`~fedcore.earlyexit.models.EarlyExitModel.load_pretrained`: with ``earlyexit.exit_norm: per_exit`` every
    exit's norm starts as a copy of the checkpoint's final norm, e.g. the FASSL encoder's ``norm``, when it has one).
    """
    model = new_model(params, num_classes, input_shape, params.federation.seed)
    left: list[str] = []
    if params.earlyexit.init != "random":
        left = model.load_pretrained(read_weights(params.earlyexit.init, root, params.mlflow.trust_pickle))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, left




def plot_exits(history: Sequence[dict[str, Any]], exits: Sequence[int], path: Path, title: str) -> None:
    """Test accuracy of every exit per round (left) and the mean client training GFLOPs per round (right)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6), dpi=110)
    rounds = [row["round"] for row in history]
    for exit_ in exits:
        values = [row.get(f"exit{exit_}_accuracy", float("nan")) for row in history]
        axes[0].plot(rounds, values, label=f"exit {exit_}")
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    axes[1].plot(rounds, [row.get("client_gflops_mean", float("nan")) for row in history], color="tab:red")
    axes[1].set_xlabel("round")
    axes[1].set_ylabel("mean client training GFLOPs")
    axes[1].grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
