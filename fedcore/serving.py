"""A logged classifier a user can take away: audio in, labels and class probabilities out.

Every model the federate stage logs carries, beside ``model_spec.json`` and its safetensors weights, a serving
spec ``serving.json`` (:class:`ServingSpec`): the feature settings the features stage used (the ``features``
params), the train split's normalisation statistics and the class names in ``label_idx`` order, all read from the
feature store's ``meta.json``. With them the model classifies an audio file without the project's data folder.

This module is also the model's MLflow ``python_function`` loader (``loader_module: fedcore.serving``, ``data:
serving.json``): ``mlflow.pyfunc.load_model(uri)`` calls :func:`_load_pyfunc` with the path of ``serving.json``.
It reads JSON and safetensors only (no pickle, no code from the files) and imports no MLflow. What it computes is
what the pipeline computes::

    read_audio(path)                          fedcore.data.audio (the features stage's reader)
    -> LogMelExtractor(features)(waveform)    fedcore.data.features: mono, resample, crop/pad, log-mel
    -> .astype(features.dtype)                the rounding of the stored features (float16 by default)
    -> (x - mean) / std in float32            FeatureStore.normalised
    -> fedcore.evaluation.metrics.predict     the stage's evaluation, batches of batch_size

so a test clip gets the label the federate stage's evaluation gives it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedcore.config import FeaturesConfig, check_section, to_dict
from fedcore.data.audio import read_audio
from fedcore.data.features import LogMelExtractor
from fedcore.errors import AudioError
from fedcore.evaluation.metrics import predict
from fedcore.models.spec import MAX_SPEC_BYTES, ModelSpec, read_json_file_text, rebuild

__all__ = ["SERVING_FILE", "SERVING_VERSION", "AudioClassifier", "ServingSpec", "load_classifier"]

#: Name of the serving spec in a model folder, and the version of its format.
SERVING_FILE = "serving.json"
SERVING_VERSION = 1
#: Largest ``serving.json`` read (a few settings and the class names); largest weights file read.
MAX_SERVING_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 4 << 30
#: Output columns that no class may be named (the DataFrame :meth:`AudioClassifier.predict` returns).
RESERVED_COLUMNS = ("label",)
_KEYS = ("version", "model_spec", "weights", "features", "mean", "std", "labels", "batch_size")
_RELATIVE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value) if value is None or isinstance(value, (str, int, float, bool)) else f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + "..."


def relative_name(value: Any, where: str, name: str) -> str:
    """A file name inside a model folder: relative, plain characters, no ``..`` (else ``ValueError``)."""
    if not isinstance(value, str) or len(value) > 200 or not _RELATIVE.match(value) or ".." in value.split("/"):
        raise ValueError(f"{where}: '{name}' must be a relative file name inside the model folder (no '..', no "
                         f"absolute path). Got {_short(value)}.")
    return value


@dataclass(frozen=True)
class ServingSpec:
    """What a logged classifier needs to classify audio (``serving.json``).

    Parameters
    ----------
    features : FeaturesConfig
        The front end the features stage used (``meta.json``'s ``features``).
    mean, std : float
        Train-split statistics of the raw stored features (``meta.json``); ``std > 0``.
    labels : tuple of str
        Class names in ``label_idx`` order: logit ``i`` is ``labels[i]``.
    model_spec, weights : str
        The architecture spec and the safetensors weights, relative to the folder of ``serving.json``.
    batch_size : int
        Clips per forward pass (the stage's ``federation.eval_batch_size``).

    Raises
    ------
    ValueError
        If a value is out of its domain (the message names it).
    """

    features: FeaturesConfig
    mean: float
    std: float
    labels: tuple[str, ...]
    model_spec: str = "model_spec.json"
    weights: str = "weights.safetensors"
    batch_size: int = 64

    def __post_init__(self) -> None:
        where = "serving_spec"
        if not isinstance(self.features, FeaturesConfig):
            raise TypeError(f"{where}: 'features' must be a FeaturesConfig. Got {_short(self.features)}.")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{where}: '{name}' must be a finite number. Got {_short(value)}.")
        if not self.std > 0:
            raise ValueError(f"{where}: 'std' must be > 0. Got {self.std!r}.")
        labels = self.labels
        if (not isinstance(labels, (list, tuple)) or len(labels) < 2
                or not all(isinstance(name, str) and 0 < len(name) <= 200 for name in labels)):
            raise ValueError(f"{where}: 'labels' must be a list of at least 2 class names (non-empty str). "
                             f"Got {_short(labels) if not isinstance(labels, list) else labels[:5]!r}.")
        if len(set(labels)) != len(labels):
            raise ValueError(f"{where}: 'labels' must be unique. Got duplicates "
                             f"{sorted({n for n in labels if labels.count(n) > 1})[:5]}.")
        if clash := sorted(set(labels) & set(RESERVED_COLUMNS)):
            raise ValueError(f"{where}: 'labels' must not hold {clash} (a column of the predictions). "
                             f"Got {clash}.")
        object.__setattr__(self, "labels", tuple(labels))
        relative_name(self.model_spec, where, "model_spec")
        relative_name(self.weights, where, "weights")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"{where}: 'batch_size' must be an int >= 1. Got {_short(self.batch_size)}.")

    @classmethod
    def from_feature_meta(cls, meta: Mapping[str, Any], batch_size: int = 64) -> ServingSpec:
        """The spec of the models trained on a feature store, from its ``meta.json`` (parsed).

        Raises
        ------
        ValueError
            If ``meta`` lacks ``features``, ``mean``, ``std`` or ``labels``, or holds bad values.
        """
        where = "serving_spec: meta.json"
        if not isinstance(meta, Mapping) or (missing := sorted({"features", "mean", "std", "labels"} - set(meta))):
            raise ValueError(f"{where}: must hold 'features', 'mean', 'std' and 'labels'. Got "
                             f"{sorted(meta) if isinstance(meta, Mapping) else _short(meta)} (missing {missing}).")
        return cls(features=_features(meta["features"], f"{where}: features"), mean=meta["mean"],
                   std=meta["std"], labels=tuple(meta["labels"]) if isinstance(meta["labels"], list)
                   else meta["labels"], batch_size=batch_size)

    @classmethod
    def from_feature_store(cls, folder: str | os.PathLike[str], batch_size: int = 64) -> ServingSpec:
        """:meth:`from_feature_meta` of the ``meta.json`` of feature store ``folder``."""
        path = Path(folder) / "meta.json"
        return cls.from_feature_meta(json.loads(path.read_text(encoding="utf-8")), batch_size)

    def with_files(self, model_spec: str, weights: str) -> ServingSpec:
        """The same spec naming other model files (relative to the folder of ``serving.json``)."""
        return dataclasses.replace(self, model_spec=model_spec, weights=weights)

    def to_dict(self) -> dict[str, Any]:
        """What ``serving.json`` holds."""
        return {"version": SERVING_VERSION, "model_spec": self.model_spec, "weights": self.weights,
                "features": to_dict(self.features), "mean": float(self.mean), "std": float(self.std),
                "labels": list(self.labels), "batch_size": self.batch_size}

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no NaN)."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = SERVING_FILE) -> ServingSpec:
        """Parse and check ``serving.json`` (at most :data:`MAX_SERVING_BYTES`, plain JSON, exactly its keys).

        Raises
        ------
        ValueError
            If the text is too long, not JSON, lacks a key or holds a bad value (the message names it).
        """
        raw = read_json_file_text(text, MAX_SERVING_BYTES, where)
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: must be a JSON object with keys {sorted(_KEYS)}. Got {_short(raw)}.")
        if set(raw) != set(_KEYS):
            raise ValueError(f"{where}: keys must be {sorted(_KEYS)}. Got {sorted(raw)}.")
        if raw["version"] != SERVING_VERSION or isinstance(raw["version"], bool):
            raise ValueError(f"{where}: 'version' must be {SERVING_VERSION}. Got {_short(raw['version'])}. Fix: load "
                             "it with the version of this project that logged it.")
        labels = raw["labels"]
        try:
            return cls(features=_features(raw["features"], f"{where}: features"), mean=raw["mean"],
                       std=raw["std"], labels=tuple(labels) if isinstance(labels, list) else labels,
                       model_spec=raw["model_spec"], weights=raw["weights"], batch_size=raw["batch_size"])
        except (ValueError, TypeError) as error:
            raise ValueError(str(error).replace("serving_spec", where, 1)) from None


def _features(raw: Any, where: str) -> FeaturesConfig:
    """The ``features`` section, checked as params.yaml's is (keys, types, bounds, cross-field rules)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: must be a mapping of the features params. Got {_short(raw)}.")
    config, problems = check_section(FeaturesConfig, raw, where)
    if problems or config is None:
        raise ValueError(" ".join(problems))
    return config


# --------------------------------------------------------------------------------------------------- the model
class AudioClassifier:
    """A classifier and its serving spec: audio in, one label and the class probabilities per clip out.

    Parameters
    ----------
    model : torch.nn.Module
        Maps normalised features ``(batch, 1, n_mels, frames)`` float32 to logits ``(batch, len(labels))``.
    spec : ServingSpec
        Its front end, statistics and class names.
    """

    def __init__(self, model: nn.Module, spec: ServingSpec) -> None:
        self.model = model.eval()
        self.spec = spec
        self.extractor = LogMelExtractor(spec.features)

    @property
    def labels(self) -> tuple[str, ...]:
        """Class names, in logit order."""
        return self.spec.labels

    def clip_features(self, waveform: np.ndarray | torch.Tensor, sample_rate: int) -> np.ndarray:
        """Normalised features of one clip, as the federate stage reads them from the feature store.

        Parameters
        ----------
        waveform : numpy.ndarray or Tensor, shape (channels, time) or (time,), floating point
            One clip at ``sample_rate`` Hz.
        sample_rate : int
            Hz.

        Returns
        -------
        numpy.ndarray, shape (1, n_mels, frames), float32
            ``(x - mean) / std`` of the log-mel rounded to the store's dtype (``features.dtype``).

        Raises
        ------
        AudioError
            If the clip is empty, not finite, or its features do not fit the store's dtype.
        """
        values = self.extractor(waveform, sample_rate).cpu().numpy()
        dtype = self.spec.features.dtype
        with np.errstate(over="ignore"):
            stored = values.astype(dtype)  # the rounding of the stored features (fedcore.data.features.extract_clips)
        if not np.isfinite(stored).all():
            raise AudioError(f"features must fit {dtype}. Got values up to {float(np.abs(values).max()):.3g}. "
                             "Rescale the audio to [-1, 1].")
        raw = np.asarray(stored, dtype=np.float32)  # FeatureStore.normalised, row by row
        normalised: np.ndarray = (raw - np.float32(self.spec.mean)) / np.float32(self.spec.std)
        return normalised[None]

    def features(self, model_input: Any) -> tuple[np.ndarray, Any]:
        """Normalised features of every clip of ``model_input`` (see :meth:`predict`) and the index of the output.

        Returns
        -------
        features : numpy.ndarray, shape (num_clips, 1, n_mels, frames), float32
        index : pandas-compatible index (the input DataFrame's index, else None)
        """
        clips, index = _clips(model_input, self.spec.features.sample_rate)
        if not clips:
            raise ValueError("AudioClassifier.predict: 'model_input' must hold at least one clip. Got none.")
        rows = []
        for position, (clip, sample_rate, name) in enumerate(clips):
            try:
                if isinstance(clip, (str, Path)):
                    clip, sample_rate = read_audio(clip)
                rows.append(self.clip_features(clip, sample_rate))
            except AudioError as error:
                raise AudioError(f"AudioClassifier.predict: clip {position} ({name}): {error}") from None
        return np.stack(rows), index

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None) -> Any:
        """Label and class probabilities of every clip.

        Parameters
        ----------
        model_input : str, path, list of paths, numpy.ndarray or pandas.DataFrame
            An audio file (any format libsndfile reads), a list of them, one clip as a 1-D float waveform at the
            spec's sample rate (``spec.features.sample_rate``), or a DataFrame with a ``path`` column.
        params : mapping, optional
            Unused (MLflow's pyfunc passes it).

        Returns
        -------
        pandas.DataFrame
            One row per clip (the input DataFrame's index, else 0..n-1): ``label`` (the argmax class name) and one
            float64 column per class name, its softmax probability.

        Raises
        ------
        TypeError, ValueError
            If ``model_input`` is none of the above.
        AudioError
            If a file cannot be read or a clip cannot be featurised (the message names the clip).
        """
        import pandas as pd

        features, index = self.features(model_input)
        logits = predict(self.model, torch.from_numpy(features), self.spec.batch_size)
        if logits.ndim != 2 or logits.shape[1] != len(self.labels):
            raise ValueError(f"AudioClassifier.predict: the model must give one logit per class "
                             f"({len(self.labels)}). Got logits of shape {tuple(logits.shape)}.")
        probabilities = torch.softmax(logits.double(), dim=1).numpy()
        predicted = logits.argmax(dim=1).tolist()  # argmax of the logits, as fedcore.evaluation.metrics.evaluate
        frame = pd.DataFrame(probabilities, columns=list(self.labels), index=index)
        frame.insert(0, "label", [self.labels[i] for i in predicted])
        return frame


def _clips(model_input: Any, sample_rate: int) -> tuple[list[tuple[Any, int, str]], Any]:
    """``[(path or waveform, sample rate, name)]`` and the output index of a :meth:`AudioClassifier.predict` input."""
    where = "AudioClassifier.predict"
    if isinstance(model_input, (str, os.PathLike)):
        return [(Path(model_input), 0, str(model_input))], None
    if isinstance(model_input, np.ndarray):
        if model_input.ndim != 1 or not np.issubdtype(model_input.dtype, np.floating):
            raise ValueError(f"{where}: a waveform must be a 1-D float array at {sample_rate} Hz. Got shape "
                             f"{model_input.shape}, dtype {model_input.dtype}. Fix: pass a file path, or a mono "
                             f"clip resampled to {sample_rate} Hz.")
        return [(model_input, sample_rate, "waveform")], None
    if hasattr(model_input, "columns") and hasattr(model_input, "index"):  # a pandas DataFrame
        if "path" not in model_input.columns:
            raise ValueError(f"{where}: a DataFrame must have a 'path' column. Got columns "
                             f"{[str(c) for c in model_input.columns][:10]}.")
        paths = list(model_input["path"])
        return [_path(p, i, where) for i, p in enumerate(paths)], model_input.index
    if isinstance(model_input, (list, tuple)):
        return [_path(p, i, where) for i, p in enumerate(model_input)], None
    raise TypeError(f"{where}: 'model_input' must be a file path, a list of file paths, a 1-D waveform (numpy) or a "
                    f"DataFrame with a 'path' column. Got {type(model_input).__name__}.")


def _path(value: Any, position: int, where: str) -> tuple[Path, int, str]:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise TypeError(f"{where}: item {position} must be a file path. Got {_short(value)}.")
    return Path(value), 0, str(value)


# --------------------------------------------------------------------------------------------------- loading
def _read(folder: Path, name: str, limit: int, where: str) -> bytes:
    """The bytes of ``folder/name``: a regular file inside ``folder`` (no symlink out), at most ``limit`` bytes."""
    path = folder / name
    try:
        info = path.lstat()
    except OSError:
        raise ValueError(f"{where}: the model folder must hold {name!r}. Got no such file.") from None
    if not stat.S_ISREG(info.st_mode) or not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{where}: {name!r} must be a regular file inside the model folder (no symlink). Got "
                         "another kind of file.")
    if info.st_size > limit:
        raise ValueError(f"{where}: {name!r} must be at most {limit} bytes. Got {info.st_size}.")
    return path.read_bytes()


