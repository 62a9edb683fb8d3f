"""The early-exit plan: federated fine-tuning with early exits, budget tiers and depth-aware aggregation.

PAPERS.md §5. :class:`EarlyExitPlan` is what :func:`fedcore.federation.engine.run_rounds` runs for the earlyexit
stage. Every client has a budget tier (``earlyexit.tiers``, a seeded draw: the deepest exit it can afford), and
``earlyexit.plan`` says how deep it trains (``early_exit``: to its tier's exit; ``full``: the whole model;
``drop_weak``: only the deepest tier trains, the others sit out). Each round:

- :meth:`~EarlyExitPlan.jobs`: the sampled clients that train run :func:`train_exit_job` (the objective
  :class:`~fedcore.earlyexit.train.ExitDepth` in the one minibatch loop: layers 1..d and the exits they train,
  each a head and, under ``earlyexit.exit_norm: per_exit``, its own LayerNorm, with their FLOPs counted) and send
  only those entries;
- :meth:`~EarlyExitPlan.combine`: the server rule ``earlyexit.server`` aggregates every entry over the clients
  that sent it with weights n_c · g(l, d_c) (:func:`~fedcore.earlyexit.aggregate.depth_aware`, the one partial
  aggregation, whose screening rejects a failed client, a non-finite or malformed update, or layers beyond a
  client's exit, and holds the quorum): FedAvg takes the weighted mean, FedAdam steps towards it with its
  moments (a :meth:`~EarlyExitPlan.stateful` part, so a resumed run equals an uninterrupted one); the round's
  compute accounting (FLOPs, seconds, bytes; overall and per tier) comes from the accepted clients;
- :meth:`~EarlyExitPlan.evaluate`: every exit's accuracy on the test split and on the clients' pooled held-out
  rows (``val_``).

``earlyexit.rounds`` (else ``federation.rounds``) rounds at most: under ``earlyexit.stop: plateau`` (default, issue
21) the run ends once the last exit's validation accuracy (``earlyexit.plateau_metric``) gained under
``plateau_min_gain`` in ``plateau_patience`` rounds (:class:`~fedcore.federation.engine.Plateau`, the loop's stop
rule: it reads the held-out rows' scores only, never the test split's).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from typing_extensions import override

from fedcore.aggregation.base import ClientUpdate
from fedcore.aggregation.state import StateDict, to_cpu_state
from fedcore.algorithms.base import ClientData
from fedcore.config import EarlyExitConfig, FederationConfig, ModelConfig, Params, to_dict
from fedcore.data.federated import FederatedDataset
from fedcore.earlyexit.aggregate import depth_aware
from fedcore.earlyexit.models import EarlyExitModel, build_exit_model
from fedcore.earlyexit.tiers import EXIT_PLANS, assign_exits
from fedcore.earlyexit.train import exit_accuracies, train_exit_client
from fedcore.errors import ConfigError
from fedcore.federation.checkpoint import fingerprint
from fedcore.federation.engine import Job, Plan, Plateau, RoundResult, Stateful
from fedcore.federation.sampling import client_generator, round_rng, sample_clients
from fedcore.plans.common import params_fingerprint
from fedcore.plans.supervised import build_aggregator, local_settings


@dataclass(frozen=True)
class ExitSpec:
    """What a worker needs to train any early-exit client of a round (small, picklable)."""

    model: ModelConfig
    earlyexit: EarlyExitConfig
    federation: FederationConfig
    num_classes: int
    input_shape: tuple[int, int, int]


def exit_spec(params: Params, num_classes: int, input_shape: tuple[int, int, int]) -> ExitSpec:
    """The worker spec of a run of ``params`` on data of ``num_classes`` classes and inputs ``input_shape``."""
    return ExitSpec(params.model, params.earlyexit, params.federation, num_classes, tuple(input_shape))  # type: ignore[arg-type]


def exit_model(spec: ExitSpec, seed: int) -> EarlyExitModel:
    """The early-exit model of ``spec`` with weights drawn from ``seed`` (no pretrained backbone loaded)."""
    cfg = spec.earlyexit
    return build_exit_model(cfg.backbone, input_shape=spec.input_shape, cfg=spec.model,
                            options=cfg.backbone_options, exits=cfg.exits, num_classes=spec.num_classes,
                            head=cfg.head, generator=torch.Generator().manual_seed(seed), exit_norm=cfg.exit_norm)


def client_depths(cfg: EarlyExitConfig, num_clients: int) -> tuple[list[int], list[int | None]]:
    """(tier depth of every client, depth it trains under ``cfg.plan``; None: it sits out)."""
    tiers = assign_exits(num_clients, [(float(t["share"]), int(t["depth"])) for t in cfg.tiers], cfg.seed)
    plan = EXIT_PLANS.build(cfg.plan)
    return tiers, [plan(depth, cfg.exits[-1]) for depth in tiers]


def stage_rounds(params: Params) -> int:
    """Rounds of the stage (the cap under a plateau rule): ``earlyexit.rounds``, else ``federation.rounds``."""
    cfg = params.earlyexit
    return cfg.rounds if cfg.rounds is not None else params.federation.rounds


def plateau_rule(cfg: EarlyExitConfig) -> Plateau | None:
    """The stop rule of ``earlyexit.stop``: a plateau of an exit's validation accuracy, or None (every round)."""
    if cfg.stop != "plateau":
        return None
    metric = cfg.plateau_metric or f"val_exit{cfg.exits[-1]}_accuracy"
    return Plateau(metric, cfg.plateau_min_gain, cfg.plateau_patience)


