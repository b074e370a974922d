"""The DCP-CLIP model: geometry, slot masking, equivariance, textual guidance, loss, gradients, ablations,
parameter rules, building from a checkpoint.

Models are small (a 2-block CLIP of width 32 on a 64x64 input, 8x8 grid) and built by the one building
path (dcp_jax.models.build) with random weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dcp_jax import loss as loss_lib
from dcp_jax import optim
from dcp_jax.configs import dcp_vitb16_coco_stuff, tiny
from dcp_jax.models import build, compute, dcp
from dcp_jax.models.build import write_tiny_clip
from dcp_jax.models.tiny_clip import tiny_clip_config
from dcp_jax.rules import flat_params

SMALL_CLIP = dict(
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=64, patch_size=8),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=600,
              max_position_embeddings=16),
    projection_dim=16,
)


def small_config(**overrides):
    """configs/tiny.py shrunk further; overrides are dotted config keys."""
    c = tiny.get_config()
    c.clip.tiny = SMALL_CLIP
    c.clip.guidance_layers = (0, 1)
    c.model.hidden_dim = 16
    c.model.num_heads = 2
    c.model.guidance.prompt_tokens = 2
    c.model.decoder.update(dims=(16, 8), attn_dim=8, shallow_dims=(16, 8), shallow_proj_dims=(8, 4),
                           cost_dims=(8, 4), shallow_qk_dim=8, window=4)
    c.update_from_flattened_dict(overrides)
    return c


def make_model(config, seed=0, logit_scale=np.log(10.0)):
    model = build.create_model(config, tiny_clip_config(config.clip.tiny.to_dict()), seed=seed)
    # A moderate scale keeps the random CLIP's softmaxes from underflowing, so DCS ranks without ties.
    model.clip.logit_scale[...] = jnp.float32(logit_scale)
    return model


def unit_text(num_classes, p, d, seed=0):
    t = np.random.default_rng(seed).standard_normal((num_classes, p, d)).astype(np.float32)
    return t / np.linalg.norm(t, axis=-1, keepdims=True)


def images(b, size=64, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (b, size, size, 3)).astype(np.float32)


# XLA's cheapest CPU compile (conftest.FAST_XLA_FLAGS, as compiler options): the tests run tiny shapes.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def fast_jit(fn, static_argnames=()):
    """jit for `fn(model, *args)`: the model's graph is static, its state traced."""
    jitted = jax.jit(lambda graphdef, state, *args, **kwargs: fn(nnx.merge(graphdef, state), *args, **kwargs),
                     static_argnums=0, static_argnames=static_argnames, compiler_options=FAST_COMPILE)

    def call(model, *args, **kwargs):
        return jitted(*nnx.split(model), *args, **kwargs)

    return call


forward = fast_jit(lambda m, imgs, text, num_slots, seen: m(imgs, text, num_slots=num_slots, seen=seen),
                   static_argnames=("num_slots",))


def labels_of(out, size):
    """Per-pixel vocabulary ids from slot outputs: upsample (torch bilinear), best valid slot's class."""
    up = torch.nn.functional.interpolate(torch.from_numpy(np.array(out["logits"])), size=(size, size),
                                         mode="bilinear", align_corners=False).numpy()
    up = np.where(np.asarray(out["slot_valid"])[:, :, None, None], up, -np.inf)
    return np.take_along_axis(np.asarray(out["slot_class"])[:, :, None, None], up.argmax(1)[:, None], 1)[:, 0]


@pytest.fixture(scope="module")
def model():
    return make_model(small_config())


def _paths(tree):
    return {p for p, _ in flat_params(tree)}


