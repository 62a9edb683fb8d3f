"""Personalisation matrix, per client: each client's final model on its held-out split, benign and poisoned apart.

The matrix's ``personalised_accuracy_mean`` averages every client, so under data poisoning it mixes two effects:
the poisoned clients' own models learning their corrupted data (self-harm: a personal model fitted to flipped
labels and scored on clean held-out labels loses ≈ its clean accuracy, whatever the server does; with 20% of the
clients poisoned the all-client mean must drop by ≈ 0.2 × the clean accuracy) and the harm that reaches the
*benign* clients through the shared model, which is what a robust server rule (FedMLAC's LPA) is for. The cell
stage therefore evaluates, once its run has finished, each client's final model (the global model, or the
personal model from the cell's client store) on the client's clean held-out split, checks that their mean is the
cell's ``personalised_accuracy_mean``, and writes ``clients.json`` beside ``metrics.json``:

- ``accuracy``: ``{client id: accuracy}``;
- ``attacked``: the poisoned clients: the poison stage's ground truth (``poison/ground_truth.json``,
  ``attacked_clients``) together with the clients whose updates were attacked (``metrics.json``,
  ``malicious_clients``; none in this matrix);
- ``benign_accuracy_mean`` / ``poisoned_accuracy_mean``: the means over the clients not attacked / attacked
  (None where there are none), ``personalised_accuracy_mean`` (every client) and ``global_accuracy`` (the shared
  model's test accuracy; ``local``: the clients' own models', averaged), as the cell reported them;
- ``flags`` / ``flags_on_attacked``: the (round, client) pairs the server rule flagged (``detection.json``), and
  those on poisoned clients, for the rules that flag (``lpa``).

The change of the benign clients against the method's clean run (same dataset and seed, so the same partition and
the same clients) is the table's business (:func:`benign_change`), since it reads two cells.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from fedcore.config import Params
from fedcore.evaluation import evaluate
from fedcore.federation.checkpoint import load_state
from fedcore.federation.client_store import ClientStore
from fedcore.models import build_model
from fedcore.plans.supervised import build_algorithm, make_spec, own_model, sent_keys
from tasks.common import read_json
from tasks.federate import load_federated_data

#: Tolerance of the check against the cell's own personalised mean (float64 mean of float accuracies).
TOLERANCE = 1e-6


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def split_clients(accuracy: Mapping[int, float], attacked: Iterable[int]) -> dict[str, float | None]:
    """The means of the per-client accuracies over every client, the benign ones and the poisoned ones."""
    attacked = set(attacked)
    return {"personalised_accuracy_mean": _mean(accuracy.values()),
            "benign_accuracy_mean": _mean(a for c, a in accuracy.items() if c not in attacked),
            "poisoned_accuracy_mean": _mean(a for c, a in accuracy.items() if c in attacked)}


def benign_change(cell: Mapping[str, Any], clean: Mapping[str, Any]) -> float | None:
    """Benign clients' mean accuracy change against the same clients in the clean run: mean_k (a_k − c_k).

    ``cell`` and ``clean`` are two ``clients.json`` records of one method, dataset and seed (``accuracy`` keyed by
    client id as a string, ``attacked``); the benign clients are those ``cell`` does not list as attacked and
    ``clean`` evaluated. None when there is none.
    """
    attacked = {int(c) for c in cell.get("attacked", [])}
    before = clean["accuracy"]
    diffs = [float(a) - float(before[c]) for c, a in cell["accuracy"].items()
             if int(c) not in attacked and c in before]
    return _mean(diffs)


def attacked_clients(cell: Path, metrics: Mapping[str, Any]) -> list[int]:
    """The poison stage's attacked clients (``poison/ground_truth.json``) and the cell's ``malicious_clients``."""
    ground_truth = cell / "poison" / "ground_truth.json"
    data = read_json(ground_truth).get("attacked_clients", []) if ground_truth.exists() else []
    return sorted({int(c) for c in data} | {int(c) for c in metrics.get("malicious_clients") or []})


def client_accuracies(params: Params, cell: Path, features: Path, partition: Path) -> dict[str, Any]:
    """The ``clients.json`` record of one finished cell (see the module docstring).

    Parameters
    ----------
    params : Params
        The cell's params (as its run used them).
    cell : Path
        The cell's folder: ``metrics.json``, ``model.safetensors``, ``checkpoints/clients``, ``poison``.
    features, partition : Path
        The dataset's features folder and the seed's ``partition.json``.

    Raises
    ------
    RuntimeError
        If the clients' mean differs from the cell's ``personalised_accuracy_mean``.
    """
    data = load_federated_data.fn(features, partition, cell / "poison")
    spec = make_spec(params, data.num_clients, data.num_classes, data.input_shape, 1)
    algorithm = build_algorithm(spec)
    keys = sent_keys(spec)
    state = load_state(cell / "model.safetensors")
    metrics = read_json(cell / "metrics.json")
    store = ClientStore(cell / "checkpoints" / "clients")
    batch = spec.federation.eval_batch_size
    shared = build_model(spec.model, spec.num_classes, spec.input_shape, torch.Generator().manual_seed(0))
    shared.load_state_dict(state)
    accuracy: dict[int, float] = {}
    for client, part in enumerate(data.holdout):
        if part is None:
            continue
        model = own_model(spec, algorithm, state, keys, store, client, int(metrics["rounds"]))
        model = shared if model is None else model
        accuracy[client] = evaluate(model, part.features, part.labels, batch)["accuracy"]
    attacked = attacked_clients(cell, metrics)
    means = split_clients(accuracy, attacked)
    if abs(float(means["personalised_accuracy_mean"] or 0.0) - float(metrics["personalised_accuracy_mean"])) \
            > TOLERANCE:
        raise RuntimeError(f"personalisation: {cell}: the clients' mean {means['personalised_accuracy_mean']:.6f} "
                           f"differs from the cell's personalised_accuracy_mean "
                           f"{metrics['personalised_accuracy_mean']}.")
    flagged = [c for row in read_json(cell / "detection.json")["rounds"] for c in row["flagged"]] \
        if (cell / "detection.json").exists() else []
    return {**{k: None if v is None else round(v, 6) for k, v in means.items()},
            "global_accuracy": metrics["global_accuracy"],
            "attacked": attacked, "accuracy": {str(c): round(a, 6) for c, a in accuracy.items()},
            "flags": len(flagged), "flags_on_attacked": sum(1 for c in flagged if c in attacked),
            "rounds": int(metrics["rounds"])}
