"""Personalisation matrix: methods × data poisoning × datasets × seeds, as a DVC pipeline, its table and claims.

Run from ``benchmarks/personalisation/`` (a DVC project of its own: ``dvc repro`` there runs the matrix). Settings:
``params.yaml`` there: the project sections the stages read and ``personalisation``: the datasets, methods and
scenarios of the matrix, the seeds, the claims, and ``section.key: value`` overrides applied on top of the project
sections in this order: ``common``, the dataset's (``datasets``), the method's (``methods``), the scenario's
poisoning (``clean``, or ``<poison attack>-<fraction of clients>`` such as ``label_flip-0.2``), then the seed's
(seed k sets every key of ``seed_keys`` to k: the partition, the poisoned clients and the initial models).

**Cells and seeds.** A cell is (dataset, method, scenario). Every cell runs seeds ``0 .. seeds-1``; a cell that a
claim compares runs the claim's seeds (the most any claim asks of it), so the claims' paired differences have one
value per seed. :func:`expand` lists the runs (cell × seed) from the params; ``expand`` writes them into
``cells.yaml``, which ``dvc.yaml`` reads (DVC cannot compute its stages), and a test checks it is up to date.

Commands (``python -m benchmarks.personalisation <command>``):

- ``data --dataset D``: download and features of D into ``results/D/data/`` (raw, features; archives cached in
  ``--downloads``, the project's ``data/downloads``).
- ``partition --dataset D --seed K``: D's Dirichlet partition with seed K into ``results/D/partition/sK/``.
- ``cell --dataset D --method M --scenario S --seed K``: the poison flow into ``results/D/M/S/sK/poison``, the
  federate flow (metrics.json, rounds.tsv, rounds.png, detection.json, model.safetensors, checkpoints), then each
  client's final model on its held-out split, benign and poisoned clients apart (``clients.json``,
  :mod:`benchmarks.personalisation.clients`). ``--set section.key=value`` (repeatable, read as YAML) overrides
  last, for quick runs.
- ``table``: reads the runs of the current matrix only (:func:`expand`: never a directory listing, so result
  folders of cells no longer in the matrix are never mixed in) and writes ``table.md``, ``table.json`` and
  ``comparison.png``: per cell, mean ± sd over its seeds of the personalised accuracy over every client, over the
  benign clients (and their change against the same clients in the method's clean run, same seed), over the
  poisoned clients, and the shared model's test accuracy; then the claims, each with the mean paired per-seed
  difference, its 95% t interval and the verdict (:mod:`benchmarks.stats`).
- ``expand [--check]``: write ``cells.yaml`` (``--check``: exit 1 when it is out of date).
- ``plan``: the runs per cell and the planned hours, from the pilot timing in ``budget``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from benchmarks.benchlib import (
    DOWNLOADS,
    apply_overrides,
    format_pm,
    mean_sd,
    paired_t_interval,
    parse_sets,
    read_matrix_params,
    run_command,
    verdict,
)
from benchmarks.personalisation.clients import benign_change, client_accuracies
from fedcore.config import ConfigError, Params, load_params
from flows import stage
from flows.download import download
from flows.features import features
from flows.federate import FederatePaths, federate
from flows.partition import partition
from flows.poison import poison
from tasks.common import pyplot, read_json, save_figure, write_json, write_text

CLEAN = "clean"
SECTION = "personalisation"
PARAMS = "params.yaml"
CELLS = Path("results")
#: The runs of the matrix, written by ``expand`` and read by ``dvc.yaml`` (``vars``).
CELLS_YAML = "cells.yaml"
#: The method whose global (test) accuracy the comparison plot marks.
REFERENCE = "fedavg"
#: A claim's confidence level (the t interval of the mean paired difference).
CONFIDENCE = 0.95

#: What a claim can compare, per run: key → what it is (the table's legend).
MEASURES = {
    "personalised": "personalised accuracy, mean over every client's held-out split",
    "benign": "personalised accuracy, mean over the benign (not poisoned) clients",
    "benign_change": "benign clients' accuracy change against the same clients in the method's clean run "
                     "(same seed)",
    "poisoned": "personalised accuracy, mean over the poisoned clients",
    "global": "shared model's test accuracy (local: the clients' own models on the test split, averaged)",
    "worst10": "personalised accuracy, mean over the worst 10% of clients",
}
#: Measures that compare a scenario with the clean run: undefined on the clean scenario.
CHANGES = ("benign_change",)
SEED_KEYS = ("partition.seed", "poison.seed", "federation.seed", "personal.seed")


class Run(NamedTuple):
    """One run of the matrix: a cell (dataset, method, scenario) with one seed."""

    dataset: str
    method: str
    scenario: str
    seed: int

    @property
    def name(self) -> str:
        """``fsdd-fml-label_flip-0.2-s0``: the DVC stage key (``cell@<name>``)."""
        return f"{self.dataset}-{self.method}-{self.scenario}-s{self.seed}"

    def folder(self, cells: Path) -> Path:
        """``cells/<dataset>/<method>/<scenario>/s<seed>``."""
        return Path(cells) / self.dataset / self.method / self.scenario / f"s{self.seed}"


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


def _count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _claim_problems(settings: Mapping[str, Any]) -> list[str]:
    problems = []
    known = {"datasets": settings.get("dataset_names") or [], "scenarios": settings.get("scenarios") or [],
             "method": settings.get("method_names") or [], "against": settings.get("method_names") or []}
    keys = {"id", "claim", "datasets", "scenarios", "metric", "method", "against", "favourable", "seeds"}
    ids = []
    for i, claim in enumerate(settings.get("claims") or []):
        where = f"{SECTION}: claims[{i}]"
        if not isinstance(claim, Mapping):
            problems.append(f"{where} must be a mapping. Got {claim!r}.")
            continue
        if missing := sorted(keys - set(claim)):
            problems.append(f"{where}: missing keys {missing}.")
            continue
        if unknown := sorted(set(claim) - keys):
            problems.append(f"{where}: unknown keys {unknown}; allowed: {sorted(keys)}.")
        ids.append(claim["id"])
        for key, names in known.items():
            given = claim[key] if isinstance(claim[key], list) else [claim[key]]
            if not given or any(n not in names for n in given):
                problems.append(f"{where}: '{key}' must name entries of the matrix ({names}). Got {claim[key]!r}.")
        if claim["metric"] not in MEASURES:
            problems.append(f"{where}: 'metric' must be one of {sorted(MEASURES)}. Got {claim['metric']!r}.")
        elif claim["metric"] in CHANGES and CLEAN in (claim["scenarios"] or []):
            problems.append(f"{where}: '{claim['metric']}' compares with the clean run; 'scenarios' must not "
                            f"list '{CLEAN}'.")
        if claim["favourable"] not in ("positive", "negative"):
            problems.append(f"{where}: 'favourable' must be 'positive' or 'negative'. Got {claim['favourable']!r}.")
        if not _count(claim["seeds"], 2):
            problems.append(f"{where}: 'seeds' must be an int >= 2 (a paired interval needs a spread). "
                            f"Got {claim['seeds']!r}.")
        if isinstance(claim["against"], list) and claim["method"] in claim["against"]:
            problems.append(f"{where}: 'against' must not list the claim's own method {claim['method']!r}.")
    if len(set(ids)) != len(ids):
        problems.append(f"{SECTION}: claim ids must be unique. Got {ids}.")
    return problems


def settings_of(bench: Mapping[str, Any]) -> dict[str, Any]:
    """The ``personalisation`` section of the benchmark params, checked.

    Every listed dataset and method has its overrides, every scenario parses, ``seeds`` is an int >= 1,
    ``seed_keys`` are ``section.key`` names, and every claim names entries of the matrix (one error listing
    every problem).
    """
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
    if not _count(settings.get("seeds", 1), 1):
        problems.append(f"{SECTION}: 'seeds' (of a cell no claim reads) must be an int >= 1. "
                        f"Got {settings.get('seeds')!r}.")
    keys = settings.get("seed_keys", list(SEED_KEYS))
    if not isinstance(keys, list) or not all(isinstance(k, str) and k.count(".") == 1 for k in keys):
        problems.append(f"{SECTION}: 'seed_keys' must be a list of 'section.key' names. Got {keys!r}.")
    problems += _claim_problems(settings)
    if problems:
        raise ConfigError(problems)
    return dict(settings)


def _named(settings: Mapping[str, Any], mapping: str, name: str, what: str) -> Mapping[str, Any]:
    known = settings.get(mapping) or {}
    if name not in known:
        raise ConfigError(f"{SECTION}: {what} must be one of {sorted(known)} ('{mapping}' in {PARAMS}). "
                          f"Got {name!r}.")
    return known[name] or {}


def seed_overrides(settings: Mapping[str, Any], seed: int) -> dict[str, int]:
    """Seed ``seed`` of a run: every key of ``seed_keys`` (the partition, poison and initialisation seeds) = seed."""
    return {key: int(seed) for key in settings.get("seed_keys", SEED_KEYS)}


def data_params(raw: Mapping[str, Any], settings: Mapping[str, Any], dataset: str, seed: int = 0,
                extra: Mapping[str, Any] | None = None) -> Params:
    """The project params with the common, dataset and seed overrides (the data and partition stages)."""
    layers = [settings.get("common") or {}, _named(settings, "datasets", dataset, "dataset"),
              seed_overrides(settings, seed), extra or {}]
    return load_params(apply_overrides(raw, *layers))


def cell_params(raw: Mapping[str, Any], settings: Mapping[str, Any], dataset: str, method: str, scenario: str,
                seed: int = 0, extra: Mapping[str, Any] | None = None) -> Params:
    """The project params with the common, dataset, method, scenario and seed overrides, then ``extra``."""
    attack, fraction = parse_scenario(scenario)
    layers = [settings.get("common") or {}, _named(settings, "datasets", dataset, "dataset"),
              _named(settings, "methods", method, "method"),
              {"poison.attack": attack, "poison.client_fraction": fraction}, seed_overrides(settings, seed),
              extra or {}]
    return load_params(apply_overrides(raw, *layers))


# --------------------------------------------------------------------------------------------------- expansion
def claim_cells(claim: Mapping[str, Any]) -> set[tuple[str, str, str]]:
    """The cells (dataset, method, scenario) a claim reads: its arms in its scenarios (and clean, for a change)."""
    scenarios = list(claim["scenarios"]) + ([CLEAN] if claim["metric"] in CHANGES else [])
    return {(d, m, s) for d in claim["datasets"] for m in [claim["method"], *claim["against"]] for s in scenarios}


def cell_seeds(settings: Mapping[str, Any]) -> dict[tuple[str, str, str], int]:
    """Seeds per cell of the matrix: ``seeds``, or the most any claim reading the cell asks for."""
    base = int(settings.get("seeds", 1))
    seeds = {(d, m, s): base for d in settings.get("dataset_names") or []
             for m in settings.get("method_names") or [] for s in settings.get("scenarios") or []}
    for claim in settings.get("claims") or []:
        for cell in claim_cells(claim):
            seeds[cell] = max(seeds.get(cell, base), int(claim["seeds"]))
    return seeds


def expand(settings: Mapping[str, Any]) -> list[Run]:
    """Every run of the matrix (cell × seed), in the params' order of datasets, methods, scenarios, then seed."""
    seeds = cell_seeds(settings)
    return [Run(d, m, s, k) for d in settings.get("dataset_names") or [] for m in settings.get("method_names") or []
            for s in settings.get("scenarios") or [] for k in range(seeds[(d, m, s)])]


