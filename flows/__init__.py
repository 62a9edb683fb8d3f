"""Prefect flows, one per DVC stage (``python -m flows.<stage>``), and the pipeline.

Importing this package pins the CPU code paths of torch's numerical libraries, before torch is imported, so that
the stages compute the same bits on every x86-64 CPU of this kind (AVX2 or AVX-512, Intel or AMD). Each pin is a
default (``os.environ.setdefault``): set the variable yourself to override it, e.g. ``ATEN_CPU_CAPABILITY=avx512
ONEDNN_MAX_CPU_ISA=ALL MKL_CBWR=AUTO`` for the fastest code of an AVX-512 CPU, at the price of last-bit
differences from other CPUs.

- ``ATEN_CPU_CAPABILITY=avx2``: torch's own vectorised kernels (elementwise ops, reductions, softmax, optimiser
  steps) use their AVX2 build, not the AVX-512 one. On this AMD EPYC (AVX-512) it changes the CNN's trained
  weights; the log-mel is unchanged.
- ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN (torch's CPU convolutions) generates AVX2 code at most. Changes the CNN's
  trained weights here.
- ``MKL_CBWR=COMPATIBLE``: MKL's conditional numerical reproducibility (the FFT behind the log-mel, the GEMMs of
  linear layers) takes one code path on every Intel and AMD CPU. Changes the log-mel and the CNN here.
  ``MKL_CBWR=AVX2`` would be faster on Intel but is not honoured on AMD CPUs (MKL falls back to AUTO), so it
  cannot make the two agree.

Measured on an AMD EPYC with AVX-512 (torch 2.11, one intra-op thread, CPU seconds, medians of 4 to 6 runs,
noise about 5%): log-mel of 3,000 FSDD clips 2.97 s unpinned, 3.17 s with the three pins (+7%); local training of
the CNN (width 16, depth 4; 10 clients × 3 epochs × 64 clips) 7.41 s unpinned, 8.11 s pinned (+9%, nearly all of
it oneDNN's AVX2 code). Intel CPUs with two AVX-512 FMA units may pay more for the AVX2 paths. Thread counts are
pinned where they change results: the features stage computes each clip on one thread (fedcore.data.features)
and clients train with ``federation.client_threads`` threads. What no pin removes (oneDNN chooses its blocking by
the CPU's cache sizes) is stated with its tolerance in the README.
"""

from __future__ import annotations

import os

LIBRARY_PINS: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "COMPATIBLE",
}
"""Environment defaults read by torch, oneDNN and MKL when they load (so set before torch is imported)."""

for _name, _value in LIBRARY_PINS.items():
    os.environ.setdefault(_name, _value)
