"""Is each benchmark matrix's ``dvc.lock`` still true of the working tree?

``python -m benchmarks.freshness [MATRIX ...]`` (every ``benchmarks/<matrix>/`` with a ``dvc.yaml`` when none is
named) prints, per matrix, the stages ``dvc repro`` would rerun and why, and exits 1 when any stage is stale.

A stage is stale, as for ``dvc status``, when its command differs from the one recorded, a dependency or output
differs from its recorded hash, or a parameter from its recorded value; and, as for ``dvc repro``, when a stage
upstream of it is stale. Only what git holds is compared: data that git ignores (downloads, features,
checkpoints, models) is absent from a fresh clone, so a dependency or output path is checked when every file
under it is tracked by git or untracked but not ignored, skipped when none is, and listed as *unchecked* when
only some are (a folder of committed metrics beside ignored checkpoints), or when the lock recorded more files
in the folder than git holds now (it held ignored files when it was hashed, so a fresh clone cannot match it).
A path that git lists but that is missing from the working tree counts as changed. Depend on the committed
files themselves (each cell's ``metrics.json``), not on their folder, to have them checked.

The stages, their lock entries, the params and the hashes come from DVC itself (``dvc.repo.Repo``: the
resolved ``dvc.yaml`` filled from ``dvc.lock``; ``dvc_data.hashfile.build.build``, DVC's md5 of a file and
``.dir`` hash of a folder, with the project's ``.dvcignore``). ``dvc status`` alone is not enough: it reports
ignored data as deleted and names no recorded or current values.

Departure from DVC: the matrices' ``code`` stage is ``always_changed`` (it writes ``code.json``, the
fingerprint of the project's code, which every cell depends on). Rerunning it is cheap, so it never counts as
stale by itself; instead ``code.json`` is compared *as the stage would write it now*, so a code change shows
as a changed ``code.json`` (with the code files that changed) even when the stage has not been rerun.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.benchlib import PROJECT, code_json_text

#: The files a project's stages may write that are compared as their stage would write them now:
#: ``{path relative to the DVC project: () -> content}``.
Regenerate = Mapping[str, Callable[[], bytes]]

_ABSENT = object()
#: The order of a stage's changes in a report (parameters last: there are often many).
_ORDER = ("stage", "cmd", "dep", "out", "upstream", "param")


class FreshnessError(Exception):
    """The check could not run (no git work tree, no DVC project)."""


@dataclass(frozen=True)
class Change:
    """One reason a stage is stale.

    ``kind`` is ``"stage"`` (not in ``dvc.lock``), ``"cmd"``, ``"dep"``, ``"out"``, ``"param"`` (``what`` is
    ``file:dotted.key``) or ``"upstream"`` (``what`` names the stale stage it depends on). ``recorded`` and
    ``now`` are the lock's and the working tree's md5 or value, as text; ``detail`` says more when known (the
    code files behind a changed ``code.json``).
    """

    kind: str
    what: str
    recorded: str = ""
    now: str = ""
    detail: str = ""

    def __str__(self) -> str:
        if self.kind == "upstream":
            return f"upstream stage {self.what} is stale"
        if self.kind == "stage":
            return f"{self.what}: {self.recorded}"
        text = f"{self.kind} {self.what}".rstrip() + f": {self.recorded} -> {self.now}"
        return f"{text} ({self.detail})" if self.detail else text


@dataclass(frozen=True)
class Report:
    """The freshness of one DVC project.

    ``stale`` maps each stale stage (in ``dvc.yaml`` order) to its changes; ``unchecked`` lists the paths
    only partly held by git; ``orphans`` the lock entries that name no stage of ``dvc.yaml`` (DVC ignores
    them); ``num_stages`` counts the stages of ``dvc.yaml``.
    """

    project: Path
    num_stages: int
    stale: dict[str, tuple[Change, ...]] = field(default_factory=dict)
    unchecked: tuple[str, ...] = ()
    orphans: tuple[str, ...] = ()
    seconds: float = 0.0


def check(project: str | Path, regenerate: Regenerate | None = None) -> Report:
    """Compare the ``dvc.lock`` of the DVC project at ``project`` with its working tree.

    Parameters
    ----------
    project
        The folder holding the project's ``.dvc``, ``dvc.yaml`` and ``dvc.lock``, inside a git work tree.
    regenerate
        Files compared as their stage would write them now instead of as they are (see the module docstring).

    Raises
    ------
    FreshnessError
        If ``project`` is not a DVC project inside a git work tree.
    """
    import networkx as nx
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    start = time.perf_counter()
    project = Path(project).resolve()
    in_git = _git_files(project)
    regenerated = {str(project / name): text for name, text in (regenerate or {}).items()}
    lock = _read_lock(project / "dvc.lock")
    try:
        repo = Repo(str(project))
    except NotDvcRepoError as error:
        raise FreshnessError(f"freshness: {str(project)!r} must be a DVC project (run `dvc init --subdir` "
                             f"there). Got: {error}") from error
    with repo:
        # Only this project's own stages (a Repo also collects any nested DVC project's dvc.yaml).
        stages = [s for s in repo.index.stages if Path(s.path).parent == project and getattr(s, "name", None)]
        graph = repo.index.graph
        comparer = _Comparer(project, in_git, regenerated)
        direct = {stage: comparer.stage_changes(stage, lock.get(stage.name)) for stage in stages}
        stale: dict[Any, list[Change]] = {}
        # Upstream first: DVC's graph has an edge from each stage to the stages that write its dependencies.
        for stage in reversed(list(nx.topological_sort(graph))):
            if stage not in direct:
                continue
            changes = list(direct[stage])
            changes += [Change("upstream", u.name) for u in graph.successors(stage) if u in stale]
            changes.sort(key=lambda c: _ORDER.index(c.kind))
            if changes:
                stale[stage] = changes
    names = {stage.name for stage in stages}
    return Report(project=project, num_stages=len(stages),
                  stale={s.name: tuple(stale[s]) for s in stages if s in stale},
                  unchecked=tuple(sorted(comparer.unchecked)),
                  orphans=tuple(sorted(set(lock) - names)), seconds=time.perf_counter() - start)


class _Comparer:
    """The comparisons of one project's stages with their lock entries."""

    def __init__(self, project: Path, in_git: frozenset[str], regenerated: Mapping[str, Callable[[], bytes]]):
        self.project, self.in_git, self.regenerated = project, in_git, regenerated
        self.unchecked: set[str] = set()
        self._hashes: dict[str, str | None] = {}
        self._texts: dict[str, bytes] = {}
        self._params: dict[str, Any] = {}

    def stage_changes(self, stage: Any, locked: Mapping[str, Any] | None) -> list[Change]:
        if getattr(stage, "frozen", False):
            return []
        if locked is None:
            return [Change("stage", stage.name, "not in dvc.lock (never run)")]
        changes = []
        if getattr(stage, "cmd_changed", False):
            changes.append(Change("cmd", "", _show(locked.get("cmd")), _show(stage.cmd)))
        from dvc.dependency import ParamsDependency

        for dep in stage.deps:
            if isinstance(dep, ParamsDependency):
                changes += self.param_changes(dep)
            else:
                changes += self.entry_changes("dep", dep)
        for out in stage.outs:
            changes += self.entry_changes("out", out)
        return sorted(changes, key=lambda c: _ORDER.index(c.kind))

    def param_changes(self, dep: Any) -> list[Change]:
        """Leaf-by-leaf differences between the lock's values of ``dep``'s keys and the params file's."""
        path = str(dep.fs_path)
        if self.classify(path, dep) != "checked":
            return []
        name = os.path.relpath(path, self.project)
        if not os.path.exists(path):
            return [Change("param", name, "recorded", "missing")]
        recorded = dep.hash_info.value if dep.hash_info else {}
        now = self.read_params(dep)
        keys = list(dep.params) or list(dict.fromkeys([*now, *recorded]))
        return [Change("param", f"{name}:{key}", _show(old), _show(new))
                for top in keys for key, old, new in _leaf_diffs(top, recorded.get(top, _ABSENT),
                                                                 now.get(top, _ABSENT))]

    def read_params(self, dep: Any) -> dict[str, Any]:
        """``dep.read_params()`` (``{dotted key: value}`` of the keys present), each params file parsed once."""
        import dpath
        from dvc.utils.serialize import load_path

        path = str(dep.fs_path)
        if path not in self._params:
            self._params[path] = load_path(path, dep.repo.fs)
        config = self._params[path]
        if not dep.params:
            return dict(config)
        found = {}
        for key in dep.params:
            try:
                found[key] = dpath.get(config, key, separator=".")
            except KeyError:
                continue
        return found

    def entry_changes(self, kind: str, entry: Any) -> list[Change]:
        """The change of one dependency or output, if it is checked and differs from its recorded hash."""
        path = str(entry.fs_path)
        if self.classify(path, entry) != "checked":
            return []
        recorded = entry.hash_info.value if entry.hash_info else None
        now = self.hash(path, entry)
        if now == recorded:
            return []
        name = os.path.relpath(path, self.project)
        detail = self.fingerprint_diff(path, recorded) if path in self.regenerated and recorded else ""
        return [Change(kind, name, recorded or "not recorded", now or "missing", detail)]

    def classify(self, path: str, entry: Any) -> str:
        """``"checked"``, ``"ignored"`` (git holds none of it) or ``"unchecked"`` (git holds part of it)."""
        if path in self.regenerated:
            return "checked"
        if not os.path.isdir(path):
            if path in self.in_git:
                return "checked"
            if os.path.lexists(path) or not any(f.startswith(path + os.sep) for f in self.in_git):
                return "ignored"
            return "checked"  # a folder git holds, deleted from the working tree
        files = list(entry.dvcignore.find(entry.fs, path)) if entry.dvcignore else [
            os.path.join(root, f) for root, _, names in os.walk(path) for f in names]
        held = sum(f in self.in_git for f in files)
        if held == 0 and files:
            return "ignored"
        # A folder git holds now may have held ignored files (checkpoints) when its hash was recorded: a fresh
        # clone lacks them, so its hash cannot match. The lock's file count tells.
        recorded_files = getattr(entry.meta, "nfiles", None) if entry.hash_info else None
        if held == len(files) and (recorded_files is None or recorded_files <= held):
            return "checked"
        self.unchecked.add(os.path.relpath(path, self.project))
        return "unchecked"

    def hash(self, path: str, entry: Any) -> str | None:
        """DVC's hash of ``path`` (``None`` when missing), or of its regenerated content."""
        if path not in self._hashes:
            if path in self.regenerated:
                # DVC's "md5" of a file is the md5 of its bytes (no dos2unix since DVC 3).
                self._hashes[path] = hashlib.md5(self.text(path)).hexdigest()
            elif not os.path.lexists(path):
                self._hashes[path] = None
            else:
                from dvc_data.hashfile.build import build

                _, _, obj = build(entry.local_cache, path, entry.fs, entry.hash_name, ignore=entry.dvcignore,
                                  dry_run=True)
                self._hashes[path] = obj.hash_info.value
        return self._hashes[path]

    def text(self, path: str) -> bytes:
        if path not in self._texts:
            self._texts[path] = self.regenerated[path]()
        return self._texts[path]

    def fingerprint_diff(self, path: str, recorded_md5: str) -> str:
        """The files whose hash differs between the recorded fingerprint (``{"files": {path: hash}}``) and now.

        The recorded content is the working tree's file or, failing that, a version of it in git history
        with the recorded md5; empty when neither is found.
        """
        old = _recorded_content(path, recorded_md5)
        if old is None:
            return "recorded version not found in git history"
        try:
            before, after = json.loads(old)["files"], json.loads(self.text(path))["files"]
        except (ValueError, KeyError, TypeError):
            return ""
        parts = []
        for label, names in (("changed", [n for n in after if n in before and before[n] != after[n]]),
                             ("added", [n for n in after if n not in before]),
                             ("removed", [n for n in before if n not in after])):
            if names:
                parts.append(f"{label}: {', '.join(names)}")
        return "; ".join(parts)


