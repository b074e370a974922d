"""Config helpers. The recipes themselves live in configs/ (installed as `dcp_jax.configs`).

Config files define `get_config(arg)` and return an `ml_collections.ConfigDict` (big_vision style):
configs/dcp_vitb16_coco_stuff.py holds the paper's recipe with every key documented, and the other
configs start from it and say what they change.
"""

from __future__ import annotations

import math

import os
from importlib import resources
from pathlib import Path

import ml_collections


TEXT_FINETUNE = ("none", "guidance", "cost")


def text_finetune(config) -> str:
    """config.clip.text_finetune as one of TEXT_FINETUNE (MODEL.md section 1): "none" (the text tower
    frozen), "guidance" (its q/v trained; the slots' guidance text re-encoded every step), "cost" (also
    the cost volume's template embeddings of the slot classes re-encoded, as CAT-Seg trains its text).
    Configs saved when the key was a bool read True as "guidance" and False as "none"."""
    value = config.clip.get("text_finetune", "none")
    if isinstance(value, bool) or str(value).lower() in ("true", "false", ""):
        return "guidance" if str(value).lower() == "true" else "none"
    if value not in TEXT_FINETUNE:
        raise ValueError(f"config.clip.text_finetune={value!r}: expected one of {TEXT_FINETUNE}")
    return value


def reencodes_text(config) -> bool:
    """Whether training re-encodes the slots' text with the text tower (a learnt context or text fine-tuning)."""
    return config.model.guidance.prompt == "context" or text_finetune(config) != "none"


def check_finetune_rows(config, num_classes: int | None = None) -> None:
    """Training re-encodes the text of the batch's slot classes into `text.finetune_rows` rows (0 = every class).
    A class left over would silently train on the frozen embeddings instead, so a config whose rows cannot hold
    every slot of a batch is refused: it needs train.batch_size x model.dcs.num_slots rows, or, with num_slots 0
    (every class a slot), the vocabulary's `num_classes` (checked once that is known)."""
    rows = int(config.text.finetune_rows)
    if not reencodes_text(config) or rows == 0:
        return
    batch, slots = int(config.train.batch_size), int(config.model.dcs.num_slots)
    if slots:
        needed, why = batch * slots, f"train.batch_size={batch} x model.dcs.num_slots={slots} slots"
    elif num_classes is not None:
        needed, why = num_classes, f"model.dcs.num_slots=0 makes each of the {num_classes} classes a slot"
    else:
        return
    if rows < needed:
        raise ValueError(f"config.text.finetune_rows={rows} cannot re-encode the text of a batch's slot classes "
                         f"({why}); set text.finetune_rows >= {needed}, or 0 to re-encode every class")


# Numeric keys and their allowed ranges (low, high; None = unbounded), checked at start-up by every
# command (runtime.start): a value out of range is a one-line error instead of a silent nonsense run.
RANGES = {
    "total_steps": (1, None), "log_every_steps": (1, None), "checkpoint_every_steps": (1, None),
    "eval_every_steps": (0, None), "keep_checkpoints": (1, None), "train.batch_size": (1, None),
    "train.crop_size": (1, None), "train.num_workers": (0, None), "text.batch_size": (1, None),
    "text.finetune_rows": (0, None), "model.dcs.theta": (0.0, 1.0), "model.dcs.num_slots": (0, None),
    "model.tv.k": (1, None), "mesh.fsdp": (1, None), "mesh.min_shard_size": (0, None), "eval.batch_size": (1, None),
    "eval.num_slots": (0, None), "eval.max_images": (0, None), "eval.during_training_images": (0, None),
    "eval.short_side": (1, None), "optim.lr": (0.0, None), "optim.grad_clip_norm": (0.0, None),
    "optim.weight_decay": (0.0, None), "optim.clip_lr_mult": (0.0, None), "optim.warmup_steps": (0, None),
}


def check_ranges(config) -> None:
    """Raise ValueError naming the first key of RANGES whose value is out of its range (absent keys pass)."""
    for key, (low, high) in RANGES.items():
        node = config
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else None
            if node is None:
                break
        if node is None or isinstance(node, bool) or not isinstance(node, (int, float)):
            continue
        if not math.isfinite(node):  # nan passes every comparison below
            raise ValueError(f"config.{key}={node!r}: must be a finite number")
        if (low is not None and node < low) or (high is not None and node > high):
            allowed = f">= {low}" if high is None else f"between {low} and {high}"
            raise ValueError(f"config.{key}={node!r}: must be {allowed}")


def config_file(name: str) -> str:
    """Path of a built-in config file, e.g. config_file("demo") -> .../configs/demo.py."""
    path = resources.files("dcp_jax.configs").joinpath(f"{name}.py")
    if not path.is_file():
        raise FileNotFoundError(f"no built-in config {name!r} ({path})")
    return str(path)


def parse_arg(arg: str | None, **spec):
    """Parse a config-file argument "key=value,flag" against typed defaults (big_vision idiom).

    A bare key means True; a lone unnamed value fills the first key; an unknown key is an error.
    """
    result = dict(spec)
    if not arg:
        return ml_collections.ConfigDict(result)
    keys = list(spec)
    for i, part in enumerate(p for p in arg.split(",") if p):
        if "=" in part:
            key, value = part.split("=", 1)
        elif part in spec:
            key, value = part, "True"
        elif i == 0 and keys:
            key, value = keys[0], part
        else:
            raise ValueError(f"config arg {part!r}: unknown; known keys are {keys}")
        if key not in spec:
            raise ValueError(f"config arg {key!r}: unknown; known keys are {keys}")
        default = spec[key]
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config arg {key}={value!r}: expected true/false")
            result[key] = value.lower() in ("true", "1")
        else:
            result[key] = type(default)(value) if default is not None else value
    return ml_collections.ConfigDict(result)


def resolve_workdir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """A copy of `config` with "{workdir}" in its dataset specs replaced (the demo keeps its data in W)."""
    config = ml_collections.ConfigDict(config.to_dict())
    workdir = str(Path(workdir).absolute())
    for section, key in (("train", "dataset"), ("eval", "datasets"), ("eval", "during_training")):
        config[section][key] = config[section][key].replace("{workdir}", workdir)
    return config
