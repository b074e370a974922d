"""Dynamic Category Selection (MODEL.md section 2) against a plain numpy/Python reading of the spec."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcp_jax.models import selection


def _normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def dcs_reference(cls, dense, text, logit_scale, theta, num_slots, gt=None):
    """MODEL.md section 2 literally, one image at a time, with Python sets (float64)."""
    s = np.exp(logit_scale)
    text_bar = _normalize(text.mean(axis=1))
    num_classes = text.shape[0]
    k = num_classes if num_slots == 0 or num_slots >= num_classes else num_slots
    slot_class, slot_valid, selected_counts = [], [], []
    for b in range(cls.shape[0]):
        p_img = _softmax(s * _normalize(cls[b]) @ text_bar.T)
        p_patch = _softmax(s * _normalize(dense[b]) @ text_bar.T)
        q_patch = p_patch * (1 - p_img)[None, :]
        winners = [int(np.argmax(q_patch[n])) for n in range(q_patch.shape[0])]
        c_patch = set(winners)
        c_img = set(range(num_classes)) if theta <= 0 else {c for c in range(num_classes) if p_img[c] > theta}
        c_gt = set() if gt is None else {c for c in range(num_classes) if gt[b, c]}
        selected = c_patch | c_img | c_gt

        def priority(c):
            level = 3 if c in c_gt else 2 if c in c_img else 1 if c in c_patch else 0
            return (-level, -winners.count(c), -p_img[c], c)  # overflow: fewest patch votes left out

        order = sorted(range(num_classes), key=priority)[:k]
        slot_class.append(order)
        slot_valid.append([c in selected for c in order])
        selected_counts.append(len(selected))
    return np.array(slot_class), np.array(slot_valid), np.array(selected_counts)


def _random_inputs(seed, b=3, n=20, c=25, p=4, d=12):
    rng = np.random.default_rng(seed)
    cls = rng.standard_normal((b, d))
    dense = rng.standard_normal((b, n, d))
    text = _normalize(rng.standard_normal((c, p, d)))
    return cls, dense, text


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("theta", [0.0, 0.05, 0.5])
@pytest.mark.parametrize("num_slots", [3, 8, 0])
@pytest.mark.parametrize("with_gt", [False, True])
def test_selection_matches_numpy_reference(seed, theta, num_slots, with_gt):
    # Logit scale 10 (not CLIP's 100) keeps float32 softmaxes away from underflow, so the p_img
    # tie-break order is well defined in both float32 and float64.
    logit_scale = np.log(10.0)
    cls, dense, text = _random_inputs(seed)
    gt = np.random.default_rng(seed + 100).random((cls.shape[0], text.shape[0])) < 0.1 if with_gt else None
    want_class, want_valid, want_count = dcs_reference(cls, dense, text, logit_scale, theta, num_slots, gt)
    with jax.default_matmul_precision("highest"):
        out = selection.select_categories(
            jnp.asarray(cls, jnp.float32), jnp.asarray(dense, jnp.float32),
            selection.mean_text_embedding(jnp.asarray(text, jnp.float32)), jnp.float32(logit_scale),
            theta=theta, num_slots=num_slots, gt_present=None if gt is None else jnp.asarray(gt),
        )
    np.testing.assert_array_equal(np.asarray(out["slot_class"]), want_class)
    np.testing.assert_array_equal(np.asarray(out["slot_valid"]), want_valid)
    np.testing.assert_array_equal(np.asarray(out["dcs_selected"]), want_count)
    k = want_class.shape[1]
    np.testing.assert_array_equal(np.asarray(out["dcs_dropped"]), np.maximum(want_count - k, 0))
    assert out["slot_class"].dtype == jnp.int32


def test_selection_actually_drops_and_prunes():
    # Guard against a vacuous reference comparison: the random setting must both leave classes
    # unselected and overflow small K.
    cls, dense, text = _random_inputs(0)
    _, valid, count = dcs_reference(cls, dense, text, np.log(10.0), 0.5, 0)
    assert (~valid).any() and (count > 3).all()


@pytest.mark.parametrize("num_slots", [0, 25, 40])
def test_theta_zero_with_enough_slots_selects_every_class(num_slots):
    # CLIP's real scale 100: many float32 p_img underflow to exactly 0, which must not matter.
    cls, dense, text = _random_inputs(3, d=64)
    out = selection.select_categories(
        jnp.asarray(cls, jnp.float32), jnp.asarray(dense, jnp.float32),
        selection.mean_text_embedding(jnp.asarray(text, jnp.float32)), jnp.float32(np.log(100.0)),
        theta=0.0, num_slots=num_slots,
    )
    assert out["slot_class"].shape == (3, 25)
    assert np.asarray(out["slot_valid"]).all()
    for row in np.asarray(out["slot_class"]):
        np.testing.assert_array_equal(np.sort(row), np.arange(25))
    np.testing.assert_array_equal(np.asarray(out["dcs_selected"]), 25)
    np.testing.assert_array_equal(np.asarray(out["dcs_dropped"]), 0)


def test_gt_classes_take_the_first_slots_even_with_low_scores():
    cls, dense, text = _random_inputs(4)
    p_img = np.asarray(selection.class_scores(
        jnp.asarray(cls, jnp.float32), jnp.asarray(dense, jnp.float32),
        selection.mean_text_embedding(jnp.asarray(text, jnp.float32)), jnp.float32(np.log(10.0)))[0])
    gt = np.zeros_like(p_img, bool)
    lowest = np.argsort(p_img, axis=1)[:, :2]  # the two least likely classes of each image
    np.put_along_axis(gt, lowest, True, axis=1)
    out = selection.select_categories(
        jnp.asarray(cls, jnp.float32), jnp.asarray(dense, jnp.float32),
        selection.mean_text_embedding(jnp.asarray(text, jnp.float32)), jnp.float32(np.log(10.0)),
        theta=0.5, num_slots=2, gt_present=jnp.asarray(gt),
    )
    for b in range(3):
        assert set(np.asarray(out["slot_class"])[b]) == set(lowest[b])
    assert np.asarray(out["slot_valid"]).all()
    assert (np.asarray(out["dcs_dropped"]) == np.asarray(out["dcs_selected"]) - 2).all()


def test_selection_is_jittable_with_static_slots():
    cls, dense, text = _random_inputs(5)
    fn = jax.jit(lambda c, d, t: selection.select_categories(c, d, t, jnp.float32(np.log(10.0)), theta=0.2,
                                                             num_slots=4))
    out = fn(jnp.asarray(cls, jnp.float32), jnp.asarray(dense, jnp.float32),
             selection.mean_text_embedding(jnp.asarray(text, jnp.float32)))
    assert out["slot_class"].shape == (3, 4) and out["slot_valid"].shape == (3, 4)


def test_bad_inputs_are_reported():
    cls, dense, text = _random_inputs(6)
    args = (jnp.asarray(cls, jnp.float32), jnp.asarray(dense, jnp.float32),
            selection.mean_text_embedding(jnp.asarray(text, jnp.float32)), jnp.float32(0.0))
    with pytest.raises(ValueError, match="num_slots"):
        selection.select_categories(*args, theta=0.5, num_slots=-1)
    with pytest.raises(ValueError, match="gt_present"):
        selection.select_categories(*args, theta=0.5, num_slots=2, gt_present=jnp.zeros((3, 7), bool))
