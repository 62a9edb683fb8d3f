"""ingest end to end on real archives (FSDD, ESC-10) and on synthetic ones (Speech Commands, manifest, damage)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
import zipfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import soundfile as sf

from fedcore.config import DownloadConfig
from fedcore.data.datasets import DATASETS, ESC50, Candidate, IngestReport, ingest, limit_per_class
from fedcore.data.download import extract_archive
from fedcore.data.manifest import read_manifest
from fedcore.errors import ChecksumError, DataError
from tests.conftest import sine


def _wav_bytes(seconds: float = 0.25, sample_rate: int = 8000, freq: float = 440.0) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, sine(sample_rate, seconds, freq), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _fsdd_counts(archive: Path, test_indices: set[int]) -> tuple[int, Counter[str], set[str], int]:
    """Rows, label counts, speakers and test rows computed from the archive's file names."""
    labels: Counter[str] = Counter()
    speakers, test = set(), 0
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            if "/recordings/" in name and name.endswith(".wav"):
                digit, speaker, index = name.rsplit("/", 1)[-1][:-4].split("_")
                labels[digit] += 1
                speakers.add(speaker)
                test += int(index) in test_indices
    return sum(labels.values()), labels, speakers, test


# --------------------------------------------------------------------------------------------------- FSDD
def test_ingest_fsdd_from_file_url(tmp_path: Path, fsdd_small_zip: Path) -> None:
    cfg = DownloadConfig(dataset="fsdd", url=fsdd_small_zip.as_uri())
    stages: set[str] = set()
    report = ingest(cfg, tmp_path / "raw", tmp_path / "dl", mirror=None,
                    progress=lambda stage, done, total: stages.add(stage))
    num_rows, labels, speakers, num_test = _fsdd_counts(fsdd_small_zip, set(range(5)))
    assert (num_rows, num_test) == (180, 60)  # 3 speakers x 10 digits x indices {0,1,5,6,7,8}; test = {0, 1}
    rows = read_manifest(tmp_path / "raw" / "manifest.csv")
    assert len(rows) == report.num_ok == num_rows and report.num_skipped == 0
    assert Counter(row.label for row in rows) == labels and report.labels == dict(sorted(labels.items()))
    assert {row.speaker for row in rows} == speakers and report.speakers == len(speakers)
    assert report.splits == {"test": num_test, "train": num_rows - num_test}
    for row in rows:
        digit, speaker, index = Path(row.path).stem.split("_")
        assert (row.label, row.speaker) == (digit, speaker)
        assert row.split == ("test" if int(index) < 5 else "train")
        assert row.sample_rate == 8000 and 0.1 < row.duration < 2.5
        assert (tmp_path / "raw" / row.path).is_file()
        assert row.id == "free-spoken-digit-dataset-master/recordings/" + Path(row.path).stem
    assert report.source == cfg.url and report.sha256 == hashlib.sha256(fsdd_small_zip.read_bytes()).hexdigest()
    assert report.total_seconds == pytest.approx(sum(row.duration for row in rows))
    assert IngestReport.load(tmp_path / "raw" / "report.json") == report
    assert stages == {"download", "probe"}


def test_ingest_fsdd_from_mirror_full_archive(tmp_path: Path, fsdd_zip: Path) -> None:
    mirror = tmp_path / "mirror"
    (mirror / "fsdd").mkdir(parents=True)
    (mirror / "fsdd" / fsdd_zip.name).symlink_to(fsdd_zip)
    report = ingest(DownloadConfig(dataset="fsdd"), tmp_path / "raw", tmp_path / "dl", mirror=mirror)
    num_rows, labels, speakers, num_test = _fsdd_counts(fsdd_zip, set(range(5)))
    assert report.source == str(mirror / "fsdd" / fsdd_zip.name)
    assert report.url == DATASETS.build("fsdd").url
    assert report.num_ok == num_rows and report.labels == dict(sorted(labels.items()))
    assert report.speakers == len(speakers) and report.splits["test"] == num_test


