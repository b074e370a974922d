"""CLIP forward parity against transformers' PyTorch CLIPModel (tiny random models built here, no network).

Parity is measured in float32 with `jax.default_matmul_precision("highest")`; tolerances are stated per test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import CLIPConfig as HFCLIPConfig
from transformers import CLIPModel as HFCLIPModel

from dcp_jax.models import clip, clip_convert

FEATURE_ATOL = 1e-5  # image/text features vs torch (issue 2)
POSEMB_ATOL = 1e-4  # resized position embedding vs HF interpolate_pos_encoding=True

# (name, HF config kwargs). Widths are multiples of 64 where the OpenAI loader must infer heads (width // 64).
CASES = {
    "quickgelu_legacy_eos": dict(
        text=dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=16, hidden_act="quick_gelu", eos_token_id=2, bos_token_id=97,
                  pad_token_id=1),
        vision=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, image_size=16,
                    patch_size=4, hidden_act="quick_gelu"),
        projection_dim=24),
    "gelu_modern_eos": dict(
        text=dict(vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3,
                  max_position_embeddings=12, hidden_act="gelu", eos_token_id=57, bos_token_id=100,
                  pad_token_id=0, layer_norm_eps=1e-6),
        vision=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6, image_size=20,
                    patch_size=5, hidden_act="gelu", layer_norm_eps=1e-6),
        projection_dim=16),
    "openai_shaped": dict(  # head_dim 64, like every OpenAI CLIP
        text=dict(vocab_size=99, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=16, hidden_act="quick_gelu", eos_token_id=2, bos_token_id=97,
                  pad_token_id=1),
        vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                    image_size=32, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=64),
}


def make_hf_clip(case: str, seed: int = 0) -> HFCLIPModel:
    """A random HF CLIPModel whose every parameter (LayerNorms, biases, logit_scale included) is perturbed."""
    spec = CASES[case]
    config = HFCLIPConfig(text_config=spec["text"], vision_config=spec["vision"],
                          projection_dim=spec["projection_dim"])
    config._attn_implementation = "eager"  # so output_attentions returns probabilities
    torch.manual_seed(seed)
    model = HFCLIPModel(config).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def hf_state_numpy(model: HFCLIPModel) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def jax_from_hf(model: HFCLIPModel, dtype=jnp.float32) -> clip.CLIPModel:
    config = clip.CLIPConfig.from_hf(model.config.to_dict())
    return clip.model_from_params(config, clip_convert.hf_to_ours(hf_state_numpy(model)), dtype)


def run(model: clip.CLIPModel, fn, *args):
    """fn(model, *args) under jax.jit (eager op-by-op dispatch is slow on CPU)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda st, *a: fn(nnx.merge(graphdef, st), *a))(state, *args)


def features(out):
    """transformers 5.x returns an output object from get_*_features, 4.x a tensor."""
    return (out.pooler_output if hasattr(out, "pooler_output") else out).detach().numpy()


def random_pixels(model: HFCLIPModel, batch=2, size=None, seed=0):
    size = size or model.config.vision_config.image_size
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)  # NCHW


def random_text(case: str, batch=3, seed=0):
    """Token ids with an EOT at a different position per row, padding after it, and an attention mask."""
    t = CASES[case]["text"]
    rng = np.random.default_rng(seed)
    length, eos, vocab = t["max_position_embeddings"], t["eos_token_id"], t["vocab_size"]
    legacy = eos == 2
    eot = vocab - 1 if legacy else eos  # legacy configs pool at argmax: EOT must be the largest id
    ids = rng.integers(3, vocab - 2, size=(batch, length))
    ids[ids == eot] = 3
    mask = np.zeros_like(ids)
    for row, end in enumerate(np.linspace(3, length - 1, batch).astype(int)):
        ids[row, 0] = t["bos_token_id"] if t["bos_token_id"] < vocab - 1 else 4
        ids[row, end] = eot
        ids[row, end + 1:] = t["pad_token_id"]
        mask[row, : end + 1] = 1
    return ids, mask


@pytest.fixture(scope="module", params=["quickgelu_legacy_eos", "gelu_modern_eos"])
def case(request):
    """HF model, our model, inputs, and every output of ours from ONE jitted call (XLA CPU compiles are slow)."""
    name = request.param
    hf = make_hf_clip(name)
    model = jax_from_hf(hf)
    pixels = random_pixels(hf, batch=2, seed=1)
    ids, mask = random_text(name)
    all_layers = tuple(range(hf.config.vision_config.num_hidden_layers))

    def everything(m, x, ids, mask):
        embeds, aux = m.encode_image(x, layers=all_layers)
        return dict(image=m.get_image_features(x), embeds=embeds, aux=aux,
                    plain_dense=m.encode_image(x, dense_mode="plain")[1]["dense"],
                    text=m.get_text_features(ids, mask), text_nomask=m.get_text_features(ids))

    with jax.default_matmul_precision("highest"):
        out = run(model, everything, jnp.asarray(pixels.transpose(0, 2, 3, 1)), ids, mask)
    return dict(name=name, hf=hf, model=model, pixels=pixels, ids=ids, mask=mask, layers=all_layers,
                out=jax.tree.map(np.asarray, out))


