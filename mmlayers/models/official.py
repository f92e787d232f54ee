"""The released MM-Interleaved checkpoint: reading it and mapping its keys onto ours.

Shape key: V text vocabulary (the LLM's) · d LLM width · G position-table grid side.

The official model keeps everything under five prefixes (``mm_decoder``, ``text_decoder``,
``visual_tokenizer``, ``image_decoder`` and two top-level tensors); this module maps each
key onto an [`MMInterleaved`][mmlayers.models.mm_interleaved.MMInterleaved] built with the
official modules (Q-Former resamplers, stored ``[y|x]`` position tables, spatial-prior eps
1e-6; see [`official_config`][mmlayers.models.official.official_config])::

    mm_decoder.embed_tokens.weight          → llm.model.embed_tokens.weight (rows < V)
                                               + image_tokens.input_rows (rows V, V + 1:
                                               the official <soi>, <image>)
    mm_decoder.layers.i.llama_cross_attn.*  → llm_sync.blocks.i.{gate, query_norm (norm1),
                                               vision_norm (norm2), sync (attn)}
    mm_decoder.*                            → llm.model.*
    text_decoder.head (rows < V)            → llm.lm_head (its bias must be 0)
    text_decoder.head + head_new (new rows) → image_tokens.head (weights and biases summed)
    soi_token, context_feat_proj            → image_tokens.soi_vector, context_encoder.proj
    visual_tokenizer.pos_embed (1 + G², d)  → visual.pos_embed, visual.pyramid.pos_table
                                               (row 0, the CLS row, must be 0)
    visual_tokenizer.{pos_proj, pos_ln, post_ln, perceiver_resampler, proj}
                                            → visual.{pos_proj, pos_norm, post_norm,
                                               resampler, resampler.proj}
    visual_tokenizer.encoder.vision_model.adapter_*  → visual.pyramid.* (renamed)
    visual_tokenizer.encoder.vision_model.*          → visual.vit.model.*
    image_decoder.neg_prompt_embeds         → context_encoder.negative_embedding
    image_decoder.perceiver_resampler.*     → context_encoder.resampler.*
    image_decoder.decoder.{unet, vae}.*     → unet.*, vae.*
    image_decoder.decoder.mmfs_module.{mmfs_down_blocks.k, mmfs_mid_block}.*
                                            → unet_sync.{down.k, mid}.*
                                               (feat_norm → value_norm)

Every synchronizer (``MMFS``) loses the ignore-slot rows of ``attention_weights`` (their
logits are overwritten in the official forward) and renames ``dynamic_offset_mask`` to
``query_proj``; ``ignore_token`` must be zero. Keys dropped on purpose are listed in
``DROPPED_OFFICIAL_KEYS``; any other key that maps nowhere is an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from einops import rearrange

from mmlayers.models.checkpoint_files import read_checkpoint

__all__ = ["DROPPED_OFFICIAL_KEYS", "KEEP_FROM_COMPONENTS", "convert_official_state_dict",
           "load_converted_state_dict", "official_config", "read_checkpoint"]

#: Official keys with no counterpart, dropped on purpose (regular expressions), and why.
DROPPED_OFFICIAL_KEYS: dict[str, str] = {
    r"visual_tokenizer\.clip_(mean|std)": "CLIP normalisation constants (ours: fixed buffers)",
    r".*\.position_ids": "index buffers of the CLIP embeddings",
    r".*\.rotary_emb\.inv_freq": "rotary frequencies (recomputed by transformers)",
    r".*perceiver_resampler\.blip2qformer\.encoder\.layer\.\d+\.(intermediate|output)\..*":
        "the Q-Former's unused text-branch FFN",
    r".*\.(llama_cross_attn\.attn|mmfs)\.ignore_token": "the zero ignore value (a fixed zero)",
}
_DROPPED = [re.compile(p) for p in DROPPED_OFFICIAL_KEYS]
_MMFS_KEYS = ("dynamic_offset_mask.weight", "dynamic_offset_mask.bias",
              "sampling_offsets.weight", "sampling_offsets.bias", "attention_weights.weight",
              "attention_weights.bias", "value_proj.weight", "value_proj.bias",
              "output_proj.weight", "output_proj.bias", "query_relpos.weight")
_VIT = "visual_tokenizer.encoder.vision_model."
_RENAMES = [  # (official pattern, ours); first match wins
    (r"mm_decoder\.layers\.(\d+)\.llama_cross_attn\.gate", r"llm_sync.blocks.\1.gate"),
    (r"mm_decoder\.layers\.(\d+)\.llama_cross_attn\.norm1\.(.*)", r"llm_sync.blocks.\1.query_norm.\2"),
    (r"mm_decoder\.layers\.(\d+)\.llama_cross_attn\.norm2\.(.*)", r"llm_sync.blocks.\1.vision_norm.\2"),
    (r"mm_decoder\.(.*)", r"llm.model.\1"),
    (r"context_feat_proj\.(weight|bias)", r"context_encoder.proj.\1"),
    (r"image_decoder\.perceiver_resampler\.(.*)", r"context_encoder.resampler.\1"),
    (r"image_decoder\.decoder\.unet\.(.*)", r"unet.\1"),
    (r"image_decoder\.decoder\.vae\.(.*)", r"vae.\1"),
    (r"image_decoder\.decoder\.mmfs_module\.mmfs_down_blocks\.(\d+)\.feat_norm\.(.*)",
     r"unet_sync.down.\1.value_norm.\2"),
    (r"image_decoder\.decoder\.mmfs_module\.mmfs_down_blocks\.(\d+)\.(pos_embed|(query_norm|conv)\..*)",
     r"unet_sync.down.\1.\2"),
    (r"image_decoder\.decoder\.mmfs_module\.mmfs_mid_block\.feat_norm\.(.*)",
     r"unet_sync.mid.value_norm.\1"),
    (r"image_decoder\.decoder\.mmfs_module\.mmfs_mid_block\.(pos_embed|(query_norm|conv)\..*)",
     r"unet_sync.mid.\1"),
    (r"visual_tokenizer\.pos_proj\.(.*)", r"visual.pos_proj.\1"),
    (r"visual_tokenizer\.pos_ln\.(.*)", r"visual.pos_norm.\1"),
    (r"visual_tokenizer\.post_ln\.(.*)", r"visual.post_norm.\1"),
    (r"visual_tokenizer\.perceiver_resampler\.(.*)", r"visual.resampler.\1"),
    (r"visual_tokenizer\.proj\.(weight|bias)", r"visual.resampler.proj.\1"),
    (re.escape(_VIT) + r"adapter_level_embed", r"visual.pyramid.level_embed"),
    (re.escape(_VIT) + r"adapter_spm\.fc1\.(.*)", r"visual.pyramid.spm.proj.0.\1"),
    (re.escape(_VIT) + r"adapter_spm\.fc2\.(.*)", r"visual.pyramid.spm.proj.1.\1"),
    (re.escape(_VIT) + r"adapter_spm\.fc3\.(.*)", r"visual.pyramid.spm.proj.2.\1"),
    (re.escape(_VIT) + r"adapter_spm\.fc4\.(.*)", r"visual.pyramid.spm.proj.3.\1"),
    (re.escape(_VIT) + r"adapter_spm\.((stem|conv2|conv3|conv4)\..*)", r"visual.pyramid.spm.\1"),
    (re.escape(_VIT) + r"adapter_interactions\.(\d+)\.injector\.(.*)",
     r"visual.pyramid.interactions.\1.injector.\2"),
    (re.escape(_VIT) + r"adapter_interactions\.(\d+)\.extractor\.(.*)",
     r"visual.pyramid.interactions.\1.extractors.0.\2"),
    (re.escape(_VIT) + r"adapter_up\.(.*)", r"visual.pyramid.up.\1"),
    (re.escape(_VIT) + r"((embeddings|pre_layrnorm|encoder|post_layernorm)\..*)", r"visual.vit.model.\1"),
]
_RENAMES_C = [(re.compile(p), r) for p, r in _RENAMES]
_EXTRA = re.compile(re.escape(_VIT) + r"adapter_interactions\.(\d+)\.extra_extractors\.(\d+)\.(.*)")
_MMFS_PREFIX = re.compile(r"(mm_decoder\.layers\.(\d+)\.llama_cross_attn\.attn\.|"
                          r"image_decoder\.decoder\.mmfs_module\.(mmfs_down_blocks\.(\d+)|"
                          r"mmfs_mid_block)\.mmfs\.)(.*)")


def _dropped(key: str) -> bool:
    return any(p.fullmatch(key) for p in _DROPPED)


def _convert_mmfs(sd: Mapping[str, torch.Tensor], prefix: str, heads: int) -> dict:
    """One official MMFS module (keys under ``prefix``) → our ``sync.*`` keys."""
    missing = [prefix + k for k in _MMFS_KEYS if prefix + k not in sd]
    if missing:
        raise ValueError(f"official checkpoint lacks {missing}")
    ignore = sd.get(prefix + "ignore_token")
    if ignore is not None and bool(ignore.ne(0).any()):
        raise ValueError(f"{prefix}ignore_token is not all zeros; mmlayers assumes the "
                         f"official zero ignore value")
    rows = sd[prefix + "sampling_offsets.weight"].shape[0]
    aw, ab = sd[prefix + "attention_weights.weight"], sd[prefix + "attention_weights.bias"]
    if rows % (2 * heads):
        raise ValueError(f"{prefix}sampling_offsets has {rows} rows, not a multiple of "
                         f"2·heads = {2 * heads}; pass the right number of heads")
    points = rows // (2 * heads)
    if aw.shape[0] % (heads * (points + 1)):
        raise ValueError(f"{prefix}attention_weights has {aw.shape[0]} rows, not a multiple "
                         f"of heads·(points + 1) = {heads * (points + 1)}")
    lv = aw.shape[0] // (heads * (points + 1))
    out = {k.replace("dynamic_offset_mask", "query_proj"): sd[prefix + k] for k in _MMFS_KEYS
           if not k.startswith("attention_weights")}
    out["attention_weights.weight"] = rearrange(
        aw, "(h l p) d -> h l p d", h=heads, l=lv)[:, :, :points].reshape(-1, aw.shape[1])
    out["attention_weights.bias"] = rearrange(
        ab, "(h l p) -> h l p", h=heads, l=lv)[:, :, :points].reshape(-1)
    return out


def convert_official_state_dict(state_dict: Mapping[str, torch.Tensor], *,
                                llm_sync_heads: int = 16,
                                unet_sync_heads: int = 16) -> dict[str, torch.Tensor]:
    """Map an official MM-Interleaved state dict onto mmlayers' keys (module docstring).

    Args:
        state_dict: the official keys and tensors (e.g. from
            [`read_checkpoint`][mmlayers.models.official.read_checkpoint]).
        llm_sync_heads: heads of the LLM synchronizers (16 officially).
        unet_sync_heads: heads of the UNet synchronizers (16 officially).

    Returns:
        ``{our key: tensor}`` (tensors shared with the input where nothing changes).

    Raises:
        ValueError: a key that maps nowhere and is not in ``DROPPED_OFFICIAL_KEYS``, a
            missing key of a group (text head, synchronizer), or a value mmlayers cannot
            represent (a non-zero CLS position row or LM-head bias, a non-zero
            ``ignore_token``), each named.

    Examples:
        >>> import torch
        >>> from mmlayers.models.official import convert_official_state_dict
        >>> sd = {"text_decoder.head.weight": torch.randn(6, 4), "text_decoder.head.bias":
        ...       torch.zeros(6), "text_decoder.head_new.weight": torch.randn(2, 4),
        ...       "text_decoder.head_new.bias": torch.full((2,), 95.0),
        ...       "mm_decoder.embed_tokens.weight": torch.randn(6, 4),
        ...       "soi_token": torch.zeros(1, 4)}
        >>> for name in sorted(convert_official_state_dict(sd)):
        ...     print(name)
        image_tokens.head.bias
        image_tokens.head.weight
        image_tokens.input_rows
        image_tokens.soi_vector
        llm.lm_head.weight
        llm.model.embed_tokens.weight
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got "
                        f"{type(state_dict).__name__}")
    sd = dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    head_keys = ("text_decoder.head.weight", "text_decoder.head.bias",
                 "text_decoder.head_new.weight", "text_decoder.head_new.bias")
    if any(k in sd for k in head_keys):
        missing = [k for k in head_keys if k not in sd]
        if missing:
            raise ValueError(f"official checkpoint lacks {missing}")
        hw, hb, nw, nb = (sd.pop(k) for k in head_keys)
        n_new = nw.shape[0]
        vocab = hw.shape[0] - n_new
        if n_new != 2:
            raise ValueError(f"text_decoder.head_new has {n_new} rows; expected 2 (the new "
                             f"tokens <soi> and <image>)")
        if bool(hb[:vocab].ne(0).any()):
            raise ValueError("text_decoder.head.bias is non-zero on the text vocabulary; "
                             "the LLM's lm_head has no bias")
        new = torch.tensor([vocab, vocab + 1])  # official <soi>, <image>: after the text
        out["llm.lm_head.weight"] = hw[:vocab]
        out["image_tokens.head.weight"] = hw[new] + nw[new - vocab]
        out["image_tokens.head.bias"] = hb[new] + nb[new - vocab]
        emb = sd.pop("mm_decoder.embed_tokens.weight", None)
        if emb is None:
            raise ValueError("official checkpoint lacks mm_decoder.embed_tokens.weight")
        if emb.shape[0] != hw.shape[0]:
            raise ValueError(f"mm_decoder.embed_tokens.weight has {emb.shape[0]} rows, "
                             f"text_decoder.head.weight {hw.shape[0]}; expected the same")
        out["llm.model.embed_tokens.weight"] = emb[:vocab]
        out["image_tokens.input_rows"] = emb[new]
    if "soi_token" in sd:
        out["image_tokens.soi_vector"] = sd.pop("soi_token").reshape(-1)
    if "image_decoder.neg_prompt_embeds" in sd:
        out["context_encoder.negative_embedding"] = sd.pop("image_decoder.neg_prompt_embeds")[0]
    if "visual_tokenizer.pos_embed" in sd:
        table = sd.pop("visual_tokenizer.pos_embed")
        if bool(table[0].ne(0).any()):
            raise ValueError("visual_tokenizer.pos_embed row 0 (CLS) is not zero; mmlayers "
                             "adds no position to the prefix token")
        out["visual.pos_embed"] = out["visual.pyramid.pos_table"] = table[1:]
    mmfs_groups: dict[str, tuple[str, int]] = {}
    for key in list(sd):
        m = _MMFS_PREFIX.fullmatch(key)
        if m is None or _dropped(key):
            continue
        prefix, layer, down = m.group(1), m.group(2), m.group(4)
        if layer is not None:
            mmfs_groups[prefix] = (f"llm_sync.blocks.{layer}.sync.", llm_sync_heads)
        elif down is not None:
            mmfs_groups[prefix] = (f"unet_sync.down.{down}.sync.", unet_sync_heads)
        else:
            mmfs_groups[prefix] = ("unet_sync.mid.sync.", unet_sync_heads)
    for prefix, (ours, heads) in mmfs_groups.items():
        for k, v in _convert_mmfs(sd, prefix, heads).items():
            out[ours + k] = v
        for k in _MMFS_KEYS:
            sd.pop(prefix + k, None)
    for key, value in sd.items():
        if _dropped(key):
            continue
        m = _EXTRA.fullmatch(key)
        if m is not None:
            i, j, rest = m.groups()
            name = f"visual.pyramid.interactions.{i}.extractors.{int(j) + 1}.{rest}"
        else:
            for pattern, repl in _RENAMES_C:
                if pattern.fullmatch(key):
                    name = pattern.sub(repl, key)
                    break
            else:
                unknown.append(key)
                continue
        if name.startswith("visual.pyramid.interactions."):
            name = name.replace(".ffn.dwconv.dwconv.", ".ffn.dwconv.")
        out[name] = value
    if unknown:
        raise ValueError(f"{len(unknown)} official key(s) map to nothing in mmlayers: "
                         f"{unknown[:8]}{' …' if len(unknown) > 8 else ''}; is this an "
                         f"MM-Interleaved checkpoint?")
    return out


