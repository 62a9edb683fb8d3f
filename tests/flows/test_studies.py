"""The studies (studies/<name>/dvc.yaml + params.yaml): each a pipeline of the root project a user runs whole.

Offline checks of every study's files (the DVC file parses, each stage runs a stage module from the root on the
study's own params file, every params key it names exists there, the file passes fedcore's checks, outputs and
MLflow names are the study's own), and one real run of a study through ``dvc repro`` in a fresh git + DVC project.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedcore.config import load_params
from tests.flows.conftest import REPO_ROOT, dvc_executable, make_project, run, stage_env, tiny_params

STUDIES_DIR = REPO_ROOT / "studies"
STUDY_NAMES = sorted(p.parent.name for p in STUDIES_DIR.glob("*/dvc.yaml"))
#: Where a study's stages may write: data/<study>/..., models/<study>/..., and so on.
OUT_ROOTS = ("data", "models", "metrics", "plots")
_VAR = re.compile(r"\$\{([^}]+)\}")
#: The params that name a registered MLflow model: in a study, each is "" or its own ``fedaudio-<study>...``.
REGISTERED_KEYS = ("mlflow.registered_model", "downstream.registered_model", "modality.registered_model",
                   "modality.registered_audio", "distill.registered_model", "earlyexit.registered_model")


def _load(study: str) -> tuple[dict[str, Any], dict[str, Any]]:
    folder = STUDIES_DIR / study
    return yaml.safe_load((folder / "dvc.yaml").read_text()), yaml.safe_load((folder / "params.yaml").read_text())


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _resolver(pipeline: Mapping[str, Any], params: Mapping[str, Any]) -> Any:
    """``${name}`` interpolation as DVC does it: the file's vars, then its params.yaml (beside the dvc.yaml)."""
    variables: dict[str, Any] = {}
    for entry in pipeline.get("vars", []):
        assert isinstance(entry, Mapping), "vars: inline mappings only (no other files)"
        variables.update(entry)

    def resolve(text: str) -> str:
        def one(match: re.Match[str]) -> str:
            name = match.group(1)
            return str(variables[name] if name in variables else _lookup(params, name))
        return _VAR.sub(one, text)
    return resolve


def _paths(entries: list[Any]) -> Iterator[str]:
    for entry in entries or []:
        yield from ([entry] if isinstance(entry, str) else list(entry))


def test_every_study_folder_is_found() -> None:
    assert {"personalised", "fassl", "modalitymirror", "earlyexit"} <= set(STUDY_NAMES)


@pytest.mark.parametrize("study", STUDY_NAMES)
def test_params_file_passes_the_checks_and_names_the_study(study: str) -> None:
    _, raw = _load(study)
    params = load_params(raw)  # every section present is checked; unknown keys and sections fail
    assert params.mlflow.experiment == f"fedaudio-{study}"
    names = {key: _lookup(raw, key) for key in REGISTERED_KEYS if key.split(".")[0] in raw}
    assert any(names.values()), f"{study} registers no model"
    for key, name in names.items():  # "" registers nothing
        assert name == "" or name.startswith(f"fedaudio-{study}"), f"{study}: {key} = {name!r}"
    for uri in (params.distill.teacher, params.distill.student) if "distill" in raw else ():
        assert uri.startswith(f"models:/fedaudio-{study}-"), uri