def test_image_and_text_features_match_torch(case):
    hf, out = case["hf"], case["out"]
    ids, mask = torch.tensor(case["ids"]), torch.tensor(case["mask"])
    with torch.no_grad():
        ref_img = features(hf.get_image_features(pixel_values=torch.tensor(case["pixels"])))
        ref_txt = features(hf.get_text_features(input_ids=ids, attention_mask=mask))
        ref_txt_nomask = features(hf.get_text_features(input_ids=ids))
    for key, ref in (("image", ref_img), ("embeds", ref_img), ("text", ref_txt), ("text_nomask", ref_txt_nomask)):
        assert out[key].shape == ref.shape, key
        np.testing.assert_allclose(out[key], ref, rtol=0, atol=FEATURE_ATOL, err_msg=key)
    # pooling at another position (e.g. the wrong EOT rule) would not match
    other = features(hf.get_text_features(input_ids=torch.roll(ids, 1, dims=1)))
    assert np.abs(other - ref_txt).max() > 100 * FEATURE_ATOL


def catseg_dense_reference(hf: HFCLIPModel, pixels: np.ndarray) -> tuple[np.ndarray, dict]:
    """CAT-Seg `forward_dense` for the last block, written like CAT-Seg's model_vpt.py (packed in_proj, out_proj
    applied to q, k and v, keep v, residual = CLS input), on HF's torch modules."""
    vm = hf.vision_model
    with torch.no_grad():
        out = vm(pixel_values=torch.tensor(pixels), output_hidden_states=True, output_attentions=True)
        x = out.hidden_states[-2]  # input of the last block, [B, 1+N, W]
        last = vm.encoder.layers[-1]
        attn = last.self_attn
        in_proj_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        in_proj_b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        y = torch.nn.functional.linear(last.layer_norm1(x), in_proj_w, in_proj_b)  # [B, L, 3W]
        b, length, three_w = y.shape
        y = y.reshape(b, length, 3, three_w // 3).permute(2, 0, 1, 3)  # [3, B, L, W]
        y = torch.nn.functional.linear(y, attn.out_proj.weight, attn.out_proj.bias)
        v = y[2] + x[:, :1]
        v = v + last.mlp(last.layer_norm2(v))
        dense = hf.visual_projection(vm.post_layernorm(v[:, 1:])).numpy()
        plain = hf.visual_projection(vm.post_layernorm(out.last_hidden_state[:, 1:])).numpy()
    extras = {"hidden_states": [h.numpy() for h in out.hidden_states],
              "attn_last": out.attentions[-1].mean(1)[:, 1:, 1:].numpy(), "plain": plain}
    return dense, extras


def test_encode_image_aux_matches_catseg_reference(case):
    hf, out, layers = case["hf"], case["out"], case["layers"]
    pixels = case["pixels"]
    ref_dense, ref = catseg_dense_reference(hf, pixels)
    grid = hf.config.vision_config.image_size // hf.config.vision_config.patch_size
    aux = out["aux"]
    b, d = pixels.shape[0], hf.config.projection_dim
    assert aux["dense"].shape == (b, grid, grid, d)
    np.testing.assert_allclose(aux["dense"], ref_dense.reshape(b, grid, grid, d), rtol=0, atol=FEATURE_ATOL)
    np.testing.assert_allclose(out["plain_dense"], ref["plain"].reshape(b, grid, grid, d), rtol=0, atol=FEATURE_ATOL)
    # the CAT-Seg path really differs from the plain one
    assert np.abs(aux["dense"] - out["plain_dense"]).max() > 1e-2
    assert set(aux) == {"dense", "attn_last"} | {f"layer_{i}" for i in layers}
    for i in layers:
        want = ref["hidden_states"][i + 1][:, 1:].reshape(b, grid, grid, -1)
        np.testing.assert_allclose(aux[f"layer_{i}"], want, rtol=0, atol=FEATURE_ATOL)
    assert aux["attn_last"].shape == (b, grid * grid, grid * grid)
    np.testing.assert_allclose(aux["attn_last"], ref["attn_last"], rtol=0, atol=1e-6)


def test_resized_posemb_matches_hf_interpolation(tmp_path):
    hf = make_hf_clip("quickgelu_legacy_eos")
    hf.save_pretrained(tmp_path)
    model, config = clip.load_clip(tmp_path, image_size=28)  # grid 4x4 -> 7x7
    assert config.vision.image_size == 28 and model.config.vision.image_size == 28
    pixels = random_pixels(hf, size=28)
    with torch.no_grad():
        ref = features(hf.get_image_features(pixel_values=torch.tensor(pixels), interpolate_pos_encoding=True))
    nhwc = jnp.asarray(pixels.transpose(0, 2, 3, 1))
    with jax.default_matmul_precision("highest"):
        ours = run(model, lambda m, x: m.get_image_features(x), nhwc)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=POSEMB_ATOL)
    _, aux = nnx.eval_shape(lambda m, x: m.encode_image(x), model, nhwc)
    assert aux["dense"].shape[1:3] == (7, 7)


