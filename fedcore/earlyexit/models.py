"""Early-exit models: a transformer backbone run layer by layer, with a light head after chosen layers.

Backbones (registry :data:`EXIT_BACKBONES`) expose the same four pieces, so that a client can stop after its
exit depth d without computing the layers above it:

- ``stem(x) -> (batch, tokens, width)``: what comes before the first layer;
- ``layers``: an ``nn.ModuleList`` of the transformer layers (layer l is ``layers[l - 1]``);
- ``pool(hidden) -> (batch, width)``: the embedding an exit head reads after any layer;
- ``frozen``: parameter-name prefixes that are never trained nor sent (wav2vec 2.0's CNN feature encoder).

``logmel_transformer`` is the project's log-mel transformer (:class:`~fedcore.models.transformer.AudioTransformer`;
the one the FASSL stage pretrains); ``wav2vec2`` is torchaudio's wav2vec 2.0 / HuBERT architecture (any size, from
params) on 16 kHz waveforms, whose published weights load from a local file.

:class:`EarlyExitModel` holds a backbone and one head per exit (``heads["<layer>"]``: mean-pooled embedding →
linear, or a small MLP); ``exit_logits(x, depth)`` runs layers 1..depth only and returns the logits of every exit
reached; ``forward`` is the deepest exit (what a full-budget client deploys).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fedcore.config import ModelConfig
from fedcore.models.transformer import AudioTransformer
from fedcore.registry import Registry

EXIT_BACKBONES: Registry[nn.Module] = Registry("exit_backbone")
EXIT_HEADS: Registry[nn.Module] = Registry("exit_head")


class ExitBackbone(nn.Module, ABC):
    """Interface of an early-exit backbone (module docstring); a subclass missing a hook cannot be built."""

    width: int
    #: Parameter-name prefixes (relative to the backbone) never trained nor sent.
    frozen: tuple[str, ...] = ()
    #: Regex of a layer parameter's name (relative to the backbone); group 1 is the 0-based layer index.
    layer_pattern: str = r"^layers\.(\d+)\."

    @property
    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The transformer layers, in order (a view of a submodule, not registered twice)."""

    @abstractmethod
    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(batch, tokens, width)`` before the first layer."""

    @abstractmethod
    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """Embedding ``(batch, width)`` of the hidden states after a layer."""

    def run_layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states after layer ``index`` (0-based)."""
        out: torch.Tensor = self.layers[index](hidden)
        return out

    def layer_of(self, name: str) -> int:
        """The 1-based layer a parameter name (relative to the backbone) belongs to; 0 outside the layers."""
        match = re.match(self.layer_pattern, name)
        return int(match.group(1)) + 1 if match else 0

    #: The submodule pretrained weights load into, and key prefixes of other checkpoints stripped first.
    pretrained_target: str = ""
    pretrained_prefixes: tuple[str, ...] = ()

    def load_pretrained(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Load a checkpoint's matching entries (shapes must agree); return the target's keys left as they were.

        Raises
        ------
        ValueError
            If no entry matches, or a matching name has another shape.
        """
        target: nn.Module = self.get_submodule(self.pretrained_target) if self.pretrained_target else self
        own = target.state_dict()
        found: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            name = key
            for prefix in self.pretrained_prefixes:
                if name.startswith(prefix):
                    name = name[len(prefix):]
                    break
            if name in own:
                if tuple(value.shape) != tuple(own[name].shape):
                    raise ValueError(f"load_pretrained: {key!r} has shape {tuple(value.shape)}; the backbone's "
                                     f"{name!r} has {tuple(own[name].shape)}. Fix: match the model size params.")
                found[name] = value
        if not found:
            raise ValueError(f"load_pretrained: no entry of the checkpoint matches the {type(self).__name__} "
                             f"backbone (checkpoint keys like {sorted(state)[:3]!r}; backbone keys like "
                             f"{sorted(own)[:3]!r}).")
        target.load_state_dict(found, strict=False)
        return sorted(set(own) - set(found))


@EXIT_BACKBONES.register("logmel_transformer")
class LogMelTransformer(ExitBackbone):
    """The project's log-mel transformer (``model`` section: ``width``, ``depth``) as an exit backbone."""

    layer_pattern = r"^net\.blocks\.(\d+)\."
    pretrained_target = "net"
    #: FASSL's SSLModel state ("backbone.*"), or a state of this wrapper ("net.*").
    pretrained_prefixes = ("backbone.", "net.")

    def __init__(self, *, input_shape: tuple[int, int, int], cfg: ModelConfig, options: dict[str, Any]) -> None:
        super().__init__()
        import math

        self.net = AudioTransformer(num_classes=1, input_shape=input_shape, width=cfg.width, depth=cfg.depth,
                                    heads=math.gcd(cfg.width, 4))
        del self.net.classifier  # exits read pooled layer outputs; the classifier is never used
        self.width = cfg.width

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer blocks."""
        return self.net.blocks

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Embedded time patches of the log-mel input."""
        return self.net._tokens(x)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """Shared final LayerNorm, mean over tokens."""
        return self.net._pool(hidden)


@EXIT_BACKBONES.register("wav2vec2")
class Wav2Vec2(ExitBackbone):
    """torchaudio's wav2vec 2.0 / HuBERT encoder on 16 kHz waveforms (``features.kind: waveform``).

    ``options`` (``earlyexit.backbone_options``): ``embed_dim`` (768 for base), ``heads`` (12), ``ff_dim`` (3072),
    ``conv`` (the CNN feature encoder: ``base`` = wav2vec 2.0's seven conv layers of 512 channels, or a list of
    ``[channels, kernel, stride]``), ``layer_norm_first`` (False for base, True for large), ``pos_conv_kernel``
    (128) and ``pos_conv_groups`` (16); the number of layers is ``model.depth``. The CNN feature encoder is frozen
    (as in wav2vec 2.0 fine-tuning).
    """

    frozen = ("model.feature_extractor.",)
    layer_pattern = r"^model\.encoder\.transformer\.layers\.(\d+)\."
    pretrained_target = "model"
    #: torchaudio's published state dicts have no prefix; a state of this wrapper has "model.".
    pretrained_prefixes = ("model.",)
    BASE_CONV = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2

    def __init__(self, *, input_shape: tuple[int, int, int], cfg: ModelConfig, options: dict[str, Any]) -> None:
        super().__init__()
        from torchaudio.models import wav2vec2_model

        conv = options.get("conv", "base")
        layers = self.BASE_CONV if conv == "base" else [tuple(int(v) for v in layer) for layer in conv]
        self.width = int(options.get("embed_dim", 768))
        self.model = wav2vec2_model(
            extractor_mode="group_norm", extractor_conv_layer_config=layers, extractor_conv_bias=False,
            encoder_embed_dim=self.width, encoder_projection_dropout=0.0,
            encoder_pos_conv_kernel=int(options.get("pos_conv_kernel", 128)),
            encoder_pos_conv_groups=int(options.get("pos_conv_groups", 16)), encoder_num_layers=cfg.depth,
            encoder_num_heads=int(options.get("heads", 12)), encoder_attention_dropout=0.0,
            encoder_ff_interm_features=int(options.get("ff_dim", 3072)), encoder_ff_interm_dropout=0.0,
            encoder_dropout=0.0, encoder_layer_norm_first=bool(options.get("layer_norm_first", False)),
            encoder_layer_drop=0.0, aux_num_out=None)
        for parameter in self.model.feature_extractor.parameters():
            parameter.requires_grad_(False)

    @property
    def layers(self) -> nn.ModuleList:
        """The encoder's transformer layers."""
        layers: nn.ModuleList = self.model.encoder.transformer.layers
        return layers

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen CNN features of the waveform ``(batch, samples)`` (or ``(batch, 1, 1, samples)``), projected."""
        waveform = x.reshape(x.shape[0], -1)
        with torch.no_grad():
            features, _ = self.model.feature_extractor(waveform, None)
        hidden: torch.Tensor = self.model.encoder.transformer._preprocess(
            self.model.encoder.feature_projection(features))
        return hidden

    def run_layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run one of torchaudio's encoder layers (they return ``(hidden, position_bias)``)."""
        out, _ = self.layers[index](hidden, None, position_bias=None)
        result: torch.Tensor = out
        return result

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """Mean over frames."""
        return hidden.mean(dim=1)


EXIT_HEADS.register("linear")(lambda *, width, num_classes: nn.Linear(width, num_classes))
EXIT_HEADS.register("mlp")(lambda *, width, num_classes: nn.Sequential(
    nn.Linear(width, width), nn.GELU(), nn.Linear(width, num_classes)))


class EarlyExitModel(nn.Module):
    """A backbone and one head after each layer of ``exits`` (1-based, increasing, <= the backbone's layers)."""

    def __init__(self, backbone: ExitBackbone, exits: Sequence[int], num_classes: int, head: str = "linear") -> None:
        super().__init__()
        exits = [int(e) for e in exits]
        depth = len(backbone.layers)
        if not exits or exits != sorted(set(exits)) or exits[0] < 1 or exits[-1] > depth:
            raise ValueError(f"EarlyExitModel: 'exits' must be increasing layer numbers in 1..{depth}. "
                             f"Got {list(exits)!r}.")
        self.backbone = backbone
        self.exits = exits
        factory = EXIT_HEADS.get(head)
        self.heads = nn.ModuleDict({str(e): factory(width=backbone.width, num_classes=num_classes) for e in exits})

    def exit_logits(self, x: torch.Tensor, depth: int) -> dict[int, torch.Tensor]:
        """Logits of every exit at or below ``depth``, running layers 1..depth only."""
        if depth not in self.exits:
            raise ValueError(f"EarlyExitModel: 'depth' must be one of the exits {self.exits}. Got {depth!r}.")
        hidden = self.backbone.stem(x)
        out: dict[int, torch.Tensor] = {}
        for index in range(depth):
            hidden = self.backbone.run_layer(index, hidden)
            if index + 1 in self.exits:
                out[index + 1] = self.heads[str(index + 1)](self.backbone.pool(hidden))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the deepest exit."""
        return self.exit_logits(x, self.exits[-1])[self.exits[-1]]

    def layer_of(self, key: str) -> int:
        """The 1-based backbone layer of a state-dict key; 0 for the stem, the heads and other entries."""
        return self.backbone.layer_of(key[len("backbone."):]) if key.startswith("backbone.") else 0

    def frozen_key(self, key: str) -> bool:
        """Whether a state-dict key belongs to a frozen part of the backbone."""
        return key.startswith(tuple(f"backbone.{p}" for p in self.backbone.frozen))

    def trained_keys(self, depth: int, deep_supervision: bool) -> list[str]:
        """The entries a client with exit ``depth`` trains and sends.

        The stem (its parts not frozen), layers 1..depth and the head at ``depth`` (every head at or below it with
        deep supervision).
        """
        heads = {f"heads.{e}." for e in self.exits if e == depth or (deep_supervision and e < depth)}
        keys = []
        for key in self.state_dict():
            if key.startswith("heads."):
                if any(key.startswith(h) for h in heads):
                    keys.append(key)
            elif not self.frozen_key(key) and self.layer_of(key) <= depth:
                keys.append(key)
        return keys


def build_exit_model(backbone: str, *, input_shape: tuple[int, int, int], cfg: ModelConfig,
                     options: dict[str, Any], exits: Sequence[int], num_classes: int, head: str,
                     generator: torch.Generator) -> EarlyExitModel:
    """Build an :class:`EarlyExitModel` with weights drawn from ``generator``."""
    from fedcore.models.build import seeded_init

    with seeded_init(generator):
        body = EXIT_BACKBONES.build(backbone, input_shape=input_shape, cfg=cfg, options=dict(options))
        return EarlyExitModel(body, exits, num_classes, head)  # type: ignore[arg-type]
