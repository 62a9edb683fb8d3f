"""Early-exit matrix: accuracy at each exit and client compute of each plan over seeds, from a pretrained encoder.

Run from ``benchmarks/earlyexit/`` (a DVC project of its own: ``dvc repro`` there runs the matrix). Settings:
``params.yaml`` there: the project sections the stages read and ``eebench``: overrides applied on top of the
project sections in this order: ``common``, the init's, the variant's, the seed's (:func:`seed_overrides`), ``--set``.

Cells. The claim cells (``variant_names``: the plans ``early_exit``, ``full``, ``drop_weak``) run every seed of
``seeds`` from the ``ssl`` init; ``context_names`` (ablations, e.g. one norm shared by every exit) run the seeds of
``context_seeds``; the random-init floor runs ``full`` once, at ``pretrain_seed``. A seed s sets the partition,
the initial weights of what the pretrained encoder does not cover (exit heads, norms), every client's batch order
and the tier assignment: ``partition.seed = federation.seed = earlyexit.seed = s``. The pretrained encoder is one
(federated SimCLR on the clients of ``pretrain_seed``'s partition, labels unused): the claims compare plans from it.

``python -m benchmarks.earlyexit data``: FSDD download and features (``results/downstream/fsdd``).
``python -m benchmarks.earlyexit partition --seed S``: the partition of seed S (``results/partition/seedS``).
``python -m benchmarks.earlyexit pretrain``: federated SimCLR of the encoder on the clients of ``pretrain_seed``,
every round scored by kNN on the digits; writes ``results/pretrain/model.safetensors`` (the encoder the ``ssl``
init loads).
``python -m benchmarks.earlyexit cell --variant V --init I --seed S``: the earlyexit stage, writing
``results/cells/I/V/seedS/``.
``python -m benchmarks.earlyexit table``: ``table.md``, ``table.json``, ``tradeoff.png`` from the cells the params
name (never a directory listing): mean ± sd over seeds of the exits' accuracy, the client compute per round and to
the stop (the validation plateau), and the claims (paired per-seed differences, 95% t-interval, verdict).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.benchlib import (
    add_arguments,
    apply_overrides,
    bench_settings,
    claim_part,
    claim_verdicts,
    format_pm,
    interval_text,
    mean_sd,
    named_overrides,
    parse_sets,
    read_matrix_params,
    run_command,
    seed_problems,
    write_table,
)
from fedcore.config import Params, load_params
from fedcore.errors import ConfigError
from flows import stage
from flows.download import download
from flows.earlyexit import EarlyExitPaths, earlyexit
from flows.features import features
from flows.federate import FederatePaths, federate
from flows.partition import partition
from tasks.common import pyplot, read_json, save_figure

SECTION = "eebench"
RESULTS = Path("results")
#: The variant every other is compared with (compute saved, accuracy lost).
REFERENCE = "full"
#: The init of the claim and context cells; the floor runs ``full`` from ``random`` once.
CLAIM_INIT, FLOOR = "ssl", ("random", "full")
#: What a claim may compare, per seed: ``final`` (final-exit test accuracy, d = a − b), ``compute_saved`` (client
#: GFLOPs per round, d = 1 − a / b), ``total_compute_saved`` (client GFLOPs to the stop, d = 1 − a / b).
CLAIM_METRICS = ("final", "compute_saved", "total_compute_saved")
#: An accuracy claim whose mean difference is under this (2 points) needs 5 seeds (issue 21).


@dataclass(frozen=True)
class Cell:
    """One run of the matrix: a variant (plan) from an init, at a seed."""

    init: str
    variant: str
    seed: int


def settings_of(bench: Mapping[str, Any]) -> dict[str, Any]:
    """The ``eebench`` section, checked: variants and inits have overrides, seeds, claims (one error)."""
    settings = bench_settings(bench, SECTION, [("variant_names", "variants"), ("context_names", "variants"),
                                               ("init_names", "inits")])
    problems = []
    problems += seed_problems(settings, SECTION)
    if settings.get("pretrain_seed") not in (settings.get("seeds") or []):
        problems.append(f"{SECTION}: 'pretrain_seed' must be one of 'seeds' (its partition is built there). Got "
                        f"{settings.get('pretrain_seed')!r}.")
    variants = settings.get("variant_names") or []
    if REFERENCE not in variants:
        problems.append(f"{SECTION}: 'variant_names' must hold {REFERENCE!r} (the reference of compute saved).")
    if both := sorted(set(variants) & set(settings.get("context_names") or [])):
        problems.append(f"{SECTION}: a variant is a claim cell or a context cell, not both. Got {both} in both.")
    for i, claim in enumerate(settings.get("claims") or []):
        where = f"{SECTION}: claims[{i}]"
        if not isinstance(claim, Mapping) or not {"claim", "a", "b", "metric"} <= set(claim):
            problems.append(f"{where} must be a mapping with claim, a, b, metric (margin optional). Got {claim!r}.")
            continue
        if bad := [claim[k] for k in ("a", "b") if claim[k] not in variants]:
            problems.append(f"{where}: a and b must be claim cells ('variant_names', which run every seed). Got "
                            f"{bad}.")
        if claim["metric"] not in CLAIM_METRICS:
            problems.append(f"{where}: 'metric' must be one of {list(CLAIM_METRICS)}. Got {claim['metric']!r}.")
    if problems:
        raise ConfigError(problems)
    return settings


def seed_overrides(seed: int) -> dict[str, int]:
    """What a seed sets: the partition, the initial weights and batch orders, the tier assignment."""
    return {"partition.seed": seed, "federation.seed": seed, "earlyexit.seed": seed}


def cell_params(raw: Mapping[str, Any], settings: Mapping[str, Any], variant: str, init: str, seed: int = 0,
                extra: Mapping[str, Any] | None = None) -> Params:
    """Project params: common, init, variant and seed overrides (and the cell's registry name), then ``extra``."""
    layers = [settings.get("common") or {}, named_overrides(settings, SECTION, "inits", init),
              named_overrides(settings, SECTION, "variants", variant),
              {"earlyexit.registered_model": f"ee-{init}-{variant}-seed{seed}"}, seed_overrides(seed), extra or {}]
    return load_params(apply_overrides(raw, *layers))


def cell_folder(results: Path, init: str, variant: str, seed: int = 0) -> Path:
    """``results/cells/<init>/<variant>/seed<seed>``."""
    return Path(results) / "cells" / init / variant / f"seed{seed}"


def partition_file(results: Path, seed: int) -> Path:
    """``results/partition/seed<seed>/partition.json``: the clients of seed ``seed``."""
    return Path(results) / "partition" / f"seed{seed}" / "partition.json"


def planned_cells(settings: Mapping[str, Any]) -> list[Cell]:
    """Every cell of the matrix (dvc.yaml's stages): claim cells × ``seeds`` for every init of ``init_names``,
    context cells × ``context_seeds``, and the random-init floor at ``pretrain_seed``."""
    seeds = list(settings.get("seeds") or [])
    cells = [Cell(i, v, s) for i in settings.get("init_names") or [] for v in settings.get("variant_names") or []
             for s in seeds]
    cells += [Cell(CLAIM_INIT, v, s) for v in settings.get("context_names") or []
              for s in settings.get("context_seeds") or []]
    return [*cells, Cell(*FLOOR, int(settings.get("pretrain_seed") or 0))]


def _load(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    raw, bench = read_matrix_params(args.params, SECTION)
    return raw, settings_of(bench)


def _data(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    params = load_params(apply_overrides(raw, settings.get("common") or {}, parse_sets(args.set)))
    root = Path(args.results)
    download(params.download, root / "raw", Path(args.downloads))
    features(params.features, root / "raw", root / "downstream" / "fsdd")


def _partition(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    params = load_params(apply_overrides(raw, settings.get("common") or {}, seed_overrides(args.seed),
                                         parse_sets(args.set)))
    root = Path(args.results)
    partition(params.partition, root / "downstream" / "fsdd", partition_file(root, args.seed).parent)


def _pretrain(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    seed = int(settings["pretrain_seed"])
    params = load_params(apply_overrides(raw, settings.get("common") or {}, settings.get("pretrain") or {},
                                         seed_overrides(seed), parse_sets(args.set)))
    root = Path(args.results)
    out = root / "pretrain"
    federate(params, FederatePaths(features=root / "downstream" / "fsdd", partition=partition_file(root, seed),
                                   poison=out / "no-poison", checkpoints=out / "checkpoints",
                                   model=out / "model.safetensors", metrics=out / "metrics.json", plots=out,
                                   root=Path.cwd(), downstream=root / "downstream"))


def _cell(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    params = cell_params(raw, settings, args.variant, args.init, args.seed, parse_sets(args.set))
    root, out = Path(args.results), cell_folder(args.results, args.init, args.variant, args.seed)
    earlyexit(params, EarlyExitPaths(features=root / "downstream" / "fsdd",
                                     partition=partition_file(root, args.seed),
                                     checkpoints=out / "checkpoints", model=out / "model.safetensors",
                                     metrics=out / "metrics.json", plots=out, root=Path.cwd()))


# --------------------------------------------------------------------------------------------------- table
def collect(results: Path, settings: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per finished cell of :func:`planned_cells` (the params', never a directory listing), with compute
    saved and accuracy lost against the same init and seed's ``full`` cell; and the planned cells not finished."""
    cells, missing = {}, []
    for cell in planned_cells(settings):
        path = cell_folder(results, cell.init, cell.variant, cell.seed) / "metrics.json"
        if path.is_file():
            cells[cell] = read_json(path)
        else:
            missing.append(str(path.parent))
    rows = []
    for cell, metrics in cells.items():
        exits = sorted(int(k[4:-9]) for k in metrics if k.startswith("exit") and k.endswith("_accuracy"))
        gflops = _client_gflops(metrics)
        row: dict[str, Any] = {
            "init": cell.init, "variant": cell.variant, "seed": cell.seed, "plan": metrics["plan"],
            "weighting": metrics["weighting"],
            **{f"exit{e}": metrics[f"exit{e}_accuracy"] for e in exits},
            "final": metrics["final_exit_accuracy"],
            "val_final": metrics.get(f"val_exit{exits[-1]}_accuracy"),
            "client_gflops": gflops,
            "rounds": metrics["rounds"], "stop_reason": metrics.get("stop_reason"),
            "total_gflops": gflops * metrics["rounds"],  # per client, every round to the stop
            "bytes_up": metrics["bytes_up_total"],
        }
        reference = cells.get(Cell(cell.init, REFERENCE, cell.seed))
        if reference is not None:
            full = _client_gflops(reference)
            row["compute_saved"] = 1.0 - gflops / full if full else None
            full_total = full * reference["rounds"]
            row["total_compute_saved"] = 1.0 - row["total_gflops"] / full_total if full_total else None
            row["accuracy_lost"] = reference["final_exit_accuracy"] - row["final"]
        rows.append(row)
    return rows, missing


def _client_gflops(metrics: Mapping[str, Any]) -> float:
    """Average training GFLOPs per client per round over *every* client (those that sit out spend 0).

    Each tier's mean per round, weighted by the tier's share of the clients.
    """
    tiers = list(metrics["client_tiers"])
    depths = list(metrics["client_depths"])
    total = 0.0
    for tier in sorted(set(tiers)):
        members = [d for t, d in zip(tiers, depths, strict=True) if t == tier]
        if members and members[0] is not None:
            total += len(members) * float(metrics.get(f"tier{tier}_gflops_per_round", 0.0))
    return total / len(tiers)


def seed_differences(rows: Sequence[Mapping[str, Any]], a: str, b: str, metric: str,
                     init: str = CLAIM_INIT) -> dict[int, float]:
    """``{seed: d}`` on the seeds both variants ran: ``final``: a − b; the compute metrics: 1 − a / b."""
    by = {(r["variant"], r["seed"]): r for r in rows if r["init"] == init}
    out = {}
    for (variant, seed), row in by.items():
        if variant != a or (other := by.get((b, seed))) is None:
            continue
        if metric == "final":
            out[seed] = float(row["final"]) - float(other["final"])
        else:
            key = "client_gflops" if metric == "compute_saved" else "total_gflops"
            out[seed] = 1.0 - float(row[key]) / float(other[key])
    return out


def claims(rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per part of ``settings['claims']``."""
    return [{"claim": spec["claim"], "a": spec["a"], "b": spec["b"], "metric": spec["metric"],
             **claim_part(seed_differences(rows, spec["a"], spec["b"], spec["metric"]),
                          float(spec.get("margin", 0.0)), accuracy=spec["metric"] == "final")}
            for spec in settings.get("claims") or []]


#: Columns of the summary table: the row key, its header, and whether it is a share shown in percent.
SUMMARY = (("final", "final-exit accuracy", False), ("client_gflops", "GFLOPs / client / round", False),
           ("rounds", "rounds to the stop", False), ("total_gflops", "GFLOPs / client to the stop", False),
           ("compute_saved", "compute saved / round vs full", True),
           ("total_compute_saved", "compute saved to the stop vs full", True),
           ("accuracy_lost", "final-exit accuracy lost vs full", True))


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (init, variant): the seeds and ``(mean, sd or None)`` of every exit and every :data:`SUMMARY` column."""
    out = []
    for init, variant in dict.fromkeys((r["init"], r["variant"]) for r in rows):
        group = [r for r in rows if r["init"] == init and r["variant"] == variant]
        keys = [k for k in group[0] if k.startswith("exit") and k[4:].isdigit()] + [k for k, _, _ in SUMMARY]
        entry: dict[str, Any] = {"init": init, "variant": variant, "seeds": [r["seed"] for r in group]}
        for key in keys:
            values = [float(r[key]) for r in group if r.get(key) is not None]
            entry[key] = None if not values else (mean_sd(values) if len(values) > 1 else (values[0], None))
        out.append(entry)
    return out


def _pm(value: tuple[float, float | None] | None, pct: bool = False) -> str:
    if value is None or math.isnan(value[0]):
        return "—"
    mean, sd = value
    if pct:
        return f"{100 * mean:+.1f}%" + ("" if sd is None else f" ± {100 * sd:.1f}")
    return f"{mean:.3f}" if sd is None else format_pm(mean, sd)


def markdown_table(rows: Sequence[Mapping[str, Any]], claim_rows: Sequence[Mapping[str, Any]] = (),
                   missing: Sequence[str] = ()) -> str:
    """Per cell, mean ± sd over seeds: accuracy at each exit, client compute per round and to the stop, compute
    saved and accuracy lost against ``full``; then the claims."""
    summary = summarise(rows)
    exits = sorted({int(k[4:]) for r in rows for k in r if k.startswith("exit") and k[4:].isdigit()})
    head = ("| init | variant | seeds | " + " | ".join(f"exit {e}" for e in exits) + " | "
            + " | ".join(h for _, h, _ in SUMMARY) + " |")
    lines = ["Mean ± sd over seeds (compute: training GFLOPs per client, every client counted, those that sit out "
             "at 0; the stop: the validation plateau, at most federation.rounds):", "", head,
             "|---|---|---|" + "---|" * (len(exits) + len(SUMMARY))]
    for entry in summary:
        lines.append(f"| {entry['init']} | {entry['variant']} | {len(entry['seeds'])} | "
                     + " | ".join(_pm(entry.get(f"exit{e}")) for e in exits) + " | "
                     + " | ".join(_pm(entry.get(k), pct) for k, _, pct in SUMMARY) + " |")
    if claim_rows:
        lines += ["", "Claims: mean per-seed difference d (final: a − b; compute: 1 − a/b), 95% t-interval; holds "
                  "when the interval lies above the margin, does not hold when below, unresolved when it contains "
                  "it:", "", "| claim | a vs b | metric | margin | seeds | mean d | 95% interval | verdict | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in claim_rows:
            diff, interval = interval_text(c)
            lines.append(f"| {c['claim']} | {c['a']} vs {c['b']} | {c['metric']} | {c['margin']:+g} | {c['n']} | "
                         f"{diff} | {interval} | {c['verdict']} | {c.get('note', '')} |")
        lines += ["", *claim_verdicts(claim_rows)]
    if missing:
        lines += ["", f"Not finished ({len(missing)} of the planned cells): " + ", ".join(missing)]
    return "\n".join(lines) + "\n"


def plot_tradeoff(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Final-exit test accuracy against client compute per round, mean ± sd over seeds, one point per cell."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for entry in summarise(rows):
        (x, xs), (y, ys) = entry["client_gflops"], entry["final"]
        marker = "o" if entry["init"] == CLAIM_INIT else "s"
        ax.errorbar(x, y, xerr=xs or 0.0, yerr=ys or 0.0, fmt=marker, capsize=3)
        ax.annotate(f"{entry['init']}/{entry['variant']}", (x, y), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("training GFLOPs per client per round (all clients)")
    ax.set_ylabel("final-exit test accuracy (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _table(args: argparse.Namespace) -> None:
    _, settings = _load(args)
    rows, missing = collect(args.results, settings)
    claim_rows = claims(rows, settings)
    write_table(SECTION, rows, Path(args.out), markdown_table(rows, claim_rows, missing) if rows else "",
                plot_tradeoff, "tradeoff.png", extra={"claims": claim_rows, "missing": missing})


def _arguments(p: argparse.ArgumentParser) -> None:
    add_arguments(p, ["data", "partition", "pretrain", "cell", "table"], RESULTS)
    p.add_argument("--variant")
    p.add_argument("--init", default=CLAIM_INIT)
    p.add_argument("--seed", type=int, help="the seed of the cell (partition, initial weights, tier assignment)")


def _main(args: argparse.Namespace) -> None:
    run_command(SECTION, args, {"partition": ["seed"], "cell": ["variant", "seed"]},
                {"data": _data, "partition": _partition, "pretrain": _pretrain, "cell": _cell, "table": _table})


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m benchmarks.earlyexit``)."""
    return stage.entry(__doc__ or "", _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
