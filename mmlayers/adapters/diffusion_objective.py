"""Diffusion training loss of an image decoder conditioned on LLM context and a pyramid.

Shape key: b images · c channels · H W image (or latent) size · n context tokens · d width.

For images ``x`` (pixels in [−1, 1]) or latents ``z = scaling · (VAE(x) − shift)``::

    t ~ U{0 … T−1},  ε ~ N(0, I),  z_t = scheduler.add_noise(z, ε, t)
    target = ε | scheduler.get_velocity(z, ε, t) | z     (prediction_type)
    loss_i = mean_{c,H,W} (unet(z_t, t, context_i; pyramid_i) − target)² · has_context_i
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmlayers.adapters.unet_inputs import _check_conditional_unet, unet_extra_inputs

__all__ = ["diffusion_loss", "encode_latents"]


def encode_latents(vae: nn.Module, images: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Latents ``scaling · (sample of VAE posterior − shift)`` of images in [−1, 1], no grad.

    ``shift`` is the VAE config's ``shift_factor`` (``None`` for SD; then 0).
    """
    cfg = vae.config
    with torch.no_grad():
        z = vae.encode(images.to(vae.dtype)).latent_dist.sample(generator)
    shift = getattr(cfg, "shift_factor", None) or 0.0
    return (z - shift) * cfg.scaling_factor


def _check_context(unet: nn.Module, ehs: torch.Tensor, b: int) -> None:
    _check_conditional_unet(unet, "the image decoder")
    width = getattr(unet.config, "cross_attention_dim", None)
    if isinstance(width, (list, tuple)):
        width = width[0]
    if not isinstance(ehs, torch.Tensor) or ehs.dim() != 3 or ehs.shape[0] != b \
            or (width is not None and ehs.shape[-1] != width):
        raise ValueError(f"encoder_hidden_states must have shape (b={b}, n, "
                         f"cross_attention_dim={width}) for this UNet, got "
                         f"{tuple(getattr(ehs, 'shape', ()))}")


def _randn(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    dev = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)


def diffusion_loss(unet: nn.Module, scheduler, *, encoder_hidden_states: torch.Tensor,
                   images: torch.Tensor | None = None, latents: torch.Tensor | None = None,
                   vae: nn.Module | None = None, synchronizer=None,
                   pyramid: torch.Tensor | None = None, has_image: torch.Tensor | None = None,
                   has_context: torch.Tensor | None = None,
                   timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None,
                   added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                   class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image diffusion MSE (module docstring).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (with ``synchronizer`` attached, if any).
        scheduler: a diffusers scheduler with ``add_noise`` (``get_velocity`` for
            v-prediction) and ``config.num_train_timesteps`` / ``config.prediction_type``.
        encoder_hidden_states: (b, n, d) context tokens (`ImageContextEncoder`).
        images: (b, c, H, W) in [−1, 1]; encoded with ``vae`` when given, else the UNet
            works in pixel space. Give this or ``latents``.
        latents: (b, c, h, w) already-scaled VAE latents.
        synchronizer: an attached [`UNetSynchronizer`][mmlayers.adapters.unet_sync.UNetSynchronizer];
            the UNet then runs inside ``synchronizer.condition(pyramid, has_image)``.
        pyramid: (b, s, dv) the previous images' pyramids.
        has_image: (b,) bool, which rows have a previous image.
        has_context: (b,) bool; images without context get zero loss (default: all have).
        timesteps: fixed (b,) long timesteps; default drawn with ``generator``.
        noise: fixed noise shaped like the (latent) images; default drawn with ``generator``.
        added_cond_kwargs: name → (b, …) extra UNet inputs, e.g. ``text_embeds`` and
            ``time_ids`` of an SDXL-style UNet (``addition_embed_type="text_time"``); see
            [`unet_extra_inputs`][mmlayers.adapters.unet_inputs.unet_extra_inputs].
        class_labels: (b,) labels of a class-conditioned UNet.
        vae: a diffusers ``AutoencoderKL`` that encodes ``images`` to latents; ``None``: the
            UNet works in pixel space.
        generator: seeds the timesteps and the noise drawn here.

    Returns:
        (b,) float32 loss per image (average it as you like; the official code averages
        over all images including the zero ones).

    Raises:
        ValueError: a bad shape, or an extra input the UNet needs is missing (the message
            says what to pass) or one it does not read is given.

    Examples:
        >>> import torch
        >>> from diffusers import DDPMScheduler, UNet2DConditionModel
        >>> unet = UNet2DConditionModel(
        ...     sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        ...     block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
        ...     attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        >>> loss = diffusion_loss(unet, DDPMScheduler(), images=torch.rand(2, 3, 8, 8) * 2 - 1,
        ...                       encoder_hidden_states=torch.randn(2, 5, 8),
        ...                       has_context=torch.tensor([True, False]),
        ...                       generator=torch.Generator().manual_seed(0))
        >>> loss.shape, bool(loss[0] > 0), loss[1].item()
        (torch.Size([2]), True, 0.0)
    """
    if (images is None) == (latents is None):
        raise ValueError("pass exactly one of images (b, c, H, W) and latents (b, c, h, w)")
    if latents is None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must have shape (b, c, H, W), got "
                             f"{tuple(getattr(images, 'shape', ()))}")
        x0 = encode_latents(vae, images, generator) if vae is not None else images
    else:
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
            raise ValueError(f"latents must have shape (b, c, h, w), got "
                             f"{tuple(getattr(latents, 'shape', ()))}")
        x0 = latents
    in_ch = unet.config.in_channels
    if x0.shape[1] != in_ch:
        raise ValueError(f"the UNet takes {in_ch} input channels but the "
                         f"{'latents' if vae is not None or latents is not None else 'images'}"
                         f" have {x0.shape[1]} (shape {tuple(x0.shape)})")
    b = x0.shape[0]
    _check_context(unet, encoder_hidden_states, b)
    extra = unet_extra_inputs(unet, b, added_cond_kwargs=added_cond_kwargs,
                              class_labels=class_labels)
    if synchronizer is None and pyramid is not None:
        raise ValueError("a pyramid was given without a synchronizer")
    if synchronizer is not None and not synchronizer.attached:
        raise ValueError("synchronizer is not attached to a UNet; call synchronizer.attach(unet)")
    x0 = x0.to(unet.dtype)
    if timesteps is None:
        t_dev = generator.device if generator is not None else x0.device
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,),
                                  generator=generator, device=t_dev).to(x0.device)
    if noise is None:
        noise = _randn(x0.shape, x0, generator)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise must have shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
    noisy = scheduler.add_noise(x0, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(x0, noise, timesteps)
    elif kind == "sample":
        target = x0
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}; expected 'epsilon', "
                         f"'v_prediction' or 'sample'")
    ehs = encoder_hidden_states.to(unet.dtype)
    if synchronizer is not None:
        with synchronizer.condition(pyramid, has_image):
            pred = unet(noisy, timesteps, encoder_hidden_states=ehs, **extra).sample
    else:
        pred = unet(noisy, timesteps, encoder_hidden_states=ehs, **extra).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean((1, 2, 3))
    if has_context is not None:
        if tuple(has_context.shape) != (b,):
            raise ValueError(f"has_context must have shape ({b},), got "
                             f"{tuple(has_context.shape)}")
        loss = torch.where(has_context.to(loss.device, torch.bool), loss, 0.0)
    return loss
