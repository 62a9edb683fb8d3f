"""Typed configs of the ``params.yaml`` sections, checked once on load.

Each section of ``params.yaml`` maps to one frozen dataclass here; keys equal the field names and every default
lives only in the dataclass. :func:`load_params` checks every section (unknown keys, types, ranges, registry
names, cross-field rules), collects every problem and raises a single :class:`~fedcore.errors.ConfigError`
listing them all, before any work starts.

Constraints are declared in field metadata (``ge``, ``gt``, ``le``, ``lt``, ``choices``, ``registry``) and are
reported with one template: ``"<section>: '<name>' must be <constraint>. Got <value!r>."``.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar

from fedcore.errors import ConfigError

C = TypeVar("C")

# Registries are looked up lazily by name: importing the config imports no family (nor torch), and checking a
# section imports only the families its fields name (fedcore.plugins.FAMILIES).
_REGISTRY_LOOKUP: dict[str, Callable[[], list[str]]] = {}


def register_names_lookup(family: str, names: Callable[[], list[str]]) -> None:
    """Let configs check a field against a family outside fedcore (e.g. the task runners of ``flows/``)."""
    _REGISTRY_LOOKUP[family] = names


def _registry(family: str) -> Any:
    """The registry of fedcore's family ``family``, its module imported (None when fedcore has no such family)."""
    from fedcore.plugins import FAMILIES  # not at the top: the families' modules import this one

    return FAMILIES.get(family)


def _registry_names(family: str) -> list[str] | None:
    """Names registered in ``family``, or None when no layer has registered that family (e.g. task runners)."""
    if family in _REGISTRY_LOOKUP:
        return _REGISTRY_LOOKUP[family]()
    registry = _registry(family)
    return None if registry is None else registry.names()


def _opt(default: Any, help: str = "", **constraints: Any) -> Any:
    """Declare a config field with a default, a help text and constraints."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **constraints})
    return field(default=default, metadata={"help": help, **constraints})


# --------------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True, kw_only=True)
class DownloadConfig:
    """Which dataset to ingest and where to fetch it from."""

    dataset: str = _opt("fsdd", "dataset registry name", registry="dataset")
    url: str | None = _opt(None, "override the registry URL (http, https or file)")
    sha256: str | None = _opt(None, "expected sha256 of the archive; overrides the registry's")
    mirror: str | None = _opt(None, "folder consulted before the URL; env FEDAUDIO_MIRROR overrides")
    manifest: str | None = _opt(None, "dataset=manifest: CSV 'path,label,speaker[,split]'")
    manifest_root: str | None = _opt(None, "dataset=manifest: a folder whose files the CSV may also list (None: "
                                           "only files under the CSV's own folder); symlinks are refused anyway")
    test_fold: int = _opt(5, "esc50: fold held out as the test split", ge=1)
    esc10_only: bool = _opt(False, "esc50: keep only the ESC-10 rows of the csv")
    test_fraction: float = _opt(0.2, "manifest without a split column: fraction sent to test", ge=0.0, lt=1.0)
    max_per_class: int | None = _opt(None, "keep at most this many files per label and split (quick runs)", ge=1)
    timeout_s: float = _opt(60.0, "network timeout per request, seconds", gt=0.0)
    retries: int = _opt(3, "download attempts, each resuming the partial file", ge=1)
    max_audio_seconds: float = _opt(600.0, "refuse (skip and report) audio files longer than this, seconds", gt=0.0)
    max_extract_bytes: int = _opt(8 * 2**30, "refuse archives that expand to more than this many bytes", ge=1)
    max_compression_ratio: float = _opt(100.0, "refuse archives, or zip members, over 1 MiB that expand more than "
                                               "this many times (zip bombs); real audio archives stay below 20",
                                        ge=1.0)


@dataclass(frozen=True, kw_only=True)
class FeaturesConfig:
    """Log-mel front end (torchaudio) and the pad/crop policy."""

    kind: Literal["log_mel", "waveform"] = _opt("log_mel", "log_mel: (n_mels, frames) per clip | waveform: the "
                                                           "prepared clip itself, (1, samples) (wav2vec2 backbones)")
    sample_rate: int = _opt(16000, "resample every clip to this rate, Hz", gt=0)
    clip_seconds: float | None = _opt(1.0, "pad or crop every clip to this length, seconds (None: the dataset's "
                                           "own, DatasetSpec.clip_seconds: 1 s for fsdd, 5 s for esc50)", gt=0.0)
    crop: Literal["center", "start"] = _opt("center", "which part of a longer clip is kept")
    pad: Literal["end", "center", "repeat"] = _opt("end", "how a shorter clip is filled")
    n_fft: int = _opt(400, "FFT size, samples", gt=0)
    win_length: int = _opt(400, "window length, samples", gt=0)
    hop_length: int = _opt(160, "hop length, samples", gt=0)
    n_mels: int = _opt(64, "mel bands", gt=0)
    f_min: float = _opt(0.0, "lowest mel frequency, Hz", ge=0.0)
    f_max: float | None = _opt(None, "highest mel frequency, Hz (None: sample_rate / 2)", gt=0.0)
    log_offset: float = _opt(1e-6, "log(mel + log_offset)", gt=0.0)
    dtype: Literal["float16", "float32"] = _opt("float16", "storage dtype of the feature array")

    def check(self) -> list[str]:
        """Cross-field rules."""
        problems = []
        if self.win_length > self.n_fft:
            problems.append(
                f"features: 'win_length' must be <= n_fft ({self.n_fft}). Got {self.win_length!r}."
            )
        nyquist = self.sample_rate / 2
        if self.f_max is not None and self.f_max > nyquist:
            problems.append(f"features: 'f_max' must be <= sample_rate / 2 ({nyquist:g}). Got {self.f_max!r}.")
        if self.f_max is not None and self.f_max <= self.f_min:
            problems.append(f"features: 'f_max' must be > f_min ({self.f_min:g}). Got {self.f_max!r}.")
        return problems


@dataclass(frozen=True, kw_only=True)
class PartitionConfig:
    """How the training pool is split over clients (non-IID schemes)."""

    scheme: str = _opt("dirichlet", "partitioner registry name", registry="partitioner")
    num_clients: int = _opt(10, "number of clients", ge=1)
    alpha: float = _opt(0.5, "Dirichlet concentration (dirichlet: per class; quantity: over client sizes)", gt=0.0)
    min_samples: int = _opt(10, "every client gets at least this many training samples", ge=1)
    shards_per_client: int = _opt(2, "shards: classes (shards) per client", ge=1)
    samples_per_client: int = _opt(20, "cross_device: examples each client draws (clients may share some)", ge=1)
    max_retries: int = _opt(100, "redraws before a scheme gives up on min_samples", ge=1)
    holdout_fraction: float = _opt(0.2, "per-client held-out split for personalised evaluation", ge=0.0, lt=1.0)
    seed: int = _opt(0, "seed of numpy.random.default_rng", ge=0)


@dataclass(frozen=True, kw_only=True)
class PoisonConfig:
    """Data poisoning of a seeded fraction of clients."""

    attack: str = _opt("none", "poison registry name", registry="poison")
    client_fraction: float = _opt(0.0, "fraction of clients attacked", ge=0.0, le=1.0)
    sample_fraction: float = _opt(1.0, "fraction of an attacked client's training samples changed", gt=0.0, le=1.0)
    source: str | int | None = _opt(None, "targeted_flip: label whose samples are flipped")
    target: str | int | None = _opt(None, "targeted_flip: label they are flipped to")
    epsilon: float = _opt(0.5, "label_noise: off-diagonal mass of each transition row", ge=0.0, le=1.0)
    sparsity: float = _opt(0.4, "label_noise: share of off-diagonal entries set to zero", ge=0.0, lt=1.0)
    snr_db: float = _opt(10.0, "snr_noise: signal-to-noise ratio of the added Gaussian noise, dB")
    seed: int = _opt(0, "seed of the attack draws", ge=0)

    def check(self) -> list[str]:
        """Cross-field rules."""
        if self.attack == "targeted_flip" and (self.source is None or self.target is None):
            return ["poison: 'source' and 'target' must be set for attack 'targeted_flip'. Got None."]
        return []


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Model chosen by name from the registry, with its size options."""

    name: str = _opt("cnn", "model registry name", registry="model")
    width: int = _opt(16, "channels of the first block", ge=1)
    depth: int = _opt(4, "cnn: conv blocks; resnet: residual blocks per stage", ge=1)


