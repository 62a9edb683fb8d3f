"""Client-side rules and the one local training loop; importing this package registers every rule."""

from fedcore.algorithms import fedavg, fedprox, fedu, mutual  # noqa: F401  (registrations)
from fedcore.algorithms.base import (
    LOCAL_ALGORITHMS,
    ClientData,
    ClientJob,
    ClientResult,
    LocalAlgorithm,
    LocalSettings,
    train_client,
)
from fedcore.algorithms.fedavg import FedAvgClient
from fedcore.algorithms.fedprox import FedProx
from fedcore.algorithms.fedu import FedU
from fedcore.algorithms.mutual import FederatedMutualLearning, FedMLAC, LocalOnly, mutual_losses

__all__ = [
    "LOCAL_ALGORITHMS", "ClientData", "ClientJob", "ClientResult", "FedAvgClient", "FedMLAC", "FedProx", "FedU",
    "FederatedMutualLearning", "LocalAlgorithm", "LocalOnly", "LocalSettings", "mutual_losses", "train_client",
]
