"""Random augmentations of normalised log-mel batches, the views of self-supervised training.

Every augmentation maps a batch ``x`` of shape ``(B, C, n_mels, frames)`` (floating; normalised log-mel, so about
zero mean and unit variance per bin) to a *new* tensor of the same shape and dtype, draws its randomness per
example and only from the ``torch.Generator`` it is given (on the generator's device; results are moved to the
device of ``x``), so the output is a function of ``x`` and the generator state. Registry :data:`AUGMENTATIONS`:

- ``time_crop`` (:class:`RandomTimeCrop`): crop ``L`` consecutive frames, ``L`` uniform in
  ``[ceil(min_fraction · T), T]`` at a uniform start, and resize them back to ``T`` frames by linear
  interpolation; the time-axis analogue of the random resized crop of SimCLR (Chen et al., ICML 2020,
  arXiv:2002.05709) used on log-mel by BYOL-A (Niizumi et al., IJCNN 2021, arXiv:2103.06695).
- ``time_mask`` / ``freq_mask`` (:class:`TimeMask`, :class:`FreqMask`): SpecAugment masking (Park, Chan, Zhang,
  Chiu, Zoph, Cubuk, Le, Interspeech 2019, arXiv:1904.08779, §2): ``count`` masks per example, width ``w``
  uniform in ``[0, max_width]``, start uniform in ``[0, size − w]``, masked bins set to ``value`` (0, the mean of
  normalised features, by default).
- ``gain`` (:class:`Gain`): a gain change is an additive constant on a log spectrogram; add an offset uniform in
  ``[−max_offset, max_offset]`` (normalised feature units) per example.
- ``noise`` (:class:`AdditiveNoise`): add ``σ · N(0, 1)`` noise, ``σ`` uniform in ``[0, max_std]`` per example.
- ``time_shift`` (:class:`TimeShift`): roll (circularly) along time by an integer uniform in ``[−S, S]``,
  ``S = round(max_fraction · T)``.

:class:`AugmentPipeline` chains augmentations from config specs ``{"name": ..., "p": ..., **options}``; step ``i``
changes a per-example Bernoulli(``p``) subset of the batch. For each step it draws the B Bernoulli trials first,
then applies the augmentation to the whole batch and keeps its output where the trial succeeded, so the number of
draws never depends on the outcome. :data:`DEFAULT_AUGMENT` is our default pipeline for contrastive learning [A].
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedcore.registry import Registry

__all__ = [
    "AUGMENTATIONS",
    "DEFAULT_AUGMENT",
    "AdditiveNoise",
    "AugmentPipeline",
    "Augmentation",
    "FreqMask",
    "Gain",
    "RandomTimeCrop",
    "TimeMask",
    "TimeShift",
    "build_augmenter",
]


# ---------------------------------------------------------------------------------------------------------------
# Checks and draws


def _check_batch(where: str, x: Tensor) -> None:
    if x.dim() != 4 or not x.is_floating_point() or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(
            f"{where}: 'x' must be a floating 4-D tensor (batch, channels, n_mels, frames) with n_mels, frames "
            f">= 1. Got shape {tuple(x.shape)!r}, dtype {x.dtype}."
        )


def _int_option(where: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: '{name}' must be an int >= {minimum}. Got {value!r}.")
    return value


def _real_option(
    where: str, name: str, value: Any, *, low: float = -math.inf, high: float = math.inf, low_open: bool = False
) -> float:
    """``value`` as a float, required finite and in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    if isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(number := float(value)):
        if (low < number if low_open else low <= number) and number <= high:
            return number
    if math.isfinite(low) and math.isfinite(high):
        constraint = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    elif math.isfinite(low):
        constraint = f"finite and {'>' if low_open else '>='} {low:g}"
    else:
        constraint = "a finite number"
    raise ValueError(f"{where}: '{name}' must be {constraint}. Got {value!r}.")


