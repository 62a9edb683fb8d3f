"""Robustness matrix: every aggregator × Byzantine attack × malicious fraction, and the results table.

Run from ``benchmarks/robustness/`` (a DVC project of its own: ``dvc repro`` there runs the matrix). Settings:
``params.yaml`` there: the project sections the stages read and ``robustness`` (the axes and the ``overrides``
applied on top of the project sections for every cell).

``python -m benchmarks.robustness data`` downloads the dataset and writes the feature store and the partition under
``data/`` (``raw``, ``features``, ``partition``).

``python -m benchmarks.robustness cell --aggregator A --scenario S --out DIR`` runs the federate flow with the
project sections, the overrides, aggregator A and scenario S (``clean``, or ``<attack>-<fraction>`` such as
``sign_flip-0.2``), writing DIR/metrics.json, DIR/rounds.tsv, DIR/detection.json and DIR/checkpoints (resumable).

``python -m benchmarks.robustness table`` reads every ``results/<aggregator>/<scenario>/metrics.json`` and writes
``table.md`` (final accuracy, drop against the same rule's clean run, detection precision/recall) and ``drop.png``.
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.benchlib import DOWNLOADS, parse_sets, read_matrix_params, run_command
from fedcore.config import ConfigError, Params, load_params
from flows import stage
from flows.download import download
from flows.features import features
from flows.federate import FederatePaths, federate
from flows.partition import partition
from tasks.common import pyplot, read_json, save_figure, write_text

SECTION = "robustness"
CLEAN = "clean"
#: The matrix's own data (download, features, partition), relative to its folder.
DATA = Path("data")
CELLS = Path("results")


def parse_scenario(scenario: str) -> tuple[str, float]:
    """``clean`` → (``none``, 0.0); ``<attack>-<fraction>`` → (attack, fraction)."""
    if scenario == CLEAN:
        return "none", 0.0
    name, _, fraction = scenario.rpartition("-")
    try:
        value = float(fraction)
    except ValueError:
        value = math.nan
    if not name or not 0.0 <= value <= 1.0:
        raise ConfigError(f"robustness: scenario must be 'clean' or '<attack>-<fraction in [0, 1]>'. "
                          f"Got {scenario!r}.")
    return name, value


def cell_params(raw: Mapping[str, Any], overrides: Mapping[str, Any], aggregator: str, scenario: str) -> Params:
    """The project params with the benchmark overrides (``section.key: value``), the aggregator and the attack."""
    merged: dict[str, Any] = copy.deepcopy(dict(raw))
    attack, fraction = parse_scenario(scenario)
    settings = {**overrides, "federation.aggregator": aggregator, "attack.name": attack,
                "attack.client_fraction": fraction}
    for dotted, value in settings.items():
        section, _, key = str(dotted).partition(".")
        if not key:
            raise ConfigError(f"robustness: override keys must be 'section.key'. Got {dotted!r}.")
        merged.setdefault(section, {})
        merged[section] = {**(merged[section] or {}), key: value}
    return load_params(merged)


def _load(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The project sections of the matrix's params file and its ``robustness`` settings."""
    raw, bench = read_matrix_params(args.params, SECTION)
    settings = bench.get(SECTION)
    if not isinstance(settings, Mapping):
        raise ConfigError(f"{SECTION}: {args.params} must have a '{SECTION}' mapping. Got {settings!r}.")
    return raw, dict(settings)


def _data(args: argparse.Namespace) -> None:
    raw, _ = _load(args)
    params = load_params(raw)
    download(params.download, args.data / "raw", Path(args.downloads))
    features(params.features, args.data / "raw", args.data / "features")
    partition(params.partition, args.data / "features", args.data / "partition")


