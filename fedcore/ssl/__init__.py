"""Self-supervised federated pretraining: losses, audio augmentations and the SSL methods (FASSL, PAPERS.md §4)."""

from fedcore.ssl.augment import AUGMENTATIONS, DEFAULT_AUGMENT, AugmentPipeline, build_augmenter
from fedcore.ssl.losses import (
    barlow_twins_loss,
    byol_loss,
    nt_xent,
    permutations,
    shuffle_clips,
    split_clips,
    valid_frames,
)
from fedcore.ssl.methods import ACOP, BYOL, SSL_METHODS, BarlowTwins, SimCLR, SSLModel, build_method

__all__ = [
    "ACOP", "AUGMENTATIONS", "BYOL", "DEFAULT_AUGMENT", "SSL_METHODS", "AugmentPipeline", "BarlowTwins", "SSLModel",
    "SimCLR", "barlow_twins_loss", "build_augmenter", "build_method", "byol_loss", "nt_xent", "permutations",
    "shuffle_clips", "split_clips", "valid_frames",
]
