"""The CPU-only fast paths give the numbers of the plain path they replace.

- attention in chunks of the leading axes (compute.CPU_SCORE_CHUNK_BYTES), at every call site of the real
  model: the CLIP image tower (with the last block's probabilities), the text tower (causal + padding
  mask), TGA's cross attention (slot mask) and spatial attention, the shifted Swin windows (Swin's mask);
  forward and gradients;
- the over-padded 3x3 convolution of the decoder (decoder.conv3x3).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dcp_jax import loss as loss_lib
from dcp_jax import optim
from dcp_jax.models import compute, decoder
from test_model_dcp import images, make_model, small_config, unit_text

ONE_OP, EVERY_ITEM = 1 << 62, 1  # chunk budgets: never chunk / one leading index per chunk


def _loss_and_grads(model, trainable, imgs, text, labels, num_classes):
    def loss_fn(model):
        gt = loss_lib.gt_presence(labels, num_classes)
        out = model(imgs, text, num_slots=4, gt_present=gt, train=True)
        return loss_lib.dcp_loss(out, labels)[0]

    return nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable))(model)


def _scan_count(fn, *args):
    return str(jax.make_jaxpr(fn)(*args)).count("scan[")


def test_chunked_attention_matches_one_batched_op(monkeypatch):
    config = small_config(**{"clip.scan_layers": "false"})  # no scan but the chunks' (counted below)
    model = make_model(config)
    num_classes = 6
    text = jnp.asarray(unit_text(num_classes, 1, 16, seed=3))
    imgs = jnp.asarray(images(2, seed=4))
    ids = np.array([[49406, 5, 7, 49407, 0, 0], [49406, 9, 49407, 0, 0, 0]], np.int32) % 600
    mask = (np.arange(6)[None] < np.array([[4], [3]])).astype(np.int32)
    trainable = optim.trainable(config)
    labels = np.full((2, 64, 64), -1, np.int32)
    labels[:, :32] = 2
    labels[:, 32:, 40:] = 5

    def run():  # traced afresh on every call, so each sees the chunk budget set at the time
        @nnx.jit
        def forward(model, imgs, text, ids, mask):
            pixels = model.preprocess(imgs)
            embeds, aux = model.clip.encode_image(pixels, layers=(0,))
            out = model(imgs, text, num_slots=4, seen=jnp.zeros(num_classes, bool))
            return {"embeds": embeds, "attn_last": aux["attn_last"], "dense": aux["dense"],
                    "logits": out["logits"], "text": model.clip.get_text_features(ids, mask)}

        loss, grads = nnx.jit(_loss_and_grads, static_argnums=(1, 5))(model, trainable, imgs, text, labels,
                                                                      num_classes)
        return {**forward(model, imgs, text, ids, mask), "loss": loss, "grads": nnx.to_pure_dict(grads)}

    with jax.default_matmul_precision("highest"):
        monkeypatch.setattr(compute, "CPU_SCORE_CHUNK_BYTES", ONE_OP)
        assert _scan_count(lambda i: model(i, text, num_slots=4)["logits"], imgs) == 0
        plain = run()
        monkeypatch.setattr(compute, "CPU_SCORE_CHUNK_BYTES", EVERY_ITEM)
        # image tower, text tower, TGA cross + spatial, 2 decoder layers x 2 Swin blocks all chunked
        assert _scan_count(lambda i: model(i, text, num_slots=4)["logits"], imgs) >= 6
        chunked = run()
    flat_plain, flat_chunked = jax.tree.leaves_with_path(plain), jax.tree.leaves(chunked)
    assert len(flat_plain) == len(flat_chunked) > 50
    for (path, a), b in zip(flat_plain, flat_chunked):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("lead,bias_shape", [
    ((3,), None),                 # flattened leading axes
    ((2, 4), (4, 1, 5, 5)),       # Swin: the mask varies over windows (axis 1), not the batch (axis 0)
    ((3,), (3, 1, 1, 5)),         # a per-batch key mask, mapped along with q / k / v
    ((1, 4), (1, 4, 1, 5, 5)),    # full-rank bias over a leading axis of 1: computed as one op
])
def test_chunked_attention_broadcasts_bias_like_the_plain_op(monkeypatch, lead, bias_shape):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((*lead, 5, 2, 3)), jnp.float32) for _ in range(3))
    bias = None if bias_shape is None else jnp.asarray(rng.standard_normal(bias_shape) * 3, jnp.float32)
    monkeypatch.setattr(compute, "CPU_SCORE_CHUNK_BYTES", ONE_OP)
    ref_out, ref_probs = compute.multi_head_attention(q, k, v, bias=bias, return_probs=True)
    monkeypatch.setattr(compute, "CPU_SCORE_CHUNK_BYTES", EVERY_ITEM)
    out, probs = compute.multi_head_attention(q, k, v, bias=bias, return_probs=True)
    assert out.shape == (*lead, 5, 2, 3) and probs.shape == (*lead, 2, 5, 5)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(probs), np.asarray(ref_probs), rtol=1e-6, atol=1e-7)
    # and the plain op is numpy's softmax attention
    scores = np.einsum("...qhd,...khd->...hqk", np.asarray(q), np.asarray(k)) / np.sqrt(3)
    if bias is not None:
        scores = scores + np.asarray(bias)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(ref_probs), p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ref_out), np.einsum("...hqk,...khd->...qhd", p, np.asarray(v)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels", [(8, 4), (24, 32)])
def test_overpadded_conv3x3_is_the_padding_1_conv(channels):
    c_in, c_out = channels
    conv = nnx.Conv(c_in, c_out, (3, 3), padding=1, use_bias=False, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 12, 12, c_in)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        got, want = decoder.conv3x3(conv, x), conv(x)
    assert got.shape == want.shape == (3, 12, 12, c_out)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # the border pixels see zero padding exactly like the plain conv
    np.testing.assert_allclose(np.asarray(got[:, 0]), np.asarray(want[:, 0]), rtol=1e-5, atol=1e-5)


def test_overpadded_conv3x3_gradients_are_the_plain_convs():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 10, 10, 20)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 20, 24)) * 0.1, jnp.float32)
    plain = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),  # noqa: E731
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
    loss = lambda fn: lambda x, k: jnp.sum(jnp.sin(fn(x, k)))  # noqa: E731
    with jax.default_matmul_precision("highest"):
        want = jax.grad(loss(plain), argnums=(0, 1))(x, kernel)
        got = jax.grad(loss(lambda x, k: decoder._conv3x3_eigen(x, k, None)), argnums=(0, 1))(x, kernel)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
