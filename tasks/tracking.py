"""MLflow: one parent run per pipeline execution, one child run per stage, every round's model, safe loading.

Layout in MLflow
----------------
- parent run ``pipeline`` (created by ``flows.pipeline``, or by the stage when DVC runs it directly): every
  param of params.yaml.
- child run ``federate`` (or ``modality-*``, ``distill``, ``earlyexit-*``): every param, per-round metrics with
  ``step=round``, each round's global model as an MLflow 3 LoggedModel (``name=global-round-NNNN``,
  ``step=round``, metrics linked to it), the final model registered under ``mlflow.registered_model`` with alias
  ``final``.

Models
------
Every logged model carries the MLmodel flavour ``fedaudio`` (:data:`FLAVOR`): ``model_spec.json`` (the
architecture, :class:`fedcore.models.spec.ModelSpec`), ``weights.safetensors`` and the inputs it takes in call
order (``audio`` or ``audio,visual``; also the LoggedModel tag ``fedaudio.inputs``). The federate stage's
classifiers also hold ``serving.json`` (feature settings, normalisation statistics, class names:
:mod:`fedcore.serving`) with a ``python_function`` flavour loaded by ``fedcore.serving``, so that
``mlflow.pyfunc.load_model(uri).predict("a.wav")`` classifies audio (:func:`add_serving`); with
``execution.export_pt2`` its models also hold MLflow's ``pytorch`` flavour as a ``torch.export`` program (pt2).
Nothing is pickled.
:func:`load_model` copies a model's files (no deserialisation), reads ``MLmodel`` with
``yaml.safe_load``, checks the flavour, then rebuilds the model from its spec and loads the weights strictly
(:func:`fedcore.models.spec.rebuild`). A model without the flavour (e.g. pickled by ``mlflow.pytorch``) is refused
unless ``mlflow.trust_pickle`` is set, and then loaded by MLflow (which runs any code it holds).

Run state
---------
A run is RUNNING while its stage runs, FINISHED at its end (:meth:`FederateTracker.finish`), FAILED when the
stage fails and KILLED when it is interrupted (KeyboardInterrupt, SIGTERM: :meth:`FederateTracker.fail`). Every
run records its owner process (tags ``fedaudio.owner.*``: host, pid, process start time); a process killed
without a word (``kill -9``) leaves its run RUNNING, and the next stage started against the store (:func:`setup`)
marks such runs KILLED when their owner is gone. A resumed run is reopened as RUNNING and
:meth:`FederateTracker.backfill` logs the checkpoint's rounds that the run lacks.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.config import MlflowConfig
from fedcore.models.spec import ModelSpec, rebuild, spec_of
from fedcore.serving import SERVING_FILE, ServingSpec, relative_name

log = logging.getLogger(__name__)

PARENT_ENV = "FEDAUDIO_PARENT_RUN_ID"
FINAL_ALIAS = "final"
#: LoggedModel tag naming the inputs a model takes, in call order (``audio`` or ``audio,visual``).
INPUTS_TAG = "fedaudio.inputs"
#: MLmodel flavour of this project's models: ``{spec, weights, inputs, architecture, format_version}``.
FLAVOR = "fedaudio"
FLAVOR_VERSION = 1
SPEC_FILE = "model_spec.json"
WEIGHTS_FILE = "weights.safetensors"
#: ``python_function`` loader of the federate stage's models (reads serving.json, model_spec.json, safetensors).
SERVING_LOADER = "fedcore.serving"
#: Largest MLmodel file read; largest weights file read (a wav2vec 2.0 large is 1.3 GB).
MAX_MLMODEL_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 4 << 30
#: The inputs a model may take.
INPUTS = ("audio", "visual")
#: Run tags: the process that owns a RUNNING run, and why a run ended.
OWNER_HOST, OWNER_PID, OWNER_STARTED = "fedaudio.owner.host", "fedaudio.owner.pid", "fedaudio.owner.started"
END_REASON = "fedaudio.end_reason"
#: Tag of a parent run that a stage opened itself (DVC ran it without the pipeline flow): it ends with the stage.
STAGE_PARENT = "fedaudio.stage_parent"
#: Tags of a run whose rounds were logged again from a checkpoint's history.
BACKFILLED, RESTORED_FROM = "fedaudio.backfilled_rounds", "fedaudio.restored_from_run"
MODELS_NOT_RESTORED = "fedaudio.models_not_restored"
TRUST_FIX = ("Fix: log the model with this project's stages (they write model_spec.json + weights.safetensors), "
             "or, only if nobody else can write to this MLflow store, set 'mlflow.trust_pickle: true' in "
             "params.yaml.")


def tracking_uri(cfg: MlflowConfig, root: Path) -> str:
    """The tracking URI: env MLFLOW_TRACKING_URI first, then the param; relative SQLite paths live under ``root``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str((root / uri[len(prefix):]).resolve())
    return uri


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""The experiment tag naming its kind: model training (other kinds: GenAI, fine-tuning). MLflow 3.17's UI does not
read it to choose its mode (see :data:`UI_MODE`); it stays for the UIs and clients that do."""

MLFLOW_UI_ENV = "FEDAUDIO_MLFLOW_UI"
"""Base URL of the MLflow UI that links point at (default: ``fedaudio ui``'s, http://127.0.0.1:5000)."""

UI_MODE = "workflowType=machine_learning"
"""Query that opens a page of MLflow's UI in model-training mode (runs, charts, models). MLflow 3.17 opens every
experiment in GenAI mode (traces, evaluation runs) until the user flips its mode switch, which the browser then
remembers; an address carrying this query opens in model-training mode from the first visit."""


CHART_VIEW_TAG = "mlflow.sharedViewState."
"""Prefix of the experiment tags in which MLflow's UI keeps saved and shared views (key: prefix + share key)."""
HEADLINE_WORDS = ("accuracy", "knn", "probe", "loss")
"""Metrics whose names hold these words are charted first in a run's saved view, in this order (``knn``, ``probe``:
the downstream scores of a self-supervised run, ``<task>/knn<k>_val``, which are accuracies)."""
MAX_HEADLINE = 8


def headline_metrics(keys: Sequence[str]) -> list[str]:
    """The round metrics charted first: accuracy, then downstream scores, then loss, in logging order (at most 8)."""
    return [k for word in HEADLINE_WORDS for k in keys if word in k
            and not any(w in k for w in HEADLINE_WORDS[:HEADLINE_WORDS.index(word)])][:MAX_HEADLINE]


def view_key(run_name: str) -> str:
    """Share key of the saved chart view of the runs named ``run_name`` (letters, digits, ``-_.`` only)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name).strip("-") or "runs"


def chart_view_tag(run_name: str, metrics: Sequence[str], created_ms: int = 0) -> tuple[str, str]:
    """The experiment tag that saves a chart view of the runs named ``run_name``, ``metrics`` first.

    MLflow's UI sorts an experiment's metric charts by name, so ``bytes_down`` and ``detect_*`` come before
    accuracy, and it charts only the runs its table shows, where a stage's run sits folded under its pipeline run.
    This view filters and sorts the runs by name (``attributes.run_name = '<run_name>'``; the store breaks the ties
    newest first) and so lists them unfolded (the UI folds child runs only when unfiltered or sorted by start
    time), and puts one line chart per metric of ``metrics`` (x: the step, i.e. the round) in a section "Accuracy
    and loss" above MLflow's own "Model metrics" and "System metrics" sections, where the UI adds every other
    metric as it does by default; charts of metrics no shown run logs are hidden. The value is the envelope MLflow's
    UI writes for a saved view (``{name, createdAt, updatedAt, state}``, ``state`` a JSON string of the page's
    state), so the view is also listed in the runs page's saved views; an address with ``viewStateShareKey=<key>``
    opens it (:func:`ui_url`). Returns (tag key, tag value).
    """
    sections = [("fedaudio-headline", "Accuracy and loss", True),
                ("fedaudio-model-metrics", "Model metrics", False),
                ("fedaudio-system-metrics", "System metrics", False)]
    charts = [{"uuid": f"fedaudio-chart-{metric}", "type": "LINE", "runsCountToCompare": 10,
               "metricSectionId": sections[0][0], "deleted": False, "isGenerated": False, "displayName": metric,
               "metricKey": metric, "lineSmoothness": 0, "xAxisScaleType": "linear", "scaleType": "linear",
               "range": {}, "xAxisKey": "step", "selectedXAxisMetricKey": "", "yAxisKey": "metric",
               "yAxisExpressions": [], "ignoreOutliers": False, "useGlobalXaxisKey": True,
               "useGlobalLineSmoothing": True} for metric in metrics]
    quoted = run_name.replace("'", "\\'")
    state = {"searchFilter": f"attributes.run_name = '{quoted}'", "orderByKey": "tags.`mlflow.runName`",
             "orderByAsc": False,
             "compareRunCharts": charts,
             "compareRunSections": [{"uuid": uuid, "name": name, "display": True, "isReordered": ours,
                                     "deleted": False, "isGenerated": not ours} for uuid, name, ours in sections],
             "isAccordionReordered": True, "hideEmptyCharts": True}
    envelope = {"name": f"{run_name}: accuracy and loss first", "createdAt": created_ms, "updatedAt": created_ms,
                "state": json.dumps(state, separators=(",", ":"))}
    return CHART_VIEW_TAG + view_key(run_name), json.dumps(envelope, separators=(",", ":"))


def ui_url(experiment_id: str | None = None, page: str = "", base: str | None = None,
           view: str | None = None) -> str:
    """Address of a page of MLflow's UI in model-training mode.

    ``page`` is the route under the experiment (``"models"``, ``"runs/<run id>"``); without ``experiment_id`` the
    experiments list. ``base`` defaults to env ``FEDAUDIO_MLFLOW_UI``, else ``fedaudio ui``'s address. ``view``, a
    share key (:func:`view_key`), opens the runs page as charts in that saved view (:func:`chart_view_tag`).
    """
    base = (base or os.environ.get(MLFLOW_UI_ENV) or "http://127.0.0.1:5000").rstrip("/")
    route = "/experiments"
    if experiment_id is not None:
        route += f"/{experiment_id}" + (f"/{page.strip('/')}" if page else "")
    query = UI_MODE + (f"&compareRunsMode=CHART&viewStateShareKey={view}" if view else "")
    return f"{base}/#{route}?{query}"


def run_link(experiment_id: str, run_id: str) -> str:
    """Markdown link to a run in the MLflow UI, in model-training mode (:func:`ui_url`)."""
    return f"[MLflow run `{run_id}`]({ui_url(experiment_id, f'runs/{run_id}')})"


def find_experiment(cfg: MlflowConfig, root: Path) -> str | None:
    """The id of the experiment ``cfg.experiment`` in the project's store, or None when it does not exist yet."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    experiment = mlflow.MlflowClient(tracking_uri(cfg, root)).get_experiment_by_name(cfg.experiment)
    return None if experiment is None else str(experiment.experiment_id)


def saved_views(cfg: MlflowConfig, root: Path, experiment_id: str) -> list[str]:
    """Share keys of the experiment's saved views (:func:`chart_view_tag`), sorted."""
    import mlflow

    tags = mlflow.MlflowClient(tracking_uri(cfg, root)).get_experiment(experiment_id).tags
    return sorted(k[len(CHART_VIEW_TAG):] for k in tags if k.startswith(CHART_VIEW_TAG))


def setup(cfg: MlflowConfig, root: Path) -> str:
    """Point MLflow at the store and make sure the experiment exists (artifacts under ``root/mlartifacts``).

    A new experiment is tagged as model training (:data:`EXPERIMENT_KIND`; links to it carry :data:`UI_MODE`, which
    is what MLflow 3.17's UI reads). Also marks the experiment's runs whose owner process is gone KILLED
    (:func:`reap_orphans`). Returns the experiment id.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri(cfg, root)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        experiment_id = str(experiment.experiment_id)
    else:
        location = (root / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
        try:
            experiment_id = str(mlflow.create_experiment(cfg.experiment, artifact_location=location,
                                                         tags=dict([EXPERIMENT_KIND])))
        except Exception:  # another process created it first
            experiment = mlflow.get_experiment_by_name(cfg.experiment)
            if experiment is None:
                raise
            experiment_id = str(experiment.experiment_id)
    reap_orphans(experiment_id)
    return experiment_id


# --------------------------------------------------------------------------------------------------- run state
def _process_started(pid: int) -> float:
    import psutil

    return round(float(psutil.Process(pid).create_time()), 2)


def owner_tags() -> dict[str, str]:
    """Tags naming this process as a run's owner: host, pid and the process's start time (pids are reused)."""
    return {OWNER_HOST: socket.gethostname(), OWNER_PID: str(os.getpid()),
            OWNER_STARTED: f"{_process_started(os.getpid()):.2f}"}


def owner_alive(tags: Mapping[str, str]) -> bool | None:
    """Whether the process named by a run's owner tags still runs.

    None when it cannot be told: no owner tags, or another host.
    """
    import psutil

    if tags.get(OWNER_HOST) != socket.gethostname() or OWNER_PID not in tags:
        return None
    try:
        pid, started = int(tags[OWNER_PID]), float(tags.get(OWNER_STARTED, "nan"))
    except ValueError:
        return None
    try:
        return abs(_process_started(pid) - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # exists, not ours to inspect
        return True


def reap_orphans(experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of ``experiment_id`` whose owner process (on this host) is gone.

    A process killed with SIGKILL (or a machine that lost power) cannot close its run; this is how such a run
    stops showing RUNNING. Runs of other hosts and runs without owner tags are left alone. Returns the ids marked.
    """
    import mlflow

    client = mlflow.MlflowClient()
    try:
        runs = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
    except Exception as error:  # a store that cannot be searched must not stop the stage
        log.warning("MLflow: cannot look for runs left RUNNING by killed processes: %s", error)
        return []
    reaped = []
    for run in runs:
        tags = run.data.tags
        if owner_alive(tags) is False:
            reason = (f"owner process {tags.get(OWNER_PID)} on {tags.get(OWNER_HOST)} ended without closing the "
                      "run (killed); marked KILLED by the next stage started against this store")
            client.set_tag(run.info.run_id, END_REASON, reason)
            client.set_terminated(run.info.run_id, status="KILLED")
            reaped.append(str(run.info.run_id))
            log.warning("MLflow: run %s (%s) was left RUNNING by a killed process; marked KILLED.",
                        run.info.run_id, run.info.run_name)
    return reaped


def run_status(error: BaseException | None) -> str:
    """The MLflow status a run ends with after ``error``.

    FINISHED without error, KILLED when interrupted (Ctrl-C, SIGTERM, ``SystemExit``), FAILED otherwise.
    """
    if error is None:
        return "FINISHED"
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        return "KILLED"
    exceptions = sys.modules.get("prefect.exceptions")  # Prefect turns SIGTERM into TerminationSignal
    if exceptions is not None and isinstance(error, exceptions.ExternalSignal):
        return "KILLED"
    return "FAILED"


def _end_reason(error: BaseException | None) -> str:
    if error is None:
        return "finished"
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return text[:500]


def _param_values(params: Mapping[str, Any]) -> dict[str, str]:
    return {key: ("null" if value is None else str(value))[:6000] for key, value in params.items()}


def start_parent_run(cfg: MlflowConfig, root: Path, params: Mapping[str, Any], run_name: str = "pipeline",
                     tags: Mapping[str, str] | None = None) -> str:
    """Create the parent run of one pipeline execution and return its id.

    The run stays open (RUNNING), owned by this process (:func:`owner_tags`).
    """
    import mlflow

    experiment_id = setup(cfg, root)
    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={"fedaudio.kind": "pipeline", **owner_tags(), **(tags or {})})
    _log_params(client, run.info.run_id, params)
    return str(run.info.run_id)


