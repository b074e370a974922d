"""The compiled inference forward (dcp_jax/forward.py): two stages, slot buckets, the zero-shot baseline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dcp_jax import forward, inference
from dcp_jax.configs import tiny
from dcp_jax.models import selection
from test_inference import GEOM, torch_resize
from test_model_dcp import images, make_model, small_config, unit_text

TINY_CLIP = tiny.TINY_CLIP


def test_slot_buckets():
    assert [forward.slot_bucket(n, 64) for n in (0, 1, 4, 5, 8, 9, 33, 64, 200)] == [4, 4, 4, 8, 8, 16, 64, 64, 64]
    assert forward.slot_bucket(30, 20) == 20 and forward.slot_bucket(2, 3) == 3
    assert forward.bucket_cap(64, 20) == 20 and forward.bucket_cap(0, 847) == 847 and forward.bucket_cap(64, 847) == 64


@pytest.fixture(scope="module")
def model():
    return make_model(small_config(**{"model.dcs.theta": 0.05}))


def test_the_bucket_decodes_what_all_classes_would_restricted_to_the_selected(model):
    """Stage 2 on the smallest bucket gives the logits and labels of the head run on all C classes with
    only the selected ones valid: padding slots change nothing."""
    num_classes, views_per_image = 12, 2
    text = jnp.asarray(unit_text(num_classes, 1, 16, seed=30))
    bar = selection.mean_text_embedding(text)
    seen = jnp.asarray(np.arange(num_classes) % 2 == 0)
    views = jnp.asarray(images(4, seed=31))  # 2 images x 2 views
    graphdef, params = nnx.split(model)
    features, ranked = forward.encode_select(graphdef, params, views, text, views_per_image=views_per_image,
                                             max_slots=num_classes)
    selected = int(np.max(ranked["dcs_selected"]))
    k = forward.slot_bucket(selected, num_classes)
    assert 0 < selected < k < num_classes  # a real bucket, with padding slots
    small = forward.decode(graphdef, params, features, text, bar, ranked["slot_class"], ranked["slot_valid"], seen,
                           views_per_image=views_per_image, num_slots=k)
    full = forward.decode(graphdef, params, features, text, bar, ranked["slot_class"], ranked["slot_valid"], seen,
                          views_per_image=views_per_image, num_slots=num_classes)
    valid = np.asarray(small["slot_valid"])
    assert (~valid).any()  # the bucket holds padding slots for at least one image
    np.testing.assert_allclose(np.asarray(small["logits"])[valid], np.asarray(full["logits"])[:, :k][valid],
                               rtol=1e-5, atol=1e-5)
    # Every view of an image decodes the same candidates: the union of its views' selections.
    np.testing.assert_array_equal(np.asarray(small["slot_valid"])[::2], np.asarray(small["slot_valid"])[1::2])
    for out in (small, full):
        out["labels"] = np.asarray(inference.combine_views(
            np.asarray(out["logits"]).reshape(2, views_per_image, *out["logits"].shape[1:])[:, :1],
            np.asarray(out["slot_class"]).reshape(2, views_per_image, -1)[:, :1],
            np.asarray(out["slot_valid"]).reshape(2, views_per_image, -1)[:, :1], mode="whole", out_hw=(64, 64)))
    np.testing.assert_array_equal(small["labels"], full["labels"])


def test_one_compilation_per_bucket(model):
    num_classes = 12
    text = jnp.asarray(unit_text(num_classes, 1, 16, seed=32))
    bar = selection.mean_text_embedding(text)
    seen = jnp.ones(num_classes, bool)
    graphdef, params = nnx.split(model)
    features, ranked = forward.encode_select(graphdef, params, jnp.asarray(images(2, seed=33)), text,
                                             views_per_image=1, max_slots=num_classes)
    before = forward.decode._cache_size()
    for k in (4, 8, 4, 8, 8, 4):
        forward.decode(graphdef, params, features, text, bar, ranked["slot_class"], ranked["slot_valid"], seen,
                       views_per_image=1, num_slots=k)
    assert forward.decode._cache_size() - before == 2
    # A second model object of the same structure reuses the programs (the graph is a static argument).
    graphdef2, params2 = nnx.split(make_model(small_config(**{"model.dcs.theta": 0.05}), seed=1))
    assert graphdef2 == graphdef
    forward.decode(graphdef2, params2, features, text, bar, ranked["slot_class"], ranked["slot_valid"], seen,
                   views_per_image=1, num_slots=8)
    assert forward.decode._cache_size() - before == 2


def test_head_flops_follow_the_bucket(model):
    num_classes = 64
    text = jnp.asarray(unit_text(num_classes, 1, 16, seed=34))
    graphdef, params = nnx.split(model)
    features, ranked = forward.encode_select(graphdef, params, jnp.asarray(images(1, seed=35)), text,
                                             views_per_image=1, max_slots=num_classes)

    def flops(k):
        lowered = forward.decode.lower(graphdef, params, features, text, selection.mean_text_embedding(text),
                                       ranked["slot_class"], ranked["slot_valid"], jnp.ones(num_classes, bool),
                                       views_per_image=1, num_slots=k)
        return lowered.compile().cost_analysis()["flops"]

    assert flops(8) < 0.25 * flops(64)  # 8x fewer slots: the head's cost is per slot


def test_zero_shot_matches_dense_clip_similarity(tmp_path):
    from dcp_jax.models.clip import load_clip, normalize_pixels
    from dcp_jax.models.build import write_tiny_clip

    write_tiny_clip(tmp_path, TINY_CLIP)
    model, config = load_clip(tmp_path)
    rng = np.random.default_rng(8)
    num_classes, size = 6, config.vision.image_size
    text = rng.standard_normal((num_classes, 3, config.projection_dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    views = rng.uniform(0, 255, (2, 24, 24, 3)).astype(np.float32)
    graphdef, params = nnx.split(model)

    # Reference: torch resize + CLIP normalisation, then numpy cosine / log-softmax on the model's dense features.
    pixels = torch_resize(torch.from_numpy(views).permute(0, 3, 1, 2), (size, size)).permute(0, 2, 3, 1).numpy()
    with jax.default_matmul_precision("highest"):
        dense = nnx.jit(lambda m, x: m.encode_image(x)[1]["dense"])(model, normalize_pixels(pixels))
        dense = np.asarray(dense, np.float64)
        out = forward.zero_shot(graphdef, params, views, text, num_slots=4)
        everything = forward.zero_shot(graphdef, params, views, text, num_slots=0)
    dense /= np.linalg.norm(dense, axis=-1, keepdims=True)
    text_bar = text.mean(axis=1)
    text_bar /= np.linalg.norm(text_bar, axis=-1, keepdims=True)
    z = np.exp(float(model.logit_scale[...])) * np.einsum("nhwd,cd->nchw", dense, text_bar)
    log_p = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
    top = np.argsort(-log_p.max(axis=(2, 3)), axis=1, kind="stable")[:, :4]

    np.testing.assert_array_equal(np.asarray(out["slot_class"]), top)
    assert np.asarray(out["slot_valid"]).all()
    np.testing.assert_allclose(np.asarray(out["logits"]), np.take_along_axis(log_p, top[:, :, None, None], 1),
                               atol=1e-4)  # float32 vs float64 through a 4-layer CLIP
    assert everything["logits"].shape == (2, num_classes, 8, 8)
    np.testing.assert_array_equal(np.sort(np.asarray(everything["slot_class"]), axis=1),
                                  np.tile(np.arange(num_classes), (2, 1)))
    labels = inference.predict_labels(lambda v: forward.zero_shot(graphdef, params, v, text, num_slots=3),
                                      rng.integers(0, 256, (30, 45, 3), dtype=np.uint8), mode="slide", **GEOM)
    assert labels.shape == (30, 45) and labels.min() >= 0 and labels.max() < num_classes
