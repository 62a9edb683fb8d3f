"""pipeline flow: run the DVC stages in order (DVC decides what is stale), under one MLflow parent run.

Run ``python -m flows.pipeline`` (what ``make run`` does) or deploy it with ``prefect.yaml``.
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
from flows import stage
from tasks.common import read_json, read_params
from tasks.tracking import PARENT_ENV, end_run, run_status, start_parent_run, tracking_uri


def dvc_stages(dvc_file: Path = Path("dvc.yaml")) -> list[str]:
    """Stage names of ``dvc.yaml`` in file order."""
    return list((yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {}))


@task(name="dvc-repro", retries=0)
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


@flow(name="pipeline", log_prints=True)
def pipeline(
    params_file: str = "params.yaml", stages: list[str] | None = None, force: bool = False
) -> dict[str, Any]:
    """Check the params, open the MLflow parent run, ``dvc repro`` every stage in order, say where results are."""
    params = read_params(params_file)  # fails before any work if a section is invalid
    root = Path.cwd()
    parent = start_parent_run(params.mlflow, root, flatten(params))
    env = _child_env(parent)
    try:
        for name in stages or dvc_stages():
            repro_stage(name, env, force)
    except BaseException as error:  # FAILED, or KILLED when interrupted (Ctrl-C, SIGTERM)
        end_run(parent, run_status(error), error)
        raise
    end_run(parent, "FINISHED")
    metrics_file = root / "metrics" / "federate.json"
    metrics = read_json(metrics_file) if metrics_file.exists() else {}
    uri = tracking_uri(params.mlflow, root)
    message = "\n".join([
        "# pipeline finished",
        f"- final global test accuracy: **{metrics.get('global_accuracy', float('nan')):.4f}** "
        f"(best {metrics.get('best_global_accuracy', float('nan')):.4f} at round {metrics.get('best_round')})",
        "- metrics: `dvc metrics show` (metrics/federate.json); per-round plot: plots/federate/rounds.png",
        "- partition heatmap: data/partition/heatmap.png",
        f"- MLflow: `mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --workers 1`, experiment "
        f"`{params.mlflow.experiment}`, parent run `{parent}`; every round's model is a LoggedModel.",
    ])
    create_markdown_artifact(message, key="pipeline-summary")
    return {"metrics": metrics, "summary": message}


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stages", nargs="*", default=None, help="stage names (default: all of dvc.yaml, in order)")
    p.add_argument("--force", action="store_true", help="re-run stages even when DVC finds them up to date")


def _main(args: argparse.Namespace) -> None:
    result = pipeline(args.params, args.stages, args.force)
    print("\n" + result["summary"].replace("**", ""))  # on stdout whatever the log level


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m flows.pipeline``)."""
    return stage.entry(__doc__ or "", _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