def end_run(run_id: str, status: str = "FINISHED", error: BaseException | None = None) -> None:
    """Close a run created with :func:`start_parent_run` (``status``: see :func:`run_status`)."""
    import mlflow

    client = mlflow.MlflowClient()
    if status != "FINISHED":
        client.set_tag(run_id, END_REASON, _end_reason(error) if error is not None else status.lower())
    client.set_terminated(run_id, status=status)


def _log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in _param_values(params).items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def _ranges(rounds: Sequence[int]) -> str:
    """``[1, 2, 3, 5]`` as ``1-3,5``."""
    spans: list[list[int]] = []
    for r in sorted(set(rounds)):
        if spans and spans[-1][1] == r - 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


class ExportOnce:
    """A ``flavor`` for :meth:`mlflow.models.Model.log`: mlflow.pytorch's ``pt2`` format, traced once per model.

    The architecture is traced once, by :meth:`prepare` (before the rounds) or by the first model logged: that
    model is saved by :func:`mlflow.pytorch.save_model` (``torch.export``, signature, input example, pip
    requirements, extra files) into a template, and its program is loaded back. A later model with the same
    state-dict keys and extra-file names gets a copy of the template with its own weights copied into that program
    and its own extra files: the files MLflow would write, read alike by ``mlflow.pytorch.load_model``, without
    tracing the model again each round (the larger part of a round's logging on a small model). A model whose
    program does not hold every state-dict entry as a weight is always saved in full.
    """

    flavor_name = "pytorch"

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="fedaudio-export-")
        self._program: Any = None
        self._keys: frozenset[str] = frozenset()
        self._extra_names: tuple[str, ...] = ()

    @property
    def _template(self) -> Path:
        return Path(self._folder.name) / "template"

    def prepare(self, model: Any, **kwargs: Any) -> None:
        """Trace ``model`` now (``kwargs`` as for :func:`mlflow.pytorch.save_model`) and check the result.

        The saved program, loaded back, must give the model's outputs on the input example (else RuntimeError).
        """
        import mlflow
        import torch

        shutil.rmtree(self._template, ignore_errors=True)
        mlflow.pytorch.save_model(model, str(self._template), **kwargs)
        program = self._adopt(model.state_dict(), kwargs.get("extra_files"))
        example = torch.as_tensor(kwargs["input_example"])
        with torch.no_grad():  # the program just written, read back once (by _adopt), not through MLflow again
            expected, got = model(example), program.module()(example)
        if not torch.allclose(expected, got, rtol=1e-5, atol=1e-6):
            raise RuntimeError("ExportOnce: the exported program does not reproduce the model's outputs "
                               f"(largest difference {float((expected - got).abs().max()):.3g}).")

    def _adopt(self, state: Mapping[str, Any], extra_files: Any) -> Any:
        """Load the template's program (kept for reuse when it holds every state entry) and return it."""
        import torch

        program = torch.export.load(self._template / "data" / "model.pt2")
        reusable = frozenset(program.state_dict) == frozenset(state)
        self._program = program if reusable else None
        self._keys = frozenset(state) if reusable else frozenset()
        self._extra_names = tuple(Path(f).name for f in extra_files or ())
        return program

    def save_model(self, path: str, mlflow_model: Any, pytorch_model: Any, **kwargs: Any) -> None:
        """Write the MLflow model of ``pytorch_model`` into ``path`` (called by ``Model.log``)."""
        import mlflow
        import torch
        from mlflow.models import Model
        from mlflow.utils.file_utils import get_total_file_size

        state = pytorch_model.state_dict()
        extra_files = kwargs.get("extra_files") or ()
        if (self._program is None or frozenset(state) != self._keys
                or tuple(Path(f).name for f in extra_files) != self._extra_names):
            mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model, **kwargs)
            shutil.rmtree(self._template, ignore_errors=True)
            shutil.copytree(path, self._template)
            self._adopt(state, extra_files)
            return
        with torch.no_grad():
            for key, value in state.items():
                self._program.state_dict[key].copy_(value)
        target = Path(path)
        shutil.copytree(self._template, target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("MLmodel", "model.pt2", "extra_files"))
        torch.export.save(self._program, target / "data" / "model.pt2")
        if extra_files:
            (target / "extra_files").mkdir(exist_ok=True)
            for extra in extra_files:
                shutil.copy2(extra, target / "extra_files" / Path(extra).name)
        template = Model.load(str(self._template / "MLmodel"))
        mlflow_model.flavors = {name: dict(config) for name, config in template.flavors.items()}
        mlflow_model.signature = template.signature
        mlflow_model.saved_input_example_info = template.saved_input_example_info
        mlflow_model.model_size_bytes = get_total_file_size(str(target))
        mlflow_model.save(str(target / "MLmodel"))



