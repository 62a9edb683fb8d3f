"""Evaluation of global and personalised models, and of frozen encoders (kNN retrieval, linear probe)."""

from fedcore.evaluation.metrics import evaluate, personalised_summary, predict
from fedcore.evaluation.retrieval import embed, knn_accuracy, linear_probe_accuracy, stratified_holdout

__all__ = [
    "embed",
    "evaluate",
    "knn_accuracy",
    "linear_probe_accuracy",
    "personalised_summary",
    "predict",
    "stratified_holdout",
]
