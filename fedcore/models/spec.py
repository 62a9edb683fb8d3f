"""Architecture specs: what a saved model is, as JSON, and the one registry that builds it again.

A logged model is two files: ``model_spec.json``, a :class:`ModelSpec` (a registered architecture name and its
options, plain JSON), and ``weights.safetensors`` (its state dict). Loading one runs no code from the files:
:func:`rebuild` builds the architecture from the registry :data:`ARCHITECTURES` (any seed) and loads the weights
strictly. Both files may come from others, so both are checked before any real memory is spent:

- the spec is bounded (:data:`MAX_SPEC_BYTES`), plain JSON (no NaN, no duplicate keys, shallow), names a
  registered architecture (else the error lists the known ones) and gives exactly the options that architecture
  takes, each of its type and within bounds;
- the architecture is first built on PyTorch's ``meta`` device (no memory), and the safetensors header (bounded,
  its offsets covering the file exactly) must hold exactly its keys, with its shapes and dtypes;
- the weights must be finite.

Architectures (every model the project logs):

``classifier``
    A registered model (``model`` section) mapping log-mel to logits: the supervised federate stage's model.
``ssl_model``
    A self-supervised method's :class:`~fedcore.ssl.methods.SSLModel` (backbone and heads): the federate stage's
    model under ``ssl.method`` (FASSL's encoders).
``av_model``
    The audio-visual model of :func:`~fedcore.multimodal.build_av_model` (the modality stage's teacher).
``audio_branch``
    Its audio branch (:func:`~fedcore.multimodal.audio_branch`, same options): the distill stage's student.
``early_exit``
    :func:`~fedcore.earlyexit.models.build_exit_model`'s model (the earlyexit stage). Its ``exit_norm``
    (``per_exit`` | ``shared``) may be absent: specs logged before the option rebuild as ``shared``, the only
    model there was; any other value is refused.

A model built by :func:`build` or :func:`rebuild` carries its spec (:func:`spec_of`), so a rebuilt model can be
logged again as it is (the distill stage's student).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from fedcore.config import EarlyExitConfig, ModalityConfig, ModelConfig, SSLConfig, check_section, to_dict
from fedcore.registry import Registry

#: Version of the spec format (``model_spec.json``'s ``version``).
SPEC_VERSION = 1
#: Largest ``model_spec.json`` read (its options are a few numbers and names).
MAX_SPEC_BYTES = 64 * 1024
#: Largest safetensors header read (JSON listing every tensor: name, dtype, shape, offsets).
MAX_HEADER_BYTES = 16 * 1024 * 1024
#: Deepest nesting of lists and mappings in a spec.
MAX_SPEC_DEPTH = 8
#: Largest size option (widths, classes, embedding sizes) and layer count an architecture is built with.
MAX_SIZE = 1 << 16
MAX_LAYERS = 1024
#: Largest entry of an input shape (waveform backbones take samples: 16 kHz × minutes).
MAX_INPUT = 1 << 26
#: Attribute of a built model that holds its spec.
SPEC_ATTRIBUTE = "architecture_spec"

#: safetensors dtype names of the torch dtypes a state dict may hold.
DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1}

#: Factories ``f(*, options, generator) -> nn.Module``; each checks its options (ValueError) before building.
ARCHITECTURES: Registry[nn.Module] = Registry("architecture")


# --------------------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture and its options (JSON values only).

    Parameters
    ----------
    architecture : str
        A name in :data:`ARCHITECTURES`.
    options : Mapping
        The architecture's options (checked when it is built).

    Raises
    ------
    ValueError
        If the architecture is not registered or the options are not plain, shallow JSON.
    """

    architecture: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.architecture, str) or self.architecture not in ARCHITECTURES:
            raise ValueError(f"model_spec: 'architecture' must be one of {', '.join(ARCHITECTURES.names())}. "
                             f"Got {_short(self.architecture)}. Fix: log the model with a version of this project "
                             "that knows the architecture, or register a builder in fedcore.models.spec.")
        if not isinstance(self.options, Mapping):
            raise ValueError(f"model_spec: 'options' must be a mapping. Got {_short(self.options)}.")
        _check_json(self.options, "model_spec.options", 1)

    def to_dict(self) -> dict[str, Any]:
        """``{"version", "architecture", "options"}`` (what ``model_spec.json`` holds)."""
        return {"version": SPEC_VERSION, "architecture": self.architecture, "options": _plain(self.options)}

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no NaN)."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=1, allow_nan=False)

    @classmethod
    def from_dict(cls, raw: Any, where: str = "model_spec") -> ModelSpec:
        """The spec of a parsed ``model_spec.json``.

        Raises
        ------
        ValueError
            If ``raw`` is not ``{"version": 1, "architecture": str, "options": mapping}`` or names an unknown
            architecture.
        """
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where}: must be a mapping with 'version', 'architecture' and 'options'. "
                             f"Got {_short(raw)}.")
        expected = {"version", "architecture", "options"}
        if set(raw) != expected:
            raise ValueError(f"{where}: keys must be {sorted(expected)}. Got {sorted(map(str, raw))}.")
        if raw["version"] != SPEC_VERSION or isinstance(raw["version"], bool):
            raise ValueError(f"{where}: 'version' must be {SPEC_VERSION}. Got {_short(raw['version'])}. Fix: load "
                             "it with the version of this project that wrote it.")
        try:
            return cls(raw["architecture"], raw["options"])
        except ValueError as error:
            raise ValueError(str(error).replace("model_spec", where, 1)) from None

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "model_spec") -> ModelSpec:
        """Parse and check ``model_spec.json`` (at most :data:`MAX_SPEC_BYTES`; no NaN, no duplicate keys).

        Raises
        ------
        ValueError
            If the text is too long, not JSON, or not a valid spec.
        """
        return cls.from_dict(read_json_file_text(text, MAX_SPEC_BYTES, where), where)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def strict_json_loads(text: str | bytes) -> Any:
    """``json.loads`` that refuses duplicate keys and NaN/Infinity (``ValueError``): for files from others."""
    return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def read_json_file_text(text: str | bytes, max_bytes: int, where: str) -> Any:
    """:func:`strict_json_loads` of a file's text from others, refused (``ValueError``) when over ``max_bytes``."""
    if len(text) > max_bytes:
        raise ValueError(f"{where}: must be at most {max_bytes} bytes. Got {len(text)}.")
    try:
        return strict_json_loads(text)
    except (ValueError, RecursionError, UnicodeDecodeError) as error:
        raise ValueError(f"{where}: must be JSON. Got an unreadable file ({error}).") from None


