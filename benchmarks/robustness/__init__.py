"""Robustness matrix: aggregators × Byzantine attacks, claim cells over seeds (mean ± sd, paired t-intervals).

A DVC project of its own (``cd benchmarks/robustness && dvc repro``): ``driver.py`` holds its stages (``python -m
benchmarks.robustness <command>``, run from this folder), ``params.yaml`` its settings, ``dvc.yaml`` the matrix.
"""

# Pins torch's CPU code paths before anything imports torch (see flows/__init__.py), as for every stage.
import flows  # noqa: F401
