"""ModalityMirror matrix: audio-only and audio-visual test accuracy of each AV method by missing-video rate and seed.

Run from ``benchmarks/modality/`` (a DVC project of its own: ``dvc repro`` there runs the matrix). Settings:
``params.yaml`` there: the project sections the stages read and ``avbench``: the rates, the seeds, the methods, the
claims and ``section.key: value`` overrides applied on top of the project sections: ``common``, then the method's,
then the rate (``modality.missing_rate``), then the seed (:func:`seed_overrides`), then ``--set`` (repeatable, for
quick runs).

Cells. The claim cells run every seed of ``seeds``: ``method_names`` × ``rates`` and ``rate_free`` (UniFL never reads
video, so its one cell per seed, folder ``any``, stands for every rate); ``context_names`` × ``rates`` carry no claim
and run the seeds of ``context_seeds`` only. A seed s sets the partition, the initial weights (and every client's
batch order) and the missing-video draw: ``partition.seed = federation.seed = modality.seed = s``; the audio-image
pairing (``modality.pair_seed``) and the test split stay fixed (they define the dataset).

Budgets. Every method gets the same audio-encoder optimiser steps per client (:func:`audio_encoder_steps`,
:func:`budget_problems`); every command checks this first and refuses to run a matrix that breaks it.

``python -m benchmarks.modality data`` downloads the spoken digits, writes their feature store and the visual store
(each clip paired with a handwritten digit image of its class), under ``results/``.
``python -m benchmarks.modality partition --seed S`` writes the partition of seed S (``results/partition/seedS``).
``python -m benchmarks.modality cell --method M --rate R --seed S`` runs the modality stage, writing
``results/cells/M/R/seedS/``: metrics.json, rounds.tsv, rounds.png; the AV model and its audio branch are registered
as ``av-M-R-seedS@final`` and ``av-M-R-seedS-audio@final`` (``--rate`` omitted for the methods of ``rate_free``).
``python -m benchmarks.modality distill --method modality_mirror --rate R --seed S`` runs the distill stage on that
cell: the registered AV teacher into its registered audio branch, on the clients with video (``distill.json``,
``distill/``), with the ``distill`` overrides of the matrix settings on top; the table then reports the distilled
student as the method's audio-only model.
``python -m benchmarks.modality budget`` prints each method's audio-encoder steps per client (and checks them).
``python -m benchmarks.modality table`` writes ``table.md``, ``table.json`` and ``accuracy.png`` from the cells the
params name (never a directory listing): mean ± sd over seeds, and the claims (paired per-seed differences, 95%
t-interval, verdict).
"""

from __future__ import annotations

import argparse
import json
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
from fedcore.multimodal.methods import AV_METHODS
from fedcore.multimodal.train import LOCAL_TASKS
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
#: The method whose cells the distill stage continues (ModalityMirror phase 2), on the clients with video.
DISTILLED = "modality_mirror"
#: The method every other's audio-encoder budget is compared with.
BUDGET_REFERENCE = "unifl"
#: Metrics a claim may compare (per-seed values of a row): audio-only test accuracy as served, audio-visual.
CLAIM_METRICS = ("audio", "av")
#: A claim whose mean difference is under this (accuracy, 2 points) needs 5 seeds (issue 21).


@dataclass(frozen=True)
class Cell:
    """One run of the matrix: a method at a missing-video rate (None: rate-free) and a seed."""

    method: str
    rate: float | None
    seed: int


