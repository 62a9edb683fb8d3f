"""FASSL matrix: federated SSL methods × aggregators × transmission × seeds, scored on downstream tasks.

Run from ``benchmarks/fassl/`` (a DVC project of its own: ``dvc repro`` there runs the matrix). Settings:
``params.yaml`` there: the project sections the stages read and ``fassl``: the datasets, the matrix axes, the
seeds, the claims, and ``section.key: value`` overrides applied on top of the project sections in this order:
``common``, the method's, the aggregator's, the transmission (``all``, or ``backbone``: FASSL's "-bb"), then the
seed (every key of ``seed_keys`` set to the seed).

The matrix (:func:`matrix_cells`, the same runs as the stages of ``dvc.yaml``): the claim cells over every seed of
``seeds`` (``method_names`` × fedavg × ``sends``; ``method_names`` × central; ``fedu_methods`` × ``fedu_arms``),
and the cells that carry no claim over ``single_seed`` (``method_names`` × ``aggregator_names`` × all).

``python -m benchmarks.fassl data --dataset D`` downloads D and writes its feature store to
``results/downstream/D`` (the downstream tasks read it there).

``python -m benchmarks.fassl pool`` writes the pretraining pool: every dataset's rows in one feature store,
``results/pool`` (labels prefixed by dataset; only the clients' training rows are used, labels ignored).

``python -m benchmarks.fassl cell --method M --aggregator A --send S --seed N`` partitions the pool over the
clients, runs the self-supervised federate flow (every scored round evaluated on every downstream task) and the
select flow (each task's best round registered as ``fassl-M-A-S-seedN@<task>``, reloaded from the registry and
scored again), writing ``results/cells/M/A/S/seedN/``: metrics.json, rounds.tsv, rounds.png, selection.json,
selection.md. ``--aggregator fedu --send all`` is FedU (the methods of ``fedu_methods``: BYOL). ``--aggregator
central`` is the centralised baseline: one client holding the whole pool, the same passes over it.
``--set section.key=value`` (repeatable, value read as YAML) overrides last, for quick runs.

``python -m benchmarks.fassl table`` reads the runs of the current matrix (never a listing of ``results/cells``:
folders of former matrices are left out) and writes ``table.md`` and ``table.json`` (per cell and task: mean ± sd
over seeds of the kNN top-1 test accuracy at the selected round and at the last round, the selected round; the
random-init floor; the claims: the per-seed paired differences' mean, 95% t-interval and verdict) and
``best_rounds.png``; ``dvc metrics show`` prints a row per run.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks.benchlib import (
    DOWNLOADS,
    apply_overrides,
    bench_settings,
    format_pm,
    mean_sd,
    named_overrides,
    paired_t_interval,
    parse_sets,
    read_matrix_params,
    run_command,
    verdict,
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
#: The aggregator of the claim cells (methods × sends) and of FedU's baseline arm.
FEDAVG = "fedavg"
#: What a claim may compare: the test accuracy at the selected round, at the last round, or the selected round.
CLAIM_METRICS = ("best_test", "last_test", "best_round")
#: A claim's ``task`` that averages over the tasks.
MEAN_TASK = "mean"


class Cell(NamedTuple):
    """One run of the matrix: a cell (method, aggregator, send) and a seed."""

    method: str
    aggregator: str
    send: str
    seed: int

    @property
    def name(self) -> str:
        """``method/aggregator/send`` (the seed left out): how claims name a cell."""
        return f"{self.method}/{self.aggregator}/{self.send}"


def settings_of(bench: Mapping[str, Any]) -> dict[str, Any]:
    """The ``fassl`` section of the benchmark params, checked.

    Every listed name has its overrides, the seeds are lists of distinct ints >= 0, and every claim names cells
    of the matrix, a metric of :data:`CLAIM_METRICS` and two arms (one ConfigError listing every problem).
    """
    settings = bench_settings(bench, SECTION, [("dataset_names", "datasets"), ("method_names", "methods"),
                                               ("aggregator_names", "aggregators"), ("sends", "transmissions"),
                                               ("fedu_methods", "methods"), ("fedu_arms", "aggregators")])
    problems = []
    for key in ("seeds", "single_seed"):
        seeds = settings.get(key)
        if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
            problems.append(f"{SECTION}: '{key}' must be a list of distinct ints >= 0. Got {seeds!r}.")
    if not isinstance(settings.get("seed_keys"), list) or not settings["seed_keys"]:
        problems.append(f"{SECTION}: 'seed_keys' must list the 'section.key' params a seed sets. "
                        f"Got {settings.get('seed_keys')!r}.")
    if FEDAVG not in (settings.get("aggregators") or {}):
        problems.append(f"{SECTION}: 'aggregators' must define '{FEDAVG}' (the claim cells' aggregator).")
    if problems:
        raise ConfigError(problems)
    claims_of(settings)
    return settings


def matrix_cells(settings: Mapping[str, Any]) -> list[Cell]:
    """Every run of the matrix, in the order of dvc.yaml's stages (``cell``, ``central``, ``fedu``,
    ``aggregator``); the claim cells over ``seeds``, the others over ``single_seed``."""
    seeds, single = settings["seeds"], settings["single_seed"]
    methods = settings["method_names"]
    cells = [Cell(m, FEDAVG, s, n) for m in methods for s in settings["sends"] for n in seeds]
    cells += [Cell(m, CENTRAL, "all", n) for m in methods for n in seeds]
    cells += [Cell(m, a, "all", n) for m in settings["fedu_methods"] for a in settings["fedu_arms"] for n in seeds]
    cells += [Cell(m, a, "all", n) for m in methods for a in settings["aggregator_names"] for n in single]
    return cells


def claims_of(settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``claims`` of the settings, checked against the matrix: each arm's cells must run on >= 2 common seeds."""
    claims = settings.get("claims") or []
    if not isinstance(claims, list):
        raise ConfigError(f"{SECTION}: 'claims' must be a list. Got {claims!r}.")
    seeds_of: dict[str, set[int]] = {}
    for cell in matrix_cells(settings):
        seeds_of.setdefault(cell.name, set()).add(cell.seed)
    problems, names = [], set()
    for i, claim in enumerate(claims):
        where = f"{SECTION}: claims[{i}]"
        if not isinstance(claim, Mapping) or not {"name", "claim", "a", "b", "metric"} <= set(claim):
            problems.append(f"{where} must be a mapping with name, claim, a, b and metric. Got {claim!r}.")
            continue
        if claim["name"] in names:
            problems.append(f"{where}: the name {claim['name']!r} is used twice.")
        names.add(claim["name"])
        if claim["metric"] not in CLAIM_METRICS:
            problems.append(f"{where}: 'metric' must be one of {list(CLAIM_METRICS)}. Got {claim['metric']!r}.")
        if claim.get("favourable", "positive") not in ("positive", "negative"):
            problems.append(f"{where}: 'favourable' must be positive or negative. Got {claim['favourable']!r}.")
        margin = claim.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
            problems.append(f"{where}: 'margin' must be a number >= 0. Got {margin!r}.")
        common: set[int] | None = None
        for arm in ("a", "b"):
            spec = claim[arm]
            if not isinstance(spec, Mapping) or not spec.get("cells") or not isinstance(spec.get("task"), str):
                problems.append(f"{where}.{arm} must be {{cells: [method/aggregator/send, ...], task: T}}. "
                                f"Got {spec!r}.")
                continue
            for name in spec["cells"]:
                if name not in seeds_of:
                    problems.append(f"{where}.{arm}: {name!r} is not a cell of the matrix; cells: "
                                    f"{sorted(seeds_of)}.")
                else:
                    common = seeds_of[name] if common is None else common & seeds_of[name]
        if common is not None and len(common) < 2:
            problems.append(f"{where}: its cells share {len(common)} seed(s); a paired interval needs >= 2 "
                            f"(claim cells run every seed of 'seeds').")
    if problems:
        raise ConfigError(problems)
    return [dict(c) for c in claims]


