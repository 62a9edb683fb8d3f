"""Audio-visual data: AV-MNIST-style pairs of spoken and handwritten digits, and a generic AV manifest.

AV-MNIST style (Vielzeuf et al., 2018, arXiv:1808.07275; used by FedMultimodal and ModalityMirror): every spoken
digit is paired with a handwritten image of the same digit. Here the images are scikit-learn's 8x8 digits
(:func:`digit_images`, offline); :func:`split_images` splits them into a train and a test pool, and
:func:`pair_by_label` draws, for every audio row, an image of the same label from the pool of the row's split.
As in AV-MNIST, :func:`keep_pca_energy` first reduces the images to a share of their PCA energy (fitted on the
train pool), so that the visual modality helps without being sufficient alone.

Missing modality: :func:`video_clients` chooses the clients that keep the visual modality, either exactly
``round(missing_rate · K)`` without video (``"exact"``) or each client independently (``"bernoulli"``, as
FedMultimodal does); the draws live in :data:`VIDEO_DRAWS`.

Real AV data comes as a CSV manifest (:func:`read_av_manifest`) with columns ``id, audio_path, visual_path,
label`` and the optional ``speaker`` and ``split``; :func:`load_visual` stacks the ``.npy`` visual arrays and
:func:`audio_manifest_rows` turns the audio half into ordinary :class:`~fedcore.data.manifest.ManifestRow` rows.
"""

from __future__ import annotations

import csv
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedcore.data.manifest import SPLITS, ManifestRow

__all__ = [
    "AV_MANIFEST_COLUMNS",
    "VIDEO_DRAWS",
    "AVManifestRow",
    "PCAEnergy",
    "audio_manifest_rows",
    "digit_images",
    "keep_pca_energy",
    "load_visual",
    "pair_by_label",
    "read_av_manifest",
    "split_images",
    "video_clients",
]

AV_MANIFEST_COLUMNS: tuple[str, ...] = ("id", "audio_path", "visual_path", "label")
"""Required columns of an AV manifest; ``speaker`` (default ``""``) and ``split`` (default ``"train"``) are
optional."""


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


# --------------------------------------------------------------------------------------------------------------
# AV-MNIST-style digits
# --------------------------------------------------------------------------------------------------------------


def digit_images() -> tuple[np.ndarray, list[str]]:
    """Load scikit-learn's handwritten digits (1797 images of 8x8 pixels, shipped with scikit-learn).

    Returns
    -------
    images : numpy.ndarray, shape (n, 1, 8, 8), float32
        Pixels scaled to ``[0, 1]`` (the raw values 0..16 divided by 16).
    labels : list of str
        Label name of each image, ``"0"`` to ``"9"``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (np.asarray(digits.images, dtype=np.float32) / np.float32(16.0))[:, None, :, :]
    labels = [str(int(target)) for target in digits.target]
    return images, labels


def split_images(labels: Sequence[str], test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split image positions into a train pool and a test pool, stratified by label.

    Classes are processed in sorted order; within a class the positions are permuted by one generator
    ``numpy.random.default_rng(seed)`` and the first ``round(test_fraction · n_c)`` (half rounds up, clipped to
    ``1..n_c-1``) go to the test pool, so both pools hold every class.

    Parameters
    ----------
    labels : sequence of str
        Label of every image.
    test_fraction : float
        Test share, ``0 < test_fraction < 1``.
    seed : int
        Seed of the permutations.

    Returns
    -------
    train, test : numpy.ndarray, int64
        Sorted, disjoint positions into ``labels``; together they cover every position.

    Raises
    ------
    ValueError
        Bad ``test_fraction`` or ``seed``, no labels, or a class with fewer than 2 images.
    """
    if not _is_real(test_fraction) or not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"split_images: 'test_fraction' must be a number > 0 and < 1. Got {test_fraction!r}.")
    if not _is_int(seed):
        raise ValueError(f"split_images: 'seed' must be an int. Got {seed!r}.")
    names = np.asarray([str(label) for label in labels])
    if names.size == 0:
        raise ValueError("split_images: 'labels' must not be empty. Got [].")
    classes, counts = np.unique(names, return_counts=True)
    small = [str(c) for c, n in zip(classes, counts, strict=True) if n < 2]
    if small:
        raise ValueError(
            f"split_images: every class must have >= 2 images (one per pool). Got fewer for {', '.join(small)}. "
            "Fix: drop these classes or add images."
        )
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for label in classes:
        members = np.flatnonzero(names == label)
        take = min(max(_round_half_up(float(test_fraction) * len(members)), 1), len(members) - 1)
        test.append(rng.permutation(members)[:take])
    test_pool = np.sort(np.concatenate(test)).astype(np.int64)
    train_pool = np.setdiff1d(np.arange(len(names), dtype=np.int64), test_pool, assume_unique=True)
    return train_pool.astype(np.int64), test_pool


