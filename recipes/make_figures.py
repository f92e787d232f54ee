"""The concept figures of the docs: ``python recipes/make_figures.py [--out docs/assets]``.

Writes ``architecture.svg`` (the MM-Interleaved system as boxes and arrows) and
``sampling_points.png`` (where a real ``FeatureSynchronizer`` samples a multi-scale
pyramid). The sampling locations are not recomputed here: the layer runs its own forward
through a registered pass-through backend that records the ``sampling_locations`` and
``attention_weights`` the layer hands to ``multi_scale_deformable_attention``.
Needs matplotlib (the ``docs`` extra).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from mmlayers.layers.synchronizer import FeatureSynchronizer
from mmlayers.ops import multi_scale_deformable_attention
from mmlayers.ops.deform_attn import DeformAttnBackend, register_backend

logger = logging.getLogger("make_figures")
ROOT = Path(__file__).resolve().parents[1]
CAPTURE = "figure_capture"
_captured: list[dict] = []


def _capture_run(inputs) -> torch.Tensor:
    _captured.append({"shapes": inputs.shapes, "loc": inputs.sampling_locations.detach().clone(),
                      "w": inputs.attention_weights.detach().clone()})
    return multi_scale_deformable_attention(inputs.value, inputs.shapes, None,
                                            inputs.sampling_locations,
                                            inputs.attention_weights, backend="torch")


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "mmlayers", "svg.fonttype": "none",
                         "font.family": "DejaVu Sans", "font.size": 9})
    return plt


def _save(fig, path: Path) -> None:
    fig.savefig(path, metadata={"Date": None} if path.suffix == ".svg" else None,
                bbox_inches="tight", dpi=110)
    logger.info("wrote %s", path)


# ----------------------------------------------------------------------------- architecture

def architecture(path: Path) -> None:
    """Boxes and arrows of the system (DESIGN.md section 1)."""
    plt = _matplotlib()
    from matplotlib.patches import FancyBboxPatch

    fig, ax = plt.subplots(figsize=(11, 7.2))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 66)
    ax.axis("off")
    colours = {"frozen": "#dbe7f5", "trained": "#fde3c8", "new": "#d7f0d2", "loss": "#f3d6dc",
               "data": "#eeeeee"}

    def box(x, y, w, h, text, kind, size=9, weight="normal"):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.3,rounding_size=0.8",
                                    fc=colours[kind], ec="#555555", lw=0.8))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size,
                weight=weight, linespacing=1.3)

    def arrow(xy0, xy1, text=None, dashed=False, tx=None, ty=None, ha="left", colour="#333333"):
        ax.annotate("", xy=xy1, xytext=xy0, arrowprops=dict(
            arrowstyle="-|>", lw=1.1, color=colour, linestyle="--" if dashed else "-",
            shrinkA=0, shrinkB=0))
        if text:
            ax.text(tx if tx is not None else (xy0[0] + xy1[0]) / 2 + 0.8,
                    ty if ty is not None else (xy0[1] + xy1[1]) / 2, text, fontsize=8,
                    ha=ha, va="center", color=colour, style="italic")

    box(1, 55, 12, 7, "image k\n224 px", "data")
    box(18, 55, 17, 7, "ViT\nCLIP ViT-L/14", "frozen")
    box(43, 53, 25, 11, "multi-scale pyramid\n(ViT-Adapter)\nlevels 64², 32², 16², 8²\n× 1024 channels",
        "trained")
    box(18, 41, 17, 7, "perceiver resampler\n64 queries, 12 layers", "trained")
    arrow((13.6, 58.5), (17.4, 58.5))
    arrow((35.6, 58.5), (42.4, 58.5))
    arrow((26.5, 54.4), (26.5, 48.6))

    # the LLM
    box(1, 18, 67, 17, "", "frozen")
    ax.text(3, 33, "LLM (Vicuna-13B, frozen)", fontsize=10, weight="bold", va="center")
    tokens = ["<s>", "text", "<soi>", "<image>×64", "text", "<soi>", "…"]
    x = 3.0
    for tok in tokens:
        w = 3.2 + 1.05 * len(tok)
        kind = "trained" if tok == "<image>×64" else "data"
        box(x, 28, w, 2.6, tok, kind, size=8)
        if tok == "<image>×64":
            image_slot_x = x + w / 2
        x += w + 1.3
    box(3, 19, 63, 7.2, "every 4th decoder layer:  h + attn(h)  →  h + tanh(g)·MMFS(h, "
        "pyramids)  →  h + mlp(h)\nMMFS: deformable sparse attention, 16 heads × 8 points\n"
        "on levels 32², 16², 8² of each visible image; g = 0 at init", "new", size=8)
    arrow((26.5, 40.4), (image_slot_x, 31.2), "64 tokens replace\nthe <image> slots",
          tx=31, ty=37.5, ha="left")
    arrow((55.5, 52.4), (55.5, 25.9), "visibility mask:\ntoken t reads image k\nonly if k's "
          "first\n<image> is at or\nbefore t, in t's\ndocument", dashed=True, tx=56.6,
          ty=43, colour="#b35900", ha="left")

    # text head and image decoder
    box(77, 25, 21, 7, "text head\nnext-token CE  (weight 1)", "loss")
    arrow((68.6, 28.5), (76.4, 28.5), "hidden\nstates", tx=70, ty=31.8)
    box(1, 3, 21, 9, "context of the next image:\nhidden states from the latest\n"
        "<s> to its <soi>, reversed;\nLinear + 1-D sincos", "trained", size=8)
    box(27, 3, 15, 9, "resampler\n77 queries\n(1 layer)", "trained", size=8)
    box(47, 1.5, 21, 11, "", "trained")
    ax.text(57.5, 10.2, "UNet (SD-2.1-base)\n77 vectors as its text context", ha="center",
            va="center", fontsize=8, linespacing=1.3)
    box(48.3, 2.3, 18.4, 4.6, "MMFS on each skip + mid,\nzero-init 1×1 conv residual",
        "new", size=7.5)
    box(77, 4, 21, 7, "diffusion MSE  (weight 10)", "loss")
    arrow((11.5, 17.4), (11.5, 12.6))
    arrow((22.6, 7.5), (26.4, 7.5))
    arrow((42.6, 7.5), (46.4, 7.5))
    arrow((68.6, 7.5), (76.4, 7.5))
    ax.plot([68.8, 72, 72], [58.5, 58.5, 14.5], color="#b35900", lw=1.1, ls="--")
    arrow((72, 14.5), (63, 12.6), colour="#b35900", dashed=True)
    ax.text(73, 46, "the UNet drawing image k+1\nreads image k's pyramid\n"
            "(the previous image in\nthe same document)", fontsize=8, style="italic",
            color="#b35900", va="center")
    handles = [FancyBboxPatch((0, 0), 1, 1, fc=c, ec="#555555") for c in colours.values()]
    ax.legend(handles, ["frozen pretrained", "trained", "new mmlayers blocks (start as identity)",
                        "loss", "data"], loc="upper right", fontsize=8, frameon=False,
              bbox_to_anchor=(1.0, 1.0))
    _save(fig, path)
    plt.close(fig)


# ----------------------------------------------------------------------------- sampling points

def _sample(sync: FeatureSynchronizer, query, features, ref=None) -> dict:
    register_backend(DeformAttnBackend(name=CAPTURE, run=_capture_run,
                                       not_supported_reasons=lambda inputs: [],
                                       priority=-1000, auto_devices=()))
    backend, sync.backend = sync.backend, CAPTURE
    _captured.clear()
    try:
        with torch.no_grad():
            sync(query, features, reference_points=ref)
    finally:
        sync.backend = backend
    rec = _captured[-1]
    # one image (m = 1): the layer's "tall" map of a level is the image plus one zero row,
    # so y in the image is y_tall · (size + 1) / size.
    loc = rec["loc"][0, 0].clone()  # (h, l, p, 2)
    for i, (hh, ww) in enumerate(rec["shapes"]):
        if hh != ww + 1:
            raise ValueError(f"expected a one-image tall map (size + 1, size), got {(hh, ww)}")
        loc[:, i, :, 1] *= hh / ww
    return {"loc": loc, "w": rec["w"][0, 0], "sizes": [w for _, w in rec["shapes"]]}


def sampling_points(path: Path, *, seed: int = 0) -> None:
    """Sampling points of two synchronizers at initialisation, per head and level."""
    plt = _matplotlib()
    torch.manual_seed(seed)
    llm = FeatureSynchronizer(dim=256, query_dim=256, value_dim=64, heads=16, points=8,
                              level_sizes=(32, 16, 8), base_size=16, offset_init=3.0)
    unet = FeatureSynchronizer(dim=256, query_dim=256, value_dim=64, heads=16, points=8,
                               level_sizes=(64, 32, 16, 8), base_size=16, offset_init=1.0)
    rows = [("LLM synchronizer: a text token, reference = image centre", llm, None),
            ("UNet synchronizer: pixel (4, 10) of a 16×16 query map", unet,
             torch.tensor([[[(4 + 0.5) / 16, (10 + 0.5) / 16]]]))]
    # 9 inches at 110 dpi, shown at the docs' content width (688 px at a 1280 px window):
    # 11 pt text is about 11.5 px there
    fig, axes = plt.subplots(2, 4, figsize=(9, 6.2))
    cmap = plt.get_cmap("tab20")
    for r, (title, sync, ref) in enumerate(rows):
        s = sync.tokens_per_image
        rec = _sample(sync, torch.randn(1, 1, 256), torch.randn(1, 1, s, 64), ref)
        loc, w = rec["loc"], rec["w"]
        wmax = float(w.max())
        rxy = (0.5, 0.5) if ref is None else tuple(ref[0, 0].tolist())
        for c, ax in enumerate(axes[r]):
            if c >= len(rec["sizes"]):
                ax.axis("off")
                continue
            size = rec["sizes"][c]
            # the LLM row shows whole maps; the UNet row a window of ±0.15 of the image
            half = size / 2 if ref is None else 0.15 * size
            cx, cy = (size / 2, size / 2) if ref is None else (rxy[0] * size, rxy[1] * size)
            ax.set_xlim(cx - half, cx + half)
            ax.set_ylim(cy + half, cy - half)
            ax.set_aspect("equal")
            ax.set_xticks(range(size + 1), minor=True)  # one grid line per pixel
            ax.set_yticks(range(size + 1), minor=True)
            ax.grid(which="minor", color="#e6e6e6", lw=0.5)
            ax.tick_params(which="minor", length=0)
            for h in range(loc.shape[0]):
                xy = loc[h, c].numpy() * size
                ax.scatter(xy[:, 0], xy[:, 1], s=4 + 60 * w[h, c].numpy() / wmax,
                           color=cmap(h % 20), lw=0, alpha=0.9)
            ax.plot(rxy[0] * size, rxy[1] * size, marker="x", color="black", ms=8, mew=1.6)
            ax.set_xlim(cx - half, cx + half)  # again: the pixel grid's ticks widened them
            ax.set_ylim(cy + half, cy - half)
            ax.set_title(f"level {c}: {size}²", fontsize=11.5)
            ax.tick_params(labelsize=11)
            ax.locator_params(nbins=3)
        axes[r, 0].annotate(title, xy=(0, 1.25), xycoords="axes fraction", fontsize=12,
                            weight="bold")
    fig.text(0.5, -0.02, "colour = head (16), marker area ∝ attention weight, × = reference "
             "point,\ngrid = pixels of the level, axes in pixels; offsets at their initial "
             "values (±offset_init\ncells of the base map: the same fraction of the image at "
             "every level, many\npixels on fine levels, about one on coarse ones); UNet row: "
             "a window of ±0.15\nof the image around the query pixel",
             ha="center", va="top", fontsize=11)
    fig.subplots_adjust(hspace=0.42, wspace=0.35)
    _save(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "assets"), help="output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    architecture(out / "architecture.svg")
    sampling_points(out / "sampling_points.png")  # ~900 markers: PNG is 10x smaller


if __name__ == "__main__":
    main()
