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

Exit normalisation (``exit_norm``, :data:`EXIT_NORMS`; issue 21). The embedding exit e reads after its layer is

- ``per_exit`` (default): ``u_e = mean_i LN_e(z_e)_i`` with a LayerNorm of the exit's own (``exit_norms["<e>"]``,
  γ_e and β_e), part of the exit like its head: it is trained and sent exactly by the clients that train head e (a
  client of depth d: the exit d, or every exit e <= d with deep supervision), so depth-aware aggregation averages
  it over those clients only, all of whom reach e (:mod:`fedcore.earlyexit.aggregate`). The backbone's own final
  norm (``logmel_transformer``'s ``net.norm``) is removed: nothing reads it. Every exit's head sits on
  statistics tuned for its own depth; this is the early-exit convention (a norm per exit head, PAPERS.md §5 [A]).
- ``shared``: ``u_e = pool(z_e)``, the backbone's pooling, which for ``logmel_transformer`` applies the one final
  LayerNorm of the transformer (``mean_i LN(z_e)_i``, the same γ, β for every exit). That norm is outside the
  layers (``layer_of = 0``), so every client trains and sends it and it is averaged by n_c whatever the depth:
  the shallow majority tunes the norm the deepest exit reads. Kept to reproduce runs made before the option;
  ``wav2vec2``'s pooling applies no norm, so ``shared`` there means no exit norm (as before).

Initial weights (:meth:`EarlyExitModel.load_pretrained`): under ``per_exit`` every exit's norm starts as a copy of
the checkpoint's final norm when it holds one (:attr:`ExitBackbone.pretrained_norm`: the FASSL encoder's
``norm``, a pre-norm wav2vec2's ``encoder.transformer.layer_norm``), so round 0 computes what the pretrained
encoder followed by its own final norm computes, as under ``shared``; otherwise at LayerNorm's default (γ = 1,
β = 0, which is also the random ``net.norm``: with random weights both modes start as the same function for
``logmel_transformer``). Building a norm draws no random numbers, so the other weights are the same in both modes
for a given generator.
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
#: ``exit_norm`` modes (module docstring); :class:`~fedcore.config.EarlyExitConfig` lists the same.
EXIT_NORMS = ("per_exit", "shared")