def run_fingerprint(params: Params, data_digest: str) -> str:
    """What a checkpoint must match to be resumed: the sections that change the arithmetic, and the data."""
    return params_fingerprint(params, ("model", "federation", "earlyexit", "aggregation"), data_digest)


_local = threading.local()


def _worker_model(spec: ExitSpec) -> EarlyExitModel:
    """One model instance per architecture and worker thread, reused (every job loads its weights)."""
    key = fingerprint({"model": to_dict(spec.model), "ee": to_dict(spec.earlyexit), "c": spec.num_classes,
                       "s": list(spec.input_shape)})
    if getattr(_local, "key", None) != key:
        _local.model, _local.key = exit_model(spec, 0), key
    model: EarlyExitModel = _local.model
    return model


def train_exit_job(spec: ExitSpec, client_id: int, server_round: int, global_state: StateDict, data: ClientData,
                   depth: int) -> ClientUpdate:
    """One early-exit client's round (layers up to ``depth``; the entries it trained are sent)."""
    fed = spec.federation
    return train_exit_client(client_id=client_id, model=_worker_model(spec), global_state=global_state, data=data,
                             depth=depth, settings=local_settings(fed, server_round),
                             generator=client_generator(fed.seed, server_round, client_id),
                             deep_supervision=spec.earlyexit.deep_supervision)


def pooled(parts: Sequence[ClientData | None]) -> ClientData | None:
    """The clients' held-out rows in one set (None when no client has any)."""
    found = [p for p in parts if p is not None]
    if not found:
        return None
    return ClientData(torch.cat([p.features for p in found]), torch.cat([p.labels for p in found]))


def compute_metrics(updates: Sequence[ClientUpdate], tiers: Sequence[int]) -> dict[str, float]:
    """The round's compute accounting from the accepted updates: overall, then per budget tier.

    ``client_gflops_mean`` (counted training GFLOPs per client), ``client_seconds_mean``/``_max`` (wall),
    ``bytes_up``, ``train_loss_mean``, ``num_clients``; per tier t: ``tier<t>_gflops_mean``,
    ``tier<t>_seconds_mean`` and ``tier<t>_mflops_per_example``.
    """
    flops = [u.metrics["train_flops"] for u in updates]
    metrics = {
        "num_clients": float(len(updates)),
        "client_gflops_mean": sum(flops) / len(flops) / 1e9 if flops else 0.0,
        "client_seconds_mean": sum(u.metrics["train_seconds"] for u in updates) / max(1, len(updates)),
        "client_seconds_max": max((u.metrics["train_seconds"] for u in updates), default=0.0),
        "bytes_up": float(sum(u.metrics["bytes_sent"] for u in updates)),
        "train_loss_mean": sum(u.metrics["train_loss"] for u in updates) / max(1, len(updates)),
    }
    per_tier: dict[int, list[ClientUpdate]] = defaultdict(list)
    for update in updates:
        per_tier[tiers[update.client_id]].append(update)
    for tier, members in sorted(per_tier.items()):
        metrics[f"tier{tier}_gflops_mean"] = sum(u.metrics["train_flops"] for u in members) / len(members) / 1e9
        metrics[f"tier{tier}_seconds_mean"] = sum(u.metrics["train_seconds"] for u in members) / len(members)
        metrics[f"tier{tier}_mflops_per_example"] = sum(u.metrics["flops_per_example"] for u in members) / len(
            members) / 1e6
    return metrics