class SpecFlavour:
    """A ``flavor`` for :meth:`mlflow.models.Model.log`: this project's model format, nothing pickled.

    Writes ``model_spec.json`` (the architecture), ``weights.safetensors`` (the model's state dict) and the
    MLmodel flavour :data:`FLAVOR` naming them and the inputs the model takes. With ``export`` (an
    :class:`ExportOnce`), the model is first saved as MLflow's ``pytorch`` pt2 program, whose attached
    ``extra_files/weights.safetensors`` then serves as the weights.
    """

    def __init__(self, export: ExportOnce | None = None, serving: ServingSpec | None = None) -> None:
        self.export = export
        self.serving = serving

    def save_model(self, path: str, mlflow_model: Any, pytorch_model: Any, model_spec: ModelSpec,
                   model_inputs: Sequence[str], **kwargs: Any) -> None:
        """Write the model into ``path`` (called by ``Model.log``)."""
        from fedcore.federation.checkpoint import save_state

        target = Path(path)
        if self.export is not None:
            self.export.save_model(path, mlflow_model, pytorch_model, **kwargs)
        else:
            target.mkdir(parents=True, exist_ok=True)
        (target / SPEC_FILE).write_text(model_spec.to_json())
        weights = f"extra_files/{WEIGHTS_FILE}"
        if not (target / weights).is_file():
            weights = WEIGHTS_FILE
            save_state(target / weights, {k: v.detach() for k, v in pytorch_model.state_dict().items()})
        mlflow_model.add_flavor(FLAVOR, spec=SPEC_FILE, weights=weights, inputs=list(model_inputs),
                                architecture=model_spec.architecture, format_version=FLAVOR_VERSION)
        if self.serving is not None:
            add_serving(mlflow_model, target, self.serving.with_files(SPEC_FILE, weights))
        mlflow_model.save(str(target / "MLmodel"))


