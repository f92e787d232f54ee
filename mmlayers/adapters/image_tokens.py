"""``<soi>`` / ``<image>`` tokens for a frozen causal LM, kept outside its weights.

Shape key: b batch · n tokens · m images · k visual tokens per image · d LLM width · V vocab.

An image enters the LLM as ``<soi>`` followed by k ``<image>`` slots (k = 64 in
MM-Interleaved); the k resampler outputs replace the slot embeddings, and ``<soi>`` gets a
learnable zero-init vector added to its embedding. The two new tokens also need output
logits. [`ImageTokens`][mmlayers.adapters.image_tokens.ImageTokens] holds everything new (two input rows, the ``<soi>`` vector, a
two-row output head) so the base embedding matrices keep their shapes, keys and frozen
rows. Attached to a model it uses two hooks on the input embedding (ids of the new tokens
are read from [`ImageTokens`][mmlayers.adapters.image_tokens.ImageTokens]; the base table never sees them) and one on the output
embedding (the head's two logits are written into columns ``soi_id`` and ``image_id``). The
head starts with weight 0 and bias ``init_logit`` (−100), so the new tokens are never chosen
by a base model whose text logits stay above that, and text generation is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ImageTokens", "add_image_tokens"]


class ImageTokens(nn.Module):
    """New ``<soi>``/``<image>`` rows, the ``<soi>`` vector and the output head.

    Args:
        hidden_size: LLM width d.
        soi_id: token id of ``<soi>`` (any id; usually the first id after the tokenizer's
            vocabulary).
        image_id: token id of ``<image>`` (usually the id after ``soi_id``).
        tokens_per_image: k, ``<image>`` slots per image.
        init_logit: initial logit of both new tokens (head weight 0, bias ``init_logit``).
        device: device of the parameters (``None``: the default device).
        dtype: dtype of the parameters (``None``: the default dtype).

    Examples:
        >>> import torch
        >>> tokens = ImageTokens(hidden_size=4, soi_id=10, image_id=11, tokens_per_image=2)
        >>> table = torch.nn.Embedding(10, 4)
        >>> ids = torch.tensor([[1, 10, 11, 11, 2]])              # x <soi> <image>×2 x
        >>> visual = torch.ones(1, 2, 4)                          # (images, k, d)
        >>> emb = tokens.embed(ids, visual, embeddings=table)     # (b, n, d)
        >>> emb[0, 2:4].tolist() == visual[0].tolist()
        True
    """

    def __init__(self, *, hidden_size: int, soi_id: int, image_id: int,
                 tokens_per_image: int = 64, init_logit: float = -100.0,
                 device=None, dtype=None) -> None:
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("tokens_per_image", tokens_per_image)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name, v in (("soi_id", soi_id), ("image_id", image_id)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int token id, got {v!r}")
        if soi_id == image_id:
            raise ValueError(f"soi_id and image_id must differ, both are {soi_id}")
        kw = {"device": device, "dtype": dtype}
        self.soi_id, self.image_id = soi_id, image_id
        self.tokens_per_image, self.init_logit = tokens_per_image, float(init_logit)
        self.input_rows = nn.Parameter(torch.empty(2, hidden_size, **kw))   # <soi>, <image>
        self.soi_vector = nn.Parameter(torch.empty(hidden_size, **kw))
        self.head = nn.Linear(hidden_size, 2, **kw)                          # logits <soi>, <image>
        self._hooks: list = []
        self._pending: list[torch.Tensor] = []
        object.__setattr__(self, "_model", None)  # not a submodule: keep the LLM out of state_dict
        self._old_vocab: int | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Input rows N(0, 0.02) (see [`init_rows_from`][mmlayers.adapters.image_tokens.ImageTokens.init_rows_from]), ``<soi>`` vector 0, head weight
        0 and bias ``init_logit``."""
        nn.init.normal_(self.input_rows, std=0.02)
        nn.init.zeros_(self.soi_vector)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, self.init_logit)

    @torch.no_grad()
    def init_rows_from(self, embeddings: nn.Embedding) -> None:
        """Set both new input rows to the mean row of ``embeddings`` (a common, safe start)."""
        self.input_rows.copy_(embeddings.weight.mean(0).to(self.input_rows).expand(2, -1))

    # -------------------------------------------------------------------- embeddings
    def _new_rows(self, ids: torch.Tensor) -> torch.Tensor:
        soi = (ids == self.soi_id)[..., None]
        rows = torch.where(soi, self.input_rows[0] + self.soi_vector, self.input_rows[1])
        return rows

    def token_embeddings(self, input_ids: torch.Tensor, embeddings: nn.Embedding) -> torch.Tensor:
        """(b, n) ids → (b, n, d): base rows for text, this module's rows for new tokens."""
        new = (input_ids == self.soi_id) | (input_ids == self.image_id)
        base = embeddings(input_ids.masked_fill(new, 0))
        return torch.where(new[..., None], self._new_rows(input_ids).to(base.dtype), base)

    def embed(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor | None = None, *,
              embeddings: nn.Embedding | None = None) -> torch.Tensor:
        """Input embeddings with the ``<image>`` slots filled by visual tokens.

        Args:
            input_ids: (b, n) ids; every image is ``<soi>`` followed by k ``<image>`` ids.
            visual_tokens: (total images, k, d), the images in reading order (row 0 first,
                left to right); ``None`` if there are no ``<image>`` ids.
            embeddings: the base input embedding (default: that of the attached model).

        Returns:
            (b, n, d) ``inputs_embeds`` for the model.

        Raises:
            ValueError: the number of ``<image>`` ids is not ``images × k``, an image does
                not have exactly k slots, or widths differ; checked before any compute.
        """
        if embeddings is None:
            if self._model is None:
                raise ValueError("pass embeddings= or attach() this module to a model first")
            embeddings = self._model.get_input_embeddings()
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (b, n) tensor, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        is_img = input_ids == self.image_id
        k, slots = self.tokens_per_image, int(is_img.sum())
        total = 0 if visual_tokens is None else visual_tokens.shape[0]
        if visual_tokens is not None and (visual_tokens.dim() != 3 or visual_tokens.shape[1] != k
                                          or visual_tokens.shape[2] != embeddings.embedding_dim):
            raise ValueError(f"visual_tokens must have shape (images, k={k}, d="
                             f"{embeddings.embedding_dim}), got {tuple(visual_tokens.shape)}")
        if slots != total * k:
            raise ValueError(f"input_ids hold {slots} <image> tokens (id {self.image_id}) but "
                             f"{total} images × {k} visual tokens = {total * k} were given")
        if slots:
            starts = is_img[:, 1:] & (input_ids[:, :-1] == self.soi_id)
            runs = int(starts.sum())
            if runs != total:
                raise ValueError(f"found {runs} images (<soi> followed by <image>) in input_ids "
                                 f"but {total} images of visual tokens; each image must be "
                                 f"<soi> then exactly {k} <image> tokens")
            padded = F.pad(is_img.int(), (1, 1))
            edges = padded.diff(dim=1)
            lengths = (edges == -1).nonzero()[:, 1] - (edges == 1).nonzero()[:, 1]
            if bool((lengths != k).any()):
                raise ValueError(f"every run of <image> tokens must have length k={k}, got "
                                 f"{sorted(set(lengths.tolist()))}")
        emb = self.token_embeddings(input_ids, embeddings)
        if slots:
            flat = emb.reshape(-1, emb.shape[-1])
            pos = is_img.reshape(-1).nonzero().squeeze(1)
            flat = flat.index_copy(0, pos, visual_tokens.reshape(-1, emb.shape[-1]).to(emb.dtype))
            emb = flat.view_as(emb)
        return emb

    # ------------------------------------------------------------------------- hooks
    def attach(self, model: nn.Module) -> ImageTokens:
        """Hook this module into ``model`` (its ``get_input_embeddings()`` and
        ``get_output_embeddings()``); sets ``config.vocab_size`` to the logit width (for the
        model's own loss) until [`remove`][mmlayers.adapters.image_tokens.ImageTokens.remove]. Returns ``self``."""
        if self._hooks:
            raise ValueError("this ImageTokens is already attached; remove() it first")
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
        if inp is None or out is None:
            raise ValueError(f"{type(model).__name__} has no input/output embeddings")
        object.__setattr__(self, "_model", model)
        self._hooks = [inp.register_forward_pre_hook(self._in_pre_hook),
                       inp.register_forward_hook(self._in_hook),
                       out.register_forward_hook(self._out_hook)]
        cfg = model.config.get_text_config()
        self._old_vocab = cfg.vocab_size
        cfg.vocab_size = self.logit_width(cfg.vocab_size)
        return self

    def logit_width(self, vocab_size: int) -> int:
        """Logit columns once the new tokens are in: ``max(V, soi_id + 1, image_id + 1)``."""
        return max(vocab_size, self.soi_id + 1, self.image_id + 1)

    def remove(self) -> None:
        """Take the hooks off and restore ``config.vocab_size`` (idempotent)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._model is not None and self._old_vocab is not None:
            self._model.config.get_text_config().vocab_size = self._old_vocab
        object.__setattr__(self, "_model", None)
        self._old_vocab = None

    def _in_pre_hook(self, module, args):
        ids = args[0]
        self._pending.append(ids)
        new = (ids == self.soi_id) | (ids == self.image_id)
        return (ids.masked_fill(new, 0), *args[1:])

    def _in_hook(self, module, args, output):
        ids = self._pending.pop()
        new = ((ids == self.soi_id) | (ids == self.image_id))[..., None]
        return torch.where(new, self._new_rows(ids).to(output.dtype), output)

    def _out_hook(self, module, args, output):
        hidden = args[0]
        new = self.head(hidden.to(self.head.weight.dtype)).to(output.dtype)  # (…, 2)
        width = self.logit_width(output.shape[-1])
        if width > output.shape[-1]:
            output = F.pad(output, (0, width - output.shape[-1]), value=float("-inf"))
        cols = torch.tensor([self.soi_id, self.image_id], device=output.device)
        return output.index_copy(output.dim() - 1, cols, new)


def add_image_tokens(tokenizer, model: nn.Module, *, soi_token: str = "<soi>",
                     image_token: str = "<image>", tokens_per_image: int = 64,
                     init_logit: float = -100.0) -> ImageTokens:
    """Add ``<soi>`` and ``<image>`` to a tokenizer and hook them into ``model``.

    The tokenizer gets two special tokens; the model gets no new weights: the rows and
    the output head live in the returned [`ImageTokens`][mmlayers.adapters.image_tokens.ImageTokens] (rows initialised to the mean
    input embedding, head weight 0 and bias ``init_logit``), attached with hooks.

    Args:
        tokenizer: a ``transformers`` tokenizer (changed in place).
        model: a causal LM with input and output embeddings.
        tokens_per_image: ``<image>`` slots per image (64 in the paper).
        soi_token: string of the begin-of-image token.
        image_token: string of the image slot token.
        init_logit: initial output logit of both tokens (−100: the model's text generation
            is unchanged until they are trained).

    Returns:
        the attached [`ImageTokens`][mmlayers.adapters.image_tokens.ImageTokens] (``.soi_id``, ``.image_id``; ``.remove()``).
    """
    tokenizer.add_tokens([soi_token, image_token], special_tokens=True)
    soi_id, image_id = tokenizer.convert_tokens_to_ids([soi_token, image_token])
    ref = model.get_input_embeddings().weight
    tokens = ImageTokens(hidden_size=ref.shape[1], soi_id=soi_id, image_id=image_id,
                         tokens_per_image=tokens_per_image, init_logit=init_logit,
                         device=ref.device, dtype=ref.dtype)
    tokens.init_rows_from(model.get_input_embeddings())
    return tokens.attach(model)