def _uniform(generator: torch.Generator, size: tuple[int, ...], device: torch.device) -> Tensor:
    """Float32 draws from U[0, 1) made on the generator's device, moved to ``device``."""
    return torch.rand(size, generator=generator, device=generator.device).to(device)


def _integers(
    low: int, high: int, size: tuple[int, ...], generator: torch.Generator, device: torch.device
) -> Tensor:
    """Int64 draws uniform in ``[low, high]`` (both included), made on the generator's device."""
    return torch.randint(low, high + 1, size, generator=generator, device=generator.device).to(device)


def _starts(lengths: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Per entry of ``lengths``, a start uniform in ``[0, size − length]`` (int64, same shape)."""
    room = size - lengths
    starts = (_uniform(generator, tuple(lengths.shape), lengths.device) * (room + 1)).long()
    return torch.minimum(starts, room)  # u · (room + 1) may round up to room + 1 in float32


# ---------------------------------------------------------------------------------------------------------------
# Augmentations


class Augmentation(ABC):
    """A random transform of a log-mel batch; subclasses implement :meth:`apply` and are registered by name.

    Options are keyword-only constructor arguments, validated there and kept as attributes of the same name
    (they make up the ``repr``).
    """

    name: ClassVar[str] = ""
    """Registry name, also the prefix of error messages."""

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Augment ``x`` (B, C, n_mels, frames); returns a new tensor, ``x`` is not modified."""
        _check_batch(self.name, x)
        return self.apply(x, generator)

    @abstractmethod
    def apply(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Augment a checked batch, drawing every random number from ``generator``."""

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({options})"


AUGMENTATIONS: Registry[Augmentation] = Registry("augmentation")


@AUGMENTATIONS.register("time_crop")
class RandomTimeCrop(Augmentation):
    """Crop a random segment of at least ``min_fraction`` of the frames and stretch it back to full length.

    Parameters
    ----------
    min_fraction : float
        In (0, 1]; the crop length ``L`` is uniform in ``[ceil(min_fraction · T), T]``. 1 is the identity.

    Notes
    -----
    The resize is :func:`torch.nn.functional.interpolate` with ``mode="linear", align_corners=False`` applied to
    each crop, computed for the whole batch at once as a gather: output frame ``j`` reads crop position
    ``s = max((j + 0.5) · L / T − 0.5, 0)``, mixing crop frames ``floor(s)`` and ``min(floor(s) + 1, L − 1)``.
    """

    name = "time_crop"

    def __init__(self, *, min_fraction: float = 0.6) -> None:
        self.min_fraction = _real_option(self.name, "min_fraction", min_fraction, low=0.0, high=1.0, low_open=True)

    def apply(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Crop and resize each example."""
        batch, frames = x.shape[0], x.shape[-1]
        shortest = min(max(math.ceil(self.min_fraction * frames - 1e-9), 1), frames)  # guard 0.1-style float error
        lengths = _integers(shortest, frames, (batch,), generator, x.device)
        starts = _starts(lengths, frames, generator)

        target = torch.arange(frames, device=x.device, dtype=torch.float32)
        scale = lengths.unsqueeze(1).to(torch.float32) / frames
        source = ((target + 0.5) * scale - 0.5).clamp(min=0.0)  # (B, T), position inside the crop
        left = source.long()
        right = torch.minimum(left + 1, lengths.unsqueeze(1) - 1)
        weight = (source - left).to(x.dtype)[:, None, None, :]

        def frames_at(index: Tensor) -> Tensor:
            return x.gather(-1, (index + starts.unsqueeze(1))[:, None, None, :].expand_as(x))

        return (1 - weight) * frames_at(left) + weight * frames_at(right)


class _AxisMask(Augmentation):
    """SpecAugment masking along one axis (see :class:`TimeMask`)."""

    axis: ClassVar[int]
    """Axis of the batch that is masked: -1 (frames) or -2 (mel bins)."""

    def __init__(self, *, max_width: int, count: int, value: float) -> None:
        self.max_width = _int_option(self.name, "max_width", max_width, minimum=0)
        self.count = _int_option(self.name, "count", count, minimum=1)
        self.value = _real_option(self.name, "value", value)

    def apply(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Set ``count`` random bands of each example to ``value``."""
        batch, size = x.shape[0], x.shape[self.axis]
        widths = _integers(0, self.max_width, (batch, self.count), generator, x.device).clamp(max=size)
        starts = _starts(widths, size, generator)
        positions = torch.arange(size, device=x.device)
        inside = (positions >= starts.unsqueeze(-1)) & (positions < (starts + widths).unsqueeze(-1))
        shape = [batch, 1, 1, 1]
        shape[self.axis] = size
        return x.masked_fill(inside.any(dim=1).view(shape), self.value)


@AUGMENTATIONS.register("time_mask")
class TimeMask(_AxisMask):
    """SpecAugment time masking (Park et al. 2019): ``count`` bands of frames per example set to ``value``.

    Parameters
    ----------
    max_width : int
        >= 0; each band is ``w`` consecutive frames, ``w`` uniform in ``[0, max_width]`` (capped at the number of
        frames), starting uniformly in ``[0, frames − w]``. Bands may overlap.
    count : int
        >= 1, bands per example.
    value : float
        Fill value; 0 is the mean of normalised features.
    """

    name = "time_mask"
    axis = -1

    def __init__(self, *, max_width: int = 16, count: int = 1, value: float = 0.0) -> None:
        super().__init__(max_width=max_width, count=count, value=value)


@AUGMENTATIONS.register("freq_mask")
class FreqMask(_AxisMask):
    """SpecAugment frequency masking (Park et al. 2019): ``count`` bands of mel bins per example set to ``value``.

    Parameters
    ----------
    max_width : int
        >= 0; each band is ``w`` consecutive mel bins, ``w`` uniform in ``[0, max_width]`` (capped at n_mels),
        starting uniformly in ``[0, n_mels − w]``. Bands may overlap.
    count : int
        >= 1, bands per example.
    value : float
        Fill value; 0 is the mean of normalised features.
    """

    name = "freq_mask"
    axis = -2

    def __init__(self, *, max_width: int = 8, count: int = 1, value: float = 0.0) -> None:
        super().__init__(max_width=max_width, count=count, value=value)


@AUGMENTATIONS.register("gain")
class Gain(Augmentation):
    """Random gain: add one offset, uniform in ``[−max_offset, max_offset]``, to every bin of an example.

    Parameters
    ----------
    max_offset : float
        >= 0, in normalised feature units (a gain of g dB shifts a dB-scaled log-mel by g before normalisation).
    """

    name = "gain"

    def __init__(self, *, max_offset: float = 0.5) -> None:
        self.max_offset = _real_option(self.name, "max_offset", max_offset, low=0.0)

    def apply(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Shift each example by its offset."""
        offsets = (2 * _uniform(generator, (x.shape[0],), x.device) - 1) * self.max_offset
        return x + offsets.to(x.dtype)[:, None, None, None]


@AUGMENTATIONS.register("noise")
class AdditiveNoise(Augmentation):
    """Additive Gaussian noise ``σ · N(0, 1)`` with ``σ`` uniform in ``[0, max_std]`` per example.

    Parameters
    ----------
    max_std : float
        >= 0, in normalised feature units.
    """

    name = "noise"

    def __init__(self, *, max_std: float = 0.1) -> None:
        self.max_std = _real_option(self.name, "max_std", max_std, low=0.0)

    def apply(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Draw each example's σ, then the noise."""
        sigmas = (_uniform(generator, (x.shape[0],), x.device) * self.max_std).to(x.dtype)
        noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
        return x + sigmas[:, None, None, None] * noise


@AUGMENTATIONS.register("time_shift")
class TimeShift(Augmentation):
    """Circular shift along time: ``out[..., t] = x[..., (t − k) mod T]``, as :func:`torch.roll` by ``k``.

    Parameters
    ----------
    max_fraction : float
        In [0, 1]; ``k`` is uniform over the integers in ``[−S, S]``, ``S = round(max_fraction · T)``.
    """

    name = "time_shift"

    def __init__(self, *, max_fraction: float = 0.2) -> None:
        self.max_fraction = _real_option(self.name, "max_fraction", max_fraction, low=0.0, high=1.0)

    def apply(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Roll each example by its own shift."""
        batch, frames = x.shape[0], x.shape[-1]
        bound = round(self.max_fraction * frames)
        shifts = _integers(-bound, bound, (batch,), generator, x.device)
        index = (torch.arange(frames, device=x.device) - shifts.unsqueeze(1)) % frames
        return x.gather(-1, index[:, None, None, :].expand_as(x))


# ---------------------------------------------------------------------------------------------------------------
# Pipelines


def _build_step(index: int, spec: Mapping[str, Any]) -> tuple[Augmentation, float]:
    """Build step ``index`` of a pipeline from ``{"name": ..., "p": ..., **options}``."""
    where = f"augment[{index}]"
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise ValueError(f"{where}: 'name' must be a registered augmentation name string. Got {spec!r}.")
    options = dict(spec)
    name = options.pop("name")
    probability = options.pop("p", 1.0)
    factory = AUGMENTATIONS.get(name)
    valid = isinstance(probability, Real) and not isinstance(probability, bool)
    if not (valid and 0 <= probability <= 1):
        raise ValueError(f"{where}: 'p' must be in [0, 1]. Got {probability!r}.")
    accepted = list(inspect.signature(factory).parameters)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{where}: options of {name!r} must be among {accepted!r}. Got {unknown!r}.")
    return factory(**options), float(probability)


class AugmentPipeline:
    """Augmentations applied in order, each to a random subset of the batch.

    Parameters
    ----------
    specs : sequence of mapping
        One mapping per step: ``"name"`` (a name in :data:`AUGMENTATIONS`), ``"p"`` (probability that an example
        is augmented by this step, in [0, 1], default 1) and the augmentation's keyword options. Empty: the
        pipeline returns a copy of its input.
    """

    def __init__(self, specs: Sequence[Mapping[str, Any]] = ()) -> None:
        self.steps: tuple[tuple[Augmentation, float], ...] = tuple(
            _build_step(index, spec) for index, spec in enumerate(specs)
        )

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Augment ``x`` (B, C, n_mels, frames); returns a new tensor, ``x`` is not modified.

        Per step: B uniform draws decide which examples it changes (``u < p``), then the augmentation draws its own
        numbers for the whole batch.
        """
        _check_batch("augment", x)
        out = x.clone()
        for augmentation, probability in self.steps:
            chosen = _uniform(generator, (x.shape[0],), x.device) < probability
            out = torch.where(chosen[:, None, None, None], augmentation(out, generator), out)
        return out

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        if not self.steps:
            return f"{type(self).__name__}()"
        lines = "".join(f"\n    p={probability:g}: {augmentation!r}," for augmentation, probability in self.steps)
        return f"{type(self).__name__}({lines}\n)"


def build_augmenter(specs: Sequence[Mapping[str, Any]]) -> AugmentPipeline:
    """Build an :class:`AugmentPipeline` from step specs (see there); e.g. ``build_augmenter(DEFAULT_AUGMENT)``."""
    return AugmentPipeline(specs)


DEFAULT_AUGMENT: tuple[dict[str, Any], ...] = (
    {"name": "time_crop", "p": 1.0, "min_fraction": 0.6},
    {"name": "gain", "p": 0.8, "max_offset": 0.5},
    {"name": "time_mask", "p": 0.8, "max_width": 16},
    {"name": "freq_mask", "p": 0.8, "max_width": 8},
    {"name": "noise", "p": 0.5, "max_std": 0.1},
)
"""Default views for contrastive SSL on log-mel [A] (our choice): always a random time crop (SimCLR found cropping
the most important single augmentation), then a gain change, SpecAugment time and frequency masks and light noise,
each on a random share of the examples so that the two views of an example differ in several ways."""
