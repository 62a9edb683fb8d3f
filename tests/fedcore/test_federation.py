"""Federation: client sampling, seeds, learning-rate schedules, checkpoints and fingerprints."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcore.config import FederationConfig
from fedcore.federation import (
    LR_SCHEDULES,
    Checkpointer,
    client_generator,
    fingerprint,
    learning_rate,
    load_state,
    num_sampled,
    round_rng,
    sample_clients,
    save_state,
)


# ------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize(
    ("num_clients", "fraction", "min_clients", "expected"),
    [(10, 1.0, 1, 10), (10, 0.3, 1, 3), (10, 0.3, 5, 5), (10, 0.01, 1, 1), (4, 0.5, 9, 4), (10, 0.25, 1, 2),
     (100, 0.1, 2, 10), (7, 0.5, 1, 4)],
)
def test_sample_clients_size(num_clients: int, fraction: float, min_clients: int, expected: int) -> None:
    assert num_sampled(num_clients, fraction, min_clients) == expected
    chosen = sample_clients(num_clients, fraction, min_clients, np.random.default_rng(0))
    assert len(chosen) == expected == len(set(chosen))
    assert chosen == sorted(chosen) and all(0 <= c < num_clients for c in chosen)


def test_sample_clients_all_clients_consumes_no_randomness() -> None:
    rng = np.random.default_rng(3)
    assert sample_clients(5, 1.0, 1, rng) == [0, 1, 2, 3, 4]
    assert rng.integers(1 << 30) == np.random.default_rng(3).integers(1 << 30)


def test_sample_clients_deterministic_per_round_and_varies_over_rounds() -> None:
    draws = [sample_clients(50, 0.2, 1, round_rng(7, r)) for r in range(1, 6)]
    assert draws == [sample_clients(50, 0.2, 1, round_rng(7, r)) for r in range(1, 6)]
    assert len({tuple(d) for d in draws}) > 1
    assert draws[0] != sample_clients(50, 0.2, 1, round_rng(8, 1))


@pytest.mark.parametrize(
    ("args", "match"),
    [((0, 0.5, 1), "'num_clients' must be an int >= 1"), ((5, 0.0, 1), r"'fraction' must be a float in \(0, 1\]"),
     ((5, 1.5, 1), "'fraction'"), ((5, 0.5, 0), "'min_clients' must be an int >= 1")],
)
def test_sample_clients_rejects_bad_arguments(args: tuple[int, float, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sample_clients(*args, np.random.default_rng(0))


def test_round_rng_matches_numpy_seed_sequence() -> None:
    assert round_rng(3, 4).integers(1 << 40) == np.random.default_rng([3, 4]).integers(1 << 40)
    assert round_rng(3, 4).integers(1 << 40) != round_rng(3, 5).integers(1 << 40)


def test_client_generator_seed_rule_and_determinism() -> None:
    assert client_generator(0, 3, 7).initial_seed() == 3007  # the benchmark's round * 1000 + client
    assert client_generator(2, 3, 7).initial_seed() == 2 * 1_000_003 + 3007
    a = torch.randperm(20, generator=client_generator(1, 2, 3))
    assert torch.equal(a, torch.randperm(20, generator=client_generator(1, 2, 3)))
    assert not torch.equal(a, torch.randperm(20, generator=client_generator(1, 2, 4)))
    with pytest.raises(ValueError, match="'server_round' must be an int >= 1"):
        client_generator(0, 0, 1)


# ------------------------------------------------------------------------------------------------ schedules
def test_lr_schedules_registered() -> None:
    assert LR_SCHEDULES.names() == ["constant", "cosine", "step"]


@pytest.mark.parametrize(
    ("schedule", "options", "expected"),
    [
        ("constant", {}, {1: 0.1, 5: 0.1, 10: 0.1}),
        # 0.1 · 0.5^⌊(r − 1) / 3⌋
        ("step", {"lr_gamma": 0.5, "lr_step_rounds": 3}, {1: 0.1, 3: 0.1, 4: 0.05, 6: 0.05, 7: 0.025, 10: 0.0125}),
        # 0.01 + 0.045 (1 + cos(π (r − 1) / 4)) with R = 4 (rounds past R stay at lr_min)
        ("cosine", {"lr_min": 0.01, "rounds": 4},
         {1: 0.1, 2: 0.01 + 0.045 * (1 + math.sqrt(0.5)), 3: 0.055, 4: 0.01 + 0.045 * (1 - math.sqrt(0.5)),
          5: 0.01, 6: 0.01}),
    ],
)
def test_learning_rate_values_by_hand(schedule: str, options: dict[str, float], expected: dict[int, float]) -> None:
    cfg = FederationConfig(**{"rounds": 10, "lr": 0.1, "lr_schedule": schedule, **options})  # type: ignore[arg-type]
    for server_round, value in expected.items():
        assert learning_rate(cfg, server_round) == pytest.approx(value, rel=1e-12)


def test_learning_rate_cosine_single_round_and_bad_round() -> None:
    assert learning_rate(FederationConfig(lr=0.2, rounds=1, lr_schedule="cosine"), 1) == 0.2
    # lr_min = 0 is reached after the last round, never during it (a client cannot train with lr 0).
    last = learning_rate(FederationConfig(lr=0.2, rounds=30, lr_min=0.0, lr_schedule="cosine"), 30)
    assert 0 < last < 0.002
    with pytest.raises(ValueError, match="'server_round' must be an int >= 1"):
        learning_rate(FederationConfig(), 0)
    with pytest.raises(ValueError, match="Unknown lr_schedule 'nope'"):
        learning_rate(FederationConfig(lr_schedule="nope"), 1)


# ------------------------------------------------------------------------------------------------ checkpoints
def _state(value: float) -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.full((2, 3), value), "bn.num_batches_tracked": torch.tensor(int(value))}


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path / "ckpt", "abc")
    assert ckpt.load_latest() is None
    extra = {"m_t": torch.arange(4, dtype=torch.float64)}
    meta = {"history": [{"round": 1, "accuracy": 0.5}], "best": 1}
    ckpt.save(1, _state(1.5), extra, meta)
    loaded = Checkpointer(tmp_path / "ckpt", "abc").load_latest()
    assert loaded is not None
    server_round, state, extra_loaded, meta_loaded = loaded
    assert server_round == 1 and meta_loaded == meta
    assert set(state) == {"conv.weight", "bn.num_batches_tracked"}
    assert torch.equal(state["conv.weight"], _state(1.5)["conv.weight"])
    assert state["bn.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(extra_loaded["m_t"], extra["m_t"]) and extra_loaded["m_t"].dtype == torch.float64
    latest = json.loads((tmp_path / "ckpt" / "latest.json").read_text())
    sha = hashlib.sha256((tmp_path / "ckpt" / "round_0001.safetensors").read_bytes()).hexdigest()
    assert {k: v for k, v in latest.items() if k != "index_sha256"} == {
        "format": 2, "fingerprint": "abc", "round": 1, "file": "round_0001.safetensors", "sha256": sha,
        "rounds": [{"round": 1, "file": "round_0001.safetensors", "sha256": sha}], "meta": meta}


def test_checkpoint_keeps_last_two(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, "abc")
    for server_round in range(1, 6):
        ckpt.save(server_round, _state(server_round), None, {"round": server_round})
    assert sorted(p.name for p in tmp_path.glob("round_*")) == ["round_0004.safetensors", "round_0005.safetensors"]
    loaded = ckpt.load_latest()
    assert loaded is not None and loaded[0] == 5 and loaded[1]["conv.weight"][0, 0].item() == 5.0
    assert loaded[2] == {}


def test_checkpoint_fingerprint_mismatch_is_ignored_and_cleared(tmp_path: Path) -> None:
    Checkpointer(tmp_path, "old").save(3, _state(3.0), None, {})
    (tmp_path / "notes.txt").write_text("not ours")
    assert Checkpointer(tmp_path, "new").load_latest() is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert Checkpointer(tmp_path, "old").load_latest() is None  # cleared, not just skipped


def test_checkpoint_partial_tmp_file_is_ignored(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, "abc")
    ckpt.save(1, _state(1.0), None, {})
    # a crash while writing round 2: partial tensor file and partial latest.json, never renamed
    (tmp_path / "round_0002.safetensors.tmp").write_bytes(b"\x10\x00\x00partial")
    (tmp_path / "latest.json.tmp").write_text('{"fingerprint": "abc", "rou')
    loaded = Checkpointer(tmp_path, "abc").load_latest()
    assert loaded is not None and loaded[0] == 1
    ckpt.save(2, _state(2.0), None, {})
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_corrupt_latest_falls_back_to_the_round_files_headers(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, "abc")
    ckpt.save(1, _state(1.0), None, {"history": [1]})
    (tmp_path / "latest.json").write_text("{not json")
    messages: list[str] = []
    loaded = ckpt.load_latest(report=messages.append)
    assert loaded is not None and loaded[0] == 1 and loaded[3] == {"history": [1]}
    assert len(messages) == 1 and "latest.json is damaged (it is not valid JSON" in messages[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "round_0001.safetensors"]  # nothing gone


def test_checkpoint_rejects_bad_meta_and_round(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, "abc")
    with pytest.raises(TypeError, match="'meta' must be JSON-serialisable"):
        ckpt.save(1, _state(1.0), None, {"x": object()})
    with pytest.raises(ValueError, match="'server_round' must be an int >= 0"):
        ckpt.save(-1, _state(1.0), None, {})
    assert ckpt.load_latest() is None


def test_save_state_load_state_round_trip_atomic(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    path = tmp_path / "models" / "final.safetensors"
    save_state(path, model.state_dict(), metadata={"round": "30"})
    loaded = load_state(path)
    assert set(loaded) == set(model.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert not list(path.parent.glob("*.tmp"))


def test_fingerprint_canonical() -> None:
    a = fingerprint({"b": 1, "a": [1, 2.5], "c": {"y": None, "x": "s"}})
    assert a == fingerprint({"c": {"x": "s", "y": None}, "a": (1, 2.5), "b": 1})
    assert a != fingerprint({"b": 2, "a": [1, 2.5], "c": {"y": None, "x": "s"}})
    assert len(a) == 64
    cfg = FederationConfig(rounds=3)
    assert fingerprint({"federation": cfg}) == fingerprint({"federation": dataclasses.asdict(cfg)})
    with pytest.raises(TypeError, match="must be JSON-serialisable"):
        fingerprint({"x": object()})
