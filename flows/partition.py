"""partition stage: split the training split over clients (IID, Dirichlet, shards, quantity, speaker, cross-device).

Sizes that cannot fit (more clients than rows or speakers, num_clients × min_samples above the rows, a partition
larger than the memory or disk at hand) are refused before the first draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedcore.config import PartitionConfig
from flows import stage

FLOWS = stage.LazyFlows(__name__)


@FLOWS.flow("partition", log_prints=True)
def _partition(cfg: PartitionConfig, features_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``partition.json``, ``client_stats.csv`` and ``heatmap.png`` into ``out_dir``."""
    from tasks.data import partition_clients
    from tasks.orchestration import publish_table

    summary = partition_clients(cfg, features_dir, out_dir)
    publish_table([summary], key="partition-summary", description=f"{cfg.scheme} partition")
    print(f"partition: {summary['num_clients']} clients, {summary['min_client']}-{summary['max_client']} "
          f"training samples each; heatmap {out_dir}/heatmap.png")
    return summary


def _main(
    params: stage.ParamsFile = stage.PARAMS_FILE,
    features: Annotated[Path, typer.Option(metavar="DIR", help="the feature store to split (features "
                                                               "stage)")] = Path("data/features"),
    out: Annotated[Path, typer.Option(metavar="DIR", help="where partition.json, client_stats.csv and heatmap.png "
                                                          "go")] = Path("data/partition"),
) -> None:
    from tasks.common import read_params

    FLOWS["partition"](read_params(params, ["partition"]).partition, features, out)


main = stage.command(__doc__, _main)
"""Command-line entry point (``python -m flows.partition``)."""
__getattr__ = FLOWS.module_getattr  # from flows.partition import partition: the flow, built then

if __name__ == "__main__":
    raise SystemExit(main())
