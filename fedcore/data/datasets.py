"""Dataset specs (registry ``DATASETS``) and :func:`ingest`: fetch, extract, scan, probe, write the manifest.

Datasets
    ``fsdd``
        Free Spoken Digit Dataset (Jakobovski et al., github.com/Jakobovski/free-spoken-digit-dataset).
        ``recordings/{digit}_{speaker}_{index}.wav``; official split: index 0-4 test, the rest train.
    ``esc50``
        ESC-50 (K. J. Piczak, ACM MM 2015). ``meta/esc50.csv`` gives category, fold and source file; fold
        ``download.test_fold`` is the test split. Any subset of the csv works (e.g. the ESC-10 offline copy).
    ``speechcommands``
        Speech Commands v2 (P. Warden, arXiv:1804.03209). ``<word>/<speaker>_nohash_<n>.wav``; files listed
        in ``testing_list.txt`` are test, the rest (validation list included) train; ``_background_noise_``
        is left out.
    ``manifest``
        Your own files: ``download.manifest`` is a CSV ``path,label,speaker[,split]``.

Every count, label, speaker and fold is read from the files, never hard-coded.

What goes into the output (``out_dir/<dataset>/``): only audio files that passed every check, copied (never
linked). Archives are extracted outside the output (``downloads_dir/<dataset>.extracted``, removed after a
successful ingest); the manifest's files are read where they lie. Each listed file is then

1. placed: its path must lie, after resolving ``.`` and ``..`` without touching the disk, under the dataset's
   folder (the extracted archive; for ``manifest`` the CSV's folder or ``download.manifest_root``);
2. opened one component at a time below that folder, refusing any symbolic link (file or folder) and anything
   that is not a regular file (FIFO, device, socket, a /proc or /sys file), so nothing outside is ever read;
3. checked: header (``download.max_audio_seconds``), then its bytes decoded once (truncation, NaN/Inf, range);
4. written into the output from the very bytes that were checked.

Files refused at steps 1-2 are listed in ``report.json`` under ``refused``; unreadable, empty, truncated,
non-audio, over-long or non-finite audio under ``skipped``; neither is ever written under the output, and
neither stops the ingest. A dataset left with fewer than two labels, or without train or test rows, fails
with the fix to apply, before anything is written.

``report.json`` and ``manifest.csv`` hold only what identifies the data (archive sha256, counts, labels, the
files' paths relative to the output), so the output is byte-identical wherever the archive came from (mirror or
URL) and wherever the output lies. Where it came from is written to ``downloads_dir/<dataset>.source.json``.
"""

from __future__ import annotations

import abc
import csv
import dataclasses
import hashlib
import json
import os
import shutil
import stat
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from fedcore.config import DownloadConfig, Params
from fedcore.data.audio import AudioInfo, audio_error_reason, inspect_audio, probe_handle
from fedcore.data.download import extract_archive_detailed, fetch_detailed, make_partial_dir, sha256_file
from fedcore.data.manifest import SPLITS, ManifestRow, write_manifest
from fedcore.errors import AudioError, DataError
from fedcore.registry import Registry

__all__ = [
    "DATASETS",
    "Candidate",
    "DatasetSpec",
    "IngestReport",
    "StageProgress",
    "ingest",
    "limit_per_class",
    "with_dataset_defaults",
]

StageProgress = Callable[[str, int, int | None], None]
"""``progress(stage, done, total_or_None)``; stages ``"download"`` (bytes) and ``"probe"`` (files checked)."""

_MANIFEST_EXTERNAL = "_external"  # files under download.manifest_root go to <dataset>/_external/<path below it>
_LIMIT_NAME = "download.max_audio_seconds"


@dataclass(frozen=True)
class Candidate:
    """One audio file found by a scan, before its audio is checked.

    Attributes
    ----------
    path : str
        POSIX path relative to the scanned root; for ``manifest``, the path as the CSV writes it (relative to
        the CSV's folder, or absolute). :func:`ingest` checks where it leads before reading anything.
    label, speaker : str
        Class name and speaker (or group) id.
    split : str
        ``"train"`` or ``"test"``.
    """

    path: str
    label: str
    speaker: str
    split: str


