"""Screenshots of MLflow's and Prefect's UIs after a run of the default study, for docs/img.

    make screenshots                       # or: <python with playwright> scripts/screenshots.py [options]

In a fresh clone of this project (so its MLflow store and Prefect database are new and yours are untouched) it
runs the default study as a user does, ``fedaudio run`` (add ``-S key=value`` to change params, e.g.
``-S federation.rounds=10`` for a quicker run), with Prefect's database in the clone. Then it starts MLflow's UI
(``fedaudio ui``) and a Prefect server on those stores and saves, with headless Chromium driven by Playwright:

- ``mlflow-models.png``: the experiment's Models tab in model-training mode, one logged model per round with its
  ``global_accuracy`` and ``global_loss``;
- ``mlflow-models-chart.png``: the same models as charts (the view in which one picks a round);
- ``mlflow-round.png``: the page of the round with the best ``global_accuracy`` (the model one would pick);
- ``mlflow-runs-chart.png``: the federate runs charted in the view the stage saves, accuracy and loss first
  (``tasks.tracking.chart_view_tag``; the address ``fedaudio ui`` prints);
- ``prefect-pipeline.png``: the pipeline's flow run (``repro <stage>`` task runs and their logs);
- ``prefect-federate.png``: the federate stage's flow run (``train client c round r`` task runs).

Needs Playwright (``pip install playwright``; ``make screenshots`` installs it into ``.venv-screenshots``) and a
Chromium (``--chromium``, default ``/usr/bin/chromium``; Debian: ``apt-get install chromium``): Playwright's own
browser download is not needed. The project's environment (``.venv``, ``make setup``) runs the study and the UIs.
Set ``FEDAUDIO_MIRROR`` to read the datasets offline, as for ``make run``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
VIEWPORT = {"width": 1440, "height": 900}
ML_MODE = "workflowType=machine_learning"
"""MLflow 3.17's UI opens in GenAI mode unless the address asks for model training (tasks.tracking.UI_MODE)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str, body: dict[str, Any] | None = None, timeout_s: float = 30.0) -> Any:
    """GET ``url`` (POST ``body`` as JSON when given) and parse the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - local servers only
        return json.loads(response.read() or b"null")


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout_s: float = 180.0) -> None:
    """Wait until ``url`` answers; fail if ``process`` (its server) exits first or it takes ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise SystemExit(f"screenshots: the server for {url} exited ({process.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=5):  # noqa: S310 - local servers only
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"screenshots: {url} did not answer within {timeout_s:.0f} s") from None
            time.sleep(1.0)


@contextmanager
def server(command: list[str], health: str, cwd: Path, env: dict[str, str], log: Path) -> Iterator[None]:
    """Run a server in its own process group until the block ends."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            wait_until_up(health, process)
            yield
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)


def run_study(clone: Path, overrides: list[str], env: dict[str, str]) -> None:
    """``fedaudio run -S ...`` in ``clone``: the default study, as a user runs it."""
    command = [str(PROJECT / ".venv" / "bin" / "fedaudio"), "run", *[a for o in overrides for a in ("-S", o)]]
    print("screenshots: $ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=clone, env=env, check=True)


def mlflow_ids(api: str, experiment: str) -> tuple[str, str]:
    """The experiment's id and the id of its logged model with the best ``global_accuracy``."""
    found = http_json(f"{api}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}")
    experiment_id = found["experiment"]["experiment_id"]
    models = http_json(f"{api}/api/2.0/mlflow/logged-models/search", {
        "experiment_ids": [experiment_id], "max_results": 1,
        "order_by": [{"field_name": "metrics.global_accuracy", "ascending": False}]})
    return experiment_id, models["models"][0]["info"]["model_id"]


def prefect_run(api: str, flow_name: str) -> str:
    """The id of the latest flow run of ``flow_name``."""
    runs = http_json(f"{api}/api/flow_runs/filter", {"flows": {"name": {"any_": [flow_name]}},
                                                     "sort": "START_TIME_DESC", "limit": 1})
    if not runs:
        raise SystemExit(f"screenshots: no flow run of {flow_name!r} in the clone's Prefect database")
    return str(runs[0]["id"])


def close_assistant(page: Any) -> None:
    """MLflow 3.17 opens an assistant panel beside every page; close it when it is there."""
    close = page.locator("button[aria-label='Close']")
    if close.count():
        close.first.click()
        page.wait_for_timeout(500)


