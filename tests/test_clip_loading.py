"""load_clip over every supported format, its errors, save_hf_checkpoint and the tiny-CLIP writer."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx, serialization
from safetensors.numpy import load_file, save_file
from test_clip import (FEATURE_ATOL, features, hf_state_numpy, make_hf_clip, random_pixels, random_text,
                       run)
from transformers import CLIPModel as HFCLIPModel
from transformers import CLIPTokenizer

from dcp_jax.configs.tiny import TINY_CLIP
from dcp_jax.models import clip, clip_convert
from dcp_jax.models.build import write_tiny_clip

CASE = "openai_shaped"  # head_dim 64, so the OpenAI loader can infer the head count from shapes


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An HF model saved as a checkpoint dir, its torch features on fixed inputs, and a features function."""
    hf = make_hf_clip(CASE, seed=3)
    hf_dir = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(hf_dir)
    pixels = random_pixels(hf, batch=2)
    ids, mask = random_text(CASE)
    with torch.no_grad():
        ref = (features(hf.get_image_features(pixel_values=torch.tensor(pixels))),
               features(hf.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))))

    # One compiled function per config (all checkpoints of this case share it), so the tests stay fast.
    compiled = {}

    def feats(model):
        graphdef, state = nnx.split(model)
        key = (model.config.replace(logit_scale_init_value=0.0), str(model.dtype))  # same structure
        if key not in compiled:
            def both(st, x, i, a):
                m = nnx.merge(graphdef, st)
                return m.get_image_features(x), m.get_text_features(i, a)
            compiled[key] = jax.jit(both)
        with jax.default_matmul_precision("highest"):
            img, txt = compiled[key](state, jnp.asarray(pixels.transpose(0, 2, 3, 1)), ids, mask)
        return np.asarray(img), np.asarray(txt)

    return dict(hf=hf, dir=hf_dir, ref=ref, feats=feats, state=hf_state_numpy(hf))


def assert_same_features(model, reference, atol=FEATURE_ATOL):
    img, txt = reference["feats"](model)
    np.testing.assert_allclose(img, reference["ref"][0], rtol=0, atol=atol)
    np.testing.assert_allclose(txt, reference["ref"][1], rtol=0, atol=atol)