def test_ingest_max_per_class_is_deterministic(tmp_path: Path, fsdd_small_zip: Path) -> None:
    cfg = DownloadConfig(dataset="fsdd", url=fsdd_small_zip.as_uri(), max_per_class=4)
    first = ingest(cfg, tmp_path / "a", tmp_path / "dl", mirror=None)
    ingest(cfg, tmp_path / "b", tmp_path / "dl", mirror=None)
    a, b = read_manifest(tmp_path / "a" / "manifest.csv"), read_manifest(tmp_path / "b" / "manifest.csv")
    assert [r.id for r in a] == [r.id for r in b]
    assert set(Counter((r.label, r.split) for r in a).values()) == {4}
    assert first.num_files == len(a) == 10 * 2 * 4


def test_limit_per_class_keeps_first_by_path() -> None:
    found = [Candidate(p, "x", "s", "train") for p in ("c.wav", "a.wav", "b.wav")]
    assert [c.path for c in limit_per_class(found, 2)] == ["a.wav", "b.wav"]


# --------------------------------------------------------------------------------------------------- ESC-50
@pytest.fixture(scope="module")
def esc50_ingested(tmp_path_factory: pytest.TempPathFactory, shared_datasets: Path) -> tuple[Path, IngestReport]:
    out = tmp_path_factory.mktemp("esc50")
    report = ingest(DownloadConfig(dataset="esc50"), out / "raw", out / "dl", mirror=shared_datasets)
    return out, report


def test_ingest_esc50_from_mirror(esc50_ingested: tuple[Path, IngestReport], esc50_zip: Path) -> None:
    out, report = esc50_ingested
    with zipfile.ZipFile(esc50_zip) as zf:
        meta = list(csv.DictReader(io.StringIO(zf.read("ESC-50-master/meta/esc50.csv").decode())))
    assert len(meta) == 400
    rows = read_manifest(out / "raw" / "manifest.csv")
    assert report.source == str(esc50_zip) and report.num_ok == len(rows) == len(meta)
    assert report.labels == dict(sorted(Counter(m["category"] for m in meta).items()))
    assert len(report.labels) == 10
    assert report.splits == {"test": 80, "train": 320}
    assert Counter(r.label for r in rows if r.split == "test") == Counter({label: 8 for label in report.labels})
    by_name = {m["filename"]: m for m in meta}
    for row in rows:
        assert row.speaker == by_name[Path(row.path).name]["src_file"]
        assert row.duration == pytest.approx(5.0) and row.sample_rate == 16000
    assert report.sha256 == (esc50_zip.parent / (esc50_zip.name + ".sha256")).read_text().split()[0]


def test_esc50_scan_bad_test_fold_lists_folds(tmp_path: Path, esc50_zip: Path) -> None:
    extracted = extract_archive(esc50_zip, tmp_path / "esc50")
    with pytest.raises(ValueError, match=r"'test_fold' must be one of the folds .*\(1, 2, 3, 4, 5\)\. Got 7"):
        ESC50().scan(extracted, DownloadConfig(dataset="esc50", test_fold=7))


def test_esc50_scan_esc10_only_filters_subset(tmp_path: Path) -> None:
    meta = tmp_path / "ESC-50-master" / "meta"
    meta.mkdir(parents=True)
    (meta / "esc50.csv").write_text(
        "filename,fold,target,category,esc10,src_file,take\n"
        "1-1-A-0.wav,1,0,dog,True,1,A\n2-2-A-5.wav,2,5,cat,False,2,A\n3-3-A-0.wav,3,0,dog,True,3,A\n"
    )
    found = ESC50().scan(tmp_path, DownloadConfig(dataset="esc50", test_fold=3, esc10_only=True))
    assert [(c.path, c.label, c.speaker, c.split) for c in found] == [
        ("ESC-50-master/audio/1-1-A-0.wav", "dog", "1", "train"),
        ("ESC-50-master/audio/3-3-A-0.wav", "dog", "3", "test"),
    ]
    with pytest.raises(ValueError, match=r"\(1, 3\)\. Got 2"):
        ESC50().scan(tmp_path, DownloadConfig(dataset="esc50", test_fold=2, esc10_only=True))


