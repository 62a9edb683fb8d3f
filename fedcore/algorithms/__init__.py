"""Client-side rules and the one local training loop; importing this package registers every rule."""

from fedcore.algorithms import fedavg, fedprox, fedu  # noqa: F401  (registrations)
from fedcore.algorithms.base import LOCAL_ALGORITHMS, ClientData, LocalAlgorithm, train_client
from fedcore.algorithms.fedavg import FedAvgClient
from fedcore.algorithms.fedprox import FedProx
from fedcore.algorithms.fedu import FedU

__all__ = ["LOCAL_ALGORITHMS", "ClientData", "FedAvgClient", "FedProx", "FedU", "LocalAlgorithm", "train_client"]
