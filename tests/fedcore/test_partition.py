"""Partitioners: coverage, determinism, constraints, the BENCHMARKS.md Dirichlet recipe, holdout and JSON."""

from __future__ import annotations

import json
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedcore.config import PartitionConfig
from fedcore.data.partition import (
    PARTITION_CLIENT_BYTES,
    PARTITION_ENTRY_BYTES,
    PARTITIONERS,
    client_class_counts,
    make_partition,
    split_holdout,
)
from fedcore.errors import PartitionError

SCHEMES = PARTITIONERS.names()
DISJOINT = [name for name in SCHEMES if PARTITIONERS.get(name).disjoint]
PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def pools(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, PartitionConfig]:
    """A labelled pool with speakers and a config that is feasible for every scheme most of the time."""
    num_clients = draw(st.integers(1, 6))
    min_samples = draw(st.integers(1, 3))
    n = draw(st.integers(num_clients * min_samples * 4, 160))
    num_classes = draw(st.integers(1, 6))
    num_speakers = draw(st.integers(num_clients, min(12, n)))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    groups = np.array([f"spk{s:02d}" for s in rng.integers(0, num_speakers, size=n)])
    groups[:num_speakers] = [f"spk{s:02d}" for s in range(num_speakers)]  # every speaker present
    cfg = PartitionConfig(
        scheme="iid",
        num_clients=num_clients,
        min_samples=min_samples,
        alpha=draw(st.sampled_from([0.5, 1.0, 5.0])),
        shards_per_client=draw(st.integers(1, 3)),
        seed=seed,
    )
    return labels, groups, cfg


def _run(scheme: str, labels: np.ndarray, groups: np.ndarray, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    partitioner = PARTITIONERS.build(scheme, cfg=replace(cfg, scheme=scheme))
    return partitioner.partition(labels, groups, np.random.default_rng(seed))


@pytest.mark.parametrize("scheme", DISJOINT)
@PROPERTY_SETTINGS
@given(pool=pools())
def test_partitioner_parts_disjoint_cover_and_deterministic(
    scheme: str, pool: tuple[np.ndarray, np.ndarray, PartitionConfig]
) -> None:
    labels, groups, cfg = pool
    try:
        parts = _run(scheme, labels, groups, cfg, cfg.seed)
    except PartitionError:
        assume(False)  # an unlucky pool for this scheme (e.g. a speaker split with one tiny client)
        raise
    assert len(parts) == cfg.num_clients
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted, no duplicates
    joined = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(labels)))  # disjoint and covering
    assert min(len(p) for p in parts) >= cfg.min_samples
    again = _run(scheme, labels, groups, cfg, cfg.seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity", "shards"])
def test_partitioner_other_seed_gives_other_split(scheme: str) -> None:
    labels = np.repeat(np.arange(5), 40)
    groups = np.array([f"s{i % 7}" for i in range(200)])
    cfg = PartitionConfig(num_clients=4, min_samples=2, alpha=1.0)
    first = _run(scheme, labels, groups, cfg, 0)
    second = _run(scheme, labels, groups, cfg, 1)
    assert any(not np.array_equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("scheme", ["dirichlet", "quantity"])
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), min_samples=st.integers(5, 15), alpha=st.sampled_from([0.1, 0.3, 1.0]))
def test_skewed_partitioners_respect_min_samples(scheme: str, seed: int, min_samples: int, alpha: float) -> None:
    labels = np.repeat(np.arange(10), 30)
    cfg = PartitionConfig(num_clients=8, min_samples=min_samples, alpha=alpha, max_retries=200)
    try:
        parts = _run(scheme, labels, np.array(["s"] * 300), cfg, seed)
    except PartitionError as error:
        assert "Lower min_samples" in str(error)
        return
    assert min(len(p) for p in parts) >= min_samples


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), num_clients=st.integers(1, 5))
def test_speaker_mapping_stable_under_row_permutation(seed: int, num_clients: int) -> None:
    rng = np.random.default_rng(seed)
    groups = np.array([f"spk{s}" for s in rng.integers(0, 9, size=90)])
    groups[:9] = [f"spk{s}" for s in range(9)]
    labels = rng.integers(0, 3, size=90)
    cfg = PartitionConfig(scheme="speaker", num_clients=num_clients, min_samples=1)
    perm = rng.permutation(90)

    def speaker_to_client(parts: list[np.ndarray], g: np.ndarray) -> dict[str, int]:
        mapping: dict[str, int] = {}
        for client, part in enumerate(parts):
            for speaker in g[part]:
                assert mapping.setdefault(str(speaker), client) == client  # a speaker never straddles clients
        return mapping

    original = speaker_to_client(_run("speaker", labels, groups, cfg, 0), groups)
    permuted = speaker_to_client(_run("speaker", labels[perm], groups[perm], cfg, 123), groups[perm])
    assert original == permuted
    assert original["spk0"] == 0 and original["spk1"] == 1 % num_clients  # round-robin over sorted ids