def _check_json(value: Any, where: str, depth: int) -> None:
    """Plain JSON: str keys; str, bool, None, finite numbers, lists and mappings, at most MAX_SPEC_DEPTH deep."""
    if depth > MAX_SPEC_DEPTH:
        raise ValueError(f"{where}: must be nested at most {MAX_SPEC_DEPTH} deep.")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: keys must be str. Got {_short(key)}.")
            _check_json(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: must be a finite number. Got {value!r}.")
    elif value is not None and not isinstance(value, (str, int, bool)):
        raise ValueError(f"{where}: must be a JSON value (str, number, bool, null, list, mapping). "
                         f"Got {type(value).__name__}.")


def _plain(value: Any) -> Any:
    """Tuples as lists, mappings as dicts (what JSON gives back)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------- option checks
def _options(options: Mapping[str, Any], keys: Sequence[str], where: str) -> None:
    if missing := sorted(set(keys) - set(options)):
        raise ValueError(f"{where}: options {missing} are missing. Got {sorted(options)}.")
    if unknown := sorted(set(options) - set(keys)):
        raise ValueError(f"{where}: unknown options {unknown}; allowed: {sorted(keys)}.")


def _int(value: Any, where: str, name: str, low: int = 1, high: int = MAX_SIZE) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{where}: '{name}' must be an int in [{low}, {high}]. Got {_short(value)}.")
    return value


def _shape(value: Any, where: str, name: str, lengths: Sequence[int]) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) not in lengths:
        raise ValueError(f"{where}: '{name}' must be a list of {' or '.join(map(str, lengths))} ints. "
                         f"Got {_short(value)}.")
    return tuple(_int(v, where, f"{name}[{i}]", 1, MAX_INPUT) for i, v in enumerate(value))


def _name(value: Any, registry: Registry[Any], where: str, name: str) -> str:
    if not isinstance(value, str) or value not in registry:
        raise ValueError(f"{where}: '{name}' must be a registered {registry.kind}, one of "
                         f"{', '.join(registry.names())}. Got {_short(value)}.")
    return value


def _section(cls: type[Any], raw: Any, where: str) -> Any:
    """A config dataclass checked as params.yaml's sections are (types, constraints, registry names)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: must be a mapping. Got {_short(raw)}.")
    config, problems = check_section(cls, raw, where)
    if problems:
        raise ValueError(" ".join(problems))
    return config


def _model_config(raw: Any, where: str) -> ModelConfig:
    cfg: ModelConfig = _section(ModelConfig, raw, where)
    _int(cfg.width, where, "width")
    _int(cfg.depth, where, "depth", 1, MAX_LAYERS)
    return cfg


# --------------------------------------------------------------------------------------------------- architectures
@ARCHITECTURES.register("classifier")
def _classifier(*, options: Mapping[str, Any], generator: torch.Generator) -> nn.Module:
    from fedcore.models.build import build_model

    _options(options, ("model", "num_classes", "input_shape"), "classifier")
    cfg = _model_config(options["model"], "classifier.model")
    num_classes = _int(options["num_classes"], "classifier", "num_classes")
    shape = _shape(options["input_shape"], "classifier", "input_shape", (3,))
    return build_model(cfg, num_classes, (shape[0], shape[1], shape[2]), generator)


#: Keyword arguments of a self-supervised method that do not shape the model (left out of its spec).
_SSL_NOT_ARCHITECTURE = ("augment",)
#: Keyword arguments of every self-supervised method that the ``ssl`` section sets once (the head sizes).
_SSL_SHARED_ARCHITECTURE = ("projector_dim", "hidden_dim")


def _ssl_architecture_options(method: str) -> list[str]:
    """The keyword arguments of self-supervised method ``method`` that an ``ssl_model`` spec records."""
    from fedcore.ssl.methods import SSL_METHODS

    return [name for name in SSL_METHODS.options(method) if name not in _SSL_NOT_ARCHITECTURE]


@ARCHITECTURES.register("ssl_model")
def _ssl_model(*, options: Mapping[str, Any], generator: torch.Generator) -> nn.Module:
    from fedcore.ssl.methods import SSL_METHODS, build_method

    _options(options, ("model", "method", "method_options", "input_shape"), "ssl_model")
    cfg = _model_config(options["model"], "ssl_model.model")
    method = _name(options["method"], SSL_METHODS, "ssl_model", "method")
    if method == "none":
        raise ValueError(f"ssl_model: 'method' must be a self-supervised method. Got {method!r}.")
    method_options = options["method_options"]
    if not isinstance(method_options, Mapping):
        raise ValueError(f"ssl_model: 'method_options' must be a mapping of {method}'s options. "
                         f"Got {_short(method_options)}.")
    _options(method_options, _ssl_architecture_options(method), "ssl_model.method_options")
    shared = {name: _int(method_options[name], "ssl_model.method_options", name)
              for name in _SSL_SHARED_ARCHITECTURE if name in method_options}
    own = {name: value for name, value in method_options.items() if name not in shared}
    ssl: SSLConfig = _section(SSLConfig, {"method": method, **shared, "options": {method: own}}, "ssl_model.ssl")
    shape = _shape(options["input_shape"], "ssl_model", "input_shape", (3,))
    objective = build_method(method, ssl.method_kwargs())
    return objective.build_model(cfg, 1, (shape[0], shape[1], shape[2]), generator)


_AV_OPTIONS = ("audio_model", "audio_shape", "visual_shape", "num_classes", "fusion", "embed_dim", "hidden_dim",
               "visual_width", "dropout")


@ARCHITECTURES.register("av_model")
def _av_model(*, options: Mapping[str, Any], generator: torch.Generator) -> nn.Module:
    from fedcore.multimodal import FUSIONS, build_av_model

    where = "av_model"
    _options(options, _AV_OPTIONS, where)
    audio_shape = _shape(options["audio_shape"], where, "audio_shape", (3,))
    dropout = options["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{where}: 'dropout' must be a float in [0, 1). Got {_short(dropout)}.")
    return build_av_model(
        audio_cfg=_model_config(options["audio_model"], f"{where}.audio_model"),
        audio_shape=(audio_shape[0], audio_shape[1], audio_shape[2]),
        visual_shape=_shape(options["visual_shape"], where, "visual_shape", (3, 4)),
        num_classes=_int(options["num_classes"], where, "num_classes"),
        fusion=_name(options["fusion"], FUSIONS, where, "fusion"),
        embed_dim=_int(options["embed_dim"], where, "embed_dim"),
        hidden_dim=_int(options["hidden_dim"], where, "hidden_dim"),
        visual_width=_int(options["visual_width"], where, "visual_width"),
        dropout=float(dropout), generator=generator)


@ARCHITECTURES.register("audio_branch")
def _audio_branch(*, options: Mapping[str, Any], generator: torch.Generator) -> nn.Module:
    from fedcore.multimodal import AVModel, audio_branch

    model = _av_model(options=options, generator=generator)
    assert isinstance(model, AVModel)
    return audio_branch(model)


@ARCHITECTURES.register("early_exit")
def _early_exit(*, options: Mapping[str, Any], generator: torch.Generator) -> nn.Module:
    """The early-exit model; ``exit_norm`` is optional: a spec without it predates the option, so ``shared``."""
    from fedcore.earlyexit.models import EXIT_BACKBONES, EXIT_HEADS, EXIT_NORMS, build_exit_model

    where = "early_exit"
    _options({k: v for k, v in options.items() if k != "exit_norm"},
             ("backbone", "backbone_options", "model", "exits", "num_classes", "head", "input_shape"), where)
    exit_norm = options.get("exit_norm", "shared")
    if not isinstance(exit_norm, str) or exit_norm not in EXIT_NORMS:
        raise ValueError(f"{where}: 'exit_norm' must be one of {', '.join(EXIT_NORMS)}. Got {_short(exit_norm)}.")
    exits = options["exits"]
    if not isinstance(exits, list) or not exits or len(exits) > MAX_LAYERS:
        raise ValueError(f"{where}: 'exits' must be a non-empty list of layer numbers. Got {_short(exits)}.")
    if not isinstance(options["backbone_options"], Mapping):
        raise ValueError(f"{where}: 'backbone_options' must be a mapping. Got {_short(options['backbone_options'])}.")
    shape = _shape(options["input_shape"], where, "input_shape", (3,))
    return build_exit_model(
        _name(options["backbone"], EXIT_BACKBONES, where, "backbone"),
        input_shape=(shape[0], shape[1], shape[2]), cfg=_model_config(options["model"], f"{where}.model"),
        options=dict(options["backbone_options"]),
        exits=[_int(e, where, f"exits[{i}]", 1, MAX_LAYERS) for i, e in enumerate(exits)],
        num_classes=_int(options["num_classes"], where, "num_classes"),
        head=_name(options["head"], EXIT_HEADS, where, "head"), generator=generator, exit_norm=exit_norm)


# --------------------------------------------------------------------------------------------------- spec makers
def classifier_spec(model: ModelConfig, num_classes: int, input_shape: Sequence[int]) -> ModelSpec:
    """Spec of the registered classifier ``model`` (logits of ``num_classes`` from ``input_shape``)."""
    return ModelSpec("classifier", {"model": to_dict(model), "num_classes": int(num_classes),
                                    "input_shape": [int(s) for s in input_shape]})


def ssl_model_spec(model: ModelConfig, ssl: SSLConfig, input_shape: Sequence[int]) -> ModelSpec:
    """Spec of the self-supervised model of ``ssl.method`` on the backbone of ``model``.

    Its ``method_options`` are every keyword argument of the method's class but ``augment``: the shared head sizes
    and the method's own options, defaults included.
    """
    from fedcore.ssl.methods import SSL_METHODS

    factory = inspect.signature(SSL_METHODS.get(ssl.method)).parameters
    kwargs = ssl.method_kwargs()
    method_options = {name: _plain(kwargs[name] if name in kwargs else factory[name].default)
                      for name in _ssl_architecture_options(ssl.method)}
    return ModelSpec("ssl_model", {"model": to_dict(model), "method": ssl.method, "method_options": method_options,
                                   "input_shape": [int(s) for s in input_shape]})


def federate_model_spec(model: ModelConfig, ssl: SSLConfig, num_classes: int,
                        input_shape: Sequence[int]) -> ModelSpec:
    """Spec of the federate stage's shared model: the classifier, or the SSL model under ``ssl.method``."""
    if ssl.self_supervised:
        return ssl_model_spec(model, ssl, input_shape)
    return classifier_spec(model, num_classes, input_shape)


def av_model_spec(model: ModelConfig, modality: ModalityConfig, audio_shape: Sequence[int],
                  visual_shape: Sequence[int], num_classes: int) -> ModelSpec:
    """Spec of the audio-visual model (audio encoder ``model``, sizes from the ``modality`` section)."""
    return ModelSpec("av_model", {
        "audio_model": to_dict(model), "audio_shape": [int(s) for s in audio_shape],
        "visual_shape": [int(s) for s in visual_shape], "num_classes": int(num_classes), "fusion": modality.fusion,
        "embed_dim": modality.embed_dim, "hidden_dim": modality.hidden_dim, "visual_width": modality.visual_width,
        "dropout": float(modality.dropout)})


def audio_branch_spec(av_model: ModelSpec) -> ModelSpec:
    """Spec of the audio branch of the audio-visual model ``av_model``."""
    if av_model.architecture != "av_model":
        raise ValueError(f"audio_branch_spec: 'av_model' must be an av_model spec. Got {av_model.architecture!r}.")
    return ModelSpec("audio_branch", av_model.options)


def exit_model_spec(model: ModelConfig, earlyexit: EarlyExitConfig, input_shape: Sequence[int],
                    num_classes: int) -> ModelSpec:
    """Spec of the early-exit model of the ``earlyexit`` section (backbone size from ``model``; ``exit_norm``)."""
    return ModelSpec("early_exit", {
        "backbone": earlyexit.backbone, "backbone_options": dict(earlyexit.backbone_options),
        "model": to_dict(model), "exits": [int(e) for e in earlyexit.exits], "num_classes": int(num_classes),
        "head": earlyexit.head, "exit_norm": earlyexit.exit_norm, "input_shape": [int(s) for s in input_shape]})


# --------------------------------------------------------------------------------------------------- build
def build(spec: ModelSpec, generator: torch.Generator | None = None) -> nn.Module:
    """Build ``spec``'s architecture with weights drawn from ``generator`` (default: seed 0); it carries ``spec``.

    Raises
    ------
    ValueError
        If the options are not the architecture's (the message names the option).
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"build: 'spec' must be a ModelSpec. Got {type(spec).__name__}.")
    factory = ARCHITECTURES.get(spec.architecture)
    try:
        model = factory(options=spec.options, generator=generator or torch.Generator().manual_seed(0))
    except ValueError:
        raise
    except Exception as error:  # what a builder raises on options it did not expect
        raise ValueError(f"model_spec: architecture {spec.architecture!r} cannot be built from its options "
                         f"({type(error).__name__}: {error}).") from None
    setattr(model, SPEC_ATTRIBUTE, spec)
    return model


def spec_of(model: Any) -> ModelSpec | None:
    """The spec a model was built from (:func:`build`, :func:`rebuild`), or None."""
    spec = getattr(model, SPEC_ATTRIBUTE, None)
    return spec if isinstance(spec, ModelSpec) else None


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a state dict: safetensors dtype name and shape."""

    dtype: str
    shape: tuple[int, ...]


def expected_entries(spec: ModelSpec) -> dict[str, TensorInfo]:
    """The state dict ``spec`` builds, keys, dtypes and shapes only (built on the meta device: no memory).

    Raises
    ------
    ValueError
        If the options are invalid, or the model holds a dtype safetensors cannot store.
    """
    generator = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        model = build(spec, generator)
    entries = {}
    for key, tensor in model.state_dict().items():
        if tensor.dtype not in DTYPES:
            raise ValueError(f"model_spec: entry {key!r} has dtype {tensor.dtype}, which the weights file cannot "
                             "hold.")
        entries[key] = TensorInfo(DTYPES[tensor.dtype], tuple(int(s) for s in tensor.shape))
    return entries


# --------------------------------------------------------------------------------------------------- weights
def read_header(data: bytes, where: str = "weights") -> dict[str, TensorInfo]:
    """The entries a safetensors file declares, checked against the file's length.

    The header must be at most :data:`MAX_HEADER_BYTES` of JSON; every entry a known dtype, a shape of ints >= 0
    and offsets that tile the data exactly (in order, no gap, no overlap, ``numel × itemsize`` bytes each) up to
    the end of the file.

    Raises
    ------
    ValueError
        If the file is truncated, padded or its header malformed (the message says which).
    """
    if len(data) < 8:
        raise ValueError(f"{where}: is not a safetensors file: {len(data)} bytes, shorter than its 8-byte header "
                         "length. Fix: the file is truncated; log or copy it again.")
    size = int.from_bytes(data[:8], "little")
    if size > MAX_HEADER_BYTES or 8 + size > len(data):
        raise ValueError(f"{where}: its header length ({size} bytes) must be at most "
                         f"{min(MAX_HEADER_BYTES, len(data) - 8)} (the file has {len(data)} bytes). Fix: the file "
                         "is truncated or not safetensors; log or copy it again.")
    try:
        header = json.loads(data[8 : 8 + size], object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, RecursionError, UnicodeDecodeError) as error:
        raise ValueError(f"{where}: its header must be JSON. Got an unreadable header ({error}). Fix: the file is "
                         "damaged; log or copy it again.") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: its header must be a JSON mapping. Got {type(header).__name__}.")
    entries: dict[str, TensorInfo] = {}
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if (not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}
                or info["dtype"] not in _ITEM_BYTES or not isinstance(info["shape"], list)
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in info["shape"])
                or not isinstance(info["data_offsets"], list) or len(info["data_offsets"]) != 2
                or any(isinstance(o, bool) or not isinstance(o, int) for o in info["data_offsets"])):
            raise ValueError(f"{where}: entry {key!r} must have a dtype of {sorted(_ITEM_BYTES)}, a shape of ints "
                             f">= 0 and two data offsets. Got {_short(info)}.")
        start, end = info["data_offsets"]
        if end - start != math.prod(info["shape"]) * _ITEM_BYTES[info["dtype"]]:
            raise ValueError(f"{where}: entry {key!r} spans {end - start} bytes; its dtype and shape need "
                             f"{math.prod(info['shape']) * _ITEM_BYTES[info['dtype']]}.")
        entries[key] = TensorInfo(info["dtype"], tuple(info["shape"]))
        spans.append((start, end, key))
    position = 0
    for start, end, key in sorted(spans):
        if start != position:
            raise ValueError(f"{where}: entry {key!r} starts at byte {start} of the data; expected {position} (the "
                             "entries must tile the data). Fix: the file is damaged; log or copy it again.")
        position = end
    available = len(data) - 8 - size
    if position != available:
        state = "truncated" if position > available else "padded"
        raise ValueError(f"{where}: the header declares {position} bytes of tensor data; the file holds {available} "
                         f"({state}). Fix: the file is damaged; log or copy it again.")
    return entries