def partitions(runs: Iterable[Run]) -> list[tuple[str, int]]:
    """The (dataset, seed) partitions the runs need, in first-use order."""
    return list(dict.fromkeys((r.dataset, r.seed) for r in runs))


def cells_yaml_text(settings: Mapping[str, Any]) -> str:
    """The text of ``cells.yaml``: the partitions and runs of the matrix, keyed by their DVC stage names."""
    runs = expand(settings)
    data = {"partitions": {f"{d}-s{k}": {"dataset": d, "seed": k} for d, k in partitions(runs)},
            "runs": {r.name: r._asdict() for r in runs}}
    head = (f"# Generated by `python -m benchmarks.personalisation expand` from params.yaml ({SECTION}): the runs\n"
            f"# (cell x seed) of the matrix, which dvc.yaml reads. Do not edit; rerun expand when params change.\n")
    return head + yaml.safe_dump(data, sort_keys=False, width=120, default_flow_style=None)


def planned_seconds(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Runs and planned wall seconds on an idle machine, from ``budget`` (planning only; no stage reads it).

    A run takes ``overhead_seconds + anchor_seconds × relative[dataset][method]`` (``anchor_seconds``: the pilot
    cell's federate time; ``relative``: each cell's cost over the pilot's); each dataset's data stage
    ``data_seconds``, each partition ``partition_seconds``. A method or dataset missing from ``relative`` makes
    the total NaN.
    """
    budget = settings.get("budget") or {}
    runs = expand(settings)
    relative = budget.get("relative") or {}
    anchor, overhead = float(budget.get("anchor_seconds", math.nan)), float(budget.get("overhead_seconds", 0.0))
    cells = sum(overhead + anchor * float((relative.get(r.dataset) or {}).get(r.method, math.nan)) for r in runs)
    data = float(budget.get("data_seconds", 0.0)) * len(settings.get("dataset_names") or [])
    parts = float(budget.get("partition_seconds", 0.0)) * len(partitions(runs))
    seeds = cell_seeds(settings)
    base = int(settings.get("seeds", 1))
    total = cells + data + parts
    return {"runs": len(runs), "cells": len(seeds), "claim_cells": sum(1 for n in seeds.values() if n > base),
            "seconds": total, "hours": total / 3600.0}


def _load(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    raw, bench = read_matrix_params(args.params, SECTION)
    return raw, settings_of(bench)


# --------------------------------------------------------------------------------------------------- stages
def _data(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    params = data_params(raw, settings, args.dataset, 0, parse_sets(args.set))
    out = Path(args.out or args.cells / args.dataset / "data")
    download(params.download, out / "raw", Path(args.downloads))
    features(params.features, out / "raw", out / "features")


def _partition(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    params = data_params(raw, settings, args.dataset, args.seed, parse_sets(args.set))
    data = Path(args.data or args.cells / args.dataset / "data")
    out = Path(args.out or args.cells / args.dataset / "partition" / f"s{args.seed}")
    partition(params.partition, data / "features", out)


def _cell(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    params = cell_params(raw, settings, args.dataset, args.method, args.scenario, args.seed, parse_sets(args.set))
    data = Path(args.data or args.cells / args.dataset / "data")
    split = Path(args.partition or args.cells / args.dataset / "partition" / f"s{args.seed}") / "partition.json"
    out = Path(args.out or Run(args.dataset, args.method, args.scenario, args.seed).folder(args.cells))
    poison(params.poison, params.features, data / "raw", data / "features", split, out / "poison")
    paths = FederatePaths(features=data / "features", partition=split, poison=out / "poison",
                          checkpoints=out / "checkpoints", model=out / "model.safetensors",
                          metrics=out / "metrics.json", plots=out, root=Path.cwd())
    federate(params, paths)
    write_json(out / "clients.json", client_accuracies(params, out, data / "features", split))


def _expand(args: argparse.Namespace) -> None:
    _, settings = _load(args)
    text, path = cells_yaml_text(settings), Path(args.out or CELLS_YAML)
    if args.check:
        if not path.is_file() or path.read_text() != text:
            raise ConfigError(f"{SECTION}: {path} is out of date with {args.params}. Run "
                              f"`python -m benchmarks.personalisation expand`.")
        print(f"{path}: up to date ({len(expand(settings))} runs)")
        return
    write_text(path, text)
    print(f"{path}: {len(expand(settings))} runs")


def _plan(args: argparse.Namespace) -> None:
    _, settings = _load(args)
    seeds = cell_seeds(settings)
    for (dataset, method, scenario), n in seeds.items():
        if n > int(settings.get("seeds", 1)):
            print(f"{dataset:6} {method:15} {scenario:16} {n} seeds")
    plan = planned_seconds(settings)
    print(f"{plan['cells']} cells ({plan['claim_cells']} read by claims), {plan['runs']} runs, "
          f"planned {plan['hours']:.2f} h")


# --------------------------------------------------------------------------------------------------- table
#: {run: {"metrics": metrics.json, "clients": clients.json or None}} for the finished runs.
Results = dict[Run, dict[str, Any]]


def collect(cells: Path, runs: Iterable[Run]) -> Results:
    """The finished runs among ``runs`` (``metrics.json`` present), each with its ``clients.json`` if written.

    Only the listed runs are read: a result folder of a cell or seed no longer in the matrix is never read.
    """
    found: Results = {}
    for run in runs:
        folder = run.folder(cells)
        if (folder / "metrics.json").is_file():
            clients = folder / "clients.json"
            found[run] = {"metrics": read_json(folder / "metrics.json"),
                          "clients": read_json(clients) if clients.is_file() else None}
    return found


def measure(results: Results, run: Run, key: str) -> float | None:
    """One measure (:data:`MEASURES`) of one run; None when the run (or what the measure needs) is missing."""
    found = results.get(run)
    if found is None:
        return None
    metrics, clients = found["metrics"], found["clients"]
    value: Any = None
    if key == "personalised":
        value = metrics.get("personalised_accuracy_mean")
    elif key == "global":
        value = metrics.get("global_accuracy")
    elif key == "worst10":
        value = metrics.get("personalised_accuracy_worst10")
    elif key in ("benign", "poisoned") and clients is not None:
        value = clients.get(f"{key}_accuracy_mean")
    elif key == "benign_change" and clients is not None and run.scenario != CLEAN:
        clean = results.get(run._replace(scenario=CLEAN))
        if clean is not None and clean["clients"] is not None:
            value = benign_change(clients, clean["clients"])
    return None if value is None else float(value)


def cell_summary(results: Results, runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """Per measure: the per-seed values of one cell's runs (None where missing), their count, mean and sd."""
    summary = {}
    for key in MEASURES:
        values = [measure(results, r, key) for r in runs]
        done = [v for v in values if v is not None]
        row: dict[str, Any] = {"values": values, "n": len(done), "mean": None, "sd": None}
        if len(done) == 1:
            row["mean"] = done[0]
        elif done:
            row["mean"], row["sd"] = mean_sd(done)
        summary[key] = row
    return summary


def evaluate_claim(claim: Mapping[str, Any], results: Results) -> dict[str, Any]:
    """A claim's comparisons: per dataset, scenario and opponent, the paired per-seed difference and its verdict.

    Each row compares ``method`` (a) with one method of ``against`` (b) on ``metric`` over seeds
    0 .. ``seeds``-1: d_i = a_i − b_i, the mean of d and its 95% t interval (:func:`paired_t_interval`), and the
    verdict for the claim's favourable sign (:func:`verdict`). A row lacking a seed has no verdict (``not run``).
    The claim's verdict is ``holds`` when every row holds, ``does not hold`` when any does not, ``unresolved``
    otherwise, and ``not run`` while a row lacks a seed.
    """
    seeds = range(int(claim["seeds"]))
    rows = []
    for dataset in claim["datasets"]:
        for scenario in claim["scenarios"]:
            a = [measure(results, Run(dataset, claim["method"], scenario, k), claim["metric"]) for k in seeds]
            for other in claim["against"]:
                b = [measure(results, Run(dataset, other, scenario, k), claim["metric"]) for k in seeds]
                row: dict[str, Any] = {"dataset": dataset, "scenario": scenario, "method": claim["method"],
                                       "against": other, "a": a, "b": b, "n": len(a)}
                if any(v is None for v in a + b):
                    row.update(mean_diff=None, low=None, high=None, verdict="not run",
                               done=sum(1 for x, y in zip(a, b, strict=True) if x is not None and y is not None))
                else:
                    interval = paired_t_interval(a, b, CONFIDENCE)  # type: ignore[arg-type]
                    row.update(mean_diff=interval.mean_diff, low=interval.low, high=interval.high,
                               verdict=verdict(interval.low, interval.high, claim["favourable"]))
                rows.append(row)
    verdicts = [r["verdict"] for r in rows]
    overall = ("not run" if "not run" in verdicts else "does not hold" if "does not hold" in verdicts
               else "holds" if verdicts and all(v == "holds" for v in verdicts) else "unresolved")
    return {**{k: claim[k] for k in ("id", "claim", "metric", "favourable", "seeds")}, "verdict": overall,
            "rows": rows}


def _fmt(row: Mapping[str, Any]) -> str:
    if row["n"] == 0:
        return "not run"
    done = f"{row['n']}" if row["n"] == len(row["values"]) else f"{row['n']}/{len(row['values'])}"
    if row["sd"] is None:
        return f"{row['mean']:.3f}" + ("" if row["n"] == len(row["values"]) else f" ({done})")
    return f"{format_pm(row['mean'], row['sd'])} ({done})"


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def claims_markdown(claims: Sequence[Mapping[str, Any]]) -> str:
    """The claims: per claim its statement and verdict, then one row per comparison."""
    lines = ["## Claims", "",
             f"Per comparison: the mean over seeds of the paired per-seed difference (claim's method − the other, "
             f"same seed: same partition, poisoned clients and initial models), its {CONFIDENCE:.0%} t interval, "
             "and the verdict: *holds* (interval on the claim's side of 0), *does not hold* (on the other side), "
             "*unresolved* (contains 0). A claim holds when every comparison holds.", ""]
    for claim in claims:
        sign = "greater" if claim["favourable"] == "positive" else "smaller"
        lines += [f"**{claim['id']}**: {claim['claim']} — **{claim['verdict']}**", "",
                  f"Measure: {MEASURES[claim['metric']]} (`{claim['metric']}`; favourable: the claim's method "
                  f"{sign}); {claim['seeds']} seeds.", "",
                  "| dataset | scenario | comparison | mean diff | 95% interval | verdict |",
                  "|---|---|---|---|---|---|"]
        for row in claim["rows"]:
            pair = f"{row['method']} − {row['against']}"
            if row["mean_diff"] is None:
                lines.append(f"| {row['dataset']} | {row['scenario']} | {pair} | — | — | "
                             f"not run ({row['done']}/{row['n']} seeds) |")
            else:
                lines.append(f"| {row['dataset']} | {row['scenario']} | {pair} | {_signed(row['mean_diff'])} | "
                             f"[{_signed(row['low'])}, {_signed(row['high'])}] | {row['verdict']} |")
        lines.append("")
    return "\n".join(lines)


TABLES = (("personalised", "Personalised accuracy, all clients"),
          ("benign", "Personalised accuracy, benign clients (change against the same clients clean)"),
          ("poisoned", "Personalised accuracy, poisoned clients"),
          ("global", "Shared (global) model's test accuracy"))


def markdown_tables(summaries: Mapping[tuple[str, str, str], Mapping[str, Any]], settings: Mapping[str, Any]) -> str:
    """Per dataset, one table per measure of :data:`TABLES`: rows methods, columns scenarios."""
    methods, scenarios = settings.get("method_names") or [], settings.get("scenarios") or []
    parts = ["Each entry: mean ± sd over the cell's seeds (seeds done in parentheses; one seed: its value); "
             "— where undefined (no poisoned client in a clean run)."]
    for dataset in settings.get("dataset_names") or []:
        parts.append(f"## {dataset}")
        for key, title in TABLES:
            lines = [f"**{title}**", "", "| method | " + " | ".join(scenarios) + " |",
                     "|---|" + "---|" * len(scenarios)]
            for method in methods:
                texts = []
                for scenario in scenarios:
                    row = summaries[(dataset, method, scenario)][key]
                    if key == "poisoned" and scenario == CLEAN:
                        texts.append("—")
                        continue
                    text = _fmt(row)
                    change = summaries[(dataset, method, scenario)]["benign_change"]
                    if key == "benign" and scenario != CLEAN and change["n"]:
                        text += f"<br>Δ {_signed(change['mean'])}" + ("" if change["sd"] is None
                                                                      else f" ± {change['sd']:.3f}")
                    texts.append(text)
                lines.append(f"| {method} | " + " | ".join(texts) + " |")
            parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def plot_comparison(summaries: Mapping[tuple[str, str, str], Mapping[str, Any]], settings: Mapping[str, Any],
                    path: Path) -> None:
    """Per dataset, grouped bars of the benign clients' mean accuracy with its sd (x: scenario, a bar per method);
    the reference method's global test accuracy dashed."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    datasets, methods = settings.get("dataset_names") or [], settings.get("method_names") or []
    scenarios = settings.get("scenarios") or []
    fig, axes = plt.subplots(len(datasets), 1, figsize=(max(7.0, 1.8 * len(scenarios) + 3.5), 3.4 * len(datasets)),
                             dpi=110, squeeze=False)
    width = 0.8 / max(1, len(methods))
    colours = plt.get_cmap("tab10")
    for ax, dataset in zip(axes[:, 0], datasets, strict=True):
        for i, method in enumerate(methods):
            rows = [summaries[(dataset, method, s)]["benign"] for s in scenarios]
            xs = [j - 0.4 + width * (i + 0.5) for j in range(len(scenarios))]
            heights = [math.nan if r["mean"] is None else r["mean"] for r in rows]
            errors = [0.0 if r["sd"] is None else r["sd"] for r in rows]
            ax.bar(xs, heights, width * 0.92, yerr=errors, capsize=2, label=method, color=colours(i % 10))
            for x, r in zip(xs, rows, strict=True):
                if r["mean"] is None:
                    ax.text(x, 0.02, "not run", ha="center", va="bottom", rotation=90, fontsize=7, color="grey")
        for j, scenario in enumerate(scenarios):
            g = summaries.get((dataset, REFERENCE, scenario), {}).get("global", {}).get("mean")
            if g is not None:
                ax.hlines(g, j - 0.45, j + 0.45, colors="black", linestyles="dashed", linewidth=1.4)
        ax.set_xticks(range(len(scenarios)), scenarios)
        ax.set_xlim(-0.5, len(scenarios) - 0.5)
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("benign clients' accuracy")
        ax.set_title(dataset)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        if ax is axes[0, 0]:
            handles, labels = ax.get_legend_handles_labels()
            handles.append(Line2D([], [], color="black", linestyle="dashed", linewidth=1.4))
            labels.append(f"{REFERENCE} global\n(test accuracy)")
            ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle("Personalised accuracy of the benign clients (mean ± sd over seeds)")
    save_figure(fig, path)


def build_table(settings: Mapping[str, Any], cells: Path) -> dict[str, Any]:
    """Everything the table shows, from the current matrix's runs: per-cell summaries and the claims."""
    runs = expand(settings)
    results = collect(cells, runs)
    by_cell: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        by_cell.setdefault((run.dataset, run.method, run.scenario), []).append(run)
    summaries = {cell: cell_summary(results, cell_runs) for cell, cell_runs in by_cell.items()}
    claims = [evaluate_claim(claim, results) for claim in settings.get("claims") or []]
    return {"runs": len(runs), "finished": len(results), "summaries": summaries, "claims": claims}


def _table(args: argparse.Namespace) -> None:
    _, settings = _load(args)
    table = build_table(settings, Path(args.cells))
    out = Path(args.out)
    head = (f"# Personalisation matrix\n\n{table['finished']} of {table['runs']} runs (cell × seed) finished.\n\n")
    text = head + claims_markdown(table["claims"]) + "\n" + markdown_tables(table["summaries"], settings)
    write_text(out / "table.md", text)
    write_json(out / "table.json", {
        "runs": table["runs"], "finished": table["finished"], "claims": table["claims"],
        "cells": [{"dataset": d, "method": m, "scenario": s, **summary}
                  for (d, m, s), summary in table["summaries"].items()]})
    plot_comparison(table["summaries"], settings, out / "comparison.png")
    print(text)


# --------------------------------------------------------------------------------------------------- entry point
def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("command", choices=["data", "partition", "cell", "table", "expand", "plan"])
    p.add_argument("--dataset")
    p.add_argument("--method")
    p.add_argument("--scenario")
    p.add_argument("--seed", type=int, help="partition/cell: the seed (sets every key of seed_keys)")
    p.add_argument("--out", type=Path, help="data: DIR (default CELLS/D/data); partition: DIR (default "
                                            "CELLS/D/partition/sK); cell: DIR (default CELLS/D/M/S/sK); table: "
                                            f"FOLDER (default .); expand: FILE (default {CELLS_YAML})")
    p.add_argument("--cells", type=Path, default=CELLS, help=f"results root (default {CELLS})")
    p.add_argument("--data", type=Path, help="partition/cell: the dataset's data folder (default CELLS/D/data)")
    p.add_argument("--partition", type=Path, help="cell: the seed's partition folder (default CELLS/D/partition/sK)")
    p.add_argument("--downloads", type=Path, default=DOWNLOADS,
                   help="data: archive cache (default: the project's data/downloads)")
    p.add_argument("--check", action="store_true", help=f"expand: exit 1 when {CELLS_YAML} is out of date")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="data/partition/cell: override applied last (value read as YAML); repeatable")


def _main(args: argparse.Namespace) -> None:
    if args.command == "table" and args.out is None:
        args.out = Path(".")
    run_command(SECTION, args, {"data": ["dataset"], "partition": ["dataset", "seed"],
                                "cell": ["dataset", "method", "scenario", "seed"]},
                {"data": _data, "partition": _partition, "cell": _cell, "table": _table, "expand": _expand,
                 "plan": _plan})


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m benchmarks.personalisation``)."""
    return stage.entry(__doc__ or "", _arguments, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
