"""personalisation benchmark, per client: benign and poisoned clients' accuracy, apart.

``python -m benchmarks.personalisation.clients`` (run from ``benchmarks/personalisation/``; ``--cells results
--out .`` by default)

The matrix's metrics average the personalised accuracy over every client, so under data poisoning they mix two
effects: poisoned clients' own models learning their corrupted data (self-harm, which no server rule can undo for
a personal model) and the harm that reaches the *benign* clients through the shared model (what robust
aggregation is for). For every finished cell this reads back each client's final model (the global model, or the
personal model from the cell's client store), evaluates it on the client's clean held-out split, and splits the
clients by the poison stage's ground truth. It checks that the mean over all clients equals the cell's
``personalised_accuracy_mean``, then writes FOLDER/clients.json (per cell, per client) and FOLDER/clients.md: per
dataset, rows = methods, columns = poisoned scenarios, each cell "benign clients' mean (change against the same
clients in the method's clean run) / poisoned clients' mean", and, for rules that flag clients (``lpa``), the
precision and recall of the flags against the data-poisoned clients.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.benchlib import read_matrix_params
from benchmarks.personalisation.driver import CELLS, CLEAN, SECTION, cell_params, settings_of
from fedcore.evaluation import evaluate
from fedcore.federation.checkpoint import load_state
from fedcore.federation.client_store import ClientStore
from fedcore.models import build_model
from fedcore.plans.supervised import build_algorithm, make_spec, own_model, sent_keys
from flows import stage
from tasks.common import read_json, write_json, write_text
from tasks.federate import load_federated_data

#: Tolerance of the check against the cell's own personalised mean (float64 mean of float accuracies).
TOLERANCE = 1e-6


def client_accuracies(raw: Mapping[str, Any], settings: Mapping[str, Any], cells: Path, dataset: str, method: str,
                      scenario: str) -> dict[str, Any]:
    """Per-client held-out accuracy of the final models of one finished cell, with the poisoned clients listed."""
    cell = cells / dataset / method / scenario
    data_dir = cells / dataset / "data"
    params = cell_params(raw, settings, dataset, method, scenario)
    data = load_federated_data.fn(data_dir / "features", data_dir / "partition" / "partition.json", cell / "poison")
    spec = make_spec(params, data.num_clients, data.num_classes, data.input_shape, 1)
    algorithm = build_algorithm(spec)
    keys = sent_keys(spec)
    state = load_state(cell / "model.safetensors")
    metrics = read_json(cell / "metrics.json")
    store = ClientStore(cell / "checkpoints" / "clients")
    batch = spec.federation.eval_batch_size
    shared = build_model(spec.model, spec.num_classes, spec.input_shape, torch.Generator().manual_seed(0))
    shared.load_state_dict(state)
    accuracies: dict[int, float] = {}
    for client, part in enumerate(data.holdout):
        if part is None:
            continue
        model = own_model(spec, algorithm, state, keys, store, client, int(metrics["rounds"]))
        model = shared if model is None else model
        accuracies[client] = evaluate(model, part.features, part.labels, batch)["accuracy"]
    mean = sum(accuracies.values()) / len(accuracies)
    if abs(mean - float(metrics["personalised_accuracy_mean"])) > TOLERANCE:
        raise RuntimeError(f"personalisation_clients: {cell}: the clients' mean {mean:.6f} differs from the cell's "
                           f"personalised_accuracy_mean {metrics['personalised_accuracy_mean']}.")
    ground_truth = cell / "poison" / "ground_truth.json"
    attacked = sorted(read_json(ground_truth).get("attacked_clients", [])) if ground_truth.exists() else []
    flagged = [c for row in read_json(cell / "detection.json")["rounds"] for c in row["flagged"]] \
        if (cell / "detection.json").exists() else []
    return {"accuracy": {str(c): round(a, 6) for c, a in accuracies.items()}, "attacked": attacked,
            "flags": len(flagged), "flags_on_attacked": sum(1 for c in flagged if c in attacked),
            "rounds": int(metrics["rounds"])}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarise(cells: Mapping[str, Mapping[str, Mapping[str, dict[str, Any]]]]) -> dict[str, Any]:
    """Benign and poisoned clients' means per cell; the benign change is against the same clients' clean run."""
    summary: dict[str, Any] = {}
    for dataset, methods in cells.items():
        for method, scenarios in methods.items():
            clean = scenarios.get(CLEAN)
            for scenario, cell in scenarios.items():
                attacked = set(cell["attacked"])
                accuracy = {int(c): a for c, a in cell["accuracy"].items()}
                benign = [a for c, a in accuracy.items() if c not in attacked]
                row: dict[str, Any] = {"benign_mean": _mean(benign),
                                       "poisoned_mean": _mean([a for c, a in accuracy.items() if c in attacked])}
                if clean is not None:
                    before = [float(clean["accuracy"][str(c)]) for c in accuracy if c not in attacked
                              and str(c) in clean["accuracy"]]
                    row["benign_clean_mean"] = _mean(before)
                if attacked:
                    # pooled over rounds: a flag is one (round, client) pair; every attacked client, every round
                    possible = len(attacked) * cell["rounds"]
                    row["flag_precision"] = cell["flags_on_attacked"] / cell["flags"] if cell["flags"] else None
                    row["flag_recall"] = cell["flags_on_attacked"] / possible if possible else None
                summary.setdefault(dataset, {}).setdefault(method, {})[scenario] = row
    return summary


def markdown(summary: Mapping[str, Any], methods: Sequence[str], scenarios: Sequence[str]) -> str:
    """Per dataset: benign clients' mean (change vs the same clients clean) / poisoned clients' mean; LPA flags."""
    lines = ["Each cell: personalised accuracy of the **benign** clients (change against the same clients in the "
             "method's clean run) / of the **poisoned** clients, on their clean held-out splits; flags: precision "
             "and recall, pooled over rounds, of the clients the server rule flagged against the data-poisoned "
             "ones (— where the rule flags nobody).", ""]
    poisoned = [s for s in scenarios if s != CLEAN]
    for dataset in sorted(summary):
        lines += [f"**{dataset}**", "", "| method | " + " | ".join(poisoned) + " |",
                  "|---|" + "---|" * len(poisoned)]
        for method in [m for m in methods if m in summary[dataset]]:
            cells = []
            for scenario in poisoned:
                row = summary[dataset][method].get(scenario)
                if row is None:
                    cells.append("not run")
                    continue
                change = ("" if row.get("benign_clean_mean") is None
                          else f" ({row['benign_mean'] - row['benign_clean_mean']:+.3f})")
                text = f"{row['benign_mean']:.3f}{change} / {row['poisoned_mean']:.3f}"
                if row.get("flag_precision") is not None:
                    text += f"<br>flags P {row['flag_precision']:.2f} R {row['flag_recall']:.2f}"
                cells.append(text)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _main(args: argparse.Namespace) -> None:
    raw, bench = read_matrix_params(args.params, SECTION)
    settings = settings_of(bench)
    cells: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for metrics in sorted(Path(args.cells).glob("*/*/*/metrics.json")):
        scenario, method, dataset = metrics.parent.name, metrics.parent.parent.name, metrics.parent.parent.parent.name
        if not (metrics.parent / "model.safetensors").exists():
            continue
        cells.setdefault(dataset, {}).setdefault(method, {})[scenario] = client_accuracies(
            raw, settings, Path(args.cells), dataset, method, scenario)
    summary = summarise(cells)
    out = Path(args.out)
    write_json(out / "clients.json", {"summary": summary, "cells": cells})
    text = markdown(summary, settings.get("method_names") or [], settings.get("scenarios") or [])
    write_text(out / "clients.md", text)
    print(text)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cells", type=Path, default=CELLS)
    p.add_argument("--out", type=Path, default=Path("."))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m benchmarks.personalisation.clients``)."""
    return stage.entry(__doc__ or "", _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
