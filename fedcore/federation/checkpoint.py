"""Round checkpoints and final-model files, written atomically in the safetensors format, and verified on resume.

A :class:`Checkpointer` owns one folder::

    round_0007.safetensors   global state ("state/<key>") and extra tensors ("extra/<key>") after round 7
    round_0008.safetensors
    latest.json              the index: the kept rounds, each with its file name and sha256, and the newest one

Each round file is self-describing: its safetensors header holds the run's fingerprint, the round and the
resume metadata (metric history, ...) as JSON, and a sha256 over the rest of the header and the tensor bytes
(the *seal*), so a round file can be checked, and resumed, without the index. The index records each kept file's
sha256 too, and carries a sha256 of its own content.

Each file is first written to ``<name>.tmp``, flushed and fsynced, then moved over the final name with
:func:`os.replace`, so a crash leaves either the old or the new file, never a partial one; ``latest.json`` is
replaced only after the tensor file it names is durable. Leftover ``*.tmp`` files are never loaded and are removed
by the next save. Loading uses safetensors only (no pickle, so no code runs on load).

On resume (:meth:`Checkpointer.load_latest`) the newest round whose file verifies (sha256 recorded in the index,
seal, fingerprint and round in its header, and optionally a reference state's keys, shapes, dtypes and finite
values, and a caller's check such as :meth:`~fedcore.federation.client_store.ClientStore.verify`) is used; every
file skipped is reported, and no file is deleted. If files are there but none verifies,
:class:`~fedcore.errors.CheckpointError` names the folder and the fix.

The fingerprint (:func:`fingerprint`, a sha256 of the canonical JSON of whatever determines the run: configs,
data hashes) ties a folder to one run; a folder written under another fingerprint is cleared on load, and the
report says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from fedcore.aggregation.state import StateDict
from fedcore.errors import CheckpointError

LATEST = "latest.json"
#: Version of the ``latest.json`` layout written by :meth:`Checkpointer.save` (files without it are older).
INDEX_FORMAT = 2
_ROUND_FILE = re.compile(r"^round_(\d{4,})\.safetensors$")
_STATE_PREFIX, _EXTRA_PREFIX = "state/", "extra/"
_TMP_SUFFIX = ".tmp"
# Header metadata keys of a sealed file. A file is *unsealed* (written before seals existed) only when it has
# neither key, so a single damaged byte cannot make a sealed file pass as an unsealed one.
SEAL_FORMAT_KEY, SEAL_DIGEST_KEY = "fedcore.format", "fedcore.sha256"
_SEAL_FORMAT = "1"
_META_KEY = "meta"
_INDEX_DIGEST_KEY = "index_sha256"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: Largest header read (safetensors' own limit).
_MAX_HEADER = 100_000_000

logger = logging.getLogger("fedcore.federation")


# ---------------------------------------------------------------------------------------------- file helpers
def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, chunks: Iterable[bytes | memoryview]) -> str:
    """Write ``chunks`` to ``path`` via ``path.tmp`` + fsync + :func:`os.replace`; return the file's sha256."""
    path = Path(path)
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    digest = hashlib.sha256()
    with open(tmp, "wb") as handle:
        for chunk in chunks:
            handle.write(chunk)
            digest.update(chunk)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_folder(path.parent)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via ``path.tmp`` + fsync + :func:`os.replace` (never a partial file)."""
    _atomic_write(Path(path), [data])


def _cpu_tensors(prefix: str, tensors: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{where}: entry {key!r} must be a torch.Tensor. Got {type(tensor).__name__}.")
        # own contiguous CPU copies: safetensors refuses shared or strided storage
        out[prefix + key] = tensor.detach().to("cpu", copy=True).contiguous()
    return out


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file (one read; tensors own their memory)."""
    data = path.read_bytes()
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_size])
    return safetensors.torch.load(data), dict(header.get("__metadata__") or {})


# ---------------------------------------------------------------------------------------------- seals
class DamagedFileError(ValueError):
    """A safetensors file that fails its checks; the message says what is wrong (truncated, seal, ...)."""


