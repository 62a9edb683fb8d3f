#!/usr/bin/env bash
# Create Flower's own venv (.venv-flower at the repo root) for benchmarks/flower_app.py and install
# benchmarks/flower/requirements.txt into it. Separate from .venv because flwr[simulation] 1.41.0 pins fastapi and
# ray versions that conflict with the project's prefect pins. Idempotent: an existing venv is reused and pip skips
# what is already installed.
#
#   bash benchmarks/flower/setup.sh            # PYTHON=/path/to/python3.11 to choose the interpreter
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="$root/.venv-flower"
requirements="$root/benchmarks/flower/requirements.txt"

if [[ -z "${PYTHON:-}" ]]; then
    # The interpreter the project's venv was made from, else python3.11 on PATH.
    PYTHON="$(sed -n 's/^executable *= *//p' "$root/.venv/pyvenv.cfg" 2>/dev/null || true)"
    [[ -x "$PYTHON" ]] || PYTHON="$(command -v python3.11)"
fi

if [[ -x "$venv/bin/python" ]]; then
    echo "setup.sh: reusing $venv ($("$venv/bin/python" --version))"
else
    echo "setup.sh: creating $venv with $PYTHON ($("$PYTHON" --version))"
    "$PYTHON" -m venv "$venv"
fi

echo "setup.sh: installing $requirements"
"$venv/bin/python" -m pip install --disable-pip-version-check -r "$requirements"

"$venv/bin/python" - <<'PY'
import importlib.metadata as md

print("setup.sh: installed " + ", ".join(f"{p} {md.version(p)}" for p in ("flwr", "ray", "torch", "numpy")))
PY
