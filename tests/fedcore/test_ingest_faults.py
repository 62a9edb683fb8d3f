"""Fault injection at ingest: files from outside the dataset, archive bombs, bad audio, unusable datasets, a missing
mirror, and outputs that must not depend on where the archive came from.

Every case runs in-process on real files: real FSDD recordings from the shared archive, WAVs written with
soundfile, real symlinks, FIFOs and sockets. The files planted outside the dataset carry a unique token (inside a
valid WAV, so that only the path checks can keep them out), which must be found nowhere under the output.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import socket
import stat
import struct
import tarfile
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fedcore.config import DownloadConfig
from fedcore.data.audio import probe_audio, read_audio
from fedcore.data.datasets import IngestReport, ingest
from fedcore.data.download import RATIO_FLOOR_BYTES, extract_archive
from fedcore.data.manifest import read_manifest
from fedcore.errors import AudioError, DataError, DownloadError, UnsafeArchiveError
from tests.conftest import sine

FSDD_TOP = "free-spoken-digit-dataset-master/recordings/"


# --------------------------------------------------------------------------------------------------- helpers
def _token_wav(token: str, seconds: float = 0.3) -> bytes:
    """A valid PCM WAV whose last chunk (after ``data``; readers skip it) holds ``token``."""
    buffer = io.BytesIO()
    sf.write(buffer, sine(8000, seconds, 500.0), 8000, format="WAV", subtype="PCM_16")
    chunk = token.encode()
    chunk += b"\0" * (len(chunk) & 1)
    data = bytearray(buffer.getvalue() + b"tokn" + struct.pack("<I", len(chunk)) + chunk)
    struct.pack_into("<I", data, 4, len(data) - 8)  # RIFF size covers the extra chunk
    return bytes(data)


def _fsdd_wavs(fsdd_zip: Path, digits: tuple[str, ...], speaker: str, indices: range) -> dict[str, bytes]:
    """Real recordings ``{digit}_{speaker}_{index}.wav`` from the shared archive."""
    with zipfile.ZipFile(fsdd_zip) as zf:
        names = [f"{d}_{speaker}_{i}.wav" for d in digits for i in indices]
        return {name: zf.read(FSDD_TOP + name) for name in names}


def _files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() or path.is_symlink():
            yield path


def _tree_digest(folder: Path) -> str:
    """sha256 over every entry under ``folder``: relative path, kind, mode bits and bytes."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        digest.update(f"{path.relative_to(folder).as_posix()}\0{stat.S_IFMT(info.st_mode)}\0"
                      f"{stat.S_IMODE(info.st_mode):o}\0".encode())
        if stat.S_ISREG(info.st_mode):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _assert_token_absent(token: str, *folders: Path) -> None:
    needle = token.encode()
    for folder in folders:
        if not folder.exists():
            continue
        for path in folder.rglob("*"):
            assert token not in path.name, path
            if path.is_file() and not path.is_symlink():
                assert needle not in path.read_bytes(), f"the outside token leaked into {path}"


