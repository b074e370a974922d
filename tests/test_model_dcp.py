"""The DCP-CLIP model: geometry, slot masking, equivariance, predict, loss, gradients, ablations, loading.

Models are small (a 2-block CLIP of width 32 on a 64x64 input, 8x8 grid) and get random host-generated
weights (`summary.random_model`), so no test pays for nnx's per-shape init compiles.
"""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dcp_jax import config as config_lib
from dcp_jax.models import dcp, summary
from dcp_jax.models.tiny_clip import tiny_config as tiny_clip_config
from dcp_jax.models.tiny_clip import write_tiny_clip

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL_CLIP = dict(
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=64, patch_size=8),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=600,
              max_position_embeddings=16),
    projection_dim=16,
)


def load_config(name: str, arg=None):
    spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def small_config(**overrides):
    """configs/tiny.py shrunk further; overrides are dotted config keys."""
    c = load_config("tiny")
    c.clip.tiny = SMALL_CLIP
    c.clip.guidance_layers = (0, 1)
    c.model.hidden_dim = 16
    c.model.num_heads = 2
    c.model.decoder.update(dims=(16, 8), attn_dim=8, shallow_dims=(16, 8), shallow_proj_dims=(8, 4),
                           cost_dims=(8, 4), shallow_qk_dim=8, window=4)
    return config_lib.apply_overrides(c, overrides)


def make_model(config, seed=0, logit_scale=np.log(10.0)):
    clip_config = tiny_clip_config(config.clip.tiny.to_dict())
    model = summary.random_model(config, clip_config, seed)
    # A moderate scale keeps the random CLIP's softmaxes from underflowing, so DCS ranks without ties.
    model.clip.logit_scale[...] = jnp.float32(logit_scale)
    return model


def unit_text(num_classes, p, d, seed=0):
    t = np.random.default_rng(seed).standard_normal((num_classes, p, d)).astype(np.float32)
    return t / np.linalg.norm(t, axis=-1, keepdims=True)


def images(b, size=64, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (b, size, size, 3)).astype(np.float32)


# XLA's cheapest CPU backend optimisation: compiles ~2.5x faster; the tests run tiny shapes.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def fast_jit(fn, static_argnames=()):
    """jit for `fn(model, *args)`: the model's graph is static, its state traced."""
    jitted = jax.jit(lambda graphdef, state, *args, **kwargs: fn(nnx.merge(graphdef, state), *args, **kwargs),
                     static_argnums=0, static_argnames=static_argnames, compiler_options=FAST_COMPILE)

    def call(model, *args, **kwargs):
        return jitted(*nnx.split(model), *args, **kwargs)

    return call


def _forward_and_predict(model, imgs, text, num_slots, seen=None):
    """Inference outputs and model.predict in one compiled program (the tests share its compile)."""
    return model(imgs, text, num_slots=num_slots, seen=seen), model.predict(imgs, text, num_slots=num_slots,
                                                                              seen=seen)


forward = fast_jit(_forward_and_predict, static_argnames=("num_slots",))


@pytest.fixture(scope="module")
def model():
    return make_model(small_config())


