"""Robustness matrix: aggregators × Byzantine attacks × malicious fractions, over seeds where a claim needs them.

Run from ``benchmarks/robustness/`` (a DVC project of its own: ``dvc repro`` there runs the matrix). Settings:
``params.yaml`` there: the project sections the stages read and ``robustness``: the axes (``aggregators``,
``scenarios``), the ``overrides`` applied on top of the project sections for every run, the ``seeds`` and the
``seed_keys`` each seed sets, and the ``claims``.

Seeds. A cell named by a claim (its two arms, and their rules' clean cells when the claim compares accuracy
changes) runs every seed of ``seeds``; every other cell runs the first seed only. Seed ``s`` sets each key of
``seed_keys`` (the partition, the initialisation and client sampling, the malicious set) to ``s``, so the cells of
one seed share their partition, initial model and attackers, and a claim's arms are paired per seed.

``python -m benchmarks.robustness data`` downloads the dataset and writes the feature store and one partition per
seed under ``data/`` (``raw``, ``features``, ``partition/seed-<s>``).

``python -m benchmarks.robustness cell --aggregator A --scenario S [--seed N]`` runs the federate flow with the
project sections, the overrides, seed N's keys, aggregator A and scenario S (``clean``, or ``<attack>-<fraction>``
such as ``sign_flip-0.2``) for every seed the cell runs (or seed N only), each into
``results/A/S/seeds/<s>/`` (metrics.json, rounds.tsv, detection.json, checkpoints: resumable), then writes the
cell's per-seed summary ``results/A/S/metrics.json``.

``python -m benchmarks.robustness plan`` prints the runs (cells × seeds) and the hours they take at
``minutes_per_run`` (the timed pilot cell).

``python -m benchmarks.robustness table`` reads the runs of the current matrix (the cells and seeds params.yaml
names, never a directory listing) and writes ``table.md`` (mean ± sd of the final test accuracy per cell, change
against the same rule's clean run, detection precision/recall, and the claims: mean per-seed paired difference,
95% t-interval, verdict), ``table.json`` and ``drop.png``.
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from benchmarks.benchlib import (
    DOWNLOADS,
    format_pm,
    mean_sd,
    paired_t_interval,
    parse_sets,
    read_matrix_params,
    run_command,
    verdict,
    write_table,
)
from fedcore.config import ConfigError, Params, load_params
from flows import stage
from flows.download import download
from flows.features import features
from flows.federate import FederatePaths, federate
from flows.partition import partition
from tasks.common import pyplot, read_json, save_figure, write_json

SECTION = "robustness"
CLEAN = "clean"
#: The matrix's own data (download, features, partition), relative to its folder.
DATA = Path("data")
CELLS = Path("results")
#: What a claim compares per seed: a cell's final test accuracy, or its change against the same rule's clean run.
METRICS = ("global_accuracy", "change")
#: A claim's cells run at least this many seeds (issue 21).
MIN_CLAIM_SEEDS = 3


class Cell(NamedTuple):
    """One cell of the matrix: an aggregator and a scenario."""

    aggregator: str
    scenario: str

    def __str__(self) -> str:
        return f"{self.aggregator}/{self.scenario}"


class Run(NamedTuple):
    """One run: a cell at one seed."""

    cell: Cell
    seed: int


@dataclass(frozen=True, kw_only=True)
class Claim:
    """A claim of the papers, as two arms of the matrix compared per seed.

    The per-seed difference is ``d_s = m(a, s) − m(b, s)``, with ``m`` the final test accuracy
    (``global_accuracy``) or its change against the same rule's clean run at the same seed (``change``:
    ``acc(rule/attack, s) − acc(rule/clean, s)``, so a positive ``d_s`` means ``a`` loses less than ``b``). The
    claim holds when the 95% paired t-interval of ``d`` lies on the ``favourable`` side of 0.
    """

    name: str
    claim: str
    a: Cell
    b: Cell
    metric: Literal["global_accuracy", "change"] = "change"
    favourable: Literal["positive", "negative"] = "positive"

    def cells(self) -> list[Cell]:
        """The cells the claim reads: its arms, and their rules' clean cells for ``change``."""
        cells = [self.a, self.b]
        if self.metric == "change":
            cells += [Cell(self.a.aggregator, CLEAN), Cell(self.b.aggregator, CLEAN)]
        return cells


