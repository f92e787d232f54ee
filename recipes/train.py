"""Train MM-Interleaved from a YAML config.

    python recipes/train.py --config recipes/configs/shapes_tiny.yaml [key=value ...] [--resume]

``key=value`` overrides use dotted keys (``train.steps=20``); values are parsed as YAML.
Writes ``<out_dir>/metrics.jsonl`` (one JSON record per log / eval), checkpoints under
``<out_dir>/checkpoints/step_NNNNNN`` (model safetensors + optimizer, LR schedule, RNG and
data position; written to a temporary directory, then ``os.replace``) and the final model
under ``<out_dir>/model``. ``--resume`` continues from ``checkpoints/latest`` exactly. The
config is checked before anything runs (``_config_check.py``: unknown keys, types, an
``out_dir`` that holds a previous run) and saved as ``<out_dir>/config.yaml``; Ctrl-C stops
after the current step with a checkpoint and says how to resume.

Several processes (DDP, FSDP, DeepSpeed; gloo on CPU) through ``accelerate``:

    accelerate launch --config_file recipes/configs/accelerate_cpu_2proc.yaml \
        recipes/train.py --config recipes/configs/shapes_tiny.yaml train.noise=per_batch

``train.batch_size`` is the global micro-batch (split evenly over the processes), so the
samples of each step do not depend on the number of processes; a checkpoint written by N
processes resumes in any number with the shapes data and no sharding engine (streamed
web data and FSDP / DeepSpeed state: the same number).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _checkpoint import load_checkpoint, save_checkpoint, save_model  # noqa: E402
from _config_check import check_out_dir, load_config, writable_dir  # noqa: E402
from _data import build_data  # noqa: E402
from _interrupt import SigintStop  # noqa: E402
from _logs import open_metrics, progress  # noqa: E402
from _parallel import check_parallel, make_accelerator, noise_generator, prepare  # noqa: E402
from _policy import checkpoint_unet, store_frozen_in  # noqa: E402
from _report import caption_accuracy  # noqa: E402

from mmlayers.data import InterleavedCollator, ShapesCorpus, word_level_tokenizer  # noqa: E402
from mmlayers.models import MMInterleaved, MMInterleavedConfig  # noqa: E402
from mmlayers.models.config import TokenConfig  # noqa: E402

logger = logging.getLogger("train")
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "shapes_tiny.yaml"


# ----------------------------------------------------------------------------- config
def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in (extra or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def model_config(cfg: dict):
    """(:class:`MMInterleavedConfig`, tokenizer) for ``cfg["model"]`` (no weights loaded):
    the preset merged with ``model.overrides``. ``paper_13b_shapes`` (random init at the
    paper's shapes, no tokenizer) is for sizing (:mod:`mmlayers.models.memory`)."""
    d, mc = cfg["data"], cfg["model"]
    tokenizer = None
    if mc["preset"] == "tiny":                  # the word-level vocabulary of the shapes data
        tokenizer = word_level_tokenizer(ShapesCorpus(seed=0, length=1).vocabulary())
        base = MMInterleavedConfig.tiny(vocab_size=len(tokenizer), image_size=d["image_size"])
    elif mc["preset"] == "paper_13b":
        from transformers import AutoTokenizer

        from mmlayers.data import ensure_image_tokens

        p = mc["paths"]
        tokenizer = AutoTokenizer.from_pretrained(p["llm"], local_files_only=True)
        soi, img = ensure_image_tokens(tokenizer)
        tokens = TokenConfig(bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                             pad_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                             soi_id=soi, image_id=img)
        base = MMInterleavedConfig.paper_13b(p["llm"], p["vit"], p["sd"], tokens=tokens)
    elif mc["preset"] == "paper_13b_shapes":
        base = MMInterleavedConfig.paper_13b_shapes()
    else:
        raise ValueError(f"model.preset must be 'tiny', 'paper_13b' or 'paper_13b_shapes', "
                         f"got {mc['preset']!r}")
    return MMInterleavedConfig.from_dict(_merge(base.to_dict(), mc.get("overrides") or {})), tokenizer


def build(cfg: dict):
    """(model, tokenizer, collator) from the config."""
    config, tokenizer = model_config(cfg)
    if tokenizer is None:
        raise ValueError(f"model.preset={cfg['model']['preset']!r} has no tokenizer; it is for "
                         f"mmlayers.models.memory.build_on_meta, train with 'paper_13b'")
    model = MMInterleaved.from_config(config, tokenizer=tokenizer)
    collate = InterleavedCollator(tokenizer=tokenizer, num_image_tokens=config.vision.num_tokens,
                                  max_length=cfg["data"]["max_length"])
    return model, tokenizer, collate


def make_optimizer(model: MMInterleaved, t: dict):
    groups = model.parameter_groups(lr=t["lr"], unet_lr=t["unet_lr"], offset_lr=t["offset_lr"],
                                    weight_decay=t["weight_decay"])
    for g in groups:
        g.pop("names")
    opt = torch.optim.AdamW(groups, betas=tuple(t["betas"]), eps=t["eps"])
    return opt, lr_schedule(opt, t)


def lr_schedule(opt, t: dict):
    """Linear warm-up over ``train.warmup`` steps, then cosine decay to
    ``lr · train.min_lr_ratio`` at ``train.steps``."""
    def factor(step: int) -> float:
        if step < t["warmup"]:
            return (step + 1) / t["warmup"]
        progress = min(1.0, (step - t["warmup"]) / max(1, t["steps"] - t["warmup"]))
        lo = t["min_lr_ratio"]
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ------------------------------------------------------------------------------ train
def evaluate(model, held_out, collate, dev, t: dict) -> dict:
    """Loss on a fixed held-out batch (fixed noise) and greedy caption accuracy."""
    model.eval()
    docs = [held_out[i] for i in range(t["eval_docs"])]
    with torch.no_grad():
        out = model(collate(docs).to(dev), generator=torch.Generator().manual_seed(0))
    acc = caption_accuracy(model, held_out, range(t["eval_docs"]))
    model.train()
    return {"eval_loss": out.loss.item(), "eval_text_loss": out.text_loss.item(),
            "eval_image_loss": out.image_loss.item(), "caption_accuracy": acc}


def train(cfg: dict, *, resume: bool = False) -> dict:
    """Run training; returns ``{"model", "tokenizer", "held_out", "history", "seconds"}``.

    ``train.batch_size`` is the global micro-batch: each of the ``W`` processes takes
    ``batch_size / W`` consecutive samples of it (rank order), so the samples of a step and,
    with ``train.noise: per_batch``, their noise do not depend on ``W``. Only the main
    process writes logs and checkpoints."""
    sigint = SigintStop(enabled=int(os.environ.get("WORLD_SIZE", "1")) == 1)
    try:
        return _train(cfg, resume, sigint)
    finally:
        sigint.restore()


def _train(cfg: dict, resume: bool, sigint: SigintStop) -> dict:
    t = cfg["train"]
    t.setdefault("noise", "stream")
    if t.get("threads"):
        torch.set_num_threads(int(t["threads"]))
    acc = make_accelerator(t)
    world, rank = acc.num_processes, acc.process_index
    mb, global_batch = check_parallel(t, world), t["batch_size"] * t["grad_accum"]
    accum = t["grad_accum"]
    kind = acc.distributed_type.value
    logger.info("%s on %s, %d torch thread(s): %d samples per micro-batch, %d per step",
                "one process (not distributed)" if kind == "NO" else
                f"process {rank} of {world} ({kind})", acc.device, torch.get_num_threads(),
                mb, global_batch)
    torch.manual_seed(t["seed"])
    random.seed(t["seed"])
    out = Path(t["out_dir"])
    if acc.is_main_process:
        writable_dir(out).joinpath("config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    model, tokenizer, collate = build(cfg)
    data, held_out = build_data(cfg, tokenizer, collate, micro_batch=mb, rank=rank, world=world)
    if t["eval_every"] and held_out is None:
        raise ValueError("train.eval_every needs data.source=shapes (its held-out captions); "
                         "set train.eval_every=0")
    dev = acc.device
    store_frozen_in(model, t.get("frozen_dtype"))
    model.to(dev).train()
    if t.get("checkpoint_unet"):
        checkpoint_unet(model)
    opt, sched = make_optimizer(model, t)
    model, opt, divisor = prepare(acc, model, opt, t, micro_batch=mb)
    core = acc.unwrap_model(model)
    gen = torch.Generator().manual_seed(t["seed"])
    step, samples = 0, 0
    if resume:
        step, samples = load_checkpoint(out, acc, model, opt, sched, gen, data)
        samples = step * global_batch if samples is None else samples
        logger.info("resumed from step %d (%d samples consumed)", step, samples)
    params = [p for g in opt.param_groups for p in g["params"]]
    history = []
    metrics = open_metrics(out / "metrics.jsonl", step, resume) if acc.is_main_process else None
    start, stop = time.perf_counter(), min(t["steps"], step + (t["stop_after"] or t["steps"]))
    bar = progress(acc, step, stop)
    stopped_by_time = interrupted = False
    while step < stop:
        sums = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0}
        for a in range(accum):
            micro = a * world + rank                            # global micro-batch index
            first = samples + micro * mb                        # data position
            batch = data.batch(first, mb).to(dev)
            g = noise_generator(t, step, micro, gen)
            with acc.no_sync(model) if a < accum - 1 else contextlib.nullcontext():
                with acc.autocast():
                    o = model(batch, generator=g)
                acc.backward(o.loss / divisor)
            for k in sums:
                sums[k] += getattr(o, k).item() / accum
        if world > 1:                                           # mean over processes
            mean = acc.reduce(torch.tensor(list(sums.values()), dtype=torch.float64, device=dev),
                              "mean").tolist()
            sums = dict(zip(sums, mean, strict=True))
        grad_norm = acc.clip_grad_norm_(params, t["clip_grad"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        step, samples = step + 1, samples + global_batch
        record = {"step": step, **sums,
                  "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "lr": sched.get_last_lr()[0], "seconds": round(time.perf_counter() - start, 2)}
        history.append(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", refresh=False)
        out_of_time = t["time_limit"] is not None and time.perf_counter() - start > t["time_limit"]
        if t["time_limit"] is not None and world > 1:           # every process stops together
            out_of_time = bool(acc.reduce(torch.tensor([float(out_of_time)], device=dev), "max"))
        interrupted = sigint.requested
        halt = out_of_time or interrupted
        if acc.is_main_process and (step % t["log_every"] == 0 or step == stop or halt):
            logger.info("step %d/%d loss %.4f text %.4f image %.4f lr %.2e (%.0fs)", step,
                        t["steps"], sums["loss"], sums["text_loss"], sums["image_loss"],
                        record["lr"], record["seconds"])
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if acc.is_main_process and t["eval_every"] and (step % t["eval_every"] == 0
                                                        or step == t["steps"]):
            ev = {"step": step, **evaluate(core, held_out, collate, dev, t)}
            logger.info("eval %s", {k: round(v, 4) for k, v in ev.items()})
            metrics.write(json.dumps(ev) + "\n")
            metrics.flush()
        if step % t["save_every"] == 0 or step == stop or halt:
            save_checkpoint(out, step, samples, acc, model, opt, sched, gen, data,
                            t["keep_checkpoints"])
        if out_of_time:
            stopped_by_time = step < stop
            logger.info("time limit of %ss reached at step %d of %d", t["time_limit"], step,
                        stop)
            break
        if interrupted:
            break
    sigint.restore()
    if bar is not None:
        bar.close()
    if acc.is_main_process:
        metrics.close()
    if interrupted:
        sigint.exit(out, step, stop)
    save_model(acc, model, out / "model")
    acc.wait_for_everyone()
    return {"model": core, "tokenizer": tokenizer, "held_out": held_out, "history": history,
            "seconds": time.perf_counter() - start, "steps": step, "planned_steps": stop,
            "stopped_by_time_limit": stopped_by_time}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--resume", action="store_true", help="continue from checkpoints/latest")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    try:
        cfg = load_config(args.config, args.overrides)
        if int(os.environ.get("RANK", "0")) == 0:  # before any process writes there
            check_out_dir(cfg["train"]["out_dir"], resume=args.resume)
    except ValueError as err:
        raise SystemExit(f"train.py: {err}") from None
    train(cfg, resume=args.resume)


if __name__ == "__main__":
    main()
