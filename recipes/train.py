"""Train MM-Interleaved from a YAML config.

    python recipes/train.py --config recipes/configs/shapes_tiny.yaml [key=value ...] [--resume]

``key=value`` overrides use dotted keys (``train.steps=20``); values are parsed as YAML.
Writes ``<out_dir>/metrics.jsonl`` (one JSON record per log / eval), checkpoints under
``<out_dir>/checkpoints/step_NNNNNN`` (model safetensors + optimizer, LR schedule, RNG and
data position; written to a temporary directory, then ``os.replace``) and the final model
under ``<out_dir>/model``. ``--resume`` continues from ``checkpoints/latest`` exactly.
Device handling is plain torch (``accelerate`` is not used).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import caption_accuracy  # noqa: E402

from mmlayers.data import InterleavedCollator, ShapesCorpus, word_level_tokenizer  # noqa: E402
from mmlayers.models import MMInterleaved, MMInterleavedConfig  # noqa: E402
from mmlayers.models.config import TokenConfig  # noqa: E402

logger = logging.getLogger("train")
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "shapes_tiny.yaml"


# ----------------------------------------------------------------------------- config
def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> dict:
    """YAML file + dotted ``key=value`` overrides (values parsed as YAML)."""
    with open(path) as f:
        cfg = yaml.safe_load(f)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value")
        node, parts = cfg, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return cfg


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in (extra or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build(cfg: dict):
    """(model, tokenizer, training corpus, held-out corpus, collator) from the config."""
    d, mc = cfg["data"], cfg["model"]
    corpus_kw = dict(size=d["image_size"], kinds=d["kinds"], colors=d["colors"],
                     max_shapes=d["max_shapes"], jitter=d["jitter"],
                     caption_first=d["caption_first"], tensors=True)
    corpus = ShapesCorpus(seed=d["seed"], length=10**9, **corpus_kw)
    held_out = ShapesCorpus(seed=d["eval_seed"], length=10**6, **corpus_kw)
    if mc["preset"] == "tiny":
        tokenizer = word_level_tokenizer(corpus.vocabulary())
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
    else:
        raise ValueError(f"model.preset must be 'tiny' or 'paper_13b', got {mc['preset']!r}")
    config = MMInterleavedConfig.from_dict(_merge(base.to_dict(), mc.get("overrides") or {}))
    model = MMInterleaved.from_config(config, tokenizer=tokenizer)
    collate = InterleavedCollator(tokenizer=tokenizer, num_image_tokens=config.vision.num_tokens,
                                  max_length=d["max_length"])
    return model, tokenizer, corpus, held_out, collate


def make_optimizer(model: MMInterleaved, t: dict):
    groups = model.parameter_groups(lr=t["lr"], unet_lr=t["unet_lr"], offset_lr=t["offset_lr"],
                                    weight_decay=t["weight_decay"])
    for g in groups:
        g.pop("names")
    opt = torch.optim.AdamW(groups, betas=tuple(t["betas"]), eps=t["eps"])

    def factor(step: int) -> float:
        if step < t["warmup"]:
            return (step + 1) / t["warmup"]
        progress = min(1.0, (step - t["warmup"]) / max(1, t["steps"] - t["warmup"]))
        lo = t["min_lr_ratio"]
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ------------------------------------------------------------------------- checkpoints
def save_checkpoint(out: Path, step: int, model, opt, sched, scaler, gen, keep: int) -> None:
    """Atomic: everything goes to ``step_N.tmp`` first, then ``os.replace``; ``latest``
    (a one-line file) is replaced last."""
    ckpt = out / "checkpoints"
    final, tmp = ckpt / f"step_{step:06d}", ckpt / f"step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "generator": gen.get_state(), "torch": torch.get_rng_state(),
                "python": random.getstate()}, tmp / "trainer.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(ckpt / "latest.tmp", "w") as f:
        f.write(final.name)
    os.replace(ckpt / "latest.tmp", ckpt / "latest")
    for old in sorted(ckpt.glob("step_??????"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, model, opt, sched, scaler, gen) -> int:
    from safetensors.torch import load_file

    ckpt = out / "checkpoints"
    name = (ckpt / "latest").read_text().strip()
    model.load_state_dict(load_file(ckpt / name / "model.safetensors"), strict=False)
    state = torch.load(ckpt / name / "trainer.pt", weights_only=False)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    return int(state["step"])


# ------------------------------------------------------------------------------ train
def _device_and_precision(t: dict):
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                       if t["device"] == "auto" else t["device"])
    prec = t["precision"]
    if prec == "auto":
        prec = "fp16" if dev.type == "cuda" else "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
    scaler = torch.amp.GradScaler(dev.type) if prec == "fp16" else None
    return dev, dtype, scaler


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
    """Run training; returns ``{"model", "tokenizer", "held_out", "history", "seconds"}``."""
    t = cfg["train"]
    if t.get("threads"):
        torch.set_num_threads(int(t["threads"]))
    torch.manual_seed(t["seed"])
    random.seed(t["seed"])
    out = Path(t["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, corpus, held_out, collate = build(cfg)
    dev, amp_dtype, scaler = _device_and_precision(t)
    model.to(dev).train()
    opt, sched = make_optimizer(model, t)
    gen = torch.Generator().manual_seed(t["seed"])
    step = load_checkpoint(out, model, opt, sched, scaler, gen) if resume else 0
    if resume:
        logger.info("resumed from step %d", step)
    params = [p for g in opt.param_groups for p in g["params"]]
    bs, accum, history = t["batch_size"], t["grad_accum"], []
    metrics = open(out / "metrics.jsonl", "a")
    start, stop = time.perf_counter(), min(t["steps"], step + (t["stop_after"] or t["steps"]))
    while step < stop:
        sums = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0}
        for a in range(accum):
            first = (step * accum + a) * bs                     # data position
            batch = collate([corpus[i] for i in range(first, first + bs)]).to(dev)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                o = model(batch, generator=gen)
            loss = o.loss / accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
            for k in sums:
                sums[k] += getattr(o, k).item() / accum
        if scaler is not None:
            scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t["clip_grad"]).item()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        step += 1
        record = {"step": step, **sums, "grad_norm": grad_norm, "lr": sched.get_last_lr()[0],
                  "seconds": round(time.perf_counter() - start, 2)}
        history.append(record)
        out_of_time = t["time_limit"] is not None and time.perf_counter() - start > t["time_limit"]
        if step % t["log_every"] == 0 or step == stop or out_of_time:
            logger.info("step %d/%d loss %.4f text %.4f image %.4f lr %.2e (%.0fs)", step,
                        t["steps"], sums["loss"], sums["text_loss"], sums["image_loss"],
                        record["lr"], record["seconds"])
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if t["eval_every"] and (step % t["eval_every"] == 0 or step == t["steps"]):
            ev = {"step": step, **evaluate(model, held_out, collate, dev, t)}
            logger.info("eval %s", {k: round(v, 4) for k, v in ev.items()})
            metrics.write(json.dumps(ev) + "\n")
            metrics.flush()
        if step % t["save_every"] == 0 or step == stop or out_of_time:
            save_checkpoint(out, step, model, opt, sched, scaler, gen, t["keep_checkpoints"])
        if out_of_time:
            logger.info("time limit of %ss reached at step %d", t["time_limit"], step)
            break
    metrics.close()
    model.save_pretrained(out / "model")
    return {"model": model, "tokenizer": tokenizer, "held_out": held_out, "history": history,
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--resume", action="store_true", help="continue from checkpoints/latest")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    train(load_config(args.config, args.overrides), resume=args.resume)


if __name__ == "__main__":
    main()