class _ForeignError(DamagedFileError):
    """A sealed round file of another fingerprint."""


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _content_digest(header: Mapping[str, Any], payload: bytes | memoryview) -> str:
    """Sha256 over the canonical JSON of ``header`` without the seal's digest, and the tensor bytes."""
    metadata = {k: v for k, v in dict(header.get("__metadata__") or {}).items() if k != SEAL_DIGEST_KEY}
    canonical = _canonical({**header, "__metadata__": metadata})
    digest = hashlib.sha256(len(canonical).to_bytes(8, "little"))
    digest.update(canonical)
    digest.update(payload)
    return digest.hexdigest()


def sealed_chunks(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> list[bytes | memoryview]:
    """Bytes of a safetensors file of ``tensors`` whose header carries ``metadata`` and a seal.

    The seal is a sha256 over the canonical header (without the digest itself) and the tensor bytes, stored in
    the header under ``"fedcore.sha256"`` next to ``"fedcore.format"``; :func:`unseal` checks it.

    Parameters
    ----------
    tensors : Mapping of str to Tensor
        Contiguous CPU tensors (see ``_cpu_tensors``).
    metadata : Mapping of str to str
        Header metadata; the two seal keys are reserved.

    Returns
    -------
    list of bytes
        The file's bytes, in order (length prefix and header, then the tensor bytes), to write without a copy.
    """
    blob = safetensors.torch.save(dict(tensors), metadata={**metadata, SEAL_FORMAT_KEY: _SEAL_FORMAT})
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    payload = memoryview(blob)[8 + size :]
    header["__metadata__"][SEAL_DIGEST_KEY] = _content_digest(header, payload)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors aligns the tensor bytes to 8
    return [len(text).to_bytes(8, "little") + text, payload]


def unseal(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str], bool]:
    """Check and read a safetensors file written by :func:`sealed_chunks` (or an unsealed, older one).

    Parameters
    ----------
    data : bytes
        The whole file.

    Returns
    -------
    tensors : dict of str to Tensor
        CPU tensors owning their memory (safetensors, no code execution).
    metadata : dict of str to str
        Header metadata without the seal's keys.
    sealed : bool
        False for a file with neither seal key (written before seals existed): it was not checked.

    Raises
    ------
    DamagedFileError
        If the file is truncated, its header is not valid, its seal is incomplete or differs from its content.
    """
    if len(data) < 8:
        raise DamagedFileError(f"it has {len(data)} bytes, fewer than the 8 of a safetensors length prefix "
                               "(truncated)")
    size = int.from_bytes(data[:8], "little")
    if size > min(len(data) - 8, _MAX_HEADER):
        raise DamagedFileError(f"its length prefix announces a header of {size} bytes, but the file has "
                               f"{len(data)} bytes (truncated, or not a safetensors file)")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, ValueError) as error:
        raise DamagedFileError(f"its header is not valid JSON ({error}): the header is damaged") from error
    if not isinstance(header, dict):
        raise DamagedFileError(f"its header is a JSON {type(header).__name__}, not an object: not a safetensors "
                               "file")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise DamagedFileError("its header's '__metadata__' is not a map of strings: the header is damaged")
    payload = memoryview(data)[8 + size :]
    expected = _payload_size(header)
    if expected is not None and len(payload) < expected:
        raise DamagedFileError(f"its tensors need {expected} bytes after the header, but only {len(payload)} "
                               "are there (truncated)")
    has_format, has_digest = SEAL_FORMAT_KEY in metadata, SEAL_DIGEST_KEY in metadata
    sealed = has_format or has_digest
    if sealed:
        if not (has_format and has_digest):
            missing = SEAL_DIGEST_KEY if has_format else SEAL_FORMAT_KEY
            raise DamagedFileError(f"its header lacks the seal's {missing!r} entry: the header is damaged")
        if metadata[SEAL_FORMAT_KEY] != _SEAL_FORMAT:
            raise DamagedFileError(f"its seal format is {metadata[SEAL_FORMAT_KEY]!r}, not {_SEAL_FORMAT!r}: "
                                   "written by another version of fedcore, or the header is damaged")
        if _content_digest(header, payload) != metadata[SEAL_DIGEST_KEY]:
            raise DamagedFileError("its content does not match the sha256 sealed in its header: the header or "
                                   "the tensor bytes changed after it was written (e.g. a flipped bit)")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as error:  # noqa: BLE001 -- any parse failure of an untrusted file is "damaged"
        raise DamagedFileError(f"it is not a valid safetensors file ({type(error).__name__}: {error})") from error
    kept = {k: v for k, v in metadata.items() if k not in (SEAL_FORMAT_KEY, SEAL_DIGEST_KEY)}
    return tensors, kept, sealed


