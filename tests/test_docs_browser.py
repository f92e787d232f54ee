"""The site in a real browser: no benchmark table wider than the content column at 1280 px
(desktop) or 390 px (phone), no code block wider than it at 1280 px. Needs headless
Chromium; skipped without it."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium")
PAGES = sorted(p.stem for p in (ROOT / "docs").glob("benchmarks*.md"))

# Run in the page after load: every table whose scroll box scrolls sideways.
TABLES = """[...document.querySelectorAll('article table')].map((t, i) => {
    const box = t.closest('.md-typeset__scrollwrap') || t.parentElement;
    return box.scrollWidth > box.clientWidth + 1
      ? `table ${i} (${t.rows[0].cells.length} columns): ${box.scrollWidth} px in ` +
        `${box.clientWidth} px` : '';
  })"""
# ... every code block (signatures aside: a long default value is the code's) that does
CODE = """[...document.querySelectorAll('article pre > code')].map(c =>
    c.scrollWidth > c.clientWidth + 1 && !c.closest('.doc-signature')
      ? c.textContent.split('\\n').reduce((a, b) => a.length > b.length ? a : b)
          .slice(0, 70) : '')"""


def probe_script(found: str) -> str:
    return ("<script>window.addEventListener('load', () => setTimeout(() => {"
            "const out = document.createElement('pre'); out.id = 'WIDE_TABLES';"
            f"out.textContent = {found}.filter(Boolean).join('\\n');"
            "document.body.appendChild(out); }, 300));</script>")


def wide_tables(pages: list[Path], width: int, found: str = TABLES) -> dict[str, list[str]]:
    """{page: its tables (or with ``CODE`` its code blocks) that overflow} in a window
    ``width`` px wide. One browser run loads every page in an iframe of that width
    (headless windows are at least 500 px)."""
    frames = []
    for i, page in enumerate(pages):
        probe = page.with_name("probe.html")
        probe.write_text(page.read_text().replace("</head>", probe_script(found) + "</head>", 1))
        frames.append(f"<iframe id=f{i} src='{probe.as_uri()}' width={width} height=1500>"
                      "</iframe>")
    host = pages[0].parent.parent / "width_probe.html"
    host.write_text(
        "".join(frames) + "<script>window.addEventListener('load', () => setTimeout(() => {"
        "const out = [...document.querySelectorAll('iframe')].map(f => { const d = f."
        "contentDocument.getElementById('WIDE_TABLES'); return d ? d.textContent : "
        "'NOT MEASURED'; }); document.body.insertAdjacentHTML('beforeend', '<pre id=OUT>' +"
        " JSON.stringify(out).replace(/</g, '\\\\u003c') + '</pre>'); }, 1500));</script>")
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from"
         "-files", f"--window-size={max(width, 500) + 40},2000", "--virtual-time-budget=8000",
         "--dump-dom", host.as_uri()], capture_output=True, text=True, timeout=300).stdout
    m = re.search(r"<pre id=\"OUT\">(.*?)</pre>", out, re.S)
    assert m is not None, "the browser returned no measurement"
    found = json.loads(html.unescape(m.group(1)))
    assert "NOT MEASURED" not in found, dict(zip(map(str, pages), found, strict=True))
    return {str(p): [x for x in f.splitlines() if x] for p, f in zip(pages, found, strict=True)}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--quiet", "--site-dir", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    return out


@pytest.mark.parametrize("width", [1280, 390])
def test_benchmark_tables_fit_the_page(site, width):
    wide = wide_tables([site / p / "index.html" for p in PAGES], width)
    wide = {p: w for p, w in wide.items() if w}
    assert not wide, f"tables wider than the page at {width} px: {wide}"


def test_code_blocks_fit_the_page_at_1280px(site):
    # the Quickstart repeats the README's one-line commands verbatim (tests keep them so)
    pages = sorted(p for p in site.rglob("index.html")
                   if p.parent.name != "quickstart" and p.parent != site / "404")
    assert len(pages) > 20
    wide = {p: w for p, w in wide_tables(pages, 1280, CODE).items() if w}
    assert not wide, f"code wider than the page at 1280 px: {wide}"


def test_the_width_check_can_fail(site):
    page = site / "benchmarks" / "index.html"
    row = "<tr>" + "".join(f"<td>column_{i}_wide_cell</td>" for i in range(14)) + "</tr>"
    text = page.read_text()
    i = text.index("<h1")
    broken = site / "wide_probe" / "index.html"  # same depth: the theme's files still load
    broken.parent.mkdir(exist_ok=True)
    broken.write_text(text[:i] + f"<table><tr><th>a</th></tr>{row}</table>" + text[i:])
    for width in (1280, 390):
        wide = wide_tables([page, broken], width)
        assert list(map(bool, wide.values())) == [False, True], (width, wide)
    code = "<pre><code>" + "x" * 95 + "</code></pre>"
    broken.write_text(text[:i] + code + text[i:])
    assert list(map(bool, wide_tables([page, broken], 1280, CODE).values())) == [False, True]
