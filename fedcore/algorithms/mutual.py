"""Rules where every client trains a personal model of its own: FML, FedMLAC and local-only training.

**Deep mutual learning** (Federated Mutual Learning, Shen et al., arXiv:2006.16765, reference code
ZJU-DAI/Federated-Mutual-Learning ``src/Trainer.py``; FedMLAC, Bai et al., arXiv:2506.10207). Client k holds a
personal model F_k (weights ω_k, any architecture, never sent) and a copy of the shared model F_g (FML's *meme*,
FedMLAC's *Plug-in*; weights θ, forked from the global model at the start of each round). On every minibatch both
run forward and each is trained with the other as a detached teacher:

    L_personal = α · CE(z_k, y) + (1 − α) · s · KL( softmax(z_g / T) ‖ softmax(z_k / T) )
    L_shared   = β · CE(z_g, y) + (1 − β) · s · KL( softmax(z_k / T) ‖ softmax(z_g / T) )

with z_k = F_k(x), z_g = F_g(x), the teacher's distribution detached, KL averaged over the batch ("batchmean":
summed over classes, divided by the batch size, as ``torch.nn.KLDivLoss(reduction="batchmean")``) and
s = T² when ``t2_scale`` (Hinton et al. 2015) else 1. Both optimisers step on every batch. The shared model's
optimiser is made anew each round (FML's fork); the personal model's SGD momentum carries over rounds when
``keep_optimizer`` (FML's ``Node`` keeps its local optimiser). Only the shared model is sent.

FedMLAC's client objective is the same; what differs is the set-up: personal models of different architectures
(``personal`` section), a lightweight Plug-in as the shared model, and layer-wise pruning aggregation (``lpa``)
as the server's default. The Plug-in's own loss is not published; by symmetry with FML it is L_shared above
(PAPERS.md §1, [A]).

**Local-only training** is the no-federation baseline: each client trains its personal model with plain SGD on
its own data (cross-entropy only, optimiser made anew each round, as FedAvg's clients) and never receives
anything; the shared model it sends back is the one it was given, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedcore.aggregation.base import ClientUpdate
from fedcore.aggregation.state import StateDict, to_cpu_state
from fedcore.algorithms.base import (
    LOCAL_ALGORITHMS,
    PERSONAL_PREFIX,
    BatchLoss,
    ClientJob,
    ClientResult,
    LocalAlgorithm,
    LocalSettings,
    Objective,
    ObjectiveSession,
    check_generator,
    check_settings,
    train_client,
)
from fedcore.config import MutualConfig

#: Prefix of the personal optimiser's momentum buffers in a client's kept state.
OPTIMISER_PREFIX = "optim/"


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                    t2_scale: bool) -> torch.Tensor:
    """KL( softmax(teacher / T) ‖ softmax(student / T) ), batchmean, times T² when ``t2_scale``; teacher detached.

    Parameters
    ----------
    student_logits, teacher_logits : Tensor
        ``(batch, classes)`` logits; gradients flow to the student only.
    temperature : float
        T > 0.
    t2_scale : bool
        Multiply by T².

    Returns
    -------
    Tensor
        A scalar: Σ_i Σ_c p_ic (log p_ic − log q_ic) / batch, with p the teacher's and q the student's softened
        distributions.
    """
    teacher = F.softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=1), teacher, reduction="batchmean")
    return kl * temperature**2 if t2_scale else kl


def mutual_losses(personal_logits: torch.Tensor, shared_logits: torch.Tensor, labels: torch.Tensor, *,
                  alpha: float, beta: float, temperature: float = 1.0,
                  t2_scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_personal, L_shared)`` of one minibatch (module docstring); each partner's output is detached."""
    personal = alpha * F.cross_entropy(personal_logits, labels) + (1.0 - alpha) * distillation_kl(
        personal_logits, shared_logits, temperature, t2_scale)
    shared = beta * F.cross_entropy(shared_logits, labels) + (1.0 - beta) * distillation_kl(
        shared_logits, personal_logits, temperature, t2_scale)
    return personal, shared


