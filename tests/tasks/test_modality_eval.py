"""The AV evaluation shares one audio embedding per batch and still equals the model's own forward passes."""

from __future__ import annotations

import pytest
import torch

from fedcore.config import ModelConfig
from fedcore.multimodal import AV_METHODS, AVClientData, build_av_model
from fedcore.multimodal.train import accuracy
from tasks.modality import evaluate_av


@pytest.mark.parametrize("fusion", ["concat", "attention"])
def test_evaluation_equals_the_forward_passes(fusion: str) -> None:
    model = build_av_model(audio_cfg=ModelConfig(name="cnn", width=4, depth=2), audio_shape=(1, 16, 20),
                           visual_shape=(1, 8, 8), num_classes=3, fusion=fusion, embed_dim=8, hidden_dim=8,
                           visual_width=4, dropout=0.1, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    data = AVClientData(torch.randn(50, 1, 16, 20, generator=g), torch.rand(50, 1, 8, 8, generator=g),
                        torch.randint(0, 3, (50,), generator=g))
    model.eval()
    expected = {
        "audio_branch_accuracy": accuracy(lambda r: model.audio_logits(data.audio[r]), data.labels, 16),
        "av_accuracy": accuracy(lambda r: model(data.audio[r], data.visual[r]), data.labels, 16),  # type: ignore
        "zero_video_accuracy": accuracy(lambda r: model(data.audio[r], torch.zeros_like(data.visual[r])),  # type: ignore
                                        data.labels, 16),
    }
    multifl = evaluate_av(model, AV_METHODS.build("multifl"), data, 16)
    assert {k: multifl[k] for k in expected} == expected
    assert multifl["audio_accuracy"] == expected["zero_video_accuracy"]
    unifl = evaluate_av(model, AV_METHODS.build("unifl"), data, 7)
    assert unifl == {"audio_branch_accuracy": expected["audio_branch_accuracy"],
                     "audio_accuracy": expected["audio_branch_accuracy"]}
