"""Tasks of the early-exit stage: the model and its initial weights, client training, per-exit evaluation, plots."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from fedcore.aggregation.base import ClientUpdate
from fedcore.aggregation.state import StateDict
from fedcore.algorithms.base import ClientData
from fedcore.config import Params, to_dict
from fedcore.earlyexit.models import EarlyExitModel, build_exit_model
from fedcore.earlyexit.tiers import EXIT_PLANS, assign_exits
from fedcore.earlyexit.train import train_exit_client
from fedcore.federation.checkpoint import fingerprint, load_state
from fedcore.federation.sampling import client_generator
from tasks.common import pyplot, save_figure
from tasks.modality import local_settings


def new_model(params: Params, num_classes: int, input_shape: tuple[int, int, int], seed: int) -> EarlyExitModel:
    """The early-exit model of ``params`` with weights drawn from ``seed`` (initial backbone weights not loaded)."""
    cfg = params.earlyexit
    return build_exit_model(cfg.backbone, input_shape=input_shape, cfg=params.model, options=cfg.backbone_options,
                            exits=cfg.exits, num_classes=num_classes, head=cfg.head,
                            generator=torch.Generator().manual_seed(seed))


def read_weights(spec: str, root: Path) -> dict[str, torch.Tensor]:
    """The checkpoint named by ``earlyexit.init``.

    A ``.safetensors`` or ``.pt`` file (relative to ``root``), or an MLflow model URI whose run logged its weights
    (this project's stages log ``weights.safetensors`` with every model).

    Raises
    ------
    ValueError
        If the file does not exist or holds no state dict.
    """
    if spec.startswith("models:/"):
        import mlflow

        try:
            folder = Path(mlflow.artifacts.download_artifacts(spec))
        except Exception as error:
            raise ValueError(f"earlyexit: cannot download {spec!r} from MLflow: {error}") from None
        found = sorted(folder.rglob("weights.safetensors"))
        if not found:
            raise ValueError(f"earlyexit: the MLflow model {spec!r} has no weights.safetensors (models logged by "
                             "this project's federate stage have one).")
        return load_state(found[0])
    path = Path(spec) if Path(spec).is_absolute() else root / spec
    if not path.is_file():
        raise ValueError(f"earlyexit: 'init' must be random, a weights file or a models:/ URI. "
                         f"No file {str(path)!r}.")
    if path.suffix == ".safetensors":
        return load_state(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"earlyexit: {str(path)!r} must hold a state dict of tensors.")
    return state


def initial_state(params: Params, num_classes: int, input_shape: tuple[int, int, int],
                  root: Path) -> tuple[StateDict, list[str]]:
    """The starting global state and the backbone keys the checkpoint did not provide.

    Random weights from ``federation.seed``, with the backbone then taken from ``earlyexit.init`` unless random.
    """
    model = new_model(params, num_classes, input_shape, params.federation.seed)
    left: list[str] = []
    if params.earlyexit.init != "random":
        left = model.backbone.load_pretrained(read_weights(params.earlyexit.init, root))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, left


def client_depths(params: Params, num_clients: int) -> tuple[list[int], list[int | None]]:
    """(tier depth of every client, depth it trains under ``earlyexit.plan``; None: it sits out)."""
    cfg = params.earlyexit
    tiers = assign_exits(num_clients, [(float(t["share"]), int(t["depth"])) for t in cfg.tiers], cfg.seed)
    plan = EXIT_PLANS.build(cfg.plan)
    return tiers, [plan(depth, cfg.exits[-1]) for depth in tiers]


_local = threading.local()


def _worker_model(params: Params, num_classes: int, input_shape: tuple[int, int, int]) -> EarlyExitModel:
    key = fingerprint({"model": to_dict(params.model), "ee": to_dict(params.earlyexit), "c": num_classes,
                       "s": list(input_shape)})
    if getattr(_local, "key", None) != key:
        _local.model, _local.key = new_model(params, num_classes, input_shape, 0), key
    model: EarlyExitModel = _local.model
    return model


@task(name="train-exit-client", cache_policy=NO_CACHE, retries=1)
def train_exit_task(params: Params, client_id: int, server_round: int, global_state: StateDict, data: ClientData,
                    depth: int, num_classes: int, input_shape: tuple[int, int, int], threads: int) -> ClientUpdate:
    """One early-exit client's round (layers up to ``depth``; the entries it trained are sent)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return train_exit_client(client_id=client_id, model=_worker_model(params, num_classes, input_shape),
                             global_state=global_state, data=data, depth=depth,
                             settings=local_settings(params, server_round),
                             generator=client_generator(params.federation.seed, server_round, client_id),
                             deep_supervision=params.earlyexit.deep_supervision)


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
