"""FedAdam and FedYogi: adaptive server optimisers (Reddi et al., ICLR 2021, arXiv:2003.00295, Alg. 2).

The server treats the FedAvg-weighted mean of the client deltas as a pseudo-gradient:

    Δ_t = Σ_k (n_k/n) (w^k_{t+1} − w_t)
    m_t = β₁ m_{t−1} + (1 − β₁) Δ_t
    v_t = β₂ v_{t−1} + (1 − β₂) Δ_t²                              (FedAdam)
    v_t = v_{t−1} − (1 − β₂) Δ_t² · sign(v_{t−1} − Δ_t²)           (FedYogi)
    w_{t+1} = w_t + η m_t / (√v_t + τ)

with m_0 = 0 and v_0 = τ² (the paper requires v_{−1} ≥ τ²), no bias correction, as in Alg. 2. Defaults [A]:
η = ``server_lr`` (chosen on the clients' held-out splits, README), β₁ = 0.9, β₂ = 0.99, τ = 1e-3 (the paper's τ
grid; FedAudio uses server Adam, lr 1e-3). The optimiser applies to the model's parameters, as in the paper.
Entries named in ``server_averaged`` (by suffix; BatchNorm's ``running_mean``/``running_var`` by default) are
statistics, not parameters: a sign-like Adam step would drive a variance negative, so they take FedAvg's
weighted mean, as do non-floating entries (rounded). The moments are instance state, saved in checkpoints through
:meth:`state_dict` / :meth:`load_state_dict`. Flags nobody.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence

import torch

from fedcore.aggregation.base import (
    AGGREGATORS,
    Aggregator,
    ClientUpdate,
    Combination,
    combine_weighted,
    floating_keys,
    nominal_weights,
)
from fedcore.aggregation.state import StateDict


class _ServerOptimiser(Aggregator):
    count_weighted = True

    def __init__(self, *, server_lr: float = 0.1, server_beta1: float = 0.9, server_beta2: float = 0.99,
                 server_tau: float = 1e-3, server_averaged: Sequence[str] = ("running_mean", "running_var"),
                 flag_ratio: float = 0.5) -> None:
        super().__init__(flag_ratio=flag_ratio)
        problems = []
        if not server_lr > 0:
            problems.append(f"'server_lr' must be > 0. Got {server_lr!r}.")
        for name, value in (("server_beta1", server_beta1), ("server_beta2", server_beta2)):
            if not 0.0 <= value < 1.0:
                problems.append(f"'{name}' must be in [0, 1). Got {value!r}.")
        if not server_tau > 0:
            problems.append(f"'server_tau' must be > 0. Got {server_tau!r}.")
        if problems:
            raise ValueError(f"{type(self).__name__}: " + " ".join(problems))
        self.server_lr, self.server_beta1, self.server_beta2, self.server_tau = (
            server_lr, server_beta1, server_beta2, server_tau)
        self.server_averaged = tuple(server_averaged)
        self.m: StateDict = {}
        self.v: StateDict = {}

    @abstractmethod
    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        """v_t from v_{t−1} and Δ_t² (the rule's second-moment update)."""

    def combine(self, global_state: StateDict, updates: Sequence[ClientUpdate], server_round: int) -> Combination:
        """w_{t+1} = w_t + η m_t / (√v_t + τ), with the moments of the module docstring."""
        weights = nominal_weights(updates, count_weighted=True)
        averaged = combine_weighted(global_state, updates, [weights[u.client_id] for u in updates])
        state: StateDict = {}
        beta1, tau = self.server_beta1, self.server_tau
        for key in floating_keys(global_state):
            if key.endswith(self.server_averaged):
                state[key] = averaged[key]
                continue
            previous = global_state[key].detach().to("cpu", torch.float64)
            delta = averaged[key] - previous
            m = self.m.get(key, torch.zeros_like(delta))
            v = self.v.get(key, torch.full_like(delta, tau * tau))
            m = beta1 * m + (1.0 - beta1) * delta
            v = self.second_moment(v, delta.square())
            self.m[key], self.v[key] = m, v
            state[key] = previous + self.server_lr * m / (v.sqrt() + tau)
        return Combination(state=state, weights=weights)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The moments, as ``m/<key>`` and ``v/<key>`` tensors (for checkpoints)."""
        moments = {f"m/{k}": t for k, t in self.m.items()} | {f"v/{k}": t for k, t in self.v.items()}
        return {k: t.clone() for k, t in moments.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the moments saved by :meth:`state_dict`."""
        self.m = {k[2:]: t.to(torch.float64).clone() for k, t in state.items() if k.startswith("m/")}
        self.v = {k[2:]: t.to(torch.float64).clone() for k, t in state.items() if k.startswith("v/")}


@AGGREGATORS.register("fedadam")
class FedAdam(_ServerOptimiser):
    """Adam on the server (Reddi et al. 2021, Alg. 2): v_t = β₂ v_{t−1} + (1 − β₂) Δ_t².

    Parameters
    ----------
    server_lr, server_beta1, server_beta2, server_tau : float
        η, β₁, β₂, τ of the module docstring.
    server_averaged : sequence of str
        Suffixes of the entries that take FedAvg's mean instead of the optimiser step.
    flag_ratio : float
        See :class:`~fedcore.aggregation.base.Aggregator`.
    """

    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        """β₂ v_{t−1} + (1 − β₂) Δ_t²."""
        return self.server_beta2 * v + (1.0 - self.server_beta2) * squared


@AGGREGATORS.register("fedyogi")
class FedYogi(_ServerOptimiser):
    """Yogi on the server (Reddi et al. 2021, Alg. 2): v_t = v_{t−1} − (1 − β₂) Δ_t² sign(v_{t−1} − Δ_t²).

    Parameters
    ----------
    server_lr, server_beta1, server_beta2, server_tau : float
        η, β₁, β₂, τ of the module docstring.
    server_averaged : sequence of str
        Suffixes of the entries that take FedAvg's mean instead of the optimiser step.
    flag_ratio : float
        See :class:`~fedcore.aggregation.base.Aggregator`.
    """

    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        """v_{t−1} − (1 − β₂) Δ_t² sign(v_{t−1} − Δ_t²)."""
        return v - (1.0 - self.server_beta2) * squared * torch.sign(v - squared)