@dataclass(frozen=True, kw_only=True)
class FederationConfig:
    """Round loop, client sampling and local training."""

    rounds: int = _opt(30, "communication rounds", ge=1)
    client_fraction: float = _opt(1.0, "fraction of clients sampled per round", gt=0.0, le=1.0)
    min_clients: int = _opt(1, "sample at least this many clients per round", ge=1)
    local_epochs: int = _opt(1, "local epochs per round", ge=1)
    batch_size: int = _opt(32, "local batch size", ge=1)
    lr: float = _opt(0.05, "client SGD learning rate", gt=0.0)
    momentum: float = _opt(0.9, "client SGD momentum (optimiser made anew each round)", ge=0.0, lt=1.0)
    weight_decay: float = _opt(0.0, "client SGD weight decay", ge=0.0)
    lr_schedule: str = _opt("constant", "learning-rate schedule over rounds", registry="lr_schedule")
    lr_gamma: float = _opt(0.1, "step: multiply lr by this every lr_step_rounds", gt=0.0, le=1.0)
    lr_step_rounds: int = _opt(10, "step: rounds between decays", ge=1)
    lr_min: float = _opt(0.0, "cosine: final learning rate", ge=0.0)
    local_algorithm: str = _opt("fedavg", "client-side rule", registry="local_algorithm")
    aggregator: str | None = _opt(None, "server-side rule (options in the aggregation section); null: the local "
                                        "algorithm's default (lpa for fedmlac, fedavg otherwise)",
                                  registry="aggregator")
    send: str = _opt("all", "parameter group clients send and the server aggregates: all, backbone, head",
                     registry="param_group")
    eval_batch_size: int = _opt(256, "batch size of evaluation", ge=1)
    seed: int = _opt(0, "seed of model init, client sampling and shuffling", ge=0)
    min_accepted: int | float = _opt(0.5, "quorum of a round: accepted updates needed, as a count (int >= 1) or a "
                                          "share of the round's clients (float in (0, 1]); below it the round is "
                                          "not applied and the run stops, keeping its checkpoint [A]", gt=0)
    client_threads: int = _opt(1, "torch intra-op threads of each client's training, whatever the parallel clients "
                                  "(the arithmetic depends on it, so it is part of the run's identity)", ge=1)

    def check(self) -> list[str]:
        """A share quorum lies in (0, 1]."""
        if isinstance(self.min_accepted, float) and self.min_accepted > 1.0:
            return [f"federation: 'min_accepted' must be an int >= 1 (a count) or a float in (0, 1] (a share). "
                    f"Got {self.min_accepted!r}. Fix: write a count without a decimal point, e.g. 3."]
        return []


@dataclass(frozen=True, kw_only=True)
class FedProxConfig:
    """Client objective of FedProx (Li et al., MLSys 2020, arXiv:1812.06127)."""

    mu: float = _opt(0.01, "proximal weight μ; paper picks from {0.001, 0.01, 0.1, 1}", ge=0.0)


