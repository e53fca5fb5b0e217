"""The published result sections are what their committed measurements write, and the writing
replaces exactly what lies between a section's markers."""
from __future__ import annotations

import json

import pytest

from ssd_allreduce.bench import report


def test_the_documents_are_what_their_results_write():
    written = report.written(report.DOCS)
    assert report.DOCS / "BENCHMARKS.md" in written, "docs/results/quality.json and its section are published"
    for doc, text in written.items():
        assert doc.read_text() == text, f"{doc} differs from its results: run python -m ssd_allreduce.bench report"


def test_a_section_is_replaced_between_its_markers_only():
    text = "intro\n<!-- results:a -->\nold\nlines\n<!-- /results:a -->\nprose\n<!-- results:b -->\nb\n<!-- /results:b -->\n"
    out = report.replace_section(text, "a", "new table\n")
    assert out == "intro\n<!-- results:a -->\nnew table\n<!-- /results:a -->\nprose\n<!-- results:b -->\nb\n<!-- /results:b -->\n"
    assert report.replace_section(out, "a", "new table") == out
    with pytest.raises(ValueError, match="<!-- results:c -->"):
        report.replace_section(text, "c", "x")


def test_report_rewrites_a_stale_section_and_check_says_so(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    record = json.loads((report.DOCS / "results" / "quality.json").read_text())
    (tmp_path / "results" / "quality.json").write_text(json.dumps(record))
    doc = tmp_path / "PAGE.md"
    doc.write_text("# Page\n<!-- results:quality -->\nhand-written\n<!-- /results:quality -->\n")
    assert report.main(["--docs", str(tmp_path), "--check"]) == 1
    assert "PAGE.md" in capsys.readouterr().err and "hand-written" in doc.read_text()
    assert report.main(["--docs", str(tmp_path)]) == 0
    assert "hand-written" not in doc.read_text() and record["command"] in doc.read_text()
    assert report.main(["--docs", str(tmp_path), "--check"]) == 0
