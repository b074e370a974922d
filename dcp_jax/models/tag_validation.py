"""Tag Validation, TV (MODEL.md section 5): re-check the labels of unseen-class slots at inference.

`validate_label_map` (what inference runs): on the final label map of an image, combined over its
views. `validate_tags` (per view, on the slots' winning regions at the logit resolution) is the earlier
variant, kept for the model's own forward.

For each valid slot whose class is unseen (not in the training vocabulary) and that wins at least
one pixel, pool the dense CLIP features over the region it wins, rank the whole vocabulary by cosine
similarity, and relabel the slot with the top-1 class when its own class is not in the top-k. Seen
classes are trusted as they are. Cost O(B*K*C*D); it only rewrites `slot_class`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dcp_jax.models.selection import l2_normalize


def winning_regions(logits: jax.Array, slot_valid: jax.Array, grid: int) -> jax.Array:
    """Fraction of each grid cell that each slot wins: logits [B,K,h,w] -> weights [B,g,g,K].

    The winner is the argmax over valid slots at the logit resolution; its one-hot map is
    area-pooled to the g x g patch grid (h must be a multiple of g).
    """
    b, k, h, w = logits.shape
    if h % grid or w % grid:
        raise ValueError(f"logit map {h}x{w} is not a multiple of the {grid}x{grid} patch grid")
    masked = jnp.where(slot_valid[:, :, None, None], logits.astype(jnp.float32), -jnp.inf)
    winner = jax.nn.one_hot(jnp.argmax(masked, axis=1), k, dtype=jnp.float32)  # [B,h,w,K]
    fh, fw = h // grid, w // grid
    return winner.reshape(b, grid, fh, grid, fw, k).mean(axis=(2, 4))


def _check(k: int, seen: jax.Array, num_classes: int) -> None:
    if k < 1:
        raise ValueError(f"config.model.tv.k={k}: must be >= 1")
    if seen.shape != (num_classes,):
        raise ValueError(f"seen mask has shape {seen.shape}; expected [C] = ({num_classes},)")


def _relabel(pooled, slot_class, slot_valid, wins, text_bar, seen, k: int, class_valid=None):
    """Eq. 17's rule on pooled region features [...,K,D]: a valid unseen slot that wins pixels and whose
    class is not in the top-k of the vocabulary for its region -> (relabel [...,K], top-1 class [...,K]).
    Padding classes (`class_valid` False) never rank."""
    sims = l2_normalize(pooled) @ text_bar.astype(jnp.float32).T  # [...,K,C]
    if class_valid is not None:
        sims = jnp.where(class_valid, sims, -jnp.inf)
    own = jnp.take_along_axis(sims, slot_class[..., None], axis=-1)
    relabel = slot_valid & wins & ~seen[slot_class] & (jnp.sum(sims > own, axis=-1) >= k)
    return relabel, jnp.argmax(sims, axis=-1).astype(jnp.int32)


def validate_tags(
    logits: jax.Array,
    slot_class: jax.Array,
    slot_valid: jax.Array,
    dense: jax.Array,
    text_bar: jax.Array,
    seen: jax.Array,
    *,
    k: int,
) -> tuple[jax.Array, jax.Array]:
    """Relabel unseen-class slots whose pooled region disagrees with their class.

    logits [B,K,h,w]; slot_class int [B,K]; slot_valid bool [B,K]; dense [B,g,g,D] joint-space patch
    features; text_bar [C,D] unit class embeddings; seen bool [C]; k: the top-k that keeps a label.
    Returns (new slot_class int32 [B,K], relabelled bool [B,K]).
    """
    _check(k, seen, text_bar.shape[0])
    weights = winning_regions(logits, slot_valid, dense.shape[1])  # [B,g,g,K]
    wins_any = jnp.sum(weights, axis=(1, 2)) > 0  # [B,K]
    pooled = jnp.einsum("bhwk,bhwd->bkd", weights, l2_normalize(dense.astype(jnp.float32)))
    relabel, top1 = _relabel(pooled, slot_class, slot_valid, wins_any, text_bar, seen, k)
    return jnp.where(relabel, top1, slot_class).astype(jnp.int32), relabel


def validate_label_map(
    labels: jax.Array,
    image_hw: jax.Array,
    slot_class: jax.Array,
    slot_valid: jax.Array,
    dense: jax.Array,
    text_bar: jax.Array,
    seen: jax.Array,
    *,
    k: int,
    class_valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Tag validation on the final prediction (Eq. 17): each unseen class's region of the combined label
    map of all views is pooled over the whole image's dense features.

    labels int [B,H,W] vocabulary ids (-1 outside each image's `image_hw` [B,2]); slot_class / slot_valid
    [B,K] the image's candidate classes; dense [B,g,g,D] the features of the whole image stretched to the
    CLIP input (the global view), so pixel (y, x) of an h x w image falls in cell (y g // h, x g // w);
    text_bar [C,D]; seen bool [C]; class_valid bool [C] (None: all), False for padding classes. A candidate keeps its label when its class is seen, wins no pixel, or
    ranks in the top-k of the vocabulary for its pooled region; otherwise all its pixels take the top-1.
    Returns (labels [B,H,W], relabelled bool [B,K]).
    """
    num_classes, grid = text_bar.shape[0], dense.shape[1]
    _check(k, seen, num_classes)
    height, width = labels.shape[1:]
    dense_n = l2_normalize(dense.astype(jnp.float32)).reshape(dense.shape[0], grid * grid, -1)

    def one(image_labels, hw, classes, valid, feats):
        cy = jnp.minimum(jnp.arange(height) * grid // hw[0], grid - 1)
        cx = jnp.minimum(jnp.arange(width) * grid // hw[1], grid - 1)
        cell = cy[:, None] * grid + cx[None, :]  # [H,W]
        inside = image_labels >= 0
        segment = jnp.where(inside, cell * num_classes + jnp.maximum(image_labels, 0), 0)
        counts = jax.ops.segment_sum(inside.astype(jnp.float32).ravel(), segment.ravel(),
                                     num_segments=grid * grid * num_classes).reshape(grid * grid, num_classes)
        regions = counts[:, classes]  # [g*g,K]: pixels of each candidate's region per cell
        relabel, new_class = _relabel(regions.T @ feats, classes, valid, regions.sum(0) > 0, text_bar, seen, k,
                                       class_valid)
        table = jnp.arange(num_classes, dtype=jnp.int32).at[jnp.where(relabel, classes, num_classes)].set(
            new_class, mode="drop")
        return jnp.where(inside, table[jnp.maximum(image_labels, 0)], -1), relabel

    return jax.vmap(one)(labels, image_hw.astype(jnp.int32), slot_class.astype(jnp.int32), slot_valid, dense_n)
