"""Semantic-segmentation metrics: a streaming confusion matrix and detectron2's SemSegEvaluator numbers.

Conventions (MODEL.md section 7): labels are int maps with -1 = ignore; predictions are class ids in
[0, num_classes). `counts[gt, pred]` is int64 on the host. The device-side `confusion_update` lets evaluation
accumulate on the accelerator (int32 by default: flush it into a `ConfusionMatrix` with `add_counts` before
2**31 pixels accumulate in one cell, e.g. once per few thousand images).

`compute_metrics` follows current detectron2 (SemSegEvaluator.evaluate): a class enters mIoU / mean accuracy
only if it has ground-truth pixels (and a non-empty union); pixel accuracy = correct / labelled pixels; ignore
pixels count nowhere. Given the class names it also returns detectron2's own keys (mIoU, fwIoU, IoU-<class>,
mACC, pACC, ACC-<class>), which CAT-Seg's and SED's users' scripts read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


class ConfusionMatrix:
    """Dataset-wide confusion matrix, `counts[gt, pred]` (int64), updated image by image."""

    def __init__(self, num_classes: int):
        if num_classes <= 0:
            raise ValueError(f"num_classes={num_classes} must be positive")
        self.num_classes = int(num_classes)
        self._counts = np.zeros((self.num_classes, self.num_classes), np.int64)

    @property
    def counts(self) -> np.ndarray:
        """The [num_classes, num_classes] int64 counts (rows: ground truth, columns: prediction)."""
        return self._counts

    def update(self, pred, label) -> "ConfusionMatrix":
        """Add one label map (or a batch): pred int in [0, C), label int in [0, C) or -1 (ignored)."""
        pred, label = np.asarray(pred), np.asarray(label)
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {pred.shape} != label shape {label.shape}")
        for name, arr in (("prediction", pred), ("label", label)):
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{name} must be an integer array; got dtype {arr.dtype}")
        n = self.num_classes
        keep = label != -1
        label, pred = label[keep].astype(np.int64), pred[keep].astype(np.int64)
        if label.size and (label.min() < 0 or label.max() >= n):
            bad = label[(label < 0) | (label >= n)][0]
            raise ValueError(f"label value {bad} outside [0, {n}) and not the ignore value -1; map the dataset's "
                             "ignore value (255, 65535, ...) to -1 when loading")
        if pred.size and (pred.min() < 0 or pred.max() >= n):
            bad = pred[(pred < 0) | (pred >= n)][0]
            raise ValueError(f"prediction value {bad} outside [0, {n}); map vocabulary ids to dataset labels "
                             "first (map_predictions)")
        self._counts += np.bincount(label * n + pred, minlength=n * n).reshape(n, n)
        return self

    def add_counts(self, counts) -> "ConfusionMatrix":
        """Add a [C,C] count array (e.g. the device accumulator of `confusion_update`, or another host's)."""
        counts = np.asarray(counts)
        if counts.shape != self._counts.shape:
            raise ValueError(f"counts of shape {counts.shape} cannot be added to a {self._counts.shape} matrix")
        if counts.min(initial=0) < 0:
            raise ValueError("counts must be non-negative (an int32 device accumulator may have overflowed)")
        self._counts += counts.astype(np.int64)
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix's counts (multi-host summing)."""
        return self.add_counts(other.counts)


def compute_metrics(counts, class_names=None) -> dict:
    """detectron2 SemSegEvaluator metrics from `counts[gt, pred]`.

    Returns dict with (all percentages):
      mIoU, fwIoU, pixel_acc, mean_acc: floats;
      per_class_iou, per_class_acc: lists of length C with None for classes without ground-truth pixels;
      num_labelled_pixels: int;
    and with `class_names` (C names) detectron2's keys, in its order: mIoU, fwIoU, IoU-<name>..., mACC (=
    mean_acc), pACC (= pixel_acc), ACC-<name>...; a class without ground truth is None there (detectron2: NaN,
    which strict JSON cannot hold).
    """
    counts = np.asarray(counts, np.int64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"counts must be a square [C,C] matrix; got shape {counts.shape}")
    if class_names is not None:
        if len(class_names) != counts.shape[0]:
            raise ValueError(f"{len(class_names)} class names for a {counts.shape[0]}-class confusion matrix")
        if len(set(class_names)) != len(class_names):  # IoU-<name> keys would overwrite each other
            raise ValueError("class names repeat, so IoU-<name> keys would collide: "
                             f"{sorted({n for n in class_names if list(class_names).count(n) > 1})[:5]}")
    tp = np.diag(counts).astype(np.float64)
    pos_gt = counts.sum(axis=1).astype(np.float64)
    pos_pred = counts.sum(axis=0).astype(np.float64)
    labelled = pos_gt.sum()
    if labelled == 0:
        raise ValueError("the confusion matrix holds no labelled pixels: nothing was evaluated")
    union = pos_gt + pos_pred - tp
    has_gt = pos_gt > 0  # detectron2's acc_valid
    iou_valid = has_gt & (union > 0)  # detectron2's iou_valid (union > 0 follows from has_gt)
    acc = np.where(has_gt, tp / np.maximum(pos_gt, 1), np.nan)
    iou = np.where(iou_valid, tp / np.maximum(union, 1), np.nan)
    weights = pos_gt / labelled  # detectron2's class_weights

    def as_list(x, valid):
        return [float(100 * v) if ok else None for v, ok in zip(x, valid)]

    per_class_iou, per_class_acc = as_list(iou, iou_valid), as_list(acc, has_gt)
    result = dict(
        mIoU=float(100 * iou[iou_valid].mean()),
        fwIoU=float(100 * np.sum(iou[iou_valid] * weights[iou_valid])),
    )
    if class_names is not None:
        result.update({f"IoU-{name}": v for name, v in zip(class_names, per_class_iou)})
    result.update(mACC=float(100 * acc[has_gt].mean()), pACC=float(100 * tp.sum() / labelled))
    if class_names is not None:
        result.update({f"ACC-{name}": v for name, v in zip(class_names, per_class_acc)})
    result.update(pixel_acc=result["pACC"], mean_acc=result["mACC"], per_class_iou=per_class_iou,
                  per_class_acc=per_class_acc, num_labelled_pixels=int(labelled))
    return result


@jax.jit
def confusion_update(counts: jax.Array, pred: jax.Array, label: jax.Array) -> jax.Array:
    """On-device `counts[gt, pred] += ...` for any batch of label maps (same result as ConfusionMatrix.update).

    counts: [C,C] int (int32 unless jax x64 is on). Pixels with label -1 are skipped; entries outside [0, C)
    (which the host version rejects) are skipped too, since a device function cannot raise.
    """
    n = counts.shape[0]
    pred = pred.reshape(-1).astype(jnp.int32)
    label = label.reshape(-1).astype(jnp.int32)
    keep = (label >= 0) & (label < n) & (pred >= 0) & (pred < n)
    index = jnp.where(keep, label * n + pred, 0)
    added = jax.ops.segment_sum(keep.astype(counts.dtype), index, num_segments=n * n)
    return counts + added.reshape(n, n)


def map_predictions(pred, pred_to_label):
    """Vocabulary ids -> dataset label ids through a lookup table (numpy or jax arrays).

    E.g. VOC-20b (`background_mapping(59, 20)`): vocabulary ids >= 20 all become 20, "background".
    """
    if isinstance(pred, jax.Array) or isinstance(pred_to_label, jax.Array):
        return jnp.asarray(pred_to_label)[pred]
    pred, table = np.asarray(pred), np.asarray(pred_to_label)
    if table.ndim != 1:
        raise ValueError(f"pred_to_label must be a 1-D table [vocabulary size]; got shape {table.shape}")
    if pred.size and (pred.min() < 0 or pred.max() >= table.size):
        raise ValueError(f"prediction ids span [{pred.min()}, {pred.max()}] but pred_to_label has {table.size} "
                         "entries (one per vocabulary class)")
    return table[pred]


def background_mapping(vocab_size: int, num_foreground: int) -> np.ndarray:
    """pred_to_label for "b" benchmarks: ids < num_foreground keep their id, the rest become num_foreground."""
    if not 0 < num_foreground <= vocab_size:
        raise ValueError(f"num_foreground={num_foreground} must be in [1, vocab_size={vocab_size}]")
    return np.minimum(np.arange(vocab_size), num_foreground).astype(np.int32)


def seen_unseen(per_class_iou, unseen) -> dict:
    """mIoU over the seen classes, over the unseen ones, and their harmonic mean hIoU (zero-shot
    segmentation's convention, e.g. ZegFormer / SPNet), from `compute_metrics`' per_class_iou.

    unseen: bool per class. Classes without ground truth (None) count in neither mean. Returns
    {"mIoU_seen", "mIoU_unseen", "hIoU"} in percent (None where a group has no scored class).
    """
    unseen = np.asarray(unseen, bool)
    if len(per_class_iou) != unseen.size:
        raise ValueError(f"{len(per_class_iou)} per-class IoUs but an unseen mask of {unseen.size} classes")

    def mean(group):
        values = [v for v, u in zip(per_class_iou, unseen) if v is not None and u == group]
        return float(np.mean(values)) if values else None

    seen_miou, unseen_miou = mean(False), mean(True)
    h = None
    if seen_miou is not None and unseen_miou is not None:
        h = 0.0 if seen_miou + unseen_miou == 0 else 2 * seen_miou * unseen_miou / (seen_miou + unseen_miou)
    return {"mIoU_seen": seen_miou, "mIoU_unseen": unseen_miou, "hIoU": h}
