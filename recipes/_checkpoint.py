"""Atomic training checkpoints for ``recipes/train.py``, in one process or several.

A checkpoint is a directory ``<out>/checkpoints/step_NNNNNN`` holding

- ``model.safetensors`` + ``config.json`` (:meth:`MMInterleaved.save_pretrained`; the
  frozen parts loaded from local directories are left out);
- ``trainer.pt``: step, samples consumed (the data position), optimizer, LR schedule,
  grad scaler, the noise generator and the torch / Python RNG states;
- with a sharding engine (FSDP, DeepSpeed) an ``engine/`` folder written by
  ``accelerator.save_state`` (sharded model and optimizer state: resume with the same
  number of processes).

Everything is written to ``step_N.tmp`` first and renamed with ``os.replace``; the one-line
``latest`` file is replaced last, so an interrupted save never leaves a half checkpoint
behind ``latest``. Only the main process writes files; all processes take part in the
collective calls. Without a sharding engine every process holds the full optimizer state,
so a checkpoint written by N processes resumes in any number of processes.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

__all__ = ["load_checkpoint", "save_checkpoint", "save_model", "sharded"]


def sharded(accelerator) -> bool:
    """True when the engine shards model or optimizer state (FSDP, DeepSpeed)."""
    return accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")


def save_checkpoint(out: Path, step: int, samples: int, accelerator, model, opt, sched,
                    gen: torch.Generator, data, keep: int) -> None:
    """Write checkpoint ``step`` (call on every process); ``data.state_dict()`` of every
    process is gathered into ``trainer.pt`` (``None`` for index-addressed data)."""
    from accelerate.utils import gather_object

    ckpt = out / "checkpoints"
    final, tmp = ckpt / f"step_{step:06d}", ckpt / f"step_{step:06d}.tmp"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if sharded(accelerator):
        accelerator.save_state(str(tmp / "engine"))
    save_model(accelerator, model, tmp)
    local = data.state_dict()
    data_states = gather_object([local]) if accelerator.num_processes > 1 else [local]
    if main:
        scaler = accelerator.scaler
        torch.save({"step": step, "samples": samples,
                    "optimizer": None if sharded(accelerator) else opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "generator": gen.get_state(), "torch": torch.get_rng_state(),
                    "python": random.getstate(), "world_size": accelerator.num_processes,
                    "data": data_states},
                   tmp / "trainer.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(ckpt / "latest.tmp", "w") as f:
            f.write(final.name)
        os.replace(ckpt / "latest.tmp", ckpt / "latest")
        for old in sorted(ckpt.glob("step_??????"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def save_model(accelerator, model, directory: Path) -> None:
    """``save_pretrained`` into ``directory`` by the main process (call on every process:
    sharded engines gather the full state dict first)."""
    full = accelerator.get_state_dict(model) if sharded(accelerator) else None
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if full is None:
            unwrapped.save_pretrained(directory)
        else:
            _save_full(unwrapped, full, Path(directory))


def _save_full(unwrapped, state: dict, directory: Path) -> None:
    """``save_pretrained`` from a gathered full state dict (sharded engines)."""
    import json

    from safetensors.torch import save_file

    skip = unwrapped._skipped_prefixes()
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()
               if not k.startswith(skip)}
    save_file(tensors, str(directory / "model.safetensors"),
              metadata={"skipped": json.dumps(list(skip))})
    unwrapped.config.save(directory / "config.json")
    if unwrapped.tokenizer is not None:
        unwrapped.tokenizer.save_pretrained(str(directory / "tokenizer"))


def load_checkpoint(out: Path, accelerator, model, opt, sched, gen: torch.Generator,
                    data) -> tuple[int, int | None]:
    """Restore ``checkpoints/latest`` in place; returns ``(step, samples)`` (``samples`` is
    ``None`` for checkpoints written before it was recorded)."""
    from safetensors.torch import load_file

    ckpt = out / "checkpoints"
    name = (ckpt / "latest").read_text().strip()
    state = torch.load(ckpt / name / "trainer.pt", weights_only=False)
    if sharded(accelerator):
        if state.get("world_size", 1) != accelerator.num_processes:
            raise ValueError(f"{ckpt / name} holds sharded state of {state.get('world_size')} "
                             f"processes; resume it with that many, not "
                             f"{accelerator.num_processes}")
        accelerator.load_state(str(ckpt / name / "engine"))
    else:
        weights = load_file(ckpt / name / "model.safetensors")
        accelerator.unwrap_model(model).load_state_dict(weights, strict=False)
        opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    data_states = state.get("data") or [None]
    if any(s is not None for s in data_states):
        if len(data_states) != accelerator.num_processes:
            raise ValueError(f"{ckpt / name} holds the stream positions of {len(data_states)} "
                             f"processes; resume it with that many, not "
                             f"{accelerator.num_processes}")
        data.load_state_dict(data_states[accelerator.process_index])
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    return int(state["step"]), state.get("samples")
