"""Diffusion conditioners: LLM context and feature synchronizers for any diffusers UNet.

MM-Interleaved generates each image with a Stable Diffusion UNet whose text-encoder
embeddings are replaced by a 77-token summary of the LLM's context
([`ImageContextEncoder`][mmlayers.adapters.context.ImageContextEncoder], spans from [`image_contexts`][mmlayers.adapters.context.image_contexts]) and whose skip
connections receive synchronizer residuals from the previous image's pyramid
([`UNetSynchronizer`][mmlayers.adapters.unet_sync.UNetSynchronizer], attached through public module hooks). [`diffusion_loss`][mmlayers.adapters.diffusion_objective.diffusion_loss]
trains it (ε, v or x₀ targets as the scheduler says); [`ImageGenerator`][mmlayers.adapters.diffusion_sampling.ImageGenerator] samples
with any diffusers scheduler and classifier-free guidance.

Nothing here imports diffusers: the UNet, VAE and scheduler are passed in.

Examples:
    >>> import torch
    >>> from diffusers import DDPMScheduler, UNet2DConditionModel
    >>> unet = UNet2DConditionModel(
    ...     sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
    ...     block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
    ...     attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    ...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    >>> enc = ImageContextEncoder(context_dim=16, out_dim=8, num_queries=5, hidden_dim=16,
    ...                           num_heads=2)
    >>> sync = UNetSynchronizer.for_unet(unet, value_dim=6, dim=8, heads=2, points=2,
    ...                                  level_sizes=(4, 2)).attach(unet)
    >>> ctx = enc(torch.randn(2, 7, 16))  # (b, 77→5, cross_attention_dim)
    >>> loss = diffusion_loss(unet, DDPMScheduler(), images=torch.rand(2, 3, 8, 8) * 2 - 1,
    ...                       encoder_hidden_states=ctx, synchronizer=sync,
    ...                       pyramid=torch.randn(2, 20, 6))
    >>> loss.mean().backward()
    >>> sync.remove()
"""

from __future__ import annotations

from mmlayers.adapters.context import ImageContextEncoder, ImageContexts, image_contexts
from mmlayers.adapters.diffusion_objective import diffusion_loss, encode_latents
from mmlayers.adapters.diffusion_sampling import ImageGenerator
from mmlayers.adapters.skip_sync import SkipSynchronizer
from mmlayers.adapters.unet_inputs import unet_extra_inputs
from mmlayers.adapters.unet_sync import UNetSynchronizer

__all__ = ["ImageContextEncoder", "ImageContexts", "ImageGenerator", "SkipSynchronizer",
           "UNetSynchronizer", "diffusion_loss", "encode_latents", "image_contexts",
           "unet_extra_inputs"]