@dataclass(frozen=True)
class DatasetSpec(abc.ABC):
    """Where a dataset comes from and how its extracted files are labelled.

    Attributes
    ----------
    name : str
        Registry name; also the folder under the output and (by default) under the mirror.
    url : str or None
        Default URL of the archive (None: nothing to download).
    sha256 : str or None
        Default sha256 of the archive (None when unknown or unstable, e.g. GitHub branch archives).
    filename : str or None
        Archive file name.
    mirror_subdir : str or None
        Folder of the archive inside the mirror.
    mirror_names : tuple of str
        Other archive names accepted in the mirror (offline copies).
    label_fix, split_fix : str
        What to change when the ingested rows have fewer than two labels, or lack a train or test split.
    clip_seconds : float
        The dataset's own feature crop length, used where ``features.clip_seconds`` is None: its clips' length
        (see :func:`with_dataset_defaults`).
    """

    name: str
    url: str | None = None
    sha256: str | None = None
    filename: str | None = None
    mirror_subdir: str | None = None
    mirror_names: tuple[str, ...] = ()
    label_fix: str = "check that download.url points to the dataset's full archive"
    split_fix: str = "check that download.url points to the dataset's full archive"
    clip_seconds: float = 1.0

    @abc.abstractmethod
    def scan(self, root: Path, cfg: DownloadConfig) -> list[Candidate]:
        """List the audio files under ``root`` with label, speaker and split (no audio is read).

        Parameters
        ----------
        root : Path
            The extracted archive (``manifest``: the CSV's folder).
        cfg : DownloadConfig
            Dataset options (``test_fold``, ``esc10_only``, ``manifest``, ``test_fraction``).

        Returns
        -------
        list of Candidate
            Sorted by path.
        """


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def with_dataset_defaults(params: Params) -> Params:
    """``params`` with the feature settings it leaves None set to the dataset's own (``download.dataset``).

    Today one setting: ``features.clip_seconds`` None becomes the dataset's :attr:`DatasetSpec.clip_seconds`
    (1 s for FSDD and Speech Commands, 5 s for ESC-50), so a study that switches datasets keeps whole clips
    without a second override. A value set in the params always wins.
    """
    if params.features.clip_seconds is not None:
        return params
    spec = DATASETS.build(params.download.dataset)
    return dataclasses.replace(params, features=dataclasses.replace(params.features, clip_seconds=spec.clip_seconds))


# --------------------------------------------------------------------------------------------------- helpers
def _find(root: Path, relative: str, dataset: str, *, want_dir: bool) -> Path:
    """Return ``root/relative`` or ``root/<top>/relative`` (archives with one top folder)."""
    candidates = [root / relative, *sorted(p / relative for p in root.iterdir() if p.is_dir())]
    for candidate in candidates:
        if candidate.is_dir() if want_dir else candidate.is_file():
            return candidate
    raise DataError(
        f"{dataset}: '{relative}' must exist in '{root}' or one folder below. Got a folder without it. "
        f"Fix: check that download.url points to the {dataset} archive."
    )


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _wavs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".wav" and p.is_file())