def settings_of(bench: Mapping[str, Any]) -> dict[str, Any]:
    """The ``avbench`` section, checked: methods have overrides, rates in [0, 1], seeds, claims (one error)."""
    settings = bench_settings(bench, SECTION, [("method_names", "methods"), ("rate_free", "methods"),
                                               ("context_names", "methods")])
    problems = []
    rates = settings.get("rates") or []
    if bad := [r for r in rates if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1]:
        problems.append(f"{SECTION}: 'rates' must be numbers in [0, 1]. Got {bad}.")
    problems += seed_problems(settings, SECTION)
    claimed = [*(settings.get("method_names") or []), *(settings.get("rate_free") or [])]
    if both := sorted(set(claimed) & set(settings.get("context_names") or [])):
        problems.append(f"{SECTION}: a method is a claim cell or a context cell, not both. Got {both} in both.")
    for i, claim in enumerate(settings.get("claims") or []):
        where = f"{SECTION}: claims[{i}]"
        if not isinstance(claim, Mapping) or not {"claim", "a", "b", "metric"} <= set(claim):
            problems.append(f"{where} must be a mapping with claim, a, b, metric (rate, margin optional). Got "
                            f"{claim!r}.")
            continue
        if bad := [claim[k] for k in ("a", "b") if claim[k] not in claimed]:
            problems.append(f"{where}: a and b must be claim cells ('method_names' or 'rate_free', which run "
                            f"every seed). Got {bad}.")
        if claim["metric"] not in CLAIM_METRICS:
            problems.append(f"{where}: 'metric' must be one of {list(CLAIM_METRICS)}. Got {claim['metric']!r}.")
        if claim.get("rate") is not None and claim["rate"] not in rates:
            problems.append(f"{where}: 'rate' must be one of 'rates' {rates}. Got {claim['rate']!r}.")
    if problems:
        raise ConfigError(problems)
    return settings


def seed_overrides(seed: int) -> dict[str, int]:
    """What a seed sets: the partition, the initial weights and batch orders, the missing-video draw."""
    return {"partition.seed": seed, "federation.seed": seed, "modality.seed": seed}


def cell_params(raw: Mapping[str, Any], settings: Mapping[str, Any], method: str, rate: float | None,
                seed: int = 0, extra: Mapping[str, Any] | None = None) -> Params:
    """Project params: common, method, rate and seed overrides (and per-cell registry names), then ``extra``."""
    overrides = named_overrides(settings, SECTION, "methods", method)
    name = f"av-{method}-{_rate_name(rate)}-seed{seed}"
    names = {"modality.registered_model": name, "modality.registered_audio": f"{name}-audio",
             "distill.teacher": f"models:/{name}@final", "distill.student": f"models:/{name}-audio@final",
             "distill.registered_model": f"{name}-student"}
    layers = [settings.get("common") or {}, overrides, names,
              {} if rate is None else {"modality.missing_rate": rate}, seed_overrides(seed), extra or {}]
    return load_params(apply_overrides(raw, *layers))


def _rate_name(rate: float | None) -> str:
    return ANY_RATE if rate is None else f"{rate:g}"


def cell_folder(results: Path, method: str, rate: float | None, seed: int = 0) -> Path:
    """``results/cells/<method>/<rate or any>/seed<seed>``."""
    return Path(results) / "cells" / method / _rate_name(rate) / f"seed{seed}"


def partition_file(results: Path, seed: int) -> Path:
    """``results/partition/seed<seed>/partition.json``: the clients of seed ``seed``."""
    return Path(results) / "partition" / f"seed{seed}" / "partition.json"


def planned_cells(settings: Mapping[str, Any]) -> list[Cell]:
    """Every cell of the matrix: claim cells × ``seeds``, context cells × ``context_seeds`` (dvc.yaml's stages)."""
    rates, seeds = list(settings.get("rates") or []), list(settings.get("seeds") or [])
    cells = [Cell(m, float(r), s) for m in settings.get("method_names") or [] for r in rates for s in seeds]
    cells += [Cell(m, None, s) for m in settings.get("rate_free") or [] for s in seeds]
    cells += [Cell(m, float(r), s) for m in settings.get("context_names") or [] for r in rates
              for s in settings.get("context_seeds") or []]
    return cells