def pair_by_label(
    audio_labels: Sequence[str],
    audio_splits: Sequence[str],
    image_labels: Sequence[str],
    pools: Mapping[str, np.ndarray],
    seed: int,
) -> np.ndarray:
    """Pair every audio row with a random image of the same label from the pool of the row's split.

    Rows are grouped by ``(split, label)``; the groups are drawn in sorted order from one generator
    ``numpy.random.default_rng(seed)``, each row of a group (in row order) getting an image drawn uniformly, with
    replacement, from the sorted positions of ``pools[split]`` whose label is ``label``.

    Parameters
    ----------
    audio_labels : sequence of str
        Label of every audio row.
    audio_splits : sequence of str
        Split of every audio row (a key of ``pools``).
    image_labels : sequence of str
        Label of every image.
    pools : mapping of str to numpy.ndarray
        Image positions allowed for each split, e.g. ``{"train": train_pool, "test": test_pool}``.
    seed : int
        Seed of the draws.

    Returns
    -------
    numpy.ndarray, shape (n_audio,), int64
        Image position of each audio row; ``image_labels[result[i]] == audio_labels[i]``.

    Raises
    ------
    ValueError
        Lengths differ, a split of the audio has no pool, a pool position is out of range, or a label of the
        audio has no image of that label in its split's pool.
    """
    if not _is_int(seed):
        raise ValueError(f"pair_by_label: 'seed' must be an int. Got {seed!r}.")
    labels = [str(label) for label in audio_labels]
    splits = [str(split) for split in audio_splits]
    if len(labels) != len(splits):
        raise ValueError(
            f"pair_by_label: 'audio_splits' must have one entry per audio row ({len(labels)}). Got {len(splits)}."
        )
    image_names = np.asarray([str(label) for label in image_labels])
    missing_pools = sorted(set(splits) - set(pools))
    if missing_pools:
        raise ValueError(
            f"pair_by_label: 'pools' must have a pool for every split of the audio. Got none for "
            f"{', '.join(missing_pools)} (pools: {', '.join(sorted(pools)) or 'none'})."
        )
    groups: dict[tuple[str, str], list[int]] = {}
    for row, key in enumerate(zip(splits, labels, strict=True)):
        groups.setdefault(key, []).append(row)
    candidates: dict[tuple[str, str], np.ndarray] = {}
    for split in sorted(set(splits)):
        pool = np.sort(np.asarray(pools[split], dtype=np.int64).reshape(-1))
        if pool.size and (pool[0] < 0 or pool[-1] >= len(image_names)):
            raise ValueError(
                f"pair_by_label: pool {split!r} must hold positions in 0..{len(image_names) - 1}. "
                f"Got {int(pool[0])}..{int(pool[-1])}."
            )
        pool_labels = image_names[pool]
        wanted = sorted(label for s, label in groups if s == split)
        absent = [label for label in wanted if not np.any(pool_labels == label)]
        if absent:
            raise ValueError(
                f"pair_by_label: pool {split!r} must hold an image of every audio label. Got none for "
                f"{', '.join(absent)}. Fix: check the image labels or the split of the images."
            )
        for label in wanted:
            candidates[(split, label)] = pool[pool_labels == label]
    rng = np.random.default_rng(seed)
    result = np.empty(len(labels), dtype=np.int64)
    for key in sorted(groups):
        rows = groups[key]
        result[rows] = rng.choice(candidates[key], size=len(rows), replace=True)
    return result


