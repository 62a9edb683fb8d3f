"""Personalisation matrix: methods × data poisoning × datasets, as a DVC matrix, and the results table.

Run from ``benchmarks/personalisation/`` (a DVC project of its own: ``dvc repro`` there runs the matrix). Settings:
``params.yaml`` there: the project sections the stages read and ``personalisation``: the datasets, methods and
scenarios of the matrix, and ``section.key: value`` overrides applied on top of the project sections in this
order: ``common``, the dataset's (``datasets``), the method's (``methods``), then the scenario's poisoning
(``clean``, or ``<poison attack>-<fraction of clients>`` such as ``label_flip-0.2``).

``python -m benchmarks.personalisation data --dataset D`` runs the download, features and partition flows for
dataset D, writing ``results/D/data/``: raw, features and partition (partition.json, client_stats.csv,
heatmap.png); archives are cached in ``--downloads`` (the project's ``data/downloads``).

``python -m benchmarks.personalisation cell --dataset D --method M --scenario S`` runs the poison flow on D's data
into ``results/D/M/S/poison``, then the federate flow, writing metrics.json, rounds.tsv, rounds.png,
detection.json, model.safetensors and checkpoints (resumable) in ``results/D/M/S/``. ``--set section.key=value``
(repeatable, the value read as YAML) overrides last, for quick runs.

``python -m benchmarks.personalisation table`` reads every ``results/<dataset>/<method>/<scenario>/metrics.json``
and writes ``table.md`` (per dataset: personalised mean, worst-10% and global accuracy, and the personalised drop
against the method's clean run) and ``comparison.png``; ``dvc metrics show`` prints one row per cell.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.benchlib import DOWNLOADS, apply_overrides, parse_sets, read_matrix_params, run_command
from fedcore.config import ConfigError, Params, load_params
from flows import stage
from flows.download import download
from flows.features import features
from flows.federate import FederatePaths, federate
from flows.partition import partition
from flows.poison import poison
from tasks.common import pyplot, read_json, save_figure, write_text

CLEAN = "clean"
SECTION = "personalisation"
PARAMS = "params.yaml"
CELLS = Path("results")
#: The method whose global (test) accuracy the comparison plot marks.
REFERENCE = "fedavg"


# --------------------------------------------------------------------------------------------------- settings
def parse_scenario(scenario: str) -> tuple[str, float]:
    """``clean`` → (``none``, 0.0); ``<poison attack>-<fraction>`` → (attack, fraction of clients)."""
    if scenario == CLEAN:
        return "none", 0.0
    name, _, fraction = str(scenario).rpartition("-")
    try:
        value = float(fraction)
    except ValueError:
        value = math.nan
    if not name or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{SECTION}: scenario must be 'clean' or '<poison attack>-<fraction in [0, 1]>'. "
                          f"Got {scenario!r}.")
    return name, value


def settings_of(bench: Mapping[str, Any]) -> dict[str, Any]:
    """The ``personalisation`` section of the benchmark params, checked: every listed name has its overrides."""
    settings = bench.get(SECTION) if isinstance(bench, Mapping) else None
    if not isinstance(settings, Mapping):
        raise ConfigError(f"{SECTION}: the benchmark params must have a '{SECTION}' mapping. Got {bench!r}.")
    problems = []
    for names, mapping in (("dataset_names", "datasets"), ("method_names", "methods")):
        listed, known = settings.get(names) or [], settings.get(mapping) or {}
        if not isinstance(known, Mapping):
            problems.append(f"{SECTION}: '{mapping}' must map names to overrides. Got {known!r}.")
            continue
        if missing := [n for n in listed if n not in known]:
            problems.append(f"{SECTION}: every name of '{names}' must be a key of '{mapping}'. "
                            f"Got {missing} missing; known: {sorted(known)}.")
    for scenario in settings.get("scenarios") or []:
        try:
            parse_scenario(scenario)
        except ConfigError as error:
            problems.append(str(error))
    if problems:
        raise ConfigError(problems)
    return dict(settings)


def _named(settings: Mapping[str, Any], mapping: str, name: str, what: str) -> Mapping[str, Any]:
    known = settings.get(mapping) or {}
    if name not in known:
        raise ConfigError(f"{SECTION}: {what} must be one of {sorted(known)} ('{mapping}' in {PARAMS}). "
                          f"Got {name!r}.")
    return known[name] or {}


def data_params(raw: Mapping[str, Any], settings: Mapping[str, Any], dataset: str,
                extra: Mapping[str, Any] | None = None) -> Params:
    """The project params with the benchmark's common and dataset overrides (the data stage)."""
    layers = [settings.get("common") or {}, _named(settings, "datasets", dataset, "dataset"), extra or {}]
    return load_params(apply_overrides(raw, *layers))


