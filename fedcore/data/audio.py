"""Probe and read audio files with soundfile (libsndfile), refusing damaged files with a clear reason.

libsndfile is lenient: a WAV whose header promises more samples than the file holds is read without error,
just shorter. For RIFF/RIFX WAV files the chunk list is therefore parsed here and the ``data`` chunk size is
compared with the bytes the file really holds; for every format, :func:`read_audio` also compares the frames
read with the frames declared. Every refusal raises :class:`~fedcore.errors.AudioError` whose message starts
with the path and one of the reasons ``missing``, ``empty``, ``no audio``, ``not an audio file``,
``truncated`` or ``unreadable``.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf

from fedcore.errors import AudioError

__all__ = [
    "MAX_PEAK", "AudioInfo", "audio_error_reason", "inspect_audio", "probe_audio", "probe_handle", "read_audio",
]

# A data chunk size of 0xFFFFFFFF (or 0 in some streaming writers) means "unknown, read to the end".
_UNKNOWN_SIZES = (0xFFFFFFFF,)
_FORMAT_NOT_RECOGNISED = "format not recognised"
_REASON_SEP = " cannot be used: "
_DECODE_BLOCK = 1 << 16  # frames decoded at a time by inspect_audio (bounds its memory)

MAX_PEAK = 1e6
"""Largest sample magnitude accepted. Float audio lies in [-1, 1] (some tools store int16-scaled floats, up to
32768); a peak above this overflows float32 once squared in a power spectrogram, so the file is refused."""


@dataclass(frozen=True)
class AudioInfo:
    """What the header of an audio file says.

    Attributes
    ----------
    frames : int
        Samples per channel (> 0 for a probed file).
    sample_rate : int
        Sample rate, Hz.
    channels : int
        Number of channels.
    """

    frames: int
    sample_rate: int
    channels: int

    @property
    def duration(self) -> float:
        """Length in seconds, ``frames / sample_rate``."""
        return self.frames / self.sample_rate


def _fail(path: Path | str, reason: str) -> AudioError:
    return AudioError(f"audio: '{path}'{_REASON_SEP}{reason}.")


def audio_error_reason(error: AudioError) -> str:
    """Return the reason of an :class:`AudioError` raised here, without the path (``"truncated: ..."``)."""
    message = str(error)
    return message.split(_REASON_SEP, 1)[-1].removesuffix(".")


def _check_wav_chunks(path: Path, size: int) -> None:
    """Compare the ``data`` chunk size of a RIFF/RIFX WAV file with the bytes the file holds."""
    with path.open("rb") as handle:
        _check_wav_handle(handle, size, path)


def _check_wav_handle(handle: BinaryIO, size: int, path: Path | str) -> None:
    """Compare the ``data`` chunk size of a RIFF/RIFX WAV with the ``size`` bytes ``handle`` holds.

    Does nothing for files that are not RIFF/RIFX WAVE (RF64 keeps its sizes elsewhere and is left to
    libsndfile).
    """
    handle.seek(0)
    head = handle.read(12)
    if len(head) < 12 or head[8:12] != b"WAVE" or head[:4] not in (b"RIFF", b"RIFX"):
        return
    endian = "<" if head[:4] == b"RIFF" else ">"
    block_align = 0
    offset = 12
    while True:
        handle.seek(offset)
        header = handle.read(8)
        if len(header) < 8:
            raise _fail(path, f"truncated: WAV header ends after {size} bytes without a 'data' chunk")
        chunk_id = header[:4]
        (chunk_size,) = struct.unpack(endian + "I", header[4:])
        body = offset + 8
        if chunk_id == b"fmt ":
            fmt = handle.read(min(chunk_size, 16))
            if len(fmt) >= 14:
                (block_align,) = struct.unpack(endian + "H", fmt[12:14])
        elif chunk_id == b"data":
            if chunk_size in _UNKNOWN_SIZES:
                return
            held = size - body
            if chunk_size > held:
                if block_align > 0:
                    declared, holds, unit = chunk_size // block_align, max(held, 0) // block_align, "frames"
                else:
                    declared, holds, unit = chunk_size, max(held, 0), "bytes of audio"
                raise _fail(path, f"truncated: header declares {declared} {unit}, file holds {holds}")
            return
        offset = body + chunk_size + (chunk_size & 1)  # chunks are padded to an even size


def _header(source: str | BinaryIO, path: Path | str, size: int) -> AudioInfo:
    """``sf.info`` of a path or an open binary file, turned into :class:`AudioInfo` or an :class:`AudioError`."""
    try:
        info = sf.info(source)
    except OSError as error:
        raise _fail(path, f"unreadable: {error.strerror or error}") from None
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as error:
        message = str(error).split(": ", 1)[-1].rstrip(".")
        if _FORMAT_NOT_RECOGNISED in message.lower():
            raise _fail(path, f"not an audio file ({size} bytes; libsndfile: {message})") from None
        raise _fail(path, f"unreadable: libsndfile: {message}") from None
    if info.frames <= 0:
        raise _fail(path, f"no audio: zero frames ({size} bytes)")
    if info.samplerate <= 0 or info.channels <= 0:
        raise _fail(path, f"unreadable: sample rate {info.samplerate} Hz, {info.channels} channels")
    return AudioInfo(frames=int(info.frames), sample_rate=int(info.samplerate), channels=int(info.channels))


def _check_length(path: Path | str, info: AudioInfo, max_seconds: float | None, limit_name: str) -> None:
    if max_seconds is not None and info.duration > max_seconds:
        raise _fail(path, f"too long: {info.duration:.1f} s, above the limit of {max_seconds:g} s ({limit_name})")


def _sample_problem(num_nan: int, num_inf: int, peak: float) -> str | None:
    """The reason to refuse decoded samples, or None when they are usable."""
    if num_nan or num_inf:
        return f"non-finite: {num_nan} NaN and {num_inf} Inf samples"
    if peak > MAX_PEAK:
        return f"out of range: peak |sample| {peak:.3g} > {MAX_PEAK:g} (float audio lies in [-1, 1])"
    return None


def _count_bad(block: np.ndarray) -> tuple[int, int, float]:
    """NaN count, Inf count and the finite peak magnitude of a float block."""
    finite = np.isfinite(block)
    if finite.all():
        return 0, 0, float(np.abs(block).max(initial=0.0))
    num_nan = int(np.isnan(block).sum())
    return num_nan, int(block.size - finite.sum()) - num_nan, float(np.abs(block[finite]).max(initial=0.0))


def probe_audio(path: str | Path) -> AudioInfo:
    """Read the header of an audio file and check that it holds audio.

    Parameters
    ----------
    path : str or Path
        Any format libsndfile reads (WAV, FLAC, OGG, ...).

    Returns
    -------
    AudioInfo
        Frames, sample rate and channels; ``frames > 0``.

    Raises
    ------
    AudioError
        Missing, zero-length, not audio, truncated (WAV data chunk longer than the file), zero frames, or
        otherwise unreadable; the message names the path and the reason.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise _fail(path, "missing: no such file") from None
    except OSError as error:
        raise _fail(path, f"unreadable: {error.strerror or error}") from None
    if not path.is_file():
        raise _fail(path, "unreadable: not a regular file")
    if size == 0:
        raise _fail(path, "empty: zero-length file (0 bytes)")
    try:
        _check_wav_chunks(path, size)
    except OSError as error:
        raise _fail(path, f"unreadable: {error.strerror or error}") from None
    return _header(str(path), path, size)


