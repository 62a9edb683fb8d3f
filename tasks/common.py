"""Shared I/O of the task layer: params loading, atomic writes, project paths.

Every writer here creates files and folders with the permissions a plain ``open()`` or ``mkdir`` gives under the
process's umask (0644 and 0755 under the usual umask 022), like every other writer of the project, so that an
output's mode does not depend on which helper wrote it.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fedcore.config import Params, load_params
from fedcore.data.datasets import with_dataset_defaults
from fedcore.errors import ConfigError

PARAMS_FILE = "params.yaml"


def read_params(path: str | Path = PARAMS_FILE, sections: Sequence[str] | None = None) -> Params:
    """Parse and check a params file; raise one ConfigError listing every problem.

    ``sections``: check only these and leave the others at their defaults (a stage that reads three sections
    then imports only their families: the data stages never import torch for it). The pipeline's ``check`` stage
    checks every section before any other stage runs. ``features`` brings ``download`` with it: a dataset has
    its own feature defaults (:func:`~fedcore.data.datasets.with_dataset_defaults`).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params: file {str(path)!r} not found. Run from the project root or pass --params.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"params: {path} is not valid YAML: {error}") from error
    wanted = None if sections is None else list(dict.fromkeys(
        [*sections, "download"] if "features" in sections else sections))
    return with_dataset_defaults(load_params(raw, wanted))


def write_json(path: str | Path, data: Mapping[str, Any] | list[Any], *, sort_keys: bool = False) -> None:
    """Write JSON atomically (temp file + rename), so a kill never leaves half a file.

    ``sort_keys`` for records that may come back from a checkpoint (stored with sorted keys) or from memory, so
    that the file is the same either way.
    """
    write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically: a temporary file beside ``path``, then a rename over it.

    The file gets the mode ``open()`` gives (0666 less the umask), not the 0600 of :mod:`tempfile`'s files; on
    any failure the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        with open(tmp, "x", encoding="utf-8") as handle:  # "x": a new file, never one that exists
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _temporary_name(path: Path) -> Path:
    """A hidden name beside ``path``, unique to this process and call (concurrent writers never share one)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> None:
    """Save a matplotlib figure atomically as PNG (mode as :func:`write_text`) and close it."""
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        pyplot().close(fig)
