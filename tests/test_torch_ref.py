"""dcp_jax.torch_ref: the PyTorch reference built from an export reproduces the JAX model.

For tiny random models covering every config switch that changes parameters or the computation
(five configs, the switches grouped to keep compile time low): JAX model -> export_format.write_export ->
transformers CLIPModel + torch_ref -> the same numbers. Tolerances (float32 on CPU, JAX at
"highest" matmul precision): CLIP features 1e-5, head logits on the same inputs 1e-4 (what
`--verify` accepts); measured values are ~3e-6 for both.
"""

from __future__ import annotations

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from dcp_jax import checkpoint as ckpt_lib
from dcp_jax import export, export_format, files, forward, optim, torch_ref
from dcp_jax import rules as rules_lib
from dcp_jax import text as text_lib
from dcp_jax.configs import tiny
from dcp_jax.models import build, dcp, selection, tiny_clip
from dcp_jax.torch_ref import verify

FEATURE_ATOL = 1e-5
LOGIT_ATOL = verify.TOLERANCE  # 1e-4

# Every parameter-changing switch is off (or non-default) in at least one case, on in another.
CASES = {
    # tokens prompt, CA (at CLIP's width) + SA, c_k in the guidance, 2 decoder layers with every fusion, catseg, P = 1
    "default": {},
    # learnt context + fine-tuned text tower (frozen q/v copy), no c_k, CA only (SA = identity
    # attention), 1 decoder layer with attention features only in Q/K, plain dense, P = 80;
    # a 4x4 grid (one window covers the map: no shift) and 48 px images (resized to 32)
    "context_ft": {"model.guidance.prompt": "context", "clip.text_finetune": "guidance", "model.guidance.cls_logit": False,
                   "model.tga.self_attention": False, "model.decoder.layers": 1, "model.decoder.fuse_shallow": False,
                   "clip.dense_mode": "plain", "text.templates": "imagenet80", "clip.image_size": 32,
                   "train.crop_size": 48},
    # no prompt, CA (at the head's width) + SA, no Swin blocks, shallow features in the upsampling path only,
    # no cost path
    "no_prompt": {"model.guidance.prompt": "none", "model.decoder.spatial_enhance": False,
                  "model.decoder.fuse_cost": False, "model.tga.cross_attention_width": "head"},
    # SA only, 1 decoder layer with shallow features only in Q/K
    "sa_only": {"model.tga.cross_attention": False, "model.decoder.layers": 1, "model.decoder.fuse_attn": False},
    # neither CA nor SA, no decoder layer: the head convolves the cost embedding
    "cost_only": {"model.tga.cross_attention": False, "model.tga.self_attention": False, "model.decoder.layers": 0},
}


def make_config(overrides: dict):
    c = tiny.get_config()
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        node = c
        for part in section.split("."):
            node = node[part]
        node[name] = value
    return c


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    for name, content in tiny_clip.tiny_tokenizer_files(1024).items():
        (folder / name).write_text(content, encoding="utf-8")
    return folder


def random_model(config, seed: int = 0) -> dcp.DCPCLIP:
    """A DCPCLIP with random weights drawn in numpy: no init program to compile (create_model's takes
    ~10 s per config here). Kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.1) and biases N(0, 0.1) (so
    that getting a LayerNorm / GroupNorm's parameters wrong shows), embeddings N(0, 0.02), logit
    scale log(100). With text_finetune the frozen q/v copy is drawn too, so it differs from the tower."""
    rng = np.random.default_rng(seed)
    given = {}
    for path, var in rules_lib.flat_params(build.abstract_model(config)):
        shape, leaf = var.get_value().shape, path.rsplit("/", 1)[-1]
        noise = rng.standard_normal(shape)
        value = {"kernel": noise / np.sqrt(np.prod(shape[:-1])), "scale": 1 + 0.1 * noise, "embedding": 0.02 * noise,
                 "logit_scale": np.full(shape, np.log(100.0))}.get(leaf, 0.1 * noise)
        given[path] = value.astype(np.float32)
    clip_config = build.clip_config_for(config)
    # Placed like export_format.load_export places its model, so --verify below reuses the compiled programs.
    return build.init_module(lambda rngs: dcp.DCPCLIP(config, clip_config, rngs=rngs), mesh_config=config.mesh,
                             given=given)