def add_serving(mlflow_model: Any, folder: Path, serving: ServingSpec) -> None:
    """Make the model in ``folder`` classify audio through ``mlflow.pyfunc``: ``serving.json`` + the pyfunc flavour.

    Writes ``serving`` as ``serving.json`` (:mod:`fedcore.serving`: the feature settings, the normalisation
    statistics and the class names; its file names relative to ``folder``) and sets the ``python_function`` flavour
    with :func:`mlflow.pyfunc.add_to_model` (``loader_module="fedcore.serving"``, ``data="serving.json"``), keeping
    the environment files that ``mlflow.pytorch`` wrote, if any. ``mlflow.pytorch``'s own pyfunc entry (the pt2
    program on log-mel tensors) is replaced; its ``pytorch`` flavour stays. The signature keeps no input schema
    (the pyfunc takes paths, waveforms or a DataFrame, which one schema cannot say) and names the output columns:
    ``label`` and one probability per class.
    """
    import mlflow
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    (folder / SERVING_FILE).write_text(serving.to_json())
    env = (mlflow_model.flavors.get(mlflow.pyfunc.FLAVOR_NAME) or {}).get("env") or {}
    mlflow.pyfunc.add_to_model(mlflow_model, loader_module=SERVING_LOADER, data=SERVING_FILE,
                               conda_env=env.get("conda"), python_env=env.get("virtualenv"))
    outputs = Schema([ColSpec("string", "label"), *(ColSpec("double", name) for name in serving.labels)])
    mlflow_model.signature = ModelSignature(inputs=None, outputs=outputs)


