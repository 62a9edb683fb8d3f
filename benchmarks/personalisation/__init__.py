"""Personalisation matrix: methods × data poisoning × datasets, and the per-client split.

A DVC project of its own (``cd benchmarks/personalisation && dvc repro``): ``driver.py`` holds its stages
(``python -m benchmarks.personalisation <command>``, run from this folder), ``clients.py`` the per-client split
(``python -m benchmarks.personalisation.clients``), ``params.yaml`` the settings, ``dvc.yaml`` the matrix.
"""

# Pins torch's CPU code paths before anything imports torch (see flows/__init__.py), as for every stage.
import flows  # noqa: F401