def check_entries(expected: Mapping[str, TensorInfo], found: Mapping[str, TensorInfo], where: str) -> None:
    """``found`` (a weights header) must hold exactly ``expected``'s keys, dtypes and shapes.

    Raises
    ------
    ValueError
        Listing the missing and unexpected keys and the first mismatched entries.
    """
    problems = []
    if missing := sorted(set(expected) - set(found)):
        problems.append(f"missing keys {_few(missing)}")
    if unexpected := sorted(set(found) - set(expected)):
        problems.append(f"unexpected keys {_few(unexpected)}")
    wrong = [f"{key!r}: {found[key].dtype}{list(found[key].shape)}, expected "
             f"{expected[key].dtype}{list(expected[key].shape)}"
             for key in sorted(set(expected) & set(found)) if expected[key] != found[key]]
    if wrong:
        problems.append(f"{len(wrong)} entries of another shape or dtype ({'; '.join(wrong[:3])}"
                        f"{'; ...' if len(wrong) > 3 else ''})")
    if problems:
        raise ValueError(f"{where}: the weights must match the architecture of the spec exactly; "
                         f"{', '.join(problems)}. Fix: the weights and the spec come from different models; log the "
                         "model again.")


def _few(keys: Sequence[str], limit: int = 5) -> str:
    return repr(list(keys[:limit]))[:-1] + (f", ... ({len(keys)} in all)]" if len(keys) > limit else "]")


