"""Training policy for LLM adapters: what trains, at which rate, and adapter-only checkpoints.

MM-Interleaved keeps the LLM frozen and trains the synchronizers (with their gates and
norms) and the new ``<soi>``/``<image>`` rows and output head. AdamW with lr 1e-4, 0.1× for
every ``sampling_offsets`` parameter, weight decay 0.05 except on biases, norm weights and
gates. These helpers decide that by name, outside ``forward``; the base model's weights are
never saved by [`save_adapter`][mmlayers.adapters.policy.save_adapter].
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from mmlayers.adapters.image_tokens import ImageTokens
from mmlayers.adapters.llm import SynchronizerHandle, attach_synchronizers

__all__ = ["load_adapter", "parameter_groups", "prepare_for_training", "save_adapter",
           "trainable_parameters"]

_WEIGHTS, _CONFIG = "adapter.safetensors", "adapter_config.json"


def trainable_parameters(handle: SynchronizerHandle | None = None,
                         image_tokens: ImageTokens | None = None) -> dict[str, nn.Parameter]:
    """Adapter parameters by name: ``synchronizers.blocks.<layer>.…`` and ``image_tokens.…``.

    Examples:
        >>> tokens = ImageTokens(hidden_size=4, soi_id=10, image_id=11)
        >>> for name in sorted(trainable_parameters(image_tokens=tokens)):
        ...     print(name)
        image_tokens.head.bias
        image_tokens.head.weight
        image_tokens.input_rows
        image_tokens.soi_vector
    """
    named: dict[str, nn.Parameter] = {}
    if handle is not None:
        named.update({f"synchronizers.{k}": p for k, p in handle.adapter.named_parameters()})
    if image_tokens is not None:
        named.update({f"image_tokens.{k}": p for k, p in image_tokens.named_parameters()})
    return named


def prepare_for_training(model: nn.Module, handle: SynchronizerHandle | None = None,
                         image_tokens: ImageTokens | None = None) -> dict[str, nn.Parameter]:
    """Freeze every base-model parameter and make the adapter parameters trainable.

    Returns:
        the trainable parameters by name (as [`trainable_parameters`][mmlayers.adapters.policy.trainable_parameters]).
    """
    model.requires_grad_(False)
    named = trainable_parameters(handle, image_tokens)
    for p in named.values():
        p.requires_grad_(True)
    return named


def _no_decay(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("bias", "gate") or "_norm." in name or name.endswith("soi_vector")


def parameter_groups(named: dict[str, nn.Parameter], *, lr: float = 1e-4,
                     weight_decay: float = 0.05, offset_lr_scale: float = 0.1
                     ) -> list[dict]:
    """AdamW parameter groups with the paper's rates.

    ``sampling_offsets`` parameters get ``lr · offset_lr_scale``; biases, norm weights, gates
    and the ``<soi>`` vector get no weight decay. Empty groups are dropped; every group has
    a ``"names"`` entry (ignored by ``torch.optim``) for inspection.

    Examples:
        >>> import torch
        >>> named = {"a.sampling_offsets.weight": torch.nn.Parameter(torch.zeros(2)),
        ...          "a.gate": torch.nn.Parameter(torch.zeros(1)),
        ...          "a.value_proj.weight": torch.nn.Parameter(torch.zeros(2))}
        >>> for g in parameter_groups(named):
        ...     print(g["names"], g["lr"], g["weight_decay"])
        ['a.sampling_offsets.weight'] 1e-05 0.05
        ['a.gate'] 0.0001 0.0
        ['a.value_proj.weight'] 0.0001 0.05
    """
    groups: dict[tuple[float, float], dict] = {}
    for name, p in named.items():
        if not p.requires_grad:
            continue
        slow = "sampling_offsets" in name
        key = (lr * offset_lr_scale if slow else lr, 0.0 if _no_decay(name) else weight_decay)
        g = groups.setdefault(key, {"params": [], "names": [], "lr": key[0],
                                    "weight_decay": key[1]})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def save_adapter(directory: str | os.PathLike, handle: SynchronizerHandle | None = None,
                 image_tokens: ImageTokens | None = None) -> None:
    """Write the adapter weights (safetensors) and how to rebuild them (JSON) to a directory.

    Only adapter tensors are written (``trainable_parameters`` names); the base model is not.
    """
    from safetensors.torch import save_file

    if handle is None and image_tokens is None:
        raise ValueError("nothing to save: pass handle and/or image_tokens")
    os.makedirs(directory, exist_ok=True)
    tensors = {k: p.detach().contiguous().cpu() for k, p in
               trainable_parameters(handle, image_tokens).items()}
    save_file(tensors, os.path.join(directory, _WEIGHTS))
    config = {"synchronizers": None if handle is None else handle.config,
              "image_tokens": None if image_tokens is None else {
                  "soi_id": image_tokens.soi_id, "image_id": image_tokens.image_id,
                  "tokens_per_image": image_tokens.tokens_per_image,
                  "init_logit": image_tokens.init_logit}}
    with open(os.path.join(directory, _CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def load_adapter(directory: str | os.PathLike, model: nn.Module, *,
                 layers_path: str | None = None, backend: str | None = None
                 ) -> tuple[SynchronizerHandle | None, ImageTokens | None]:
    """Rebuild the adapter saved by [`save_adapter`][mmlayers.adapters.policy.save_adapter] on ``model`` and load its weights.

    Returns:
        ``(handle, image_tokens)``, each attached to ``model`` (or ``None`` if not saved).

    Raises:
        ValueError: missing or unexpected tensors, or shapes that do not match ``model``.
    """
    from safetensors.torch import load_file

    with open(os.path.join(directory, _CONFIG)) as f:
        config = json.load(f)
    state = load_file(os.path.join(directory, _WEIGHTS))
    handle = tokens = None
    sc, tc = config.get("synchronizers"), config.get("image_tokens")
    ref = next(model.parameters())
    if sc is not None:
        kw = {k: sc[k] for k in ("value_dim", "dim", "heads", "points", "level_sizes",
                                 "base_size", "offset_init", "max_images", "eps", "placement")}
        hp = sc.get("hook_points")
        handle = attach_synchronizers(model, layers=sc["layers"], layers_path=layers_path,
                                      hook_points=None if hp is None else tuple(hp),
                                      backend=backend, **kw)
        if handle.config["hidden_size"] != sc["hidden_size"]:
            handle.remove()
            raise ValueError(f"adapter was saved for hidden_size {sc['hidden_size']}, the model "
                             f"has {handle.config['hidden_size']}")
    if tc is not None:
        hidden = model.get_input_embeddings().weight.shape[1]
        tokens = ImageTokens(hidden_size=hidden, device=ref.device, dtype=ref.dtype, **tc)
    own = trainable_parameters(handle, tokens)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        if handle is not None:
            handle.remove()
        raise ValueError(f"adapter weights in {directory} do not fit: missing {missing}, "
                         f"unexpected {unexpected}, wrong shape {bad}")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(state[k])
    if tokens is not None:
        tokens.attach(model)
    return handle, tokens
