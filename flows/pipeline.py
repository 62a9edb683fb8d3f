"""pipeline flow: run a study's DVC stages in order (DVC decides what is stale), under one MLflow parent run.

Run ``python -m flows.pipeline [-S key=value ...]`` (what ``make run`` does) or deploy it with ``prefect.yaml``.
Overrides (``-S``, or the deployment form's fields) are applied to the params file the way ``dvc exp run -S``
applies them, checked, and used by every stage; the file is put back when the run ends. DVC (``dvc.lock``), the
Prefect flow run's parameters and the MLflow parent run therefore record the same values.
"""

# No ``from __future__ import annotations``: the pipeline flow is defined when first used (:data:`FLOWS`), and
# Prefect reads its parameter's type (the deployment's form) from its annotation, an object only when evaluated.
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml

from fedcore.errors import ConfigError
from flows import stage

if TYPE_CHECKING:
    from tasks.overrides import Change
    from tasks.studies import PipelineRun, Study

FLOWS = stage.LazyFlows(__name__)


def dvc_stages(dvc_file: Path = Path("dvc.yaml")) -> list[str]:
    """Stage names of ``dvc.yaml`` in file order."""
    return list((yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {}))


def study_targets(study: "Study", root: Path, stages: Sequence[str] | None) -> list[str]:
    """``dvc repro`` targets of the study's stages (all, in file order, or the ones asked for)."""
    names = dvc_stages(root / study.dvc_file)
    if unknown := [name for name in stages or [] if name not in names]:
        raise ConfigError(f"pipeline: 'stages' must be stages of {study.dvc_file}, one of {', '.join(names)}. "
                          f"Got {unknown!r}.")
    chosen = list(stages) if stages else names
    return chosen if study.dvc_file == "dvc.yaml" else [f"{study.dvc_file}:{name}" for name in chosen]


PIPELINE_RUN_ENV = "FEDAUDIO_PIPELINE_RUN"
"""Set for the stages a pipeline runs: its Prefect flow run id; each stage's flow run is tagged with it."""


def pipeline_tag(flow_run_id: str) -> str:
    """The tag of the stage flow runs of pipeline flow run ``flow_run_id``."""
    return f"pipeline-run:{flow_run_id}"


_STAGE_LOG_PREFIX = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| \w+\s+\| ")
"""``HH:MM:SS.fff | LEVEL   | `` that Prefect's console puts before a stage's log lines."""


@FLOWS.task("repro_stage", name="dvc-repro", task_run_name="repro {name}", retries=0)
def _repro_stage(name: str, env: dict[str, str], force: bool = False) -> str:
    """``dvc repro <name>``: runs the stage (and anything stale upstream) or finds it up to date.

    DVC's output goes line by line to this task's log (and the terminal); the last line says which stages ran
    and which were skipped. Returns ``"ran"`` or ``"up to date"``.
    """
    command = [str(Path(sys.executable).with_name("dvc")), "repro", name]
    if force:
        command.append("--force")
    print("$ " + " ".join(command[1:]))
    ran, skipped = [], []
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            # A stage's own Prefect log line, re-logged here: its time and level are this task's record's already.
            line = _STAGE_LOG_PREFIX.sub("", line.rstrip())
            if found := re.match(r"Running stage '([^']+)'", line):
                ran.append(found.group(1))
            elif found := re.match(r"Stage '([^']+)' didn't change, skipping", line):
                skipped.append(found.group(1))
            if line:
                print(line)
    if process.returncode != 0:
        raise RuntimeError(f"pipeline: stage {name!r} failed (dvc exit code {process.returncode}); "
                           "finished stages and checkpoints are kept, run again to resume.")
    outcome = "ran" if ran else "up to date"
    print(f"repro {name}: {outcome}" + (f" (ran {', '.join(ran)})" if ran else "")
          + (f"; up to date: {', '.join(skipped)}" if skipped else ""))
    return outcome