def official_config(llm: str, vit: str, sd: str, *, tokens=None,
                    state_dict: Mapping[str, torch.Tensor] | None = None):
    """An [`MMInterleavedConfig`][mmlayers.models.config.MMInterleavedConfig] with the
    official modules, for the released checkpoint (or one of the same layout).

    Starts from [`MMInterleavedConfig.paper_13b`][mmlayers.models.config.MMInterleavedConfig.paper_13b]
    and switches on the official Q-Former resamplers, the stored ``[y|x]`` position tables,
    the spatial-prior eps 1e-6 and the official image-context loss rule. The LLM synchronizers' value width is the ViT's (left to
    the builder, as officially). With ``state_dict`` (official keys), the sizes the official
    code fixes in its YAML are read from the tensors instead (resampler widths, depths and
    query counts, synchronizer layers, widths, points and image-table rows, the adapter's
    stem width), so a checkpoint of another size loads too.

    Args:
        llm: local directory of the LLM (Vicuna-13B for the release).
        vit: local directory of the CLIP ViT.
        sd: local Stable Diffusion directory.
        tokens: token ids; default: ``paper_13b``'s (``<soi>`` 32000, ``<image>`` 32001).
        state_dict: official keys to read sizes from.

    Returns:
        the config (nothing is built or read from the directories here).

    Examples:
        >>> from mmlayers.models.official import official_config
        >>> cfg = official_config("vicuna", "clip", "sd21")
        >>> cfg.vision.resampler, cfg.vision.pos_table, cfg.decoder.context_resampler
        ('qformer', 'official', 'qformer')
    """
    from mmlayers.models.config import MMInterleavedConfig

    cfg = MMInterleavedConfig.paper_13b(llm, vit, sd, tokens=tokens)
    cfg.llm.sync_dim = None  # the pyramid (ViT) width, as officially
    v, dc = cfg.vision, cfg.decoder
    v.resampler, v.pos_table = "qformer", "official"
    v.pyramid_kwargs = {**v.pyramid_kwargs, "spm_eps": 1e-6}
    dc.context_resampler, dc.sync_pos_table = "qformer", "official"
    dc.context_pos_table = "official"
    cfg.loss.image_context_rule = "official"
    if state_dict is None:
        return cfg
    sd_ = state_dict

    def layers(prefix: str) -> list[int]:
        pat = re.compile(re.escape(prefix) + r"(\d+)\.")
        return sorted({int(m.group(1)) for k in sd_ if (m := pat.match(k))})

    vq = "visual_tokenizer.perceiver_resampler."
    if vq + "queries" in sd_:
        _, v.num_tokens, v.resampler_dim = sd_[vq + "queries"].shape
        v.resampler_depth = len(layers(vq + "blip2qformer.encoder.layer."))
        cross = [i for i in range(v.resampler_depth) if
                 f"{vq}blip2qformer.encoder.layer.{i}.crossattention.attention.query.weight" in sd_]
        v.cross_every = cross[1] if len(cross) > 1 else max(v.resampler_depth, 1)
        qn = f"{vq}blip2qformer.encoder.layer.0.attention.attention.q_norm.weight"
        v.qk_norm = qn in sd_
        if v.qk_norm:
            v.resampler_heads = v.resampler_dim // sd_[qn].shape[0]
        fc = f"{vq}blip2qformer.encoder.layer.0.intermediate_query.dense.weight"
        if fc in sd_:
            v.resampler_kwargs = {**v.resampler_kwargs, "mlp_dim": sd_[fc].shape[0]}
    stem = _VIT + "adapter_spm.stem.0.weight"
    if stem in sd_:
        extra = layers(_VIT + "adapter_interactions.")
        n_extra = len(layers(f"{_VIT}adapter_interactions.{extra[-1]}.extra_extractors.")) \
            if extra else 2
        v.pyramid_kwargs = {**v.pyramid_kwargs, "inplanes": sd_[stem].shape[0],
                            "num_extra_extractors": n_extra}
    cq = "image_decoder.perceiver_resampler."
    if cq + "queries" in sd_:
        _, dc.context_queries, dc.context_hidden = sd_[cq + "queries"].shape
        dc.context_depth = len(layers(cq + "blip2qformer.encoder.layer."))
        if dc.context_hidden % dc.context_heads:
            raise ValueError(f"the context Q-Former is {dc.context_hidden} wide, not a "
                             f"multiple of its {dc.context_heads} heads")
    sync_layers = layers("mm_decoder.layers.")
    sync_layers = [i for i in sync_layers if f"mm_decoder.layers.{i}.llama_cross_attn.gate" in sd_]
    if sync_layers:
        p = f"mm_decoder.layers.{sync_layers[0]}.llama_cross_attn.attn."
        cfg.llm.sync_layers = sync_layers
        cfg.llm.sync_dim = sd_[p + "value_proj.weight"].shape[0]
        cfg.llm.sync_points = sd_[p + "sampling_offsets.weight"].shape[0] // (2 * cfg.llm.sync_heads)
        cfg.llm.max_images = sd_[p + "query_relpos.weight"].shape[0]
    p = "image_decoder.decoder.mmfs_module.mmfs_mid_block.mmfs."
    if p + "value_proj.weight" in sd_:
        dc.sync_dim = sd_[p + "value_proj.weight"].shape[0]
        dc.sync_points = sd_[p + "sampling_offsets.weight"].shape[0] // (2 * dc.sync_heads)
        dc.sync_max_images = sd_[p + "query_relpos.weight"].shape[0]
    return cfg