# --------------------------------------------------------------------------------------------------- Speech Commands
def _speechcommands_tar(path: Path) -> Path:
    files = {
        "yes/aaaa1111_nohash_0.wav": _wav_bytes(freq=300),
        "yes/aaaa1111_nohash_1.wav": _wav_bytes(freq=350),
        "yes/bbbb2222_nohash_0.wav": _wav_bytes(freq=400),
        "no/aaaa1111_nohash_0.wav": _wav_bytes(freq=500),
        "no/cccc3333_nohash_0.wav": _wav_bytes(freq=600),
        "_background_noise_/white_noise.wav": _wav_bytes(seconds=1.0),
        "validation_list.txt": b"yes/aaaa1111_nohash_1.wav\n",
        "testing_list.txt": b"yes/bbbb2222_nohash_0.wav\nno/cccc3333_nohash_0.wav\n",
        "LICENSE": b"CC BY 4.0\n",
    }
    with tarfile.open(path, "w:gz") as tf:  # no top folder, like the real archive
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_ingest_speechcommands_layout(tmp_path: Path) -> None:
    archive = _speechcommands_tar(tmp_path / "speech_commands_test.tar.gz")
    cfg = DownloadConfig(dataset="speechcommands", url=archive.as_uri(),
                         sha256=hashlib.sha256(archive.read_bytes()).hexdigest())
    report = ingest(cfg, tmp_path / "raw", tmp_path / "dl", mirror=None)
    rows = {r.id: r for r in read_manifest(tmp_path / "raw" / "manifest.csv")}
    assert sorted(rows) == ["no/aaaa1111_nohash_0", "no/cccc3333_nohash_0", "yes/aaaa1111_nohash_0",
                            "yes/aaaa1111_nohash_1", "yes/bbbb2222_nohash_0"]
    assert {i for i, r in rows.items() if r.split == "test"} == {"yes/bbbb2222_nohash_0", "no/cccc3333_nohash_0"}
    assert rows["yes/aaaa1111_nohash_1"].split == "train"  # validation list stays train
    assert rows["no/aaaa1111_nohash_0"].speaker == "aaaa1111" and rows["no/aaaa1111_nohash_0"].label == "no"
    assert report.labels == {"no": 2, "yes": 3} and report.speakers == 3

    default_sha = DATASETS.build("speechcommands").sha256
    with pytest.raises(ChecksumError, match=str(default_sha)):  # the registry checksum applies to a custom URL
        ingest(replace(cfg, sha256=None), tmp_path / "raw2", tmp_path / "dl2", mirror=None)