#: How FedU's divergence D_k is scaled (fedcore/algorithms/fedu.py).
FEDU_MU_SCALES = ("relative", "absolute")


@dataclass(frozen=True, kw_only=True)
class FedUConfig:
    """FedU's divergence-aware predictor update (Zhuang et al., ICCV 2021, arXiv:2108.07931).

    Client k starts from the global predictor when D_k < μ, with D_k the mean over the encoder's weight tensors of
    ‖W_g,l − W_k,l‖₂ (``absolute``, the paper's) or of ‖W_g,l − W_k,l‖₂ / ‖W_g,l‖₂ (``relative`` [A]).
    """

    mu: float = _opt(0.022, "use the global predictor when D_k < μ; relative: a share of the weights' norm, "
                             "0.022 the median D_k measured on the FASSL CNN with BYOL (fedcore/algorithms/fedu.py); "
                             "absolute: EasyFL's 0.4 (ResNet-18)", ge=0.0)
    mu_scale: Literal["relative", "absolute"] = _opt(
        "relative", "relative [A]: per-tensor distance over the global tensor's norm (scale-free); absolute: the "
                    "paper's L2 distance")
    predictor: str = _opt("predictor", "parameter group that is the predictor: predictor (BYOL's predictor head; "
                                       "the classifier of a supervised model)", registry="param_group")


@dataclass(frozen=True, kw_only=True)
class MutualConfig:
    """Deep mutual learning of a personal and a shared model (FML, arXiv:2006.16765; FedMLAC, arXiv:2506.10207)."""

    alpha: float = _opt(0.5, "personal model: weight α of CE; 1 − α goes to KL(shared ‖ personal) (FML: 0.5)",
                        ge=0.0, le=1.0)
    beta: float = _opt(0.5, "shared model: weight β of CE; 1 − β goes to KL(personal ‖ shared) (FML: 0.5)",
                       ge=0.0, le=1.0)
    temperature: float = _opt(1.0, "softmax temperature T of both KL terms (FML: 1)", gt=0.0)
    t2_scale: bool = _opt(True, "multiply the KL terms by T² (Hinton et al. 2015), so T leaves gradients' scale [A]")
    keep_optimizer: bool = _opt(True, "the personal model's SGD momentum carries over rounds (FML code); the "
                                      "shared model's optimiser is always reset each round")


@dataclass(frozen=True, kw_only=True)
class PersonalConfig:
    """Architectures of the clients' personal models (local_algorithm local, fml or fedmlac)."""

    models: list[dict[str, Any]] = _opt([], "model specs {name, width, depth}; empty: the model section's")
    assignment: str = _opt("seeded", "seeded: a seeded balanced draw of models over clients; map: the map below",
                           registry="model_assignment")
    map: dict[int, int] = _opt({}, "assignment map: client id → index into models (unlisted clients: 0)")
    seed: int = _opt(0, "seed of the assignment and of the personal models' initial weights", ge=0)

    def check(self) -> list[str]:
        """Every model spec is a valid model section; map indices are in range."""
        problems = []
        for i, spec in enumerate(self.models):
            _, found = check_section(ModelConfig, spec, f"personal: models[{i}]")
            problems.extend(found)
        count = max(1, len(self.models))
        for client, index in self.map.items():
            if isinstance(client, bool) or not isinstance(client, int) or client < 0:
                problems.append(f"personal: 'map' keys must be client ids (ints >= 0). Got {client!r}.")
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
                problems.append(f"personal: 'map' values must be indices into models, 0..{count - 1}. "
                                f"Got {index!r} for client {client!r}.")
        return problems

    def model_configs(self, shared: ModelConfig) -> list[ModelConfig]:
        """The personal model configs (``[shared]`` when none is listed)."""
        return [ModelConfig(**spec) for spec in self.models] or [shared]


#: Options of the ``ssl`` section every self-supervised method is built with (never under ``ssl.options``).
SSL_SHARED_OPTIONS = ("projector_dim", "hidden_dim", "augment")


@dataclass(frozen=True, kw_only=True)
class SSLConfig:
    """Training objective: supervised cross-entropy, or a self-supervised method that ignores labels (fedcore/ssl).

    With a self-supervised method the model is the ``model`` section's backbone (its classifier removed) plus the
    method's heads (``projector``, and BYOL's ``predictor``), which stay on the clients under ``send: backbone``
    (FASSL's "-bb"); every round is scored on the ``downstream`` tasks instead of the test split.

    ``projector_dim``, ``hidden_dim`` and ``augment`` are shared by every method; ``options`` maps a method's name
    to its own options, the other keyword arguments of its class (e.g. ``simclr: {temperature: 0.2}``); a method
    not listed takes its defaults.
    """

    method: str = _opt("none", "none (supervised) | simclr | barlow_twins | acop | byol", registry="ssl_method")
    projector_dim: int = _opt(128, "output size of the projector (simclr, barlow_twins, byol) [A]", ge=1)
    hidden_dim: int = _opt(256, "hidden size of the projector, predictor and ACOP classifier [A]", ge=1)
    augment: list[dict[str, Any]] | None = _opt(None, "augmentation pipeline [{name, p, options}] of the two "
                                                      "views (acop: of the clips); None: the method's default")
    options: dict[str, Any] = _opt({}, "options of each method, by method name (the keyword arguments of its "
                                       "class other than the shared ones above)")

    def check(self) -> list[str]:
        """Every method in ``options`` is registered and builds with its own options; every augmentation is valid.

        A method's own options must not repeat the shared ones (:data:`SSL_SHARED_OPTIONS`); an augmentation step
        names a registered augmentation and has a probability in [0, 1].
        """
        problems = member_options_problems("ssl", "options", "ssl_method", self.options, shared=SSL_SHARED_OPTIONS)
        names = _registry_names("augmentation")
        for i, step in enumerate(self.augment or []):
            if not isinstance(step, Mapping) or "name" not in step:
                problems.append(f"ssl: 'augment[{i}]' must be a mapping with a 'name'. Got {step!r}.")
                continue
            if names is not None and step["name"] not in names:
                problems.append(f"ssl: 'augment[{i}].name' must be a registered augmentation, one of "
                                f"{', '.join(names)}. Got {step['name']!r}.")
            p = step.get("p", 1.0)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                problems.append(f"ssl: 'augment[{i}].p' must be in [0, 1]. Got {p!r}.")
        return problems

    @property
    def self_supervised(self) -> bool:
        """Whether the objective ignores the labels."""
        return self.method != "none"

    def method_kwargs(self) -> dict[str, Any]:
        """The keyword arguments ``method`` is built with: the shared options (a self-supervised one) and its own."""
        own = dict(self.options.get(self.method) or {})
        if not self.self_supervised:
            return own
        return {"projector_dim": self.projector_dim, "hidden_dim": self.hidden_dim, "augment": self.augment, **own}


