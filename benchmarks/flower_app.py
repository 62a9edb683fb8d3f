"""The reference workload (shared/BENCHMARKS.md) in Flower's Simulation Engine: Flower's side of the benchmark.

    .venv-flower/bin/python -m benchmarks.flower_app --workload results/reference/workload.npz --out flower.json

Runs the same federated job as :mod:`benchmarks.bare_loop` the way a Flower user would: a ``ServerApp`` running
Flower's own message-based ``FedAvg`` strategy (every client every round, no client-side evaluation, the global
model evaluated centrally on the test split before the first round and after each one) and a ``ClientApp`` whose
train handler is ``bare_loop.local_train`` on the rows of its partition, simulated by ``run_simulation`` on the Ray
backend with one CPU per client. The model, local training and evaluation are imported from ``bare_loop`` so that
only the framework differs. Rounds are timed between the central evaluations (round r: training, aggregation and
evaluation), after an untimed warm-up query that starts every Ray worker; ``end_to_end_seconds`` includes it all.

It lives in its own environment, ``.venv-flower`` (``bash benchmarks/flower/setup.sh``), not in the project's
``.venv``: ``flwr[simulation]`` 1.41.0 pins fastapi 0.138 and ray 2.55.1, which conflict with the project's prefect
pins. This module therefore imports only flwr, torch, numpy and ``benchmarks.bare_loop``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import time
from importlib.metadata import version
from pathlib import Path

# Before flwr and ray are imported (Ray's workers inherit the environment): no telemetry, no Ray usage stats, and
# Ray's future default for CPU-only actors (leave the accelerator env vars alone), which silences its FutureWarning.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from torch import nn

from benchmarks.bare_loop import ROUNDS, Workload, accuracy, initial_model, load_workload, local_train


def to_state(arrays: ArrayRecord, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn an ArrayRecord back into a state dict with ``reference``'s keys and dtypes.

    Flower's ``FedAvg`` averages every array as ``value * weight``, which turns the int64 BatchNorm
    ``num_batches_tracked`` into float64; integer entries are rounded, as in ``bare_loop.fedavg``.

    Parameters
    ----------
    arrays : ArrayRecord
        The model's arrays, keyed by state-dict name.
    reference : dict of str to torch.Tensor
        A state dict of the model, giving the key order and each entry's dtype.

    Returns
    -------
    dict of str to torch.Tensor
        The state dict to load.
    """
    state = {}
    for key, ref in reference.items():
        value = arrays[key].numpy()
        state[key] = torch.tensor(value if ref.is_floating_point() else np.rint(value), dtype=ref.dtype)
    return state


@functools.cache
def client_setup(workload: str) -> tuple[Workload, nn.Module]:
    """Load the workload and build a model once per Ray worker process, which trains on one thread.

    Parameters
    ----------
    workload : str
        Absolute path of the workload file.

    Returns
    -------
    tuple of Workload and nn.Module
        The workload and a model to train in place.
    """
    torch.set_num_threads(1)
    work = load_workload(Path(workload))
    return work, initial_model(work.num_classes)


client_app = ClientApp()