_BUILT: dict = {}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tokenizer_dir, tmp_path_factory):
    """(config, JAX model, export dir, torch reference) per case, built once per module."""
    name = request.param
    if name not in _BUILT:
        config = make_config(CASES[name])
        model = random_model(config)
        out = export_format.write_export(model, config, tmp_path_factory.mktemp(f"export_{name}"), tokenizer_dir=tokenizer_dir,
                                  train_classes=verify.class_names(3))
        _BUILT[name] = (config, model, out, torch_ref.load_reference(out))
    return _BUILT[name]


def jitted(fn, model, *args):
    graphdef, state = nnx.split(model)
    with jax.default_matmul_precision("highest"):
        return jax.device_get(jax.jit(lambda st, *a: fn(nnx.merge(graphdef, st), *a))(state, *args))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _validate(graphdef, state, logits, slot_class, slot_valid, features, text_embeds, seen):
    return nnx.merge(graphdef, state).validate(logits, slot_class, slot_valid, features,
                                               selection.mean_text_embedding(text_embeds), seen)


# --------------------------------------------------------------------------------------------------
# The same numbers
# --------------------------------------------------------------------------------------------------


def test_features_and_head_logits_match_jax(case):
    config, model, out, reference = case
    r = verify.compare_export(out, model=model, reference=reference, num_classes=6)
    assert set(r["features"]) == {"cls", "dense", "attn_last"} | {f"layer_{i}" for i in config.clip.guidance_layers}
    for name, diff in r["features"].items():
        assert diff <= FEATURE_ATOL, (name, diff)
    assert r["logits"] <= LOGIT_ATOL  # decode on the same features, slots and guidance
    assert r["end_to_end"] <= LOGIT_ATOL  # decode on torch's own features (and guidance)
    if dcp.reencodes_text(config):
        assert r["guidance"] <= FEATURE_ATOL  # the slots' re-encoded text: context vectors, fine-tuned tower
    else:
        assert r["guidance"] is None
    assert r["num_slots"] == 6 and r["slot_valid"].shape == (2, 6)
    assert r["slot_valid"].any(axis=1).all()


def test_torch_modules_mirror_the_flax_modules(case):
    """Each flax layer of the head has its torch module at the same path, with the same hyper-parameters
    (some, like a LayerNorm eps of 1e-6 instead of 1e-5, move the tiny model's logits by < 1e-4 only)."""
    _, model, _, reference = case
    checked = 0
    for path, node in nnx.iter_graph(model):
        if not path or path[0] == "clip" or not isinstance(node, (nnx.Linear, nnx.Conv, nnx.ConvTranspose,
                                                                  nnx.LayerNorm, nnx.GroupNorm)):
            continue
        module = reference.head.get_submodule(".".join(map(str, path)))
        if isinstance(node, nnx.Linear):
            assert isinstance(module, torch.nn.Linear) and (module.in_features, module.out_features) == (
                node.in_features, node.out_features), path
        elif isinstance(node, nnx.LayerNorm):
            assert isinstance(module, torch.nn.LayerNorm) and module.eps == node.epsilon == 1e-5, path
        elif isinstance(node, nnx.GroupNorm):
            assert isinstance(module, torch.nn.GroupNorm), path
            assert (module.num_groups, module.eps) == (node.num_groups, node.epsilon), path
        elif isinstance(node, nnx.ConvTranspose):
            assert isinstance(module, torch.nn.ConvTranspose2d) and node.padding == "VALID", path
            assert (module.kernel_size, module.stride, module.padding) == (
                tuple(node.kernel_size), tuple(node.strides), (0, 0)), path
        else:
            assert isinstance(module, torch.nn.Conv2d) and node.strides in (1, (1, 1)), path
            assert (module.kernel_size, module.padding) == (tuple(node.kernel_size), (node.padding,) * 2), path
        checked += 1
    assert checked == len({name.rsplit(".", 1)[0] for name in reference.head.state_dict()
                           if not name.startswith(("alignment.prompt_tokens", "text_context"))})


