"""The compiled inference forward: module-level pure functions of (graphdef, params, inputs).

The model's structure (`graphdef`) is a static argument and everything else is traced, so one
compiled program per input shape serves every caller (evaluation, prediction, the trainer's periodic
evaluation, benchmarks) and a new `Segmenter` for the same model compiles nothing new.

Inference runs in two stages so that the head's cost follows the selection (MODEL.md section 2):
  encode_select  CLIP + DCS on every view of a batch; each image gets the union of the classes its
                 views selected, ranked by (priority, p_img) into `max_slots` candidates;
  decode         the head (TGA, SED) on K slots for every view, K = the smallest bucket
                 (`slot_bucket`) that holds the largest union of the batch.
Tag validation then runs on each image's final label map, combined over its views (`validate_labels`).
At most one program per bucket is compiled and kept for the process (and in the persistent
compilation cache, see `runtime.enable_compilation_cache`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dcp_jax.models import selection, tag_validation

MIN_BUCKET = 4


def slot_bucket(count: int, cap: int) -> int:
    """K for `count` selected classes: the smallest power of two >= max(count, 4), at most `cap`."""
    k = MIN_BUCKET
    while k < count:
        k *= 2
    return max(1, min(k, int(cap)))


def bucket_cap(num_slots: int, num_classes: int) -> int:
    """The largest bucket: eval.num_slots (0 = one slot per class), at most the vocabulary size."""
    return selection.resolve_num_slots(int(num_slots), int(num_classes))


@functools.partial(jax.jit, static_argnames=("graphdef", "views_per_image", "max_slots"))
def encode_select(graphdef, params, views, text_embeds, *, views_per_image: int, max_slots: int,
                  class_valid=None):
    """Stage 1: views [B*V,S,S,3] (0..255, image-major) -> (features per view, per-image candidates).

    Candidates: slot_class int32 [B,max_slots], slot_valid [B,max_slots] (the selected classes of
    any of the image's views, best first) and dcs_selected int32 [B] (how many were selected).
    `class_valid` [C] bool: False for the rows of a vocabulary padded to a fixed size (never selected).
    """
    model = nnx.merge(graphdef, params)
    model.check_text(text_embeds)
    text_bar = selection.mean_text_embedding(text_embeds.astype(jnp.float32))
    features = model.encode(views)
    n, g = features["dense"].shape[:2]
    level, p_img, votes = selection.selection_levels(
        features["cls"], features["dense"].reshape(n, g * g, -1), text_bar, model.clip.logit_scale[...],
        theta=model.theta, class_valid=class_valid)
    # An image decodes the union of its views' classes at their best priority, so no class scores 0
    # in a view merely because that view did not select it (MODEL.md section 7); its votes add up.
    per_image = lambda x: x.reshape(-1, views_per_image, x.shape[-1])  # noqa: E731
    level, p_img, votes = per_image(level).max(axis=1), per_image(p_img).max(axis=1), per_image(votes).sum(axis=1)
    return features, selection.rank_slots(level, p_img, max_slots, votes)


@functools.partial(jax.jit, static_argnames=("graphdef", "views_per_image", "num_slots", "pad_to", "tag_validation"))
def decode(graphdef, params, features, text_embeds, guidance_text, slot_class, slot_valid, seen, *,
           views_per_image: int, num_slots: int, pad_to: int = 0, tag_validation: bool = True):
    """Stage 2: the head on the first `num_slots` candidates of each image, for all its views.

    Returns logits [B*V,K,h,w], slot_class (after tag validation) and slot_valid [B*V,K], and
    tv_relabelled [B*V,K]. With `pad_to` > K the slot axis is padded to it with invalid slots, so what
    comes after (the views' combination) compiles once for every bucket. `tag_validation=False` leaves
    the per-view tag validation out (inference validates the final label map instead).
    """
    model = nnx.merge(graphdef, params)
    per_view = lambda x: jnp.repeat(x[:, :num_slots], views_per_image, axis=0)  # noqa: E731
    slot_class, slot_valid = per_view(slot_class), per_view(slot_valid)
    text_embeds = text_embeds.astype(jnp.float32)
    logits = model.decode(features, text_embeds, slot_class, slot_valid, guidance_text)
    text_bar = selection.mean_text_embedding(text_embeds)
    if tag_validation:
        final, relabelled = model.validate(logits, slot_class, slot_valid, features, text_bar, seen)
    else:
        final, relabelled = slot_class, jnp.zeros_like(slot_valid)
    out = {"logits": logits, "slot_class": final, "slot_valid": slot_valid, "tv_relabelled": relabelled}
    pad = max(0, int(pad_to) - num_slots)
    if pad:
        out = {key: jnp.pad(value, [(0, 0), (0, pad)] + [(0, 0)] * (value.ndim - 2)) for key, value in out.items()}
    return out


@functools.partial(jax.jit, static_argnames=("k",))
def validate_labels(labels, image_hw, slot_class, slot_valid, global_dense, text_embeds, seen, *, k: int,
                    class_valid=None):
    """Tag validation on the final label maps [B,H,W] (models/tag_validation.validate_label_map): each
    image's candidate classes [B,K], the whole-image view's dense features [B,g,g,D]."""
    text_bar = selection.mean_text_embedding(text_embeds.astype(jnp.float32))
    return tag_validation.validate_label_map(labels, image_hw, slot_class, slot_valid, global_dense, text_bar,
                                             seen, k=k, class_valid=class_valid)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def guidance_embeddings(graphdef, params, input_ids, attention_mask):
    """Unit guidance text embeddings [R,D] of tokenized single-template prompts (learnt context, if any)."""
    return nnx.merge(graphdef, params).encode_guidance_text(input_ids, attention_mask)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_slots"))
def zero_shot(graphdef, params, views, text_embeds, *, num_slots: int, class_valid=None):
    """The zero-shot baseline: CLIP's dense features scored against the class embeddings, no head.

    Per view: CAT-Seg's dense features against T_bar, per-patch log-softmax over all C classes of
    logit_scale * cos. The logits are these log-probabilities: sigmoid(log p) = p / (1 + p) keeps the
    per-pixel ranking, whereas sigmoid(100 * cos) saturates to exactly 1.0 in float32 for every class.
    Slots: the top-`num_slots` classes by their best patch probability in the view, all valid but padding
    classes (`class_valid` False, probability 0).
    """
    from dcp_jax.models.clip import normalize_pixels

    model = nnx.merge(graphdef, params)
    size = model.config.vision.image_size
    x = normalize_pixels(views)
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=False)
    _, aux = model.encode_image(x, dense_mode="catseg")
    text_bar = selection.mean_text_embedding(text_embeds.astype(jnp.float32))
    dense = selection.l2_normalize(aux["dense"])  # [N,g,g,D]
    scale = jnp.exp(model.logit_scale[...].astype(jnp.float32))
    cos = jnp.einsum("nhwd,cd->nhwc", dense, text_bar, precision=jax.lax.Precision.HIGHEST)
    scores = scale * cos if class_valid is None else jnp.where(class_valid, scale * cos, -jnp.inf)
    log_p = jax.nn.log_softmax(scores, axis=-1)
    k = selection.resolve_num_slots(num_slots, text_bar.shape[0])
    _, slot_class = jax.lax.top_k(jnp.max(log_p, axis=(1, 2)), k)  # [N,K]
    logits = jnp.take_along_axis(log_p, slot_class[:, None, None, :], axis=-1)
    valid = jnp.ones(slot_class.shape, bool) if class_valid is None else class_valid[slot_class]
    return {"logits": jnp.transpose(logits, (0, 3, 1, 2)), "slot_class": slot_class.astype(jnp.int32),
            "slot_valid": valid}
