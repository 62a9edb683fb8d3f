"""poison stage: attack a seeded fraction of clients; write an overlay and the ground truth, not a data copy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedcore.config import FeaturesConfig, PoisonConfig
from flows import stage

FLOWS = stage.LazyFlows(__name__)


@FLOWS.flow("poison", log_prints=True)
def _poison(
    cfg: PoisonConfig, features_cfg: FeaturesConfig, raw_dir: Path, features_dir: Path, partition_file: Path,
    out_dir: Path,
) -> dict[str, Any]:
    """Write ``overlay.npz`` and ``ground_truth.json`` into ``out_dir``."""
    from tasks.data import poison_clients

    summary = poison_clients(cfg, features_cfg, raw_dir, features_dir, partition_file, out_dir)
    print(f"poison: attack {summary['attack']!r} on clients {summary['attacked_clients']} "
          f"({summary['num_attacked_samples']} samples)")
    return summary


def _main(
    params: stage.ParamsFile = stage.PARAMS_FILE,
    raw: Annotated[Path, typer.Option(metavar="DIR", help="the downloaded clips and their manifest.csv (download "
                                                          "stage): a noise attack featurises its clips "
                                                          "again")] = Path("data/raw"),
    features: stage.FeaturesDir = Path("data/features"),
    partition: stage.PartitionFile = Path("data/partition/partition.json"),
    out: Annotated[Path, typer.Option(metavar="DIR", help="where overlay.npz and ground_truth.json "
                                                          "go")] = Path("data/poison"),
) -> None:
    from tasks.common import read_params

    cfg = read_params(params, ["features", "poison"])
    FLOWS["poison"](cfg.poison, cfg.features, raw, features, partition, out)


main = stage.command(__doc__, _main)
"""Command-line entry point (``python -m flows.poison``)."""
__getattr__ = FLOWS.module_getattr  # from flows.poison import poison: the flow, built then

if __name__ == "__main__":
    raise SystemExit(main())
