"""Round-level pieces of federated training: sampling, seeds, schedules, checkpoints, the client state store."""

from fedcore.federation.checkpoint import Checkpointer, fingerprint, load_state, save_state
from fedcore.federation.client_store import ClientStore
from fedcore.federation.sampling import client_generator, num_sampled, round_rng, sample_clients
from fedcore.federation.schedules import LR_SCHEDULES, learning_rate

__all__ = [
    "LR_SCHEDULES",
    "Checkpointer",
    "ClientStore",
    "client_generator",
    "fingerprint",
    "learning_rate",
    "load_state",
    "num_sampled",
    "round_rng",
    "sample_clients",
    "save_state",
]
