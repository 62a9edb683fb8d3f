"""av stage: the visual store of a feature store, for the audio-visual stages (modality, distill).

``python -m flows.av`` writes the visual store beside a feature store: each clip paired with a handwritten digit
image of its class (AV-MNIST style; scikit-learn's digits, reduced to ``modality.visual_energy`` of their PCA
variance as AV-MNIST does, so vision alone does not decide the label), or, with ``--manifest``, the visual arrays
of a user's AV manifest matched by row id. ``pairs.png`` shows one pair per class; ``meta.json`` records the number
of principal components kept and their share of the variance. (Before, ``python -m flows.modality av``.)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow

from fedcore.config import ModalityConfig
from flows import stage
from tasks.common import read_params
from tasks.modality import write_visual_store


@flow(name="av", log_prints=True)
def pair_av(cfg: ModalityConfig, features_dir: Path, out_dir: Path, manifest: Path | None = None) -> dict[str, Any]:
    """Write the visual store of ``features_dir`` into ``out_dir`` (see the module docstring)."""
    summary = write_visual_store(features_dir, out_dir, cfg, manifest)
    print(f"av: {summary['rows']} visual examples {tuple(summary['visual_shape'])} from {summary['source']}; "
          f"examples in {out_dir / 'pairs.png'}")
    if (pca := summary.get("pca")) is not None:
        print(f"av: images reduced to {pca['pca_components']} of {pca['pca_dims']} principal components, "
              f"{pca['pca_energy_kept']:.3f} of the train pool's variance (modality.visual_energy "
              f"{pca['visual_energy']})")
    return summary


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", type=Path, default=Path("data/features"), help="the feature store")
    p.add_argument("--visual", type=Path, default=Path("data/av"), help="where the visual store goes")
    p.add_argument("--manifest", type=Path, default=None, help="an AV manifest CSV (default: digit images)")


def _main(args: argparse.Namespace) -> None:
    pair_av(read_params(args.params).modality, args.features, args.visual, args.manifest)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m flows.av``)."""
    return stage.entry(__doc__ or "", _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