def _write_csv(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label", "speaker", "split"])
        writer.writerows(rows)
    return path


def _good_rows(folder: Path, fsdd_zip: Path, sub: str = "clips") -> list[tuple[str, str, str, str]]:
    """Real FSDD WAVs (2 digits x 1 speaker x 6 indices) under ``folder/sub``, listed relative to ``folder``."""
    (folder / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for name, data in _fsdd_wavs(fsdd_zip, ("3", "8"), "theo", range(3, 9)).items():
        (folder / sub / name).write_bytes(data)
        digit, speaker, index = name[:-4].split("_")
        rows.append((f"{sub}/{name}", digit, speaker, "test" if int(index) < 5 else "train"))
    return rows


# --------------------------------------------------------------------------------------------------- escapes
@pytest.mark.timeout(120)  # a FIFO opened for reading would block forever
def test_manifest_paths_outside_links_and_special_files_are_refused_and_never_read(
    tmp_path: Path, fsdd_zip: Path
) -> None:
    token = f"TOKEN-{uuid.uuid4().hex}"
    outside = tmp_path / "outside"
    (outside / "etc").mkdir(parents=True)
    (outside / "dir").mkdir()
    (outside / "etc" / "passwd").write_text(f"root:x:0:0:{token}:/root:/bin/sh\n")
    (outside / "secret.wav").write_bytes(_token_wav(token))  # valid audio: only the path checks can refuse it
    (outside / "other.wav").write_bytes(_token_wav(token))
    (outside / "dir" / "a.wav").write_bytes(_token_wav(token))

    mine = tmp_path / "data" / "mine"
    good = _good_rows(mine, fsdd_zip)
    (mine / "kept_b").mkdir()
    extra = _fsdd_wavs(fsdd_zip, ("3",), "george", range(7, 8))
    (mine / "kept_b" / "3_george_7.wav").write_bytes(extra["3_george_7.wav"])
    good.append(("nowhere/../kept_b/3_george_7.wav", "3", "george", "train"))  # '..' that stays inside: fine
    (mine / "clips" / "link.wav").symlink_to(outside / "secret.wav")
    (mine / "linked_dir").symlink_to(outside / "dir", target_is_directory=True)
    os.mkfifo(mine / "clips" / "fifo.wav")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(mine / "clips" / "sock.wav"))
    try:
        os.mknod(mine / "clips" / "dev.wav", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
        device = True
    except (PermissionError, OSError):
        device = False
    bad = {
        "../../../../../../../../etc/passwd": "outside: '..'",
        "../../outside/etc/passwd": "outside: '..'",
        "../../outside/other.wav": "outside: '..'",
        str(outside / "secret.wav"): "outside: an absolute path",
        "/proc/self/environ": "outside: an absolute path",
        "clips/link.wav": "symlink: the file is a symbolic link",
        "linked_dir/a.wav": "symlink: the folder 'linked_dir' is a symbolic link",
        "clips/fifo.wav": "special file: a FIFO",
        "clips/sock.wav": "special file: a socket",
        **({"clips/dev.wav": "special file: a character device"} if device else {}),
    }
    listing = _write_csv(mine / "list.csv", good + [(path, "3", "eve", "train") for path in bad])
    raw, downloads = tmp_path / "raw", tmp_path / "dl"
    try:
        report = ingest(DownloadConfig(dataset="manifest", manifest=str(listing)), raw, downloads, mirror=None)
    finally:
        server.close()

    shown = {r["path"]: r["reason"] for r in report.refused}
    for written, reason in bad.items():
        key = written if written.startswith(("/", "..")) else f"manifest/{written}"
        assert shown[key].startswith(reason), (written, shown.get(key))
    assert report.num_refused == len(bad) and report.num_skipped == 0 and report.num_ok == len(good)
    assert report.num_files == len(good) + len(bad)
    assert IngestReport.load(raw / "report.json").refused == report.refused  # listed in report.json too

    expected = {f"manifest/{Path(p).as_posix()}" for p, *_ in good if ".." not in p}
    expected.add("manifest/kept_b/3_george_7.wav")
    assert {row.path for row in read_manifest(raw / "manifest.csv")} == expected
    written = {p.relative_to(raw).as_posix() for p in _files(raw)}
    assert written == expected | {"manifest.csv", "report.json"}  # nothing else, not even a partial folder
    for path in expected:
        source = mine / path.removeprefix("manifest/")
        assert (raw / path).read_bytes() == source.read_bytes()
        assert (raw / path).stat().st_nlink == 1  # copied, not hard-linked
    _assert_token_absent(token, raw, downloads)
    environ = Path("/proc/self/environ")
    if environ.exists() and len(secret := environ.read_bytes()) > 32:
        assert not any(secret in p.read_bytes() for p in _files(raw))


def test_manifest_csv_reached_through_a_symlinked_folder_still_ingests(tmp_path: Path, fsdd_zip: Path) -> None:
    real = tmp_path / "real"
    rows = _good_rows(real, fsdd_zip)
    _write_csv(real / "list.csv", rows)
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)  # the user's own path: trusted
    report = ingest(DownloadConfig(dataset="manifest", manifest=str(tmp_path / "alias" / "list.csv")),
                    tmp_path / "raw", tmp_path / "dl", mirror=None)
    assert report.num_ok == len(rows) and report.num_refused == 0


def test_archive_member_escaping_through_the_dataset_csv_is_refused(tmp_path: Path) -> None:
    """ESC-50's csv names files; a name with '..' must not lead out of the extracted archive."""
    token = f"TOKEN-{uuid.uuid4().hex}"
    (tmp_path / "planted.wav").write_bytes(_token_wav(token))
    audio = {f"ESC-50-master/audio/{i}-1-A-{t}.wav": _token_wav("ok" * (i + 1)) for i, t in ((1, 0), (2, 1),
                                                                                                (3, 0), (4, 1))}
    csv_text = "filename,fold,target,category,esc10,src_file,take\n" + "".join(
        f"{name.rsplit('/', 1)[-1]},{name.rsplit('/', 1)[-1][0]},{name[-5]},{'dog' if name[-5] == '0' else 'cat'},"
        f"True,{i},A\n" for i, name in enumerate(audio))
    escape = "../../../../../../" + str(tmp_path / "planted.wav").lstrip("/")
    csv_text += f"{escape},1,0,dog,True,99,A\n"
    archive = tmp_path / "ESC-50-master.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ESC-50-master/meta/esc50.csv", csv_text)
        for name, data in audio.items():
            zf.writestr(name, data)
    report = ingest(DownloadConfig(dataset="esc50", url=str(archive), test_fold=4), tmp_path / "raw",
                    tmp_path / "dl", mirror=None)
    assert report.num_ok == 4 and report.num_refused == 1
    assert report.refused[0]["reason"].startswith("outside: '..'")
    _assert_token_absent(token, tmp_path / "raw")


