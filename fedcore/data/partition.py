"""Partitioners: split the training pool over clients (IID and the non-IID schemes of PAPERS.md section 7).

Schemes (registry :data:`PARTITIONERS`, built with a :class:`~fedcore.config.PartitionConfig`):

- ``iid``: one random permutation cut into ``K`` near-equal parts.
- ``dirichlet``: label skew (Hsu, Qi and Brown 2019, arXiv:1909.06335, section 3). For each class ``c`` in
  ascending order, ``p_c ~ Dir(α·1_K)``; the class's positions, in the given order, are cut at
  ``floor(cumsum(p_c)[k] · n_c)`` for ``k < K-1``, and part ``k`` goes to client ``k``. Everything is redrawn from
  the same generator until every client has ``>= min_samples`` (FedAudio's UrbanSound8K recipe,
  arXiv:2210.15707; /work/shared/BENCHMARKS.md). No rebalancing step (unlike NIID-Bench).
- ``shards``: sort by label, cut into ``K · shards_per_client`` shards, deal ``shards_per_client`` random shards
  to each client (McMahan et al., AISTATS 2017, arXiv:1602.05629, section 3), so a client sees about
  ``shards_per_client`` classes.
- ``quantity``: quantity skew; client sizes are ``q ~ Dir(α·1_K)`` shares of one shuffled pool, redrawn until
  every client has ``>= min_samples`` (Li et al., ICDE 2022, arXiv:2102.02079, "quantity-based skew").
- ``speaker``: natural split; sorted distinct speaker ids are dealt round-robin to the clients, so a speaker's
  clips never straddle clients and the mapping does not depend on row order.

- ``cross_device``: a population larger than the pool, as in cross-device FL (thousands of phones, a few
  clips each): client ``k`` draws a label mix ``p_k ~ Dir(α·1_C)`` and then ``samples_per_client`` distinct
  positions, position ``i`` with probability proportional to ``p_k[y_i] / n_{y_i}``. Clients draw independently,
  so they share positions once ``K · samples_per_client`` exceeds the pool. ``[A]``: a simulation device for
  scale (memory and time against the number of registered clients), not a claim about real data.

Every scheme returns one sorted int64 array of positions per client. The parts of every scheme but
``cross_device`` (:attr:`Partitioner.disjoint`) are disjoint and cover every position. ``max_retries`` counts
draws in all (the first included).

Sizes that cannot fit are refused before the first draw (:meth:`Partitioner.check_sizes`): more clients than rows,
``num_clients × min_samples`` above the rows (disjoint schemes), more shards than rows, more clients than speakers,
``samples_per_client`` above the rows, and, when the caller gives the memory or disk at hand, a partition whose
estimated footprint (:meth:`Partitioner.footprint`) exceeds it (``cross_device`` with ``num_clients: 1e9`` is
refused at once instead of drawing for hours).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedcore.config import PartitionConfig
from fedcore.errors import PartitionError
from fedcore.registry import Registry

__all__ = [
    "PARTITIONERS",
    "CrossDevicePartitioner",
    "DirichletPartitioner",
    "IidPartitioner",
    "PartitionFootprint",
    "Partitioner",
    "QuantityPartitioner",
    "ShardPartitioner",
    "SpeakerPartitioner",
    "client_class_counts",
    "make_partition",
    "split_holdout",
]


PARTITION_CLIENT_BYTES = 1_600
"""Peak memory of the partition stage per client (its dict, lists and JSON text), bytes; measured 1.5 kB per
client at 100,000 clients of 1 sample (CPython 3.11, numpy 2)."""
PARTITION_ENTRY_BYTES = 250
"""Peak memory of the partition stage per client-row entry (its int64 position, the Python int of the JSON list and
its JSON text), bytes; measured 140 to 220 B per entry (2,000 × 1,000 and 20,000 × 20 entries)."""
PARTITION_JSON_CLIENT_BYTES = 120
"""``partition.json`` bytes per client (its keys and brackets, indent 2)."""
PARTITION_JSON_ENTRY_BYTES = 20
"""``partition.json`` bytes per entry (a row number on its own indented line; measured 14 to 18 B)."""


@dataclass(frozen=True)
class PartitionFootprint:
    """Estimated size of a partition before it is drawn.

    Attributes
    ----------
    num_entries : int
        Client-row entries: every training row once for a disjoint scheme, ``num_clients × samples_per_client``
        for ``cross_device``.
    memory_bytes : int
        Peak memory of building and writing it (:data:`PARTITION_CLIENT_BYTES`, :data:`PARTITION_ENTRY_BYTES`).
    json_bytes : int
        Size of ``partition.json``.
    """

    num_entries: int
    memory_bytes: int
    json_bytes: int


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.3g} GiB"


class Partitioner(ABC):
    """Split positions ``0..n-1`` of a training pool over ``cfg.num_clients`` clients.

    Parameters
    ----------
    cfg : PartitionConfig
        Scheme settings (``num_clients``, ``alpha``, ``min_samples``, ``shards_per_client``, ``max_retries``).
    """

    name: ClassVar[str] = ""
    """Registry name of the scheme."""
    disjoint: ClassVar[bool] = True
    """Whether the parts are disjoint and cover the pool (then ``num_clients · min_samples <= n`` is required)."""

    def __init__(self, cfg: PartitionConfig) -> None:
        for name in ("num_clients", "min_samples", "shards_per_client", "max_retries"):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"partition: '{name}' must be an int >= 1. Got {value!r}.")
        if not cfg.alpha > 0:
            raise ValueError(f"partition: 'alpha' must be > 0. Got {cfg.alpha!r}. Use e.g. 0.1 (skewed) to 5.")
        self.cfg = cfg

    def partition(
        self, labels: np.ndarray, groups: np.ndarray | None, rng: np.random.Generator, *,
        memory_bytes: int | None = None, disk_bytes: int | None = None,
    ) -> list[np.ndarray]:
        """Split the pool.

        Parameters
        ----------
        labels : numpy.ndarray, shape (n,), int
            Class index of every position (``label_idx``), ``>= 0``.
        groups : numpy.ndarray, shape (n,), str, optional
            Speaker or group id of every position (needed by ``speaker`` only).
        rng : numpy.random.Generator
            Source of every random draw.
        memory_bytes, disk_bytes : int, optional
            Memory and disk at hand; see :meth:`check_sizes`.

        Returns
        -------
        list of numpy.ndarray
            ``num_clients`` sorted int64 arrays of positions into ``labels``; disjoint, covering ``0..n-1``.

        Raises
        ------
        PartitionError
            When the constraints cannot be met (too many clients, ``min_samples`` unreachable, a footprint above
            ``memory_bytes`` or ``disk_bytes``); sizes that cannot fit are refused before the first draw.
        """
        labels = np.asarray(labels)
        if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
            raise ValueError(f"partition: 'labels' must be a 1-D int array. Got dtype {labels.dtype}, "
                             f"shape {labels.shape}.")
        if labels.size and labels.min() < 0:
            raise ValueError(f"partition: 'labels' must be >= 0. Got {labels.min()!r}.")
        if groups is not None:
            groups = np.asarray(groups)
            if groups.shape != labels.shape:
                raise ValueError(f"partition: 'groups' must have the shape of labels {labels.shape}. "
                                 f"Got {groups.shape}.")
        self.check_sizes(len(labels), groups, memory_bytes=memory_bytes, disk_bytes=disk_bytes)
        parts = self._split(labels, groups, rng)
        return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]

    def footprint(self, num_rows: int) -> PartitionFootprint:
        """Estimated entries, peak memory and JSON size of this scheme's partition of ``num_rows`` rows."""
        k = int(self.cfg.num_clients)
        entries = self._num_entries(int(num_rows))
        return PartitionFootprint(
            num_entries=entries,
            memory_bytes=k * PARTITION_CLIENT_BYTES + entries * PARTITION_ENTRY_BYTES,
            json_bytes=k * PARTITION_JSON_CLIENT_BYTES + entries * PARTITION_JSON_ENTRY_BYTES,
        )

    def check_sizes(
        self, num_rows: int, groups: np.ndarray | None = None, *,
        memory_bytes: int | None = None, disk_bytes: int | None = None,
    ) -> None:
        """Refuse, before any draw, sizes this scheme cannot meet on ``num_rows`` training rows.

        Parameters
        ----------
        num_rows : int
            Rows of the training pool.
        groups : numpy.ndarray, shape (num_rows,), str, optional
            Speaker or group ids (``speaker`` counts them).
        memory_bytes, disk_bytes : int, optional
            Memory and disk at hand; the partition's :meth:`footprint` must fit in them. Not checked when None.

        Raises
        ------
        PartitionError
            Naming the sizes and the fix.
        """
        n, k, m = int(num_rows), self.cfg.num_clients, self.cfg.min_samples
        if self.disjoint:
            if k > n:
                raise PartitionError(
                    f"partition: 'num_clients' must be <= the number of training samples ({n}). Got {k}. "
                    "Lower num_clients."
                )
            if m * k > n:
                raise PartitionError(
                    f"partition: 'min_samples' must be <= training samples / num_clients ({n} / {k} = {n // k}). "
                    f"Got {m}: num_clients × min_samples = {k} × {m} = {k * m} rows, above the {n} training rows. "
                    f"Lower min_samples (to at most {n // k}) or num_clients (to at most {n // m})."
                )
        self._check_sizes(n, groups)
        need = self.footprint(n)
        what = f"{k} clients and {need.num_entries} client-row entries"
        if memory_bytes is not None and need.memory_bytes > memory_bytes:
            raise PartitionError(
                f"partition: the partition must fit in the memory at hand ({_gib(memory_bytes)}). Got {what}, "
                f"about {_gib(need.memory_bytes)}. {self._shrink_fix()}"
            )
        if disk_bytes is not None and need.json_bytes > disk_bytes:
            raise PartitionError(
                f"partition: partition.json must fit on the disk at hand ({_gib(disk_bytes)} free). Got {what}, "
                f"about {_gib(need.json_bytes)}. {self._shrink_fix()}"
            )

    def _num_entries(self, num_rows: int) -> int:
        """Client-row entries of the partition: every row once for a disjoint scheme."""
        return num_rows

    def _shrink_fix(self) -> str:
        return "Lower num_clients."

    def _check_sizes(self, num_rows: int, groups: np.ndarray | None) -> None:
        """Scheme-specific size checks, before any draw (none by default)."""
        return None

    @abstractmethod
    def _split(self, labels: np.ndarray, groups: np.ndarray | None, rng: np.random.Generator) -> list[np.ndarray]:
        """Scheme-specific split; inputs and sizes already checked."""

    def _check_min_size(self, parts: list[np.ndarray], fix: str) -> list[np.ndarray]:
        smallest = min(len(part) for part in parts)
        if smallest < self.cfg.min_samples:
            raise PartitionError(
                f"partition: 'min_samples' must be <= the smallest client of this {self.name} split "
                f"({smallest}). Got {self.cfg.min_samples}. {fix}"
            )
        return parts



