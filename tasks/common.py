"""Shared I/O of the task layer: params loading, atomic writes, project paths."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from fedcore.config import Params, load_params
from fedcore.errors import ConfigError

PARAMS_FILE = "params.yaml"


def read_params(path: str | Path = PARAMS_FILE) -> Params:
    """Parse and check a params file; raise one ConfigError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params: file {str(path)!r} not found. Run from the project root or pass --params.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"params: {path} is not valid YAML: {error}") from error
    return load_params(raw)


def write_json(path: str | Path, data: Mapping[str, Any] | list[Any], *, sort_keys: bool = False) -> None:
    """Write JSON atomically (temp file + rename), so a kill never leaves half a file.

    ``sort_keys`` for records that may come back from a checkpoint (stored with sorted keys) or from memory, so
    that the file is the same either way.
    """
    write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write text atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
        tmp = Path(handle.name)
    os.replace(tmp, path)


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
    """Save a matplotlib figure atomically as PNG and close it."""
    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    pyplot().close(fig)
    os.replace(tmp, path)
