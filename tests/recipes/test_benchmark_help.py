"""recipes/benchmark.py --help lists the suites; SUITE --help shows that suite's flags."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITES = sorted(p.stem for p in (ROOT / "recipes" / "bench").glob("[a-z]*.py"))


def run_help(*args: str) -> str:
    out = subprocess.run([sys.executable, "recipes/benchmark.py", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env={"MALLOC_MMAP_THRESHOLD_": "1048576", "PATH": ""})
    assert out.returncode == 0, out.stderr
    return out.stdout


def suite_flags(suite: str) -> set[str]:
    """The long flags the suite's own parser declares (read from its source)."""
    source = (ROOT / "recipes" / "bench" / f"{suite}.py").read_text()
    return set(re.findall(r'add_argument\(\s*"(--[\w-]+)"', source))


def test_top_level_help_lists_every_suite():
    text = run_help("--help")
    for suite in SUITES:
        assert re.search(rf"^  {suite} +\S", text, re.M), suite
    assert "SUITE --help" in text


@pytest.mark.parametrize("suite", SUITES)
def test_suite_help_shows_its_flags(suite):
    text = run_help(suite, "--help")
    assert text.startswith(f"usage: benchmark.py {suite}")
    flags = suite_flags(suite)
    assert flags, suite
    options = text[text.index("\noptions:"):]
    missing = [f for f in sorted(flags) if not re.search(rf"^  (-\w, )?{f}\b", options, re.M)]
    assert not missing, missing
    # every flag says what it does: no option line without a help text after it
    undocumented = [f for f in sorted(flags)
                    if re.search(rf"^  {f}(?: \S+)*\n  (?!\s)", options + "\n  ", re.M)]
    assert not undocumented, undocumented


def test_the_help_check_can_fail():
    assert not re.search(r"^  --images\b", "\noptions:\n  -h, --help  show\n", re.M)
    assert re.search(r"^  --repeats(?: \S+)*\n  (?!\s)", "  --repeats REPEATS\n  --x\n", re.M)
