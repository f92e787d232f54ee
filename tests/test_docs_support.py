"""docs/support.md is the support matrix rendered from the tests' own family lists.

Each row names a family that a test builds and checks; the tables are rendered here from
those lists (and the refusal reasons from the library), so the page cannot claim a family
no test covers. On a mismatch the assertion shows the tables to paste into the page.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "support.md"


def load(rel: str):
    spec = importlib.util.spec_from_file_location(f"_support_{Path(rel).stem}", ROOT / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def llm_table() -> str:
    from mmlayers.adapters.llm_layers import HOOK_POINTS

    placement = load("tests/adapters/test_llm_placement.py")
    basic = load("tests/adapters/test_llm.py")
    rows = ["| model_type | placement | checked by |", "|---|---|---|"]
    for fam in sorted(placement.LAYOUT):
        src, dst = HOOK_POINTS[fam]
        rows.append(f"| `{fam}` | after attention (`{src}` … `{dst}`) | layer formula by hand "
                    f"(`tests/adapters/test_llm_placement.py`) |")
    for fam in sorted(placement.AFTER_LAYER):
        kind = placement.build_after_layer(fam).config.model_type
        rows.append(f"| `{kind}` | after the layer (no known hook points) | layer output + "
                    f"gated synchronizer by hand (`tests/adapters/test_llm_placement.py`) |")
    for fam in sorted(set(basic.FAMILIES) - set(HOOK_POINTS) - set(placement.AFTER_LAYER)):
        rows.append(f"| `{fam}` | after the layer (no known hook points) | identity, "
                    f"visibility, cached decoding (`tests/adapters/test_llm.py`) |")
    return "\n".join(rows)


def vision_table() -> str:
    from mmlayers.layers.hf_vit import UNSUPPORTED

    hf = load("tests/layers/test_hf_vit.py")
    pyr = load("tests/layers/test_pyramid.py")
    rows = ["| family | status | checked by |", "|---|---|---|"]
    for name in sorted(hf.SUPPORTED):
        rows.append(f"| {name} | supported: the model's own `last_hidden_state` | "
                    f"`tests/layers/test_hf_vit.py` |")
    for name in sorted(set(pyr.FAMILIES) - set(hf.SUPPORTED)):
        rows.append(f"| {name} | supported: the model's own `last_hidden_state` | "
                    f"`tests/layers/test_pyramid.py` |")
    for name in sorted(hf.CHECKED):
        rows.append(f"| {name} | accepted after the probe-image check at construction; "
                    f"the model's own `last_hidden_state` | `tests/layers/test_hf_vit.py` |")
    rows.append("| any other family | checked on a probe image when the backbone is built; "
                "refused unless it gives the model's own `last_hidden_state` | "
                "`tests/layers/test_hf_vit.py` |")
    for name in sorted(hf.REFUSED):
        model = hf.REFUSED[name][0]()
        kind = model.config.model_type
        why = UNSUPPORTED.get(kind, "it is hierarchical (a depths list), not a plain ViT")
        rows.append(f"| {name} (`{kind}`) | refused at construction: {why} | "
                    f"`tests/layers/test_hf_vit.py` |")
    return "\n".join(rows)


UNET_ROWS = [  # (layout, what works, test function that checks it, test file)
    ("SD-style `UNet2DConditionModel` (cross-attention down/up blocks, a mid block)",
     "synchronizers, loss, sampling", "test_residuals_land_on_skip_tensors_only",
     "tests/adapters/test_diffusion_sync.py"),
    ("`addition_embed_type=\"text\"`", "nothing extra to pass",
     "test_text_addition_embedding_needs_nothing_extra", "tests/adapters/test_unet_inputs.py"),
    ("`addition_embed_type=\"text_time\"` (SDXL)", "pass `added_cond_kwargs` to "
     "`diffusion_loss` / `ImageGenerator`; refused as `MMInterleaved`'s decoder",
     "test_sdxl_sampling_equals_guided_ddim_oracle", "tests/adapters/test_unet_inputs.py"),
    ("`num_class_embeds` / `class_embed_type`", "pass `class_labels`",
     "test_class_labels_pass_through_loss_and_sampling", "tests/adapters/test_unet_inputs.py"),
    ("`UNet2DModel` (no `encoder_hidden_states`)", "refused by `diffusion_loss`, "
     "`ImageGenerator` and `UNetSynchronizer`", "test_unconditional_unet_is_refused_up_front",
     "tests/adapters/test_unet_inputs.py"),
    ("`mid_block_type=None`", "refused by `UNetSynchronizer`",
     "test_unet_without_mid_block_is_refused_with_its_reason",
     "tests/adapters/test_unet_inputs.py"),
]


def unet_table() -> str:
    rows = ["| UNet layout | status | checked by |", "|---|---|---|"]
    for layout, status, test, path in UNET_ROWS:
        assert hasattr(load(path), test), (path, test)
        rows.append(f"| {layout} | {status} | `{test}` |")
    return "\n".join(rows)


def test_support_page_holds_the_tables_rendered_from_the_tests():
    page = PAGE.read_text()
    for title, table in (("LLM families", llm_table()), ("Vision families", vision_table()),
                         ("UNet layouts", unet_table())):
        assert f"## {title}\n" in page, title
        assert table in page, f"{title}: paste this table into docs/support.md\n\n{table}\n"


def test_the_check_can_fail():
    assert "| `llama` |" in llm_table() and "| `nonexistent` |" not in PAGE.read_text()