@pytest.mark.parametrize("case", ["default", "context_ft"], indirect=True)
def test_full_inference_forward_matches_jax(case):
    """TorchDCP.forward (encode, DCS, head, tag validation) against the JAX stages on the same images."""
    config, model, out, reference = case
    images, text = verify.random_inputs(config, model.clip_dim, seed=3, num_images=2, num_classes=6)
    seen = np.array([True, False, True, False, False, True])
    tokens = verify.guidance_inputs(out, reference, 6)

    # The JAX stages through the programs compare_export compiled (same shapes), plus tag validation.
    graphdef, state = nnx.split(model)
    with jax.default_matmul_precision("highest"):
        features, dcs = verify._encode_select(graphdef, state, images, text, num_slots=6)
        guidance = (verify._guidance(graphdef, state, *tokens) if tokens is not None
                    else selection.mean_text_embedding(jnp.asarray(text)))
        logits = verify._decode(graphdef, state, features, text, dcs["slot_class"], dcs["slot_valid"], guidance)
        final, relabelled = _validate(graphdef, state, logits, dcs["slot_class"], dcs["slot_valid"], features, text,
                                      seen)
    want = jax.device_get(dict(logits=logits, slot_class_dcs=dcs["slot_class"], slot_valid=dcs["slot_valid"],
                               slot_class=final, tv_relabelled=relabelled, dcs_selected=dcs["dcs_selected"]))
    with torch.no_grad():
        guidance = reference.guidance_text(*tokens) if tokens is not None else None
        got = reference(images, text, guidance, seen, max_slots=6, bucket=False)
        bucketed = reference(images, text, guidance, seen, max_slots=6)
    assert (~want["slot_valid"]).any() and want["tv_relabelled"].any()  # invalid slots and relabelling occur
    for key in ("slot_class_dcs", "slot_valid", "slot_class", "tv_relabelled", "dcs_selected"):
        np.testing.assert_array_equal(got[key].numpy(), want[key], err_msg=key)
    np.testing.assert_allclose(got["logits"].numpy(), want["logits"], rtol=0, atol=LOGIT_ATOL)

    # The bucketed head (K = forward.slot_bucket of the largest selection) keeps every valid slot,
    # and invalid slots never change valid ones: the valid logits are the same.
    k = forward.slot_bucket(int(want["dcs_selected"].max()), 6)
    assert bucketed["logits"].shape[1] == k
    valid = want["slot_valid"][:, :k]
    np.testing.assert_allclose(bucketed["logits"].numpy()[valid], want["logits"][:, :k][valid], rtol=0, atol=LOGIT_ATOL)


@pytest.mark.parametrize("case", ["context_ft"], indirect=True)
def test_text_towers_match_jax(case):
    """The fine-tuned tower (the export's clip/), the frozen pretrained q/v of the template embeddings
    (frozen_text_qv), and the learnt context in the guidance prompts."""
    config, model, out, reference = case
    tokenizer = text_lib.load_tokenizer(out / "clip")
    ids, mask = text_lib.tokenize(tokenizer, ["A photo of a cat in the scene", "grass", "a sky"], context_length=77)
    tuned = jitted(lambda m, i, a: m.clip.get_text_features(i, a), model, ids, mask)
    frozen = jitted(lambda m, i, a: m.frozen_text_clip().get_text_features(i, a), model, ids, mask)
    with torch.no_grad():
        np.testing.assert_allclose(reference.text_features(ids, mask).numpy(), tuned, rtol=0, atol=FEATURE_ATOL)
        np.testing.assert_allclose(reference.text_features(ids, mask, frozen=True).numpy(), frozen, rtol=0,
                                   atol=FEATURE_ATOL)
    assert np.abs(tuned - frozen).max() > 1e-2  # the two towers differ, so the check above means something

    g_ids, g_mask = verify.guidance_inputs(out, reference, 4)
    assert (g_ids[:, 1:1 + config.model.guidance.prompt_tokens] == tokenizer.bos_token_id).all()  # placeholders
    want = jitted(lambda m, i, a: m.encode_guidance_text(i, a), model, g_ids, g_mask)
    with torch.no_grad():
        np.testing.assert_allclose(reference.guidance_text(g_ids, g_mask).numpy(), want, rtol=0, atol=FEATURE_ATOL)
        without_context = torch_ref.model.l2_normalize(reference.text_features(g_ids, g_mask)).numpy()
    assert np.abs(without_context - want).max() > 1e-3  # the context vectors are used


