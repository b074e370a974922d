"""The optimizer: AdamW over parameter groups named by regex rules, full-model gradient clipping.

`config.optim.rules` is a rule list (see dcp_jax/rules.py): `(regex, {"lr_mult": m, "weight_decay": w})`
puts the matching parameters in a group trained at lr x m with decoupled weight decay w (each key
optional: lr_mult 1, weight_decay config.optim.weight_decay), and `(regex, None)` freezes them. The
first matching rule wins, and every parameter must match one. An empty list means the preset
`finetune_rules(config)`: CAT-Seg's recipe (MODEL.md sections 0, 1 and 6).
"""

from __future__ import annotations

import dataclasses

import jax
import optax
from flax import nnx

from dcp_jax import config as config_lib
from dcp_jax import rules as rules_lib

# LayerNorm / GroupNorm scales and biases, by the module names used in dcp_jax's trees (CLIP's
# layer_norm1, pre_layrnorm, post_layernorm, final_layer_norm; the head's norm1, guidance_norm, ...).
NORM = r"(norm|layrnorm)[^/]*/(scale|bias)$"
# The q/v projection weights, not their biases: CAT-Seg trains `q_proj_weight` / `v_proj_weight` only.
IMAGE_QV = r"^clip/vision_model/encoder/layers/\d+/self_attn/(q_proj|v_proj)/kernel$"
TEXT_QV = r"^clip/text_model/encoder/layers/\d+/self_attn/(q_proj|v_proj)/kernel$"
IMAGE_TOWER = r"^clip/(vision_model|visual_projection)/"
FINETUNE_PRESETS = ("qv", "full", "none")


def finetune_rules(config) -> tuple:
    """The parameter groups of clip.finetune / clip.text_finetune, at lr x optim.clip_lr_mult for CLIP.

    "qv": the image tower's q/v projection weights (not their biases), as CAT-Seg; "full": the whole image
    tower; "none": CLIP frozen. With text_finetune the text tower's q/v train too. Everything else
    of CLIP is frozen; the head trains at the base lr. Norm parameters get no weight decay.
    """
    finetune = config.clip.finetune
    if finetune not in FINETUNE_PRESETS:
        raise ValueError(f"config.clip.finetune={finetune!r}: expected one of {FINETUNE_PRESETS}")
    clip_group = {"lr_mult": float(config.optim.clip_lr_mult)}
    trained = {"qv": [IMAGE_QV], "full": [IMAGE_TOWER], "none": []}[finetune]
    if config_lib.text_finetune(config) != "none":
        trained.append(TEXT_QV)
    rules = []
    for regex in trained:
        rules += [(regex + ".*" + NORM, {**clip_group, "weight_decay": 0.0}), (regex, clip_group)]
    # frozen_text_qv: the pretrained text q/v kept for the template embeddings (models/dcp.py).
    return (*rules, (r"^(clip|frozen_text_qv)/", None), (NORM, {"weight_decay": 0.0}), (r".*", {}))


def parameter_rules(config) -> tuple:
    """config.optim.rules, or the preset when it is empty; validated."""
    rules = config.optim.get("rules", ()) or finetune_rules(config)
    rules = rules_lib.check_rules(rules, "config.optim.rules")
    for regex, group in rules:
        bad = set(group or {}) - {"lr_mult", "weight_decay"}
        if group is not None and (not isinstance(group, dict) or bad):
            raise ValueError(f"config.optim.rules: the group of {regex!r} is {group!r}; expected None (frozen) "
                             "or a dict with lr_mult and/or weight_decay")
    return rules


def group_of(rules, path: str) -> int | None:
    """Index of the rule that owns `path`, or None when that rule freezes it."""
    index, group = rules_lib.first_match(rules, path, "config.optim.rules")
    return None if group is None else index


@dataclasses.dataclass(frozen=True)
class Trainable:
    """nnx filter selecting the trained nnx.Params (hashable, so usable as a static jit argument).

    rules: ((regex, trained: bool), ...), the first match wins."""

    rules: tuple[tuple[str, bool], ...]

    def __call__(self, path, value) -> bool:
        return isinstance(value, nnx.Param) and rules_lib.first_match(
            self.rules, rules_lib.path_str(path), "config.optim.rules")[1]


def trainable(config) -> Trainable:
    return Trainable(tuple((regex, group is not None) for regex, group in parameter_rules(config)))


def group_labels(rules, params):
    """The optimizer's view: each trained leaf of `params` -> the index (as str) of its rule group."""
    return jax.tree_util.tree_map_with_path(lambda p, _: str(group_of(rules, rules_lib.path_str(p))), params)


def learning_rate_schedule(config) -> optax.Schedule:
    o = config.optim
    if o.schedule == "cosine":
        decay = optax.cosine_decay_schedule(o.lr, max(1, config.total_steps - o.warmup_steps))
    elif o.schedule == "constant":
        decay = optax.constant_schedule(o.lr)
    else:
        raise ValueError(f"config.optim.schedule={o.schedule!r}: expected 'cosine' or 'constant'")
    if o.warmup_steps:
        return optax.join_schedules([optax.linear_schedule(0.0, o.lr, o.warmup_steps), decay], [o.warmup_steps])
    return decay


def make_optimizer(config, model: nnx.Module) -> nnx.Optimizer:
    """AdamW per rule group (lr x lr_mult, its weight decay), after full-model gradient clipping."""
    rules = parameter_rules(config)
    schedule = learning_rate_schedule(config)
    o = config.optim

    def adamw(group: dict):
        mult = float(group.get("lr_mult", 1.0))
        return optax.adamw(lambda step: schedule(step) * mult, b1=0.9, b2=0.999,
                           weight_decay=float(group.get("weight_decay", o.weight_decay)))

    used = sorted({group_of(rules, path) for path, _ in rules_lib.flat_params(nnx.state(model, trainable(config)))})
    transforms = {str(i): adamw(rules[i][1]) for i in used}
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm) if o.grad_clip_norm else optax.identity(),
                     optax.multi_transform(transforms, lambda params: group_labels(rules, params)))
    return nnx.Optimizer(model, tx, wrt=trainable(config))
