"""Studies a user runs whole, and the typed request of one run: the Prefect deployment's form.

A *study* is a DVC pipeline (a ``dvc.yaml`` and the params file its stages read). :data:`STUDIES` maps a study's
name to it; a new study is one more entry.

:class:`PipelineRun` is the parameter of the ``pipeline`` flow. Prefect turns it into the deployment's form: each
field typed, described, with its choices read from the registries of ``fedcore`` (the members that the studies'
``plugins.modules`` register included). Every field left empty keeps the params file's value; a filled one becomes
an override ``key=value`` (the syntax of ``dvc exp run -S``), applied to the params file before any stage runs
(:mod:`tasks.overrides`), so DVC, Prefect and MLflow record the same values.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedcore.config import Params, flatten
from fedcore.plugins import FAMILIES, import_modules
from tasks import overrides


@dataclass(frozen=True)
class Study:
    """One pipeline a user runs whole: its DVC file, the params file its stages read, its headline and plot."""

    description: str
    dvc_file: str = "dvc.yaml"
    params_file: str = "params.yaml"
    #: The study's DVC metrics (its ``headline`` stage: a few numbers under the study's name) and per-round plot.
    metrics: str = "metrics/headline.json"
    plot: str = "plots/federate/rounds.png"

    def override_prefix(self) -> str:
        """What ``dvc exp run -S`` needs before a key of this study's params file (nothing for params.yaml)."""
        return "" if self.params_file == "params.yaml" else f"{self.params_file}:"

    def shell_command(self, overrides: Sequence[str]) -> str:
        """The same run from a shell: ``dvc exp run [<dvc file>] -S <file>:<key>=<value> ...``, or ``dvc repro``."""
        target = "" if self.dvc_file == "dvc.yaml" else f" {self.dvc_file}"
        if not overrides:
            return f"dvc repro{target}"
        return f"dvc exp run{target}" + "".join(f" -S {shlex.quote(self.override_prefix() + o)}" for o in overrides)


STUDIES: dict[str, Study] = {
    "fedavg": Study("download → features → partition → poison → federate: the FedAvg family, robust aggregation, "
                    "personalised local algorithms and attacks, as params.yaml sets them"),
    "personalised": Study("personalised FL: FedMLAC's heterogeneous personal models + shared Plug-in with lpa (or "
                          "FML, local-only), download → … → poison → federate", "studies/personalised/dvc.yaml",
                          "studies/personalised/params.yaml", "metrics/personalised/headline.json",
                          "plots/personalised/federate/rounds.png"),
    "fassl": Study("federated self-supervised pretraining (SimCLR) scored per round on downstream tasks, then the "
                   "best round per task registered (select)", "studies/fassl/dvc.yaml", "studies/fassl/params.yaml",
                   "metrics/fassl/headline.json", "plots/fassl/federate/rounds.png"),
    "modalitymirror": Study("audio-visual FL with missing video (ModalityMirror phase 1: av → modality), then "
                            "federated distillation into the audio model (distill)",
                            "studies/modalitymirror/dvc.yaml", "studies/modalitymirror/params.yaml",
                            "metrics/modalitymirror/headline.json", "plots/modalitymirror/distill/rounds.png"),
    "earlyexit": Study("early-exit fine-tuning of a transformer by clients of three compute tiers, depth-aware "
                       "aggregation", "studies/earlyexit/dvc.yaml", "studies/earlyexit/params.yaml",
                       "metrics/earlyexit/headline.json", "plots/earlyexit/earlyexit/rounds.png"),
}
"""Study name → its pipeline. Add an entry (and its dvc.yaml) to offer a study in the CLI and the deployment."""


@dataclass(frozen=True)
class ParamKey:
    """Marks a :class:`PipelineRun` field as an override of the dotted params key ``key``."""

    key: str


def plugin_modules(studies: Mapping[str, Study] = STUDIES, root: str | Path = ".") -> list[str]:
    """The ``plugins.modules`` of every study's params file under ``root``, in order, each once.

    Their members belong in the form's drop-downs, so they are imported before the form is built. A params file that
    is missing or unreadable adds nothing here: the stage that reads it reports the problem.
    """
    modules: list[str] = []
    for study in studies.values():
        try:
            raw = yaml.safe_load((Path(root) / study.params_file).read_text()) or {}
            listed = (raw.get("plugins") or {}).get("modules") or []
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        modules += [m for m in listed if isinstance(m, str) and m not in modules]
    return modules


def _choices(family: str) -> Any:
    """``Literal`` of the names registered in a fedcore family (the form's drop-down)."""
    return Literal[tuple(FAMILIES[family].names())]


def _keep(key: str) -> str:
    return f" Sets `{key}`; empty: the params file's value."


@cache
def known_keys() -> tuple[str, ...]:
    """Every dotted ``section.key`` of the params schema (``fedcore.config``)."""
    return tuple(sorted(flatten(Params())))


if TYPE_CHECKING:
    StudyName: TypeAlias = str
    DatasetName: TypeAlias = str
    PartitionerName: TypeAlias = str
    ModelName: TypeAlias = str
    LocalAlgorithmName: TypeAlias = str
    AggregatorName: TypeAlias = str
    PoisonName: TypeAlias = str
    AttackName: TypeAlias = str
