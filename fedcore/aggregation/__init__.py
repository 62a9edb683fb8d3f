"""Server-side aggregation rules; importing this package registers every rule in :data:`AGGREGATORS`.

=============== ========================================================== =================
name            rule                                                       options
=============== ========================================================== =================
fedavg          Σ (n_k/n) w^k (McMahan et al. 2017)                         —
fairavg         (1/K) Σ w^k (FASSL's FairAvg, [A])                          —
loss            exp(−gap/(τ·mean loss))-weighted, mixed with FedAvg by γ   loss_gamma, loss_scale,
                (FedVSSL; ``loss_scale: raw``: exp(−loss), the paper's)    loss_temperature
ldawa           per-layer cosine to w_t, clipped at 1 (Rehman et al. 2023)  ldawa_warmup_rounds
lpa             layer-wise pruning of deviant clients (FedMLAC, [A])        lpa_rule, lpa_kappa, lpa_fraction,
                                                                           lpa_center
median          coordinate-wise median (Yin et al. 2018)                   —
trimmed_mean    coordinate-wise β-trimmed mean (Yin et al. 2018)           trim_beta
krum            lowest Krum score (Blanchard et al. 2017)                  krum_f
multikrum       mean of the m lowest Krum scores                           krum_f, multikrum_m
fedadam         server Adam on the mean delta (Reddi et al. 2021)          server_lr, server_beta1/2, server_tau
fedyogi         server Yogi on the mean delta (Reddi et al. 2021)          server_lr, server_beta1/2, server_tau
=============== ========================================================== =================

Every rule also takes ``flag_ratio`` (when a down-weighted client counts as flagged).
"""

from fedcore.aggregation import fairavg, fedavg, fedopt, krum, ldawa, loss, lpa, median, trimmed_mean  # noqa: F401
from fedcore.aggregation.base import AGGREGATORS, Aggregate, Aggregator, ClientUpdate, Combination, check_updates
from fedcore.aggregation.fedavg import FedAvg, weighted_average
from fedcore.aggregation.state import StateDict, clone_state, state_nbytes, to_cpu_state

__all__ = [
    "AGGREGATORS",
    "Aggregate",
    "Aggregator",
    "ClientUpdate",
    "Combination",
    "FedAvg",
    "StateDict",
    "check_updates",
    "clone_state",
    "state_nbytes",
    "to_cpu_state",
    "weighted_average",
]
