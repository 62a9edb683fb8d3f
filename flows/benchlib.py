"""Shared plumbing of the benchmark drivers (``flows.fassl``, ``flows.avbench``, ``flows.eebench``).

Each driver reads the project's ``params.yaml`` and a benchmark params file holding one section of settings: the
matrix axes (lists of names) and, per name, ``section.key: value`` overrides layered over the project params.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fedcore.errors import ConfigError
from tasks.common import write_json, write_text


def bench_settings(bench: Any, section: str, named: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """The ``section`` mapping of a benchmark params file, checked.

    For each ``(names, mapping)`` of ``named``, every name listed under ``names`` must be a key of ``mapping``.

    Raises
    ------
    ConfigError
        If the section is missing or a listed name has no overrides (one error listing every problem).
    """
    settings = bench.get(section) if isinstance(bench, Mapping) else None
    if not isinstance(settings, Mapping):
        raise ConfigError(f"{section}: the benchmark params must have a '{section}' mapping. Got {bench!r}.")
    problems = []
    for names, mapping in named:
        known = settings.get(mapping) or {}
        if missing := [n for n in settings.get(names) or [] if n not in known]:
            problems.append(f"{section}: every name of '{names}' must be a key of '{mapping}'. Got {missing} "
                            f"missing; known: {sorted(known)}.")
    if problems:
        raise ConfigError(problems)
    return dict(settings)


def named_overrides(settings: Mapping[str, Any], section: str, mapping: str, name: str) -> Mapping[str, Any]:
    """The overrides of ``name`` under ``mapping``; ConfigError naming the known ones when it is not there."""
    known = settings.get(mapping) or {}
    if name not in known:
        raise ConfigError(f"{section}: '{name}' must be one of {sorted(known)} ('{mapping}'). Got {name!r}.")
    return known[name] or {}


def read_yaml_pair(params: str | Path, bench_params: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parsed project params and benchmark params files."""
    raw = yaml.safe_load(Path(params).read_text()) or {}
    bench = yaml.safe_load(Path(bench_params).read_text()) or {}
    return raw, bench


def add_arguments(p: argparse.ArgumentParser, commands: Sequence[str], bench_params: str, results: Path,
                  out: Path) -> None:
    """The options every driver has: the command, its params file, results and table folders, downloads, --set."""
    p.add_argument("command", choices=list(commands))
    p.add_argument("--bench-params", default=bench_params)
    p.add_argument("--results", type=Path, default=results, help=f"results root (default {results})")
    p.add_argument("--out", type=Path, default=out, help="table: folder of the table")
    p.add_argument("--downloads", type=Path, default=Path("data/downloads"), help="data: archive cache")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override applied last (value read as YAML); repeatable")


def write_table(section: str, rows: Sequence[Mapping[str, Any]], out: Path, text: str,
                plot: Callable[[Sequence[Mapping[str, Any]], Path], None], plot_name: str,
                extra: Mapping[str, Any] | None = None) -> None:
    """Write ``table.md``, ``table.json`` (the rows) and the plot into ``out``; print the table."""
    if not rows:
        raise ConfigError(f"{section}: no finished cell to tabulate. Run the cells first.")
    write_text(out / "table.md", text)
    write_json(out / "table.json", {**(extra or {}), "rows": list(rows)})
    plot(rows, out / plot_name)
    print(text)
