"""Nothing exposed, nothing left running, consistent file modes (issue 19, item 6).

Real processes throughout: local Dask and Ray clusters whose sockets are listed, a stage killed with SIGKILL
while its temporary Prefect server and a local Ray cluster run, and the partition stage's writers under a umask.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from fedcore.config import FeaturesConfig, PartitionConfig, to_dict
from fedcore.data.features import label_index, write_feature_store
from tasks.common import pyplot, save_figure, write_json, write_text
from tests.flows.conftest import alive as _alive

LISTENING_SCRIPT = r'''
import json, os, sys
import psutil
from flows.runners import RUNNERS

def work(i):
    return os.getpid()

runner = RUNNERS.build(sys.argv[1], max_workers=2)
with runner:
    if sys.argv[1] == "dask":
        scheduler = runner.client.scheduler.address
        pids = set(runner.client.gather(runner.client.map(work, range(4), pure=False)))
    else:
        import ray
        scheduler = ray.get_runtime_context().gcs_address
        pids = set(ray.get([ray.remote(work).remote(i) for i in range(4)]))
    me = psutil.Process()
    sockets = []
    for process in [me, *me.children(recursive=True)]:
        for c in process.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr):
                sockets.append([process.pid, process.name(), c.laddr.ip, c.laddr.port])
    print(json.dumps({"scheduler": scheduler, "workers": sorted(pids), "sockets": sockets}))
'''

SLEEPY_STAGE = r'''"""A stage whose flow waits while its two clients sleep (a kill test's target)."""

import argparse
import time
from pathlib import Path

from prefect import flow, task

from flows import stage
from flows.runners import RUNNERS


@task
def client(marker: str) -> None:
    Path(marker).touch()
    time.sleep(600)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runner", default="threads")
    p.add_argument("--markers", required=True)


def _main(args: argparse.Namespace) -> None:
    @flow(task_runner=RUNNERS.build(args.runner, max_workers=2))
    def sleepy() -> None:
        for future in [client.submit(f"{args.markers}/{i}") for i in range(2)]:
            future.result()

    sleepy()


if __name__ == "__main__":
    raise SystemExit(stage.entry(__doc__, _arguments, _main))
'''


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}, **extra)
    return env


@pytest.mark.parametrize("runner", ["dask", "ray"])
def test_local_clusters_listen_on_loopback_only(runner: str, tmp_path: Path) -> None:
    pytest.importorskip({"dask": "prefect_dask", "ray": "prefect_ray"}[runner])
    result = subprocess.run([sys.executable, "-c", LISTENING_SCRIPT, runner], capture_output=True, text=True,
                            env=_env(), cwd=tmp_path, timeout=240, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    sockets = found["sockets"]
    assert len(found["workers"]) == 2  # both workers ran a task, so their servers were up when listed
    assert {pid for pid, *_ in sockets} >= set(found["workers"])
    exposed = [s for s in sockets if not _loopback(s[2])]
    assert not exposed, f"{runner}: sockets open beyond the loopback interface: {exposed}"
    if runner == "dask":
        assert found["scheduler"].startswith("tls://127.0.0.1:")  # TLS: only this cluster's certificate gets in
    else:
        assert found["scheduler"].startswith("127.0.0.1:")
        assert {"gcs_server", "raylet"} <= {name for _, name, *_ in sockets}


def _start_stage(folder: Path, runner: str, api_url: str | None) -> tuple[subprocess.Popen[bytes], Path]:
    folder.mkdir()
    (folder / "sleepy.py").write_text(SLEEPY_STAGE)
    (folder / "markers").mkdir()
    extra = {"PREFECT_HOME": str(folder / "prefect")}
    if api_url:
        extra["PREFECT_API_URL"] = api_url
    with open(folder / "log.txt", "wb") as log:
        process = subprocess.Popen([sys.executable, "sleepy.py", "--runner", runner, "--markers", "markers"],
                                   cwd=folder, env=_env(**extra), stdout=log, stderr=subprocess.STDOUT)
    return process, folder


def _wait_running(process: subprocess.Popen[bytes], folder: Path, timeout_s: float) -> list[psutil.Process]:
    """Wait until both clients of the stage run (its server and cluster are up); its descendants then."""
    deadline = time.monotonic() + timeout_s
    while len(list((folder / "markers").iterdir())) < 2:
        assert process.poll() is None, (folder / "log.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, f"stage not running after {timeout_s} s"
        time.sleep(0.2)
    return psutil.Process(process.pid).children(recursive=True)


def _kill_and_wait(process: subprocess.Popen[bytes], descendants: list[psutil.Process],
                   timeout_s: float) -> tuple[list[psutil.Process], float]:
    """SIGKILL ``process``; return the descendants still running after ``timeout_s`` and the time they took."""
    process.send_signal(signal.SIGKILL)
    process.wait()
    start = time.monotonic()
    while _alive(descendants) and time.monotonic() - start < timeout_s:
        time.sleep(0.1)
    return _alive(descendants), time.monotonic() - start


def _describe(processes: list[psutil.Process]) -> list[str]:
    described = []
    for p in processes:
        try:
            described.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            described.append(str(p.pid))
    return described


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def test_a_killed_stage_leaves_nothing_running_and_spares_a_server_it_was_handed(
    tmp_path: Path, started: list[psutil.Process]
) -> None:
    """Stage A starts its own temporary server and a local Ray cluster; stage B is handed A's server (as the
    pipeline flow hands its server to the DVC stages). kill -9 of B leaves A's server serving; kill -9 of A
    ends every process A started, its server and Ray's processes included, within seconds."""
    pytest.importorskip("prefect_ray")
    stage_a, folder_a = _start_stage(tmp_path / "a", "ray", api_url=None)
    started.append(psutil.Process(stage_a.pid))
    tree_a = _wait_running(stage_a, folder_a, timeout_s=300)  # a Ray cluster and a server, on a busy machine
    started.extend(tree_a)
    servers = [p for p in tree_a if "uvicorn" in p.cmdline()]
    assert len(servers) == 1, _describe(tree_a)  # the stage's temporary server; the Ray workers started none
    port = servers[0].cmdline()[servers[0].cmdline().index("--port") + 1]
    api_url = f"http://127.0.0.1:{port}/api"
    assert {"gcs_server", "raylet"} <= {p.name() for p in tree_a}

    stage_b, folder_b = _start_stage(tmp_path / "b", "threads", api_url=api_url)
    started.append(psutil.Process(stage_b.pid))
    tree_b = _wait_running(stage_b, folder_b, timeout_s=60)
    started.extend(tree_b)
    assert not [p for p in tree_b if "uvicorn" in p.cmdline()]  # B uses A's server
    left_b, _ = _kill_and_wait(stage_b, tree_b, timeout_s=10)
    assert not left_b, _describe(left_b)
    assert _healthy(api_url) and servers[0].is_running()

    left_a, took = _kill_and_wait(stage_a, tree_a, timeout_s=15)
    assert not left_a, f"left running {took:.1f} s after kill -9: {_describe(left_a)}"
    log = (folder_a / "log.txt").read_text()
    assert f"stage watchdog: process {stage_a.pid} ended without cleaning up" in log


@pytest.fixture()
def umask_027() -> Iterator[int]:
    """Umask 027 (files 0640, folders 0750: neither tempfile's 0600/0700 nor the usual 0644/0755)."""
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in sorted(root.rglob("*"))}


def test_writers_give_files_and_folders_the_umask_mode(tmp_path: Path, umask_027: int) -> None:
    write_text(tmp_path / "a" / "b" / "text.md", "héllo\n")
    write_json(tmp_path / "a" / "metrics.json", {"accuracy": 0.5})
    fig = pyplot().figure()
    save_figure(fig, tmp_path / "plots" / "rounds.png")
    modes = _modes(tmp_path)
    assert modes == {"a": 0o750, "a/b": 0o750, "a/b/text.md": 0o640, "a/metrics.json": 0o640,
                     "plots": 0o750, "plots/rounds.png": 0o640}
    assert (tmp_path / "a" / "b" / "text.md").read_bytes() == "héllo\n".encode()
    assert (tmp_path / "plots" / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json(target, {"round": 1})
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json(target, {"round": object()})
    with pytest.raises(UnicodeEncodeError):
        write_text(target, "\ud800")  # a lone surrogate cannot be written as UTF-8
    fig = pyplot().figure()
    fig.text(0.5, 0.5, r"$\frac{$")  # bad mathtext: savefig fails while drawing, after opening its file
    with pytest.raises(ValueError):
        save_figure(fig, tmp_path / "plot.png")
    assert json.loads(target.read_text()) == {"round": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_the_partition_stage_writes_its_outputs_with_the_umask_mode(tmp_path: Path, umask_027: int) -> None:
    from tasks.data import partition_clients

    store = tmp_path / "store"
    rng = np.random.default_rng(0)
    rows = [{"id": f"clip{i:03d}", "label": str(i % 10), "speaker": f"spk{i % 6}",
             "split": "train" if i < 240 else "test"} for i in range(300)]
    write_feature_store(store, rng.normal(size=(300, 4, 5)).astype(np.float32), rows,
                        label_index(r["label"] for r in rows), 0.0, 1.0, to_dict(FeaturesConfig()), "float32", [])
    partition_clients.fn(PartitionConfig(num_clients=4, min_samples=5), store, tmp_path / "out")
    modes = _modes(tmp_path)
    assert any(name.endswith(".png") for name in modes) and any(name.endswith(".json") for name in modes)
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o750 if (tmp_path / name).is_dir() else 0o640)}
    assert not wrong, f"modes other than the umask's 0640 (files) / 0750 (folders): {wrong}"