@pytest.mark.parametrize("study", STUDY_NAMES)
def test_stages_run_stage_modules_on_the_study_params(study: str) -> None:
    pipeline, raw = _load(study)
    resolve = _resolver(pipeline, raw)
    params_file = f"studies/{study}/params.yaml"
    assert pipeline["stages"], study
    for name, stage in pipeline["stages"].items():
        assert stage.get("wdir") == "../..", f"{study}:{name} must run from the project root"
        cmd = resolve(stage["cmd"] if isinstance(stage["cmd"], str) else " ".join(stage["cmd"]))
        match = re.match(r"python -m ([\w.]+)\s", cmd)
        assert match, f"{study}:{name}: {cmd!r}"
        module = match.group(1)
        assert module.startswith("flows."), module
        assert (REPO_ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{study}:{name}: no module {module}"
        for called in re.findall(r"python -m flows\.(\w+)", cmd):  # the stage's flow (and flows.headline)
            assert f"flows/{called}.py" in stage["deps"], f"{study}:{name}: flows/{called}.py is not a dep"
        for package in ("fedcore", "tasks"):
            assert package in stage["deps"], f"{study}:{name}: the whole {package} package is a dep"
        assert f"--params {params_file}" in cmd, f"{study}:{name} must read {params_file}"
        entries = stage.get("params", [])
        assert entries, f"{study}:{name} names no params"
        for entry in entries:
            assert isinstance(entry, Mapping) and list(entry) == [params_file], \
                f"{study}:{name}: params must come from {params_file}, got {entry!r}"
            for key in entry[params_file]:
                _lookup(raw, key)  # raises KeyError when the file lacks it


@pytest.mark.parametrize("study", STUDY_NAMES)
def test_check_stage_reads_every_section_and_guards_every_stage(study: str) -> None:
    pipeline, raw = _load(study)
    resolve = _resolver(pipeline, raw)
    stages = pipeline["stages"]
    listed = stages["check"]["params"][0][f"studies/{study}/params.yaml"]
    assert sorted(listed) == sorted(raw), "check must read every section of the params file"
    stamp = resolve(stages["check"]["outs"][0])
    for name, stage in stages.items():
        if name != "check":
            assert stamp in [resolve(d) for d in stage["deps"]], f"{study}:{name} must depend on the check stamp"


@pytest.mark.parametrize("study", STUDY_NAMES)
def test_code_deps_exist_and_outputs_are_the_study_own(study: str) -> None:
    pipeline, raw = _load(study)
    resolve = _resolver(pipeline, raw)
    produced: list[str] = []
    for stage in pipeline["stages"].values():
        for key in ("outs", "metrics", "plots"):
            produced.extend(resolve(p) for p in _paths(stage.get(key, [])))
    for path in produced:
        root, owner = Path(path).parts[:2]
        assert root in OUT_ROOTS and owner == study, f"{study}: output {path} is not under <root>/{study}/"
    for stage in pipeline["stages"].values():
        for dep in (resolve(d) for d in stage["deps"]):
            made = any(dep == p or dep.startswith(p + "/") or p.startswith(dep + "/") for p in produced)
            assert made or (REPO_ROOT / dep).exists(), f"{study}: dependency {dep} is neither code nor an output"
    for plot in pipeline.get("plots", []):
        for definition in plot.values():
            for source in definition["y"]:
                assert source.startswith(f"../../plots/{study}/"), source


def test_studies_are_registered_for_the_pipeline_flow() -> None:
    from tasks.studies import STUDIES

    for study in STUDY_NAMES:
        assert study in STUDIES, f"tasks.studies.STUDIES lacks {study!r}"
        entry = STUDIES[study]
        assert entry.dvc_file == f"studies/{study}/dvc.yaml"
        assert entry.params_file == f"studies/{study}/params.yaml"
        outs = [p for s in _load(study)[0]["stages"].values() for p in _paths(s.get("metrics", []))]
        assert entry.metrics in outs, f"{study}: headline metrics {entry.metrics} is not a metrics output"


# ------------------------------------------------------------------------------------------------ one real run
RUN_STUDY = "earlyexit"
"""The cheapest study to run for real: a small transformer, no pretraining, five stages."""


def _shrunk(study: str, mirror: Path) -> dict[str, Any]:
    """The study's params, small: the tiny FSDD archive, 3 clients, 2 rounds, a 2-layer backbone."""
    raw = _load(study)[1]
    tiny = tiny_params(mirror)
    raw["download"]["mirror"] = tiny["download"]["mirror"]
    raw["partition"].update(num_clients=3, min_samples=5)
    raw["federation"].update(rounds=2, batch_size=16)
    raw["model"].update(width=16, depth=2)
    raw["earlyexit"].update(exits=[1, 2], tiers=[{"share": 0.5, "depth": 1}, {"share": 0.5, "depth": 2}])
    return raw


@pytest.fixture(scope="module")
def study_project(tmp_path_factory: pytest.TempPathFactory, small_mirror: Path, prefect_api: str) -> Path:
    root = make_project(tmp_path_factory.mktemp("study") / "project", tiny_params(small_mirror))
    folder = root / "studies" / RUN_STUDY
    shutil.copytree(STUDIES_DIR / RUN_STUDY, folder)
    (folder / "params.yaml").write_text(yaml.safe_dump(_shrunk(RUN_STUDY, small_mirror), sort_keys=False))
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "study"], root)
    run([dvc_executable(), "repro", f"studies/{RUN_STUDY}/dvc.yaml"], root, stage_env(prefect_api), timeout=900)
    return root


@pytest.mark.integration
def test_a_study_runs_whole_through_dvc_repro(study_project: Path) -> None:
    root = study_project
    assert (root / f"studies/{RUN_STUDY}/dvc.lock").is_file()
    assert not (root / "dvc.lock").exists(), "the default study was not run"
    metrics = json.loads((root / "metrics/earlyexit/earlyexit.json").read_text())
    assert metrics["rounds"] == 2 and 0.0 <= metrics["final_exit_accuracy"] <= 1.0
    assert (root / "plots/earlyexit/earlyexit/rounds.tsv").read_text().count("\n") == 3  # header + 2 rounds
    status = run([dvc_executable(), "status", f"studies/{RUN_STUDY}/dvc.yaml"], root)
    assert "up to date" in status.stdout, status.stdout


@pytest.mark.integration
def test_the_study_has_its_own_experiment_and_registered_model(study_project: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{study_project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"fedaudio-{RUN_STUDY}")
    assert experiment is not None
    assert client.get_experiment_by_name("fedaudio") is None, "nothing of the default study's"
    version = client.get_model_version_by_alias("fedaudio-earlyexit", "final")
    assert client.get_run(version.run_id).info.experiment_id == experiment.experiment_id


@pytest.mark.integration
def test_the_pipeline_flow_runs_a_study_with_an_override(study_project: Path, prefect_api: str) -> None:
    """The README's ``python -m flows.pipeline --study <s> -S key=value``: the study reruns with the override,
    recorded in its lock, and its params file is put back."""
    root = study_project
    params_file = root / f"studies/{RUN_STUDY}/params.yaml"
    before = params_file.read_text()
    result = run([sys.executable, "-m", "flows.pipeline", "--study", RUN_STUDY, "-S", "federation.rounds=1"], root,
                 stage_env(prefect_api), timeout=900)
    assert "pipeline finished" in result.stdout, result.stdout + result.stderr
    assert json.loads((root / "metrics/earlyexit/earlyexit.json").read_text())["rounds"] == 1
    lock = yaml.safe_load((root / f"studies/{RUN_STUDY}/dvc.lock").read_text())
    recorded = [s["params"][f"studies/{RUN_STUDY}/params.yaml"]["federation"]["rounds"]
                for s in lock["stages"].values() if "federation" in s.get("params", {}).get(
                    f"studies/{RUN_STUDY}/params.yaml", {})]
    assert recorded and set(recorded) == {1}
    assert params_file.read_text() == before
