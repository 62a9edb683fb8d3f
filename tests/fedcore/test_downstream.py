"""Downstream retrieval tasks and encoder scoring (fedcore/evaluation/downstream.py), pooled stores (data/pool)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedcore.config import DownstreamConfig, DownstreamTaskConfig
from fedcore.data.features import FeatureStore, write_feature_store
from fedcore.data.pool import pool_feature_stores
from fedcore.evaluation.downstream import (
    RetrievalTask,
    retrieval_task,
    score_encoder,
    score_names,
    score_task,
    selection_key,
)

N_MELS, FRAMES = 4, 6


def _store(folder: Path, rows: list[tuple[str, str, str]], *, features: np.ndarray | None = None,
           labels: list[str] | None = None, mean: float = 0.0, std: float = 1.0,
           config: dict | None = None, dtype: str = "float32", seed: int = 0) -> FeatureStore:
    """A store of ``rows`` (label, speaker, split); random raw features unless given."""
    if features is None:
        features = np.random.default_rng(seed).normal(size=(len(rows), N_MELS, FRAMES)).astype(np.float32)
    index = [{"id": f"clip{i}", "label": label, "speaker": speaker, "split": split}
             for i, (label, speaker, split) in enumerate(rows)]
    names = labels if labels is not None else sorted({label for label, _, _ in rows})
    write_feature_store(folder, features, index, names, mean, std, config or {}, dtype, [])
    return FeatureStore.load(folder)


def _task(name: str, label: str = "label", split: str = "test") -> DownstreamTaskConfig:
    return DownstreamTaskConfig(name=name, dataset="d", label=label, split=split)


# ------------------------------------------------------------------------------------------------ retrieval_task
# 13 index rows (label b: 8, a: 4, c: 1) and 5 test rows (3 and 14-17), interleaved.
MIXED = ([("b", "s0", "train")] * 3 + [("a", "s1", "test")] + [("b", "s1", "train")] * 5 + [("a", "s0", "train")] * 4
         + [("c", "s2", "train"), ("b", "s0", "test"), ("c", "s0", "test"), ("a", "s1", "test"), ("b", "s2", "test")])


def test_task_rows_are_the_split_and_the_rest(tmp_path: Path) -> None:
    store = _store(tmp_path, MIXED, labels=["b", "c", "a"])
    task = retrieval_task(_task("t"), store, 0.25, 0)
    assert task.test.tolist() == [3, 14, 15, 16, 17]
    assert task.index.tolist() == [0, 1, 2] + list(range(4, 14))
    assert task.test.dtype == task.index.dtype == np.int64
    assert (task.name, task.dataset) == ("t", "d")
    # classes are the sorted names, whatever the store's label order
    assert task.classes == ["a", "b", "c"]
    names = [store.label_names[i] for i in store.labels]
    assert [task.classes[i] for i in task.labels.tolist()] == names
    assert task.labels.dtype == torch.int64 and task.labels.shape == (18,)


def test_fit_and_val_partition_the_index_stratified(tmp_path: Path) -> None:
    store = _store(tmp_path, MIXED)
    task = retrieval_task(_task("t"), store, 0.25, 0)
    fit, val = set(task.fit.tolist()), set(task.val.tolist())
    assert not fit & val
    assert fit | val == set(task.index.tolist())
    assert not val & set(task.test.tolist())
    held = [task.classes[i] for i in task.labels[torch.from_numpy(task.val)].tolist()]
    # per class round(0.25 · n_c), at least one, and a class of one row is never held out
    assert sorted(held) == ["a", "b", "b"]
    assert len(task.fit) == 10


def test_holdout_is_seeded(tmp_path: Path) -> None:
    store = _store(tmp_path, MIXED)
    first = retrieval_task(_task("t"), store, 0.25, 3)
    assert np.array_equal(first.val, retrieval_task(_task("t"), store, 0.25, 3).val)
    draws = {tuple(retrieval_task(_task("t"), store, 0.25, seed).val.tolist()) for seed in range(6)}
    assert len(draws) > 1


def test_speaker_task_uses_the_speaker_column(tmp_path: Path) -> None:
    store = _store(tmp_path, MIXED)
    task = retrieval_task(_task("who", label="speaker"), store, 0.25, 0)
    assert task.classes == ["s0", "s1", "s2"]
    assert [task.classes[i] for i in task.labels.tolist()] == [speaker for _, speaker, _ in MIXED]
    assert task.test.tolist() == [3, 14, 15, 16, 17]


def test_task_split_names_the_query_rows(tmp_path: Path) -> None:
    store = _store(tmp_path, MIXED)
    task = retrieval_task(_task("t", split="train"), store, 0.25, 0)
    assert task.index.tolist() == [3, 14, 15, 16, 17]
    assert task.test.tolist() == [0, 1, 2] + list(range(4, 14))


def test_task_errors(tmp_path: Path) -> None:
    store = _store(tmp_path / "mixed", MIXED)
    with pytest.raises(ValueError, match="'valid'"):
        retrieval_task(_task("t", split="valid"), store, 0.25, 0)  # no test rows
    only_test = _store(tmp_path / "test", [("a", "s0", "test"), ("b", "s1", "test")])
    with pytest.raises(ValueError, match="Got 2 and 0"):
        retrieval_task(_task("t"), only_test, 0.25, 0)  # no index rows
    one_class = _store(tmp_path / "one", [("a", "s0", "train"), ("a", "s1", "train"), ("b", "s0", "test")])
    with pytest.raises(ValueError, match="at least 2 classes"):
        retrieval_task(_task("t"), one_class, 0.25, 0)
    # the speaker column of the same store has two classes
    assert retrieval_task(_task("t", label="speaker"), one_class, 0.25, 0).classes == ["s0", "s1"]


# ------------------------------------------------------------------------------------------------ score_encoder
class FirstTwo(nn.Module):
    """Embedding = the first two values of each example (mel bin 0, frames 0 and 1); counts its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.flatten(1)[:, :2]


