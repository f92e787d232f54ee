"""Convert the released MM-Interleaved checkpoint into an mmlayers model directory.

    python recipes/convert_official.py --checkpoint mm_interleaved_pretrain \\
        --llm vicuna-13b-v1.3 --vit clip-vit-large-patch14 \\
        --sd stable-diffusion-2-1-base --out mmi-13b

``--checkpoint`` is a ``.bin`` / ``.safetensors`` file or a directory of them (sharded with
an ``*.index.json`` or not); ``--llm``, ``--vit`` and ``--sd`` are the local component
directories the official model was built from. The model is built with the official
modules (``MMInterleaved.from_official``: Q-Former resamplers, stored position tables,
sizes read from the checkpoint), every official key is mapped or dropped on purpose, and
the result is written with ``save_pretrained`` (``config.json`` + ``model.safetensors``).
Without ``--full`` the frozen parts loaded from the component directories (LLM, ViT, VAE)
are not written again: ``MMInterleaved.from_pretrained`` reads them from there. With a
tokenizer in ``--llm``, ``<soi>`` and ``<image>`` are added to it and it is saved too.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

from mmlayers.models import MMInterleaved, TokenConfig

logger = logging.getLogger("convert_official")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="official weights: file or directory")
    p.add_argument("--llm", required=True, help="local LLM directory (Vicuna-13B)")
    p.add_argument("--vit", required=True, help="local CLIP ViT-L/14 directory")
    p.add_argument("--sd", required=True, help="local Stable Diffusion 2.1-base directory")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--image-size", type=int, default=None, help="decoder image side (512)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast the model to this dtype before saving (default: no cast)")
    p.add_argument("--full", action="store_true", help="also write the frozen component weights")
    return p.parse_args(argv)


def _tokenizer(llm: str):
    """The LLM directory's tokenizer with ``<soi>`` / ``<image>`` added, or ``None``."""
    from transformers import AutoTokenizer

    from mmlayers.data import ensure_image_tokens

    try:
        tok = AutoTokenizer.from_pretrained(llm, local_files_only=True)
    except (OSError, ValueError):
        logger.info("no tokenizer in %s: token ids default to <soi> 32000, <image> 32001", llm)
        return None, None
    soi, image = ensure_image_tokens(tok)
    tokens = TokenConfig(bos_id=tok.bos_token_id, eos_id=tok.eos_token_id,
                         pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
                         soi_id=soi, image_id=image)
    return tok, tokens


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise SystemExit(f"--out {args.out} exists and is not empty")
    for name in ("llm", "vit", "sd"):
        if not os.path.isdir(getattr(args, name)):
            raise SystemExit(f"--{name} {getattr(args, name)} is not a directory")
    tokenizer, tokens = _tokenizer(args.llm)
    model = MMInterleaved.from_official(args.checkpoint, llm=args.llm, vit=args.vit, sd=args.sd,
                                        tokens=tokens, image_size=args.image_size,
                                        dtype=getattr(torch, args.dtype) if args.dtype else None,
                                        tokenizer=tokenizer)
    model.save_pretrained(args.out, full=args.full)
    logger.info("wrote %s", args.out)
    return args.out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
