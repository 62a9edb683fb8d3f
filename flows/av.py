"""av stage: the visual store of a feature store, for the audio-visual stages (modality, distill).

``python -m flows.av`` writes the visual store beside a feature store: each clip paired with a handwritten digit
image of its class (AV-MNIST style; scikit-learn's digits, reduced to ``modality.visual_energy`` of their PCA
variance as AV-MNIST does, so vision alone does not decide the label), or, with ``--manifest``, the visual arrays
of a user's AV manifest matched by row id. ``pairs.png`` shows one pair per class; ``meta.json`` records the number
of principal components kept and their share of the variance. (Before, ``python -m flows.modality av``.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedcore.config import ModalityConfig
from flows import stage

FLOWS = stage.LazyFlows(__name__)


@FLOWS.flow("pair_av", name="av", log_prints=True)
def _pair_av(cfg: ModalityConfig, features_dir: Path, out_dir: Path, manifest: Path | None = None) -> dict[str, Any]:
    """Write the visual store of ``features_dir`` into ``out_dir`` (see the module docstring)."""
    from tasks.modality import write_visual_store

    summary = write_visual_store(features_dir, out_dir, cfg, manifest)
    print(f"av: {summary['rows']} visual examples {tuple(summary['visual_shape'])} from {summary['source']}; "
          f"examples in {out_dir / 'pairs.png'}")
    if (pca := summary.get("pca")) is not None:
        print(f"av: images reduced to {pca['pca_components']} of {pca['pca_dims']} principal components, "
              f"{pca['pca_energy_kept']:.3f} of the train pool's variance (modality.visual_energy "
              f"{pca['visual_energy']})")
    return summary


def _main(
    params: stage.ParamsFile = stage.PARAMS_FILE,
    features: Annotated[Path, typer.Option(metavar="DIR", help="the feature store to pair (features "
                                                               "stage)")] = Path("data/features"),
    visual: Annotated[Path, typer.Option(metavar="DIR", help="where the visual store goes")] = Path("data/av"),
    manifest: Annotated[Path | None, typer.Option(metavar="FILE", help="an AV manifest CSV whose visual arrays to "
                                                                       "use  [default: digit images]",
                                                  show_default=False)] = None,
) -> None:
    from tasks.common import read_params

    FLOWS["pair_av"](read_params(params).modality, features, visual, manifest)


main = stage.command(__doc__, _main)
"""Command-line entry point (``python -m flows.av``)."""
__getattr__ = FLOWS.module_getattr  # from flows.av import pair_av: the flow, built then

if __name__ == "__main__":
    raise SystemExit(main())