# ----------------------------------------------------------------------------------------------- geometry
def test_b16_geometry_on_reduced_width_clip():
    """B/16 layout (patch 16, 384 input -> 24x24 grid, window 12, logits 96x96, P = 80) with narrow widths."""
    config = load_config("dcp_vitb16_coco_stuff")
    config.clip.guidance_layers = (0, 1)
    arch = dict(SMALL_CLIP, vision=dict(SMALL_CLIP["vision"], patch_size=16, image_size=384))
    clip_config = tiny_clip_config(arch)
    abstract = summary.abstract_model(config, clip_config)
    b, c, k = 2, 7, 5
    text = jax.ShapeDtypeStruct((c, 80, 16), jnp.float32)

    def run(m, imgs, text):
        feats = m.encode(imgs)
        out = m(imgs, text, num_slots=k, seen=jnp.ones(c, bool))
        slot_text = text[out["slot_class"]]
        cost, corr = m.alignment(feats["dense"], slot_text, jnp.mean(slot_text, 2), out["p_img"][:, :k],
                                 out["slot_valid"])
        return feats, out, cost, corr, m.predict(imgs, text, num_slots=k)

    for size in (384, 512):  # the model resizes other input sizes to clip.image_size
        feats, out, cost, corr, labels = nnx.eval_shape(run, abstract, jax.ShapeDtypeStruct((b, size, size, 3),
                                                                                            jnp.float32), text)
        assert feats["dense"].shape == (b, 24, 24, 16)
        assert [s.shape for s in feats["shallow"]] == [(b, 24, 24, 32)] * 2
        assert feats["attn_last"].shape == (b, 576, 576)
        assert corr.shape == (b, k, 24, 24, 80)
        assert cost.shape == (b, k, 24, 24, 128)
        assert out["logits"].shape == (b, k, 96, 96)
        assert out["slot_class"].shape == (b, k) and out["slot_class"].dtype == jnp.int32
        assert out["slot_valid"].shape == (b, k) and out["slot_valid"].dtype == jnp.bool_
        assert out["dcs_selected"].shape == (b,) and out["dcs_dropped"].shape == (b,)
        assert labels.shape == (b, size, size) and labels.dtype == jnp.int32
    # K = 0 or K >= C: one slot per class.
    for k_all in (0, c, c + 3):
        out = nnx.eval_shape(lambda m, i, t: m(i, t, num_slots=k_all), abstract,
                             jax.ShapeDtypeStruct((b, 384, 384, 3), jnp.float32), text)
        assert out["logits"].shape == (b, c, 96, 96)


def test_config_errors_name_the_key():
    clip_config = tiny_clip_config(SMALL_CLIP)
    with pytest.raises(ValueError, match="decoder.window"):
        summary.abstract_model(small_config(**{"model.decoder.window": 3}), clip_config)
    with pytest.raises(ValueError, match="guidance_layers"):
        summary.abstract_model(small_config(**{"clip.guidance_layers": (0, 5)}), clip_config)
    with pytest.raises(ValueError, match="clip.image_size"):
        summary.abstract_model(small_config(**{"clip.image_size": 128}), clip_config)
    with pytest.raises(ValueError, match="decoder.layers"):
        summary.abstract_model(small_config(**{"model.decoder.layers": 3}), clip_config)
    abstract = summary.abstract_model(small_config(), clip_config)
    with pytest.raises(ValueError, match="templates"):
        nnx.eval_shape(lambda m: m(jnp.zeros((1, 64, 64, 3)), jnp.zeros((4, 3, 16)), num_slots=2), abstract)


# ----------------------------------------------------------------------------------------------- slots
def test_invalid_slots_filled_with_garbage_change_no_valid_output(model):
    rng = np.random.default_rng(1)
    imgs = images(2)
    feats = fast_jit(lambda m, x: m.encode(x))(model, imgs)
    b, k, p, d = 2, 5, 1, 16
    slot_text = unit_text(b * k, p, d, seed=2).reshape(b, k, p, d)
    slot_bar = slot_text.mean(2) / np.linalg.norm(slot_text.mean(2), axis=-1, keepdims=True)
    slot_logit = rng.normal(0, 3, (b, k)).astype(np.float32)
    valid = np.array([[True, False, True, False, False], [False, True, True, True, False]])
    decode = fast_jit(lambda m, f, t, tb, lg, v: m.decode_slots(f, t, tb, lg, v))
    clean = np.asarray(decode(model, feats, slot_text, slot_bar, slot_logit, valid))

    garbage = ~valid
    for fill in (lambda shape: rng.normal(0, 1e3, shape), lambda shape: np.full(shape, np.nan)):
        t2, tb2, lg2 = slot_text.copy(), slot_bar.copy(), slot_logit.copy()
        t2[garbage] = fill(t2[garbage].shape)
        tb2[garbage] = fill(tb2[garbage].shape)
        lg2[garbage] = fill(lg2[garbage].shape)
        dirty = np.asarray(decode(model, feats, t2, tb2, lg2, valid))
        np.testing.assert_allclose(dirty[valid], clean[valid], rtol=1e-5, atol=1e-5)
        assert np.all(np.isfinite(dirty[valid]))
        assert not np.allclose(dirty[garbage], clean[garbage], equal_nan=False)  # the garbage did arrive


