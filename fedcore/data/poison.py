"""Data poisoning of a seeded fraction of clients, as an overlay on the clean feature store.

Attacks (registry :data:`POISONS`, built with a :class:`~fedcore.config.PoisonConfig` and the label names):

- ``none``: nothing is attacked.
- ``label_flip``: each attacked sample gets a label drawn uniformly from the *other* ``C - 1`` classes.
- ``targeted_flip``: attacked samples whose label is ``source`` get label ``target`` (others stay untouched).
- ``label_noise``: FedAudio's label noise (Zhang et al., ICASSP 2023, arXiv:2210.15707, code ``label_noise``).
  Per attacked client a ``C x C`` transition matrix ``T`` with::

      T[i, i] = 1 - ε;   keep_i = max(ceil((C - 1)(1 - sparsity)), 1) random off-diagonal j != i;
      T[i, j] = ε / keep_i for the kept j, 0 for the other (sparsity share of) off-diagonals

  and each attacked sample's label ``y`` is resampled from row ``T[y]``.
- ``snr_noise``: additive white Gaussian noise in the waveform domain at a target SNR (FedAudio's SNR noise)::

      P_noise = P_signal / 10^(SNR_dB / 10),   P = mean(x^2) over the prepared clip

  then the log-mel is recomputed (:func:`noisy_features`).

:func:`plan_poison` draws, from one generator: the attacked clients (``round(client_fraction · K)``, half up),
then per attacked client (ascending) its attacked rows (``max(1, round(sample_fraction · n_k))``) followed by
the attack's own draws. Departure from FedAudio: the fraction of attacked samples per client is a parameter
(FedAudio attacks every sample of a noisy client, i.e. ``sample_fraction = 1``). Nothing here copies the data.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fedcore.config import PoisonConfig
from fedcore.registry import Registry

if TYPE_CHECKING:  # torch only where noise is added: the label attacks (and the params check) never import it
    import torch
    from torch import Tensor

    from fedcore.data.features import LogMelExtractor

__all__ = [
    "POISONS",
    "Attack",
    "ClientPoison",
    "LabelFlip",
    "LabelNoise",
    "NoAttack",
    "PoisonPlan",
    "SnrNoise",
    "TargetedFlip",
    "add_noise_at_snr",
    "noisy_features",
    "plan_poison",
    "transition_matrix",
]

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass
class ClientPoison:
    """What an attack did to one client.

    Attributes
    ----------
    samples : numpy.ndarray, int64
        Rows the attack applied to (ground truth).
    label_rows, new_labels : numpy.ndarray, int64
        Rows whose label changed, and their new ``label_idx``.
    noise_rows : numpy.ndarray, int64
        Rows whose audio gets noise.
    details : dict
        Per-client details (e.g. ``{"transition_matrices": [[...]]}``), keyed by client id in the plan.
    """

    samples: np.ndarray
    label_rows: np.ndarray = field(default_factory=lambda: _EMPTY.copy())
    new_labels: np.ndarray = field(default_factory=lambda: _EMPTY.copy())
    noise_rows: np.ndarray = field(default_factory=lambda: _EMPTY.copy())
    details: dict[str, Any] = field(default_factory=dict)


class Attack(ABC):
    """One poisoning attack; decides, per attacked client, what happens to its attacked rows.

    Parameters
    ----------
    cfg : PoisonConfig
        Attack settings.
    label_names : sequence of str
        Names in ``label_idx`` order.
    """

    name: ClassVar[str] = ""
    """Registry name."""
    active: ClassVar[bool] = True
    """False for ``none``: no client is drawn."""

    def __init__(self, cfg: PoisonConfig, label_names: Sequence[str]) -> None:
        self.cfg = cfg
        self.label_names = [str(name) for name in label_names]
        self.num_classes = len(self.label_names)

    def details(self) -> dict[str, Any]:
        """Attack-wide settings recorded in the ground truth."""
        return {}

    @abstractmethod
    def poison_client(self, rows: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> ClientPoison:
        """Attack one client's chosen rows.

        Parameters
        ----------
        rows : numpy.ndarray, shape (m,), int64
            Attacked feature-store rows of the client (ascending).
        labels : numpy.ndarray, shape (m,), int64
            Their clean ``label_idx``.
        rng : numpy.random.Generator
            Source of the attack's draws.
        """

    def _need_two_classes(self) -> None:
        if self.num_classes < 2:
            raise ValueError(
                f"poison: 'label_names' must hold >= 2 labels for attack {self.name!r}. Got {self.label_names!r}."
            )


POISONS: Registry[Attack] = Registry("poison")


@POISONS.register("none")
class NoAttack(Attack):
    """No attack: the plan is empty whatever the fractions."""

    name = "none"
    active = False

    def poison_client(self, rows: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> ClientPoison:
        """Change nothing."""
        return ClientPoison(samples=_EMPTY.copy())


@POISONS.register("label_flip")
class LabelFlip(Attack):
    """Random label flip: ``y' = (y + u) mod C`` with ``u`` uniform in ``1..C-1``, so ``y' != y`` always."""

    name = "label_flip"

    def __init__(self, cfg: PoisonConfig, label_names: Sequence[str]) -> None:
        super().__init__(cfg, label_names)
        self._need_two_classes()

    def poison_client(self, rows: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> ClientPoison:
        """Flip every given row to a different class."""
        new = (labels + rng.integers(1, self.num_classes, size=len(labels))) % self.num_classes
        return ClientPoison(samples=rows, label_rows=rows, new_labels=new.astype(np.int64))


@POISONS.register("targeted_flip")
class TargetedFlip(Attack):
    """Targeted flip: attacked samples labelled ``source`` become ``target`` (names compared as strings)."""

    name = "targeted_flip"

    def __init__(self, cfg: PoisonConfig, label_names: Sequence[str]) -> None:
        super().__init__(cfg, label_names)
        self.source = self._resolve("source", cfg.source)
        self.target = self._resolve("target", cfg.target)
        if self.source == self.target:
            raise ValueError(f"poison: 'target' must differ from source ({cfg.source!r}). Got {cfg.target!r}.")

    def _resolve(self, name: str, value: str | int | None) -> int:
        if value is None or str(value) not in self.label_names:
            raise ValueError(
                f"poison: '{name}' must be one of the labels {', '.join(self.label_names)}. Got {value!r}."
            )
        return self.label_names.index(str(value))

    def details(self) -> dict[str, Any]:
        """Source and target label names."""
        return {"source": self.label_names[self.source], "target": self.label_names[self.target]}

    def poison_client(self, rows: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> ClientPoison:
        """Relabel the given rows of class ``source`` as ``target``."""
        flipped = rows[labels == self.source]
        return ClientPoison(
            samples=flipped, label_rows=flipped, new_labels=np.full(len(flipped), self.target, dtype=np.int64)
        )


def transition_matrix(
    num_classes: int, epsilon: float, sparsity: float, rng: np.random.Generator
) -> np.ndarray:
    """FedAudio's sparse label-transition matrix.

    Parameters
    ----------
    num_classes : int
        ``C >= 2``.
    epsilon : float
        Off-diagonal mass of each row, ``0 <= ε <= 1``.
    sparsity : float
        Share of each row's off-diagonal entries set to zero, ``0 <= sparsity < 1``; at least one is kept.
    rng : numpy.random.Generator
        Draws which off-diagonal entries are kept (rows in order).

    Returns
    -------
    numpy.ndarray, shape (C, C), float64
        Rows sum to 1; ``T[i, i] = 1 - ε``; ``ε`` split evenly over the ``max(ceil((C-1)(1-sparsity)), 1)`` kept
        off-diagonal entries of each row.
    """
    if num_classes < 2:
        raise ValueError(f"transition_matrix: 'num_classes' must be >= 2. Got {num_classes!r}.")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"transition_matrix: 'epsilon' must be >= 0 and <= 1. Got {epsilon!r}.")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"transition_matrix: 'sparsity' must be >= 0 and < 1. Got {sparsity!r}.")
    # ceil((C-1)(1-s)) written as (C-1) - floor((C-1)s), with a guard against 0.1-style float error
    num_zero = min(math.floor((num_classes - 1) * sparsity + 1e-9), num_classes - 2)
    keep = num_classes - 1 - num_zero
    matrix = np.zeros((num_classes, num_classes), dtype=np.float64)
    for i in range(num_classes):
        others = np.delete(np.arange(num_classes), i)
        matrix[i, rng.choice(others, size=keep, replace=False)] = epsilon / keep
        matrix[i, i] = 1.0 - epsilon
    return matrix


@POISONS.register("label_noise")
class LabelNoise(Attack):
    """FedAudio label noise: per attacked client a sparse transition matrix; labels resampled from its rows."""

    name = "label_noise"

    def __init__(self, cfg: PoisonConfig, label_names: Sequence[str]) -> None:
        super().__init__(cfg, label_names)
        self._need_two_classes()

    def details(self) -> dict[str, Any]:
        """ε and sparsity."""
        return {"epsilon": self.cfg.epsilon, "sparsity": self.cfg.sparsity}

    def poison_client(self, rows: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> ClientPoison:
        """Draw the client's matrix, then resample each row's label from ``T[y]`` (inverse CDF)."""
        matrix = transition_matrix(self.num_classes, self.cfg.epsilon, self.cfg.sparsity, rng)
        cdf = np.cumsum(matrix, axis=1)
        last_positive = np.array([np.flatnonzero(row > 0)[-1] for row in matrix])
        draws = rng.random(len(labels))
        # first class whose cdf exceeds u (zero-probability classes are never picked) ...
        new = (cdf[labels] <= draws[:, None]).sum(axis=1).astype(np.int64)
        new = np.minimum(new, last_positive[labels])  # ... clipped when u >= a float-rounded cdf end
        changed = new != labels
        return ClientPoison(
            samples=rows,
            label_rows=rows[changed],
            new_labels=new[changed],
            details={"transition_matrices": matrix.tolist()},
        )


@POISONS.register("snr_noise")
class SnrNoise(Attack):
    """Additive Gaussian noise at ``snr_db`` on the attacked rows' audio; features recomputed later."""

    name = "snr_noise"

    def __init__(self, cfg: PoisonConfig, label_names: Sequence[str]) -> None:
        super().__init__(cfg, label_names)
        if not math.isfinite(cfg.snr_db):
            raise ValueError(f"poison: 'snr_db' must be a finite float. Got {cfg.snr_db!r}.")

    def details(self) -> dict[str, Any]:
        """Target SNR."""
        return {"snr_db": self.cfg.snr_db}

    def poison_client(self, rows: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> ClientPoison:
        """Mark every given row for noise."""
        return ClientPoison(samples=rows, noise_rows=rows)


# ------------------------------------------------------------------------------------------------------- plan
@dataclass
class PoisonPlan:
    """Who is attacked and how: the overlay's content and the ground truth.

    Attributes
    ----------
    attack : str
        Registry name.
    attacked_clients : list of int
        Ascending client ids.
    samples : dict of int to list of int
        Feature-store rows the attack applied to, per attacked client.
    label_rows, new_labels : numpy.ndarray, int64
        Rows whose label changes and their new ``label_idx`` (ascending rows).
    noise_rows : numpy.ndarray, int64
        Rows whose features are recomputed from noisy audio (ascending).
    details : dict
        JSON-able attack details (fractions, seed, settings, per-client transition matrices, ...).
    """

    attack: str
    attacked_clients: list[int]
    samples: dict[int, list[int]]
    label_rows: np.ndarray
    new_labels: np.ndarray
    noise_rows: np.ndarray
    details: dict[str, Any] = field(default_factory=dict)

    def to_ground_truth(self) -> dict[str, Any]:
        """JSON-able ``ground_truth.json`` (docs/architecture.md, "Poison") with the details merged in."""
        truth: dict[str, Any] = {
            "attack": self.attack,
            "attacked_clients": [int(c) for c in self.attacked_clients],
            "samples": {str(c): [int(r) for r in rows] for c, rows in self.samples.items()},
            "num_attacked_samples": int(sum(len(rows) for rows in self.samples.values())),
        }
        truth.update(self.details)
        return truth


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def plan_poison(
    cfg: PoisonConfig,
    clients_train_rows: Sequence[np.ndarray],
    labels: np.ndarray,
    label_names: Sequence[str],
    rng: np.random.Generator,
) -> PoisonPlan:
    """Choose attacked clients and samples and let the attack decide their new labels or noise.

    Parameters
    ----------
    cfg : PoisonConfig
        Attack name, ``client_fraction``, ``sample_fraction`` and attack settings.
    clients_train_rows : sequence of numpy.ndarray
        Feature-store training rows of every client (index = client id).
    labels : numpy.ndarray, shape (num_samples,), int
        Clean ``label_idx`` of every feature-store row.
    label_names : sequence of str
        Names in ``label_idx`` order.
    rng : numpy.random.Generator
        Source of every draw (e.g. ``numpy.random.default_rng(cfg.seed)``).

    Returns
    -------
    PoisonPlan
    """
    if not 0.0 <= cfg.client_fraction <= 1.0:
        raise ValueError(f"poison: 'client_fraction' must be >= 0 and <= 1. Got {cfg.client_fraction!r}.")
    if not 0.0 < cfg.sample_fraction <= 1.0:
        raise ValueError(f"poison: 'sample_fraction' must be > 0 and <= 1. Got {cfg.sample_fraction!r}.")
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"poison: 'labels' must be a 1-D int array. Got dtype {labels.dtype}, shape {labels.shape}.")
    if labels.size and (labels.min() < 0 or labels.max() >= len(label_names)):
        raise ValueError(
            f"poison: 'labels' must be in 0..{len(label_names) - 1} (one per label name). "
            f"Got values in [{labels.min()}, {labels.max()}]."
        )
    attack = POISONS.build(cfg.attack, cfg=cfg, label_names=label_names)
    num_clients = len(clients_train_rows)
    num_attacked = min(_round_half_up(cfg.client_fraction * num_clients), num_clients) if attack.active else 0
    attacked = sorted(int(c) for c in rng.choice(num_clients, size=num_attacked, replace=False))

    samples: dict[int, list[int]] = {}
    label_rows, new_labels, noise_rows = [_EMPTY], [_EMPTY], [_EMPTY]
    per_client: dict[str, dict[str, Any]] = {}
    for client in attacked:
        rows = np.asarray(clients_train_rows[client], dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(labels)):
            raise ValueError(f"poison: 'clients_train_rows' of client {client} must index labels. Got {rows!r}.")
        if rows.size == 0:
            samples[client] = []
            continue
        take = min(max(1, _round_half_up(cfg.sample_fraction * rows.size)), rows.size)
        chosen = np.sort(rng.choice(rows, size=take, replace=False))
        result = attack.poison_client(chosen, labels[chosen].astype(np.int64), rng)
        samples[client] = [int(r) for r in np.sort(result.samples)]
        label_rows.append(np.asarray(result.label_rows, dtype=np.int64))
        new_labels.append(np.asarray(result.new_labels, dtype=np.int64))
        noise_rows.append(np.asarray(result.noise_rows, dtype=np.int64))
        for key, value in result.details.items():
            per_client.setdefault(key, {})[str(client)] = value

    all_label_rows = np.concatenate(label_rows)
    order = np.argsort(all_label_rows, kind="stable")
    all_noise_rows = np.sort(np.concatenate(noise_rows))
    details: dict[str, Any] = {
        "client_fraction": cfg.client_fraction,
        "sample_fraction": cfg.sample_fraction,
        "seed": cfg.seed,
        "num_changed_labels": int(all_label_rows.size),
        "num_noise_samples": int(all_noise_rows.size),
        **attack.details(),
        **per_client,
    }
    return PoisonPlan(
        attack=cfg.attack,
        attacked_clients=attacked,
        samples=samples,
        label_rows=all_label_rows[order],
        new_labels=np.concatenate(new_labels)[order],
        noise_rows=all_noise_rows,
        details=details,
    )


