"""Early-exit stage end to end on real spoken digits: tiers and plans decide who trains how deep, compute is
counted per tier, every exit is scored and logged, a killed run resumes to the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fedcore.earlyexit.tiers import assign_exits
from fedcore.federation.checkpoint import load_state, save_state
from flows import download, features, partition
from flows import earlyexit as earlyexit_flow
from tests.flows.conftest import tiny_params
from tests.flows.test_stages import _kill_at_round, _Killed

pytestmark = pytest.mark.integration

TIERS = [{"share": 0.34, "depth": 1}, {"share": 0.33, "depth": 2}, {"share": 0.33, "depth": 3}]


def _params(mirror: Path, **earlyexit: object) -> dict[str, object]:
    params = tiny_params(mirror, model={"name": "transformer", "width": 8, "depth": 3},
                         federation={"batch_size": 16, "local_epochs": 1, "rounds": 3, "lr": 0.05})
    params["earlyexit"] = {"exits": [1, 2, 3], "tiers": TIERS, "registered_model": "ee-test", **earlyexit}
    return params


def _write(path: Path, params: dict[str, object]) -> str:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def eework(tmp_path_factory: pytest.TempPathFactory, small_mirror: Path, prefect_api: str) -> Path:
    root = tmp_path_factory.mktemp("ee")
    p = _write(root / "params.yaml", _params(small_mirror))
    assert download.main(["--params", p, "--out", str(root / "raw"), "--downloads", str(root / "dl")]) == 0
    assert features.main(["--params", p, "--raw", str(root / "raw"), "--out", str(root / "features")]) == 0
    assert partition.main(["--params", p, "--features", str(root / "features"), "--out", str(root / "part")]) == 0
    return root


def _args(p: str, name: str) -> list[str]:
    return ["--params", p, "--features", "features", "--partition", "part/partition.json", "--checkpoints",
            f"ck-{name}", "--model", f"{name}.st", "--metrics", f"{name}.json", "--plots", f"plots-{name}"]


def _run(root: Path, mirror: Path, name: str, **earlyexit: object) -> dict[str, object]:
    p = _write(root / f"{name}.yaml", _params(mirror, **earlyexit))
    assert earlyexit_flow.main(_args(p, name)) == 0
    return json.loads((root / f"{name}.json").read_text())  # type: ignore[no-any-return]


def test_plans_train_the_depths_their_tiers_allow_and_count_less_compute_for_shallow_clients(
        eework: Path, small_mirror: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(eework)
    tiers = assign_exits(3, [(t["share"], t["depth"]) for t in TIERS], 0)  # type: ignore[misc]
    early = _run(eework, small_mirror, "early")
    full = _run(eework, small_mirror, "full", plan="full")
    drop = _run(eework, small_mirror, "drop", plan="drop_weak")
    assert early["client_tiers"] == tiers and early["client_depths"] == tiers
    assert full["client_depths"] == [3, 3, 3]
    assert drop["client_depths"] == [3 if t == 3 else None for t in tiers]
    # per example, deeper tiers cost more (per client the data sizes differ too)
    assert early["tier1_mflops_per_example"] < early["tier2_mflops_per_example"] < early["tier3_mflops_per_example"]
    assert early["tier3_mflops_per_example"] == pytest.approx(full["tier3_mflops_per_example"])
    assert early["client_gflops_per_round_mean"] < full["client_gflops_per_round_mean"]
    assert early["bytes_up_total"] < full["bytes_up_total"]
    rows = (eework / "plots-early/rounds.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:4] == ["round", "exit1_accuracy", "exit2_accuracy", "exit3_accuracy"]
    assert len(rows) == 4
    # 3 rounds cannot reach a plateau of 5 rounds (the default rule): all ran
    assert (early["rounds"], early["max_rounds"], early["stop_reason"]) == (3, 3, "rounds")


def test_a_validation_plateau_ends_the_run_and_the_summary_says_so(eework: Path, small_mirror: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(eework)
    # no round gains a whole point of accuracy: the rule stops as soon as it may, after round patience + 1 = 2
    stopped = _run(eework, small_mirror, "plateau", stop="plateau", plateau_min_gain=1.0, plateau_patience=1)
    assert (stopped["rounds"], stopped["max_rounds"], stopped["stop_reason"]) == (2, 3, "plateau")
    assert "val_exit3_accuracy gained" in str(stopped["stop_detail"])  # the last exit's validation accuracy
    assert len((eework / "plots-plateau/rounds.tsv").read_text().splitlines()) == 3  # no row after the stop
    record = json.loads((eework / "plateau.run.json").read_text())  # the run record beside the metrics
    assert record["registered_version"] is not None  # the stopping round's model is logged and registered


def test_backbone_weights_from_a_file_are_the_starting_point(eework: Path, small_mirror: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(eework)
    start = load_state(Path("full.st"))  # a trained model of the same shape stands for a pretrained encoder
    backbone = {k[len("backbone."):]: v for k, v in start.items() if k.startswith("backbone.")}
    # a pretrained encoder ends with its final norm: every exit's own norm starts from it (exit_norm: per_exit)
    backbone["net.norm.weight"], backbone["net.norm.bias"] = torch.full((8,), 1.5), torch.full((8,), 0.25)
    save_state(Path("pre.safetensors"), backbone)
    p = _write(eework / "init.yaml", _params(small_mirror, init="pre.safetensors", plan="full"))
    import tasks.earlyexit as module  # the flow imports initial_state from it when it runs

    seen: dict[str, torch.Tensor] = {}
    real = module.initial_state

    def spy(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        state, left = real(*args, **kwargs)  # type: ignore[arg-type]
        seen.update(state)
        assert left == []
        return state, left

    monkeypatch.setattr(module, "initial_state", spy)
    assert earlyexit_flow.main(_args(p, "init")) == 0
    assert all(torch.equal(seen[f"backbone.{k}"], v) for k, v in backbone.items() if not k.startswith("net.norm."))
    assert all(torch.equal(seen[f"exit_norms.{e}.weight"], torch.full((8,), 1.5))
               and torch.equal(seen[f"exit_norms.{e}.bias"], torch.full((8,), 0.25)) for e in (1, 2, 3))


def test_a_killed_run_resumes_to_the_same_model(eework: Path, small_mirror: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(eework)
    p = _write(eework / "kill.yaml", _params(small_mirror, server="fedadam", weighting="depth"))
    assert earlyexit_flow.main(_args(p, "whole")) == 0
    log_round = _kill_at_round(monkeypatch, 3)
    with pytest.raises(_Killed):
        earlyexit_flow.main(_args(p, "cut"))
    monkeypatch.setattr("tasks.tracking.FederateTracker.log_round", log_round)
    assert earlyexit_flow.main(_args(p, "cut")) == 0
    a, b = load_state(Path("whole.st")), load_state(Path("cut.st"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    whole, cut = json.loads(Path("whole.json").read_text()), json.loads(Path("cut.json").read_text())
    assert whole["final_exit_accuracy"] == cut["final_exit_accuracy"]