# ----------------------------------------------------------------------------------------------- geometry
def test_b16_geometry_on_reduced_width_clip():
    """B/16 layout (patch 16, 384 input -> 24x24 grid, window 12, logits 96x96, P = 80) with narrow widths."""
    config = dcp_vitb16_coco_stuff.get_config()
    config.clip.guidance_layers = (0, 1)
    arch = dict(SMALL_CLIP, vision=dict(SMALL_CLIP["vision"], patch_size=16, image_size=384))
    abstract = build.abstract_model(config, tiny_clip_config(arch))
    b, c, k = 2, 7, 5
    text = jax.ShapeDtypeStruct((c, 80, 16), jnp.float32)

    def run(m, imgs, text):
        feats = m.encode(imgs)
        out = m(imgs, text, num_slots=k, seen=jnp.ones(c, bool))
        slot_text = text[out["slot_class"]]
        cost, corr = m.alignment(feats["dense"], slot_text, jnp.mean(slot_text, 2), out["p_img"][:, :k],
                                 out["slot_valid"])
        return feats, out, cost, corr

    for size in (384, 512):  # the model resizes other input sizes to clip.image_size
        feats, out, cost, corr = nnx.eval_shape(run, abstract, jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32),
                                                text)
        assert feats["dense"].shape == (b, 24, 24, 16)
        assert [s.shape for s in feats["shallow"]] == [(b, 24, 24, 32)] * 2
        assert feats["attn_last"].shape == (b, 576, 576)
        assert corr.shape == (b, k, 24, 24, 80)
        assert cost.shape == (b, k, 24, 24, 128)
        assert out["logits"].shape == (b, k, 96, 96)
        assert out["slot_class"].shape == (b, k) and out["slot_class"].dtype == jnp.int32
        assert out["slot_valid"].shape == (b, k) and out["slot_valid"].dtype == jnp.bool_
        assert out["dcs_selected"].shape == (b,) and out["dcs_dropped"].shape == (b,)
    # K = 0 or K >= C: one slot per class.
    for k_all in (0, c, c + 3):
        out = nnx.eval_shape(lambda m, i, t: m(i, t, num_slots=k_all), abstract,
                             jax.ShapeDtypeStruct((b, 384, 384, 3), jnp.float32), text)
        assert out["logits"].shape == (b, c, 96, 96)


def test_config_errors_name_the_key():
    clip_config = tiny_clip_config(SMALL_CLIP)
    for key, value, match in (("model.decoder.window", 3, "decoder.window"),
                              ("clip.guidance_layers", (0, 5), "guidance_layers"),
                              ("clip.image_size", 128, "clip.image_size"),
                              ("model.decoder.layers", 3, "decoder.layers"),
                              ("model.guidance.prompt", "vector", "guidance.prompt")):
        with pytest.raises(ValueError, match=match):
            build.abstract_model(small_config(**{key: value}), clip_config)
    abstract = build.abstract_model(small_config(), clip_config)
    with pytest.raises(ValueError, match="templates"):
        nnx.eval_shape(lambda m: m(jnp.zeros((1, 64, 64, 3)), jnp.zeros((4, 3, 16)), num_slots=2), abstract)


