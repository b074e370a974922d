"""The tiny CLIP's architecture and tokenizer (tests and the no-download demo).

`tiny_clip_config(arch)` is the architecture of `configs/tiny.py`'s TINY_CLIP-shaped dicts;
`tiny_tokenizer_files(vocab_size)` is a small but real CLIP BPE tokenizer (vocab.json + merges.txt):
byte-level, so every string tokenizes (unknown words fall back to bytes), with merges learnt from a built-in word
list so common class names and template words are single tokens. No torch, no network; well under a second.
The random weights that make them a checkpoint come from dcp_jax/models/build.py (`write_tiny_clip`).
"""

from __future__ import annotations

import collections
import functools
import json

import numpy as np

from dcp_jax.models.clip import CLIPConfig


BOS, EOS = "<|startoftext|>", "<|endoftext|>"
DEFAULT_TINY_VOCAB = 1024

# Words the merges are learnt from: prompt-template words plus common segmentation class names.
_CORPUS = """
a an the of in on at with and or photo picture image rendering drawing sketch painting origami tattoo toy plastic
bad good large small big little cropped close-up low resolution bright dark blurry jpeg clean dirty nice weird
cool black white scene there is this that it itself one my video game sculpture embroidered cartoon graffiti
person people man woman child sky tree trees grass road building wall floor ceiling water sea river lake mountain
hill sand snow ground field earth rock stone car truck bus train bicycle motorcycle airplane boat ship bird cat dog
horse sheep cow elephant bear zebra giraffe chair table sofa couch bed bench door window curtain cabinet shelf
desk lamp light plant flower bush fence sidewalk pavement path stairs railing column pillar pole sign signboard
street house roof tower bridge skyscraper tent umbrella bag bottle cup glass bowl plate food fruit banana apple
orange pizza cake book box clock vase mirror picture painting television screen computer keyboard mouse phone
kitchen sink toilet bathtub towel pillow blanket rug carpet cloth clothes shirt hat shoe wood metal paper
cardboard plastic leaves branch dirt mud gravel platform playground runway counter stove oven refrigerator
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible byte -> printable unicode map."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _learn_merges(num_merges: int, base_vocab: set[str], *, corpus=None) -> list[tuple[str, str]]:
    """Greedy BPE on `corpus` (a word list; default the built-in one) (CLIP style: '</w>' on the last symbol),
    then letter bigrams if needed."""
    byte_map = bytes_to_unicode()
    counts = collections.Counter(_CORPUS if corpus is None else corpus)
    words = {}
    for word, c in counts.items():
        chars = [byte_map[b] for b in word.encode("utf-8")]
        words[tuple(chars[:-1] + [chars[-1] + "</w>"])] = c
    merges, known = [], set(base_vocab)
    while len(merges) < num_merges:
        pairs = collections.Counter()
        for symbols, c in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]  # deterministic tie-break
        merges.append(best)
        known.add(best[0] + best[1])
        new_words = {}
        for symbols, c in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    letters = "abcdefghijklmnopqrstuvwxyz"
    for suffix in ("</w>", ""):  # filler merges so any vocab_size up to the documented maximum works
        for x in letters:
            for y in letters:
                if len(merges) >= num_merges:
                    return merges
                if x + y + suffix not in known:
                    merges.append((x, y + suffix))
                    known.add(x + y + suffix)
    if len(merges) < num_merges:
        raise ValueError(f"tiny CLIP tokenizer can provide at most {514 + len(merges)} tokens; lower vocab_size")
    return merges


def tiny_tokenizer_files(vocab_size: int, *, corpus=None) -> dict[str, str]:
    """File name -> content of a CLIP BPE tokenizer with exactly `vocab_size` tokens (BOS = V-2, EOS = V-1).

    `corpus`: the (lower-case) words the merges are learnt from, repeated by frequency; default a built-in list
    of prompt-template words and common class names."""
    return dict(_tokenizer_files(int(vocab_size), None if corpus is None else tuple(corpus)))


@functools.lru_cache(maxsize=8)
def _tokenizer_files(vocab_size: int, corpus: tuple[str, ...] | None = None) -> dict[str, str]:
    byte_chars = list(bytes_to_unicode().values())
    base = byte_chars + [c + "</w>" for c in byte_chars]
    if vocab_size < len(base) + 2:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level CLIP tokenizer (>= {len(base) + 2})")
    merges = _learn_merges(vocab_size - len(base) - 2, set(base), corpus=corpus)
    tokens = base + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == vocab_size, "duplicate token in the tiny vocabulary"
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    tokenizer_config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
                        "errors": "replace", "clean_up_tokenization_spaces": False, **specials}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
        "special_tokens_map.json": json.dumps(specials, indent=2),
    }


def tiny_clip_config(arch: dict):
    """A `clip.CLIPConfig` from a `TINY_CLIP`-shaped dict (vision/text sub-dicts with HF names, projection_dim)."""
    text = dict(arch.get("text", {}))
    vocab_size = int(text.get("vocab_size", DEFAULT_TINY_VOCAB))
    text.update(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                pad_token_id=vocab_size - 1)
    hf = {"text_config": text, "vision_config": dict(arch.get("vision", {})),
          "projection_dim": int(arch.get("projection_dim", 512)), "logit_scale_init_value": float(np.log(100.0))}
    unknown = set(arch) - {"text", "vision", "projection_dim"}
    if unknown:
        raise ValueError(f"unknown tiny CLIP arch keys {sorted(unknown)}; expected vision, text, projection_dim")
    return CLIPConfig.from_hf(hf)


__all__ = ["DEFAULT_TINY_VOCAB", "tiny_clip_config", "tiny_tokenizer_files"]