def cell_params(raw: Mapping[str, Any], settings: Mapping[str, Any], dataset: str, method: str, scenario: str,
                extra: Mapping[str, Any] | None = None) -> Params:
    """The project params with the common, dataset, method and scenario overrides, then ``extra``."""
    attack, fraction = parse_scenario(scenario)
    layers = [settings.get("common") or {}, _named(settings, "datasets", dataset, "dataset"),
              _named(settings, "methods", method, "method"),
              {"poison.attack": attack, "poison.client_fraction": fraction}, extra or {}]
    return load_params(apply_overrides(raw, *layers))


def _load(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    raw, bench = read_matrix_params(args.params, SECTION)
    return raw, settings_of(bench)


# --------------------------------------------------------------------------------------------------- stages
def _data(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    params = data_params(raw, settings, args.dataset, parse_sets(args.set))
    out = Path(args.out or args.cells / args.dataset / "data")
    download(params.download, out / "raw", Path(args.downloads))
    features(params.features, out / "raw", out / "features")
    partition(params.partition, out / "features", out / "partition")


def _cell(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    params = cell_params(raw, settings, args.dataset, args.method, args.scenario, parse_sets(args.set))
    data = Path(args.data or args.cells / args.dataset / "data")
    out = Path(args.out or args.cells / args.dataset / args.method / args.scenario)
    poison(params.poison, params.features, data / "raw", data / "features", data / "partition" / "partition.json",
           out / "poison")
    paths = FederatePaths(features=data / "features", partition=data / "partition" / "partition.json",
                          poison=out / "poison", checkpoints=out / "checkpoints", model=out / "model.safetensors",
                          metrics=out / "metrics.json", plots=out, root=Path.cwd())
    federate(params, paths)


# --------------------------------------------------------------------------------------------------- table
Table = dict[str, dict[str, dict[str, dict[str, Any]]]]


def collect(cells: Path) -> Table:
    """{dataset: {method: {scenario: metrics}}} from ``cells/<dataset>/<method>/<scenario>/metrics.json``."""
    table: Table = {}
    for path in sorted(Path(cells).glob("*/*/*/metrics.json")):
        scenario, method, dataset = path.parent.name, path.parent.parent.name, path.parent.parent.parent.name
        table.setdefault(dataset, {}).setdefault(method, {})[scenario] = read_json(path)
    return table


def _order(names: Iterable[str], preferred: Sequence[str]) -> list[str]:
    names = set(names)
    return list(preferred) + sorted(n for n in names if n not in preferred)


def _acc(metrics: Mapping[str, Any] | None, key: str) -> float | None:
    value = None if metrics is None else metrics.get(key)
    return None if value is None else float(value)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


LEGEND = ("Each cell: personalised accuracy (mean over the clients' held-out splits) / its mean over the worst 10% "
          "of clients / global test accuracy (`local`: the clients' own models on the test split, averaged); "
          "in parentheses, the change of the personalised mean against the same method's clean run.")


def markdown_table(cells: Mapping[str, Mapping[str, Mapping[str, Any]]], methods: Sequence[str],
                   scenarios: Sequence[str]) -> str:
    """One dataset: rows methods, columns scenarios; cells ``personalised mean / worst-10% / global``."""
    rows = _order(cells, methods)
    columns = _order({s for by_scenario in cells.values() for s in by_scenario}, scenarios)
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for method in rows:
        runs = cells.get(method, {})
        clean = _acc(runs.get(CLEAN), "personalised_accuracy_mean")
        texts = []
        for scenario in columns:
            m = runs.get(scenario)
            if m is None:
                texts.append("not run")
                continue
            mean = _acc(m, "personalised_accuracy_mean")
            text = " / ".join(_fmt(_acc(m, k)) for k in ("personalised_accuracy_mean",
                                                         "personalised_accuracy_worst10", "global_accuracy"))
            if scenario != CLEAN and clean is not None and mean is not None:
                text += f" ({mean - clean:+.3f})"
            texts.append(text)
        lines.append(f"| {method} | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(table: Table, datasets: Sequence[str], methods: Sequence[str], scenarios: Sequence[str]) -> str:
    """Every dataset's table under its own heading, each with the legend."""
    parts = []
    for dataset in _order(table, datasets):
        parts.append(f"### {dataset}\n\n{LEGEND}\n\n{markdown_table(table.get(dataset, {}), methods, scenarios)}")
    return "\n".join(parts)


def plot_comparison(table: Table, datasets: Sequence[str], methods: Sequence[str], scenarios: Sequence[str],
                    path: Path) -> None:
    """Per dataset, grouped bars of the personalised mean accuracy (x: scenario, a bar per method)."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    names = _order(table, datasets)
    rows = _order({m for d in table.values() for m in d}, methods)
    columns = _order({s for d in table.values() for runs in d.values() for s in runs}, scenarios)
    fig, axes = plt.subplots(len(names), 1, figsize=(max(7.0, 1.6 * len(columns) + 3.5), 3.4 * len(names)),
                             dpi=110, squeeze=False)
    width = 0.8 / max(1, len(rows))
    colours = plt.get_cmap("tab10")
    for ax, dataset in zip(axes[:, 0], names, strict=True):
        cells = table.get(dataset, {})
        for i, method in enumerate(rows):
            values = [_acc(cells.get(method, {}).get(s), "personalised_accuracy_mean") for s in columns]
            xs = [j - 0.4 + width * (i + 0.5) for j in range(len(columns))]
            heights = [math.nan if v is None else v for v in values]
            ax.bar(xs, heights, width * 0.92, label=method, color=colours(i % 10))
            for x, v in zip(xs, values, strict=True):
                if v is None:
                    ax.text(x, 0.02, "not run", ha="center", va="bottom", rotation=90, fontsize=7, color="grey")
        reference = cells.get(REFERENCE, {})
        for j, scenario in enumerate(columns):
            g = _acc(reference.get(scenario), "global_accuracy")
            if g is not None:
                ax.hlines(g, j - 0.45, j + 0.45, colors="black", linestyles="dashed", linewidth=1.4)
        ax.set_xticks(range(len(columns)), columns)
        ax.set_xlim(-0.5, len(columns) - 0.5)
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("personalised mean accuracy")
        ax.set_title(dataset)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        if ax is axes[0, 0]:
            handles, labels = ax.get_legend_handles_labels()
            handles.append(Line2D([], [], color="black", linestyle="dashed", linewidth=1.4))
            labels.append(f"{REFERENCE} global\n(test accuracy)")
            ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle("Personalised mean accuracy by method and poisoning scenario")
    save_figure(fig, path)


def _table(args: argparse.Namespace) -> None:
    _, settings = _load(args)
    table = collect(Path(args.cells))
    datasets, methods = settings.get("dataset_names") or [], settings.get("method_names") or []
    scenarios = settings.get("scenarios") or []
    out = Path(args.out)
    text = markdown_report(table, datasets, methods, scenarios)
    write_text(out / "table.md", text)
    plot_comparison(table, datasets, methods, scenarios, out / "comparison.png")
    print(text)


# --------------------------------------------------------------------------------------------------- entry point
def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("command", choices=["data", "cell", "table"])
    p.add_argument("--dataset")
    p.add_argument("--method")
    p.add_argument("--scenario")
    p.add_argument("--out", type=Path, help="data: DIR (default CELLS/D/data); cell: DIR (default CELLS/D/M/S); "
                                            "table: FOLDER (default .)")
    p.add_argument("--cells", type=Path, default=CELLS, help=f"results root (default {CELLS})")
    p.add_argument("--data", type=Path, help="cell: the dataset's data folder (default CELLS/D/data)")
    p.add_argument("--downloads", type=Path, default=DOWNLOADS,
                   help="data: archive cache (default: the project's data/downloads)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="data/cell: override applied last (value read as YAML); repeatable")


def _main(args: argparse.Namespace) -> None:
    if args.command == "table" and args.out is None:
        args.out = Path(".")
    run_command(SECTION, args, {"data": ["dataset"], "cell": ["dataset", "method", "scenario"]},
                {"data": _data, "cell": _cell, "table": _table})


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m benchmarks.personalisation``)."""
    return stage.entry(__doc__ or "", _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