class FederateTracker:
    """The MLflow child run of a training stage; resumable (the run id is kept in the checkpoint).

    Parameters
    ----------
    cfg : MlflowConfig
    root : Path
        Project root (relative SQLite URIs and the artifact folder live there).
    model_inputs : tuple of str, optional
        The inputs the logged models take, in call order (``("audio", "visual")`` for the audio-visual model).
        None: the federate stage's models, which take log-mel audio (and may be exported: ``export_pt2``).
    model_spec : ModelSpec, optional
        Architecture of the models the rounds log (else each model's own, :func:`fedcore.models.spec.spec_of`).
    serving : ServingSpec, optional
        What the logged classifiers need to classify audio (feature settings, normalisation statistics, class
        names): written as ``serving.json`` beside every audio model logged, whose ``python_function`` flavour
        then loads with :mod:`fedcore.serving` (:func:`add_serving`).
    export_pt2 : bool, default False
        Also save the federate stage's models as MLflow's ``pytorch`` flavour, a pt2 program traced once per run
        (:class:`ExportOnce`; ``execution.export_pt2``): ``mlflow.pytorch.load_model`` then loads the network alone.
        Tracing imports torch's compiler stack, about 3 s and 150 MB of the stage, so it is asked for.
    """

    def __init__(self, cfg: MlflowConfig, root: Path, model_inputs: tuple[str, ...] | None = None,
                 model_spec: ModelSpec | None = None, serving: ServingSpec | None = None,
                 export_pt2: bool = False) -> None:
        import mlflow

        self.cfg = cfg
        self.serving = serving
        self.export = export_pt2 and model_inputs is None
        self.model_inputs: tuple[str, ...] = tuple(model_inputs) if model_inputs is not None else ("audio",)
        self.model_spec = model_spec
        self.root = root
        self.experiment_id = setup(cfg, root)
        self.client = mlflow.MlflowClient()
        self.run_id: str | None = None
        #: The run of the checkpoint, when it was not in the store any more (a new run took its place).
        self.restored_from: str | None = None
        self.logged_steps: set[int] = set()
        self.model_steps: dict[int, str] = {}
        self._validated = False  # whether a logged model's input example was checked by reloading it
        self._export = ExportOnce() if self.export else None
        self.run_name = "federate"
        self.view: str | None = None  # share key of the runs' saved chart view, once saved (:meth:`log_round`)
        self._own_parent: str | None = None  # a parent run this stage opened (and closes)

    def start(self, params: Mapping[str, Any], resume_run_id: str | None = None, run_name: str = "federate") -> str:
        """Open the child run, or reopen ``resume_run_id`` (RUNNING again) and read which rounds it holds.

        If ``resume_run_id`` is not in the store any more (deleted), a new run is opened, tagged with the id it
        replaces; :meth:`backfill` then logs every round of the checkpoint's history into it.
        """
        self.run_name = run_name
        if resume_run_id is not None:
            run = self._existing(resume_run_id)
            if run is not None:
                self.run_id = resume_run_id
                self._reopen(run)
                # A round's metrics are logged in one batch: a step any metric has is a logged round.
                self.logged_steps = {int(m.step) for key in run.data.metrics
                                     for m in self.client.get_metric_history(resume_run_id, key)}
                self.model_steps = self._logged_models()
                log.info("Resuming MLflow run %s (%d rounds logged).", resume_run_id, len(self.logged_steps))
                return resume_run_id
            self.restored_from = resume_run_id
            log.warning("MLflow: run %s of the checkpoint is not in the store (deleted?); a new run takes its place "
                        "and the checkpoint's rounds are logged into it again.", resume_run_id)
        parent = os.environ.get(PARENT_ENV)
        if parent is None:  # DVC ran the stage without the pipeline flow: a parent of its own, closed with it
            parent = start_parent_run(self.cfg, self.root, params, run_name="pipeline (dvc repro)",
                                      tags={STAGE_PARENT: "true"})
            self._own_parent = parent
        tags = {"fedaudio.kind": "federate", "mlflow.parentRunId": parent, **owner_tags()}
        if self.restored_from is not None:
            tags[RESTORED_FROM] = self.restored_from
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = str(run.info.run_id)
        self.logged_steps, self.model_steps = set(), {}
        _log_params(self.client, self.run_id, params)
        return self.run_id

    def _existing(self, run_id: str) -> Any | None:
        """The run ``run_id`` if the store holds it (and it is not deleted), else None."""
        try:
            run = self.client.get_run(run_id)
        except Exception:  # deleted for good, or another store
            return None
        return None if run.info.lifecycle_stage == "deleted" else run

    def _reopen(self, run: Any) -> None:
        """Set ``run`` (and a parent this stage had opened) RUNNING again, owned by this process."""
        targets = [run]
        parent_id = run.data.tags.get("mlflow.parentRunId")
        parent = self._existing(parent_id) if parent_id else None
        if parent is not None and parent.data.tags.get(STAGE_PARENT) == "true":
            targets.append(parent)
            self._own_parent = str(parent.info.run_id)
        for target in targets:
            run_id = str(target.info.run_id)
            for key, value in owner_tags().items():
                self.client.set_tag(run_id, key, value)
            if END_REASON in target.data.tags:
                self.client.delete_tag(run_id, END_REASON)
            self.client.update_run(run_id, status="RUNNING")

    def backfill(self, history: Sequence[Mapping[str, Any]]) -> list[int]:
        """Log every row of ``history`` (a checkpoint's per-round rows, each with ``round``) that the run lacks.

        Each row's numbers are logged as metrics with ``step=round``: after a resume, the run holds every round
        the checkpoint holds, even if the store lost some (or the run, :meth:`start`). The models of those rounds
        cannot be logged again (a checkpoint keeps only its latest state): a tag and the log say so. Returns the
        rounds logged.
        """
        from mlflow.entities import Metric

        if self.run_id is None:
            raise RuntimeError("FederateTracker.backfill: call start() first.")
        missing = {int(row["round"]): row for row in history if int(row["round"]) not in self.logged_steps}
        if not missing:
            return []
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, server_round)
                   for server_round, row in sorted(missing.items()) for key, value in row.items()
                   if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool)]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])
        self.logged_steps.update(missing)
        rounds = _ranges(list(missing))
        self.client.set_tag(self.run_id, BACKFILLED, rounds)
        self.client.set_tag(self.run_id, MODELS_NOT_RESTORED,
                            f"rounds {rounds} were logged again from the checkpoint's history (metrics only): "
                            "their models are not in this run, as a checkpoint keeps only its latest state")
        log.warning("MLflow: run %s lacked rounds %s; logged them from the checkpoint's history (metrics only: the "
                    "models of past rounds are not restored).", self.run_id, rounds)
        return sorted(missing)

    def _logged_models(self) -> dict[int, str]:
        import mlflow

        models = mlflow.search_logged_models(
            experiment_ids=[self.experiment_id], filter_string=f"source_run_id = '{self.run_id}'",
            output_format="list",
        )
        return {int(m.tags.get("fedaudio.round", -1)): m.model_id for m in models if "fedaudio.round" in m.tags}

    def log_round(
        self, server_round: int, metrics: Mapping[str, float], model: Any | None, input_shape: tuple[int, ...],
        weights_file: Path | None = None,
    ) -> str | None:
        """Log one round's metrics (``step=round``) and, if given, its global model as a LoggedModel.

        Rounds already in the run (a resumed run) are skipped, so a resume never duplicates entries. The run
        stays RUNNING. Returns the LoggedModel id of this round, if any.
        """
        import mlflow

        if self.run_id is None:
            raise RuntimeError("FederateTracker.log_round: call start() first.")
        model_id = self.model_steps.get(server_round)
        if model is not None and model_id is None:
            model_id = self.log_model(model, f"global-round-{server_round:04d}", server_round,
                                      weights_file=weights_file, input_shape=input_shape)
            self.model_steps[server_round] = model_id
        if server_round not in self.logged_steps:
            values = {k: float(v) for k, v in metrics.items()}
            mlflow.log_metrics(values, step=server_round, model_id=model_id, run_id=self.run_id)
            self.logged_steps.add(server_round)
        if self.view is None:
            self.save_view(list(metrics))
        return model_id

    def save_view(self, metrics: Sequence[str]) -> str:
        """Save the chart view of this stage's runs as an experiment tag; return its share key.

        The view (:func:`chart_view_tag`) charts :func:`headline_metrics` of ``metrics`` first. It is not written
        when the experiment has one under its key already: a view the user changed and saved in the UI stays theirs.
        """
        key, value = chart_view_tag(self.run_name, headline_metrics(metrics), created_ms=int(time.time() * 1000))
        if key not in self.client.get_experiment(self.experiment_id).tags:
            self.client.set_experiment_tag(self.experiment_id, key, value)
        self.view = key[len(CHART_VIEW_TAG):]
        return self.view

    def log_model(self, model: Any, name: str, step: int, inputs: Sequence[str] | None = None, *,
                  spec: ModelSpec | None = None, weights_file: Path | None = None,
                  tags: Mapping[str, str] | None = None, input_shape: tuple[int, ...] | None = None) -> str:
        """Log ``model`` as a LoggedModel of the run: architecture spec + safetensors (never pickled).

        ``inputs`` default to the tracker's; ``spec`` to the model's own spec, then the tracker's; ``tags`` to
        ``{"fedaudio.round": step}`` (the run's round models, which a resume finds again). A federate tracker
        given ``input_shape`` also exports the model as a pt2 program (``weights_file`` attached). Returns the
        LoggedModel id.

        Raises
        ------
        ValueError
            If no architecture spec is known for ``model``.
        """
        import mlflow

        if self.run_id is None:
            raise RuntimeError("FederateTracker.log_model: call start() first.")
        spec = spec or spec_of(model) or self.model_spec
        if spec is None:
            raise ValueError(f"tracking: the model {name!r} ({type(model).__name__}) must have an architecture spec "
                             "to be logged. Got none. Fix: pass model_spec= to FederateTracker (fedcore.models.spec "
                             "makes one), or build the model with fedcore.models.spec.build.")
        inputs = tuple(inputs) if inputs is not None else self.model_inputs
        export = self._export if input_shape is not None else None
        serving = self.serving if inputs == ("audio",) else None
        options = _pt2_options(input_shape, weights_file) if export is not None and input_shape is not None else {}
        tags = {**(tags if tags is not None else {"fedaudio.round": str(step)}), INPUTS_TAG: ",".join(inputs),
                "fedaudio.architecture": spec.architecture}
        # Created here, in the run's experiment (Model.log alone would file it under the active experiment).
        logged = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=self.run_id, tags=tags)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = mlflow.models.Model.log(
                artifact_path=None, name=name, flavor=SpecFlavour(export, serving), run_id=self.run_id,
                model_id=logged.model_id, pytorch_model=model.eval(), model_spec=spec, model_inputs=inputs,
                step=step, flavor_name=FLAVOR,
                # MLflow reloads a pt2 model and runs the example through it: once per run is enough (every round
                # has the same architecture), and it costs as much as the export. A served model's pyfunc takes
                # audio, not the log-mel example: prepare_export checks its program instead.
                validate_serving_input=export is not None and not self._validated and serving is None,
                **options,
            )
        if export is not None:
            self._validated = True
        return str(info.model_id)

    def prepare_export(self, model: Any, input_shape: tuple[int, ...], weights_name: str | None = None) -> None:
        """Trace the run's architecture before the rounds, so that logging a round only swaps weights in.

        ``model``: any model of the architecture the rounds log (e.g. the initial one); ``weights_name``: the
        name of the weights file the rounds attach. Checks the exported program against the model (which then
        stands for MLflow's own serving-input check). Trackers that do not export (``model_inputs`` given) skip it.
        """
        if self._export is None:
            return
        with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            weights = None
            if weights_name is not None:
                from fedcore.federation.checkpoint import save_state

                weights = Path(scratch) / weights_name
                save_state(weights, {k: v.detach().cpu() for k, v in model.state_dict().items()})
            self._export.prepare(model.eval(), **_pt2_options(input_shape, weights))
        self._validated = True

    def log_record(self, artifact_file: str, record: Mapping[str, Any]) -> None:
        """Attach a JSON record to the run: a round's rejected clients with their reasons, what a resume skipped."""
        if self.run_id is None:
            raise RuntimeError("FederateTracker.log_record: start() the run first.")
        self.client.log_dict(self.run_id, dict(record), artifact_file)

    def find_logged(self, tag: str, value: str) -> str | None:
        """Id of a LoggedModel of this run whose ``tag`` equals ``value`` (e.g. after a resume), or None."""
        import mlflow

        models = mlflow.search_logged_models(
            experiment_ids=[self.experiment_id], filter_string=f"source_run_id = '{self.run_id}'",
            output_format="list",
        )
        return next((m.model_id for m in models if m.tags.get(tag) == value), None)

    def register(self, model_id: str, registered_model: str, alias: str = FINAL_ALIAS) -> int:
        """Register LoggedModel ``model_id`` under ``registered_model`` (once) and point ``alias`` at it."""
        import mlflow

        version = self._registered_version(model_id, registered_model)
        if version is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                version = int(mlflow.register_model(f"models:/{model_id}", registered_model).version)
        self.client.set_registered_model_alias(registered_model, alias, str(version))
        return version

    def finish(self, summary: Mapping[str, float], final_round: int, artifacts: list[Path], *,
               metric: str | None = None, study: str | None = None) -> int | None:
        """Log the summary, attach artifacts, register the final round's model (alias ``final``), end FINISHED.

        The registered version is tagged (:func:`version_tags`) with its round, the run, ``metric`` (the stage's
        primary score) and its value in ``summary``, and the ``study``. Returns the registered model version.
        """
        import mlflow

        if self.run_id is None:
            raise RuntimeError("FederateTracker.finish: call start() first.")
        mlflow.log_metrics({f"final_{k}": float(v) for k, v in summary.items()}, run_id=self.run_id)
        for path in artifacts:
            if path.exists():
                self.client.log_artifact(self.run_id, str(path))
        version = None
        model_id = self.model_steps.get(final_round)
        if model_id is not None and self.cfg.registered_model:
            version = self._registered_version(model_id)
            if version is None:  # not registered yet (a resumed, already finished run registers nothing new)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    registered = mlflow.register_model(f"models:/{model_id}", self.cfg.registered_model)
                version = int(registered.version)
            self.client.set_registered_model_alias(self.cfg.registered_model, FINAL_ALIAS, str(version))
            for key, value in version_tags(final_round, self.run_id, summary, metric, study).items():
                self.client.set_model_version_tag(self.cfg.registered_model, str(version), key, value)
        self.client.set_terminated(self.run_id, status="FINISHED")
        if self._own_parent is not None:
            end_run(self._own_parent, "FINISHED")
        return version

    def _registered_version(self, model_id: str, name: str | None = None) -> int | None:
        """Version of ``name`` (default ``registered_model``) that already points at ``model_id``, if any."""
        from mlflow.exceptions import MlflowException

        name = name or self.cfg.registered_model
        try:
            versions = self.client.search_model_versions(f"name = '{name}'")
        except MlflowException:  # no such registered model yet
            return None
        for version in versions:
            if str(version.source).endswith(model_id) or getattr(version, "model_id", None) == model_id:
                return int(version.version)
        return None

    def fail(self, error: BaseException | None = None) -> str | None:
        """Close the run KILLED (interrupted: Ctrl-C, SIGTERM) or FAILED (any other error); a resume reopens it.

        ``error`` defaults to the exception being handled (call it in an ``except`` block). The reason is kept in
        the tag ``fedaudio.end_reason``. Never raises (it runs while another error propagates): a store that
        cannot be reached is logged. Returns the status set (None without a run).
        """
        if self.run_id is None:
            return None
        if error is None:
            error = sys.exc_info()[1]
        status = "FAILED" if error is None else run_status(error)
        try:
            self.client.set_tag(self.run_id, END_REASON, _end_reason(error) if error is not None else "failed")
            self.client.set_terminated(self.run_id, status=status)
            if self._own_parent is not None:
                end_run(self._own_parent, status, error)
        except Exception as problem:  # the stage's own error matters more
            log.warning("MLflow: cannot mark run %s %s: %s", self.run_id, status, problem)
        return status


