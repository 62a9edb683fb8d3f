"""Federation tasks: load the federated data, train one client, aggregate, evaluate, write the stage outputs."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from fedcore.aggregation import AGGREGATORS
from fedcore.aggregation.base import Aggregate, Aggregator, ClientUpdate, StateDict
from fedcore.aggregation.state import state_nbytes
from fedcore.algorithms import LOCAL_ALGORITHMS
from fedcore.algorithms.base import ClientData, ClientJob, LocalAlgorithm, LocalSettings, Objective
from fedcore.algorithms.mutual import join_personal
from fedcore.attacks import ATTACKS, UpdateAttack, attack_generator, detection_counts
from fedcore.config import (
    DownstreamConfig,
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
from fedcore.data.features import FeatureStore
from fedcore.data.federated import FederatedDataset, Overlay, build_federated_dataset
from fedcore.errors import ConfigError
from fedcore.evaluation import evaluate, personalised_summary
from fedcore.federation.checkpoint import fingerprint
from fedcore.federation.client_store import ClientStore
from fedcore.federation.sampling import client_generator
from fedcore.federation.schedules import learning_rate
from fedcore.models import build_model
from fedcore.models.assign import assign_models, personal_generator
from fedcore.models.groups import PARAM_GROUPS
from fedcore.ssl.methods import build_method
from tasks.common import pyplot, read_json, save_figure

# Options of a local algorithm, by name: the params.yaml section that holds them.
ALGORITHM_SECTIONS = {"fedprox": "fedprox", "fedu": "fedu", "fml": "mutual", "fedmlac": "mutual"}

# Federation fields that do not change the arithmetic, so they do not invalidate checkpoints.
NOT_IN_FINGERPRINT = {"runner", "max_workers", "address", "log_model_every", "eval_batch_size", "min_accepted"}


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
    return build_method(spec.ssl.method, to_dict(spec.ssl))


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


def build_aggregator(params: Params) -> Aggregator:
    """The server-side rule of :func:`aggregator_name`, with its options from the aggregation section."""
    return AGGREGATORS.build_from(aggregator_name(params), to_dict(params.aggregation))


def build_attack(params: Params) -> UpdateAttack:
    """The update attack named in ``attack.name``, with its options from the attack section."""
    return ATTACKS.build_from(params.attack.name, to_dict(params.attack))


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


def _cached_model(cfg: ModelConfig, spec: TrainSpec) -> torch.nn.Module:
    """One model instance per architecture and worker thread, reused (its weights are overwritten each time)."""
    shared = cfg == spec.model  # the shared model is trained with the objective; personal models are classifiers
    key = (cfg, spec.num_classes, spec.input_shape, fingerprint(to_dict(spec.ssl)) if shared else None)
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
    return _cached_model(spec.model, spec)


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
    model = _cached_model(spec.personal_model_config(client_id), spec) if algorithm.personal else _worker_model(spec)
    model.load_state_dict(algorithm.personal_state(state, local, keys))
    return model


def local_settings(fed: FederationConfig, server_round: int) -> LocalSettings:
    """The local-training hyperparameters of ``server_round`` (the learning rate follows the schedule)."""
    return LocalSettings(epochs=fed.local_epochs, batch_size=fed.batch_size, lr=learning_rate(fed, server_round),
                         momentum=fed.momentum, weight_decay=fed.weight_decay)


@task(name="train-client", cache_policy=NO_CACHE, retries=1)
def train_client_task(
    spec: TrainSpec, client_id: int, server_round: int, global_state: StateDict, data: ClientData,
    store: ClientStore | None = None,
) -> ClientUpdate:
    """Local training of one client in one round; what it keeps is written to ``store`` at ``server_round``.

    The client's kept state (its state from its last round, or its personal model and optimiser buffers) is
    read from ``store`` (the newest version before this round), handed to the local algorithm, and the new one
    written back, so memory holds only the clients of the round. The update holds the entries sent.
    """
    if torch.get_num_threads() != spec.intra_op_threads:
        torch.set_num_threads(spec.intra_op_threads)
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
        personal_model=_cached_model(spec.personal_model_config(client_id), spec) if algorithm.personal else None,
        objective=build_objective(spec),
    )
    result = algorithm.run(job)
    if result.local_state is not None and store is not None:
        store.save(client_id, server_round, result.local_state, {"round": str(server_round)})
    return result.update


@task(name="attack-updates", cache_policy=NO_CACHE)
def attack_task(
    attack: UpdateAttack, global_state: StateDict, updates: Sequence[ClientUpdate], malicious: frozenset[int],
    keys: Sequence[str], seed: int, server_round: int,
) -> list[ClientUpdate]:
    """Replace the updates of the malicious clients of this round by forged ones."""
    return attack.corrupt(global_state, updates, malicious, keys, attack_generator(seed, server_round))


@task(name="aggregate-updates", cache_policy=NO_CACHE)
def aggregate_task(
    aggregator: Aggregator, global_state: StateDict, updates: Sequence[ClientUpdate], server_round: int,
    failed: Mapping[int, str] | None = None, min_accepted: int = 1,
) -> Aggregate:
    """Server step of the round: the next global state and whom the rule rejected, excluded or down-weighted.

    ``failed`` clients (their training raised) are rejected with their reason; fewer than ``min_accepted``
    accepted updates raise :class:`~fedcore.errors.QuorumError` (the round is not applied).
    """
    return aggregator.aggregate(global_state, updates, server_round, failed=failed, min_accepted=min_accepted)


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


@task(name="evaluate-round", cache_policy=NO_CACHE)
def evaluate_task(
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


@task(name="load-federated-data", cache_policy=NO_CACHE)
def load_federated_data(features_dir: Path, partition_file: Path, poison_dir: Path | None) -> FederatedDataset:
    """Feature store + partition + poison overlay → per-client tensors."""
    store = FeatureStore.load(Path(features_dir), mmap=True)
    partition = read_json(partition_file)
    overlay = None
    if poison_dir is not None and (Path(poison_dir) / "overlay.npz").exists():
        with np.load(Path(poison_dir) / "overlay.npz") as arrays:
            overlay = Overlay.from_arrays(arrays)
    return build_federated_dataset(store, partition, overlay)


def file_digest(paths: Sequence[Path]) -> str:
    """sha256 over the bytes of ``paths`` (missing files count as empty)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.name).encode())
        if path.exists():
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


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