def _payload_size(header: Mapping[str, Any]) -> int | None:
    """Bytes the header's tensors need after it (the largest end offset); None if the header is malformed."""
    try:
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (TypeError, KeyError, IndexError, ValueError):
        return None
    return max(ends, default=0)


def state_problems(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], *, finite: bool = True
) -> list[str]:
    """What differs between ``state`` and ``reference`` (keys, shapes, dtypes), and non-finite values.

    Parameters
    ----------
    state : Mapping of str to Tensor
        The state read back (e.g. from a checkpoint).
    reference : Mapping of str to Tensor
        A state of the model being resumed (e.g. a fresh model's ``state_dict()``); only its keys, shapes and
        dtypes are used.
    finite : bool, default True
        Also report floating-point entries of ``state`` holding NaN or infinite values.

    Returns
    -------
    list of str
        One line per problem; empty when ``state`` fits ``reference``.
    """
    problems = []
    missing, unexpected = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    if missing or unexpected:
        problems.append(f"its keys differ from the model's: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                        f", unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key in sorted(set(state) & set(reference)):
        got, want = state[key], reference[key]
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"{key!r} has shape {tuple(got.shape)}, the model's is {tuple(want.shape)}")
        if got.dtype != want.dtype:
            problems.append(f"{key!r} has dtype {got.dtype}, the model's is {want.dtype}")
    if finite:
        for key in sorted(state):
            tensor = state[key]
            if (tensor.is_floating_point() or tensor.is_complex()) and tensor.numel():
                bad = int((~torch.isfinite(tensor)).sum())
                if bad:
                    problems.append(f"{key!r} holds {bad} non-finite value{'s' if bad > 1 else ''} (NaN or inf)")
    return problems


def save_state(
    path: Path | str, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a state dict to a safetensors file, atomically.

    Parameters
    ----------
    path : Path or str
        Target file; its folder is created.
    state : Mapping of str to Tensor
        Tensors to store (copied to CPU, contiguous).
    metadata : Mapping of str to str, optional
        String metadata stored in the file header.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = _cpu_tensors("", state, "save_state")
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=dict(metadata) if metadata else None))


def load_state(path: Path | str) -> StateDict:
    """Read a state dict written by :func:`save_state` (CPU tensors; safetensors, no code execution)."""
    return _read_safetensors(Path(path))[0]


# ---------------------------------------------------------------------------------------------- fingerprint
def file_digest(paths: Sequence[Path]) -> str:
    """Sha256 (hex) over the names and bytes of ``paths`` (a missing file counts as empty): the data of a run."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        digest.update(str(path.name).encode())
        if path.exists():
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return value.as_posix()
    raise TypeError(f"fingerprint: values must be JSON-serialisable. Got {value!r} of type {type(value).__name__}.")


def fingerprint(obj: Mapping[str, Any] | Any) -> str:
    """Sha256 (hex) of the canonical JSON of ``obj``: sorted keys, no spaces, UTF-8, no NaN.

    Parameters
    ----------
    obj : Mapping or dataclass
        What identifies a run (configs as dicts or dataclasses, data hashes). Tuples count as lists.

    Returns
    -------
    str
        64 hex characters; equal for equal content, whatever the key order.

    Raises
    ------
    TypeError
        If a value is not JSON-serialisable.
    ValueError
        If a float is NaN or infinite.
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------- index
@dataclasses.dataclass(frozen=True)
class _Index:
    """What a readable ``latest.json`` says."""

    fingerprint: str
    latest: int
    sha256: dict[int, str]  # kept round -> sha256 of its file (empty for an index written before checksums)
    meta: dict[str, Any]
    legacy: bool  # written before checksums: its round files are unsealed and only ``latest`` has a meta


def _index_digest(index: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in index.items() if k != _INDEX_DIGEST_KEY})).hexdigest()


