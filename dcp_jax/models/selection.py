"""Dynamic Category Selection, DCS (MODEL.md section 2), with a fixed number of slots K.

Everything here is parameter-free: CLIP's own image-level (CLS) and patch-level (dense) scores
pick the classes, and a lexicographic sort turns the selected set into K ranked slots so every
shape stays static under jit. The cost is one [B,N,D] x [D,C] matmul plus a sort over C.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Priority levels of a class, highest first (MODEL.md section 2: gt > image > patch).
LEVEL_GT, LEVEL_IMAGE, LEVEL_PATCH, LEVEL_NONE = 3, 2, 1, 0


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / ||x|| along `axis` (safe at zero)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


def mean_text_embedding(text_embeds: jax.Array) -> jax.Array:
    """T_bar [C,D] = normalise(mean over the P templates of T [C,P,D])."""
    return l2_normalize(jnp.mean(text_embeds, axis=-2))


def resolve_num_slots(num_slots: int, num_classes: int) -> int:
    """K actually used: 0 (or anything >= C) means one slot per vocabulary class."""
    if num_slots < 0:
        raise ValueError(f"num_slots={num_slots}: must be >= 0 (0 means one slot per class)")
    return num_classes if num_slots == 0 or num_slots >= num_classes else num_slots


def class_scores(cls_embeds: jax.Array, dense: jax.Array, text_bar: jax.Array, logit_scale: jax.Array,
                 class_valid: jax.Array | None = None):
    """Image- and patch-level class probabilities.

    cls_embeds [B,D], dense [B,N,D] (any scale; normalised here), text_bar [C,D] unit vectors,
    logit_scale: CLIP's log scale (s = exp(logit_scale)). Returns p_img [B,C], p_patch [B,N,C]
    (float32 softmaxes over the vocabulary). `class_valid` [C] bool: rows past the vocabulary (a vocabulary
    padded to a fixed size, so that one compiled program serves many sizes) get probability exactly 0.
    """
    s = jnp.exp(logit_scale.astype(jnp.float32))
    text_bar = text_bar.astype(jnp.float32)
    cls_n = l2_normalize(cls_embeds.astype(jnp.float32))
    dense_n = l2_normalize(dense.astype(jnp.float32))
    img_logits, patch_logits = s * cls_n @ text_bar.T, s * jnp.einsum("bnd,cd->bnc", dense_n, text_bar)
    if class_valid is not None:
        img_logits, patch_logits = (jnp.where(class_valid, x, -jnp.inf) for x in (img_logits, patch_logits))
    return jax.nn.softmax(img_logits, axis=-1), jax.nn.softmax(patch_logits, axis=-1)


def selection_levels(cls_embeds, dense, text_bar, logit_scale, *, theta: float, gt_present=None, class_valid=None):
    """Each class's priority level (LEVEL_*) per image, p_img, and its patch votes:
    (level int32 [B,C], p_img [B,C], votes int32 [B,C] = the patches whose damped argmax it is).

    C_patch = union over patches of argmax_c p_patch * (1 - p_img); C_img = {p_img > theta};
    theta <= 0 selects every class (the "no DCS" baseline; tested explicitly because a float32
    softmax at s=100 can underflow to exactly 0). Classes present in `gt_present` [B,C] (training)
    outrank everything. Padding classes (`class_valid` False) are never selected. No gradient flows through
    the selection.
    """
    num_classes = text_bar.shape[0]
    p_img, p_patch = class_scores(
        jax.lax.stop_gradient(cls_embeds), jax.lax.stop_gradient(dense), jax.lax.stop_gradient(text_bar), logit_scale,
        class_valid)
    p_img = jax.lax.stop_gradient(p_img)
    # Damp the dominant classes so each patch can reveal a secondary one.
    q_patch = p_patch * (1.0 - p_img)[:, None, :]
    winner = jnp.argmax(q_patch, axis=-1)  # [B,N]
    votes = jnp.sum(jax.nn.one_hot(winner, num_classes, dtype=jnp.int32), axis=1)  # [B,C]
    by_patch = votes > 0
    by_image = (p_img > theta) | (theta <= 0)
    level = jnp.where(by_patch, LEVEL_PATCH, LEVEL_NONE)
    level = jnp.where(by_image, LEVEL_IMAGE, level)
    if gt_present is not None:
        if gt_present.shape != p_img.shape:
            raise ValueError(f"gt_present has shape {gt_present.shape}; expected [B,C] = {p_img.shape}")
        level = jnp.where(gt_present, LEVEL_GT, level)
    if class_valid is not None:
        level = jnp.where(class_valid, level, LEVEL_NONE)
    return level.astype(jnp.int32), p_img, votes


def rank_slots(level: jax.Array, p_img: jax.Array, num_slots: int, votes: jax.Array | None = None
               ) -> dict[str, jax.Array]:
    """The selected classes (level > LEVEL_NONE) ranked into K slots: by (level, votes, p_img)
    descending, ties by class index; slots past the selected count are invalid.

    When more classes are selected than K, the ones left out are the fewest patches' winners: a patch
    class's p_img is below theta, near noise, whereas its votes say how much of the image it covers.
    Returns slot_class int32 [B,K], slot_valid bool [B,K], dcs_selected / dcs_dropped int32 [B].
    """
    num_classes = level.shape[-1]
    k = resolve_num_slots(num_slots, num_classes)
    class_index = jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32), level.shape)
    votes = jnp.zeros_like(level) if votes is None else votes.astype(jnp.int32)
    # Lexicographic descending sort on (level, votes, p_img); the stable sort breaks exact ties by index.
    *_, order = jax.lax.sort((-level, -votes, -p_img, class_index), dimension=-1, num_keys=3, is_stable=True)
    slot_class = order[:, :k]
    slot_valid = jnp.take_along_axis(level, slot_class, axis=-1) > LEVEL_NONE
    num_selected = jnp.sum(level > LEVEL_NONE, axis=-1, dtype=jnp.int32)
    return {"slot_class": slot_class, "slot_valid": slot_valid, "dcs_selected": num_selected,
            "dcs_dropped": jnp.maximum(num_selected - k, 0)}


def select_categories(
    cls_embeds: jax.Array,
    dense: jax.Array,
    text_bar: jax.Array,
    logit_scale: jax.Array,
    *,
    theta: float,
    num_slots: int,
    gt_present: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """DCS: pick the classes worth decoding and rank them into K fixed slots.

    cls_embeds [B,D], dense [B,N,D], text_bar [C,D] unit vectors, logit_scale: CLIP's log scale.
    See `selection_levels` and `rank_slots`. Returns slot_class int32 [B,K], slot_valid bool [B,K],
    dcs_selected / dcs_dropped int32 [B], p_img [B,C], selected bool [B,C].
    """
    level, p_img, votes = selection_levels(cls_embeds, dense, text_bar, logit_scale, theta=theta, gt_present=gt_present)
    return {**rank_slots(level, p_img, num_slots, votes), "p_img": p_img, "selected": level > LEVEL_NONE}
