"""Reading a checkpoint written by another codebase: one file, a directory, or shards.

Used by [`official`][mmlayers.models.official] to read the released MM-Interleaved weights.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping

import torch

__all__ = ["read_checkpoint"]


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file or directory into one CPU state dict.

    A file: ``.safetensors`` (safetensors) or anything else (``torch.load`` with
    ``weights_only=True``). A directory: the shards listed by a ``*.index.json``
    (``weight_map``), else every ``*.safetensors``, else every ``*.bin`` in it.

    Raises:
        FileNotFoundError: no such path, no weight files, or a shard the index lists is
            missing.
        ValueError: a file that cannot be read (named), a key in two shards, or a
            checkpoint that is not a flat ``{name: tensor}`` dict.

    Examples:
        >>> import os, tempfile, torch
        >>> from mmlayers.models.checkpoint_files import read_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> torch.save({"soi_token": torch.zeros(1, 4)}, os.path.join(d, "pytorch_model.bin"))
        >>> {k: tuple(v.shape) for k, v in read_checkpoint(d).items()}
        {'soi_token': (1, 4)}
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        index = sorted(glob.glob(os.path.join(path, "*.index.json")))
        if index:
            with open(index[0]) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index[0]} has no 'weight_map' dict")
            files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
            for f in files:
                if not os.path.isfile(f):
                    raise FileNotFoundError(f"{index[0]} lists {os.path.basename(f)}, which "
                                            f"is not in {path}")
        else:
            files = (sorted(glob.glob(os.path.join(path, "*.safetensors")))
                     or sorted(glob.glob(os.path.join(path, "*.bin"))))
        if not files:
            raise FileNotFoundError(f"no *.safetensors or *.bin weight files in {path}")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.endswith(".safetensors"):
                from safetensors.torch import load_file

                part = load_file(f, device="cpu")
            else:
                part = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"cannot read checkpoint file {f}: {err}") from err
        if not isinstance(part, Mapping) or not all(isinstance(v, torch.Tensor)
                                                    for v in part.values()):
            raise ValueError(f"{f} is not a flat {{name: tensor}} state dict")
        twice = sorted(set(part) & set(state))
        if twice:
            raise ValueError(f"keys {twice[:5]} appear in more than one shard ({f})")
        state.update(part)
    return state
