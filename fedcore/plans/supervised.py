"""The supervised plan: FedAvg family, FedProx, FedU, FML, FedMLAC, local-only, and self-supervised pretraining.

Self-supervised pretraining comes with per-round downstream evaluation (FASSL).

:class:`SupervisedPlan` is what :func:`fedcore.federation.engine.run_rounds` runs for them. Each round: the sampled
clients run the local algorithm of ``federation.local_algorithm`` (:func:`train_client`; what a client keeps between
rounds, e.g. its personal model, lives in the client store), the malicious clients' updates are forged
(``attack``), the aggregator of ``federation.aggregator`` combines the entries clients send (``federation.send``)
under the failure policy, and the new state is scored: global test accuracy and every client's held-out accuracy
with its own model (:func:`evaluate_clients`), or, for self-supervised objectives, the downstream retrieval tasks
every ``downstream.every`` rounds (the random-init encoder is scored first, as round 0: the floor).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from typing_extensions import override

from fedcore.aggregation import AGGREGATORS
from fedcore.aggregation.base import Aggregate, Aggregator, ClientUpdate, StateDict
from fedcore.aggregation.state import state_nbytes, to_cpu_state
from fedcore.algorithms import LOCAL_ALGORITHMS
from fedcore.algorithms.base import ClientData, ClientJob, LocalAlgorithm, LocalSettings, Objective
from fedcore.algorithms.mutual import join_personal
from fedcore.attacks import ATTACKS, UpdateAttack, attack_generator, choose_malicious, detection_counts
from fedcore.config import (
    FederationConfig,
    FedProxConfig,
    FedUConfig,
    ModelConfig,
    MutualConfig,
    Params,
    PersonalConfig,
    SSLConfig,
    to_dict,
)
from fedcore.data.federated import FederatedDataset
from fedcore.errors import ConfigError
from fedcore.evaluation import evaluate, personalised_summary
from fedcore.evaluation.downstream import DownstreamData, score_encoder
from fedcore.federation.checkpoint import fingerprint
from fedcore.federation.client_store import ClientStore
from fedcore.federation.engine import Job, Plan, RoundResult, Stateful
from fedcore.federation.sampling import client_generator, round_rng, sample_clients
from fedcore.federation.schedules import learning_rate
from fedcore.models import build_model
from fedcore.models.assign import assign_models, personal_generator
from fedcore.models.groups import PARAM_GROUPS
from fedcore.ssl.methods import build_method

# Options of a local algorithm, by name: the params.yaml section that holds them.
ALGORITHM_SECTIONS = {"fedprox": "fedprox", "fedu": "fedu", "fml": "mutual", "fedmlac": "mutual"}

# Federation fields that do not change the arithmetic, so they do not invalidate checkpoints.
NOT_IN_FINGERPRINT = {"eval_batch_size", "min_accepted"}


@dataclass(frozen=True)
class TrainSpec:
    """What a worker needs to train any client of a round (small, picklable for Dask/Ray workers)."""

    model: ModelConfig
    federation: FederationConfig
    fedprox: FedProxConfig
    fedu: FedUConfig
    num_classes: int
    input_shape: tuple[int, int, int]
    intra_op_threads: int
    mutual: MutualConfig = MutualConfig()
    #: Personal model configs and, per client, the index of its own (rules with a personal model).
    personal_models: tuple[ModelConfig, ...] = ()
    assignment: tuple[int, ...] = ()
    personal_seed: int = 0
    #: The training objective (``ssl.method``: none for supervised cross-entropy).
    ssl: SSLConfig = SSLConfig()

    def personal_model_config(self, client_id: int) -> ModelConfig:
        """The architecture of client ``client_id``'s personal model."""
        return self.personal_models[self.assignment[client_id]]


def algorithm_class(name: str) -> type[LocalAlgorithm]:
    """The class registered as local algorithm ``name`` (for its class attributes, without building it)."""
    return cast(type[LocalAlgorithm], LOCAL_ALGORITHMS.get(name))