def version_tags(server_round: int, run_id: str, summary: Mapping[str, float], metric: str | None,
                 study: str | None) -> dict[str, str]:
    """Tags of a registered version of the final round's model.

    ``fedaudio.round``, ``fedaudio.run_id``, and when known ``fedaudio.metric`` (the metric's name),
    ``fedaudio.<metric>`` (its value at that round) and ``fedaudio.study``.
    """
    tags = {"fedaudio.round": str(int(server_round)), "fedaudio.run_id": str(run_id)}
    if metric is not None:
        tags["fedaudio.metric"] = metric
        if metric in summary:
            tags[f"fedaudio.{metric}"] = repr(float(summary[metric]))
    if study is not None:
        tags["fedaudio.study"] = study
    return tags


def _pt2_options(input_shape: tuple[int, ...], weights_file: Path | None) -> dict[str, Any]:
    """What every round's pt2 model is saved with: a batch-2 zero input example, torch pinned, the weights file."""
    import torch

    return {"input_example": np.zeros((2, *input_shape), dtype=np.float32),
            "pip_requirements": [f"torch=={torch.__version__.split('+')[0]}"],
            "extra_files": [str(weights_file)] if weights_file is not None else None,
            "serialization_format": "pt2"}


# --------------------------------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class LoadedModel:
    """A model loaded by :func:`load_model`.

    ``model``: an ``nn.Module`` rebuilt from ``spec`` (eval mode, trainable), or whatever MLflow returned for a
    trusted model without a spec (``spec`` None); ``inputs``: what it is called with, in order.
    """

    model: Any
    inputs: tuple[str, ...]
    spec: ModelSpec | None
    uri: str