def split_personal(local_state: StateDict) -> tuple[StateDict, StateDict]:
    """``(personal model state, optimiser buffers)`` of a kept state, prefixes removed."""
    model = {k[len(PERSONAL_PREFIX):]: v for k, v in local_state.items() if k.startswith(PERSONAL_PREFIX)}
    buffers = {k[len(OPTIMISER_PREFIX):]: v for k, v in local_state.items() if k.startswith(OPTIMISER_PREFIX)}
    return model, buffers


def join_personal(model_state: StateDict, buffers: StateDict | None = None) -> StateDict:
    """Inverse of :func:`split_personal`."""
    joined = {PERSONAL_PREFIX + k: v for k, v in model_state.items()}
    joined.update({OPTIMISER_PREFIX + k: v for k, v in (buffers or {}).items()})
    return joined


class _PersonalRule(LocalAlgorithm):
    """Common parts of the rules with a personal model: its state is the kept state, under ``personal/``."""

    personal = True

    def personal_state(self, global_state: StateDict, local_state: StateDict | None,
                       sent_keys: Sequence[str]) -> StateDict:
        """The client's personal model weights (``personal/`` entries of its kept state)."""
        if local_state is None:
            raise ValueError(f"{type(self).__name__}: a client's kept state must hold its personal model. Got None.")
        return split_personal(local_state)[0]


def _personal_model(job: ClientJob, where: str) -> nn.Module:
    if job.personal_model is None or job.local_state is None:
        raise ValueError(f"{where}: client {job.client_id}: the job must carry a personal model and its state.")
    return job.personal_model


class MutualObjective(Objective):
    """Deep mutual learning as the objective of the shared model: the personal model and its optimiser are its own.

    For one client's round: each batch runs both models, the loss minimised is L_personal + L_shared (each
    partner detached, so one backward serves both), the shared model's step is the loop's and the personal model's
    is this objective's (:meth:`ObjectiveSession.after_step`). Reported: the shared model's cross-entropy and
    accuracy (``train_loss``, ``train_accuracy``), and the personal model's (``personal_train_loss``,
    ``personal_train_accuracy``), over the last epoch.
    """

    def __init__(self, rule: FederatedMutualLearning, personal: nn.Module, settings: LocalSettings,
                 momentum: StateDict | None = None) -> None:
        self.rule, self.personal = rule, personal
        self.personal_optimizer = torch.optim.SGD(personal.parameters(), lr=settings.lr,
                                                  momentum=settings.momentum, weight_decay=settings.weight_decay)
        if momentum is not None:
            _load_momentum(self.personal_optimizer, personal, momentum)

    def start(self, model: nn.Module) -> ObjectiveSession:
        """Bind to the shared model ``model``."""
        return _MutualSession(self, model)


class _MutualSession(ObjectiveSession):
    def __init__(self, objective: MutualObjective, shared: nn.Module) -> None:
        self.objective, self.shared = objective, shared

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> BatchLoss:
        """Both models' mutual losses; the shared model's cross-entropy reported."""
        rule, personal = self.objective.rule, self.objective.personal
        self.objective.personal_optimizer.zero_grad(set_to_none=True)
        z_personal, z_shared = personal(inputs), self.shared(inputs)
        loss_personal, loss_shared = mutual_losses(z_personal, z_shared, labels, alpha=rule.alpha, beta=rule.beta,
                                                   temperature=rule.temperature, t2_scale=rule.t2_scale)
        size = labels.shape[0]
        with torch.no_grad():
            shared_ce = float(F.cross_entropy(z_shared, labels))
            personal_ce = float(F.cross_entropy(z_personal, labels))
            sums = {"personal_train_loss": personal_ce * size,
                    "personal_train_accuracy": float((z_personal.argmax(dim=1) == labels).sum())}
            correct = int((z_shared.argmax(dim=1) == labels).sum())
        return BatchLoss(loss_personal + loss_shared, correct, shared_ce, sums)

    def after_step(self) -> None:
        """The personal model's step."""
        self.objective.personal_optimizer.step()