def _angle(degrees: float) -> tuple[float, float]:
    return math.cos(math.radians(degrees)), math.sin(math.radians(degrees))


# (label, speaker, split, embedding). Index: x/s1 at 0° (4), y/s2 at 90° (4), z/s3 at 10° (one row: never held
# out). Whatever the hold-out (one x, one y), the validation queries find their own class: knn1 = knn3 = 1.
# Test queries, cosine by hand:
#   t0 x/s1 at 8°:  nearest z (cos 2°), then the x rows (cos 8°): k=1 → z (miss, miss); k=3 → z, x, x (hit, hit)
#   t1 y/s2 at 90°: y rows → hit, hit
#   t2 x/s2 at 0°:  x rows → label hit, speaker (s1) miss
#   t3 x/s1 at 90°: y rows → miss, miss
# label: knn1 2/4, knn3 3/4; speaker: knn1 1/4, knn3 2/4.
KNOWN = ([("x", "s1", "train", _angle(0))] * 4 + [("y", "s2", "train", _angle(90))] * 4
         + [("z", "s3", "train", _angle(10))]
         + [("x", "s1", "test", _angle(8)), ("y", "s2", "test", _angle(90)), ("x", "s2", "test", _angle(0)),
            ("x", "s1", "test", _angle(90))])


def _known_store(folder: Path) -> FeatureStore:
    features = np.random.default_rng(1).normal(size=(len(KNOWN), N_MELS, FRAMES)).astype(np.float32)
    for i, (*_, (a, b)) in enumerate(KNOWN):
        features[i, 0, :2] = a, b
    return _store(folder, [(label, speaker, split) for label, speaker, split, _ in KNOWN], features=features)


def _features(store: FeatureStore) -> torch.Tensor:
    return torch.from_numpy(store.normalised(np.arange(store.num_samples)))


def test_score_encoder_hand_checked_accuracies(tmp_path: Path) -> None:
    store = _known_store(tmp_path)
    tasks = [retrieval_task(_task("digit"), store, 0.25, 0), retrieval_task(_task("who", "speaker"), store, 0.25, 0)]
    encoder = FirstTwo()
    scores = score_encoder(encoder, tasks, {"d": _features(store)}, DownstreamConfig(ks=[1, 3]), 64)
    assert scores == {
        "digit/knn1_val": 1.0, "digit/knn3_val": 1.0, "digit/knn1_test": 0.5, "digit/knn3_test": 0.75,
        "who/knn1_val": 1.0, "who/knn3_val": 1.0, "who/knn1_test": 0.25, "who/knn3_test": 0.5,
        "mean/knn1_val": 1.0, "mean/knn3_val": 1.0, "mean/knn1_test": 0.375, "mean/knn3_test": 0.625,
    }
    assert encoder.calls == 1  # two tasks on one dataset: embedded once
    assert encoder.training  # embedding puts it in eval mode only for the pass