def _safe(value: Any) -> str:
    """``repr`` of a value read from a file, for a message: scalars only (a YAML alias can nest without bound)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        text = repr(value)
        return text if len(text) <= 80 else text[:80] + "..."
    return f"a {type(value).__name__}"


@dataclass(frozen=True)
class _Source:
    """Where a model's files are: a local folder, or an artifact URI (MLflow copies the files, no more)."""

    uri: str
    folder: Path | None
    artifacts: str | None
    model_id: str | None

    def fetch(self, name: str, limit: int, scratch: Path, where: str) -> bytes:
        """The bytes of file ``name`` of the model (at most ``limit``; no symlinks, nothing outside the folder)."""
        if self.folder is not None:
            path = self.folder / name
            try:
                info = path.lstat()
            except OSError:
                raise ValueError(f"{where}: the model folder must hold {name!r}. Got no such file.") from None
            import stat

            if not stat.S_ISREG(info.st_mode) or not path.resolve().is_relative_to(self.folder.resolve()):
                raise ValueError(f"{where}: {name!r} must be a regular file inside the model folder (no symlink). "
                                 "Got another kind of file.")
        else:
            import mlflow

            parent, _, leaf = name.rpartition("/")
            base = self.artifacts.rstrip("/") if self.artifacts else ""
            try:
                listed = mlflow.artifacts.list_artifacts(artifact_uri=f"{base}/{parent}" if parent else base)
            except Exception as error:
                raise ValueError(f"{where}: cannot list the model's files: {error}. Fix: check that "
                                 "MLFLOW_TRACKING_URI points at the model's store.") from None
            entry = next((f for f in listed if f.path.rsplit("/", 1)[-1] == leaf and not f.is_dir), None)
            if entry is None:
                raise ValueError(f"{where}: the model must hold {name!r}. Got files "
                                 f"{sorted(f.path.rsplit('/', 1)[-1] for f in listed)[:10]}.")
            if entry.file_size is not None and entry.file_size > limit:
                raise ValueError(f"{where}: {name!r} must be at most {limit} bytes. Got {entry.file_size}.")
            target = scratch / f"{len(list(scratch.iterdir()))}"
            target.mkdir()
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{name}", dst_path=str(target)))
            info = path.lstat()
        if info.st_size > limit:
            raise ValueError(f"{where}: {name!r} must be at most {limit} bytes. Got {info.st_size}.")
        return path.read_bytes()