def make_spec(params: Params, num_clients: int, num_classes: int, input_shape: tuple[int, int, int],
              intra_op_threads: int) -> TrainSpec:
    """The training spec of a run; personal architectures are assigned when the local algorithm has them."""
    personal: PersonalConfig = params.personal
    models: tuple[ModelConfig, ...] = ()
    assignment: tuple[int, ...] = ()
    rule = algorithm_class(params.federation.local_algorithm)
    if params.ssl.self_supervised and rule.personal:
        raise ConfigError(f"ssl: 'method' {params.ssl.method!r} needs a local algorithm that trains the shared "
                          f"model alone (fedavg, fedprox or fedu): {params.federation.local_algorithm!r} "
                          "distils labels between a personal and the shared model.")
    if rule.personal:
        models = tuple(personal.model_configs(params.model))
        assignment = tuple(assign_models(personal.assignment, num_clients, len(models), personal.seed, personal.map))
    return TrainSpec(params.model, params.federation, params.fedprox, params.fedu, num_classes, input_shape,
                     intra_op_threads, params.mutual, models, assignment, personal.seed, params.ssl)


def build_objective(spec: TrainSpec) -> Objective:
    """What local training minimises: ``ssl.method`` with its options (none: supervised cross-entropy)."""
    return build_method(spec.ssl.method, spec.ssl.method_kwargs())


def build_algorithm(spec: TrainSpec) -> LocalAlgorithm:
    """The client-side rule named in ``federation.local_algorithm``, with its section's options."""
    name = spec.federation.local_algorithm
    section = ALGORITHM_SECTIONS.get(name)
    options = to_dict(getattr(spec, section)) if section else {}
    return LOCAL_ALGORITHMS.build(name, **options)


def aggregator_name(params: Params) -> str:
    """``federation.aggregator``, or the local algorithm's default when it is null (``lpa`` for FedMLAC)."""
    fed = params.federation
    return fed.aggregator or algorithm_class(fed.local_algorithm).default_aggregator


def build_aggregator(params: Params, name: str | None = None) -> Aggregator:
    """The server-side rule ``name`` (default :func:`aggregator_name`), with its options (``aggregation.rules``)."""
    name = name or aggregator_name(params)
    return AGGREGATORS.build(name, **params.aggregation.options_of(name))


def build_attack(params: Params) -> UpdateAttack:
    """The update attack named in ``attack.name``, with its options (``attack.options``)."""
    return ATTACKS.build(params.attack.name, **params.attack.options_of(params.attack.name))


def sent_keys(spec: TrainSpec) -> list[str]:
    """The state-dict keys clients send and the server aggregates (``federation.send``)."""
    return PARAM_GROUPS.build(spec.federation.send).keys(_worker_model(spec))


def attacked_keys(spec: TrainSpec, keys: Sequence[str], include_buffers: bool) -> list[str]:
    """Floating entries of ``keys`` an attack changes: model parameters, and floating buffers if asked."""
    model = _worker_model(spec)
    parameters = {name for name, _ in model.named_parameters()}
    state = model.state_dict()
    return [k for k in keys if state[k].is_floating_point() and (include_buffers or k in parameters)]


_local = threading.local()


def _cached_model(cfg: ModelConfig, spec: TrainSpec, *, shared: bool) -> torch.nn.Module:
    """One model instance per role, architecture and worker thread, reused (its weights are overwritten each time).

    The shared model (trained with the objective) and a personal model (a classifier) are distinct instances
    even when their architectures are the same: mutual learning trains both at once.
    """
    key = (shared, cfg, spec.num_classes, spec.input_shape, fingerprint(to_dict(spec.ssl)) if shared else None)
    cache = getattr(_local, "models", None)
    if cache is None:
        cache = _local.models = {}
    if key not in cache:
        generator = torch.Generator().manual_seed(0)
        cache[key] = (build_objective(spec).build_model(cfg, spec.num_classes, spec.input_shape, generator)
                      if shared else build_model(cfg, spec.num_classes, spec.input_shape, generator))
    return cache[key]


def _worker_model(spec: TrainSpec) -> torch.nn.Module:
    """The shared architecture's instance of the calling worker thread."""
    return _cached_model(spec.model, spec, shared=True)


def fresh_model(spec: TrainSpec, seed: int) -> torch.nn.Module:
    """The initial global model, drawn from ``seed`` (an SSLModel when ``ssl.method`` is set)."""
    return build_objective(spec).build_model(spec.model, spec.num_classes, spec.input_shape,
                                             torch.Generator().manual_seed(seed))


def initial_local_state(spec: TrainSpec, client_id: int) -> StateDict:
    """A personal-model client's kept state before its first round: its personal model's initial weights."""
    cfg = spec.personal_model_config(client_id)
    model = build_model(cfg, spec.num_classes, spec.input_shape, personal_generator(spec.personal_seed, client_id))
    return join_personal(model.state_dict())