def _parse_index(raw: Any) -> _Index:
    """Check a decoded ``latest.json``; raise :class:`DamagedFileError` saying what is wrong."""
    if not isinstance(raw, dict):
        raise DamagedFileError(f"it holds a JSON {type(raw).__name__}, not an object")
    new_keys = ("format", _INDEX_DIGEST_KEY, "rounds")
    legacy = not any(key in raw for key in new_keys)
    if not legacy:
        if not all(key in raw for key in new_keys):
            raise DamagedFileError(f"it lacks {[k for k in new_keys if k not in raw]}")
        if raw[_INDEX_DIGEST_KEY] != _index_digest(raw):
            raise DamagedFileError("its content does not match its own sha256 (changed after it was written)")
        if raw["format"] != INDEX_FORMAT:
            raise DamagedFileError(f"its format is {raw['format']!r}, not {INDEX_FORMAT}")
    fp, latest, meta = raw.get("fingerprint"), raw.get("round"), raw.get("meta", {})
    if not isinstance(fp, str) or isinstance(latest, bool) or not isinstance(latest, int) or latest < 0 \
            or raw.get("file") != Checkpointer.file_name(latest) or not isinstance(meta, dict):
        raise DamagedFileError("its 'fingerprint', 'round', 'file' or 'meta' entry is malformed")
    sha256: dict[int, str] = {}
    if not legacy:
        rounds = raw["rounds"]
        if not isinstance(rounds, list):
            raise DamagedFileError("its 'rounds' entry is not a list")
        for entry in rounds:
            if not isinstance(entry, dict) or isinstance(entry.get("round"), bool) \
                    or not isinstance(entry.get("round"), int) or entry["round"] < 0 \
                    or entry.get("file") != Checkpointer.file_name(entry["round"]) \
                    or not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
                raise DamagedFileError(f"its 'rounds' entry {entry!r} is malformed")
            sha256[entry["round"]] = entry["sha256"]
        if latest not in sha256:
            raise DamagedFileError(f"its newest round {latest} is not among its 'rounds'")
    return _Index(fingerprint=fp, latest=latest, sha256=sha256, meta=meta, legacy=legacy)


# ---------------------------------------------------------------------------------------------- checkpointer
#: What :meth:`Checkpointer.load_latest` returns: ``(round, global_state, extra_tensors, meta)``.
Checkpoint = tuple[int, StateDict, dict[str, torch.Tensor], dict[str, Any]]


