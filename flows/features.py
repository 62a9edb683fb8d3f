"""features stage: torchaudio resampling and log-mel of every clip, stored compactly with an index."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedcore.config import FeaturesConfig
from flows import stage

FLOWS = stage.LazyFlows(__name__)


@FLOWS.flow("features", log_prints=True)
def _features(cfg: FeaturesConfig, raw_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Featurise ``raw_dir/manifest.csv`` into ``out_dir`` (features.npy, index.csv, meta.json).

    Files that cannot be used (unreadable, NaN/Inf samples, overflowing) are skipped and listed with their reason
    in ``meta.json``; the same manifest and params give the same bytes whatever the thread count.
    """
    from tasks.data import featurise

    summary = featurise(cfg, raw_dir, out_dir)
    skipped = f" (listed in {out_dir}/meta.json)" if summary["num_skipped"] else ""
    print(f"features: {summary['num_samples']} clips -> {summary['shape']} log-mel, "
          f"{summary['num_skipped']} skipped{skipped}; {summary['cropped_share']:.0%} of the audio cropped away; "
          f"train mean {summary['mean']:.3f}, std {summary['std']:.3f}")
    return summary


def _main(
    params: stage.ParamsFile = stage.PARAMS_FILE,
    raw: Annotated[Path, typer.Option(metavar="DIR", help="the downloaded clips and their manifest.csv "
                                                          "(download stage)")] = Path("data/raw"),
    out: Annotated[Path, typer.Option(metavar="DIR", help="the feature store to write (features.npy, index.csv, "
                                                          "meta.json)")] = Path("data/features"),
) -> None:
    from tasks.common import read_params

    FLOWS["features"](read_params(params, ["features"]).features, raw, out)


main = stage.command(__doc__, _main)
"""Command-line entry point (``python -m flows.features``)."""
__getattr__ = FLOWS.module_getattr  # from flows.features import features: the flow, built then

if __name__ == "__main__":
    raise SystemExit(main())