def probe_handle(
    handle: BinaryIO, path: str | Path, *, max_seconds: float | None = None, limit_name: str = "max_seconds"
) -> AudioInfo:
    """Check the header of an open, seekable audio file, reading only the header.

    Parameters
    ----------
    handle : binary file
        Open for reading, seekable; left at an unspecified position.
    path : str or Path
        Name used in messages only.
    max_seconds : float, optional
        Refuse files longer than this.
    limit_name : str
        How messages name ``max_seconds``.

    Returns
    -------
    AudioInfo
        Frames, sample rate and channels; ``frames > 0``.

    Raises
    ------
    AudioError
        As :func:`probe_audio`, and ``too long``.
    """
    size = handle.seek(0, io.SEEK_END)
    if size == 0:
        raise _fail(path, "empty: zero-length file (0 bytes)")
    _check_wav_handle(handle, size, path)
    handle.seek(0)
    info = _header(handle, path, size)
    _check_length(path, info, max_seconds, limit_name)
    return info


def inspect_audio(
    data: bytes, path: str | Path, *, max_seconds: float | None = None, limit_name: str = "max_seconds"
) -> AudioInfo:
    """Check the bytes of an audio file: header, declared length, and every sample, decoded once.

    Parameters
    ----------
    data : bytes
        The whole file, as read.
    path : str or Path
        Name used in messages only; nothing is read from it.
    max_seconds : float, optional
        Refuse files longer than this (checked from the header, before decoding).
    limit_name : str
        How messages name ``max_seconds`` (e.g. ``"download.max_audio_seconds"``).

    Returns
    -------
    AudioInfo
        Frames, sample rate and channels of a usable file.

    Raises
    ------
    AudioError
        As :func:`probe_audio`; ``too long``; ``truncated`` when fewer frames decode than the header declares;
        ``non-finite`` for NaN or Inf samples; ``out of range`` for a peak above :data:`MAX_PEAK`.
    """
    buffer = io.BytesIO(data)
    info = probe_handle(buffer, path, max_seconds=max_seconds, limit_name=limit_name)
    buffer.seek(0)
    frames, num_nan, num_inf, peak = 0, 0, 0, 0.0
    try:
        with sf.SoundFile(buffer) as handle:
            for block in handle.blocks(blocksize=_DECODE_BLOCK, dtype="float32", always_2d=True):
                frames += block.shape[0]
                nan, inf, top = _count_bad(block)
                num_nan, num_inf, peak = num_nan + nan, num_inf + inf, max(peak, top)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OSError) as error:
        raise _fail(path, f"unreadable: libsndfile: {str(error).rstrip('.')}") from None
    if frames != info.frames:
        raise _fail(path, f"truncated: header declares {info.frames} frames, file holds {frames}")
    if (problem := _sample_problem(num_nan, num_inf, peak)) is not None:
        raise _fail(path, problem)
    return info


