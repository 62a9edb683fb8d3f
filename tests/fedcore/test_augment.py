"""Log-mel augmentations: shape, purity, determinism per generator, each defining property, and pipelines."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fedcore.ssl.augment import (
    AUGMENTATIONS,
    DEFAULT_AUGMENT,
    AdditiveNoise,
    AugmentPipeline,
    FreqMask,
    Gain,
    RandomTimeCrop,
    TimeMask,
    TimeShift,
    build_augmenter,
)

BATCH, MELS, FRAMES = 8, 16, 40


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(BATCH, 1, MELS, FRAMES, generator=_gen(seed), dtype=dtype)


def test_registry_holds_every_augmentation() -> None:
    assert AUGMENTATIONS.names() == ["freq_mask", "gain", "noise", "time_crop", "time_mask", "time_shift"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", AUGMENTATIONS.names())
def test_augmentation_keeps_shape_dtype_and_input(name: str, dtype: torch.dtype) -> None:
    x = _batch(dtype=dtype)
    original = x.clone()
    before = torch.random.get_rng_state()
    out = AUGMENTATIONS.build(name)(x, _gen(1))
    assert torch.equal(torch.random.get_rng_state(), before)  # only the given generator is used
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(x, original) and out.data_ptr() != x.data_ptr()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", AUGMENTATIONS.names())
def test_augmentation_is_deterministic_per_generator_state(name: str) -> None:
    augment, x = AUGMENTATIONS.build(name), _batch()
    first, second, other = augment(x, _gen(5)), augment(x, _gen(5)), augment(x, _gen(6))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert not torch.equal(first, x)


@pytest.mark.parametrize("name", AUGMENTATIONS.names())
def test_augmentation_repr_names_class_and_options(name: str) -> None:
    augment = AUGMENTATIONS.build(name)
    text = repr(augment)
    assert text.startswith(type(augment).__name__ + "(")
    assert all(f"{key}=" in text for key in vars(augment))


def test_augmentation_rejects_non_batch_input() -> None:
    with pytest.raises(ValueError, match="time_mask: 'x'"):
        TimeMask()(torch.zeros(MELS, FRAMES), _gen(0))
    with pytest.raises(ValueError, match="gain: 'x'"):
        Gain()(torch.zeros(2, 1, MELS, FRAMES, dtype=torch.int64), _gen(0))


def _runs(flags: list[bool]) -> int:
    """Number of maximal runs of True."""
    return sum(1 for i, flag in enumerate(flags) if flag and (i == 0 or not flags[i - 1]))


def test_time_mask_sets_at_most_count_bands_of_max_width() -> None:
    x, value = _batch(), -7.0  # a value the Gaussian batch never takes
    out = TimeMask(max_width=5, count=2, value=value)(x, _gen(2))
    changed = (out != x).any(dim=2).any(dim=1)  # (B, frames)
    assert changed.any()
    for b in range(BATCH):
        columns = changed[b]
        assert int(columns.sum()) <= 10 and _runs(columns.tolist()) <= 2
        assert (out[b][..., columns] == value).all()
        assert torch.equal(out[b][..., ~columns], x[b][..., ~columns])
    first_masked = {int(columns.nonzero()[0]) for columns in changed if columns.any()}
    assert len(first_masked) > 1  # random starts


def test_freq_mask_sets_at_most_count_bands_of_max_width() -> None:
    x, value = _batch(), 9.0
    out = FreqMask(max_width=3, count=3, value=value)(x, _gen(3))
    changed = (out != x).any(dim=3).any(dim=1)  # (B, n_mels)
    assert changed.any()
    for b in range(BATCH):
        rows = changed[b]
        assert int(rows.sum()) <= 9 and _runs(rows.tolist()) <= 3
        assert (out[b][:, rows, :] == value).all()
        assert torch.equal(out[b][:, ~rows, :], x[b][:, ~rows, :])


def test_mask_wider_than_axis_is_capped() -> None:
    out = FreqMask(max_width=1000, count=4)(_batch(), _gen(4))
    assert out.shape == (BATCH, 1, MELS, FRAMES)
    assert (out == 0).all(dim=3).all(dim=1).any()  # some bins masked, and no index error past n_mels


def test_gain_adds_one_bounded_offset_per_example() -> None:
    x = _batch()
    offsets = Gain(max_offset=0.3)(x, _gen(5)) - x
    per_example = offsets.mean(dim=(1, 2, 3))
    assert torch.allclose(offsets, per_example[:, None, None, None].expand_as(offsets), atol=1e-6)
    assert (per_example.abs() <= 0.3 + 1e-6).all()
    assert (per_example < 0).any() and (per_example > 0).any()
    assert per_example.unique().numel() == BATCH


def test_time_shift_is_a_bounded_roll_per_example() -> None:
    x = _batch()
    out = TimeShift(max_fraction=0.2)(x, _gen(6))
    bound = round(0.2 * FRAMES)
    shifts = []
    for b in range(BATCH):
        matches = [k for k in range(-bound, bound + 1) if torch.equal(out[b], torch.roll(x[b], k, dims=-1))]
        assert len(matches) == 1
        shifts.extend(matches)
    assert len(set(shifts)) > 1


def test_noise_is_additive_with_bounded_per_example_std() -> None:
    x = _batch()
    noise = AdditiveNoise(max_std=0.1)(x, _gen(7)) - x
    stds = noise.std(dim=(1, 2, 3))
    assert (stds <= 0.1 * 1.15).all() and (stds > 0).all()
    assert stds.min() < 0.05 < stds.max()  # σ drawn per example, not always max_std
    assert noise.mean().abs() < 0.02


def test_time_crop_full_fraction_is_identity() -> None:
    x = _batch()
    assert torch.allclose(RandomTimeCrop(min_fraction=1.0)(x, _gen(8)), x, atol=1e-6)


def test_time_crop_is_a_linear_resize_of_a_long_enough_crop() -> None:
    x = _batch()
    out = RandomTimeCrop(min_fraction=0.6)(x, _gen(9))
    crops = []
    for b in range(BATCH):
        found = [
            (length, start)
            for length in range(math.ceil(0.6 * FRAMES), FRAMES + 1)
            for start in range(FRAMES - length + 1)
            if torch.allclose(
                out[b],
                F.interpolate(x[b, ..., start : start + length], size=FRAMES, mode="linear", align_corners=False),
                atol=1e-5,
            )
        ]
        assert found, f"example {b} is no linear resize of a crop of >= 60% of the frames"
        crops.append(found[0])
    assert any(length < FRAMES for length, _ in crops) and any(start > 0 for _, start in crops)


@pytest.mark.parametrize(
    ("name", "options", "option"),
    [
        ("time_crop", {"min_fraction": 0.0}, "min_fraction"),
        ("time_crop", {"min_fraction": 1.5}, "min_fraction"),
        ("time_mask", {"max_width": -1}, "max_width"),
        ("time_mask", {"count": 0}, "count"),
        ("freq_mask", {"max_width": 2.5}, "max_width"),
        ("freq_mask", {"value": float("nan")}, "value"),
        ("gain", {"max_offset": -0.1}, "max_offset"),
        ("noise", {"max_std": float("inf")}, "max_std"),
        ("time_shift", {"max_fraction": 1.5}, "max_fraction"),
        ("time_shift", {"max_fraction": True}, "max_fraction"),
    ],
)
def test_bad_option_raises_naming_it(name: str, options: dict[str, Any], option: str) -> None:
    with pytest.raises(ValueError, match=f"{name}: '{option}' must be"):
        AUGMENTATIONS.build(name, **options)
    with pytest.raises(ValueError, match=f"'{option}'"):
        build_augmenter([{"name": name, **options}])


def test_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        Gain(0.5)  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------------------
# Pipelines


def test_pipeline_p0_is_identity_and_p1_always_applies() -> None:
    x = _batch()
    assert torch.equal(build_augmenter([{"name": "gain", "p": 0.0, "max_offset": 1.0}])(x, _gen(0)), x)
    changed = build_augmenter([{"name": "gain", "p": 1.0, "max_offset": 1.0}])(x, _gen(0)) != x
    assert changed.flatten(1).all(dim=1).all()


def test_pipeline_applies_each_step_to_a_per_example_subset() -> None:
    x = torch.randn(32, 1, MELS, FRAMES, generator=_gen(1))
    out = build_augmenter([{"name": "gain", "p": 0.5}])(x, _gen(10))
    changed = (out != x).flatten(1).any(dim=1)
    assert 0 < int(changed.sum()) < 32
    assert torch.equal(out[~changed], x[~changed])
    offsets = (out - x)[changed]
    assert torch.allclose(offsets, offsets.mean(dim=(1, 2, 3), keepdim=True).expand_as(offsets), atol=1e-6)


def test_pipeline_draw_order_is_bernoulli_then_augmentation() -> None:
    x = _batch()
    specs = [{"name": "gain", "max_offset": 0.4}, {"name": "time_shift", "p": 1.0, "max_fraction": 0.1}]
    generator = _gen(11)
    torch.rand(BATCH, generator=generator)
    expected = Gain(max_offset=0.4)(x, generator)
    torch.rand(BATCH, generator=generator)
    expected = TimeShift(max_fraction=0.1)(expected, generator)
    assert torch.equal(build_augmenter(specs)(x, _gen(11)), expected)


def test_default_pipeline_runs_deterministically() -> None:
    pipeline, x = build_augmenter(DEFAULT_AUGMENT), _batch()
    original = x.clone()
    first = pipeline(x, _gen(12))
    assert torch.equal(first, pipeline(x, _gen(12)))
    assert not torch.equal(first, pipeline(x, _gen(13)))
    assert torch.equal(x, original) and first.shape == x.shape and first.dtype == x.dtype
    assert len(pipeline) == len(DEFAULT_AUGMENT)
    assert [type(a) for a, _ in pipeline.steps] == [RandomTimeCrop, Gain, TimeMask, FreqMask, AdditiveNoise]


def test_empty_pipeline_returns_a_copy() -> None:
    pipeline, x = AugmentPipeline([]), _batch()
    out = pipeline(x, _gen(0))
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    assert len(pipeline) == 0 and repr(pipeline) == "AugmentPipeline()"


def test_pipeline_repr_lists_steps_in_order() -> None:
    text = repr(build_augmenter([{"name": "gain", "p": 0.8}, {"name": "time_mask", "max_width": 3}]))
    assert text.index("p=0.8: Gain(max_offset=0.5)") < text.index("p=1: TimeMask(max_width=3, count=1, value=0.0)")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"name": "gain", "p": -0.1}, r"augment\[1\]: 'p' must be in \[0, 1\]. Got -0.1."),
        ({"name": "gain", "p": 1.5}, r"augment\[1\]: 'p' must be in \[0, 1\]"),
        ({"name": "gain", "p": "0.5"}, r"augment\[1\]: 'p' must be in \[0, 1\]"),
        ({"name": "reverb"}, "Unknown augmentation 'reverb'"),
        ({"p": 0.5}, r"augment\[1\]: 'name'"),
        ({"name": "gain", "max_ofset": 0.1}, r"augment\[1\]: .*'gain'.*max_ofset"),
    ],
)
def test_pipeline_rejects_bad_spec(spec: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_augmenter([{"name": "noise"}, spec])
