"""The reference benchmark's yardsticks agree with the project on what BENCHMARKS.md specifies."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.bare_loop import (
    CNN4,
    fedavg,
    initial_model,
    load_workload,
    local_train,
    save_workload,
    spec_partition,
)
from fedcore.aggregation.base import ClientUpdate
from fedcore.aggregation.fedavg import weighted_average
from fedcore.algorithms.base import ClientData, LocalSettings, train_client
from fedcore.algorithms.fedavg import FedAvgClient
from fedcore.config import ModelConfig, PartitionConfig
from fedcore.data.partition import PARTITIONERS
from fedcore.federation.sampling import client_generator
from fedcore.models import build_model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_dirichlet_partitioner_draws_the_spec_partition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = np.sort(rng.integers(0, 10, size=600))
    rng.shuffle(labels)
    cfg = PartitionConfig(scheme="dirichlet", num_clients=10, alpha=0.5, min_samples=10, seed=seed)
    ours = PARTITIONERS.build("dirichlet", cfg=cfg).partition(labels, None, np.random.default_rng(seed))
    spec = spec_partition(labels, 0.5, 10, seed, 10)
    assert all(np.array_equal(a, b) for a, b in zip(ours, spec, strict=True))


def test_bare_fedavg_matches_the_project_rule() -> None:
    torch.manual_seed(0)
    states = [{k: v + torch.randn_like(v) if v.is_floating_point() else v + i
               for k, v in CNN4().state_dict().items()} for i in range(3)]
    sizes = [54, 290, 7]
    updates = [ClientUpdate(i, s, n, {}) for i, (s, n) in enumerate(zip(states, sizes, strict=True))]
    ours = weighted_average(states[0], updates)
    assert all(torch.equal(ours[k], v) for k, v in fedavg(states, sizes).items())


@pytest.fixture()
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_bare_local_training_matches_the_project_client(tmp_path: Path) -> None:
    """Same seed, model, batches and SGD: the bare loop's client and fedcore's give the same weights."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((70, 1, 64, 101)).astype(np.float32)
    y = rng.integers(0, 10, size=70)
    save_workload(tmp_path / "w.npz", x, y, x[:5], y[:5], [np.arange(70)])
    work = load_workload(tmp_path / "w.npz")
    bare_model = initial_model(10)
    start = {k: v.clone() for k, v in bare_model.state_dict().items()}
    bare = local_train(bare_model, start, work.x_train, work.y_train, server_round=3, client=0)
    cfg = ModelConfig(name="cnn", width=16, depth=4)
    model = build_model(cfg, 10, (1, 64, 101), torch.Generator().manual_seed(0))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in start.items())  # the same initial model
    settings = LocalSettings(epochs=1, batch_size=32, lr=0.05, momentum=0.9, weight_decay=0.0)
    update = train_client(client_id=0, model=model, global_state=start, data=ClientData(work.x_train, work.y_train),
                          algorithm=FedAvgClient(), settings=settings, generator=client_generator(0, 3, 0))
    assert all(torch.equal(update.state[k], v) for k, v in bare.items())


@pytest.mark.usefixtures("one_thread")
def test_the_thread_probe_does_the_same_arithmetic_on_every_thread(tmp_path: Path) -> None:
    """Where the clients run changes the time, not the weights: main thread and worker thread agree bit for bit."""
    from benchmarks.thread_probe import probe

    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 1, 64, 101)).astype(np.float32)
    y = rng.integers(0, 4, size=60)
    save_workload(tmp_path / "w.npz", x, y, x[:20], y[:20], [np.arange(0, 35), np.arange(35, 60)])
    work = load_workload(tmp_path / "w.npz")
    on_main, on_worker = probe(work, 2, "main"), probe(work, 2, "thread")
    assert len(on_main.seconds) == len(on_worker.seconds) == 2
    assert on_main.accuracy == on_worker.accuracy
    assert all(torch.equal(on_main.state[k], v) for k, v in on_worker.state.items())
    start = initial_model(work.num_classes).state_dict()
    assert not all(torch.equal(start[k], v) for k, v in on_main.state.items())  # the rounds trained something
    with pytest.raises(ValueError, match="unknown mode"):
        probe(work, 1, "process")


def _row(seconds: float, rss: float, accuracy: list[float]) -> dict[str, object]:
    return {"total_seconds": seconds, "median_round_seconds": seconds / 10, "end_to_end_seconds": seconds + 5,
            "peak_rss_mib": rss - 100, "peak_rss_tree_mib": rss, "accuracy": accuracy,
            "final_accuracy": accuracy[-1], "best_accuracy": max(accuracy)}


def test_repeated_runs_report_medians_and_whether_the_accuracy_repeated() -> None:
    from benchmarks.reference import combine

    row = combine([_row(30.0, 900, [0.1, 0.5]), _row(10.0, 1100, [0.2, 0.6]), _row(20.0, 1000, [0.3, 0.7])])
    assert (row["total_seconds"], row["peak_rss_tree_mib"], row["end_to_end_seconds"]) == (20.0, 1000.0, 25.0)
    assert row["accuracy"] == [0.3, 0.7] and row["final_accuracy"] == 0.7  # the median-time run's rounds
    assert len(row["runs"]) == 3 and row["same_accuracy_every_run"] is False
    assert combine([_row(5.0, 10, [0.4])] * 2)["same_accuracy_every_run"] is True


def test_the_verdicts_give_memory_against_flower_and_the_orchestration_overhead() -> None:
    from benchmarks.reference import verdicts

    rows = {"fedaudio threads": {**_row(100.0, 1800, [0.5]), "ratio_to_bare": 1.0, "last5_accuracy": 0.5},
            "fedaudio threads:1": _row(130.0, 1700, [0.5]), "bare loop": _row(100.0, 1200, [0.5]),
            "flower": {**_row(120.0, 4000, [0.5]), "last5_accuracy": 0.5}}
    text = "\n".join(verdicts(rows))
    assert "1800 MiB vs Flower's 4000 MiB: 0.45x (within the 0.5x budget)" in text
    assert "threads:1 130.0 s minus the bare loop's 100.0 s = +30.0 s (+30.0%)" in text
    rows["flower"]["peak_rss_tree_mib"] = 3000
    assert "0.60x (OVER the 0.5x budget)" in "\n".join(verdicts(rows))
