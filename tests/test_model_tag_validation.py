"""Tag Validation (MODEL.md section 5) on a hand-made case, and the seen-class mask."""

import jax.numpy as jnp
import numpy as np
import pytest

from dcp_jax import text as text_lib
from dcp_jax.models.tag_validation import validate_label_map, validate_tags, winning_regions

E0, E1, E2 = np.eye(3)
E3 = (E0 + E1) / np.sqrt(2)
TEXT_BAR = np.stack([E0, E1, E2, E3])  # 4 classes in a 3-d joint space


def hand_made_case():
    """2x2 patch grid, 4x4 logits, 5 slots.

    slot 0: class 0 (seen), wins the top-left cell whose feature is E2 (a mismatch, but seen classes are kept);
    slot 1: class 1 (unseen), wins the top-right cell, feature mostly E2 with some E1: class 1 ranks 2nd;
    slot 2: class 3 (unseen), wins the bottom row (features E0 and E1, pooled -> E3): class 3 ranks 1st;
    slot 3: class 1 (unseen), valid but wins no pixel;
    slot 4: class 1 (unseen), invalid, with the largest logits everywhere (must be ignored).
    """
    winner = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]])
    logits = np.where(np.arange(5)[:, None, None] == winner[None], 5.0, -5.0)
    logits[3] = -1.0  # below the winners, above the losers: still wins nothing
    logits[4] = 50.0
    dense = np.zeros((2, 2, 3))
    dense[0, 0] = E2
    dense[0, 1] = 0.9 * E2 + 0.3 * E1
    dense[1, 0] = 2.0 * E0  # scale must not matter (features are normalised per patch)
    dense[1, 1] = E1
    slot_class = np.array([0, 1, 3, 1, 1])
    slot_valid = np.array([True, True, True, True, False])
    seen = np.array([True, False, False, False])
    return (jnp.asarray(logits[None], jnp.float32), jnp.asarray(slot_class[None], jnp.int32),
            jnp.asarray(slot_valid[None]), jnp.asarray(dense[None], jnp.float32),
            jnp.asarray(TEXT_BAR, jnp.float32), jnp.asarray(seen))


def test_relabels_exactly_the_unseen_slot_outside_top_k():
    new_class, relabelled = validate_tags(*hand_made_case(), k=1)
    np.testing.assert_array_equal(np.asarray(new_class)[0], [0, 2, 3, 1, 1])
    np.testing.assert_array_equal(np.asarray(relabelled)[0], [False, True, False, False, False])


def test_top_k_keeps_a_label_ranked_within_k():
    new_class, relabelled = validate_tags(*hand_made_case(), k=2)  # class 1 ranks 2nd for slot 1
    np.testing.assert_array_equal(np.asarray(new_class)[0], [0, 1, 3, 1, 1])
    assert not np.asarray(relabelled).any()


def test_seen_classes_are_left_alone():
    logits, slot_class, slot_valid, dense, text_bar, _ = hand_made_case()
    new_class, relabelled = validate_tags(logits, slot_class, slot_valid, dense, text_bar,
                                          jnp.ones(4, bool), k=1)
    np.testing.assert_array_equal(np.asarray(new_class), np.asarray(slot_class))
    assert not np.asarray(relabelled).any()


def test_winning_regions_are_area_fractions_over_valid_slots():
    logits, _, slot_valid, _, _, _ = hand_made_case()
    weights = np.asarray(winning_regions(logits, slot_valid, 2))[0]  # [2,2,K]
    np.testing.assert_allclose(weights.sum(-1), 1.0)
    np.testing.assert_allclose(weights[0, 0], [1, 0, 0, 0, 0])
    np.testing.assert_allclose(weights[1, 1], [0, 0, 1, 0, 0])


def test_bad_arguments():
    case = hand_made_case()
    with pytest.raises(ValueError, match="tv.k"):
        validate_tags(*case, k=0)
    with pytest.raises(ValueError, match="seen mask"):
        validate_tags(*case[:5], jnp.ones(3, bool), k=1)
    with pytest.raises(ValueError, match="multiple"):
        winning_regions(case[0][:, :, :3, :3], case[2], 2)


def test_seen_mask_normalises_names_and_synonyms():
    vocabulary = ["Person", " building, edifice", "sky", "tree", "wall-other", "chest of drawers, chest", "car"]
    train = ["person", "building", "Tree, woody plant", "wall-other ", "cars"]
    np.testing.assert_array_equal(
        text_lib.seen_mask(vocabulary, train), [True, True, False, True, True, False, False])
    assert text_lib.seen_mask(vocabulary, train).dtype == np.bool_
    # A full synonym string matches the same full string.
    assert text_lib.seen_mask(["chest of drawers, chest"], ["Chest of drawers, chest"]).all()


