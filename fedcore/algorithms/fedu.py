"""FedU's divergence-aware predictor update (Zhuang et al., ICCV 2021, arXiv:2108.07931, §3.3; EasyFL FedSSL).

FedU is defined for BYOL clients (``ssl.method: byol``): an online network (encoder: backbone + projector, and a
predictor) trained to predict the projection of an EMA *target* network. Clients send the online encoder and the
predictor; the server averages them (FedAvg). At the start of a round, client k measures how far the global encoder
it received, W_g, is from its own online encoder of its last round, W_k, over the encoder's weight tensors
l = 1..L (conv and linear kernels, rank >= 2; biases and BatchNorm entries are left out):

    absolute (the paper's, EasyFL):  D_k = (1/L) Σ_l ‖W_g,l − W_k,l‖₂
    relative [A] (default):          D_k = (1/L) Σ_l ‖W_g,l − W_k,l‖₂ / ‖W_g,l‖₂

and starts from the **global predictor** if D_k < μ, otherwise keeps its **local predictor** (the one it trained
last, read from the client store). The encoder always starts from the global one. Before a client's first round
it has no predictor of its own and takes the global one.

Scale of μ. EasyFL's μ = 0.4 (``--dapu_threshold``) is an L2 distance for ResNet-18 on CIFAR: a raw distance
grows with the size of the tensors and with the learning rate, so it transfers to no other model or method (in
the FASSL matrix the "FedU" cells of Barlow Twins, lr 0.0005, and ACOP, lr 0.01, reproduced FedAvg exactly and
SimCLR's, lr 0.05, did not: most likely no client's raw D_k reached 0.4 at the smaller steps). The relative form
divides each tensor's change by its norm, so μ is a fraction of the weights' size; ``fedu.mu_scale: absolute``
keeps the paper's literal rule.

Default μ = 0.022 (relative), chosen from divergences, not accuracies: BYOL on the FASSL CNN (width 16, depth 4,
FSDD log-mels, 10 Dirichlet-0.1 clients, 1 local epoch, batch 64, SGD lr 0.05, momentum 0.9, FedAvg; 4 rounds)
gives relative D_k of 0.068–0.103 (median 0.077) after the first round from random init and 0.015–0.035 (quartiles
0.020 / 0.0225 / 0.028) after rounds 2–4. μ at that median splits the clients about in half once training has
settled (share on the global predictor 0.4, 0.5, 0.3 in rounds 3–5), and every client keeps its local predictor
after the large first step. The absolute D_k of the same runs is 0.31–0.45, then 0.07–0.15: μ = 0.4 sends 70% of
the clients to the global predictor at round 2 and all of them after, i.e. FedAvg. Other learning rates or epochs
move these values: measure ``fedu_divergence_mean`` of a run before changing μ.

Departures [A], documented:

- *When D_k is measured.* EasyFL measures it at the end of round r between the global encoder the client started
  from and its trained one (‖W_g^r − W_k^r‖) and applies the decision at the client's next round; here it is
  measured at that next round against the newest global encoder (‖W_g^{r'} − W_k^r‖), which needs only the state
  the client keeps. Both are the client's distance from the federation's consensus after its local training.
- *Target network.* EasyFL FedU keeps each client's target encoder between rounds; here BYOL's target is a copy
  of the online network made at the start of every round (:mod:`fedcore.ssl.methods`), i.e. EasyFL's
  ``update_encoder: both``; the target is never sent or kept.
- *Divergence tensors.* EasyFL averages over the backbone's conv weights only; here every weight tensor of the
  encoder (backbone and projector, conv and linear), so models without convolutions are covered.
- *Supervised models* have no predictor: their classifier head stands in for it (group ``predictor`` falls back
  to the head) [A: PAPERS.md §4]. A self-supervised method without a predictor (SimCLR, Barlow Twins, ACOP) is
  refused at params check: there FedU would pick between a global and a local *projector*, which is not FedU.
- Under ``federation.send: backbone`` the heads never leave the clients, so the predictor is always the local
  one and FedU reduces to FedAvg-bb; run it with ``send: all``.

Each client reports ``fedu_global_predictor`` (1 when it started from the global predictor) and, when it has a
state of its own, ``fedu_divergence`` (D_k in the configured scale); the round metrics hold their means (the
share of clients that took the global predictor, so a run shows whether the rule switches at all).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from fedcore.aggregation.state import StateDict
from fedcore.algorithms.base import LOCAL_ALGORITHMS, ClientJob, ClientResult, LocalAlgorithm
from fedcore.config import FEDU_MU_SCALES, FedUConfig
from fedcore.models.groups import PARAM_GROUPS


def encoder_divergence(global_state: StateDict, local_state: StateDict, encoder_keys: list[str],
                       scale: str = "absolute") -> float:
    """D_k over the floating ``encoder_keys`` of rank >= 2: the mean per-tensor L2 distance (see the module doc).

    ``scale="relative"`` divides each tensor's distance by the global tensor's norm (tensors whose global norm is
    0 are left out). 0 when no tensor counts.
    """
    if scale not in FEDU_MU_SCALES:
        raise ValueError(f"fedu: 'mu_scale' must be one of {', '.join(FEDU_MU_SCALES)}. Got {scale!r}.")
    values = []
    for key in encoder_keys:
        reference = global_state[key]
        if not reference.is_floating_point() or reference.ndim < 2:
            continue
        reference = reference.double()
        distance = float(torch.linalg.vector_norm(reference - local_state[key].double()))
        if scale == "relative":
            size = float(torch.linalg.vector_norm(reference))
            if size == 0.0:
                continue
            distance /= size
        values.append(distance)
    return sum(values) / len(values) if values else 0.0


@LOCAL_ALGORITHMS.register("fedu")
class FedU(LocalAlgorithm):
    """Start from the global predictor only when the encoder has not diverged (D_k < μ).

    Parameters
    ----------
    mu : float
        Threshold μ >= 0 on D_k.
    mu_scale : str
        ``relative`` (D_k per unit of weight norm) or ``absolute`` (the paper's L2 distance; EasyFL μ = 0.4).
    predictor : str
        Parameter group (:data:`~fedcore.models.groups.PARAM_GROUPS`) that is the predictor: ``predictor`` is
        BYOL's predictor head (the classifier of a supervised model).
    """

    needs_local_state = True

    def __init__(self, *, mu: float = FedUConfig.mu, mu_scale: str = FedUConfig.mu_scale,
                 predictor: str = FedUConfig.predictor) -> None:
        if not mu >= 0:
            raise ValueError(f"fedu: 'mu' must be >= 0. Got {mu!r}.")
        if mu_scale not in FEDU_MU_SCALES:
            raise ValueError(f"fedu: 'mu_scale' must be one of {', '.join(FEDU_MU_SCALES)}. Got {mu_scale!r}.")
        self.mu = float(mu)
        self.mu_scale = mu_scale
        self.predictor = PARAM_GROUPS.build(predictor)
        self.predictor_name = predictor

    def predictor_keys(self, model: nn.Module, state: StateDict) -> list[str]:
        """The entries of ``state`` that are the predictor."""
        return self.predictor.keys(model, state)

    def divergence(self, global_state: StateDict, local_state: StateDict, model: nn.Module) -> float:
        """D_k (in :attr:`mu_scale`) over the entries outside the predictor: the online encoder."""
        predictor = set(self.predictor_keys(model, global_state))
        encoder = [k for k in global_state if k not in predictor]
        return encoder_divergence(global_state, local_state, encoder, self.mu_scale)

    def use_global_predictor(self, global_state: StateDict, local_state: StateDict, model: nn.Module) -> bool:
        """D_k < μ."""
        return self.divergence(global_state, local_state, model) < self.mu

    def start_state(self, global_state: StateDict, local_state: StateDict | None, model: nn.Module) -> StateDict:
        """The global state, with the local predictor when D_k >= μ (always global before the first round)."""
        if local_state is None or self.use_global_predictor(global_state, local_state, model):
            return global_state
        start = dict(global_state)
        for key in self.predictor_keys(model, global_state):
            start[key] = local_state[key]
        return start

    def run(self, job: ClientJob) -> ClientResult:
        """FedAvg's round from :meth:`start_state`; the update's metrics also say which predictor it started from.

        ``fedu_global_predictor``: 1.0 or 0.0; ``fedu_divergence``: D_k, only when the client has a kept state.
        """
        result = super().run(job)
        metrics = dict(result.update.metrics)
        if job.local_state is None:
            metrics["fedu_global_predictor"] = 1.0
        else:
            received = self.personal_state(job.global_state, job.local_state, job.sent_keys)
            divergence = self.divergence(received, job.local_state, job.model)
            metrics["fedu_divergence"] = divergence
            metrics["fedu_global_predictor"] = float(divergence < self.mu)
        return replace(result, update=replace(result.update, metrics=metrics))

    def __repr__(self) -> str:
        return f"FedU(mu={self.mu!r}, mu_scale={self.mu_scale!r}, predictor={self.predictor_name!r})"
