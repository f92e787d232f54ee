"""Every benchmark table saved as JSON (docs/assets/bench/<suite>.json, what the plots are
drawn from) is on its page with the same numbers, to the digits the page prints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "docs" / "assets" / "bench"
PAGES = {"ops": "benchmarks.md", "sync": "benchmarks_sync.md", "llm": "benchmarks_llm.md",
         "vision": "benchmarks_vision.md", "unet": "benchmarks_unet.md",
         "model": "benchmarks_model.md", "session": "benchmarks_session.md"}
NUMBER = re.compile(r"^(-?\d+(?:\.(\d+))?)\s*[x×%]?$")


def md_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of every markdown table of a page, in order."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if (lines[i].startswith("|") and i + 1 < len(lines)
                and re.match(r"^\|[\s:|-]+\|$", lines[i + 1])):
            header = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            rows = []
            for line in lines[i + 2:]:
                if not line.startswith("|"):
                    break
                rows.append([c.strip() for c in line.strip().strip("|").split("|")])
            out.append((header, rows))
            i += 2 + len(rows)
        else:
            i += 1
    return out


def same(shown: str, saved) -> bool:
    """A page cell shows a saved value: equal text, or the number rounded as printed."""
    m = NUMBER.match(shown.replace("**", ""))
    if m is None or isinstance(saved, bool):
        return shown == str(saved)
    try:
        value = float(str(saved).rstrip("x×%"))
    except ValueError:
        return False
    decimals = len(m.group(2) or "")
    return abs(float(m.group(1)) - value) <= 0.5 * 10 ** -decimals * (1 + 1e-6) + 1e-12


def mismatches(page_text: str, saved: dict) -> list[str]:
    tables, bad, used = md_tables(page_text), [], set()
    for t in saved["tables"]:
        header = [str(h) for h in t["header"]]
        match = next((k for k, (h, _) in enumerate(tables) if h == header and k not in used),
                     None)
        if match is None:
            bad.append(f"no table with header {header}")
            continue
        used.add(match)
        rows = tables[match][1]
        if len(rows) != len(t["rows"]):
            bad.append(f"{header[:3]}…: {len(rows)} rows on the page, {len(t['rows'])} saved")
            continue
        for r, (shown_row, saved_row) in enumerate(zip(rows, t["rows"], strict=True)):
            for c, (shown, value) in enumerate(zip(shown_row, saved_row, strict=True)):
                if not same(shown, value):
                    bad.append(f"row {r} column {header[c]!r}: page {shown!r}, saved {value!r}")
    return bad


SAVED = sorted(BENCH.glob("*.json"))


def test_every_saved_suite_has_a_page():
    assert {p.stem for p in SAVED} <= set(PAGES)
    assert {"llm", "sync"} <= {p.stem for p in SAVED}


@pytest.mark.parametrize("path", SAVED, ids=[p.stem for p in SAVED])
def test_page_shows_the_saved_numbers(path):
    saved = json.loads(path.read_text())
    bad = mismatches((ROOT / "docs" / PAGES[saved["suite"]]).read_text(), saved)
    assert not bad, f"{PAGES[saved['suite']]} vs {path.name}:\n" + "\n".join(bad)


def test_the_check_can_fail():
    saved = {"tables": [{"header": ["m", "ms", "ratio"], "rows": [[16, 3.5181, 2.06]]}]}
    page = "| m | ms | ratio |\n|---|---|---|\n| 16 | 3.52 | 2.06x |\n"
    assert not mismatches(page, saved)
    assert mismatches(page.replace("3.52", "3.53"), saved)
    assert mismatches(page.replace("| 16 |", "| 15 |"), saved)
    assert mismatches(page.replace("| ratio |", "| speed |"), saved)
    assert mismatches(page + "| 30 | 1 | 1 |\n", saved)
