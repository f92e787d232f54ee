"""Optional packages: import one where a feature needs it, or say which extra installs it.

``import mmlayers`` needs only torch, einops and safetensors. Features built on
transformers, diffusers, tokenizers or Pillow import them when they are used, through
``require``, so that a core-only install gets an error that
names the extra to install instead of a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]

#: the extra that installs each optional top-level package (pyproject.toml)
EXTRAS = {"transformers": "hf", "tokenizers": "data", "diffusers": "diffusion",
          "PIL": "data", "triton": "triton"}


def require(module: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` (e.g. ``"transformers"``) or raise an error naming the extra.

    Args:
        module: the dotted module name to import.
        extra: the mmlayers extra that installs it; by default looked up from the
            top-level package name.

    Returns:
        the imported module.

    Raises:
        ModuleNotFoundError: the package is not installed; the message names the extra,
            e.g. ``pip install "mmlayers[hf]"``. An import error raised inside an installed
            package (a broken dependency of it) propagates unchanged.

    Examples:
        >>> require("einops").__name__
        'einops'
    """
    top = module.partition(".")[0]
    try:
        importlib.import_module(top)
    except ModuleNotFoundError as e:
        extra = extra or EXTRAS.get(top)
        if e.name != top or extra is None:
            raise  # the package is there and something it imports is not, or no extra has it
        package = "pillow" if top == "PIL" else top
        raise ModuleNotFoundError(
            f"this feature needs the optional package {package!r}, which is not installed. "
            f'Install the {extra!r} extra: pip install "mmlayers[{extra}]" '
            f'(from a clone: pip install -e ".[{extra}]")', name=top) from e
    return importlib.import_module(module)
