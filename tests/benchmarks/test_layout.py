"""The benchmark matrices are DVC projects of their own (``dvc init --subdir``): the root project sees none of their
stages, and a matrix's stages read only files inside its folder (its params.yaml, its own data and results, and
code.json, the fingerprint of the project's code)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.benchlib import code_fingerprint, read_matrix_params
from fedcore.config import load_params

ROOT = Path(__file__).resolve().parents[2]
#: Each matrix folder and the section of its params.yaml that holds the matrix settings.
MATRICES = {"robustness": "robustness", "personalisation": "personalisation", "fassl": "fassl",
            "modality": "avbench", "earlyexit": "eebench"}


def _has(tree: Any, dotted: str) -> bool:
    for key in dotted.split("."):
        if not isinstance(tree, Mapping) or key not in tree:
            return False
        tree = tree[key]
    return True


def test_the_root_project_has_no_benchmark_stage() -> None:
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        files = {Path(stage.path).resolve().relative_to(ROOT).as_posix() for stage in repo.index.stages}
        outs = [out.fs_path for stage in repo.index.stages for out in stage.outs]
    assert files and all(f == "dvc.yaml" or (f.startswith("studies/") and f.endswith("/dvc.yaml")) for f in files)
    assert not [p for p in outs if Path(p).resolve().is_relative_to(ROOT / "benchmarks")]


@pytest.mark.parametrize("matrix", sorted(MATRICES))
def test_a_matrix_reads_only_its_own_folder(matrix: str) -> None:
    from dvc.repo import Repo

    folder = ROOT / "benchmarks" / matrix
    assert (folder / ".dvc" / "config").is_file(), "not a DVC project of its own (dvc init --subdir)"
    settings = yaml.safe_load((folder / "params.yaml").read_text())
    raw, _ = read_matrix_params(folder / "params.yaml", MATRICES[matrix])
    load_params(raw)  # the project sections are valid params on their own
    with Repo(str(folder)) as repo:
        stages = repo.index.stages
        assert len(stages) > 3
        for stage in stages:
            assert stage.cmd.startswith("PYTHONPATH=../.. python -m benchmarks."), stage.addressing
            for dep in stage.deps:
                assert Path(dep.fs_path).resolve().is_relative_to(folder), (stage.addressing, dep.fs_path)
                if hasattr(dep, "params"):
                    missing = [k for k in dep.params or [] if not _has(settings, k)]
                    assert not missing, (stage.addressing, missing)
            if stage.name != "code":
                assert "code.json" in {Path(d.fs_path).name for d in stage.deps}, stage.addressing


def test_the_code_fingerprint_ignores_caches_and_names_every_source(tmp_path: Path) -> None:
    for name in ("fedcore", "tasks", "flows", "benchmarks/m"):
        (tmp_path / name / "__pycache__").mkdir(parents=True)
        (tmp_path / name / "a.py").write_text(name)
        (tmp_path / name / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "benchmarks" / "benchlib.py").write_text("lib")
    before = code_fingerprint("m", tmp_path)
    assert sorted(before) == ["benchmarks/benchlib.py", "benchmarks/m/a.py", "fedcore/a.py", "flows/a.py",
                              "tasks/a.py"]
    (tmp_path / "fedcore" / "__pycache__" / "b.cpython-311.pyc").write_bytes(b"\1")
    assert code_fingerprint("m", tmp_path) == before
    (tmp_path / "tasks" / "a.py").write_text("changed")
    assert code_fingerprint("m", tmp_path)["tasks/a.py"] != before["tasks/a.py"]
    json.dumps(before)


def test_a_driver_command_names_the_options_it_lacks() -> None:
    import argparse

    from benchmarks.benchlib import run_command
    from fedcore.errors import ConfigError

    ran: list[str] = []
    commands = {"cell": lambda a: ran.append("cell"), "table": lambda a: ran.append("table")}
    with pytest.raises(ConfigError, match="m: 'cell' needs --method, --seed."):
        run_command("m", argparse.Namespace(command="cell", method=None, seed=None), {"cell": ["method", "seed"]},
                    commands)
    run_command("m", argparse.Namespace(command="table"), {"cell": ["method"]}, commands)
    assert ran == ["table"]