# ------------------------------------------------------------------------------------------- budgets
def audio_encoder_steps(params: Params, num_examples: int, has_video: bool, distilled: bool) -> int:
    """Audio-encoder optimiser steps of one client over a method's whole training, every client in every round.

    A round's local training is ``E = federation.local_epochs`` epochs of ``⌈n_c / B⌉`` minibatches (``B =
    federation.batch_size``; the last batch may be short), one SGD step each; a round's tasks train the audio
    encoder when one of them has the ``audio`` group unfrozen (``audio``, ``av``; not Harmony's ``fusion``, whose
    encoders are frozen). ``distilled``: the method's cell is continued by the distill stage, whose student (the
    audio branch) trains ``distill.rounds`` more rounds of E epochs at the same B, on the clients with video only:

        steps_c = (#rounds whose tasks train the audio encoder + [has video] · D) · E · ⌈n_c / B⌉

    Raises
    ------
    ConfigError
        If ``federation.client_fraction`` < 1 (the count assumes every client trains every round).
    """
    fed, cfg = params.federation, params.modality
    if fed.client_fraction < 1:
        raise ConfigError(f"{SECTION}: the audio-encoder budgets assume every client trains every round "
                          f"(federation.client_fraction 1). Got {fed.client_fraction!r}.")
    schedule = AV_METHODS.build(cfg.method).schedule(fed.rounds, cfg.fusion_rounds, cfg.audio_loss_weight)
    rounds = sum(1 for _, phase in schedule if _trains_audio_encoder(phase.plan(has_video)))
    if distilled and has_video:
        rounds += params.distill.rounds
    return rounds * fed.local_epochs * math.ceil(num_examples / fed.batch_size)


def _trains_audio_encoder(tasks: Sequence[str]) -> bool:
    return any("audio" in (task := LOCAL_TASKS.build(name)).groups and "audio" not in task.frozen for name in tasks)


#: Client sizes the budget check tries (every size from 1 to 400 rows: any batch-size mismatch shows).
BUDGET_SIZES = tuple(range(1, 401))


def budget_table(raw: Mapping[str, Any], settings: Mapping[str, Any],
                 sizes: Sequence[int] = BUDGET_SIZES) -> dict[str, dict[bool, dict[int, int]]]:
    """``{method: {has_video: {n_c: steps}}}`` for every method of the matrix and every client size of ``sizes``."""
    rates, seeds = settings.get("rates") or [None], settings.get("seeds") or [0]
    rate_free = settings.get("rate_free") or []
    methods = [*rate_free, *(settings.get("method_names") or []), *(settings.get("context_names") or [])]
    table = {}
    for method in dict.fromkeys(methods):
        distill_overrides = (settings.get("distill") or {}) if method == DISTILLED else {}  # as _distill applies
        params = cell_params(raw, settings, method, None if method in rate_free else float(rates[0]), seeds[0],
                             distill_overrides)
        table[method] = {video: {n: audio_encoder_steps(params, n, video, method == DISTILLED) for n in sizes}
                         for video in (True, False)}
    return table


def budget_problems(table: Mapping[str, Mapping[bool, Mapping[int, int]]],
                    reference: str = BUDGET_REFERENCE) -> list[str]:
    """What breaks the equal audio-training budget: every method against ``reference``, client by client.

    The rule: a client with video gets exactly the reference's steps under every method (it takes part in every
    phase, ModalityMirror's distillation included), and no client gets more than under the reference (a client
    without video misses only ModalityMirror's distillation, which needs the teacher's images).
    """
    if reference not in table:
        return [f"{SECTION}: the budget reference {reference!r} is not in the matrix."]
    ref = table[reference]
    problems = []
    for method, steps in table.items():
        if gaps := [n for n, s in steps[True].items() if s != ref[True][n]]:
            n = gaps[0]
            problems.append(f"{SECTION}: {method} gives a client with video and {n} training rows {steps[True][n]} "
                            f"audio-encoder steps, {reference} {ref[True][n]}. Fix: set its rounds so that (rounds "
                            f"that train audio [+ distill.rounds]) x local_epochs at the same batch size equals "
                            f"{reference}'s.")
        if over := [(v, n) for v in (True, False) for n, s in steps[v].items() if s > ref[v][n]]:
            video, n = over[0]
            problems.append(f"{SECTION}: {method} gives a client {'with' if video else 'without'} video and {n} "
                            f"rows {steps[video][n]} audio-encoder steps, more than {reference}'s {ref[video][n]}.")
    return problems