@dataclass(frozen=True, kw_only=True)
class DownstreamTaskConfig:
    """One downstream task: retrieval of a feature store's ``label`` or ``speaker`` column on frozen embeddings."""

    name: str = _opt("", "task name: MLflow metric prefix and registered-model alias (letters, digits, _ and -)")
    dataset: str = _opt("", "feature-store folder under the downstream root (e.g. fsdd, esc10)")
    label: Literal["label", "speaker"] = _opt("label", "column that is the class: label or speaker")
    split: str = _opt("test", "split whose rows are the test queries; the other rows are the retrieval index")

    def check(self) -> list[str]:
        """The name is alias-safe and the dataset is given."""
        problems = []
        reserved = (self.name.lower() in ("latest", "mean") or self.name.startswith("final_")
                    or (self.name[:1] in "vV" and self.name[1:].isdigit()))
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name) or reserved:
            problems.append(f"downstream: task 'name' must be letters, digits, '_' or '-', and not 'latest', "
                            f"'v<digits>' (MLflow aliases), 'mean' or 'final_*' (metric prefixes). "
                            f"Got {self.name!r}.")
        if not self.dataset:
            problems.append(f"downstream: task {self.name!r} needs a 'dataset'. Got {self.dataset!r}.")
        return problems


@dataclass(frozen=True, kw_only=True)
class DownstreamConfig:
    """Per-round scoring of the global encoder on downstream tasks, and FASSL's best round per task."""

    tasks: list[dict[str, Any]] = _opt([], "tasks {name, dataset, label, split} (DownstreamTaskConfig)")
    every: int = _opt(1, "score (and log the model) every k rounds, and the last", ge=1)
    ks: list[int] = _opt([1, 20], "kNN retrieval: neighbours k (cosine, majority vote)")
    val_fraction: float = _opt(0.2, "stratified share of each task's index rows held out as validation queries: "
                                    "the round is selected on them, the test split only reports", gt=0.0, lt=1.0)
    select_metric: str = _opt("knn1", "knn<k> (one of ks) or probe: the validation score that picks the round")
    linear_probe: bool = _opt(False, "also fit a logistic-regression probe on the frozen embeddings")
    probe_c: float = _opt(1.0, "linear probe: inverse L2 strength C", gt=0.0)
    seed: int = _opt(0, "seed of the validation hold-out", ge=0)
    registered_model: str = _opt("fedaudio-encoder", "registry name of the selected encoders (an alias per task)")

    def check(self) -> list[str]:
        """Tasks are valid and distinct; ks are positive; the selection metric is computed."""
        problems = []
        for i, spec in enumerate(self.tasks):
            _, found = check_section(DownstreamTaskConfig, spec, f"downstream: tasks[{i}]")
            problems.extend(found)
        names = [spec.get("name") for spec in self.tasks if isinstance(spec, Mapping)]
        if duplicates := sorted({str(n) for n in names if names.count(n) > 1}):
            problems.append(f"downstream: task names must be distinct. Got {duplicates} more than once.")
        if not self.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks):
            problems.append(f"downstream: 'ks' must be a non-empty list of ints >= 1. Got {self.ks!r}.")
        allowed = [f"knn{k}" for k in self.ks] + ["probe"]
        if self.select_metric not in allowed or (self.select_metric == "probe" and not self.linear_probe):
            problems.append(f"downstream: 'select_metric' must be one of {', '.join(allowed[:-1])} (or probe with "
                            f"linear_probe: true). Got {self.select_metric!r}.")
        return problems

    def task_configs(self) -> list[DownstreamTaskConfig]:
        """The tasks, typed."""
        return [DownstreamTaskConfig(**spec) for spec in self.tasks]


def member_options_problems(section: str, name: str, family: str, options: Any,
                            shared: Collection[str] = ()) -> list[str]:
    """Problems of a ``{member: {option: value}}`` mapping of a registry family (every member declares its own).

    A member's options are its factory's keyword arguments: each member named must be registered, each option
    must be one its factory takes (unknown ones are refused, never dropped), and the member must build with them
    (its own range checks). Members not named take their defaults. ``shared`` names the options the section sets
    once for every member: a member's own options must not repeat them.
    """
    if not isinstance(options, Mapping):
        return [f"{section}: '{name}' must be a mapping of {family} names to their options. Got {options!r}."]
    registry = _registry(family)
    problems: list[str] = []
    for member, values in options.items():
        where = f"{section}: '{name}.{member}'"
        if registry is None:
            break
        if member not in registry:
            problems.append(f"{where}: no {family} is registered as {member!r}; registered: "
                            f"{', '.join(registry.names())}.")
            continue
        if values is None:
            continue
        if not isinstance(values, Mapping):
            problems.append(f"{where} must be a mapping of option names to values. Got {values!r}.")
            continue
        if repeated := sorted(set(values) & set(shared)):
            problems.append(f"{where}: options {repeated} are shared by every {family}: set them in '{section}' "
                            f"itself (e.g. {section}.{repeated[0]}), not per {family}.")
            continue
        accepted = [option for option in registry.options(member) if option not in shared]
        if unknown := sorted(set(values) - set(accepted)):
            problems.append(f"{where}: unknown options {unknown}; {member} takes {sorted(accepted)}.")
            continue
        if non_finite := _non_finite_problems(section, f"{name}.{member}", dict(values)):
            problems.extend(non_finite)
            continue
        try:
            registry.build(member, **dict(values))
        except (TypeError, ValueError) as error:
            problems.append(f"{where}: {error}")
    return problems


