"""Apply ``key=value`` overrides to a params file the way ``dvc exp run -S`` does, keeping the file's layout.

The overrides are parsed and applied by DVC's own code (:func:`dvc.utils.hydra.apply_overrides`, Hydra's override
grammar on the file's data in struct mode: an unknown key is an error, ``+key=value`` adds one, ``~key`` deletes
one, ``key=null`` writes a null). Only the writing differs: DVC rewrites the whole file (every ``null`` becomes a
blank, flow-style lists turn into blocks), while :func:`render` changes only the values that changed and keeps
every comment, ``null`` and list style of the rest.

The written file reads alike in both YAML dialects the project has: DVC records params with ruamel (YAML 1.2)
and the stages read them with PyYAML (YAML 1.1), which disagree on ``1e-05`` (a float, or a string) and ``yes``
(a string, or True). Floats are written with a mantissa point (``1.0e-05``), such strings quoted, and the result
is read back by both and compared with what DVC computed before anything is written.

:func:`overridden` applies overrides for the length of a run and then puts the file back, so the next run starts
from the same file; a run killed meanwhile leaves a note that the next one uses to put the file back first.
"""

from __future__ import annotations

import difflib
import fcntl
import io
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedcore.errors import ConfigError, FedcoreError
from tasks.common import write_text

log = logging.getLogger(__name__)

#: Where a run keeps the lock and the note of the params file it changed (DVC's own scratch folder, git-ignored).
STATE_DIR = Path(".dvc") / "tmp"
LOCK_NAME = "fedaudio-pipeline.lock"
NOTE_NAME = "fedaudio-overrides.json"


class ProjectBusyError(FedcoreError):
    """Another pipeline run holds the project (its params file and its stages)."""


@dataclass(frozen=True)
class Change:
    """One value a set of overrides changed: ``key`` (dotted), its value before and after (None: absent)."""

    key: str
    before: Any
    after: Any
    added: bool = False
    removed: bool = False


# ------------------------------------------------------------------------------------------------------ parsing
def parse(override: str) -> Any:
    """Parse one ``key=value`` override with DVC's parser (Hydra's grammar); raise ConfigError naming it.

    Sweeps (``key=1,2``, ``range(...)``) are refused: DVC runs them only from a queue, and a run takes one value.
    """
    from dvc.utils.hydra import to_hydra_overrides
    from hydra.errors import OverrideParseException

    try:
        (parsed,) = to_hydra_overrides([override])
    except (OverrideParseException, ValueError) as error:
        raise ConfigError(f"override {override!r} is not 'key=value' (dvc exp run -S syntax): {error}") from None
    if parsed.is_sweep_override():
        raise ConfigError(f"override {override!r} sweeps over several values; a run takes one value per key.")
    return parsed


def key_of(override: str) -> str:
    """The dotted key an override sets (``federation.rounds`` of ``federation.rounds=3``)."""
    return str(parse(override).key_or_group)


def check_key(key: str, known: Sequence[str]) -> None:
    """Raise ConfigError unless ``key`` is one of ``known`` dotted keys or lies inside one (a mapping's entry)."""
    if any(key == k or key.startswith(k + ".") for k in known):
        return
    close = difflib.get_close_matches(key, known, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"override: {key!r} is not a param (section.key of params.yaml).{hint}")


def format_value(value: Any) -> str:
    """``value`` in override syntax, parsed back by :func:`parse` to the same value (str, int, float, bool, None)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
    if isinstance(value, str):
        try:
            plain = parse(f"key={value}").value()
        except ConfigError:
            plain = None
        if isinstance(plain, str) and plain == value:
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    raise TypeError(f"override: values are str, int, float, bool or None. Got {value!r}.")


# ----------------------------------------------------------------------------------------------------- applying
def _rt_yaml() -> Any:
    """Round-trip YAML (ruamel) in the layout DVC's own ``-S`` writer gives, plus values both readers agree on.

    The params files are kept in the form ``dvc exp run -S`` writes (ruamel's round-trip defaults: a null is a
    blank, lists indented by two, ``''`` quotes), so DVC's writer and this one change only the overridden lines
    (``tests/tasks/test_overrides.py`` checks both on every params file). New floats and strings are written so
    that PyYAML (the stages) reads them as DVC (YAML 1.2) does: ``1.0e-05``, ``'yes'``.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.representer import RoundTripRepresenter

    class Representer(RoundTripRepresenter):  # a subclass: ruamel's add_representer changes the class it is called on
        pass

    Representer.add_representer(float, _represent_float)
    Representer.add_representer(str, _represent_str)
    rt = YAML(typ="rt")
    rt.Representer = Representer
    return rt


def _represent_float(representer: Any, value: float) -> Any:
    if math.isnan(value):
        text = ".nan"
    elif math.isinf(value):
        text = ".inf" if value > 0 else "-.inf"
    else:
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:
            text = f"{mantissa}.0e{exponent}"  # YAML 1.1 (PyYAML) reads 1e-05 as a string
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def _represent_str(representer: Any, value: str) -> Any:
    try:  # quoted where PyYAML would read the plain scalar as something else (yes, on, 1e-05, null, ...)
        plain = yaml.safe_load(f"k: {value}") if value and "\n" not in value else None
    except yaml.YAMLError:
        plain = None
    ambiguous = not isinstance(plain, dict) or plain.get("k") != value
    return representer.represent_scalar("tag:yaml.org,2002:str", value, style="'" if ambiguous else None)


def _both_readers(text: str) -> tuple[Any, Any]:
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text), yaml.safe_load(text)