def _git_files(project: Path) -> frozenset[str]:
    """Absolute paths of the files git tracks or would track (untracked but not ignored) in the work tree."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(project), *args], check=True, capture_output=True,
                                  text=True).stdout
        except (OSError, subprocess.CalledProcessError) as error:
            raise FreshnessError(f"freshness: {str(project)!r} must be inside a git work tree. Got: "
                                 f"{getattr(error, 'stderr', error)}") from error

    top = Path(git("rev-parse", "--show-toplevel").strip())
    listed = git("-C", str(top), "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    return frozenset(os.path.normpath(top / name) for name in listed.split("\0") if name)


def _recorded_content(path: str, md5: str) -> bytes | None:
    """The working tree's ``path`` or its newest version in git history whose md5 is ``md5``; else None."""
    if os.path.isfile(path):
        data = Path(path).read_bytes()
        if hashlib.md5(data).hexdigest() == md5:
            return data
    folder, name = os.path.split(path)
    try:
        revisions = subprocess.run(["git", "-C", folder, "log", "-n", "50", "--format=%H", "--", name],
                                   check=True, capture_output=True, text=True).stdout.split()
        for revision in revisions:
            shown = subprocess.run(["git", "-C", folder, "show", f"{revision}:./{name}"], capture_output=True)
            if shown.returncode == 0 and hashlib.md5(shown.stdout).hexdigest() == md5:
                return shown.stdout
    except (OSError, subprocess.CalledProcessError):
        pass
    return None


