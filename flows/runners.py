"""Task runners for the client fan-out, by name (``federation.runner``): threads, processes, dask or ray."""

from __future__ import annotations

from typing import Any

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from fedcore.config import FederationConfig, register_names_lookup
from fedcore.errors import ConfigError
from fedcore.registry import Registry

RUNNERS: Registry[TaskRunner[Any]] = Registry("runner")
register_names_lookup("runner", RUNNERS.names)


def task_runner(fed: FederationConfig, max_workers: int) -> TaskRunner[Any]:
    """The task runner of ``federation.runner``, on the cluster at ``federation.address`` if one is given."""
    if fed.address is None:
        return RUNNERS.build(fed.runner, max_workers=max_workers)
    return RUNNERS.build(fed.runner, max_workers=max_workers, address=fed.address)


@RUNNERS.register("threads")
def threads(*, max_workers: int, address: str | None = None) -> TaskRunner[Any]:
    """Clients of a round run in threads of this process (no start-up cost; torch releases the GIL)."""
    if address is not None:
        raise ConfigError(f"federation: 'address' must be null with runner 'threads' (it runs in this process). "
                          f"Got {address!r}. Use runner dask or ray for a cluster.")
    return ThreadPoolTaskRunner(max_workers=max_workers)


@RUNNERS.register("processes")
def processes(*, max_workers: int, address: str | None = None) -> TaskRunner[Any]:
    """Clients of a round run in ``max_workers`` worker processes of this machine (spawned once per flow run).

    No shared interpreter lock between clients, at the price of sending each client's data to its worker.
    """
    if address is not None:
        raise ConfigError(f"federation: 'address' must be null with runner 'processes' (they run on this machine). "
                          f"Got {address!r}. Use runner dask or ray for a cluster.")
    return ProcessPoolTaskRunner(max_workers=max_workers)


@RUNNERS.register("dask")
def dask(*, max_workers: int, address: str | None = None) -> TaskRunner[Any]:
    """A local Dask cluster of ``max_workers`` single-threaded processes, or an existing one at ``address``."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": max_workers, "threads_per_worker": 1, "processes": True,
                        "dashboard_address": None}
    )


@RUNNERS.register("ray")
def ray(*, max_workers: int, address: str | None = None) -> TaskRunner[Any]:
    """A local Ray instance with ``max_workers`` CPUs, or an existing cluster at ``address``."""
    from prefect_ray import RayTaskRunner

    if address:
        return RayTaskRunner(address=address)
    return RayTaskRunner(init_kwargs={"num_cpus": max_workers, "include_dashboard": False,
                                      "log_to_driver": False})