def mlflow_shots(page: Any, ui: str, experiment_id: str, best_model: str, out: Path, settle_ms: int) -> list[Path]:
    """The Models tab (accuracy and loss columns, then charts), the best round's page, the runs' chart view."""
    shots = []
    page.goto(f"{ui}/#/experiments/{experiment_id}/models?{ML_MODE}")
    page.wait_for_timeout(settle_ms)
    close_assistant(page)
    page.get_by_text("Columns", exact=True).click()
    menu = page.get_by_role("menu", name="Columns")
    for name in ("Status", "Logged from", "Dataset"):
        menu.get_by_text(name, exact=True).click()
    menu.locator(".du-bois-light-tree-treenode", has_text="No dataset").locator(
        ".du-bois-light-tree-switcher").click()
    page.wait_for_timeout(500)
    keep = {"global_accuracy", "global_loss", "personalised_accuracy_mean"}
    for title in menu.locator(".du-bois-light-tree-title").all_inner_texts()[8:]:  # the metrics, after "No dataset"
        if title not in keep:
            menu.get_by_text(title, exact=True).click()
    page.keyboard.press("Escape")
    page.wait_for_timeout(1000)
    shots.append(out / "mlflow-models.png")
    page.screenshot(path=str(shots[-1]))
    page.locator("label", has=page.locator("input[value=CHART]")).click()  # table | chart view
    page.wait_for_timeout(settle_ms)
    shots.append(out / "mlflow-models-chart.png")
    page.screenshot(path=str(shots[-1]))
    page.goto(f"{ui}/#/experiments/{experiment_id}/models/{best_model}?{ML_MODE}")
    page.wait_for_timeout(settle_ms)
    close_assistant(page)
    shots.append(out / "mlflow-round.png")
    page.screenshot(path=str(shots[-1]))
    page.goto(f"{ui}/#/experiments/{experiment_id}/runs?{ML_MODE}&compareRunsMode=CHART&viewStateShareKey=federate")
    page.wait_for_timeout(settle_ms)
    close_assistant(page)
    shots.append(out / "mlflow-runs-chart.png")
    page.screenshot(path=str(shots[-1]))
    return shots


def prefect_shots(page: Any, ui: str, out: Path, settle_ms: int) -> list[Path]:
    """The latest pipeline and federate flow runs."""
    shots = []
    for flow_name, name, tab in (("pipeline", "prefect-pipeline.png", None),
                                 ("federate", "prefect-federate.png", "Task Runs")):
        page.goto(f"{ui}/runs/flow-run/{prefect_run(ui, flow_name)}")
        page.wait_for_timeout(settle_ms)
        if tab:  # the federate run's tasks: `train client c round r`
            page.get_by_text(tab, exact=True).first.click()
            page.wait_for_timeout(settle_ms // 2)
        shots.append(out / name)
        page.screenshot(path=str(shots[-1]))
    return shots


def main(argv: list[str] | None = None) -> int:
    """Run the study in a clone, start the two UIs on its stores, save the screenshots."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="param override for the study's run, as `dvc exp run -S` (repeatable; default: none)")
    p.add_argument("--out", type=Path, default=PROJECT / "docs" / "img",
                   help="folder of the PNGs (default: docs/img)")
    p.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium to drive (default: /usr/bin/chromium)")
    p.add_argument("--keep", type=Path, default=None,
                   help="run in this folder and keep it (default: a temporary folder, removed at the end)")
    p.add_argument("--settle-ms", type=int, default=6000, help="wait for each page to render (default: 6000)")
    p.add_argument("--no-run", action="store_true",
                   help="reuse the run already in --keep's folder (new screenshots of the same run)")
    args = p.parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SystemExit("screenshots: needs Playwright (pip install playwright; `make screenshots` does it)") \
            from None
    if not Path(args.chromium).is_file():
        raise SystemExit(f"screenshots: no Chromium at {args.chromium} (Debian: apt-get install chromium)")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedaudio-screenshots-") as scratch:
        work = args.keep or Path(scratch)
        clone = work / "project"
        if not clone.exists():
            subprocess.run(["git", "clone", "--quiet", str(PROJECT), str(clone)], check=True)
        venv_bin = PROJECT / ".venv" / "bin"
        env = dict(os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
                   PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="true")
        env.pop("PREFECT_API_URL", None)
        env.pop("MLFLOW_TRACKING_URI", None)
        if not (args.no_run and args.keep):
            run_study(clone, args.set, env)
        mlflow_port, prefect_port = free_port(), free_port()
        mlflow_ui, prefect_ui = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}"
        with server([str(venv_bin / "fedaudio"), "ui", "--port", str(mlflow_port)], f"{mlflow_ui}/health", clone,
                    env, work / "mlflow-ui.log"), \
             server([str(venv_bin / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                     str(prefect_port)], f"{prefect_ui}/api/health", clone,
                    dict(env, PREFECT_UI_API_URL=f"{prefect_ui}/api"), work / "prefect-server.log"), \
             sync_playwright() as playwright:
            experiment_id, best_model = mlflow_ids(mlflow_ui, "fedaudio")
            browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport=VIEWPORT)
                shots = mlflow_shots(page, mlflow_ui, experiment_id, best_model, args.out, args.settle_ms)
                shots += prefect_shots(page, prefect_ui, args.out, args.settle_ms)
            finally:
                browser.close()
    for shot in shots:
        print(f"written {shot} ({shot.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