def _named(settings: Mapping[str, Any], mapping: str, name: str) -> Mapping[str, Any]:
    return named_overrides(settings, SECTION, mapping, name)


def cell_params(raw: Mapping[str, Any], settings: Mapping[str, Any], method: str, aggregator: str, send: str,
                seed: int | None = None, extra: Mapping[str, Any] | None = None) -> Params:
    """Project params with the common, method, aggregator (or central), transmission and seed overrides, then
    ``extra``. ``seed`` None keeps the params' own seeds (quick runs)."""
    if aggregator == CENTRAL:
        aggregation = settings.get(CENTRAL) or {}
    else:
        aggregation = _named(settings, "aggregators", aggregator)
    seeded = {} if seed is None else {key: int(seed) for key in settings.get("seed_keys") or []}
    suffix = "" if seed is None else f"-seed{int(seed)}"
    registered = {"downstream.registered_model": f"fassl-{method}-{aggregator}-{send}{suffix}"}
    layers = [settings.get("common") or {}, _named(settings, "methods", method), aggregation,
              _named(settings, "transmissions", send), seeded, registered, extra or {}]
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


def cell_folder(results: Path, method: str, aggregator: str, send: str, seed: int | None = None) -> Path:
    """``results/cells/<method>/<aggregator>/<send>/seed<N>`` (without the seed level when ``seed`` is None)."""
    folder = Path(results) / "cells" / method / aggregator / send
    return folder if seed is None else folder / f"seed{int(seed)}"


