"""How long a small experiment takes, end to end, and how much of it is orchestration.

    python -m benchmarks.small_experiment [--runs 2] [--modes prefect,off] [-S key=value ...]

Researchers iterate on small configs; this times the one issue 22 names, as a user runs it:
``dvc exp run -S download.max_per_class=20 -S federation.rounds=3 -S model.width=4`` in a fresh clone of the
committed project (its own DVC cache, so nothing is restored from a run cache), each run in a clone of its own.
Set ``FEDAUDIO_MIRROR`` to read the archive offline. Per run it prints the wall time of the whole command and of
each stage (from DVC's ``Running stage`` lines as they appear), and the seconds the federated rounds themselves
took (``metrics/federate.run.json``); what is left is orchestration: Python start-up and imports, Prefect's
servers and flow runs, MLflow, DVC. Each run is timed in every mode of ``--modes``, interleaved: ``prefect`` (the
default: each stage a Prefect flow run on the shared server) and ``off`` (``FEDAUDIO_PREFECT=off``: no Prefect,
:mod:`tasks.orchestration`). It also times ``fedaudio --help``, ``fedaudio run --help`` and
``python -m flows.federate --help`` (medians of three). Writes
``benchmarks/results/small_experiment.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
SMALL = ["download.max_per_class=20", "federation.rounds=3", "model.width=4"]
MODES = {"prefect": {}, "off": {"FEDAUDIO_PREFECT": "off"}}
"""The environment each mode adds (tasks.orchestration.PREFECT_ENV)."""


def timed_run(project: Path, overrides: list[str], env: dict[str, str]) -> dict[str, object]:
    """``dvc exp run -S ...`` in ``project``: total and per-stage wall seconds, the rounds' own seconds."""
    command = [str(Path(sys.executable).with_name("dvc")), "exp", "run", *[a for o in overrides for a in ("-S", o)]]
    stages: dict[str, float] = {}
    current, started = None, time.perf_counter()
    stage_start = started
    with subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if found := re.match(r"Running stage '([^']+)'", line.strip()):
                now = time.perf_counter()
                if current:
                    stages[current] = now - stage_start
                current, stage_start = found.group(1), now
    total = time.perf_counter() - started
    if current:
        stages[current] = time.perf_counter() - stage_start
    if process.returncode != 0:
        tail = "".join(lines[-40:])
        raise SystemExit(f"small_experiment: {' '.join(command)} failed ({process.returncode}):\n{tail}")
    record = json.loads((project / "metrics" / "federate.run.json").read_text())
    rounds = sum(t["round_seconds"] for t in record.get("round_timings", []))
    return {"total_s": total, "stages_s": stages, "rounds_s": rounds, "orchestration_share": 1 - rounds / total}


HELP_COMMANDS = {"fedaudio --help": ["fedaudio", "--help"], "fedaudio run --help": ["fedaudio", "run", "--help"],
                 "python -m flows.federate --help": ["python", "-m", "flows.federate", "--help"]}


def help_seconds(env: dict[str, str]) -> dict[str, float]:
    """Seconds each command's help takes (the median of three)."""
    found = {}
    for name, argv in HELP_COMMANDS.items():
        times = []
        for _ in range(3):
            started = time.perf_counter()
            subprocess.run([str(Path(sys.executable).with_name(argv[0])), *argv[1:]], cwd=PROJECT, env=env,
                           check=True, capture_output=True)
            times.append(time.perf_counter() - started)
        found[name] = sorted(times)[1]
    return found


def main(argv: list[str] | None = None) -> int:
    """Clone, run the small experiment ``--runs`` times, print and save the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--modes", default="prefect,off", help="comma-separated: prefect (the default of a stage), off "
                   "(FEDAUDIO_PREFECT=off)")
    p.add_argument("-S", "--set", action="append", default=None, metavar="KEY=VALUE",
                   help=f"the experiment's overrides (default: {' '.join(SMALL)})")
    p.add_argument("--out", type=Path, default=PROJECT / "benchmarks" / "results" / "small_experiment.json")
    args = p.parse_args(argv)
    overrides = args.set or SMALL
    if subprocess.run(["git", "status", "--porcelain", "--", "fedcore", "tasks", "flows", "dvc.yaml", "params.yaml"],
                      cwd=PROJECT, capture_output=True, text=True).stdout.strip():
        print("small_experiment: uncommitted changes to the code or params are not in the clone it times",
              file=sys.stderr)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("FEDAUDIO_PREFECT", None)  # each mode sets its own
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        p.error(f"--modes: choose from {', '.join(MODES)}; got {args.modes!r}")
    runs = []
    for i in range(args.runs):
        for mode in modes:
            with tempfile.TemporaryDirectory(prefix="small-experiment-") as scratch:
                project = Path(scratch) / "project"
                subprocess.run(["git", "clone", "--quiet", str(PROJECT), str(project)], check=True)
                result = {"mode": mode, **timed_run(project, overrides, {**env, **MODES[mode]})}
                runs.append(result)
                stages = ", ".join(f"{name} {s:.1f}" for name, s in result["stages_s"].items())  # type: ignore[union-attr]
                print(f"run {i + 1} ({mode}): {result['total_s']:.1f} s end to end; rounds "
                      f"{result['rounds_s']:.1f} s; orchestration {100 * result['orchestration_share']:.0f} %; "
                      f"stages (s): {stages}", flush=True)
    help_s = help_seconds(env)
    for name, seconds in help_s.items():
        print(f"{name}: {seconds:.2f} s")
    summary = {"command": "dvc exp run " + " ".join(f"-S {o}" for o in overrides), "runs": runs, "help_s": help_s,
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "host": platform.node()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
