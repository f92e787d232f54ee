"""SDXL-style and class-conditioned UNets through diffusion_loss and ImageGenerator.

Oracles: the DDPM forward process and the guided DDIM loop written out here, calling the
bare diffusers UNet with its extra inputs."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from mmlayers.adapters.diffusion import UNetSynchronizer
from mmlayers.adapters.diffusion_objective import diffusion_loss
from mmlayers.adapters.diffusion_sampling import ImageGenerator
from mmlayers.adapters.unet_inputs import unet_extra_inputs

TEXT, TIME, IDS = 6, 4, 6  # text_embeds width, addition_time_embed_dim, time_ids per image


def tiny_unet(seed=0, **kw):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **kw).double().eval()


def sdxl_unet(seed=0):
    return tiny_unet(seed, addition_embed_type="text_time", addition_time_embed_dim=TIME,
                     projection_class_embeddings_input_dim=TEXT + IDS * TIME)


def sdxl_inputs(b, seed):
    g = torch.Generator().manual_seed(seed)
    return {"text_embeds": torch.randn(b, TEXT, generator=g, dtype=torch.float64),
            "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]] * b, dtype=torch.float64)
            + torch.randint(0, 3, (b, IDS), generator=g)}


def batch(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1,
            torch.randn(b, 5, 8, generator=g, dtype=torch.float64),
            torch.randn(b, 3, 8, 8, generator=g, dtype=torch.float64),
            torch.tensor([10, 700][:b]))


def oracle_loss(unet, sched, x0, ehs, noise, t, **extra):
    acp = sched.alphas_cumprod.double()[t][:, None, None, None]
    noisy = acp.sqrt() * x0 + (1 - acp).sqrt() * noise
    pred = unet(noisy, t, encoder_hidden_states=ehs, **extra).sample
    return ((pred - noise) ** 2).mean((1, 2, 3))


def test_sdxl_loss_equals_forward_process_oracle_and_trains():
    unet, sched = sdxl_unet(), DDPMScheduler()
    x0, ehs, noise, t = batch()
    added = sdxl_inputs(2, 3)
    loss = diffusion_loss(unet, sched, images=x0, encoder_hidden_states=ehs, noise=noise,
                          timesteps=t, added_cond_kwargs=added)
    with torch.no_grad():
        want = oracle_loss(unet, sched, x0, ehs, noise, t, added_cond_kwargs=added)
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-7)
    other = {**added, "text_embeds": added["text_embeds"] + 1.0}
    moved = diffusion_loss(unet, sched, images=x0, encoder_hidden_states=ehs, noise=noise,
                           timesteps=t, added_cond_kwargs=other)
    assert (moved - loss).abs().amax() > 1e-6  # the extra inputs reach the UNet
    loss.mean().backward()
    assert unet.add_embedding.linear_1.weight.grad.abs().amax() > 0


def test_sdxl_loss_with_synchronizer_attached():
    unet, sched = sdxl_unet(), DDPMScheduler()
    sync = UNetSynchronizer.for_unet(unet, value_dim=6, dim=8, heads=2, points=2,
                                     level_sizes=(4, 2), dtype=torch.float64).attach(unet)
    with torch.no_grad():
        for blk in [*sync.down, sync.mid]:
            blk.conv.weight.normal_(0, 0.3)
    x0, ehs, noise, t = batch()
    added, pyr = sdxl_inputs(2, 3), torch.randn(2, 20, 6, dtype=torch.float64)
    loss = diffusion_loss(unet, sched, images=x0, encoder_hidden_states=ehs, noise=noise,
                          timesteps=t, added_cond_kwargs=added, synchronizer=sync,
                          pyramid=pyr)
    with torch.no_grad(), sync.condition(pyr):
        want = oracle_loss(unet, sched, x0, ehs, noise, t, added_cond_kwargs=added)
    with torch.no_grad():
        bare = oracle_loss(unet, sched, x0, ehs, noise, t, added_cond_kwargs=added)
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-7)
    assert (want - bare).abs().amax() > 1e-6


def guided_ddim_oracle(unet, ctx, neg, steps, scale, latents, extra, neg_extra):
    sched = DDIMScheduler()
    sched.set_timesteps(steps)
    z = latents * sched.init_noise_sigma

    def cat(key):
        if key not in extra:
            return {}
        if key == "class_labels":
            return {key: torch.cat([neg_extra[key], extra[key]])}
        return {key: {k: torch.cat([neg_extra[key][k], v]) for k, v in extra[key].items()}}

    kw = {**cat("added_cond_kwargs"), **cat("class_labels")}
    for t in sched.timesteps:
        out = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([neg, ctx]),
                   **kw).sample
        u, c = out.chunk(2)
        z = sched.step(u + scale * (c - u), t, z).prev_sample
    return (z.float() / 2 + 0.5).clamp(0, 1)


def test_sdxl_sampling_equals_guided_ddim_oracle():
    unet = sdxl_unet()
    _, ctx, latents, _ = batch(seed=5)
    neg = torch.zeros(1, 5, 8, dtype=torch.float64)
    added, negative = sdxl_inputs(2, 6), sdxl_inputs(2, 7)
    gen = ImageGenerator(unet=unet, scheduler=DDIMScheduler())
    got = gen(ctx, negative_hidden_states=neg, num_inference_steps=3, guidance_scale=3.0,
              latents=latents, added_cond_kwargs=added, negative_added_cond_kwargs=negative)
    with torch.no_grad():
        want = guided_ddim_oracle(unet, ctx, neg.expand_as(ctx), 3, 3.0, latents,
                                  {"added_cond_kwargs": added},
                                  {"added_cond_kwargs": negative})
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    same = gen(ctx, negative_hidden_states=neg, num_inference_steps=3, guidance_scale=3.0,
               latents=latents, added_cond_kwargs=added)   # negative defaults to added
    assert (same - got).abs().amax() > 1e-4


def test_class_labels_pass_through_loss_and_sampling():
    unet, sched = tiny_unet(num_class_embeds=4), DDPMScheduler()
    x0, ehs, noise, t = batch()
    labels, null = torch.tensor([1, 3]), torch.tensor([0, 0])
    loss = diffusion_loss(unet, sched, images=x0, encoder_hidden_states=ehs, noise=noise,
                          timesteps=t, class_labels=labels)
    with torch.no_grad():
        want = oracle_loss(unet, sched, x0, ehs, noise, t, class_labels=labels)
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-7)
    gen = ImageGenerator(unet=unet, scheduler=DDIMScheduler())
    got = gen(ehs, negative_hidden_states=ehs[:1] * 0, num_inference_steps=2,
              guidance_scale=2.0, latents=noise, class_labels=labels,
              negative_class_labels=null)
    with torch.no_grad():
        want = guided_ddim_oracle(unet, ehs, (ehs[:1] * 0).expand_as(ehs), 2, 2.0, noise,
                                  {"class_labels": labels}, {"class_labels": null})
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"class-conditioned .*pass class_labels \(b=2,\)"):
        diffusion_loss(unet, sched, images=x0, encoder_hidden_states=ehs)


def test_missing_or_unread_inputs_are_refused_up_front(monkeypatch):
    unet, sched = sdxl_unet(), DDPMScheduler()
    x0, ehs, _, _ = batch()
    calls = []
    monkeypatch.setattr(unet, "forward",
                        lambda *a, encoder_hidden_states=None, **k: calls.append(1))
    with pytest.raises(ValueError, match=r"addition_embed_type='text_time' \(SDXL-style\) and "
                                         r"needs added_cond_kwargs=.*D \+ T·4 = 30.*missing "
                                         r"\['text_embeds', 'time_ids'\]"):
        diffusion_loss(unet, sched, images=x0, encoder_hidden_states=ehs)
    with pytest.raises(ValueError, match=r"missing \['time_ids'\]"):
        ImageGenerator(unet=unet, scheduler=DDIMScheduler())(
            ehs, negative_hidden_states=ehs, num_inference_steps=1,
            added_cond_kwargs={"text_embeds": torch.zeros(2, TEXT)})
    bad = {"text_embeds": torch.zeros(2, TEXT + 1), "time_ids": torch.zeros(2, IDS)}
    with pytest.raises(ValueError, match=r"\(2, 7\) and time_ids \(2, 6\) must be .* = 30"):
        diffusion_loss(unet, sched, images=x0, encoder_hidden_states=ehs,
                       added_cond_kwargs=bad)
    with pytest.raises(ValueError, match="batch b=2 first"):
        diffusion_loss(unet, sched, images=x0, encoder_hidden_states=ehs,
                       added_cond_kwargs=sdxl_inputs(3, 0))
    with pytest.raises(TypeError, match="must be a tensor"):
        unet_extra_inputs(unet, 2, added_cond_kwargs={"text_embeds": [0.0] * TEXT,
                                                      "time_ids": torch.zeros(2, IDS)})
    with pytest.raises(ValueError, match=r"negative_added_cond_kwargs / negative_class_labels"):
        ImageGenerator(unet=unet, scheduler=DDIMScheduler())(
            ehs, guidance_scale=1.0, num_inference_steps=1, added_cond_kwargs=sdxl_inputs(2, 0),
            negative_added_cond_kwargs=sdxl_inputs(2, 1))
    plain = tiny_unet()
    with pytest.raises(ValueError, match=r"\['time_ids'\] are not read by this UNet"):
        unet_extra_inputs(plain, 2, added_cond_kwargs={"time_ids": torch.zeros(2, IDS)})
    with pytest.raises(ValueError, match="no class embedding"):
        unet_extra_inputs(plain, 2, class_labels=torch.tensor([0, 1]))
    assert calls == []  # every refusal came before the UNet ran


def test_text_addition_embedding_needs_nothing_extra():
    """``addition_embed_type="text"`` (the tiny preset) pools the context itself."""
    unet, sched = tiny_unet(addition_embed_type="text", addition_embed_type_num_heads=2), \
        DDPMScheduler()
    x0, ehs, noise, t = batch()
    assert unet_extra_inputs(unet, 2) == {}
    loss = diffusion_loss(unet, sched, images=x0, encoder_hidden_states=ehs, noise=noise,
                          timesteps=t)
    with torch.no_grad():
        want = oracle_loss(unet, sched, x0, ehs, noise, t)
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="not read by this UNet"):
        diffusion_loss(unet, sched, images=x0, encoder_hidden_states=ehs,
                       added_cond_kwargs=sdxl_inputs(2, 0))


def test_unet_without_mid_block_is_refused_with_its_reason():
    unet = tiny_unet(mid_block_type=None)
    with pytest.raises(TypeError, match=r"no mid block \(mid_block_type=None\); "
                                        r"UNetSynchronizer needs one"):
        UNetSynchronizer.for_unet(unet, value_dim=6)


def test_model_decoder_refuses_a_unet_it_cannot_condition():
    """MMInterleaved's decoder gives only context tokens: an SDXL-style or class-conditioned
    UNet is refused when the decoder is built; the "text" addition embedding is accepted."""
    from mmlayers.models import builders
    from mmlayers.models.config import DecoderConfig

    unet = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                block_out_channels=[8, 16], norm_num_groups=4, cross_attention_dim=8,
                attention_head_dim=4, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
    kw = dict(image_size=8, context_queries=4, context_hidden=8, context_heads=2, sync_dim=8,
              sync_heads=2, sync_points=1)

    def build(**extra):
        return builders.build_decoder(DecoderConfig(unet={**unet, **extra}, **kw),
                                      context_dim=8, value_dim=8, level_sizes=(4,))

    with pytest.raises(ValueError, match=r"conditions the UNet only on the context tokens, "
                                         r"but this UNet has addition_embed_type='text_time'"):
        build(addition_embed_type="text_time", addition_time_embed_dim=TIME,
              projection_class_embeddings_input_dim=TEXT + IDS * TIME)
    with pytest.raises(ValueError, match="class-conditioned"):
        build(num_class_embeds=3)
    parts = build(addition_embed_type="text", addition_embed_type_num_heads=2)
    assert parts["unet"].config.addition_embed_type == "text"


def test_unconditional_unet_is_refused_up_front():
    """diffusers' UNet2DModel takes no encoder_hidden_states (and hands its up blocks the
    skip tensors positionally): refused by the loss, the generator and the synchronizer."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    x0, ehs, _, _ = batch()
    msg = r"needs a diffusers UNet2DConditionModel .*UNet2DModel.forward takes no"
    with pytest.raises(TypeError, match="the image decoder " + msg):
        diffusion_loss(unet, DDPMScheduler(), images=x0.float(), encoder_hidden_states=ehs)
    with pytest.raises(TypeError, match=msg):
        ImageGenerator(unet=unet, scheduler=DDIMScheduler())(ehs, guidance_scale=1.0,
                                                             num_inference_steps=1)
    with pytest.raises(TypeError, match="UNetSynchronizer " + msg):
        UNetSynchronizer.for_unet(unet, value_dim=6)
