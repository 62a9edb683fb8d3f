"""Personalisation matrix: methods × data poisoning × datasets × seeds, its table and its claims.

A DVC project of its own (``cd benchmarks/personalisation && dvc repro``): ``driver.py`` holds its stages
(``python -m benchmarks.personalisation <command>``, run from this folder), ``clients.py`` each run's per-client
accuracies (benign and poisoned clients apart), ``params.yaml`` the settings and claims, ``cells.yaml`` the runs
(cell × seed) that ``expand`` derives from them, ``dvc.yaml`` the pipeline.
"""

# Pins torch's CPU code paths before anything imports torch (see flows/__init__.py), as for every stage.
import flows  # noqa: F401
