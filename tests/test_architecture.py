"""Layering: fedcore is a pure library; tasks never import flows; nothing imports the benchmarks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "fedcore": {"prefect", "mlflow", "dvc", "yaml", "tasks", "flows", "matplotlib", "benchmarks"},
    "tasks": {"flows", "benchmarks"},
    "flows": {"benchmarks"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_only_downwards(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_modules(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert offenders == {}


def test_detector_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import prefect\nfrom mlflow import log_metric\n")
    assert {"prefect", "mlflow"} <= imported_modules(bad)


# the stage entry point and the runners every flow uses
STAGE_HELPERS = {"flows.stage", "flows.runners", "flows"}


def flow_imports(path: Path) -> set[str]:
    """The ``flows.<module>`` modules ``path`` imports (``from flows import x`` counts as ``flows.x``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("flows."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "flows":
                found.update(f"flows.{alias.name}" for alias in node.names)
            elif node.module.startswith("flows."):
                found.add(node.module)
    return found


def test_stage_flows_do_not_import_each_other() -> None:
    offenders = {
        path.name: sorted(flow_imports(path) - STAGE_HELPERS)
        for path in (ROOT / "flows").glob("*.py") if path.name not in {"__init__.py", "pipeline.py", "cli.py"}
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_flow_import_detector_sees_one(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from flows import modality, stage\nimport flows.federate\nfrom flows.distill import x\n")
    assert flow_imports(bad) - STAGE_HELPERS == {"flows.modality", "flows.federate", "flows.distill"}


def round_loops(path: Path) -> list[int]:
    """Lines of ``for <name> in range(...)`` loops whose variable names a server round."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and "round" in node.target.id
            and isinstance(node.iter, ast.Call) and getattr(node.iter.func, "id", None) == "range"]


def test_one_function_iterates_rounds() -> None:
    """Rounds are iterated by fedcore.federation.engine.run_rounds alone (in the library and the pipeline)."""
    loops = {str(path.relative_to(ROOT)): round_loops(path)
             for package in ("fedcore", "tasks", "flows") for path in (ROOT / package).rglob("*.py")}
    found = {k: len(v) for k, v in loops.items() if v}
    assert found == {"fedcore/federation/engine.py": 1}


def test_one_function_iterates_minibatches() -> None:
    """Local training steps through fedcore.algorithms.base.train_client alone; objectives hook into it."""
    callers = {str(path.relative_to(ROOT)) for package in ("fedcore", "tasks", "flows")
               for path in (ROOT / package).rglob("*.py")
               if "epoch_batches(" in path.read_text() or ".step()" in path.read_text()}
    assert callers <= {"fedcore/algorithms/base.py", "fedcore/algorithms/mutual.py"}
