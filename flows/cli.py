"""``fedaudio``: one command line for the pipeline, its stages, the Prefect deployment, model selection and MLflow.

    fedaudio run [--study fedavg] [-S key=value ...]     # a study's DVC stages under one Prefect flow run
    fedaudio stage federate [--params FILE ...]          # one stage, as DVC runs it (python -m flows.federate)
    fedaudio deploy                                      # register prefect.yaml's deployment (prefect deploy --all)
    fedaudio select --metrics results/fassl/metrics.json --out results/fassl/selection
    fedaudio ui [--port 5000]                            # MLflow's UI on the project's store

Each command imports what it runs only when it runs, so ``fedaudio --help`` and ``fedaudio <command> --help``
answer at once; a stage's own options are in ``fedaudio stage <name> --help`` (its module's command line).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from flows.stage import STUDY_NAMES

STAGES: dict[str, str] = {
    "check": "flows.check",
    "download": "flows.download",
    "features": "flows.features",
    "partition": "flows.partition",
    "poison": "flows.poison",
    "federate": "flows.federate",
    "select": "flows.select",
    "earlyexit": "flows.earlyexit",
    "av": "flows.av",
    "modality": "flows.modality",
    "distill": "flows.distill",
    "headline": "flows.headline",
}
"""Stage name -> the module DVC runs (``python -m <module>``); each has a ``main(argv)``."""
PIPELINE = "flows.pipeline"
"""The module of ``fedaudio run`` (``python -m flows.pipeline``)."""


def _main_of(module: str, argv: list[str], prog_name: str | None = None) -> int:
    """``main(argv)`` of ``module``, imported only now (what keeps ``fedaudio --help`` fast).

    ``prog_name`` is the command its help and usage errors name (default: ``python -m <module>``).
    """
    import importlib

    return int(importlib.import_module(module).main(argv, prog_name=prog_name))

STUDIES = STUDY_NAMES
"""The studies ``fedaudio run --study`` takes (:data:`flows.stage.STUDY_NAMES`)."""

app = typer.Typer(help=__doc__.split("\n\n")[0], no_args_is_help=True, add_completion=False,
                  context_settings={"help_option_names": ["-h", "--help"]}, rich_markup_mode=None,
                  pretty_exceptions_enable=False)


def _exit(code: int) -> None:
    if code:
        raise typer.Exit(code)


@app.command()
def run(
    study: Annotated[str, typer.Option(metavar="NAME", help=f"study to run: {', '.join(STUDIES)}")] = "fedavg",
    set_: Annotated[list[str] | None, typer.Option("--set", "-S", metavar="KEY=VALUE",
                                                   help="change a param for this run, as `dvc exp run -S` does "
                                                        "(repeatable)")] = None,
    stages: Annotated[list[str] | None, typer.Option("--stage", metavar="STAGE",
                                                     help="only this stage of the study (repeatable; default: "
                                                          "all, in order)")] = None,
    force: Annotated[bool, typer.Option("--force", help="re-run stages even when DVC finds them up to "
                                                        "date")] = False,
) -> None:
    """Run a study: apply the overrides, `dvc repro` each stage under one Prefect flow run, put params back."""
    if study not in STUDIES:
        raise typer.BadParameter(f"must be one of {', '.join(STUDIES)}. Got {study!r}.", param_hint="--study")
    argv = ["--study", study, *[a for value in set_ or [] for a in ("-S", value)]]
    argv += [a for name in stages or [] for a in ("--stage", name)]
    _exit(_main_of(PIPELINE, [*argv, *(["--force"] if force else [])]))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": []})
def stage(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help=f"one of {', '.join(STAGES)}", show_default=False)] = None,
) -> None:
    """Run one stage as DVC does (`python -m flows.<name> ...`); `fedaudio stage <name> --help` lists its options."""
    if name is None or name in ("-h", "--help"):
        typer.echo(ctx.get_help())
        return
    if name not in STAGES:
        raise typer.BadParameter(f"must be one of {', '.join(STAGES)}. Got {name!r}.", param_hint="NAME")
    _exit(_main_of(STAGES[name], list(ctx.args), f"fedaudio stage {name}"))


@app.command()
def deploy(
    prefect_file: Annotated[Path, typer.Option("--prefect-file", metavar="FILE",
                                               help="the deployments to register")] = Path(
        "prefect.yaml"),
) -> None:
    """Register the pipeline's Prefect deployment (`prefect deploy --all`); needs PREFECT_API_URL set."""
    if not os.environ.get("PREFECT_API_URL"):
        raise typer.BadParameter("set PREFECT_API_URL to a running server first (`prefect server start --host "
                                 "127.0.0.1`, then export PREFECT_API_URL=http://127.0.0.1:4200/api).",
                                 param_hint="PREFECT_API_URL")
    prefect = Path(sys.executable).with_name("prefect")
    _exit(subprocess.run([str(prefect), "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)],
                         check=False).returncode)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": []})
def select(ctx: typer.Context) -> None:
    """Register each downstream task's best round of a self-supervised run (`flows.select`; --help for options)."""
    _exit(_main_of(STAGES["select"], list(ctx.args), "fedaudio select"))


@app.command()
def ui(
    port: Annotated[int, typer.Option(metavar="PORT", help="port of the UI")] = 5000,
    params: Annotated[Path, typer.Option(metavar="FILE",
                                         help="params file naming the MLflow store (mlflow.tracking_uri)")] = Path(
        "params.yaml"),
) -> None:
    """Open MLflow's UI on the project's store, to compare rounds and pick a model (Ctrl-C ends it)."""
    from tasks.common import read_params
    from tasks.tracking import find_experiment, saved_views, tracking_uri, ui_url

    cfg = read_params(params, ["mlflow"]).mlflow
    uri = tracking_uri(cfg, Path.cwd())
    base = f"http://127.0.0.1:{port}"
    experiment = find_experiment(cfg, Path.cwd())
    where = [f"experiments {ui_url(base=base)}"]
    if experiment is not None:
        where = [f"experiment {cfg.experiment!r}, its rounds' models: {ui_url(experiment, 'models', base)}",
                 f"its runs: {ui_url(experiment, 'runs', base)}"]
        where += [f"runs {view!r} charted, accuracy and loss first: {ui_url(experiment, 'runs', base, view)}"
                  for view in saved_views(cfg, Path.cwd(), experiment)]
    mlflow = Path(sys.executable).with_name("mlflow")
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    print(f"MLflow UI on store {uri}, in model-training mode:", *where, sep="\n  ", flush=True)
    _exit(subprocess.run([str(mlflow), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
                          "--workers", "1"], env=env, check=False).returncode)


def main() -> None:
    """Console entry point (``fedaudio``)."""
    app(prog_name="fedaudio")


if __name__ == "__main__":
    main()
