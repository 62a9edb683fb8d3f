"""FASSL matrix: federated SSL methods × aggregators × transmission, scored per round on downstream tasks.

Run from ``benchmarks/fassl/`` (a DVC project of its own: ``dvc repro`` there runs the matrix). Settings:
``params.yaml`` there: the project sections the stages read and ``fassl``: the datasets, the matrix axes and
``section.key: value`` overrides applied on top of the project sections in this order: ``common``, the method's,
the aggregator's, then the transmission (``all``, or ``backbone``: FASSL's "-bb").

``python -m benchmarks.fassl data --dataset D`` downloads D and writes its feature store to
``results/downstream/D`` (the downstream tasks read it there).

``python -m benchmarks.fassl pool`` writes the pretraining pool: every dataset's rows in one feature store,
``results/pool`` (labels prefixed by dataset; only the clients' training rows are used, labels ignored).

``python -m benchmarks.fassl cell --method M --aggregator A --send S`` partitions the pool over the clients, runs
the self-supervised federate flow (every round scored on every downstream task) and the select flow (each task's
best round registered as ``fassl-M-A-S@<task>``, reloaded from the registry and scored again), writing
``results/cells/M/A/S/``: metrics.json, rounds.tsv, rounds.png, selection.json, selection.md.
``--aggregator fedu --send all`` is FedU (the methods of ``fedu_methods``: BYOL). ``--aggregator central`` is the
centralised baseline: one client holding the whole pool, the same rounds, epochs
and batch size. ``--set section.key=value`` (repeatable, value read as YAML) overrides last, for quick runs.

``python -m benchmarks.fassl table`` reads every cell and writes ``table.md`` and ``table.json`` (per task: kNN
top-1 test accuracy at the selected round and at the last round, the random-init floor) and ``best_rounds.png``;
``dvc metrics show`` prints a row per cell.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.benchlib import (
    DOWNLOADS,
    apply_overrides,
    bench_settings,
    named_overrides,
    parse_sets,
    read_matrix_params,
    run_command,
)
from fedcore.config import Params, load_params
from fedcore.data.features import FeatureStore
from fedcore.data.pool import pool_feature_stores
from fedcore.errors import ConfigError
from flows import stage
from flows.download import download
from flows.features import features
from flows.federate import FederatePaths, federate
from flows.partition import partition
from flows.select import select
from tasks.common import pyplot, read_json, save_figure, write_json, write_text

SECTION = "fassl"
RESULTS = Path("results")
#: The aggregator axis value of the centralised baseline (one client, ``central`` overrides).
CENTRAL = "central"


# --------------------------------------------------------------------------------------------------- settings
def settings_of(bench: Mapping[str, Any]) -> dict[str, Any]:
    """The ``fassl`` section of the benchmark params, checked: every listed name has its overrides."""
    return bench_settings(bench, SECTION, [("dataset_names", "datasets"), ("method_names", "methods"),
                                           ("aggregator_names", "aggregators"), ("sends", "transmissions"),
                                           ("fedu_methods", "methods")])


def _named(settings: Mapping[str, Any], mapping: str, name: str) -> Mapping[str, Any]:
    return named_overrides(settings, SECTION, mapping, name)


def cell_params(raw: Mapping[str, Any], settings: Mapping[str, Any], method: str, aggregator: str, send: str,
                extra: Mapping[str, Any] | None = None) -> Params:
    """Project params with the common, method, aggregator (or central) and transmission overrides, then ``extra``."""
    if aggregator == CENTRAL:
        aggregation = settings.get(CENTRAL) or {}
    else:
        aggregation = _named(settings, "aggregators", aggregator)
    registered = {"downstream.registered_model": f"fassl-{method}-{aggregator}-{send}"}
    layers = [settings.get("common") or {}, _named(settings, "methods", method), aggregation,
              _named(settings, "transmissions", send), registered, extra or {}]
    return load_params(apply_overrides(raw, *layers))


def _load(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    raw, bench = read_matrix_params(args.params, SECTION)
    return raw, settings_of(bench)


# --------------------------------------------------------------------------------------------------- stages
def _data(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    layers = [settings.get("common") or {}, _named(settings, "datasets", args.dataset), parse_sets(args.set)]
    params = load_params(apply_overrides(raw, *layers))
    download(params.download, args.results / "raw" / args.dataset, Path(args.downloads))
    features(params.features, args.results / "raw" / args.dataset, args.results / "downstream" / args.dataset)


def _pool(args: argparse.Namespace) -> None:
    _, settings = _load(args)
    names = settings.get("pool") or settings.get("dataset_names") or []
    stores = {name: FeatureStore.load(args.results / "downstream" / name, mmap=True) for name in names}
    folder = pool_feature_stores(stores, args.results / "pool")
    sizes = ", ".join(f"{n} {s.num_samples}" for n, s in stores.items())
    print(f"fassl: pool of {sum(s.num_samples for s in stores.values())} rows ({sizes}) in {folder}")


def cell_folder(results: Path, method: str, aggregator: str, send: str) -> Path:
    """``results/cells/<method>/<aggregator>/<send>``."""
    return Path(results) / "cells" / method / aggregator / send


def _cell(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    params = cell_params(raw, settings, args.method, args.aggregator, args.send, parse_sets(args.set))
    out = cell_folder(args.results, args.method, args.aggregator, args.send)
    partition(params.partition, args.results / "pool", out / "partition")
    paths = FederatePaths(features=args.results / "pool", partition=out / "partition" / "partition.json",
                          poison=out / "poison", checkpoints=out / "checkpoints", model=out / "model.safetensors",
                          metrics=out / "metrics.json", plots=out, root=Path.cwd(),
                          downstream=args.results / "downstream")
    metrics = federate(params, paths)
    select(params, metrics["mlflow_run_id"], out, Path.cwd(), verify=True, downstream=args.results / "downstream")


# --------------------------------------------------------------------------------------------------- table
def collect(results: Path) -> dict[tuple[str, str, str], dict[str, Any]]:
    """``{(method, aggregator, send): {"metrics": ..., "selection": ...}}`` of every finished cell."""
    cells = {}
    for path in sorted((Path(results) / "cells").glob("*/*/*/selection.json")):
        send, aggregator, method = path.parent.name, path.parent.parent.name, path.parent.parent.parent.name
        cells[(method, aggregator, send)] = {"metrics": read_json(path.parent / "metrics.json"),
                                             "selection": read_json(path)}
    return cells


def _fmt(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def table_rows(cells: Mapping[tuple[str, str, str], Mapping[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Task names and one row per cell: per task best-round test, last-round test, best round; the floor."""
    tasks = sorted({t for cell in cells.values() for t in cell["selection"]["tasks"]})
    rows = []
    for (method, aggregator, send), cell in sorted(cells.items()):
        row: dict[str, Any] = {"method": method, "aggregator": aggregator, "send": send}
        for task in tasks:
            sel = cell["selection"]["tasks"].get(task, {})
            row[task] = {"best_round": sel.get("best_round"), "best_test": sel.get("best_test"),
                         "last_round": sel.get("last_round"), "last_test": sel.get("last_test"),
                         "floor_test": sel.get("floor_test")}
        rows.append(row)
    return tasks, rows


