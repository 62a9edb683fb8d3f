"""Scores of audio-visual models on a split: the AV model as each method serves it, and an audio-only student.

:func:`evaluate_av` scores an :class:`~fedcore.multimodal.models.AVModel`: ``audio_branch_accuracy`` (audio
encoder + audio head), and for methods with a fused classifier ``av_accuracy`` (audio and video) and
``zero_video_accuracy`` (audio with the visual embedding of an all-zero input); ``audio_accuracy`` is the score of
the way the method serves audio-only clients (:attr:`~fedcore.multimodal.methods.AVMethod.audio_eval`).
:func:`evaluate_student` scores an audio model. Both run on the caller's torch threads (the round loop gives the
server every core).
"""

from __future__ import annotations

from typing import Any

import torch

from fedcore.multimodal.methods import AVMethod
from fedcore.multimodal.models import AVModel
from fedcore.multimodal.train import AVClientData, accuracy


def evaluate_av(model: AVModel, method: AVMethod, test: AVClientData, batch_size: int) -> dict[str, float]:
    """Accuracies of ``model`` on ``test`` (which must hold video), as the module docstring lists them.

    Each encoder runs once per batch: the three audio scores share the audio embedding.
    """
    if test.visual is None:
        raise ValueError("evaluate_av: 'test' must hold the visual modality. Got visual=None.")
    model.eval()
    correct = {"audio_branch_accuracy": 0, "av_accuracy": 0, "zero_video_accuracy": 0}
    with torch.no_grad():
        zero = model.visual(torch.zeros((1, *model.visual_shape), dtype=test.audio.dtype))
        for start in range(0, len(test), batch_size):
            rows = slice(start, start + batch_size)
            labels = test.labels[rows]
            audio = model.audio(test.audio[rows])
            outputs = {"audio_branch_accuracy": model.audio_head(audio)}
            if method.fused:
                outputs["av_accuracy"] = model.fusion(audio, model.visual(test.visual[rows]))
                outputs["zero_video_accuracy"] = model.fusion(audio, zero.expand(audio.shape[0], -1))
            for name, logits in outputs.items():
                correct[name] += int((logits.argmax(dim=1) == labels).sum())
    names = ["audio_branch_accuracy", *(["av_accuracy", "zero_video_accuracy"] if method.fused else [])]
    scores = {name: correct[name] / len(test) for name in names}
    served = {"branch": "audio_branch_accuracy", "zero_video": "zero_video_accuracy"}[method.audio_eval]
    scores["audio_accuracy"] = scores[served]
    return scores


def evaluate_student(student: Any, test: AVClientData, batch_size: int) -> dict[str, float]:
    """``audio_accuracy`` of an audio model (log-mel to logits; a torch module is put in eval mode) on ``test``."""
    if isinstance(student, torch.nn.Module):
        student.eval()
    return {"audio_accuracy": accuracy(lambda r: student(test.audio[r]), test.labels, batch_size)}