def _read_lock(path: Path) -> dict[str, Any]:
    """``{stage name: lock entry}`` of a ``dvc.lock`` (empty when there is none)."""
    if not path.is_file():
        return {}
    data = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    return dict(data.get("stages") or {})


def _leaf_diffs(key: str, old: Any, new: Any) -> Iterable[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every leaf that differs (``_ABSENT`` where a side lacks it)."""
    if isinstance(old, Mapping) or isinstance(new, Mapping):
        if not (isinstance(old, Mapping) and isinstance(new, Mapping)) and _ABSENT not in (old, new):
            yield key, old, new  # a mapping became a value or the reverse
            return
        old, new = ({} if v is _ABSENT else v for v in (old, new))
        for sub in dict.fromkeys([*old, *new]):
            yield from _leaf_diffs(f"{key}.{sub}", old.get(sub, _ABSENT), new.get(sub, _ABSENT))
    elif _plain(old) != _plain(new):
        yield key, old, new


def _plain(value: Any) -> Any:
    """Tuples as lists (DVC reads some params as tuples, the lock holds lists)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    if isinstance(value, str):
        return value if value and value.strip() == value and ":" not in value else json.dumps(value)
    return json.dumps(_plain(value), default=str)


def matrices(project: Path = PROJECT) -> list[str]:
    """The benchmark matrices: the folders of ``benchmarks/`` that hold a DVC project."""
    root = project / "benchmarks"
    return sorted(p.name for p in root.iterdir() if (p / "dvc.yaml").is_file() and (p / ".dvc").is_dir())


def matrix_regenerate(matrix: str) -> dict[str, Callable[[], bytes]]:
    """A matrix's ``code.json``, as its ``code`` stage would write it now."""
    return {"code.json": lambda: code_json_text(matrix).encode()}


def format_report(name: str, report: Report, max_changes: int | None = 8) -> str:
    """Lines for one project: a summary, then each stale stage and its changes (at most ``max_changes``)."""
    lines = [f"{name}: {len(report.stale)} of {report.num_stages} stages stale ({report.seconds:.1f} s)"]
    for stage, changes in report.stale.items():
        lines.append(f"  {stage}")
        shown = changes if max_changes is None else changes[:max_changes]
        lines += [f"    {change}" for change in shown]
        if len(shown) < len(changes):
            lines.append(f"    ... and {len(changes) - len(shown)} more")
    if report.unchecked:
        lines.append(f"  unchecked (only partly in git): {', '.join(report.unchecked)}")
    if report.orphans:
        lines.append(f"  {len(report.orphans)} dvc.lock entries name no stage of dvc.yaml (ignored)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.freshness [MATRIX ...]``: exit 1 when a matrix's dvc.lock is stale."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("matrices", nargs="*", metavar="MATRIX",
                   help="folders under benchmarks/ (default: all), or the path of any DVC project's folder")
    p.add_argument("--all", action="store_true", help="print every change (default: 8 per stage)")
    p.add_argument("--summary", action="store_true", help="print one line per matrix")
    args = p.parse_args(argv)
    known = matrices()
    if unknown := [m for m in args.matrices if m not in known and not (Path(m) / "dvc.yaml").is_file()]:
        print(f"freshness: each MATRIX must be one of {known} or a folder holding a dvc.yaml. Got {unknown}.",
              file=sys.stderr)
        return 2
    start, any_stale = time.perf_counter(), False
    for matrix in args.matrices or known:
        try:
            if matrix in known:
                report = check(PROJECT / "benchmarks" / matrix, regenerate=matrix_regenerate(matrix))
            else:
                report = check(matrix)
        except FreshnessError as error:
            print(error, file=sys.stderr)
            return 2
        any_stale |= bool(report.stale)
        text = format_report(matrix, report, max_changes=None if args.all else 8)
        print(text.splitlines()[0] if args.summary else text)
    print(f"{'stale' if any_stale else 'fresh'} ({time.perf_counter() - start:.1f} s)")
    return 1 if any_stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
