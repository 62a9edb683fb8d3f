"""Audio-visual model: an audio encoder, a visual encoder, a fusion head, and one unimodal head per modality.

Layout of :class:`AVModel` (top-level modules = parameter groups, the unit of modality-wise aggregation):

- ``audio``: any registered audio model (``model`` section: cnn, resnet, transformer) built with ``embed_dim``
  outputs, followed by a ReLU: log-mel ``(batch, 1, n_mels, frames)`` → ``(batch, embed_dim)``;
- ``visual``: :class:`VisualCNN`: an image ``(batch, C, H, W)``, or frames ``(batch, T, C, H, W)`` averaged over
  T after the per-frame encoder, → ``(batch, embed_dim)``;
- ``fusion``: a registered fusion (:data:`FUSIONS`: ``concat`` or ``attention``, as FedMultimodal's
  ``fuse_base``) with its classifier MLP: two embeddings → logits;
- ``audio_head`` / ``visual_head``: linear classifiers on one modality's embedding (audio-only clients; Harmony's
  unimodal stage).

:class:`AudioBranch` is the audio-only model (``audio`` + ``audio_head``, the same key names), what audio-only
clients deploy and what ModalityMirror's distillation trains as the student.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedcore.config import ModelConfig
from fedcore.models.build import build_model, seeded_init
from fedcore.registry import Registry

#: The parameter groups of :class:`AVModel`, in order.
GROUPS = ("audio", "visual", "fusion", "audio_head", "visual_head")

FUSIONS: Registry[nn.Module] = Registry("fusion")


class VisualCNN(nn.Module):
    """Small conv encoder for images (or per frame of a clip, then the mean over frames).

    Two 3×3 conv blocks (BatchNorm, ReLU), average-pooled to a 4×4 grid, flattened and projected.

    Parameters
    ----------
    input_shape : sequence of int
        ``(C, H, W)`` of one image or ``(T, C, H, W)`` of one clip of frames.
    width : int
        Channels of the first block (the second has twice as many).
    embed_dim : int
        Output size.
    """

    #: Side of the pooled feature grid that is flattened into the projection.
    GRID = 4

    def __init__(self, *, input_shape: Sequence[int], width: int, embed_dim: int) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) not in (3, 4) or min(shape) < 1:
            raise ValueError(f"VisualCNN: 'input_shape' must be (C, H, W) or (T, C, H, W) of ints >= 1. "
                             f"Got {tuple(input_shape)!r}.")
        self.frames = len(shape) == 4
        channels = shape[-3]
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(self.GRID),  # keeps the layout (a digit is its strokes' places), any input size
        )
        self.project = nn.Linear(2 * width * self.GRID * self.GRID, embed_dim)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        """Embed images ``(batch, C, H, W)`` or clips ``(batch, T, C, H, W)`` into ``(batch, embed_dim)``."""
        if self.frames:
            batch, steps = visual.shape[:2]
            per_frame = self.features(visual.flatten(0, 1)).flatten(1).view(batch, steps, -1)
            pooled = per_frame.mean(dim=1)
        else:
            pooled = self.features(visual).flatten(1)
        embedding: torch.Tensor = torch.relu(self.project(pooled))
        return embedding


class SeededDropout(nn.Module):
    """Dropout whose masks come from :attr:`generator` (set per client round), not from the global RNG.

    Clients train at once in threads; ``nn.Dropout`` would draw from the one global RNG in whatever order the
    threads run, so a rerun (or a resume) would not reproduce a round. With no generator set it draws from the
    global RNG like ``nn.Dropout``.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"SeededDropout: 'p' must be in [0, 1). Got {p!r}.")
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Zero each element with probability p and scale the rest by 1/(1-p) in training; identity in eval."""
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape, generator=self.generator, device=x.device) >= self.p
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        """Shown by ``repr(model)``."""
        return f"p={self.p}"


def seed_dropout(model: nn.Module, generator: torch.Generator | None) -> None:
    """Point every :class:`SeededDropout` of ``model`` at ``generator``."""
    for module in model.modules():
        if isinstance(module, SeededDropout):
            module.generator = generator


def _classifier(in_dim: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), SeededDropout(dropout),
                         nn.Linear(hidden, num_classes))


@FUSIONS.register("concat")
class ConcatFusion(nn.Module):
    """Concatenate the two embeddings, then an MLP classifier (FedMultimodal's default fusion)."""

    def __init__(self, *, embed_dim: int, hidden_dim: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.classifier = _classifier(2 * embed_dim, hidden_dim, num_classes, dropout)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Logits of the concatenated embeddings."""
        logits: torch.Tensor = self.classifier(torch.cat([audio, visual], dim=1))
        return logits


@FUSIONS.register("attention")
class AttentionFusion(nn.Module):
    """Additive attention over the two modality embeddings, ``Σ_m a_m h_m``, then an MLP classifier.

    ``a = softmax_m( v · tanh(W h_m) )``: the weight of each modality depends on its embedding, so the fusion can
    lean on audio when the visual embedding is uninformative (e.g. zero-filled missing video).
    """

    def __init__(self, *, embed_dim: int, hidden_dim: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 1))
        self.classifier = _classifier(embed_dim, hidden_dim, num_classes, dropout)

    def weights(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Attention weights ``(batch, 2)`` of (audio, visual), rows summing to 1."""
        stacked = torch.stack([audio, visual], dim=1)
        return torch.softmax(self.score(stacked).squeeze(-1), dim=1)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Logits of the attention-weighted sum of the embeddings."""
        weights = self.weights(audio, visual)
        fused = weights[:, :1] * audio + weights[:, 1:] * visual
        logits: torch.Tensor = self.classifier(fused)
        return logits


class AVModel(nn.Module):
    """Audio encoder, visual encoder, fusion classifier and the two unimodal heads (module docstring)."""

    def __init__(self, audio: nn.Module, visual: nn.Module, fusion: nn.Module, embed_dim: int,
                 num_classes: int, visual_shape: Sequence[int]) -> None:
        super().__init__()
        #: One example's visual shape (zeros of this shape stand for missing video).
        self.visual_shape = tuple(int(s) for s in visual_shape)
        self.audio = audio
        self.visual = visual
        self.fusion = fusion
        self.audio_head = nn.Linear(embed_dim, num_classes)
        self.visual_head = nn.Linear(embed_dim, num_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Fused logits of log-mel ``audio`` and ``visual`` (zeros stand for missing video)."""
        logits: torch.Tensor = self.fusion(self.audio(audio), self.visual(visual))
        return logits

    def audio_logits(self, audio: torch.Tensor) -> torch.Tensor:
        """Logits of the audio branch alone (``audio_head`` on the audio embedding)."""
        logits: torch.Tensor = self.audio_head(self.audio(audio))
        return logits

    def visual_logits(self, visual: torch.Tensor) -> torch.Tensor:
        """Logits of the visual branch alone."""
        logits: torch.Tensor = self.visual_head(self.visual(visual))
        return logits


class AudioBranch(nn.Module):
    """The audio-only model: ``audio`` encoder and ``audio_head`` (key names as in :class:`AVModel`)."""

    def __init__(self, audio: nn.Module, audio_head: nn.Module) -> None:
        super().__init__()
        self.audio = audio
        self.audio_head = audio_head

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """Logits of log-mel ``audio`` ``(batch, 1, n_mels, frames)``."""
        logits: torch.Tensor = self.audio_head(self.audio(audio))
        return logits


class _Embedding(nn.Module):
    """A registered audio model with ``embed_dim`` outputs, then a ReLU: the audio encoder."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        embedding: torch.Tensor = torch.relu(self.body(log_mel))
        return embedding


def build_av_model(*, audio_cfg: ModelConfig, audio_shape: tuple[int, int, int], visual_shape: Sequence[int],
                   num_classes: int, fusion: str, embed_dim: int, hidden_dim: int, visual_width: int,
                   dropout: float, generator: torch.Generator) -> AVModel:
    """Build an :class:`AVModel` with every weight drawn from ``generator`` (same generator state, same model).

    Parameters
    ----------
    audio_cfg : ModelConfig
        The audio encoder's registered model and size (its classifier outputs ``embed_dim`` features).
    audio_shape : tuple of int
        ``(1, n_mels, frames)``.
    visual_shape : sequence of int
        ``(C, H, W)`` or ``(T, C, H, W)``.
    num_classes : int
    fusion : str
        A :data:`FUSIONS` name.
    embed_dim, hidden_dim, visual_width : int
        Embedding size of both encoders, hidden size of the classifier MLP, first-block width of the visual CNN.
    dropout : float
        Dropout of the fusion classifier (FedMultimodal: 0.1).
    generator : torch.Generator
        CPU generator of the initial weights; advanced.
    """
    factory = FUSIONS.get(fusion)
    audio = _Embedding(build_model(audio_cfg, embed_dim, audio_shape, generator))
    with seeded_init(generator):
        visual = VisualCNN(input_shape=visual_shape, width=visual_width, embed_dim=embed_dim)
        head = factory(embed_dim=embed_dim, hidden_dim=hidden_dim, num_classes=num_classes, dropout=dropout)
        return AVModel(audio, visual, head, embed_dim, num_classes, visual_shape)


def audio_branch(model: AVModel) -> AudioBranch:
    """The audio branch of ``model`` as a stand-alone audio model (deep copies: training it leaves ``model``)."""
    import copy

    return AudioBranch(copy.deepcopy(model.audio), copy.deepcopy(model.audio_head))


def group_of(key: str) -> str:
    """The parameter group of a state-dict key (its top-level module name)."""
    return key.split(".", 1)[0]


def group_keys(keys: Sequence[str], groups: Sequence[str]) -> list[str]:
    """The keys (in order) that belong to one of ``groups``."""
    wanted = set(groups)
    return [key for key in keys if group_of(key) in wanted]