@pytest.mark.parametrize("probe", [False, True])
def test_score_names_are_the_scorer_keys_in_its_order(tmp_path: Path, probe: bool) -> None:
    """A resumed run orders its summary by score_names (checkpoint rows have sorted keys): it must be the scorer's."""
    store = _known_store(tmp_path)
    tasks = [retrieval_task(_task("who", "speaker"), store, 0.25, 0), retrieval_task(_task("digit"), store, 0.25, 0)]
    cfg = DownstreamConfig(ks=[3, 1], linear_probe=probe)
    scores = score_encoder(FirstTwo(), tasks, {"d": _features(store)}, cfg, 64)
    assert score_names(["who", "digit"], cfg) == list(scores)
    assert list(scores) != sorted(scores)  # the case a sorted checkpoint row would get wrong


def test_score_encoder_embeds_each_dataset_once(tmp_path: Path) -> None:
    store = _known_store(tmp_path / "d")
    other = _store(tmp_path / "e", [("p", "s", "train")] * 3 + [("q", "s", "train")] * 3 + [("p", "s", "test")])
    tasks = [retrieval_task(_task("digit"), store, 0.25, 0), retrieval_task(_task("who", "speaker"), store, 0.25, 0),
             retrieval_task(DownstreamTaskConfig(name="e", dataset="e"), other, 0.25, 0)]
    features = {"d": _features(store), "e": _features(other), "unused": _features(other)}
    encoder = FirstTwo()
    score_encoder(encoder, tasks, features, DownstreamConfig(ks=[1]), 5)
    assert encoder.calls == math.ceil(13 / 5) + math.ceil(7 / 5)  # d and e once each, in batches of 5; not unused
    encoder.calls = 0
    scores = score_encoder(encoder, tasks[:2], features, DownstreamConfig(ks=[1]), 5)
    assert encoder.calls == 3
    assert sorted(scores) == ["digit/knn1_test", "digit/knn1_val", "mean/knn1_test", "mean/knn1_val",
                              "who/knn1_test", "who/knn1_val"]


def test_score_encoder_linear_probe_adds_probe_scores(tmp_path: Path) -> None:
    store = _known_store(tmp_path)
    tasks = [retrieval_task(_task("digit"), store, 0.25, 0), retrieval_task(_task("who", "speaker"), store, 0.25, 0)]
    cfg = DownstreamConfig(ks=[1, 3], linear_probe=True, probe_c=1.0)
    scores = score_encoder(FirstTwo(), tasks, {"d": _features(store)}, cfg, 64)
    probes = {k for k in scores if "probe" in k}
    assert probes == {"digit/probe_val", "digit/probe_test", "who/probe_val", "who/probe_test", "mean/probe_val",
                      "mean/probe_test"}
    assert scores["digit/probe_val"] == 1.0  # one x query at 0°, one y at 90°: separable from the fit rows
    assert scores["digit/probe_test"] <= 0.75  # t3 (an x at 90°, among the y rows) is missed
    assert scores["mean/probe_test"] == pytest.approx((scores["digit/probe_test"] + scores["who/probe_test"]) / 2)
    assert scores["digit/knn3_test"] == 0.75  # the kNN scores are unchanged


def test_score_task_uses_fit_for_val_and_index_for_test() -> None:
    """A hand-made task: the validation queries search only the fit rows, the test queries the whole index."""
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9], [0.9, 0.12], [0.12, 0.9]])
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    #   fit {0: (1, 0) label 0, 1: (0, 1) label 1}; val {2: near row 0, label 1 → miss; 3: near row 1, label 0 → miss}
    #   test {4: at 7.6°, nearest of the index is row 2 at 6.3° (label 1) → hit; 5: likewise row 3 (label 0) → hit}
    task = RetrievalTask("t", "d", labels, index=np.array([0, 1, 2, 3]), test=np.array([4, 5]),
                         fit=np.array([0, 1]), val=np.array([2, 3]), classes=["a", "b"])
    assert score_task(task, embeddings, [1]) == {"knn1_val": 0.0, "knn1_test": 1.0}


