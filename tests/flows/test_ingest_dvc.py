"""The manifest escapes under `dvc repro`: nothing from outside the CSV's folder reaches `data/raw` or DVC's cache.

The in-process cases are in tests/fedcore/test_ingest_faults.py; this one runs the real download stage through
DVC, so that the cache DVC fills (and `dvc push` would send) is searched too. The planted files carry a unique
token, and so does the stage's environment (`/proc/self/environ`).
"""

from __future__ import annotations

import csv
import io
import os
import struct
import uuid
import zipfile
from pathlib import Path

import pytest
import soundfile as sf

from fedcore.data.manifest import read_manifest
from tests.conftest import sine
from tests.flows.conftest import dvc_executable, make_project, run, stage_env, tiny_params

pytestmark = pytest.mark.integration


def _token_wav(token: str) -> bytes:
    """A valid PCM WAV whose last chunk (after ``data``; readers skip it) holds ``token``."""
    buffer = io.BytesIO()
    sf.write(buffer, sine(8000, 0.3, 500.0), 8000, format="WAV", subtype="PCM_16")
    chunk = token.encode() + b"\0" * (len(token.encode()) & 1)
    data = bytearray(buffer.getvalue() + b"tokn" + struct.pack("<I", len(chunk)) + chunk)
    struct.pack_into("<I", data, 4, len(data) - 8)
    return bytes(data)


def _good_rows(folder: Path, fsdd_zip: Path) -> list[list[str]]:
    """Real FSDD recordings (digits 3 and 8 of one speaker, indices 3-8) under ``folder/clips``."""
    (folder / "clips").mkdir(parents=True)
    rows = []
    with zipfile.ZipFile(fsdd_zip) as zf:
        for digit in ("3", "8"):
            for index in range(3, 9):
                name = f"{digit}_theo_{index}.wav"
                (folder / "clips" / name).write_bytes(
                    zf.read(f"free-spoken-digit-dataset-master/recordings/{name}"))
                rows.append([f"clips/{name}", digit, "theo", "test" if index < 5 else "train"])
    return rows


def _assert_token_absent(token: str, *folders: Path) -> None:
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert token.encode() not in path.read_bytes(), f"the outside token leaked into {path}"


def test_dvc_repro_download_keeps_outside_files_out_of_data_raw_and_the_dvc_cache(
        tmp_path: Path, fsdd_zip: Path, small_mirror: Path, prefect_api: str) -> None:
    token = f"TOKEN-{uuid.uuid4().hex}"
    outside = tmp_path / "outside"
    (outside / "etc").mkdir(parents=True)
    (outside / "etc" / "passwd").write_text(f"root:x:0:0:{token}:/root:/bin/sh\n")
    (outside / "secret.wav").write_bytes(_token_wav(token))  # valid audio: only the path checks keep it out
    (outside / "key.wav").write_bytes(_token_wav(token))
    mine = tmp_path / "dataset"
    good = _good_rows(mine, fsdd_zip)
    (mine / "clips" / "link.wav").symlink_to(outside / "key.wav")
    escapes = ["../../../../../../../../etc/passwd", "../outside/etc/passwd", str(outside / "secret.wav"),
               "/proc/self/environ", "clips/link.wav"]
    listing = mine / "list.csv"
    with listing.open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(
            [["path", "label", "speaker", "split"], *good, *([path, "3", "eve", "train"] for path in escapes)])

    project = make_project(tmp_path / "project", tiny_params(small_mirror, download={
        "dataset": "manifest", "manifest": str(listing), "mirror": None}))
    env = {**stage_env(prefect_api), "FEDAUDIO_TEST_SECRET": token}  # in the stage's /proc/self/environ
    run([dvc_executable(), "repro", "download"], project, env, timeout=600)

    cache = project / ".dvc" / "cache"
    assert any(path.is_file() for path in cache.rglob("*"))  # DVC did cache the output
    _assert_token_absent(token, project / "data", cache)
    rows = read_manifest(project / "data/raw/manifest.csv")
    assert sorted(row.path for row in rows) == sorted(f"manifest/{path}" for path, *_ in good)
    assert not os.environ.get("FEDAUDIO_TEST_SECRET")