@dataclass(frozen=True, kw_only=True)
class AggregationConfig:
    """Server-side rules (fedcore/aggregation): ``flag_ratio`` for every rule, and each rule's own options.

    ``rules`` maps a rule's name to its options, the keyword arguments of its class (e.g. ``fedadam: {server_lr:
    0.1}``); a rule not listed takes its defaults. A plugin rule's options go here too.
    """

    flag_ratio: float = _opt(0.5, "flag a client whose effective weight < this × its nominal weight [A]",
                             ge=0.0, le=1.0)
    rules: dict[str, Any] = _opt({}, "options of each rule, by rule name (the keyword arguments of its class)")

    def check(self) -> list[str]:
        """Every rule named is registered and builds with its options."""
        return member_options_problems("aggregation", "rules", "aggregator", self.rules)

    def options_of(self, name: str) -> dict[str, Any]:
        """The keyword arguments rule ``name`` is built with: ``flag_ratio`` and its own options."""
        return {"flag_ratio": self.flag_ratio, **dict(self.rules.get(name) or {})}


@dataclass(frozen=True, kw_only=True)
class AttackConfig:
    """Byzantine attack on model updates by a fixed, seeded set of clients (fedcore/attacks).

    ``options`` maps an attack's name to its options, the keyword arguments of its class (e.g. ``sign_flip:
    {sign_flip_scale: 4.0}``); an attack not listed takes its defaults.
    """

    name: str = _opt("none", "none | sign_flip | scaling | gaussian | alie | nan", registry="attack")
    client_fraction: float = _opt(0.0, "fraction of clients that are malicious", ge=0.0, le=1.0)
    include_buffers: bool = _opt(False, "also corrupt floating buffers (BatchNorm statistics)")
    seed: int = _opt(0, "seed of the malicious set and of random attacks", ge=0)
    options: dict[str, Any] = _opt({}, "options of each attack, by attack name (the keyword arguments of its class)")

    def check(self) -> list[str]:
        """Every attack named is registered and builds with its options."""
        return member_options_problems("attack", "options", "attack", self.options)

    def options_of(self, name: str) -> dict[str, Any]:
        """The keyword arguments attack ``name`` is built with."""
        return dict(self.options.get(name) or {})


