"""The claims table: every matrix's claims, gathered from its committed ``table.json``, in the README files.

``python -m benchmarks.claims`` prints the two tables; ``--write`` puts the short one in ``README.md`` and the full
one in ``benchmarks/README.md`` (between ``<!-- claims:short -->`` / ``<!-- claims:full -->`` and
``<!-- /claims -->``); ``--check`` exits 1 when either file's table differs from what the tables say now (a test
runs it, so the README cannot drift from the matrices' results).

A matrix's claims are its ``params.yaml``'s ``claims`` (``<section>.claims``); its results, the ``claims`` rows its
``table`` stage wrote into ``table.json`` (one row per part of a claim: ``claim``, ``verdict``, ``mean_diff``,
``low``, ``high``, the seeds and a setting). A claim of several parts holds when every part holds
(:func:`benchmarks.stats.overall`). A matrix whose table predates the seeds (no ``claims`` in its ``table.json``)
shows its claims as not yet run. Each matrix names the commit of its code: the last commit that changed a file of
its code fingerprint (``benchmarks.benchlib.CODE`` and its own ``*.py``); ``benchmarks.freshness`` (and its test)
check that its ``dvc.lock`` still matches that code, so the commit named is the one that produced the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from benchmarks.benchlib import CODE, PROJECT
from benchmarks.stats import interval_text, overall

#: The matrices, in the order of the claims table (issue 21's list).
MATRICES = ("personalisation", "fassl", "robustness", "modality", "earlyexit")
#: Each matrix's section in benchmarks/README.md (its heading's anchor).
ANCHORS = {"personalisation": "personalisation-matrix", "fassl": "fassl-matrix", "robustness": "robustness-matrix",
           "modality": "modalitymirror-matrix", "earlyexit": "early-exit-matrix"}
MARKERS = {"short": ("<!-- claims:short -->", "<!-- /claims -->"),
           "full": ("<!-- claims:full -->", "<!-- /claims -->")}


def params_claims(matrix: str, project: Path = PROJECT) -> list[dict[str, Any]]:
    """The ``claims`` of the matrix's params (under whichever section holds them)."""
    params = yaml.safe_load((project / "benchmarks" / matrix / "params.yaml").read_text()) or {}
    for section in params.values():
        if isinstance(section, Mapping) and "claims" in section:
            return list(section["claims"] or [])
    return []


def table_claims(matrix: str, project: Path = PROJECT) -> list[dict[str, Any]] | None:
    """The claim rows of the matrix's ``table.json``; None when it has none (a table from before the seeds)."""
    path = project / "benchmarks" / matrix / "table.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    rows = table.get("claims") if isinstance(table, Mapping) else None
    return list(rows) if rows else None


def code_commit(matrix: str, project: Path = PROJECT) -> str:
    """``<short hash> (<date>)`` of the last commit that changed the matrix's code, or ``—`` outside git."""
    paths = [*CODE, f"benchmarks/{matrix}/*.py"]
    result = subprocess.run(["git", "log", "-1", "--format=%h (%cs)", "--", *paths], cwd=project,
                            capture_output=True, text=True, check=False)
    return result.stdout.strip() or "—"


def _seeds(row: Mapping[str, Any]) -> str:
    seeds = row.get("seeds")
    return str(row.get("n") if row.get("n") is not None else len(seeds) if isinstance(seeds, list) else seeds or "—")


def _part(row: Mapping[str, Any]) -> str:
    """What a claim row compares, from whichever keys its matrix writes."""
    if row.get("setting"):
        return str(row["setting"])
    text = f"{row.get('a', '?')} vs {row.get('b', '?')}"
    keys = ("dataset", "scenario", "rate", "metric")
    extras = [f"{key} {row[key]}" for key in keys if row.get(key) not in (None, "")]
    if row.get("against"):
        extras.append(f"against {row['against']}")
    if row.get("margin"):
        extras.append(f"margin {row['margin']:+g}")
    return text + (f" ({', '.join(extras)})" if extras else "")


