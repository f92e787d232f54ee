"""Training configs for ``recipes/train.py``: read, override, and check before anything runs.

Every problem is one ``ValueError`` line that names the key or path, what was found and
what is expected: an unreadable or malformed ``--config``, an override that is not
``key=value``, an unknown key (with the nearest valid one), a missing key, a value of the
wrong type or range, and an output directory that cannot be written, holds a previous
run (without ``--resume``) or has nothing to resume (with it).
"""

from __future__ import annotations

import difflib
import os
import re
import tempfile
from pathlib import Path

import yaml

__all__ = ["SCHEMA", "check_config", "check_out_dir", "load_config", "writable_dir"]


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _optional(spec):
    return spec[0] + " or null", lambda v: v is None or spec[1](v)


def _one_of(*choices):
    return ("one of " + ", ".join(map(repr, choices)),
            lambda v: isinstance(v, str) and v in choices, choices)


INT = "an integer", _int
NUM = "a number", _num
POS_INT = "a positive integer", lambda v: _int(v) and v > 0
COUNT = "an integer >= 0", lambda v: _int(v) and v >= 0
POS = "a number > 0", lambda v: _num(v) and v > 0
NONNEG = "a number >= 0", lambda v: _num(v) and v >= 0
FRACTION = "a number in [0, 1]", lambda v: _num(v) and 0 <= v <= 1
BOOL = "true or false", lambda v: isinstance(v, bool)
STR = "a string", lambda v: isinstance(v, str) and v != ""
STRS = "a non-empty list of strings", lambda v: isinstance(v, list) and bool(v) and all(
    isinstance(x, str) for x in v)
BETAS = "a list of two numbers in [0, 1)", lambda v: isinstance(v, list) and len(v) == 2 and all(
    _num(x) and 0 <= x < 1 for x in v)
MAPPING = "a mapping (or null)", lambda v: v is None or isinstance(v, dict)
DATASETS = "a non-empty list of dataset mappings", lambda v: isinstance(v, list) and bool(v) and all(
    isinstance(x, dict) for x in v)

#: every key a config may hold, with the value it expects (nested sections are dicts).
SCHEMA = {
    "model": {"preset": _one_of("tiny", "paper_13b", "paper_13b_shapes"),
              "paths": {"llm": _optional(STR), "vit": _optional(STR), "sd": _optional(STR)},
              "overrides": MAPPING},
    "data": {"source": _one_of("shapes", "webdata"), "seed": INT, "image_size": POS_INT,
             "kinds": STRS, "colors": STRS, "max_shapes": POS_INT, "jitter": BOOL,
             "caption_first": BOOL, "max_length": POS_INT, "eval_seed": INT,
             "max_images": _optional(POS_INT), "epochs": _optional(POS_INT),
             "stopping": _one_of("all_exhausted", "first_exhausted"), "num_workers": COUNT,
             "datasets": DATASETS},
    "train": {"seed": INT, "steps": POS_INT, "batch_size": POS_INT, "grad_accum": POS_INT,
              "lr": NONNEG, "unet_lr": NONNEG, "offset_lr": NONNEG, "weight_decay": NONNEG,
              "betas": BETAS, "eps": POS, "warmup": COUNT, "min_lr_ratio": FRACTION,
              "clip_grad": POS, "noise": _one_of("stream", "per_batch"),
              "find_unused_parameters": BOOL,
              "precision": _one_of("auto", "fp32", "bf16", "fp16"),
              "device": _one_of("auto", "cpu", "cuda"), "threads": _optional(POS_INT),
              "log_every": POS_INT, "eval_every": COUNT, "eval_docs": COUNT,
              "save_every": POS_INT, "keep_checkpoints": POS_INT, "out_dir": STR,
              "stop_after": _optional(POS_INT), "time_limit": _optional(NONNEG),
              "frozen_dtype": _optional(_one_of("bf16", "fp16", "fp32")),
              "checkpoint_unet": BOOL},
}
#: keys a config may leave out (the recipes have defaults, or they belong to another setup).
OPTIONAL = {"model.paths", "model.overrides", "data.source", "data.max_images", "data.epochs",
            "data.stopping", "data.num_workers", "data.datasets", "train.noise",
            "train.find_unused_parameters", "train.threads", "train.frozen_dtype",
            "train.checkpoint_unet"}
SHAPES_ONLY = {"data.kinds", "data.colors", "data.max_shapes", "data.jitter",
               "data.caption_first", "data.eval_seed"}
DATASET_KEYS = {"name": STR, "kind": _one_of("pairs", "mmc4"), "shards": STR, "images": STR,
                "weight": POS, "sim_threshold": NUM,
                "max_images": POS_INT, "single_image_keep": FRACTION,
                "image_first_prob": FRACTION, "caption_first_prob": FRACTION,
                "train_caption_first": BOOL}
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> dict:
    """YAML file + dotted ``key=value`` overrides (values parsed as YAML), checked
    (:func:`check_config`); a number written ``1e-3`` (text to YAML) is read as a number
    where a number is expected."""
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except OSError as err:
        raise ValueError(f"--config {str(path)!r} cannot be read: {err.strerror or err}; "
                         f"expected a YAML file such as recipes/configs/shapes_tiny.yaml") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise ValueError(f"--config {str(path)!r} is not valid YAML{at}: "
                         f"{getattr(err, 'problem', None) or err}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--config {str(path)!r} holds {type(cfg).__name__}, expected a "
                         f"mapping with model, data and train sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value (e.g. train.steps=20)")
        node, parts = cfg, key.split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parts[:i + 1])} is a value "
                                 f"({node!r}), not a section with keys")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"override {item!r}: the value is not valid YAML") from None
    check_config(cfg)
    return cfg


