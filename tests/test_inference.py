"""Slide-window / whole-image inference against torch references (CAT-Seg's procedure written with torch ops)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dcp_jax import inference

# Small CAT-Seg geometry with the real ratios: canvas 640 / crop 384 / stride 256 scaled by 1/16.
GEOM = dict(crop=24, stride=16, canvas=40)


def torch_resize(x, size):
    """torch bilinear, align_corners=False, no antialias: the semantics everything here must match."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def dense_view_probs(logits, slot_class, slot_valid, num_classes, size):
    """CAT-Seg view scores from slots: dense [V,C,h,w] logits (max over duplicate slots), upsampled to `size`,
    sigmoided; classes absent from a view score 0. Returns a torch [V,C,size,size] tensor (float64)."""
    v, k, h, w = logits.shape
    dense = np.zeros((v, num_classes, h, w))
    present = np.zeros((v, num_classes), bool)
    for i in range(v):
        for j in range(k):
            if slot_valid[i, j]:
                c = slot_class[i, j]
                dense[i, c] = np.maximum(dense[i, c], logits[i, j]) if present[i, c] else logits[i, j]
                present[i, c] = True
    t = torch.from_numpy(dense)
    if size is not None:
        t = torch_resize(t, (size, size))
    return torch.sigmoid(t) * torch.from_numpy(present)[:, :, None, None], present


def catseg_slide_reference(logits, slot_class, slot_valid, num_classes, out_hw, crop, stride, canvas):
    """CAT-Seg inference_sliding_window on one image, verbatim where torch allows (fold/unfold), else with
    explicit crop positions. Returns the [C,H,W] scores (float64)."""
    probs, _ = dense_view_probs(logits, slot_class, slot_valid, num_classes, crop)
    global_out = torch_resize(probs[-1:], (canvas, canvas))
    crops = probs[:-1]
    if (canvas - crop) % stride == 0:
        unfold = torch.nn.Unfold(kernel_size=crop, stride=stride)
        fold = torch.nn.Fold((canvas, canvas), kernel_size=crop, stride=stride)
        out = fold(crops.flatten(1).T) / fold(unfold(torch.ones([1, canvas, canvas], dtype=torch.float64)))
    else:
        positions = inference.crop_positions(canvas, crop, stride)
        acc = torch.zeros((num_classes, canvas, canvas), dtype=torch.float64)
        cnt = torch.zeros((canvas, canvas), dtype=torch.float64)
        i = 0
        for y in positions:
            for x in positions:
                acc[:, y:y + crop, x:x + crop] += crops[i]
                cnt[y:y + crop, x:x + crop] += 1
                i += 1
        out = acc / cnt
    out = (out + global_out[0]) / 2.0
    return torch_resize(out[None], tuple(out_hw))[0].numpy()


def catseg_whole_reference(logits, slot_class, slot_valid, num_classes, out_hw):
    probs, _ = dense_view_probs(logits, slot_class, slot_valid, num_classes, None)
    return torch_resize(probs, tuple(out_hw))[0].numpy()


def random_slots(rng, b, v, k, h, w, num_classes, p_valid=0.7):
    logits = (3 * rng.standard_normal((b, v, k, h, w))).astype(np.float32)
    slot_class = rng.integers(0, num_classes, (b, v, k)).astype(np.int32)  # duplicates within a view happen
    slot_valid = rng.random((b, v, k)) < p_valid
    slot_valid[:, :, 0] = True  # every view has a class, so no pixel is left with only zero scores
    logits[~slot_valid] = np.nan  # invalid slots must not matter whatever they hold
    return logits, slot_class, slot_valid


def assert_labels_match(labels, scores, min_decided=0.95, gap=1e-5):
    """Labels equal the dense argmax wherever the top-2 gap exceeds `gap` (float32 vs float64 ties aside)."""
    top2 = np.sort(scores, axis=0)[-2:]
    decided = (top2[1] - top2[0]) > gap
    assert decided.mean() > min_decided  # the comparison covers almost every pixel
    np.testing.assert_array_equal(labels[decided], scores.argmax(0)[decided])


