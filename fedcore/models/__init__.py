"""Model families on log-mel input; importing this package registers every model in :data:`MODELS`."""

from fedcore.models import cnn, resnet  # noqa: F401  (registrations)
from fedcore.models.build import build_model, count_parameters
from fedcore.models.cnn import AudioCNN
from fedcore.models.registry import MODELS
from fedcore.models.resnet import AudioResNet, BasicBlock
from fedcore.models.transformer import AudioTransformer

__all__ = ["MODELS", "AudioCNN", "AudioResNet", "AudioTransformer", "BasicBlock", "build_model", "count_parameters"]