def openai_state_dict(hf_state: dict[str, np.ndarray], *, packed_qkv=True) -> dict[str, torch.Tensor]:
    """The HF weights renamed to OpenAI CLIP's layout (written here independently of clip_convert)."""
    sd = {
        "visual.conv1.weight": hf_state["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": hf_state["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": hf_state["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": hf_state["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": hf_state["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": hf_state["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": hf_state["vision_model.post_layernorm.bias"],
        "visual.proj": hf_state["visual_projection.weight"].T,
        "token_embedding.weight": hf_state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf_state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf_state["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf_state["text_model.final_layer_norm.bias"],
        "text_projection": hf_state["text_projection.weight"].T,
        "logit_scale": hf_state["logit_scale"],
    }
    for tower, prefix in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        i = 0
        while f"{tower}.encoder.layers.{i}.layer_norm1.weight" in hf_state:
            src, dst = f"{tower}.encoder.layers.{i}", f"{prefix}.resblocks.{i}"
            for kind in ("weight", "bias"):
                q, k, v = (hf_state[f"{src}.self_attn.{p}_proj.{kind}"] for p in "qkv")
                if packed_qkv:
                    sd[f"{dst}.attn.in_proj_{kind}"] = np.concatenate([q, k, v])
                else:  # CAT-Seg's model_vpt layout
                    for p, value in zip("qkv", (q, k, v)):
                        sd[f"{dst}.attn.{p}_proj_{kind}"] = value
                sd[f"{dst}.attn.out_proj.{kind}"] = hf_state[f"{src}.self_attn.out_proj.{kind}"]
                sd[f"{dst}.ln_1.{kind}"] = hf_state[f"{src}.layer_norm1.{kind}"]
                sd[f"{dst}.ln_2.{kind}"] = hf_state[f"{src}.layer_norm2.{kind}"]
                sd[f"{dst}.mlp.c_fc.{kind}"] = hf_state[f"{src}.mlp.fc1.{kind}"]
                sd[f"{dst}.mlp.c_proj.{kind}"] = hf_state[f"{src}.mlp.fc2.{kind}"]
            i += 1
    return {k: torch.tensor(np.array(v, order="C")) for k, v in sd.items()}


def torchscript_archive(state: dict[str, torch.Tensor], path):
    """Save `state` as a TorchScript archive, like OpenAI's released .pt files."""
    root = torch.nn.Module()
    for name, tensor in state.items():
        *parents, leaf = name.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        if tensor.is_floating_point():
            module.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
        else:
            module.register_buffer(leaf, tensor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.x deprecates TorchScript
        torch.jit.script(root).save(str(path))


def hf_flax_tree(hf_state: dict[str, np.ndarray]) -> dict:
    """The transformers-4.x FlaxCLIPModel params tree (modeling_flax_pytorch_utils rename rules, written here)."""
    tree: dict = {}
    for name, value in hf_state.items():
        if name.endswith("position_ids"):
            continue
        *parents, leaf = name.split(".")
        if leaf == "weight":
            if parents[-1] in ("layer_norm1", "layer_norm2", "pre_layrnorm", "post_layernorm", "final_layer_norm"):
                leaf = "scale"
            elif parents[-1] in ("token_embedding", "position_embedding"):
                leaf = "embedding"
            elif value.ndim == 4:
                leaf, value = "kernel", value.transpose(2, 3, 1, 0)
            else:
                leaf, value = "kernel", value.T
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.asarray(value)
    return tree


# --------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------


def test_hf_safetensors_dir(reference):
    model, config = clip.load_clip(reference["dir"])
    assert config == clip.CLIPConfig.from_hf(reference["hf"].config.to_dict())
    assert_same_features(model, reference)


def test_hf_pytorch_bin_with_position_ids_buffers(reference, tmp_path):
    state = {k: torch.tensor(v) for k, v in reference["state"].items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # old checkpoints carry these
    state["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((reference["dir"] / "config.json").read_text())
    model, _ = clip.load_clip(tmp_path)
    assert_same_features(model, reference)


@pytest.mark.parametrize("wrap", [False, True], ids=["hf_layout", "params_wrapped"])
def test_flax_msgpack_dir(reference, tmp_path, wrap):
    tree = hf_flax_tree(reference["state"])
    tree["vision_model"]["encoder"]["layers"] = {str(k): v for k, v in
                                                 tree["vision_model"]["encoder"]["layers"].items()}
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize({"params": tree} if wrap else tree))
    (tmp_path / "config.json").write_text((reference["dir"] / "config.json").read_text())
    model, _ = clip.load_clip(tmp_path)
    assert_same_features(model, reference)


@pytest.mark.parametrize("variant", ["state_dict", "state_dict_fp16", "torchscript", "split_qkv"])
def test_openai_checkpoint(reference, tmp_path, variant):
    sd = openai_state_dict(reference["state"], packed_qkv=variant != "split_qkv")
    if variant == "state_dict_fp16":
        sd = {k: v.half() for k, v in sd.items()}
    path = tmp_path / "ViT-tiny.pt"
    if variant == "torchscript":
        sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(16), vocab_size=torch.tensor(99))
        torchscript_archive(sd, path)
    else:
        torch.save(sd, path)
    model, config = clip.load_clip(path)
    expected = clip.CLIPConfig.from_hf(reference["hf"].config.to_dict())
    assert config.vision == expected.vision and config.projection_dim == expected.projection_dim
    assert config.text.eos_token_id == 2  # OpenAI pools at argmax(input_ids)
    if variant != "state_dict_fp16":
        assert_same_features(model, reference)
    else:  # same numbers as the HF model whose weights went through fp16
        rounded = {k: torch.tensor(v).half().float() for k, v in reference["state"].items()}
        hf16 = make_hf_clip(CASE)
        hf16.load_state_dict(rounded)
        pixels = random_pixels(hf16, batch=2)
        ids, mask = random_text(CASE)
        with torch.no_grad():
            ref_img = features(hf16.get_image_features(pixel_values=torch.tensor(pixels)))
            ref_txt = features(hf16.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)))
        img, txt = reference["feats"](model)
        np.testing.assert_allclose(img, ref_img, rtol=0, atol=FEATURE_ATOL)
        np.testing.assert_allclose(txt, ref_txt, rtol=0, atol=FEATURE_ATOL)
        assert np.abs(img - reference["ref"][0]).max() > FEATURE_ATOL  # fp16 rounding is visible


def test_image_size_on_load_resizes_and_keeps_other_params(reference):
    model, config = clip.load_clip(reference["dir"], image_size=48)
    assert config.vision.image_size == 48
    posemb = model.vision_model.embeddings.position_embedding.embedding[...]
    assert posemb.shape == (1 + 6 * 6, 128)
    original = reference["state"]["vision_model.embeddings.position_embedding.weight"]
    np.testing.assert_array_equal(np.asarray(posemb[0]), original[0])
    np.testing.assert_allclose(np.asarray(posemb[1:]),
                               clip_convert.resize_posemb(original, 6)[1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        clip.load_clip(reference["dir"], image_size=50)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def _copy_with(reference, tmp_path, tensors=None, config=None):
    tensors = dict(load_file(reference["dir"] / "model.safetensors")) if tensors is None else tensors
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((reference["dir"] / "config.json").read_text()) if config is None else config
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_error_missing_unexpected_and_wrong_shape_listed_together(reference, tmp_path):
    tensors = dict(load_file(reference["dir"] / "model.safetensors"))
    del tensors["vision_model.encoder.layers.1.mlp.fc2.bias"]
    tensors["vision_model.extra_head.weight"] = np.zeros((2, 2), np.float32)
    tensors["text_model.final_layer_norm.bias"] = np.zeros((7,), np.float32)
    with pytest.raises(ValueError) as err:
        clip.load_clip(_copy_with(reference, tmp_path, tensors))
    msg = str(err.value)
    assert "missing (1): vision_model/encoder/layers/1/mlp/fc2/bias" in msg
    assert "unexpected (1): vision_model/extra_head/kernel" in msg
    assert "wrong shape (1): text_model/final_layer_norm/bias: checkpoint (7,) vs expected (128,)" in msg


def test_error_config_does_not_match_weights(reference, tmp_path):
    cfg = json.loads((reference["dir"] / "config.json").read_text())
    cfg["vision_config"]["num_hidden_layers"] = 3
    cfg["vision_config"]["image_size"] = 64
    with pytest.raises(ValueError, match="does not match .*config.json") as err:
        clip.load_clip(_copy_with(reference, tmp_path, config=cfg))
    assert "vision_model/encoder/layers/2/self_attn/q_proj/kernel" in str(err.value)  # missing layer
    assert "position_embedding/embedding: checkpoint (17, 128) vs expected (65, 128)" in str(err.value)


def test_error_unknown_formats_and_missing_files(reference, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clip.load_clip(tmp_path / "nope")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown CLIP checkpoint format.*expected an HF checkpoint directory"):
        clip.load_clip(tmp_path / "weights.npz")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds no CLIP weights; expected one of model.safetensors"):
        clip.load_clip(empty)
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    save_file({"a": np.zeros(1, np.float32)}, str(no_config / "model.safetensors"))
    with pytest.raises(ValueError, match="no config.json"):
        clip.load_clip(no_config)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an OpenAI CLIP state dict"):
        clip.load_clip(tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read"):
        clip.load_clip(tmp_path / "garbage.pt")
    (tmp_path / "siglip").mkdir()
    with pytest.raises(ValueError, match="expected 'clip'"):
        clip.load_clip(_copy_with(reference, tmp_path / "siglip", config={"model_type": "siglip"}))


def test_error_openai_width_not_multiple_of_64(tmp_path):
    hf = make_hf_clip("quickgelu_legacy_eos")  # width 32: OpenAI's heads = width // 64 rule cannot apply
    torch.save(openai_state_dict(hf_state_numpy(hf)), tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="cannot infer the visual head count"):
        clip.load_clip(tmp_path / "odd.pt")


# --------------------------------------------------------------------------------------------------
# Saving, and the tiny-CLIP writer
# --------------------------------------------------------------------------------------------------


def test_save_hf_checkpoint_round_trips_through_transformers(reference, tmp_path):
    model, config = clip.load_clip(reference["dir"])
    clip.save_hf_checkpoint(model, config, tmp_path)
    with open(tmp_path / "model.safetensors", "rb") as f:  # transformers 4.x needs format=pt
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "pt"}
    reloaded = HFCLIPModel.from_pretrained(tmp_path)
    original = reference["hf"].state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    again, config2 = clip.load_clip(tmp_path)
    assert config2 == config
    for ours, theirs in zip(reference["feats"](again), reference["feats"](model)):
        np.testing.assert_array_equal(ours, theirs)


def test_write_tiny_clip_loads_in_transformers_and_is_deterministic(tmp_path):
    path = write_tiny_clip(tmp_path / "a", TINY_CLIP, seed=0)
    write_tiny_clip(tmp_path / "b", TINY_CLIP, seed=0)
    write_tiny_clip(tmp_path / "c", TINY_CLIP, seed=1)
    for name in ("model.safetensors", "vocab.json", "merges.txt", "config.json"):
        assert (path / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (path / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()

    hf = HFCLIPModel.from_pretrained(path)
    tok = CLIPTokenizer.from_pretrained(path)
    text_cfg = hf.config.text_config
    assert len(tok) == text_cfg.vocab_size == hf.text_model.embeddings.token_embedding.weight.shape[0]
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|endoftext|>"
    assert (tok.bos_token_id, tok.eos_token_id) == (text_cfg.bos_token_id, text_cfg.eos_token_id)
    assert hf.config.vision_config.image_size == TINY_CLIP["vision"]["image_size"]
    np.testing.assert_allclose(hf.logit_scale.item(), np.log(100.0), rtol=1e-6)
    # HF CLIP's initialisation scale: kernels N(0, 1/fan_in).
    q = hf.vision_model.encoder.layers[0].self_attn.q_proj.weight
    np.testing.assert_allclose(float(q.std()), TINY_CLIP["vision"]["hidden_size"] ** -0.5, rtol=0.2)
    for text in ["a photo of a person in the scene.", "Wall-E's Zürich café, 1984!", "skyscraper"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.unk_token_id not in ids[1:-1]
        assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")
    assert len(tok("person")["input_ids"]) == 3  # common class names are single tokens

    # our loader reads the same directory and agrees with transformers on real tokenized text
    model, _ = clip.load_clip(path)
    enc = tok(["a photo of a cat.", "a bad photo of the sky."], padding="max_length", max_length=77,
              return_tensors="np")
    with torch.no_grad():
        ref = features(hf.get_text_features(input_ids=torch.tensor(enc["input_ids"]),
                                            attention_mask=torch.tensor(enc["attention_mask"])))
        pixels = random_pixels(hf, batch=1)
        ref_img = features(hf.get_image_features(pixel_values=torch.tensor(pixels)))
    with jax.default_matmul_precision("highest"):
        txt = run(model, lambda m, i, a: m.get_text_features(i, a), enc["input_ids"], enc["attention_mask"])
        img = run(model, lambda m, x: m.get_image_features(x), jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(txt), ref, rtol=0, atol=FEATURE_ATOL)
    np.testing.assert_allclose(np.asarray(img), ref_img, rtol=0, atol=FEATURE_ATOL)