@pytest.mark.parametrize("size_in,size_out", [(6, 24), (24, 40), (40, 31), (40, 17), (13, 13), (7, 64)])
def test_resize_axis_matches_torch(size_in, size_out):
    x = np.random.default_rng(0).standard_normal((3, size_in, 5)).astype(np.float32)
    got = np.asarray(inference.resize_axis(jnp.asarray(x), inference.bilinear_taps(size_in, size_out), axis=1))
    want = torch_resize(torch.from_numpy(x)[None], (size_out, 5))[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_bilinear_taps_traced_padded_sizes():
    """Traced sizes with padding give the exact-size taps first and zero weights on the padded entries."""
    padded = jax.jit(lambda i, o: inference.bilinear_taps(i, o, out_pad=64))(37, 45)
    exact = inference.bilinear_taps(37, 45)
    for p, e in zip(padded, exact):
        np.testing.assert_array_equal(np.asarray(p)[:45], np.asarray(e))
    assert not np.asarray(padded[2])[45:].any() and not np.asarray(padded[3])[45:].any()
    assert np.asarray(padded[0]).max() < 37 and np.asarray(padded[1]).max() < 37


def test_crop_positions():
    assert inference.crop_positions(640, 384, 256) == (0, 256)  # CAT-Seg: 2x2 crops + global = 5 views
    assert inference.num_views("slide", crop=384, stride=256, canvas=640) == 5
    assert inference.num_views("whole") == 1
    assert inference.crop_positions(700, 384, 256) == (0, 256, 316)  # last crop flush with the border
    assert inference.crop_positions(384, 384, 256) == (0,)
    with pytest.raises(ValueError, match="larger than canvas"):
        inference.crop_positions(300, 384, 256)
    with pytest.raises(ValueError, match="uncovered"):
        inference.crop_positions(640, 100, 200)
    assert inference.bucket_shape((500, 375), 128) == (512, 384)


def test_make_views_matches_torch():
    """Slide views are the canvas crops (torch Unfold) plus the image stretched to the crop; whole: one view."""
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (2, 30, 45, 3)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        views = np.asarray(inference.make_views(images, mode="slide", **GEOM))
        whole = np.asarray(inference.make_views(images, mode="whole", **GEOM))
    t = torch.from_numpy(images).permute(0, 3, 1, 2)
    canvas = torch_resize(t, (40, 40))
    unfold = torch.nn.Unfold(kernel_size=24, stride=16)
    crops = unfold(canvas).reshape(2, 3, 24, 24, 4).permute(0, 4, 2, 3, 1)  # [B,L,crop,crop,3]
    glob = torch_resize(t, (24, 24)).permute(0, 2, 3, 1)[:, None]
    want = torch.cat([crops, glob], dim=1).reshape(10, 24, 24, 3).numpy()
    assert views.shape == (10, 24, 24, 3)
    np.testing.assert_allclose(views, want, atol=1e-3)  # values are 0..255
    assert whole.shape == (2, 24, 24, 3)
    np.testing.assert_allclose(whole, glob[:, 0].numpy(), atol=1e-3)


def test_make_views_padded_batch_equals_individual_images():
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 255, (30, 45, 3)).astype(np.float32)
    b = rng.uniform(0, 255, (41, 22, 3)).astype(np.float32)
    batch = np.zeros((2, 48, 48, 3), np.float32)
    batch[0, :30, :45], batch[1, :41, :22] = a, b
    batch[0, 30:], batch[1, :, 22:] = 999.0, 999.0  # padding content must not leak in
    padded = np.asarray(inference.make_views(batch, image_hw=np.array([[30, 45], [41, 22]]), **GEOM))
    singles = np.concatenate([np.asarray(inference.make_views(x, **GEOM)) for x in (a, b)])
    np.testing.assert_allclose(padded, singles, atol=1e-3)


@pytest.mark.parametrize("geom", [GEOM, dict(crop=24, stride=12, canvas=50)], ids=["catseg_ratios", "uneven"])
def test_slide_combination_matches_catseg_reference(geom):
    rng = np.random.default_rng(3)
    num_classes, k, h = 9, 4, 6
    v = inference.num_views("slide", **geom)
    logits, slot_class, slot_valid = random_slots(rng, 2, v, k, h, h, num_classes)
    out_hw = (33, 52)
    labels = np.asarray(inference.combine_views(logits, slot_class, slot_valid, mode="slide", out_hw=out_hw,
                                                chunk=3, **geom))
    assert labels.shape == (2, *out_hw) and labels.dtype == np.int32
    for i in range(2):
        scores = catseg_slide_reference(logits[i], slot_class[i], slot_valid[i], num_classes, out_hw, **geom)
        assert_labels_match(labels[i], scores)


def test_whole_mode_matches_reference():
    rng = np.random.default_rng(4)
    num_classes = 7
    logits, slot_class, slot_valid = random_slots(rng, 2, 1, 5, 6, 6, num_classes)
    out_hw = (29, 17)
    labels = np.asarray(inference.combine_views(logits, slot_class, slot_valid, mode="whole", out_hw=out_hw,
                                                chunk=2, **GEOM))
    for i in range(2):
        scores = catseg_whole_reference(logits[i], slot_class[i], slot_valid[i], num_classes, out_hw)
        assert_labels_match(labels[i], scores)