def _unknown(key: str, valid) -> ValueError:
    """The nearest valid key: the same name in another section, else the closest spelling."""
    name = key.rsplit(".", 1)[-1]
    moved = [f"{s}.{name}" for s, keys in SCHEMA.items() if name in keys and f"{s}.{name}" != key]
    near = moved[:1] or difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]}?" if near else f"; expected one of {', '.join(sorted(valid))}"
    return ValueError(f"unknown config key {key}{hint}")


def _check_value(key: str, node: dict, name: str, spec) -> None:
    what, ok = spec[:2]
    value = node[name]
    if isinstance(value, str) and _FLOAT.fullmatch(value) and ok(float(value)) and not ok(value):
        value = node[name] = float(value)    # YAML reads 1e-3 as text
    if ok(value):
        return
    near = difflib.get_close_matches(value, spec[2], n=1) if len(spec) > 2 and isinstance(
        value, str) else []
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise ValueError(f"bad value {key}={value!r} ({type(value).__name__}); expected {what}{hint}")


def _walk(node: dict, schema: dict, prefix: str) -> None:
    valid = {f"{prefix}{k}" for k in schema}
    for name in node:
        key = f"{prefix}{name}"
        if name not in schema:
            raise _unknown(key, valid)
        if isinstance(schema[name], dict):
            if not isinstance(node[name], dict):
                raise ValueError(f"{key} is {node[name]!r}; expected a section with keys "
                                 f"{', '.join(sorted(schema[name]))}")
            _walk(node[name], schema[name], key + ".")
        else:
            _check_value(key, node, name, schema[name])


def _model_overrides(overrides: dict) -> None:
    """``model.overrides`` keys against :class:`MMInterleavedConfig` and its parts (values
    inside free-form dicts such as ``llm.config`` or ``decoder.unet`` are not checked)."""
    from mmlayers.models import MMInterleavedConfig

    template = MMInterleavedConfig.tiny(vocab_size=8).to_dict()
    for part, value in overrides.items():
        key = f"model.overrides.{part}"
        if part not in template:
            raise _unknown(key, {f"model.overrides.{k}" for k in template})
        if isinstance(template[part], dict) and isinstance(value, dict):
            for name in value:
                if name not in template[part]:
                    raise _unknown(f"{key}.{name}", {f"{key}.{k}" for k in template[part]})


def check_config(cfg: dict) -> None:
    """Raise ``ValueError`` (one line) for the first unknown key, missing key or bad value."""
    _walk(cfg, SCHEMA, "")
    source = cfg.get("data", {}).get("source", "shapes")
    preset = cfg.get("model", {}).get("preset")
    for section, keys in SCHEMA.items():
        for name in keys:
            key = f"{section}.{name}"
            needed = key not in OPTIONAL and (key not in SHAPES_ONLY or source == "shapes")
            needed |= key == "data.datasets" and source == "webdata"
            if needed and name not in cfg.get(section, {}):
                raise ValueError(f"config key {key} is missing; expected "
                                 f"{'a section' if isinstance(keys[name], dict) else keys[name][0]}")
    if preset == "paper_13b":
        for name in ("llm", "vit", "sd"):
            if not isinstance((cfg["model"].get("paths") or {}).get(name), str):
                raise ValueError(f"model.paths.{name} is missing; model.preset=paper_13b "
                                 f"expects a local directory")
    if source == "shapes":
        from mmlayers.data.shapes import KINDS

        bad = [k for k in cfg["data"]["kinds"] if k not in KINDS]
        if bad:
            raise ValueError(f"data.kinds holds {bad}; expected kinds among {', '.join(KINDS)}")
    for i, spec in enumerate(cfg["data"].get("datasets") or []):
        for name in spec:
            if name not in DATASET_KEYS:
                raise _unknown(f"data.datasets[{i}].{name}",
                               {f"data.datasets[{i}].{k}" for k in DATASET_KEYS})
            _check_value(f"data.datasets[{i}].{name}", spec, name, DATASET_KEYS[name])
        for name in ("name", "kind", "shards") + (("images",) if spec.get("kind") == "mmc4" else ()):
            if name not in spec:
                raise ValueError(f"config key data.datasets[{i}].{name} is missing; expected "
                                 f"{DATASET_KEYS[name][0]}")
    _model_overrides(cfg["model"].get("overrides") or {})


def writable_dir(path: str | os.PathLike, key: str = "train.out_dir") -> Path:
    """Create ``path`` (and parents) and check that a file can be written in it."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ValueError(f"{key}={str(path)!r} is not a writable directory "
                         f"({err.strerror or err}); expected a directory this user can create "
                         f"and write, e.g. {key}=outputs/run") from None
    return out


def check_out_dir(path: str | os.PathLike, *, resume: bool) -> None:
    """A fresh run needs an ``out_dir`` without a previous run; ``--resume`` needs its
    checkpoint; either needs the directory to be writable (it is created)."""
    out = Path(path)
    previous = [n for n in ("checkpoints", "metrics.jsonl", "model") if (out / n).exists()]
    resumable = (out / "checkpoints" / "latest").is_file()
    if not resume and previous:
        todo = "continue it with --resume" if resumable else "it has no checkpoint: remove it"
        raise ValueError(f"train.out_dir={str(path)!r} holds a previous run "
                         f"({', '.join(previous)}); {todo} or choose a new train.out_dir")
    if resume and not resumable:
        raise ValueError(f"--resume: train.out_dir={str(path)!r} has no checkpoint "
                         f"(checkpoints/latest is missing); run without --resume to start")
    writable_dir(out)
