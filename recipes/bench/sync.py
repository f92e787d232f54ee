"""FeatureSynchronizer vs the official MMFS formulation vs dense gated cross-attention.

``python recipes/benchmark.py sync [--quick] [--images 1 4 16 30] [--repeats 3] [--threads 1]
[--precomputed]``

Forward + backward (query, image features and all weights need gradients) of one layer on
one sequence whose visibility is that of an interleaved document: the images are spread
evenly over the n tokens and each token sees the images that start at or before it.

- ``mmlayers``: :class:`mmlayers.layers.synchronizer.FeatureSynchronizer`.
- ``official``: the official formulation re-stated from its semantics: the query repeated
  for every image, the dq×dq Linear on each copy, relpos rows added, offsets and logits
  (with ignore slots) per image, −10000 on invisible images, one joint softmax, every
  image sampled (same deformable-attention backend).
- ``dense``: Flamingo-style cross-attention from every token to every token of every
  visible image (all pyramid levels), width ``dim``, through ``scaled_dot_product_attention``
  with a boolean mask, tanh-gated output.

Each time is the median of ``--repeats`` runs after one warm-up, as process CPU time (all
threads; robust on a shared machine) and as wall time; the ratios are against ``mmlayers``
measured in the same run. With ``--precomputed`` the image side is computed outside the
timed region: ``prepare_values`` (projection + sampling layout) for ``mmlayers``,
``value_proj`` for ``official``, K/V for ``dense``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmlayers.layers.synchronizer import FeatureSynchronizer  # noqa: E402
from mmlayers.ops import multi_scale_deformable_attention  # noqa: E402

from bench._common import format_table, peak_memory  # noqa: E402

__all__ = ["main"]


class OfficialFormulation(nn.Module):
    """The official MMFS computation order, with the official parameter shapes."""

    def __init__(self, *, dim, query_dim, value_dim, heads, points, level_sizes, base_size,
                 max_images=50, backend=None):
        super().__init__()
        self.heads, self.points, self.level_sizes, self.base = heads, points, level_sizes, base_size
        self.backend = backend
        n_lv = len(level_sizes)
        self.dynamic_offset_mask = nn.Linear(query_dim, query_dim)
        self.query_relpos = nn.Embedding(max_images, query_dim)
        self.sampling_offsets = nn.Linear(query_dim, heads * points * 2)
        self.attention_weights = nn.Linear(query_dim, heads * n_lv * (points + 1))
        self.value_proj = nn.Linear(value_dim, dim)
        self.output_proj = nn.Linear(dim, query_dim)

    def forward(self, query, features, vis, *, values=None):
        h, p, sizes = self.heads, self.points, self.level_sizes
        values = self.value_proj(features) if values is None else values
        m, n_lv = values.shape[1], len(sizes)
        v = vis.long()
        relpos = (v.sum(-1, keepdim=True) + 1 - v.cumsum(-1)) * v  # (b, n, m)
        value = rearrange(values, "b m s (h dh) -> b (m s) h dh", h=h)
        q = query.unsqueeze(1).repeat(1, m, 1, 1)  # (b, m, n, dq): one copy per image
        q = self.dynamic_offset_mask(q) + self.query_relpos(relpos.transpose(1, 2))
        off = rearrange(self.sampling_offsets(q), "b m n (h p xy) -> b n h m p xy", h=h, p=p)
        locs = [0.5 + off * (s / self.base) / s for s in sizes]
        loc = rearrange(torch.stack(locs, 4), "b n h m l p xy -> b n h (m l) p xy")
        logit = rearrange(self.attention_weights(q), "b m n (h l p) -> b n h m l p",
                          h=h, l=n_lv)
        mask = (~vis).to(logit.dtype)[:, :, None, :, None, None] * -10000.0
        logit = torch.cat((logit[..., :-1] + mask,
                           torch.full_like(logit[..., -1:], -math.log(m * n_lv))), dim=-1)
        w = rearrange(logit, "b n h m l p -> b n h (m l p)").softmax(-1)
        w = rearrange(w, "b n h (m l p) -> b n h (m l) p", m=m, l=n_lv)[..., :-1]
        out = multi_scale_deformable_attention(value, [(s, s) for s in sizes] * m, None, loc, w,
                                               backend=self.backend)
        return self.output_proj(out)  # the ignore slots add weight × 0


class DenseCrossAttention(nn.Module):
    """Flamingo-style gated cross-attention to every visible image token."""

    def __init__(self, *, dim, query_dim, value_dim, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(query_dim)
        self.to_q = nn.Linear(query_dim, dim, bias=False)
        self.to_kv = nn.Linear(value_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, query_dim, bias=False)
        self.gate = nn.Parameter(torch.tensor(0.5))

    def forward(self, query, features, vis, *, values=None):
        kv = self.to_kv(features) if values is None else values
        b, m, s, _ = kv.shape
        q = rearrange(self.to_q(self.norm(query)), "b n (h dh) -> b h n dh", h=self.heads)
        k, v = rearrange(kv, "b m s (two h dh) -> two b h (m s) dh", two=2, h=self.heads)
        mask = vis.repeat_interleave(s, dim=-1)[:, None]  # (b, 1, n, m·s)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = torch.nan_to_num(out)  # tokens that see no image: all-masked rows
        return self.to_out(rearrange(out, "b h n dh -> b n (h dh)")) * self.gate.tanh()


def document_visibility(b: int, n: int, m: int) -> torch.Tensor:
    """(b, n, m): image k starts at token (2k + 1)·n / 2m; tokens see images started."""
    starts = (torch.arange(m) * 2 + 1) * n // (2 * m)
    return (torch.arange(n)[:, None] >= starts[None, :]).expand(b, n, m).contiguous()


def cpu_and_wall(fn, repeats: int) -> tuple[float, float]:
    """Median process CPU seconds and median wall seconds of ``fn`` after one warm-up."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmark.py sync", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--images", type=int, nargs="+", default=None,
                        help="image counts m, one row each (default 1 4 16 30; --quick: 1 4 8)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs after one warm-up (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory pass")
    parser.add_argument("--precomputed", action="store_true",
                        help="project image features outside the timed region (value_proj "
                             "for the synchronizers, K/V for dense), as when one prompt's "
                             "images are reused; features then need no gradient")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        cfg = dict(dim=128, query_dim=256, value_dim=128, heads=4, points=4,
                   level_sizes=(8, 4, 2), base_size=4)
        n, images = 64, args.images or [1, 4, 8]
    else:
        cfg = dict(dim=1024, query_dim=2048, value_dim=1024, heads=16, points=8,
                   level_sizes=(32, 16, 8), base_size=16)
        n, images = 512, args.images or [1, 4, 16, 30]
    torch.manual_seed(0)
    s = sum(x * x for x in cfg["level_sizes"])
    layers = {
        "mmlayers": FeatureSynchronizer(**cfg, out_dim=cfg["query_dim"]),
        "official": OfficialFormulation(**cfg),
        "dense": DenseCrossAttention(dim=cfg["dim"], query_dim=cfg["query_dim"],
                                     value_dim=cfg["value_dim"], heads=cfg["heads"]),
    }
    rows = []
    for m in images:
        query = torch.randn(1, n, cfg["query_dim"], requires_grad=True)
        feats = torch.randn(1, m, s, cfg["value_dim"], requires_grad=True)
        vis = document_visibility(1, n, m)
        res = {}
        for name, layer in layers.items():
            pre = None
            if args.precomputed:
                with torch.no_grad():
                    if name == "mmlayers":
                        pre = layer.prepare_values(feats)
                    else:
                        pre = (layer.to_kv if name == "dense" else layer.value_proj)(feats)

            def step(layer=layer, pre=pre, query=query, feats=feats, vis=vis):
                layer.zero_grad(set_to_none=True)
                query.grad = feats.grad = None
                if pre is None:
                    layer(query, feats, vis).sum().backward()
                else:
                    layer(query, None, vis, values=pre).sum().backward()
            cpu, wall = cpu_and_wall(step, args.repeats)
            mem = float("nan") if args.no_memory else peak_memory(step) / 2**20
            res[name] = (cpu, wall, mem)
        c0, w0, m0 = res["mmlayers"]
        (c1, w1, m1), (c2, w2, m2) = res["official"], res["dense"]
        rows.append([m, f"{c0 * 1e3:.0f}", f"{c1 * 1e3:.0f}", f"{c2 * 1e3:.0f}",
                     f"{c1 / c0:.1f}x", f"{c2 / c0:.1f}x", f"{w1 / w0:.1f}x", f"{w2 / w0:.1f}x",
                     f"{m0:.0f}", f"{m1:.0f}", f"{m2:.0f}"])
    header = ["m", "mmlayers CPU ms", "official CPU ms", "dense CPU ms", "official/ours CPU",
              "dense/ours CPU", "official/ours wall", "dense/ours wall", "mmlayers MiB",
              "official MiB", "dense MiB"]
    mode = "values precomputed" if args.precomputed else "features projected inside"
    sys.stdout.write(f"n={n}, {cfg}, forward+backward, {mode}, torch {torch.__version__}, "
                     f"{torch.get_num_threads()} threads\n")
    sys.stdout.write(format_table(header, rows) + "\n")


if __name__ == "__main__":
    main()
