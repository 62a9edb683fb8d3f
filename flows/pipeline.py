"""pipeline flow: run a study's DVC stages in order (DVC decides what is stale), under one MLflow parent run.

Run ``python -m flows.pipeline [-S key=value ...]`` (what ``make run`` does) or deploy it with ``prefect.yaml``.
Overrides (``-S``, or the deployment form's fields) are applied to the params file the way ``dvc exp run -S``
applies them, checked, and used by every stage; the file is put back when the run ends. DVC (``dvc.lock``), the
Prefect flow run's parameters and the MLflow parent run therefore record the same values.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from fedcore.config import flatten
from fedcore.errors import ConfigError
from flows import stage
from tasks.common import read_json, read_params
from tasks.overrides import Change, overridden, run_lock
from tasks.studies import STUDIES, PipelineRun, Study
from tasks.tracking import PARENT_ENV, end_run, run_status, start_parent_run, tracking_uri


def dvc_stages(dvc_file: Path = Path("dvc.yaml")) -> list[str]:
    """Stage names of ``dvc.yaml`` in file order."""
    return list((yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {}))


def study_targets(study: Study, root: Path, stages: Sequence[str] | None) -> list[str]:
    """``dvc repro`` targets of the study's stages (all, in file order, or the ones asked for)."""
    names = dvc_stages(root / study.dvc_file)
    if unknown := [name for name in stages or [] if name not in names]:
        raise ConfigError(f"pipeline: 'stages' must be stages of {study.dvc_file}, one of {', '.join(names)}. "
                          f"Got {unknown!r}.")
    chosen = list(stages) if stages else names
    return chosen if study.dvc_file == "dvc.yaml" else [f"{study.dvc_file}:{name}" for name in chosen]


@task(name="dvc-repro", task_run_name="repro {name}", retries=0)
def repro_stage(name: str, env: dict[str, str], force: bool = False) -> None:
    """``dvc repro <name>``: runs the stage (and anything stale upstream) or reports it up to date."""
    command = [str(Path(sys.executable).with_name("dvc")), "repro", name]
    if force:
        command.append("--force")
    print("$ " + " ".join(command[1:]))
    result = subprocess.run(command, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"pipeline: stage {name!r} failed (dvc exit code {result.returncode}); "
                           "finished stages and checkpoints are kept, run again to resume.")


def _child_env(parent_run_id: str) -> dict[str, str]:
    env = dict(os.environ)
    env[PARENT_ENV] = parent_run_id
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # Without a configured server this flow runs on Prefect's temporary server: hand it to the stages, so each
    # stage's flow shows up in the same place and none pays ~10 s to start a temporary server of its own. The
    # server stays this process's: a stage that dies (kill -9 included) ends only what it started itself.
    url = stage.prefect_api_url()
    if url:
        env["PREFECT_API_URL"] = url
    return env


def _prefect_tags() -> dict[str, str]:
    from prefect.runtime import flow_run

    return {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)}


def _changes_table(changes: Sequence[Change]) -> list[str]:
    if not changes:
        return ["- params: as the params file has them (no override)"]
    rows = [f"| `{c.key}` | `{c.before!r}` | `{c.after!r}` |" for c in changes]
    return ["- params changed for this run (the params file is put back afterwards):", "",
            "| key | params file | this run |", "| --- | --- | --- |", *rows, ""]


@flow(name="pipeline", log_prints=True)
def pipeline(run: PipelineRun = PipelineRun()) -> dict[str, Any]:  # noqa: B008 - frozen model, shared safely
    """Run a study with this run's params: apply the overrides, check, ``dvc repro`` each stage, put params back.

    The overrides go into the study's params file (as ``dvc exp run -S`` would put them) and the whole file is
    checked before any stage runs; the MLflow parent run logs the params as applied; every stage of the study is
    reproduced in order; the params file is put back; the summary says where the results are.
    """
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
                repro_stage(name, env, run.force)
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
    ])
    create_markdown_artifact(message, key="pipeline-summary")
    return {"metrics": metrics, "params": flatten(params), "overrides": overrides, "summary": message}


def _number(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="fedavg", choices=sorted(STUDIES), help="study to run (default: fedavg)")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a param for this run, as `dvc exp run -S` does (repeatable)")
    p.add_argument("--stages", nargs="*", default=None, help="stage names (default: all of the study, in order)")
    p.add_argument("--force", action="store_true", help="re-run stages even when DVC finds them up to date")
    return p


def _main(args: argparse.Namespace) -> None:
    run = PipelineRun(study=args.study, set=args.overrides, stages=args.stages, force=args.force)
    result = pipeline(run)
    print("\n" + result["summary"].replace("**", ""))  # on stdout whatever the log level


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m flows.pipeline``)."""
    args = _parser().parse_args(argv)
    args.params = STUDIES[args.study].params_file  # named by stage.run's error messages
    return stage.run(_main, args)


if __name__ == "__main__":
    raise SystemExit(main())
