"""Fetch dataset archives (mirror first, resumable, checksummed) and extract them safely.

Fetching
    :func:`fetch` looks in a local mirror folder first (``<mirror>/<subdir>/<name>``, then ``<mirror>/<name>``),
    then fetches the URL (``http``, ``https``, ``file`` or a local path). Bytes go to ``<dest>/<name>.part``,
    which a later attempt or call resumes (HTTP ``Range``, or a seek for local files). A finished file is
    checked against the expected sha256 (streamed); a mismatch keeps the bytes as ``<name>.bad`` and raises
    :class:`~fedcore.errors.ChecksumError`. A verified file gets a ``<name>.sha256`` sidecar (``sha256sum``
    format), which makes reusing it on the next call cheap.

Extracting
    :func:`extract_archive` checks every member of a zip or tar before writing anything (no absolute paths,
    no ``..`` escapes, no links pointing outside, no device files, a cap on the total size and on the
    compression ratio). Tar members are checked and written by :mod:`tarfile`'s ``data`` filter (links left
    out); zip members are checked here and written here, each stopped at its declared size and at the caps.
    Extraction goes into a hidden sibling folder, writes a ``.extracted`` marker and renames the folder
    into place, so an interrupted extraction never leaves a folder that looks complete. A matching marker
    makes the next call a no-op.

Mirror
    A mirror that is set (``download.mirror`` or env ``FEDAUDIO_MIRROR``) must exist: :func:`resolve_mirror`
    and :func:`fetch` refuse a missing folder instead of silently going to the internet.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from fedcore.errors import ChecksumError, DataError, DownloadError, UnsafeArchiveError

__all__ = [
    "DEFAULT_MAX_COMPRESSION_RATIO",
    "DEFAULT_MAX_EXTRACT_BYTES",
    "EXTRACTED_MARKER",
    "MIRROR_ENV",
    "RATIO_FLOOR_BYTES",
    "ExtractResult",
    "FetchResult",
    "ProgressFn",
    "check_mirror",
    "extract_archive",
    "extract_archive_detailed",
    "fetch",
    "fetch_detailed",
    "make_partial_dir",
    "read_sha256_sidecar",
    "resolve_mirror",
    "sha256_file",
]

ProgressFn = Callable[[int, int | None], None]
"""``progress(bytes_done, total_bytes_or_None)``, called as bytes arrive."""

MIRROR_ENV = "FEDAUDIO_MIRROR"
EXTRACTED_MARKER = ".extracted"

_FILE_CHUNK = 1 << 20
_HTTP_CHUNK = 1 << 16
_RETRY_BASE_S = 0.5  # delay before retry k (1-based) is _RETRY_BASE_S * 2 ** (k - 1), capped at 10 s
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


# --------------------------------------------------------------------------------------------------- hashing
def sha256_file(path: str | Path) -> str:
    """Return the lowercase hex sha256 of a file, streamed (:func:`hashlib.file_digest`).

    Parameters
    ----------
    path : str or Path
        File to hash.

    Returns
    -------
    str
        64 hex digits.
    """
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_sha256_sidecar(path: str | Path) -> str | None:
    """Return the hash of a ``sha256sum``-format file (``"<hex>  <name>"``), or None if absent or malformed."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    token = text.split(maxsplit=1)[0].lower() if text.split() else ""
    return token if _HEX64.match(token) else None


def _write_sidecar(target: Path, digest: str) -> None:
    sidecar = target.with_name(target.name + ".sha256")
    tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{digest}  {target.name}\n", encoding="utf-8")
    os.replace(tmp, sidecar)


def _check_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not _HEX64.match(value):
        raise ValueError(f"fetch: 'sha256' must be 64 hex digits. Got {sha256!r}.")
    return value


