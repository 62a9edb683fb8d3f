"""FASSL's model selection on a finished MLflow run: the best round per downstream task, registered with an alias.

The choice itself is :mod:`fedcore.evaluation.selection`; here: reading the run, registering, loading back.

A self-supervised federate run logs, every scored round, ``<task>/<metric>_val`` and ``<task>/<metric>_test``
(``step=round``) and the round's encoder as a LoggedModel (tag ``fedaudio.round``). For each task the round with
the highest *validation* score wins (the earliest on ties; round 0, the random-init floor, is never selected); its
LoggedModel is registered under the registered model name with the task's name as alias. The test score at the
selected round is reported beside the last round's.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fedcore.evaluation.selection import TaskSelection, choose, task_names
from tasks.orchestration import task


def _history(client: Any, run_id: str, key: str) -> dict[int, float]:
    return {int(m.step): float(m.value) for m in client.get_metric_history(run_id, key)}


@task(name="select-rounds")
def select_rounds(run_id: str, metric: str | None = None) -> tuple[list[TaskSelection], dict[str, str]]:
    """Each task's best round of run ``run_id`` (MLflow must point at its store).

    Returns the selections and the run's params (``downstream.*`` say the metric and the registered name).

    Raises
    ------
    ValueError
        If the run logged no downstream score for ``metric``.
    """
    import mlflow

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    params = dict(run.data.params)
    metric = metric or params.get("downstream.select_metric", "knn1")
    names = task_names(list(run.data.metrics), metric, params.get("downstream.tasks"))
    if not names:
        raise ValueError(f"select: run {run_id} logged no '<task>/{metric}_val' metric; is it a self-supervised "
                         f"run (ssl.method set) with downstream tasks? Metrics: {sorted(run.data.metrics)[:12]}.")
    selections = [choose(name, metric, _history(client, run_id, f"{name}/{metric}_val"),
                         _history(client, run_id, f"{name}/{metric}_test")) for name in names]
    return selections, params


def logged_models(run_id: str) -> dict[int, str]:
    """``{round: LoggedModel id}`` of the models run ``run_id`` logged."""
    import mlflow

    run = mlflow.MlflowClient().get_run(run_id)
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                        filter_string=f"source_run_id = '{run_id}'", output_format="list")
    return {int(m.tags["fedaudio.round"]): m.model_id for m in models if "fedaudio.round" in m.tags}


def _version_of(client: Any, name: str, model_id: str) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for version in versions:
        if getattr(version, "model_id", None) == model_id or str(version.source).endswith(model_id):
            return int(version.version)
    return None


@task(name="register-selection")
def register_selection(selections: Sequence[TaskSelection], run_id: str,
                       registered_model: str) -> list[TaskSelection]:
    """Register each task's selected round and point the alias ``<task>`` at it.

    Tasks that chose the same round share one version; the version is tagged with the task, round and scores.

    Raises
    ------
    ValueError
        If a selected round has no logged model.
    """
    import mlflow

    client = mlflow.MlflowClient()
    models = logged_models(run_id)
    registered = []
    for sel in selections:
        model_id = models.get(sel.best_round)
        if model_id is None:
            raise ValueError(f"select: task {sel.task!r}: round {sel.best_round} has no logged model in run "
                             f"{run_id} (rounds with models: {sorted(models)}).")
        version = _version_of(client, registered_model, model_id)
        if version is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                version = int(mlflow.register_model(f"models:/{model_id}", registered_model).version)
        client.set_registered_model_alias(registered_model, sel.task, str(version))
        client.set_model_version_tag(registered_model, str(version), f"fedaudio.best.{sel.task}",
                                     f"round {sel.best_round}: {sel.metric}_val {_fmt(sel.best_val)}, "
                                     f"{sel.metric}_test {_fmt(sel.best_test)}")
        client.set_model_version_tag(registered_model, str(version), "fedaudio.round", str(sel.best_round))
        client.set_model_version_tag(registered_model, str(version), "fedaudio.run_id", run_id)
        registered.append(TaskSelection(**{**sel.as_dict(), "model_id": model_id, "version": version,
                                           "alias": sel.task}))
    return registered


class _Loaded(nn.Module):
    """A trusted model MLflow loaded (no spec), callable by :func:`~fedcore.evaluation.retrieval.embed`.

    An exported (``pt2``) program was saved in eval mode and refuses ``train()``/``eval()``, which ``embed``
    calls; the wrapper holds it as a plain attribute, so mode switches stop at the wrapper.
    """

    program: Any

    def __init__(self, program: Any) -> None:
        super().__init__()
        object.__setattr__(self, "program", program)  # not a registered child: mode switches stop here

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        """The loaded model's output (the embedding)."""
        output: torch.Tensor = self.program(log_mel)
        return output


def load_selected(registered_model: str, alias: str, trust_pickle: bool = False) -> nn.Module:
    """The encoder registered under ``registered_model@alias``, rebuilt from its spec and weights (eval mode).

    Loaded by :func:`tasks.tracking.load_model`: no code from the model's files runs; a model without a spec is
    refused unless ``trust_pickle`` (``mlflow.trust_pickle``).

    Raises
    ------
    ValueError
        If the alias cannot be resolved or the model cannot be loaded safely (the message names the fix).
    """
    from tasks.tracking import load_model

    loaded = load_model(f"models:/{registered_model}@{alias}", trust_pickle=trust_pickle)
    if loaded.spec is not None and isinstance(loaded.model, nn.Module):
        return loaded.model.eval()
    return _Loaded(loaded.model)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def selection_markdown(selections: Sequence[TaskSelection], run_id: str | None, registered_model: str) -> str:
    """The selection table: per task, the best round and its scores beside the last round's and the floor.

    ``run_id`` None leaves out what differs between two runs of the same inputs (run id, registry versions): the
    table a DVC output holds.
    """
    metric = selections[0].metric if selections else "knn1"
    source = f"FASSL selection of run `{run_id}`" if run_id else "FASSL selection"
    ids = run_id is not None
    lines = [f"{source}: per task, the round with the best validation {metric} "
             f"(registered as `{registered_model}@<task>`), its test {metric}, the last round's, and the random-init "
             "encoder's (round 0).", "",
             "| task | best round | val | test | last round | last val | last test | random-init test |"
             + (" version |" if ids else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if ids else "")]
    for s in selections:
        lines.append(f"| {s.task} | {s.best_round} | {_fmt(s.best_val)} | {_fmt(s.best_test)} | {s.last_round} | "
                     f"{_fmt(s.last_val)} | {_fmt(s.last_test)} | {_fmt(s.floor_test)} |"
                     + (f" {'—' if s.version is None else s.version} |" if ids else ""))
    return "\n".join(lines) + "\n"
