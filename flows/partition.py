"""partition stage: split the training split over clients (IID, Dirichlet, shards, quantity, speaker, cross-device).

Sizes that cannot fit (more clients than rows or speakers, num_clients × min_samples above the rows, a partition
larger than the memory or disk at hand) are refused before the first draw.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from fedcore.config import PartitionConfig
from flows import stage
from tasks.common import read_params
from tasks.data import partition_clients


@flow(name="partition", log_prints=True)
def partition(cfg: PartitionConfig, features_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``partition.json``, ``client_stats.csv`` and ``heatmap.png`` into ``out_dir``."""
    summary = partition_clients(cfg, features_dir, out_dir)
    create_table_artifact([summary], key="partition-summary", description=f"{cfg.scheme} partition")
    print(f"partition: {summary['num_clients']} clients, {summary['min_client']}-{summary['max_client']} "
          f"training samples each; heatmap {out_dir}/heatmap.png")
    return summary


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", type=Path, default=Path("data/features"))
    p.add_argument("--out", type=Path, default=Path("data/partition"))


def _main(args: argparse.Namespace) -> None:
    partition(read_params(args.params).partition, args.features, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m flows.partition``)."""
    return stage.entry(__doc__ or "", _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