# --------------------------------------------------------------------------------------------------
# Strict loading
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["default"], indirect=True)
def test_head_that_does_not_match_its_config_is_a_clear_error(case, tmp_path):
    config, _, out, reference = case
    assert set(reference.head.state_dict()) == set(load_file(out / "dcp_head.safetensors"))

    wider = make_config({"model.hidden_dim": 64})
    with pytest.raises(torch_ref.ExportMismatchError,
                       match=r"wrong shape .*alignment\.cost_embed\.weight .*do not belong together"):
        torch_ref.load_reference(out, wider)
    no_prompt = make_config({"model.guidance.prompt": "none"})
    with pytest.raises(torch_ref.ExportMismatchError, match=r"unexpected \(1\): alignment\.prompt_tokens\."):
        torch_ref.load_reference(out, no_prompt)
    other_size = make_config({"clip.image_size": 32})
    with pytest.raises(torch_ref.ExportMismatchError, match="CLIP runs at 64 px but config.clip.image_size=32"):
        torch_ref.load_reference(out, other_size)

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "clip").symlink_to(out / "clip")
    (damaged / "config.json").write_bytes((out / "config.json").read_bytes())
    tensors = load_file(out / "dcp_head.safetensors")
    del tensors["decoder.layers.1.conv.norm2.weight"]
    save_file(tensors, str(damaged / "dcp_head.safetensors"), metadata={"format": "pt"})
    with pytest.raises(torch_ref.ExportMismatchError, match=r"dcp_head\.safetensors does not match .*"
                       r"missing \(1\): decoder\.layers\.1\.conv\.norm2\.weight"):
        torch_ref.load_reference(damaged)
    with pytest.raises(FileNotFoundError, match="is not a dcp_jax export"):
        torch_ref.load_reference(tmp_path / "nothing")


# --------------------------------------------------------------------------------------------------
# Timing and the command line
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["default"], indirect=True)
def test_time_forward(case):
    config, model, _, reference = case
    images, text = verify.random_inputs(config, model.clip_dim, num_images=1, num_classes=5)
    threads = torch.get_num_threads()
    seconds = torch_ref.time_forward(reference, images, text, seen=np.ones(5, bool), runs=2, threads=1)
    assert 0 < seconds < 60
    assert torch.get_num_threads() == threads  # restored


@pytest.mark.parametrize("case", ["default"], indirect=True)
def test_export_verify_end_to_end(case, tokenizer_dir, tmp_path, capsys, monkeypatch):
    """`python -m dcp_jax.export --verify` on a workdir holding the default case's model as a checkpoint."""
    config, model, _, _ = case
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    ckpt_lib.save_config(workdir, config)
    files.write_json(workdir / ckpt_lib.CLIP_CONFIG_NAME, model.clip.config.to_hf())
    ckpt_lib.save_train_classes(workdir, verify.class_names(3))
    (workdir / ckpt_lib.TOKENIZER_DIR).mkdir()
    for item in tokenizer_dir.iterdir():
        (workdir / ckpt_lib.TOKENIZER_DIR / item.name).write_bytes(item.read_bytes())
    checkpointer = ckpt_lib.Checkpointer(workdir / ckpt_lib.CHECKPOINTS_DIR)
    checkpointer.save(1, model=model, optimizer=optim.make_optimizer(config, model), meta={"step": 1})
    checkpointer.wait()
    checkpointer.close()

    out = tmp_path / "export"
    assert export.main(["--workdir", str(workdir), "--out", str(out), "--verify"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    last = re.fullmatch(r"verify: max \|jax - torch\| logit difference (\S+) \(tolerance 0\.0001\) "
                        r"on 2 images x 6 slots", lines[-1])
    assert last, lines
    assert float(last.group(1)) <= LOGIT_ATOL
    assert lines[0].startswith("verify: CLIP features max |jax - torch|: cls ")

    # Above the tolerance: a non-zero exit (the export itself is fine and stays).
    monkeypatch.setattr(verify, "verify_export", lambda directory, **kw: 1.0)
    assert export.main(["--workdir", str(workdir), "--out", str(out), "--overwrite", "--verify"]) == 1
    assert (out / "dcp_head.safetensors").exists()


def test_bench_times_torch_alternately_with_jax(tmp_path, capsys):
    """`python -m dcp_jax.bench --torch`: every row gets the reference's median, timed in the same rounds."""
    from dcp_jax import bench

    code = bench.main(["--config", "configs/tiny.py", "--vocab-sizes", "12", "--thetas", "0,0.5", "--runs", "2",
                       "--selected", "3", "--torch", "--threads", "1", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["slots"] for r in rows] == [12, 4]
    assert all(0 < r["torch_latency_s"] < 60 and 0 < r["latency_s"] < 60 for r in rows)
    table = (tmp_path / "bench.md").read_text()
    assert "JAX/torch" in table
    ratio = rows[1]["latency_s"] / rows[1]["torch_latency_s"]
    assert f"| {ratio:.2f} |" in table
