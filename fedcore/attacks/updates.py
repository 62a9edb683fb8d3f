"""Byzantine attacks on model updates, each a registered :class:`~fedcore.attacks.base.UpdateAttack`.

With w_t the global state, Δ_k = w^k − w_t the honest update of attacker k, a malicious client sends:

=========== ======================================================================= ==========================
name        sends                                                                   option (default)
=========== ======================================================================= ==========================
sign_flip   w_t − s Δ_k (reversed, amplified update; RSA, Li et al. AAAI 2019, s=4)  ``sign_flip_scale`` (4)
scaling     w_t + s Δ_k (boosted update; Bhagoji et al. ICML 2019)                   ``scaling_boost`` (10) [A]
gaussian    w_t + σ ε, ε ~ N(0, I) (random update; Blanchard et al. 2017)            ``gaussian_sigma`` (1) [A]
alie        w_t + μ − z σ, μ/σ the coordinate-wise mean/std of every sampled        ``alie_z`` (None: z_max)
            client's honest Δ ("A little is enough", Baruah et al. NeurIPS 2019)
nan         NaN (or +Inf) in every attacked entry (a crashed or hostile client)     ``nan_value`` ("nan")
=========== ======================================================================= ==========================

ALIE's z_max (Baruah et al., Alg. 3): s = ⌊K/2 + 1⌋ − f, z = Φ⁻¹((K − s)/K), with K the sampled clients and f the
attackers among them; all attackers send the same vector.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Literal

import torch

from fedcore.aggregation.base import ClientUpdate
from fedcore.aggregation.state import StateDict
from fedcore.attacks.base import ATTACKS, UpdateAttack, delta, replaced


@ATTACKS.register("sign_flip")
class SignFlip(UpdateAttack):
    """Send w_t − s Δ_k."""

    def __init__(self, *, sign_flip_scale: float = 4.0) -> None:
        if not sign_flip_scale > 0:
            raise ValueError(f"SignFlip: 'sign_flip_scale' must be > 0. Got {sign_flip_scale!r}.")
        self.sign_flip_scale = sign_flip_scale

    def forge(self, global_state: StateDict, updates: Sequence[ClientUpdate], attackers: Sequence[ClientUpdate],
              keys: Sequence[str], generator: torch.Generator) -> dict[int, ClientUpdate]:
        """See the module table."""
        scale = self.sign_flip_scale
        return {a.client_id: replaced(a, {k: global_state[k].double() - scale * delta(a, global_state, k)
                                          for k in keys}) for a in attackers}


@ATTACKS.register("scaling")
class Scaling(UpdateAttack):
    """Send w_t + s Δ_k."""

    def __init__(self, *, scaling_boost: float = 10.0) -> None:
        if not scaling_boost > 0:
            raise ValueError(f"Scaling: 'scaling_boost' must be > 0. Got {scaling_boost!r}.")
        self.scaling_boost = scaling_boost

    def forge(self, global_state: StateDict, updates: Sequence[ClientUpdate], attackers: Sequence[ClientUpdate],
              keys: Sequence[str], generator: torch.Generator) -> dict[int, ClientUpdate]:
        """See the module table."""
        boost = self.scaling_boost
        return {a.client_id: replaced(a, {k: global_state[k].double() + boost * delta(a, global_state, k)
                                          for k in keys}) for a in attackers}


@ATTACKS.register("gaussian")
class GaussianUpdate(UpdateAttack):
    """Send w_t + σ ε with ε ~ N(0, I) drawn from the round's attack generator."""

    def __init__(self, *, gaussian_sigma: float = 1.0) -> None:
        if not gaussian_sigma > 0:
            raise ValueError(f"GaussianUpdate: 'gaussian_sigma' must be > 0. Got {gaussian_sigma!r}.")
        self.gaussian_sigma = gaussian_sigma

    def forge(self, global_state: StateDict, updates: Sequence[ClientUpdate], attackers: Sequence[ClientUpdate],
              keys: Sequence[str], generator: torch.Generator) -> dict[int, ClientUpdate]:
        """See the module table."""
        forged = {}
        for attacker in sorted(attackers, key=lambda u: u.client_id):  # draws in client-id order
            noise = {k: global_state[k].double()
                     + self.gaussian_sigma * torch.randn(global_state[k].shape, generator=generator,
                                                         dtype=torch.float64) for k in keys}
            forged[attacker.client_id] = replaced(attacker, noise)
        return forged


def alie_z(num_clients: int, num_attackers: int) -> float:
    """z_max of Baruah et al. (2019): Φ⁻¹((K − s)/K), s = ⌊K/2 + 1⌋ − f (0 when the quantile is not in (0, 1))."""
    supporters = math.floor(num_clients / 2 + 1) - num_attackers
    quantile = (num_clients - supporters) / num_clients
    if not 0.0 < quantile < 1.0:
        return 0.0
    return NormalDist().inv_cdf(quantile)


@ATTACKS.register("alie")
class ALittleIsEnough(UpdateAttack):
    """Send w_t + μ − z σ (coordinate-wise over every sampled client's honest update)."""

    def __init__(self, *, alie_z: float | None = None) -> None:
        if alie_z is not None and not alie_z >= 0:
            raise ValueError(f"ALittleIsEnough: 'alie_z' must be None or >= 0. Got {alie_z!r}.")
        self.alie_z = alie_z

    def forge(self, global_state: StateDict, updates: Sequence[ClientUpdate], attackers: Sequence[ClientUpdate],
              keys: Sequence[str], generator: torch.Generator) -> dict[int, ClientUpdate]:
        """See the module table."""
        z = alie_z(len(updates), len(attackers)) if self.alie_z is None else self.alie_z
        values = {}
        for key in keys:
            deltas = torch.stack([delta(u, global_state, key) for u in sorted(updates, key=lambda u: u.client_id)])
            std = deltas.std(dim=0, unbiased=False) if len(updates) > 1 else torch.zeros_like(deltas[0])
            values[key] = global_state[key].double() + deltas.mean(dim=0) - z * std
        return {a.client_id: replaced(a, values) for a in attackers}


@ATTACKS.register("nan")
class NonFinite(UpdateAttack):
    """Send NaN (or +Inf) in every attacked entry."""

    def __init__(self, *, nan_value: Literal["nan", "inf"] = "nan") -> None:
        if nan_value not in ("nan", "inf"):
            raise ValueError(f"NonFinite: 'nan_value' must be 'nan' or 'inf'. Got {nan_value!r}.")
        self.nan_value = nan_value

    def forge(self, global_state: StateDict, updates: Sequence[ClientUpdate], attackers: Sequence[ClientUpdate],
              keys: Sequence[str], generator: torch.Generator) -> dict[int, ClientUpdate]:
        """See the module table."""
        fill = float(self.nan_value)
        return {a.client_id: replaced(a, {k: torch.full(global_state[k].shape, fill, dtype=torch.float64)
                                          for k in keys}) for a in attackers}
