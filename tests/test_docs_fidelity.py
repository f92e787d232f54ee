"""The Fidelity page names real tests: every `file::test` and every bare `test_…` name on
it is a test function in tests/ (a renamed or deleted test fails here)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "fidelity.md").read_text()


def collect_tests() -> dict[str, set[str]]:
    """{path under tests/: names of its test functions}."""
    out = {}
    for path in (ROOT / "tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text())
        out[path.relative_to(ROOT / "tests").as_posix()] = {
            n.name for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    return out


def missing(page: str, tests: dict[str, set[str]]) -> list[str]:
    bad = [f"{f}::{t}" for f, t in re.findall(r"([\w/]+\.py)::(test_\w+)", page)
           if t not in tests.get(f, set())]
    every = set().union(*tests.values())
    bare = set(re.findall(r"`(test_\w+)`", page))
    return bad + sorted(b for b in bare if b not in every)


def test_every_named_test_exists():
    tests = collect_tests()
    named = re.findall(r"([\w/]+\.py)::(test_\w+)", PAGE)
    assert len(named) >= 40
    bad = missing(PAGE, tests)
    assert not bad, "the Fidelity page names tests that do not exist:\n" + "\n".join(bad)


def test_the_check_can_fail():
    tests = collect_tests()
    assert missing("`layers/test_synchronizer.py::test_no_such_test`", tests)
    assert missing("`ops/test_nothing.py::test_gradcheck`", tests)
    assert missing("`test_no_such_test`", tests)
    assert not missing("`ops/test_deform_attn.py::test_gradcheck`", tests)


def test_page_is_in_the_nav():
    assert re.search(r"^\s*- Fidelity: fidelity\.md$", (ROOT / "mkdocs.yml").read_text(),
                     flags=re.M)