def test_selection_key() -> None:
    assert selection_key("digit", DownstreamConfig()) == "digit/knn1_val"
    cfg = DownstreamConfig(ks=[1, 5], select_metric="knn5")
    assert selection_key("who", cfg) == "who/knn5_val"
    assert selection_key("who", cfg, "test") == "who/knn5_test"


# ------------------------------------------------------------------------------------------------ pool
FEATURES = {"n_mels": N_MELS, "sample_rate": 16000, "dtype": "float32"}


def _pair(tmp_path: Path, config_b: dict | None = None, frames_b: int = FRAMES) -> tuple[FeatureStore, FeatureStore]:
    rng = np.random.default_rng(7)
    a = _store(tmp_path / "a", [("dog", "s1", "train"), ("cat", "s2", "train"), ("dog", "s3", "test"),
                                ("cat", "s1", "train"), ("dog", "s2", "test")],
               features=rng.normal(3.0, 2.0, size=(5, N_MELS, FRAMES)).astype(np.float32), labels=["dog", "cat"],
               mean=3.0, std=2.0, config=FEATURES)
    b = _store(tmp_path / "b", [("0", "jo", "train"), ("1", "jo", "test"), ("1", "al", "train")],
               features=rng.normal(-1.0, 0.5, size=(3, N_MELS, frames_b)).astype(np.float32), labels=["0", "1"],
               mean=-1.0, std=0.5, config=config_b or FEATURES)
    return a, b


def test_pool_concatenates_normalised_rows_with_prefixed_names(tmp_path: Path) -> None:
    a, b = _pair(tmp_path)
    folder = pool_feature_stores({"a": a, "b": b}, tmp_path / "pool")
    assert folder == tmp_path / "pool"
    pool = FeatureStore.load(folder)
    assert pool.num_samples == 8
    expected = np.concatenate([a.normalised(np.arange(5))[:, 0], b.normalised(np.arange(3))[:, 0]])
    assert np.array_equal(np.asarray(pool.features), expected)
    assert np.array_equal(pool.normalised(np.arange(8)), expected[:, None])
    assert (pool.mean, pool.std) == (0.0, 1.0)
    assert (pool.meta["mean"], pool.meta["std"]) == (0.0, 1.0)
    assert pool.meta["features"] == FEATURES
    assert pool.ids == [f"a/clip{i}" for i in range(5)] + [f"b/clip{i}" for i in range(3)]
    assert [pool.label_names[i] for i in pool.labels] == ["a/dog", "a/cat", "a/dog", "a/cat", "a/dog", "b/0", "b/1",
                                                         "b/1"]
    assert pool.speakers == ["a/s1", "a/s2", "a/s3", "a/s1", "a/s2", "b/jo", "b/jo", "b/al"]
    assert pool.splits.tolist() == ["train", "train", "test", "train", "test", "train", "test", "train"]
    assert set(pool.label_names) == {"a/dog", "a/cat", "b/0", "b/1"}


def test_pool_of_float16_stores_is_float16(tmp_path: Path) -> None:
    config = {**FEATURES, "dtype": "float16"}
    a = _store(tmp_path / "a", [("x", "s", "train"), ("y", "s", "test")], mean=0.5, std=2.0, config=config,
               dtype="float16")
    pool = FeatureStore.load(pool_feature_stores({"a": a}, tmp_path / "pool"))
    assert pool.features.dtype == np.float16
    assert np.array_equal(np.asarray(pool.features), a.normalised(np.arange(2))[:, 0].astype(np.float16))


def test_pool_rejects_different_shapes_or_feature_params(tmp_path: Path) -> None:
    a, b = _pair(tmp_path / "shape", frames_b=FRAMES + 1)
    with pytest.raises(ValueError, match=r"same \(n_mels, frames\)"):
        pool_feature_stores({"a": a, "b": b}, tmp_path / "pool1")
    a, b = _pair(tmp_path / "params", config_b={**FEATURES, "n_mels": 8})
    with pytest.raises(ValueError, match="same feature parameters"):
        pool_feature_stores({"a": a, "b": b}, tmp_path / "pool2")
    with pytest.raises(ValueError, match="at least one store"):
        pool_feature_stores({}, tmp_path / "pool3")
    assert not (tmp_path / "pool1").exists() and not (tmp_path / "pool2").exists()