NUM_CLASSES, NUM_SLOTS = 8, 3  # K < C and K < the selected count: DCS truncates, slots are masked


def test_permuting_the_vocabulary_permutes_the_prediction(model):
    text = unit_text(NUM_CLASSES, 1, 16, seed=3)
    seen = np.arange(NUM_CLASSES) % 3 == 0
    perm = np.random.default_rng(4).permutation(NUM_CLASSES)
    imgs = images(2, seed=5)
    out, base = forward(model, imgs, text, num_slots=NUM_SLOTS, seen=seen)
    assert (np.asarray(out["dcs_dropped"]) > 0).all()  # the ranking order decides which classes stay
    _, permuted = forward(model, imgs, text[perm], num_slots=NUM_SLOTS, seen=seen[perm])
    np.testing.assert_array_equal(perm[np.asarray(permuted)], np.asarray(base))
    assert len(np.unique(base)) > 1


def test_predict_equals_argmax_over_naive_full_scores(model):
    text = unit_text(NUM_CLASSES, 1, 16, seed=6)
    seen = np.arange(NUM_CLASSES) % 2 == 0
    out, labels = forward(model, images(2, seed=7), text, num_slots=NUM_SLOTS, seen=seen)
    size = 64
    logits = torch.from_numpy(np.array(out["logits"]))
    up = torch.nn.functional.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False).numpy()
    full = np.full((2, NUM_CLASSES, size, size), -np.inf, np.float32)  # the naive [C,S,S] score tensor
    for b in range(2):
        for k, (c, valid) in enumerate(zip(np.asarray(out["slot_class"])[b], np.asarray(out["slot_valid"])[b])):
            if valid:  # TV may give two slots the same class: a class scores its best slot
                full[b, c] = np.maximum(full[b, c], up[b, k])
    np.testing.assert_array_equal(np.asarray(labels), full.argmax(axis=1))
    assert (~np.asarray(out["slot_valid"])).any() or (np.asarray(out["dcs_dropped"]) > 0).any()


def test_predict_resizes_to_the_input_resolution(model):
    labels = nnx.eval_shape(lambda m, x, t: m.predict(x, t, num_slots=2), model,
                            jax.ShapeDtypeStruct((1, 48, 80, 3), jnp.uint8), jnp.zeros((5, 1, 16)))
    assert labels.shape == (1, 48, 80) and labels.dtype == jnp.int32


# ----------------------------------------------------------------------------------------------- loss
def torch_loss(logits, labels, slot_class, slot_valid, ignore_as_negative):
    up = torch.nn.functional.interpolate(torch.from_numpy(logits), size=labels.shape[1:], mode="bilinear",
                                         align_corners=False)
    target = torch.from_numpy((labels[:, None] == slot_class[:, :, None, None]).astype(np.float32))
    weight = np.broadcast_to(slot_valid[:, :, None, None], up.shape).copy()
    if not ignore_as_negative:
        weight &= labels[:, None] >= 0
    per_pixel = torch.nn.functional.binary_cross_entropy_with_logits(up, target, reduction="none").numpy()
    return float((per_pixel * weight).sum() / weight.sum())