# --------------------------------------------------------------------------------------------------- settings
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


def parse_cell(text: Any, where: str) -> Cell:
    """``"<aggregator>/<scenario>"`` → :class:`Cell`."""
    aggregator, sep, scenario = str(text).partition("/")
    if not sep or not aggregator or not scenario:
        raise ConfigError(f"robustness: {where} must be '<aggregator>/<scenario>'. Got {text!r}.")
    return Cell(aggregator, scenario)


def load_claims(settings: Mapping[str, Any]) -> list[Claim]:
    """The ``claims`` of the settings, checked against the axes (one error listing every problem)."""
    aggregators, scenarios = list(settings.get("aggregators") or []), list(settings.get("scenarios") or [])
    claims, problems = [], []
    allowed = {"name", "claim", "a", "b", "metric", "favourable"}
    for i, raw in enumerate(settings.get("claims") or []):
        where = f"claims[{i}]"
        if not isinstance(raw, Mapping):
            problems.append(f"robustness: {where} must be a mapping. Got {raw!r}.")
            continue
        if unknown := set(raw) - allowed:
            problems.append(f"robustness: {where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}.")
            continue
        try:
            claim = Claim(name=str(raw["name"]), claim=str(raw.get("claim", "")),
                          a=parse_cell(raw.get("a"), f"{where}.a"), b=parse_cell(raw.get("b"), f"{where}.b"),
                          metric=raw.get("metric", "change"), favourable=raw.get("favourable", "positive"))
        except (ConfigError, KeyError) as error:
            problems.append(f"robustness: {where}: {error}")
            continue
        if claim.metric not in METRICS:
            problems.append(f"robustness: {where}.metric must be one of {list(METRICS)}. Got {claim.metric!r}.")
        if claim.favourable not in ("positive", "negative"):
            problems.append(f"robustness: {where}.favourable must be 'positive' or 'negative'. "
                            f"Got {claim.favourable!r}.")
        if claim.metric == "change" and CLEAN in (claim.a.scenario, claim.b.scenario):
            problems.append(f"robustness: {where}: metric 'change' compares attacked cells; got a clean arm.")
        matrix = {Cell(a, s) for a in aggregators for s in scenarios}
        if outside := [str(c) for c in claim.cells() if c not in matrix]:
            problems.append(f"robustness: {where} ({claim.name}) names cells outside the matrix: {outside}.")
        claims.append(claim)
    if len({c.name for c in claims}) != len(claims):
        problems.append(f"robustness: claim names must be unique. Got {[c.name for c in claims]}.")
    if problems:
        raise ConfigError(problems)
    return claims


def load_seeds(settings: Mapping[str, Any], claims: Sequence[Claim]) -> list[int]:
    """The ``seeds`` list, checked: distinct ints, at least :data:`MIN_CLAIM_SEEDS` when there are claims."""
    seeds = settings.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"robustness: 'seeds' must be a non-empty list of distinct ints. Got {seeds!r}.")
    if claims and len(seeds) < MIN_CLAIM_SEEDS:
        raise ConfigError(f"robustness: claim cells run at least {MIN_CLAIM_SEEDS} seeds; 'seeds' has "
                          f"{len(seeds)}: {seeds!r}.")
    return seeds


def seed_overrides(settings: Mapping[str, Any], seed: int) -> dict[str, int]:
    """``{key: seed}`` for each ``section.key`` of ``seed_keys``."""
    keys = settings.get("seed_keys") or []
    if bad := [k for k in keys if "." not in str(k)]:
        raise ConfigError(f"robustness: 'seed_keys' must be 'section.key' names. Got {bad!r}.")
    return {str(k): seed for k in keys}


