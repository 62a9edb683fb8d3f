"""``dvc plots show`` works offline: the project's HTML template carries the chart libraries DVC asks for."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

from dvc_render import VegaRenderer, render_html

ROOT = Path(__file__).resolve().parents[1]


def template_path() -> Path:
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    return ROOT / ".dvc" / config["plots"]["html_template"]


def test_the_dvc_config_names_the_committed_template() -> None:
    assert template_path().is_file()


def test_the_template_inlines_the_versions_dvc_loads_from_its_cdn() -> None:
    """A DVC upgrade that asks for other versions fails here: rerun scripts/offline_plots.py."""
    wanted = re.findall(r"cdn\.jsdelivr\.net/npm/([\w-]+)@([\d.]+)", VegaRenderer.SCRIPTS)
    assert {name for name, _ in wanted} == {"vega", "vega-lite", "vega-embed"}
    text = template_path().read_text(encoding="utf8")
    for name, version in wanted:
        assert f"/* {name}@{version} */" in text, f"{name}@{version} is not inlined"
    assert "<script src=" not in text and "{scripts}" not in text


def test_a_page_rendered_with_it_loads_nothing_from_the_network(tmp_path: Path) -> None:
    rows = [{"round": r, "global_accuracy": a} for r, a in [(1, 0.2), (2, 0.5), (3, 0.7)]]
    renderer = VegaRenderer(rows, "plots/federate/rounds.tsv", x="round", y="global_accuracy")
    page = Path(render_html([renderer], tmp_path / "index.html", html_template=str(template_path()))).read_text()
    assert "vegaEmbed('#" in page and '"global_accuracy"' in page
    assert not re.search(r"(src|href)\s*=\s*[\"']https?://", page), "the page loads something from the network"
    assert "cdn.jsdelivr" not in page