@pytest.mark.parametrize("ignore_as_negative", [True, False])
def test_dcp_loss_matches_torch(ignore_as_negative):
    rng = np.random.default_rng(9)
    b, k, c = 2, 4, 7
    logits = rng.normal(0, 3, (b, k, 8, 8)).astype(np.float32)
    labels = rng.integers(-1, c, (b, 32, 32)).astype(np.int32)
    slot_class = np.stack([rng.permutation(c)[:k] for _ in range(b)]).astype(np.int32)
    slot_valid = np.array([[True, True, False, True], [True, False, False, False]])
    outputs = {"logits": jnp.asarray(logits), "slot_class": jnp.asarray(slot_class),
               "slot_valid": jnp.asarray(slot_valid)}
    loss, metrics = dcp.dcp_loss(outputs, jnp.asarray(labels), ignore_as_negative=ignore_as_negative)
    want = torch_loss(logits, labels, slot_class, slot_valid, ignore_as_negative)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    covered = np.zeros(labels.shape, bool)
    for bi in range(b):
        for c_, v in zip(slot_class[bi], slot_valid[bi]):
            covered[bi] |= v & (labels[bi] == c_)
    np.testing.assert_allclose(float(metrics["gt_pixel_coverage"]), covered.sum() / (labels >= 0).sum(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["valid_slots"]), 2.0)


def test_loss_ignore_handling_differs_only_on_ignore_pixels():
    logits = jnp.full((1, 1, 2, 2), 2.0)
    out = {"logits": logits, "slot_class": jnp.array([[0]]), "slot_valid": jnp.array([[True]])}
    all_ignore = -jnp.ones((1, 2, 2), jnp.int32)
    neg, _ = dcp.dcp_loss(out, all_ignore, ignore_as_negative=True)
    np.testing.assert_allclose(float(neg), np.log1p(np.exp(2.0)), rtol=1e-6)  # BCE(2, target 0)
    masked, _ = dcp.dcp_loss(out, all_ignore, ignore_as_negative=False)
    assert float(masked) == 0.0  # nothing left to average, no NaN


def test_gt_presence():
    labels = np.array([[[0, 3], [-1, 3]], [[5, 9], [-1, -1]]], np.int32)  # 9 is out of range for C=6
    want = np.zeros((2, 6), bool)
    want[0, [0, 3]] = True
    want[1, 5] = True
    np.testing.assert_array_equal(np.asarray(dcp.gt_presence(labels, 6)), want)


# ----------------------------------------------------------------------------------------------- training
def _paths(state):
    return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}


@pytest.mark.parametrize("finetune", ["qv", "full", "none"])
def test_trainable_filter_modes(finetune):
    config = small_config(**{"clip.finetune": finetune})
    abstract = summary.abstract_model(config, tiny_clip_config(SMALL_CLIP))
    trainable = _paths(nnx.state(abstract, dcp.trainable_filter(config)))
    everything = _paths(nnx.state(abstract, nnx.Param))
    head = {p for p in everything if not p.startswith("clip/")}
    clip_trainable = trainable - head
    assert head <= trainable and head
    assert not any(p.startswith(("clip/text_model", "clip/text_projection", "clip/logit_scale"))
                   for p in trainable)
    if finetune == "qv":
        want = {f"clip/vision_model/encoder/layers/{i}/self_attn/{proj}/{leaf}"
                for i in range(2) for proj in ("q_proj", "v_proj") for leaf in ("kernel", "bias")}
        assert clip_trainable == want
    elif finetune == "full":
        assert clip_trainable == {p for p in everything
                                  if p.startswith(("clip/vision_model/", "clip/visual_projection/"))}
    else:
        assert clip_trainable == set()
    assert all(dcp.is_clip_param(p) == p.startswith("clip/") for p in everything)
    assert dcp.is_clip_param(("clip", "vision_model")) and not dcp.is_clip_param(("decoder", "head"))


def test_trainable_filter_rejects_unknown_mode():
    with pytest.raises(ValueError, match="clip.finetune"):
        dcp.trainable_filter(small_config(**{"clip.finetune": "qkv"}))
    with pytest.raises(ValueError, match="optim.trainable"):
        dcp.trainable_filter(small_config(**{"optim.trainable": "clip/(unclosed"}))


