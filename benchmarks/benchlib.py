"""Shared plumbing of the benchmark matrices (``benchmarks/<matrix>/``, each a DVC project of its own).

Each matrix's ``params.yaml`` holds the project sections its stages read (its own copy of the root
``params.yaml``'s sections: the root file is never read, so a change there never makes a matrix stale) and one
section of matrix settings named after the matrix: the axes (lists of names) and, per name, ``section.key: value``
overrides layered over the project sections. The drivers run from the matrix's folder (DVC's ``wdir``), so every
relative path (params, results, tables, the MLflow store) is the matrix's own.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from benchmarks.stats import claim_part as claim_part  # re-exported: the drivers take their helpers from here
from benchmarks.stats import claim_verdicts as claim_verdicts
from benchmarks.stats import format_pm as format_pm
from benchmarks.stats import interval_text as interval_text
from benchmarks.stats import mean_sd as mean_sd
from benchmarks.stats import overall as overall
from benchmarks.stats import paired_t_interval as paired_t_interval
from benchmarks.stats import verdict as verdict
from fedcore.errors import ConfigError
from tasks.common import write_json, write_text

#: The repository root (the root DVC project); its ``data/downloads`` is the archive cache every matrix shares.
PROJECT = Path(__file__).resolve().parents[1]
DOWNLOADS = PROJECT / "data" / "downloads"
#: The project's code a matrix runs (besides its own folder's modules), fingerprinted by :func:`code_fingerprint`.
CODE = ("fedcore", "tasks", "flows", "benchmarks/__init__.py", "benchmarks/benchlib.py", "benchmarks/stats.py")
#: Never part of a fingerprint: what Python and tools write beside the code.
_NOT_CODE = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


def code_fingerprint(matrix: str, project: Path = PROJECT) -> dict[str, str]:
    """``{path: sha256}`` of every file of :data:`CODE` and of ``benchmarks/<matrix>/*.py``, caches left out.

    A matrix's stages depend on this (its ``code`` stage writes it to ``code.json``) instead of naming the
    project's folders as DVC dependencies: DVC reads a folder outside its project without the ``.dvcignore``, so
    ``__pycache__`` files (written by any run, absent from a fresh clone) would make every cell stale.
    """
    files: list[Path] = []
    for name in CODE:
        path = project / name
        files += [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    files += sorted((project / "benchmarks" / matrix).glob("*.py"))
    found = {}
    for path in files:
        relative = path.relative_to(project)
        if _NOT_CODE.isdisjoint(relative.parts) and path.suffix != ".pyc":
            found[relative.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return dict(sorted(found.items()))


def code_json_text(matrix: str, project: Path = PROJECT) -> str:
    """The text of a matrix's ``code.json`` (``{"files": code_fingerprint(...)}``), as its ``code`` stage writes it.

    ``benchmarks.freshness`` compares this with the hash ``dvc.lock`` recorded, so it must stay byte-for-byte
    what the stage writes.
    """
    return json.dumps({"files": code_fingerprint(matrix, project)}, indent=2) + "\n"


def read_matrix_params(path: str | Path, section: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A matrix's params file split in two: the project sections (for ``load_params``) and ``{section: ...}``.

    Raises
    ------
    ConfigError
        If the file is missing or not a YAML mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{section}: params file {str(path)!r} not found. Run from benchmarks/<matrix>/ (where "
                          f"its dvc.yaml is) or pass --params.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{section}: {path} is not valid YAML: {error}") from error
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{section}: {path} must be a mapping of sections. Got {raw!r}.")
    project = {k: v for k, v in raw.items() if k != section}
    return project, {section: raw.get(section)} if section in raw else {}


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


def seed_problems(settings: Mapping[str, Any], section: str, keys: Sequence[str] = ("seeds", "context_seeds"),
                  claim_key: str = "seeds") -> list[str]:
    """Problems of a matrix's seed lists: each of ``keys`` a non-empty list of distinct ints >= 0, and ``claim_key``
    with at least 2 seeds (a claim's interval needs them)."""
    problems = []
    for key in keys:
        seeds = settings.get(key) or []
        if (not seeds or len(set(seeds)) != len(seeds)
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
            problems.append(f"{section}: '{key}' must be a non-empty list of distinct ints >= 0. Got {seeds!r}.")
    if len(settings.get(claim_key) or []) < 2:
        problems.append(f"{section}: a claim needs >= 2 seeds for an interval (issue 21: >= 3). Got "
                        f"{settings.get(claim_key)!r}.")
    return problems


def named_overrides(settings: Mapping[str, Any], section: str, mapping: str, name: str) -> Mapping[str, Any]:
    """The overrides of ``name`` under ``mapping``; ConfigError naming the known ones when it is not there."""
    known = settings.get(mapping) or {}
    if name not in known:
        raise ConfigError(f"{section}: '{name}' must be one of {sorted(known)} ('{mapping}'). Got {name!r}.")
    return known[name] or {}


def apply_overrides(raw: Mapping[str, Any], *layers: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``raw`` with each layer's ``section.key: value`` overrides set, in order."""
    merged: dict[str, Any] = copy.deepcopy(dict(raw))
    for layer in layers:
        for dotted, value in layer.items():
            section, _, key = str(dotted).partition(".")
            if not section or not key:
                raise ConfigError(f"benchmark: override keys must be 'section.key'. Got {dotted!r}.")
            merged[section] = {**(merged.get(section) or {}), key: copy.deepcopy(value)}
    return merged


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """``["section.key=value", ...]`` (values read as YAML) → ``{"section.key": value}``."""
    result: dict[str, Any] = {}
    for item in items:
        dotted, sep, text = item.partition("=")
        if not sep or "." not in dotted:
            raise ConfigError(f"benchmark: --set must be 'section.key=value'. Got {item!r}.")
        try:
            result[dotted.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"benchmark: --set {item!r}: the value is not valid YAML ({error}).") from error
    return result


def add_arguments(p: argparse.ArgumentParser, commands: Sequence[str], results: Path = Path("results"),
                  out: Path = Path(".")) -> None:
    """The options every driver has: the command, results and table folders, downloads, --set."""
    p.add_argument("command", choices=list(commands))
    p.add_argument("--results", type=Path, default=results, help=f"results root (default {results})")
    p.add_argument("--out", type=Path, default=out, help=f"table: folder of the table (default {out})")
    p.add_argument("--downloads", type=Path, default=DOWNLOADS,
                   help="data: archive cache (default: the project's data/downloads)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override applied last (value read as YAML); repeatable")


def run_command(section: str, args: argparse.Namespace, needs: Mapping[str, Sequence[str]],
                commands: Mapping[str, Callable[[argparse.Namespace], Any]]) -> None:
    """Run ``commands[args.command](args)`` after checking the options ``needs[args.command]`` are given."""
    if missing := [f"--{n}" for n in needs.get(args.command, ()) if getattr(args, n) is None]:
        raise ConfigError(f"{section}: '{args.command}' needs {', '.join(missing)}.")
    commands[args.command](args)


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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.benchlib code MATRIX [--out code.json]``: write the matrix's code fingerprint."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("command", choices=["code"])
    p.add_argument("matrix", help="the matrix's folder name under benchmarks/")
    p.add_argument("--out", type=Path, default=Path("code.json"))
    args = p.parse_args(argv)
    if not (PROJECT / "benchmarks" / args.matrix).is_dir():
        print(f"error: no matrix benchmarks/{args.matrix}", file=sys.stderr)
        return 2
    text = code_json_text(args.matrix)
    write_text(args.out, text)
    print(f"{args.matrix}: {len(json.loads(text)['files'])} code files fingerprinted in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
