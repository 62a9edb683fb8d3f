"""``benchmarks.freshness`` on a small real DVC project (git repo, ``dvc init --subdir``, ``dvc repro``).

The project, ``bench/`` inside a git work tree like a matrix: ``train.py`` (code, committed) reads
``params.yaml``'s ``train`` section and ``data/raw.txt`` (data, git-ignored) and writes ``model.txt``
(git-ignored) and ``metrics.json`` (committed); ``report`` turns ``model.txt`` into ``report.md`` (committed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.benchlib import code_json_text
from benchmarks.freshness import FreshnessError, check, main

pytestmark = pytest.mark.integration

TRAIN = """import json, pathlib, yaml
params = yaml.safe_load(open("params.yaml"))["train"]
data = pathlib.Path("data/raw.txt").read_text()
pathlib.Path("model.txt").write_text(f"{params['lr']} {params['epochs']} {len(data)}")
json.dump({"acc": 0.5}, open("metrics.json", "w"))
"""
DVC_YAML = f"""stages:
  train:
    cmd: {sys.executable} train.py
    deps:
      - train.py
      - data/raw.txt
    params:
      - train.lr
      - train.epochs
    outs:
      - model.txt:
          cache: false
    metrics:
      - metrics.json:
          cache: false
  report:
    cmd: {sys.executable} -c "import pathlib; pathlib.Path('report.md').write_text(open('model.txt').read())"
    deps:
      - model.txt
    outs:
      - report.md:
          cache: false
"""


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project after ``dvc repro`` with everything git should hold committed (built once per module)."""
    root = tmp_path_factory.mktemp("repo")
    _git(root, "init", "-q")
    bench = root / "bench"
    (bench / "data").mkdir(parents=True)
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "--subdir", "-q"], cwd=bench, check=True)
    (bench / "train.py").write_text(TRAIN)
    (bench / "params.yaml").write_text("train:\n  lr: 0.1\n  epochs: 2\nother:\n  x: 1\n")
    (bench / "dvc.yaml").write_text(DVC_YAML)
    (bench / ".gitignore").write_text("/data/\n/model.txt\n")
    (bench / "data" / "raw.txt").write_text("some audio")
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "repro", "-q"], cwd=bench, check=True,
                   capture_output=True)
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "run")
    return root


@pytest.fixture
def bench(built: Path, tmp_path: Path) -> Path:
    """A fresh copy of the built project for one test to change."""
    shutil.copytree(built, tmp_path / "repo", symlinks=True)
    return tmp_path / "repo" / "bench"


def _run(bench: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main([str(bench), "--all"])
    return code, capsys.readouterr().out


def test_freshness_fresh_project_exits_0(bench: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(bench, capsys)
    assert code == 0, out
    assert "0 of 2 stages stale" in out


def test_freshness_edited_code_dep_is_named(bench: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (bench / "train.py").write_text(TRAIN + "# tuned\n")
    code, out = _run(bench, capsys)
    assert code == 1
    report = check(bench)
    assert [(c.kind, c.what) for c in report.stale["train"]] == [("dep", "train.py")]
    # The downstream stage reruns too, as `dvc repro` would.
    assert [(c.kind, c.what) for c in report.stale["report"]] == [("upstream", "train")]
    assert "dep train.py:" in out and "upstream stage train is stale" in out


def test_freshness_changed_param_names_key_and_both_values(bench: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    (bench / "params.yaml").write_text("train:\n  lr: 0.2\n  epochs: 2\nother:\n  x: 5\n")
    code, out = _run(bench, capsys)
    assert code == 1
    changes = check(bench).stale["train"]
    assert [(c.kind, c.what, c.recorded, c.now) for c in changes] == [("param", "params.yaml:train.lr", "0.1", "0.2")]
    assert "param params.yaml:train.lr: 0.1 -> 0.2" in out
    assert "other.x" not in out  # a key no stage reads


def test_freshness_ignores_missing_or_changed_data(bench: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (bench / "data" / "raw.txt").unlink()
    (bench / "model.txt").write_text("another model")  # an ignored out, and the next stage's dep
    code, out = _run(bench, capsys)
    assert code == 0, out


def test_freshness_committed_out_edited_by_hand_is_stale(bench: Path) -> None:
    (bench / "metrics.json").write_text(json.dumps({"acc": 0.99}))
    changes = check(bench).stale["train"]
    assert [(c.kind, c.what) for c in changes] == [("out", "metrics.json")]


def test_freshness_deleted_tracked_file_is_stale(bench: Path) -> None:
    (bench / "report.md").unlink()
    [change] = check(bench).stale["report"]
    assert (change.kind, change.what, change.now) == ("out", "report.md", "missing")


def test_freshness_changed_command_and_new_stage(bench: Path) -> None:
    text = DVC_YAML.replace("train.py\n    deps", "train.py --fast\n    deps") + (
        "  extra:\n    cmd: echo hi\n")
    (bench / "dvc.yaml").write_text(text)
    report = check(bench)
    [cmd] = [c for c in report.stale["train"] if c.kind == "cmd"]
    assert cmd.recorded.endswith("train.py") and cmd.now.endswith("train.py --fast")
    assert [c.kind for c in report.stale["extra"]] == ["stage"]


def test_freshness_regenerated_fingerprint_names_changed_files(bench: Path) -> None:
    # A code.json committed with the stage's lock entry, compared as it would be written now.
    old = json.dumps({"files": {"a.py": "1", "b.py": "2"}}, indent=2) + "\n"
    (bench / "code.json").write_text(old)
    (bench / "dvc.yaml").write_text(DVC_YAML.replace("      - train.py\n", "      - train.py\n      - code.json\n"))
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "commit", "-f", "-q"], cwd=bench, check=True,
                   capture_output=True)
    assert not check(bench).stale
    new = json.dumps({"files": {"a.py": "9", "c.py": "3"}}, indent=2) + "\n"
    [change] = check(bench, regenerate={"code.json": new.encode}).stale["train"]
    assert (change.kind, change.what) == ("dep", "code.json")
    assert change.detail == "changed: a.py; added: c.py; removed: b.py"
    # Unchanged when regenerated to the same bytes.
    assert not check(bench, regenerate={"code.json": old.encode}).stale


def test_freshness_folder_partly_in_git_is_unchecked(bench: Path) -> None:
    (bench / "results").mkdir()
    (bench / "results" / "metrics.json").write_text("{}")
    (bench / "results" / "weights.bin").write_text("w")
    (bench / ".gitignore").write_text("/data/\n/model.txt\n*.bin\n")
    (bench / "dvc.yaml").write_text(DVC_YAML + "  table:\n    cmd: echo table\n    deps:\n      - results\n")
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "commit", "-f", "-q"], cwd=bench, check=True,
                   capture_output=True)
    (bench / "results" / "weights.bin").write_text("other weights")
    report = check(bench)
    assert "table" not in report.stale
    assert report.unchecked == ("results",)
    # A fresh clone lacks the ignored file: git then holds all of the folder, but the lock counted 2 files.
    (bench / "results" / "weights.bin").unlink()
    report = check(bench)
    assert "table" not in report.stale
    assert report.unchecked == ("results",)


def test_freshness_outside_git_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FreshnessError, match="git work tree"):
        check(tmp_path)


def test_code_json_text_is_what_the_code_stage_writes(tmp_path: Path) -> None:
    from benchmarks.benchlib import main as benchlib_main

    assert benchlib_main(["code", "robustness", "--out", str(tmp_path / "code.json")]) == 0
    assert (tmp_path / "code.json").read_text() == code_json_text("robustness")