def test_combination_invariant_to_chunk_and_bucket():
    """Chunk size, slot order and a padded (bucketed, traced) output shape leave the labels unchanged."""
    rng = np.random.default_rng(5)
    logits, slot_class, slot_valid = random_slots(rng, 2, 5, 6, 6, 6, 50)
    kwargs = dict(mode="slide", **GEOM)
    ref = np.asarray(inference.combine_views(logits, slot_class, slot_valid, out_hw=(37, 26), chunk=64, **kwargs))
    got = inference.combine_views(logits, slot_class, slot_valid, out_hw=(37, 26), chunk=3, **kwargs)
    np.testing.assert_array_equal(np.asarray(got), ref)
    perm = rng.permutation(6)
    got = inference.combine_views(logits[:, :, perm], slot_class[:, :, perm], slot_valid[:, :, perm],
                                  out_hw=(37, 26), chunk=3, **kwargs)
    np.testing.assert_array_equal(np.asarray(got), ref)

    bucket = inference.bucket_shape((37, 26), 64)
    got = np.asarray(inference.combine_views(logits, slot_class, slot_valid, out_hw=jnp.array([[37, 26]] * 2),
                                                 out_shape=bucket, **kwargs))
    assert got.shape == (2, 64, 64)
    np.testing.assert_array_equal(got[:, :37, :26], ref)
    assert (got[:, 37:] == -1).all() and (got[:, :, 26:] == -1).all()

    # Per-image sizes in one padded batch, one compiled program.
    sizes = jnp.array([[37, 26], [20, 45]])
    got = np.asarray(inference.combine_views(logits, slot_class, slot_valid, out_hw=sizes, out_shape=bucket,
                                                 **kwargs))
    other = np.asarray(inference.combine_views(logits, slot_class, slot_valid, out_hw=(20, 45), **kwargs))
    np.testing.assert_array_equal(got[1, :20, :45], other[1])


def test_predictions_only_from_valid_slots():
    rng = np.random.default_rng(6)
    logits, slot_class, slot_valid = random_slots(rng, 2, 5, 6, 6, 6, 1000)  # shapes as above: no recompile
    kwargs = dict(mode="slide", out_hw=(37, 26), chunk=3, **GEOM)
    labels = np.asarray(inference.combine_views(logits, slot_class, slot_valid, **kwargs))
    for i in range(2):
        assert set(np.unique(labels[i])) <= set(slot_class[i][slot_valid[i]].tolist())
    # No valid slot at all: label 0 everywhere (documented fallback).
    slot_valid[1] = False
    labels = np.asarray(inference.combine_views(logits, slot_class, slot_valid, **kwargs))
    assert (labels[1] == 0).all() and set(np.unique(labels[0])) <= set(slot_class[0][slot_valid[0]].tolist())


def test_combine_views_errors():
    logits = np.zeros((1, 4, 2, 6, 6), np.float32)
    slots = np.zeros((1, 4, 2), np.int32)
    with pytest.raises(ValueError, match="makes 5"):
        inference.combine_views(logits, slots, slots > 0, out_hw=(8, 8), **GEOM)
    with pytest.raises(ValueError, match=r"\[B,V,K\]"):
        inference.combine_views(logits, slots[:, :, :1], slots > 0, out_hw=(8, 8), mode="slide", **GEOM)
    with pytest.raises(ValueError, match="mode="):
        inference.combine_views(logits, slots, slots > 0, out_hw=(8, 8), mode="tiles", **GEOM)
    traced_size = jax.jit(lambda hw: inference.combine_views(np.zeros((1, 1, 2, 6, 6)), slots[:, :1], slots[:, :1] > 0,
                                                             mode="whole", out_hw=hw, **GEOM))
    with pytest.raises(ValueError, match="out_shape"):
        traced_size(jnp.array([8, 8]))


def test_predict_labels_chains_views_forward_combine():
    """predict_labels == make_views -> forward -> combine_views, with a fake forward that reads the views."""
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)
    num_classes = 3

    def forward(views):  # per-slot logit = mean colour channel c of a 4x4-pooled view, minus 128
        n, s = views.shape[0], views.shape[1]
        pooled = views.reshape(n, s // 4, 4, s // 4, 4, 3).mean(axis=(2, 4))
        logits = (jnp.transpose(pooled, (0, 3, 1, 2)) - 128.0) / 16.0
        slot_class = jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32), (n, num_classes))
        return dict(logits=logits, slot_class=slot_class, slot_valid=jnp.ones((n, num_classes), bool))

    for mode in ("slide", "whole"):
        got = inference.predict_labels(forward, image, mode=mode, out_hw=(60, 90), **GEOM)
        views = inference.make_views(image[None].astype(np.float32), mode=mode, **GEOM)
        out = forward(views)
        v = inference.num_views(mode, **GEOM)
        want = inference.combine_views(out["logits"][None], out["slot_class"][None], out["slot_valid"][None],
                                       mode=mode, out_hw=(60, 90), **GEOM)
        assert got.shape == (60, 90)
        np.testing.assert_array_equal(got, np.asarray(want)[0])
        assert v == views.shape[0]
    batch = inference.predict_labels(forward, np.stack([image, image]), mode="slide", **GEOM)
    assert len(batch) == 2 and batch[0].shape == (30, 45)
    np.testing.assert_array_equal(batch[0], batch[1])

    with pytest.raises(ValueError, match="missing"):
        inference.predict_labels(lambda v: {"logits": v}, image, **GEOM)