def gather(project: Path = PROJECT) -> list[dict[str, Any]]:
    """One entry per claim: matrix, claim text, its parts (table rows, empty when not run), overall verdict."""
    claims = []
    for matrix in MATRICES:
        rows = table_claims(matrix, project)
        commit = code_commit(matrix, project)
        texts = list(dict.fromkeys(c["claim"] for c in params_claims(matrix, project)))
        if rows:
            texts += [t for t in dict.fromkeys(r["claim"] for r in rows) if t not in texts]
        for text in texts:
            parts = [r for r in rows or [] if r["claim"] == text]
            verdict = overall([str(p["verdict"]) for p in parts]) if parts else "not run yet"
            claims.append({"matrix": matrix, "claim": text, "parts": parts, "verdict": verdict,
                           "commit": commit if parts else "—"})
    return claims


def short_table(claims: Sequence[Mapping[str, Any]]) -> str:
    """README's table: claim, matrix, each part's mean difference with its interval, verdict."""
    lines = ["| claim | matrix | mean paired difference [95 % interval], per part | verdict |",
             "| --- | --- | --- | --- |"]
    for c in claims:
        results = "; ".join(" ".join(interval_text(p)) for p in c["parts"]) or "over seeds: not run yet"
        lines.append(f"| {c['claim']} | [{c['matrix']}](benchmarks/README.md#{ANCHORS[c['matrix']]}) | {results} | "
                     f"**{c['verdict']}** |")
    return "\n".join(lines)


def full_table(claims: Sequence[Mapping[str, Any]]) -> str:
    """benchmarks/README.md's table: one row per part, with its seeds, note and the code's commit."""
    lines = ["| claim | matrix (code of) | part | seeds | mean d | 95 % interval | part verdict | claim verdict "
             "| note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in claims:
        if not c["parts"]:
            lines.append(f"| {c['claim']} | {c['matrix']} | — | — | — | — | — | **{c['verdict']}** | the table "
                         f"predates the seeds; `make matrix M={c['matrix']}` |")
        for p in c["parts"]:
            mean, interval = interval_text(p)
            lines.append(f"| {c['claim']} | {c['matrix']} ({c['commit']}) | {_part(p)} | {_seeds(p)} | {mean} | "
                         f"{interval} | {p['verdict']} | **{c['verdict']}** | {p.get('note') or ''} |")
    return "\n".join(lines)


def replaced(text: str, kind: str, table: str, where: str) -> str:
    """``text`` with the block between ``kind``'s markers set to ``table``."""
    start, end = MARKERS[kind]
    head, found, rest = text.partition(start)
    if not found or end not in rest:
        raise ValueError(f"claims: {where} must hold the markers {start} and {end}. Got neither or one.")
    return f"{head}{start}\n{table}\n{end}{rest.partition(end)[2]}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write the tables into README.md and benchmarks/README.md")
    mode.add_argument("--check", action="store_true", help="exit 1 when either README's table is not up to date")
    args = p.parse_args(argv)
    claims = gather()
    targets = {"short": (PROJECT / "README.md", short_table(claims)),
               "full": (PROJECT / "benchmarks" / "README.md", full_table(claims))}
    if not (args.write or args.check):
        print(targets["short"][1], targets["full"][1], sep="\n\n")
        return 0
    stale = []
    for kind, (path, table) in targets.items():
        text = path.read_text()
        new = replaced(text, kind, table, str(path.relative_to(PROJECT)))
        if new != text:
            stale.append(str(path.relative_to(PROJECT)))
            if args.write:
                path.write_text(new)
    if args.check and stale:
        print(f"claims: out of date in {', '.join(stale)}; run python -m benchmarks.claims --write", file=sys.stderr)
        return 1
    print(f"claims: {len(claims)} claims; " + (f"written to {', '.join(stale)}" if stale else "up to date"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