#: Our keys with no official counterpart: they keep the component directories' values.
KEEP_FROM_COMPONENTS = (r"visual\.vit\.model\.post_layernorm\..*",)


def _other_grid_table(key: str, new: torch.Tensor, own: torch.Tensor) -> bool:
    """A stored position table of another square grid (the layers resize it when used)."""
    if not key.endswith(("pos_embed", "pos_table")) or new.dim() != 2 or own.dim() != 2:
        return False
    side = round(new.shape[0] ** 0.5)
    return new.shape[1] == own.shape[1] and side * side == new.shape[0]


def load_converted_state_dict(model: torch.nn.Module, converted: Mapping[str, torch.Tensor]
                              ) -> None:
    """Copy converted official weights into ``model`` after checking every key.

    Every key of ``model.state_dict()`` must be in ``converted`` (except those matching
    ``KEEP_FROM_COMPONENTS``, which keep their values), every converted key must exist in
    the model and every shape must agree, except that a stored position table may be of
    another square grid (the official visual tokenizer's is 16 × 16 whatever the ViT; the
    layers resize it).

    Raises:
        ValueError: naming the unexpected, missing or mis-shaped keys.

    Examples:
        >>> import torch
        >>> from mmlayers.models.official import load_converted_state_dict
        >>> lin = torch.nn.Linear(2, 2)
        >>> load_converted_state_dict(lin, {"weight": torch.eye(2), "bias": torch.zeros(2)})
        >>> lin.weight.tolist()
        [[1.0, 0.0], [0.0, 1.0]]
        >>> load_converted_state_dict(lin, {"weight": torch.eye(2)})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: official checkpoint does not fit the model: 1 model key(s) ... ['bias']
    """
    own = model.state_dict()
    keep = [re.compile(p) for p in KEEP_FROM_COMPONENTS]
    unexpected = sorted(set(converted) - set(own))
    missing = sorted(k for k in set(own) - set(converted)
                     if not any(p.fullmatch(k) for p in keep))
    shapes = [f"{k}: checkpoint {tuple(converted[k].shape)}, model {tuple(own[k].shape)}"
              for k in sorted(set(converted) & set(own))
              if tuple(converted[k].shape) != tuple(own[k].shape)
              and not _other_grid_table(k, converted[k], own[k])]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} converted key(s) the model does not have: "
                        f"{unexpected[:8]}")
    if missing:
        problems.append(f"{len(missing)} model key(s) the checkpoint does not provide: "
                        f"{missing[:8]}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {shapes[:8]}")
    if problems:
        raise ValueError("official checkpoint does not fit the model: " + "; ".join(problems))
    # every key is checked above; the kept ones are the only ones not in ``converted``
    model.load_state_dict(dict(converted), strict=False)


def from_official(cls, checkpoint, *, llm: str, vit: str, sd: str, tokens=None,
                  dtype: torch.dtype | None = None, image_size: int | None = None, **kwargs):
    """Body of [`MMInterleaved.from_official`][mmlayers.models.mm_interleaved.MMInterleaved.from_official]."""
    state = dict(checkpoint) if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint)
    config = official_config(llm, vit, sd, tokens=tokens, state_dict=state)
    if image_size is not None:
        config.decoder.image_size = image_size
    converted = convert_official_state_dict(state, llm_sync_heads=config.llm.sync_heads,
                                            unet_sync_heads=config.decoder.sync_heads)
    model = cls.from_config(config, **kwargs)
    load_converted_state_dict(model, converted)
    return model.to(dtype) if dtype is not None else model