@dataclass(frozen=True, kw_only=True)
class ModalityConfig:
    """Audio-visual federated learning (fedcore/multimodal): data pairing, missing video, model, method.

    The audio encoder is the ``model`` section's model (with ``embed_dim`` outputs); ``federation`` gives the rounds
    and the local SGD; see :mod:`fedcore.multimodal.methods` for the methods.
    """

    method: str = _opt("modality_mirror", "unifl | multifl | harmony | modality_mirror", registry="av_method")
    missing_rate: float = _opt(0.3, "share of clients without video (a per-client draw)", ge=0.0, le=1.0)
    draw: Literal["exact", "bernoulli"] = _opt("exact", "exact: round(rate × clients) lack video; bernoulli: each "
                                                        "client lacks it with probability rate (FedMultimodal) [A]")
    seed: int = _opt(0, "seed of the missing-video draw", ge=0)
    image_test_fraction: float = _opt(0.3, "digit images: share held out for the test clips' pairs [A]",
                                      gt=0.0, lt=1.0)
    pair_seed: int = _opt(0, "seed of the audio-image pairing", ge=0)
    visual_energy: float = _opt(0.25, "digit images: share of their PCA variance kept (PCA fitted on the train "
                                      "pool; fedcore.multimodal.data.keep_pca_energy), so vision alone does not "
                                      "decide the label; 1.0: the images unchanged. AV-MNIST: 0.25 (issue 21). "
                                      "An AV manifest's visuals are used as given", gt=0.0, le=1.0)
    fusion: str = _opt("concat", "concat | attention (FedMultimodal's fusions)", registry="fusion")
    embed_dim: int = _opt(64, "embedding size of each encoder [A]", ge=1)
    hidden_dim: int = _opt(64, "hidden size of the fusion classifier (FedMultimodal: 64)", ge=1)
    visual_width: int = _opt(16, "first-block channels of the visual CNN [A]", ge=1)
    dropout: float = _opt(0.1, "dropout of the fusion classifier (FedMultimodal: 0.1)", ge=0.0, lt=1.0)
    fusion_rounds: int = _opt(10, "harmony: rounds of the fusion stage, within federation.rounds [A]", ge=1)
    audio_loss_weight: float = _opt(
        1.0, "modality_mirror phase 1: weight w of the audio-only loss a client with video adds to its fused loss, "
             "CE(fused) + w·CE(audio branch), so that it trains and sends the audio head too and the audio head is "
             "averaged over every client with audio (issue 21) | 0: fused loss alone, the audio head averaged over "
             "the audio-only clients only (the behaviour before the option) [A: PAPERS.md §2]", ge=0.0)
    registered_model: str = _opt("fedaudio-av", "registry name of the final audio-visual model")
    registered_audio: str = _opt("fedaudio-av-audio", "registry name of its audio branch (the audio-only model)")


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Federated distillation of a teacher into a student (ModalityMirror phase 2; any teacher → student)."""

    teacher: str = _opt("models:/fedaudio-av@final", "MLflow URI of the frozen teacher")
    student: str = _opt("models:/fedaudio-av-audio@final", "MLflow URI of the student's starting model (rebuilt "
                                                           "from its model_spec.json: log-mel to logits)")
    lambd: float = _opt(1.0, "weight λ of the T²-scaled KL term [A: PAPERS.md §2]", ge=0.0)
    temperature: float = _opt(1.0, "softmax temperature T [A]", gt=0.0)
    student_init: Literal["logged", "random"] = _opt(
        "logged", "the student's starting weights: logged: those logged under 'student' (by default the phase-1 "
                  "audio branch: audio encoder + audio head of the modality stage's model) | random: the same "
                  "architecture with fresh weights drawn from federation.seed (an ablation) [A: PAPERS.md §2]")
    rounds: int = _opt(10, "distillation rounds", ge=1)
    lr: float | None = _opt(None, "student SGD learning rate (None: federation.lr); chosen on the held-out rows "
                                  "(val_audio_accuracy) so that the first round does not undo phase 1", gt=0.0)
    registered_model: str = _opt("fedaudio-audio-student", "registry name of the distilled student")


@dataclass(frozen=True, kw_only=True)
class EarlyExitConfig:
    """Early-exit federated fine-tuning (fedcore/earlyexit): backbone, exits, budget tiers, depth-aware aggregation.

    The backbone has ``model.depth`` layers of width ``model.width``; a client trains up to the exit its tier allows
    and sends only that (PAPERS.md §5).
    """

    backbone: str = _opt("logmel_transformer", "logmel_transformer | wav2vec2 (torchaudio; waveform features)",
                         registry="exit_backbone")
    backbone_options: dict[str, Any] = _opt({}, "wav2vec2: embed_dim, heads, ff_dim, conv (base or a list of "
                                                "[channels, kernel, stride]), layer_norm_first, pos_conv_kernel, "
                                                "pos_conv_groups")
    exits: list[int] = _opt([2, 4, 6], "layers (1-based, increasing) followed by an exit head [A]")
    head: str = _opt("linear", "exit head: linear | mlp (on the mean-pooled layer output)", registry="exit_head")
    exit_norm: Literal["per_exit", "shared"] = _opt(
        "per_exit", "normalisation each exit head reads (issue 21): per_exit: a LayerNorm of its own, trained and "
                    "sent only by the clients that train that exit, so it is averaged over clients reaching it | "
                    "shared: the backbone's one final norm, trained and sent by every client whatever its depth "
                    "(the behaviour before the option, for reproduction) [A]")
    tiers: list[dict[str, Any]] = _opt([{"share": 0.3, "depth": 2}, {"share": 0.4, "depth": 4},
                                        {"share": 0.3, "depth": 6}],
                                       "budget tiers {share, depth}: the share of clients that can train to depth "
                                       "(an exit); shares sum to 1 [A]")
    plan: str = _opt("early_exit", "early_exit: each client to its tier's depth | full: every client to the last "
                                   "exit | drop_weak: only the clients of the deepest tier train",
                     registry="exit_plan")
    deep_supervision: bool = _opt(False, "sum the losses of every exit a client reaches (Fed-EE) [A]")
    weighting: str = _opt("uniform", "depth-aware weight g(l, d): uniform (1) | depth (l / d)",
                          registry="depth_weight")
    server: str = _opt("fedavg", "server step on the partial average: fedavg | fedadam (aggregation options)",
                       registry="aggregator")
    init: str = _opt("random", "random | a .safetensors file of backbone weights (e.g. torchaudio wav2vec2, "
                               "or this project's FASSL encoder, models/...; .pt only with mlflow.trust_pickle) | "
                               "models:/<name>@<alias> (MLflow)")
    seed: int = _opt(0, "seed of the tier assignment", ge=0)
    rounds: int | None = _opt(None, "rounds of the stage, the most it runs under stop: plateau (None: "
                                    "federation.rounds)", ge=1)
    stop: Literal["plateau", "rounds"] = _opt(
        "plateau", "when training ends (issue 21): plateau: once plateau_metric gained under plateau_min_gain in "
                   "plateau_patience rounds (fedcore.federation.engine.Plateau), at most `rounds` rounds | rounds: "
                   "after all `rounds` (the behaviour before the option)")
    plateau_metric: str | None = _opt(None, "stop: plateau: the validation metric read, val_exit<l>_accuracy of an "
                                            "exit l (the clients' held-out rows; never a test metric); None: the "
                                            "last exit's")
    plateau_min_gain: float = _opt(0.005, "stop: plateau: the least gain (0.005 = 0.5 point of accuracy) of the best "
                                          "of the last plateau_patience rounds over the best before them", ge=0.0)
    plateau_patience: int = _opt(5, "stop: plateau: rounds the gain is measured over (no stop before round "
                                    "patience + 1)", ge=1)
    registered_model: str = _opt("fedaudio-early-exit", "registry name of the final model")

    def check(self) -> list[str]:
        """Exits increase from 1; every tier names an exit and a share; shares sum to 1; the plateau reads an exit."""
        problems = []
        if not self.exits or any(isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in self.exits) \
                or list(self.exits) != sorted(set(self.exits)):
            problems.append(f"earlyexit: 'exits' must be increasing ints >= 1. Got {self.exits!r}.")
        shares = []
        for i, tier in enumerate(self.tiers):
            if not isinstance(tier, Mapping) or set(tier) != {"share", "depth"}:
                problems.append(f"earlyexit: 'tiers[{i}]' must be a mapping with 'share' and 'depth'. Got {tier!r}.")
                continue
            if tier["depth"] not in self.exits:
                problems.append(f"earlyexit: 'tiers[{i}].depth' must be one of the exits {self.exits}. "
                                f"Got {tier['depth']!r}.")
            share = tier["share"]
            if isinstance(share, bool) or not isinstance(share, (int, float)) or share < 0:
                problems.append(f"earlyexit: 'tiers[{i}].share' must be a number >= 0. Got {share!r}.")
            else:
                shares.append(float(share))
        if not self.tiers or (len(shares) == len(self.tiers) and abs(sum(shares) - 1.0) > 1e-6):
            problems.append(f"earlyexit: the tiers' shares must sum to 1. Got {shares!r}.")
        metrics = [f"val_exit{e}_accuracy" for e in self.exits]
        if self.plateau_metric is not None and self.plateau_metric not in metrics:
            problems.append(f"earlyexit: 'plateau_metric' must be an exit's validation accuracy, one of {metrics} "
                            f"(or null: the last exit's). Got {self.plateau_metric!r}.")
        return problems


@dataclass(frozen=True, kw_only=True)
class MlflowConfig:
    """Where results go; env MLFLOW_TRACKING_URI overrides the URI."""

    tracking_uri: str = _opt("sqlite:///mlflow.db", "tracking URI (relative sqlite paths are under the project)")
    experiment: str = _opt("fedaudio", "experiment name")
    registered_model: str = _opt("fedaudio-global", "registry name of the final global model")
    trust_pickle: bool = _opt(False, "load MLflow models that lack this project's architecture spec (pickled) and "
                                     ".pt/.pth weights: runs any code they hold; only for stores only you can write")


@dataclass(frozen=True, kw_only=True)
class ExecutionConfig:
    """How a run is carried out, never what it computes: outside every result's fingerprint and DVC's params.

    Changing these reruns nothing and resumes a run where it stopped: clients train on
    ``federation.client_threads`` threads whatever the runner and its workers, and updates combine in client order.
    """

    runner: str = _opt("threads", "task runner of client updates: threads, processes, dask or ray", registry="runner")
    max_workers: int | None = _opt(None, "parallel clients (None: number of cores)", ge=1)
    address: str | None = _opt(None, "dask/ray: address of a running cluster (None: start a local one)")
    log_model_every: int = _opt(1, "log the global model to MLflow every k rounds (and the last)", ge=1)
    export_pt2: bool = _opt(False, "federate stage: also save each logged model as MLflow's pytorch flavour, a "
                                   "torch.export program (mlflow.pytorch.load_model); costs ~3 s and ~150 MB a run. "
                                   "Without it a model loads through mlflow.pyfunc or the project's spec + weights")


@dataclass(frozen=True, kw_only=True)
class PluginsConfig:
    """Your own registry members (an aggregator, a local algorithm, an attack, ...): modules imported first."""

    modules: list[str] = _opt([], "Python modules imported before the params are checked, so that what they register "
                                  "(e.g. @AGGREGATORS.register(\"my_rule\")) can be named in any section; e.g. "
                                  "[plugins.my_rule] for plugins/my_rule.py")

    def check(self) -> list[str]:
        """Every entry is a dotted module name."""
        bad = [m for m in self.modules if not isinstance(m, str)
               or not all(part.isidentifier() for part in m.split("."))]
        return [f"plugins: 'modules' must list dotted module names. Got {bad!r}."] if bad else []


SECTIONS: dict[str, type] = {
    "plugins": PluginsConfig,
    "execution": ExecutionConfig,
    "download": DownloadConfig,
    "features": FeaturesConfig,
    "partition": PartitionConfig,
    "poison": PoisonConfig,
    "model": ModelConfig,
    "federation": FederationConfig,
    "fedprox": FedProxConfig,
    "fedu": FedUConfig,
    "mutual": MutualConfig,
    "personal": PersonalConfig,
    "ssl": SSLConfig,
    "downstream": DownstreamConfig,
    "aggregation": AggregationConfig,
    "attack": AttackConfig,
    "modality": ModalityConfig,
    "distill": DistillConfig,
    "earlyexit": EarlyExitConfig,
    "mlflow": MlflowConfig,
}


@dataclass(frozen=True)
class Params:
    """Every section of params.yaml, typed."""

    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    poison: PoisonConfig = field(default_factory=PoisonConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    fedprox: FedProxConfig = field(default_factory=FedProxConfig)
    fedu: FedUConfig = field(default_factory=FedUConfig)
    mutual: MutualConfig = field(default_factory=MutualConfig)
    personal: PersonalConfig = field(default_factory=PersonalConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    modality: ModalityConfig = field(default_factory=ModalityConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    earlyexit: EarlyExitConfig = field(default_factory=EarlyExitConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


# --------------------------------------------------------------------------------------------------- checking
def _type_problem(value: Any, annotation: Any) -> str | None:
    """Return a description of the expected type if ``value`` does not match ``annotation``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if any(_type_problem(value, option) is None for option in options):
            return None
        return " or ".join(_type_name(option) for option in options)
    if origin is Literal:
        choices = typing.get_args(annotation)
        return None if value in choices else "one of " + ", ".join(repr(c) for c in choices)
    if annotation is type(None):
        return None if value is None else "None"
    if annotation is bool:
        return None if isinstance(value, bool) else "a bool"
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an int"
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else "a float"
    if annotation is str:
        return None if isinstance(value, str) else "a str"
    if origin in (list, tuple):
        return None if isinstance(value, (list, tuple)) else "a list"
    if origin is dict or annotation is dict:
        return None if isinstance(value, Mapping) else "a mapping"
    return None


