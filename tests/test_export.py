"""python -m dcp_jax.export: the CLIP as a transformers directory, the head in PyTorch layout, load_export.

One tiny training run (CLIP trained at 32 px, half the tiny CLIP's native 64, so the export must carry the
resized position table), plus a hand-written step 2 whose CLIP image tower is perturbed: the export must
take the CLIP from the checkpoint, not from the CLIP the run started from.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import CLIPModel as HFCLIPModel
from transformers import CLIPTokenizer

from conftest import FAST_XLA_FLAGS
from dcp_jax import checkpoint as ckpt_lib
from dcp_jax import export, export_format, optim, train
from dcp_jax.configs import tiny
from dcp_jax import text as text_lib
from dcp_jax.data.toy_world import write_benchmark
from dcp_jax.models import clip as clip_lib

REPO = Path(__file__).resolve().parents[1]
TRAINED_SIZE = 32  # the tiny CLIP is written at 64 px
FEATURE_ATOL = 1e-5  # float32, highest matmul precision, torch vs XLA on CPU
LAYER_ATOL = 1e-5
EXPORT_FILES = {"clip", "dcp_head.safetensors", "dcp_head_layout.json", "config.json", "train_classes.json",
                "README.md"}


def flat_params(model, keep=lambda path: True) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if keep(p)}


def is_head(path) -> bool:
    return path[0] != "clip"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "synthetic"
    write_benchmark(data, 8, 0, size=64)
    c = tiny.get_config()
    c.train.dataset = f"folder:{data}"
    c.eval.datasets = ""
    c.eval.during_training = ""
    c.total_steps = 1
    c.clip.image_size = TRAINED_SIZE  # grid 4: decoder window 4 still divides every decoder map
    c.clip.finetune = "none"  # these two halve the compile time; step 2 below changes the CLIP instead,
    c.model.decoder.layers = 1  # and test_conv_transpose_rule_matches_torch covers other kernel sizes
    w = tmp_path_factory.mktemp("workdir")
    train.train_and_evaluate(c, w)

    # Step 2: the image tower perturbed, so its CLIP differs from both step 1 and the starting CLIP.
    model, config, _, _ = ckpt_lib.restore_model(w)
    rng = np.random.default_rng(0)
    vision = nnx.state(model.clip.vision_model, nnx.Param)
    nnx.update(model.clip.vision_model, jax.tree.map(
        lambda x: x + rng.normal(0.0, 0.01, x.shape).astype(np.float32), vision))
    checkpointer = ckpt_lib.Checkpointer(w / "checkpoints")
    checkpointer.save(2, model=model, optimizer=optim.make_optimizer(config, model),
                      meta={"step": 2})
    checkpointer.wait()
    checkpointer.close()
    return w


@pytest.fixture(scope="module")
def workdir_model(workdir):
    model, config, step, _ = ckpt_lib.restore_model(workdir)
    assert step == 2
    return model


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
    """The command line in a fresh single-device process: the checkpoint was written on 4 devices."""
    out = tmp_path_factory.mktemp("exports") / "dcp_export"
    env = dict(os.environ, XLA_FLAGS=FAST_XLA_FLAGS, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "dcp_jax.export", "--workdir", str(workdir), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"exported to {out}" in proc.stderr and "export: 100%" in proc.stderr  # progress bar
    return out


@pytest.fixture(scope="module")
def exported_model(exported):
    return export_format.load_export(exported)


def run_jit(fn, model, *args):
    graphdef, state = nnx.split(model)
    with jax.default_matmul_precision("highest"):
        return jax.jit(lambda st, *a: fn(nnx.merge(graphdef, st), *a))(state, *args)


def hf_features(out) -> np.ndarray:
    """transformers 5.x returns an output object from get_*_features, 4.x a tensor."""
    return (out.pooler_output if hasattr(out, "pooler_output") else out).detach().numpy()


# --------------------------------------------------------------------------------------------------
# The files
# --------------------------------------------------------------------------------------------------


def test_export_files_and_layout(workdir, workdir_model, exported):
    assert set(os.listdir(exported)) == EXPORT_FILES
    assert [p.name for p in exported.parent.iterdir()] == [exported.name]  # no temporary leftovers
    with safe_open(str(exported / "dcp_head.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
    tensors = load_file(exported / "dcp_head.safetensors")
    layout = json.loads((exported / "dcp_head_layout.json").read_text())
    assert set(layout) == set(tensors)
    head_params = flat_params(workdir_model, lambda p: is_head(p))
    assert sorted(e["flax_path"] for e in layout.values()) == sorted(head_params)  # every head param, once
    for name, entry in layout.items():
        assert list(tensors[name].shape) == entry["shape"], name
        assert tensors[name].dtype == np.float32
        *parents, leaf = entry["flax_path"].split("/")
        renamed = "weight" if leaf in ("kernel", "scale") and entry["kind"] != "param" else leaf
        assert name == ".".join([*parents, renamed]), name
    # Spot checks of kinds and PyTorch shapes against the modules' definitions.
    m = workdir_model
    expect = {
        "alignment.cross_block.q_proj.weight": ("linear", (32, 32)),
        "alignment.guidance_proj.weight": ("linear", (32, m.clip_dim + 1)),  # nn.Linear [out, in]: [T_k; c_k]
        "alignment.cost_embed.weight": ("conv", (32, 1, 7, 7)),  # OIHW
        "decoder.layers.0.shallow_up.weight": ("conv_transpose", (64, 32, 2, 2)),  # [in, out, kh, kw]
        "decoder.layers.0.conv.norm1.weight": ("norm", (32,)),
        "decoder.layers.0.enhance.guidance_norm.bias": ("norm", (32,)),
        "alignment.prompt_tokens": ("param", (4, 32)),  # M guidance tokens of width d
    }
    for name, (kind, shape) in expect.items():
        assert (layout[name]["kind"], tuple(layout[name]["shape"])) == (kind, shape), name

    assert json.loads((exported / "config.json").read_text()) == json.loads((workdir / "config.json").read_text())
    assert (json.loads((exported / "train_classes.json").read_text())
            == json.loads((workdir / "train_classes.json").read_text()))
    readme = (exported / "README.md").read_text()
    for name in EXPORT_FILES - {"README.md"}:
        assert name in readme, name
    assert "CLIPModel.from_pretrained" in readme and f"{TRAINED_SIZE}x{TRAINED_SIZE}" in readme


def test_clip_loads_in_transformers_at_the_trained_resolution(workdir, workdir_model, exported):
    hf = HFCLIPModel.from_pretrained(exported / "clip").eval()
    grid = TRAINED_SIZE // hf.config.vision_config.patch_size
    assert hf.config.vision_config.image_size == TRAINED_SIZE
    assert hf.vision_model.embeddings.position_embedding.weight.shape[0] == grid * grid + 1

    tokenizer = CLIPTokenizer.from_pretrained(exported / "clip")
    texts = ["a photo of a cat.", "grass", "a bad photo of the sky and a road."]
    ids, mask = text_lib.tokenize(text_lib.load_tokenizer(workdir / "tokenizer"), texts)
    enc = tokenizer(texts, padding="max_length", max_length=ids.shape[1], return_tensors="np")
    np.testing.assert_array_equal(enc["input_ids"], ids)

    pixels = np.random.default_rng(0).standard_normal((2, 3, TRAINED_SIZE, TRAINED_SIZE)).astype(np.float32)
    with torch.no_grad():
        ref_img = hf_features(hf.get_image_features(pixel_values=torch.tensor(pixels)))
        ref_txt = hf_features(hf.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)))
    ours = workdir_model.clip
    img = run_jit(lambda m, x: m.get_image_features(x), ours, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    txt = run_jit(lambda m, i, a: m.get_text_features(i, a), ours, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(img), ref_img, rtol=0, atol=FEATURE_ATOL)
    np.testing.assert_allclose(np.asarray(txt), ref_txt, rtol=0, atol=FEATURE_ATOL)

    # It is the checkpoint's CLIP (step 2 perturbed the image tower), not the one the run started from.
    start, _ = clip_lib.load_clip(workdir / "tiny_clip", image_size=TRAINED_SIZE)
    q = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    start_q = flat_params(start)["vision_model/encoder/layers/0/self_attn/q_proj/kernel"].T
    assert np.abs(hf.state_dict()[q].numpy() - start_q).max() > 1e-3


# --------------------------------------------------------------------------------------------------
# load_export: the exact inverse
# --------------------------------------------------------------------------------------------------


def test_every_tensor_round_trips_exactly(workdir_model, exported_model):
    ours, back = flat_params(workdir_model), flat_params(exported_model)
    assert sorted(ours) == sorted(back)
    for name in ours:
        assert back[name].dtype == np.float32, name
        np.testing.assert_array_equal(back[name], ours[name], err_msg=name)


def test_model_from_the_export_gives_identical_outputs(workdir_model, exported_model):
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.uniform(0, 255, (2, 64, 64, 3)).astype(np.float32))
    text = rng.standard_normal((6, 1, workdir_model.clip_dim)).astype(np.float32)
    text = jnp.asarray(text / np.linalg.norm(text, axis=-1, keepdims=True))
    seen = jnp.asarray([True, True, True, False, False, False])
    device = jax.devices()[0]

    @jax.jit
    def forward(state, x, t):
        return nnx.merge(graphdef, state)(x, t, num_slots=4, seen=seen, train=False)

    graphdef, ours_state = nnx.split(workdir_model)
    back_graphdef, back_state = nnx.split(exported_model)
    assert back_graphdef == graphdef  # the same modules and static attributes
    ours, back = (jax.device_get(forward(jax.device_put(state, device), images, text))
                  for state in (ours_state, back_state))
    assert set(ours) == set(back) and {"logits", "slot_class", "slot_valid"} <= set(ours)
    for key in ours:
        np.testing.assert_array_equal(back[key], ours[key], err_msg=key)


def test_load_export_is_strict(exported, tmp_path):
    with pytest.raises(export_format.ExportError, match="is not a dcp_jax export"):
        export_format.load_export(tmp_path)
    config = ckpt_lib.load_config(exported)
    config.model.hidden_dim = 64
    with pytest.raises(ValueError, match=r"wrong shape.*alignment\.cost_embed\.weight"):
        export_format.load_export(exported, config)

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "clip").symlink_to(exported / "clip")
    for name in ("config.json", "dcp_head_layout.json"):
        (damaged / name).write_bytes((exported / name).read_bytes())
    tensors = load_file(exported / "dcp_head.safetensors")
    del tensors["alignment.prompt_tokens"]
    save_file(tensors, str(damaged / "dcp_head.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \(1\): alignment\.prompt_tokens"):
        export_format.load_export(damaged)


# --------------------------------------------------------------------------------------------------
# PyTorch modules loaded with the exported weights reproduce the flax layers
# --------------------------------------------------------------------------------------------------


def _torch_module(flax_module, kind: str):
    """The torch.nn module a PyTorch port would build for this layer (hyper-parameters from the flax one)."""
    if kind == "linear":
        return torch.nn.Linear(flax_module.in_features, flax_module.out_features, bias=flax_module.use_bias)
    if kind == "conv":
        k = tuple(flax_module.kernel_size)
        return torch.nn.Conv2d(flax_module.in_features, flax_module.out_features, k, padding=flax_module.padding,
                               bias=flax_module.use_bias)
    if kind == "conv_transpose":
        k = tuple(flax_module.kernel_size)
        return torch.nn.ConvTranspose2d(flax_module.in_features, flax_module.out_features, k,
                                        stride=tuple(flax_module.strides), bias=flax_module.use_bias)
    channels = flax_module.scale[...].shape[-1]
    if isinstance(flax_module, nnx.GroupNorm):
        return torch.nn.GroupNorm(flax_module.num_groups, channels, eps=flax_module.epsilon)
    return torch.nn.LayerNorm(channels, eps=flax_module.epsilon)


@pytest.mark.parametrize("prefix, kind", [
    ("alignment.cross_block.q_proj", "linear"),
    ("alignment.visual_proj", "conv"),  # 3x3, padding 1, bias
    ("decoder.layers.0.conv.conv1", "conv"),  # no bias
    ("decoder.layers.0.up", "conv_transpose"),  # k2 s2
    ("decoder.layers.0.conv.norm1", "norm"),  # GroupNorm, 2 groups of 16 channels
    ("alignment.cross_block.norm1", "norm"),  # LayerNorm
])
def test_torch_layer_with_exported_weights_matches_flax(workdir_model, exported, prefix, kind):
    layout = json.loads((exported / "dcp_head_layout.json").read_text())
    weights = {k[len(prefix) + 1:]: torch.from_numpy(v) for k, v in load_file(exported / "dcp_head.safetensors")
               .items() if k.startswith(prefix + ".")}
    assert {layout[f"{prefix}.{k}"]["kind"] for k in weights} == {kind}
    flax_module = workdir_model
    for part in prefix.split("."):
        flax_module = flax_module[int(part)] if part.isdigit() else getattr(flax_module, part)
    module = _torch_module(flax_module, kind)
    module.load_state_dict(weights, strict=True)

    rng = np.random.default_rng(2)
    if kind == "linear":
        x = rng.standard_normal((3, 5, flax_module.in_features)).astype(np.float32)
        to_torch, from_torch = torch.from_numpy, lambda t: t.numpy()
    else:
        channels = flax_module.scale[...].shape[-1] if kind == "norm" else flax_module.in_features
        shape = (2, 3, channels) if isinstance(flax_module, nnx.LayerNorm) else (2, 6, 5, channels)
        x = rng.standard_normal(shape).astype(np.float32)
        if kind == "norm":  # away from zero mean / unit variance, so normalising matters
            x = 3.0 * x + np.linspace(-2.0, 2.0, channels, dtype=np.float32)
        if len(shape) == 4:  # NHWC <-> NCHW
            to_torch = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731
            from_torch = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
        else:
            to_torch, from_torch = torch.from_numpy, lambda t: t.numpy()
    with jax.default_matmul_precision("highest"):
        expected = np.asarray(flax_module(jnp.asarray(x)))
    with torch.no_grad():
        got = from_torch(module(to_torch(x)))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=LAYER_ATOL)


@pytest.mark.parametrize("kernel, stride", [(4, 4), (3, 2), (2, 1)])
def test_conv_transpose_rule_matches_torch(kernel, stride):
    """The flip rule for VALID ConvTranspose layers the tiny head does not have (kernel >= stride)."""
    layer = nnx.ConvTranspose(3, 5, (kernel, kernel), (stride, stride), padding="VALID", rngs=nnx.Rngs(kernel))
    layer.bias[...] = jnp.linspace(-1.0, 1.0, 5)
    kind = export_format._module_kind(layer)
    kernel_value = np.asarray(layer.kernel[...])
    weight = export_format.to_torch(kind, "kernel", kernel_value)
    np.testing.assert_array_equal(export_format.from_torch(kind, "kernel", weight), kernel_value)
    module = torch.nn.ConvTranspose2d(3, 5, kernel, stride=stride)
    module.load_state_dict({"weight": torch.from_numpy(weight.copy()),
                            "bias": torch.from_numpy(np.asarray(layer.bias[...]))})
    x = np.random.default_rng(3).standard_normal((2, 4, 5, 3)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        expected = np.asarray(layer(jnp.asarray(x)))
    with torch.no_grad():
        got = module(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=LAYER_ATOL)


class _CustomKernel(nnx.Module):
    def __init__(self):
        self.kernel = nnx.Param(jnp.ones((2, 3)))


class _Head(nnx.Module):
    def __init__(self, custom: bool):
        self.proj = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
        self.scale_free = nnx.Param(jnp.zeros((4,)))
        if custom:
            self.custom = _CustomKernel()


def test_head_layout_of_unknown_kernels_is_refused():
    assert export_format.head_layout(_Head(custom=False)) == {
        "proj.weight": {"flax_path": "proj/kernel", "shape": [3, 2], "kind": "linear"},
        "proj.bias": {"flax_path": "proj/bias", "shape": [3], "kind": "linear"},
        "scale_free": {"flax_path": "scale_free", "shape": [4], "kind": "param"},
    }
    with pytest.raises(export_format.ExportError, match="custom/kernel: a kernel of a _CustomKernel has no PyTorch"):
        export_format.head_layout(_Head(custom=True))


@pytest.mark.parametrize("kernel, stride, padding", [(3, 2, "SAME"), (1, 2, "VALID")])
def test_conv_transpose_without_a_torch_rule_is_refused(kernel, stride, padding):
    layer = nnx.ConvTranspose(4, 4, (kernel, kernel), (stride, stride), padding=padding, rngs=nnx.Rngs(0))
    with pytest.raises(export_format.ExportError, match="no export rule"):
        export_format._module_kind(layer)


# --------------------------------------------------------------------------------------------------
# The command line: refusal, --overwrite, --checkpoint, errors, atomicity
# --------------------------------------------------------------------------------------------------


def test_refuses_a_non_empty_out_unless_overwrite(workdir, exported, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export.main(["--workdir", str(workdir), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only an earlier export (test_overwrite_replaces_only_an_earlier_export)
    assert export.main(["--workdir", str(workdir), "--out", str(out), "--overwrite"]) == 2
    assert "not a dcp_jax export" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"

    # --overwrite replaces an earlier export; --checkpoint 1 selects step 1: same head, the unperturbed CLIP.
    shutil.rmtree(out)
    shutil.copytree(exported, out)
    assert export.main(["--workdir", str(workdir), "--out", str(out), "--overwrite", "--checkpoint", "1"]) == 0
    assert set(os.listdir(out)) == EXPORT_FILES
    assert (out / "dcp_head.safetensors").read_bytes() == (exported / "dcp_head.safetensors").read_bytes()
    assert (out / "clip" / "model.safetensors").read_bytes() != (exported / "clip" / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or backup dirs left

    empty = tmp_path / "empty"
    empty.mkdir()
    assert export.main(["--workdir", str(workdir), "--out", str(empty),
                        "--checkpoint", str(workdir / "checkpoints" / "2")]) == 0
    assert (empty / "clip" / "model.safetensors").read_bytes() == (
        exported / "clip" / "model.safetensors").read_bytes()


def test_failed_export_leaves_out_untouched(workdir, exported, tmp_path, monkeypatch):
    """An export over an earlier one that fails halfway leaves the earlier one as it was."""
    out = tmp_path / "out"
    shutil.copytree(exported, out)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    def boom(model):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_format, "head_tensors", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_workdir(workdir, out, overwrite=True)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the temporary dir is gone


def test_command_line_errors(workdir, tmp_path, capsys):
    def fails(*args) -> str:
        try:
            code = export.main([str(a) for a in args])
        except SystemExit as e:  # a usage error (absl flags)
            code = e.code
        assert code == 2
        err = capsys.readouterr().err
        if err.startswith("[dcp_jax] jax "):  # the backend line runtime.start prints first
            err = err.split("\n", 1)[1]
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        return err

    out = tmp_path / "out"
    assert "--workdir" in fails("--out", out)  # required
    assert "is not a dcp_jax workdir" in fails("--workdir", tmp_path / "missing", "--out", out)
    (tmp_path / "not_a_workdir").mkdir()
    assert "is not a dcp_jax workdir" in fails("--workdir", tmp_path / "not_a_workdir", "--out", out)
    err = fails("--workdir", workdir, "--out", out, "--checkpoint", "99")
    assert "--checkpoint 99" in err and "available: [1, 2]" in err
    assert "expected a step number" in fails("--workdir", workdir, "--out", out, "--checkpoint", tmp_path / "x")
    assert "contains) the workdir" in fails("--workdir", workdir, "--out", workdir, "--overwrite")
    (tmp_path / "file").write_text("")
    assert "not a directory" in fails("--workdir", workdir, "--out", tmp_path / "file")
    assert not out.exists()

    with pytest.raises(SystemExit) as e:
        export.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert all(flag in help_text for flag in ("--workdir", "--out", "--checkpoint", "--overwrite"))


def test_openai_bpe_tokenizer_is_written_in_transformers_form(exported, tmp_path):
    """A run started from an OpenAI .pt has only bpe_simple_vocab_16e6.txt.gz in W/tokenizer."""
    source, target = tmp_path / "tokenizer", tmp_path / "clip"
    source.mkdir()
    target.mkdir()
    merges = (exported / "clip" / "merges.txt").read_text().splitlines()[1:]
    with gzip.open(source / "bpe_simple_vocab_16e6.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(["bpe", *merges]) + "\n")
    export_format.copy_tokenizer(source, target)
    assert (target / "bpe_simple_vocab_16e6.txt.gz").exists()
    reference = text_lib.load_tokenizer(source)
    texts = ["a photo of a cat.", "Zürich café"]
    assert CLIPTokenizer.from_pretrained(target)(texts)["input_ids"] == reference(texts)["input_ids"]


def test_overwrite_replaces_only_an_earlier_export(workdir, exported, tmp_path, capsys):
    """--overwrite never deletes what an export did not write (issue 32 item 2): W/checkpoints, the workdir
    reached through a symlink or '..', and a user's folder are refused and left as they were; an earlier
    export (its head layout file is the marker) is replaced."""
    from dcp_jax import export
    from dcp_jax.export_format import ExportError

    checkpoints = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    code = export.main(["--workdir", str(workdir), "--out", str(workdir / "checkpoints"), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "holds files that are not a dcp_jax export" in err and "Traceback" not in err, err
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == checkpoints

    link = tmp_path / "link"
    link.symlink_to(workdir)
    for out in (workdir, workdir / "checkpoints" / ".."):
        with pytest.raises(ExportError, match=r"is \(or contains\) the workdir"):
            export.export_workdir(link, out, overwrite=True)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == checkpoints

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="--overwrite replaces only an earlier export"):
        export.export_workdir(workdir, mine, overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]

    earlier = tmp_path / "earlier"
    shutil.copytree(exported, earlier)
    (earlier / "stale.txt").write_text("from the earlier export's folder")
    export.export_workdir(workdir, earlier, overwrite=True)
    assert not (earlier / "stale.txt").exists() and (earlier / "dcp_head_layout.json").is_file()