def _same(a: Any, b: Any) -> bool:
    """Equal values of equal types, all the way down (1 and 1.0 and True differ)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in dict.fromkeys([*a, *b]):
            if key not in a or key not in b or not _same(a[key], b[key]):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return prefix.rstrip(".")


def _merge(doc: Any, new: Mapping[str, Any], old: Mapping[str, Any], prefix: str, changes: list[Change]) -> None:
    """Set into the round-trip ``doc`` only what differs between ``old`` and ``new``; record each change."""
    from ruamel.yaml.comments import CommentedSeq

    for key in list(doc):
        if key not in new:
            changes.append(Change(prefix + str(key), old[key], None, removed=True))
            del doc[key]
    for key, value in new.items():
        if key in doc and isinstance(doc[key], Mapping) and isinstance(value, Mapping):
            _merge(doc[key], value, old[key], f"{prefix}{key}.", changes)
        elif key not in doc or not _same(old[key], value):
            before = old.get(key)
            previous = doc.get(key)
            if isinstance(value, list) and isinstance(previous, CommentedSeq) and previous.fa.flow_style():
                value = CommentedSeq(value)  # a flow-style list stays one ([1, 20])
                value.fa.set_flow_style()
            changes.append(Change(prefix + str(key), before, new[key], added=key not in doc))
            doc[key] = value


def render(text: str, overrides: Sequence[str]) -> tuple[str, list[Change]]:
    """Apply ``overrides`` to the params file ``text`` as ``dvc exp run -S`` would; return the new text and changes.

    Raises
    ------
    ConfigError
        An override DVC refuses (syntax, unknown key without ``+``, a sweep), or a value that DVC and the stages
        would read differently.
    """
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    for override in overrides:
        parse(override)
    old, _ = _both_readers(text)
    old = old or {}
    with tempfile.TemporaryDirectory(prefix="fedaudio-params-") as scratch:
        copy = Path(scratch) / "params.yaml"
        copy.write_text(text)
        try:
            apply_overrides(copy, list(overrides))  # DVC's -S: Hydra's grammar, struct mode
        except InvalidArgumentError as error:
            cause = error.__cause__
            raise ConfigError(f"override: DVC refused {list(overrides)}: {cause or error}".strip()) from None
        new, _ = _both_readers(copy.read_text())
    rt = _rt_yaml()
    doc = rt.load(text)
    changes: list[Change] = []
    _merge(doc, new or {}, old, "", changes)
    stream = io.StringIO()
    rt.dump(doc, stream)
    result = stream.getvalue()
    dvc_reads, stage_reads = _both_readers(result)
    for reader, data in (("DVC (YAML 1.2)", dvc_reads), ("the stages (PyYAML, YAML 1.1)", stage_reads)):
        if not _same(data, new):
            key = _first_difference(data, new)
            raise ConfigError(f"override: {reader} would read {key!r} of the written params file differently from "
                             "the value DVC computed; write it in a form both read alike (e.g. 1.0e-05, 'yes').")
    return result, changes


def apply_to_file(path: str | Path, overrides: Sequence[str]) -> list[Change]:
    """Apply ``overrides`` to the params file at ``path`` (atomically; untouched if they change nothing)."""
    path = Path(path)
    text = path.read_text()
    result, changes = render(text, overrides)
    if result != text:
        write_text(path, result)
    return changes


# ------------------------------------------------------------------------------------------------ for one run
@contextmanager
def run_lock(root: str | Path) -> Iterator[None]:
    """Hold the project's pipeline lock: one run at a time changes its params file and runs its stages."""
    path = Path(root) / STATE_DIR / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ProjectBusyError(f"pipeline: another run ({holder}) is using this project; wait for it to end "
                               "(a Prefect deployment queues its runs: concurrency_limit 1).") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def restore_left_file(root: str | Path, path: str | Path) -> bool:
    """Put back the params file a killed run left changed (if nobody edited it since); return whether it did."""
    note_path = Path(root) / STATE_DIR / NOTE_NAME
    if not note_path.exists():
        return False
    note = json.loads(note_path.read_text())
    path = Path(path)
    restored = False
    if path.exists() and path.read_text() == note["applied"]:
        write_text(path, note["original"])
        log.warning("put back %s as it was before an interrupted run changed it (%s)", path,
                    " ".join(note.get("overrides", [])))
        restored = True
    else:
        log.warning("an interrupted run left a note about %s, but the file was edited since; left as it is", path)
    note_path.unlink()
    return restored


@contextmanager
def overridden(root: str | Path, path: str | Path, overrides: Sequence[str]) -> Iterator[list[Change]]:
    """Apply ``overrides`` to the params file for the length of the block, then put the file back.

    Call it under :func:`run_lock`. A note of the original and the changed text is kept until the file is put
    back, so that a run killed meanwhile (where no ``finally`` runs) is undone by :func:`restore_left_file` at
    the start of the next one. A file edited during the run is left as the editor left it.
    """
    path = Path(path)
    restore_left_file(root, path)
    original = path.read_text()
    result, changes = render(original, overrides) if overrides else (original, [])
    if result == original:
        yield changes
        return
    note_path = Path(root) / STATE_DIR / NOTE_NAME
    write_text(note_path, json.dumps({"original": original, "applied": result, "overrides": list(overrides)}))
    write_text(path, result)
    try:
        yield changes
    finally:
        if path.read_text() == result:
            write_text(path, original)
        else:
            log.warning("%s was edited during the run; left as it is (not put back)", path)
        note_path.unlink(missing_ok=True)