def test_links_inside_an_archive_are_not_extracted_and_are_reported(tmp_path: Path, fsdd_zip: Path) -> None:
    wavs = _fsdd_wavs(fsdd_zip, ("1", "2"), "lucas", range(3, 7))
    archive = tmp_path / "fsdd.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, data in wavs.items():
            info = tarfile.TarInfo(FSDD_TOP + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(FSDD_TOP + "1_lucas_9.wav")
        link.type, link.linkname = tarfile.SYMTYPE, "1_lucas_3.wav"  # points inside: allowed by tar's own filter
        tf.addfile(link)
    report = ingest(DownloadConfig(dataset="fsdd", url=str(archive)), tmp_path / "raw", tmp_path / "dl",
                    mirror=None)
    assert (report.num_files, report.num_ok, report.num_refused) == (len(wavs) + 1, len(wavs), 1)
    assert report.refused == [{"path": f"fsdd/{FSDD_TOP}1_lucas_9.wav",
                               "reason": "symlink to '1_lucas_3.wav': links are not extracted"}]
    assert not any(p.is_symlink() for p in (tmp_path / "raw").rglob("*"))


# --------------------------------------------------------------------------------------------------- bombs
@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One deflated member of ~200 KB that expands to 200 MiB of zeros, in an FSDD-like layout."""
    path = tmp_path_factory.mktemp("bomb") / "free-spoken-digit-dataset-master.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr(FSDD_TOP + "1_ann_7.wav", _token_wav("fine"))
        with zf.open(FSDD_TOP + "0_bomb_0.wav", "w") as out:
            block = bytes(1 << 20)
            for _ in range(200):
                out.write(block)
    return path


@pytest.fixture
def bytes_decompressed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the bytes zipfile hands out of any member, whoever reads them."""
    counted = [0]
    original = zipfile.ZipExtFile.read

    def read(self: zipfile.ZipExtFile, n: int = -1) -> bytes:
        data = original(self, n)
        counted[0] += len(data)
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", read)
    return counted


def test_zip_bomb_is_refused_from_its_header_before_writing(
    tmp_path: Path, zip_bomb: Path, bytes_decompressed: list[int]
) -> None:
    with zipfile.ZipFile(zip_bomb) as zf:
        info = zf.getinfo(FSDD_TOP + "0_bomb_0.wav")
    assert info.file_size == 200 * 2**20 and info.compress_size < 300_000
    with pytest.raises(UnsafeArchiveError) as error:
        extract_archive(zip_bomb, tmp_path / "out")
    message = str(error.value)
    assert "0_bomb_0.wav" in message and f"{info.file_size:,}" in message and f"{info.compress_size:,}" in message
    assert "download.max_compression_ratio" in message and "Nothing was extracted" in message
    assert bytes_decompressed[0] == 0  # not one byte of the bomb was inflated
    assert list(tmp_path.iterdir()) == []

    raw = tmp_path / "raw"
    with pytest.raises(UnsafeArchiveError, match="0_bomb_0.wav"):
        ingest(DownloadConfig(dataset="fsdd", url=str(zip_bomb)), raw, tmp_path / "dl", mirror=None)
    assert not raw.exists() or list(raw.rglob("*")) == []
    assert [p.name for p in (tmp_path / "dl").iterdir() if p.is_dir()] == []  # no extraction left behind


def test_zip_bomb_with_lying_header_is_stopped_at_its_declared_size(
    tmp_path: Path, zip_bomb: Path, bytes_decompressed: list[int]
) -> None:
    liar = tmp_path / "liar.zip"
    data = bytearray(zip_bomb.read_bytes())
    with zipfile.ZipFile(zip_bomb) as zf:
        offset = zf.getinfo(FSDD_TOP + "0_bomb_0.wav").header_offset
    central = data.rfind(b"PK\x01\x02")  # the last central directory entry: the bomb's
    struct.pack_into("<I", data, central + 24, 4096)  # uncompressed size claimed: 4 KiB
    struct.pack_into("<I", data, offset + 22, 4096)
    liar.write_bytes(bytes(data))
    with zipfile.ZipFile(liar) as zf:
        assert zf.getinfo(FSDD_TOP + "0_bomb_0.wav").file_size == 4096  # passes every header check
    with pytest.raises(DataError, match="0_bomb_0.wav") as error:
        extract_archive(liar, tmp_path / "out")
    assert "Nothing was kept" in str(error.value)
    assert bytes_decompressed[0] <= 4096 + 2 * 4096  # the small member and the 4 KiB claimed, not 200 MiB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["liar.zip"]


def test_tar_bombs_are_refused_by_total_size_and_ratio(tmp_path: Path) -> None:
    zeros = tmp_path / "zeros.tar.gz"
    with tarfile.open(zeros, "w:gz") as tf:
        info = tarfile.TarInfo("top/zeros.bin")
        info.size = 8 * RATIO_FLOOR_BYTES
        tf.addfile(info, io.BytesIO(bytes(info.size)))
    with pytest.raises(UnsafeArchiveError, match=r"compression ratio of the whole archive .* must be <= 100 "
                                                 r"\(download.max_compression_ratio\)"):
        extract_archive(zeros, tmp_path / "out")
    noise = tmp_path / "noise.tar"
    with tarfile.open(noise, "w") as tf:
        for k in range(3):
            info = tarfile.TarInfo(f"top/noise{k}.bin")
            info.size = 2 * RATIO_FLOOR_BYTES
            tf.addfile(info, io.BytesIO(np.random.default_rng(k).bytes(info.size)))
    with pytest.raises(UnsafeArchiveError, match=r"must be <= 5,000,000 bytes \(download.max_extract_bytes\)\. "
                                                 r"Got more: 6,291,456 bytes up to member 'top/noise2.bin'"):
        extract_archive(noise, tmp_path / "out", max_bytes=5_000_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noise.tar", "zeros.tar.gz"]
    assert extract_archive(noise, tmp_path / "out", max_bytes=7_000_000).is_dir()  # raised cap: extracted


def test_small_highly_compressible_members_pass(tmp_path: Path) -> None:
    """A silent clip or a text file may compress 1000x; under RATIO_FLOOR_BYTES the ratio is not held against it."""
    archive = tmp_path / "ok.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("top/silence.bin", bytes(RATIO_FLOOR_BYTES // 2))
        zf.writestr("top/noise.bin", np.random.default_rng(0).bytes(4 * RATIO_FLOOR_BYTES))
    dest = extract_archive(archive, tmp_path / "out")
    assert (dest / "top" / "silence.bin").stat().st_size == RATIO_FLOOR_BYTES // 2


# --------------------------------------------------------------------------------------------------- bad audio
def _float_wav(path: Path, samples: np.ndarray, sample_rate: int = 8000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples.astype(np.float32), sample_rate, subtype="FLOAT")
    return path


def test_nan_inf_huge_and_overlong_audio_are_skipped_per_file_and_never_copied(tmp_path: Path,
                                                                               fsdd_zip: Path) -> None:
    mine = tmp_path / "mine"
    rows = _good_rows(mine, fsdd_zip)
    nan = sine(8000, 0.5)
    nan[100] = np.nan
    inf = sine(8000, 0.5)
    inf[7] = np.inf
    bad = {
        "bad/nan_filled.wav": (np.full(4000, np.nan), "non-finite: 4000 NaN and 0 Inf samples"),
        "bad/one_nan.wav": (nan, "non-finite: 1 NaN and 0 Inf samples"),
        "bad/inf.wav": (inf, "non-finite: 0 NaN and 1 Inf samples"),
        "bad/huge.wav": (np.full(4000, 1e30), "out of range: peak |sample| 1e+30"),
        "bad/long.wav": (sine(8000, 3.0), "too long: 3.0 s, above the limit of 2.5 s (download.max_audio_seconds)"),
    }
    for path, (samples, _) in bad.items():
        _float_wav(mine / path, samples)
    listing = _write_csv(mine / "list.csv", rows + [(p, "8", "eve", "train") for p in bad])
    cfg = DownloadConfig(dataset="manifest", manifest=str(listing), max_audio_seconds=2.5)
    report = ingest(cfg, tmp_path / "raw", tmp_path / "dl", mirror=None)
    reasons = {entry["path"]: entry["reason"] for entry in report.skipped}
    for path, (_, reason) in bad.items():
        assert reasons[f"manifest/{path}"].startswith(reason), reasons[f"manifest/{path}"]
        assert not (tmp_path / "raw" / "manifest" / path).exists()
    assert report.num_ok == len(rows) and not (tmp_path / "raw" / "manifest" / "bad").exists()


def test_bad_audio_inside_a_registry_archive_is_skipped_with_its_path(tmp_path: Path, fsdd_zip: Path) -> None:
    archive = tmp_path / "free-spoken-digit-dataset-master.zip"
    nan_wav = io.BytesIO()
    sf.write(nan_wav, np.full(4000, np.nan, np.float32), 8000, format="WAV", subtype="FLOAT")
    long_wav = io.BytesIO()
    sf.write(long_wav, sine(8000, 4.0), 8000, format="WAV", subtype="PCM_16")
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in _fsdd_wavs(fsdd_zip, ("4", "5"), "nicolas", range(3, 8)).items():
            zf.writestr(FSDD_TOP + name, data)
        zf.writestr(FSDD_TOP + "4_nan_9.wav", nan_wav.getvalue())
        zf.writestr(FSDD_TOP + "5_long_9.wav", long_wav.getvalue())
    report = ingest(DownloadConfig(dataset="fsdd", url=archive.as_uri(), max_audio_seconds=3.0), tmp_path / "raw",
                    tmp_path / "dl", mirror=None)
    assert report.num_ok == 10 and report.num_skipped == 2
    assert report.skipped == [
        {"path": f"fsdd/{FSDD_TOP}4_nan_9.wav", "reason": "non-finite: 4000 NaN and 0 Inf samples"},
        {"path": f"fsdd/{FSDD_TOP}5_long_9.wav",
         "reason": "too long: 4.0 s, above the limit of 3 s (download.max_audio_seconds)"},
    ]
    assert not (tmp_path / "raw" / "fsdd" / FSDD_TOP / "4_nan_9.wav").exists()
    assert not (tmp_path / "dl" / "fsdd.extracted").exists()  # the extraction is not kept after success


def test_read_audio_refuses_non_finite_and_overflowing_samples(tmp_path: Path) -> None:
    path = _float_wav(tmp_path / "nan.wav", np.full(800, np.nan))
    assert probe_audio(path).frames == 800  # the header alone looks fine
    with pytest.raises(AudioError, match="non-finite: 800 NaN and 0 Inf samples"):
        read_audio(path)
    with pytest.raises(AudioError, match=r"out of range: peak \|sample\| 1e\+30"):
        read_audio(_float_wav(tmp_path / "huge.wav", np.full(800, 1e30)))
    with pytest.raises(AudioError, match="too long: 2.0 s, above the limit of 1 s"):
        read_audio(_float_wav(tmp_path / "long.wav", sine(8000, 2.0)), max_seconds=1.0)
    waveform, _ = read_audio(_float_wav(tmp_path / "ok.wav", sine(8000, 0.5)))
    assert np.isfinite(waveform).all()


# --------------------------------------------------------------------------------------------------- unusable
def _manifest_with(tmp_path: Path, fsdd_zip: Path, split: str | None = None, labels: str | None = None) -> Path:
    mine = tmp_path / "mine"
    rows = _good_rows(mine, fsdd_zip)
    rows = [(p, labels or label, spk, split or sp) for p, label, spk, sp in rows]
    return _write_csv(mine / "list.csv", rows)


@pytest.mark.parametrize(("change", "match"), [
    ({"labels": "3"}, r"must have at least two labels to learn to tell apart. Got 1 \('3'\) in 12 usable files "
                      r"\(0 skipped, 0 refused\).*Fix: list files of at least two labels in download.manifest"),
    ({"split": "train"}, r"must have rows in both splits \(train and test\). Got no test rows.*Fix: give the CSV a "
                         r"'split' column with both train and test rows, or set download.test_fraction"),
    ({"split": "test"}, r"Got no train rows"),
])
def test_unusable_manifest_fails_naming_the_fix_and_keeps_previous_outputs(
    tmp_path: Path, fsdd_zip: Path, change: dict[str, str], match: str
) -> None:
    raw = tmp_path / "raw"
    good = _manifest_with(tmp_path / "a", fsdd_zip)
    ingest(DownloadConfig(dataset="manifest", manifest=str(good)), raw, tmp_path / "dl", mirror=None)
    before = _tree_digest(raw)
    listing = _manifest_with(tmp_path / "b", fsdd_zip, **change)
    with pytest.raises(DataError, match=match):
        ingest(DownloadConfig(dataset="manifest", manifest=str(listing)), raw, tmp_path / "dl", mirror=None)
    assert _tree_digest(raw) == before  # the previous ingest is left as it was, no partial folder


def test_fsdd_without_test_recordings_names_the_split_rule(tmp_path: Path, fsdd_zip: Path) -> None:
    archive = tmp_path / "free-spoken-digit-dataset-master.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in _fsdd_wavs(fsdd_zip, ("1", "2"), "jackson", range(5, 9)).items():
            zf.writestr(FSDD_TOP + name, data)
    with pytest.raises(DataError, match=r"Got no test rows \(\{'train': 8\}.*Fix: FSDD's test split is recordings "
                                        r"0-4"):
        ingest(DownloadConfig(dataset="fsdd", url=str(archive)), tmp_path / "raw", tmp_path / "dl", mirror=None)
    assert not (tmp_path / "raw" / "manifest.csv").exists()


def test_missing_mirror_folder_is_an_error_not_a_fallback(tmp_path: Path, fsdd_small_zip: Path) -> None:
    missing = tmp_path / "no-mirror"
    with pytest.raises(DownloadError) as error:
        ingest(DownloadConfig(dataset="fsdd", url=fsdd_small_zip.as_uri()), tmp_path / "raw", tmp_path / "dl",
               mirror=missing)
    assert str(missing) in str(error.value) and "must be an existing folder" in str(error.value)
    assert not (tmp_path / "dl").exists() and not (tmp_path / "raw").exists()  # nothing fetched from the URL
    (missing / "fsdd").mkdir(parents=True)  # exists but lacks the archive: the URL is used
    report = ingest(DownloadConfig(dataset="fsdd", url=fsdd_small_zip.as_uri()), tmp_path / "raw",
                    tmp_path / "dl", mirror=missing)
    assert report.source == fsdd_small_zip.as_uri() and report.num_ok == 180


# --------------------------------------------------------------------------------------------------- identity
def test_output_is_identical_from_mirror_or_url_wherever_it_lies(tmp_path: Path, fsdd_small_zip: Path) -> None:
    previous = os.umask(0o022)
    try:
        mirror = tmp_path / "some" / "mirror"
        (mirror / "fsdd").mkdir(parents=True)
        (mirror / "fsdd" / fsdd_small_zip.name).write_bytes(fsdd_small_zip.read_bytes())
        (mirror / "fsdd" / fsdd_small_zip.name).chmod(0o600)
        by_mirror = ingest(DownloadConfig(dataset="fsdd"), tmp_path / "clone1" / "data" / "raw",
                           tmp_path / "clone1" / "data" / "downloads", mirror=mirror)
        by_url = ingest(DownloadConfig(dataset="fsdd", url=fsdd_small_zip.as_uri()),
                        tmp_path / "elsewhere" / "raw", tmp_path / "elsewhere" / "dl", mirror=None)
    finally:
        os.umask(previous)
    one, two = tmp_path / "clone1" / "data" / "raw", tmp_path / "elsewhere" / "raw"
    assert by_mirror.source != by_url.source and by_mirror.url != by_url.url
    assert by_mirror == by_url  # url and source are run-specific: not compared, not written
    assert _tree_digest(one) == _tree_digest(two)
    assert (one / "report.json").read_bytes() == (two / "report.json").read_bytes()
    text = (one / "report.json").read_text()
    assert str(tmp_path) not in text and "file:" not in text and "mirror" not in text
    for path in one.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
    assert not any(p.name.startswith(".") for p in one.rglob("*"))  # no marker, no partial folder
    provenance = (tmp_path / "clone1" / "data" / "downloads" / "fsdd.source.json").read_text()
    assert str(mirror / "fsdd" / fsdd_small_zip.name) in provenance  # where it came from is kept, outside
