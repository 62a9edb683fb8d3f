"""ModalityMirror matrix: audio-only and audio-visual test accuracy of each AV method over missing-video rates.

Run from ``benchmarks/modality/`` (a DVC project of its own: ``dvc repro`` there runs the matrix). Settings:
``params.yaml`` there: the project sections the stages read and ``avbench``: the rates, the methods and
``section.key: value`` overrides applied on top of the project sections: ``common``, then the method's, then the
rate (``modality.missing_rate``), then ``--set`` (repeatable, for quick runs).

``python -m benchmarks.modality data`` downloads the spoken digits, writes their feature store, the visual store
(each clip paired with a handwritten digit image of its class) and the partition, under ``results/``.

``python -m benchmarks.modality cell --method M --rate R`` runs the modality stage, writing ``results/cells/M/R/``:
metrics.json, rounds.tsv, rounds.png; the AV model and its audio branch are registered as ``av-M-R@final`` and
``av-M-R-audio@final``. UniFL's training never reads video, so its one cell (``--rate`` omitted) stands for every
rate.

``python -m benchmarks.modality distill --method modality_mirror --rate R`` runs the distill stage on that cell: the
registered AV teacher into its registered audio branch, on the clients with video (``distill.json``,
``distill/``), with the ``distill`` overrides of the matrix settings on top; the table then reports the distilled
student as the method's audio-only model.

``python -m benchmarks.modality table`` writes ``table.md``, ``table.json`` and ``accuracy.png``.
"""

from __future__ import annotations

import argparse
import json
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
from flows.av import pair_av
from flows.distill import DistillPaths, distill
from flows.download import download
from flows.features import features
from flows.modality import ModalityPaths, modality
from flows.partition import partition
from tasks.common import pyplot, read_json, save_figure

SECTION = "avbench"
RESULTS = Path("results")
#: The rate folder of cells that do not depend on the missing-video rate (UniFL).
ANY_RATE = "any"


def settings_of(bench: Mapping[str, Any]) -> dict[str, Any]:
    """The ``avbench`` section, checked: every listed method has its overrides, rates are in [0, 1]."""
    settings = bench_settings(bench, SECTION, [("method_names", "methods"), ("rate_free", "methods")])
    rates = settings.get("rates") or []
    if bad := [r for r in rates if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1]:
        raise ConfigError(f"{SECTION}: 'rates' must be numbers in [0, 1]. Got {bad}.")
    return settings


def cell_params(raw: Mapping[str, Any], settings: Mapping[str, Any], method: str, rate: float | None,
                extra: Mapping[str, Any] | None = None) -> Params:
    """Project params with the common, method and rate overrides (and per-cell registry names), then ``extra``."""
    overrides = named_overrides(settings, SECTION, "methods", method)
    name = f"av-{method}-{_rate_name(rate)}"
    names = {"modality.registered_model": name, "modality.registered_audio": f"{name}-audio",
             "distill.teacher": f"models:/{name}@final", "distill.student": f"models:/{name}-audio@final",
             "distill.registered_model": f"{name}-student"}
    layers = [settings.get("common") or {}, overrides, names,
              {} if rate is None else {"modality.missing_rate": rate}, extra or {}]
    return load_params(apply_overrides(raw, *layers))


def _rate_name(rate: float | None) -> str:
    return ANY_RATE if rate is None else f"{rate:g}"


def cell_folder(results: Path, method: str, rate: float | None) -> Path:
    """``results/cells/<method>/<rate or any>``."""
    return Path(results) / "cells" / method / _rate_name(rate)