def _child_env(parent_run_id: str) -> dict[str, str]:
    from tasks.orchestration import orchestrated
    from tasks.tracking import PARENT_ENV

    env = dict(os.environ)
    env[PARENT_ENV] = parent_run_id
    if not orchestrated():  # no server, no flow run to tag the stages with
        return env
    from prefect.runtime import flow_run

    env[PIPELINE_RUN_ENV] = str(flow_run.id)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # Without a configured server this flow runs on Prefect's temporary server: hand it to the stages, so each
    # stage's flow shows up in the same place and none pays ~10 s to start a temporary server of its own. The
    # server stays this process's: a stage that dies (kill -9 included) ends only what it started itself.
    url = stage.prefect_api_url()
    if url:
        env["PREFECT_API_URL"] = url
    return env


def _prefect_tags() -> dict[str, str]:
    from tasks.orchestration import orchestrated

    if not orchestrated():
        return {}
    from prefect.runtime import flow_run

    return {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)}


def stage_runs(flow_run_id: str) -> list[dict[str, str]]:
    """The stage flow runs of pipeline flow run ``flow_run_id`` (tagged :func:`pipeline_tag`), oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[
            pipeline_tag(flow_run_id)])), sort=FlowRunSort.START_TIME_ASC)
        flows = {run.flow_id: client.read_flow(run.flow_id).name for run in runs}
    return [{"stage": flows[run.flow_id], "name": run.name, "id": str(run.id),
             "state": run.state.name if run.state else "?",
             "url": f"{ui}/runs/flow-run/{run.id}" if ui else ""} for run in runs]


def _stage_runs_lines() -> list[str]:
    from tasks.orchestration import PREFECT_ENV, orchestrated

    if not orchestrated():
        return [f"- stage flow runs: none ({PREFECT_ENV}=off: the stages ran without Prefect)"]
    from prefect.runtime import flow_run

    flow_run_id = str(flow_run.id)
    try:
        runs = stage_runs(flow_run_id)
    except Exception as error:  # noqa: BLE001 - the summary must not fail the finished run
        return [f"- stage flow runs: not listed ({type(error).__name__}: {error})"]
    if not runs:
        return ["- stage flow runs: none (every stage was up to date)"]
    links = [f"[{r['stage']}]({r['url']})" if r["url"] else f"{r['stage']} (`{r['id']}`)" for r in runs]
    return [f"- stage flow runs (tag `{pipeline_tag(flow_run_id)}`): " + ", ".join(
        f"{link} {r['state']}" for link, r in zip(links, runs, strict=True))]


def _changes_table(changes: Sequence["Change"]) -> list[str]:
    if not changes:
        return ["- params: as the params file has them (no override)"]
    rows = [f"| `{c.key}` | `{c.before!r}` | `{c.after!r}` |" for c in changes]
    return ["- params changed for this run (the params file is put back afterwards):", "",
            "| key | params file | this run |", "| --- | --- | --- |", *rows, ""]


def _pipeline_flow() -> Any:
    """The ``pipeline`` flow; its parameter is typed (:class:`tasks.studies.PipelineRun`): the deployment's form.

    Without Prefect (:mod:`tasks.orchestration`), the same function, run as it is.
    """
    from tasks.orchestration import orchestrated
    from tasks.studies import PipelineRun

    def pipeline(run: PipelineRun = PipelineRun()) -> dict[str, Any]:  # noqa: B008 - frozen model, shared safely
        """Run a study with this run's params: apply the overrides, check, ``dvc repro`` each stage, put params back.

        The overrides go into the study's params file (as ``dvc exp run -S`` would put them) and the whole file is
        checked before any stage runs; the MLflow parent run logs the params as applied; every stage of the study is
        reproduced in order; the params file is put back; the summary says where the results are.
        """
        return _pipeline(run)

    if not orchestrated():
        return pipeline
    from prefect import flow

    return flow(pipeline, name="pipeline", log_prints=True)


FLOWS.add("pipeline", _pipeline_flow)


def _pipeline(run: "PipelineRun") -> dict[str, Any]:
    """The body of the ``pipeline`` flow."""
    from fedcore.config import flatten
    from tasks.common import read_json, read_params
    from tasks.orchestration import publish_markdown
    from tasks.overrides import overridden, run_lock
    from tasks.studies import STUDIES
    from tasks.tracking import end_run, run_status, start_parent_run, tracking_uri

    study = STUDIES[run.study]
    root = Path.cwd()
    targets = study_targets(study, root, run.stages)
    overrides = run.overrides()
    with run_lock(root), overridden(root, root / study.params_file, overrides) as changes:
        for change in changes:
            print(f"params: {change.key} = {change.after!r} (params file: {change.before!r})")
        params = read_params(root / study.params_file)  # the applied values; fails before any stage runs
        tags = {"fedaudio.study": run.study, "fedaudio.overrides": " ".join(overrides) or "none", **_prefect_tags()}
        parent = start_parent_run(params.mlflow, root, flatten(params), tags=tags)
        env = _child_env(parent)
        try:
            for name in targets:
                FLOWS["repro_stage"](name, env, run.force)
        except BaseException as error:  # FAILED, or KILLED when interrupted (Ctrl-C, SIGTERM)
            end_run(parent, run_status(error), error)
            raise
        end_run(parent, "FINISHED")
    metrics_file = root / study.metrics
    metrics = read_json(metrics_file).get(run.study, {}) if metrics_file.exists() else {}
    uri = tracking_uri(params.mlflow, root)
    message = "\n".join([
        f"# pipeline finished: study `{run.study}`",
        *(f"- {run.study}.{name}: **{_number(value)}**" for name, value in metrics.items()),
        *_changes_table(changes),
        f"- the same run from a shell: `{study.shell_command(overrides)}`",
        f"- metrics: `dvc metrics show` ({study.metrics}); per-round plot: {study.plot}",
        f"- MLflow: `mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --workers 1`, experiment "
        f"`{params.mlflow.experiment}`, parent run `{parent}`; every round's model is a LoggedModel.",
        *_stage_runs_lines(),
    ])
    publish_markdown(message, key="pipeline-summary")
    return {"metrics": metrics, "params": flatten(params), "overrides": overrides, "summary": message}


def _number(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _main(
    study: Annotated[str, typer.Option(metavar="NAME",
                                       help=f"study to run: {', '.join(stage.STUDY_NAMES)}")] = "fedavg",
    overrides: Annotated[list[str] | None, typer.Option("--set", "-S", metavar="KEY=VALUE",
                                                        help="change a param for this run, as dvc exp run -S does "
                                                             "(repeatable)")] = None,
    stages: Annotated[list[str] | None, typer.Option("--stage", "--stages", metavar="STAGE",
                                                     help="only this stage of the study (repeatable)  [default: "
                                                          "all, in order]")] = None,
    force: Annotated[bool, typer.Option("--force", help="re-run stages even when DVC finds them up to "
                                                        "date")] = False,
) -> int:
    from tasks.studies import STUDIES, PipelineRun

    def work() -> None:
        result = FLOWS["pipeline"](PipelineRun(study=study, set=overrides or [], stages=stages, force=force))
        print("\n" + result["summary"].replace("**", ""))  # on stdout whatever the log level

    # the params file is named by its errors; each repro task's log (DVC's output) reaches the terminal
    return stage.run_stage(STUDIES[study].params_file, work, task_logs=True)


def _known_study(options: dict[str, Any]) -> None:
    if options["study"] not in stage.STUDY_NAMES:
        raise typer.BadParameter(f"must be one of {', '.join(stage.STUDY_NAMES)}. Got {options['study']!r}.",
                                 param_hint="--study")


main = stage.command(__doc__, _main, prefect=False, check=_known_study)
"""Command-line entry point (``python -m flows.pipeline``)."""
__getattr__ = FLOWS.module_getattr  # from flows.pipeline import pipeline: the flow, built then

if __name__ == "__main__":
    raise SystemExit(main())