class Checkpointer:
    """Keep the last ``keep`` verified round checkpoints of one run in ``folder``.

    Parameters
    ----------
    folder : Path or str
        Folder of the checkpoints (created on first save).
    fingerprint : str
        Identity of the run (see :func:`fingerprint`); checkpoints of other fingerprints are never loaded.
    keep : int, default 2
        Round files kept after each save (the newest ones), so that a resume can fall back to an older round when
        the newest one is damaged. Pass ``oldest_kept=kept_rounds()[0]`` to
        :meth:`~fedcore.federation.client_store.ClientStore.commit` so the client store keeps the same rounds.
    """

    def __init__(self, folder: Path | str, fingerprint: str, *, keep: int = 2) -> None:
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError(f"Checkpointer: 'fingerprint' must be a non-empty str. Got {fingerprint!r}.")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"Checkpointer: 'keep' must be an int >= 1. Got {keep!r}.")
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.keep = keep

    def __repr__(self) -> str:
        return f"Checkpointer({str(self.folder)!r}, {self.fingerprint[:12]!r}..., keep={self.keep})"

    @staticmethod
    def file_name(server_round: int) -> str:
        """Name of the checkpoint file of ``server_round`` (``round_0007.safetensors``)."""
        return f"round_{server_round:04d}.safetensors"

    def round_files(self) -> dict[int, Path]:
        """Complete round files present in the folder, by round (``*.tmp`` leftovers and folders are not listed)."""
        if not self.folder.is_dir():
            return {}
        found = {}
        for path in self.folder.iterdir():
            if (match := _ROUND_FILE.match(path.name)) and path.name == self.file_name(int(match.group(1))) \
                    and path.is_file():
                found[int(match.group(1))] = path
        return dict(sorted(found.items()))

    def _leftovers(self) -> list[Path]:
        """Leftovers of interrupted writes of this checkpointer (``round_*.safetensors.tmp``, ``latest.json.tmp``)."""
        if not self.folder.is_dir():
            return []
        return sorted(path for path in self.folder.glob("*" + _TMP_SUFFIX)
                      if (target := path.name[: -len(_TMP_SUFFIX)]) == LATEST or _ROUND_FILE.match(target))

    def _read_index(self) -> tuple[_Index | None, str | None]:
        """The folder's index, or None and why it cannot be used (None, None when there is none)."""
        path = self.folder / LATEST
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            return None, None
        except OSError as error:
            return None, f"cannot be read ({error})"
        try:
            return _parse_index(json.loads(text)), None
        except (UnicodeDecodeError, ValueError) as error:  # DamagedFileError is a ValueError
            reason = str(error) if isinstance(error, DamagedFileError) else f"it is not valid JSON ({error})"
            return None, reason

    def kept_rounds(self) -> list[int]:
        """Rounds of the kept checkpoints, ascending (from the index; the round files present if it is unusable).

        After :meth:`save` of round ``r`` with ``keep=2`` this is ``[r - 1, r]`` (``[r]`` after the first save).
        """
        index, _ = self._read_index()
        if index is not None and not index.legacy and index.fingerprint == self.fingerprint:
            return sorted(index.sha256)
        return list(self.round_files())

    # ------------------------------------------------------------------------------------------ save
    def save(
        self,
        server_round: int,
        global_state: Mapping[str, torch.Tensor],
        extra_tensors: Mapping[str, torch.Tensor] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write the checkpoint of ``server_round`` and record it, with its sha256, in ``latest.json``.

        The round file's header holds the fingerprint, the round, ``meta`` and a seal, so the file can be
        verified and resumed even without ``latest.json``. The newest ``keep`` rounds up to ``server_round`` stay;
        older ones, later ones (a run resumed from an earlier round), unverifiable ones and ``*.tmp`` leftovers
        are removed.

        Parameters
        ----------
        server_round : int
            Round just finished (>= 0; 0 can hold the initial model).
        global_state : Mapping of str to Tensor
            Global model state after the round.
        extra_tensors : Mapping of str to Tensor, optional
            Other tensors to resume with (e.g. a server optimiser's moments).
        meta : Mapping, optional
            JSON-serialisable data to resume with (metric history, best round, ...).

        Returns
        -------
        Path
            The round file written.

        Raises
        ------
        ValueError
            If ``server_round`` is negative.
        TypeError
            If ``meta`` is not JSON-serialisable or a value is not a tensor.
        """
        if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
            raise ValueError(f"Checkpointer.save: 'server_round' must be an int >= 0. Got {server_round!r}.")
        meta_dict = dict(meta or {})
        try:
            meta_json = json.dumps(meta_dict, sort_keys=True)
        except (TypeError, ValueError) as error:
            raise TypeError(f"Checkpointer.save: 'meta' must be JSON-serialisable. Got {meta_dict!r}.") from error
        tensors = _cpu_tensors(_STATE_PREFIX, global_state, "Checkpointer.save")
        tensors.update(_cpu_tensors(_EXTRA_PREFIX, extra_tensors or {}, "Checkpointer.save"))
        self.folder.mkdir(parents=True, exist_ok=True)
        previous = self._previous_rounds(server_round)
        name = self.file_name(server_round)
        header = {"fingerprint": self.fingerprint, "round": str(server_round), _META_KEY: meta_json}
        previous[server_round] = _atomic_write(self.folder / name, sealed_chunks(tensors, header))
        kept = sorted(previous)[-self.keep :]
        index: dict[str, Any] = {
            "format": INDEX_FORMAT, "fingerprint": self.fingerprint, "round": server_round, "file": name,
            "sha256": previous[server_round],
            "rounds": [{"round": r, "file": self.file_name(r), "sha256": previous[r]} for r in kept],
            "meta": json.loads(meta_json),
        }
        index[_INDEX_DIGEST_KEY] = _index_digest(index)
        atomic_write_bytes(self.folder / LATEST, json.dumps(index, indent=1, sort_keys=True).encode("utf-8"))
        for r, path in self.round_files().items():
            if r not in kept:
                path.unlink(missing_ok=True)
        for path in self._leftovers():
            path.unlink(missing_ok=True)
        return self.folder / name

    def _previous_rounds(self, server_round: int) -> dict[int, str]:
        """Sha256 of the present round files before ``server_round`` that are known good.

        Taken from a usable index of this run; without one, each file's seal and header are checked (files that
        fail are left out, and so removed by the save).
        """
        files = {r: p for r, p in self.round_files().items() if r < server_round}
        index, _ = self._read_index()
        if index is not None and not index.legacy and index.fingerprint == self.fingerprint:
            return {r: sha for r, sha in index.sha256.items() if r in files}
        known = {}
        for r, path in files.items():
            try:
                data = path.read_bytes()
                _, header, sealed = unseal(data)
                if not sealed:
                    continue
                self._round_meta(header, r)
            except (OSError, DamagedFileError):
                continue
            known[r] = hashlib.sha256(data).hexdigest()
        return known

    def _round_meta(self, header: Mapping[str, str], server_round: int) -> dict[str, Any]:
        """Meta in the verified header of a sealed round file of this run; :class:`DamagedFileError` otherwise."""
        if header.get("fingerprint") != self.fingerprint:
            raise _ForeignError(f"it belongs to another run configuration (fingerprint "
                                f"{str(header.get('fingerprint'))[:12]}..., this run's {self.fingerprint[:12]}...)")
        if header.get("round") != str(server_round):
            raise DamagedFileError(f"its header says round {header.get('round')!r}, its name round {server_round}")
        try:
            meta = json.loads(header.get(_META_KEY, ""))
        except ValueError as error:
            raise DamagedFileError(f"its header's meta is not valid JSON ({error})") from error
        if not isinstance(meta, dict):
            raise DamagedFileError(f"its header's meta is a JSON {type(meta).__name__}, not an object")
        return meta

    # ------------------------------------------------------------------------------------------ load
    def load_latest(
        self,
        *,
        reference: Mapping[str, torch.Tensor] | None = None,
        also_verify: Callable[[int], Sequence[str]] | None = None,
        report: Callable[[str], Any] | None = None,
    ) -> Checkpoint | None:
        """Return ``(round, global_state, extra_tensors, meta)`` of the newest checkpoint that verifies.

        Rounds are tried newest first. A round is used when its file is there, its sha256 equals the one recorded
        in ``latest.json`` (when listed there), its header's seal, fingerprint and round are right, its global
        state fits ``reference`` (when given) and ``also_verify(round)`` (when given) returns no problem. Each
        round skipped, and each other anomaly, is reported (``report`` and the ``"fedcore.federation"`` logger,
        level WARNING); no file is deleted, except that checkpoints of another fingerprint are cleared (and
        reported) as before.

        Parameters
        ----------
        reference : Mapping of str to Tensor, optional
            A state of the model being resumed (e.g. a fresh model's ``state_dict()``): the checkpoint's global
            state must have its keys, shapes and dtypes, and finite floating-point values.
        also_verify : callable, optional
            ``also_verify(round) -> list of problems`` for other state the resume of ``round`` needs, e.g.
            :meth:`~fedcore.federation.client_store.ClientStore.verify`; a round with a problem is skipped.
        report : callable, optional
            Called with each message (one line each), e.g. to print it and log it to MLflow.

        Returns
        -------
        tuple or None
            ``None`` when the folder holds no checkpoint (or only another fingerprint's, now cleared).

        Raises
        ------
        CheckpointError
            If the folder holds checkpoint files of this run but no round verifies; the message lists why each
            was rejected, and the fix (restore the files, or delete the folder to start over).
        """

        def note(message: str) -> None:
            logger.warning(message)
            if report is not None:
                report(message)

        where = f"Checkpointer: {self.folder}"
        for path in self._leftovers():
            note(f"{where}: ignored {path.name!r}, left by an interrupted write (the next save removes it).")
        files = self.round_files()
        index, index_problem = self._read_index()
        if index is None and index_problem is None and not files:
            return None
        if index_problem is not None:
            note(f"{where}: {LATEST} is damaged ({index_problem}); each round file is checked against the "
                 "checksum in its own header instead.")
        elif index is None:
            note(f"{where}: {LATEST} is missing; each round file is checked against the checksum in its own "
                 "header instead.")
        if index is not None and index.fingerprint != self.fingerprint:
            self.reset()
            note(f"{where}: the checkpoints were written by another run configuration (fingerprint "
                 f"{index.fingerprint[:12]}..., this run's {self.fingerprint[:12]}...); cleared them, the run starts "
                 "from round 0.")
            return None

        rounds = set(files)
        if index is not None:
            rounds |= {*index.sha256, index.latest}
        rejected: list[str] = []
        foreign: list[int] = []
        for server_round in sorted(rounds, reverse=True):
            try:
                found, sealed = self._verified_round(server_round, files.get(server_round), index, reference)
                if also_verify is not None and (problems := list(also_verify(server_round))):
                    raise DamagedFileError("the state it needs besides its file does not verify: "
                                           + "; ".join(problems))
            except DamagedFileError as error:
                if isinstance(error, _ForeignError):
                    foreign.append(server_round)
                message = f"round {server_round} ({self.file_name(server_round)}) is not used: {error}"
                rejected.append(message)
                note(f"{where}: {message}. Its files stay on disk.")
                continue
            if rejected:
                note(f"{where}: resuming from round {server_round}, the newest round whose checkpoint verifies "
                     f"({len(rejected)} newer round{'s' if len(rejected) > 1 else ''} skipped).")
            if not sealed:
                note(f"{where}: round {server_round} was written by an older fedcore without checksums; it is "
                     "resumed unverified (the next save adds checksums).")
            else:  # the older kept rounds are the fallback of a later resume: say now if one is gone
                for older in sorted((r for r in rounds if r < server_round), reverse=True):
                    try:
                        self._verified_round(older, files.get(older), index, reference)
                    except DamagedFileError as error:
                        note(f"{where}: the older checkpoint, round {older} ({self.file_name(older)}), does not "
                             f"verify: {error}. Resuming from round {server_round} is unaffected, but a later "
                             f"resume cannot fall back to round {older}. Its file stays on disk.")
            return found
        if foreign and index is None and len(foreign) == len(rounds):
            self.reset()
            note(f"{where}: the checkpoints were written by another run configuration; cleared them, the run "
                 "starts from round 0.")
            return None
        listed = "\n".join(f"  - {line}" for line in rejected) or "  - no round file is present"
        raise CheckpointError(
            f"Checkpointer: no checkpoint in {self.folder} verifies, so the run cannot resume:\n{listed}\n"
            f"Fix: restore the damaged files (e.g. from a backup) and run again, or delete the folder "
            f"{self.folder} (with its client states) to start the run over from round 0.")

    def _verified_round(
        self, server_round: int, path: Path | None, index: _Index | None,
        reference: Mapping[str, torch.Tensor] | None,
    ) -> tuple[Checkpoint, bool]:
        """Round ``server_round`` after every check, and whether it was sealed; else :class:`DamagedFileError`."""
        if path is None:
            raise DamagedFileError(f"{LATEST} lists it, but its file is missing")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise DamagedFileError(f"its file cannot be read ({error})") from error
        recorded = index.sha256.get(server_round) if index is not None else None
        if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
            try:
                _, header, sealed = unseal(data)
                self._round_meta(header, server_round)
                detail = ("its header's seal still matches, so the file was replaced by another one" if sealed else
                          "it has no seal")
            except DamagedFileError as error:
                detail = str(error)
            raise DamagedFileError(f"its sha256 differs from the one recorded in {LATEST}: {detail}")
        tensors, header, sealed = unseal(data)
        if sealed:
            meta = self._round_meta(header, server_round)
        elif index is not None and index.legacy and server_round == index.latest:
            # written before checksums: resumed unverified, with the history latest.json kept for it
            if header.get("fingerprint") != self.fingerprint or header.get("round") != str(server_round):
                raise DamagedFileError(f"its header's fingerprint or round ({header.get('round')!r}) differs "
                                       f"from {LATEST}'s")
            meta = dict(index.meta)
        else:
            raise DamagedFileError("it has no seal (written by an older fedcore without checksums, which kept the "
                                   "history of its newest round only)")
        state = {k[len(_STATE_PREFIX) :]: t for k, t in tensors.items() if k.startswith(_STATE_PREFIX)}
        extra = {k[len(_EXTRA_PREFIX) :]: t for k, t in tensors.items() if k.startswith(_EXTRA_PREFIX)}
        if reference is not None and (problems := state_problems(state, reference)):
            raise DamagedFileError("its global state does not fit the model: " + "; ".join(problems))
        return (server_round, state, extra, meta), sealed

    def reset(self) -> None:
        """Remove this checkpointer's files (round files, ``latest.json``, ``*.tmp``); other files stay."""
        if not self.folder.is_dir():
            return
        (self.folder / LATEST).unlink(missing_ok=True)
        for path in self.round_files().values():
            path.unlink(missing_ok=True)
        for path in self._leftovers():
            path.unlink(missing_ok=True)