def markdown_table(tasks: Sequence[str], rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    """Rows: cells; per task ``best-round test / last-round test (best round)``; a floor row first."""
    head = "| method | aggregator | send | " + " | ".join(tasks) + " | mean (best / last) |"
    lines = [head, "|---|---|---|" + "---|" * (len(tasks) + 1)]
    floors = [rows[0][t]["floor_test"] if rows else None for t in tasks]
    lines.append("| random init (floor) | — | — | " + " | ".join(_fmt(f) for f in floors) + " | "
                 f"{_fmt(_mean(floors))} |")
    for row in rows:
        texts = [f"{_fmt(row[t]['best_test'])} / {_fmt(row[t]['last_test'])} (r{row[t]['best_round']})"
                 for t in tasks]
        best = _mean([row[t]["best_test"] for t in tasks])
        last = _mean([row[t]["last_test"] for t in tasks])
        lines.append(f"| {row['method']} | {row['aggregator']} | {row['send']} | " + " | ".join(texts)
                     + f" | {_fmt(best)} / {_fmt(last)} |")
    legend = (f"Each task: {metric} test accuracy of the encoder at the round selected on the validation split "
              f"(FASSL) / at the last round (rN: the selected round). `send: backbone` is \"-bb\" (heads stay on "
              f"the clients); `aggregator: central` is one client holding the whole pool (same rounds and epochs).")
    return legend + "\n\n" + "\n".join(lines) + "\n"


def _mean(values: Sequence[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return sum(found) / len(found) if found else None


def plot_best_rounds(tasks: Sequence[str], rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Per task, the test accuracy at the selected round of every cell against the random-init floor."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.0, 0.32 * len(rows) + 2.0) * len(tasks) / 1.6, 4.2),
                             dpi=110, squeeze=False)
    labels = [f"{r['method']}/{r['aggregator']}/{r['send']}" for r in rows]
    for ax, task in zip(axes[0], tasks, strict=True):
        values = [math.nan if r[task]["best_test"] is None else r[task]["best_test"] for r in rows]
        last = [math.nan if r[task]["last_test"] is None else r[task]["last_test"] for r in rows]
        xs = range(len(rows))
        ax.bar(xs, values, 0.8, label="selected round", color="tab:blue")
        ax.plot(xs, last, "k_", markersize=10, label="last round")
        floor = rows[0][task]["floor_test"] if rows else None
        if floor is not None:
            ax.axhline(floor, color="tab:red", linestyle="--", label="random init")
        ax.set_xticks(list(xs), labels, rotation=90, fontsize=7)
        ax.set_title(task)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("kNN top-1 test accuracy")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def _table(args: argparse.Namespace) -> None:
    cells = collect(args.results)
    if not cells:
        raise ConfigError(f"{SECTION}: no finished cell under {str(args.results / 'cells')!r}. Run the cells first.")
    tasks, rows = table_rows(cells)
    metric = next(iter(cells.values()))["selection"]["metric"]
    text = markdown_table(tasks, rows, metric)
    out = Path(args.out)
    write_text(out / "table.md", text)
    write_json(out / "table.json", {"metric": metric, "tasks": tasks, "rows": rows})
    plot_best_rounds(tasks, rows, out / "best_rounds.png")
    print(text)


# --------------------------------------------------------------------------------------------------- entry point
def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("command", choices=["data", "pool", "cell", "table"])
    p.add_argument("--dataset")
    p.add_argument("--method")
    p.add_argument("--aggregator", help=f"an aggregator name of the benchmark params, or {CENTRAL}")
    p.add_argument("--send", default="all")
    p.add_argument("--results", type=Path, default=RESULTS, help=f"results root (default {RESULTS})")
    p.add_argument("--out", type=Path, default=Path("."), help="table: folder of the table (default .)")
    p.add_argument("--downloads", type=Path, default=DOWNLOADS,
                   help="data: archive cache (default: the project's data/downloads)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="data/cell: override applied last (value read as YAML); repeatable")


def _main(args: argparse.Namespace) -> None:
    run_command(SECTION, args, {"data": ["dataset"], "cell": ["method", "aggregator"]},
                {"data": _data, "pool": _pool, "cell": _cell, "table": _table})


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m benchmarks.fassl``)."""
    return stage.entry(__doc__ or "", _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