@LOCAL_ALGORITHMS.register("fml")
class FederatedMutualLearning(_PersonalRule):
    """FML client: personal model and meme model trained by deep mutual learning (module docstring).

    Parameters
    ----------
    alpha, beta : float
        Weights of the cross-entropy in the personal and the shared model's losses, in [0, 1].
    temperature : float
        T > 0 of the softened distributions.
    t2_scale : bool
        Multiply the KL terms by T².
    keep_optimizer : bool
        Carry the personal model's momentum buffers over rounds.
    """

    def __init__(self, *, alpha: float = MutualConfig.alpha, beta: float = MutualConfig.beta,
                 temperature: float = MutualConfig.temperature, t2_scale: bool = MutualConfig.t2_scale,
                 keep_optimizer: bool = MutualConfig.keep_optimizer) -> None:
        name = type(self).__name__
        for key, value in (("alpha", alpha), ("beta", beta)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: '{key}' must be in [0, 1]. Got {value!r}.")
        if not temperature > 0:
            raise ValueError(f"{name}: 'temperature' must be > 0. Got {temperature!r}.")
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.t2_scale, self.keep_optimizer = bool(t2_scale), bool(keep_optimizer)

    def run(self, job: ClientJob) -> ClientResult:
        """Fork the shared model from the global state, train both models together, send the shared one."""
        where = type(self).__name__
        personal = _personal_model(job, where)
        check_settings(job.settings, where)
        check_generator(job.generator, where)
        assert job.local_state is not None
        personal_start, buffers = split_personal(job.local_state)
        personal.load_state_dict(personal_start, strict=True)
        personal.train()
        objective = MutualObjective(self, personal, job.settings, buffers if self.keep_optimizer else None)
        trained = train_client(client_id=job.client_id, model=job.model, global_state=job.global_state,
                               data=job.data, algorithm=self, settings=job.settings, generator=job.generator,
                               objective=objective)
        update = ClientUpdate(job.client_id, {k: trained.state[k] for k in job.sent_keys}, trained.num_examples,
                              trained.metrics)
        kept = _momentum(objective.personal_optimizer, personal) if self.keep_optimizer else None
        return ClientResult(update, join_personal(to_cpu_state(personal), kept))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(alpha={self.alpha!r}, beta={self.beta!r}, temperature={self.temperature!r}, "
                f"t2_scale={self.t2_scale!r}, keep_optimizer={self.keep_optimizer!r})")


@LOCAL_ALGORITHMS.register("fedmlac")
class FedMLAC(FederatedMutualLearning):
    """FedMLAC client: FML's mutual learning between a personal model and the shared Plug-in; server ``lpa``."""

    default_aggregator = "lpa"


@LOCAL_ALGORITHMS.register("local")
class LocalOnly(_PersonalRule):
    """Local-only baseline: each client trains its personal model alone and sends back what it received."""

    def has_global_model(self, sends_everything: bool) -> bool:
        """No shared model is trained: the test metrics average the clients' own models."""
        return False

    def run(self, job: ClientJob) -> ClientResult:
        """Plain local SGD of the personal model (:func:`train_client`); the global entries go back unchanged."""
        personal = _personal_model(job, type(self).__name__)
        assert job.local_state is not None
        start = split_personal(job.local_state)[0]
        trained = train_client(client_id=job.client_id, model=personal, global_state=start, data=job.data,
                               algorithm=self, settings=job.settings, generator=job.generator)
        update = ClientUpdate(job.client_id, {k: job.global_state[k] for k in job.sent_keys}, trained.num_examples,
                              trained.metrics)
        return ClientResult(update, join_personal(trained.state))


def _load_momentum(optimizer: torch.optim.Optimizer, model: nn.Module, buffers: StateDict) -> None:
    """Put the kept momentum buffers (by parameter name) into a fresh SGD optimiser's state."""
    for name, parameter in model.named_parameters():
        if name in buffers:
            optimizer.state[parameter]["momentum_buffer"] = buffers[name].to(parameter.device).clone()


def _momentum(optimizer: torch.optim.Optimizer, model: nn.Module) -> StateDict:
    """The SGD momentum buffers by parameter name (CPU copies; none when momentum is 0)."""
    kept = {}
    for name, parameter in model.named_parameters():
        buffer = optimizer.state.get(parameter, {}).get("momentum_buffer")
        if buffer is not None:
            kept[name] = buffer.detach().to("cpu", copy=True)
    return kept
