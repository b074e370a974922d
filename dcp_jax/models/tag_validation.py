"""Tag Validation, TV (MODEL.md section 5): re-check the labels of unseen-class slots at inference.

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
    if k < 1:
        raise ValueError(f"config.model.tv.k={k}: must be >= 1")
    num_classes = text_bar.shape[0]
    if seen.shape != (num_classes,):
        raise ValueError(f"seen mask has shape {seen.shape}; expected [C] = ({num_classes},)")
    weights = winning_regions(logits, slot_valid, dense.shape[1])  # [B,g,g,K]
    wins_any = jnp.sum(weights, axis=(1, 2)) > 0  # [B,K]
    pooled = jnp.einsum("bhwk,bhwd->bkd", weights, l2_normalize(dense.astype(jnp.float32)))
    sims = l2_normalize(pooled) @ text_bar.astype(jnp.float32).T  # [B,K,C]
    own = jnp.take_along_axis(sims, slot_class[..., None], axis=-1)  # [B,K,1]
    in_top_k = jnp.sum(sims > own, axis=-1) < k
    relabel = slot_valid & wins_any & ~seen[slot_class] & ~in_top_k
    new_class = jnp.where(relabel, jnp.argmax(sims, axis=-1), slot_class).astype(jnp.int32)
    return new_class, relabel