def kept_state(spec: TrainSpec, algorithm: LocalAlgorithm, store: ClientStore | None, client_id: int,
               upto_round: int) -> StateDict | None:
    """What client ``client_id`` kept up to ``upto_round`` (its initial personal model if nothing yet)."""
    found = store.load(client_id, upto_round) if store is not None else None
    if found is not None:
        return found[0]
    return initial_local_state(spec, client_id) if algorithm.personal else None


def own_model(spec: TrainSpec, algorithm: LocalAlgorithm, state: StateDict, keys: Sequence[str],
              store: ClientStore | None, client_id: int, upto_round: int) -> torch.nn.Module | None:
    """Client ``client_id``'s own model as of ``upto_round``, loaded; None when it is the global model ``state``.

    The model is this worker's cached instance of the client's architecture (the shared one for rules without a
    personal model), so it is overwritten by the next call.
    """
    if not algorithm.keeps_state(len(keys) == len(state)):
        return None
    local = kept_state(spec, algorithm, store, client_id, upto_round)
    if local is None:
        return None
    model = (_cached_model(spec.personal_model_config(client_id), spec, shared=False) if algorithm.personal
             else _worker_model(spec))
    model.load_state_dict(algorithm.personal_state(state, local, keys))
    return model


def local_settings(fed: FederationConfig, server_round: int) -> LocalSettings:
    """The local-training hyperparameters of ``server_round`` (the learning rate follows the schedule)."""
    return LocalSettings(epochs=fed.local_epochs, batch_size=fed.batch_size, lr=learning_rate(fed, server_round),
                         momentum=fed.momentum, weight_decay=fed.weight_decay)


def train_client(
    spec: TrainSpec, client_id: int, server_round: int, global_state: StateDict, data: ClientData,
    store: ClientStore | None = None,
) -> ClientUpdate:
    """Local training of one client in one round; what it keeps is written to ``store`` at ``server_round``.

    The client's kept state (its state from its last round, or its personal model and optimiser buffers) is
    read from ``store`` (the newest version before this round), handed to the local algorithm, and the new one
    written back, so memory holds only the clients of the round. The update holds the entries sent.
    """
    fed = spec.federation
    model = _worker_model(spec)
    algorithm = build_algorithm(spec)
    job = ClientJob(
        client_id=client_id,
        model=model,
        global_state=global_state,
        sent_keys=sent_keys(spec),
        local_state=kept_state(spec, algorithm, store, client_id, server_round - 1),
        data=data,
        settings=local_settings(fed, server_round),
        generator=client_generator(fed.seed, server_round, client_id),
        personal_model=(_cached_model(spec.personal_model_config(client_id), spec, shared=False) if algorithm.personal
                        else None),
        objective=build_objective(spec),
    )
    result = algorithm.run(job)
    if result.local_state is not None and store is not None:
        store.save(client_id, server_round, result.local_state, {"round": str(server_round)})
    return result.update


def detection_metrics(result: Aggregate, malicious: frozenset[int], sampled: Sequence[int]) -> dict[str, float]:
    """Per-round counts of flagged/rejected clients, and precision/recall against ``malicious`` where defined."""
    counts = detection_counts(result.flagged, malicious, sampled)
    metrics = {"num_flagged": float(len(result.flagged)), "num_rejected": float(len(result.rejected)),
               "detect_tp": float(counts["tp"]), "detect_fp": float(counts["fp"]), "detect_fn": float(counts["fn"])}
    if counts["tp"] + counts["fp"]:
        metrics["detect_precision"] = counts["tp"] / (counts["tp"] + counts["fp"])
    if counts["tp"] + counts["fn"]:
        metrics["detect_recall"] = counts["tp"] / (counts["tp"] + counts["fn"])
    return metrics


