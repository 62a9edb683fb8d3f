"""flows/__init__.py pins torch's, oneDNN's and MKL's CPU code paths before torch loads; a user's setting wins."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from flows import LIBRARY_PINS

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="the pins name x86-64 instruction sets")

PROBE = """
import flows, torch
conv = torch.nn.Conv2d(1, 4, 3)
conv(torch.randn(2, 1, 16, 16)).sum()
matrix = torch.randn(64, 64)
(matrix @ matrix).sum()
print("capability", torch.backends.cpu.get_cpu_capability(), "mkl", torch.backends.mkl.is_available(), flush=True)
"""


def _probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in LIBRARY_PINS}
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                            env={**clean, "ONEDNN_VERBOSE": "1", "MKL_VERBOSE": "1", **env}, timeout=120)
    return result.stdout + result.stderr


def test_importing_flows_pins_avx2_kernels_and_mkl_compatible_mode() -> None:
    assert LIBRARY_PINS == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE"}
    out = _probe()
    assert "capability AVX2" in out  # AVX-512 machines too
    assert "isa:Intel AVX2" in out  # oneDNN's JIT, whatever the CPU offers above it
    if "mkl True" in out:
        assert "CNR:COMPATIBLE" in out


def test_a_users_setting_overrides_each_pin() -> None:
    out = _probe(ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41", MKL_CBWR="AUTO")
    assert "capability DEFAULT" in out  # torch's scalar build, as asked
    assert "isa:Intel SSE4.1" in out
    if "mkl True" in out:
        assert "CNR:AUTO" in out or "CNR:OFF" in out