@dataclass(frozen=True)
class PCAEnergy:
    """Images reduced to a share of their PCA energy by :func:`keep_pca_energy`.

    Attributes
    ----------
    images : numpy.ndarray, float32
        The reconstructions ``x'``, one per input image, of the input's shape.
    components : int
        ``k``, the number of leading principal components kept (``dims`` when ``energy`` is 1).
    energy : float
        The share of the train pool's variance the ``k`` components carry, ``Σ_{i≤k} λ_i / Σ_i λ_i`` (>= the
        requested share; 1.0 when every component is kept).
    dims : int
        ``D``, the number of pixels of one image (the number of components there are).
    """

    images: np.ndarray
    components: int
    energy: float
    dims: int


_ENERGY_TOLERANCE = 1e-9
"""Slack of the ``>= e`` test of :func:`keep_pca_energy`, so that SVD rounding does not add a component."""


def keep_pca_energy(images: np.ndarray, fit_pool: np.ndarray, energy: float) -> PCAEnergy:
    """Keep only the leading principal components of images that carry a share ``energy`` of the variance.

    AV-MNIST (Vielzeuf et al., 2018) degrades its MNIST images to 25% of their PCA energy so that the visual
    modality informs the label without deciding it alone (issue 21: 8x8 digits are otherwise ~0.99 separable).
    With every image flattened to a vector ``x`` of ``D`` pixels (float64), the PCA is fitted on the images of
    ``fit_pool`` only (the train pool): their mean ``μ`` and the right singular vectors of the centred matrix
    (``numpy.linalg.svd``, no randomness) give the principal directions ``u_1..u_D`` with variances
    ``λ_1 >= … >= λ_D`` (``s_i² / (n − 1)``, zero past the rank). Every image, of any pool, becomes

        x' = μ + U_k U_kᵀ (x − μ),    k = min{ k : Σ_{i≤k} λ_i / Σ_{i≤D} λ_i >= e },

    where ``U_k`` holds ``u_1..u_k`` as columns (the test allows ``1e-9`` of slack for SVD rounding). ``e = 1``
    keeps all ``D`` directions (``k = D``, ``U_D U_Dᵀ = I``), so the images come back unchanged, even in the
    directions the train pool does not vary in. The result depends on the directions' span only, not on their
    signs, so it is deterministic.

    Parameters
    ----------
    images : numpy.ndarray, shape (n, ...)
        Images, any numeric dtype; every image is flattened to its ``D`` values.
    fit_pool : numpy.ndarray of int
        Positions of the images the PCA is fitted on (e.g. the train pool of :func:`split_images`); at least 2.
    energy : float
        Share ``e`` of the variance kept, ``0 < e <= 1``.

    Returns
    -------
    PCAEnergy
        The reconstructions (float32, the shape of ``images``), ``k``, the share actually kept and ``D``.

    Raises
    ------
    ValueError
        ``energy`` not a number in ``(0, 1]`` (bools and NaN included), images with fewer than 2 dimensions or
        non-finite values, a pool with fewer than 2 distinct positions or one out of range, or (``e < 1``) a
        pool whose images are all equal.
    """
    if not _is_real(energy) or not 0.0 < float(energy) <= 1.0:  # NaN fails both comparisons
        raise ValueError(
            f"keep_pca_energy: 'energy' must be a number > 0 and <= 1 (the share of PCA variance kept; 1: the images "
            f"unchanged). Got {energy!r}."
        )
    array = np.asarray(images)
    if array.ndim < 2 or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ValueError(
            f"keep_pca_energy: 'images' must be a numeric array of shape (n, ...) with n images. "
            f"Got dtype {array.dtype}, shape {array.shape}."
        )
    flat = array.reshape(array.shape[0], -1).astype(np.float64)
    if not np.all(np.isfinite(flat)):
        raise ValueError("keep_pca_energy: 'images' must hold finite values. Got NaN or infinity.")
    pool = np.unique(np.asarray(fit_pool).reshape(-1))
    if not np.issubdtype(pool.dtype, np.integer) or pool.size < 2:
        raise ValueError(
            f"keep_pca_energy: 'fit_pool' must hold at least 2 distinct int positions. Got {pool.size} of dtype "
            f"{pool.dtype}."
        )
    if pool[0] < 0 or pool[-1] >= flat.shape[0]:
        raise ValueError(
            f"keep_pca_energy: 'fit_pool' must hold positions in 0..{flat.shape[0] - 1}. "
            f"Got {int(pool[0])}..{int(pool[-1])}."
        )
    dims = flat.shape[1]
    if float(energy) == 1.0:
        return PCAEnergy(array.astype(np.float32), dims, 1.0, dims)
    train = flat[pool]
    mean = train.mean(axis=0)
    _, singular, directions = np.linalg.svd(train - mean, full_matrices=True)
    variances = np.zeros(dims)
    variances[: singular.size] = singular.astype(np.float64) ** 2 / (train.shape[0] - 1)
    total = float(variances.sum())
    if not total > 0.0:
        raise ValueError(
            "keep_pca_energy: the images of 'fit_pool' must not all be equal (no variance to keep a share of). "
            "Fix: fit on a pool of differing images, or set the energy to 1."
        )
    shares = np.cumsum(variances) / total
    k = int(np.argmax(shares >= float(energy) - _ENERGY_TOLERANCE)) + 1
    basis = directions[:k].T  # (D, k): U_k
    reconstructed = mean + ((flat - mean) @ basis) @ basis.T
    return PCAEnergy(reconstructed.reshape(array.shape).astype(np.float32), k, float(min(shares[k - 1], 1.0)), dims)