def check_finite(state: Mapping[str, torch.Tensor], where: str) -> None:
    """Every floating-point entry of ``state`` must be finite.

    Raises
    ------
    ValueError
        Naming the entries holding NaN or Inf.
    """
    bad = [key for key, value in state.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise ValueError(f"{where}: every weight must be finite; {_few(bad)} hold NaN or Inf. Fix: the model "
                         "diverged or the file is damaged; use another round's model.")


def read_state(data: bytes, where: str = "weights") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's bytes, checked (:func:`read_header`, finite values).

    Raises
    ------
    ValueError
        If the file is malformed, truncated or holds non-finite weights.
    """
    read_header(data, where)
    try:
        state = safetensors.torch.load(data)
    except (SafetensorError, RuntimeError, ValueError) as error:
        raise ValueError(f"{where}: cannot be read as safetensors ({error}). Fix: the file is damaged; log or copy "
                         "it again.") from None
    check_finite(state, where)
    return state


def rebuild(spec: ModelSpec, weights: bytes, where: str = "model") -> nn.Module:
    """Build ``spec`` (any seed) and load the safetensors ``weights`` into it strictly; eval mode.

    The header is checked against the architecture (built on the meta device) before the model is built, so a
    spec or header that does not fit is refused without allocating the model.

    Raises
    ------
    ValueError
        If the spec's options, the weights' keys, shapes or dtypes, or their values are not valid.
    """
    check_entries(expected_entries(spec), read_header(weights, f"{where}: weights"), where)
    state = read_state(weights, f"{where}: weights")
    model = build(spec)
    model.load_state_dict(state, strict=True)
    return model.eval()


__all__ = [
    "ARCHITECTURES", "DTYPES", "MAX_SPEC_BYTES", "SPEC_ATTRIBUTE", "ModelSpec", "TensorInfo", "audio_branch_spec",
    "av_model_spec", "build", "check_entries", "check_finite", "classifier_spec", "exit_model_spec",
    "expected_entries", "federate_model_spec", "read_header", "read_state", "rebuild", "spec_of",
    "ssl_model_spec",
]
