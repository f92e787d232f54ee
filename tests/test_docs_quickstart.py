"""The docs Quickstart shows exactly the README's two Quickstart commands and real images."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_quickstart_commands_match_readme():
    readme = (ROOT / "README.md").read_text()
    readme_quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    expected = _bash_blocks(readme_quickstart)
    assert len(expected) == 2
    page = (ROOT / "docs" / "quickstart.md").read_text()
    assert _bash_blocks(page.split("\n## ", 1)[0]) == expected


def test_quickstart_images_exist_and_are_png():
    page = (ROOT / "docs" / "quickstart.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)
    assert "assets/demo_page.png" in images
    for rel in images:
        data = (ROOT / "docs" / rel).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", rel
        assert len(data) > 10_000, rel  # a real screenshot, not a placeholder