def _naive_dirichlet(labels: list[int], num_clients: int, alpha: float, min_size: int, seed: int) -> list[list[int]]:
    """BENCHMARKS.md, written out plainly: per class Dir(α·1_K), cut by cumulative proportions, redraw all."""
    rng = np.random.default_rng(seed)
    while True:
        clients: list[list[int]] = [[] for _ in range(num_clients)]
        for c in sorted(set(labels)):
            members = [i for i, y in enumerate(labels) if y == c]
            proportions = rng.dirichlet([alpha] * num_clients)
            start, cumulative = 0, 0.0
            for k in range(num_clients):
                cumulative += proportions[k]
                stop = len(members) if k == num_clients - 1 else int(cumulative * len(members))
                clients[k].extend(members[start:stop])
                start = stop
        if min(len(c) for c in clients) >= min_size:
            return [sorted(c) for c in clients]


def test_dirichlet_matches_naive_benchmark_procedure() -> None:
    # FSDD-like: 10 digits x 27 files, files sorted by name (digit-major order)
    labels = [digit for digit in range(10) for _ in range(27)]
    cfg = PartitionConfig(scheme="dirichlet", num_clients=10, alpha=0.5, min_samples=10, seed=0)
    parts = _run("dirichlet", np.array(labels), np.array(["s"] * 270), cfg, 0)
    expected = _naive_dirichlet(labels, 10, 0.5, 10, 0)
    assert [p.tolist() for p in parts] == expected


def test_dirichlet_gives_up_with_actionable_error() -> None:
    labels = np.repeat(np.arange(2), 15)
    cfg = PartitionConfig(scheme="dirichlet", num_clients=6, alpha=0.01, min_samples=5, max_retries=5)
    with pytest.raises(PartitionError, match="largest smallest-client size reached was \\d+.*raise alpha"):
        _run("dirichlet", labels, np.array(["s"] * 30), cfg, 0)


@pytest.mark.parametrize("scheme", DISJOINT)
def test_partitioner_rejects_more_clients_than_samples(scheme: str) -> None:
    cfg = PartitionConfig(scheme=scheme, num_clients=5, min_samples=1)
    message = r"partition: 'num_clients' must be <= the number of training samples \(4\)\. Got 5\."
    with pytest.raises(PartitionError, match=message):
        _run(scheme, np.arange(4), np.array(["a", "b", "c", "d"]), cfg, 0)


def test_partitioner_rejects_min_samples_beyond_pool() -> None:
    cfg = PartitionConfig(scheme="iid", num_clients=3, min_samples=4)
    with pytest.raises(PartitionError, match="'min_samples' must be <= training samples / num_clients"):
        _run("iid", np.zeros(10, dtype=np.int64), np.array(["a"] * 10), cfg, 0)


# ------------------------------------------------------------------------------- sizes refused before any draw
_LABELS = np.repeat(np.arange(10), 24)  # 240 training rows
_GROUPS = np.array([f"spk{i % 6}" for i in range(240)])  # 6 speakers
_CANNOT_FIT = {
    "iid": ({"num_clients": 10, "min_samples": 30}, r"num_clients × min_samples = 10 × 30 = 300 rows, above the 240 "
                                                    r"training rows. Lower min_samples \(to at most 24\) or "
                                                    r"num_clients \(to at most 8\)"),
    "dirichlet": ({"num_clients": 10, "min_samples": 25}, r"10 × 25 = 250 rows, above the 240 training rows"),
    "quantity": ({"num_clients": 241, "min_samples": 1}, r"'num_clients' must be <= the number of training samples "
                                                         r"\(240\). Got 241"),
    "shards": ({"num_clients": 10, "min_samples": 1, "shards_per_client": 25},
               r"'shards_per_client' must be <= training samples / num_clients \(240 / 10 = 24\). Got 25"),
    "speaker": ({"num_clients": 7, "min_samples": 1}, r"number of speakers \(6\).*Got 7"),
    "cross_device": ({"num_clients": 2, "samples_per_client": 241},
                     r"'samples_per_client' must be <= the number of training samples \(240\)"),
}


def test_every_scheme_has_a_size_that_cannot_fit_below() -> None:
    assert set(_CANNOT_FIT) == set(SCHEMES)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sizes_that_cannot_fit_are_refused_before_any_draw(scheme: str) -> None:
    overrides, message = _CANNOT_FIT[scheme]
    cfg = PartitionConfig(scheme=scheme, max_retries=10**9, **overrides)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    with pytest.raises(PartitionError, match=message):
        PARTITIONERS.build(scheme, cfg=cfg).partition(_LABELS, _GROUPS, rng)
    assert rng.bit_generator.state == state  # not one draw was made


