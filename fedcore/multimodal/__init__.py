"""Audio-visual federated learning: ModalityMirror and its baselines (UniFL, MultiFL, Harmony) on one engine.

``data``: AV-MNIST-style pairing of spoken digits with handwritten digit images, a generic AV manifest, and the
per-client missing-video draw; ``models``: audio/visual encoders, fusion, unimodal heads; ``train``: the clients'
AV data and the objectives of the one client loop (per-modality tasks, distillation); ``aggregate``: modality-wise
aggregation; ``evaluate``: the scores of an AV model and of an audio-only student; ``methods``: the registered
methods. Their rounds are plans of the one round loop: :mod:`fedcore.plans.modality`, :mod:`fedcore.plans.distill`.
"""

from fedcore.multimodal.aggregate import modality_wise
from fedcore.multimodal.evaluate import evaluate_av, evaluate_student
from fedcore.multimodal.methods import AV_METHODS, AVMethod, Phase
from fedcore.multimodal.models import FUSIONS, GROUPS, AudioBranch, AVModel, audio_branch, build_av_model
from fedcore.multimodal.train import (
    LOCAL_TASKS,
    AVClientData,
    AVData,
    AVTasks,
    Distillation,
    kd_loss,
    train_av_client,
    train_student,
)

__all__ = [
    "AV_METHODS", "FUSIONS", "GROUPS", "LOCAL_TASKS", "AVClientData", "AVData", "AVMethod", "AVModel", "AVTasks",
    "AudioBranch", "Distillation", "Phase", "audio_branch", "build_av_model", "evaluate_av",
    "evaluate_student", "kd_loss", "modality_wise", "train_av_client", "train_student",
]