class EarlyExitPlan(Plan):
    """Early-exit rounds of ``params`` over ``data`` (see the module docstring).

    Parameters
    ----------
    params : Params
        The run's params (``model``, ``federation``, ``earlyexit``, ``aggregation`` for the server rule).
    data : FederatedDataset
        Clients' train and held-out rows, and the test split.
    initial : dict of str to Tensor, optional
        The global state of round 0 (e.g. random heads on a pretrained backbone: the caller reads
        ``earlyexit.init``); default: the model drawn from ``federation.seed``.
    client_threads : int, default 1
        Torch threads of each client job (``federation.client_threads``).

    Raises
    ------
    ConfigError
        If the deepest exit is beyond ``model.depth``, ``initial`` does not fit the model, or ``earlyexit.stop:
        plateau`` has no validation rows to read (no client holds any held-out rows).
    """

    stage = "earlyexit"

    def __init__(self, params: Params, data: FederatedDataset, initial: StateDict | None = None, *,
                 client_threads: int = 1) -> None:
        fed, cfg = params.federation, params.earlyexit
        if cfg.exits[-1] > params.model.depth:
            raise ConfigError(f"earlyexit: the deepest exit ({cfg.exits[-1]}) must be <= model.depth "
                              f"({params.model.depth}).")
        self.params, self.data, self.client_threads = params, data, client_threads
        self.rounds, self.min_accepted = stage_rounds(params), fed.min_accepted
        self.val = pooled(data.holdout)
        self.stop_rule = plateau_rule(cfg)
        if self.stop_rule is not None and self.val is None:
            raise ConfigError("earlyexit: 'stop: plateau' reads a validation accuracy on the clients' held-out rows, "
                              "and no client has any. Fix: partition.holdout_fraction > 0, or earlyexit.stop: "
                              "rounds.")
        self.spec = exit_spec(params, data.num_classes, data.input_shape)
        self.tiers, self.depths = client_depths(cfg, data.num_clients)
        self.server = build_aggregator(params, cfg.server)
        #: The server's instance of the model: layer of every entry, evaluation.
        self.model = exit_model(self.spec, fed.seed)
        self._initial = to_cpu_state(self.model) if initial is None else dict(initial)
        if self._initial.keys() != self.model.state_dict().keys():
            raise ConfigError("earlyexit: the initial state must hold the model's entries. Missing "
                              f"{sorted(self.model.state_dict().keys() - self._initial.keys())[:5]}, unexpected "
                              f"{sorted(self._initial.keys() - self.model.state_dict().keys())[:5]}.")
        self._round_depths: dict[int, int] = {}

    @override
    def initial_state(self) -> StateDict:
        return self._initial

    @override
    def stateful(self) -> Mapping[str, Stateful]:
        return {"server": self.server}

    @override
    def jobs(self, server_round: int, state: StateDict) -> tuple[list[int], list[Job]]:
        fed = self.params.federation
        sampled = sample_clients(self.data.num_clients, fed.client_fraction, fed.min_clients,
                                 round_rng(fed.seed, server_round))
        self._round_depths = {c: depth for c in sampled if (depth := self.depths[c]) is not None}
        return sampled, [Job(c, server_round, train_exit_job, (self.spec, c, server_round, state, self.data.train[c],
                                                               depth), threads=self.client_threads)
                         for c, depth in self._round_depths.items()]

    @override
    def combine(self, state: StateDict, updates: Sequence[ClientUpdate], failed: Mapping[int, str],
                server_round: int, min_accepted: int) -> RoundResult:
        combined = depth_aware(self.server, state, updates, self._round_depths, self.model.layer_of,
                               self.params.earlyexit.weighting, server_round=server_round, failed=failed,
                               min_accepted=min_accepted, exit_of=self.model.exit_of)
        accepted = [u for u in updates if u.client_id not in combined.rejected]
        new_state = combined.state
        record = {"depths": {str(c): d for c, d in sorted(self._round_depths.items())}}
        return RoundResult(new_state, combined.rejected, compute_metrics(accepted, self.tiers), record)

    @override
    def evaluate(self, state: StateDict, server_round: int, result: RoundResult) -> dict[str, float]:
        self.model.load_state_dict(state)
        batch = self.params.federation.eval_batch_size
        scored = [("", self.data.test)] + ([("val_", self.val)] if self.val is not None else [])
        return {f"{prefix}exit{e}_accuracy": v for prefix, split in scored
                for e, v in exit_accuracies(self.model, split, batch).items()}