def test_cross_device_a_billion_clients_is_refused_at_once_for_memory() -> None:
    cfg = PartitionConfig(scheme="cross_device", num_clients=10**9, samples_per_client=20)
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    partitioner = PARTITIONERS.build("cross_device", cfg=cfg)
    need = partitioner.footprint(240)
    assert need.num_entries == 2 * 10**10
    assert need.memory_bytes == 10**9 * PARTITION_CLIENT_BYTES + 2 * 10**10 * PARTITION_ENTRY_BYTES
    with pytest.raises(PartitionError, match=r"must fit in the memory at hand \(64 GiB\). Got 1000000000 clients "
                                             r"and 20000000000 client-row entries, about 6.15e\+03 GiB. Lower "
                                             r"num_clients or samples_per_client \(1000000000 × 20\)"):
        partitioner.partition(_LABELS, None, rng, memory_bytes=64 * 2**30)
    with pytest.raises(PartitionError, match=r"partition.json must fit on the disk at hand \(1 GiB free\)"):
        partitioner.partition(_LABELS, None, rng, disk_bytes=2**30)
    assert rng.bit_generator.state == state
    with pytest.raises(PartitionError, match="must fit in the memory at hand"):
        make_partition(_LABELS, None, np.arange(240), np.array([], dtype=np.int64), cfg, 10, memory_bytes=2**40)


def test_disjoint_footprint_counts_every_row_once_and_fits_when_memory_allows() -> None:
    cfg = PartitionConfig(scheme="iid", num_clients=4, min_samples=1)
    partitioner = PARTITIONERS.build("iid", cfg=cfg)
    assert partitioner.footprint(240).num_entries == 240
    parts = partitioner.partition(_LABELS, None, np.random.default_rng(0), memory_bytes=2**30, disk_bytes=2**30)
    assert sum(len(p) for p in parts) == 240
    with pytest.raises(PartitionError, match="must fit in the memory at hand"):
        partitioner.partition(_LABELS, None, np.random.default_rng(0), memory_bytes=1000)


def test_cross_device_footprint_bounds_the_real_json_and_memory() -> None:
    cfg = PartitionConfig(scheme="cross_device", num_clients=400, samples_per_client=20, holdout_fraction=0.2)
    need = PARTITIONERS.build("cross_device", cfg=cfg).footprint(240)
    tracemalloc.start()
    try:
        partition = make_partition(_LABELS, None, np.arange(240), np.array([], dtype=np.int64), cfg, 10)
        text = json.dumps(partition, indent=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(text) <= need.json_bytes
    assert peak <= need.memory_bytes


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_partitioner_rejects_non_positive_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="'alpha' must be > 0"):
        PARTITIONERS.build("dirichlet", cfg=PartitionConfig(alpha=alpha))


def test_speaker_rejects_more_clients_than_speakers() -> None:
    cfg = PartitionConfig(scheme="speaker", num_clients=4, min_samples=1)
    groups = np.array(["ann", "bob", "cy"] * 10)
    with pytest.raises(PartitionError, match=r"number of speakers \(3\).*Got 4"):
        _run("speaker", np.zeros(30, dtype=np.int64), groups, cfg, 0)


def test_shards_give_few_classes_per_client() -> None:
    labels = np.repeat(np.arange(10), 20)
    cfg = PartitionConfig(scheme="shards", num_clients=10, shards_per_client=2, min_samples=1)
    parts = _run("shards", labels, np.array(["s"] * 200), cfg, 3)
    counts = client_class_counts(parts, labels, 10)
    assert np.all((counts > 0).sum(axis=1) <= 2)
    assert np.all(counts.sum(axis=1) == 20)


def test_iid_sizes_differ_by_at_most_one() -> None:
    cfg = PartitionConfig(scheme="iid", num_clients=7, min_samples=1)
    sizes = [len(p) for p in _run("iid", np.zeros(100, dtype=np.int64), np.array(["s"] * 100), cfg, 0)]
    assert max(sizes) - min(sizes) <= 1


# -------------------------------------------------------------------------------------------------- holdout
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), fraction=st.sampled_from([0.0, 0.1, 0.2, 0.5, 0.9]), size=st.integers(1, 40))
def test_split_holdout_disjoint_within_client(seed: int, fraction: float, size: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=200)
    parts = [np.sort(rng.choice(200, size=size, replace=False)), np.array([7], dtype=np.int64)]
    splits = split_holdout(parts, labels, fraction, np.random.default_rng(seed))
    for part, (train, holdout) in zip(parts, splits, strict=True):
        assert np.intersect1d(train, holdout).size == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([train, holdout])), part)
        assert train.size >= 1
        if fraction > 0 and part.size >= 2:
            assert holdout.size >= 1
        if fraction == 0:
            assert holdout.size == 0
    again = split_holdout(parts, labels, fraction, np.random.default_rng(seed))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, again, strict=True))