def _source(uri: str, where: str) -> _Source:
    """Resolve a model URI or folder (see :func:`load_model`); nothing is read yet."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"{where}: must be a models:/ URI or a model folder. Got {uri!r}.")
    if uri.startswith("models:/"):
        import mlflow
        from mlflow.store.artifact.utils.models import get_model_name_and_version

        client = mlflow.MlflowClient()
        try:
            ref = get_model_name_and_version(client, uri)
            if len(ref) == 1:
                model_id: str | None = str(ref[0])
                artifacts = str(client.get_logged_model(ref[0]).artifact_location)
            else:
                name, version = ref
                found = client.get_model_version(name, version)
                source = str(found.source)
                model_id = getattr(found, "model_id", None) or (source[len("models:/"):]
                                                                if source.startswith("models:/") else None)
                artifacts = str(client.get_model_version_download_uri(name, version))
        except Exception as error:  # MlflowException: no such name, alias, version or model
            raise ValueError(f"{where}: cannot be resolved ({error}). Fix: check the name and alias in the MLflow UI "
                             "(Models tab), and that MLFLOW_TRACKING_URI points at the run's store.") from None
        return _Source(uri, None, artifacts, model_id)
    path = Path(uri[len("file://"):]) if uri.startswith("file://") else Path(uri)
    if "://" not in uri and ":/" not in uri:
        if not path.is_dir():
            raise ValueError(f"{where}: must be a models:/ URI or a model folder. Got no folder {uri!r}.")
        return _Source(uri, path, None, None)
    if uri.startswith("file://"):
        if not path.is_dir():
            raise ValueError(f"{where}: must be a models:/ URI or a model folder. Got no folder {uri!r}.")
        return _Source(uri, path, None, None)
    return _Source(uri, None, uri, None)


def _mlmodel(data: bytes, where: str) -> dict[str, Any]:
    """``MLmodel``'s flavours, read with ``yaml.safe_load`` (no object construction)."""
    import yaml

    try:
        raw = yaml.safe_load(data)
    except yaml.YAMLError as error:
        raise ValueError(f"{where}: its MLmodel must be YAML. Got an unreadable file ({error}).") from None
    flavors = raw.get("flavors") if isinstance(raw, dict) else None
    if not isinstance(flavors, dict) or not all(isinstance(k, str) for k in flavors):
        raise ValueError(f"{where}: its MLmodel must have a 'flavors' mapping. Got {type(raw).__name__}.")
    return flavors


def _inputs(value: Any, where: str) -> tuple[str, ...]:
    names = value.split(",") if isinstance(value, str) else value
    if (not isinstance(names, list) or not names or not all(isinstance(n, str) and n in INPUTS for n in names)
            or len(set(names)) != len(names)):
        raise ValueError(f"{where}: the model's 'inputs' must name {' and/or '.join(INPUTS)}, each once. "
                         f"Got {_safe(value) if not isinstance(value, list) else [_safe(v) for v in value[:4]]}.")
    return tuple(names)


def _describe(flavors: Mapping[str, Any]) -> str:
    """The flavours of an MLmodel and how they are serialised (for messages)."""
    configs = [c for c in flavors.values() if isinstance(c, dict)]
    formats = {_safe(c["serialization_format"]) for c in configs if c.get("serialization_format")}
    if any("pickle_module_name" in c for c in configs):
        formats.add("pickle")
    return f"flavours {sorted(flavors)}" + (f", serialised as {sorted(formats)}" if formats else "")


def load_model(uri: str, *, trust_pickle: bool = False) -> LoadedModel:
    """Load a model by URI or from a local folder, without running code from its files.

    ``uri``: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``models:/<model id>``, ``runs:/...`` or a
    folder holding ``MLmodel``. The model's files are copied (MLflow's artifact download: no deserialisation);
    ``MLmodel`` is read with ``yaml.safe_load``; its flavour must be :data:`FLAVOR`; then the architecture is
    rebuilt from ``model_spec.json`` and the weights loaded strictly from ``weights.safetensors``
    (:func:`fedcore.models.spec.rebuild`). A model without that flavour (e.g. pickled by ``mlflow.pytorch``) is
    refused, unless ``trust_pickle`` (``mlflow.trust_pickle``): then ``mlflow.pytorch.load_model`` loads it, which
    runs any code it holds.

    Raises
    ------
    ValueError
        If the URI cannot be resolved, the model has no spec (and ``trust_pickle`` is off), or its spec, weights
        or flavour are not valid (the message says which, and the fix).
    """
    where = f"load_model: {uri!r}"
    source = _source(uri, where)
    with tempfile.TemporaryDirectory(prefix="fedaudio-model-") as scratch:
        flavors = _mlmodel(source.fetch("MLmodel", MAX_MLMODEL_BYTES, Path(scratch), where), where)
        config = flavors.get(FLAVOR)
        if config is not None:
            if not isinstance(config, dict) or config.get("format_version") != FLAVOR_VERSION:
                version = config.get("format_version") if isinstance(config, dict) else config
                raise ValueError(f"{where}: the MLmodel flavour {FLAVOR!r} must have format_version "
                                 f"{FLAVOR_VERSION}. Got {_safe(version)}. Fix: load it with the version of this "
                                 "project that logged it.")
            flavour = f"{where}: the MLmodel flavour {FLAVOR!r}"
            spec_name = relative_name(config.get("spec"), flavour, "spec")
            weights_name = relative_name(config.get("weights"), flavour, "weights")
            inputs = _inputs(config.get("inputs"), where)
            from fedcore.models.spec import MAX_SPEC_BYTES

            spec = ModelSpec.from_json(source.fetch(spec_name, MAX_SPEC_BYTES, Path(scratch), where),
                                       f"{where}: {spec_name}")
            weights = source.fetch(weights_name, MAX_WEIGHTS_BYTES, Path(scratch), where)
            return LoadedModel(rebuild(spec, weights, where), inputs, spec, uri)
    if not trust_pickle:
        raise ValueError(f"{where}: must be a model with an architecture spec (MLmodel flavour {FLAVOR!r}). Got "
                         f"{_describe(flavors)}: loading it would deserialise it with MLflow, and a pickled model "
                         f"runs any code it holds. {TRUST_FIX}")
    import mlflow

    log.warning("%s has no architecture spec; loading it with mlflow.pytorch because mlflow.trust_pickle is set "
                "(any code it holds runs).", uri)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = mlflow.pytorch.load_model(str(source.folder) if source.folder is not None else uri,
                                              map_location="cpu")
        tags = mlflow.get_logged_model(source.model_id).tags if source.model_id else {}
    except Exception as error:  # MlflowException, missing files, unpickling errors
        raise ValueError(f"{where}: MLflow cannot load it: {error}. Fix: check the name and alias in the MLflow UI "
                         "(Models tab), and that MLFLOW_TRACKING_URI points at the run's store.") from None
    return LoadedModel(model, _inputs(str(tags.get(INPUTS_TAG, "audio")), where), None, uri)


def load_logged_model(uri: str, trust_pickle: bool = False) -> tuple[Any, tuple[str, ...]]:
    """The model at ``uri`` and the inputs it takes (:func:`load_model`).

    Raises
    ------
    ValueError
        As :func:`load_model`.
    """
    loaded = load_model(uri, trust_pickle=trust_pickle)
    return loaded.model, loaded.inputs
