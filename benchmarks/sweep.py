"""Choose local-training hyperparameters on the clients' held-out splits (carved from training data; test unused).

    python -m benchmarks.sweep --rounds 30 --grid "1,0.05,0.9" "2,0.05,0.9"   # local_epochs,lr,momentum
    python -m benchmarks.sweep --rounds 10 --width 8 --grid "2,0.05,0.9" \
        --aggregator fedadam --option server_lr=0.01,0.03,0.1,0.3            # a server-side option

Runs the federated rounds directly on fedcore (no orchestration) on the features/partition the pipeline produced
(data/features, data/partition) and prints validation accuracy (pooled over every client's held-out split) every
5 rounds. The test split is never evaluated here.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedcore.aggregation import AGGREGATORS
from fedcore.aggregation.state import to_cpu_state
from fedcore.algorithms import LOCAL_ALGORITHMS
from fedcore.algorithms.base import LocalSettings, train_client
from fedcore.config import FederationConfig, ModelConfig
from fedcore.data.features import FeatureStore
from fedcore.data.federated import build_federated_dataset
from fedcore.evaluation import evaluate
from fedcore.federation.sampling import client_generator
from fedcore.federation.schedules import learning_rate
from fedcore.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    torch.set_num_threads(args.threads)
    data = build_federated_dataset(FeatureStore.load(args.features), json.loads(args.partition.read_text()))
    holdouts = [part for part in data.holdout if part is not None]
    val_x = torch.cat([part.features for part in holdouts])
    val_y = torch.cat([part.labels for part in holdouts])
    axes = [[(name, float(value)) for value in values.split(",")]
            for name, values in (option.split("=", 1) for option in args.option)]
    options = [dict(choice) for choice in itertools.product(*axes)]
    accepted = inspect.signature(AGGREGATORS.get(args.aggregator)).parameters
    if unknown := sorted({name for choice in options for name in choice} - set(accepted)):
        parser.error(f"{args.aggregator} takes no option {unknown}; it takes {sorted(accepted)}")
    for spec, option in itertools.product(args.grid, options):
        fields = spec.split(",")
        epochs, lr, momentum = int(fields[0]), float(fields[1]), float(fields[2])
        schedule = fields[3] if len(fields) > 3 else "constant"
        fed = FederationConfig(rounds=args.rounds, lr=lr, lr_schedule=schedule)
        model = build_model(ModelConfig(width=args.width), data.num_classes, data.input_shape,
                            torch.Generator().manual_seed(0))
        state = to_cpu_state(model)
        aggregator = AGGREGATORS.build_from(args.aggregator, option)
        algorithm = LOCAL_ALGORITHMS.build("fedavg")
        curve, started = [], time.perf_counter()
        for server_round in range(1, args.rounds + 1):
            updates = [train_client(client_id=c, model=model, global_state=state, data=data.train[c],
                                    algorithm=algorithm,
                                    settings=LocalSettings(epochs=epochs, batch_size=args.batch_size,
                                                           lr=learning_rate(fed, server_round), momentum=momentum,
                                                           weight_decay=0.0),
                                    generator=client_generator(0, server_round, c))
                       for c in range(data.num_clients)]
            state = aggregator.aggregate(state, updates, server_round).state
            if server_round % 5 == 0:
                model.load_state_dict(state)
                curve.append(round(evaluate(model, val_x, val_y, 256)["accuracy"], 3))
        print(f"{args.aggregator} {option} E={epochs} lr={lr} ({schedule}) momentum={momentum}: "
              f"validation accuracy every 5 rounds {curve} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
