"""Image turns of an [`InterleavedSession`][mmlayers.models.session.InterleavedSession].

Shape key: s pyramid tokens of one image · dv pyramid width · c,H,W image.

A mixin: it uses the session's document (``ids``, ``_hidden``), its per-image UNet
pyramids (``_unet_feats``), its checks (``_not_empty``, ``_check_image_room``) and
``add_image``; it keeps one [`ImageGenerator`][mmlayers.adapters.diffusion_sampling.ImageGenerator]
per scheduler in ``_generators``.
"""

from __future__ import annotations

from typing import Any

import torch

from mmlayers._optional import require
from mmlayers.adapters.context import image_contexts
from mmlayers.adapters.diffusion_sampling import ImageGenerator
from mmlayers.data.images import to_pil

__all__ = ["SessionImagesMixin"]


class SessionImagesMixin:
    """Drawing the next image of an interleaved session (see the module docstring)."""

    # ----------------------------------------------------------------------- images
    def _image_generator(self, scheduler: Any) -> ImageGenerator:
        m = self.model
        if scheduler is None:
            key, sched = "", m.inference_scheduler
        elif isinstance(scheduler, str):
            diffusers = require("diffusers", "diffusion")

            cls = getattr(diffusers, scheduler, None)
            if cls is None or not hasattr(cls, "from_config"):
                raise ValueError(f"scheduler {scheduler!r} is not a diffusers scheduler class")
            key, sched = scheduler, cls.from_config(m.inference_scheduler.config)
        else:
            key, sched = f"id{id(scheduler)}", scheduler
        if key not in self._generators:
            self._generators[key] = ImageGenerator(unet=m.unet, scheduler=sched, vae=m.vae,
                                                   synchronizer=m.unet_sync)
        return self._generators[key]

    @torch.no_grad()
    def generate_image(self, *, num_inference_steps: int | None = None,
                       guidance_scale: float | None = None, scheduler: Any = None,
                       generator: torch.Generator | None = None):
        """Draw the next image (opening it with ``<soi>`` if the text did not) and append
        it to the document; returns it as a PIL image.

        Args:
            num_inference_steps: denoising steps; default the config's (30 in the paper).
            guidance_scale: classifier-free guidance scale; default the config's (7.5).
            scheduler: a diffusers scheduler (instance or class name, e.g.
                ``"DDIMScheduler"``); default the model's inference scheduler.
            generator: seeds the initial noise.

        The UNet synchronizers read the document's previous image (none for the first).
        The image enters the document as its 8-bit version (what a reader of the saved
        document sees), encoded once by the vision side.

        Raises:
            ValueError: the model has no image decoder, the document is empty, holds the
                most images, or has no room for another image; nothing is changed then.
        """
        if not self.has_decoder:
            raise ValueError("this model has no image decoder (unet is None); it can only "
                             "generate text")
        self._not_empty("generate_image")
        self._check_image_room("an image")
        gen = self._image_generator(scheduler)
        if not self.image_open:
            self.ids.append(self.tok.soi_id)
        self._feed()
        dc, tok, m = self.model.config.decoder, self.tok, self.model
        hidden = torch.cat(self._hidden)[None]
        ids = torch.tensor(self.ids, device=hidden.device)[None]
        ctx = image_contexts(hidden, ids, soi_id=tok.soi_id, bos_id=tok.bos_id,
                             max_length=dc.max_context)
        last = ctx.rows.numel() - 1
        ehs = m.context_encoder(ctx.hidden_states[last:], ctx.padding_mask[last:],
                                drop=torch.zeros(1, dtype=torch.bool))
        if self._negative is None:
            self._negative = m.context_encoder.negative(1)
        pyramid = has_image = None
        if self._unet_feats:
            pyramid = self._unet_feats[-1][None]
            has_image = torch.full((1,), dc.sync_previous_image, dtype=torch.bool,
                                   device=pyramid.device)
        image = gen(ehs, negative_hidden_states=self._negative, pyramid=pyramid,
                    has_image=has_image,
                    num_inference_steps=num_inference_steps or dc.num_inference_steps,
                    guidance_scale=dc.guidance_scale if guidance_scale is None else guidance_scale,
                    generator=generator)[0]
        pil = to_pil(image)
        self.add_image(pil)
        return pil