def read_audio(
    path: str | Path, *, max_seconds: float | None = None, limit_name: str = "max_seconds"
) -> tuple[np.ndarray, int]:
    """Read a whole audio file as float32, refusing NaN, Inf and out-of-range samples.

    Parameters
    ----------
    path : str or Path
        Any format libsndfile reads.
    max_seconds : float, optional
        Refuse files longer than this (checked from the header, before reading).
    limit_name : str
        How messages name ``max_seconds``.

    Returns
    -------
    waveform : np.ndarray
        float32, shape ``(channels, time)``, values in [-1, 1] for integer PCM; every value finite.
    sample_rate : int
        Hz.

    Raises
    ------
    AudioError
        As :func:`probe_audio`; when fewer frames can be read than the header declares; ``too long``;
        ``non-finite`` (NaN or Inf samples) and ``out of range`` (peak above :data:`MAX_PEAK`).
    """
    path = Path(path)
    info = probe_audio(path)
    _check_length(path, info, max_seconds, limit_name)
    try:
        data, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as error:
        raise _fail(path, f"unreadable: {error}") from None
    if data.shape[0] != info.frames:
        raise _fail(path, f"truncated: header declares {info.frames} frames, file holds {data.shape[0]}")
    if (problem := _sample_problem(*_count_bad(data))) is not None:
        raise _fail(path, problem)
    waveform = np.ascontiguousarray(data.T, dtype=np.float32)
    return waveform, int(sample_rate)
