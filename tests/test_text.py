"""Tokenizer, templates and cached vocabulary embeddings (dcp_jax/text.py), checked against transformers/torch."""

from __future__ import annotations

import gzip
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPModel as HFCLIPModel
from transformers import CLIPTokenizer

from dcp_jax import text
from dcp_jax.data import classnames
from dcp_jax.models import selection
from dcp_jax.configs.tiny import TINY_CLIP
from dcp_jax.models import clip
from dcp_jax.models.build import write_tiny_clip

ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_clip(tmp_path_factory.mktemp("tiny"), TINY_CLIP, seed=0)
    model, _ = clip.load_clip(path)
    return dict(path=path, model=model, tokenizer=text.load_tokenizer(path))


def hf_text_embeddings(path, prompts):
    """L2-normalised text features from transformers' torch CLIPModel + CLIPTokenizer (the reference)."""
    hf, tok = HFCLIPModel.from_pretrained(path), CLIPTokenizer.from_pretrained(path)
    enc = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = hf.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    out = (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def test_templates():
    assert len(text.TEMPLATES["imagenet80"]) == 80 == len(set(text.TEMPLATES["imagenet80"]))
    assert all(t.count("{}") == 1 for t in text.TEMPLATES["imagenet80"])
    assert text.TEMPLATES["imagenet80"][0] == "a bad photo of a {}."
    assert text.TEMPLATES["single"] == ["A photo of a {} in the scene"]  # CAT-Seg's, without a period


def test_tokenize_matches_transformers_and_truncates_keeping_eot(tiny):
    tok = tiny["tokenizer"]
    texts = ["a photo of a dog.", "Building, Edifice", ""]
    ids, mask = text.tokenize(tok, texts)
    ref = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (3, 77)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])

    long_ids, long_mask = text.tokenize(tok, ["zebra " * 200], context_length=77)
    assert long_mask.sum() == 77
    assert long_ids[0, 0] == tok.bos_token_id and long_ids[0, -1] == tok.eos_token_id
    short_ids, short_mask = text.tokenize(tok, ["zebra"], context_length=8)
    assert short_ids.shape == (1, 8) and short_mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    with pytest.raises(TypeError, match="list of strings"):
        text.tokenize(tok, "a photo")


def test_load_tokenizer_for_openai_pt_paths(tiny, tmp_path):
    pt = tmp_path / "ViT-B-16.pt"
    pt.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="next to ViT-B-16.pt.*vocab.json \\+ merges.txt"):
        text.load_tokenizer(pt)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tiny["path"] / name, tmp_path / name)
    tok = text.load_tokenizer(pt)
    assert tok("a photo")["input_ids"] == tiny["tokenizer"]("a photo")["input_ids"]


def test_load_tokenizer_from_openai_bpe_file(tmp_path):
    # OpenAI's bpe_simple_vocab_16e6.txt.gz holds only merges; the vocab is bytes, bytes+</w>, merges, specials.
    merges = ["#version: 0.2", "p h", "o t", "ph ot", "phot o</w>"]
    with gzip.open(tmp_path / "bpe_simple_vocab_16e6.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(merges) + "\n")
    tok = text.load_tokenizer(tmp_path / "ViT-B-16.pt")
    assert len(tok) == 512 + 4 + 2
    assert tok.convert_ids_to_tokens(tok("photo")["input_ids"]) == ["<|startoftext|>", "photo</w>", "<|endoftext|>"]
    assert tok.eos_token_id == 512 + 4 + 1


def test_embed_vocabulary_matches_torch_with_synonym_averaging(tiny, tmp_path):
    classes = ["person", "building, edifice", "sky"]
    templates = ["a photo of a {}.", "itap of the {}."]
    T = text.embed_vocabulary(tiny["model"], tiny["tokenizer"], classes, templates, batch_size=4,
                              cache_dir=tmp_path)
    assert T.shape == (3, 2, 32) and T.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(T, axis=-1), 1.0, atol=1e-6)
    prompts = [t.format(c) for c in ("person", "building", "edifice", "sky") for t in templates]
    ref = hf_text_embeddings(tiny["path"], prompts).reshape(4, 2, -1)
    synonyms = ref[1] + ref[2]  # both already L2-normalised: average, then renormalise
    expected = np.stack([ref[0], synonyms / np.linalg.norm(synonyms, axis=-1, keepdims=True), ref[3]])
    np.testing.assert_allclose(T, expected, rtol=0, atol=ATOL)
    assert np.abs(T[1] - ref[1]).max() > 1e-3  # the synonym really contributed

    T_bar = selection.mean_text_embedding(T)
    manual = T.mean(1) / np.linalg.norm(T.mean(1), axis=-1, keepdims=True)
    np.testing.assert_allclose(T_bar, manual, rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(selection.mean_text_embedding(jnp.asarray(T))), manual, rtol=0, atol=1e-6)


