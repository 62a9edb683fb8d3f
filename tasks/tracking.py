"""MLflow: one parent run per pipeline execution, one child run per federate stage, every round's model.

Layout in MLflow
----------------
- parent run ``pipeline`` (created by ``flows.pipeline``, or by the federate stage when DVC runs it directly): every
  param of params.yaml.
- child run ``federate``: every param, per-round metrics with ``step=round``, each round's global model as an
  MLflow 3 LoggedModel (``name=global-round-NNNN``, ``step=round``, metrics linked to it), the final model
  registered under ``mlflow.registered_model`` with alias ``final``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.config import MlflowConfig

log = logging.getLogger(__name__)

PARENT_ENV = "FEDAUDIO_PARENT_RUN_ID"
FINAL_ALIAS = "final"
#: LoggedModel tag naming the inputs a pickled model takes, in call order (``audio`` or ``audio,visual``).
INPUTS_TAG = "fedaudio.inputs"


def tracking_uri(cfg: MlflowConfig, root: Path) -> str:
    """The tracking URI: env MLFLOW_TRACKING_URI first, then the param; relative SQLite paths live under ``root``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str((root / uri[len(prefix):]).resolve())
    return uri


def setup(cfg: MlflowConfig, root: Path) -> str:
    """Point MLflow at the store and make sure the experiment exists (artifacts under ``root/mlartifacts``).

    Returns the experiment id.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri(cfg, root)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return str(experiment.experiment_id)
    location = (root / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
    try:
        return str(mlflow.create_experiment(cfg.experiment, artifact_location=location))
    except Exception:  # another process created it first
        experiment = mlflow.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


def _param_values(params: Mapping[str, Any]) -> dict[str, str]:
    return {key: ("null" if value is None else str(value))[:6000] for key, value in params.items()}


def start_parent_run(cfg: MlflowConfig, root: Path, params: Mapping[str, Any], run_name: str = "pipeline") -> str:
    """Create the parent run of one pipeline execution and return its id (the run stays open)."""
    import mlflow

    experiment_id = setup(cfg, root)
    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id, run_name=run_name, tags={"fedaudio.kind": "pipeline"})
    _log_params(client, run.info.run_id, params)
    return str(run.info.run_id)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """Close a run created with :func:`start_parent_run`."""
    import mlflow

    mlflow.MlflowClient().set_terminated(run_id, status=status)


def _log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in _param_values(params).items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


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
        self._adopt(model.state_dict(), kwargs.get("extra_files"))
        example = torch.as_tensor(kwargs["input_example"])
        with torch.no_grad():
            expected, got = model(example), mlflow.pytorch.load_model(str(self._template))(example)
        if not torch.allclose(expected, got, rtol=1e-5, atol=1e-6):
            raise RuntimeError("ExportOnce: the exported program does not reproduce the model's outputs "
                               f"(largest difference {float((expected - got).abs().max()):.3g}).")

    def _adopt(self, state: Mapping[str, Any], extra_files: Any) -> None:
        import torch

        program = torch.export.load(self._template / "data" / "model.pt2")
        reusable = frozenset(program.state_dict) == frozenset(state)
        self._program = program if reusable else None
        self._keys = frozenset(state) if reusable else frozenset()
        self._extra_names = tuple(Path(f).name for f in extra_files or ())

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


class FederateTracker:
    """The MLflow child run of a federate stage; resumable (the run id is kept in the checkpoint).

    Parameters
    ----------
    cfg : MlflowConfig
    root : Path
        Project root (relative SQLite URIs and the artifact folder live there).
    """

    def __init__(self, cfg: MlflowConfig, root: Path, model_inputs: tuple[str, ...] | None = None) -> None:
        import mlflow

        self.cfg = cfg
        #: None: models are exported (pt2) with a log-mel input example; else pickled, tagged with these inputs
        #: (``fedaudio.inputs``, e.g. ``audio,visual``) so that a later stage knows what to feed them.
        self.model_inputs = model_inputs
        self.root = root
        self.experiment_id = setup(cfg, root)
        self.client = mlflow.MlflowClient()
        self.run_id: str | None = None
        self.logged_steps: set[int] = set()
        self.model_steps: dict[int, str] = {}
        self._validated = False  # whether a logged model's input example was checked by reloading it
        self._export = ExportOnce()

    def start(self, params: Mapping[str, Any], resume_run_id: str | None = None, run_name: str = "federate") -> str:
        """Open the child run, or reopen ``resume_run_id`` and read which rounds it already holds."""
        if resume_run_id is not None:
            try:
                run = self.client.get_run(resume_run_id)
            except Exception:  # deleted or another store: start afresh
                run = None
            if run is not None:
                self.run_id = resume_run_id
                self.client.update_run(resume_run_id, status="RUNNING")
                # A round's metrics are logged in one batch: a step any metric has is a logged round.
                self.logged_steps = {int(m.step) for key in run.data.metrics
                                     for m in self.client.get_metric_history(resume_run_id, key)}
                self.model_steps = self._logged_models()
                log.info("Resuming MLflow run %s (%d rounds logged).", resume_run_id, len(self.logged_steps))
                return resume_run_id
        parent = os.environ.get(PARENT_ENV)
        if parent is None:
            parent = start_parent_run(self.cfg, self.root, params, run_name="pipeline (dvc repro)")
            end_run(parent)
        tags = {"fedaudio.kind": "federate", "mlflow.parentRunId": parent}
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = str(run.info.run_id)
        _log_params(self.client, self.run_id, params)
        return self.run_id

    def _logged_models(self) -> dict[int, str]:
        import mlflow

        models = mlflow.search_logged_models(
            experiment_ids=[self.experiment_id], filter_string=f"source_run_id = '{self.run_id}'",
            output_format="list",
        )
        return {int(m.tags.get("fedaudio.round", -1)): m.model_id for m in models if "fedaudio.round" in m.tags}

    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        import mlflow

        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            yield
            return
        with mlflow.start_run(run_id=self.run_id, log_system_metrics=False):
            yield

    def log_round(
        self, server_round: int, metrics: Mapping[str, float], model: Any | None, input_shape: tuple[int, ...],
        weights_file: Path | None = None,
    ) -> str | None:
        """Log one round's metrics (``step=round``) and, if given, its global model as a LoggedModel.

        Rounds already in the run (a resumed run) are skipped, so a resume never duplicates entries.
        Returns the LoggedModel id of this round, if any.
        """
        import mlflow

        assert self.run_id is not None, "start() first"
        model_id = self.model_steps.get(server_round)
        with self._active():
            if model is not None and model_id is None:
                model_id = self._log_model(model, server_round, input_shape, weights_file)
                self.model_steps[server_round] = model_id
            if server_round not in self.logged_steps:
                values = {k: float(v) for k, v in metrics.items()}
                mlflow.log_metrics(values, step=server_round, model_id=model_id)
                self.logged_steps.add(server_round)
        return model_id

    def _log_model(
        self, model: Any, server_round: int, input_shape: tuple[int, ...], weights_file: Path | None
    ) -> str:
        import mlflow

        if self.model_inputs is not None:
            return self.log_pickled(model, f"global-round-{server_round:04d}", server_round, self.model_inputs,
                                    weights_file)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = mlflow.models.Model.log(
                artifact_path=None,
                name=f"global-round-{server_round:04d}",
                flavor=self._export,
                pytorch_model=model.eval(),
                step=server_round,
                tags={"fedaudio.round": str(server_round)},
                # MLflow reloads the saved model and runs the example through it: once per run is enough (every
                # round has the same architecture), and it costs as much as the export.
                validate_serving_input=not self._validated,
                **_pt2_options(input_shape, weights_file),
            )
        self._validated = True
        return str(info.model_id)

    def prepare_export(self, model: Any, input_shape: tuple[int, ...], weights_name: str | None = None) -> None:
        """Trace the run's architecture before the rounds, so that logging a round only swaps weights in.

        ``model``: any model of the architecture the rounds log (e.g. the initial one); ``weights_name``: the
        name of the weights file the rounds attach. Checks the exported program against the model (which then
        stands for MLflow's own serving-input check). Models logged pickled are left alone.
        """
        if self.model_inputs is not None:
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

    def log_pickled(self, model: Any, name: str, step: int, inputs: tuple[str, ...],
                    weights_file: Path | None = None, tags: Mapping[str, str] | None = None) -> str:
        """Log ``model`` pickled (loadable as a trainable ``nn.Module``), tagged with the inputs it takes.

        ``tags`` default to ``{"fedaudio.round": step}`` (the run's round models, which a resume finds again).
        """
        import mlflow
        import torch

        quiet = logging.getLogger("mlflow.pytorch")  # its pickle warning, once per model: we chose pickle
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with self._active(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                info = mlflow.pytorch.log_model(
                    model.eval(), name=name, step=step, serialization_format="pickle",
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                    extra_files=[str(weights_file)] if weights_file is not None else None,
                    tags={**(tags if tags is not None else {"fedaudio.round": str(step)}),
                          INPUTS_TAG: ",".join(inputs)},
                )
        finally:
            quiet.setLevel(level)
        return str(info.model_id)

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

    def finish(self, summary: Mapping[str, float], final_round: int, artifacts: list[Path]) -> int | None:
        """Log the summary, attach artifacts, register the final round's model (alias ``final``), close the run.

        Returns the registered model version.
        """
        import mlflow

        assert self.run_id is not None
        with self._active():
            mlflow.log_metrics({f"final_{k}": float(v) for k, v in summary.items()})
            for path in artifacts:
                if path.exists():
                    mlflow.log_artifact(str(path))
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
        self.client.set_terminated(self.run_id, status="FINISHED")
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

    def fail(self) -> None:
        """Mark the run failed (a resume reopens it)."""
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status="FAILED")


def _pt2_options(input_shape: tuple[int, ...], weights_file: Path | None) -> dict[str, Any]:
    """What every round's pt2 model is saved with: a batch-2 zero input example, torch pinned, the weights file."""
    import torch

    return {"input_example": np.zeros((2, *input_shape), dtype=np.float32),
            "pip_requirements": [f"torch=={torch.__version__.split('+')[0]}"],
            "extra_files": [str(weights_file)] if weights_file is not None else None,
            "serialization_format": "pt2"}


def _logged_model_id(uri: str) -> str | None:
    """The LoggedModel id behind ``models:/<id>``, ``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
    import mlflow

    if not uri.startswith("models:/"):
        return None
    ref = uri[len("models:/"):]
    client = mlflow.MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    elif "/" in ref:
        name, number = ref.rsplit("/", 1)
        version = client.get_model_version(name, number)
    else:
        return ref
    source = str(version.source)
    return getattr(version, "model_id", None) or (source[len("models:/"):] if source.startswith("models:/")
                                                  else None)


def load_logged_model(uri: str) -> tuple[Any, tuple[str, ...]]:
    """Load a model from MLflow by URI, with the inputs it takes (its ``fedaudio.inputs`` tag; default audio).

    Raises
    ------
    ValueError
        If MLflow cannot resolve or load ``uri`` (the message says which URI and why).
    """
    import mlflow

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = mlflow.pytorch.load_model(uri, map_location="cpu")
        model_id = _logged_model_id(uri)
        tags = mlflow.get_logged_model(model_id).tags if model_id else {}
    except Exception as error:  # MlflowException, missing files, unpickling errors
        raise ValueError(f"cannot load the MLflow model {uri!r}: {error}. Fix: check the name and alias in the "
                         "MLflow UI (Models tab), and that MLFLOW_TRACKING_URI points at the run's store.") from None
    inputs = tuple(str(tags.get(INPUTS_TAG, "audio")).split(","))
    return model, inputs