def test_split_holdout_is_stratified() -> None:
    labels = np.repeat(np.arange(4), 25)
    [(train, holdout)] = split_holdout([np.arange(100)], labels, 0.2, np.random.default_rng(0))
    np.testing.assert_array_equal(np.bincount(labels[holdout], minlength=4), [5, 5, 5, 5])
    assert train.size == 80


def test_split_holdout_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="'fraction' must be >= 0 and < 1"):
        split_holdout([np.arange(3)], np.zeros(3, dtype=np.int64), 1.0, np.random.default_rng(0))


# ------------------------------------------------------------------------------------------------ make_partition
def test_client_class_counts() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    counts = client_class_counts([np.array([0, 1]), np.array([2, 3, 4, 5])], labels, 4)
    np.testing.assert_array_equal(counts, [[1, 1, 0, 0], [0, 1, 3, 0]])
    assert counts.dtype == np.int64


def test_make_partition_json_structure() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=120)
    groups = np.array([f"s{i % 5}" for i in range(120)])
    splits = np.where(np.arange(120) % 4 == 0, "test", "train")
    train_rows, test_rows = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "test")
    cfg = PartitionConfig(scheme="dirichlet", num_clients=3, alpha=1.0, min_samples=5, holdout_fraction=0.2, seed=4)
    partition = make_partition(labels, groups, train_rows, test_rows, cfg, 3)
    assert json.loads(json.dumps(partition)) == partition  # plain JSON types
    assert set(partition) == {"scheme", "num_clients", "num_classes", "seed", "clients", "test"}
    assert (partition["scheme"], partition["num_clients"], partition["num_classes"], partition["seed"]) == (
        "dirichlet", 3, 3, 4)
    assert partition["test"] == test_rows.tolist()
    assert [c["client_id"] for c in partition["clients"]] == [0, 1, 2]
    rows = [r for c in partition["clients"] for key in ("train", "holdout") for r in c[key]]
    assert sorted(rows) == train_rows.tolist()  # feature-store rows of the train split, each once
    assert all(c["holdout"] and c["train"] == sorted(c["train"]) for c in partition["clients"])
    assert make_partition(labels, groups, train_rows, test_rows, cfg, 3) == partition


def test_make_partition_maps_positions_through_train_rows() -> None:
    labels = np.array([9, 0, 9, 1, 9, 0, 9, 1])  # rows 0, 2, 4, 6 are test rows with an unrelated label
    cfg = PartitionConfig(scheme="speaker", num_clients=2, min_samples=1, holdout_fraction=0.0)
    groups = np.array(["x", "a", "x", "b", "x", "a", "x", "b"])
    partition = make_partition(labels, groups, np.array([1, 3, 5, 7]), np.array([0, 2, 4, 6]), cfg, 10)
    assert [c["train"] for c in partition["clients"]] == [[1, 5], [3, 7]]
    assert [c["holdout"] for c in partition["clients"]] == [[], []]


def test_cross_device_population_larger_than_the_pool() -> None:
    labels = np.repeat(np.arange(4), 25)  # 100 positions
    cfg = PartitionConfig(scheme="cross_device", num_clients=500, samples_per_client=8, alpha=0.5)
    parts = _run("cross_device", labels, None, cfg, 3)
    assert len(parts) == 500
    assert all(len(p) == 8 and np.all(np.diff(p) > 0) and p.min() >= 0 and p.max() < 100 for p in parts)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) < len(joined)  # 4,000 draws from 100 positions: clients share positions
    again = _run("cross_device", labels, None, cfg, 3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_cross_device_alpha_sets_the_label_skew() -> None:
    labels = np.repeat(np.arange(10), 50)

    def classes_per_client(alpha: float) -> float:
        cfg = PartitionConfig(scheme="cross_device", num_clients=200, samples_per_client=20, alpha=alpha)
        return float(np.mean([len(np.unique(labels[p])) for p in _run("cross_device", labels, None, cfg, 0)]))

    skewed, mixed = classes_per_client(0.05), classes_per_client(100.0)
    assert skewed < 3.0 < 8.0 < mixed


def test_cross_device_rejects_more_samples_than_the_pool() -> None:
    cfg = PartitionConfig(scheme="cross_device", num_clients=2, samples_per_client=11)
    message = r"'samples_per_client' must be <= the number of training samples \(10\)"
    with pytest.raises(PartitionError, match=message):
        _run("cross_device", np.zeros(10, dtype=np.int64), None, cfg, 0)
