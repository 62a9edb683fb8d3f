"""Self-supervised objectives for federated pretraining on unlabelled audio (FASSL, PAPERS.md §4).

FASSL (Rehman et al., 2024, arXiv:2402.02889) compares feature-matching methods (SimCLR, Barlow Twins) with a
predictive one (ACOP, audio clip order prediction) under several aggregators; FedU (Zhuang et al., ICCV 2021,
arXiv:2108.07931) needs BYOL's online/target networks with a predictor. Each method here is an
:class:`~fedcore.algorithms.base.Objective`: the one local training loop (:func:`~fedcore.algorithms.base.
train_client`) calls its session once per minibatch, so every client-side rule (FedAvg, FedProx, FedU) and every
aggregator works with it unchanged. The labels are never read.

The model (:class:`SSLModel`) is a registered model with its classifier removed (the *backbone*, whose output is
the embedding the downstream tasks score) plus the method's heads, ``projector`` and, for BYOL, ``predictor``.
The heads are the model's head modules, so ``federation.send: backbone`` keeps them on the clients (FASSL's
"-bb"). FedU's predictor (parameter group ``predictor``) is BYOL's ``predictor`` head alone; the projector belongs
to the online encoder, as in EasyFL's FedSSL, and FedU over a method without a predictor is refused at params
check (see :mod:`fedcore.algorithms.fedu`).

Views
    SimCLR, Barlow Twins and BYOL see two views of each example, each drawn by the augmentation pipeline
    (``ssl.augment``; default :data:`~fedcore.ssl.augment.DEFAULT_AUGMENT`) from the client's generator.
ACOP [A]
    N consecutive clips are cut from each example's real audio: with ``span: valid`` (default) from the frames
    between its first and last non-padding frame (:func:`~fedcore.ssl.losses.valid_frames`; padding added by
    ``features.pad: end`` or ``center`` is left out, so no clip is silence that any position could hold), with
    ``span: all`` from all T frames. The span's v frames give clips of ⌊v/N⌋ frames; a random ``gap`` share of
    each clip's frames is dropped (a random crop of length ⌈(1 − gap)·⌊v/N⌋⌉ inside each clip, as VCOP leaves
    gaps between clips, Xu et al., CVPR 2019), so neighbouring clips do not join seamlessly, and a short
    example's clips are padded to the common length ⌈(1 − gap)·⌊T/N⌋⌉ with its own padding frame. The clips are
    shuffled by one of the N! orders, each is embedded by the backbone, and the projector classifies the order
    from the concatenated embeddings (cross-entropy over N! classes). Tiled features (``pad: repeat``) have no
    padding to find: a clip may repeat another, so ACOP needs ``pad: end`` or ``center`` features.
BYOL [A]
    The target network (backbone + projector) is a copy of the online one made at the start of each client's
    round and updated by EMA (rate ``tau``) after every step; it is not sent, kept or aggregated, so every round
    starts from the global model's online weights. (EasyFL's FedU keeps each client's target encoder between
    rounds, ``update_encoder: online``; restarting it from the received online encoder is its ``both`` option.)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedcore.algorithms.base import Objective, ObjectiveSession
from fedcore.config import ModelConfig
from fedcore.models.build import build_model, seeded_init
from fedcore.registry import Registry
from fedcore.ssl.augment import DEFAULT_AUGMENT, AugmentPipeline, build_augmenter
from fedcore.ssl.losses import (
    barlow_twins_loss,
    byol_loss,
    nt_xent,
    permutations,
    shuffle_clips,
    split_clips,
    valid_frames,
)

SSL_METHODS: Registry[Objective] = Registry("ssl_method")
SSL_METHODS.register("none")(Objective)  # supervised cross-entropy: the default of ssl.method


def _real(value: Any) -> bool:
    """Whether ``value`` is an int or a float (not a bool): what a method's float options take."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def backbone_of(model: nn.Module) -> tuple[nn.Module, int]:
    """Replace ``model.classifier`` (an ``nn.Linear``) by the identity; return the model and the embedding size.

    Raises
    ------
    ValueError
        If the model has no ``nn.Linear`` named ``classifier``.
    """
    classifier = getattr(model, "classifier", None)
    if not isinstance(classifier, nn.Linear):
        raise ValueError(f"backbone_of: the model must have an nn.Linear 'classifier' to remove. "
                         f"Got {type(classifier).__name__} on {type(model).__name__}.")
    model.classifier = nn.Identity()
    return model, int(classifier.in_features)


def mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    """Linear → BatchNorm1d → ReLU → Linear (the SimCLR/BYOL projector shape)."""
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim_out))


class SSLModel(nn.Module):
    """A backbone and the heads of a self-supervised method; ``forward`` returns the backbone's embedding.

    Parameters
    ----------
    backbone : torch.nn.Module
        Maps log-mel ``(batch, 1, n_mels, frames)`` to embeddings ``(batch, embedding_dim)``.
    embedding_dim : int
    projector : torch.nn.Module
        The method's head (ACOP: the order classifier).
    predictor : torch.nn.Module or None
        BYOL's predictor.
    """

    #: Kept on the clients under ``federation.send: backbone`` (see fedcore.models.groups).
    head_modules = ("projector", "predictor")

    def __init__(self, backbone: nn.Module, embedding_dim: int, projector: nn.Module,
                 predictor: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.embedding_dim = embedding_dim
        self.projector = projector
        self.predictor = predictor

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        """The embedding ``(batch, embedding_dim)`` of ``log_mel`` (what downstream tasks use)."""
        embedding: torch.Tensor = self.backbone(log_mel)
        return embedding


class SelfSupervised(Objective):
    """Base of the self-supervised methods: builds the :class:`SSLModel` and draws the augmented views.

    Parameters
    ----------
    projector_dim, hidden_dim : int
        Sizes of the heads.
    augment : sequence of mapping or None
        Augmentation pipeline (:func:`~fedcore.ssl.augment.build_augmenter`); None: :attr:`default_augment`.
    """

    uses_labels = False
    #: Whether the model has a BYOL-style ``predictor`` head (what FedU's divergence-aware update needs).
    has_predictor = False
    #: The augmentation pipeline when ``augment`` is None.
    default_augment: Sequence[Mapping[str, Any]] = DEFAULT_AUGMENT
    name = "ssl"

    def __init__(self, *, projector_dim: int = 128, hidden_dim: int = 256,
                 augment: Sequence[Mapping[str, Any]] | None = None) -> None:
        for option, value in (("projector_dim", projector_dim), ("hidden_dim", hidden_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: '{option}' must be an int >= 1. Got {value!r}.")
        self.projector_dim = projector_dim
        self.hidden_dim = hidden_dim
        self.augment: AugmentPipeline = build_augmenter(self.default_augment if augment is None else augment)

    def heads(self, embedding_dim: int) -> tuple[nn.Module, nn.Module | None]:
        """The projector and the predictor (None) for a backbone of ``embedding_dim``."""
        return mlp(embedding_dim, self.hidden_dim, self.projector_dim), None

    def build_model(self, cfg: ModelConfig, num_classes: int, input_shape: tuple[int, int, int],
                    generator: torch.Generator) -> nn.Module:
        """The backbone of model ``cfg`` and this method's heads, drawn from ``generator`` in that order.

        ``num_classes`` is not used: the classifier is removed.
        """
        backbone, dim = backbone_of(build_model(cfg, 1, input_shape, generator))
        with seeded_init(generator):
            projector, predictor = self.heads(dim)
        return SSLModel(backbone, dim, projector, predictor)

    def views(self, inputs: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independently augmented views of the batch."""
        return self.augment(inputs, generator), self.augment(inputs, generator)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(projector_dim={self.projector_dim}, hidden_dim={self.hidden_dim})"


class _Session(ObjectiveSession):
    """A method bound to one client's :class:`SSLModel`.

    The two-view methods skip a batch of fewer than two examples (their losses compare examples of a batch, and
    the projector's BatchNorm needs two); ACOP uses any batch.
    """

    def __init__(self, method: Any, model: nn.Module) -> None:
        if not isinstance(model, SSLModel):
            raise TypeError(f"{method.name}: the model must be an SSLModel (ssl.method set). "
                            f"Got {type(model).__name__}.")
        self.method = method
        self.model = model

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Projector output of the backbone's embedding."""
        projected: torch.Tensor = self.model.projector(self.model.backbone(x))
        return projected


@SSL_METHODS.register("simclr")
class SimCLR(SelfSupervised):
    """SimCLR (Chen et al., ICML 2020, arXiv:2002.05709): NT-Xent between the projections of two views.

    Parameters
    ----------
    temperature : float
        τ > 0 of NT-Xent.
    projector_dim, hidden_dim, augment
        As :class:`SelfSupervised`.
    """

    name = "simclr"

    def __init__(self, *, temperature: float = 0.2, projector_dim: int = 128, hidden_dim: int = 256,
                 augment: Sequence[Mapping[str, Any]] | None = None) -> None:
        if not (_real(temperature) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"simclr: 'temperature' must be a finite float > 0. Got {temperature!r}.")
        super().__init__(projector_dim=projector_dim, hidden_dim=hidden_dim, augment=augment)
        self.temperature = float(temperature)

    def start(self, model: nn.Module) -> ObjectiveSession:
        """Bind to ``model``."""
        return _SimCLRSession(self, model)


class _SimCLRSession(_Session):
    def loss(self, inputs: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, int | None] | None:
        if inputs.shape[0] < 2:
            return None
        first, second = self.method.views(inputs, generator)
        return nt_xent(self.project(first), self.project(second), self.method.temperature), None


@SSL_METHODS.register("barlow_twins")
class BarlowTwins(SelfSupervised):
    """Barlow Twins (Zbontar et al., ICML 2021, arXiv:2103.03230): cross-correlation of two views towards I.

    Parameters
    ----------
    lambd : float
        λ >= 0, weight of the off-diagonal (redundancy) term.
    projector_dim, hidden_dim, augment
        As :class:`SelfSupervised`.
    """

    name = "barlow_twins"

    def __init__(self, *, lambd: float = 0.005, projector_dim: int = 128, hidden_dim: int = 256,
                 augment: Sequence[Mapping[str, Any]] | None = None) -> None:
        if not (_real(lambd) and math.isfinite(lambd) and lambd >= 0):
            raise ValueError(f"barlow_twins: 'lambd' must be a finite float >= 0. Got {lambd!r}.")
        super().__init__(projector_dim=projector_dim, hidden_dim=hidden_dim, augment=augment)
        self.lambd = float(lambd)

    def start(self, model: nn.Module) -> ObjectiveSession:
        """Bind to ``model``."""
        return _BarlowSession(self, model)


class _BarlowSession(_Session):
    def loss(self, inputs: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, int | None] | None:
        if inputs.shape[0] < 2:
            return None
        first, second = self.method.views(inputs, generator)
        return barlow_twins_loss(self.project(first), self.project(second), self.method.lambd), None


@SSL_METHODS.register("byol")
class BYOL(SelfSupervised):
    """BYOL (Grill et al., NeurIPS 2020, arXiv:2006.07733): predict the target's projection of the other view.

    The target is an EMA of the online backbone and projector (see the module docstring).

    Parameters
    ----------
    tau : float
        EMA rate in [0, 1): target ← τ·target + (1 − τ)·online after each step.
    projector_dim, hidden_dim, augment
        As :class:`SelfSupervised`.
    """

    name = "byol"
    has_predictor = True

    def __init__(self, *, tau: float = 0.99, projector_dim: int = 128, hidden_dim: int = 256,
                 augment: Sequence[Mapping[str, Any]] | None = None) -> None:
        if not (_real(tau) and 0.0 <= tau < 1.0):
            raise ValueError(f"byol: 'tau' must be in [0, 1). Got {tau!r}.")
        super().__init__(projector_dim=projector_dim, hidden_dim=hidden_dim, augment=augment)
        self.tau = float(tau)

    def heads(self, embedding_dim: int) -> tuple[nn.Module, nn.Module | None]:
        """Projector and predictor (both MLPs; the predictor maps projections to projections)."""
        return (mlp(embedding_dim, self.hidden_dim, self.projector_dim),
                mlp(self.projector_dim, self.hidden_dim, self.projector_dim))

    def start(self, model: nn.Module) -> ObjectiveSession:
        """Bind to ``model`` and copy its backbone and projector as this round's target network."""
        return _BYOLSession(self, model)


class _BYOLSession(_Session):
    def __init__(self, method: BYOL, model: nn.Module) -> None:
        super().__init__(method, model)
        online = nn.Sequential(self.model.backbone, self.model.projector)
        self.online = online
        self.target = copy.deepcopy(online).requires_grad_(False)

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, int | None] | None:
        if inputs.shape[0] < 2:
            return None
        first, second = self.method.views(inputs, generator)
        predictor = self.model.predictor
        assert predictor is not None, "BYOL's heads include a predictor"
        with torch.no_grad():
            target_first, target_second = self.target(first), self.target(second)
        loss = (byol_loss(predictor(self.online(first)), target_second)
                + byol_loss(predictor(self.online(second)), target_first))
        return loss, None

    def after_step(self) -> None:
        tau = self.method.tau
        with torch.no_grad():
            for target, online in zip(self.target.parameters(), self.online.parameters(), strict=True):
                target.mul_(tau).add_(online.detach(), alpha=1.0 - tau)


@SSL_METHODS.register("acop")
class ACOP(SelfSupervised):
    """Audio clip order prediction [A] (the audio VCOP of FedVSSL; PAPERS.md §4): classify the clips' order.

    The order of N shuffled clips is classified from their concatenated embeddings.

    Parameters
    ----------
    clips : int
        N in [2, 5] (N! classes; 3 by default).
    gap : float
        Share in [0, 1) of each clip's frames dropped at a random place.
    span : {"valid", "all"}
        Frames the clips are cut from: ``valid`` (default), each example's frames between its first and last
        non-padding frame (:func:`~fedcore.ssl.losses.valid_frames`); ``all``, all T frames, padding included
        (the behaviour before issue 21). The paper leaves it open [A]: with padding in the span, the clips of a
        short example are partly or wholly silence, whose order cannot be told.
    projector_dim, hidden_dim, augment
        As :class:`SelfSupervised`.

    Notes
    -----
    Neither span helps with tiled features (``features.pad: repeat``): a short clip repeated to T frames has no
    padding to find, and its clip 3 can be a copy of clip 1. Use ``pad: end`` or ``center`` features with ACOP.
    """

    name = "acop"
    default_augment: Sequence[Mapping[str, Any]] = ()
    #: The values of ``span``.
    spans = ("valid", "all")

    def __init__(self, *, clips: int = 3, gap: float = 0.2, span: str = "valid", projector_dim: int = 128,
                 hidden_dim: int = 256, augment: Sequence[Mapping[str, Any]] | None = None) -> None:
        if isinstance(clips, bool) or not isinstance(clips, int) or not 2 <= clips <= 5:
            raise ValueError(f"acop: 'clips' must be an int in [2, 5]. Got {clips!r}.")
        if not (_real(gap) and 0.0 <= gap < 1.0):
            raise ValueError(f"acop: 'gap' must be in [0, 1). Got {gap!r}.")
        if not isinstance(span, str) or span not in self.spans:
            raise ValueError(f"acop: 'span' must be one of {', '.join(self.spans)}. Got {span!r}.")
        super().__init__(projector_dim=projector_dim, hidden_dim=hidden_dim, augment=augment)
        self.clips = clips
        self.gap = float(gap)
        self.span = span
        self.orders = permutations(clips)

    def heads(self, embedding_dim: int) -> tuple[nn.Module, nn.Module | None]:
        """The order classifier: concatenated clip embeddings → hidden → N! logits."""
        return nn.Sequential(nn.Linear(self.clips * embedding_dim, self.hidden_dim), nn.ReLU(inplace=True),
                             nn.Linear(self.hidden_dim, len(self.orders))), None

    def cut(self, inputs: torch.Tensor, generator: torch.Generator,
            reference: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, N, C, M, t')``: N consecutive clips of each example, each cropped at a random offset.

        ``t' = ⌈(1 − gap)·⌊T/N⌋⌉``. With ``span: all`` clip ``i`` is cut from frames ``[i·L, (i + 1)·L)``,
        ``L = ⌊T/N⌋`` (:func:`~fedcore.ssl.losses.split_clips`). With ``span: valid`` an example whose span
        (:func:`~fedcore.ssl.losses.valid_frames` of ``reference``) is frames ``[s, s + v)`` has clips of
        ``l = ⌊v/N⌋`` frames, clip ``i`` cut from ``[s + i·l, s + (i + 1)·l)``, each cropped to
        ``⌈(1 − gap)·l⌉`` frames and padded at its end to ``t'`` with a padding frame of the example; an example
        without padding has ``v = T``, so its clips are cut from the windows of ``span: all`` (the offsets are
        drawn differently). An example whose span is shorter than N frames (all padding) is cut as one without.

        The spans are read before augmentation: an augmentation that moves frames in time (``time_shift``,
        ``time_crop``) moves the sound against them.

        Parameters
        ----------
        inputs : Tensor, shape (B, C, M, T)
            The batch the clips are taken from (augmented).
        generator : torch.Generator
            CPU source of the crop offsets.
        reference : Tensor, shape (B, C, M, T), optional
            The batch whose padding defines the spans (the un-augmented ``inputs``); default: ``inputs``.
        """
        if self.span == "all":
            return self._cut_all(inputs, generator)
        if reference is None:
            reference = inputs
        if reference.shape != inputs.shape:
            raise ValueError(f"acop: 'reference' must have the shape of 'inputs' {tuple(inputs.shape)!r}. "
                             f"Got {tuple(reference.shape)!r}.")
        split_clips(inputs, self.clips)  # checks the shape and that T // N >= 1
        batch, frames, n = inputs.shape[0], inputs.shape[-1], self.clips
        longest = frames // n
        width = max(1, math.ceil((1.0 - self.gap) * longest))  # t'
        start, stop = (bound.cpu() for bound in valid_frames(reference))
        short = stop - start < n
        start = torch.where(short, 0, start)
        stop = torch.where(short, frames, stop)
        length = (stop - start) // n  # l per example, <= longest
        kept = torch.ceil((1.0 - self.gap) * length.to(torch.float64)).to(torch.int64).clamp(min=1)  # <= width
        draws = torch.rand((batch, n), generator=generator, dtype=torch.float64)
        offsets = (draws * (length - kept + 1)[:, None].to(torch.float64)).floor().to(torch.int64)
        offsets = torch.minimum(offsets, (length - kept)[:, None])  # (B, N), in [0, l - kept]
        first = start[:, None] + torch.arange(n) * length[:, None] + offsets  # (B, N): each clip's first frame
        step = torch.arange(width)
        filler = torch.where(stop < frames, stop, torch.clamp(start - 1, min=0))  # a padding frame, if any
        index = torch.where(step < kept[:, None, None], first[:, :, None] + step, filler[:, None, None])
        index = index.to(inputs.device)[:, :, None, None, :].expand(batch, n, *inputs.shape[1:-1], width)
        return torch.gather(inputs.unsqueeze(1).expand(batch, n, *inputs.shape[1:]), -1, index)

    def _cut_all(self, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """:meth:`cut` with ``span: all``."""
        clips = split_clips(inputs, self.clips)
        length = clips.shape[-1]
        kept = max(1, math.ceil((1.0 - self.gap) * length))
        if kept == length:
            return clips
        batch = clips.shape[0]
        offsets = torch.randint(0, length - kept + 1, (batch, self.clips), generator=generator)
        frames = (offsets[:, :, None] + torch.arange(kept)).to(clips.device)  # (B, N, t')
        index = frames[:, :, None, None, :].expand(*clips.shape[:-1], kept)
        return torch.gather(clips, -1, index)

    def start(self, model: nn.Module) -> ObjectiveSession:
        """Bind to ``model``."""
        return _ACOPSession(self, model)


class _ACOPSession(_Session):
    def loss(self, inputs: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, int | None] | None:
        method: ACOP = self.method
        clips = method.cut(method.augment(inputs, generator), generator, reference=inputs)
        shuffled, orders = shuffle_clips(clips, generator)
        batch, count = shuffled.shape[:2]
        embeddings = self.model.backbone(shuffled.flatten(0, 1)).reshape(batch, count * self.model.embedding_dim)
        logits = self.model.projector(embeddings)
        loss = F.cross_entropy(logits, orders)
        return loss, int((logits.detach().argmax(dim=1) == orders).sum())


def build_method(name: str, options: Mapping[str, Any]) -> Objective:
    """The objective ``name`` built with exactly ``options`` (:meth:`~fedcore.config.SSLConfig.method_kwargs`).

    Raises
    ------
    ValueError
        If ``name`` is not registered, or ``options`` holds a key its class does not take (never dropped).
    """
    accepted = SSL_METHODS.options(name)
    if unknown := sorted(set(options) - set(accepted)):
        raise ValueError(f"ssl method {name!r}: unknown options {unknown}; it takes {sorted(accepted)}.")
    return SSL_METHODS.build(name, **options)


__all__ = ["ACOP", "BYOL", "SSL_METHODS", "BarlowTwins", "SSLModel", "SelfSupervised", "SimCLR", "backbone_of",
           "build_method", "mlp"]
