"""A vocabulary padded to a fixed size (Segmenter(pad_classes=True), what the serve page uses so that a new class
count compiles nothing) gives exactly the labels of the unpadded vocabulary, and a padding class is never
selected, ranked or labelled."""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dcp_jax import runtime
from dcp_jax.models import selection
from dcp_jax.segmenter import CLASS_PADS, Segmenter, padded_count
from test_evaluate import VAL_STEMS, dataset_classes, trained_run


def test_padded_count():
    assert [padded_count(n) for n in (1, 16, 17, 64, 65, 847, 1000, 1024, 1500)] == [
        16, 16, 64, 64, 256, 1024, 1024, 1024, 1500]
    assert CLASS_PADS == tuple(sorted(CLASS_PADS))


def test_padding_rows_get_probability_zero_and_are_never_selected():
    rng = np.random.default_rng(0)
    cls, dense = rng.normal(size=(2, 8)), rng.normal(size=(2, 5, 8))
    text = rng.normal(size=(6, 8))
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    padded = np.concatenate([text, np.zeros((10, 8))])  # zero rows: cos 0, which would take probability mass
    valid = np.arange(16) < 6
    for theta in (0.0, 0.3):  # theta 0 selects every class: every real one, no padding row
        level, p_img, votes = selection.selection_levels(cls, dense, text, jnp.log(10.0), theta=theta)
        plevel, pp_img, pvotes = selection.selection_levels(cls, dense, padded, jnp.log(10.0), theta=theta,
                                                            class_valid=valid)
        np.testing.assert_allclose(pp_img[:, :6], p_img, rtol=1e-6)
        assert (np.asarray(pp_img)[:, 6:] == 0).all() and (np.asarray(plevel)[:, 6:] == 0).all()
        np.testing.assert_array_equal(plevel[:, :6], level)
        np.testing.assert_array_equal(pvotes[:, :6], votes)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def test_a_padded_vocabulary_gives_the_same_labels(run, num_slots=0):
    """num_slots 0 (one slot per class, the demo's): the largest bucket then follows the padded rows."""
    workdir, data_dir = run
    images = [np.asarray(Image.open(data_dir / "images" / "val" / f"{s}.png").convert("RGB")) for s in VAL_STEMS[:2]]
    plain = Segmenter.from_workdir(workdir)
    with plain.config.unlocked():
        plain.config.eval.num_slots = num_slots
    padded = Segmenter(plain.model(), plain.config, plain.tokenizer, train_classes=plain.train_classes,
                       pad_classes=True)
    names = dataset_classes(data_dir)
    for vocabulary in (names, names[3:8][::-1]):
        plain.set_vocabulary(vocabulary)
        padded.set_vocabulary(vocabulary)
        assert padded.num_rows == padded_count(len(vocabulary)) > len(vocabulary)
        assert padded.text_embeddings.shape == plain.text_embeddings.shape
        for image in images:
            want = plain.segment_details(image)
            got = padded.segment_details(image)
            np.testing.assert_array_equal(got["labels"], want["labels"])
            np.testing.assert_array_equal(got["before_tv"], want["before_tv"])
            assert got["selected"] == want["selected"] and got["relabels"] == want["relabels"]
            assert got["labels"].max() < len(vocabulary) and max(got["selected"]) < len(vocabulary)
            assert got["top_classes"].max() < len(vocabulary)


def test_a_new_class_count_within_a_padded_size_compiles_nothing(run):
    workdir, data_dir = run
    image = np.asarray(Image.open(data_dir / "images" / "val" / f"{VAL_STEMS[0]}.png").convert("RGB"))
    names = dataset_classes(data_dir)
    compiled = {}
    for pad in (True, False):
        loaded = Segmenter.from_workdir(workdir, pad_classes=pad)
        model = loaded.model()
        model.theta = 0.0  # every class selected: K is the largest bucket whatever the count
        segmenter = Segmenter(model, loaded.config, loaded.tokenizer, pad_classes=pad,
                              train_classes=loaded.train_classes)
        segmenter.set_vocabulary(names[:20])
        segmenter.segment_details(image)  # compiles what 17..64 classes share
        compiled[pad] = 0
        for count in (17, 23, len(names)):
            segmenter.set_vocabulary(names[:count])  # the text encoder may compile (a new prompt count, uncached)
            before = runtime.compile_stats()["compiles"]
            assert segmenter.segment_details(image)["labels"].max() < count
            compiled[pad] += runtime.compile_stats()["compiles"] - before
    assert compiled[True] == 0 and compiled[False] > 0, compiled  # unpadded, each count compiles again