# ------------------------------------------------------------------------------------------------- SNR noise
def add_noise_at_snr(waveform: Tensor, snr_db: float, generator: torch.Generator) -> Tensor:
    """Add white Gaussian noise at a target signal-to-noise ratio.

    ``noise ~ N(0, P_s / 10^(snr_db / 10))`` with ``P_s = mean(waveform^2)`` over the whole given waveform.

    Parameters
    ----------
    waveform : Tensor, shape (time,), float32
        Prepared clip.
    snr_db : float
        Target SNR, dB.
    generator : torch.Generator
        Source of the noise (its device is where the noise is drawn).

    Returns
    -------
    Tensor, shape (time,), float32
        ``waveform + noise``; an all-zero (silent) input is returned unchanged (as a copy).
    """
    if not math.isfinite(snr_db):
        raise ValueError(f"add_noise_at_snr: 'snr_db' must be a finite float. Got {snr_db!r}.")
    import torch

    signal = waveform.to(torch.float32)
    power = float(torch.mean(signal.double() ** 2)) if signal.numel() else 0.0
    if power == 0.0:
        return signal.clone()
    scale = math.sqrt(power / 10.0 ** (snr_db / 10.0))
    noise = torch.randn(signal.shape, generator=generator, dtype=torch.float32, device=generator.device)
    return signal + scale * noise.to(signal.device)


def noisy_features(
    rows: np.ndarray,
    load: Callable[[int], tuple[np.ndarray, int]],
    extractor: LogMelExtractor,
    snr_db: float,
    generator: torch.Generator,
) -> np.ndarray:
    """Raw log-mel of the given rows after adding noise at ``snr_db`` to each prepared clip.

    Parameters
    ----------
    rows : numpy.ndarray, shape (m,), int
        Feature-store rows; noise is drawn in this order.
    load : callable
        ``load(row) -> (waveform (channels, time) or (time,), sample_rate)``.
    extractor : LogMelExtractor
        The front end that made the clean features.
    snr_db : float
        Target SNR, dB.
    generator : torch.Generator
        Source of the noise.

    Returns
    -------
    numpy.ndarray, shape (m, n_mels, frames), float32
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    out = np.empty((len(rows), *extractor.output_shape), dtype=np.float32)
    for i, row in enumerate(rows):
        # one clip at a time, as the features stage does: a clip's bits do not depend on its neighbours
        noisy = add_noise_at_snr(extractor.prepare(*load(int(row))), snr_db, generator)
        out[i] = extractor.log_mel(noisy).cpu().numpy()
    return out