# --------------------------------------------------------------------------------------------------------------
# Missing visual modality
# --------------------------------------------------------------------------------------------------------------


def _exact_draw(num_clients: int, missing_rate: float, rng: np.random.Generator) -> np.ndarray:
    """Mask of clients with video: exactly ``round(missing_rate · K)`` (half up) lack it, by a permutation."""
    has_video = np.ones(num_clients, dtype=bool)
    has_video[rng.permutation(num_clients)[: _round_half_up(missing_rate * num_clients)]] = False
    return has_video


def _bernoulli_draw(num_clients: int, missing_rate: float, rng: np.random.Generator) -> np.ndarray:
    """Mask of clients with video: each client lacks it independently with probability ``missing_rate``."""
    return ~(rng.random(num_clients) < missing_rate)


VIDEO_DRAWS: dict[str, Callable[[int, float, np.random.Generator], np.ndarray]] = {
    "exact": _exact_draw,
    "bernoulli": _bernoulli_draw,
}
"""Ways to choose the clients that keep video: ``(num_clients, missing_rate, rng) -> bool mask (has video)``."""


def video_clients(num_clients: int, missing_rate: float, seed: int, draw: str = "exact") -> list[int]:
    """Choose the clients that have the visual modality.

    Parameters
    ----------
    num_clients : int
        Number of clients ``K >= 1``; ids are ``0..K-1``.
    missing_rate : float
        Share of clients without video, ``0 <= missing_rate <= 1``.
    seed : int
        Seed of ``numpy.random.default_rng``.
    draw : str
        A key of :data:`VIDEO_DRAWS`: ``"exact"`` (exactly ``round(missing_rate · K)``, half up, lack video) or
        ``"bernoulli"`` (each client lacks video with probability ``missing_rate``).

    Returns
    -------
    list of int
        Sorted ids of the clients that have video.

    Raises
    ------
    ValueError
        Bad ``num_clients``, ``missing_rate``, ``seed`` or ``draw``.
    """
    if not _is_int(num_clients) or num_clients < 1:
        raise ValueError(f"video_clients: 'num_clients' must be an int >= 1. Got {num_clients!r}.")
    if not _is_real(missing_rate) or not 0.0 <= float(missing_rate) <= 1.0:
        raise ValueError(f"video_clients: 'missing_rate' must be a number in [0, 1]. Got {missing_rate!r}.")
    if not _is_int(seed):
        raise ValueError(f"video_clients: 'seed' must be an int. Got {seed!r}.")
    if draw not in VIDEO_DRAWS:
        raise ValueError(f"video_clients: 'draw' must be one of {', '.join(VIDEO_DRAWS)}. Got {draw!r}.")
    mask = VIDEO_DRAWS[draw](int(num_clients), float(missing_rate), np.random.default_rng(seed))
    return [int(i) for i in np.flatnonzero(mask)]