def test_trained_text_is_the_same_prompts_in_training_and_at_inference_on_ade847(tiny, tmp_path, monkeypatch):
    """clip.text_finetune = "cost" (issue 34): the template prompts that training re-encodes for each of ADE-847's
    classes (template_tokens) are exactly those that inference embeds with the trained tower
    (embed_vocabulary(synonyms="first"), as Segmenter calls it): each class's first synonym, as CAT-Seg. The
    frozen synonym mean embeds other prompts for the 217 names with synonyms, and is cached under another key."""
    names = classnames.load("ade847")
    with_synonyms = [i for i, n in enumerate(names) if ", " in n]
    assert len(with_synonyms) == 217
    templates = ["a photo of a {}.", "itap of the {}."]
    embedded = {}

    def capture(model, tokenizer, prompts, **kwargs):  # what embed_vocabulary puts through the text tower
        embedded[kwargs["desc"]] = list(prompts)
        return np.ones((len(prompts), model.config.projection_dim), np.float32)

    monkeypatch.setattr(text, "embed_texts", capture)
    for synonyms in ("first", "all"):
        embedded.clear()
        text.embed_vocabulary(tiny["model"], tiny["tokenizer"], names, templates, synonyms=synonyms,
                              cache_dir=tmp_path)
        assert len(embedded) == 1, f"synonyms={synonyms}: read another mode's cache"
        prompts = next(iter(embedded.values()))
        ids, mask = text.tokenize(tiny["tokenizer"], prompts)
        trained_ids, trained_mask = text.template_tokens(tiny["tokenizer"], names, templates)
        length = trained_ids.shape[-1]
        same = (len(prompts) == trained_ids.size // length and not mask[:, length:].any()
                and np.array_equal(ids[:, :length], trained_ids.reshape(-1, length)))
        assert same == (synonyms == "first")
    assert "building, edifice" in names and "a photo of a building." in prompts and "a photo of a edifice." in prompts
    assert len(prompts) == len(templates) * sum(len(text.split_synonyms(n)) for n in names)


def test_embed_vocabulary_batch_size_does_not_change_results(tiny, tmp_path):
    args = (tiny["model"], tiny["tokenizer"], ["tree", "grass", "road, street"], "single")
    small = text.embed_vocabulary(*args, batch_size=3, cache_dir=tmp_path / "a")  # 4 prompts -> padded batch
    large = text.embed_vocabulary(*args, batch_size=256, cache_dir=tmp_path / "b")
    np.testing.assert_allclose(small, large, rtol=0, atol=1e-6)


def test_an_unwritable_cache_is_skipped_with_a_note(tiny, tmp_path, capsys):
    """A cache that cannot be written (here its parent is a file) gives the same embeddings and a note, not a
    traceback."""
    args = (tiny["model"], tiny["tokenizer"], ["tree", "grass"], "single")
    (tmp_path / "not_a_dir").write_text("a file")
    got = text.embed_vocabulary(*args, cache_dir=tmp_path / "not_a_dir" / "cache")
    np.testing.assert_array_equal(got, text.embed_vocabulary(*args, cache_dir=tmp_path / "ok"))
    assert "text embeddings not cached" in capsys.readouterr().err


def test_embedding_cache_hit_and_invalidation(tiny, tmp_path, monkeypatch):
    calls = []
    real = text.embed_texts

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(text, "embed_texts", counting)
    model, _ = clip.load_clip(tiny["path"])  # a private copy: this test edits weights
    tok = tiny["tokenizer"]
    classes, templates = ["person", "sky"], ["a photo of a {}.", "a {}."]

    first = text.embed_vocabulary(model, tok, classes, templates, cache_dir=tmp_path)
    second = text.embed_vocabulary(model, tok, classes, templates, cache_dir=tmp_path)
    assert len(calls) == 1  # second call read the cache
    np.testing.assert_array_equal(first, second)
    assert len(list(tmp_path.glob("*.npy"))) == 1 and not list(tmp_path.glob("*.tmp"))

    text.embed_vocabulary(model, tok, classes + ["tree"], templates, cache_dir=tmp_path)
    assert len(calls) == 2  # vocabulary changed
    text.embed_vocabulary(model, tok, classes, templates[:1], cache_dir=tmp_path)
    assert len(calls) == 3  # templates changed

    # image-tower weights do not matter ...
    model.vision_model.post_layernorm.bias[...] = model.vision_model.post_layernorm.bias[...] + 1.0
    text.embed_vocabulary(model, tok, classes, templates, cache_dir=tmp_path)
    assert len(calls) == 3
    # ... text-tower weights do
    kernel = model.text_projection.kernel[...]
    model.text_projection.kernel[...] = kernel + np.random.default_rng(0).normal(0, 0.05, kernel.shape)
    changed = text.embed_vocabulary(model, tok, classes, templates, cache_dir=tmp_path)
    assert len(calls) == 4 and np.abs(changed - first).max() > 1e-3

    for cached in tmp_path.glob("*.npy"):  # a corrupt cache file is recomputed, not trusted
        cached.write_bytes(b"garbage")
    np.testing.assert_allclose(text.embed_vocabulary(model, tok, classes, templates, cache_dir=tmp_path), changed)
    assert len(calls) == 5

    monkeypatch.setenv("DCP_JAX_CACHE", str(tmp_path / "env"))
    text.embed_vocabulary(model, tok, classes, templates)
    assert len(list((tmp_path / "env" / "text_embeddings").glob("*.npy"))) == 1  # $DCP_JAX_CACHE/text_embeddings


def test_embed_vocabulary_rejects_bad_input(tiny, tmp_path):
    model, tok = tiny["model"], tiny["tokenizer"]
    with pytest.raises(ValueError, match="unknown templates 'imagenet'"):
        text.embed_vocabulary(model, tok, ["sky"], "imagenet", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        text.embed_vocabulary(model, tok, ["sky"], ["a photo"], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="empty class name"):
        text.embed_vocabulary(model, tok, ["sky", " , "], "single", cache_dir=tmp_path)
    with pytest.raises(TypeError, match="list of class names"):
        text.embed_vocabulary(model, tok, "sky", "single", cache_dir=tmp_path)