def evaluate_clients(
    spec: TrainSpec, state: StateDict, data: FederatedDataset, store: ClientStore | None = None,
    server_round: int = 0,
) -> dict[str, float]:
    """Global test accuracy/loss and personalised accuracy on every client's held-out split.

    Each client is evaluated with its own model (:meth:`LocalAlgorithm.personal_state`: the global model, the
    global entries plus those it keeps, or its personal model), read from ``store`` one client at a time, so
    memory does not grow with the number of clients. When there is no single shared model (clients keep entries
    they do not send, or local-only training), the "global" test metrics are the means over the clients of their
    own models' test accuracy and loss.
    """
    algorithm = build_algorithm(spec)
    keys = sent_keys(spec)
    batch = spec.federation.eval_batch_size
    shared = algorithm.has_global_model(len(keys) == len(state))
    model = _worker_model(spec)
    model.load_state_dict(state)
    holds_global = True  # whether `model` holds `state` (a client's own entries may have replaced it)
    tests, accuracies = [], []
    if shared:
        tests.append(evaluate(model, data.test.features, data.test.labels, batch))
    for client, part in enumerate(data.holdout):
        if part is None and shared:
            continue
        own = own_model(spec, algorithm, state, keys, store, client, server_round)
        if own is None:
            if not holds_global:
                model.load_state_dict(state)
                holds_global = True
            own = model
        elif own is model:
            holds_global = False
        if not shared:
            tests.append(evaluate(own, data.test.features, data.test.labels, batch))
        if part is not None:
            accuracies.append(evaluate(own, part.features, part.labels, batch)["accuracy"])
    metrics = {"global_accuracy": sum(t["accuracy"] for t in tests) / len(tests),
               "global_loss": sum(t["loss"] for t in tests) / len(tests)}
    if accuracies:
        summary = personalised_summary(accuracies)
        metrics["personalised_accuracy_mean"] = summary["mean"]
        metrics["personalised_accuracy_worst10"] = summary["worst10"]
    return metrics


def summarise_updates(updates: Sequence[ClientUpdate], global_state: StateDict) -> dict[str, float]:
    """Round metrics from the clients' reports: train loss mean/min/max, clients, bytes down and up.

    ``updates`` and ``global_state`` hold the entries that travel (``federation.send``), so the bytes are those
    of the parameter group sent, down to and up from every client of the round.
    """
    losses = [float(u.metrics["train_loss"]) for u in updates]
    return {
        "train_loss_mean": sum(losses) / len(losses),
        "train_loss_min": min(losses),
        "train_loss_max": max(losses),
        "num_clients": float(len(updates)),
        "bytes_down": float(state_nbytes(global_state) * len(updates)),
        "bytes_up": float(sum(state_nbytes(u.state) for u in updates)),
    }


def client_means(updates: Sequence[ClientUpdate]) -> dict[str, float]:
    """Round means of the optional client metrics, over the clients that report them.

    The personal-model training metrics (FML, FedMLAC, local-only) and FedU's ``fedu_global_predictor`` (its mean:
    the share of clients that started from the global predictor) and ``fedu_divergence``.
    """
    names = ("personal_train_loss", "personal_train_accuracy", "fedu_global_predictor", "fedu_divergence")
    means = {}
    for name in names:
        values = [float(u.metrics[name]) for u in updates if name in u.metrics]
        if values:
            means[f"{name}_mean"] = sum(values) / len(values)
    return means


def run_fingerprint(spec: TrainSpec, data_digest: str, params: Params | None = None) -> str:
    """What a checkpoint must match to be resumed: every arithmetic-relevant param and the input data."""
    federation = {k: v for k, v in to_dict(spec.federation).items() if k not in NOT_IN_FINGERPRINT}
    payload: dict[str, Any] = {
        "model": to_dict(spec.model), "federation": federation, "data": data_digest,
        "num_classes": spec.num_classes, "input_shape": list(spec.input_shape),
    }
    if params is not None:
        payload["aggregation"] = to_dict(params.aggregation)
        payload["attack"] = to_dict(params.attack)
    section = ALGORITHM_SECTIONS.get(spec.federation.local_algorithm)
    if section:
        payload[section] = to_dict(getattr(spec, section))
    if spec.ssl.self_supervised:
        payload["ssl"] = to_dict(spec.ssl)
        if params is not None:
            payload["downstream"] = to_dict(params.downstream)
    if spec.personal_models:
        payload["personal"] = {"models": [to_dict(m) for m in spec.personal_models],
                               "assignment": list(spec.assignment), "seed": spec.personal_seed}
    return fingerprint(payload)


def evaluated_round(params: Params, server_round: int) -> bool:
    """Whether ``server_round`` is scored: every round (supervised), every ``downstream.every`` and the last (SSL)."""
    every = params.downstream.every if params.ssl.self_supervised else 1
    return server_round % every == 0 or server_round == params.federation.rounds