def _read_csv(path: Path, required: Sequence[str], where: str) -> tuple[list[dict[str, str]], list[str]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        missing = [column for column in required if column not in header]
        if missing:
            raise ValueError(
                f"{where}: the columns of '{path}' must include {', '.join(required)}. "
                f"Got {header!r} (missing {', '.join(missing)})."
            )
        rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    return rows, header


def limit_per_class(candidates: Sequence[Candidate], max_per_class: int | None) -> list[Candidate]:
    """Keep at most ``max_per_class`` files per (label, split): the first ones by sorted path.

    Parameters
    ----------
    candidates : sequence of Candidate
        Scan result.
    max_per_class : int or None
        Limit (None: keep all).

    Returns
    -------
    list of Candidate
        Sorted by path.
    """
    ordered = sorted(candidates, key=lambda c: c.path)
    if max_per_class is None:
        return ordered
    if max_per_class < 1:
        raise ValueError(f"download: 'max_per_class' must be >= 1 or None. Got {max_per_class!r}.")
    kept: list[Candidate] = []
    counts: Counter[tuple[str, str]] = Counter()
    for candidate in ordered:
        key = (candidate.label, candidate.split)
        if counts[key] < max_per_class:
            counts[key] += 1
            kept.append(candidate)
    return kept


def _hash_split(path: str, test_fraction: float) -> str:
    """Stable split from the sha1 of the path: test iff its first 8 bytes, read as a fraction, < test_fraction."""
    value = int.from_bytes(hashlib.sha1(path.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return "test" if value < test_fraction else "train"


# --------------------------------------------------------------------------------------------------- specs
@DATASETS.register("fsdd")
@dataclass(frozen=True)
class FSDD(DatasetSpec):
    """Free Spoken Digit Dataset: ``recordings/{digit}_{speaker}_{index}.wav``, test iff index 0-4."""

    name: str = "fsdd"
    url: str | None = "https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/heads/master.zip"
    sha256: str | None = None  # GitHub branch archive: bytes change with every commit
    filename: str | None = "free-spoken-digit-dataset-master.zip"
    mirror_subdir: str | None = "fsdd"
    split_fix: str = ("FSDD's test split is recordings 0-4 of each digit and speaker, the rest train: check that "
                      "download.url points to the full archive")
    test_indices: tuple[int, ...] = (0, 1, 2, 3, 4)  # the README's official split

    def scan(self, root: Path, cfg: DownloadConfig) -> list[Candidate]:
        """List ``recordings/*.wav``; label, speaker and index come from the file name."""
        recordings = _find(root, "recordings", self.name, want_dir=True)
        found = []
        for wav in _wavs(recordings):
            parts = wav.stem.split("_")
            if len(parts) < 3 or not parts[0].isdigit() or not parts[-1].isdigit():
                continue  # not a {digit}_{speaker}_{index} recording
            split = "test" if int(parts[-1]) in self.test_indices else "train"
            found.append(Candidate(_rel(wav, root), parts[0], "_".join(parts[1:-1]), split))
        return found


@DATASETS.register("esc50")
@dataclass(frozen=True)
class ESC50(DatasetSpec):
    """ESC-50: ``meta/esc50.csv`` + ``audio/``; label = category, speaker = src_file, test = cfg.test_fold."""

    name: str = "esc50"
    url: str | None = "https://github.com/karoldvl/ESC-50/archive/master.zip"
    sha256: str | None = None  # GitHub branch archive
    filename: str | None = "ESC-50-master.zip"
    mirror_subdir: str | None = "esc50"
    mirror_names: tuple[str, ...] = ("ESC-50-master-esc10-16k.zip",)
    label_fix: str = "check download.url and meta/esc50.csv (with download.esc10_only the csv's esc10 rows are kept)"
    split_fix: str = "set download.test_fold to a fold whose clips are readable (the others are train)"
    columns: tuple[str, ...] = ("filename", "fold", "target", "category", "esc10", "src_file", "take")
    clip_seconds: float = 5.0  # every ESC-50 clip lasts 5 s

    def scan(self, root: Path, cfg: DownloadConfig) -> list[Candidate]:
        """Read ``meta/esc50.csv``; keep ESC-10 rows only when ``cfg.esc10_only``."""
        csv_path = _find(root, "meta/esc50.csv", self.name, want_dir=False)
        audio = csv_path.parent.parent / "audio"
        rows, _ = _read_csv(csv_path, self.columns, self.name)
        if cfg.esc10_only:
            rows = [row for row in rows if row["esc10"].lower() == "true"]
        if not rows:
            raise DataError(
                f"esc50: '{csv_path}' must list at least one clip (esc10_only={cfg.esc10_only}). Got none."
            )
        try:
            folds = sorted({int(row["fold"]) for row in rows})
        except ValueError:
            bad = next(row["fold"] for row in rows if not row["fold"].lstrip("-").isdigit())
            raise DataError(f"esc50: 'fold' in '{csv_path}' must be an integer. Got {bad!r}.") from None
        if cfg.test_fold not in folds:
            raise ValueError(
                f"esc50: 'test_fold' must be one of the folds in '{csv_path}' ({', '.join(map(str, folds))}). "
                f"Got {cfg.test_fold!r}. Fix: set download.test_fold to one of them."
            )
        found = [
            Candidate(
                _rel(audio / row["filename"], root), row["category"], row["src_file"],
                "test" if int(row["fold"]) == cfg.test_fold else "train",
            )
            for row in rows
        ]
        return sorted(found, key=lambda c: c.path)


@DATASETS.register("speechcommands")
@dataclass(frozen=True)
class SpeechCommands(DatasetSpec):
    """Speech Commands v2: ``<word>/<speaker>_nohash_<n>.wav``; test iff listed in ``testing_list.txt``."""

    name: str = "speechcommands"
    url: str | None = "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz"
    sha256: str | None = "af14739ee7dc311471de98f5f9d2c9191b18aedfe957f4a6ff791c709868ff58"  # torchaudio's
    filename: str | None = "speech_commands_v0.02.tar.gz"
    mirror_subdir: str | None = "speechcommands"
    split_fix: str = "check that the archive's testing_list.txt lists its test files (the others are train)"

    def scan(self, root: Path, cfg: DownloadConfig) -> list[Candidate]:
        """List every ``<word>/*.wav`` except folders starting with ``_`` (``_background_noise_``)."""
        base = _find(root, "testing_list.txt", self.name, want_dir=False).parent
        testing_text = (base / "testing_list.txt").read_text(encoding="utf-8")
        testing = {line.strip().replace("\\", "/") for line in testing_text.splitlines() if line.strip()}
        found = []
        for word in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
            for wav in _wavs(word):
                speaker = wav.name.split("_nohash_")[0] if "_nohash_" in wav.name else wav.stem
                split = "test" if f"{word.name}/{wav.name}" in testing else "train"
                found.append(Candidate(_rel(wav, root), word.name, speaker, split))
        return found


@DATASETS.register("manifest")
@dataclass(frozen=True)
class ManifestDataset(DatasetSpec):
    """Your own audio listed in ``cfg.manifest``, a CSV ``path,label,speaker[,split]``.

    Paths are relative to the CSV's folder, or absolute; either way they must lead, after resolving ``..``,
    under the CSV's folder or under ``cfg.manifest_root``. Files under the CSV's folder keep their relative path
    in the output; files under ``manifest_root`` go to ``_external/<path below it>``.
    """

    name: str = "manifest"
    label_fix: str = "list files of at least two labels in download.manifest"
    split_fix: str = ("give the CSV a 'split' column with both train and test rows, or set download.test_fraction "
                      "above 0 for the rows without a split")

    def csv_path(self, cfg: DownloadConfig) -> Path:
        """Return ``cfg.manifest`` as a path, checking that it is an existing file."""
        if not cfg.manifest:
            raise ValueError(
                "manifest: 'manifest' must be the path of a CSV with columns path,label,speaker[,split]. "
                "Got None. Fix: set download.manifest."
            )
        path = Path(cfg.manifest).expanduser()
        if not path.is_file():
            raise ValueError(
                f"manifest: 'manifest' must be an existing CSV file. Got {cfg.manifest!r} (no such file)."
            )
        return path

    def roots(self, cfg: DownloadConfig) -> list[tuple[str, Path]]:
        """``(output prefix, folder)`` of the folders the CSV may list files under: its own, then manifest_root."""
        roots = [("", self.csv_path(cfg).parent.absolute())]
        if cfg.manifest_root:
            root = Path(cfg.manifest_root).expanduser().absolute()
            if not root.is_dir():
                raise ValueError(
                    f"manifest: 'manifest_root' must be an existing folder. Got {cfg.manifest_root!r} "
                    "(no such folder). Fix: correct download.manifest_root, or set it to null."
                )
            roots.append((_MANIFEST_EXTERNAL, root))
        return roots

    def scan(self, root: Path, cfg: DownloadConfig) -> list[Candidate]:
        """Read the CSV (no audio and no listed file is touched); a missing split is drawn by sha1 of the path."""
        csv_path = self.csv_path(cfg)
        base = csv_path.parent.absolute()
        rows, header = _read_csv(csv_path, ("path", "label", "speaker"), self.name)
        has_split = "split" in header
        found: dict[str, Candidate] = {}
        for line, row in enumerate(rows, start=2):
            for column in ("path", "label", "speaker"):
                if not row[column]:
                    raise ValueError(
                        f"manifest: '{column}' must be non-empty ({csv_path}, line {line}). Got {row[column]!r}."
                    )
            written = row["path"].replace("\\", "/")
            key = os.path.normpath(base / Path(written).expanduser())
            split = row.get("split", "") if has_split else ""
            if split and split not in SPLITS:
                raise ValueError(
                    f"manifest: 'split' must be one of {', '.join(SPLITS)} or empty ({csv_path}, line {line}). "
                    f"Got {split!r}."
                )
            split = split or _hash_split(PurePosixPath(written).as_posix(), cfg.test_fraction)
            if key in found:
                raise ValueError(f"manifest: 'path' must be unique ({csv_path}, line {line}). Got {written!r} twice.")
            found[key] = Candidate(written, row["label"], row["speaker"], split)
        return sorted(found.values(), key=lambda c: c.path)


# --------------------------------------------------------------------------------------------------- ingest
@dataclass(frozen=True)
class IngestReport:
    """Summary of an ingest, written as ``report.json`` (without ``url`` and ``source``).

    Attributes
    ----------
    dataset : str
        Registry name.
    sha256 : str or None
        Actual sha256 of the archive (``manifest``: of the CSV).
    num_files, num_ok, num_skipped, num_refused : int
        Files considered (after ``max_per_class``), written to the manifest, skipped (bad audio), refused
        (outside the dataset's folder, links, special files, and the archive's links, which are never
        extracted); ``num_files = num_ok + num_skipped + num_refused``.
    skipped : list of dict
        ``{"path", "reason"}`` per file whose audio cannot be used.
    refused : list of dict
        ``{"path", "reason"}`` per listed path that was never read: outside the allowed folders, a symlink
        (or under a symlinked folder), or not a regular file.
    labels : dict
        Label → number of manifest rows.
    speakers : int
        Distinct speakers in the manifest.
    splits : dict
        Split → number of manifest rows.
    total_seconds : float
        Summed duration of the manifest rows.
    url : str or None
        URL asked for (None for ``manifest``). Run-specific: not in ``report.json``, not compared.
    source : str or None
        Mirror file used, the URL, or the manifest CSV. Run-specific: not in ``report.json``, not compared.
    """

    dataset: str
    sha256: str | None
    num_files: int
    num_ok: int
    num_skipped: int
    num_refused: int
    skipped: list[dict[str, str]]
    refused: list[dict[str, str]]
    labels: dict[str, int]
    speakers: int
    splits: dict[str, int]
    total_seconds: float
    url: str | None = field(default=None, compare=False)
    source: str | None = field(default=None, compare=False)

    RUN_SPECIFIC: ClassVar[tuple[str, ...]] = ("url", "source")

    def to_dict(self, *, run_specific: bool = True) -> dict[str, Any]:
        """Plain dict; ``run_specific=False`` leaves out ``url`` and ``source``, as ``report.json`` does."""
        data = dataclasses.asdict(self)
        return data if run_specific else {k: v for k, v in data.items() if k not in self.RUN_SPECIFIC}

    @classmethod
    def load(cls, path: str | Path) -> IngestReport:
        """Read a ``report.json`` written by :func:`ingest` (``url`` and ``source`` come back as None)."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def _write_json(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _Refused(Exception):
    """A listed path that is never read (its reason goes to the report's ``refused``)."""


@dataclass(frozen=True)
class _Root:
    """A folder the dataset's files may lie under, opened once; ``prefix`` is where its files go in the output."""

    prefix: str
    path: Path  # absolute, as given
    real: Path  # with symlinks resolved (the folder itself is trusted; what lies below it is checked)
    fd: int


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _pseudo_devices() -> set[int]:
    """st_dev of /proc and /sys when they are mounted file systems of their own (their files claim to be regular)."""
    try:
        root_dev = os.stat("/").st_dev
    except OSError:
        return set()
    return {os.stat(p).st_dev for p in ("/proc", "/sys") if os.path.isdir(p)} - {root_dev}


def _place(written: str, base: Path, roots: Sequence[_Root], allowed: str) -> tuple[_Root, tuple[str, ...]]:
    """The root a listed path lies under and its components below it, from the text alone (no disk access)."""
    if "\0" in written:
        raise _Refused("unusable path: it holds a NUL byte")
    path = Path(written).expanduser()
    full = Path(os.path.normpath(path if path.is_absolute() else base / path))
    for root in roots:
        for form in (root.path, root.real):
            if full == form:
                raise _Refused(f"special file: {allowed} itself, not a file in it")
            if full.is_relative_to(form):
                return root, full.relative_to(form).parts
    if path.is_absolute():
        raise _Refused(f"outside: an absolute path not under {allowed}")
    raise _Refused(f"outside: '..' leads out of {allowed}")


def _open_below(root: _Root, parts: tuple[str, ...], pseudo: set[int]) -> tuple[int, os.stat_result]:
    """Open ``root/parts`` for reading one component at a time, refusing links and non-regular files.

    Raises ``_Refused`` for a symlink anywhere below the root, a non-regular file or a /proc-like file, and
    ``FileNotFoundError`` when a component is missing. Nothing is read and nothing outside the root is opened.
    """
    opened: list[int] = []
    dir_fd = root.fd
    try:
        for depth, name in enumerate(parts[:-1], start=1):
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                raise _Refused(f"symlink: the folder {'/'.join(parts[:depth])!r} is a symbolic link")
            if not stat.S_ISDIR(info.st_mode):
                raise FileNotFoundError(f"{'/'.join(parts[:depth])!r} is {_kind(info.st_mode)}, not a folder")
            dir_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            opened.append(dir_fd)
        info = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(info.st_mode):
            raise _Refused("symlink: the file is a symbolic link")
        if not stat.S_ISREG(info.st_mode):
            raise _Refused(f"special file: {_kind(info.st_mode)}, not a regular file")
        if info.st_dev in pseudo:
            raise _Refused("special file: a /proc or /sys file, not a regular file")
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        opened_info = os.fstat(fd)
        if (opened_info.st_dev, opened_info.st_ino) != (info.st_dev, info.st_ino) \
                or not stat.S_ISREG(opened_info.st_mode):
            os.close(fd)
            raise _Refused("special file: it changed while being opened")
        return fd, opened_info
    except OSError as error:
        if error.errno == getattr(os, "ELOOP", -1):  # a component swapped for a link between stat and open
            raise _Refused("symlink: a component became a symbolic link") from None
        raise
    finally:
        for fd_ in opened:
            os.close(fd_)


def _read_checked(root: _Root, parts: tuple[str, ...], shown: str, cfg: DownloadConfig,
                  pseudo: set[int]) -> tuple[bytes, AudioInfo]:
    """The bytes of a listed file and its audio info, once every check has passed (nothing is written)."""
    try:
        fd, info = _open_below(root, parts, pseudo)
    except FileNotFoundError:
        raise AudioError(f"audio: '{shown}' cannot be used: missing: no such file.") from None
    except OSError as error:
        raise AudioError(f"audio: '{shown}' cannot be used: unreadable: {error.strerror or error}.") from None
    with os.fdopen(fd, "rb") as handle:
        probe_handle(handle, shown, max_seconds=cfg.max_audio_seconds, limit_name=_LIMIT_NAME)  # header only
        handle.seek(0)
        data = handle.read(info.st_size + 1)
    if len(data) != info.st_size:
        raise _Refused(f"special file: {len(data)} bytes read where its size says {info.st_size}")
    return data, inspect_audio(data, shown, max_seconds=cfg.max_audio_seconds, limit_name=_LIMIT_NAME)


def _open_roots(folders: Sequence[tuple[str, Path]]) -> list[_Root]:
    roots = []
    try:
        for prefix, folder in folders:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            roots.append(_Root(prefix, Path(folder).absolute(), Path(os.path.realpath(folder)), fd))
    except BaseException:
        for root in roots:
            os.close(root.fd)
        raise
    return roots


def _check_rows(spec: DatasetSpec, rows: Sequence[ManifestRow], num_files: int, skipped: list[dict[str, str]],
                refused: list[dict[str, str]], out_dir: Path) -> None:
    """Refuse a result that cannot be trained and tested on: no rows, one label, or an empty split."""
    summary = f"{len(skipped)} skipped, {len(refused)} refused"
    if not rows:
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in (skipped + refused)[:3]) \
            or "the scan found no audio files"
        raise DataError(
            f"ingest: {spec.name} must yield at least one readable audio file. Got 0 of {num_files} "
            f"({reasons}). Nothing was written to '{out_dir}'."
        )
    labels = sorted({row.label for row in rows})
    if len(labels) < 2:
        raise DataError(
            f"ingest: {spec.name} must have at least two labels to learn to tell apart. Got {len(labels)} "
            f"({', '.join(map(repr, labels))}) in {len(rows)} usable files ({summary}). Nothing was written to "
            f"'{out_dir}'. Fix: {spec.label_fix}."
        )
    splits = Counter(row.split for row in rows)
    if missing := [split for split in SPLITS if not splits[split]]:
        raise DataError(
            f"ingest: {spec.name} must have rows in both splits (train and test). Got no {' or '.join(missing)} "
            f"rows ({dict(sorted(splits.items()))} of {len(rows)} usable files; {summary}). Nothing was written "
            f"to '{out_dir}'. Fix: {spec.split_fix}."
        )


def _swap_into_place(tmp: Path, dest: Path) -> None:
    old = dest.with_name(f".{dest.name}.partial-old-{os.getpid()}")
    if dest.exists() or dest.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def ingest(
    cfg: DownloadConfig,
    out_dir: str | Path,
    downloads_dir: str | Path,
    *,
    mirror: str | Path | None,
    progress: StageProgress | None = None,
) -> IngestReport:
    """Fetch, extract, scan and check a dataset; write the good audio, ``manifest.csv`` and ``report.json``.

    Parameters
    ----------
    cfg : DownloadConfig
        Dataset name, URL/sha256 overrides, dataset options and limits (``max_audio_seconds``,
        ``max_extract_bytes``, ``max_compression_ratio``, ``manifest_root``).
    out_dir : str or Path
        Output folder: ``<dataset>/`` (the audio that passed), ``manifest.csv``, ``report.json``. Its content
        depends only on the data and the params, not on where the archive came from or where ``out_dir`` lies.
    downloads_dir : str or Path
        Where the archive is kept (and resumed), extracted while checking, and where ``<dataset>.source.json``
        records the URL and the file or URL it came from.
    mirror : str or Path or None
        Mirror folder as resolved by the caller (see :func:`fedcore.data.download.resolve_mirror`); it must exist.
    progress : callable, optional
        ``progress(stage, done, total_or_None)``.

    Returns
    -------
    IngestReport
        Also written to ``out_dir/report.json`` (without ``url`` and ``source``).

    Raises
    ------
    DownloadError, ChecksumError, UnsafeArchiveError
        From fetching and extracting (missing mirror folder, archive over the size or ratio caps).
    ValueError
        Bad options (unknown test fold, manifest CSV missing or lacking columns, missing ``manifest_root``).
    DataError
        No usable audio file at all, fewer than two labels, or an empty train or test split; the message names
        the fix. The previous outputs are then left as they were.
    """
    spec = DATASETS.build(cfg.dataset)
    out_dir, downloads_dir = Path(out_dir), Path(downloads_dir)
    dataset_dir = out_dir / spec.name
    refused: list[dict[str, str]] = []
    skipped: list[dict[str, str]] = []
    staging: Path | None = None

    if isinstance(spec, ManifestDataset):
        csv_path = spec.csv_path(cfg)
        url, source, digest = None, str(csv_path), sha256_file(csv_path)
        folders = spec.roots(cfg)
        allowed = "the CSV's folder" + (" or download.manifest_root" if cfg.manifest_root else "")
        candidates = limit_per_class(spec.scan(folders[0][1], cfg), cfg.max_per_class)
    else:
        url = cfg.url or spec.url
        if url is None:
            raise ValueError(f"download: 'url' must be set for dataset {spec.name!r} (no default). Got None.")
        fetched = fetch_detailed(
            url, downloads_dir,
            filename=spec.filename if cfg.url is None else None,
            sha256=cfg.sha256 or spec.sha256,
            mirror=mirror, mirror_subdir=spec.mirror_subdir, mirror_names=spec.mirror_names,
            timeout_s=cfg.timeout_s, retries=cfg.retries,
            progress=(lambda done, total: progress("download", done, total)) if progress is not None else None,
        )
        source, digest = fetched.source, fetched.sha256
        staging = downloads_dir / f"{spec.name}.extracted"
        shutil.rmtree(staging, ignore_errors=True)  # always a fresh extraction: nothing left over is trusted
        extracted = extract_archive_detailed(
            fetched.path, staging, sha256=fetched.sha256,
            max_bytes=cfg.max_extract_bytes, max_ratio=cfg.max_compression_ratio,
        )
        refused += [{"path": f"{spec.name}/{s['member']}", "reason": s["reason"]} for s in extracted.skipped]
        folders = [("", staging)]
        allowed = "the archive's folder"
        candidates = limit_per_class(spec.scan(staging, cfg), cfg.max_per_class)
    num_files = len(candidates) + len(refused)

    roots = _open_roots(folders)
    pseudo = _pseudo_devices()
    for leftover in out_dir.glob(f".{spec.name}.partial-*"):  # from an earlier, killed ingest
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = make_partial_dir(out_dir, spec.name)
    rows: list[ManifestRow] = []
    seen: set[str] = set()
    try:
        for done, candidate in enumerate(candidates, start=1):
            shown = candidate.path
            try:
                root, parts = _place(candidate.path, roots[0].path, roots, allowed)
                relative = "/".join([root.prefix, *parts] if root.prefix else parts)
                shown = f"{spec.name}/{relative}"
                sample_id = PurePosixPath(relative).with_suffix("").as_posix()
                if sample_id in seen:
                    raise AudioError(f"audio: '{shown}' cannot be used: duplicate id {sample_id!r} (another file "
                                     "differs only by its extension).")
                data, info = _read_checked(root, parts, shown, cfg, pseudo)
            except _Refused as error:
                refused.append({"path": shown, "reason": str(error)})
            except AudioError as error:
                skipped.append({"path": shown, "reason": audio_error_reason(error)})
            else:
                target = tmp.joinpath(*PurePosixPath(relative).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with target.open("xb") as out:
                    out.write(data)
                seen.add(sample_id)
                rows.append(
                    ManifestRow(
                        id=sample_id, path=f"{spec.name}/{relative}", label=candidate.label,
                        speaker=candidate.speaker, split=candidate.split, duration=info.duration,
                        sample_rate=info.sample_rate,
                    )
                )
            if progress is not None:
                progress("probe", done, len(candidates))
        _check_rows(spec, rows, num_files, skipped, refused, out_dir)
        _swap_into_place(tmp, dataset_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for root in roots:
            os.close(root.fd)

    report = IngestReport(
        dataset=spec.name,
        sha256=digest,
        num_files=num_files,
        num_ok=len(rows),
        num_skipped=len(skipped),
        num_refused=len(refused),
        skipped=skipped,
        refused=refused,
        labels=dict(sorted(Counter(row.label for row in rows).items())),
        speakers=len({row.speaker for row in rows}),
        splits=dict(sorted(Counter(row.split for row in rows).items())),
        total_seconds=float(sum(row.duration for row in rows)),
        url=url,
        source=source,
    )
    write_manifest(rows, out_dir / "manifest.csv")
    _write_json(report.to_dict(run_specific=False), out_dir / "report.json")
    _write_json({"dataset": spec.name, "url": url, "source": source, "sha256": digest},
                downloads_dir / f"{spec.name}.source.json")
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
    return report
