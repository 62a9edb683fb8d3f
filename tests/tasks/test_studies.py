"""The pipeline's run request: typed, described fields whose overrides land on the right params keys."""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import ValidationError

from fedcore.config import flatten
from fedcore.plugins import FAMILIES
from tasks.common import read_params
from tasks.overrides import render
from tasks.studies import STUDIES, PipelineRun, Study, plugin_modules

REPO_ROOT = Path(__file__).resolve().parents[2]
PARAMS = (REPO_ROOT / "params.yaml").read_text()
FAMILY_OF = {"dataset": "dataset", "scheme": "partitioner", "model": "model", "local_algorithm": "local_algorithm",
             "aggregator": "aggregator", "poisoning": "poison", "attack": "attack"}


def a_value(name: str) -> object:
    """A valid value of field ``name`` that differs from the committed params file's."""
    annotation = typing.get_args(PipelineRun.model_fields[name].annotation)[0]
    if typing.get_origin(annotation) is typing.Literal:
        current = flatten(read_params(REPO_ROOT / "params.yaml"))[PipelineRun.field_keys()[name]]
        return next(choice for choice in typing.get_args(annotation) if choice != current)
    return {int: 7, float: 0.25}[annotation]


@pytest.mark.parametrize(("name", "key"), list(PipelineRun.field_keys().items()))
def test_each_field_overrides_its_params_key(name: str, key: str, tmp_path: Path) -> None:
    value = a_value(name)
    text, changes = render(PARAMS, PipelineRun(**{name: value}).overrides())
    (tmp_path / "params.yaml").write_text(text)
    assert [(c.key, c.after) for c in changes] == [(key, value)]
    assert flatten(read_params(tmp_path / "params.yaml"))[key] == value


def test_empty_fields_change_nothing() -> None:
    assert PipelineRun().overrides() == []
    assert render(PARAMS, PipelineRun().overrides()) == (PARAMS, [])


def test_overrides_are_fields_in_form_order_then_set() -> None:
    run = PipelineRun(rounds=3, alpha=0.1, aggregator="median", set=["fedprox.mu=0.1"])
    assert run.overrides() == ["partition.alpha=0.1", "federation.rounds=3", "federation.aggregator=median",
                               "fedprox.mu=0.1"]


@pytest.mark.parametrize(("name", "family"), list(FAMILY_OF.items()))
def test_choices_are_the_registry_names(name: str, family: str) -> None:
    """The names registered when the form was built (a test may register more later, e.g. a plugin)."""
    choices = PipelineRun.model_json_schema()["properties"][name]["anyOf"][0]["enum"]
    assert choices == sorted(choices) and set(choices) <= set(FAMILIES[family].names())
    assert len(choices) > 1 and flatten(read_params(REPO_ROOT / "params.yaml"))[PipelineRun.field_keys()[name]] in [
        *choices, None]


def test_every_field_is_described() -> None:
    properties = PipelineRun.model_json_schema()["properties"]
    assert all(len(p.get("description", "")) > 20 for p in properties.values()), properties
    for name, key in PipelineRun.field_keys().items():
        assert f"`{key}`" in properties[name]["description"]


@pytest.mark.parametrize(("request_", "message"), [
    ({"aggregator": "fedsgd"}, "aggregator\n  Input should be 'fairavg', 'fedadam'"),
    ({"attack": "flip"}, "attack\n  Input should be"),
    ({"study": "nosuchstudy"}, "study\n  Input should be 'fedavg'"),
    ({"rounds": 0}, "rounds\n  Input should be greater than or equal to 1"),
    ({"attack_fraction": 1.5}, "attack_fraction\n  Input should be less than or equal to 1"),
    ({"params_file": "tiny.yaml"}, "params_file\n  Extra inputs are not permitted"),
    ({"set": ["federation.round=3"]}, "'federation.round' is not a param .* Did you mean 'federation.rounds'"),
    ({"set": ["nosection.rounds=3"]}, "'nosection.rounds' is not a param"),
    ({"set": ["federation.rounds=3,4"]}, "sweeps over several values"),
    ({"set": ["federation.rounds 3"]}, "is not 'key=value'"),
    ({"rounds": 3, "set": ["federation.rounds=4"]}, "'federation.rounds' set more than once"),
])
def test_bad_requests_are_refused_naming_the_field(request_: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PipelineRun(**request_)


def test_set_accepts_entries_inside_a_mapping_param_and_nulls() -> None:
    run = PipelineRun(set=["personal.map.3=1", "download.mirror=null"])
    assert run.overrides() == ["personal.map.3=1", "download.mirror=null"]


def test_every_study_names_files_of_the_project() -> None:
    assert "fedavg" in STUDIES
    for study in STUDIES.values():
        assert (REPO_ROOT / study.dvc_file).is_file() and (REPO_ROOT / study.params_file).is_file()


def test_the_same_run_from_a_shell_names_the_study_and_its_params_file() -> None:
    assert STUDIES["fedavg"].shell_command(["federation.rounds=2"]) == "dvc exp run -S federation.rounds=2"
    assert STUDIES["fassl"].shell_command(["federation.rounds=2"]) == (
        "dvc exp run studies/fassl/dvc.yaml -S studies/fassl/params.yaml:federation.rounds=2")
    assert STUDIES["earlyexit"].shell_command([]) == "dvc repro studies/earlyexit/dvc.yaml"


def test_plugin_members_of_the_studies_are_in_the_form(tmp_path: Path) -> None:
    """A member that a study's ``plugins.modules`` registers is a choice of its field (built at import)."""
    (tmp_path / "myplugins").mkdir()
    (tmp_path / "myplugins" / "__init__.py").write_text("")
    (tmp_path / "myplugins" / "halfway.py").write_text(
        "from fedcore.aggregation import AGGREGATORS\n"
        "from fedcore.aggregation.fedavg import FedAvg\n\n\n"
        "@AGGREGATORS.register('halfway')\n"
        "class Halfway(FedAvg):\n"
        "    pass\n")
    (tmp_path / "params.yaml").write_text("plugins:\n  modules: [myplugins.halfway]\n")
    script = ("from tasks.studies import PipelineRun\n"
              "print(PipelineRun.model_json_schema()['properties']['aggregator']['anyOf'][0]['enum'])\n"
              "print(PipelineRun(aggregator='halfway').overrides())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)])}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    choices, overrides = done.stdout.splitlines()
    assert "'halfway'" in choices and "'fedavg'" in choices
    assert overrides == "['federation.aggregator=halfway']"


def test_plugin_modules_are_read_from_every_study_and_listed_once(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("plugins:\n  modules: [p.one, p.two]\n")
    (tmp_path / "b.yaml").write_text("plugins:\n  modules: [p.two, p.three]\n")
    (tmp_path / "c.yaml").write_text(": not yaml [")
    studies = {name: Study("s", params_file=f"{name}.yaml") for name in ("a", "b", "c", "missing")}
    assert plugin_modules(studies, tmp_path) == ["p.one", "p.two", "p.three"]