def _load(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    raw, bench = read_matrix_params(args.params, SECTION)
    return raw, settings_of(bench)


def _data(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    params = load_params(apply_overrides(raw, settings.get("common") or {}, parse_sets(args.set)))
    root = Path(args.results)
    download(params.download, root / "raw", Path(args.downloads))
    features(params.features, root / "raw", root / "features")
    pair_av(params.modality, root / "features", root / "av")
    partition(params.partition, root / "features", root / "partition")


def _paths(args: argparse.Namespace) -> tuple[Params, Path, dict[str, Any]]:
    raw, settings = _load(args)
    rate = None if args.rate is None else float(args.rate)
    if rate is None and args.method not in (settings.get("rate_free") or []):
        raise ConfigError(f"{SECTION}: --rate is needed for {args.method!r} (only the methods of 'rate_free' "
                          "do not depend on it).")
    params = cell_params(raw, settings, args.method, rate, parse_sets(args.set))
    root = Path(args.results)
    common = {"features": root / "features", "partition": root / "partition" / "partition.json",
              "visual": root / "av", "root": Path.cwd()}
    return params, cell_folder(root, args.method, rate), common


def _cell(args: argparse.Namespace) -> None:
    params, out, common = _paths(args)
    modality(params, ModalityPaths(**common, checkpoints=out / "checkpoints", model=out / "model.safetensors",
                                   metrics=out / "metrics.json", plots=out))


def _distill(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    args.set = [f"{k}={json.dumps(v)}" for k, v in (settings.get("distill") or {}).items()] + list(args.set)
    params, out, common = _paths(args)
    distill(params, DistillPaths(**common, checkpoints=out / "distill" / "checkpoints",
                                 model=out / "distill" / "student.safetensors", metrics=out / "distill.json",
                                 plots=out / "distill"))


# --------------------------------------------------------------------------------------------------- table
def collect(results: Path) -> list[dict[str, Any]]:
    """One row per finished cell: method, rate, audio-only test accuracy as served, and the parts."""
    rows = []
    for path in sorted((Path(results) / "cells").glob("*/*/metrics.json")):
        metrics = read_json(path)
        row = {"method": path.parent.parent.name, "rate": path.parent.name,
               "audio": metrics["audio_accuracy"], "audio_branch": metrics.get("audio_branch_accuracy"),
               "av": metrics.get("av_accuracy"), "zero_video": metrics.get("zero_video_accuracy"),
               "video_clients": len(metrics.get("video_clients", [])), "rounds": metrics["rounds"]}
        distilled = path.parent / "distill.json"
        if distilled.is_file():  # the distilled student serves the audio-only clients; phase 1 alone beside it
            rows.append({**row, "method": f"{row['method']} (phase 1 only)", "av": None, "zero_video": None})
            student = read_json(distilled)
            row.update(audio=student["audio_accuracy"], rounds=metrics["rounds"] + student["rounds"])
        rows.append(row)
    return rows


def _fmt(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def pivot(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[str], dict[str, dict[str, float | None]]]:
    """Rates (sorted numerically; ``any`` rows spread over every rate) and ``{method: {rate: value}}``."""
    rates = sorted({r["rate"] for r in rows if r["rate"] != ANY_RATE}, key=float)
    table: dict[str, dict[str, float | None]] = {}
    for row in rows:
        for rate in (rates if row["rate"] == ANY_RATE else [row["rate"]]):
            table.setdefault(row["method"], {})[rate] = row.get(key)
    return rates, table


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Audio-only test accuracy per method and missing-video rate, then audio-visual accuracy."""
    rates, audio = pivot(rows, "audio")
    _, av = pivot(rows, "av")
    lines = ["Audio-only test accuracy (what an audio-only client gets) by missing-video rate:", "",
             "| method | " + " | ".join(rates) + " |", "|---|" + "---|" * len(rates)]
    lines += [f"| {m} | " + " | ".join(_fmt(audio[m].get(r)) for r in rates) + " |" for m in sorted(audio)]
    lines += ["", "Audio-visual test accuracy (fused model, test clips with their images):", "",
              "| method | " + " | ".join(rates) + " |", "|---|" + "---|" * len(rates)]
    lines += [f"| {m} | " + " | ".join(_fmt(av[m].get(r)) for r in rates) + " |" for m in sorted(av)
              if any(v is not None for v in av[m].values())]
    return "\n".join(lines) + "\n"


def plot_rates(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Audio-only (left) and audio-visual (right) test accuracy against the missing-video rate."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6), dpi=110)
    colors = {m: f"C{i}" for i, m in enumerate(sorted({r["method"] for r in rows}))}  # one color per method
    for ax, key, title in ((axes[0], "audio", "audio-only test accuracy"), (axes[1], "av", "audio-visual")):
        rates, table = pivot(rows, key)
        xs = [float(r) for r in rates]
        for method in sorted(table):
            ys = [float("nan") if (v := table[method].get(r)) is None else v for r in rates]
            if not all(math.isnan(y) for y in ys):
                ax.plot(xs, ys, "o-", label=method, color=colors[method])
        ax.set_xlabel("missing-video rate")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def _table(args: argparse.Namespace) -> None:
    rows = collect(args.results)
    write_table(SECTION, rows, Path(args.out), markdown_table(rows) if rows else "", plot_rates, "accuracy.png")


def _arguments(p: argparse.ArgumentParser) -> None:
    add_arguments(p, ["data", "cell", "distill", "table"], RESULTS)
    p.add_argument("--method")
    p.add_argument("--rate", help="missing-video rate (omit for the methods of 'rate_free')")


def _main(args: argparse.Namespace) -> None:
    if args.command in ("cell", "distill") and args.method is None:
        raise ConfigError(f"{SECTION}: '{args.command}' needs --method.")
    {"data": _data, "cell": _cell, "distill": _distill, "table": _table}[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m benchmarks.modality``)."""
    return stage.entry(__doc__ or "", _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