def check_budgets(raw: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    """Raise ConfigError (every problem at once) unless the audio-encoder budgets are equal (budget_problems)."""
    if problems := budget_problems(budget_table(raw, settings)):
        raise ConfigError(problems)


def _load(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    raw, bench = read_matrix_params(args.params, SECTION)
    settings = settings_of(bench)
    check_budgets(raw, settings)  # before any work: the matrix compares methods at equal audio training
    return raw, settings


def _data(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    params = load_params(apply_overrides(raw, settings.get("common") or {}, parse_sets(args.set)))
    root = Path(args.results)
    download(params.download, root / "raw", Path(args.downloads))
    features(params.features, root / "raw", root / "features")
    pair_av(params.modality, root / "features", root / "av")


def _partition(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    params = load_params(apply_overrides(raw, settings.get("common") or {}, seed_overrides(args.seed),
                                         parse_sets(args.set)))
    root = Path(args.results)
    partition(params.partition, root / "features", partition_file(root, args.seed).parent)


def _paths(args: argparse.Namespace, raw: Mapping[str, Any],
           settings: Mapping[str, Any]) -> tuple[Params, Path, dict[str, Any]]:
    rate = None if args.rate is None else float(args.rate)
    if rate is None and args.method not in (settings.get("rate_free") or []):
        raise ConfigError(f"{SECTION}: --rate is needed for {args.method!r} (only the methods of 'rate_free' "
                          "do not depend on it).")
    params = cell_params(raw, settings, args.method, rate, args.seed, parse_sets(args.set))
    root = Path(args.results)
    common = {"features": root / "features", "partition": partition_file(root, args.seed), "visual": root / "av",
              "root": Path.cwd()}
    return params, cell_folder(root, args.method, rate, args.seed), common


def _cell(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    params, out, common = _paths(args, raw, settings)
    modality(params, ModalityPaths(**common, checkpoints=out / "checkpoints", model=out / "model.safetensors",
                                   metrics=out / "metrics.json", plots=out))


def _distill(args: argparse.Namespace) -> None:
    raw, settings = _load(args)
    args.set = [f"{k}={json.dumps(v)}" for k, v in (settings.get("distill") or {}).items()] + list(args.set)
    params, out, common = _paths(args, raw, settings)
    distill(params, DistillPaths(**common, checkpoints=out / "distill" / "checkpoints",
                                 model=out / "distill" / "student.safetensors", metrics=out / "distill.json",
                                 plots=out / "distill"))


def _budget(args: argparse.Namespace) -> None:
    raw, settings = _load(args)  # checks
    table = budget_table(raw, settings)
    sizes = (32, 100, 344)
    print("audio-encoder optimiser steps per client (with video / without), by training rows n_c:")
    for method, steps in table.items():
        print(f"  {method:16s} " + "  ".join(f"n={n}: {steps[True][n]}/{steps[False][n]}" for n in sizes))


# --------------------------------------------------------------------------------------------------- table
#: The row name of ModalityMirror's phase-1 audio branch (before distillation), beside its student.
PHASE1 = f"{DISTILLED} (phase 1 only)"


def collect(results: Path, settings: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per finished cell of :func:`planned_cells` (the params', never a directory listing), and the
    folders of the planned cells not finished yet.

    A row: method, rate, seed, audio-only test accuracy as served (ModalityMirror: its distilled student, with its
    phase-1 audio branch as a row of its own), audio-visual accuracy and the parts.
    """
    rows, missing = [], []
    for cell in planned_cells(settings):
        folder = cell_folder(results, cell.method, cell.rate, cell.seed)
        if not (folder / "metrics.json").is_file():
            missing.append(str(folder))
            continue
        metrics = read_json(folder / "metrics.json")
        row = {"method": cell.method, "rate": _rate_name(cell.rate), "seed": cell.seed,
               "audio": metrics["audio_accuracy"], "audio_branch": metrics.get("audio_branch_accuracy"),
               "av": metrics.get("av_accuracy"), "zero_video": metrics.get("zero_video_accuracy"),
               "video_clients": len(metrics.get("video_clients", [])), "rounds": metrics["rounds"]}
        if cell.method == DISTILLED:  # the distilled student serves the audio-only clients; phase 1 alone beside it
            rows.append({**row, "method": PHASE1, "av": None, "zero_video": None})
            if not (folder / "distill.json").is_file():
                missing.append(str(folder / "distill.json"))
                continue
            student = read_json(folder / "distill.json")
            row.update(audio=student["audio_accuracy"], rounds=metrics["rounds"] + student["rounds"])
        rows.append(row)
    return rows, missing


def _values(rows: Sequence[Mapping[str, Any]], method: str, rate: str, key: str) -> dict[int, float]:
    """``{seed: value}`` of ``key`` for the rows of ``method`` at ``rate`` (a rate-free method's ``any`` rows)."""
    return {int(r["seed"]): float(r[key]) for r in rows if r["method"] == method and r["rate"] in (rate, ANY_RATE)
            and r.get(key) is not None}


def summarise(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, dict[str, tuple[float, float | None, int]]]:
    """``{method: {rate: (mean, sd or None for one seed, seeds)}}`` of ``key`` over the seeds of each cell."""
    out: dict[str, dict[str, tuple[float, float | None, int]]] = {}
    for method, rate in dict.fromkeys((r["method"], r["rate"]) for r in rows if r.get(key) is not None):
        values = [float(r[key]) for r in rows if r["method"] == method and r["rate"] == rate
                  and r.get(key) is not None]
        mean, sd = mean_sd(values) if len(values) > 1 else (values[0], None)
        out.setdefault(method, {})[rate] = (mean, sd, len(values))
    return out


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> dict[int, float]:
    """``{seed: a − b}`` on the seeds both arms ran."""
    return {seed: a[seed] - b[seed] for seed in sorted(set(a) & set(b))}


def claims(rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per claim of ``settings['claims']`` and rate (every rate when the claim names none)."""
    out = []
    for spec in settings.get("claims") or []:
        rates = [spec["rate"]] if spec.get("rate") is not None else list(settings.get("rates") or [])
        for rate in (f"{float(r):g}" for r in rates):
            part = claim_part(paired(_values(rows, spec["a"], rate, spec["metric"]),
                                     _values(rows, spec["b"], rate, spec["metric"])), float(spec.get("margin", 0.0)))
            out.append({"claim": spec["claim"], "a": spec["a"], "b": spec["b"], "rate": rate,
                        "metric": spec["metric"], **part})
    return out


def _fmt(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _pm(cell: tuple[float, float | None, int] | None) -> str:
    if cell is None:
        return "—"
    mean, sd, n = cell
    return (f"{mean:.3f} (1 seed)" if sd is None else format_pm(mean, sd)) + ("" if sd is None else f" (n={n})")


def _rates(settings: Mapping[str, Any]) -> list[str]:
    return [f"{float(r):g}" for r in settings.get("rates") or []]


def markdown_table(rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any],
                   claim_rows: Sequence[Mapping[str, Any]] = (), missing: Sequence[str] = ()) -> str:
    """Audio-only and audio-visual accuracy (mean ± sd over seeds) per method and rate, then the claims."""
    rates = _rates(settings)
    lines = []
    for key, title in (("audio", "Audio-only test accuracy (what an audio-only client gets), mean ± sd over seeds, "
                                 "by missing-video rate"),
                       ("av", "Audio-visual test accuracy (fused model, test clips with their images)")):
        table = summarise(rows, key)
        lines += [f"{title}:", "", "| method | " + " | ".join(rates) + " |", "|---|" + "---|" * len(rates)]
        for method in sorted(table):
            cells = table[method]
            lines.append(f"| {method} | " + " | ".join(_pm(cells.get(r, cells.get(ANY_RATE))) for r in rates) + " |")
        lines.append("")
    if claim_rows:
        lines += ["Claims: mean paired per-seed difference a − b, 95% t-interval; holds when the interval lies "
                  "above the margin, does not hold when below, unresolved when it contains it:", "",
                  "| claim | a − b | metric | rate | seeds | mean diff | 95% interval | verdict | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in claim_rows:
            diff, interval = interval_text(c)
            margin = f" (margin {c['margin']:+g})" if c["margin"] else ""
            lines.append(f"| {c['claim']} | {c['a']} − {c['b']} | {c['metric']}{margin} | {c['rate']} | {c['n']} | "
                         f"{diff} | {interval} | {c['verdict']} | {c.get('note', '')} |")
        lines += ["", *claim_verdicts(claim_rows)]
        lines.append("")
    if missing:
        lines += [f"Not finished ({len(missing)} of the planned cells): " + ", ".join(missing), ""]
    return "\n".join(lines)


def plot_rates(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Audio-only (left) and audio-visual (right) test accuracy against the missing-video rate, mean ± sd."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6), dpi=110)
    colors = {m: f"C{i}" for i, m in enumerate(sorted({r["method"] for r in rows}))}  # one color per method
    rates = sorted({r["rate"] for r in rows if r["rate"] != ANY_RATE}, key=float)
    for ax, key, title in ((axes[0], "audio", "audio-only test accuracy"), (axes[1], "av", "audio-visual")):
        table = summarise(rows, key)
        for method in sorted(table):
            cells = [table[method].get(r, table[method].get(ANY_RATE)) for r in rates]
            xs = [float(r) for r, c in zip(rates, cells, strict=True) if c is not None]
            ys = [c[0] for c in cells if c is not None]
            errs = [c[1] or 0.0 for c in cells if c is not None]
            if xs:
                ax.errorbar(xs, ys, yerr=errs, fmt="o-", capsize=3, label=method, color=colors[method])
        ax.set_xlabel("missing-video rate")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (mean ± sd over seeds)")
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def _table(args: argparse.Namespace) -> None:
    _, settings = _load(args)
    rows, missing = collect(args.results, settings)
    claim_rows = claims(rows, settings)
    text = markdown_table(rows, settings, claim_rows, missing) if rows else ""
    write_table(SECTION, rows, Path(args.out), text, plot_rates, "accuracy.png",
                extra={"claims": claim_rows, "missing": missing})


def _arguments(p: argparse.ArgumentParser) -> None:
    add_arguments(p, ["data", "partition", "cell", "distill", "budget", "table"], RESULTS)
    p.add_argument("--method")
    p.add_argument("--rate", help="missing-video rate (omit for the methods of 'rate_free')")
    p.add_argument("--seed", type=int, help="the seed of the cell (partition, initial weights, missing-video draw)")


def _main(args: argparse.Namespace) -> None:
    run_command(SECTION, args, {"partition": ["seed"], "cell": ["method", "seed"], "distill": ["method", "seed"]},
                {"data": _data, "partition": _partition, "cell": _cell, "distill": _distill, "budget": _budget,
                 "table": _table})


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m benchmarks.modality``)."""
    return stage.entry(__doc__ or "", _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
