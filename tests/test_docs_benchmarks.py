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


def columns_shown(page_header, page_rows, header, rows) -> dict[str, list[str]] | None:
    """The columns of a saved table (``header``, ``rows``) that a page table shows, as
    {column: page cells}, or ``None`` if the page table is not a view of it. A view keeps
    the saved table's first column as its key and is either a subset of the columns
    (a wide table split in two) or transposed (one row per saved column, one column per
    saved row, headed by the key values)."""
    if not page_header or page_header[0] != header[0]:
        return None
    keys = [r[0] for r in rows]
    if set(page_header) <= set(header) and len(page_rows) == len(rows):
        shown = {h: [r[c] for r in page_rows] for c, h in enumerate(page_header)}
    elif (len(page_header) == len(rows) + 1 and all(len(r) == len(page_header) for r in page_rows)
          and all(r[0] in header for r in page_rows)):
        shown = {header[0]: page_header[1:], **{r[0]: r[1:] for r in page_rows}}
    else:
        return None
    if not all(same(cell, key) for cell, key in zip(shown[header[0]], keys, strict=True)):
        return None
    return shown


def mismatches(page_text: str, saved: dict) -> list[str]:
    tables, bad, used = md_tables(page_text), [], set()
    for t in saved["tables"]:
        header = [str(h) for h in t["header"]]
        todo = set(header)
        for k, (h, rows) in enumerate(tables):
            if k in used:
                continue
            shown = columns_shown(h, rows, header, t["rows"])
            if shown is None or not (set(shown) - {header[0]}) & todo:
                continue
            used.add(k)
            todo -= set(shown)
            for name, cells in shown.items():
                c = header.index(name)
                for r, (cell, saved_row) in enumerate(zip(cells, t["rows"], strict=True)):
                    if not same(cell, saved_row[c]):
                        bad.append(f"row {r} column {name!r}: page {cell!r}, saved "
                                   f"{saved_row[c]!r}")
            if not todo:
                break
        if todo:
            bad.append(f"table {header[:3]}…: columns not on the page (as they are, split "
                       f"or transposed, with the same rows): {sorted(todo)}")
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


def test_split_and_transposed_tables_are_checked_too():
    saved = {"tables": [{"header": ["m", "ms", "MiB", "ratio"],
                         "rows": [[1, 3.5181, 10, 2.06], [16, 7.25, 20, 1.5]]}]}
    split = ("| m | ms | ratio |\n|---|---|---|\n| 1 | 3.52 | 2.06x |\n| 16 | 7.25 | 1.5x |\n"
             "\ntext\n\n| m | MiB |\n|---|---|\n| 1 | 10 |\n| 16 | 20 |\n")
    assert not mismatches(split, saved)
    assert mismatches(split.replace("| 16 | 20 |", "| 16 | 21 |"), saved)
    assert mismatches(split.replace("| m | MiB |", "| m | GiB |"), saved)  # a column lost
    assert mismatches(split.replace("| 16 | 20 |", "| 15 | 20 |"), saved)  # other rows
    transposed = ("| m | 1 | 16 |\n|---|---|---|\n| ms | 3.52 | 7.25 |\n| MiB | 10 | 20 |\n"
                  "| ratio | 2.06x | 1.5x |\n")
    assert not mismatches(transposed, saved)
    assert mismatches(transposed.replace("| 7.25 |", "| 7.26 |"), saved)
    assert mismatches(transposed.replace("| m | 1 | 16 |", "| m | 16 | 1 |"), saved)
    assert mismatches(transposed.replace("| MiB | 10 | 20 |\n", ""), saved)
