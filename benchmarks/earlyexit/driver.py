"""Early-exit matrix: accuracy at each exit and client compute of each plan, from a pretrained or random encoder.

Run from ``benchmarks/earlyexit/`` (a DVC project of its own: ``dvc repro`` there runs the matrix). Settings:
``params.yaml`` there: the project sections the stages read and ``eebench``: overrides applied on top of the
project sections in this order: ``common``, the init's, the variant's, ``--set``.

``python -m benchmarks.earlyexit data``: FSDD download, features (``results/downstream/fsdd``) and partition.
``python -m benchmarks.earlyexit pretrain``: federated SimCLR of the encoder on the same clients (labels unused),
every round scored by kNN on the digits; writes ``results/pretrain/model.safetensors`` (the encoder the ``ssl``
init loads).
``python -m benchmarks.earlyexit cell --variant V --init I``: the earlyexit stage, ``results/cells/I/V/``.
``python -m benchmarks.earlyexit table``: ``table.md``, ``table.json``, ``tradeoff.png``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.benchlib import (
    add_arguments,
    apply_overrides,
    bench_settings,
    named_overrides,
    parse_sets,
    read_matrix_params,
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


def settings_of(bench: Mapping[str, Any]) -> dict[str, Any]:
    """The ``eebench`` section, checked: every listed variant and init has its overrides."""
    return bench_settings(bench, SECTION, [("variant_names", "variants"), ("init_names", "inits")])


def cell_params(raw: Mapping[str, Any], settings: Mapping[str, Any], variant: str, init: str,
                extra: Mapping[str, Any] | None = None) -> Params:
    """Project params with the common, init and variant overrides (and the cell's registry name), then ``extra``."""
    layers = [settings.get("common") or {}, named_overrides(settings, SECTION, "inits", init),
              named_overrides(settings, SECTION, "variants", variant),
              {"earlyexit.registered_model": f"ee-{init}-{variant}"}, extra or {}]
    return load_params(apply_overrides(raw, *layers))


def _load(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    raw, bench = read_matrix_params(args.params, SECTION)
    return raw, settings_of(bench)


def _data(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    params = load_params(apply_overrides(raw, settings.get("common") or {}, parse_sets(args.set)))
    root = Path(args.results)
    download(params.download, root / "raw", Path(args.downloads))
    features(params.features, root / "raw", root / "downstream" / "fsdd")
    partition(params.partition, root / "downstream" / "fsdd", root / "partition")


def _pretrain(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    params = load_params(apply_overrides(raw, settings.get("common") or {}, settings.get("pretrain") or {},
                                         parse_sets(args.set)))
    root = Path(args.results)
    out = root / "pretrain"
    federate(params, FederatePaths(features=root / "downstream" / "fsdd",
                                   partition=root / "partition" / "partition.json", poison=out / "no-poison",
                                   checkpoints=out / "checkpoints", model=out / "model.safetensors",
                                   metrics=out / "metrics.json", plots=out, root=Path.cwd(),
                                   downstream=root / "downstream"))


def cell_folder(results: Path, init: str, variant: str) -> Path:
    """``results/cells/<init>/<variant>``."""
    return Path(results) / "cells" / init / variant


def _cell(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    params = cell_params(raw, settings, args.variant, args.init, parse_sets(args.set))
    root, out = Path(args.results), cell_folder(args.results, args.init, args.variant)
    earlyexit(params, EarlyExitPaths(features=root / "downstream" / "fsdd",
                                     partition=root / "partition" / "partition.json",
                                     checkpoints=out / "checkpoints", model=out / "model.safetensors",
                                     metrics=out / "metrics.json", plots=out, root=Path.cwd()))


# --------------------------------------------------------------------------------------------------- table
def collect(results: Path) -> list[dict[str, Any]]:
    """One row per finished cell, with compute saved and accuracy lost against the same init's ``full`` cell."""
    cells = {(p.parent.parent.name, p.parent.name): read_json(p)
             for p in sorted((Path(results) / "cells").glob("*/*/metrics.json"))}
    rows = []
    for (init, variant), metrics in sorted(cells.items()):
        exits = sorted(int(k[4:-9]) for k in metrics if k.startswith("exit") and k.endswith("_accuracy"))
        reference = cells.get((init, REFERENCE))
        row: dict[str, Any] = {
            "init": init, "variant": variant, "plan": metrics["plan"], "weighting": metrics["weighting"],
            **{f"exit{e}": metrics[f"exit{e}_accuracy"] for e in exits},
            "final": metrics["final_exit_accuracy"],
            "val_final": metrics.get(f"val_exit{exits[-1]}_accuracy"),
            "client_gflops": _client_gflops(metrics),
            "bytes_up": metrics["bytes_up_total"],
        }
        if reference is not None:
            full = _client_gflops(reference)
            row["compute_saved"] = 1.0 - row["client_gflops"] / full if full else None
            row["accuracy_lost"] = reference["final_exit_accuracy"] - row["final"]
        rows.append(row)
    return rows


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


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{100 * value:+.1f}%" if pct else f"{value:.3f}"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per cell: accuracy at each exit, client compute, compute saved and accuracy lost against ``full``."""
    exits = sorted({int(k[4:]) for r in rows for k in r if k.startswith("exit")})
    head = ("| init | variant | " + " | ".join(f"exit {e}" for e in exits)
            + " | GFLOPs / client / round | compute saved vs full | final-exit accuracy lost vs full |")
    lines = [head, "|---|---|" + "---|" * (len(exits) + 3)]
    for row in rows:
        lost = row.get("accuracy_lost")
        lines.append(f"| {row['init']} | {row['variant']} | " + " | ".join(_fmt(row.get(f"exit{e}")) for e in exits)
                     + f" | {row['client_gflops']:.3f} | {_fmt(row.get('compute_saved'), pct=True)} | "
                     + ("—" if lost is None else f"{100 * lost:+.1f} pts") + " |")
    return "\n".join(lines) + "\n"


def plot_tradeoff(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Final-exit test accuracy against average client compute, one point per cell."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for init, marker in (("ssl", "o"), ("random", "s")):
        for row in (r for r in rows if r["init"] == init):
            ax.scatter(row["client_gflops"], row["final"], marker=marker)
            ax.annotate(f"{init}/{row['variant']}", (row["client_gflops"], row["final"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("training GFLOPs per client per round (all clients)")
    ax.set_ylabel("final-exit test accuracy")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _table(args: argparse.Namespace) -> None:
    rows = collect(args.results)
    write_table(SECTION, rows, Path(args.out), markdown_table(rows) if rows else "", plot_tradeoff, "tradeoff.png")


def _arguments(p: argparse.ArgumentParser) -> None:
    add_arguments(p, ["data", "pretrain", "cell", "table"], RESULTS)
    p.add_argument("--variant")
    p.add_argument("--init", default="ssl")


def _main(args: argparse.Namespace) -> None:
    if args.command == "cell" and args.variant is None:
        raise ConfigError(f"{SECTION}: 'cell' needs --variant.")
    {"data": _data, "pretrain": _pretrain, "cell": _cell, "table": _table}[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m benchmarks.earlyexit``)."""
    return stage.entry(__doc__ or "", _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
