"""Helpers of the ``system`` benchmark: batch, synchronizer variants, profiler shares, FLOPs.

Everything goes through public module hooks and public mmlayers APIs; the model's code is
not changed.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import nn
from torch.utils.checkpoint import set_checkpoint_early_stop
from torch.utils.flop_counter import FlopCounterMode

from mmlayers.adapters.llm import SynchronizerBlock
from mmlayers.adapters.skip_sync import SkipSynchronizer
from mmlayers.data.collate import InterleavedBatch
from mmlayers.layers.synchronizer import FeatureSynchronizer

from bench.sync import OfficialFormulation

__all__ = ["PARTS", "ModelFlops", "OfficialSync", "part_shares",
           "peak_bf16_tflops", "set_sync_backend", "synthetic_batch", "use_official"]

#: bf16 dense tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets;
#: the first name contained in ``torch.cuda.get_device_name()`` wins.
PEAK_BF16 = (("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0),
             ("H100", 989.4), ("H800", 989.4), ("B200", 2250.0), ("A100", 312.0),
             ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0))

PARTS = ("vision", "llm", "synchronizers", "unet", "vae", "optimizer", "other")


def peak_bf16_tflops(name: str) -> float | None:
    return next((v for key, v in PEAK_BF16 if key in name), None)


def synthetic_batch(model, *, tokens: int, images: int, image_size: int, seed: int = 0,
                    previous: bool = True) -> InterleavedBatch:
    """One row: ``<s>`` + m × (text, ``<soi>``, k × ``<image>``) + text, ``tokens`` long;
    every image has text before it (so every image runs the diffusion loss) and, with
    ``previous``, the previous image of its segment (the UNet synchronizers read its
    pyramid; the first image has none)."""
    tok, k = model.config.tokens, model.config.vision.num_tokens
    vocab = model.llm.get_input_embeddings().weight.shape[0]
    text = tokens - 1 - images * (k + 1)
    if text < images + 1:
        raise ValueError(f"{tokens} tokens cannot hold {images} images of {k + 1} tokens "
                         f"with text before each")
    g = torch.Generator().manual_seed(seed)
    special = {tok.bos_id, tok.eos_id, tok.pad_id, tok.soi_id, tok.image_id}
    pool = torch.tensor([i for i in range(min(vocab, 32000)) if i not in special])
    words = pool[torch.randint(len(pool), (text,), generator=g)].tolist()
    chunk = text // (images + 1)
    ids, soi = [tok.bos_id], []
    for i in range(images):
        ids += words[i * chunk:(i + 1) * chunk]
        soi.append(len(ids))
        ids += [tok.soi_id] + [tok.image_id] * k
    ids += words[images * chunk:]
    ids = torch.tensor([ids])
    labels = ids.masked_fill((ids == tok.image_id) | (ids == tok.bos_id), -100)
    m = images
    return InterleavedBatch(
        input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
        images=torch.rand(m, 3, image_size, image_size, generator=g),
        images_per_row=torch.tensor([m]), image_row=torch.zeros(m, dtype=torch.long),
        image_soi=torch.tensor(soi), image_bos=torch.zeros(m, dtype=torch.long),
        image_has_context=torch.ones(m, dtype=torch.bool),
        image_previous=torch.arange(m) - 1 if previous else torch.full((m,), -1),
        image_document=torch.zeros(m, dtype=torch.long),
        row_documents=[[0]])


def set_sync_backend(model, backend: str | None) -> None:
    """Deformable-op backend of every LLM and UNet synchronizer."""
    for mod in [*model.llm_sync.modules(), *model.unet_sync.modules()]:
        if isinstance(mod, FeatureSynchronizer):
            mod.backend = backend


class OfficialSync(nn.Module):
    """Drop-in for ``SynchronizerBlock.sync`` computing MMFS in the official order
    (query repeated per image, every image sampled; ``bench.sync.OfficialFormulation``)."""

    def __init__(self, ours: FeatureSynchronizer, backend: str | None):
        super().__init__()
        self.inner = OfficialFormulation(
            dim=ours.dim, query_dim=ours.query_dim, value_dim=ours.value_dim,
            heads=ours.heads, points=ours.points, level_sizes=ours.level_sizes,
            base_size=ours.base_size, max_images=ours.max_images, backend=backend)
        self.tokens_per_image, self.value_dim = ours.tokens_per_image, ours.value_dim
        self.level_sizes, self.max_images = ours.level_sizes, ours.max_images

    def project_values(self, features):
        return self.inner.value_proj(features)

    def prepare_values(self, features=None, *, values=None):
        return self.project_values(features) if values is None else values

    def forward(self, query, features=None, visibility=None, *, values=None,
                reference_points=None):
        values = self.project_values(features) if values is None else values
        return self.inner(query, None, visibility, values=values)


def use_official(model, backend: str | None) -> None:
    """Swap every LLM synchronizer for :class:`OfficialSync` (same device and dtype)."""
    for block in model.llm_sync.blocks.values():
        p = block.gate
        with torch.device(p.device):
            block.sync = OfficialSync(block.sync, backend).to(p.dtype)


# ------------------------------------------------------------------- profiler shares
def _ranges(model):
    """(module, part) pairs whose forward calls are marked with record_function."""
    out = [(model.visual, "vision"), (model.llm.get_decoder(), "llm"),
           (model.llm.get_output_embeddings(), "llm"), (model.unet, "unet")]
    if model.vae is not None:   # encode() / decode() are methods: mark the submodules
        out += [(mod, "vae") for mod in model.vae.children()]
    for root in (model.llm_sync, model.unet_sync):
        for name, mod in root.named_modules():
            if isinstance(mod, SynchronizerBlock | SkipSynchronizer) or name.endswith(
                    ("value_proj", "vision_norm", "value_norm")):
                out.append((mod, "synchronizers"))
    return out


@contextlib.contextmanager
def _marked(model):
    open_ranges, handles = defaultdict(list), []
    for mod, part in _ranges(model):
        def pre(module, args, part=part):
            rf = torch.autograd.profiler.record_function(f"part::{part}")
            rf.__enter__()
            open_ranges[id(module)].append(rf)

        def post(module, args, output):
            if open_ranges[id(module)]:
                open_ranges[id(module)].pop().__exit__(None, None, None)
        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def part_shares(model, step, optimizer_step, device: str) -> dict[str, float]:
    """Share of device time (CUDA kernels) or CPU time per part of one training step.

    Forward ops belong to the innermost marked module range; backward ops to the range
    of the forward op that created them (autograd sequence numbers, as torch's own
    backward stack traces); recomputed (checkpointed) forwards to their own ranges.
    """
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    # recomputations run to the end, so every range opened in a forward hook is closed
    with torch.profiler.profile(activities=acts) as prof, _marked(model), \
            set_checkpoint_early_stop(False):
        step()
        with torch.autograd.profiler.record_function("part::optimizer"):
            optimizer_step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    events = prof.events()
    cache: dict[int, str | None] = {}
    fwd: dict[tuple[int, int], str] = {}

    def owner(evt, use_bwd: bool) -> str | None:
        e = evt
        while e is not None:
            if e.name.startswith("part::"):
                return e.name[6:]
            if e.scope == 1:
                return fwd.get((e.sequence_nr, e.fwd_thread), "other") if use_bwd else None
            e = e.cpu_parent
        return "other"

    for evt in events:
        if evt.sequence_nr >= 0:
            part = owner(evt, False)
            if part is not None:
                fwd.setdefault((evt.sequence_nr, evt.thread), part)
    totals = dict.fromkeys(PARTS, 0.0)
    cuda = device.startswith("cuda")
    for evt in events:
        t = evt.self_device_time_total if cuda else evt.self_cpu_time_total
        if t:
            part = cache.setdefault(id(evt), owner(evt, True))
            totals[part if part in totals else "other"] += t
    whole = sum(totals.values()) or 1.0
    return {k: v / whole for k, v in totals.items()}


# ------------------------------------------------------------------------ FLOPs
class ModelFlops(FlopCounterMode):
    """FLOPs of a training step as the model defines it: matmuls, convolutions and
    attention of forward and backward, not the forwards recomputed by gradient
    checkpointing (module forwards that run inside backward are skipped)."""

    def __init__(self):
        super().__init__(display=False)
        self._inside = 0
        self._hooks = []

    def __enter__(self):
        def pre(module, args):
            if torch._C._current_graph_task_id() != -1:
                self._inside += 1
                self._marks.append(module)

        def post(module, args, output):
            if self._marks and self._marks[-1] is module:
                self._marks.pop()
                self._inside -= 1
        self._marks = []
        self._hooks = [nn.modules.module.register_module_forward_pre_hook(pre),
                       nn.modules.module.register_module_forward_hook(post)]
        # a recompute that stops early never reaches the forward hook that ends its mark
        self._no_early_stop = set_checkpoint_early_stop(False)
        self._no_early_stop.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._no_early_stop.__exit__(None, None, None)
        return super().__exit__(*exc)

    def _count_flops(self, func_packet, out, args, kwargs):
        if self._inside:
            return out
        return super()._count_flops(func_packet, out, args, kwargs)
