"""Cross-attention query positions: the formula, checked on every cross-attention of a UNet."""

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from mmlayers.adapters.query_positions import add_cross_attention_positions  # noqa: E402


def _unet(sample=8):
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=sample, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=[8, 16], norm_num_groups=4, cross_attention_dim=8,
        attention_head_dim=4, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"]).double().eval()


def _table(h, w, c, frame):
    """The 2-D sincos formula, written out: [sin x·ω, cos x·ω, sin y·ω, cos y·ω], with pixel
    centres measured in cells of the frame."""
    k = c // 4
    out = torch.empty(h * w, c, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            x = (j + 0.5) * frame / w - 0.5
            y = (i + 0.5) * frame / h - 0.5
            for m in range(k):
                om = 10000.0 ** (-m / k)
                out[i * w + j, m] = math.sin(x * om)
                out[i * w + j, k + m] = math.cos(x * om)
                out[i * w + j, 2 * k + m] = math.sin(y * om)
                out[i * w + j, 3 * k + m] = math.cos(y * om)
    return out


def _attention(attn, q_in, ctx):
    """Multi-head attention of diffusers' ``Attention`` written out (no mask)."""
    q, k, v = attn.to_q(q_in), attn.to_k(ctx), attn.to_v(ctx)
    h = attn.heads
    b, n, c = q.shape
    q, k, v = (t.reshape(b, -1, h, c // h).transpose(1, 2) for t in (q, k, v))
    w = (q @ k.transpose(-1, -2) / math.sqrt(c // h)).softmax(-1)
    out = (w @ v).transpose(1, 2).reshape(b, n, c)
    return attn.to_out[1](attn.to_out[0](out))


def test_every_cross_attention_reads_positioned_queries():
    unet = _unet()
    seen = []

    def record(module, args, kwargs, output):
        seen.append((module, kwargs["hidden_states"] if "hidden_states" in kwargs else args[0],
                     kwargs.get("encoder_hidden_states"), output))

    cross = [m.attn2 for m in unet.modules() if getattr(m, "attn2", None) is not None]
    hooks = [a.register_forward_hook(record, with_kwargs=True) for a in cross]
    handle = add_cross_attention_positions(unet)
    assert handle.num_attentions == len(cross) == 4
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ctx = torch.randn(2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        unet(x, 10, encoder_hidden_states=ctx)
    assert len(seen) == 4
    sides = []
    for attn, q_in, e, out in seen:
        n, c = q_in.shape[1], q_in.shape[2]
        side = math.isqrt(n)
        sides.append(side)
        want = _attention(attn, q_in + _table(side, side, c, 8.0), e)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
        # and not the plain attention: the positions matter
        assert (out - _attention(attn, q_in, e)).abs().max() > 1e-3
    assert sorted(set(sides)) == [4]  # the 8x8 sample's cross-attention level is 4x4
    for h in hooks:
        h.remove()


def test_remove_restores_the_unet_exactly():
    unet = _unet()
    before = {n: type(p) for n, p in unet.attn_processors.items()}
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    ctx = torch.randn(1, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        plain = unet(x, 3, encoder_hidden_states=ctx).sample
        handle = add_cross_attention_positions(unet)
        moved = unet(x, 3, encoder_hidden_states=ctx).sample
        handle.remove()
        back = unet(x, 3, encoder_hidden_states=ctx).sample
    assert (moved - plain).abs().max() > 1e-4
    assert torch.equal(back, plain)
    assert {n: type(p) for n, p in unet.attn_processors.items()} == before
    handle.remove()  # idempotent


def test_gradients_flow_and_match_finite_differences():
    unet = _unet()
    add_cross_attention_positions(unet)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    ctx = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda c: unet(x, 5, encoder_hidden_states=c).sample.sum(), (ctx,), eps=1e-6,
        atol=1e-6)


def test_a_unet_without_cross_attention_is_refused():
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=[8, 16], norm_num_groups=4, cross_attention_dim=8,
        down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
        mid_block_type=None)
    with pytest.raises(ValueError, match="no cross-attention"):
        add_cross_attention_positions(unet)


def test_decoder_config_switch_attaches_it():
    from mmlayers.models import builders
    from mmlayers.models.config import DecoderConfig

    kw = dict(unet={"sample_size": 8, "in_channels": 3, "out_channels": 3,
                    "layers_per_block": 1, "block_out_channels": [8, 16],
                    "norm_num_groups": 4, "cross_attention_dim": 8, "attention_head_dim": 4,
                    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]},
              image_size=8, context_queries=4, context_hidden=8, context_heads=2,
              sync_dim=8, sync_heads=2, sync_points=1)
    for flag in (False, True):
        parts = builders.build_decoder(DecoderConfig(cross_attention_positions=flag, **kw),
                                       context_dim=8, value_dim=8, level_sizes=(4,))
        names = {type(p).__name__ for p in parts["unet"].attn_processors.values()}
        assert ("_PositionalProcessor" in names) is flag
