"""Self-supervised objectives: NT-Xent (SimCLR), Barlow Twins, BYOL and audio clip order prediction (ACOP).

Pure functions of embeddings (and, for ACOP, of log-mel batches); the encoders, projectors and predictors that
produce those embeddings live with the methods.

- :func:`nt_xent`: SimCLR's normalised temperature-scaled cross entropy (Chen, Kornblith, Norouzi, Hinton,
  ICML 2020, arXiv:2002.05709, Eq. 1). For the 2N views ``u_1 .. u_2N`` of a batch (``z1`` then ``z2``), with
  ``sim(u, v) = u·v / (‖u‖ ‖v‖)`` and ``pos(i)`` the other view of the example of anchor ``i``::

      ℓ_i = -log( exp(sim(u_i, u_pos(i)) / τ) / Σ_{k ≠ i} exp(sim(u_i, u_k) / τ) ),   L = (1 / 2N) Σ_i ℓ_i

  so each anchor has one positive and 2N − 2 negatives (itself excluded).
- :func:`barlow_twins_loss`: Barlow Twins (Zbontar, Jing, Misra, LeCun, Deny, ICML 2021, arXiv:2103.03230,
  Eq. 1-2). Each embedding dimension is standardised over the batch, as ``BatchNorm1d(affine=False)`` in training
  mode does in the reference code (biased variance, ``eps`` inside the square root), then::

      C_ij = (1 / N) Σ_b ẑ1_bi ẑ2_bj,   L = Σ_i (1 − C_ii)² + λ Σ_i Σ_{j ≠ i} C_ij²

- :func:`byol_loss`: BYOL's regression loss (Grill et al., NeurIPS 2020, arXiv:2006.07733, Eq. 2) between the
  online prediction ``p`` and the target projection ``z`` (no gradient flows into the target)::

      L = (1 / N) Σ_b ‖p̄_b − z̄_b‖² = (1 / N) Σ_b (2 − 2 · p_b·z_b / (‖p_b‖ ‖z_b‖))

  The paper symmetrises by swapping the two views; the caller sums both directions.
- ACOP, audio clip order prediction, the audio analogue of VCOP (Xu, Xiao, Zhao, Shao, Xie, Zhuang,
  "Self-supervised Spatiotemporal Learning via Video Clip Order Prediction", CVPR 2019): a log-mel excerpt is cut
  into ``n`` consecutive non-overlapping clips along time (:func:`split_clips`), the clips are shuffled by one of
  the ``n!`` orders (:func:`shuffle_clips`) and the model predicts which one, an ``n!``-way classification whose
  class ``k`` is the ``k``-th order of :func:`permutations` (lexicographic)::

      shuffled[b, i] = clips[b, permutations(n)[labels[b]][i]]

  :func:`valid_frames` finds the span of an example that is not padding, so that the clips are cut from the real
  audio only (``pad: end`` / ``center`` pad a short clip with zeros, whose log-mel frames are constant).
"""

from __future__ import annotations

import itertools
import math
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MAX_CLIPS",
    "barlow_twins_loss",
    "byol_loss",
    "nt_xent",
    "permutations",
    "shuffle_clips",
    "split_clips",
    "unshuffle_clips",
    "valid_frames",
]

MAX_CLIPS = 6
"""Largest clip count for ACOP: 6! = 720 order classes (7! = 5040 would be an unreasonable classifier)."""


