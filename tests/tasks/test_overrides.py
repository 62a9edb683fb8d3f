"""Overrides applied as `dvc exp run -S` applies them, with the params file's layout kept."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import pytest
import yaml

from fedcore.errors import ConfigError
from tasks.common import read_params
from tasks.overrides import (
    NOTE_NAME,
    STATE_DIR,
    ProjectBusyError,
    format_value,
    overridden,
    parse,
    render,
    restore_left_file,
    run_lock,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PARAMS = (REPO_ROOT / "params.yaml").read_text()


def changed_lines(before: str, after: str) -> list[str]:
    return [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), n=0, lineterm="")
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def test_render_without_overrides_writes_the_committed_file_back_byte_for_byte() -> None:
    assert render(PARAMS, []) == (PARAMS, [])


def test_render_changes_only_the_overridden_lines_and_keeps_nulls_and_comments() -> None:
    text, changes = render(PARAMS, ["federation.rounds=3", "federation.aggregator=fedadam", "downstream.ks=[5]"])
    comment = "# null: the local algorithm's default (lpa for fedmlac, fedavg otherwise); or fedavg |"
    assert changed_lines(PARAMS, text) == [
        "-  rounds: 30", "+  rounds: 3",
        f"-  aggregator:            {comment}", f"+  aggregator: fedadam    {comment}",
        "-  - 1", "-  - 20", "+  - 5",
    ]
    assert "\n  mirror:                # folder" in text  # a null stays a blank, as `dvc exp run -S` writes it
    assert [(c.key, c.before, c.after) for c in changes] == [
        ("federation.rounds", 30, 3), ("federation.aggregator", None, "fedadam"), ("downstream.ks", [1, 20], [5])]


def test_render_writes_a_replaced_list_in_the_style_it_had() -> None:
    text = "a:\n  flow: [1, 20]   # kept inline\n  block:\n  - x: 1\n"
    out, _ = render(text, ["a.flow=[5]", "a.block=[{x:2}]"])
    assert "\n  flow: [5]" in out and "# kept inline\n  block:\n  - x: 2\n" in out


def test_render_gives_the_values_dvc_computes_and_the_stages_read_them_alike(tmp_path: Path) -> None:
    """Same data as DVC's own -S writer; PyYAML (the stages) and ruamel (DVC) read the written file alike."""
    from dvc.utils.hydra import apply_overrides

    overrides = ["federation.lr=1e-5", "download.mirror=/data/mirror", "download.max_per_class=20",
                 "features.f_max=null", "poison.source='yes'", "attack.options.alie.alie_z=2"]
    copy = tmp_path / "params.yaml"
    copy.write_text(PARAMS)
    apply_overrides(copy, overrides)
    from ruamel.yaml import YAML

    dvc_data = YAML(typ="safe", pure=True).load(copy.read_text())
    text, _ = render(PARAMS, overrides)
    assert yaml.safe_load(text) == dvc_data
    assert YAML(typ="safe", pure=True).load(text) == dvc_data
    assert "lr: 1.0e-05" in text and "source: 'yes'" in text  # PyYAML reads 1e-05 and yes as str and True
    assert isinstance(yaml.safe_load(text)["federation"]["lr"], float)


PARAMS_FILES = sorted(p.relative_to(REPO_ROOT).as_posix()
                      for p in [REPO_ROOT / "params.yaml", *REPO_ROOT.glob("studies/*/params.yaml")])


@pytest.mark.parametrize("name", PARAMS_FILES)
def test_dvc_exp_run_set_changes_only_the_line_it_sets(name: str, tmp_path: Path) -> None:
    """`dvc exp run -S` (DVC's own writer) and ours leave the rest of each params file as it is: nulls, quotes."""
    from dvc.utils.hydra import apply_overrides

    text = (REPO_ROOT / name).read_text()
    copy = tmp_path / "params.yaml"
    copy.write_text(text)
    apply_overrides(copy, ["federation.rounds=3"])
    rounds = yaml.safe_load(text)["federation"]["rounds"]
    assert [line.split("#")[0].rstrip() for line in changed_lines(text, copy.read_text())] == [
        f"-  rounds: {rounds}", "+  rounds: 3"]
    ours, _ = render(text, ["federation.rounds=3"])
    assert ours == copy.read_text()


@pytest.mark.parametrize(("override", "message"), [
    ("federation.round=3", "Could not override 'federation.round'"),
    ("federation.rounds=1,2", "sweeps over several values"),
    ("federation.rounds", "is not 'key=value'"),
])
def test_render_refuses_what_dvc_refuses(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        render(PARAMS, [override])


@pytest.mark.parametrize("value", ["fedadam", "a b", "it's", "a,b", "null", "1e-5", "yes", "", "models:/a@b",
                                   3, 0.1, 1e-5, -2.5, None, True, False])
def test_format_value_parses_back_to_the_same_value(value: object) -> None:
    back = parse(f"key={format_value(value)}").value()
    assert back == value and type(back) is type(value)


def project(tmp_path: Path) -> tuple[Path, Path]:
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS)
    return tmp_path, params


def test_overridden_applies_for_the_block_then_puts_the_file_back(tmp_path: Path) -> None:
    root, params = project(tmp_path)
    with overridden(root, params, ["partition.num_clients=4"]) as changes:
        assert read_params(params).partition.num_clients == 4
        assert (root / STATE_DIR / NOTE_NAME).exists()
    assert [c.key for c in changes] == ["partition.num_clients"]
    assert params.read_text() == PARAMS
    assert not (root / STATE_DIR / NOTE_NAME).exists()


def test_overridden_puts_the_file_back_when_the_run_fails(tmp_path: Path) -> None:
    root, params = project(tmp_path)
    with pytest.raises(RuntimeError, match="stage failed"), overridden(root, params, ["federation.rounds=2"]):
        raise RuntimeError("stage failed")
    assert params.read_text() == PARAMS


def test_a_file_left_changed_by_a_killed_run_is_put_back_by_the_next(tmp_path: Path) -> None:
    root, params = project(tmp_path)
    applied, _ = render(PARAMS, ["federation.rounds=2"])
    params.write_text(applied)  # what a run killed with SIGKILL inside `overridden` leaves
    note = root / STATE_DIR / NOTE_NAME
    note.parent.mkdir(parents=True)
    note.write_text(json.dumps({"original": PARAMS, "applied": applied, "overrides": ["federation.rounds=2"]}))
    with overridden(root, params, []) as changes:
        assert changes == [] and params.read_text() == PARAMS
    assert not note.exists()


def test_a_file_edited_after_a_killed_run_is_left_as_edited(tmp_path: Path) -> None:
    root, params = project(tmp_path)
    applied, _ = render(PARAMS, ["federation.rounds=2"])
    edited, _ = render(PARAMS, ["federation.rounds=5"])
    params.write_text(edited)
    note = root / STATE_DIR / NOTE_NAME
    note.parent.mkdir(parents=True)
    note.write_text(json.dumps({"original": PARAMS, "applied": applied}))
    assert restore_left_file(root, params) is False
    assert params.read_text() == edited and not note.exists()


def test_an_invalid_override_leaves_the_file_untouched(tmp_path: Path) -> None:
    root, params = project(tmp_path)
    with pytest.raises(ConfigError), overridden(root, params, ["federation.nope=1"]):
        pass
    assert params.read_text() == PARAMS


def test_run_lock_refuses_a_second_run(tmp_path: Path) -> None:
    with run_lock(tmp_path):
        with pytest.raises(ProjectBusyError, match="another run"), run_lock(tmp_path):
            pass
    with run_lock(tmp_path):  # released
        pass