ROUND_COLUMNS = (
    "round", "global_accuracy", "global_loss", "personalised_accuracy_mean", "personalised_accuracy_worst10",
    "train_loss_mean", "train_loss_min", "train_loss_max", "lr", "num_clients", "bytes_up", "bytes_down",
    "num_flagged", "num_rejected", "num_failed", "detect_precision", "detect_recall",
)


def rounds_tsv(history: Sequence[dict[str, float]], columns: Sequence[str] = ROUND_COLUMNS) -> str:
    """Per-round table (DVC plots source); a round without a column's metric gets ``nan``."""
    lines = ["\t".join(columns)]
    for row in history:
        lines.append("\t".join(_fmt(row.get(c, float("nan"))) for c in columns))
    return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.6g}"


def plot_rounds(history: Sequence[dict[str, float]], path: Path) -> None:
    """Accuracy and loss against round (PNG; DVC's HTML plots need a CDN, this does not)."""
    plt = pyplot()

    rounds = [row["round"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for key, label in [("global_accuracy", "global test"), ("personalised_accuracy_mean", "personalised mean"),
                       ("personalised_accuracy_worst10", "personalised worst 10%")]:
        if all(key in row for row in history):
            left.plot(rounds, [row[key] for row in history], marker=".", label=label)
    left.set_xlabel("round")
    left.set_ylabel("accuracy")
    left.set_ylim(0, 1)
    left.grid(alpha=0.3)
    left.legend()
    right.plot(rounds, [row["global_loss"] for row in history], marker=".", label="global test loss")
    right.plot(rounds, [row["train_loss_mean"] for row in history], marker=".", label="client train loss (mean)")
    right.set_xlabel("round")
    right.set_ylabel("cross-entropy")
    right.grid(alpha=0.3)
    right.legend()
    save_figure(fig, path)


def plot_downstream(history: Sequence[dict[str, float]], floor: dict[str, float], cfg: DownstreamConfig,
                    path: Path) -> None:
    """Self-supervised runs: each task's validation and test score against round, with the random-init floor.

    One panel per task (the selection metric, ``knn1`` by default), the best validation round marked; a last
    panel with the clients' mean training loss.
    """
    plt = pyplot()
    metric = cfg.select_metric
    tasks = [t.name for t in cfg.task_configs()]
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(3.6 * (len(tasks) + 1), 3.4), dpi=110, squeeze=False)
    for ax, name in zip(axes[0], tasks, strict=False):
        rows = [row for row in history if f"{name}/{metric}_val" in row]
        rounds = [row["round"] for row in rows]
        for split, style in (("val", "-"), ("test", "--")):
            ax.plot(rounds, [row[f"{name}/{metric}_{split}"] for row in rows], style, marker=".", label=split)
            if f"{name}/{metric}_{split}" in floor:
                ax.axhline(floor[f"{name}/{metric}_{split}"], color="grey", linestyle=":", linewidth=1)
        if rows:
            best = max(rows, key=lambda row: row[f"{name}/{metric}_val"])
            ax.plot([best["round"]], [best[f"{name}/{metric}_val"]], "r*", markersize=11, label="best (val)")
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.set_ylabel(f"{metric} accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="dotted: random init", title_fontsize=7)
    loss_ax = axes[0][-1]
    loss_ax.plot([row["round"] for row in history], [row["train_loss_mean"] for row in history], marker=".")
    loss_ax.set_title("clients' SSL loss (mean)")
    loss_ax.set_xlabel("round")
    loss_ax.grid(alpha=0.3)
    save_figure(fig, path)
