"""recipes/configs/mm_interleaved_13b.yaml: every key the recipe reads, the paper's optimiser
and schedule, and the model it describes, sized on the meta device (nothing allocated).

The model paths of the YAML are placeholders; the test points them at local folders that
hold only the config files of Vicuna-13B / CLIP ViT-L/14 / SD-2.1-base-shaped models (and a
small tokenizer), which is all :func:`~mmlayers.models.memory.build_on_meta` reads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))

import train  # noqa: E402

from mmlayers.data import IMAGE_TOKEN, SOI_TOKEN  # noqa: E402
from mmlayers.models.config import MMInterleavedConfig  # noqa: E402
from mmlayers.models.memory import build_on_meta, parameter_report  # noqa: E402

CONFIGS = ROOT / "recipes" / "configs"
PAPER = CONFIGS / "mm_interleaved_13b.yaml"


def test_paper_yaml_has_every_key_and_the_paper_settings():
    cfg = train.load_config(PAPER)
    tiny = train.load_config(train.DEFAULT_CONFIG)
    assert set(tiny["train"]) - {"find_unused_parameters"} <= set(cfg["train"])
    t, d = cfg["train"], cfg["data"]
    assert (t["steps"], t["warmup"], t["lr"], t["unet_lr"], t["offset_lr"]) == (
        15000, 1000, 1e-4, 1e-5, 1e-5)
    assert (t["betas"], t["eps"], t["weight_decay"]) == ([0.9, 0.995], 1e-6, 0.05)
    assert (t["precision"], t["frozen_dtype"], t["noise"]) == ("bf16", "bf16", "per_batch")
    assert t["checkpoint_unet"] and cfg["model"]["overrides"]["llm"]["gradient_checkpointing"]
    assert train.check_parallel(t, 8) == 2 and train.check_parallel(t, 16) == 1
    assert (d["source"], d["max_length"]) == ("webdata", 2048)
    assert [(s["name"], s["kind"], s["weight"]) for s in d["datasets"]] == [
        ("laion_blip2", "pairs", 1), ("laion_en", "pairs", 1), ("laion_coco", "pairs", 1),
        ("mmc4", "mmc4", 2)]
    assert all({"shards", "name", "kind", "weight"} <= set(s) for s in d["datasets"])
    assert "images" in d["datasets"][3]


def test_accelerate_configs_parse():
    ds = yaml.safe_load(open(CONFIGS / "accelerate_deepspeed_zero1.yaml"))
    assert ds["distributed_type"] == "DEEPSPEED"
    ds_json = json.loads((ROOT / ds["deepspeed_config"]["deepspeed_config_file"]).read_text())
    assert ds_json["zero_optimization"]["stage"] == 1
    fsdp = yaml.safe_load(open(CONFIGS / "accelerate_fsdp.yaml"))
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    cpu = yaml.safe_load(open(CONFIGS / "accelerate_cpu_2proc.yaml"))
    assert (cpu["num_processes"], cpu["use_cpu"]) == (2, False)


def _config_folders(root: Path) -> dict[str, str]:
    """Folders with only the config files of the paper-shaped parts, plus a tokenizer."""
    from mmlayers.data import ShapesCorpus, word_level_tokenizer

    shapes = MMInterleavedConfig.paper_13b_shapes()
    llm, vit, sd = root / "llm", root / "vit", root / "sd"
    for folder in (llm, vit, sd / "unet", sd / "vae", sd / "scheduler"):
        folder.mkdir(parents=True)
    (llm / "config.json").write_text(json.dumps(shapes.llm.config))
    (vit / "config.json").write_text(json.dumps(shapes.vision.config))
    (sd / "unet" / "config.json").write_text(json.dumps(shapes.decoder.unet))
    (sd / "vae" / "config.json").write_text(json.dumps(shapes.decoder.vae))
    sched = {k: v for k, v in shapes.decoder.scheduler.items() if k != "class_name"}
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    word_level_tokenizer(ShapesCorpus(seed=0, length=1).vocabulary()).save_pretrained(str(llm))
    return {"llm": str(llm), "vit": str(vit), "sd": str(sd)}


def test_paper_model_sizes_on_meta(tmp_path):
    paths = _config_folders(tmp_path)
    cfg = train.load_config(PAPER, [f"model.paths.{k}={v}" for k, v in paths.items()])
    config, tokenizer = train.model_config(cfg)
    assert config.llm.path == paths["llm"] and config.llm.gradient_checkpointing
    assert (config.tokens.soi_id, config.tokens.image_id) == tuple(
        tokenizer.convert_tokens_to_ids([SOI_TOKEN, IMAGE_TOKEN]))
    report = parameter_report(build_on_meta(config))
    shapes = parameter_report(build_on_meta(MMInterleavedConfig.paper_13b_shapes()))
    for part in ("llm", "vit", "unet", "vae", "llm_synchronizers", "unet_synchronizers"):
        assert report[part]["total"] == shapes[part]["total"], part
    assert report["llm"]["total"] == pytest.approx(13.0e9, rel=0.01)   # Vicuna-13B
    assert report["vit"]["total"] == pytest.approx(0.303e9, rel=0.01)  # CLIP ViT-L/14
    assert report["unet"]["total"] == pytest.approx(0.866e9, rel=0.01)  # SD-2.1 UNet
    for frozen in ("llm", "vit", "vae"):
        assert report[frozen]["trainable"] == 0, frozen
    for trained in ("llm_synchronizers", "image_tokens", "pyramid_resampler", "context_encoder",
                    "unet", "unet_synchronizers"):
        assert report[trained]["trainable"] == report[trained]["total"] > 0, trained
    share = report["total"]["trainable"] / report["total"]["total"]
    assert 0.09 < share < 0.11                                        # ~1.46 B of ~14.9 B
