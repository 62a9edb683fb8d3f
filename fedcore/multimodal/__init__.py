"""Audio-visual federated learning: ModalityMirror and its baselines (UniFL, MultiFL, Harmony) on one engine.

``data``: AV-MNIST-style pairing of spoken digits with handwritten digit images, a generic AV manifest, and the
per-client missing-video draw; ``models``: audio/visual encoders, fusion, unimodal heads; ``train``: per-modality
local tasks and distillation; ``aggregate``: modality-wise aggregation; ``methods``: the registered methods.
"""

from fedcore.multimodal.aggregate import ModalityAggregate, modality_wise
from fedcore.multimodal.methods import AV_METHODS, AVMethod, Phase
from fedcore.multimodal.models import FUSIONS, GROUPS, AudioBranch, AVModel, audio_branch, build_av_model
from fedcore.multimodal.train import LOCAL_TASKS, AVClientData, kd_loss, train_av_client, train_student

__all__ = [
    "AV_METHODS", "FUSIONS", "GROUPS", "LOCAL_TASKS", "AVClientData", "AVMethod", "AVModel", "AudioBranch",
    "ModalityAggregate", "Phase", "audio_branch", "build_av_model", "kd_loss", "modality_wise", "train_av_client",
    "train_student",
]
