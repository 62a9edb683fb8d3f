"""robustness benchmark: one cell of the aggregator × attack × malicious-fraction matrix, and the results table.

``python -m flows.robustness cell --aggregator A --scenario S --out DIR`` runs the federate flow with the project's
params, the benchmark's overrides (``benchmarks/robustness/params.yaml``: ``robustness.overrides``), aggregator A
and scenario S (``clean``, or ``<attack>-<fraction>`` such as ``sign_flip-0.2``), writing DIR/metrics.json,
DIR/rounds.tsv, DIR/detection.json and DIR/checkpoints (resumable).

``python -m flows.robustness table --cells DIR --out FOLDER`` reads every DIR/<aggregator>/<scenario>/metrics.json
and writes FOLDER/table.md (final accuracy, drop against the same rule's clean run, detection precision/recall)
and FOLDER/drop.png. ``dvc repro benchmarks/robustness/dvc.yaml`` runs both as a DVC matrix.
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fedcore.config import ConfigError, Params, load_params
from flows import stage
from flows.federate import FederatePaths, federate
from tasks.common import pyplot, read_json, save_figure, write_text

CLEAN = "clean"


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


def _cell(args: argparse.Namespace) -> None:
    raw = yaml.safe_load(Path(args.params).read_text()) or {}
    bench = yaml.safe_load(Path(args.bench_params).read_text()) or {}
    overrides = (bench.get("robustness") or {}).get("overrides") or {}
    params = cell_params(raw, overrides, args.aggregator, args.scenario)
    out = Path(args.out)
    paths = FederatePaths(features=args.features, partition=args.partition, poison=args.poison,
                          checkpoints=out / "checkpoints", model=out / "model.safetensors",
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
    bench = yaml.safe_load(Path(args.bench_params).read_text()) or {}
    settings = bench.get("robustness") or {}
    table = collect(Path(args.cells))
    aggregators, scenarios = settings.get("aggregators", []), settings.get("scenarios", [])
    out = Path(args.out)
    text = markdown_table(table, aggregators, scenarios)
    write_text(out / "table.md", text)
    plot_drops(table, aggregators, scenarios, out / "drop.png")
    print(text)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("command", choices=["cell", "table"])
    p.add_argument("--bench-params", default="benchmarks/robustness/params.yaml")
    p.add_argument("--aggregator")
    p.add_argument("--scenario")
    p.add_argument("--out", type=Path)
    p.add_argument("--cells", type=Path, default=Path("results/robustness"))
    defaults = FederatePaths()
    for name in ("features", "partition", "poison"):
        p.add_argument(f"--{name}", type=Path, default=getattr(defaults, name))


def _main(args: argparse.Namespace) -> None:
    if args.command == "cell":
        _cell(args)
    else:
        _table(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m flows.robustness``)."""
    return stage.entry(__doc__ or "", _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
