"""download stage: fetch a dataset (mirror first), extract it safely, write the audio manifest and a report."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from fedcore.config import DownloadConfig
from flows import stage
from tasks.common import read_params
from tasks.data import ingest_dataset


@flow(name="download", log_prints=True)
def download(cfg: DownloadConfig, out_dir: Path, downloads_dir: Path) -> dict[str, Any]:
    """Ingest ``cfg.dataset`` into ``out_dir`` (``manifest.csv``, ``report.json``, audio)."""
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
    create_markdown_artifact("\n".join(lines), key="download-report", description="ingest report")
    print(f"download: {report.get('num_ok')} clips kept, {report.get('num_skipped')} skipped, "
          f"{report.get('num_refused')} refused -> {out_dir}")
    return report


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("data/raw"), help="audio + manifest folder (DVC out)")
    p.add_argument("--downloads", type=Path, default=Path("data/downloads"),
                   help="archive cache (resumable), extraction and <dataset>.source.json; not a DVC output")


def _main(args: argparse.Namespace) -> None:
    params = read_params(args.params)
    download(params.download, args.out, args.downloads)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m flows.download``)."""
    return stage.entry(__doc__ or "", _arguments, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