def _check_pair(where: str, a: Tensor, b: Tensor, names: tuple[str, str], min_rows: int) -> None:
    """Raise unless ``a`` and ``b`` are 2-D tensors of equal shape with at least ``min_rows`` rows."""
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(
            f"{where}: '{names[0]}' and '{names[1]}' must be 2-D tensors of equal shape (N, d). "
            f"Got {tuple(a.shape)!r} and {tuple(b.shape)!r}."
        )
    if a.shape[0] < min_rows:
        raise ValueError(f"{where}: 'N' (batch size) must be >= {min_rows}. Got {a.shape[0]!r}.")


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent loss of two views of a batch (Chen et al. 2020, Eq. 1).

    Parameters
    ----------
    z1, z2 : Tensor, shape (N, d)
        Projections of the two views; row ``b`` of ``z1`` and row ``b`` of ``z2`` are the positive pair. Rows are
        L2-normalised here, so their scale does not matter.
    temperature : float
        τ > 0.

    Returns
    -------
    Tensor, shape ()
        Mean of ``ℓ_i`` over the 2N anchors (see the module docstring).
    """
    _check_pair("nt_xent", z1, z2, ("z1", "z2"), min_rows=2)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"nt_xent: 'temperature' must be finite and > 0. Got {temperature!r}.")
    n = z1.shape[0]
    views = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = views @ views.T / temperature
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(self_pairs, float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(logits.device)
    return F.cross_entropy(logits, positives)


def _standardise(z: Tensor, eps: float) -> Tensor:
    """``(z − mean) / sqrt(var + eps)`` per column, biased variance (``BatchNorm1d(affine=False)``, training)."""
    mean = z.mean(dim=0)
    var = z.var(dim=0, correction=0)
    return (z - mean) / torch.sqrt(var + eps)


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float, eps: float = 1e-5) -> Tensor:
    """Barlow Twins redundancy-reduction loss (Zbontar et al. 2021, Eq. 1).

    Parameters
    ----------
    z1, z2 : Tensor, shape (N, d)
        Embeddings of the two views, N >= 2.
    lambd : float
        λ >= 0, weight of the off-diagonal (redundancy reduction) term; the paper uses 5e-3.
    eps : float
        >= 0, added to the per-dimension variance before the square root (BatchNorm's default).

    Returns
    -------
    Tensor, shape ()
        ``Σ_i (1 − C_ii)² + λ Σ_{i ≠ j} C_ij²`` for the cross-correlation matrix ``C`` (d, d).
    """
    _check_pair("barlow_twins_loss", z1, z2, ("z1", "z2"), min_rows=2)
    if not (math.isfinite(lambd) and lambd >= 0):
        raise ValueError(f"barlow_twins_loss: 'lambd' must be finite and >= 0. Got {lambd!r}.")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"barlow_twins_loss: 'eps' must be finite and >= 0. Got {eps!r}.")
    n, d = z1.shape
    c = _standardise(z1, eps).T @ _standardise(z2, eps) / n
    diagonal = torch.diagonal(c)
    off_diagonal = c[~torch.eye(d, dtype=torch.bool, device=c.device)]
    return (1 - diagonal).pow(2).sum() + lambd * off_diagonal.pow(2).sum()


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's normalised regression loss, ``mean_b (2 − 2 cos(p_b, z_b))`` (Grill et al. 2020, Eq. 2).

    Parameters
    ----------
    p : Tensor, shape (N, d)
        Online network predictions.
    z : Tensor, shape (N, d)
        Target network projections; detached here (stop-gradient), so no gradient reaches the target.

    Returns
    -------
    Tensor, shape ()
        In [0, 4]: 0 for aligned rows, 2 for orthogonal ones, 4 for opposite ones.
    """
    _check_pair("byol_loss", p, z, ("p", "z"), min_rows=1)
    cosine = (F.normalize(p, dim=1) * F.normalize(z.detach(), dim=1)).sum(dim=1)
    return (2 - 2 * cosine).mean()


def _check_clip_count(where: str, n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MAX_CLIPS:
        raise ValueError(f"{where}: 'n' must be an int in [2, {MAX_CLIPS}] (n! order classes). Got {n!r}.")


@cache
def _orders(n: int) -> tuple[tuple[int, ...], ...]:
    return tuple(itertools.permutations(range(n)))


def _order_table(n: int, device: torch.device) -> Tensor:
    """:func:`permutations` as an int64 tensor of shape (n!, n) on ``device``."""
    return torch.tensor(_orders(n), dtype=torch.int64, device=device)


def permutations(n: int) -> list[tuple[int, ...]]:
    """All ``n!`` orders of ``range(n)`` in lexicographic order; ACOP class ``k`` is order ``k``.

    Parameters
    ----------
    n : int
        Number of clips, ``2 <= n <= 6`` (:data:`MAX_CLIPS`).

    Returns
    -------
    list of tuple of int
        ``list(itertools.permutations(range(n)))``, e.g. ``(0, 1, 2), (0, 2, 1), (1, 0, 2), ...`` for n = 3.
    """
    _check_clip_count("permutations", n)
    return list(_orders(n))


def split_clips(x: Tensor, n: int) -> Tensor:
    """Cut a log-mel batch into ``n`` consecutive, non-overlapping clips along time.

    Parameters
    ----------
    x : Tensor, shape (B, C, M, T)
        Log-mel batch (channels, mel bins, frames).
    n : int
        Number of clips, >= 1.

    Returns
    -------
    Tensor, shape (B, n, C, M, T // n)
        Clip ``i`` holds frames ``[i · L, (i + 1) · L)`` with ``L = T // n``; the last ``T mod n`` frames are
        dropped. A view of ``x``.
    """
    if x.dim() != 4:
        raise ValueError(f"split_clips: 'x' must be a 4-D tensor (B, C, M, T). Got shape {tuple(x.shape)!r}.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"split_clips: 'n' must be an int >= 1. Got {n!r}.")
    frames = x.shape[-1]
    length = frames // n
    if length < 1:
        raise ValueError(f"split_clips: 'T // n' (frames per clip) must be >= 1. Got {frames!r} // {n!r}.")
    return x[..., : n * length].unflatten(-1, (n, length)).movedim(-2, 1)


def valid_frames(x: Tensor) -> tuple[Tensor, Tensor]:
    """The span of frames of each example that is not padding: from its first to its last non-padding frame.

    A padding frame is one whose every value (all channels and mel bins) equals the example's minimum. That is
    what ``features.pad: end`` and ``center`` leave: the log-mel of zeros is ``log(0 + log_offset)`` in every bin,
    the smallest value a log-mel takes, and it stays the example's minimum and constant through float16 storage
    and normalisation (an affine map with std > 0). Digital silence inside a recording reads the same way, so
    leading and trailing silence is left out too; silence between sounds stays inside the span. Tiled clips
    (``pad: repeat``) have no padding frame: their span is every frame.

    Parameters
    ----------
    x : Tensor, shape (B, C, M, T)
        Log-mel batch, before any augmentation (noise or a gain would hide the padding).

    Returns
    -------
    start, stop : Tensor, shape (B,), int64
        Example ``b``'s span is frames ``[start[b], stop[b])``; ``start = stop = 0`` for an example whose
        frames are all padding (a constant example).
    """
    if x.dim() != 4:
        raise ValueError(f"valid_frames: 'x' must be a 4-D tensor (B, C, M, T). Got shape {tuple(x.shape)!r}.")
    if 0 in x.shape[1:]:
        raise ValueError(f"valid_frames: 'x' must have C, M, T >= 1. Got shape {tuple(x.shape)!r}.")
    frames = x.shape[-1]
    floor = x.flatten(1).amin(dim=1)
    real = (x != floor[:, None, None, None]).any(dim=2).any(dim=1)  # (B, T): some value above the minimum
    time = torch.arange(frames, device=x.device)
    stop = torch.where(real, time + 1, 0).amax(dim=1)
    start = torch.where(real, time, frames).amin(dim=1)
    start = torch.where(stop > 0, start, 0)
    return start, stop


def shuffle_clips(clips: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Shuffle the clips of each example by an order drawn uniformly from the ``n!`` of :func:`permutations`.

    Parameters
    ----------
    clips : Tensor, shape (B, n, ...)
        Clips in time order (:func:`split_clips`), ``2 <= n <= 6``.
    generator : torch.Generator
        Source of the B labels (one ``torch.randint`` call on the generator's device).

    Returns
    -------
    shuffled : Tensor, shape (B, n, ...)
        ``shuffled[b, i] = clips[b, permutations(n)[labels[b]][i]]``; a new tensor.
    labels : Tensor, shape (B,), int64
        The order class of each example, on the device of ``clips``.
    """
    if clips.dim() < 2:
        raise ValueError(f"shuffle_clips: 'clips' must have shape (B, n, ...). Got {tuple(clips.shape)!r}.")
    n = clips.shape[1]
    _check_clip_count("shuffle_clips", n)
    batch = clips.shape[0]
    labels = torch.randint(math.factorial(n), (batch,), generator=generator, device=generator.device)
    labels = labels.to(clips.device)
    orders = _order_table(n, clips.device)[labels]
    rows = torch.arange(batch, device=clips.device).unsqueeze(1)
    return clips[rows, orders], labels


def unshuffle_clips(shuffled: Tensor, labels: Tensor) -> Tensor:
    """Undo :func:`shuffle_clips`: put the clips of each example back in time order.

    Parameters
    ----------
    shuffled : Tensor, shape (B, n, ...)
        Shuffled clips, ``2 <= n <= 6``.
    labels : Tensor, shape (B,), integer
        Order class of each example, in ``[0, n!)``.

    Returns
    -------
    Tensor, shape (B, n, ...)
        ``clips`` with ``clips[b, permutations(n)[labels[b]][i]] = shuffled[b, i]``; a new tensor.
    """
    if shuffled.dim() < 2:
        raise ValueError(f"unshuffle_clips: 'shuffled' must have shape (B, n, ...). Got {tuple(shuffled.shape)!r}.")
    n = shuffled.shape[1]
    _check_clip_count("unshuffle_clips", n)
    classes = math.factorial(n)
    if labels.shape != shuffled.shape[:1] or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"unshuffle_clips: 'labels' must be an integer tensor of shape {tuple(shuffled.shape[:1])!r}. "
            f"Got shape {tuple(labels.shape)!r}, dtype {labels.dtype}."
        )
    outside = labels[(labels < 0) | (labels >= classes)]
    if outside.numel():
        raise ValueError(f"unshuffle_clips: 'labels' must be in [0, {classes}). Got {outside.tolist()!r}.")
    labels = labels.to(device=shuffled.device, dtype=torch.int64)
    inverse = torch.argsort(_order_table(n, shuffled.device)[labels], dim=1)
    rows = torch.arange(shuffled.shape[0], device=shuffled.device).unsqueeze(1)
    return shuffled[rows, inverse]
