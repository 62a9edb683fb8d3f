"""Log-mel front end and feature extraction; the on-disk store they fill is :mod:`fedcore.data.store`.

Pipeline per clip (torchaudio, the front end of FedAudio, arXiv:2210.15707, and of PAPERS.md section 7)::

    waveform (channels, time) @ sr  ->  mono (mean over channels)  ->  resample to cfg.sample_rate
    ->  pad / crop to T = round(clip_seconds * sample_rate) samples
    ->  mel = MelSpectrogram(n_fft, win_length, hop_length, f_min, f_max, n_mels, power=2)(x)
    ->  log_mel = log(mel + log_offset)                                 shape (n_mels, 1 + T // hop_length)

The store (``features.npy``, ``index.csv``, ``meta.json``; see docs/architecture.md, "Features") keeps the raw
log-mel; :meth:`FeatureStore.normalised` applies ``(x - mean) / std`` with the train split's global statistics. Its
names are imported here too, so ``from fedcore.data.features import FeatureStore`` keeps working; code that only
reads the store imports :mod:`fedcore.data.store`, which needs numpy and not torch.

Bit-identical features. Each clip is resampled and turned into a log-mel on its own, on one intra-op thread: the
convolution behind the resampler splits its work by thread count (three threads or more change the last bits of
about a third of FSDD's clips), and a batch would make a clip's values depend on its neighbours. So a clip's
features depend only on the clip and the settings, not on the caller's thread count, batch size or which other
files were skipped. Across CPUs, see ``flows/__init__.py`` for the library pins.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torchaudio
from torch import Tensor

from fedcore.config import FeaturesConfig
from fedcore.data.audio import audio_error_reason
from fedcore.data.store import (
    INDEX_COLUMNS,
    STORE_DTYPES,
    FeatureStore,
    cropped_share,
    label_index,
    normalisation_stats,
    write_feature_store,
)
from fedcore.errors import AudioError

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
    if dtype not in STORE_DTYPES:
        raise ValueError(f"extract_clips: 'dtype' must be one of {', '.join(STORE_DTYPES)}. Got {dtype!r}.")
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