def load_classifier(serving_file: str | os.PathLike[str]) -> AudioClassifier:
    """The classifier of a model folder, from its ``serving.json`` (JSON and safetensors only, nothing pickled).

    ``serving_file``: the path of ``serving.json`` (or the model folder holding it). Its ``model_spec`` and
    ``weights`` are read from the same folder; the architecture is rebuilt from the spec and the weights loaded
    strictly (:func:`fedcore.models.spec.rebuild`); the model must take the spec's features and give one logit per
    class.

    Raises
    ------
    ValueError
        If a file is missing, too large or outside the folder, or a spec is not valid (the message says which).
    """
    path = Path(serving_file)
    if path.is_dir():
        path = path / SERVING_FILE
    where = f"load_classifier: {str(path)!r}"
    if not path.is_file():
        raise ValueError(f"{where}: must be a serving spec ({SERVING_FILE}) or a model folder holding one. Got no "
                         "such file. Fix: load a model logged by the federate stage of this project.")
    folder = path.parent
    spec = ServingSpec.from_json(_read(folder, path.name, MAX_SERVING_BYTES, where), f"{where}")
    model_spec = ModelSpec.from_json(_read(folder, spec.model_spec, MAX_SPEC_BYTES, where),
                                     f"{where}: {spec.model_spec}")
    model = rebuild(model_spec, _read(folder, spec.weights, MAX_WEIGHTS_BYTES, where), where)
    classifier = AudioClassifier(model, spec)
    shape = (1, 1, *classifier.extractor.output_shape)
    trained_on = model_spec.options.get("input_shape")
    if trained_on is not None and list(trained_on) != list(shape[1:]):
        raise ValueError(f"{where}: the spec's features {list(shape[1:])} must be those the model was trained on "
                         f"({spec.model_spec}: input_shape "
                         f"{list(trained_on)}). Fix: the serving spec and the weights come from different runs.")
    try:
        with torch.inference_mode():
            logits = model(torch.zeros(shape))
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"{where}: the model ({model_spec.architecture}) must take the spec's features "
                         f"{shape[1:]}. Got an error: {error}") from None
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (1, len(spec.labels)):
        raise ValueError(f"{where}: the model must give one logit per class ({len(spec.labels)}). Got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}.")
    return classifier


def _load_pyfunc(data_path: str) -> AudioClassifier:
    """MLflow's ``python_function`` loader: ``data_path`` is the model's ``serving.json``."""
    return load_classifier(data_path)