class ExitBackbone(nn.Module, ABC):
    """Interface of an early-exit backbone (module docstring); a subclass missing a hook cannot be built."""

    width: int
    #: Parameter-name prefixes (relative to the backbone) never trained nor sent.
    frozen: tuple[str, ...] = ()
    #: Regex of a layer parameter's name (relative to the backbone); group 1 is the 0-based layer index.
    layer_pattern: str = r"^layers\.(\d+)\."
    #: The norm :meth:`pool` applies after any layer (a submodule, relative to the backbone): what every exit reads
    #: under ``exit_norm: shared``; removed by :meth:`drop_final_norm` under ``per_exit``. "" when pool has none.
    final_norm: str = ""
    #: A checkpoint's final norm (module name relative to :attr:`pretrained_target`, prefixes stripped), whose
    #: ``weight`` and ``bias`` initialise every exit's own norm under ``per_exit``; "" when there is none.
    pretrained_norm: str = ""

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

    def pool_with(self, hidden: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """Embedding ``(batch, width)`` read through an exit's own norm: ``mean_i norm(hidden)_i``."""
        pooled: torch.Tensor = norm(hidden).mean(dim=1)
        return pooled

    def drop_final_norm(self) -> None:
        """Remove :attr:`final_norm` (``per_exit``: each exit has its own, the shared one would be dead weight)."""
        if self.final_norm:
            parent, _, name = self.final_norm.rpartition(".")
            delattr(self.get_submodule(parent) if parent else self, name)

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

    def _pretrained_name(self, key: str) -> str:
        """A checkpoint key with the first of :attr:`pretrained_prefixes` it starts with stripped."""
        for prefix in self.pretrained_prefixes:
            if key.startswith(prefix):
                return key[len(prefix):]
        return key

    def pretrained_norm_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint's final norm (:attr:`pretrained_norm`) as ``{"weight", "bias"}``; empty if it has none.

        Raises
        ------
        ValueError
            If the checkpoint holds only part of it, or a shape other than ``(width,)``.
        """
        if not self.pretrained_norm:
            return {}
        prefix = self.pretrained_norm + "."
        found = {name[len(prefix):]: value for key, value in state.items()
                 if (name := self._pretrained_name(key)).startswith(prefix)}
        if not found:
            return {}
        shapes = {k: tuple(v.shape) for k, v in sorted(found.items())}
        if set(shapes) != {"weight", "bias"} or any(shape != (self.width,) for shape in shapes.values()):
            raise ValueError(f"load_pretrained: the checkpoint's final norm {self.pretrained_norm!r} must hold "
                             f"'weight' and 'bias' of shape ({self.width},). Got {shapes!r}. Fix: match the model "
                             "size params.")
        return found

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
            name = self._pretrained_name(key)
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
    final_norm = "net.norm"
    pretrained_norm = "norm"
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
        """Shared final LayerNorm, mean over tokens (``exit_norm: shared``; gone under ``per_exit``)."""
        return self.net._pool(hidden)


@EXIT_BACKBONES.register("wav2vec2")
class Wav2Vec2(ExitBackbone):
    """torchaudio's wav2vec 2.0 / HuBERT encoder on 16 kHz waveforms (``features.kind: waveform``).

    ``options`` (``earlyexit.backbone_options``): ``embed_dim`` (768 for base), ``heads`` (12), ``ff_dim`` (3072),
    ``conv`` (the CNN feature encoder: ``base`` = wav2vec 2.0's seven conv layers of 512 channels, or a list of
    ``[channels, kernel, stride]``), ``layer_norm_first`` (False for base, True for large), ``pos_conv_kernel``
    (128) and ``pos_conv_groups`` (16); the number of layers is ``model.depth``. The CNN feature encoder is frozen
    (as in wav2vec 2.0 fine-tuning). The exits read the layer outputs without a norm under ``exit_norm: shared``;
    under ``per_exit`` through their own, which start from a checkpoint's ``encoder.transformer.layer_norm`` when
    ``layer_norm_first`` (pre-norm: that norm follows the last layer), at the default otherwise (post-norm: that
    norm precedes the layers, in the stem, and the layers end with their own).
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
        self.pretrained_norm = "encoder.transformer.layer_norm" if options.get("layer_norm_first", False) else ""
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
    """A backbone and one head after each layer of ``exits`` (1-based, increasing, <= the backbone's layers).

    Parameters
    ----------
    backbone : ExitBackbone
        The layers (under ``per_exit`` its :attr:`~ExitBackbone.final_norm` is removed).
    exits : sequence of int
        Layers followed by an exit.
    num_classes : int
        Logits of every head.
    head : str, default "linear"
        An :data:`EXIT_HEADS` name.
    exit_norm : str, default "per_exit"
        An :data:`EXIT_NORMS` mode (module docstring): ``per_exit`` adds ``exit_norms["<e>"]``, a LayerNorm of width
        ``backbone.width`` before each head; ``shared`` reads the backbone's pooling (its final norm).

    Raises
    ------
    ValueError
        If ``exits`` or ``exit_norm`` is invalid.
    """

    def __init__(self, backbone: ExitBackbone, exits: Sequence[int], num_classes: int, head: str = "linear",
                 exit_norm: str = "per_exit") -> None:
        super().__init__()
        exits = [int(e) for e in exits]
        depth = len(backbone.layers)
        if not exits or exits != sorted(set(exits)) or exits[0] < 1 or exits[-1] > depth:
            raise ValueError(f"EarlyExitModel: 'exits' must be increasing layer numbers in 1..{depth}. "
                             f"Got {list(exits)!r}.")
        if exit_norm not in EXIT_NORMS:
            raise ValueError(f"EarlyExitModel: 'exit_norm' must be one of {', '.join(EXIT_NORMS)}. "
                             f"Got {exit_norm!r}.")
        self.backbone = backbone
        self.exits = exits
        self.exit_norm = exit_norm
        factory = EXIT_HEADS.get(head)
        self.heads = nn.ModuleDict({str(e): factory(width=backbone.width, num_classes=num_classes) for e in exits})
        if exit_norm == "per_exit":  # LayerNorm draws no random numbers: the other weights are as under shared
            backbone.drop_final_norm()
            self.exit_norms = nn.ModuleDict({str(e): nn.LayerNorm(backbone.width) for e in exits})

    def embedding(self, hidden: torch.Tensor, exit_: int) -> torch.Tensor:
        """What the head of exit ``exit_`` reads: ``(batch, width)`` from the hidden states after its layer."""
        if self.exit_norm == "per_exit":
            return self.backbone.pool_with(hidden, self.exit_norms[str(exit_)])
        return self.backbone.pool(hidden)

    def exit_logits(self, x: torch.Tensor, depth: int) -> dict[int, torch.Tensor]:
        """Logits of every exit at or below ``depth``, running layers 1..depth only."""
        if depth not in self.exits:
            raise ValueError(f"EarlyExitModel: 'depth' must be one of the exits {self.exits}. Got {depth!r}.")
        hidden = self.backbone.stem(x)
        out: dict[int, torch.Tensor] = {}
        for index in range(depth):
            hidden = self.backbone.run_layer(index, hidden)
            if index + 1 in self.exits:
                out[index + 1] = self.heads[str(index + 1)](self.embedding(hidden, index + 1))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the deepest exit."""
        return self.exit_logits(x, self.exits[-1])[self.exits[-1]]

    def layer_of(self, key: str) -> int:
        """The 1-based backbone layer of a state-dict key; 0 for the stem, the heads and other entries."""
        return self.backbone.layer_of(key[len("backbone."):]) if key.startswith("backbone.") else 0

    def exit_of(self, key: str) -> int:
        """The exit a state-dict key belongs to (its head, or its norm under ``per_exit``); 0 for other entries."""
        match = re.match(r"^(?:heads|exit_norms)\.(\d+)\.", key)
        return int(match.group(1)) if match else 0

    def frozen_key(self, key: str) -> bool:
        """Whether a state-dict key belongs to a frozen part of the backbone."""
        return key.startswith(tuple(f"backbone.{p}" for p in self.backbone.frozen))

    def trained_keys(self, depth: int, deep_supervision: bool) -> list[str]:
        """The entries a client with exit ``depth`` trains and sends.

        The stem (its parts not frozen), layers 1..depth and the exit at ``depth`` (every exit at or below it with
        deep supervision): its head and, under ``per_exit``, its norm. A lower exit the client passes without
        supervising it has no gradient, so it is neither trained nor sent (it would dilute the mean with stale
        copies); under ``shared`` the one final norm is outside the layers, so every client trains and sends it.
        """
        trained = {e for e in self.exits if e == depth or (deep_supervision and e < depth)}
        keys = []
        for key in self.state_dict():
            if exit_ := self.exit_of(key):
                if exit_ in trained:
                    keys.append(key)
            elif not self.frozen_key(key) and self.layer_of(key) <= depth:
                keys.append(key)
        return keys

    def load_pretrained(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Load a checkpoint into the backbone and, under ``per_exit``, its final norm into every exit's norm.

        The backbone as :meth:`ExitBackbone.load_pretrained` does; the final norm is
        :meth:`ExitBackbone.pretrained_norm_state` (module docstring).

        Returns
        -------
        list of str
            The backbone target's keys left as they were, then (``per_exit``, when the checkpoint has no final
            norm) the ``exit_norms.*`` keys left at LayerNorm's default.

        Raises
        ------
        ValueError
            If no entry matches the backbone, or a matching entry (or the final norm) has another shape.
        """
        left = self.backbone.load_pretrained(state)
        if self.exit_norm == "per_exit":
            norm = self.backbone.pretrained_norm_state(state)
            if norm:
                for module in self.exit_norms.values():
                    module.load_state_dict(norm)
            else:
                left += [f"exit_norms.{e}.{p}" for e in self.exits for p in ("weight", "bias")]
        return left


def build_exit_model(backbone: str, *, input_shape: tuple[int, int, int], cfg: ModelConfig,
                     options: dict[str, Any], exits: Sequence[int], num_classes: int, head: str,
                     generator: torch.Generator, exit_norm: str = "per_exit") -> EarlyExitModel:
    """Build an :class:`EarlyExitModel` with weights drawn from ``generator`` (``exit_norm``: :data:`EXIT_NORMS`)."""
    from fedcore.models.build import seeded_init

    with seeded_init(generator):
        body = EXIT_BACKBONES.build(backbone, input_shape=input_shape, cfg=cfg, options=dict(options))
        return EarlyExitModel(body, exits, num_classes, head, exit_norm)  # type: ignore[arg-type]