# --------------------------------------------------------------------------------------------------------------
# Generic AV manifest
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AVManifestRow:
    """One audio-visual sample of an AV manifest.

    Attributes
    ----------
    id : str
        Unique id.
    audio_path : Path
        Audio file (relative paths of the CSV are resolved against the manifest's folder).
    visual_path : Path
        ``.npy`` array of the visual modality (image or frames), resolved the same way.
    label : str
        Class name.
    speaker : str
        Speaker or group id (``""`` when the manifest has none).
    split : str
        ``"train"`` or ``"test"``.
    """

    id: str
    audio_path: Path
    visual_path: Path
    label: str
    speaker: str
    split: str


def read_av_manifest(path: str | Path) -> list[AVManifestRow]:
    """Read an AV manifest CSV.

    Columns ``id, audio_path, visual_path, label`` are required; ``speaker`` (default ``""``) and ``split``
    (default ``"train"``, else ``"train"`` or ``"test"``) are optional, an empty cell taking the default.
    Relative paths are resolved against the folder holding the manifest; files are not opened here.

    Parameters
    ----------
    path : str or Path
        The CSV file.

    Returns
    -------
    list of AVManifestRow
        In file order.

    Raises
    ------
    ValueError
        Missing file, missing columns, an empty required cell, a bad split, a duplicate id, or no rows; the
        message names the file and, for a row, its line number.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"read_av_manifest: 'path' must be an existing AV manifest CSV. Got {str(path)!r}.")
    folder = path.parent
    rows: list[AVManifestRow] = []
    seen: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [column for column in AV_MANIFEST_COLUMNS if column not in header]
        if missing:
            raise ValueError(
                f"read_av_manifest: the columns of '{path}' (line 1) must include {', '.join(AV_MANIFEST_COLUMNS)}. "
                f"Got {list(header)!r} (missing {', '.join(missing)})."
            )
        for record in reader:
            line = reader.line_num
            empty = [column for column in AV_MANIFEST_COLUMNS if not (record.get(column) or "").strip()]
            if empty:
                raise ValueError(
                    f"read_av_manifest: {', '.join(repr(c) for c in empty)} must not be empty ({path}, line {line}). "
                    f"Got {record!r}."
                )
            split = record.get("split") or "train"
            if split not in SPLITS:
                raise ValueError(
                    f"read_av_manifest: 'split' must be one of {', '.join(SPLITS)} ({path}, line {line}). "
                    f"Got {split!r}."
                )
            row_id = record["id"]
            if row_id in seen:
                raise ValueError(
                    f"read_av_manifest: 'id' must be unique ({path}, line {line}). "
                    f"Got {row_id!r}, already on line {seen[row_id]}."
                )
            seen[row_id] = line
            rows.append(
                AVManifestRow(
                    id=row_id,
                    audio_path=folder / Path(record["audio_path"]),
                    visual_path=folder / Path(record["visual_path"]),
                    label=record["label"],
                    speaker=record.get("speaker") or "",
                    split=split,
                )
            )
    if not rows:
        raise ValueError(f"read_av_manifest: '{path}' must hold at least one row. Got only the header (line 1).")
    return rows


def load_visual(paths: Sequence[str | Path]) -> np.ndarray:
    """Load and stack the ``.npy`` visual arrays of several samples.

    An ``(H, W)`` image becomes ``(1, H, W)``; ``(C, H, W)`` images and ``(T, C, H, W)`` frames are kept.

    Parameters
    ----------
    paths : sequence of str or Path
        ``.npy`` files (loaded with ``allow_pickle=False``), all of one shape after the step above.

    Returns
    -------
    numpy.ndarray, shape (n, ...), float32
        The stacked arrays.

    Raises
    ------
    ValueError
        No paths, an unreadable or non-numeric file, an array with fewer than 2 or more than 4 dimensions, or
        a shape that differs from the first file's (the message names the file and both shapes).
    """
    if isinstance(paths, (str, Path)):
        raise TypeError(f"load_visual: 'paths' must be a sequence of paths. Got a single path {str(paths)!r}.")
    if len(paths) == 0:
        raise ValueError("load_visual: 'paths' must not be empty. Got [].")
    arrays: list[np.ndarray] = []
    first_shape: tuple[int, ...] | None = None
    for item in paths:
        file = Path(item)
        try:
            array = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"load_visual: every path must be a readable .npy array. Got {str(file)!r} ({error})."
            ) from None
        if not isinstance(array, np.ndarray):
            array.close()
            raise ValueError(f"load_visual: every path must be a .npy array, not an archive. Got {str(file)!r}.")
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise ValueError(
                f"load_visual: every array must be numeric. Got dtype {array.dtype} in {str(file)!r}."
            )
        if array.ndim == 2:
            array = array[None]
        elif array.ndim not in (3, 4):
            raise ValueError(
                f"load_visual: every array must be (H, W), (C, H, W) or (T, C, H, W). "
                f"Got shape {array.shape} in {str(file)!r}."
            )
        if first_shape is None:
            first_shape = array.shape
        elif array.shape != first_shape:
            raise ValueError(
                f"load_visual: every array must have the shape of the first, {first_shape}. "
                f"Got {array.shape} in {str(file)!r}."
            )
        arrays.append(array.astype(np.float32, copy=False))
    return np.stack(arrays).astype(np.float32, copy=False)


def audio_manifest_rows(rows: Sequence[AVManifestRow]) -> list[ManifestRow]:
    """Turn the audio half of AV rows into ordinary manifest rows, for the usual feature extraction.

    Parameters
    ----------
    rows : sequence of AVManifestRow
        Rows of :func:`read_av_manifest`.

    Returns
    -------
    list of ManifestRow
        Same order; ``path`` is ``str(audio_path)``; ``duration`` (seconds) and ``sample_rate`` (Hz) are read
        from the file header with ``soundfile.info``.

    Raises
    ------
    ValueError
        An audio file that is missing or that soundfile cannot read (the message names the id and the file).
    """
    import soundfile as sf

    result: list[ManifestRow] = []
    for row in rows:
        try:
            info = sf.info(str(row.audio_path))
        except (OSError, RuntimeError) as error:  # soundfile.LibsndfileError is a RuntimeError
            raise ValueError(
                f"audio_manifest_rows: 'audio_path' of {row.id!r} must be a readable audio file. "
                f"Got {str(row.audio_path)!r} ({error})."
            ) from None
        result.append(
            ManifestRow(
                id=row.id, path=str(row.audio_path), label=row.label, speaker=row.speaker, split=row.split,
                duration=float(info.duration), sample_rate=int(info.samplerate),
            )
        )
    return result