def cells(settings: Mapping[str, Any]) -> list[Cell]:
    """Every cell of the matrix, in params order (aggregators, then scenarios)."""
    return [Cell(a, s) for a in settings.get("aggregators") or [] for s in settings.get("scenarios") or []]


def expand(settings: Mapping[str, Any]) -> list[Run]:
    """The runs of the matrix: every seed for a cell a claim reads, the first seed for every other cell."""
    claims = load_claims(settings)
    seeds = load_seeds(settings, claims)
    claimed = {c for claim in claims for c in claim.cells()}
    return [Run(cell, seed) for cell in cells(settings) for seed in (seeds if cell in claimed else seeds[:1])]


def seeds_of(runs: Sequence[Run], cell: Cell) -> list[int]:
    """The seeds ``cell`` runs."""
    return [r.seed for r in runs if r.cell == cell]


def cell_params(raw: Mapping[str, Any], overrides: Mapping[str, Any], aggregator: str, scenario: str,
                seeds: Mapping[str, Any] | None = None) -> Params:
    """The project params with the matrix overrides, a seed's keys (``seeds``), the aggregator and the attack."""
    merged: dict[str, Any] = copy.deepcopy(dict(raw))
    attack, fraction = parse_scenario(scenario)
    settings = {**overrides, **(seeds or {}), "federation.aggregator": aggregator, "attack.name": attack,
                "attack.client_fraction": fraction}
    for dotted, value in settings.items():
        section, _, key = str(dotted).partition(".")
        if not key:
            raise ConfigError(f"robustness: override keys must be 'section.key'. Got {dotted!r}.")
        merged.setdefault(section, {})
        merged[section] = {**(merged[section] or {}), key: value}
    return load_params(merged)


def seed_dir(root: Path, cell: Cell, seed: int) -> Path:
    """Where a run writes: ``root/<aggregator>/<scenario>/seeds/<seed>``."""
    return root / cell.aggregator / cell.scenario / "seeds" / str(seed)


def partition_dir(data: Path, seed: int) -> Path:
    """The partition of a seed: ``data/partition/seed-<seed>``."""
    return data / "partition" / f"seed-{seed}"


