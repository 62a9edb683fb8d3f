"""Small transformer encoder on log-mel frames (the ``transformer`` model).

The encoder of Vaswani et al., "Attention Is All You Need", NeurIPS 2017, arXiv:1706.03762 (§3.1–3.3), applied
to audio as in the Audio Spectrogram Transformer (Gong et al., Interspeech 2021, arXiv:2104.01778, §2.1) and,
for the token pipeline, ViT (Dosovitskiy et al., ICLR 2021, arXiv:2010.11929, Eq. 1–4):

- tokens: ``patch_frames`` consecutive frames of all mel bands form one token (a full-height time patch rather
  than AST's 16×16 square patches; the time axis is zero-padded at the end to a multiple of ``patch_frames``),
  z_0 = [x_1 E; …; x_N E] + E_pos with a linear embedding E and a learned positional embedding E_pos (ViT Eq. 1);
- ``depth`` pre-norm encoder layers z'_l = MSA(LN(z_{l-1})) + z_{l-1}, z_l = MLP(LN(z'_l)) + z'_l (ViT Eq. 2–3;
  ``nn.TransformerEncoderLayer`` with ``norm_first=True``, GELU, MLP hidden size ``mlp_ratio · width``);
- y = Linear(mean_i LN(z_L)_i): a final LayerNorm and the mean over tokens (no class token; AST averages its two
  class tokens, mean pooling is the common token-free alternative) feed the linear ``classifier``.

:meth:`AudioTransformer.layer_embeddings` returns the pooled embedding ``mean_i LN(z_l)_i`` after every layer
(the attachment points of early-exit heads); :meth:`~AudioTransformer.forward` applies the classifier to the last.

Departures: no class token and no dropout (training is deterministic for a given batch order); the positional
embedding is drawn with ``trunc_normal_(std=0.02)`` (as in ViT/AST implementations) from the global RNG, which
:func:`~fedcore.models.build.build_model` seeds from the caller's generator. Inputs may be shorter than
``input_shape`` (they use the first positions), never longer. The registry factory uses ``gcd(width, 4)`` heads
(4 when ``width`` is a multiple of 4), since :class:`~fedcore.config.ModelConfig` has no head count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedcore.config import ModelConfig
from fedcore.models.registry import MODELS, check_model_args


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"transformer: '{name}' must be an int >= 1. Got {value!r}.")


class AudioTransformer(nn.Module):
    """Pre-norm transformer encoder over time patches of a log-mel spectrogram, mean pool and linear classifier.

    Parameters
    ----------
    num_classes : int
        Number of output logits.
    input_shape : tuple of int
        ``(channels, n_mels, frames)`` of one example (channels is 1 for log-mel). ``frames`` is the longest input
        accepted; it sets the number of positional embeddings, ``ceil(frames / patch_frames)``.
    width : int
        Token dimension (d_model).
    depth : int
        Number of encoder layers.
    heads : int, default 4
        Attention heads; must divide ``width``.
    mlp_ratio : int, default 2
        Hidden size of each layer's MLP, in multiples of ``width``.
    patch_frames : int, default 4
        Consecutive frames stacked into one token.

    Raises
    ------
    ValueError
        If an argument is not a positive int, ``heads`` does not divide ``width``, or ``num_classes`` or
        ``input_shape`` is invalid.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: tuple[int, int, int],
        width: int,
        depth: int,
        heads: int = 4,
        mlp_ratio: int = 2,
        patch_frames: int = 4,
    ) -> None:
        super().__init__()
        channels, n_mels, frames = check_model_args("transformer", num_classes, input_shape)
        for name, value in (("width", width), ("depth", depth), ("heads", heads), ("mlp_ratio", mlp_ratio),
                            ("patch_frames", patch_frames)):
            _check_positive_int(name, value)
        if width % heads != 0:
            raise ValueError(f"transformer: 'width' must be divisible by heads ({heads}). Got {width!r}.")
        self.channels, self.n_mels, self.frames = channels, n_mels, frames
        self.patch_frames = patch_frames
        self.embed = nn.Linear(channels * n_mels * patch_frames, width)
        self.position = nn.Parameter(torch.empty(1, math.ceil(frames / patch_frames), width))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, dim_feedforward=mlp_ratio * width, dropout=0.0, activation="gelu",
                batch_first=True, norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, num_classes)

    def _tokens(self, log_mel: torch.Tensor) -> torch.Tensor:
        """Embedded tokens z_0 ``(batch, ceil(frames / patch_frames), width)`` of ``log_mel``."""
        shape = tuple(log_mel.shape)
        if len(shape) != 4 or shape[1:3] != (self.channels, self.n_mels) or not 1 <= shape[3] <= self.frames:
            raise ValueError(
                f"transformer: 'log_mel' must be (batch, {self.channels}, {self.n_mels}, frames) with "
                f"1 <= frames <= {self.frames}. Got {shape!r}."
            )
        batch, channels, n_mels, frames = shape
        num_tokens = math.ceil(frames / self.patch_frames)
        padded = F.pad(log_mel, (0, num_tokens * self.patch_frames - frames))
        # (B, C, M, N·P) → (B, N, P, C, M) → (B, N, P·C·M): a token holds its frames one after the other
        patches = padded.reshape(batch, channels, n_mels, num_tokens, self.patch_frames).permute(0, 3, 4, 1, 2)
        tokens: torch.Tensor = self.embed(patches.reshape(batch, num_tokens, -1)) + self.position[:, :num_tokens]
        return tokens

    def _pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """Mean over tokens of ``LN(hidden)``, ``(batch, width)``."""
        pooled: torch.Tensor = self.norm(hidden).mean(dim=1)
        return pooled

    def layer_embeddings(self, log_mel: torch.Tensor) -> list[torch.Tensor]:
        """Pooled embedding after each encoder layer.

        Parameters
        ----------
        log_mel : Tensor
            ``(batch, channels, n_mels, frames)`` float32, ``frames`` at most that of ``input_shape``.

        Returns
        -------
        list of Tensor
            ``depth`` tensors ``(batch, width)``: ``mean_i LN(z_l)_i`` for layers l = 1 … depth (shared final norm).
        """
        hidden = self._tokens(log_mel)
        embeddings = []
        for block in self.blocks:
            hidden = block(hidden)
            embeddings.append(self._pool(hidden))
        return embeddings

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        """Map ``log_mel`` ``(batch, 1, n_mels, frames)`` float32 to logits ``(batch, num_classes)``."""
        logits: torch.Tensor = self.classifier(self.layer_embeddings(log_mel)[-1])
        return logits


@MODELS.register("transformer")
def transformer(*, num_classes: int, input_shape: tuple[int, int, int], cfg: ModelConfig) -> nn.Module:
    """Build :class:`AudioTransformer`: d_model ``cfg.width``, ``cfg.depth`` layers, ``gcd(width, 4)`` heads."""
    if cfg.width < 1 or cfg.depth < 1:
        raise ValueError(f"transformer: 'width' and 'depth' must be ints >= 1. Got {(cfg.width, cfg.depth)!r}.")
    return AudioTransformer(
        num_classes=num_classes, input_shape=input_shape, width=cfg.width, depth=cfg.depth,
        heads=math.gcd(cfg.width, 4),
    )
