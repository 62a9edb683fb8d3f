"""Audio-visual data: digit images, stratified pools, label pairing, PCA energy, missing video and the AV manifest."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fedcore.data.manifest import ManifestRow
from fedcore.multimodal import data as av
from fedcore.multimodal.data import (
    AV_MANIFEST_COLUMNS,
    VIDEO_DRAWS,
    AVManifestRow,
    audio_manifest_rows,
    digit_images,
    keep_pca_energy,
    load_visual,
    pair_by_label,
    read_av_manifest,
    split_images,
    video_clients,
)

# ---------------------------------------------------------------------------------------------------------------
# digit_images
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, list[str]]:
    return digit_images()


def test_digit_images_shape_range_and_labels(digits: tuple[np.ndarray, list[str]]) -> None:
    images, labels = digits
    assert images.dtype == np.float32
    assert images.ndim == 4 and images.shape[1:] == (1, 8, 8)
    assert len(labels) == images.shape[0] == 1797
    assert images.min() == 0.0 and images.max() == 1.0
    assert all(isinstance(label, str) for label in labels)
    assert sorted(set(labels)) == [str(d) for d in range(10)]
    from sklearn.datasets import load_digits

    raw = load_digits()
    np.testing.assert_allclose(images[5, 0], raw.images[5] / 16.0, rtol=1e-6)
    assert labels[5] == str(raw.target[5])


# ---------------------------------------------------------------------------------------------------------------
# split_images
# ---------------------------------------------------------------------------------------------------------------


def test_split_images_stratified_disjoint_covering(digits: tuple[np.ndarray, list[str]]) -> None:
    _, labels = digits
    train, test = split_images(labels, 0.25, seed=3)
    assert train.dtype == np.int64 and test.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    names = np.asarray(labels)
    for label in sorted(set(labels)):
        count = int((names == label).sum())
        assert int((names[test] == label).sum()) == int(np.floor(0.25 * count + 0.5))


def test_split_images_rounds_half_up_and_keeps_one_in_each_pool() -> None:
    labels = ["a"] * 2 + ["b"] * 3 + ["c"] * 10 + ["d"] * 5
    train, test = split_images(labels, 0.5, seed=0)
    names = np.asarray(labels)
    # a: 0.5*2=1; b: 1.5 -> 2; c: 5; d: 2.5 -> 3 (half up, not to even)
    assert [int((names[test] == c).sum()) for c in "abcd"] == [1, 2, 5, 3]
    train, test = split_images(labels, 0.01, seed=0)
    assert [int((names[test] == c).sum()) for c in "abcd"] == [1, 1, 1, 1]
    train, test = split_images(labels, 0.99, seed=0)
    assert [int((names[train] == c).sum()) for c in "abcd"] == [1, 1, 1, 1]


def test_split_images_deterministic_and_seed_dependent(digits: tuple[np.ndarray, list[str]]) -> None:
    _, labels = digits
    a = split_images(labels, 0.2, seed=7)
    b = split_images(labels, 0.2, seed=7)
    c = split_images(labels, 0.2, seed=8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, True, "0.2"])
def test_split_images_rejects_bad_fraction(fraction: object) -> None:
    with pytest.raises(ValueError, match="split_images: 'test_fraction'"):
        split_images(["a", "a", "b", "b"], fraction, seed=0)  # type: ignore[arg-type]


def test_split_images_rejects_singleton_class_and_empty() -> None:
    with pytest.raises(ValueError, match=r"fewer for lonely, z"):
        split_images(["a", "a", "z", "lonely"], 0.5, seed=0)
    with pytest.raises(ValueError, match="must not be empty"):
        split_images([], 0.5, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# pair_by_label
# ---------------------------------------------------------------------------------------------------------------


def _pairing_inputs(labels: list[str]) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
    train, test = split_images(labels, 0.3, seed=1)
    rng = np.random.default_rng(0)
    audio_labels = [str(d) for d in rng.integers(0, 10, size=300)]
    audio_splits = ["train" if s else "test" for s in rng.random(300) < 0.7]
    return audio_labels, audio_splits, {"train": train, "test": test}


def test_pair_by_label_same_label_from_right_pool(digits: tuple[np.ndarray, list[str]]) -> None:
    _, labels = digits
    audio_labels, audio_splits, pools = _pairing_inputs(labels)
    paired = pair_by_label(audio_labels, audio_splits, labels, pools, seed=11)
    assert paired.dtype == np.int64 and paired.shape == (300,)
    names = np.asarray(labels)
    np.testing.assert_array_equal(names[paired], np.asarray(audio_labels))
    for i, split in enumerate(audio_splits):
        assert paired[i] in pools[split]
        assert paired[i] not in pools["test" if split == "train" else "train"]


def test_pair_by_label_deterministic_and_seed_dependent(digits: tuple[np.ndarray, list[str]]) -> None:
    _, labels = digits
    audio_labels, audio_splits, pools = _pairing_inputs(labels)
    a = pair_by_label(audio_labels, audio_splits, labels, pools, seed=5)
    b = pair_by_label(audio_labels, audio_splits, labels, pools, seed=5)
    c = pair_by_label(audio_labels, audio_splits, labels, pools, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_pair_by_label_ignores_pool_order_and_draws_with_replacement() -> None:
    image_labels = ["x", "y", "x", "y"]
    pools = {"train": np.array([0, 1, 2, 3])}
    reversed_pools = {"train": np.array([3, 2, 1, 0])}
    audio = ["x"] * 50
    a = pair_by_label(audio, ["train"] * 50, image_labels, pools, seed=2)
    b = pair_by_label(audio, ["train"] * 50, image_labels, reversed_pools, seed=2)
    np.testing.assert_array_equal(a, b)
    assert set(a.tolist()) == {0, 2}  # 50 draws from 2 images: both used, so repeats happen


def test_pair_by_label_missing_label_lists_sorted() -> None:
    image_labels = ["a", "b", "a", "b", "c"]
    pools = {"train": np.array([0, 1]), "test": np.array([2, 3])}
    with pytest.raises(ValueError, match=r"pool 'test' .* Got none for c, d\b"):
        pair_by_label(["a", "d", "c", "a"], ["train", "test", "test", "test"], image_labels, pools, seed=0)


def test_pair_by_label_missing_pool_and_length_mismatch() -> None:
    with pytest.raises(ValueError, match=r"Got none for test"):
        pair_by_label(["a"], ["test"], ["a"], {"train": np.array([0])}, seed=0)
    with pytest.raises(ValueError, match="'audio_splits' must have one entry per audio row"):
        pair_by_label(["a", "a"], ["train"], ["a"], {"train": np.array([0])}, seed=0)
    with pytest.raises(ValueError, match="must hold positions in 0..0"):
        pair_by_label(["a"], ["train"], ["a"], {"train": np.array([0, 3])}, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# keep_pca_energy
# ---------------------------------------------------------------------------------------------------------------

_MU = np.array([1.0, 2.0, 0.5])


def _tiny_images() -> np.ndarray:
    """4 train images of 3 pixels, then 1 test image, shape (5, 1, 1, 3).

    The train pool is μ ± (2, 2, 0) and μ ± (1, -1, 0): centred sums of squares 16 along u1 = (1, 1, 0)/√2, 4 along
    u2 = (1, -1, 0)/√2 and 0 along the third pixel (constant 0.5), so λ ∝ (16, 4, 0), shares 0.8, 1.0, 1.0.
    The test image is μ + (3, 1, 0.4).
    """
    offsets = np.array([[2, 2, 0], [-2, -2, 0], [1, -1, 0], [-1, 1, 0], [3, 1, 0.4]], dtype=np.float64)
    return (_MU + offsets).reshape(5, 1, 1, 3).astype(np.float32)


@pytest.mark.parametrize("energy", [0.1, 0.5, 0.8])  # 0.8: the first share reaches it exactly
def test_keep_pca_energy_hand_computed_one_component(energy: float) -> None:
    result = keep_pca_energy(_tiny_images(), np.arange(4), energy)
    assert (result.components, result.dims) == (1, 3)
    assert result.energy == pytest.approx(0.8)
    assert result.images.dtype == np.float32 and result.images.shape == (5, 1, 1, 3)
    # x' = μ + u1 u1ᵀ (x − μ): train points lie on u1 or project to μ; the test offset (3, 1, 0.4) -> (2, 2, 0)
    expected = _MU + np.array([[2, 2, 0], [-2, -2, 0], [0, 0, 0], [0, 0, 0], [2, 2, 0]], dtype=np.float64)
    np.testing.assert_allclose(result.images.reshape(5, 3), expected, atol=1e-6)


def test_keep_pca_energy_hand_computed_two_components() -> None:
    result = keep_pca_energy(_tiny_images(), np.arange(4), 0.81)
    assert (result.components, result.energy) == (2, pytest.approx(1.0))
    # the plane of u1, u2 keeps the train images; the test image loses its third-pixel offset (no train variance)
    expected = _MU + np.array([[2, 2, 0], [-2, -2, 0], [1, -1, 0], [-1, 1, 0], [3, 1, 0]], dtype=np.float64)
    np.testing.assert_allclose(result.images.reshape(5, 3), expected, atol=1e-6)


def test_keep_pca_energy_one_returns_the_images_unchanged(digits: tuple[np.ndarray, list[str]]) -> None:
    tiny = _tiny_images()
    result = keep_pca_energy(tiny, np.arange(4), 1.0)
    assert (result.components, result.energy, result.dims) == (3, 1.0, 3)
    np.testing.assert_array_equal(result.images, tiny)  # the test image's third pixel too
    images, labels = digits
    train, _ = split_images(labels, 0.3, seed=0)
    full = keep_pca_energy(images, train, 1)
    assert full.images.dtype == np.float32 and full.images.shape == images.shape
    np.testing.assert_allclose(full.images, images, atol=1e-6)


def test_keep_pca_energy_on_digits_keeps_at_least_the_share(digits: tuple[np.ndarray, list[str]]) -> None:
    images, labels = digits
    train, _ = split_images(labels, 0.3, seed=0)
    previous = 0
    for energy in (0.25, 0.5, 0.9):
        result = keep_pca_energy(images, train, energy)
        assert result.energy >= energy - 1e-9 and result.components >= previous and result.dims == 64
        assert result.images.shape == (len(labels), 1, 8, 8) and result.images.dtype == np.float32
        previous = result.components
    fewer = keep_pca_energy(images, train, 0.25)
    one_less = keep_pca_energy(images, train, fewer.energy - 1e-6)  # just below the share k comps keep
    assert one_less.components == fewer.components


def test_keep_pca_energy_is_fitted_on_the_pool_only() -> None:
    images = _tiny_images()
    changed = images.copy()
    changed[4] = np.array([9.0, -7.0, 3.0], dtype=np.float32).reshape(1, 1, 3)  # the test image
    a = keep_pca_energy(images, np.arange(4), 0.5)
    b = keep_pca_energy(changed, np.arange(4), 0.5)
    np.testing.assert_array_equal(a.images[:4], b.images[:4])
    assert (a.components, a.energy) == (b.components, b.energy)
    c = keep_pca_energy(changed, np.arange(5), 0.5)  # the same image inside the pool does change the fit
    assert not np.allclose(c.images[:4], a.images[:4])


def test_keep_pca_energy_deterministic_and_pool_order_free(digits: tuple[np.ndarray, list[str]]) -> None:
    images, labels = digits
    train, _ = split_images(labels, 0.3, seed=0)
    a = keep_pca_energy(images, train, 0.25)
    b = keep_pca_energy(images, train[::-1].copy(), 0.25)
    c = keep_pca_energy(images.copy(), train, 0.25)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.images, c.images)
    assert (a.components, a.energy) == (b.components, b.energy) == (c.components, c.energy)
    assert not np.array_equal(a.images, images)


@pytest.mark.parametrize("energy", [0, 0.0, -0.25, 1.0000001, 2, True, False, float("nan"), float("inf"), "0.25",
                                    None])
def test_keep_pca_energy_rejects_bad_energy(energy: object) -> None:
    with pytest.raises(ValueError, match=r"'energy' must be a number > 0 and <= 1 .*Got"):
        keep_pca_energy(_tiny_images(), np.arange(4), energy)  # type: ignore[arg-type]


def test_keep_pca_energy_rejects_bad_images_and_pools() -> None:
    tiny = _tiny_images()
    with pytest.raises(ValueError, match="'images' must be a numeric array of shape"):
        keep_pca_energy(np.zeros(4), np.arange(4), 0.5)
    with pytest.raises(ValueError, match="'images' must hold finite values"):
        keep_pca_energy(np.where(np.arange(15).reshape(5, 1, 1, 3) == 7, np.nan, tiny), np.arange(4), 0.5)
    with pytest.raises(ValueError, match="'fit_pool' must hold at least 2 distinct int positions"):
        keep_pca_energy(tiny, np.array([1, 1]), 0.5)
    with pytest.raises(ValueError, match="'fit_pool' must hold at least 2 distinct int positions"):
        keep_pca_energy(tiny, np.array([0.0, 1.0]), 0.5)
    with pytest.raises(ValueError, match=r"'fit_pool' must hold positions in 0..4. Got 0..5"):
        keep_pca_energy(tiny, np.array([0, 5]), 0.5)
    flat = np.ones((3, 1, 2, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="must not all be equal"):
        keep_pca_energy(flat, np.arange(3), 0.5)
    np.testing.assert_array_equal(keep_pca_energy(flat, np.arange(3), 1.0).images, flat)


@pytest.mark.parametrize(("value", "message"), [
    (0, "must be > 0.0"), (-0.5, "must be > 0.0"), (1.5, "must be <= 1.0"), (True, "must be a float"),
    (float("nan"), "must be a finite number"), ("0.25", "must be a float"),
])
def test_modality_visual_energy_is_checked_on_load(value: object, message: str) -> None:
    from fedcore.config import ModalityConfig, check_section

    config, problems = check_section(ModalityConfig, {"visual_energy": value}, "modality")
    assert config is None and len(problems) == 1
    assert problems[0].startswith("modality: 'visual_energy' ") and message in problems[0]
    assert ModalityConfig().visual_energy == 0.25  # AV-MNIST's share, fixed by issue 21 before any result
    assert check_section(ModalityConfig, {"visual_energy": 1}, "modality")[0] is not None


# ---------------------------------------------------------------------------------------------------------------
# video_clients
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_clients", "rate", "with_video"),
    [(10, 0.3, 7), (10, 0.0, 10), (10, 1.0, 0), (10, 0.25, 7), (10, 0.35, 6), (4, 0.5, 2), (1, 0.5, 0), (7, 0.1, 6)],
)
def test_video_clients_exact_count(num_clients: int, rate: float, with_video: int) -> None:
    ids = video_clients(num_clients, rate, seed=4)
    assert len(ids) == with_video
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(isinstance(i, int) and 0 <= i < num_clients for i in ids)


def test_video_clients_exact_deterministic_and_seed_dependent() -> None:
    assert video_clients(20, 0.5, seed=1) == video_clients(20, 0.5, seed=1)
    assert len({tuple(video_clients(20, 0.5, seed=s)) for s in range(5)}) > 1


def test_video_clients_bernoulli() -> None:
    a = video_clients(200, 0.3, seed=9, draw="bernoulli")
    assert a == video_clients(200, 0.3, seed=9, draw="bernoulli")
    assert a != video_clients(200, 0.3, seed=10, draw="bernoulli")
    assert a == sorted(a)
    assert 110 <= len(a) <= 170  # expected 140, sd about 6.5
    assert video_clients(30, 0.0, seed=0, draw="bernoulli") == list(range(30))
    assert video_clients(30, 1.0, seed=0, draw="bernoulli") == []


def test_video_draws_registry() -> None:
    assert set(VIDEO_DRAWS) == {"exact", "bernoulli"}
    mask = VIDEO_DRAWS["exact"](10, 0.3, np.random.default_rng(0))
    assert mask.dtype == np.bool_ and int(mask.sum()) == 7


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_clients": 0}, "'num_clients' must be an int >= 1"),
        ({"num_clients": 2.0}, "'num_clients' must be an int >= 1"),
        ({"num_clients": True}, "'num_clients' must be an int >= 1"),
        ({"missing_rate": -0.1}, r"'missing_rate' must be a number in \[0, 1\]"),
        ({"missing_rate": 1.01}, r"'missing_rate' must be a number in \[0, 1\]"),
        ({"missing_rate": float("nan")}, r"'missing_rate' must be a number in \[0, 1\]"),
        ({"draw": "poisson"}, r"'draw' must be one of exact, bernoulli. Got 'poisson'"),
        ({"seed": 1.5}, "'seed' must be an int"),
    ],
)
def test_video_clients_validation(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"num_clients": 10, "missing_rate": 0.3, "seed": 0, "draw": "exact"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        video_clients(**args)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# AV manifest
# ---------------------------------------------------------------------------------------------------------------


def _write_wav(path: Path, seconds: float, sample_rate: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    sf.write(path, (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sample_rate, subtype="PCM_16")


def _write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def av_folder(tmp_path: Path) -> Path:
    """A manifest in tmp_path/ds with two relative and one absolute sample."""
    ds = tmp_path / "ds"
    (ds / "img").mkdir(parents=True)
    _write_wav(ds / "wav" / "a.wav", 0.5, 8000)
    _write_wav(ds / "wav" / "b.wav", 0.25, 16000)
    _write_wav(tmp_path / "elsewhere" / "c.wav", 1.0, 8000)
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        np.save(ds / "img" / f"{name}.npy", rng.random((8, 8)))
    _write_csv(
        ds / "av.csv",
        [
            "id,audio_path,visual_path,label,speaker,split",
            "a,wav/a.wav,img/a.npy,three,s1,train",
            "b,wav/b.wav,img/b.npy,seven,s2,test",
            f"c,{tmp_path / 'elsewhere' / 'c.wav'},img/c.npy,three,,",
        ],
    )
    return ds


def test_read_av_manifest_round_trip_and_relative_paths(av_folder: Path, tmp_path: Path) -> None:
    rows = read_av_manifest(av_folder / "av.csv")
    assert [row.id for row in rows] == ["a", "b", "c"]
    assert rows[0] == AVManifestRow(
        id="a", audio_path=av_folder / "wav" / "a.wav", visual_path=av_folder / "img" / "a.npy", label="three",
        speaker="s1", split="train",
    )
    assert rows[1].split == "test" and rows[1].label == "seven"
    assert rows[2].audio_path == tmp_path / "elsewhere" / "c.wav"
    assert rows[2].speaker == "" and rows[2].split == "train"
    assert all(row.audio_path.is_file() and row.visual_path.is_file() for row in rows)


def test_read_av_manifest_optional_columns_default(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "m.csv", ["id,audio_path,visual_path,label", "x,a.wav,a.npy,1"])
    (row,) = read_av_manifest(str(path))
    assert (row.speaker, row.split) == ("", "train")
    assert row.audio_path == tmp_path / "a.wav"
    assert AV_MANIFEST_COLUMNS == ("id", "audio_path", "visual_path", "label")


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (["id,audio_path,label", "x,a.wav,1"], r"line 1\).*missing visual_path"),
        (
            ["id,audio_path,visual_path,label,split", "x,a.wav,a.npy,1,train", "y,b.wav,b.npy,1,dev"],
            r"'split' must be one of train, test \(.*m\.csv, line 3\)\. Got 'dev'",
        ),
        (
            ["id,audio_path,visual_path,label", "x,a.wav,a.npy,1", "y,b.wav,b.npy,1", "x,c.wav,c.npy,2"],
            r"'id' must be unique \(.*m\.csv, line 4\)\. Got 'x', already on line 2",
        ),
        (["id,audio_path,visual_path,label", "x,a.wav,a.npy,1", "y,,b.npy,1"], r"'audio_path' .*line 3\)"),
        (["id,audio_path,visual_path,label"], r"m\.csv' must hold at least one row"),
        ([""], r"missing id, audio_path, visual_path, label"),
    ],
)
def test_read_av_manifest_errors(tmp_path: Path, lines: list[str], match: str) -> None:
    path = _write_csv(tmp_path / "m.csv", lines)
    with pytest.raises(ValueError, match=match):
        read_av_manifest(path)


def test_read_av_manifest_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"read_av_manifest: 'path' must be an existing AV manifest CSV.*nope\.csv"):
        read_av_manifest(tmp_path / "nope.csv")


# ---------------------------------------------------------------------------------------------------------------
# load_visual
# ---------------------------------------------------------------------------------------------------------------


def test_load_visual_shapes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cases = {"hw": (6, 5), "chw": (3, 6, 5), "tchw": (4, 3, 6, 5)}
    for name, shape in cases.items():
        arrays = [rng.random(shape) for _ in range(3)]
        paths = []
        for i, array in enumerate(arrays):
            np.save(tmp_path / f"{name}{i}.npy", array)
            paths.append(tmp_path / f"{name}{i}.npy")
        stacked = load_visual([str(p) for p in paths] if name == "chw" else paths)
        expected_shape = (3, 1, *shape) if len(shape) == 2 else (3, *shape)
        assert stacked.dtype == np.float32 and stacked.shape == expected_shape
        np.testing.assert_allclose(stacked.reshape(3, -1), np.stack(arrays).reshape(3, -1).astype(np.float32))


def test_load_visual_int_images_become_float(tmp_path: Path) -> None:
    np.save(tmp_path / "u8.npy", np.arange(16, dtype=np.uint8).reshape(4, 4))
    out = load_visual([tmp_path / "u8.npy"])
    assert out.dtype == np.float32 and out.shape == (1, 1, 4, 4) and out[0, 0, 3, 3] == 15.0


def test_load_visual_mismatch_names_file_and_shapes(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((8, 8)))
    np.save(tmp_path / "b.npy", np.zeros((1, 8, 8)))  # same as a after (H, W) -> (1, H, W)
    np.save(tmp_path / "c.npy", np.zeros((8, 9)))
    assert load_visual([tmp_path / "a.npy", tmp_path / "b.npy"]).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"shape of the first, \(1, 8, 8\)\. Got \(1, 8, 9\) in '.*c\.npy'"):
        load_visual([tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "c.npy"])


def test_load_visual_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'paths' must not be empty"):
        load_visual([])
    np.save(tmp_path / "v.npy", np.zeros(5))
    with pytest.raises(ValueError, match=r"Got shape \(5,\) in '.*v\.npy'"):
        load_visual([tmp_path / "v.npy"])
    with pytest.raises(ValueError, match=r"readable \.npy array. Got '.*missing\.npy'"):
        load_visual([tmp_path / "missing.npy"])
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"obj\.npy"):
        load_visual([tmp_path / "obj.npy"])
    with pytest.raises(TypeError, match="single path"):
        load_visual(str(tmp_path / "v.npy"))


# ---------------------------------------------------------------------------------------------------------------
# audio_manifest_rows
# ---------------------------------------------------------------------------------------------------------------


def test_audio_manifest_rows_reads_duration_and_rate(av_folder: Path, tmp_path: Path) -> None:
    rows = audio_manifest_rows(read_av_manifest(av_folder / "av.csv"))
    assert all(isinstance(row, ManifestRow) for row in rows)
    assert rows[0] == ManifestRow(
        id="a", path=str(av_folder / "wav" / "a.wav"), label="three", speaker="s1", split="train",
        duration=0.5, sample_rate=8000,
    )
    assert (rows[1].duration, rows[1].sample_rate, rows[1].split) == (0.25, 16000, "test")
    assert rows[2].path == str(tmp_path / "elsewhere" / "c.wav")
    assert (rows[2].duration, rows[2].sample_rate) == (1.0, 8000)


def test_audio_manifest_rows_missing_audio(tmp_path: Path) -> None:
    row = AVManifestRow(
        id="gone", audio_path=tmp_path / "gone.wav", visual_path=tmp_path / "g.npy", label="1", speaker="",
        split="train",
    )
    with pytest.raises(ValueError, match=r"'audio_path' of 'gone' must be a readable audio file.*gone\.wav"):
        audio_manifest_rows([row])


# ---------------------------------------------------------------------------------------------------------------
# Module hygiene
# ---------------------------------------------------------------------------------------------------------------


def test_module_imports_no_orchestration_tools() -> None:
    tree = ast.parse(inspect.getsource(av))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"prefect", "mlflow", "dvc"}
    assert "sklearn" in imported  # imported lazily inside digit_images
