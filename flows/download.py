"""download stage: fetch a dataset (mirror first), extract it safely, write the audio manifest and a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedcore.config import DownloadConfig
from flows import stage

FLOWS = stage.LazyFlows(__name__)


@FLOWS.flow("download", log_prints=True)
def _download(cfg: DownloadConfig, out_dir: Path, downloads_dir: Path) -> dict[str, Any]:
    """Ingest ``cfg.dataset`` into ``out_dir`` (``manifest.csv``, ``report.json``, audio)."""
    from tasks.data import ingest_dataset
    from tasks.orchestration import publish_markdown

    report = ingest_dataset(cfg, out_dir, downloads_dir)
    lines = [
        f"# download: {report.get('dataset')}",
        f"- source: `{report.get('source')}`",
        f"- clips kept: **{report.get('num_ok')}**, skipped: **{report.get('num_skipped')}**, "
        f"refused: **{report.get('num_refused')}**",
        f"- total audio: {report.get('total_seconds', 0):.1f} s; speakers/groups: {report.get('speakers')}",
        f"- splits: {report.get('splits')}",
    ]
    for kind in ("refused", "skipped"):
        if entries := report.get(kind, []):
            lines += ["", f"| {kind} file | reason |", "| --- | --- |"]
            lines += [f"| `{s['path']}` | {s['reason']} |" for s in entries[:50]]
    publish_markdown("\n".join(lines), key="download-report", description="ingest report")
    print(f"download: {report.get('num_ok')} clips kept, {report.get('num_skipped')} skipped, "
          f"{report.get('num_refused')} refused -> {out_dir}")
    return report


def _main(
    params: stage.ParamsFile = stage.PARAMS_FILE,
    out: Annotated[Path, typer.Option(metavar="DIR", help="the audio and its manifest.csv and report.json (the "
                                                          "stage's DVC output)")] = Path("data/raw"),
    downloads: Annotated[Path, typer.Option(metavar="DIR", help="the archive cache (resumable), its extraction and "
                                                                "<dataset>.source.json; not a DVC output")] = Path(
        "data/downloads"),
) -> None:
    from tasks.common import read_params

    FLOWS["download"](read_params(params, ["download"]).download, out, downloads)


main = stage.command(__doc__, _main)
"""Command-line entry point (``python -m flows.download``)."""
__getattr__ = FLOWS.module_getattr  # from flows.download import download: the flow, built then

if __name__ == "__main__":
    raise SystemExit(main())