# --------------------------------------------------------------------------------------------------- mirror
def resolve_mirror(configured: str | Path | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """Return the mirror folder: env ``FEDAUDIO_MIRROR`` when set and non-empty, else ``configured``.

    A mirror that is set must be an existing folder: a typo in the path would otherwise fall back to the
    internet without a word. (A mirror that exists but lacks an archive still falls back to the URL.)

    Parameters
    ----------
    configured : str or Path or None
        ``download.mirror`` from the params.
    environ : Mapping, optional
        Environment to read (``os.environ`` by default).

    Returns
    -------
    Path or None
        The folder, or None when neither is set.

    Raises
    ------
    DownloadError
        The mirror is set but is not an existing folder; the message names the folder and where it was set.
    """
    env = (os.environ if environ is None else environ).get(MIRROR_ENV, "").strip()
    if env:
        return check_mirror(Path(env).expanduser(), f"env {MIRROR_ENV}")
    if configured is None or str(configured).strip() == "":
        return None
    return check_mirror(Path(configured).expanduser(), "download.mirror")


def check_mirror(mirror: Path, where: str = "download.mirror or env " + MIRROR_ENV) -> Path:
    """Return ``mirror`` if it is an existing folder, else raise a :class:`DownloadError` naming it.

    Parameters
    ----------
    mirror : Path
        The mirror folder.
    where : str
        Where it was set, for the message.

    Returns
    -------
    Path
        ``mirror``.
    """
    if not mirror.is_dir():
        state = "a file, not a folder" if mirror.exists() else "no such folder"
        raise DownloadError(
            f"fetch: the mirror ({where}) must be an existing folder. Got '{mirror}' ({state}). "
            f"Fix: correct the path, create it with the archives laid out as <mirror>/<dataset>/<archive>, "
            f"or unset {where} to download from the URL."
        )
    return mirror


def _mirror_folders(mirror: Path | None, subdir: str | None) -> list[Path]:
    if mirror is None:
        return []
    mirror = Path(mirror)
    return [mirror / subdir, mirror] if subdir else [mirror]


def _find_in_mirror(folders: Sequence[Path], names: Sequence[str]) -> Path | None:
    for name in names:
        for folder in folders:
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


# --------------------------------------------------------------------------------------------------- sources
def _parse_source(url: str) -> tuple[str, Path | None]:
    """Return ``("http", None)`` or ``("file", path)``."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"fetch: 'url' must be a non-empty http, https or file URL or a local path. Got {url!r}.")
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        return "http", None
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"fetch: a file URL must name a local file (no host). Got {url!r}.")
        return "file", Path(url2pathname(unquote(parsed.path)))
    if scheme == "" or len(scheme) == 1:  # a plain path, or a Windows drive letter
        return "file", Path(url).expanduser()
    raise ValueError(f"fetch: 'url' must be an http, https or file URL or a local path. Got {url!r}.")


def _url_basename(url: str, local: Path | None) -> str:
    name = local.name if local is not None else unquote(PurePosixPath(urlparse(url).path).name)
    if not name:
        raise ValueError(f"fetch: 'filename' must be given when the URL has no file name. Got url={url!r}.")
    return name


@dataclass(frozen=True)
class FetchResult:
    """What :func:`fetch_detailed` produced.

    Attributes
    ----------
    path : Path
        The verified file in ``dest_dir``.
    source : str
        The mirror file used, or the URL.
    sha256 : str
        Actual sha256 of ``path``.
    reused : bool
        True when a complete file already in ``dest_dir`` was reused without transfer.
    """

    path: Path
    source: str
    sha256: str
    reused: bool


class _Retry(Exception):
    """A transfer failure worth another attempt (the partial file is kept for resuming)."""


class _Fatal(Exception):
    """A transfer failure that another attempt cannot fix (404, bad URL)."""


def _unreachable(
    url: str, reason: str, names: Sequence[str], folders: Sequence[Path], subdir: str | None
) -> DownloadError:
    looked = ", ".join(f"'{folder}'" + ("" if folder.is_dir() else " (missing)") for folder in folders)
    where = f"looked for {', '.join(repr(n) for n in names)} in {looked}" if folders else "no mirror set"
    layout = f"<mirror>/{subdir}/{names[0]}" if subdir else f"<mirror>/{names[0]}"
    return DownloadError(
        f"fetch: 'url' must point to a reachable file. Got {url!r} ({reason}); mirror: {where}. "
        f"Fix: put the archive at {layout} and set the mirror (param download.mirror or env {MIRROR_ENV}), "
        "or correct download.url."
    )


def _copy_resumable(source: Path, part: Path, progress: ProgressFn | None) -> None:
    """Copy ``source`` into ``part``, continuing after the bytes ``part`` already holds."""
    total = source.stat().st_size
    done = part.stat().st_size if part.exists() else 0
    if done > total:
        done = 0
    with source.open("rb") as src, part.open("ab" if done else "wb") as out:
        src.seek(done)
        if progress is not None:
            progress(done, total)
        while block := src.read(_FILE_CHUNK):
            out.write(block)
            done += len(block)
            if progress is not None:
                progress(done, total)


def _content_range(header: str | None) -> tuple[int, int | None] | None:
    match = _CONTENT_RANGE.match(header or "")
    if match is None:
        return None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), total


def _http_once(url: str, part: Path, timeout_s: float, progress: ProgressFn | None) -> None:
    """One HTTP attempt: resume ``part`` with a Range request, or restart when the server ignores it."""
    import requests  # lazily: most runs read a mirror or a local file

    done = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}
    if done:
        headers["Range"] = f"bytes={done}-"
    with requests.get(url, headers=headers, stream=True, timeout=timeout_s) as response:
        code = response.status_code
        if code == 416 and done:
            unsatisfied = re.match(r"^\s*bytes\s+\*/(\d+)\s*$", response.headers.get("Content-Range", ""))
            if unsatisfied is not None and int(unsatisfied.group(1)) == done:
                return  # the partial file already holds every byte
            part.unlink(missing_ok=True)
            raise _Retry(f"server refused to resume at byte {done}; restarting")
        if code in (408, 429) or code >= 500:
            raise _Retry(f"HTTP {code} {response.reason}")
        if code >= 400:
            raise _Fatal(f"HTTP {code} {response.reason}")
        if code == 206 and done:
            parsed = _content_range(response.headers.get("Content-Range"))
            if parsed is None or parsed[0] != done:
                part.unlink(missing_ok=True)
                raise _Retry(f"server resumed at the wrong offset ({response.headers.get('Content-Range')!r})")
            total = parsed[1]
            mode = "ab"
        else:  # 200: the whole file, whether or not a range was asked for
            done = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        with part.open(mode) as out:
            if progress is not None:
                progress(done, total)
            for block in response.iter_content(_HTTP_CHUNK):
                if block:
                    out.write(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, total)
        if total is not None and done != total:
            raise _Retry(f"connection closed after {done} of {total} bytes")


def _download_http(
    url: str, part: Path, *, timeout_s: float, retries: int, progress: ProgressFn | None,
    names: Sequence[str], folders: Sequence[Path], subdir: str | None,
) -> None:
    """Run up to ``retries`` attempts, each resuming where the last stopped."""
    import requests

    retryable = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.ChunkedEncodingError,
        requests.exceptions.ContentDecodingError,
    )
    last = ""
    for attempt in range(1, retries + 1):
        try:
            _http_once(url, part, timeout_s, progress)
            return
        except _Fatal as error:
            raise _unreachable(url, str(error), names, folders, subdir) from None
        except (_Retry, *retryable) as error:
            last = f"{type(error).__name__}: {error}"
        except requests.exceptions.RequestException as error:
            raise _unreachable(url, f"{type(error).__name__}: {error}", names, folders, subdir) from None
        if attempt < retries:
            time.sleep(min(_RETRY_BASE_S * 2 ** (attempt - 1), 10.0))
    raise _unreachable(url, f"{retries} attempt(s) failed, last: {last}", names, folders, subdir)


# --------------------------------------------------------------------------------------------------- fetch
def _reuse(target: Path, expected: str | None) -> str | None:
    """Return the sha256 of ``target`` if it can be reused as is; move a mismatching file to ``.bad``."""
    sidecar = target.with_name(target.name + ".sha256")
    recorded = None
    try:
        if sidecar.stat().st_mtime_ns >= target.stat().st_mtime_ns:
            recorded = read_sha256_sidecar(sidecar)
    except FileNotFoundError:
        pass
    if recorded is not None and (expected is None or recorded == expected):
        return recorded
    digest = sha256_file(target)
    if expected is None or digest == expected:
        _write_sidecar(target, digest)
        return digest
    os.replace(target, target.with_name(target.name + ".bad"))
    sidecar.unlink(missing_ok=True)
    return None


def fetch_detailed(
    url: str,
    dest_dir: str | Path,
    *,
    filename: str | None = None,
    sha256: str | None = None,
    mirror: str | Path | None = None,
    mirror_subdir: str | None = None,
    mirror_names: Sequence[str] = (),
    timeout_s: float = 60,
    retries: int = 3,
    progress: ProgressFn | None = None,
) -> FetchResult:
    """Like :func:`fetch`, but also return where the file came from and its sha256.

    Parameters
    ----------
    url, dest_dir, filename, sha256, mirror, mirror_subdir, timeout_s, retries, progress
        As :func:`fetch`.
    mirror_names : sequence of str
        Other file names to accept in the mirror, tried after ``filename``. A mirror file keeps its own
        name in ``dest_dir``.

    Returns
    -------
    FetchResult
        Path, source, sha256 and whether an existing file was reused.
    """
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 1:
        raise ValueError(f"fetch: 'retries' must be an int >= 1. Got {retries!r}.")
    if not timeout_s > 0:
        raise ValueError(f"fetch: 'timeout_s' must be > 0. Got {timeout_s!r}.")
    expected = _check_sha256(sha256)
    _, local = _parse_source(url)
    name = filename or _url_basename(url, local)
    names = [name, *(n for n in mirror_names if n != name)]
    if mirror is not None:
        check_mirror(Path(mirror))
    folders = _mirror_folders(Path(mirror) if mirror is not None else None, mirror_subdir)
    mirror_file = _find_in_mirror(folders, names)
    if mirror_file is not None:
        source = str(mirror_file)
        target_name = mirror_file.name
        if expected is None:
            expected = read_sha256_sidecar(mirror_file.with_name(mirror_file.name + ".sha256"))
    else:
        source = url
        target_name = name
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / target_name
    if target.is_file() and (digest := _reuse(target, expected)) is not None:
        return FetchResult(path=target, source=source, sha256=digest, reused=True)

    part = dest_dir / f"{target_name}.part"
    origin = mirror_file if mirror_file is not None else local
    if origin is not None:
        if not origin.is_file():
            raise _unreachable(url, "no such file", names, folders, mirror_subdir)
        try:
            _copy_resumable(origin, part, progress)
        except OSError as error:
            raise _unreachable(source, f"copy failed: {error}", names, folders, mirror_subdir) from None
    else:
        _download_http(
            url, part, timeout_s=timeout_s, retries=retries, progress=progress,
            names=names, folders=folders, subdir=mirror_subdir,
        )

    digest = sha256_file(part)
    if expected is not None and digest != expected:
        bad = dest_dir / f"{target_name}.bad"
        os.replace(part, bad)
        raise ChecksumError(
            f"fetch: the sha256 of '{target}' (from {source}) must be {expected}. Got {digest}. "
            f"The bytes were kept as '{bad}'. Fix: delete it and retry, or correct download.sha256."
        )
    os.replace(part, target)
    _write_sidecar(target, digest)
    return FetchResult(path=target, source=source, sha256=digest, reused=False)


def fetch(
    url: str,
    dest_dir: str | Path,
    *,
    filename: str | None = None,
    sha256: str | None = None,
    mirror: str | Path | None = None,
    mirror_subdir: str | None = None,
    timeout_s: float = 60,
    retries: int = 3,
    progress: ProgressFn | None = None,
) -> Path:
    """Fetch a file into ``dest_dir``: mirror first, resumable, verified.

    Parameters
    ----------
    url : str
        ``http://``, ``https://`` or ``file://`` URL, or a local path.
    dest_dir : str or Path
        Folder for the file (created).
    filename : str, optional
        Name in ``dest_dir`` and in the mirror; by default the last component of the URL.
    sha256 : str, optional
        Expected hex sha256. When None, a mirror file's ``<file>.sha256`` sidecar is used if present;
        otherwise the file is not checked.
    mirror : str or Path, optional
        Folder consulted before the URL: ``mirror/mirror_subdir/filename``, then ``mirror/filename``. It must
        exist (:class:`DownloadError` otherwise); when it lacks the file, the URL is fetched.
    mirror_subdir : str, optional
        Dataset folder inside the mirror.
    timeout_s : float
        Network timeout per request, seconds.
    retries : int
        HTTP attempts in total, each resuming the partial file.
    progress : callable, optional
        ``progress(bytes_done, total_or_None)``, called as bytes arrive.

    Returns
    -------
    Path
        The verified file in ``dest_dir``.

    Raises
    ------
    DownloadError
        URL unreachable (after ``retries`` attempts) or file missing; names the URL and the mirror folders.
        A mirror folder that does not exist.
    ChecksumError
        The bytes do not match; they are kept as ``<filename>.bad``.
    ValueError
        Bad arguments.
    """
    return fetch_detailed(
        url, dest_dir, filename=filename, sha256=sha256, mirror=mirror, mirror_subdir=mirror_subdir,
        timeout_s=timeout_s, retries=retries, progress=progress,
    ).path


# --------------------------------------------------------------------------------------------------- extract
DEFAULT_MAX_EXTRACT_BYTES = 8 * 2**30
"""Default cap on the bytes an archive may expand to (``download.max_extract_bytes``)."""
DEFAULT_MAX_COMPRESSION_RATIO = 100.0
"""Default cap on the compression ratio (``download.max_compression_ratio``); real audio archives stay below 20."""
RATIO_FLOOR_BYTES = 1 << 20
"""The ratio is checked on members (and whole archives) that expand to more than this: a small, highly
compressible file (a silent clip, a text file) can exceed any ratio and harms nothing; the total cap bounds many."""


@dataclass(frozen=True)
class ExtractResult:
    """What :func:`extract_archive_detailed` produced.

    Attributes
    ----------
    path : Path
        The target folder.
    sha256 : str
        sha256 of the archive.
    skipped : list of dict
        ``{"member", "reason"}`` of each link member left out (links are never extracted).
    reused : bool
        True when an earlier extraction of the same archive was kept as is.
    """

    path: Path
    sha256: str
    skipped: list[dict[str, str]]
    reused: bool


@dataclass(frozen=True)
class _Member:
    """One archive member, checked: where it goes and what its header declares."""

    name: str
    parts: tuple[str, ...]  # zip: where it goes under the target folder (tar: tarfile places it; empty)
    kind: str  # "file", "dir" or "link" (left out)
    size: int  # declared uncompressed bytes
    compressed: int | None  # zip: declared compressed bytes; tar: None (one compressed stream)
    note: str = ""  # link: what it points to


def _unsafe(archive: Path, member: str, reason: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(
        f"extract_archive: every member of '{archive}' must be a file, folder or link inside the target folder. "
        f"Got {member!r} ({reason}). Nothing was extracted. "
        "Fix: the archive is damaged or malicious; delete it and fetch it again from a trusted source."
    )


def _damaged(archive: Path, error: BaseException, member: str | None = None) -> DataError:
    where = f"member {member!r} of '{archive}'" if member is not None else f"'{archive}'"
    return DataError(
        f"extract_archive: 'archive' must be a readable archive. Got {where} ({type(error).__name__}: {error}). "
        "Nothing was kept. Fix: delete it and fetch it again."
    )


def _normalise(name: str) -> list[str] | None:
    """Path components of a member name after resolving ``.`` and ``..``; None when it escapes."""
    parts: list[str] = []
    for component in name.replace("\\", "/").split("/"):
        if component in ("", "."):
            continue
        if component == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(component)
    return parts


def _is_absolute(name: str) -> bool:
    return name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) is not None


def _check_member(archive: Path, name: str) -> list[str]:
    if _is_absolute(name):
        raise _unsafe(archive, name, "absolute path")
    parts = _normalise(name)
    if parts is None:
        raise _unsafe(archive, name, "path escapes the target folder")
    return parts


class _Budget:
    """The extraction caps, checked from the headers before writing and again on the bytes written."""

    def __init__(self, archive: Path, archive_size: int, max_bytes: int, max_ratio: float) -> None:
        self.archive, self.archive_size = archive, archive_size
        self.max_bytes, self.max_ratio = max_bytes, max_ratio
        self.total = 0

    def _total_error(self, name: str, size: int, stage: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(
            f"extract_archive: the uncompressed size of '{self.archive}' must be <= {self.max_bytes:,} bytes "
            f"(download.max_extract_bytes). Got more: {self.total:,} bytes up to member {name!r} "
            f"({size:,} bytes), from an archive of {self.archive_size:,} bytes. {stage} "
            "Fix: if you trust the archive and have the disk space, raise download.max_extract_bytes."
        )

    def _ratio_error(self, name: str, size: int, compressed: int, stage: str) -> UnsafeArchiveError:
        ratio = size / max(compressed, 1)
        return UnsafeArchiveError(
            f"extract_archive: the compression ratio of {name} in '{self.archive}' must be <= "
            f"{self.max_ratio:g} (download.max_compression_ratio). Got {ratio:,.1f} ({compressed:,} compressed "
            f"bytes expand to {size:,}). {stage} Fix: this is how a zip bomb looks; if you trust the archive, "
            "raise download.max_compression_ratio."
        )

    def declare(self, member: _Member) -> None:
        """Count a member's declared size; raise before anything is written when a cap is passed."""
        stage = "Nothing was extracted."
        if member.compressed is not None and member.size > RATIO_FLOOR_BYTES \
                and member.size > self.max_ratio * max(member.compressed, 1):
            raise self._ratio_error(f"member {member.name!r}", member.size, member.compressed, stage)
        self.total += member.size
        if self.total > self.max_bytes:
            raise self._total_error(member.name, member.size, stage)
        if self.total > RATIO_FLOOR_BYTES and self.total > self.max_ratio * max(self.archive_size, 1):
            raise self._ratio_error("the whole archive", self.total, self.archive_size, stage)

    def write(self, member: _Member, src: Any, target: Path) -> None:
        """Copy ``src`` to ``target``, stopping at the member's declared size and at the caps."""
        stage = "Extraction was stopped and nothing was kept."
        written = 0
        with target.open("wb") as out:
            while block := src.read(_FILE_CHUNK):
                written += len(block)
                self.total += len(block)
                if written > member.size:
                    raise UnsafeArchiveError(
                        f"extract_archive: member {member.name!r} of '{self.archive}' must hold the {member.size:,} "
                        f"bytes its header declares. Got more ({written:,} so far). {stage} "
                        "Fix: the archive is damaged or malicious; delete it and fetch it again."
                    )
                if self.total > self.max_bytes:
                    raise self._total_error(member.name, written, stage)
                if member.compressed is not None and written > RATIO_FLOOR_BYTES \
                        and written > self.max_ratio * max(member.compressed, 1):
                    raise self._ratio_error(f"member {member.name!r}", written, member.compressed, stage)
                out.write(block)
        if written != member.size:
            raise DataError(
                f"extract_archive: member {member.name!r} of '{self.archive}' must hold the {member.size:,} bytes "
                f"its header declares. Got {written:,}. {stage} Fix: delete the archive and fetch it again."
            )


def _plan_zip(archive: Path, zf: zipfile.ZipFile, budget: _Budget) -> list[_Member]:
    members = []
    for info in zf.infolist():
        parts = tuple(_check_member(archive, info.filename))
        mode = info.external_attr >> 16
        if mode and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            raise _unsafe(archive, info.filename, "device file")
        if mode and stat.S_ISLNK(mode):
            member = _Member(info.filename, parts, "link", 0, None, "symlink")
        elif info.is_dir() or (mode and stat.S_ISDIR(mode)):
            member = _Member(info.filename, parts, "dir", 0, None)
        else:
            member = _Member(info.filename, parts, "file", info.file_size, info.compress_size)
        if member.kind == "file" and not parts:
            raise _unsafe(archive, info.filename, "a file without a name")
        budget.declare(member)
        members.append(member)
    return members


def _tar_filter(member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo | None:
    """Tar's ``data`` filter, with links left out and the umask's permissions and the extraction time kept."""
    if member.issym() or member.islnk():
        return None
    # None skips the attribute (tarfile since 3.11.4; typeshed does not know it yet)
    return tarfile.data_filter(member, dest_path).replace(mode=None, mtime=None, deep=False)  # type: ignore[arg-type]


def _plan_tar(archive: Path, tf: tarfile.TarFile, dest: Path, budget: _Budget) -> list[_Member]:
    members = []
    for info in tf:  # lazily: a bomb is stopped at the member that passes a cap, before the rest is read
        if _is_absolute(info.name):  # the data filter would strip the leading '/' and extract it
            raise _unsafe(archive, info.name, "absolute path")
        try:  # '..' escapes, links to absolute paths or pointing outside, device files, FIFOs
            tarfile.data_filter(info, str(dest))
        except tarfile.FilterError as error:
            raise _unsafe(archive, info.name, f"{type(error).__name__}: {error}") from None
        if info.issym() or info.islnk():
            kind = "symlink" if info.issym() else "hard link"
            member = _Member(info.name, (), "link", 0, None, f"{kind} to {info.linkname!r}")
        elif info.isdir():
            member = _Member(info.name, (), "dir", 0, None)
        elif not _normalise(info.name):
            raise _unsafe(archive, info.name, "a file without a name")
        else:
            member = _Member(info.name, (), "file", info.size, None)
        budget.declare(member)
        members.append(member)
    return members


def _read_marker(marker: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def make_partial_dir(parent: Path, name: str) -> Path:
    """Create a new hidden folder ``parent/.<name>.partial-<pid>-<random>`` with the umask's permissions.

    Unlike :func:`tempfile.mkdtemp` (mode 0700), the folder gets the mode any new folder gets (0755 under the
    usual umask 022), so a folder renamed into place has the same permissions on every run.

    Parameters
    ----------
    parent : Path
        Folder to create it in (created when missing).
    name : str
        Name of the folder it will replace.

    Returns
    -------
    Path
        The new, empty folder.
    """
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        candidate = parent / f".{name}.partial-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"make_partial_dir: could not create a new folder in '{parent}'.")


def _extract_into(archive: Path, kind: str, members: list[_Member], tmp: Path, budget: _Budget) -> None:
    """Write the planned members into ``tmp`` (links left out); zip members re-check the caps while written."""
    if kind == "tar":  # tarfile writes each member's declared size, no more: the plan checked the caps on those
        with tarfile.open(archive, "r:*") as tf:
            tf.extractall(tmp, filter=_tar_filter)
        return
    budget.total = 0
    with zipfile.ZipFile(archive) as zf:
        for member, info in zip(members, zf.infolist(), strict=True):
            target = tmp.joinpath(*member.parts)
            if member.kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
            elif member.kind == "file":
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src:
                        budget.write(member, src, target)
                except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError) as error:
                    raise _damaged(archive, error, member.name) from None


def extract_archive_detailed(
    archive: str | Path,
    dest: str | Path,
    *,
    sha256: str | None = None,
    max_bytes: int = DEFAULT_MAX_EXTRACT_BYTES,
    max_ratio: float = DEFAULT_MAX_COMPRESSION_RATIO,
) -> ExtractResult:
    """Like :func:`extract_archive`, but also return the archive's sha256 and the members left out.

    Parameters
    ----------
    archive, dest, max_bytes, max_ratio
        As :func:`extract_archive`.
    sha256 : str, optional
        The archive's sha256 when the caller knows it (saves hashing it again).

    Returns
    -------
    ExtractResult
        Folder, sha256, links left out, and whether an earlier extraction was reused.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise ValueError(f"extract_archive: 'archive' must be an existing file. Got {str(archive)!r}.")
    if not max_bytes >= 0:
        raise ValueError(f"extract_archive: 'max_bytes' must be >= 0. Got {max_bytes!r}.")
    if not max_ratio >= 1:
        raise ValueError(f"extract_archive: 'max_ratio' must be >= 1. Got {max_ratio!r}.")
    size = archive.stat().st_size
    digest = sha256 or sha256_file(archive)
    marker = dest / EXTRACTED_MARKER
    recorded = _read_marker(marker) if marker.is_file() else None
    if recorded is not None and recorded.get("size") == size and recorded.get("sha256") == digest:
        return ExtractResult(path=dest, sha256=digest, skipped=list(recorded.get("skipped", [])), reused=True)

    budget = _Budget(archive, size, max_bytes, max_ratio)
    damaged = (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                members = _plan_zip(archive, zf, budget)
            kind = "zip"
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as tf:
                members = _plan_tar(archive, tf, dest, budget)
            kind = "tar"
        else:
            raise DataError(
                f"extract_archive: 'archive' must be a zip or tar (.tar, .tar.gz, .tgz) file. Got '{archive}'. "
                "Fix: delete it and fetch it again."
            )
    except damaged as error:
        raise _damaged(archive, error) from None

    for leftover in dest.parent.glob(f".{dest.name}.partial-*"):
        _remove(leftover)  # from an earlier, interrupted extraction
    tmp = make_partial_dir(dest.parent, dest.name)
    try:
        try:
            _extract_into(archive, kind, members, tmp, budget)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as error:
            raise _damaged(archive, error) from None
        except OSError as error:
            raise DataError(
                f"extract_archive: every member of '{archive}' must be writable under '{dest}'. Got "
                f"{type(error).__name__}: {error}. Nothing was kept. Fix: check the disk space and the archive."
            ) from None
        skipped = [{"member": m.name, "reason": f"{m.note}: links are not extracted"}
                   for m in members if m.kind == "link"]
        record = {"sha256": digest, "size": size, "skipped": skipped}
        (tmp / EXTRACTED_MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if dest.exists() or dest.is_symlink():
            old = dest.with_name(f".{dest.name}.partial-old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            _remove(old)
        else:
            os.replace(tmp, dest)
    except BaseException:
        _remove(tmp)
        raise
    return ExtractResult(path=dest, sha256=digest, skipped=skipped, reused=False)


def extract_archive(
    archive: str | Path,
    dest: str | Path,
    *,
    max_bytes: int = DEFAULT_MAX_EXTRACT_BYTES,
    max_ratio: float = DEFAULT_MAX_COMPRESSION_RATIO,
) -> Path:
    """Safely extract a zip, tar, tar.gz or tgz archive into ``dest``, skipping work already done.

    Every member is checked from the archive's own headers before anything is written: no absolute paths,
    no ``..`` escapes, no links pointing outside, no device or special files, at most ``max_bytes`` in all,
    and no member (zip) or archive (tar) expanding more than ``max_ratio`` times (members and archives that
    expand to at most :data:`RATIO_FLOOR_BYTES` are exempt from the ratio). Tar members pass :mod:`tarfile`'s
    ``data`` filter, which also writes them. While writing, each zip member is stopped at its declared size and
    the caps are checked again, so a header that lies stops at the cap too (a tar member's data is its declared
    size). Links inside the archive are left out (listed in the marker), so no extracted path is a link. Files
    and folders get the umask's permissions (0644 and 0755 under umask 022), whatever the archive says.

    Extraction goes to a hidden sibling folder that is renamed to ``dest`` on success (replacing an older
    ``dest``), with ``dest/.extracted`` recording the archive's sha256, size and the links left out (nothing
    that depends on where or when it ran). When the marker matches the archive, nothing is done.

    Parameters
    ----------
    archive : str or Path
        The archive; its type is read from its content, not its name.
    dest : str or Path
        Target folder; the archive's own top folder (if any) ends up inside it.
    max_bytes : int
        Cap on the bytes written in all (``download.max_extract_bytes``).
    max_ratio : float
        Cap on the compression ratio (``download.max_compression_ratio``).

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    UnsafeArchiveError
        A member with an absolute path, a ``..`` escape, a link pointing outside or a device file; a cap passed
        (the message names the member, its sizes and the param to raise).
    DataError
        Not a zip or tar archive, or a damaged one.
    """
    return extract_archive_detailed(archive, dest, max_bytes=max_bytes, max_ratio=max_ratio).path
