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
    """Boxes and arrows of the system (DESIGN.md section 1).

    9.5 inches wide with 11.5 pt text: shown at the docs' content width (688 px at a
    1280 px window) the smallest text is about 11.5 px. Coordinates are in units of
    1/100 of the width, y downwards.
    """
    plt = _matplotlib()
    from matplotlib.patches import FancyBboxPatch

    width_in, height = 9.5, 84.0
    fig, ax = plt.subplots(figsize=(width_in, width_in * height / 100))
    fig.subplots_adjust(0, 0, 1, 1)
    ax.set_xlim(0, 100)
    ax.set_ylim(height, 0)
    ax.axis("off")
    font = 11.5
    colours = {"frozen": "#dbe7f5", "trained": "#fde3c8", "new": "#d7f0d2", "loss": "#f3d6dc",
               "data": "#eeeeee"}
    orange = "#b35900"

    def box(x, y, w, h, text, kind, weight="normal", va="center"):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.3,rounding_size=0.8",
                                    fc=colours[kind], ec="#555555", lw=0.8))
        if text:
            ax.text(x + w / 2, y + h / 2, text, ha="center", va=va, fontsize=font,
                    weight=weight, linespacing=1.25)

    def arrow(xy0, xy1, dashed=False, colour="#333333"):
        ax.annotate("", xy=xy1, xytext=xy0, arrowprops=dict(
            arrowstyle="-|>", lw=1.1, color=colour, linestyle="--" if dashed else "-",
            shrinkA=0, shrinkB=0))

    def note(x, y, text, colour="#333333"):
        ax.text(x, y, text, fontsize=font, ha="left", va="center", color=colour,
                style="italic", linespacing=1.25)

    # vision side
    box(0.5, 1, 14, 8, "image k\n224 px", "data")
    box(20, 1, 22, 8, "ViT\nCLIP ViT-L/14", "frozen")
    box(49, 0.5, 27, 13, "multi-scale pyramid\n(ViT-Adapter)\nlevels 64², 32², 16², 8²\n"
        "× 1024 channels", "trained")
    arrow((15.2, 5), (19.3, 5))
    arrow((42.7, 5), (48.3, 5))
    box(18, 17, 26, 8, "perceiver resampler\n64 queries, 12 layers", "trained")
    arrow((31, 9.7), (31, 16.3))

    # the LLM
    box(0.5, 30, 75, 27, "", "frozen")
    ax.text(2.5, 33, "LLM (Vicuna-13B, frozen)", fontsize=font + 1, weight="bold",
            va="center")
    x = 2.5
    for tok in ["<s>", "text", "<soi>", "<image>×64", "text", "<soi>", "…"]:
        w = 2.2 + 0.95 * len(tok)
        box(x, 36.5, w, 3.6, tok, "trained" if tok == "<image>×64" else "data")
        if tok == "<image>×64":
            image_slot_x = x + w / 2
        x += w + 1.6
    box(2.5, 43.5, 71, 12, "every 4th decoder layer:\n"
        "h + attn(h)  →  h + tanh(g)·MMFS(h, pyramids)  →  h + mlp(h)\n"
        "MMFS: deformable sparse attention, 16 heads × 8 points, on\n"
        "levels 32², 16², 8² of each visible image; g = 0 at init", "new")
    arrow((31, 25.7), (image_slot_x, 35.8))
    note(33, 28.3, "64 tokens replace the <image> slots")
    arrow((60, 14.2), (60, 42.8), dashed=True, colour=orange)
    note(61, 20.3, "visibility mask:\ntoken t reads\nimage k only if\nk's first <image>\n"
         "is at or before t,\nin t's document", colour=orange)

    # text head
    box(80, 38, 19.5, 12, "text head on the\nhidden states:\nnext-token CE\n(weight 1)",
        "loss")
    arrow((76.2, 44), (79.3, 44))

    # image decoder
    box(0.5, 62, 26, 15, "context of the next\nimage: hidden states\nfrom the latest <s>\n"
        "to its <soi>, reversed;\nLinear + 1-D sincos", "trained")
    box(30, 64, 14, 11, "resampler\n77 queries\n(1 layer)", "trained")
    box(48, 61, 31, 17, "", "trained")
    ax.text(63.5, 64.5, "UNet (SD-2.1-base), 77\nvectors as its text context",
            ha="center", va="center", fontsize=font, linespacing=1.25)
    box(49.5, 68.5, 28, 8.5, "MMFS on each skip + mid,\nzero-init 1×1 conv residual", "new")
    box(83, 64, 16.5, 11, "diffusion\nMSE\n(weight 10)", "loss")
    arrow((13.5, 57.7), (13.5, 61.3))
    arrow((27.2, 69.5), (29.3, 69.5))
    arrow((44.7, 69.5), (47.3, 69.5))
    arrow((79.7, 69.5), (82.3, 69.5))

    # the previous image's pyramid
    ax.plot([76.4, 78, 78], [7, 7, 58], color=orange, lw=1.1, ls="--")
    arrow((78, 58), (72, 60.3), colour=orange, dashed=True)
    note(79.5, 55.3, "UNet for image k+1\nreads image k's\npyramid", colour=orange)

    handles = [FancyBboxPatch((0, 0), 1, 1, fc=c, ec="#555555") for c in colours.values()]
    ax.legend(handles, ["frozen pretrained", "trained", "new mmlayers blocks (identity at init)",
                        "loss", "data"], loc="upper center", fontsize=font, frameon=False,
              ncol=3, bbox_to_anchor=(50, 79.5), bbox_transform=ax.transData,
              columnspacing=1.2, handlelength=1.5)
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
