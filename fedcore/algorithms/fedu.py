"""FedU's divergence-aware predictor update (Zhuang et al., ICCV 2021, arXiv:2108.07931, §3.3; EasyFL FedSSL).

A BYOL-style client keeps an online encoder and a predictor. At the start of a round, client k measures how far
the global encoder it received is from its own encoder of the previous round,

    D_k = mean over the encoder's weight tensors W (conv and linear kernels, ndim >= 2) of ‖W_global − W_k‖₂,

and starts from the **global predictor** if D_k < μ, otherwise keeps its **local predictor** (μ = 0.4 in EasyFL,
``--dapu_threshold``). The encoder always starts from the global one. Here "predictor" is a parameter group
(``fedu.predictor``, default ``head``): for the supervised models of this project, the classifier head; for the
SSL models, their projection/prediction head. The local training itself is FedAvg's.
"""

from __future__ import annotations

import torch
from torch import nn

from fedcore.aggregation.state import StateDict
from fedcore.algorithms.base import LOCAL_ALGORITHMS, LocalAlgorithm
from fedcore.config import FedUConfig
from fedcore.models.groups import PARAM_GROUPS


def encoder_divergence(global_state: StateDict, local_state: StateDict, encoder_keys: list[str]) -> float:
    """Mean of ‖W_global − W_local‖₂ over the floating ``encoder_keys`` of rank >= 2 (0 when there are none)."""
    norms = [
        float(torch.linalg.vector_norm(global_state[k].double() - local_state[k].double()))
        for k in encoder_keys
        if global_state[k].is_floating_point() and global_state[k].ndim >= 2
    ]
    return sum(norms) / len(norms) if norms else 0.0


@LOCAL_ALGORITHMS.register("fedu")
class FedU(LocalAlgorithm):
    """Start from the global predictor only when the encoder has not diverged (D_k < μ).

    Parameters
    ----------
    mu : float
        Threshold μ >= 0 on D_k (EasyFL: 0.4).
    predictor : str
        Parameter group (:data:`~fedcore.models.groups.PARAM_GROUPS`) that is the predictor.
    """

    needs_local_state = True

    def __init__(self, *, mu: float = FedUConfig.mu, predictor: str = FedUConfig.predictor) -> None:
        if not mu >= 0:
            raise ValueError(f"fedu: 'mu' must be >= 0. Got {mu!r}.")
        self.mu = float(mu)
        self.predictor = PARAM_GROUPS.build(predictor)
        self.predictor_name = predictor

    def use_global_predictor(self, global_state: StateDict, local_state: StateDict, model: nn.Module) -> bool:
        """D_k < μ, with D_k over the entries outside the predictor."""
        predictor = set(self.predictor.keys(model, global_state))
        encoder = [k for k in global_state if k not in predictor]
        return encoder_divergence(global_state, local_state, encoder) < self.mu

    def start_state(self, global_state: StateDict, local_state: StateDict | None, model: nn.Module) -> StateDict:
        """The global state, with the local predictor when D_k >= μ (always global before the first round)."""
        if local_state is None or self.use_global_predictor(global_state, local_state, model):
            return global_state
        start = dict(global_state)
        for key in self.predictor.keys(model, global_state):
            start[key] = local_state[key]
        return start

    def __repr__(self) -> str:
        return f"FedU(mu={self.mu!r}, predictor={self.predictor_name!r})"