def test_too_few_reencoded_text_rows_for_a_batch_are_refused_at_start(tmp_path, capsys):
    """Training re-encodes the slot classes' text into text.finetune_rows rows; a class beyond them would train on
    the frozen embeddings. A config whose rows cannot hold a batch's slots is refused before any work, on one line
    naming the keys and the number it needs (issue 34); every recipe, in every text-training mode, starts."""
    from dcp_jax import config as config_lib
    from dcp_jax import train
    from dcp_jax.configs import demo, dcp_vitl14_coco_stuff

    workdir = tmp_path / "w"
    code = train.main(["--config", "configs/tiny.py", "--workdir", str(workdir), "--config.clip.text_finetune=cost",
                       "--config.text.finetune_rows=16"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "[dcp_jax] jax " not in line]
    assert code == 2 and lines == [
        "python -m dcp_jax.train: error: config.text.finetune_rows=16 cannot re-encode the text of a batch's slot classes (train.batch_size=4 x "
        "model.dcs.num_slots=8 slots); set text.finetune_rows >= 32, or 0 to re-encode every class"], lines
    assert not workdir.exists()

    modes = ({"clip.text_finetune": "guidance"}, {"clip.text_finetune": "cost"}, {"model.guidance.prompt": "context"})
    recipes = [dcp_vitb16_coco_stuff.get_config(), dcp_vitb16_coco_stuff.get_config("tpu"),
               dcp_vitl14_coco_stuff.get_config(), tiny.get_config(), tiny.get_config("num_slots=0"), demo.get_config()]
    for recipe in recipes:
        for mode in modes:
            recipe.update_from_flattened_dict(mode)
            config_lib.check_finetune_rows(recipe, 171)  # COCO-Stuff's vocabulary
            config_lib.check_finetune_rows(recipe, 847)
    # num_slots 0: every class is a slot, so the vocabulary decides (once the dataset is open)
    every = small_config(**{"clip.text_finetune": "cost", "model.dcs.num_slots": 0, "text.finetune_rows": 16})
    config_lib.check_finetune_rows(every)
    config_lib.check_finetune_rows(every, 16)
    with pytest.raises(ValueError, match=r"num_slots=0 makes each of the 24 classes a slot\); set "
                                         r"text.finetune_rows >= 24, or 0"):
        config_lib.check_finetune_rows(every, 24)
    config_lib.check_finetune_rows(small_config(**{"model.guidance.prompt": "tokens", "text.finetune_rows": 1}))


# ----------------------------------------------------------------------------------------------- slots
def test_invalid_slots_filled_with_garbage_change_no_valid_output(model):
    imgs = images(2)
    feats = fast_jit(lambda m, x: m.encode(x))(model, imgs)
    b, k, p, d = 2, 5, 1, 16
    text = unit_text(b * k, p, d, seed=2)  # one class per slot
    guidance = text.mean(1) / np.linalg.norm(text.mean(1), axis=-1, keepdims=True)
    slot_class = np.arange(b * k, dtype=np.int32).reshape(b, k)
    valid = np.array([[True, False, True, False, False], [False, True, True, True, False]])
    decode = fast_jit(lambda m, f, t, sc, v, g: m.decode(f, t, sc, v, g))
    clean = np.asarray(decode(model, feats, text, slot_class, valid, guidance))

    garbage = slot_class[~valid]
    rng = np.random.default_rng(1)
    for fill in (lambda shape: rng.normal(0, 1e3, shape), lambda shape: np.full(shape, np.nan)):
        t2, g2 = text.copy(), guidance.copy()
        t2[garbage] = fill(t2[garbage].shape)
        g2[garbage] = fill(g2[garbage].shape)
        dirty = np.asarray(decode(model, feats, t2, slot_class, valid, g2))
        np.testing.assert_allclose(dirty[valid], clean[valid], rtol=1e-5, atol=1e-5)
        assert np.all(np.isfinite(dirty[valid]))
        assert not np.allclose(dirty[~valid], clean[~valid], equal_nan=False)  # the garbage did arrive


NUM_CLASSES, NUM_SLOTS = 8, 3  # K < C and K < the selected count: DCS truncates, slots are masked


def test_permuting_the_vocabulary_permutes_the_prediction(model):
    text = unit_text(NUM_CLASSES, 1, 16, seed=3)
    seen = np.arange(NUM_CLASSES) % 3 == 0
    perm = np.random.default_rng(4).permutation(NUM_CLASSES)
    imgs = images(2, seed=5)
    out = forward(model, imgs, text, num_slots=NUM_SLOTS, seen=seen)
    assert (np.asarray(out["dcs_dropped"]) > 0).all()  # the ranking order decides which classes stay
    permuted = forward(model, imgs, text[perm], num_slots=NUM_SLOTS, seen=seen[perm])
    base = labels_of(out, 64)
    np.testing.assert_array_equal(perm[labels_of(permuted, 64)], base)
    assert len(np.unique(base)) > 1


# ----------------------------------------------------------------------------------------------- guidance
def _decode_with(model, imgs, text, slot_class, valid):
    feats = fast_jit(lambda m, x: m.encode(x))(model, imgs)
    bar = text.mean(1) / np.linalg.norm(text.mean(1), axis=-1, keepdims=True)
    return np.asarray(fast_jit(lambda m, f, t, sc, v, g: m.decode(f, t, sc, v, g))(model, feats, text, slot_class,
                                                                                    valid, bar))


def test_guidance_is_independent_of_the_logit_scale(model):
    """The CLS term of the guidance is the cosine c_k, not s * cos: the head's output for given slots does
    not move when CLIP's logit scale does (only the selection uses s)."""
    text = unit_text(6, 1, 16, seed=20)
    slot_class = np.array([[0, 2, 4, 5], [1, 3, 0, 2]], np.int32)
    valid = np.array([[True, True, True, False], [True, True, True, True]])
    imgs = images(2, seed=21)
    base = _decode_with(model, imgs, text, slot_class, valid)
    scaled = make_model(small_config(), logit_scale=np.log(100.0))  # same seed: same weights, s 10 -> 100
    np.testing.assert_allclose(_decode_with(scaled, imgs, text, slot_class, valid), base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prompt", ["tokens", "context"])
def test_prompt_parameters_change_the_logits_and_get_gradients(prompt):
    config = small_config(**{"model.guidance.prompt": prompt})
    m = make_model(config)
    name = "alignment/prompt_tokens" if prompt == "tokens" else "text_context"
    params = dict(flat_params(m))
    assert params[name].get_value().shape == ((2, 16) if prompt == "tokens" else (2, 32))
    num_classes = 6
    text = unit_text(num_classes, 1, 16, seed=22)
    from dcp_jax import text as text_lib
    from dcp_jax.models.tiny_clip import tiny_tokenizer_files
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        for fname, content in tiny_tokenizer_files(600).items():
            Path(tmp, fname).write_text(content)
        tokenizer = text_lib.load_tokenizer(tmp)
        tokens = text_lib.guidance_tokens(tokenizer, [f"class {i}" for i in range(num_classes)],
                                          num_context=2 if prompt == "context" else 0, context_length=16)
    labels = np.zeros((2, 64, 64), np.int32)
    labels[:, 32:] = 3

    @fast_jit
    def loss_and_grads(m, imgs, text, labels):
        def loss_fn(m):
            out = m(imgs, text, num_slots=4, gt_present=loss_lib.gt_presence(labels, num_classes), train=True,
                    guidance_tokens=tokens if prompt == "context" else None, guidance_rows=4)
            return loss_lib.dcp_loss(out, labels)[0], out["logits"]
        return nnx.value_and_grad(loss_fn, has_aux=True)(m)

    (_, logits), grads = loss_and_grads(m, images(2, seed=23), text, labels)
    grad = dict(flat_params(grads))[name].get_value()
    assert np.abs(np.asarray(grad)).max() > 0
    shift = np.random.default_rng(24).normal(0, 1, params[name].get_value().shape).astype(np.float32)
    params[name].set_value(params[name].get_value() + shift)  # not a constant: LayerNorms would remove it
    (_, moved), _ = loss_and_grads(m, images(2, seed=23), text, labels)
    assert np.abs(np.asarray(moved) - np.asarray(logits)).max() > 1e-4


def test_cost_text_finetune_reencodes_the_cost_volume_text_with_the_trained_tower():
    """clip.text_finetune = "cost": the slot classes' template embeddings are re-encoded in the step by the
    trained text tower. Given the vocabulary embedded by that same tower (embed_vocabulary), the re-encoded rows
    are those embeddings, so the logits do not move; given another T, they do; and the text q/v get gradient
    through the cost volume, none without the re-encoding."""
    from dcp_jax import text as text_lib
    from dcp_jax.models.clip import with_compute
    from dcp_jax.models.tiny_clip import tiny_tokenizer_files
    import tempfile
    from pathlib import Path

    config = small_config(**{"clip.text_finetune": "cost", "text.templates": "imagenet80",
                             "model.guidance.prompt": "none"})
    m = make_model(config)
    names = [f"class {i}" for i in range(6)]
    with tempfile.TemporaryDirectory() as tmp:
        for fname, content in tiny_tokenizer_files(600).items():
            Path(tmp, fname).write_text(content)
        tokenizer = text_lib.load_tokenizer(tmp)
        tokens = text_lib.template_tokens(tokenizer, names, "imagenet80", context_length=16)
        trained_text = text_lib.embed_vocabulary(with_compute(m.clip, jnp.float32), tokenizer, names, "imagenet80",
                                                 cache_dir=tmp)
    assert tokens[0].shape[:2] == (6, 80)
    labels = np.zeros((2, 64, 64), np.int32)
    labels[:, 32:] = 3

    def run(m, text, cost):
        def loss_fn(m):
            out = m(images(2, seed=23), text, num_slots=4, gt_present=loss_lib.gt_presence(labels, 6), train=True,
                    cost_tokens=tokens if cost else None, guidance_rows=4)
            return loss_lib.dcp_loss(out, labels)[0], out["logits"]
        return nnx.value_and_grad(loss_fn, has_aux=True)(m)

    run = fast_jit(run, static_argnames=("cost",))
    (_, plain), plain_grads = run(m, jnp.asarray(trained_text), cost=False)
    (_, reencoded), grads = run(m, jnp.asarray(trained_text), cost=True)
    np.testing.assert_allclose(np.asarray(reencoded), np.asarray(plain), atol=2e-5)
    (_, other), _ = run(m, jnp.asarray(unit_text(6, 80, 16, seed=5)), cost=True)
    (_, other_plain), _ = run(m, jnp.asarray(unit_text(6, 80, 16, seed=5)), cost=False)
    assert np.abs(np.asarray(other) - np.asarray(other_plain)).max() > 1e-3
    q = "clip/text_model/encoder/layers/0/self_attn/q_proj/kernel"
    assert np.abs(np.asarray(dict(flat_params(grads))[q].get_value())).max() > 0
    assert np.abs(np.asarray(dict(flat_params(plain_grads))[q].get_value())).max() == 0


def test_cost_text_of_classes_with_synonyms_is_the_same_in_training_and_at_inference(tmp_path):
    """clip.text_finetune = "cost" on ADE-847 names with synonyms ("building, edifice"): the cost-volume rows that
    the train step re-encodes for the slot classes equal those that the Segmenter's cost volume reads for the
    same classes (both the trained tower on the first synonym, as CAT-Seg); the synonym mean, which inference
    read before issue 34, is another text."""
    from dcp_jax import text as text_lib
    from dcp_jax.data import classnames
    from dcp_jax.models.clip import with_compute
    from dcp_jax.models.tiny_clip import tiny_tokenizer_files
    from dcp_jax.segmenter import Segmenter

    config = small_config(**{"clip.text_finetune": "cost", "text.templates": "imagenet80",
                             "model.guidance.prompt": "none"})
    m = make_model(config)
    ade = classnames.load("ade847")
    names = [n for n in ade if ", " in n][:3] + [n for n in ade if ", " not in n][:2]
    for fname, content in tiny_tokenizer_files(600).items():
        (tmp_path / fname).write_text(content)
    tokenizer = text_lib.load_tokenizer(tmp_path)
    segmenter = Segmenter(m, config, tokenizer, text_cache_dir=tmp_path / "cache")
    segmenter.set_vocabulary(names)
    inference = np.asarray(segmenter._cost_text)  # what the head's cost volume reads at inference

    tokens = text_lib.template_tokens(tokenizer, names, "imagenet80", context_length=16)  # what train.py passes
    c = len(names)
    reencode = fast_jit(lambda m, text, cls, valid: m._reencode_cost_text(text, cls, valid, tokens, c))
    frozen = np.asarray(segmenter.text_embeddings)
    training = np.asarray(reencode(m, jnp.asarray(frozen), jnp.arange(c)[None], jnp.ones((1, c), bool)))
    np.testing.assert_allclose(training, inference, atol=2e-5)
    assert np.abs(training - frozen).max() > 1e-3  # the trained tower, not the frozen copy
    mean = text_lib.embed_vocabulary(with_compute(m.clip, jnp.float32), tokenizer, names, "imagenet80",
                                     cache_dir=tmp_path / "cache")  # every synonym, averaged
    assert np.abs(training[:3] - mean[:3]).max() > 1e-3
    np.testing.assert_allclose(training[3:], mean[3:], atol=2e-5)


def test_no_prompt_has_no_prompt_parameter():
    params = _paths(build.abstract_model(small_config(**{"model.guidance.prompt": "none"}),
                                         tiny_clip_config(SMALL_CLIP)))
    assert not any("prompt" in p or "context" in p for p in params)


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
    loss, metrics = loss_lib.dcp_loss(outputs, jnp.asarray(labels), ignore_as_negative=ignore_as_negative)
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
    neg, _ = loss_lib.dcp_loss(out, all_ignore, ignore_as_negative=True)
    np.testing.assert_allclose(float(neg), np.log1p(np.exp(2.0)), rtol=1e-6)  # BCE(2, target 0)
    masked, _ = loss_lib.dcp_loss(out, all_ignore, ignore_as_negative=False)
    assert float(masked) == 0.0  # nothing left to average, no NaN


def test_gt_presence():
    labels = np.array([[[0, 3], [-1, 3]], [[5, 9], [-1, -1]]], np.int32)  # 9 is out of range for C=6
    want = np.zeros((2, 6), bool)
    want[0, [0, 3]] = True
    want[1, 5] = True
    np.testing.assert_array_equal(np.asarray(loss_lib.gt_presence(labels, 6)), want)


# ----------------------------------------------------------------------------------------------- parameter rules
def _trained(config):
    return _paths(nnx.state(build.abstract_model(config, tiny_clip_config(SMALL_CLIP)), optim.trainable(config)))


@pytest.mark.parametrize("finetune", ["qv", "full", "none"])
def test_finetune_presets(finetune):
    config = small_config(**{"clip.finetune": finetune})
    everything = _paths(build.abstract_model(config, tiny_clip_config(SMALL_CLIP)))
    trainable = _trained(config)
    head = {p for p in everything if not p.startswith("clip/")}
    clip_trainable = trainable - head
    assert head <= trainable and head
    if finetune == "qv":
        want = {f"clip/vision_model/encoder/layers/{i}/self_attn/{proj}/kernel"  # weights, not biases (CAT-Seg)
                for i in range(2) for proj in ("q_proj", "v_proj")}
        assert clip_trainable == want
    elif finetune == "full":
        assert clip_trainable == {p for p in everything
                                  if p.startswith(("clip/vision_model/", "clip/visual_projection/"))}
    else:
        assert clip_trainable == set()


def test_rules_from_the_config_replace_the_preset_and_bad_rules_are_errors():
    config = small_config(**{"optim.rules": ((r"^clip/vision_model/encoder/layers/1/mlp/", {"lr_mult": 0.1}),
                                             (r"^clip/", None), (r".*", {}))})
    everything = _paths(build.abstract_model(config, tiny_clip_config(SMALL_CLIP)))
    want = {p for p in everything if not p.startswith("clip/")}
    want |= {f"clip/vision_model/encoder/layers/1/mlp/{fc}/{leaf}" for fc in ("fc1", "fc2") for leaf in ("kernel", "bias")}
    assert _trained(config) == want
    for rules, match in ((((r"clip/(unclosed", None),), "not a valid regex"), (((r".*", {"lr": 1}),), "lr_mult"),
                         (((r"^clip/", None),), "no rule")):
        with pytest.raises(ValueError, match=match):
            _trained(small_config(**{"optim.rules": rules}))
    with pytest.raises(ValueError, match="clip.finetune"):
        optim.parameter_rules(small_config(**{"clip.finetune": "qkv"}))


@pytest.mark.parametrize("mode", ["guidance", "cost", True])  # True: a config saved when the key was a bool
def test_text_finetune_trains_exactly_the_text_qv_and_keeps_a_frozen_copy(mode):
    config = small_config()
    config.clip.text_finetune = str(mode) if mode is True else mode  # "True" reads as "guidance"
    everything = _paths(build.abstract_model(config, tiny_clip_config(SMALL_CLIP)))
    text_trained = {p for p in _trained(config) if p.startswith("clip/text_model")}
    assert text_trained == {f"clip/text_model/encoder/layers/0/self_attn/{proj}/kernel" for proj in ("q_proj", "v_proj")}
    frozen = {p for p in everything if p.startswith("frozen_text_qv/")}
    assert frozen and not frozen & _trained(config)


def test_norm_parameters_of_the_b16_tree_get_no_weight_decay():
    """On the real B/16 parameter tree: every LayerNorm/GroupNorm scale and bias (found by module type)
    trains without weight decay, every other trained parameter with optim.weight_decay, and the labels
    the optimizer uses come from the right rule."""
    config = dcp_vitb16_coco_stuff.get_config()
    config.clip.finetune = "full"  # CLIP norms train too
    abstract = build.abstract_model(config)
    norm_paths = {"/".join(map(str, path)) + "/" + leaf for path, node in nnx.iter_graph(abstract)
                  if isinstance(node, (nnx.LayerNorm, nnx.GroupNorm)) for leaf in ("scale", "bias")}
    rules = optim.parameter_rules(config)
    labels = optim.group_labels(rules, nnx.state(abstract, optim.trainable(config)))
    decays = {}
    for path, label in jax.tree_util.tree_leaves_with_path(labels):
        from dcp_jax.rules import path_str
        decays[path_str(path)] = rules[int(label)][1].get("weight_decay", config.optim.weight_decay)
    trained_norms = norm_paths & set(decays)
    assert len(trained_norms) > 50  # the head's and the image tower's norms
    assert all(decays[p] == 0.0 for p in trained_norms)
    assert all(decays[p] == config.optim.weight_decay for p in set(decays) - norm_paths)


# ----------------------------------------------------------------------------------------------- gradients
def test_gradients_reach_every_trainable_param_and_no_frozen_one(model):
    config = small_config()
    num_classes = 6
    text = unit_text(num_classes, 1, 16, seed=10)
    labels = np.full((2, 64, 64), -1, np.int32)
    labels[:, :32] = 2  # classes 2 and 5 present, some ignore pixels
    labels[:, 32:, 40:] = 5
    labels[1, 50:, :10] = 0
    trainable = optim.trainable(config)

    @fast_jit
    def grads_of(model, imgs, text, labels):
        def loss_fn(model):
            gt = loss_lib.gt_presence(labels, num_classes)
            out = model(imgs, text, num_slots=4, gt_present=gt, seen=jnp.zeros(num_classes, bool), train=True)
            return loss_lib.dcp_loss(out, labels)[0], (out, gt)
        return nnx.grad(loss_fn, argnums=nnx.DiffState(0, trainable), has_aux=True)(model)

    grads, (out, gt) = grads_of(model, images(2, seed=12), text, labels)
    got = {p: np.asarray(v.get_value()) for p, v in flat_params(grads)}
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
    "sa_off_no_prompt_no_attn_fusion": {"model.tga.self_attention": False, "model.guidance.prompt": "none",
                                        "model.tga.cross_attention_width": "head",
                                        "model.decoder.fuse_attn": False, "clip.dense_mode": "plain",
                                        "text.templates": "imagenet80"},
    "no_cls_logit_context_no_enhance": {"model.guidance.cls_logit": False, "model.guidance.prompt": "context",
                                        "model.decoder.spatial_enhance": False,
                                        "model.decoder.fuse_shallow": False, "clip.dtype": "bfloat16",
                                        "model.hidden_dim": 8},  # CA at CLIP's width 16, the head at 8
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
    params = _paths(m)
    tga, dec = config.model.tga, config.model.decoder
    assert any(p.startswith("alignment/cross_block") for p in params) == tga.cross_attention
    assert any(p.startswith("alignment/self_block/q_proj") for p in params) == tga.self_attention
    assert any("/enhance/" in p for p in params) == (dec.spatial_enhance and dec.layers > 0)
    assert any("shallow" in p for p in params) == (dec.fuse_shallow and dec.layers > 0)
    assert any("attn_proj" in p for p in params) == (dec.fuse_attn and dec.spatial_enhance and dec.layers > 0)
    assert any("cost_up" in p for p in params) == (dec.fuse_cost and dec.layers > 0)
    assert ("alignment/prompt_tokens" in params) == (config.model.guidance.prompt == "tokens" and tga.cross_attention)
    if tga.cross_attention:  # CA at CLIP's joint width (Eqs. 8-11) or at the head's
        width = {"clip": m.clip_dim, "head": config.model.hidden_dim}[tga.cross_attention_width]
        assert m.alignment.cross_block.q_proj.kernel.shape == (width, width)
        assert m.alignment.visual_proj.kernel.shape[-2:] == (m.clip_dim, config.model.hidden_dim)
    assert ("text_context" in params) == (config.model.guidance.prompt == "context")
    if not config.model.tv.enabled:
        assert not np.asarray(out["tv_relabelled"]).any()
    if config.model.dcs.theta == 0.0:
        assert np.asarray(out["slot_valid"]).all()


# ----------------------------------------------------------------------------------------------- building
def test_model_from_a_clip_checkpoint(tmp_path):
    path = write_tiny_clip(tmp_path / "clip", SMALL_CLIP, seed=4)
    config = small_config(**{"clip.text_finetune": "guidance"})
    m, clip_config, _ = build.model_from_clip_checkpoint(config, path)
    assert clip_config.vision.image_size == 64 and m.clip.config == clip_config
    from dcp_jax.models.clip import load_clip
    loaded, _ = load_clip(path, image_size=64)
    want = dict(flat_params(loaded))
    for p, v in flat_params(m.clip):
        np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(want[p].get_value()))
    head = {p: np.asarray(v.get_value()) for p, v in flat_params(m) if not p.startswith("clip/")}
    # The frozen text q/v start as the checkpoint's.
    np.testing.assert_array_equal(head["frozen_text_qv/layers/0/q_proj/kernel"],
                                  np.asarray(want["text_model/encoder/layers/0/self_attn/q_proj/kernel"].get_value()))
    # Head: flax default initialisers (lecun-normal kernels, zero biases, unit norm scales).
    kernel = head["decoder/layers/0/shallow_up/kernel"]  # (2, 2, 32, 16): fan_in 128
    np.testing.assert_allclose(kernel.std(), 1 / np.sqrt(128), rtol=0.15)
    assert np.abs(kernel).max() <= 2 / 0.87962566 / np.sqrt(128) + 1e-6
    assert not any(v.any() for k, v in head.items() if k.endswith("/bias"))
    assert all((v == 1).all() for k, v in head.items() if k.endswith("/scale"))

    # A checkpoint that is not the architecture the config names is refused, naming the fix.
    config.clip.variant = "B/16"
    with pytest.raises(ValueError, match="ViT width 32, 2 blocks, patch 8.*clip.variant='B/16'"):
        build.model_from_clip_checkpoint(config, path)


def test_traced_construction_skips_the_origin_walk_only_inside_and_restores_it(monkeypatch):
    """compute.traced_construction (around build's and clip.abstract_clip's eval_shape and initialisers):
    inside, a tracer's missing-attribute error (what flax's set_value asks for on every RNG count) does not
    walk the trace for the value's origin; outside, and after two threads used it at once, jax walks it."""
    import threading

    from jax._src.interpreters import partial_eval as pe

    original = pe.DynamicJaxprTracer._origin_msg
    walks = []
    find = pe.JaxprStackFrame.find_progenitors
    monkeypatch.setattr(pe.JaxprStackFrame, "find_progenitors", lambda self, t: walks.append(1) or find(self, t))
    counts = {}

    def f(x):
        y = jnp.sin(x) * 2
        with compute.traced_construction():
            assert getattr(y, "sharding", None) is None  # flax's check still gets its answer
            with pytest.raises(AttributeError, match="sharding"):
                y.sharding
        counts["inside"] = len(walks)
        with pytest.raises(AttributeError, match="sharding"):
            y.sharding
        counts["outside"] = len(walks) - counts["inside"]
        return y

    jax.make_jaxpr(f)(1.0)
    assert counts == {"inside": 0, "outside": 1}

    def build_abstract():
        build.abstract_model(tiny.get_config())

    threads = [threading.Thread(target=build_abstract) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pe.DynamicJaxprTracer._origin_msg is original
