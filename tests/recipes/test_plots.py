"""recipes/plot_benchmarks.py, recipes/make_figures.py and benchmark JSON output."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))

import make_figures  # noqa: E402
import plot_benchmarks  # noqa: E402

from mmlayers.layers.synchronizer import FeatureSynchronizer  # noqa: E402

from bench import _common  # noqa: E402

SAVED = ROOT / "docs" / "assets" / "bench"


def test_number_parses_table_cells():
    assert plot_benchmarks.number("2.63x") == 2.63
    assert plot_benchmarks.number(" 1698 ") == 1698.0
    assert plot_benchmarks.number(3) == 3.0
    assert plot_benchmarks.number("1e-3") == 0.001
    for cell in ("—", "-", "skipped (~9 GB)", "4 docs / 8 images", True):
        assert plot_benchmarks.number(cell) is None


def test_format_table_records_json_and_markdown_round_trips(tmp_path):
    header, rows = ["m", "ours ms", "ratio"], [[1, 420.0, "1.2x"], [16, 3123.4, "2.3x"]]
    _common.set_json_output(tmp_path / "t.json", suite="sync", command="python x")
    try:
        text = _common.format_table(header, rows)
    finally:
        _common.set_json_output(None)
    assert _common.format_table(header, rows) == text  # recording off again: same table
    record = json.loads((tmp_path / "t.json").read_text())
    assert record["suite"] == "sync" and record["command"] == "python x"
    assert record["date"].endswith("UTC") and "torch" in record["machine"]
    assert record["tables"] == [{"header": header, "rows": rows}]
    parsed = plot_benchmarks.markdown_tables(f"intro\n\n{text}\n\nafter | not a table\n")
    assert parsed == [{"header": header, "rows": [["1", "420", "1.2x"], ["16", "3123", "2.3x"]]}]


def test_saved_json_covers_the_benchmark_pages():
    suites = {json.loads(p.read_text())["suite"] for p in SAVED.glob("*.json")}
    assert suites >= {"ops", "sync", "llm", "vision", "unet", "model"}
    for p in SAVED.glob("*.json"):
        record = json.loads(p.read_text())
        assert record["command"].startswith("python recipes/benchmark.py")
        assert record["date"].startswith("20") and record["machine"]
        assert all(t["rows"] for t in record["tables"])


def test_plot_script_writes_one_svg_per_saved_run(tmp_path):
    written = plot_benchmarks.main(["--data", str(SAVED), "--out", str(tmp_path)])
    names = sorted(p.name for p in written)
    assert names == sorted(p.stem + ".svg" for p in SAVED.glob("*.json"))
    for p in written:
        text = p.read_text()
        assert text.lstrip().startswith("<?xml") and "<svg" in text
        assert "recipes/benchmark.py" in text  # the command is printed on the figure


def smallest_text_px(svg: str, content_px: float = plot_benchmarks.CONTENT_PX) -> float:
    """The smallest font of an SVG, in CSS pixels, when the docs show it: at its own size
    (pt units) or shrunk to the content column, whichever is smaller."""
    width = float(re.search(r'viewBox="0 0 ([\d.]+)', svg).group(1))
    sizes = [float(x) for x in re.findall(r"font-size: ([\d.]+)px", svg)]
    assert sizes, "no text in the SVG (fonts must stay text: svg.fonttype none)"
    return min(sizes) * min(content_px, width * 4 / 3) / width


def test_plot_text_is_at_least_11px_at_the_docs_width(tmp_path):
    fresh = plot_benchmarks.main(["--data", str(SAVED), "--out", str(tmp_path)])
    for p in [*fresh, *SAVED.glob("*.svg")]:  # what the script draws and what the docs show
        assert smallest_text_px(p.read_text()) >= 11, p


def test_the_legibility_check_can_fail():
    svg = '<svg viewBox="0 0 1000 400"><text style="font-size: 12px">a</text></svg>'
    assert smallest_text_px(svg) == pytest.approx(12 * 688 / 1000)  # shrunk: 8.3 px
    assert smallest_text_px(svg.replace("1000", "400")) == pytest.approx(16)  # 12 pt


def test_import_md_then_plot(tmp_path):
    page = tmp_path / "page.md"
    table = _common.format_table(["images", "bare ms", "mmlayers ms", "naive ms"],
                                 [[1, 2.0, 4.0, 17.0], [4, 2.5, 6.0, 55.0]])
    page.write_text(f"# x\n\n{table}\n")
    out = tmp_path / "data" / "llm.json"
    plot_benchmarks.main(["import-md", str(page), "--suite", "llm", "--command", "python c",
                          "--date", "2026-01-01", "--machine", "m", "--out", str(out)])
    assert json.loads(out.read_text())["tables"][0]["rows"][1] == ["4", "2.5", "6", "55"]
    assert [p.name for p in plot_benchmarks.main(["--data", str(out.parent)])] == ["llm.svg"]


@pytest.fixture
def own_registry(monkeypatch):
    """make_figures registers a pass-through backend: keep it out of the other tests."""
    from mmlayers.ops import deform_attn

    monkeypatch.setattr(deform_attn, "_REGISTRY", dict(deform_attn._REGISTRY))


def test_sampling_points_are_the_layers_own(own_registry):
    """At init the offsets are the bias: loc = 0.5 + bias / base_size at every level."""
    torch.manual_seed(0)
    sync = FeatureSynchronizer(dim=16, query_dim=8, value_dim=4, heads=2, points=3,
                               level_sizes=(8, 4), base_size=4, offset_init=2.0)
    rec = make_figures._sample(sync, torch.randn(1, 1, 8), torch.randn(1, 1, 64 + 16, 4))
    assert sync.backend is None  # restored
    expected = 0.5 + sync.sampling_offsets.bias.detach().view(2, 1, 3, 2) / 4
    assert rec["sizes"] == [8, 4]
    torch.testing.assert_close(rec["loc"], expected.expand(2, 2, 3, 2), rtol=0, atol=1e-6)
    per_head = rec["w"].sum((1, 2))  # softmax over a head's 6 samples and the null slot
    assert per_head.shape == (2,) and bool(((per_head > 0.5) & (per_head < 1.0)).all())


def test_make_figures_runs(tmp_path, own_registry):
    make_figures.main(["--out", str(tmp_path)])
    assert (tmp_path / "architecture.svg").read_text().count("<text") > 20
    for svg in (tmp_path / "architecture.svg", ROOT / "docs" / "assets" / "architecture.svg"):
        assert smallest_text_px(svg.read_text()) >= 11, svg
    assert (tmp_path / "sampling_points.png").read_bytes()[:4] == b"\x89PNG"
