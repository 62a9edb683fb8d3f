"""Choose local-training hyperparameters on the clients' held-out splits (carved from training data; test unused).

    python -m benchmarks.sweep --rounds 30 --grid "1,0.05,0.9" "2,0.05,0.9"   # local_epochs,lr,momentum
    python -m benchmarks.sweep --rounds 10 --width 8 --grid "2,0.05,0.9" \
        --aggregator fedadam --option server_lr=0.01,0.03,0.1,0.3            # a server-side option

Runs the federated rounds on fedcore's engine (:func:`fedcore.federation.engine.run_rounds`, serial executor, no
orchestration) over ``--params`` with the grid's values, on the features/partition the pipeline produced
(data/features, data/partition), and prints validation accuracy (pooled over every client's held-out split) every
5 rounds. The test split is never evaluated here.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from fedcore.aggregation import AGGREGATORS
from fedcore.aggregation.base import StateDict
from fedcore.config import ModelConfig, load_params
from fedcore.data.federated import FederatedDataset, load_federated_data
from fedcore.evaluation import evaluate
from fedcore.federation.checkpoint import Checkpointer
from fedcore.federation.engine import RoundResult, SerialExecutor, run_rounds
from fedcore.plans.supervised import SupervisedPlan, fresh_model, make_spec


class ValidationPlan(SupervisedPlan):
    """The supervised plan scored on the clients' pooled held-out splits every ``every`` rounds (never the test)."""

    def __init__(self, *args: Any, every: int = 5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        holdouts = [part for part in self.data.holdout if part is not None]
        self.val_x = torch.cat([part.features for part in holdouts])
        self.val_y = torch.cat([part.labels for part in holdouts])
        self.every = every
        self.model = fresh_model(self.spec, 0)

    def evaluate(self, state: StateDict, server_round: int, result: RoundResult) -> dict[str, float]:
        """Validation accuracy every ``every`` rounds."""
        if server_round % self.every:
            return {}
        self.model.load_state_dict(state)
        return {"val_accuracy": evaluate(self.model, self.val_x, self.val_y, 256)["accuracy"]}


def sweep_point(raw: dict[str, Any], data: FederatedDataset, threads: int) -> list[float]:
    """Validation accuracy every 5 rounds of one configuration (the rounds of fedcore's engine, serially)."""
    params = load_params(raw)
    spec = make_spec(params, data.num_clients, data.num_classes, data.input_shape, threads)
    with tempfile.TemporaryDirectory() as scratch:
        plan = ValidationPlan(params, data, spec, client_folder=Path(scratch) / "clients")
        run = run_rounds(plan, SerialExecutor(), Checkpointer(scratch, "sweep"), client_threads=threads,
                         server_threads=threads)
    return [round(row["val_accuracy"], 3) for row in run.history if "val_accuracy" in row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="base params (the rest kept)")
    parser.add_argument("--features", type=Path, default=Path("data/features"))
    parser.add_argument("--partition", type=Path, default=Path("data/partition/partition.json"))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", nargs="+", required=True,
                        help="local_epochs,lr,momentum[,schedule] (schedule: constant, step or cosine)")
    parser.add_argument("--width", type=int, default=ModelConfig().width, help="model.width")
    parser.add_argument("--aggregator", default="fedavg", help="server rule (aggregator registry name)")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=V1,V2,...",
                        help="an aggregation option to sweep as well, e.g. server_lr=0.01,0.1 (repeatable: the grid "
                             "is the product)")
    args = parser.parse_args()
    base = yaml.safe_load(args.params.read_text()) or {}
    rules = dict((base.get("aggregation") or {}).get("rules") or {})
    data = load_federated_data(args.features, args.partition)
    axes = [[(name, float(value)) for value in values.split(",")]
            for name, values in (option.split("=", 1) for option in args.option)]
    options = [dict(choice) for choice in itertools.product(*axes)]
    accepted = inspect.signature(AGGREGATORS.get(args.aggregator)).parameters
    if unknown := sorted({name for choice in options for name in choice} - set(accepted)):
        parser.error(f"{args.aggregator} takes no option {unknown}; it takes {sorted(accepted)}")
    for grid, option in itertools.product(args.grid, options):
        fields = grid.split(",")
        epochs, lr, momentum = int(fields[0]), float(fields[1]), float(fields[2])
        schedule = fields[3] if len(fields) > 3 else "constant"
        raw = {**base, "model": {**base.get("model", {}), "width": args.width},
               "federation": {**base.get("federation", {}), "rounds": args.rounds, "local_epochs": epochs, "lr": lr,
                              "momentum": momentum, "lr_schedule": schedule, "batch_size": args.batch_size,
                              "aggregator": args.aggregator, "local_algorithm": "fedavg", "client_fraction": 1.0,
                              "min_accepted": 1},
               "aggregation": {**base.get("aggregation", {}), "rules": {
                   **rules, args.aggregator: {**(rules.get(args.aggregator) or {}), **option}}}}
        started = time.perf_counter()
        curve = sweep_point(raw, data, args.threads)
        print(f"{args.aggregator} {option} E={epochs} lr={lr} ({schedule}) momentum={momentum}: "
              f"validation accuracy every 5 rounds {curve} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
