"""diffusion_loss against the closed-form noising; ImageGenerator against hand-written loops."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DConditionModel,
)

from mmlayers.adapters.diffusion import (
    ImageContextEncoder,
    ImageGenerator,
    UNetSynchronizer,
    diffusion_loss,
)

SYNC = dict(value_dim=12, dim=16, heads=2, points=2, level_sizes=(8, 4))
S = 8 * 8 + 4 * 4




def tiny_unet(in_channels=3, sample_size=16, seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
        layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
        cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def tiny_vae(scaling_factor=0.5):
    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
                         scaling_factor=scaling_factor).eval()


def synced(unet, seed=2):
    sync = UNetSynchronizer.for_unet(unet, **SYNC)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in [*sync.down, sync.mid]:
            blk.conv.weight.copy_(torch.randn(blk.conv.weight.shape, generator=g) * 0.2)
    return sync.attach(unet)


def data(b=2, c=3, size=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, c, size, size, generator=g) * 2 - 1, torch.randn(b, 5, 32, generator=g),
            torch.randn(b, S, 12, generator=g), torch.randn(b, c, size, size, generator=g))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_loss_matches_closed_form(kind):
    unet = tiny_unet()
    sched = DDPMScheduler(prediction_type=kind)
    x0, ehs, _, noise = data()
    t = torch.tensor([10, 900])
    loss = diffusion_loss(unet, sched, images=x0, encoder_hidden_states=ehs, timesteps=t,
                          noise=noise)
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    target = noise if kind == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
    with torch.no_grad():
        pred = unet(noisy, t, encoder_hidden_states=ehs).sample
    torch.testing.assert_close(loss.detach(), (pred - target).square().mean((1, 2, 3)),
                               rtol=1e-5, atol=1e-6)


def test_loss_empty_context_zero_and_gradients_reach_new_modules():
    unet = tiny_unet()
    unet.requires_grad_(False)
    sync = UNetSynchronizer.for_unet(unet, **SYNC).attach(unet)
    enc = ImageContextEncoder(context_dim=24, out_dim=32, num_queries=5, hidden_dim=16,
                              num_heads=2).train()
    x0, _, pyr, _ = data()
    ehs = enc(torch.randn(2, 4, 24), drop=torch.tensor([False, False]))
    loss = diffusion_loss(unet, DDPMScheduler(), images=x0, encoder_hidden_states=ehs,
                          synchronizer=sync, pyramid=pyr, has_image=torch.tensor([True, False]),
                          has_context=torch.tensor([True, False]),
                          generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss).all() and loss[0] > 0 and loss[1] == 0
    loss.sum().backward()
    assert all(blk.conv.weight.grad.abs().amax() > 0 for blk in [*sync.down, sync.mid])
    assert enc.proj.weight.grad.abs().amax() > 0
    assert enc.resampler.queries.grad.abs().amax() > 0
    # same draws under the same seed
    again = diffusion_loss(unet, DDPMScheduler(), images=x0, encoder_hidden_states=ehs,
                           synchronizer=sync, pyramid=pyr, has_image=torch.tensor([True, False]),
                           has_context=torch.tensor([True, False]),
                           generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, loss)


def test_loss_latent_path_uses_vae_scaling():
    vae, unet = tiny_vae(), tiny_unet(in_channels=4, sample_size=8)
    x0, ehs, _, _ = data()
    noise, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 600])
    loss = diffusion_loss(unet, DDPMScheduler(), images=x0, vae=vae, encoder_hidden_states=ehs,
                          timesteps=t, noise=noise, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        z = vae.encode(x0).latent_dist.sample(torch.Generator().manual_seed(4)) * 0.5
    ref = diffusion_loss(unet, DDPMScheduler(), latents=z, encoder_hidden_states=ehs,
                         timesteps=t, noise=noise)
    torch.testing.assert_close(loss, ref)
    assert torch.isfinite(loss).all()


def test_loss_bad_input():
    unet = tiny_unet()
    x0, ehs, pyr, _ = data()
    with pytest.raises(ValueError, match="cross_attention_dim=32"):
        diffusion_loss(unet, DDPMScheduler(), images=x0, encoder_hidden_states=ehs[..., :16])
    with pytest.raises(ValueError, match="3 input channels"):
        diffusion_loss(unet, DDPMScheduler(), latents=torch.randn(2, 4, 16, 16),
                       encoder_hidden_states=ehs)
    with pytest.raises(ValueError, match="without a synchronizer"):
        diffusion_loss(unet, DDPMScheduler(), images=x0, encoder_hidden_states=ehs, pyramid=pyr)
    with pytest.raises(ValueError, match="exactly one"):
        diffusion_loss(unet, DDPMScheduler(), encoder_hidden_states=ehs)


def hand_loop(unet, sync, ehs, neg, pyr, scale, steps, noise):
    """DDIM by hand: both guidance branches read the pyramid."""
    sched = DDIMScheduler()
    sched.set_timesteps(steps)
    lat = noise * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            if scale == 1:
                with sync.condition(pyr):
                    out = unet(lat, t, encoder_hidden_states=ehs).sample
            else:
                with sync.condition(torch.cat([pyr, pyr])):
                    both = unet(torch.cat([lat, lat]), t,
                                encoder_hidden_states=torch.cat([neg.expand_as(ehs), ehs])).sample
                u, c = both.chunk(2)
                out = u + scale * (c - u)
            lat = sched.step(out, t, lat).prev_sample
    return (lat / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_generation_matches_hand_loop_with_guidance(scale):
    unet = tiny_unet()
    sync = synced(unet)
    _, ehs, pyr, noise = data()
    neg = torch.randn(1, 5, 32)
    gen = ImageGenerator(unet=unet, scheduler=DDIMScheduler(), synchronizer=sync)
    out = gen(ehs, negative_hidden_states=neg if scale != 1 else None, pyramid=pyr,
              num_inference_steps=3, guidance_scale=scale, latents=noise)
    ref = hand_loop(unet, sync, ehs, neg, pyr, scale, 3, noise)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    if scale == 1:  # the pyramid matters
        sync.remove()
        bare = ImageGenerator(unet=unet, scheduler=DDIMScheduler())(
            ehs, num_inference_steps=3, guidance_scale=1.0, latents=noise)
        assert (bare - out).abs().amax() > 1e-4


@pytest.mark.parametrize("scheduler", [DDPMScheduler, DPMSolverMultistepScheduler])
def test_generation_deterministic_under_seed(scheduler):
    unet = tiny_unet()
    sync = synced(unet)
    _, ehs, pyr, _ = data()
    neg = torch.zeros(1, 5, 32)
    gen = ImageGenerator(unet=unet, scheduler=scheduler(), synchronizer=sync)

    def go(seed):
        return gen(ehs, negative_hidden_states=neg, pyramid=pyr, has_image=torch.tensor(
            [True, False]), num_inference_steps=2, generator=torch.Generator().manual_seed(seed))

    a, b, c = go(0), go(0), go(1)
    assert a.shape == (2, 3, 16, 16) and torch.isfinite(a).all()
    assert torch.equal(a, b) and (a - c).abs().amax() > 1e-3


def test_generation_latent_path_decodes_with_vae():
    vae, unet = tiny_vae(), tiny_unet(in_channels=4, sample_size=8)
    _, ehs, _, _ = data()
    gen = ImageGenerator(unet=unet, scheduler=DDIMScheduler(), vae=vae)
    kw = dict(negative_hidden_states=torch.zeros(1, 5, 32), num_inference_steps=2)
    lat = gen(ehs, output_type="latent", generator=torch.Generator().manual_seed(0), **kw)
    img = gen(ehs, generator=torch.Generator().manual_seed(0), **kw)
    assert lat.shape == (2, 4, 8, 8) and img.shape == (2, 3, 16, 16)
    with torch.no_grad():
        ref = (vae.decode(lat / 0.5).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(img, ref)


def test_generation_bad_input():
    unet = tiny_unet()
    gen = ImageGenerator(unet=unet, scheduler=DDIMScheduler())
    _, ehs, pyr, _ = data()
    with pytest.raises(ValueError, match="negative_hidden_states"):
        gen(ehs, guidance_scale=3.0, num_inference_steps=1)
    with pytest.raises(ValueError, match="cross_attention_dim=32"):
        gen(ehs[..., :8], guidance_scale=1.0, num_inference_steps=1)
    with pytest.raises(ValueError, match="no synchronizer"):
        gen(ehs, pyramid=pyr, guidance_scale=1.0, num_inference_steps=1)
    sync = UNetSynchronizer.for_unet(unet, **SYNC)
    with pytest.raises(ValueError, match="not attached"):
        ImageGenerator(unet=unet, scheduler=DDIMScheduler(), synchronizer=sync)