@pytest.mark.parametrize("old,new", [(4, 7), (14, 24), (6, 3)])
def test_resize_posemb_is_torch_bicubic(old, new):
    rng = np.random.default_rng(old)
    table = rng.standard_normal((1 + old * old, 8)).astype(np.float32)
    grid = torch.tensor(table[1:].reshape(1, old, old, 8)).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(-1, 8).numpy()
    out = clip_convert.resize_posemb(table, new)
    assert out.shape == (1 + new * new, 8)
    np.testing.assert_array_equal(out[0], table[0])  # CLS row kept
    np.testing.assert_allclose(out[1:], ref, rtol=0, atol=1e-5)


def test_bfloat16_compute_keeps_fp32_params_and_is_close(case):
    model16 = jax_from_hf(case["hf"], dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(model16, nnx.Param)))
    nhwc = jnp.asarray(case["pixels"].transpose(0, 2, 3, 1))
    e16, a16 = run(model16, lambda m, x: m.encode_image(x), nhwc)
    assert e16.dtype == jnp.float32 and a16["dense"].dtype == jnp.float32

    def cos(a, b):
        a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    assert cos(case["out"]["embeds"], e16) > 0.99 and cos(case["out"]["aux"]["dense"], a16["dense"]) > 0.99


def test_encode_image_rejects_bad_input():
    model = jax_from_hf(make_hf_clip("quickgelu_legacy_eos"))

    def trace(x, **kw):  # shape checks happen while tracing; nothing is computed
        return nnx.eval_shape(lambda m, x: m.encode_image(x, **kw), model, x)

    with pytest.raises(ValueError, match="expects 16x16"):
        trace(jnp.zeros((1, 20, 20, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        trace(jnp.zeros((1, 3, 16, 16)))
    with pytest.raises(ValueError, match="out of range"):
        trace(jnp.zeros((1, 16, 16, 3)), layers=(3,))
    with pytest.raises(ValueError, match="dense_mode"):
        trace(jnp.zeros((1, 16, 16, 3)), dense_mode="maskclip")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        nnx.eval_shape(lambda m, i: m.get_text_features(i), model, jnp.zeros((1, 17), jnp.int32))


def test_config_json_round_trip():
    hf = make_hf_clip("gelu_modern_eos")
    config = clip.CLIPConfig.from_hf(hf.config.to_dict())
    assert config.text.hidden_act == "gelu" and config.text.eos_token_id == 57
    assert config.vision.layer_norm_eps == 1e-6 and config.projection_dim == 16
    assert clip.CLIPConfig.from_hf(config.to_hf()) == config
    again = HFCLIPConfig(**config.to_hf())
    assert again.vision_config.image_size == 20 and again.text_config.max_position_embeddings == 12
    with pytest.raises(ValueError, match="model_type"):
        clip.CLIPConfig.from_hf({"model_type": "siglip"})


def test_random_init_model():
    config = clip.CLIPConfig(
        text=clip.CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=8),
        vision=clip.CLIPVisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=8, patch_size=4),
        projection_dim=16)
    model = clip.CLIPModel(config, rngs=nnx.Rngs(0))
    shapes = {"/".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert shapes == clip.expected_param_shapes(config)
    np.testing.assert_allclose(float(model.logit_scale[...]), config.logit_scale_init_value, rtol=1e-6)
    np.testing.assert_array_equal(model.vision_model.post_layernorm.scale[...], 1.0)
    kernel = np.asarray(model.text_model.embeddings.token_embedding.embedding[...])
    assert 0.015 < kernel.std() < 0.025  # normal(0.02) init


def test_the_patch_embedding_as_a_matmul_equals_the_convolution():
    """On GPUs and TPUs the patch embedding is one matmul over the image cut into patches (CUDA graphs take a
    cuBLAS call, not a cuDNN convolution); traced for a GPU here, it gives the CPU's convolution (float32,
    highest precision: rtol 1e-5, atol 1e-5, the same sums in another order), also for an image whose sides
    are not multiples of the patch size (VALID: the remainder is cut)."""
    from dcp_jax.models import compute

    model = jax_from_hf(make_hf_clip("openai_shaped"))
    embeddings = model.vision_model.embeddings
    patch = embeddings.patch_embedding.kernel_size[0]
    for size in (2 * patch, 2 * patch + 3):
        pixels = jnp.asarray(np.random.default_rng(size).standard_normal((2, size, size + patch, 3)), jnp.float32)
        with jax.default_matmul_precision("highest"):
            conv = np.asarray(embeddings.embed_patches(pixels))
            with compute.compiling_for("gpu"):
                matmul = np.asarray(embeddings.embed_patches(pixels))
        assert conv.shape == matmul.shape == (2, size // patch, size // patch + 1, model.config.vision.hidden_size)
        np.testing.assert_allclose(matmul, conv, rtol=1e-5, atol=1e-5)
