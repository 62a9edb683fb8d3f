"""The claims tables in the READMEs say what the matrices' committed tables say, and those tables are fresh."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from benchmarks import claims as claims_module
from benchmarks.benchlib import PROJECT
from benchmarks.claims import MATRICES, full_table, gather, replaced, short_table, table_claims
from benchmarks.freshness import check, matrix_regenerate

_COMMIT = re.compile(r"\b[0-9a-f]{7,12} \(\d{4}-\d\d-\d\d\)")


def _shallow() -> bool:
    out = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=PROJECT, capture_output=True, text=True)
    return out.stdout.strip() == "true"


def _project(tmp_path: Path, matrix: str, claims: list[dict[str, object]],
             rows: list[dict[str, object]] | None) -> Path:
    folder = tmp_path / "benchmarks" / matrix
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump({"bench": {"claims": claims}}))
    if rows is not None:
        (folder / "table.json").write_text(json.dumps({"rows": [], "claims": rows}))
    return tmp_path


def _part(claim: str, verdict: str, mean: float, low: float, high: float) -> dict[str, object]:
    return {"claim": claim, "a": "x", "b": "y", "metric": "final", "n": 5, "mean_diff": mean, "low": low,
            "high": high, "verdict": verdict, "note": ""}


def test_a_claim_holds_only_when_every_part_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claims_module, "MATRICES", ("earlyexit",))
    rows = [_part("A", "holds", 0.5, 0.45, 0.55), _part("A", "does not hold", -0.01, -0.03, -0.005),
            _part("B", "holds", 0.1, 0.05, 0.15), _part("C", "unresolved", 0.01, -0.02, 0.04)]
    root = _project(tmp_path, "earlyexit", [{"claim": c} for c in "ABC"], rows)
    found = {c["claim"]: c for c in gather(root)}
    assert {k: v["verdict"] for k, v in found.items()} == {"A": "does not hold", "B": "holds", "C": "unresolved"}
    assert len(found["A"]["parts"]) == 2
    short = short_table(list(found.values()))
    assert "+0.500 [+0.450, +0.550]; -0.010 [-0.030, -0.005]" in short and "**does not hold**" in short
    assert full_table(list(found.values())).count("\n") == 2 + 4 - 1  # header, rule, one line per part


def test_a_table_from_before_the_seeds_shows_its_claims_as_not_run(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claims_module, "MATRICES", ("fassl",))
    root = _project(tmp_path, "fassl", [{"claim": "old"}], None)
    (root / "benchmarks/fassl/table.json").write_text(json.dumps({"rows": [{"cell": 1}]}))  # the old layout
    assert table_claims("fassl", root) is None
    (entry,) = gather(root)
    assert entry["verdict"] == "not run yet" and entry["parts"] == []
    assert "over seeds: not run yet" in short_table([entry])


def test_the_block_between_the_markers_is_replaced_and_missing_markers_refused() -> None:
    text = "a\n<!-- claims:short -->\nold\n<!-- /claims -->\nb\n"
    assert replaced(text, "short", "new", "R") == "a\n<!-- claims:short -->\nnew\n<!-- /claims -->\nb\n"
    with pytest.raises(ValueError, match="markers"):
        replaced("no markers", "full", "x", "R")


def test_the_readmes_claims_tables_match_the_committed_tables() -> None:
    found = gather()
    for path, kind, table in [(PROJECT / "README.md", "short", short_table(found)),
                              (PROJECT / "benchmarks/README.md", "full", full_table(found))]:
        text = path.read_text()
        expected = replaced(text, kind, table, path.name)
        if _shallow():  # a shallow clone cannot name the code's commit
            text, expected = _COMMIT.sub("<commit>", text), _COMMIT.sub("<commit>", expected)
        assert text == expected, f"{path.relative_to(PROJECT)}: run python -m benchmarks.claims --write"


@pytest.mark.parametrize("matrix", MATRICES)
def test_a_matrix_run_over_seeds_is_fresh(matrix: str) -> None:
    """A matrix whose table holds claims (run over seeds) must match the code and params: dvc.lock is current."""
    if table_claims(matrix) is None:
        pytest.skip(f"{matrix}: its table predates the seeds (not run over seeds yet)")
    report = check(PROJECT / "benchmarks" / matrix, regenerate=matrix_regenerate(matrix))
    assert not report.stale, f"{matrix} is stale: python -m benchmarks.freshness {matrix}"