# --------------------------------------------------------------------------------------------------- damaged inputs
def test_ingest_skips_damaged_files_and_keeps_good_ones(tmp_path: Path) -> None:
    good = _wav_bytes(seconds=0.5)
    top = "free-spoken-digit-dataset-master/recordings/"
    members = {f"{top}{d}_alice_{i}.wav": _wav_bytes(freq=200 + 50 * d) for d in range(3) for i in (0, 7)}
    members[f"{top}5_bob_8.wav"] = good[: len(good) // 2]  # truncated
    members[f"{top}6_bob_9.wav"] = b""  # zero length
    members[f"{top}7_bob_9.wav"] = b"just some text pretending to be audio\n"
    archive = tmp_path / "free-spoken-digit-dataset-master.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    report = ingest(DownloadConfig(dataset="fsdd", url=str(archive)), tmp_path / "raw", tmp_path / "dl", mirror=None)
    assert (report.num_files, report.num_ok, report.num_skipped) == (9, 6, 3)
    reasons = {Path(s["path"]).name: s["reason"] for s in json.loads((tmp_path / "raw" / "report.json").read_text())
               ["skipped"]}
    assert reasons["5_bob_8.wav"].startswith("truncated: header declares 4000 frames, file holds")
    assert reasons["6_bob_9.wav"].startswith("empty")
    assert reasons["7_bob_9.wav"].startswith("not an audio file")
    assert len(read_manifest(tmp_path / "raw" / "manifest.csv")) == 6 and report.speakers == 1


def test_ingest_all_files_bad_raises_and_keeps_previous_outputs(tmp_path: Path, fsdd_small_zip: Path) -> None:
    raw = tmp_path / "raw"
    ingest(DownloadConfig(dataset="fsdd", url=str(fsdd_small_zip)), raw, tmp_path / "dl", mirror=None)
    before = (raw / "manifest.csv").read_bytes()
    archive = tmp_path / "bad" / "free-spoken-digit-dataset-master.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("x/recordings/1_eve_1.wav", b"")
    with pytest.raises(DataError, match="at least one readable audio file. Got 0 of 1"):
        ingest(DownloadConfig(dataset="fsdd", url=str(archive)), raw, tmp_path / "dl2", mirror=None)
    assert (raw / "manifest.csv").read_bytes() == before


def test_ingest_wrong_checksum_keeps_archive_as_bad(tmp_path: Path, fsdd_small_zip: Path) -> None:
    actual = hashlib.sha256(fsdd_small_zip.read_bytes()).hexdigest()
    cfg = DownloadConfig(dataset="fsdd", url=fsdd_small_zip.as_uri(), sha256="ab" * 32)
    with pytest.raises(ChecksumError) as info:
        ingest(cfg, tmp_path / "raw", tmp_path / "dl", mirror=None)
    assert "ab" * 32 in str(info.value) and actual in str(info.value)
    assert (tmp_path / "dl" / (fsdd_small_zip.name + ".bad")).is_file()
    assert not (tmp_path / "dl" / fsdd_small_zip.name).exists() and not (tmp_path / "raw" / "manifest.csv").exists()


# --------------------------------------------------------------------------------------------------- manifest
def _manifest_tree(tmp_path: Path, *, with_split: bool) -> Path:
    src = tmp_path / "mine"
    for speaker in ("ann", "ben"):
        (src / "clips" / speaker).mkdir(parents=True)
        for k in range(6):
            (src / "clips" / speaker / f"{k}.wav").write_bytes(_wav_bytes(freq=200 + 40 * k))
    outside = tmp_path / "elsewhere" / "far.wav"
    outside.parent.mkdir()
    outside.write_bytes(_wav_bytes())
    lines = ["path,label,speaker" + (",split" if with_split else "")]
    for speaker in ("ann", "ben"):
        for k in range(6):
            split = ("," + ("test" if k == 0 else "")) if with_split else ""  # empty split: drawn by hash
            lines.append(f"clips/{speaker}/{k}.wav,{'hi' if k % 2 else 'lo'},{speaker}{split}")
    lines.append(f"{outside},hi,cara" + (",train" if with_split else ""))
    lines.append("clips/ann/missing.wav,lo,ann" + (",train" if with_split else ""))
    (src / "list.csv").write_text("\n".join(lines) + "\n")
    return src / "list.csv"


def _hash_split(path: str, fraction: float) -> str:
    value = int.from_bytes(hashlib.sha1(path.encode()).digest()[:8], "big") / 2.0**64
    return "test" if value < fraction else "train"


def test_ingest_manifest_dataset(tmp_path: Path) -> None:
    listing = _manifest_tree(tmp_path, with_split=False)
    cfg = DownloadConfig(dataset="manifest", manifest=str(listing), test_fraction=0.5)
    report = ingest(cfg, tmp_path / "raw", tmp_path / "dl", mirror=None)
    rows = {r.id: r for r in read_manifest(tmp_path / "raw" / "manifest.csv")}
    assert (report.num_files, report.num_ok, report.num_skipped, report.num_refused) == (14, 12, 1, 1)
    assert report.skipped[0]["reason"].startswith("missing") and "missing.wav" in report.skipped[0]["path"]
    assert report.refused == [{"path": str(tmp_path / "elsewhere" / "far.wav"),
                               "reason": "outside: an absolute path not under the CSV's folder"}]
    for k in range(6):
        row = rows[f"clips/ann/{k}"]
        assert row.path == f"manifest/clips/ann/{k}.wav" and (tmp_path / "raw" / row.path).is_file()
        assert row.split == _hash_split(f"clips/ann/{k}.wav", 0.5)
    assert set(report.splits) == {"train", "test"}
    assert not [r for r in rows.values() if r.speaker == "cara"]  # outside the CSV's folder: refused
    assert report.source == str(listing) and report.url is None

    again = ingest(cfg, tmp_path / "raw", tmp_path / "dl", mirror=None)  # deterministic, rebuilt in place
    assert again == report


def test_ingest_manifest_root_allows_a_folder_outside(tmp_path: Path) -> None:
    listing = _manifest_tree(tmp_path, with_split=False)
    cfg = DownloadConfig(dataset="manifest", manifest=str(listing), test_fraction=0.5,
                         manifest_root=str(tmp_path / "elsewhere"))
    report = ingest(cfg, tmp_path / "raw", tmp_path / "dl", mirror=None)
    rows = {r.id: r for r in read_manifest(tmp_path / "raw" / "manifest.csv")}
    assert (report.num_ok, report.num_skipped, report.num_refused) == (13, 1, 0)
    external = rows["_external/far"]
    assert external.speaker == "cara" and external.path == "manifest/_external/far.wav"
    assert (tmp_path / "raw" / external.path).read_bytes() == (tmp_path / "elsewhere" / "far.wav").read_bytes()
    with pytest.raises(ValueError, match="'manifest_root' must be an existing folder"):
        ingest(replace(cfg, manifest_root=str(tmp_path / "nope")), tmp_path / "raw2", tmp_path / "dl", mirror=None)


def test_ingest_manifest_with_split_column(tmp_path: Path) -> None:
    listing = _manifest_tree(tmp_path, with_split=True)
    report = ingest(DownloadConfig(dataset="manifest", manifest=str(listing), test_fraction=0.0),
                    tmp_path / "raw", tmp_path / "dl", mirror=None)
    assert report.splits == {"test": 2, "train": 10}  # k == 0 for both speakers; empty cells drawn with 0.0
    assert report.num_refused == 1  # the row outside the CSV's folder


def test_ingest_manifest_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\na.wav,x\n")
    with pytest.raises(ValueError, match="missing speaker"):
        ingest(DownloadConfig(dataset="manifest", manifest=str(bad)), tmp_path / "raw", tmp_path / "dl", mirror=None)
    with pytest.raises(ValueError, match="'manifest' must be an existing CSV file"):
        ingest(DownloadConfig(dataset="manifest", manifest=str(tmp_path / "none.csv")), tmp_path / "raw",
               tmp_path / "dl", mirror=None)
    with pytest.raises(ValueError, match="set download.manifest"):
        ingest(DownloadConfig(dataset="manifest"), tmp_path / "raw", tmp_path / "dl", mirror=None)
    bad.write_text("path,label,speaker,split\na.wav,x,s,valid\n")
    with pytest.raises(ValueError, match="'split' must be one of train, test"):
        ingest(DownloadConfig(dataset="manifest", manifest=str(bad)), tmp_path / "raw", tmp_path / "dl", mirror=None)


def test_dataset_registry_specs() -> None:
    assert DATASETS.names() == ["esc50", "fsdd", "manifest", "speechcommands"]
    esc50 = DATASETS.build("esc50")
    assert esc50.filename == "ESC-50-master.zip" and "ESC-50-master-esc10-16k.zip" in esc50.mirror_names
    assert DATASETS.build("manifest").url is None
