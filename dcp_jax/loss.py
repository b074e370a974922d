"""The training loss (MODEL.md section 6): per-pixel binary cross-entropy on the K valid slots."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def dcp_loss(outputs: dict, labels: jax.Array, *, ignore_as_negative: bool = True):
    """Per-pixel BCE on the K valid slots; returns (loss, metrics).

    Logits are bilinearly upsampled to the label size; the target of slot k at a pixel is
    (label == slot_class[k]). Labels are int32 with ignore = -1: ignore pixels are negatives for
    every slot (CAT-Seg), or left out when ignore_as_negative=False. Mean over valid slots x pixels.
    """
    labels = jnp.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be [B,H,W] int; got shape {labels.shape}")
    slot_class, slot_valid = outputs["slot_class"], outputs["slot_valid"]
    target = labels[:, None] == slot_class[:, :, None, None]  # [B,K,H,W]

    # Recomputed in the backward pass from the decoder's logits: the upsampled float32 logits and the
    # BCE's intermediates are [B,K,H,W] at label resolution (5 such maps kept: 0.5 GiB per image at K = 171).
    @jax.checkpoint
    def mean_bce(logits):
        logits = logits.astype(jnp.float32)
        if logits.shape[2:] != labels.shape[1:]:  # torch F.interpolate(bilinear, align_corners=False)
            logits = jax.image.resize(logits, (*logits.shape[:2], *labels.shape[1:]), "bilinear", antialias=False)
        bce = optax.sigmoid_binary_cross_entropy(logits, target.astype(jnp.float32))
        weight = jnp.broadcast_to(slot_valid[:, :, None, None], bce.shape)
        if not ignore_as_negative:
            weight = weight & (labels[:, None] >= 0)
        weight = weight.astype(jnp.float32)
        return jnp.sum(bce * weight) / jnp.maximum(jnp.sum(weight), 1.0)

    loss = mean_bce(outputs["logits"])
    labelled = labels >= 0
    covered = jnp.any(target & slot_valid[:, :, None, None], axis=1) & labelled
    metrics = {
        "valid_slots": jnp.mean(jnp.sum(slot_valid, axis=1).astype(jnp.float32)),
        # Fraction of labelled pixels whose class has a valid slot (1.0 with dcs.include_gt unless dropped).
        "gt_pixel_coverage": jnp.sum(covered) / jnp.maximum(jnp.sum(labelled), 1),
    }
    return loss, metrics


def gt_presence(labels: jax.Array, num_classes: int) -> jax.Array:
    """Which vocabulary classes occur in each label map: labels int [B,H,W] (-1 = ignore) -> bool [B,C].

    Values outside 0..C-1 are ignored.
    """
    labels = jnp.asarray(labels)
    flat = labels.reshape(labels.shape[0], -1).astype(jnp.int32)
    flat = jnp.where((flat >= 0) & (flat < num_classes), flat, num_classes)  # out of range -> spare bin
    present = jax.vmap(lambda row: jnp.zeros(num_classes + 1, jnp.bool_).at[row].set(True))(flat)
    return present[:, :num_classes]
