"""The optimizer: AdamW over parameter groups named by regex rules, full-model gradient clipping.

`config.optim.rules` is a rule list (see dcp_jax/rules.py): `(regex, {"lr_mult": m, "weight_decay": w})`
puts the matching parameters in a group trained at lr x m with decoupled weight decay w (each key
optional: lr_mult 1, weight_decay config.optim.weight_decay), and `(regex, None)` freezes them. The
first matching rule wins, and every parameter must match one. An empty list means the preset
`finetune_rules(config)`: CAT-Seg's recipe (MODEL.md sections 0, 1 and 6).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dcp_jax import config as config_lib
from dcp_jax import rules as rules_lib
from dcp_jax.models import compute

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


def global_norm(tree) -> jax.Array:
    """The L2 norm of all the arrays of `tree` together (float32), as one reduction over their
    concatenation: optax's global norm sums each array on its own, one GPU kernel per parameter array
    (169 in the B/16 recipe's step)."""
    leaves = [jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    flat = jnp.concatenate(leaves)
    return jnp.sqrt(jnp.sum(flat * flat))


def all_finite(tree) -> jax.Array:
    """Whether every value of every array of `tree` is finite, as one reduction over their concatenation (a norm
    would overflow to inf for huge but finite values)."""
    leaves = [jnp.ravel(x) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.isfinite(jnp.concatenate(leaves))) if leaves else jnp.ones((), bool)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm with the norm of `global_norm` (the same arithmetic, fewer kernels)."""

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        keep = norm < max_norm
        return jax.tree.map(lambda t: jnp.where(keep, t, (t / norm.astype(t.dtype)) * max_norm), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# A group's vector is padded with zeros to a multiple of this many entries, so that FSDP can shard its
# moments over any power-of-two number of devices up to it (distributed.param_sharding splits an axis that the
# device count divides). The padding's gradients and parameters are zeros: its updates are zeros.
FLAT_MULTIPLE = 4096


def _flat_size(leaves, multiple: int) -> int:
    return -(-sum(math.prod(x.shape) for x in leaves) // multiple) * multiple


def _flatten(leaves, multiple: int) -> jax.Array:
    """The arrays' values as one zero-padded vector."""
    if not leaves:
        return jnp.zeros((0,), jnp.float32)
    vector = jnp.concatenate([jnp.ravel(x) for x in leaves])
    return jnp.pad(vector, (0, _flat_size(leaves, multiple) - vector.shape[0]))


def _unflatten(vector: jax.Array, like) -> list:
    """The pieces of `vector` in the shapes of the arrays `like` (its padding dropped)."""
    ends = np.cumsum([math.prod(x.shape) for x in like])
    pieces = jnp.split(vector[:ends[-1]], ends[:-1]) if like else []
    return [p.reshape(x.shape) for p, x in zip(pieces, like)]


def flattened(inner: optax.GradientTransformation, multiple: int = FLAT_MULTIPLE) -> optax.GradientTransformation:
    """`inner` on its parameters concatenated into one vector (zero-padded to a multiple of `multiple`), as
    optax.flatten, whose init reads only the parameters' shapes and dtypes (so that an abstract model's
    optimizer can be built)."""

    def init(params):
        leaves = jax.tree.leaves(params)
        dtype = jnp.result_type(*(x.dtype for x in leaves)) if leaves else jnp.float32
        return inner.init(jnp.zeros((_flat_size(leaves, multiple) if leaves else 0,), dtype))

    def update(updates, state, params=None):
        leaves, treedef = jax.tree.flatten(updates)
        flat_updates, state = inner.update(_flatten(leaves, multiple), state,
                                           None if params is None else _flatten(jax.tree.leaves(params), multiple))
        return jax.tree.unflatten(treedef, _unflatten(flat_updates, leaves)), state

    return optax.GradientTransformation(init, update)


def clipped_flat_groups(max_norm: float, transforms: dict, labels, multiple: int = FLAT_MULTIPLE):
    """optax.chain(optax.clip_by_global_norm(max_norm), optax.partition({g: flattened(t)}, labels)) with the
    clipping done on each group's vector: the arithmetic of optax's per-array transforms, in a few GPU kernels
    per group. Clipping each array before the groups are concatenated took one GPU kernel per array (the
    concatenation of ~170 arrays takes no producer into its kernel). The state has the tree of that chain, so
    that checkpoints written before keep loading. max_norm 0: no clipping."""
    layout = optax.chain(optax.identity(), optax.partition({g: flattened(t, multiple) for g, t in transforms.items()},
                                                           labels))

    def update(updates, state, params=None):
        leaves, treedef = jax.tree.flatten(updates)
        param_leaves = None if params is None else jax.tree.leaves(params)
        label_of = jax.tree.leaves(labels(updates))
        members = {g: [i for i, label in enumerate(label_of) if label == g] for g in transforms}
        vectors = {g: _flatten([leaves[i] for i in idx], multiple) for g, idx in members.items()}
        if max_norm:  # optax.clip_by_global_norm's arithmetic, elementwise on the vectors
            norm = global_norm(leaves)  # the norm of before, to the bit (and the train step's grad_norm)
            keep = norm < max_norm
            vectors = {g: jnp.where(keep, v, (v / norm.astype(v.dtype)) * max_norm) for g, v in vectors.items()}
        new_leaves, inner_states = [None] * len(leaves), {}
        for g, idx in members.items():
            flat_params = None if params is None else _flatten([param_leaves[i] for i in idx], multiple)
            flat_updates, inner = transforms[g].update(vectors[g], state[1].inner_states[g].inner_state, flat_params)
            inner_states[g] = optax.MaskedState(inner_state=inner)
            for i, piece in zip(idx, _unflatten(flat_updates, [leaves[i] for i in idx])):
                new_leaves[i] = piece
        return jax.tree.unflatten(treedef, new_leaves), (state[0], optax.PartitionState(inner_states))

    return optax.GradientTransformation(layout.init, update)


def gradient_transform(config, model: nnx.Module, *, flat: bool = True) -> optax.GradientTransformation:
    """AdamW per rule group (lr x lr_mult, its weight decay), after full-model gradient clipping.

    flat: each group's AdamW runs on its parameters concatenated into one vector, clipped there
    (`clipped_flat_groups`): the arithmetic of optax's per-array transforms (flat=False, tests/test_optim.py) in a
    few GPU kernels per group instead of several per parameter array (169 arrays in the B/16 recipe). The
    moments are then kept as one vector per group."""
    rules = parameter_rules(config)
    schedule = learning_rate_schedule(config)
    o = config.optim

    def adamw(group: dict):
        mult = float(group.get("lr_mult", 1.0))
        return optax.adamw(lambda step: schedule(step) * mult, b1=0.9, b2=0.999,
                           weight_decay=float(group.get("weight_decay", o.weight_decay)))

    used = sorted({group_of(rules, path) for path, _ in rules_lib.flat_params(nnx.state(model, trainable(config)))})
    transforms = {str(i): adamw(rules[i][1]) for i in used}
    labels = lambda params: group_labels(rules, params)  # noqa: E731
    if flat and compute.platform() != "cpu":
        return clipped_flat_groups(o.grad_clip_norm, transforms, labels)
    if flat:  # the CPU clips each array, then concatenates: the same arithmetic, and XLA:CPU rounds it as it
        # always has (clipping the concatenation moved the demo's losses in the 7th digit after 20 steps and its
        # mIoU by 1.4 points at 600), so the published CPU numbers stay reproducible
        return optax.chain(clip_by_global_norm(o.grad_clip_norm) if o.grad_clip_norm else optax.identity(),
                           optax.partition({g: flattened(t) for g, t in transforms.items()}, labels))
    return optax.chain(optax.clip_by_global_norm(o.grad_clip_norm) if o.grad_clip_norm else optax.identity(),
                       optax.partition(transforms, labels))


def make_optimizer(config, model: nnx.Module) -> nnx.Optimizer:
    """nnx's optimizer over the trained parameters of `model` (trainable) with gradient_transform."""
    return nnx.Optimizer(model, gradient_transform(config, model), wrt=trainable(config))
