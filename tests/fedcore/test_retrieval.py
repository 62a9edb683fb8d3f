"""Frozen-feature evaluation: kNN retrieval and a linear probe on hand-made points, stratified hold-out, embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedcore.config import ModelConfig
from fedcore.evaluation import embed, knn_accuracy, linear_probe_accuracy, stratified_holdout
from fedcore.models import AudioTransformer, build_model

# Index rows at angles 0°, 36.9°, 53.1°, 180° and 270°; cosine similarities of the queries by hand:
#   q0 = (10, 1), label 1: r0 .995 (0), r1 .856 (1), r2 .677 (1), r4 -.100 (2), r3 -.995 (2)
#       k=1 → 0 (miss); k=3 → 1 (hit: the majority is not the nearest neighbour's label)
#   q1 = (-3, -1), label 2: r3 .949 (2), r4 .316 (2), r2 -.822 (1), r0 = r1 -.949
#       k=1 → 2 (hit); k=3 → 2 (hit)
#   q2 = (6, 8), label 0: r2 1.0 (1), r1 .96 (1), r0 .6 (0), r3 -.6 (2), r4 -.8 (2)
#       k=1 → 1 (miss); k=3 → 1 (miss)
# With all five rows, q0 and q2 see two votes for 1 and two for 2 (one for 0): the tie goes to the larger summed
# similarity, 1 for q0 (1.53 vs -1.10) and q2 (1.96 vs -1.40); q1 → 2 (1.27 vs -1.77). Hits: q0, q1.
INDEX = torch.tensor([[1.0, 0.0], [4.0, 3.0], [3.0, 4.0], [-1.0, 0.0], [0.0, -2.0]])
INDEX_LABELS = torch.tensor([0, 1, 1, 2, 2])
QUERIES = torch.tensor([[10.0, 1.0], [-3.0, -1.0], [6.0, 8.0]])
QUERY_LABELS = torch.tensor([1, 2, 0])


def test_knn_accuracy_by_hand_and_k_above_index_size() -> None:
    result = knn_accuracy(INDEX, INDEX_LABELS, QUERIES, QUERY_LABELS, ks=(1, 3, 5, 20))
    assert result == {1: pytest.approx(1 / 3), 3: pytest.approx(2 / 3), 5: pytest.approx(2 / 3),
                      20: pytest.approx(2 / 3)}
    assert list(result) == [1, 3, 5, 20]


def test_knn_accuracy_vote_tie_goes_to_larger_summed_similarity() -> None:
    # query (1, 0): rows sim 1 (label 0), .6 (label 1), .6 (label 1), 0 (label 0), -1 (label 2)
    index = torch.tensor([[1.0, 0.0], [3.0, 4.0], [3.0, -4.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0, 2])
    query = torch.tensor([[1.0, 0.0]])
    # k=4: two votes each for 0 (sum 1.0) and 1 (sum 1.2) → 1, though the nearest row is labelled 0
    assert knn_accuracy(index, labels, query, torch.tensor([1]), ks=(1, 4)) == {1: 0.0, 4: 1.0}


def test_knn_accuracy_equal_similarities_prefer_lower_row_and_smaller_label() -> None:
    index = torch.tensor([[0.0, 1.0], [0.0, -1.0]])  # both at similarity 0 to the query
    labels = torch.tensor([5, 3])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_accuracy(index, labels, query, torch.tensor([5]), ks=(1,)) == {1: 1.0}  # row 0 first
    assert knn_accuracy(index, labels, query, torch.tensor([3]), ks=(2,)) == {2: 1.0}  # 1–1, sums 0–0 → label 3


def test_knn_accuracy_is_cosine_so_row_scale_does_not_matter() -> None:
    generator = torch.Generator().manual_seed(0)
    index, queries = torch.randn(30, 4, generator=generator), torch.randn(12, 4, generator=generator)
    index_labels = torch.randint(0, 3, (30,), generator=generator)
    query_labels = torch.randint(0, 3, (12,), generator=generator)
    scaled_index = index * torch.rand(30, 1, generator=generator).add(0.1).mul(100)
    scaled_queries = queries * torch.rand(12, 1, generator=generator).add(0.1).mul(0.01)
    ks = (1, 5)
    assert knn_accuracy(index, index_labels, queries, query_labels, ks) == knn_accuracy(
        scaled_index, index_labels, scaled_queries, query_labels, ks
    )


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_knn_accuracy_does_not_depend_on_chunking(chunk_size: int) -> None:
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(20, 3, generator=generator)
    index = torch.cat([rows, rows, torch.zeros(1, 3)])  # duplicate rows: equal similarities everywhere
    index_labels = torch.randint(0, 4, (41,), generator=generator)
    queries = torch.cat([torch.randn(49, 3, generator=generator), torch.zeros(1, 3)])
    query_labels = torch.randint(0, 4, (50,), generator=generator)
    ks = (1, 2, 5, 41, 100)
    whole = knn_accuracy(index, index_labels, queries, query_labels, ks, chunk_size=50)
    assert knn_accuracy(index, index_labels, queries, query_labels, ks, chunk_size=chunk_size) == whole


def test_knn_accuracy_zero_vectors_have_similarity_zero() -> None:
    index = torch.tensor([[0.0, 0.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1])
    # query (1, 0): similarity 0 to the zero row beats -1; the zero query ties both rows at 0 → row 0
    queries = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    result = knn_accuracy(index, labels, queries, torch.tensor([0, 0]), ks=(1,))
    assert result == {1: 1.0}


def test_knn_accuracy_labels_need_not_be_contiguous() -> None:
    result = knn_accuracy(INDEX, INDEX_LABELS * 10 - 7, QUERIES, QUERY_LABELS * 10 - 7, ks=(1, 3))
    assert result == pytest.approx({1: 1 / 3, 3: 2 / 3})


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [((INDEX[0], INDEX_LABELS, QUERIES, QUERY_LABELS), {}, "'index' must be a non-empty 2-D"),
     ((INDEX[:0], INDEX_LABELS[:0], QUERIES, QUERY_LABELS), {}, "'index' must be a non-empty 2-D"),
     ((INDEX, INDEX_LABELS, QUERIES[:0], QUERY_LABELS[:0]), {}, "'queries' must be a non-empty 2-D"),
     ((INDEX, INDEX_LABELS[:4], QUERIES, QUERY_LABELS), {}, "'index_labels' must be an integer tensor"),
     ((INDEX, INDEX_LABELS.float(), QUERIES, QUERY_LABELS), {}, "'index_labels' must be an integer tensor"),
     ((INDEX, INDEX_LABELS, QUERIES, QUERY_LABELS[:2]), {}, "'query_labels' must be an integer tensor"),
     ((INDEX, INDEX_LABELS, torch.ones(3, 3), QUERY_LABELS), {}, "'queries' must have d = 2 columns"),
     ((INDEX.long(), INDEX_LABELS, QUERIES, QUERY_LABELS), {}, "'index' must be a non-empty 2-D floating-point"),
     ((INDEX, INDEX_LABELS, QUERIES, QUERY_LABELS, ()), {}, "'ks' must be a non-empty sequence of ints >= 1"),
     ((INDEX, INDEX_LABELS, QUERIES, QUERY_LABELS, (1, 0)), {}, "'ks' must be"),
     ((INDEX, INDEX_LABELS, QUERIES, QUERY_LABELS, (True,)), {}, "'ks' must be"),
     ((INDEX, INDEX_LABELS, QUERIES, QUERY_LABELS), {"chunk_size": 0}, "'chunk_size' must be an int >= 1")],
)
def test_knn_accuracy_rejects_bad_inputs(args: tuple[object, ...], kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=f"knn_accuracy: {match}"):
        knn_accuracy(*args, **kwargs)  # type: ignore[arg-type]


def _blobs(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[5.0, 0.0, 0.0, 0.0, 0.0], [-5.0, 0.0, 0.0, 0.0, 0.0]])
    labels = torch.arange(2).repeat_interleave(n_per_class)
    return centres[labels] + torch.randn(2 * n_per_class, 5, generator=generator), labels


def test_linear_probe_separates_blobs() -> None:
    train, train_labels = _blobs(50, seed=0)
    test, test_labels = _blobs(40, seed=1)
    assert linear_probe_accuracy(train, train_labels, test, test_labels) == 1.0


def test_linear_probe_is_near_chance_on_random_labels_and_deterministic() -> None:
    generator = torch.Generator().manual_seed(2)
    train, test = torch.randn(200, 8, generator=generator), torch.randn(400, 8, generator=generator)
    train_labels = torch.randint(0, 2, (200,), generator=generator)
    test_labels = torch.randint(0, 2, (400,), generator=generator)
    accuracy = linear_probe_accuracy(train, train_labels, test, test_labels, c=0.5)
    assert 0.4 < accuracy < 0.6
    assert linear_probe_accuracy(train, train_labels, test, test_labels, c=0.5) == accuracy


def test_linear_probe_single_class_train_predicts_that_class() -> None:
    train = torch.randn(6, 3)
    test_labels = torch.tensor([2, 2, 0, 1])
    assert linear_probe_accuracy(train, torch.full((6,), 2), torch.randn(4, 3), test_labels) == 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"c": 0.0}, "'c' must be a finite float > 0"), ({"c": float("inf")}, "'c' must be"),
     ({"max_iter": 0}, "'max_iter' must be an int >= 1")],
)
def test_linear_probe_rejects_bad_options(kwargs: dict[str, float], match: str) -> None:
    train, labels = _blobs(3, seed=0)
    with pytest.raises(ValueError, match=f"linear_probe_accuracy: {match}"):
        linear_probe_accuracy(train, labels, train, labels, **kwargs)  # type: ignore[arg-type]


def test_linear_probe_rejects_mismatched_dimensions() -> None:
    train, labels = _blobs(3, seed=0)
    with pytest.raises(ValueError, match="'test' must have d = 5 columns"):
        linear_probe_accuracy(train, labels, train[:, :4], labels)


def test_stratified_holdout_per_label_counts() -> None:
    labels = np.array([0] * 10 + [1] * 5 + [2] + [3] * 2 + [4] * 3)
    kept, held_out = stratified_holdout(labels, 0.2, seed=0)
    # round(0.2·n): 10 → 2, 5 → 1, 1 → 0 (keep the only one), 2 → 0 raised to 1, 3 → 1 (0.6 rounds up)
    assert {c: int((labels[held_out] == c).sum()) for c in range(5)} == {0: 2, 1: 1, 2: 0, 3: 1, 4: 1}
    assert set(labels[kept]) == {0, 1, 2, 3, 4}


def test_stratified_holdout_rounds_half_up_and_keeps_one() -> None:
    labels = np.array([0] * 5 + [1] * 3 + [2] * 2)
    held_out = stratified_holdout(labels, 0.5, seed=0)[1]
    assert np.bincount(labels[held_out]).tolist() == [3, 2, 1]  # 2.5 → 3, 1.5 → 2, 1.0 → 1
    held_out = stratified_holdout(labels, 0.99, seed=0)[1]
    assert np.bincount(labels[held_out]).tolist() == [4, 2, 1]  # never every position of a label


def test_stratified_holdout_is_a_sorted_partition() -> None:
    labels = np.random.default_rng(0).integers(0, 4, size=57)
    kept, held_out = stratified_holdout(labels, 0.3, seed=3)
    assert kept.dtype == held_out.dtype == np.int64
    assert np.all(np.diff(kept) > 0) and np.all(np.diff(held_out) > 0)
    assert np.intersect1d(kept, held_out).size == 0
    assert np.array_equal(np.sort(np.concatenate([kept, held_out])), np.arange(57))


def test_stratified_holdout_draws_labels_in_sorted_order_from_one_generator() -> None:
    labels = np.array(["b", "a", "b", "a", "b", "a", "a", "b"])
    rng = np.random.default_rng(5)
    expected = np.sort(np.concatenate([rng.permutation([1, 3, 5, 6])[:2], rng.permutation([0, 2, 4, 7])[:2]]))
    held_out = stratified_holdout(labels, 0.5, seed=5)[1]
    assert np.array_equal(held_out, expected)


def test_stratified_holdout_deterministic_per_seed() -> None:
    labels = np.repeat(np.arange(3), 20)
    first, again, other = (stratified_holdout(labels, 0.25, seed=s)[1] for s in (1, 1, 2))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_stratified_holdout_zero_fraction_and_empty_labels() -> None:
    kept, held_out = stratified_holdout(np.array([0, 0, 1]), 0.0, seed=0)
    assert kept.tolist() == [0, 1, 2] and held_out.size == 0
    kept, held_out = stratified_holdout(np.array([], dtype=np.int64), 0.5, seed=0)
    assert kept.size == held_out.size == 0


@pytest.mark.parametrize(
    ("labels", "fraction", "seed", "match"),
    [(np.zeros((2, 2)), 0.2, 0, "'labels' must be a 1-D array"), (np.zeros(4), 1.0, 0, "'fraction' must be"),
     (np.zeros(4), -0.1, 0, "'fraction' must be"), (np.zeros(4), 0.2, -1, "'seed' must be an int >= 0")],
)
def test_stratified_holdout_rejects_bad_arguments(labels: np.ndarray, fraction: float, seed: int, match: str) -> None:
    with pytest.raises(ValueError, match=f"stratified_holdout: {match}"):
        stratified_holdout(labels, fraction, seed)


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 3), nn.BatchNorm1d(3))  # BatchNorm: eval ≠ train output


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_embed_matches_eval_forward_and_restores_mode(batch_size: int) -> None:
    encoder = _encoder()
    features = torch.randn(5, 1, 2, 4, generator=torch.Generator().manual_seed(0))
    embeddings = embed(encoder, features, batch_size)
    assert encoder.training
    assert embeddings.shape == (5, 3) and embeddings.dtype == torch.float32 and embeddings.device.type == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(embeddings, encoder.eval()(features))
    embed(encoder, features, batch_size)
    assert not encoder.training  # an encoder in eval mode stays there


def test_embed_of_transformer_without_head_is_its_last_layer_embedding() -> None:
    model = build_model(ModelConfig(name="transformer", width=8, depth=2), 3, (1, 4, 12), torch.Generator())
    assert isinstance(model, AudioTransformer)
    model.classifier = nn.Identity()  # type: ignore[assignment]
    features = torch.randn(5, 1, 4, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.layer_embeddings(features)[-1]
    torch.testing.assert_close(embed(model, features, batch_size=2), expected)


def test_embed_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="embed: 'features' must be a non-empty tensor"):
        embed(_encoder(), torch.randn(5, 8), batch_size=2)
    with pytest.raises(ValueError, match="embed: 'batch_size' must be an int >= 1"):
        embed(_encoder(), torch.randn(5, 1, 2, 4), batch_size=0)
    with pytest.raises(ValueError, match="embed: 'encoder' must map features to \\(n, d\\)"):
        embed(nn.Flatten(0), torch.randn(5, 1, 2, 4), batch_size=2)
