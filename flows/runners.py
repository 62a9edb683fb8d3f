"""Task runners for the client fan-out, by name (``execution.runner``): threads, processes, dask or ray.

A local Dask or Ray cluster (no ``execution.address``) listens on the loopback interface only (127.0.0.1), so
no other machine can reach it; its processes end with the stage (``flows.stage`` reaps them after a kill -9).
A cluster at ``execution.address`` is used as it is: secure it by its own means (README, "Runners").

Without Prefect (env ``FEDAUDIO_PREFECT=off``, :mod:`tasks.orchestration`) there is no task runner: the clients of
a round run in threads of the stage (:func:`client_executor`), so only ``execution.runner: threads`` applies.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING, Any

from fedcore.config import ExecutionConfig, Params, register_names_lookup
from fedcore.errors import ConfigError
from fedcore.federation.sampling import num_sampled
from fedcore.registry import Registry
from tasks.orchestration import PREFECT_ENV, orchestrated

if TYPE_CHECKING:
    from prefect.task_runners import TaskRunner

    from fedcore.federation.engine import Executor

RUNNERS: Registry[TaskRunner[Any]] = Registry("runner")
register_names_lookup("runner", RUNNERS.names)

LOOPBACK = "127.0.0.1"
"""The only interface a local cluster listens on."""


def parallel_workers(params: Params) -> int:
    """Clients trained at once (the runner's workers): ``max_workers`` or the cores, at most a round's clients.

    Only a knob of speed: each client runs on ``federation.client_threads`` torch threads whatever this is (the
    round loop's thread policy), so the metrics are the same at any ``max_workers``.
    """
    fed = params.federation
    per_round = num_sampled(params.partition.num_clients, fed.client_fraction, fed.min_clients)
    return max(1, min(params.execution.max_workers or os.cpu_count() or 1, per_round))


def stage_runner(params: Params) -> TaskRunner[Any] | None:
    """The task runner of a training stage: ``execution.runner`` with :func:`parallel_workers` workers.

    None without Prefect, where the runner must be ``threads`` (a ConfigError names the variable otherwise).
    """
    if not orchestrated():
        if params.execution.runner != "threads" or params.execution.address is not None:
            raise ConfigError(f"execution: runner {params.execution.runner!r} needs Prefect; with {PREFECT_ENV}=off "
                              f"the clients run in threads of the stage (runner 'threads', no address).")
        return None
    return task_runner(params.execution, parallel_workers(params))


def client_executor(params: Params) -> Executor:
    """What a training flow submits its client jobs to: the flow's task runner, or threads without Prefect."""
    from tasks.rounds import TaskRunnerExecutor, ThreadExecutor

    return TaskRunnerExecutor() if orchestrated() else ThreadExecutor(parallel_workers(params))


def task_runner(execution: ExecutionConfig, max_workers: int) -> TaskRunner[Any]:
    """The task runner of ``execution.runner``, on the cluster at ``execution.address`` if one is given."""
    if execution.address is None:
        return RUNNERS.build(execution.runner, max_workers=max_workers)
    return RUNNERS.build(execution.runner, max_workers=max_workers, address=execution.address)


@RUNNERS.register("threads")
def threads(*, max_workers: int, address: str | None = None) -> TaskRunner[Any]:
    """Clients of a round run in threads of this process (no start-up cost; torch releases the GIL)."""
    if address is not None:
        raise ConfigError(f"execution: 'address' must be null with runner 'threads' (it runs in this process). "
                          f"Got {address!r}. Use runner dask or ray for a cluster.")
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=max_workers)


@RUNNERS.register("processes")
def processes(*, max_workers: int, address: str | None = None) -> TaskRunner[Any]:
    """Clients of a round run in ``max_workers`` worker processes of this machine (spawned once per flow run).

    No shared interpreter lock between clients, at the price of sending each client's data to its worker.
    """
    if address is not None:
        raise ConfigError(f"execution: 'address' must be null with runner 'processes' (they run on this machine). "
                          f"Got {address!r}. Use runner dask or ray for a cluster.")
    from prefect.task_runners import ProcessPoolTaskRunner

    return ProcessPoolTaskRunner(max_workers=max_workers)


@RUNNERS.register("dask")
def dask(*, max_workers: int, address: str | None = None) -> TaskRunner[Any]:
    """A local Dask cluster of ``max_workers`` single-threaded processes, or an existing one at ``address``.

    The local cluster's scheduler and workers listen on 127.0.0.1 only, with no dashboard, and talk over TLS
    with certificates made for this cluster alone (``security=True``), so another local user cannot submit work.
    """
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": max_workers, "threads_per_worker": 1, "processes": True,
                        "host": LOOPBACK, "dashboard_address": None, "security": True}
    )


@RUNNERS.register("ray")
def ray(*, max_workers: int, address: str | None = None) -> TaskRunner[Any]:
    """A local Ray instance with ``max_workers`` CPUs, or an existing cluster at ``address``.

    The local instance takes 127.0.0.1 as its node address, so every one of its servers (GCS, raylet, object
    manager, agents, workers, metrics) listens on the loopback interface only; no dashboard.
    """
    from prefect_ray import RayTaskRunner

    if address:
        return RayTaskRunner(address=address)
    return _loopback_ray_runner()(init_kwargs={"num_cpus": max_workers, "include_dashboard": False,
                                               "dashboard_host": LOOPBACK, "log_to_driver": False})


@cache
def _loopback_ray_runner() -> type[Any]:
    """The RayTaskRunner class whose local instance listens on 127.0.0.1 only (checked once it is up).

    Defined on first use: prefect_ray is imported only when the ray runner is.
    """
    from prefect_ray import RayTaskRunner

    class LoopbackRayTaskRunner(RayTaskRunner):
        def __enter__(self) -> LoopbackRayTaskRunner:
            with _ray_node_on_loopback():
                super().__enter__()
            _check_ray_node_on_loopback(self)
            return self

    LoopbackRayTaskRunner.__qualname__ = LoopbackRayTaskRunner.__name__
    LoopbackRayTaskRunner.__module__ = __name__
    return LoopbackRayTaskRunner


@contextmanager
def _ray_node_on_loopback() -> Iterator[None]:
    """While a local Ray instance starts: make it take 127.0.0.1 as its node address.

    ``ray.init(_node_ip_address="127.0.0.1")`` does not do it: Ray swaps a loopback address for the machine's
    routable one, unless clusters are off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read once at import, or the
    constant it sets), as on macOS and Windows. Ray's servers then bind the node address instead of 0.0.0.0.
    """
    import ray

    ray.init  # noqa: B018 (prefect_ray imports ray lazily: load the package before one of its modules)
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _check_ray_node_on_loopback(runner: TaskRunner[Any]) -> None:
    """Refuse a Ray instance this runner started whose node address is not the loopback one (then stop it)."""
    import ray

    node_ip = ray.util.get_node_ip_address()
    if getattr(runner, "_owns_ray", True) and node_ip != LOOPBACK:
        runner.__exit__(None, None, None)
        raise RuntimeError(f"runner ray: the local Ray instance must listen on {LOOPBACK} only. Got node address "
                           f"{node_ip!r} (this Ray version no longer honours the loopback setting). Fix: start a "
                           "cluster yourself, secured as the README says, and set execution.address.")
