"""Processes and engines for ``recipes/train.py`` (through ``accelerate``).

The launcher decides the engine: plain DDP (gloo on CPU, NCCL on GPUs), FSDP or DeepSpeed
(``recipes/configs/accelerate_*.yaml``). ``train.batch_size`` is the global micro-batch,
split evenly over the processes; ``train.noise: per_batch`` seeds the diffusion noise of
each micro-batch from (seed, step, micro-batch index), so a step's samples and noise do
not depend on the number of processes.
"""

from __future__ import annotations

import torch

__all__ = ["check_parallel", "make_accelerator", "noise_generator", "prepare"]


def make_accelerator(t: dict):
    """An ``accelerate.Accelerator`` for ``train.device`` / ``train.precision``; the process
    group (DDP with gloo on CPU, NCCL on GPUs, FSDP, DeepSpeed) comes from the launcher."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if t["device"] not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device must be 'auto', 'cpu' or 'cuda', got {t['device']!r}")
    cpu = t["device"] == "cpu" or (t["device"] == "auto" and not torch.cuda.is_available())
    prec = t["precision"]
    if prec == "auto":
        prec = "fp32" if cpu else "fp16"
    modes = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
    if prec not in modes:
        raise ValueError(f"train.precision must be one of auto, {', '.join(modes)}; got {prec!r}")
    ddp = DistributedDataParallelKwargs(find_unused_parameters=t.get("find_unused_parameters", True))
    return Accelerator(cpu=cpu, mixed_precision=modes[prec], kwargs_handlers=[ddp])


def check_parallel(t: dict, world: int) -> int:
    """Samples per process of a micro-batch (``train.batch_size`` split over ``world``)."""
    bs = t["batch_size"]
    if bs % world:
        raise ValueError(f"train.batch_size={bs} must be divisible by the {world} processes")
    if t["noise"] not in ("stream", "per_batch"):
        raise ValueError(f"train.noise must be 'stream' or 'per_batch', got {t['noise']!r}")
    if t["noise"] == "stream" and world > 1:
        raise ValueError("train.noise='stream' is one generator in one process; "
                         f"use train.noise=per_batch with {world} processes")
    return bs // world


def noise_generator(t: dict, step: int, micro: int, stream: torch.Generator) -> torch.Generator:
    """The generator for the diffusion noise, timesteps and context dropout of one
    micro-batch. ``train.noise: stream``: one generator for the whole run (one process
    only). ``per_batch``: seeded from (seed, step, global micro-batch index), so the noise of
    a sample does not depend on how many processes share the batch."""
    if t["noise"] == "stream":
        return stream
    return torch.Generator().manual_seed((t["seed"] * 1_000_003 + step) * 65_537 + micro)


def prepare(acc, model, opt, t: dict, *, micro_batch: int):
    """``accelerator.prepare`` of model and optimizer (not the LR schedule: it steps once
    per optimizer step here). Returns ``(model, optimizer, divisor)``: each micro-batch's
    loss is divided by it before ``backward`` (``grad_accum``; 1 under DeepSpeed, which
    divides by its own ``gradient_accumulation_steps``)."""
    accum = t["grad_accum"]
    deepspeed = acc.distributed_type.value == "DEEPSPEED"
    if deepspeed:                    # no prepared DataLoader: fill the "auto" batch fields
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = micro_batch
        ds["gradient_accumulation_steps"] = accum
        ds["train_batch_size"] = micro_batch * accum * acc.num_processes
        ds["gradient_clipping"] = t["clip_grad"]
    model, opt = acc.prepare(model, opt)
    return model, opt, 1 if deepspeed else accum
