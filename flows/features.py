"""features stage: torchaudio resampling and log-mel of every clip, stored compactly with an index."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow

from fedcore.config import FeaturesConfig
from flows import stage
from tasks.common import read_params
from tasks.data import featurise


@flow(name="features", log_prints=True)
def features(cfg: FeaturesConfig, raw_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Featurise ``raw_dir/manifest.csv`` into ``out_dir`` (features.npy, index.csv, meta.json).

    Files that cannot be used (unreadable, NaN/Inf samples, overflowing) are skipped and listed with their reason
    in ``meta.json``; the same manifest and params give the same bytes whatever the thread count.
    """
    summary = featurise(cfg, raw_dir, out_dir)
    skipped = f" (listed in {out_dir}/meta.json)" if summary["num_skipped"] else ""
    print(f"features: {summary['num_samples']} clips -> {summary['shape']} log-mel, "
          f"{summary['num_skipped']} skipped{skipped}; {summary['cropped_share']:.0%} of the audio cropped away; "
          f"train mean {summary['mean']:.3f}, std {summary['std']:.3f}")
    return summary


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw", type=Path, default=Path("data/raw"))
    p.add_argument("--out", type=Path, default=Path("data/features"))


def _main(args: argparse.Namespace) -> None:
    features(read_params(args.params).features, args.raw, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m flows.features``)."""
    return stage.entry(__doc__ or "", _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
