"""Shared fixtures: offline datasets, synthetic audio, seeded RNGs."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import flows  # noqa: F401  (pins torch's CPU code paths before torch loads, as every stage process does)

REPO_ROOT = Path(__file__).resolve().parents[1]

# Quiet, offline-safe settings for every test (and every subprocess a test starts).
_TEST_HOME = Path(os.environ.setdefault("FEDAUDIO_TEST_HOME", tempfile.mkdtemp(prefix="fedaudio-tests-")))
# Under pytest-xdist (`make test` runs two workers) each worker gets its own Prefect home: stage processes of two
# tests must not share the temporary servers' database or the shared-server lock (CI's PREFECT_HOME is the base).
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER:
    _worker_home = Path(os.environ.get("PREFECT_HOME") or _TEST_HOME / "prefect") / _WORKER
    _worker_home.mkdir(parents=True, exist_ok=True)  # Prefect creates its home but not the folders above it
    os.environ["PREFECT_HOME"] = str(_worker_home)
for _key, _value in {
    "PREFECT_HOME": str(_TEST_HOME / "prefect"),
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TQDM_DISABLE": "1",
    "FEDAUDIO_SHARED_SERVER": "0",  # each stage its own temporary server, unless a test hands it one or turns this on
}.items():
    os.environ.setdefault(_key, _value)


# The mirror CI points at ../shared/datasets. Tests read it here once and then remove it from the environment, so
# every test names its own mirror (the variable would otherwise override the params of tiny test runs).
_MIRROR_AT_START = os.environ.pop("FEDAUDIO_MIRROR", None)


def _shared_datasets() -> Path:
    env = _MIRROR_AT_START
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "datasets")
    for candidate in candidates:
        if (candidate / "fsdd").is_dir():
            return candidate.resolve()
    pytest.skip("offline dataset copies (../shared/datasets) not found; set FEDAUDIO_MIRROR")
    raise AssertionError  # unreachable


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """Folder holding the offline archives, laid out as ``<dataset>/<archive>``."""
    return _shared_datasets()


@pytest.fixture(scope="session")
def fsdd_zip(shared_datasets: Path) -> Path:
    return shared_datasets / "fsdd" / "free-spoken-digit-dataset-master.zip"


@pytest.fixture(scope="session")
def esc50_zip(shared_datasets: Path) -> Path:
    return shared_datasets / "esc50" / "ESC-50-master-esc10-16k.zip"


@pytest.fixture(scope="session")
def fsdd_small_zip(tmp_path_factory: pytest.TempPathFactory, fsdd_zip: Path) -> Path:
    """A real FSDD-layout archive with 3 speakers × 10 digits × indices {0, 1, 5, 6, 7, 8} (180 real clips)."""
    out = tmp_path_factory.mktemp("fsdd_small") / "free-spoken-digit-dataset-master.zip"
    keep_speakers = {"george", "jackson", "theo"}
    keep_index = {"0", "1", "5", "6", "7", "8"}
    with zipfile.ZipFile(fsdd_zip) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            name = info.filename.rsplit("/", 1)[-1]
            if name.endswith(".wav"):
                digit, speaker, index = name[:-4].split("_")
                if speaker not in keep_speakers or index not in keep_index:
                    continue
            dst.writestr(info, src.read(info))
    return out


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Autouse seed, so a test that forgets to pass a generator is still repeatable."""
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def sine(sample_rate: int = 16000, seconds: float = 1.0, freq: float = 440.0) -> np.ndarray:
    """Mono float32 sine wave, shape (time,)."""
    t = np.arange(int(sample_rate * seconds), dtype=np.float64) / sample_rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def white_noise(sample_rate: int = 16000, seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    """Mono float32 white noise in [-0.5, 0.5), shape (time,), from its own generator."""
    rng = np.random.default_rng(seed)
    return (rng.random(int(sample_rate * seconds)) - 0.5).astype(np.float32)


def stop_group(process: subprocess.Popen[Any], timeout: float = 30) -> None:
    """End a process started with ``start_new_session=True`` and everything in its group: SIGTERM, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