def _type_name(annotation: Any) -> str:
    names = {int: "an int", float: "a float", str: "a str", bool: "a bool", type(None): "None"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _non_finite_problems(section: str, name: str, value: Any) -> list[str]:
    """A problem for every NaN or infinite float in ``value``, looking inside lists and mappings.

    YAML reads ``.inf``, ``-.inf`` and ``.nan`` as floats, which pass every range check that ``inf`` satisfies
    (``lr: .inf`` is ``> 0``) and then wreck the run. Strings such as ``"nan"`` are not numbers and pass.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{section}: '{name}' must be a finite number. Got {value!r}. Fix: write a finite value (YAML "
                f"reads .inf, -.inf and .nan as infinities and NaN)."]
    if isinstance(value, Mapping):
        return [p for key, item in value.items() for p in _non_finite_problems(section, f"{name}.{key}", item)]
    if isinstance(value, (list, tuple)):
        return [p for i, item in enumerate(value) for p in _non_finite_problems(section, f"{name}[{i}]", item)]
    return []


def _constraint_problems(section: str, name: str, value: Any, meta: Mapping[str, Any]) -> list[str]:
    if non_finite := _non_finite_problems(section, name, value):
        return non_finite  # the range checks below would only repeat it (nan fails them all, inf passes ge/gt)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return []
    checks: list[tuple[str, str, Callable[[Any, Any], bool]]] = [
        ("ge", ">=", operator.ge), ("gt", ">", operator.gt), ("le", "<=", operator.le), ("lt", "<", operator.lt),
    ]
    problems = []
    if isinstance(value, (int, float)):
        for key, symbol, ok in checks:
            if key in meta and not ok(value, meta[key]):
                problems.append(f"{section}: '{name}' must be {symbol} {meta[key]}. Got {value!r}.")
    if isinstance(value, str) and "registry" in meta:
        family = meta["registry"]
        names = _registry_names(family)
        if names is not None and value not in names:
            problems.append(
                f"{section}: '{name}' must be a registered {family}, one of {', '.join(names)}. Got {value!r}."
            )
    return problems


def check_section(cls: type[C], raw: Mapping[str, Any] | None, section: str) -> tuple[C | None, list[str]]:
    """Check one section and build its config; return ``(config or None, problems)``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        return None, [f"{section}: must be a mapping of keys to values. Got {raw!r}."]
    hints = typing.get_type_hints(cls)
    allowed = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    problems: list[str] = []
    if unknown := sorted(set(raw) - set(allowed)):
        problems.append(f"{section}: unknown keys {unknown}; allowed: {sorted(allowed)}.")
    for name, value in raw.items():
        if name not in allowed:
            continue
        if (expected := _type_problem(value, hints[name])) is not None:
            problems.append(f"{section}: '{name}' must be {expected}. Got {value!r}.")
            continue
        problems.extend(_constraint_problems(section, name, value, allowed[name].metadata))
    if problems:
        return None, problems
    config = cls(**{k: v for k, v in raw.items()})
    check: Callable[[], list[str]] | None = getattr(config, "check", None)
    if check is not None:
        problems.extend(check())
    return (None if problems else config), problems


def load_section(cls: type[C], raw: Mapping[str, Any] | None, section: str) -> C:
    """Build one section's config or raise one ConfigError listing every problem."""
    config, problems = check_section(cls, raw, section)
    if problems:
        raise ConfigError(problems)
    assert config is not None
    return config


def load_params(raw: Mapping[str, Any], sections: list[str] | None = None) -> Params:
    """Check every section of a parsed ``params.yaml`` and return typed :class:`Params`.

    Parameters
    ----------
    raw : Mapping
        The parsed params file.
    sections : list of str, optional
        Only check these sections (others keep their defaults); by default every section present is checked
        and unknown sections are an error.

    Raises
    ------
    ConfigError
        One error listing every problem in every section.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"params: must be a mapping of sections. Got {raw!r}.")
    plugins = load_section(PluginsConfig, raw.get("plugins"), "plugins")
    if plugins.modules:  # before any section names a member they register
        from fedcore.plugins import import_modules

        import_modules(plugins.modules)
    problems: list[str] = []
    wanted = list(SECTIONS) if sections is None else sections
    if sections is None and (unknown := sorted(set(raw) - set(SECTIONS))):
        problems.append(f"params: unknown sections {unknown}; allowed: {sorted(SECTIONS)}.")
    built: dict[str, Any] = {}
    for name in wanted:
        if name not in SECTIONS:
            problems.append(f"params: unknown section {name!r}; allowed: {sorted(SECTIONS)}.")
            continue
        config, section_problems = check_section(SECTIONS[name], raw.get(name), name)
        problems.extend(section_problems)
        if config is not None:
            built[name] = config
    problems.extend(_fedu_problems(built))
    if problems:
        raise ConfigError(problems)
    return Params(**built)


def _fedu_problems(built: Mapping[str, Any]) -> list[str]:
    """FedU needs a predictor: BYOL's, or a supervised model's head (fedcore/algorithms/fedu.py)."""
    federation, ssl = built.get("federation"), built.get("ssl")
    if federation is None or ssl is None or federation.local_algorithm != "fedu" or not ssl.self_supervised:
        return []
    from fedcore.ssl.methods import SSL_METHODS  # not at the top: fedcore.ssl imports this module

    if getattr(SSL_METHODS.get(ssl.method), "has_predictor", False):
        return []
    return [f"fedu: fedu needs ssl.method byol (a predictor) or a supervised model with a head. Got ssl.method "
            f"{ssl.method!r}, which has no predictor (FedU would choose between a global and a local projector)."]


def to_dict(config: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass (or of :class:`Params`)."""
    return dataclasses.asdict(config)


def flatten(params: Params) -> dict[str, Any]:
    """``{"section.key": value}`` of every field, for logging."""
    flat: dict[str, Any] = {}
    for section, values in to_dict(params).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat
