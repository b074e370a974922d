"""Text side of DCP-CLIP (MODEL.md section 1): tokenizer, prompt templates, cached vocabulary embeddings.

`embed_vocabulary(model, tokenizer, class_names)` returns T [C,P,D] (each row L2-normalised): every class name is put
into P prompt templates; comma-separated synonyms ("building, edifice") are embedded separately, averaged and
renormalised. With the text tower frozen, T depends only on (text weights, class list, templates), so it is cached on
disk under a fingerprint of exactly those and a second call is a file read.

The text that a trained text tower encodes (`clip.text_finetune`) is a class's FIRST synonym, in training
(`guidance_tokens`, `template_tokens`) and at inference (`embed_vocabulary(..., synonyms="first")`): CAT-Seg's
trained-text path (`get_text_embeds`) encodes `name.split(", ")[0]` in both places, so the tower is tested on the
text it was trained on. Only the frozen tower's embeddings (selection, tag validation) average the synonyms.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from dcp_jax import files

# The 80 prompt templates of OpenAI's ImageNet zero-shot notebook (CLIP paper; SED's IMAGENET_TEMPLATES), and
# CAT-Seg's single template.
IMAGENET_TEMPLATES = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
]
TEMPLATES = {"imagenet80": IMAGENET_TEMPLATES, "single": ["A photo of a {} in the scene"]}  # CAT-Seg's, no period

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json + merges.txt", "bpe_simple_vocab_16e6.txt.gz")


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _quiet_transformers() -> None:
    # We use only its tokenizer: its "PyTorch was not found" notice at import is noise here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or ((folder / "vocab.json").exists() and
                                                    (folder / "merges.txt").exists())


def _tokenizer_from_openai_bpe(bpe_file: Path):
    """OpenAI's `bpe_simple_vocab_16e6.txt.gz` -> CLIPTokenizer (vocab built like OpenAI's SimpleTokenizer)."""
    _quiet_transformers()
    from transformers import CLIPTokenizer

    from dcp_jax.models.tiny_clip import bytes_to_unicode

    lines = gzip.open(bpe_file, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1] if m.strip()]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                           encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp)


def load_tokenizer(path: str | os.PathLike):
    """CLIP tokenizer for a checkpoint: an HF directory (tokenizer.json or vocab.json + merges.txt), or the
    folder holding an OpenAI `.pt` (which carries no tokenizer itself)."""
    _quiet_transformers()
    from transformers import CLIPTokenizer

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if _has_tokenizer(folder):
        return CLIPTokenizer.from_pretrained(str(folder))
    if (folder / "bpe_simple_vocab_16e6.txt.gz").exists():
        return _tokenizer_from_openai_bpe(folder / "bpe_simple_vocab_16e6.txt.gz")
    where = f"next to {path.name} in {folder}" if not path.is_dir() else f"in {folder}"
    raise FileNotFoundError(f"no CLIP tokenizer found {where}: expected {' or '.join(_TOKENIZER_FILES)} "
                            "(copy them from the matching HF CLIP repo, e.g. openai/clip-vit-base-patch16)")


def tokenize(tokenizer, texts: Sequence[str], context_length: int = 77) -> tuple[np.ndarray, np.ndarray]:
    """-> (input_ids int32 [N,L], attention_mask int32 [N,L]): BOS, tokens, EOS, padding. Long texts are truncated
    so that EOS stays the last real token (CLIP pools there)."""
    if isinstance(texts, str):
        raise TypeError("tokenize() takes a list of strings, not a single string")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError("the tokenizer has no <|startoftext|>/<|endoftext|> tokens; is it a CLIP tokenizer?")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    body = tokenizer(list(texts), add_special_tokens=False, truncation=True,
                     max_length=context_length - 2)["input_ids"] if len(texts) else []
    ids = np.full((len(texts), context_length), pad, np.int32)
    mask = np.zeros((len(texts), context_length), np.int32)
    for row, tokens in enumerate(body):
        seq = [bos, *tokens[: context_length - 2], eos]
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask


# --------------------------------------------------------------------------------------------------
# Vocabulary embeddings
# --------------------------------------------------------------------------------------------------


def _resolve_templates(templates) -> list[str]:
    if isinstance(templates, str):
        if templates not in TEMPLATES:
            raise ValueError(f"unknown templates {templates!r}; use one of {sorted(TEMPLATES)} or a list of strings")
        templates = TEMPLATES[templates]
    templates = list(templates)
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"each template needs exactly one '{{}}' for the class name; bad: {bad or 'empty list'}")
    return templates


def split_synonyms(class_name: str) -> list[str]:
    """'building, edifice' -> ['building', 'edifice']."""
    names = [s.strip() for s in class_name.split(",") if s.strip()]
    if not names:
        raise ValueError(f"empty class name {class_name!r}")
    return names


SYNONYMS = ("all", "first")


def class_texts(class_name: str, synonyms: str = "all") -> list[str]:
    """The names a class is embedded by: every synonym ("all", averaged; the frozen tower), or the first only
    ("first"; what the trained text tower is trained and tested on, as in CAT-Seg)."""
    if synonyms not in SYNONYMS:
        raise ValueError(f"synonyms={synonyms!r}: expected one of {SYNONYMS}")
    names = split_synonyms(class_name)
    return names[:1] if synonyms == "first" else names


def _name_keys(name: str) -> set[str]:
    """A class name counts by its full string and by its first synonym ("building, edifice" -> "building")."""
    normalise = lambda n: " ".join(n.lower().split())  # noqa: E731
    return {normalise(name), normalise(name.split(",")[0])}


def seen_mask(vocabulary: Sequence[str], train_vocabulary: Sequence[str]) -> np.ndarray:
    """np.bool_ [C]: whether each vocabulary class is in the training vocabulary (case/space-insensitive;
    the full name or its first synonym may match either form of a training name). Tag validation
    re-checks the classes that are not."""
    train_keys: set[str] = set()
    for name in train_vocabulary:
        train_keys |= _name_keys(name)
    return np.array([bool(_name_keys(name) & train_keys) for name in vocabulary], dtype=np.bool_)


def text_fingerprint(model) -> str:
    """Hash of everything the text embeddings depend on in the model: text-tower + text_projection weights,
    the text config and the compute dtype."""
    h = hashlib.sha256()
    h.update(repr(model.config.text).encode())
    h.update(str(jnp.dtype(model.dtype)).encode())
    for prefix, module in (("text_model", model.text_model), ("text_projection", model.text_projection)):
        for path, var in sorted(nnx.to_flat_state(nnx.state(module, nnx.Param)), key=lambda kv: str(kv[0])):
            value = np.asarray(var.get_value())
            h.update(f"{prefix}/{'/'.join(map(str, path))}:{value.dtype}:{value.shape}".encode())
            h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def default_cache_dir() -> Path:
    return files.cache_dir("text_embeddings")


def _l2_normalise(x, axis=-1):
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


@functools.partial(jax.jit, static_argnums=0)  # compiled once per model structure and batch shape
def _encode_text(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state).get_text_features(ids, mask)


def embed_texts(model, tokenizer, texts: Sequence[str], *, batch_size: int = 256, desc: str = "text") -> np.ndarray:
    """L2-normalised projected text embeddings [N,D] float32, in fixed-size batches through one jitted function."""
    context = model.config.text.max_position_embeddings
    ids, mask = tokenize(tokenizer, texts, context_length=min(77, context))
    n = len(texts)
    batch = max(1, min(batch_size, 1 << max(n - 1, 0).bit_length()))  # a power of two: few shapes for small n
    graphdef, state = nnx.split(model)
    out = np.zeros((n, model.config.projection_dim), np.float32)
    for start in tqdm(range(0, n, batch), desc=desc, unit="batch", disable=n <= batch):
        stop = min(start + batch, n)
        b_ids, b_mask = ids[start:stop], mask[start:stop]
        if stop - start < batch:  # pad the last batch so there is one compiled shape
            fill = batch - (stop - start)
            b_ids = np.concatenate([b_ids, np.repeat(b_ids[:1], fill, 0)])
            b_mask = np.concatenate([b_mask, np.repeat(b_mask[:1], fill, 0)])
        out[start:stop] = np.asarray(_encode_text(graphdef, state, b_ids, b_mask))[: stop - start]
    return _l2_normalise(out)


def embed_vocabulary(model, tokenizer, class_names: Sequence[str], templates="imagenet80", *,
                     batch_size: int = 256, cache_dir: str | os.PathLike | None = None,
                     synonyms: str = "all") -> np.ndarray:
    """Text embeddings T [C,P,D] float32 of every class in every template, each row L2-normalised.

    Synonyms ("building, edifice") are embedded separately, averaged and renormalised; with synonyms="first"
    only the first is embedded (the trained tower's text, the prompts of `template_tokens`). Results are cached in
    `cache_dir` (default $DCP_JAX_CACHE/text_embeddings; $DCP_JAX_CACHE defaults to ~/.cache/dcp_jax) keyed by
    the text-tower weights, the class list and the templates.
    """
    if isinstance(class_names, str):
        raise TypeError("class_names must be a list of class names, not a single string")
    class_names = list(class_names)
    if not class_names:
        raise ValueError("class_names is empty")
    templates = _resolve_templates(templates)
    texts = [class_texts(name, synonyms) for name in class_names]
    fields = {"model": text_fingerprint(model), "classes": class_names, "templates": templates}
    if synonyms != "all":  # the key of the synonym mean stays what it was: existing caches stay valid
        fields["synonyms"] = synonyms
    key = hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:32]
    cache_file = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{key}.npy"
    if cache_file.exists():
        try:
            cached = np.load(cache_file)
        except (OSError, ValueError, EOFError):  # unreadable file: recompute and overwrite it
            cached = None
        if cached is not None and cached.shape == (len(class_names), len(templates), model.config.projection_dim):
            return cached

    prompts, owner = [], []  # owner[i] = (class index, template index) of prompt i
    for c, names in enumerate(texts):
        for p, template in enumerate(templates):
            for synonym in names:
                prompts.append(template.format(synonym))
                owner.append((c, p))
    emb = embed_texts(model, tokenizer, prompts, batch_size=batch_size,
                      desc=f"embedding {len(class_names)} classes x {len(templates)} templates")
    sums = np.zeros((len(class_names), len(templates), emb.shape[-1]), np.float64)
    owner = np.asarray(owner)
    np.add.at(sums, (owner[:, 0], owner[:, 1]), emb)  # synonym mean, up to the norm removed next
    T = _l2_normalise(sums).astype(np.float32)

    def save(tmp):
        with open(tmp, "wb") as f:
            np.save(f, T)

    try:
        files.atomic_write(cache_file, save)
    except OSError as e:  # a read-only or full cache: the embeddings are still right, only not kept
        print(f"[dcp_jax] note: text embeddings not cached ({cache_file.parent}: {e.strerror}); set "
              "DCP_JAX_CACHE to a writable directory to keep them", file=sys.stderr)
    return T


def guidance_tokens(tokenizer, class_names: Sequence[str], *, num_context: int = 0,
                    context_length: int = 77) -> tuple[np.ndarray, np.ndarray]:
    """The single-template prompt of each class, for re-encoding the slots' guidance text.

    Each prompt is [start, num_context placeholders, the template's tokens, end]; the placeholders are
    where the learnt context vectors go (CoOp; `CLIPModel.encode_text_tokens(context=...)`). Only a
    class's first synonym is used (as CAT-Seg's trained-text path), in training and at inference. Rows
    are cut to the longest prompt: the causal text tower pools at the end token, so trailing padding
    changes nothing. Returns (input_ids, attention_mask) int32 [C, L].
    """
    prompts = [TEMPLATES["single"][0].format(class_texts(name, "first")[0]) for name in class_names]
    ids, mask = tokenize(tokenizer, prompts, context_length=context_length - num_context)
    if num_context:
        bos = tokenizer.bos_token_id  # a placeholder id that is neither the end token nor padding
        holders = np.full((len(prompts), num_context), bos, np.int32)
        ids = np.concatenate([ids[:, :1], holders, ids[:, 1:]], axis=1)
        mask = np.concatenate([mask[:, :1], np.ones_like(holders), mask[:, 1:]], axis=1)
    length = int(mask.sum(axis=1).max())
    return ids[:, :length], mask[:, :length]


def template_tokens(tokenizer, class_names: Sequence[str], templates="imagenet80", *,
                    context_length: int = 77) -> tuple[np.ndarray, np.ndarray]:
    """Every class in every template, for re-encoding the cost volume's text in training
    (clip.text_finetune = "cost"): (input_ids, attention_mask) int32 [C,P,L], cut to the longest prompt.
    A class's first synonym only, as CAT-Seg's trained-text path: the prompts that inference embeds with
    the trained tower (`embed_vocabulary(..., synonyms="first")`, dcp_jax/segmenter.py)."""
    templates = _resolve_templates(templates)
    prompts = [template.format(class_texts(name, "first")[0]) for name in class_names for template in templates]
    ids, mask = tokenize(tokenizer, prompts, context_length=context_length)
    length = int(mask.sum(axis=1).max())
    shape = (len(class_names), len(templates), length)
    return ids[:, :length].reshape(shape), mask[:, :length].reshape(shape)


__all__ = ["IMAGENET_TEMPLATES", "SYNONYMS", "TEMPLATES", "class_texts", "default_cache_dir", "embed_texts", "embed_vocabulary",
           "guidance_tokens", "load_tokenizer", "seen_mask", "split_synonyms", "template_tokens", "text_fingerprint",
           "tokenize"]
