"""``python recipes/benchmark.py session --quick`` runs and its three ways agree."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))

from bench import session as bench_session  # noqa: E402


def test_session_suite_quick(capsys):
    bench_session.main(["--quick"])
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| session", "| re-encode"))]
    assert [r[0] for r in rows] == ["session", "re-encode per turn", "re-encode per token"]
    for r in rows:
        assert r[-1] == "yes"                        # same token ids and 8-bit images
        assert all(float(x) > 0 for x in r[1:6])
    assert rows[0][2] == "1.00"