def _cell(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    params = cell_params(raw, settings, args.method, args.aggregator, args.send, args.seed, parse_sets(args.set))
    out = cell_folder(args.results, args.method, args.aggregator, args.send, args.seed)
    partition(params.partition, args.results / "pool", out / "partition")
    paths = FederatePaths(features=args.results / "pool", partition=out / "partition" / "partition.json",
                          poison=out / "poison", checkpoints=out / "checkpoints", model=out / "model.safetensors",
                          metrics=out / "metrics.json", plots=out, root=Path.cwd(),
                          downstream=args.results / "downstream")
    metrics = federate(params, paths)
    select(params, metrics["mlflow_run_id"], out, Path.cwd(), verify=True, downstream=args.results / "downstream")


# --------------------------------------------------------------------------------------------------- table
def collect(results: Path, cells: Sequence[Cell]) -> dict[Cell, dict[str, Any]]:
    """``{cell: {"metrics": ..., "selection": ...}}`` of the finished runs among ``cells`` (the current matrix:
    folders under ``results/cells`` that are not in it are never read)."""
    found = {}
    for cell in cells:
        folder = cell_folder(results, *cell)
        if (folder / "selection.json").is_file():
            found[cell] = {"metrics": read_json(folder / "metrics.json"),
                           "selection": read_json(folder / "selection.json")}
    return found


def run_value(selection: Mapping[str, Any], task: str, metric: str) -> float | None:
    """``metric`` of ``task`` in one run's selection; ``task`` :data:`MEAN_TASK`: the mean over its tasks."""
    tasks = selection["tasks"]
    names = sorted(tasks) if task == MEAN_TASK else [task]
    values = [tasks.get(name, {}).get(metric) for name in names]
    if not values or any(v is None for v in values):
        return None
    return sum(float(v) for v in values) / len(values)


def _summary(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "sd", "n", "values"}``; sd None for one value."""
    if not values:
        return {"mean": None, "sd": None, "n": 0, "values": []}
    if len(values) == 1:
        return {"mean": float(values[0]), "sd": None, "n": 1, "values": [float(values[0])]}
    mean, sd = mean_sd(values)
    return {"mean": mean, "sd": sd, "n": len(values), "values": [float(v) for v in values]}


def table_rows(runs: Mapping[Cell, Mapping[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Task names and one row per cell (seeds pooled): per task and for the mean over tasks, mean ± sd over
    seeds of the best-round test, last-round test and best round; the floor; the seeds found."""
    tasks = sorted({t for run in runs.values() for t in run["selection"]["tasks"]})
    by_cell: dict[tuple[str, str, str], list[Cell]] = {}
    for cell in runs:
        by_cell.setdefault(cell[:3], []).append(cell)
    rows = []
    for key, cells in by_cell.items():
        cells = sorted(cells, key=lambda c: c.seed)
        row: dict[str, Any] = {"method": key[0], "aggregator": key[1], "send": key[2],
                               "seeds": [c.seed for c in cells]}
        for task in [*tasks, MEAN_TASK]:
            row[task] = {}
            for metric in (*CLAIM_METRICS, "floor_test"):
                values = [run_value(runs[c]["selection"], task, metric) for c in cells]
                row[task][metric] = _summary([v for v in values if v is not None])
        rows.append(row)
    return tasks, rows


def evaluate_claim(claim: Mapping[str, Any], runs: Mapping[Cell, Mapping[str, Any]]) -> dict[str, Any]:
    """One claim on the finished runs: per seed, each arm's value (``metric`` of ``task`` averaged over its cells)
    on the seeds where every cell of both arms finished; the paired a − b differences' mean, 95% t-interval and
    verdict (on a − b + margin). Fewer than 2 such seeds: verdict ``pending``."""
    metric, margin = claim["metric"], float(claim.get("margin", 0.0))
    favourable = claim.get("favourable", "positive")
    by_seed: dict[int, dict[str, Cell]] = {}
    for cell in runs:
        by_seed.setdefault(cell.seed, {})[cell.name] = cell
    names = [*claim["a"]["cells"], *claim["b"]["cells"]]
    arms: dict[str, list[float]] = {"a": [], "b": []}
    seeds = []
    for seed in sorted(by_seed):
        if not all(n in by_seed[seed] for n in names):
            continue
        values = {arm: [run_value(runs[by_seed[seed][n]]["selection"], claim[arm]["task"], metric)
                        for n in claim[arm]["cells"]] for arm in ("a", "b")}
        if any(v is None for vs in values.values() for v in vs):
            continue
        seeds.append(seed)
        for arm, vs in values.items():
            arms[arm].append(sum(vs) / len(vs))  # type: ignore[arg-type]
    setting = (f"{metric} of {claim['a']['task']}: {' + '.join(claim['a']['cells'])} − "
               f"{' + '.join(claim['b']['cells'])}" + (f"; margin {margin:g}" if margin else ""))
    row: dict[str, Any] = {"name": claim["name"], "claim": claim["claim"], "setting": setting, "metric": metric,
                           "margin": margin, "favourable": favourable, "seeds": seeds, "a": arms["a"],
                           "b": arms["b"], "diffs": [x - y for x, y in zip(arms["a"], arms["b"], strict=True)]}
    if len(seeds) < 2:
        return {**row, "mean_diff": None, "low": None, "high": None, "verdict": "pending"}
    interval = paired_t_interval(arms["a"], arms["b"])
    return {**row, "mean_diff": interval.mean_diff, "low": interval.low, "high": interval.high,
            "verdict": verdict(interval.low + margin, interval.high + margin, favourable)}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _pm(summary: Mapping[str, Any], digits: int = 3) -> str:
    if summary["n"] == 0:
        return "—"
    if summary["sd"] is None:
        return _fmt(summary["mean"], digits)
    return format_pm(summary["mean"], summary["sd"], digits)


def markdown_table(tasks: Sequence[str], rows: Sequence[Mapping[str, Any]], metric: str,
                   claims: Sequence[Mapping[str, Any]] = (), missing: Sequence[Cell] = ()) -> str:
    """Rows: cells; per task ``best-round test (best round)`` as mean ± sd over seeds; a floor row first; then
    the claims (mean and 95% t-interval of the paired differences, verdict) and the runs not finished."""
    head = "| method | aggregator | send | seeds | " + " | ".join(tasks) + " | mean best | mean last |"
    lines = [head, "|---|---|---|---|" + "---|" * (len(tasks) + 2)]
    floors = [rows[0][t]["floor_test"]["mean"] if rows else None for t in tasks]
    found = [f for f in floors if f is not None]
    lines.append("| random init (floor) | — | — | — | " + " | ".join(_fmt(f) for f in floors) + " | "
                 f"{_fmt(sum(found) / len(found) if found else None)} | — |")
    for row in sorted(rows, key=lambda r: (r["method"], r["aggregator"], r["send"])):
        texts = [f"{_pm(row[t]['best_test'])} (r{_pm(row[t]['best_round'], 1)})" for t in tasks]
        lines.append(f"| {row['method']} | {row['aggregator']} | {row['send']} | {len(row['seeds'])} | "
                     + " | ".join(texts) + f" | {_pm(row[MEAN_TASK]['best_test'])} | "
                     f"{_pm(row[MEAN_TASK]['last_test'])} |")
    legend = (f"Each task: {metric} test accuracy of the encoder at the round selected on the validation split "
              f"(FASSL), mean ± sd over seeds (one value: one seed), and the selected round (rN, mean ± sd). "
              f"`send: backbone` is \"-bb\" (heads stay on the clients); `aggregator: central` is one client "
              f"holding the whole pool (the same passes over it).")
    text = legend + "\n\n" + "\n".join(lines) + "\n"
    if claims:
        text += ("\n## Claims\n\nPer seed a − b (paired: same partition and initial model); mean and 95% "
                 "t-interval over seeds; verdict: holds / does not hold / unresolved (the interval of a − b + "
                 "margin contains 0); pending: fewer than 2 seeds finished.\n\n"
                 "| claim | setting | seeds | mean a − b | 95% interval | verdict |\n|---|---|---|---|---|---|\n")
        for c in claims:
            digits = 1 if c["metric"] == "best_round" else 3
            interval = ("—" if c["low"] is None else f"[{_fmt(c['low'], digits)}, {_fmt(c['high'], digits)}]")
            text += (f"| {c['name']}: {c['claim']} | {c['setting']} | {len(c['seeds'])} | "
                     f"{_fmt(c['mean_diff'], digits)} | {interval} | {c['verdict']} |\n")
    if missing:
        names = ", ".join(f"{c.name}/seed{c.seed}" for c in missing)
        text += f"\nNot finished ({len(missing)} runs): {names}\n"
    return text


def plot_best_rounds(tasks: Sequence[str], rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Per task, the mean test accuracy at the selected round of every cell (± sd over seeds) against the floor."""
    plt = pyplot()
    rows = sorted(rows, key=lambda r: (r["method"], r["aggregator"], r["send"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.0, 0.32 * len(rows) + 2.0) * len(tasks) / 1.6, 4.2),
                             dpi=110, squeeze=False)
    labels = [f"{r['method']}/{r['aggregator']}/{r['send']}" for r in rows]

    def _value(summary: Mapping[str, Any], key: str) -> float:
        value = summary[key]
        return math.nan if value is None else float(value)

    for ax, task in zip(axes[0], tasks, strict=True):
        means = [_value(r[task]["best_test"], "mean") for r in rows]
        sds = [0.0 if r[task]["best_test"]["sd"] is None else r[task]["best_test"]["sd"] for r in rows]
        last = [_value(r[task]["last_test"], "mean") for r in rows]
        xs = range(len(rows))
        ax.bar(xs, means, 0.8, yerr=sds, capsize=2, label="selected round (± sd)", color="tab:blue")
        ax.plot(xs, last, "k_", markersize=10, label="last round")
        floor = rows[0][task]["floor_test"]["mean"] if rows else None
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
    _, settings = _load(args)
    cells = matrix_cells(settings)
    runs = collect(args.results, cells)
    if not runs:
        raise ConfigError(f"{SECTION}: no finished run of the matrix under {str(args.results / 'cells')!r}. "
                          f"Run the cells first.")
    tasks, rows = table_rows(runs)
    claims = [evaluate_claim(c, runs) for c in claims_of(settings)]
    missing = [c for c in cells if c not in runs]
    metric = next(iter(runs.values()))["selection"]["metric"]
    text = markdown_table(tasks, rows, metric, claims, missing)
    out = Path(args.out)
    write_text(out / "table.md", text)
    write_json(out / "table.json", {"metric": metric, "tasks": tasks, "seeds": settings["seeds"], "rows": rows,
                                    "claims": claims, "missing": [c._asdict() for c in missing]})
    plot_best_rounds(tasks, rows, out / "best_rounds.png")
    print(text)


# --------------------------------------------------------------------------------------------------- entry point
def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("command", choices=["data", "pool", "cell", "table"])
    p.add_argument("--dataset")
    p.add_argument("--method")
    p.add_argument("--aggregator", help=f"an aggregator name of the benchmark params, or {CENTRAL}")
    p.add_argument("--send", default="all")
    p.add_argument("--seed", type=int, default=None,
                   help="cell: the seed (sets every key of fassl.seed_keys); omitted: the params' own seeds")
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
