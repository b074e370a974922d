"""The toy CLIP: cached training, zero-shot accuracy far above chance, parity with transformers, determinism.

The reduced TEST_RECIPE is trained once per session (well under a minute) in the session's temporary
$DCP_JAX_CACHE (tests/conftest.py) and shared by the tests; the full recipe is the demo's, not a test.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcp_jax import toy_clip
from dcp_jax.data import toy_world
from dcp_jax.models.clip import load_clip, normalize_pixels
from dcp_jax.text import load_tokenizer, tokenize

FEATURE_ATOL = 1e-5  # max abs difference of un-normalised float32 features, ours vs transformers


@pytest.fixture(scope="module")
def checkpoint(toy_clip_checkpoint):  # tests/conftest.py: TEST_RECIPE, trained once per session
    return toy_clip_checkpoint


def test_checkpoint_is_cached(checkpoint):
    names = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", toy_clip.RECIPE_FILE} <= names
    assert checkpoint.parent == toy_clip.cache_root() and checkpoint.name == toy_clip.TEST_RECIPE.key()
    # no temp dir left behind (the lock file stays: removing it while another process waits would be a race)
    left = {p.name for p in checkpoint.parent.iterdir()} - {checkpoint.name + ".lock"}
    assert left == {checkpoint.name}, left
    before = (checkpoint / "model.safetensors").stat().st_mtime_ns
    assert toy_clip.ensure_toy_clip(toy_clip.TEST_RECIPE) == checkpoint  # reused, not retrained
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == before
    report = json.loads((checkpoint / toy_clip.RECIPE_FILE).read_text())
    assert report["recipe"] == dataclasses.asdict(toy_clip.TEST_RECIPE) and report["key"] == checkpoint.name


def test_recipe_key():
    r = toy_clip.TEST_RECIPE
    assert r.key() == dataclasses.replace(r).key()
    keys = {r.key(), dataclasses.replace(r, seed=1).key(), dataclasses.replace(r, steps=r.steps + 1).key(),
            dataclasses.replace(r, vision_width=32).key(), toy_clip.DEFAULT_RECIPE.key()}
    assert len(keys) == 5


def test_zero_shot_far_above_chance(checkpoint):
    z = json.loads((checkpoint / toy_clip.RECIPE_FILE).read_text())["zero_shot"]
    assert z["object_acc"] >= 5 * z["object_chance"], z  # 16 objects: chance 6.2 %
    assert z["object_acc_all"] >= 5 * z["object_chance_all"], z
    assert z["stuff_acc_all"] >= 80, z  # chance 4.2 %


def test_transformers_parity(checkpoint):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPModel.from_pretrained(str(checkpoint)).eval()
    hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(str(checkpoint))
    ours, config = load_clip(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    texts = ["a photo of a cyan triangle.", "a blurry photo of the brick wall.", "a red ball on sand and sky."]
    ids, mask = tokenize(tokenizer, texts, context_length=config.text.max_position_embeddings)
    hf_ids = hf_tokenizer(texts, padding="max_length", max_length=ids.shape[1], return_tensors="np")
    np.testing.assert_array_equal(hf_ids["input_ids"], ids)
    assert len(tokenizer.tokenize("cyan triangle brick wall")) == 4  # the world's words are single tokens

    images, _, _ = toy_world.caption_batch(11, 0, 3, config.vision.image_size)
    pixels = np.asarray(normalize_pixels(images))
    with jax.default_matmul_precision("highest"):
        img = np.asarray(ours.get_image_features(jnp.asarray(pixels)))
        txt = np.asarray(ours.get_text_features(ids, mask))
    with torch.no_grad():
        ref_img = hf.get_image_features(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
        ref_txt = hf.get_text_features(input_ids=torch.tensor(ids, dtype=torch.long),
                                       attention_mask=torch.tensor(mask, dtype=torch.long))
    to_np = lambda t: (t.pooler_output if hasattr(t, "pooler_output") else t).numpy()  # noqa: E731 (5.x: outputs)
    np.testing.assert_allclose(img, to_np(ref_img), rtol=0, atol=FEATURE_ATOL)
    np.testing.assert_allclose(txt, to_np(ref_txt), rtol=0, atol=FEATURE_ATOL)


def test_training_is_deterministic(tmp_path):
    tiny = dataclasses.replace(toy_clip.TEST_RECIPE, vision_width=32, text_width=32, steps=3, batch_size=8)
    a = toy_clip.train(tiny, tmp_path / "a", progress=False, evaluate=False)
    b = toy_clip.train(tiny, tmp_path / "b", progress=False, evaluate=False)
    toy_clip.train(dataclasses.replace(tiny, seed=1), tmp_path / "c", progress=False, evaluate=False)
    weights = {k: (tmp_path / k / "model.safetensors").read_bytes() for k in "abc"}
    assert weights["a"] == weights["b"] and weights["a"] != weights["c"]
    assert a["final_loss"] == b["final_loss"]
    assert (tmp_path / "a" / "vocab.json").read_text() == (tmp_path / "c" / "vocab.json").read_text()


def test_command_line(checkpoint, tmp_path, capsys):
    toy_clip.main(["--quick", "--out", str(tmp_path / "copy")])  # cached: no training
    out = capsys.readouterr().out
    assert "chance" in out and str(checkpoint) in out
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    # a non-empty --out needs --overwrite
    assert toy_clip.main(["--quick", "--out", str(tmp_path / "copy")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        toy_clip.main(["--help"])
    assert e.value.code == 0


def test_a_cache_that_cannot_be_written_is_not_written(monkeypatch, tmp_path, capsys):
    """A read-only $DCP_JAX_CACHE (here its parent is a file: unwritable for root too) is left alone: the toy CLIP
    goes to the fallback folder (the trainer's workdir), with a note; a writable cache is used as before."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    monkeypatch.setenv("DCP_JAX_CACHE", str(blocker / "cache"))
    assert toy_clip.root_for(tmp_path / "run" / "toy_clip") == tmp_path / "run" / "toy_clip"
    err = capsys.readouterr().err
    assert err.startswith("note: the toy CLIP cache") and "trained into" in err and str(blocker) in err
    assert blocker.read_text() == "not a directory"
    monkeypatch.setenv("DCP_JAX_CACHE", str(tmp_path / "cache"))
    assert toy_clip.root_for(tmp_path / "run" / "toy_clip") == tmp_path / "cache" / "toy_clip"
    assert capsys.readouterr().err == "" and not (tmp_path / "run").exists()