class SupervisedPlan(Plan):
    """Rounds of the local algorithm and aggregator of ``params`` over ``data`` (see the module docstring).

    Parameters
    ----------
    params : Params
        The run's params (federation, local algorithm and aggregator sections, attack, ssl, downstream).
    data : FederatedDataset
        Clients' train and held-out rows, and the test split.
    spec : TrainSpec
        What a worker needs to train any client (:func:`make_spec`).
    client_folder : Path, optional
        Where clients keep their state when they keep one (personal models, entries not sent, FedU); required
        then.
    downstream : DownstreamData, optional
        The downstream tasks of a self-supervised run (required then).
    """

    stage = "federate"

    def __init__(self, params: Params, data: FederatedDataset, spec: TrainSpec, *,
                 client_folder: Path | None = None, downstream: DownstreamData | None = None) -> None:
        fed = params.federation
        self.params, self.data, self.spec = params, data, spec
        self.rounds, self.min_accepted = fed.rounds, fed.min_accepted
        if spec.ssl.self_supervised and downstream is None:
            raise ConfigError("SupervisedPlan: a self-supervised run (ssl.method "
                              f"{spec.ssl.method!r}) needs its downstream tasks. Got none.")
        self.downstream = downstream if spec.ssl.self_supervised else None
        self.aggregator = build_aggregator(params)
        self.attack = build_attack(params)
        self.malicious = choose_malicious(data.num_clients, params.attack.client_fraction, params.attack.seed)
        self.keys = sent_keys(spec)
        self.forged_keys = attacked_keys(spec, self.keys, params.attack.include_buffers)
        self._initial = to_cpu_state(fresh_model(spec, fed.seed))
        # Clients keep a state of their own (on disk, one file per client and round) when they do not send
        # everything, when their rule needs it (FedU), or when they train a personal model (FML, FedMLAC, local).
        if build_algorithm(spec).keeps_state(len(self.keys) == len(self._initial)):
            if client_folder is None:
                raise ValueError(f"SupervisedPlan: {fed.local_algorithm!r} with send {fed.send!r} keeps a state "
                                 "per client: pass 'client_folder'.")
            self.client_store = ClientStore(client_folder)
        self._sampled: list[int] = []

    @override
    def initial_state(self) -> StateDict:
        return self._initial

    @override
    def stateful(self) -> Mapping[str, Stateful]:
        return {"aggregator": self.aggregator}

    @override
    def jobs(self, server_round: int, state: StateDict) -> tuple[list[int], list[Job]]:
        fed = self.params.federation
        self._sampled = sample_clients(self.data.num_clients, fed.client_fraction, fed.min_clients,
                                       round_rng(fed.seed, server_round))
        return self._sampled, [
            Job(c, server_round, train_client, (self.spec, c, server_round, state, self.data.train[c],
                                                self.client_store), threads=self.spec.intra_op_threads)
            for c in self._sampled]

    @override
    def combine(self, state: StateDict, updates: Sequence[ClientUpdate], failed: Mapping[int, str],
                server_round: int, min_accepted: int) -> RoundResult:
        sent_global = {k: state[k] for k in self.keys}
        if self.malicious and updates:
            updates = self.attack.corrupt(sent_global, updates, self.malicious, self.forged_keys,
                                          attack_generator(self.params.attack.seed, server_round))
        result = self.aggregator.aggregate(sent_global, updates, server_round, failed=failed,
                                           min_accepted=min_accepted)
        metrics = {**client_means(updates), **summarise_updates(updates, sent_global),
                   **detection_metrics(result, self.malicious, self._sampled),
                   "lr": learning_rate(self.params.federation, server_round)}
        record = {"flagged": sorted(result.flagged),
                  "excluded_per_layer": {k: list(v) for k, v in result.excluded_per_layer.items()},
                  "weights": {str(k): round(v, 6) for k, v in result.weights.items()}}
        return RoundResult({**state, **result.state}, result.rejected, metrics, record)

    @override
    def evaluate(self, state: StateDict, server_round: int, result: RoundResult) -> dict[str, float]:
        if self.downstream is None:
            return evaluate_clients(self.spec, state, self.data, self.client_store, server_round)
        return self.score_encoder(state) if evaluated_round(self.params, server_round) else {}

    @override
    def initial_metrics(self, state: StateDict) -> dict[str, float]:
        return self.score_encoder(state) if self.downstream is not None else {}

    def score_encoder(self, state: StateDict) -> dict[str, float]:
        """Scores of the encoder ``state`` on every downstream task (``<task>/knn<k>_val|test``, ``mean/...``)."""
        assert self.downstream is not None
        model = fresh_model(self.spec, self.spec.federation.seed)
        model.load_state_dict(state)
        return score_encoder(model, self.downstream.tasks, self.downstream.features, self.params.downstream,
                             self.spec.federation.eval_batch_size)