def _load(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The project sections of the matrix's params file and its ``robustness`` settings."""
    raw, bench = read_matrix_params(args.params, SECTION)
    settings = bench.get(SECTION)
    if not isinstance(settings, Mapping):
        raise ConfigError(f"{SECTION}: {args.params} must have a '{SECTION}' mapping. Got {settings!r}.")
    return raw, dict(settings)


# --------------------------------------------------------------------------------------------------- commands
def _data(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    params = load_params(raw)
    download(params.download, args.data / "raw", Path(args.downloads))
    features(params.features, args.data / "raw", args.data / "features")
    for seed in load_seeds(settings, load_claims(settings)):
        seeded = cell_params(raw, settings.get("overrides") or {}, "fedavg", CLEAN, seed_overrides(settings, seed))
        partition(seeded.partition, args.data / "features", partition_dir(args.data, seed))


def _cell(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    overrides = {**(settings.get("overrides") or {}), **parse_sets(args.set)}
    cell = Cell(args.aggregator, args.scenario)
    planned = seeds_of(expand(settings), cell)
    if not planned:
        raise ConfigError(f"robustness: {cell} is not a cell of the matrix (aggregators × scenarios).")
    seeds = [args.seed] if args.seed is not None else planned
    for seed in seeds:
        params = cell_params(raw, overrides, cell.aggregator, cell.scenario, seed_overrides(settings, seed))
        out = Path(args.out) / str(seed) if args.out else seed_dir(args.cells, cell, seed)
        paths = FederatePaths(features=args.data / "features",
                              partition=partition_dir(args.data, seed) / "partition.json",
                              poison=out / "poison", checkpoints=out / "checkpoints", model=out / "model.safetensors",
                              metrics=out / "metrics.json", plots=out, root=Path.cwd())
        federate(params, paths)
    if args.seed is None and not args.out:
        runs = collect(args.cells, [Run(cell, s) for s in planned])
        write_json(args.cells / cell.aggregator / cell.scenario / "metrics.json", cell_summary(runs, cell, planned))


def cell_summary(results: Mapping[Run, Mapping[str, Any]], cell: Cell, seeds: Sequence[int]) -> dict[str, Any]:
    """A cell's DVC metrics: the final test accuracy per seed, and its mean and sd over seeds."""
    accuracy = {str(s): results[Run(cell, s)]["global_accuracy"] for s in seeds if Run(cell, s) in results}
    summary: dict[str, Any] = {"seeds": len(accuracy), "global_accuracy": accuracy}
    if len(accuracy) >= 2:
        summary["mean"], summary["sd"] = mean_sd(list(accuracy.values()))
    elif accuracy:
        summary["mean"] = next(iter(accuracy.values()))
    return summary


def _plan(args: argparse.Namespace) -> None:
    _, settings = _load(args)
    print(plan_text(settings, args.minutes or settings.get("minutes_per_run")))


def plan_text(settings: Mapping[str, Any], minutes_per_run: float | None) -> str:
    """The cells, the runs (cells × seeds) and the hours they take at ``minutes_per_run``."""
    runs = expand(settings)
    all_cells = cells(settings)
    claimed = [c for c in all_cells if len(seeds_of(runs, c)) > 1]
    lines = [f"{len(all_cells)} cells ({len(settings.get('aggregators') or [])} aggregators × "
             f"{len(settings.get('scenarios') or [])} scenarios), {len(claimed)} claim cells × "
             f"{len(settings.get('seeds') or [])} seeds, {len(all_cells) - len(claimed)} cells × 1 seed: "
             f"{len(runs)} runs"]
    if minutes_per_run:
        lines.append(f"at {float(minutes_per_run):.1f} min per run: {len(runs) * float(minutes_per_run) / 60:.2f} h")
    lines += [f"  {c}: seeds {seeds_of(runs, c)}" for c in claimed]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- table
def collect(root: Path, runs: Sequence[Run]) -> dict[Run, dict[str, Any]]:
    """The metrics of each run of ``runs`` that has finished (``root/A/S/seeds/<s>/metrics.json``).

    Only the runs asked for are read: a folder left by a cell or seed no longer in the matrix is never tabulated.
    """
    found = {}
    for run in runs:
        path = seed_dir(root, run.cell, run.seed) / "metrics.json"
        if path.is_file():
            found[run] = read_json(path)
    return found


def per_seed(results: Mapping[Run, Mapping[str, Any]], cell: Cell, metric: str) -> dict[int, float]:
    """``{seed: value}`` of a cell: its final test accuracy, or its change against the same rule's clean run."""
    values = {}
    for run, metrics in results.items():
        if run.cell != cell:
            continue
        value = float(metrics["global_accuracy"])
        if metric == "change":
            clean = results.get(Run(Cell(cell.aggregator, CLEAN), run.seed))
            if clean is None:
                continue
            value -= float(clean["global_accuracy"])
        values[run.seed] = value
    return values


def evaluate_claim(claim: Claim, results: Mapping[Run, Mapping[str, Any]],
                   confidence: float = 0.95) -> dict[str, Any]:
    """A claim's per-seed differences ``m(a, s) − m(b, s)`` over the seeds both arms have, their paired
    ``confidence`` t-interval and the verdict (``not run`` with fewer than 2 paired seeds)."""
    a, b = per_seed(results, claim.a, claim.metric), per_seed(results, claim.b, claim.metric)
    seeds = sorted(set(a) & set(b))
    row: dict[str, Any] = {"name": claim.name, "claim": claim.claim, "a": str(claim.a), "b": str(claim.b),
                           "metric": claim.metric, "favourable": claim.favourable, "seeds": seeds,
                           "differences": [a[s] - b[s] for s in seeds]}
    if len(seeds) < 2:
        return {**row, "mean_diff": None, "low": None, "high": None, "verdict": "not run"}
    interval = paired_t_interval([a[s] for s in seeds], [b[s] for s in seeds], confidence)
    return {**row, "mean_diff": interval.mean_diff, "low": interval.low, "high": interval.high,
            "verdict": verdict(interval.low, interval.high, claim.favourable)}


def cell_rows(results: Mapping[Run, Mapping[str, Any]], runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per cell of ``runs`` (in order): seeds planned and done, accuracy mean ± sd, change, P/R."""
    rows = []
    for cell in dict.fromkeys(r.cell for r in runs):
        planned = seeds_of(runs, cell)
        done = [s for s in planned if Run(cell, s) in results]
        accuracy = [float(results[Run(cell, s)]["global_accuracy"]) for s in done]
        change = list(per_seed(results, cell, "change").values()) if cell.scenario != CLEAN else []
        rows.append({"aggregator": cell.aggregator, "scenario": cell.scenario, "seeds": planned, "done": done,
                     "accuracy": _stat(accuracy), "change": _stat(change),
                     "precision": _stat(_finite(results[Run(cell, s)].get("detect_precision") for s in done)),
                     "recall": _stat(_finite(results[Run(cell, s)].get("detect_recall") for s in done))})
    return rows


def _finite(values: Any) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _stat(values: Sequence[float]) -> dict[str, float] | None:
    """``{"mean", "sd"}`` (sd only from 2 values on), or None without values."""
    if not values:
        return None
    if len(values) == 1:
        return {"mean": values[0]}
    mean, sd = mean_sd(values)
    return {"mean": mean, "sd": sd}


def _text(stat: Mapping[str, float] | None, signed: bool = False, digits: int = 3) -> str:
    if stat is None:
        return "—"
    if "sd" in stat:
        text = format_pm(stat["mean"], stat["sd"], digits)
        return ("+" if signed and stat["mean"] >= 0 else "") + text
    return f"{stat['mean']:+.{digits}f}" if signed else f"{stat['mean']:.{digits}f}"


def markdown_table(rows: Sequence[Mapping[str, Any]], aggregators: Sequence[str], scenarios: Sequence[str]) -> str:
    """Rows: aggregators; columns: scenarios (params order); cells: accuracy (mean ± sd over seeds), change
    against the same rule's clean run, detection P/R; ``not run`` where no seed finished."""
    by_cell = {(r["aggregator"], r["scenario"]): r for r in rows}
    lines = ["| aggregator | " + " | ".join(scenarios) + " |", "|---|" + "---|" * len(scenarios)]
    for name in aggregators:
        texts = []
        for scenario in scenarios:
            row = by_cell.get((name, scenario))
            if row is None or not row["done"]:
                texts.append("not run")
                continue
            text = _text(row["accuracy"])
            if scenario != CLEAN and row["change"] is not None:
                text += f" ({_text(row['change'], signed=True)})"
            if len(row["seeds"]) > 1:
                text += f"<br>{len(row['done'])}/{len(row['seeds'])} seeds"
            if scenario != CLEAN:
                text += f"<br>P {_text(row['precision'], digits=2)} R {_text(row['recall'], digits=2)}"
            texts.append(text)
        lines.append(f"| {name} | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


def claims_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per claim: the setting, the mean per-seed paired difference, its 95% t-interval, the verdict."""
    lines = ["| claim | setting (a − b, metric) | seeds | mean difference | 95% t-interval | verdict |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        setting = f"{r['a']} − {r['b']} ({r['metric']}, {r['favourable']} favours the claim)"
        if r["mean_diff"] is None:
            lines.append(f"| {r['claim'] or r['name']} | {setting} | {len(r['seeds'])} | — | — | {r['verdict']} |")
            continue
        lines.append(f"| {r['claim'] or r['name']} | {setting} | {len(r['seeds'])} | {r['mean_diff']:+.3f} | "
                     f"[{r['low']:+.3f}, {r['high']:+.3f}] | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def plot_drops(rows: Sequence[Mapping[str, Any]], aggregators: Sequence[str], scenarios: Sequence[str],
               path: Path) -> None:
    """Heat map of the mean accuracy drop against each rule's clean run."""
    plt = pyplot()
    by_cell = {(r["aggregator"], r["scenario"]): r for r in rows}
    columns = [s for s in scenarios if s != CLEAN]
    values = [[math.nan] * len(columns) for _ in aggregators]
    for i, name in enumerate(aggregators):
        for j, scenario in enumerate(columns):
            row = by_cell.get((name, scenario))
            if row is not None and row["change"] is not None:
                values[i][j] = -row["change"]["mean"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * max(1, len(columns)), 0.8 + 0.45 * len(aggregators)), dpi=110)
    image = ax.imshow(values, cmap="Reds", vmin=0.0, vmax=max(0.3, max((v for r in values for v in r
                                                                     if not math.isnan(v)), default=0.3)))
    ax.set_xticks(range(len(columns)), columns, rotation=40, ha="right")
    ax.set_yticks(range(len(aggregators)), aggregators)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            ax.text(j, i, "—" if math.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="accuracy drop vs clean (mean over seeds)")
    ax.set_title("Robustness: drop in final test accuracy")
    save_figure(fig, path)


def tabulate(settings: Mapping[str, Any], root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """The cell rows, the claim rows and the markdown of the current matrix's finished runs under ``root``."""
    runs = expand(settings)
    results = collect(root, runs)
    rows = cell_rows(results, runs)
    claims = [evaluate_claim(c, results) for c in load_claims(settings)]
    aggregators, scenarios = list(settings.get("aggregators") or []), list(settings.get("scenarios") or [])
    text = markdown_table(rows, aggregators, scenarios)
    if claims:
        text += "\n### Claims\n\n" + claims_table(claims)
    return rows, claims, text


def _table(args: argparse.Namespace) -> None:
    _, settings = _load(args)
    rows, claims, text = tabulate(settings, Path(args.cells))
    aggregators, scenarios = list(settings.get("aggregators") or []), list(settings.get("scenarios") or [])
    write_table(SECTION, [r for r in rows if r["done"]], Path(args.out), text,
                lambda done, path: plot_drops(done, aggregators, scenarios, path), "drop.png",
                extra={"claims": claims})


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("command", choices=["data", "cell", "plan", "table"])
    p.add_argument("--aggregator")
    p.add_argument("--scenario")
    p.add_argument("--seed", type=int, help="cell: run this seed only (default: every seed the cell runs)")
    p.add_argument("--out", type=Path, help="cell: DIR, one DIR/<seed> per seed (default CELLS/A/S/seeds); "
                                            "table: FOLDER (default .)")
    p.add_argument("--minutes", type=float, help="plan: minutes per run (default: robustness.minutes_per_run)")
    p.add_argument("--cells", type=Path, default=CELLS, help=f"results root (default {CELLS})")
    p.add_argument("--data", type=Path, default=DATA, help=f"the matrix's data folder (default {DATA})")
    p.add_argument("--downloads", type=Path, default=DOWNLOADS,
                   help="data: archive cache (default: the project's data/downloads)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="cell: override applied after the matrix's overrides (value read as YAML); repeatable")


def _main(args: argparse.Namespace) -> None:
    if args.command == "table" and args.out is None:
        args.out = Path(".")
    run_command(SECTION, args, {"cell": ["aggregator", "scenario"]},
                {"data": _data, "cell": _cell, "plan": _plan, "table": _table})


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m benchmarks.robustness``)."""
    return stage.entry(__doc__ or "", _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