@client_app.query()
def warm_up(msg: Message, context: Context) -> Message:
    """Start this node's Ray worker (imports, workload, model) ahead of the timed rounds.

    Parameters
    ----------
    msg : Message
        The ServerApp's warm-up query, with the ``"workload"`` path under ``"config"``.
    context : Context
        The node's context (unused).

    Returns
    -------
    Message
        An empty reply.
    """
    client_setup(str(msg.content["config"]["workload"]))
    return Message(content=RecordDict(), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on this node's partition for one round and reply with its state and sample count.

    Parameters
    ----------
    msg : Message
        The strategy's train message: the global arrays under ``"arrays"``, and under ``"config"`` the
        ``"server-round"`` (set by ``FedAvg``) and the ``"workload"`` path.
    context : Context
        The node's context; its ``node_config["partition-id"]`` (0 … clients - 1) is the client index, unlike
        Flower's random node id.

    Returns
    -------
    Message
        The reply: the trained state under ``"arrays"`` and ``"num-examples"`` (FedAvg's weight) under
        ``"metrics"``.
    """
    config = msg.content["config"]
    work, model = client_setup(str(config["workload"]))
    client = int(context.node_config["partition-id"])
    rows = torch.from_numpy(work.parts[client])
    state = local_train(model, to_state(msg.content["arrays"], model.state_dict()), work.x_train[rows],
                        work.y_train[rows], int(config["server-round"]), client)
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": len(rows)})})
    return Message(content=content, reply_to=msg)


def make_server_app(work: Workload, workload: Path, rounds: int,
                    history: list[tuple[int, float, float]]) -> ServerApp:
    """Build the ServerApp: Flower's ``FedAvg`` over every node each round, centralised evaluation only.

    Parameters
    ----------
    work : Workload
        The workload; its test split is evaluated in this process.
    workload : Path
        The workload file, sent to the clients in the train config.
    rounds : int
        Number of rounds.
    history : list of (round, accuracy, perf_counter)
        Filled by the evaluation function, which runs in this process (``run_simulation`` runs the ServerApp in a
        thread of the calling process): one entry for round 0 (initial model) and one after each round.

    Returns
    -------
    ServerApp
        The app to pass to ``run_simulation``.
    """
    model = initial_model(work.num_classes)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        acc = accuracy(model, to_state(arrays, initial), work.x_test, work.y_test)
        history.append((server_round, acc, time.perf_counter()))
        return MetricRecord({"accuracy": acc})

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        clients = len(work.parts)
        config = ConfigRecord({"workload": str(workload)})
        # Untimed warm-up: the ServerApp starts before the simulated nodes and Ray's worker processes are up, so
        # query every node once (every worker then has imported torch and flwr and loaded the workload) before
        # strategy.start evaluates round 0; otherwise round 1 would carry the whole start-up.
        while len(nodes := list(grid.get_node_ids())) < clients:
            time.sleep(0.1)
        grid.send_and_receive([Message(RecordDict({"config": config}), dst_node_id=node,
                                       message_type=MessageType.QUERY) for node in nodes])
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients,
                          min_available_nodes=clients)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=rounds, train_config=config,
                       evaluate_fn=evaluate)

    return app


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                        help="CPUs for the Ray backend; each client takes one")
    args = parser.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.WARNING)

    workload = args.workload.resolve()
    work = load_workload(workload)
    history: list[tuple[int, float, float]] = []
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": args.cpus, "num_gpus": 0, "include_dashboard": False, "log_to_driver": False,
                      "logging_level": "ERROR"},
    }
    run_simulation(server_app=make_server_app(work, workload, args.rounds, history), client_app=client_app,
                   num_supernodes=len(work.parts), backend_config=backend_config)
    end_to_end = time.perf_counter() - started

    rounds = [r for r, _, _ in history]
    if rounds != list(range(args.rounds + 1)):
        raise RuntimeError(f"expected evaluations for rounds 0..{args.rounds}, got {rounds}")
    accuracies = [acc for _, acc, _ in history[1:]]
    stamps = [t for _, _, t in history]
    result = {
        "accuracy": accuracies,
        "round_seconds": np.diff(stamps).tolist(),
        "total_seconds": stamps[-1] - stamps[0],
        "end_to_end_seconds": end_to_end,
        "final_accuracy": accuracies[-1],
        "best_accuracy": max(accuracies),
        "best_round": int(np.argmax(accuracies)) + 1,
        "framework": f"flwr {version('flwr')} simulation (ray {version('ray')})",
        "torch": torch.__version__,
        "cpus": args.cpus,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"flower: final {result['final_accuracy']:.4f}, best {result['best_accuracy']:.4f}, "
          f"{result['total_seconds']:.1f} s ({end_to_end:.1f} s end to end)")
    return 0


if __name__ == "__main__":
    # Run main() from the module imported by its name, so that Ray pickles the ClientApp's functions by reference
    # (the workers import benchmarks.flower_app and keep client_setup's cache) rather than by value as __main__.
    from benchmarks.flower_app import main as named_main

    raise SystemExit(named_main())
