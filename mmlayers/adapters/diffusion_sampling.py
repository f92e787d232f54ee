"""Image generation with a context-conditioned, synchronized diffusers UNet.

Shape key: b images · n context tokens · d width · c channels · H W image size ·
s pyramid tokens · dv pyramid width.

The official code rebuilds a whole Stable Diffusion pipeline (loading the VAE, text
encoder and tokenizer from disk) on every call and patches its ``__call__``. Here one
[`ImageGenerator`][mmlayers.adapters.diffusion_sampling.ImageGenerator] holds the UNet, its own copy of the scheduler and the optional VAE;
a call only denoises::

    z_T ~ N(0, σ_init² I)
    for t in scheduler.timesteps:
        u, c = unet([z_t, z_t], t, [negative, context]; pyramid kept for both)
        z_{t−1} = scheduler.step(u + g·(c − u), t, z_t)
    image = (VAE⁻¹(z_0 / scaling + shift) or z_0) / 2 + 1/2, clamped to [0, 1]

With ``guidance_scale == 1`` the unconditional branch is not run (u + 1·(c − u) = c).
Any diffusers scheduler works (DDPM as in the paper; DDIM or DPM-Solver for fewer steps).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from mmlayers.adapters.diffusion_objective import _check_context
from mmlayers.adapters.unet_inputs import _concat_extra, unet_extra_inputs

__all__ = ["ImageGenerator"]


class ImageGenerator:
    """Denoise images conditioned on context tokens and the previous images' pyramids.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (``synchronizer`` attached to it, if any).
        scheduler: any diffusers scheduler; the generator keeps its own copy
            (``from_config``), so a training scheduler is never mutated.
        vae: an ``AutoencoderKL`` for latent diffusion; ``None``: the UNet works in pixels.
        synchronizer: an attached [`UNetSynchronizer`][mmlayers.adapters.unet_sync.UNetSynchronizer].

    Examples:
        >>> import torch
        >>> from diffusers import DDIMScheduler, UNet2DConditionModel
        >>> unet = UNet2DConditionModel(
        ...     sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        ...     block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
        ...     attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
        >>> gen = ImageGenerator(unet=unet, scheduler=DDIMScheduler())
        >>> ctx, neg = torch.randn(2, 5, 8), torch.zeros(1, 5, 8)
        >>> a = gen(ctx, negative_hidden_states=neg, num_inference_steps=3,
        ...         generator=torch.Generator().manual_seed(0))
        >>> b = gen(ctx, negative_hidden_states=neg, num_inference_steps=3,
        ...         generator=torch.Generator().manual_seed(0))
        >>> a.shape, torch.equal(a, b), 0 <= a.min().item() <= a.max().item() <= 1
        (torch.Size([2, 3, 8, 8]), True, True)
    """

    def __init__(self, *, unet: nn.Module, scheduler, vae: nn.Module | None = None,
                 synchronizer=None) -> None:
        if getattr(unet, "config", None) is None or not hasattr(unet.config, "in_channels"):
            raise TypeError(f"unet must be a diffusers UNet2DConditionModel, got "
                            f"{type(unet).__name__}")
        if not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "step"):
            raise TypeError(f"scheduler must be a diffusers scheduler, got "
                            f"{type(scheduler).__name__}")
        if synchronizer is not None and not synchronizer.attached:
            raise ValueError("synchronizer is not attached; call synchronizer.attach(unet)")
        self.unet, self.vae, self.synchronizer = unet, vae, synchronizer
        self.scheduler = type(scheduler).from_config(scheduler.config)
        self._step_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    def _size(self, height: int | None, width: int | None) -> tuple[int, int]:
        size = self.unet.config.sample_size
        hw = (size, size) if isinstance(size, int) else tuple(size)
        h = hw[0] * self.vae_scale if height is None else height
        w = hw[1] * self.vae_scale if width is None else width
        if h % self.vae_scale or w % self.vae_scale:
            raise ValueError(f"height and width must be multiples of the VAE factor "
                             f"{self.vae_scale}, got {(h, w)}")
        return h // self.vae_scale, w // self.vae_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(b, c, h, w) latents (or pixels in [−1, 1]) → (b, 3, H, W) images in [0, 1]."""
        x = latents
        if self.vae is not None:
            cfg = self.vae.config
            shift = getattr(cfg, "shift_factor", None) or 0.0
            x = self.vae.decode((x / cfg.scaling_factor + shift).to(self.vae.dtype)).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def __call__(self, encoder_hidden_states: torch.Tensor, *,
                 negative_hidden_states: torch.Tensor | None = None,
                 pyramid: torch.Tensor | None = None, has_image: torch.Tensor | None = None,
                 num_inference_steps: int = 30, guidance_scale: float = 7.5,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 height: int | None = None, width: int | None = None,
                 output_type: str = "pt", progress: bool = False,
                 added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                 class_labels: torch.Tensor | None = None,
                 negative_added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                 negative_class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Generate b images.

        Args:
            encoder_hidden_states: (b, n, d) context tokens.
            negative_hidden_states: (b, n, d) or (1, n, d) unconditional tokens (the learned
                negative embedding); needed when ``guidance_scale != 1``.
            pyramid: (b, s, dv) previous-image pyramids; both guidance branches read them.
            has_image: (b,) bool, which rows have a previous image (``None``: none has).
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance g.
            generator: seeds the initial noise and stochastic scheduler steps.
            latents: (b, c, h, w) initial noise instead of drawing it.
            height: output height in pixels (default the UNet's sample size × the VAE
                factor).
            width: output width in pixels (default the UNet's sample size × the VAE
                factor).
            output_type: ``"pt"`` images in [0, 1] or ``"latent"``.
            progress: show a tqdm bar.
            added_cond_kwargs: name → (b, …) extra UNet inputs, e.g. ``text_embeds`` and
                ``time_ids`` of an SDXL-style UNet (``addition_embed_type="text_time"``);
                see [`unet_extra_inputs`][mmlayers.adapters.unet_inputs.unet_extra_inputs].
            class_labels: (b,) labels of a class-conditioned UNet.
            negative_added_cond_kwargs: the same for the unconditional branch (e.g. SDXL's
                negative pooled embedding); default ``added_cond_kwargs``.
            negative_class_labels: (b,) labels of the unconditional branch; default
                ``class_labels``.

        Returns:
            (b, 3, H, W) images in [0, 1], or the final latents.

        Raises:
            ValueError: a bad shape or argument, or an extra input the UNet needs is
                missing (the message says what to pass) or one it does not read is given.
        """
        if output_type not in ("pt", "latent"):
            raise ValueError(f"output_type must be 'pt' or 'latent', got {output_type!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got "
                             f"{num_inference_steps!r}")
        unet = self.unet
        dev, dt = unet.device, unet.dtype
        b = encoder_hidden_states.shape[0] if isinstance(encoder_hidden_states,
                                                         torch.Tensor) else -1
        _check_context(unet, encoder_hidden_states, b)
        extra = unet_extra_inputs(unet, b, added_cond_kwargs=added_cond_kwargs,
                                  class_labels=class_labels)
        cfg = guidance_scale != 1.0
        ehs = encoder_hidden_states.to(dev, dt)
        if cfg:
            neg = negative_hidden_states
            if neg is None:
                raise ValueError(f"guidance_scale={guidance_scale} needs "
                                 f"negative_hidden_states (b or 1, n, d)")
            if neg.dim() != 3 or neg.shape[0] not in (1, b) or neg.shape[1:] != ehs.shape[1:]:
                raise ValueError(f"negative_hidden_states must have shape (1 or {b}, "
                                 f"{ehs.shape[1]}, {ehs.shape[2]}), got {tuple(neg.shape)}")
            ehs = torch.cat([neg.to(dev, dt).expand_as(ehs), ehs])
            negative = unet_extra_inputs(
                unet, b, added_cond_kwargs=(added_cond_kwargs if negative_added_cond_kwargs
                                            is None else negative_added_cond_kwargs),
                class_labels=class_labels if negative_class_labels is None
                else negative_class_labels)
            extra = _concat_extra(negative, extra)
        elif negative_added_cond_kwargs is not None or negative_class_labels is not None:
            raise ValueError("negative_added_cond_kwargs / negative_class_labels are for the "
                             "unconditional branch, which guidance_scale=1 does not run")
        if self.synchronizer is None and pyramid is not None:
            raise ValueError("a pyramid was given but the generator has no synchronizer")
        h, w = self._size(height, width)
        shape = (b, unet.config.in_channels, h, w)
        sched = self.scheduler
        sched.set_timesteps(num_inference_steps, device=dev)
        if latents is None:
            g_dev = generator.device if generator is not None else dev
            latents = torch.randn(shape, generator=generator, device=g_dev, dtype=dt).to(dev)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(dev, dt) * sched.init_noise_sigma
        step_kw = {"generator": generator} if self._step_generator else {}
        steps = sched.timesteps
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, total=len(sched.timesteps))
        sync = (self.synchronizer.condition(pyramid, has_image)
                if self.synchronizer is not None else contextlib.nullcontext())
        with sync:
            for t in steps:
                inp = torch.cat([latents, latents]) if cfg else latents
                inp = sched.scale_model_input(inp, t)
                out = unet(inp, t, encoder_hidden_states=ehs, **extra).sample
                if cfg:
                    u, c = out.chunk(2)
                    out = u + guidance_scale * (c - u)
                latents = sched.step(out, t, latents, **step_kw).prev_sample
        return latents if output_type == "latent" else self.decode(latents)
