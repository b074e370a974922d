"""Confusion matrix and mIoU: hand-worked examples, detectron2's SemSegEvaluator formulas, device == host."""

import jax.numpy as jnp
import numpy as np
import pytest

from dcp_jax import metrics


def detectron2_sem_seg_eval(preds, gts, num_classes, ignore=255):
    """detectron2 SemSegEvaluator (current version) transcribed: conf[pred, gt] with an extra ignore bin."""
    conf = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    for pred, gt in zip(preds, gts):
        gt = gt.copy()
        gt[gt == ignore] = num_classes
        conf += np.bincount((num_classes + 1) * pred.reshape(-1) + gt.reshape(-1),
                            minlength=conf.size).reshape(conf.shape)
    acc = np.full(num_classes, np.nan)
    iou = np.full(num_classes, np.nan)
    tp = conf.diagonal()[:-1].astype(float)
    pos_gt = np.sum(conf[:-1, :-1], axis=0).astype(float)
    class_weights = pos_gt / np.sum(pos_gt)
    pos_pred = np.sum(conf[:-1, :-1], axis=1).astype(float)
    acc_valid = pos_gt > 0
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    union = pos_gt + pos_pred - tp
    iou_valid = np.logical_and(acc_valid, union > 0)
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    return dict(mIoU=100 * np.sum(iou[iou_valid]) / np.sum(iou_valid),
                fwIoU=100 * np.sum(iou[iou_valid] * class_weights[iou_valid]),
                mean_acc=100 * np.sum(acc[acc_valid]) / np.sum(acc_valid),
                pixel_acc=100 * np.sum(tp) / np.sum(pos_gt), iou=100 * iou)


def test_hand_worked_confusion_matrix():
    # class 3 is predicted but has no ground truth; the pixel labelled -1 (predicted 2) counts nowhere.
    pred = np.array([[0, 1, 1], [3, 2, 2]])
    label = np.array([[0, 0, 1], [1, -1, 2]])
    cm = metrics.ConfusionMatrix(4).update(pred, label)
    want = np.zeros((4, 4), np.int64)
    want[0, 0] = want[0, 1] = want[1, 1] = want[1, 3] = want[2, 2] = 1
    np.testing.assert_array_equal(cm.counts, want)
    m = metrics.compute_metrics(cm.counts)
    # IoU: class 0 = 1/2 (tp 1, gt 2, pred 1); class 1 = 1/3 (tp 1, gt 2, pred 2); class 2 = 1; class 3 excluded.
    assert m["per_class_iou"][:3] == pytest.approx([50.0, 100 / 3, 100.0])
    assert m["per_class_iou"][3] is None and m["per_class_acc"][3] is None
    assert m["mIoU"] == pytest.approx(100 * (1 / 2 + 1 / 3 + 1) / 3)
    assert m["pixel_acc"] == pytest.approx(100 * 3 / 5)
    assert m["mean_acc"] == pytest.approx(100 * (1 / 2 + 1 / 2 + 1) / 3)
    assert m["fwIoU"] == pytest.approx(100 * (2 / 5 * 1 / 2 + 2 / 5 * 1 / 3 + 1 / 5 * 1))
    assert m["num_labelled_pixels"] == 5


def test_detectron2_keys_on_a_hand_worked_matrix():
    """detectron2's keys (mIoU, fwIoU, IoU-<class>, mACC, pACC, ACC-<class>) from a confusion matrix worked by hand.

    counts[gt, pred]:     sky road car boat    gt pixels  tp  pred pixels  union       IoU          ACC
      sky                  6    2   0   0          8       6      7        8+7-6 = 9  6/9 = 2/3    6/8 = 3/4
      road                 1    3   0   2          6       3      6        6+6-3 = 9  3/9 = 1/3    3/6 = 1/2
      car                  0    1   4   0          5       4      4        5+4-4 = 5  4/5          4/5
      boat                 0    0   0   0          0       0      2        -          (no GT)      (no GT)
    boat is predicted but has no ground truth: detectron2 leaves it out of every mean (IoU and ACC NaN, here
    None). mIoU = (2/3 + 1/3 + 4/5) / 3 = 60 %; counting boat as an IoU of 0 would give 45 %.
    fwIoU = (8 * 2/3 + 6 * 1/3 + 5 * 4/5) / 19 = (34/3) / 19 = 34/57 = 59.649 %.
    mACC = (3/4 + 1/2 + 4/5) / 3 = 2.05 / 3 = 68.333 %; pACC = (6 + 3 + 4) / 19 = 13/19 = 68.421 %.
    """
    counts = np.array([[6, 2, 0, 0], [1, 3, 0, 2], [0, 1, 4, 0], [0, 0, 0, 0]])
    names = ["sky", "road", "car", "boat"]
    m = metrics.compute_metrics(counts, names)
    assert m["mIoU"] == pytest.approx(60.0)
    assert m["fwIoU"] == pytest.approx(100 * 34 / 57)  # 59.649
    assert m["mACC"] == pytest.approx(100 * 2.05 / 3)  # 68.333
    assert m["pACC"] == pytest.approx(100 * 13 / 19)  # 68.421
    assert [m[f"IoU-{n}"] for n in names[:3]] == pytest.approx([100 * 2 / 3, 100 / 3, 80.0])
    assert [m[f"ACC-{n}"] for n in names[:3]] == pytest.approx([75.0, 50.0, 80.0])
    assert m["IoU-boat"] is None and m["ACC-boat"] is None
    # detectron2's order; the project's own keys follow, equal where they mean the same thing.
    assert list(m)[:2 * len(names) + 4] == (["mIoU", "fwIoU"] + [f"IoU-{n}" for n in names] + ["mACC", "pACC"]
                                            + [f"ACC-{n}" for n in names])
    assert (m["pixel_acc"], m["mean_acc"]) == (m["pACC"], m["mACC"])
    assert m["per_class_iou"] == [m[f"IoU-{n}"] for n in names]
    assert m["per_class_acc"] == [m[f"ACC-{n}"] for n in names]
    assert not any(k.startswith(("IoU-", "ACC-")) for k in metrics.compute_metrics(counts))  # names not given
    with pytest.raises(ValueError, match="3 class names for a 4-class"):
        metrics.compute_metrics(counts, names[:3])
    with pytest.raises(ValueError, match=r"keys would collide: \['sky'\]"):
        metrics.compute_metrics(counts, ["sky", "road", "sky", "boat"])


