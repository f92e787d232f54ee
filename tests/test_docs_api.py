"""Every public name of the package namespaces appears in the API reference (docs/api/*.md).

A name is covered when a ``::: dotted.path`` stub resolves to the same object, or when it
is a member of a module stub rendered with its members (no ``members: false``).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[1] / "docs" / "api"
NAMESPACES = ["mmlayers", "mmlayers.adapters", "mmlayers.models", "mmlayers.layers",
              "mmlayers.ops", "mmlayers.data", "mmlayers.evaluation"]
STUB = re.compile(r"^::: *([\w.]+)[^\n]*\n((?:[ \t]+[^\n]*\n)*)", flags=re.M)


def resolve(path: str) -> object:
    """Import ``a.b.c`` as a module, or as attribute ``c`` of module ``a.b``."""
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as err:
        if err.name is not None and not path.startswith(err.name):
            raise  # a missing dependency, not a non-module path
        module, _, attr = path.rpartition(".")
        return getattr(resolve(module), attr)


def stubs() -> list[tuple[str, str, bool]]:
    """(page, dotted path, members rendered) of every stub in docs/api."""
    out = []
    for page in sorted(API.glob("*.md")):
        for path, options in STUB.findall(page.read_text() + "\n"):
            out.append((page.name, path, not re.search(r"members:\s*(false|\[\s*\])", options)))
    return out


def _documented() -> tuple[list[object], list[object]]:
    objects, modules = [], []
    for _, path, members in stubs():
        obj = resolve(path)
        objects.append(obj)
        if members and isinstance(obj, type(importlib)):
            modules.append(obj)
    return objects, modules


def _covered(name: str, obj: object, objects: list[object], modules: list[object]) -> bool:
    if any(obj is o for o in objects):
        return True
    for module in modules:
        public = getattr(module, "__all__", [n for n in vars(module) if not n.startswith("_")])
        if name in public and getattr(module, name, None) is obj:
            return True
    return False


def test_every_stub_resolves():
    bad = []
    for page, path, _ in stubs():
        try:
            resolve(path)
        except (ImportError, AttributeError) as err:
            bad.append(f"{page}: {path} ({err})")
    assert not bad, "stubs that do not resolve:\n" + "\n".join(bad)


# (namespace, name) pairs whose attribute is known to be wrong; each has its own test below
KNOWN_BROKEN: set[tuple[str, str]] = set()


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_every_public_name_is_in_the_api_reference(namespace):
    module = importlib.import_module(namespace)
    objects, modules = _documented()
    missing = [name for name in module.__all__ if (namespace, name) not in KNOWN_BROKEN
               and not _covered(name, getattr(module, name), objects, modules)]
    assert not missing, (f"{namespace}.__all__ names missing from docs/api/*.md "
                         f"(add '::: {namespace}.NAME' stubs): {missing}")


def test_the_check_can_fail():
    objects, modules = _documented()
    assert not _covered("not_documented", object(), objects, modules)
    assert _covered("FeatureSynchronizer", resolve("mmlayers.FeatureSynchronizer"), objects,
                    modules)


def test_adapters_diffusion_loss_is_the_function():
    # a submodule named like a lazy name would shadow it once imported (it was
    # adapters/diffusion_loss.py; now adapters/diffusion_objective.py)
    import mmlayers.adapters as adapters
    import mmlayers.adapters.diffusion  # noqa: F401  (what any UNet user imports)

    assert callable(adapters.diffusion_loss)
    assert adapters.diffusion_loss is resolve("mmlayers.adapters.diffusion_objective.diffusion_loss")
    import pkgutil

    submodules = {m.name for m in pkgutil.iter_modules(adapters.__path__)}
    assert not submodules & set(adapters.__all__)
