"""A study's headline: the few numbers that ``dvc metrics show`` and ``dvc exp show`` lead with.

Every stage writes its whole summary (``metrics/.../<stage>.json``: every final score, detection figures, counts),
a plain output. A study's *DVC metrics* are only its headline, picked from a summary by this command, run as the
second command of the study's last stage (so no extra stage, and no summary file among ``dvc exp show``'s changed
dependencies), and nested under the study's name: the columns read ``fedavg.accuracy``, ``earlyexit.final_exit``,
... whatever else the studies' summaries share, and a ``dvc exp show --only-changed`` after one ``-S`` fits a
terminal.

``python -m flows.headline --study fedavg --out metrics/headline.json accuracy=metrics/federate.json:global_accuracy``

Each entry is ``NAME=FILE:KEY``. ``KEY`` is a key of the JSON file, or a dotted path into nested objects; one
component may be ``*``, which takes every key at that level, and ``NAME`` then holds ``*`` where that key goes
(``*=metrics/fassl/selection.json:tasks.*.best_test``: one headline per downstream task). No Prefect flow (it takes
a second).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from fedcore.errors import ConfigError
from flows import stage


def parse_entry(entry: str) -> tuple[str, Path, list[str]]:
    """``NAME=FILE:KEY`` → (name, file, key path)."""
    name, equals, source = entry.partition("=")
    path, colon, key = source.rpartition(":")
    if not (equals and colon and name and path and key) or ("*" in name) != ("*" in key.split(".")):
        raise ConfigError(f"headline: {entry!r} is not NAME=FILE:KEY (a '*' in NAME if and only if one component "
                          "of KEY is '*'), e.g. accuracy=metrics/federate.json:global_accuracy.")
    if key.split(".").count("*") > 1:
        raise ConfigError(f"headline: {entry!r} has more than one '*' in its KEY.")
    return name, Path(path), key.split(".")


def pick(data: Any, name: str, key: Sequence[str], where: str) -> dict[str, Any]:
    """The entries ``NAME → value`` that ``key`` selects in ``data`` (several when a component is ``*``)."""
    for i, part in enumerate(key):
        if not isinstance(data, Mapping):
            raise ConfigError(f"headline: {where} has no object at {'.'.join(key[:i]) or 'the top'} "
                              f"(a {type(data).__name__}).")
        if part == "*":
            picked: dict[str, Any] = {}
            for found in data:
                picked.update(pick(data[found], name.replace("*", str(found)), key[i + 1:], where))
            return picked
        if part not in data:
            raise ConfigError(f"headline: {where} has no key {'.'.join(key[:i + 1])!r}. Keys there: "
                              f"{', '.join(sorted(map(str, data))[:20])}.")
        data = data[part]
    if data is not None and (isinstance(data, bool) or not isinstance(data, (int, float)) or not math.isfinite(data)):
        raise ConfigError(f"headline: {where}: {'.'.join(key)} is not a finite number. Got {data!r}.")
    return {name: data}


def headline(entries: Sequence[str], root: Path = Path(".")) -> dict[str, Any]:
    """The study's headline numbers, in the order of ``entries``."""
    from tasks.common import read_json

    values: dict[str, Any] = {}
    for entry in entries:
        name, path, key = parse_entry(entry)
        if not (root / path).is_file():
            raise ConfigError(f"headline: {str(path)!r} not found (entry {entry!r}); run the stage that writes it.")
        for picked, value in pick(read_json(root / path), name, key, str(path)).items():
            if picked in values:
                raise ConfigError(f"headline: {picked!r} is named twice.")
            values[picked] = value
    return values


def _main(
    study: Annotated[str, typer.Option(metavar="NAME", help="the study: the file's one key (its columns read "
                                                            "<study>.<name>)")],
    out: Annotated[Path, typer.Option(metavar="FILE", help="the study's DVC metrics file")],
    entries: Annotated[list[str], typer.Argument(metavar="NAME=FILE:KEY", help="a headline number and where it "
                                                                               "comes from (one or more)",
                                                            show_default=False)],
) -> int:
    from tasks.common import write_json

    try:
        values = headline(entries)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    write_json(out, {study: values})
    print(f"{study}: " + ", ".join(f"{k} {v}" for k, v in values.items()))
    return 0


main = stage.command(__doc__, _main, prefect=False)
"""Command-line entry point (``python -m flows.headline``)."""

if __name__ == "__main__":
    raise SystemExit(main())