def test_trainable_regex_from_the_config_replaces_the_preset():
    config = small_config(**{"optim.trainable": r"^(?!clip/)|^clip/vision_model/encoder/layers/1/mlp/"})
    abstract = summary.abstract_model(config, tiny_clip_config(SMALL_CLIP))
    trainable = _paths(nnx.state(abstract, dcp.trainable_filter(config)))
    everything = _paths(nnx.state(abstract, nnx.Param))
    want = {p for p in everything if not p.startswith("clip/")}
    want |= {f"clip/vision_model/encoder/layers/1/mlp/{fc}/{leaf}" for fc in ("fc1", "fc2") for leaf in ("kernel", "bias")}
    assert trainable == want


def test_gradients_reach_every_trainable_param_and_no_frozen_one(model):
    config = small_config()
    num_classes = 6
    text = unit_text(num_classes, 1, 16, seed=10)
    labels = np.full((2, 64, 64), -1, np.int32)
    labels[:, :32] = 2  # classes 2 and 5 present, some ignore pixels
    labels[:, 32:, 40:] = 5
    labels[1, 50:, :10] = 0
    trainable = dcp.trainable_filter(config)

    @fast_jit
    def grads_of(model, imgs, text, labels):
        def loss_fn(model):
            gt = dcp.gt_presence(labels, num_classes)
            out = model(imgs, text, num_slots=4, gt_present=gt, seen=jnp.zeros(num_classes, bool), train=True)
            return dcp.dcp_loss(out, labels)[0], (out, gt)
        return nnx.grad(loss_fn, argnums=nnx.DiffState(0, trainable), has_aux=True)(model)

    grads, (out, gt) = grads_of(model, images(2, seed=12), text, labels)
    got = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    assert set(got) == _paths(nnx.state(model, trainable))  # frozen params get no gradient at all
    clip_grads = {p for p in got if p.startswith("clip/")}
    assert clip_grads and all(("q_proj" in p or "v_proj" in p) and "vision_model" in p for p in clip_grads)
    dead = sorted(p for p, g in got.items() if not np.any(g != 0))
    assert not dead, f"zero gradient for {dead}"
    assert all(np.all(np.isfinite(g)) for g in got.values())
    # Training forward: GT classes take the first slots; no tag validation even with `seen` given.
    gt = np.asarray(gt)
    np.testing.assert_array_equal(gt.sum(1), [2, 3])
    for b in range(2):
        n_gt = gt[b].sum()
        assert set(np.asarray(out["slot_class"])[b, :n_gt]) == set(np.flatnonzero(gt[b]))
    np.testing.assert_array_equal(np.asarray(out["slot_class"]), np.asarray(out["slot_class_dcs"]))
    assert not np.asarray(out["tv_relabelled"]).any()