PARTITIONERS: Registry[Partitioner] = Registry("partitioner")


def _cut(positions: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    """Cut ``positions`` at ``floor(cumsum(proportions)[k] * len)`` for ``k < K-1`` (K parts)."""
    cuts = (np.cumsum(proportions) * len(positions)).astype(np.int64)[:-1]
    return np.split(positions, cuts)


@PARTITIONERS.register("iid")
class IidPartitioner(Partitioner):
    """IID: shuffle, then cut into ``num_clients`` parts whose sizes differ by at most one."""

    name = "iid"

    def _split(self, labels: np.ndarray, groups: np.ndarray | None, rng: np.random.Generator) -> list[np.ndarray]:
        return np.array_split(rng.permutation(len(labels)), self.cfg.num_clients)


@PARTITIONERS.register("dirichlet")
class DirichletPartitioner(Partitioner):
    """Label skew: per class ``Dir(α·1_K)`` proportions, redrawn until every client has ``>= min_samples``.

    Hsu, Qi and Brown 2019, arXiv:1909.06335. With ``K = num_clients`` and classes ``c`` ascending::

        p_c ~ Dir(α · 1_K);   cuts_c = floor(cumsum(p_c)[:K-1] · n_c);   client k gets part k of class c

    Small ``α`` gives each client few classes; large ``α`` approaches IID.
    """

    name = "dirichlet"

    def _split(self, labels: np.ndarray, groups: np.ndarray | None, rng: np.random.Generator) -> list[np.ndarray]:
        k = self.cfg.num_clients
        by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        best = 0
        for _ in range(self.cfg.max_retries):
            chunks: list[list[np.ndarray]] = [[] for _ in range(k)]
            for positions in by_class:
                for client, part in enumerate(_cut(positions, rng.dirichlet(np.full(k, self.cfg.alpha)))):
                    chunks[client].append(part)
            parts = [np.concatenate(c) for c in chunks]
            smallest = min(len(part) for part in parts)
            if smallest >= self.cfg.min_samples:
                return parts
            best = max(best, smallest)
        raise PartitionError(
            f"partition: 'min_samples' must be reachable by dirichlet in max_retries={self.cfg.max_retries} draws. "
            f"Got {self.cfg.min_samples}; the largest smallest-client size reached was {best}. "
            f"Lower min_samples or num_clients ({k}), raise alpha ({self.cfg.alpha!r}) or max_retries."
        )


@PARTITIONERS.register("shards")
class ShardPartitioner(Partitioner):
    """Pathological label skew: ``shards_per_client`` random label-sorted shards per client."""

    name = "shards"

    def _check_sizes(self, num_rows: int, groups: np.ndarray | None) -> None:
        k, s = self.cfg.num_clients, self.cfg.shards_per_client
        if k * s > num_rows:
            raise PartitionError(
                f"partition: 'shards_per_client' must be <= training samples / num_clients "
                f"({num_rows} / {k} = {num_rows // k}). Got {s}. Lower shards_per_client or num_clients."
            )

    def _split(self, labels: np.ndarray, groups: np.ndarray | None, rng: np.random.Generator) -> list[np.ndarray]:
        k, s = self.cfg.num_clients, self.cfg.shards_per_client
        shards = np.array_split(np.argsort(labels, kind="stable"), k * s)
        deal = rng.permutation(k * s).reshape(k, s)
        parts = [np.concatenate([shards[i] for i in row]) for row in deal]
        return self._check_min_size(parts, "Lower min_samples or num_clients.")


@PARTITIONERS.register("quantity")
class QuantityPartitioner(Partitioner):
    """Quantity skew: client sizes ``n · q``, ``q ~ Dir(α·1_K)``, over one shuffled pool; labels IID."""

    name = "quantity"

    def _split(self, labels: np.ndarray, groups: np.ndarray | None, rng: np.random.Generator) -> list[np.ndarray]:
        k = self.cfg.num_clients
        pool = rng.permutation(len(labels))
        best = 0
        for _ in range(self.cfg.max_retries):
            parts = _cut(pool, rng.dirichlet(np.full(k, self.cfg.alpha)))
            smallest = min(len(part) for part in parts)
            if smallest >= self.cfg.min_samples:
                return parts
            best = max(best, smallest)
        raise PartitionError(
            f"partition: 'min_samples' must be reachable by quantity in max_retries={self.cfg.max_retries} draws. "
            f"Got {self.cfg.min_samples}; the largest smallest-client size reached was {best}. "
            f"Lower min_samples or num_clients ({k}), raise alpha ({self.cfg.alpha!r}) or max_retries."
        )


@PARTITIONERS.register("speaker")
class SpeakerPartitioner(Partitioner):
    """Natural split: sorted distinct speaker ids dealt round-robin (speaker ``j`` -> client ``j mod K``).

    Deterministic (``rng`` is not used) and independent of row order. ``min_samples`` is checked, not enforced.
    """

    name = "speaker"

    def _check_sizes(self, num_rows: int, groups: np.ndarray | None) -> None:
        if groups is None:
            raise ValueError("partition: 'groups' must be given (speaker ids) for scheme 'speaker'. Got None.")
        num_speakers = len(np.unique(np.asarray(groups).astype(str)))
        if self.cfg.num_clients > num_speakers:
            raise PartitionError(
                f"partition: 'num_clients' must be <= the number of speakers ({num_speakers}) for scheme "
                f"'speaker'. Got {self.cfg.num_clients}. Lower num_clients or use another scheme."
            )

    def _split(self, labels: np.ndarray, groups: np.ndarray | None, rng: np.random.Generator) -> list[np.ndarray]:
        if groups is None:  # refused by _check_sizes already; kept for callers of _split
            raise ValueError("partition: 'groups' must be given (speaker ids) for scheme 'speaker'. Got None.")
        k = self.cfg.num_clients
        speakers, speaker_of_row = np.unique(groups.astype(str), return_inverse=True)
        client_of_row = speaker_of_row.reshape(-1) % k
        parts = [np.flatnonzero(client_of_row == client) for client in range(k)]
        return self._check_min_size(parts, "Lower min_samples or num_clients.")


@PARTITIONERS.register("cross_device")
class CrossDevicePartitioner(Partitioner):
    """A population larger than the pool: each client draws ``samples_per_client`` positions of its own label mix.

    For client ``k`` in order: ``p_k ~ Dir(α·1_C)`` over the classes present, then ``samples_per_client``
    distinct positions without replacement, position ``i`` weighted ``p_k[y_i] / n_{y_i}`` (a weight that
    underflows to 0 counts as the smallest positive float, so a client can always fill its quota). Clients share
    positions when ``K · samples_per_client > n``; ``min_samples`` does not apply.
    """

    name = "cross_device"
    disjoint = False

    def _num_entries(self, num_rows: int) -> int:
        return int(self.cfg.num_clients) * int(self.cfg.samples_per_client)

    def _shrink_fix(self) -> str:
        return (f"Lower num_clients or samples_per_client ({self.cfg.num_clients} × {self.cfg.samples_per_client}); "
                "each client costs one pass over the pool, about 0.2 ms per client at 2,400 rows.")

    def _check_sizes(self, num_rows: int, groups: np.ndarray | None) -> None:
        if self.cfg.samples_per_client > num_rows:
            raise PartitionError(
                f"partition: 'samples_per_client' must be <= the number of training samples ({num_rows}) for "
                f"scheme 'cross_device'. Got {self.cfg.samples_per_client}. Lower samples_per_client."
            )

    def _split(self, labels: np.ndarray, groups: np.ndarray | None, rng: np.random.Generator) -> list[np.ndarray]:
        size = self.cfg.samples_per_client
        classes, class_of_row, class_sizes = np.unique(labels, return_inverse=True, return_counts=True)
        parts = []
        for _ in range(self.cfg.num_clients):
            mix = rng.dirichlet(np.full(len(classes), self.cfg.alpha))
            weights = np.maximum(mix[class_of_row] / class_sizes[class_of_row], np.finfo(np.float64).tiny)
            parts.append(rng.choice(len(labels), size=size, replace=False, p=weights / weights.sum()))
        return parts


# ---------------------------------------------------------------------------------------------------- helpers
def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def split_holdout(
    parts: Sequence[np.ndarray], labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per client, a seeded held-out share for personalised evaluation, stratified by label.

    For each label with ``n_c >= 2`` samples in the client, ``min(round(fraction · n_c), n_c - 1)`` random samples
    are held out (half rounds up). If that holds out nothing, ``fraction > 0`` and the client has ``>= 2``
    samples, one random sample is held out (from the labels with ``>= 2`` samples when there are any). The training
    part is never empty.

    Parameters
    ----------
    parts : sequence of numpy.ndarray
        Positions of each client (as returned by a partitioner).
    labels : numpy.ndarray, shape (n,), int
        Label of every position.
    fraction : float
        Held-out share, ``0 <= fraction < 1``.
    rng : numpy.random.Generator
        Source of every draw (clients in order, labels ascending).

    Returns
    -------
    list of (train, holdout)
        Sorted int64 arrays per client; disjoint, their union is the client's part.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split_holdout: 'fraction' must be >= 0 and < 1. Got {fraction!r}.")
    labels = np.asarray(labels)
    result = []
    for part in parts:
        part = np.sort(np.asarray(part, dtype=np.int64))
        held: list[np.ndarray] = []
        if fraction > 0 and len(part) >= 2:
            part_labels = labels[part]
            for c in np.unique(part_labels):
                members = part[part_labels == c]
                if len(members) >= 2:
                    take = min(_round_half_up(fraction * len(members)), len(members) - 1)
                    held.append(rng.permutation(members)[:take])
            if sum(len(h) for h in held) == 0:
                counts = {c: int((part_labels == c).sum()) for c in np.unique(part_labels)}
                eligible = part[[counts[c] >= 2 for c in part_labels]]
                held = [rng.choice(eligible if len(eligible) else part, size=1)]
        holdout = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
        train = np.setdiff1d(part, holdout, assume_unique=True)
        result.append((train.astype(np.int64), holdout.astype(np.int64)))
    return result


def client_class_counts(parts: Sequence[np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Count the samples of each class in each client.

    Parameters
    ----------
    parts : sequence of numpy.ndarray
        Positions of each client.
    labels : numpy.ndarray, shape (n,), int
        Label of every position, in ``0..num_classes-1``.
    num_classes : int
        Number of classes.

    Returns
    -------
    numpy.ndarray, shape (num_clients, num_classes), int64
    """
    labels = np.asarray(labels)
    counts = np.zeros((len(parts), num_classes), dtype=np.int64)
    for client, part in enumerate(parts):
        part_labels = labels[np.asarray(part, dtype=np.int64)]
        if part_labels.size and (part_labels.min() < 0 or part_labels.max() >= num_classes):
            raise ValueError(
                f"client_class_counts: 'labels' must be in 0..{num_classes - 1}. "
                f"Got values in [{part_labels.min()}, {part_labels.max()}]."
            )
        counts[client] = np.bincount(part_labels, minlength=num_classes)
    return counts


def make_partition(
    labels: np.ndarray,
    groups: np.ndarray | None,
    train_rows: np.ndarray,
    test_rows: np.ndarray,
    cfg: PartitionConfig,
    num_classes: int,
    *,
    memory_bytes: int | None = None,
    disk_bytes: int | None = None,
) -> dict[str, Any]:
    """Partition the train rows of a feature store into the partition JSON of docs/architecture.md.

    One generator ``numpy.random.default_rng(cfg.seed)`` draws the partition first, then the held-out splits.

    Parameters
    ----------
    labels : numpy.ndarray, shape (num_samples,), int
        ``label_idx`` of every feature-store row.
    groups : numpy.ndarray, shape (num_samples,), str, optional
        Speaker or group id of every feature-store row.
    train_rows, test_rows : numpy.ndarray, int
        Feature-store rows of the train and test splits; the pool is ``train_rows`` in the given order
        (ascending rows = ids sorted by name).
    cfg : PartitionConfig
        Scheme and its settings.
    num_classes : int
        Number of label names.
    memory_bytes, disk_bytes : int, optional
        Memory and disk at hand: a partition whose estimated footprint exceeds them is refused before the first
        draw (:meth:`Partitioner.check_sizes`).

    Returns
    -------
    dict
        ``{"scheme", "num_clients", "num_classes", "seed", "clients": [{"client_id", "train", "holdout"}],
        "test"}`` with plain-int feature-store rows (JSON-ready).
    """
    labels = np.asarray(labels)
    train_rows = np.asarray(train_rows, dtype=np.int64)
    test_rows = np.asarray(test_rows, dtype=np.int64)
    for name, rows in (("train_rows", train_rows), ("test_rows", test_rows)):
        if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= len(labels))):
            raise ValueError(f"make_partition: '{name}' must be 1-D rows in 0..{len(labels) - 1}. Got {rows!r}.")
    if np.intersect1d(train_rows, test_rows).size:
        raise ValueError("make_partition: 'train_rows' and 'test_rows' must be disjoint. Got shared rows.")
    pool_groups = None if groups is None else np.asarray(groups)[train_rows]
    rng = np.random.default_rng(cfg.seed)
    partitioner = PARTITIONERS.build(cfg.scheme, cfg=cfg)
    parts = partitioner.partition(labels[train_rows], pool_groups, rng, memory_bytes=memory_bytes,
                                  disk_bytes=disk_bytes)
    splits = split_holdout(parts, labels[train_rows], cfg.holdout_fraction, rng)
    return {
        "scheme": cfg.scheme,
        "num_clients": cfg.num_clients,
        "num_classes": int(num_classes),
        "seed": cfg.seed,
        "clients": [
            {
                "client_id": client,
                "train": sorted(train_rows[train].tolist()),
                "holdout": sorted(train_rows[holdout].tolist()),
            }
            for client, (train, holdout) in enumerate(splits)
        ],
        "test": sorted(test_rows.tolist()),
    }
