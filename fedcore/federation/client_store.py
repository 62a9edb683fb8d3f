"""Per-client state on disk (personal layers, optimiser moments, ...), one safetensors file per client and round.

A :class:`ClientStore` owns one folder, with one sub-folder per client that has state::

    000007/round_0003.safetensors   client 7's flat tensors ("personal/<key>", "optim/<key>", ...) as of round 3
    000007/round_0005.safetensors   the same client, written at round 5
    000012/round_0005.safetensors

Client folders are named by the client id with at least 6 digits (``f"{client:06d}"``), round files by the round
with at least 4 digits (:meth:`ClientStore.file_name`). Each file holds the client's flat dict of tensors and its
string metadata in the safetensors header, with a seal: a sha256 over the rest of the header and the tensor bytes
(:func:`~fedcore.federation.checkpoint.sealed_chunks`), checked on every load, so a damaged file (truncated,
bit-flipped) raises :class:`~fedcore.errors.ClientStateError` naming the client, the file and the round instead
of handing back wrong tensors. Only client folders and round files in exactly these canonical forms belong to the
store; anything else in ``folder`` is never read, listed as a client or removed.

Versions are kept per round so that resuming is safe: the flow writes the client states of round ``r + 1`` before
the checkpoint of round ``r + 1`` (see :mod:`fedcore.federation.checkpoint`), so after a crash between the two,
resuming from the round-``r`` checkpoint calls :meth:`ClientStore.rollback` with ``r`` (dropping the round
``r + 1`` versions) and :meth:`ClientStore.load` with ``upto_round=r`` sees the state each client had then. Once a
round's checkpoint is durable, :meth:`ClientStore.commit` drops the versions no resume can need any more: those
older than each client's state as of the *oldest* checkpoint kept, so that a resume that falls back to it (the
newest checkpoint being damaged) finds every client's state of that round. :meth:`ClientStore.verify` checks, for
one round, every file a resume from it would read; pass it to
:meth:`~fedcore.federation.checkpoint.Checkpointer.load_latest` as ``also_verify``.

Each file is written to ``<name>.tmp``, flushed and fsynced, then moved over the final name with :func:`os.replace`
(:func:`~fedcore.federation.checkpoint.atomic_write_bytes`), so a crash leaves a complete file or none; ``*.tmp``
leftovers are never loaded and are removed by :meth:`ClientStore.commit`, :meth:`ClientStore.rollback` and
:meth:`ClientStore.reset`. Loading uses safetensors only (no pickle, so no code runs on load).

The store keeps nothing but its folder in memory, so memory does not grow with the number of clients, loading one
client lists only that client's folder, and instances pickle cheaply to worker threads or processes. A client is
meant to be written by one worker at a time, and :meth:`ClientStore.commit`, :meth:`ClientStore.rollback` and
:meth:`ClientStore.reset` to run while no save is in flight.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from fedcore.errors import ClientStateError
from fedcore.federation.checkpoint import (
    SEAL_DIGEST_KEY,
    SEAL_FORMAT_KEY,
    DamagedFileError,
    _atomic_write,
    _cpu_tensors,
    sealed_chunks,
    unseal,
)

_CLIENT_FOLDER = re.compile(r"^(\d{6,})$")
_ROUND_FILE = re.compile(r"^round_(\d{4,})\.safetensors$")
_TMP_SUFFIX = ".tmp"


# ---------------------------------------------------------------------------------------------- helpers
def _check_index(value: object, name: str, where: str) -> int:
    """Return ``value`` if it is an int >= 0 (bools rejected), else raise :class:`ValueError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: {name!r} must be an int >= 0. Got {value!r}.")
    return value


def _client_of(name: str) -> int | None:
    """Client id of a folder name in the store's canonical form (``000007``), else ``None``."""
    if (match := _CLIENT_FOLDER.match(name)) is None:
        return None
    client = int(match.group(1))
    return client if name == f"{client:06d}" else None


def _round_of(name: str) -> int | None:
    """Round of a version file name in the store's canonical form (``round_0007.safetensors``), else ``None``."""
    if (match := _ROUND_FILE.match(name)) is None:
        return None
    server_round = int(match.group(1))
    return server_round if name == ClientStore.file_name(server_round) else None


def _scan(folder: Path) -> tuple[dict[int, Path], list[Path]]:
    """Complete version files of one client folder (by round, sorted) and its ``*.tmp`` leftovers."""
    versions: dict[int, Path] = {}
    leftovers: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return {}, []
    for entry in entries:
        name = entry.name
        if name.endswith(_TMP_SUFFIX):
            if _round_of(name[: -len(_TMP_SUFFIX)]) is not None:
                leftovers.append(folder / name)
        elif (server_round := _round_of(name)) is not None:
            versions[server_round] = folder / name
    return dict(sorted(versions.items())), leftovers


def _remove_empty_folder(folder: Path) -> None:
    """Remove ``folder`` if it is empty (a folder holding anything else stays)."""
    try:
        folder.rmdir()
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------- store
class ClientStore:
    """Versioned per-client tensors in ``folder``, one safetensors file per client and round written.

    Parameters
    ----------
    folder : Path or str
        Root folder of the store (created on first save). Other files in it are left alone.
    """

    __slots__ = ("folder",)

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)

    def __repr__(self) -> str:
        return f"ClientStore({str(self.folder)!r})"

    @staticmethod
    def file_name(server_round: int) -> str:
        """Name of the version file written at ``server_round`` (``round_0007.safetensors``)."""
        return f"round_{server_round:04d}.safetensors"

    def client_folder(self, client: int) -> Path:
        """Folder of ``client``'s versions (``folder/000007``); it may not exist.

        Raises
        ------
        ValueError
            If ``client`` is not an int >= 0.
        """
        _check_index(client, "client", "ClientStore.client_folder")
        return self.folder / f"{client:06d}"

    def _client_folders(self) -> dict[int, Path]:
        """Client folders present, by client id, sorted (only canonical names such as ``000007``)."""
        try:
            entries = list(os.scandir(self.folder))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        found = {}
        for entry in entries:
            if (client := _client_of(entry.name)) is not None and entry.is_dir(follow_symlinks=False):
                found[client] = self.folder / entry.name
        return dict(sorted(found.items()))

    # ------------------------------------------------------------------------------------------ write / read
    def save(
        self,
        client: int,
        server_round: int,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None = None,
    ) -> Path:
        """Write ``client``'s tensors as its version of ``server_round``, atomically.

        Parameters
        ----------
        client : int
            Client id (>= 0).
        server_round : int
            Round the state belongs to (>= 0). Saving the same round again replaces that version.
        tensors : Mapping of str to Tensor
            The client's flat state (e.g. ``"personal/conv.weight"``, ``"optim/conv.weight"``); copied to CPU,
            contiguous. May be empty.
        metadata : Mapping of str to str, optional
            String metadata stored in the file header.

        Returns
        -------
        Path
            The version file written.

        Raises
        ------
        ValueError
            If ``client`` or ``server_round`` is not an int >= 0, a key is ``"__metadata__"`` (reserved by
            safetensors) or a metadata key is one of the seal's (``"fedcore.format"``, ``"fedcore.sha256"``).
        TypeError
            If ``tensors`` is not a mapping of str to tensors, or ``metadata`` not a mapping of str to str.
        """
        _check_index(client, "client", "ClientStore.save")
        _check_index(server_round, "server_round", "ClientStore.save")
        if not isinstance(tensors, Mapping):
            raise TypeError(f"ClientStore.save: 'tensors' must be a Mapping of str to Tensor. "
                            f"Got {type(tensors).__name__}.")
        for key in tensors:
            if not isinstance(key, str):
                raise TypeError(f"ClientStore.save: keys of 'tensors' must be str. Got {key!r}.")
            if key == "__metadata__":
                raise ValueError("ClientStore.save: '__metadata__' is reserved by safetensors and cannot be a key "
                                 "of 'tensors'.")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"ClientStore.save: 'metadata' must be a Mapping of str to str. "
                            f"Got {type(metadata).__name__}.")
        header = dict(metadata or {})
        for key, value in header.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"ClientStore.save: 'metadata' must map str to str. Got {key!r}: {value!r}.")
            if key in (SEAL_FORMAT_KEY, SEAL_DIGEST_KEY):
                raise ValueError(f"ClientStore.save: metadata key {key!r} is reserved for the file's seal. "
                                 "Fix: rename it.")
        cpu = _cpu_tensors("", tensors, "ClientStore.save")
        folder = self.client_folder(client)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.file_name(server_round)
        _atomic_write(path, sealed_chunks(cpu, header))
        return path

    def load(self, client: int, upto_round: int) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """Return ``(tensors, metadata)`` of ``client``'s newest version written at a round <= ``upto_round``.

        Only ``client``'s folder is listed, so the cost does not depend on the number of clients.

        Parameters
        ----------
        client : int
            Client id (>= 0).
        upto_round : int
            Newest round to consider (>= 0), e.g. the round of the checkpoint being resumed from.

        Returns
        -------
        tuple or None
            CPU tensors (owning their memory) and header metadata (without the seal's entries); ``None`` when the
            client has no such version.

        Raises
        ------
        ValueError
            If ``client`` or ``upto_round`` is not an int >= 0.
        ClientStateError
            If the version file is damaged: truncated, its seal differs from its content, or not a safetensors
            file (it is never unpickled). A :class:`ValueError` too; it names the client, the file and the round.
        """
        _check_index(client, "client", "ClientStore.load")
        _check_index(upto_round, "upto_round", "ClientStore.load")
        versions, _ = _scan(self.client_folder(client))
        eligible = [r for r in versions if r <= upto_round]
        if not eligible:
            return None
        tensors, metadata = self._read(client, eligible[-1], versions[eligible[-1]], "ClientStore.load")
        return tensors, metadata

    @staticmethod
    def _read(client: int, server_round: int, path: Path, where: str) -> tuple[dict[str, torch.Tensor],
                                                                                   dict[str, str]]:
        """Tensors and metadata of one version file, checked; :class:`ClientStateError` if it is damaged."""
        try:
            data = path.read_bytes()
            tensors, metadata, _ = unseal(data)
        except (OSError, DamagedFileError) as error:
            reason = str(error) if isinstance(error, DamagedFileError) else f"it cannot be read ({error})"
            raise ClientStateError(
                f"{where}: {str(path)!r} (client {client}, round {server_round}) is not a valid client-state file: "
                f"{reason}. Fix: restore the file, or delete it (the client then goes on from its newest older "
                "version, or afresh).", client=client, path=str(path), server_round=server_round, reason=reason,
            ) from error
        return tensors, metadata

    def verify(self, upto_round: int) -> list[str]:
        """Check every file a resume from the checkpoint of ``upto_round`` would read; return the problems.

        For each client, the version :meth:`load` with ``upto_round`` would pick is read and its seal checked;
        older and newer versions are not read. Pass this method to
        :meth:`~fedcore.federation.checkpoint.Checkpointer.load_latest` as ``also_verify``, so the resume picks the
        newest round whose global checkpoint and client states all verify.

        Parameters
        ----------
        upto_round : int
            Round of the checkpoint a resume would start from (>= 0).

        Returns
        -------
        list of str
            One message per damaged file (naming the client, the file, the round and what is wrong); empty when
            every file verifies. Files written before seals existed are read but cannot be checked.

        Raises
        ------
        ValueError
            If ``upto_round`` is not an int >= 0.
        """
        _check_index(upto_round, "upto_round", "ClientStore.verify")
        problems = []
        for client, folder in self._client_folders().items():
            versions, _ = _scan(folder)
            eligible = [r for r in versions if r <= upto_round]
            if not eligible:
                continue
            try:
                self._read(client, eligible[-1], versions[eligible[-1]], "ClientStore.verify")
            except ClientStateError as error:
                problems.append(f"client {client}'s state {str(error.path)!r} (round {error.server_round}) is "
                                f"damaged: {error.reason}")
        return problems

    # ------------------------------------------------------------------------------------------ listing
    def rounds(self, client: int) -> list[int]:
        """Rounds of ``client``'s complete versions, ascending (``*.tmp`` leftovers are not listed).

        Raises
        ------
        ValueError
            If ``client`` is not an int >= 0.
        """
        _check_index(client, "client", "ClientStore.rounds")
        return list(_scan(self.client_folder(client))[0])

    def clients(self) -> list[int]:
        """Ids of the clients with at least one complete version, ascending."""
        return [client for client, folder in self._client_folders().items() if _scan(folder)[0]]

    def nbytes(self) -> int:
        """Total size in bytes of the complete version files (``*.tmp`` leftovers are not counted)."""
        total = 0
        for folder in self._client_folders().values():
            for path in _scan(folder)[0].values():
                try:
                    total += path.stat().st_size
                except FileNotFoundError:
                    pass
        return total

    # ------------------------------------------------------------------------------------------ housekeeping
    def commit(self, server_round: int, clients: Iterable[int], *, oldest_kept: int | None = None) -> None:
        """Drop the versions of ``clients`` that no resume from a kept checkpoint can need.

        Call once the checkpoint of ``server_round`` is durable. For each listed client, its newest version written
        at a round <= ``oldest_kept`` is kept, together with every newer one, so that a resume from any kept
        checkpoint (``oldest_kept`` to ``server_round``) finds the client's state of that round; older versions and
        ``*.tmp`` leftovers in its folder are removed. Other clients are not touched.

        Parameters
        ----------
        server_round : int
            Round of the checkpoint just written (>= 0).
        clients : Iterable of int
            Clients whose versions to prune (e.g. those that trained this round); all ids are checked before
            anything is removed.
        oldest_kept : int, optional
            Round of the oldest checkpoint kept (``Checkpointer.kept_rounds()[0]``), <= ``server_round``. By
            default ``server_round - 1`` (at least 0): what a checkpointer with ``keep=2`` saving every round keeps.

        Raises
        ------
        ValueError
            If ``server_round``, ``oldest_kept`` or a client id is not an int >= 0, or ``oldest_kept`` is above
            ``server_round``.
        """
        _check_index(server_round, "server_round", "ClientStore.commit")
        if oldest_kept is None:
            oldest_kept = max(0, server_round - 1)
        _check_index(oldest_kept, "oldest_kept", "ClientStore.commit")
        if oldest_kept > server_round:
            raise ValueError(f"ClientStore.commit: 'oldest_kept' must be <= 'server_round' ({server_round}). "
                             f"Got {oldest_kept!r}.")
        ids = [_check_index(client, "client", "ClientStore.commit") for client in clients]
        for client in dict.fromkeys(ids):
            versions, leftovers = _scan(self.client_folder(client))
            eligible = [r for r in versions if r <= oldest_kept]
            for r in eligible[:-1]:
                versions[r].unlink(missing_ok=True)
            for path in leftovers:
                path.unlink(missing_ok=True)

    def rollback(self, server_round: int) -> int:
        """Remove every version written after ``server_round``, in every client folder.

        Call when resuming from the checkpoint of ``server_round``: versions of later rounds were written by a run
        that stopped before checkpointing them. ``*.tmp`` leftovers are removed too, and client folders left empty
        are removed.

        Parameters
        ----------
        server_round : int
            Round of the checkpoint resumed from (>= 0).

        Returns
        -------
        int
            Number of files removed (versions and ``*.tmp`` leftovers).

        Raises
        ------
        ValueError
            If ``server_round`` is not an int >= 0.
        """
        _check_index(server_round, "server_round", "ClientStore.rollback")
        removed = 0
        for folder in self._client_folders().values():
            versions, leftovers = _scan(folder)
            for path in [p for r, p in versions.items() if r > server_round] + leftovers:
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                removed += 1
            _remove_empty_folder(folder)
        return removed

    def reset(self) -> None:
        """Remove every version file, ``*.tmp`` leftover and client folder the store wrote; other files stay.

        Client folders still holding other files are kept; ``folder`` itself is kept.
        """
        for folder in self._client_folders().values():
            versions, leftovers = _scan(folder)
            for path in [*versions.values(), *leftovers]:
                path.unlink(missing_ok=True)
            _remove_empty_folder(folder)