else:  # the form's drop-downs: the names registered now, the studies' plugin members included
    import_modules(plugin_modules())
    StudyName = Literal[tuple(STUDIES)]
    DatasetName, PartitionerName, ModelName = _choices("dataset"), _choices("partitioner"), _choices("model")
    LocalAlgorithmName, AggregatorName = _choices("local_algorithm"), _choices("aggregator")
    PoisonName, AttackName = _choices("poison"), _choices("attack")


class PipelineRun(BaseModel):
    """What to run: a study, with any params changed for this run (the rest as the params file has them)."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="Pipeline run")

    study: StudyName = Field(default="fedavg", description="Study (DVC pipeline) to run: "
                             + "; ".join(f"{name}: {s.description}" for name, s in STUDIES.items()) + ".")
    dataset: Annotated[DatasetName | None, ParamKey("download.dataset")] = Field(
        default=None, description="Dataset to download." + _keep("download.dataset"))
    max_per_class: Annotated[int | None, ParamKey("download.max_per_class")] = Field(
        default=None, ge=1, description="Keep at most this many clips per label and split (quick runs)."
        + _keep("download.max_per_class"))
    scheme: Annotated[PartitionerName | None, ParamKey("partition.scheme")] = Field(
        default=None, description="How the training clips are split over clients." + _keep("partition.scheme"))
    num_clients: Annotated[int | None, ParamKey("partition.num_clients")] = Field(
        default=None, ge=1, description="Number of clients." + _keep("partition.num_clients"))
    alpha: Annotated[float | None, ParamKey("partition.alpha")] = Field(
        default=None, gt=0, description="Dirichlet concentration α of the label skew: small is skewed, large is "
        "nearly IID." + _keep("partition.alpha"))
    model: Annotated[ModelName | None, ParamKey("model.name")] = Field(
        default=None, description="Model architecture." + _keep("model.name"))
    width: Annotated[int | None, ParamKey("model.width")] = Field(
        default=None, ge=1, description="Channels of the model's first block." + _keep("model.width"))
    rounds: Annotated[int | None, ParamKey("federation.rounds")] = Field(
        default=None, ge=1, description="Communication rounds." + _keep("federation.rounds"))
    local_epochs: Annotated[int | None, ParamKey("federation.local_epochs")] = Field(
        default=None, ge=1, description="Local epochs of each client per round." + _keep("federation.local_epochs"))
    lr: Annotated[float | None, ParamKey("federation.lr")] = Field(
        default=None, gt=0, description="Client SGD learning rate." + _keep("federation.lr"))
    local_algorithm: Annotated[LocalAlgorithmName | None, ParamKey("federation.local_algorithm")] = Field(
        default=None, description="Client-side rule (fedprox, fedu, fml, fedmlac read their own sections; local: no "
        "federation)." + _keep("federation.local_algorithm"))
    aggregator: Annotated[AggregatorName | None, ParamKey("federation.aggregator")] = Field(
        default=None, description="Server-side rule (options in the aggregation section)."
        + _keep("federation.aggregator"))
    poisoning: Annotated[PoisonName | None, ParamKey("poison.attack")] = Field(
        default=None, description="Data poisoning of the attacked clients' training data."
        + _keep("poison.attack"))
    poisoned_fraction: Annotated[float | None, ParamKey("poison.client_fraction")] = Field(
        default=None, ge=0, le=1, description="Fraction of clients whose data is poisoned."
        + _keep("poison.client_fraction"))
    attack: Annotated[AttackName | None, ParamKey("attack.name")] = Field(
        default=None, description="Byzantine attack on the malicious clients' model updates."
        + _keep("attack.name"))
    attack_fraction: Annotated[float | None, ParamKey("attack.client_fraction")] = Field(
        default=None, ge=0, le=1, description="Fraction of clients that are malicious."
        + _keep("attack.client_fraction"))
    seed: Annotated[int | None, ParamKey("federation.seed")] = Field(
        default=None, ge=0, description="Seed of model initialisation, client sampling and shuffling."
        + _keep("federation.seed"))
    set: list[str] = Field(
        default_factory=list, description="More overrides, one `key=value` each, as `dvc exp run -S` takes them "
        "(e.g. `fedprox.mu=0.1` or `download.mirror=null`); a key set here may not also be set by a field above. "
        "Members your `plugins.modules` register are in the fields' choices.")
    stages: list[str] | None = Field(
        default=None, description="Stages to run (and whatever is stale before them); empty: every stage of the "
        "study.")
    force: bool = Field(default=False, description="Run the stages even where DVC finds them up to date.")

    @classmethod
    def field_keys(cls) -> dict[str, str]:
        """Field name → the params key it overrides, in form order."""
        return {name: meta.key for name, info in cls.model_fields.items()
                for meta in info.metadata if isinstance(meta, ParamKey)}

    @field_validator("set")
    @classmethod
    def _check_set(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            overrides.check_key(overrides.key_of(entry), known_keys())
        return entries

    @model_validator(mode="after")
    def _one_value_per_key(self) -> PipelineRun:
        keys = [overrides.key_of(entry) for entry in self.overrides()]
        if twice := sorted({key for key in keys if keys.count(key) > 1}):
            raise ValueError(f"set: {', '.join(repr(k) for k in twice)} set more than once; give each key one value.")
        return self

    def overrides(self) -> list[str]:
        """The run's overrides as ``dvc exp run -S`` takes them: the filled fields in form order, then ``set``."""
        fields = [f"{key}={overrides.format_value(getattr(self, name))}"
                  for name, key in self.field_keys().items() if getattr(self, name) is not None]
        return fields + list(self.set)
