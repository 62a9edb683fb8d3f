"""Log-mel front end, feature extraction in batches, and the on-disk feature store.

Pipeline per clip (torchaudio, the front end of FedAudio, arXiv:2210.15707, and of PAPERS.md section 7)::

    waveform (channels, time) @ sr  ->  mono (mean over channels)  ->  resample to cfg.sample_rate
    ->  pad / crop to T = round(clip_seconds * sample_rate) samples
    ->  mel = MelSpectrogram(n_fft, win_length, hop_length, f_min, f_max, n_mels, power=2)(x)
    ->  log_mel = log(mel + log_offset)                                 shape (n_mels, 1 + T // hop_length)

The store (``features.npy``, ``index.csv``, ``meta.json``; see docs/architecture.md, "Features") keeps the raw
log-mel; :meth:`FeatureStore.normalised` applies ``(x - mean) / std`` with the train split's global statistics.

Bit-identical features. Each clip is resampled and turned into a log-mel on its own, on one intra-op thread: the
convolution behind the resampler splits its work by thread count (three threads or more change the last bits of
about a third of FSDD's clips), and a batch would make a clip's values depend on its neighbours. So a clip's
features depend only on the clip and the settings, not on the caller's thread count, batch size or which other
files were skipped. Across CPUs, see ``flows/__init__.py`` for the library pins.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio
from torch import Tensor

from fedcore.config import FeaturesConfig
from fedcore.data.audio import audio_error_reason
from fedcore.errors import AudioError, DataError

__all__ = [
    "CLIP_ERRORS",
    "INDEX_COLUMNS",
    "ClipFeatures",
    "FeatureStore",
    "LogMelExtractor",
    "extract_clips",
    "extract_features",
    "label_index",
    "cropped_share",
    "normalisation_stats",
    "write_feature_store",
]

INDEX_COLUMNS = ("row", "id", "label", "label_idx", "speaker", "split")
"""Columns of ``index.csv``, in order."""

_STORE_DTYPES = ("float16", "float32")
_STATS_CHUNK = 256  # rows per chunk in normalisation_stats: 256 x 64 x 101 float64 = 13 MB

CLIP_ERRORS: tuple[type[BaseException], ...] = (AudioError, ValueError, TypeError, RuntimeError, OSError, MemoryError)
"""What :func:`extract_clips` catches per clip (and so skips) instead of stopping: unreadable or non-finite audio
(:class:`~fedcore.errors.AudioError`), odd shapes or dtypes, libsndfile's and torch's runtime errors, I/O errors,
and a file too large to decode in memory."""


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside, restoring the caller's count after (a cheap call, ~0.2 µs)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _describe_non_finite(tensor: Tensor) -> str:
    """``"3 NaN and 0 Inf values (first at flat index 12)"`` of a tensor known to hold some."""
    nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    first = int(torch.nonzero(~torch.isfinite(tensor.reshape(-1)))[0, 0])
    return f"{nan} NaN and {inf} Inf values (first at flat index {first})"


# ------------------------------------------------------------------------------------------------ pad and crop
def _crop_center(waveform: Tensor, length: int) -> Tensor:
    start = (waveform.shape[-1] - length) // 2
    return waveform[start : start + length]


def _crop_start(waveform: Tensor, length: int) -> Tensor:
    return waveform[:length]


def _pad_end(waveform: Tensor, length: int) -> Tensor:
    return torch.nn.functional.pad(waveform, (0, length - waveform.shape[-1]))


def _pad_center(waveform: Tensor, length: int) -> Tensor:
    missing = length - waveform.shape[-1]
    return torch.nn.functional.pad(waveform, (missing // 2, missing - missing // 2))


def _pad_repeat(waveform: Tensor, length: int) -> Tensor:
    repeats = math.ceil(length / waveform.shape[-1])
    return waveform.repeat(repeats)[:length]


_CROPS: dict[str, Callable[[Tensor, int], Tensor]] = {"center": _crop_center, "start": _crop_start}
_PADS: dict[str, Callable[[Tensor, int], Tensor]] = {"end": _pad_end, "center": _pad_center, "repeat": _pad_repeat}


# ------------------------------------------------------------------------------------------------- extractor
class LogMelExtractor:
    """Mono, resampled, fixed-length log-mel spectrogram of one clip or a batch of clips.

    Parameters
    ----------
    cfg : FeaturesConfig
        Front-end settings (target rate, clip length, pad/crop policy, STFT and mel settings).

    Notes
    -----
    One :class:`torchaudio.transforms.Resample` is cached per source rate, so its sinc kernel is computed once.
    The STFT is centred (torchaudio's default, reflect padding), hence ``frames = 1 + num_samples // hop_length``.
    """

    def __init__(self, cfg: FeaturesConfig) -> None:
        if cfg.crop not in _CROPS:
            raise ValueError(f"features: 'crop' must be one of {', '.join(_CROPS)}. Got {cfg.crop!r}.")
        if cfg.pad not in _PADS:
            raise ValueError(f"features: 'pad' must be one of {', '.join(_PADS)}. Got {cfg.pad!r}.")
        if cfg.clip_seconds is None:
            raise ValueError("features: 'clip_seconds' must be a number of seconds here. Got None (the dataset's own "
                             "length: fill it with fedcore.data.datasets.with_dataset_defaults first).")
        self.cfg = cfg
        self.num_samples = int(round(cfg.clip_seconds * cfg.sample_rate))
        if self.num_samples <= cfg.n_fft // 2:
            raise ValueError(
                f"features: 'clip_seconds' must give more than n_fft // 2 ({cfg.n_fft // 2}) samples at "
                f"{cfg.sample_rate} Hz. Got {cfg.clip_seconds!r} ({self.num_samples} samples). "
                "Raise clip_seconds or lower n_fft."
            )
        f_max = cfg.f_max if cfg.f_max is not None else cfg.sample_rate / 2
        self._mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate,
            n_fft=cfg.n_fft,
            win_length=cfg.win_length,
            hop_length=cfg.hop_length,
            f_min=cfg.f_min,
            f_max=f_max,
            n_mels=cfg.n_mels,
            power=2.0,
        )
        self._resamplers: dict[int, torchaudio.transforms.Resample] = {}

    @property
    def output_shape(self) -> tuple[int, int]:
        """``(n_mels, frames)`` of one clip's log-mel; ``(1, num_samples)`` with ``kind: waveform``."""
        if self.cfg.kind == "waveform":
            return 1, self.num_samples
        return self.cfg.n_mels, 1 + self.num_samples // self.cfg.hop_length

    def _resample(self, waveform: Tensor, sample_rate: int) -> Tensor:
        if sample_rate == self.cfg.sample_rate:
            return waveform
        if sample_rate not in self._resamplers:
            self._resamplers[sample_rate] = torchaudio.transforms.Resample(sample_rate, self.cfg.sample_rate)
        resampled: Tensor = self._resamplers[sample_rate](waveform)
        return resampled

    def prepare(self, waveform: np.ndarray | Tensor, sample_rate: int) -> Tensor:
        """Mix to mono, resample and pad or crop one clip to exactly ``num_samples`` samples.

        Parameters
        ----------
        waveform : numpy.ndarray or Tensor, shape (channels, time) or (time,), floating point in [-1, 1]
            One clip. ``soundfile.read`` returns ``(time, channels)``: pass its transpose.
        sample_rate : int
            Rate of ``waveform``, Hz.

        Returns
        -------
        Tensor, shape (num_samples,), float32
            ``num_samples = round(clip_seconds * cfg.sample_rate)``.

        Raises
        ------
        ValueError
            On a bad shape or sample rate.
        TypeError
            On integer samples.
        AudioError
            On an empty clip, one with NaN/Inf samples, or samples so large that float32 or the resampler
            overflows.
        """
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
            raise ValueError(f"prepare: 'sample_rate' must be a positive int. Got {sample_rate!r}.")
        tensor = torch.as_tensor(waveform)
        if not tensor.is_floating_point():
            raise TypeError(
                f"prepare: 'waveform' must hold floating-point samples. Got dtype {tensor.dtype}. "
                "Read audio with soundfile.read(path, dtype='float32')."
            )
        if tensor.ndim == 2:
            if tensor.shape[0] > 64 and tensor.shape[1] <= 8:  # looks like soundfile's (time, channels)
                raise ValueError(
                    f"prepare: 'waveform' must be (channels, time). Got shape "
                    f"{tuple(tensor.shape)}. soundfile returns (time, channels): pass its transpose."
                )
            tensor = tensor.mean(dim=0)
        elif tensor.ndim != 1:
            raise ValueError(f"prepare: 'waveform' must be (channels, time) or (time,). Got {tuple(tensor.shape)}.")
        if tensor.shape[0] == 0:
            raise AudioError("prepare: 'waveform' must hold at least one sample. Got an empty clip.")
        if not bool(torch.isfinite(tensor).all()):
            raise AudioError(f"prepare: 'waveform' must be finite. Got {_describe_non_finite(tensor)}.")
        tensor = tensor.to(torch.float32)
        if not bool(torch.isfinite(tensor).all()):  # float64 samples beyond float32's range (~3.4e38)
            raise AudioError(f"prepare: 'waveform' must fit float32 (|x| < 3.4e38). Got samples that overflow to "
                             f"Inf in float32: {_describe_non_finite(tensor)}.")
        with _one_thread():
            tensor = self._resample(tensor, int(sample_rate))
        if not bool(torch.isfinite(tensor).all()):
            peak = float(torch.as_tensor(waveform, dtype=torch.float64).abs().max())
            raise AudioError(f"prepare: resampled 'waveform' must be finite. Got an overflow: samples up to "
                             f"{peak:.3g} resample to {_describe_non_finite(tensor)}.")
        length = tensor.shape[-1]
        if length > self.num_samples:
            tensor = _CROPS[self.cfg.crop](tensor, self.num_samples)
        elif length < self.num_samples:
            tensor = _PADS[self.cfg.pad](tensor, self.num_samples)
        return tensor.contiguous()

    def log_mel(self, waveform: Tensor) -> Tensor:
        """Log-mel spectrogram ``log(mel + log_offset)`` of prepared clips.

        Parameters
        ----------
        waveform : Tensor, shape (..., time), float32
            Prepared clips (any leading batch dimensions).

        Returns
        -------
        Tensor, shape (..., n_mels, frames), float32
            (``(..., 1, time)``, the samples unchanged, with ``kind: waveform``).
        """
        if self.cfg.kind == "waveform":  # the prepared samples themselves, as one "band"
            return waveform.to(torch.float32).unsqueeze(-2)
        if waveform.device != self._mel.spectrogram.window.device:
            self._mel = self._mel.to(waveform.device)
        with torch.no_grad(), _one_thread():
            mel = self._mel(waveform.to(torch.float32))
            return torch.log(mel + self.cfg.log_offset)

    def __call__(self, waveform: np.ndarray | Tensor, sample_rate: int) -> Tensor:
        """Log-mel of one raw clip: ``log_mel(prepare(waveform, sample_rate))``, shape (n_mels, frames).

        Raises
        ------
        AudioError
            As :meth:`prepare`, and when the log-mel is not finite: samples whose power overflows float32
            (e.g. a float WAV holding 1e30, whose power 1e60 is Inf).
        """
        prepared = self.prepare(waveform, sample_rate)
        features = self.log_mel(prepared)
        if not bool(torch.isfinite(features).all()):
            peak = float(prepared.abs().max())
            raise AudioError(f"log_mel: features must be finite. Got {_describe_non_finite(features)}: the power "
                             f"of samples up to {peak:.3g} overflows float32. Rescale the audio to [-1, 1].")
        return features


def extract_features(
    load: Callable[[int], tuple[np.ndarray, int]],
    num_items: int,
    extractor: LogMelExtractor,
    *,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Log-mel of every item, each clip on its own; the first failing item stops it (see :func:`extract_clips`).

    Parameters
    ----------
    load : callable
        ``load(i) -> (waveform, sample_rate)`` for ``i`` in ``range(num_items)``; waveform as in
        :meth:`LogMelExtractor.prepare`.
    num_items : int
        Number of items.
    extractor : LogMelExtractor
        The front end.
    batch_size : int, optional
        Clips between two ``progress`` calls. Each clip's log-mel is computed on its own, so the values do not
        depend on it.
    progress : callable, optional
        Called as ``progress(done, num_items)`` after every ``batch_size`` clips and after the last.
    out : numpy.ndarray, optional
        Array of shape (num_items, n_mels, frames) to fill (e.g. a ``numpy.lib.format.open_memmap``); values are
        cast to its dtype. By default a new float32 array.

    Returns
    -------
    numpy.ndarray, shape (num_items, n_mels, frames)
        ``out`` when given, else float32.

    Raises
    ------
    AudioError
        When a clip is not finite or overflows (see :meth:`LogMelExtractor.__call__`); the message gives its index.
    """
    if isinstance(num_items, bool) or not isinstance(num_items, (int, np.integer)) or num_items < 0:
        raise ValueError(f"extract_features: 'num_items' must be an int >= 0. Got {num_items!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"extract_features: 'batch_size' must be an int >= 1. Got {batch_size!r}.")
    shape = (int(num_items), *extractor.output_shape)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape:
        raise ValueError(f"extract_features: 'out' must have shape {shape}. Got {out.shape}.")
    for i in range(num_items):
        try:
            out[i] = extractor(*load(i)).cpu().numpy()
        except AudioError as error:
            raise AudioError(f"extract_features: item {i}: {error}") from error
        if progress is not None and ((i + 1) % batch_size == 0 or i + 1 == num_items):
            progress(i + 1, num_items)
    return out


@dataclass(frozen=True)
class ClipFeatures:
    """What :func:`extract_clips` returns.

    Attributes
    ----------
    features : numpy.ndarray, shape (num_kept, n_mels, frames)
        Log-mel of the kept items, in item order, in the requested dtype.
    kept : numpy.ndarray, shape (num_kept,), int64
        Index of the item behind each row of ``features`` (ascending).
    skipped : list of (int, str)
        ``(index, reason)`` of every item left out, ascending; the reason holds no path of ``load``'s.
    """

    features: np.ndarray
    kept: np.ndarray
    skipped: list[tuple[int, str]]


def _reason(error: BaseException) -> str:
    if isinstance(error, AudioError):
        return audio_error_reason(error)  # read_audio's message without its path
    if isinstance(error, MemoryError):
        return "too large to decode in memory (MemoryError)"
    return f"{type(error).__name__}: {error}".removesuffix(".")


def extract_clips(
    load: Callable[[int], tuple[np.ndarray, int]],
    num_items: int,
    extractor: LogMelExtractor,
    *,
    dtype: str = "float32",
    progress: Callable[[int, int], None] | None = None,
    every: int = 64,
) -> ClipFeatures:
    """Log-mel of every item that loads and gives finite features; any other item is skipped with its reason.

    One item is decoded at a time and reduced to its log-mel at once, so memory holds one decoded file (whatever
    its length) plus the features kept so far (``num_items × n_mels × frames`` of ``dtype``, allocated once).

    Parameters
    ----------
    load : callable
        ``load(i) -> (waveform, sample_rate)`` for ``i`` in ``range(num_items)`` (e.g. :func:`read_audio` of a
        manifest row); it may raise any of :data:`CLIP_ERRORS` for a bad file.
    num_items : int
        Number of items.
    extractor : LogMelExtractor
        The front end.
    dtype : {"float16", "float32"}, optional
        dtype of the returned features.
    progress : callable, optional
        Called as ``progress(done, num_items)`` after every ``every`` items and after the last.
    every : int, optional
        Items between two ``progress`` calls.

    Returns
    -------
    ClipFeatures
        The kept rows, their item indices and the skipped items with their reasons.

    Notes
    -----
    A clip whose log-mel is finite in float32 but not in ``float16`` (beyond ±65504, which a log-mel of audio in
    [-1, 1] never reaches) is skipped too, so the store never holds a non-finite value.
    """
    if isinstance(num_items, bool) or not isinstance(num_items, (int, np.integer)) or num_items < 0:
        raise ValueError(f"extract_clips: 'num_items' must be an int >= 0. Got {num_items!r}.")
    if dtype not in _STORE_DTYPES:
        raise ValueError(f"extract_clips: 'dtype' must be one of {', '.join(_STORE_DTYPES)}. Got {dtype!r}.")
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"extract_clips: 'every' must be an int >= 1. Got {every!r}.")
    out = np.empty((int(num_items), *extractor.output_shape), dtype=dtype)
    kept: list[int] = []
    skipped: list[tuple[int, str]] = []
    for i in range(num_items):
        try:
            values = extractor(*load(i)).cpu().numpy()
            with np.errstate(over="ignore"):
                row = values.astype(dtype)
            if not np.isfinite(row).all():
                raise AudioError(f"features must fit {dtype}. Got values up to {float(np.abs(values).max()):.3g}. "
                                 "Rescale the audio to [-1, 1] or set features.dtype: float32.")
        except CLIP_ERRORS as error:
            skipped.append((i, _reason(error)))
        else:
            out[len(kept)] = row
            kept.append(i)
        if progress is not None and ((i + 1) % every == 0 or i + 1 == num_items):
            progress(i + 1, num_items)
    return ClipFeatures(features=out[: len(kept)], kept=np.asarray(kept, dtype=np.int64), skipped=skipped)


def cropped_share(durations: Iterable[float], clip_seconds: float) -> float:
    """Share of the audio that cropping every clip to ``clip_seconds`` discards.

    ``sum_i max(0, d_i - clip_seconds) / sum_i d_i`` over the clips' durations ``d_i`` (seconds); 0.0 when there
    is no audio. Padding discards nothing, so clips shorter than ``clip_seconds`` count as kept whole.
    """
    values = [float(d) for d in durations]
    total = sum(values)
    if total <= 0.0:
        return 0.0
    return sum(max(0.0, d - clip_seconds) for d in values) / total


def normalisation_stats(features: np.ndarray, rows: np.ndarray) -> tuple[float, float]:
    """Global mean and (population) standard deviation over the given rows, in float64, chunk by chunk.

    Chunks are combined with the pairwise update of Chan, Golub and LeVeque (1979), so memory stays at one chunk
    and there is no catastrophic cancellation.

    Parameters
    ----------
    features : numpy.ndarray, shape (num_samples, n_mels, frames), float16 or float32
        Raw log-mel (a memory map works).
    rows : numpy.ndarray, shape (num_rows,), int
        Rows to use, normally the train split.

    Returns
    -------
    mean, std : float
    """
    rows = np.asarray(rows)
    if rows.ndim != 1 or rows.size == 0 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"normalisation_stats: 'rows' must be a non-empty 1-D int array. Got {rows!r}.")
    if rows.min() < 0 or rows.max() >= len(features):
        raise ValueError(
            f"normalisation_stats: 'rows' must index features (0..{len(features) - 1}). "
            f"Got values in [{rows.min()}, {rows.max()}]."
        )
    rows = np.sort(rows)  # sequential reads from a memory map
    count, mean, m2 = 0, 0.0, 0.0
    for start in range(0, len(rows), _STATS_CHUNK):
        chunk = np.asarray(features[rows[start : start + _STATS_CHUNK]], dtype=np.float64)
        if not np.isfinite(chunk).all():
            raise DataError("normalisation_stats: 'features' must be finite. Got NaN or Inf in the given rows.")
        n_b = chunk.size
        mean_b = float(chunk.mean())
        m2_b = float(np.square(chunk - mean_b).sum())
        delta = mean_b - mean
        total = count + n_b
        mean += delta * n_b / total
        m2 += m2_b + delta * delta * count * n_b / total
        count = total
    std = math.sqrt(m2 / count)
    if std == 0.0:
        raise DataError(
            "normalisation_stats: 'std' must be > 0. Got 0.0: every feature value of the given rows is equal "
            "(silent audio?)."
        )
    return mean, std


# ------------------------------------------------------------------------------------------------------ store
def label_index(label_names_in_data: Iterable[str]) -> list[str]:
    """Sorted unique label names: natural order when every name is an integer ("2" < "10"), else lexicographic.

    Parameters
    ----------
    label_names_in_data : iterable of str
        Labels as they occur (duplicates allowed).

    Returns
    -------
    list of str
        ``label_idx`` of a sample is the position of its label in this list.
    """
    names = {str(name) for name in label_names_in_data}
    if names and all(re.fullmatch(r"[+-]?\d+", name) for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)


def _write_tmp(path: Path, write: Callable[[Any], None], mode: str) -> Path:
    """Write ``<path>.tmp`` and return it; the caller moves it in place with ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    kwargs: dict[str, Any] = {"newline": "", "encoding": "utf-8"} if "b" not in mode else {}
    with open(tmp, mode, **kwargs) as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    return tmp


def write_feature_store(
    folder: str | os.PathLike[str],
    features: np.ndarray,
    index_rows: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    mean: float,
    std: float,
    config_dict: Mapping[str, Any],
    dtype: str,
    skipped: Sequence[Mapping[str, Any]],
) -> Path:
    """Write ``features.npy``, ``index.csv`` and ``meta.json`` (docs/architecture.md, "Features").

    Every file goes to a temporary name first and is moved in place with ``os.replace`` once all three are
    written; ``meta.json`` is moved last.

    Parameters
    ----------
    folder : path
        Output folder (created).
    features : numpy.ndarray, shape (num_samples, n_mels, frames)
        Raw log-mel; row ``i`` belongs to ``index_rows[i]``.
    index_rows : sequence of mappings
        One per row, with keys ``id``, ``label``, ``speaker``, ``split`` (manifest rows).
    labels : sequence of str
        Label names in ``label_idx`` order (see :func:`label_index`); every row's label must be among them.
    mean, std : float
        Train-split statistics (see :func:`normalisation_stats`).
    config_dict : mapping
        The ``FeaturesConfig`` as a dict.
    dtype : {"float16", "float32"}
        Storage dtype of ``features.npy``.
    skipped : sequence of mappings
        Files left out, e.g. ``{"path": ..., "reason": ...}``.

    Returns
    -------
    pathlib.Path
        The folder.
    """
    if dtype not in _STORE_DTYPES:
        raise ValueError(f"write_feature_store: 'dtype' must be one of {', '.join(_STORE_DTYPES)}. Got {dtype!r}.")
    if features.ndim != 3:
        raise ValueError(
            f"write_feature_store: 'features' must be 3-D (num_samples, n_mels, frames). Got {features.shape}."
        )
    if len(index_rows) != len(features):
        raise ValueError(
            f"write_feature_store: 'index_rows' must have one row per feature row ({len(features)}). "
            f"Got {len(index_rows)}."
        )
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(f"write_feature_store: 'mean'/'std' must be finite with std > 0. Got {mean!r}/{std!r}.")
    label_names = [str(name) for name in labels]
    position = {name: i for i, name in enumerate(label_names)}
    if len(position) != len(label_names):
        raise ValueError(f"write_feature_store: 'labels' must be unique. Got {label_names!r}.")
    if missing := sorted({str(r["label"]) for r in index_rows} - set(position)):
        raise ValueError(f"write_feature_store: 'labels' must contain every row's label. Missing {missing!r}.")

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    stored = np.asarray(features, dtype=dtype)

    def write_csv(handle: Any) -> None:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(INDEX_COLUMNS)
        for i, r in enumerate(index_rows):
            label = str(r["label"])
            writer.writerow([i, r["id"], label, position[label], r["speaker"], r["split"]])

    meta = {
        "labels": label_names,
        "mean": float(mean),
        "std": float(std),
        "features": dict(config_dict),
        "num_samples": int(len(features)),
        "shape": [int(features.shape[1]), int(features.shape[2])],
        "skipped": [dict(s) for s in skipped],
    }
    tmp_files = [
        (_write_tmp(out / "features.npy", lambda h: np.save(h, stored), "wb"), out / "features.npy"),
        (_write_tmp(out / "index.csv", write_csv, "w"), out / "index.csv"),
        (_write_tmp(out / "meta.json", lambda h: json.dump(meta, h, indent=2), "w"), out / "meta.json"),
    ]
    for tmp, final in tmp_files:
        os.replace(tmp, final)
    return out


@dataclass
class FeatureStore:
    """Raw log-mel features with their index and metadata, as written by :func:`write_feature_store`.

    Attributes
    ----------
    features : numpy.ndarray, shape (num_samples, n_mels, frames), float16 or float32
        Raw log-mel (a read-only memory map when loaded with ``mmap=True``).
    ids : list of str
        Sample ids, one per row.
    labels : numpy.ndarray, shape (num_samples,), int64
        ``label_idx`` of every row.
    label_names : list of str
        Names in ``label_idx`` order.
    speakers : list of str
        Speaker or group id of every row.
    splits : numpy.ndarray, shape (num_samples,), str
        ``"train"`` or ``"test"`` per row.
    mean, std : float
        Train-split statistics used by :meth:`normalised`.
    meta : dict
        The whole ``meta.json``.
    """

    features: np.ndarray
    ids: list[str]
    labels: np.ndarray
    label_names: list[str]
    speakers: list[str]
    splits: np.ndarray
    mean: float
    std: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """Number of rows."""
        return int(self.features.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of label names."""
        return len(self.label_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(1, n_mels, frames)``: the model input of one sample."""
        return 1, int(self.features.shape[1]), int(self.features.shape[2])

    @classmethod
    def load(cls, folder: str | os.PathLike[str], mmap: bool = True) -> FeatureStore:
        """Read a feature store folder.

        Parameters
        ----------
        folder : path
            Folder holding ``features.npy``, ``index.csv`` and ``meta.json``.
        mmap : bool, optional
            Memory-map ``features.npy`` read-only instead of reading it into memory.

        Raises
        ------
        DataError
            When a file is missing or the three files disagree.
        """
        root = Path(folder)
        for name in ("features.npy", "index.csv", "meta.json"):
            if not (root / name).is_file():
                raise DataError(f"FeatureStore: '{name}' must exist in {str(root)!r}. Run the features stage.")
        meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
        features = np.load(root / "features.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
        with open(root / "index.csv", newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = tuple(next(reader, ()))
            records = list(reader)
        if header != INDEX_COLUMNS:
            raise DataError(f"FeatureStore: 'index.csv' header must be {','.join(INDEX_COLUMNS)}. Got {header!r}.")
        label_names = [str(name) for name in meta["labels"]]
        if len(records) != features.shape[0] or meta.get("num_samples") != features.shape[0]:
            raise DataError(
                f"FeatureStore: index.csv ({len(records)} rows), meta.json num_samples "
                f"({meta.get('num_samples')!r}) and features.npy ({features.shape[0]} rows) must agree."
            )
        for i, record in enumerate(records):
            try:
                consistent = len(record) == len(INDEX_COLUMNS) and int(record[0]) == i
                consistent = consistent and label_names[int(record[3])] == record[2]
            except (ValueError, IndexError):
                consistent = False
            if not consistent:
                raise DataError(
                    f"FeatureStore: index.csv row {i} must have row={i} and a label_idx naming its label. "
                    f"Got {record!r}."
                )
        return cls(
            features=features,
            ids=[r[1] for r in records],
            labels=np.array([int(r[3]) for r in records], dtype=np.int64),
            label_names=label_names,
            speakers=[r[4] for r in records],
            splits=np.array([r[5] for r in records], dtype=str),
            mean=float(meta["mean"]),
            std=float(meta["std"]),
            meta=meta,
        )

    def rows_of_split(self, name: str) -> np.ndarray:
        """Rows (int64, ascending) whose split is ``name`` (``"train"`` or ``"test"``)."""
        known = sorted({"train", "test", *self.splits.tolist()})
        if name not in known:
            raise ValueError(f"FeatureStore: 'name' must be one of {', '.join(known)}. Got {name!r}.")
        return np.flatnonzero(self.splits == name).astype(np.int64)

    def normalised(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """Normalised features ``(x - mean) / std`` of the given rows, with a channel axis.

        Parameters
        ----------
        rows : numpy.ndarray, shape (num_rows,), int
            Feature-store rows, in the order wanted.

        Returns
        -------
        numpy.ndarray, shape (num_rows, 1, n_mels, frames), float32
        """
        index = np.asarray(rows, dtype=np.int64)
        raw = np.asarray(self.features[index], dtype=np.float32)
        return ((raw - np.float32(self.mean)) / np.float32(self.std))[:, None]
