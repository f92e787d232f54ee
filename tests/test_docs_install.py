"""What the Install page promises: the extras it lists are the package's, one repository
URL, and a wheel built from the clone holds the package, its LICENSE and py.typed (and no
recipes), installs on its own and runs the README example."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PAGE = (ROOT / "docs" / "install.md").read_text()


def extras_table(page: str) -> dict[str, str]:
    """{extra: its 'installs' cell} of the Extras table."""
    section = page.split("## Extras", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| *`(\w+)` *\| *([^|]*)\|", section, flags=re.M)
    return {name: cell for name, cell in rows}


def test_every_extra_is_on_the_install_page_with_its_packages():
    extras = PYPROJECT["project"]["optional-dependencies"]
    table = extras_table(PAGE)
    assert set(table) == set(extras), (sorted(table), sorted(extras))
    for name, requirements in extras.items():
        if name == "all":
            continue
        for req in requirements:
            package = re.match(r"[\w-]+", req).group(0)
            assert f"`{package}" in table[name], (name, package)
    for req in PYPROJECT["project"]["dependencies"]:
        assert f"`{req}`" in PAGE, req  # core requirements with their lower bounds


def test_the_extras_check_can_fail():
    table = extras_table(PAGE.replace("| `triton` |", "| `tritonx` |"))
    assert "triton" not in table and "tritonx" in table


def test_one_repository_url():
    mkdocs = (ROOT / "mkdocs.yml").read_text()
    repo = re.search(r"^repo_url: *(\S+)", mkdocs, flags=re.M).group(1)
    site = re.search(r"^site_url: *(\S+)", mkdocs, flags=re.M).group(1)
    urls = PYPROJECT["project"]["urls"]
    assert urls["Homepage"] == repo and urls["Documentation"] == site
    clones = re.findall(r"git clone (\S+)", PAGE + (ROOT / "README.md").read_text())
    assert clones and {c.removesuffix(".git") for c in clones} == {repo}
    assert re.search(r"^ *font: *false", mkdocs, flags=re.M), "offline fonts"


def _local_setuptools_ok() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the package sources (the clone stays untouched): with
    this environment's setuptools when it is recent enough, else in pip's isolated build
    environment (which downloads setuptools; skipped when that is impossible)."""
    local = _local_setuptools_ok()
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "mmlayers", src / "mmlayers",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    isolation = ["--no-build-isolation"] if local else []
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation,
                          "--wheel-dir", str(out), str(src)], capture_output=True, text=True)
    if run.returncode and not local:
        pytest.skip("no setuptools >= 77 here and pip could not fetch it: "
                    + run.stderr.strip()[-300:])
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (whl,) = out.glob("mmlayers-*.whl")
    return whl


def test_wheel_holds_package_license_and_py_typed(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "mmlayers/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names[-5:]
    assert "mmlayers/layers/synchronizer.py" in names
    assert not [n for n in names if n.startswith(("recipes/", "tests/", "docs/"))]
    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]


def test_installed_wheel_runs_the_readme_example(wheel, tmp_path):
    """The wheel alone (torch and einops from this environment) runs the README example,
    from a directory where the clone's sources cannot be imported."""
    target = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                          "--target", str(target), str(wheel)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    readme = (ROOT / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    check = "import mmlayers, pathlib; print(pathlib.Path(mmlayers.__file__).parent)\n"
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", check + code], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    where, shape = run.stdout.splitlines()[:2]
    assert Path(where) == target / "mmlayers"
    assert shape == "torch.Size([2, 100, 64])"