def test_voc20b_background_mapping():
    """VOC-20b: vocabulary ids >= 20 (here >= 2 of a 5-class vocabulary) are predictions of "background"."""
    table = metrics.background_mapping(5, 2)
    np.testing.assert_array_equal(table, [0, 1, 2, 2, 2])
    pred_vocab = np.array([0, 3, 1, 4, 2, 0])
    label = np.array([0, 0, 1, 2, 2, 2])
    mapped = metrics.map_predictions(pred_vocab, table)
    np.testing.assert_array_equal(mapped, [0, 2, 1, 2, 2, 0])
    np.testing.assert_array_equal(np.asarray(metrics.map_predictions(jnp.asarray(pred_vocab), table)), mapped)
    m = metrics.compute_metrics(metrics.ConfusionMatrix(3).update(mapped, label).counts)
    # IoU: class 0 = 1/3 (tp 1, gt 2, pred 2), class 1 = 1, background = 2/4.
    assert m["mIoU"] == pytest.approx(100 * (1 / 3 + 1 + 1 / 2) / 3)
    with pytest.raises(ValueError, match="outside"):  # unmapped vocabulary ids are not dataset labels
        metrics.ConfusionMatrix(3).update(pred_vocab, label)
    with pytest.raises(ValueError, match="pred_to_label has 5"):
        metrics.map_predictions(np.array([5]), table)


def test_matches_detectron2_evaluator_on_random_data():
    rng = np.random.default_rng(0)
    n = 6
    preds = [rng.integers(0, n, (7, 9)) for _ in range(4)]
    gts = [rng.choice([0, 1, 2, 4, 255], (7, 9)) for _ in range(4)]  # classes 3 and 5 never in the GT
    ref = detectron2_sem_seg_eval(preds, gts, n)
    cm = metrics.ConfusionMatrix(n)
    for p, g in zip(preds, gts):
        cm.update(p, np.where(g == 255, -1, g))
    m = metrics.compute_metrics(cm.counts, [f"c{i}" for i in range(n)])
    for key in ("mIoU", "fwIoU", "mean_acc", "pixel_acc"):
        assert m[key] == pytest.approx(ref[key], abs=1e-9)
    assert (m["mACC"], m["pACC"]) == pytest.approx((ref["mean_acc"], ref["pixel_acc"]), abs=1e-9)
    got_iou = np.array([np.nan if v is None else v for v in m["per_class_iou"]])
    np.testing.assert_allclose(got_iou, ref["iou"])  # NaN (None) exactly for the classes without GT
    got_iou = np.array([np.nan if m[f"IoU-c{i}"] is None else m[f"IoU-c{i}"] for i in range(n)])
    np.testing.assert_allclose(got_iou, ref["iou"])


def test_streaming_merge_and_device_update_agree():
    rng = np.random.default_rng(1)
    n = 5
    pred = rng.integers(0, n, (3, 11, 13))
    label = rng.integers(-1, n, (3, 11, 13))
    whole = metrics.ConfusionMatrix(n).update(pred, label)
    first = metrics.ConfusionMatrix(n).update(pred[0], label[0])
    rest = metrics.ConfusionMatrix(n).update(pred[1:], label[1:])
    np.testing.assert_array_equal(first.merge(rest).counts, whole.counts)

    device = jnp.zeros((n, n), jnp.int32)
    for i in range(3):
        device = metrics.confusion_update(device, jnp.asarray(pred[i]), jnp.asarray(label[i]))
    np.testing.assert_array_equal(np.asarray(device), whole.counts)
    host = metrics.ConfusionMatrix(n).add_counts(device)
    assert host.counts.dtype == np.int64 and host.counts.sum() == (label >= 0).sum()


def test_errors_name_the_problem():
    cm = metrics.ConfusionMatrix(3)
    with pytest.raises(ValueError, match="ignore value"):
        cm.update(np.zeros((2, 2), int), np.full((2, 2), 255))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="integer"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="no labelled pixels"):
        metrics.compute_metrics(cm.update(np.zeros((2, 2), int), np.full((2, 2), -1)).counts)


def test_seen_unseen_and_harmonic_mean_by_hand():
    # Classes 0..3; 2 and 3 unseen; class 1 has no ground truth (None) and counts in neither mean.
    per_class_iou = [60.0, None, 20.0, 40.0]
    unseen = [False, False, True, True]
    r = metrics.seen_unseen(per_class_iou, unseen)
    assert r["mIoU_seen"] == pytest.approx(60.0)
    assert r["mIoU_unseen"] == pytest.approx(30.0)
    assert r["hIoU"] == pytest.approx(2 * 60 * 30 / 90)  # 40.0
    assert metrics.seen_unseen([10.0, None], [False, True]) == {"mIoU_seen": 10.0, "mIoU_unseen": None, "hIoU": None}
    assert metrics.seen_unseen([0.0, 0.0], [False, True])["hIoU"] == 0.0
    with pytest.raises(ValueError, match="unseen mask"):
        metrics.seen_unseen([1.0], [True, False])
