"""select stage (FASSL): register each downstream task's best round of a finished self-supervised run.

``python -m flows.select --metrics results/.../metrics.json --out DIR`` (or ``--run-id RUN``) reads the run's
per-round downstream scores from MLflow, picks per task the round with the best validation score
(``downstream.select_metric``, ``knn1`` by default), registers that round's encoder under
``downstream.registered_model`` with the task's name as alias, and writes DIR/selection.json and
DIR/selection.md (best round and scores beside the last round's and the random-init floor); the same table is a
Prefect artifact. ``--verify`` loads every alias back from the registry, scores it again on its task (the
feature stores under ``--downstream``) and records the reproduced test score, failing if it differs from the
logged one. Works on any finished run of the store; run it again at any time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedcore.config import Params
from fedcore.errors import ConfigError
from flows import stage

if TYPE_CHECKING:
    from fedcore.evaluation.selection import TaskSelection

#: Largest difference accepted between a reloaded model's score and the logged one.
TOLERANCE = 1e-6
FLOWS = stage.LazyFlows(__name__)


@FLOWS.flow("select", log_prints=True)
def _select(params: Params, run_id: str, out: Path, root: Path = Path("."), metric: str | None = None,
            registered_model: str | None = None, verify: bool = False,
            downstream: Path = Path("data/downstream")) -> dict[str, Any]:
    """Select and register each task's best round of run ``run_id``; write the selection JSON and table."""
    from tasks.common import write_json, write_text
    from tasks.orchestration import publish_markdown, publish_table
    from tasks.rounds import write_run_record
    from tasks.selection import register_selection, select_rounds, selection_markdown
    from tasks.tracking import setup

    setup(params.mlflow, root)
    selections, run_params = select_rounds(run_id, metric)
    name = registered_model or run_params.get("downstream.registered_model") or params.downstream.registered_model
    selections = register_selection(selections, run_id, name)
    if verify:
        selections = _verify(params, selections, name, downstream)
    result = {"run_id": run_id, "registered_model": name, "metric": selections[0].metric,
              "tasks": {s.task: s.as_dict() for s in selections}}
    text = selection_markdown(selections, run_id, name)
    # The DVC outputs hold what the run's scores determine; ids and registry versions go to the run record.
    ids = ("model_id", "version")
    write_run_record(out / "selection.json", {"stage": "select", "mlflow_run_id": run_id, "tasks": {
        s.task: {k: getattr(s, k) for k in ids} for s in selections}})
    write_json(out / "selection.json", {**{k: v for k, v in result.items() if k != "run_id"}, "tasks": {
        s.task: {k: v for k, v in s.as_dict().items() if k not in ids} for s in selections}})
    write_text(out / "selection.md", selection_markdown(selections, None, name))
    publish_table([{k: v for k, v in s.as_dict().items() if k != "model_id"} for s in selections],
                          key="fassl-selection", description=f"best round per task of run {run_id}")
    publish_markdown(f"# FASSL selection\n\n{text}", key="fassl-selection-table")
    print(text)
    return result


def _verify(params: Params, selections: Sequence[TaskSelection], name: str, root: Path) -> list[TaskSelection]:
    """Reload every alias, score it on its task again and check the logged test score is reproduced."""
    from fedcore.evaluation.downstream import load_downstream, score_encoder
    from fedcore.evaluation.selection import TaskSelection
    from tasks.selection import load_selected

    # The models first (before any data): rebuilt from their specs, no code from their files runs.
    models = {sel.task: load_selected(name, sel.task, params.mlflow.trust_pickle) for sel in selections}
    data = load_downstream(root, params.downstream)
    by_name = {t.name: t for t in data.tasks}
    checked = []
    for sel in selections:
        if sel.task not in by_name:
            raise ConfigError(f"select: --verify needs task {sel.task!r} in downstream.tasks of the params. "
                              f"Got {sorted(by_name)}.")
        model = models[sel.task]
        scores = score_encoder(model, [by_name[sel.task]], data.features, params.downstream,
                               params.federation.eval_batch_size)
        value = scores[f"{sel.task}/{sel.metric}_test"]
        if sel.best_test is None or not math.isclose(value, sel.best_test, abs_tol=TOLERANCE):
            raise ValueError(f"select: {name}@{sel.task} scores {sel.metric}_test {value:.6f} when reloaded; the run "
                             f"logged {sel.best_test} at round {sel.best_round}.")
        checked.append(TaskSelection(**{**sel.as_dict(), "reproduced_test": value}))
        print(f"select: {name}@{sel.task} (version {sel.version}, round {sel.best_round}) reloaded: "
              f"{sel.metric}_test {value:.4f} = logged {sel.best_test:.4f}")
    return checked


def _main(
    *,
    params: stage.ParamsFile = stage.PARAMS_FILE,
    run_id: Annotated[str | None, typer.Option(metavar="RUN", help="MLflow run id of a finished self-supervised "
                                                                   "federate run (or --metrics)")] = None,
    metrics: Annotated[Path | None, typer.Option(metavar="FILE", help="the run's metrics.json: the run id is read "
                                                                      "from the run record beside it (or "
                                                                      "--run-id)")] = None,
    out: Annotated[Path, typer.Option(metavar="DIR", help="folder of selection.json and selection.md")],
    metric: Annotated[str | None, typer.Option(metavar="METRIC", help="knn<k> or probe  [default: the run's "
                                                                      "downstream.select_metric]")] = None,
    registered_model: Annotated[str | None, typer.Option(metavar="NAME", help="registry name  [default: the run's "
                                                                              "downstream.registered_model]")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="reload each alias and reproduce its logged test "
                                                          "score")] = False,
    downstream: Annotated[Path, typer.Option(metavar="DIR", help="with --verify: the folder of the downstream "
                                                                 "feature stores")] = Path("data/downstream"),
) -> None:
    from tasks.common import read_json, read_params
    from tasks.rounds import read_run_record, run_record_path

    cfg = read_params(params)
    if run_id is None and metrics is not None:
        # the run id lives in the run record beside the metrics (older runs wrote it into the metrics)
        run_id = read_run_record(metrics).get("mlflow_run_id") or read_json(metrics).get("mlflow_run_id")
        if not run_id:
            raise ConfigError(f"select: {str(metrics)!r} has no run record with an 'mlflow_run_id' beside it "
                              f"({run_record_path(metrics).name}). Fix: pass --run-id, or rerun the stage.")
    FLOWS["select"](cfg, run_id, out, Path.cwd(), metric, registered_model, verify, downstream)


def _one_run(options: dict[str, Any]) -> None:
    """The run is named once: by --run-id or by --metrics."""
    if (options["run_id"] is None) == (options["metrics"] is None):
        given = "both" if options["run_id"] is not None else "neither"
        raise typer.BadParameter(f"exactly one of them must be given. Got {given}.",
                                 param_hint="--run-id / --metrics")


main = stage.command(__doc__, _main, check=_one_run)
"""Command-line entry point (``python -m flows.select``)."""
__getattr__ = FLOWS.module_getattr  # from flows.select import select: the flow, built then

if __name__ == "__main__":
    raise SystemExit(main())