# ----------------------------------------------------------------------------------------------- ablations
ABLATIONS = {
    # Each switch of Tables III-VII is off in at least one variant (grouped to keep compiles few).
    "ca_off_1layer_plain_swin": {"model.tga.cross_attention": False, "model.decoder.layers": 1,
                                 "model.decoder.fuse_cost": False, "model.decoder.fuse_shallow": False,
                                 "model.decoder.fuse_attn": False, "model.tv.enabled": False},
    "sa_off_no_prompt_no_attn_fusion": {"model.tga.self_attention": False, "model.guidance.prompt": False,
                                        "model.decoder.fuse_attn": False, "clip.dense_mode": "plain",
                                        "text.templates": "imagenet80"},
    "no_cls_logit_no_prompt_no_enhance": {"model.guidance.cls_logit": False, "model.guidance.prompt": False,
                                          "model.decoder.spatial_enhance": False,
                                          "model.decoder.fuse_shallow": False, "clip.dtype": "bfloat16"},
    "tga_off_0layers_no_dcs": {"model.tga.cross_attention": False, "model.tga.self_attention": False,
                               "model.decoder.layers": 0, "model.dcs.theta": 0.0, "model.dcs.num_slots": 0},
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_switches_build_and_run(name):
    config = small_config(**ABLATIONS[name])
    m = make_model(config)
    num_classes, p = 5, dcp.num_templates(config)
    seen = np.array([True, False, True, False, False])
    k = config.model.dcs.num_slots and 3  # 0 -> one slot per class
    out = fast_jit(lambda m, x, t, s: m(x, t, num_slots=k, seen=s))(m, images(1), unit_text(num_classes, p, 16), seen)
    size = 8 * 2 ** config.model.decoder.layers
    assert out["logits"].shape == (1, k or num_classes, size, size)
    assert np.all(np.isfinite(np.asarray(out["logits"])))
    params = _paths(nnx.state(m, nnx.Param))
    tga, dec = config.model.tga, config.model.decoder
    assert any(p.startswith("alignment/cross_block") for p in params) == tga.cross_attention
    assert any(p.startswith("alignment/self_block/q_proj") for p in params) == tga.self_attention
    assert any("/enhance/" in p for p in params) == (dec.spatial_enhance and dec.layers > 0)
    assert any("shallow" in p for p in params) == (dec.fuse_shallow and dec.layers > 0)
    assert any("attn_proj" in p for p in params) == (dec.fuse_attn and dec.spatial_enhance and dec.layers > 0)
    assert any("cost_up" in p for p in params) == (dec.fuse_cost and dec.layers > 0)
    if not config.model.tv.enabled:
        assert not np.asarray(out["tv_relabelled"]).any()
    if config.model.dcs.theta == 0.0:
        assert np.asarray(out["slot_valid"]).all()


# ----------------------------------------------------------------------------------------------- loading
def test_load_pretrained_clip_copies_weights_strictly(tmp_path):
    path = write_tiny_clip(tmp_path / "clip", SMALL_CLIP, seed=3)
    config = small_config()
    m = make_model(config)
    dcp.load_pretrained_clip(m, path)
    from dcp_jax.models.clip import load_clip
    loaded, _ = load_clip(path, image_size=64)
    want = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in
            nnx.to_flat_state(nnx.state(loaded, nnx.Param))}
    for p, v in nnx.to_flat_state(nnx.state(m.clip, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(v.get_value()), want["/".join(map(str, p))])

    wider = dict(SMALL_CLIP, vision=dict(SMALL_CLIP["vision"], hidden_size=48))
    other = write_tiny_clip(tmp_path / "wider", wider, seed=3)
    with pytest.raises(ValueError, match="does not fit the model's CLIP") as err:
        dcp.load_pretrained_clip(m, other)
    message = str(err.value)
    assert "ViT width 48" in message and "class_embedding: checkpoint (48,) vs model (32,)" in message
    assert "Use a config whose clip.* keys match" in message


def test_build_model_from_checkpoint(tmp_path):
    path = write_tiny_clip(tmp_path / "clip", SMALL_CLIP, seed=4)
    config = small_config()
    m, clip_config = dcp.build_model_from_checkpoint(config, path, seed=1)
    assert clip_config.vision.image_size == 64 and m.clip.config == clip_config
    from dcp_jax.models.clip import load_clip
    loaded, _ = load_clip(path, image_size=64)
    want = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
    for p, v in nnx.to_flat_state(nnx.state(m.clip, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(want[p].get_value()))
    # Head: flax default initialisers (lecun-normal kernels, zero biases, unit norm scales).
    head = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))
            if p[0] != "clip"}
    kernel = head["decoder/layers/0/shallow_up/kernel"]  # (2, 2, 32, 16): fan_in 128
    np.testing.assert_allclose(kernel.std(), 1 / np.sqrt(128), rtol=0.15)
    assert np.abs(kernel).max() <= 2 / 0.87962566 / np.sqrt(128) + 1e-6
    assert not any(v.any() for k, v in head.items() if k.endswith("/bias"))
    assert all((v == 1).all() for k, v in head.items() if k.endswith("/scale"))
    assert set(head) == {p for p in _paths(nnx.state(summary.abstract_model(config, clip_config), nnx.Param))
                         if not p.startswith("clip/")}
