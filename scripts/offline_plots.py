"""Write DVC's HTML template for plots with the chart libraries inside, so ``dvc plots show`` works offline.

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so on a machine without internet the page
is blank. This script downloads the exact versions DVC's renderer asks for (``dvc_render.vega.VegaRenderer``)
from the npm registry, checks each archive's sha256, and writes ``.dvc/plots_offline.html``: DVC's page with the
three libraries inlined and no ``{scripts}`` placeholder (so DVC's CDN tags are left out). ``.dvc/config`` names
it (``plots.html_template``). Both are committed; rerun this only to change the versions::

    .venv/bin/python scripts/offline_plots.py [--registry URL]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import tarfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".dvc" / "plots_offline.html"
#: (package, version, file in the archive, sha256 of the archive): the versions of dvc_render's CDN tags.
LIBRARIES = [
    ("vega", "5.20.2", "package/build/vega.min.js",
     "d77deab01d6104b1239228720721f93003e60797d2faced7ffdd759fa70f989d"),
    ("vega-lite", "5.2.0", "package/build/vega-lite.min.js",
     "f64ca4745f043447ac86b67dc9e9592ec2b85ac8b8dafc35faf970f142463e4b"),
    ("vega-embed", "6.18.2", "package/build/vega-embed.min.js",
     "93aeee312e92077b0252ef026c0fe0ec8fa430c19825aeada6cd3a6804e68e1b"),
]
PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <title>DVC Plot</title>
    <!-- vega, vega-lite and vega-embed inlined (BSD-3-Clause, University of Washington Interactive Data Lab);
         written by scripts/offline_plots.py -->
{libraries}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def library(registry: str, name: str, version: str, member: str, sha256: str) -> str:
    """The minified library from the package's archive, its checksum verified."""
    url = f"{registry.rstrip('/')}/{name}/-/{name}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=60) as response:
        data = response.read()
    if (digest := hashlib.sha256(data).hexdigest()) != sha256:
        raise SystemExit(f"offline_plots: {url} has sha256 {digest}, expected {sha256}")
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        source = archive.extractfile(member)
        if source is None:
            raise SystemExit(f"offline_plots: {url} has no file {member}")
        text = source.read().decode()
    if "</script" in text.lower() or any(p in text for p in ("{plot_divs}", "{scripts}", "{refresh_tag}")):
        raise SystemExit(f"offline_plots: {name} {version} holds text that would break the page")
    return f"    <script>/* {name}@{version} */\n{text}\n    </script>"


def main() -> int:
    """Download the libraries and write the template."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--registry", default="https://registry.npmjs.org", help="npm registry (default: %(default)s)")
    args = p.parse_args()
    scripts = "\n".join(library(args.registry, *spec) for spec in LIBRARIES)
    OUT.write_text(PAGE.format(libraries=scripts), encoding="utf8")
    print(f"offline_plots: wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