def _cell(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    overrides = {**(settings.get("overrides") or {}), **parse_sets(args.set)}
    params = cell_params(raw, overrides, args.aggregator, args.scenario)
    out = Path(args.out or args.cells / args.aggregator / args.scenario)
    paths = FederatePaths(features=args.data / "features", partition=args.data / "partition" / "partition.json",
                          poison=out / "poison", checkpoints=out / "checkpoints", model=out / "model.safetensors",
                          metrics=out / "metrics.json", plots=out, root=Path.cwd())
    federate(params, paths)


# --------------------------------------------------------------------------------------------------- table
def collect(cells: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """{aggregator: {scenario: metrics}} from ``cells/<aggregator>/<scenario>/metrics.json``."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(cells.glob("*/*/metrics.json")):
        table.setdefault(path.parent.parent.name, {})[path.parent.name] = read_json(path)
    return table


def _order(names: Sequence[str], preferred: Sequence[str]) -> list[str]:
    return [n for n in preferred if n in names] + sorted(n for n in names if n not in preferred)


def markdown_table(table: Mapping[str, Mapping[str, Mapping[str, Any]]], aggregators: Sequence[str],
                   scenarios: Sequence[str]) -> str:
    """Rows: aggregators; columns: scenarios; cells: accuracy, drop against clean, detection P/R."""
    rows = _order(list(table), aggregators)
    columns = _order(sorted({s for cells in table.values() for s in cells}), scenarios)
    lines = ["| aggregator | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name in rows:
        clean = table[name].get(CLEAN, {}).get("global_accuracy")
        cells = []
        for scenario in columns:
            m = table[name].get(scenario)
            if m is None:
                cells.append("not run")
                continue
            text = f"{m['global_accuracy']:.3f}"
            if scenario != CLEAN and clean is not None:
                text += f" ({m['global_accuracy'] - clean:+.3f})"
            p, r = m.get("detect_precision"), m.get("detect_recall")
            if scenario != CLEAN:
                text += f"<br>P {_fmt(p)} R {_fmt(r)}"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def plot_drops(table: Mapping[str, Mapping[str, Mapping[str, Any]]], aggregators: Sequence[str],
               scenarios: Sequence[str], path: Path) -> None:
    """Heat map of the accuracy drop against each rule's clean run."""
    plt = pyplot()
    rows = _order(list(table), aggregators)
    columns = [s for s in _order(sorted({s for c in table.values() for s in c}), scenarios) if s != CLEAN]
    values = [[math.nan] * len(columns) for _ in rows]
    for i, name in enumerate(rows):
        clean = table[name].get(CLEAN, {}).get("global_accuracy")
        for j, scenario in enumerate(columns):
            m = table[name].get(scenario)
            if m is not None and clean is not None:
                values[i][j] = clean - m["global_accuracy"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(columns), 0.8 + 0.45 * len(rows)), dpi=110)
    image = ax.imshow(values, cmap="Reds", vmin=0.0, vmax=max(0.3, max((v for r in values for v in r
                                                                     if not math.isnan(v)), default=0.3)))
    ax.set_xticks(range(len(columns)), columns, rotation=40, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            ax.text(j, i, "—" if math.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="accuracy drop vs clean")
    ax.set_title("Robustness: drop in final test accuracy")
    save_figure(fig, path)


def _table(args: argparse.Namespace) -> None:
    _, settings = _load(args)
    table = collect(Path(args.cells))
    aggregators, scenarios = settings.get("aggregators", []), settings.get("scenarios", [])
    out = Path(args.out)
    text = markdown_table(table, aggregators, scenarios)
    write_text(out / "table.md", text)
    plot_drops(table, aggregators, scenarios, out / "drop.png")
    print(text)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("command", choices=["data", "cell", "table"])
    p.add_argument("--aggregator")
    p.add_argument("--scenario")
    p.add_argument("--out", type=Path, help="cell: DIR (default CELLS/A/S); table: FOLDER (default .)")
    p.add_argument("--cells", type=Path, default=CELLS, help=f"results root (default {CELLS})")
    p.add_argument("--data", type=Path, default=DATA, help=f"the matrix's data folder (default {DATA})")
    p.add_argument("--downloads", type=Path, default=DOWNLOADS,
                   help="data: archive cache (default: the project's data/downloads)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="cell: override applied after the matrix's overrides (value read as YAML); repeatable")


def _main(args: argparse.Namespace) -> None:
    if args.command == "table" and args.out is None:
        args.out = Path(".")
    run_command(SECTION, args, {"cell": ["aggregator", "scenario"]}, {"data": _data, "cell": _cell, "table": _table})


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m benchmarks.robustness``)."""
    return stage.entry(__doc__ or "", _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