# -------------------------------------------------------------------------------- on the final label map
def final_map_case():
    """The combined 4x4 label map of an image over hand_made_case's 2x2 grid of whole-image features:
    class 0 (seen) top-left, class 1 (unseen) top-right on a mostly-E2 cell, class 3 (unseen) the bottom
    row, whose two cells (E0 and E1) pool to E3."""
    _, _, _, dense, text_bar, seen = hand_made_case()
    labels = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [3, 3, 3, 3], [3, 3, 3, 3]])
    slot_class, slot_valid = np.array([[0, 1, 3, 2]]), np.array([[True, True, True, False]])
    return labels, jnp.asarray(slot_class, jnp.int32), jnp.asarray(slot_valid), dense, text_bar, seen


def test_final_map_relabels_an_unseen_region_and_keeps_one_the_whole_image_confirms():
    labels, slot_class, slot_valid, dense, text_bar, seen = final_map_case()
    padded = np.full((1, 5, 6), -1)  # a padded batch: the image is 4x4, the map 5x6
    padded[0, :4, :4] = labels
    new, relabelled = validate_label_map(jnp.asarray(padded), jnp.array([[4, 4]]), slot_class, slot_valid, dense,
                                         text_bar, seen, k=1)
    want = np.full((5, 6), -1)
    want[:4, :4] = [[0, 0, 2, 2], [0, 0, 2, 2], [3, 3, 3, 3], [3, 3, 3, 3]]  # class 1 -> 2 (its cell is E2)
    np.testing.assert_array_equal(np.asarray(new)[0], want)
    np.testing.assert_array_equal(np.asarray(relabelled)[0], [False, True, False, False])


def test_a_view_local_decision_differs_from_the_whole_image_one():
    """A slide view that holds only the bottom-left of the image sees class 3's region on E0 alone, where
    class 0 ranks first: per view, tag validation relabels it; on the final map class 3's whole region
    pools to E3 and the label stands (what Eq. 17 describes: the segmented region, not a view's part)."""
    labels, slot_class, slot_valid, dense, text_bar, seen = final_map_case()
    view_logits = np.where(np.arange(2)[:, None, None] == np.array([[0] * 4] * 2 + [[1] * 4] * 2)[None], 5.0, -5.0)
    view_dense = np.zeros((2, 2, 3))
    view_dense[0] = E2
    view_dense[1] = E0  # the view's bottom row: the image's bottom-left cell stretched
    view_class, view_relabelled = validate_tags(
        jnp.asarray(view_logits[None], jnp.float32), jnp.array([[0, 3]], jnp.int32), jnp.array([[True, True]]),
        jnp.asarray(view_dense[None], jnp.float32), text_bar, seen, k=1)
    assert np.asarray(view_class)[0].tolist() == [0, 0] and np.asarray(view_relabelled)[0].tolist() == [False, True]
    new, relabelled = validate_label_map(jnp.asarray(labels[None]), jnp.array([[4, 4]]), slot_class, slot_valid,
                                         dense, text_bar, seen, k=1)
    assert (np.asarray(new)[0, 2:] == 3).all() and not np.asarray(relabelled)[0, 2]


def test_final_map_cells_follow_the_image_size_and_k():
    labels, slot_class, slot_valid, dense, text_bar, seen = final_map_case()
    wide = np.repeat(labels, 2, axis=1)  # an 4x8 image: pixel x falls in cell x * 2 // 8, as the stretch puts it
    new, _ = validate_label_map(jnp.asarray(wide[None]), jnp.array([[4, 8]]), slot_class, slot_valid, dense,
                                text_bar, seen, k=1)
    np.testing.assert_array_equal(np.asarray(new)[0], np.repeat([[0, 0, 2, 2], [0, 0, 2, 2], [3] * 4, [3] * 4], 2, 1))
    kept, relabelled = validate_label_map(jnp.asarray(labels[None]), jnp.array([[4, 4]]), slot_class, slot_valid,
                                          dense, text_bar, seen, k=2)  # class 1 ranks 2nd: within k = 2
    np.testing.assert_array_equal(np.asarray(kept)[0], labels)
    assert not np.asarray(relabelled).any()
