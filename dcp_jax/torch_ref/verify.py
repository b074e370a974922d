"""Check an export against the JAX model it came from: `verify_export(DIR)` (python -m dcp_jax.export --verify).

The JAX model is rebuilt from the export (`export_format.load_export`), the PyTorch reference from the same
files (`load_reference`); both run on random inputs: images at the config's crop size, random unit
text embeddings T [C,P,D], the slots of the JAX model's own selection (K = C, so every class has a
slot, valid or not) and, when the config re-encodes the guidance text, the tokenized single-template
prompts of C class names. JAX runs under `jax.default_matmul_precision("highest")`, torch in float32.

The checked number is the head's: the logits of `decode` on the same features (JAX's), the same
text embeddings, slots and guidance text. The CLIP features and the logits of torch's own features
are reported as well.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from dcp_jax import export_format
from dcp_jax import text as text_lib
from dcp_jax.models import selection
from dcp_jax.torch_ref.head import NUM_TEMPLATES
from dcp_jax.torch_ref.model import TorchDCP, load_reference, mean_text_embedding

TOLERANCE = 1e-4  # max |jax - torch| of the head's float32 logits that --verify accepts
CLASS_NAMES = ("cat", "dog", "grass", "sky", "road", "tree", "person", "building", "water", "car")


# Module-level programs with the model structure static (as dcp_jax/forward.py): one compile per
# model structure and input shape for every caller in a process.
@functools.partial(jax.jit, static_argnames=("graphdef", "num_slots"))
def _encode_select(graphdef, state, images, text_embeds, *, num_slots: int):
    model = nnx.merge(graphdef, state)
    features = model.encode(images)
    return features, model.select(features, selection.mean_text_embedding(text_embeds), num_slots=num_slots)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode(graphdef, state, features, text_embeds, slot_class, slot_valid, guidance_text):
    return nnx.merge(graphdef, state).decode(features, text_embeds, slot_class, slot_valid, guidance_text)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _guidance(graphdef, state, input_ids, attention_mask):
    return nnx.merge(graphdef, state).encode_guidance_text(input_ids, attention_mask)


def class_names(num_classes: int) -> list[str]:
    return [CLASS_NAMES[i] if i < len(CLASS_NAMES) else f"thing {i}" for i in range(num_classes)]


def random_inputs(config, clip_dim: int, *, seed: int = 0, num_images: int = 2, num_classes: int = 6):
    """(images float32 [B,S,S,3] in 0..255 at train.crop_size, unit text embeddings T [C,P,D])."""
    rng = np.random.default_rng(seed)
    crop = int(config.train.crop_size)
    images = rng.uniform(0, 255, (num_images, crop, crop, 3)).astype(np.float32)
    text = rng.standard_normal((num_classes, NUM_TEMPLATES[config.text.templates], clip_dim)).astype(np.float32)
    return images, text / np.linalg.norm(text, axis=-1, keepdims=True)


def guidance_inputs(export_dir, reference: TorchDCP, num_classes: int):
    """Tokenized guidance prompts (input_ids, attention_mask) when the config re-encodes the guidance
    text (learnt context or text fine-tuning), else None (the guidance is T_bar)."""
    if not reference.reencodes_text:
        return None
    g = reference.config.model.guidance
    tokenizer = text_lib.load_tokenizer(Path(export_dir) / "clip")
    return text_lib.guidance_tokens(tokenizer, class_names(num_classes),
                                    num_context=g.prompt_tokens if g.prompt == "context" else 0,
                                    context_length=reference.clip.config.text_config.max_position_embeddings)


def _max_abs(a, b) -> float:
    a = a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)
    b = b.detach().cpu().numpy() if torch.is_tensor(b) else np.asarray(b)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def compare_export(export_dir, *, seed: int = 0, num_images: int = 2, num_classes: int = 6, model=None,
                   reference: TorchDCP | None = None) -> dict:
    """Run the JAX model and the torch reference of an export on the same random inputs.

    `model` / `reference`: already loaded ones (default: both loaded from `export_dir`). Returns
    logits (max |jax - torch| of decode on JAX's features), end_to_end (decode on torch's own
    features and guidance), features {cls, dense, layer_<i>, attn_last}, guidance (None unless
    re-encoded), num_images, num_slots, slot_valid (the JAX selection's, numpy).
    """
    model = export_format.load_export(export_dir) if model is None else model
    reference = load_reference(export_dir) if reference is None else reference
    images, text = random_inputs(reference.config, model.clip_dim, seed=seed, num_images=num_images,
                                 num_classes=num_classes)
    tokens = guidance_inputs(export_dir, reference, num_classes)
    graphdef, state = nnx.split(model)
    with jax.default_matmul_precision("highest"):
        features, dcs = _encode_select(graphdef, state, images, text, num_slots=num_classes)
        guidance = (_guidance(graphdef, state, *tokens) if tokens is not None
                    else selection.mean_text_embedding(jnp.asarray(text)))
        logits = _decode(graphdef, state, features, text, dcs["slot_class"], dcs["slot_valid"], guidance)
    features, dcs, guidance, logits = jax.device_get((features, dcs, guidance, logits))

    with torch.no_grad():
        ours = reference.encode(images)
        our_guidance = (reference.guidance_text(*tokens) if tokens is not None
                        else mean_text_embedding(torch.from_numpy(text)))
        same_inputs = reference.decode(features, text, dcs["slot_class"], dcs["slot_valid"], guidance)
        end_to_end = reference.decode(ours, text, dcs["slot_class"], dcs["slot_valid"], our_guidance)
    diffs = {"cls": _max_abs(ours["cls"], features["cls"]), "dense": _max_abs(ours["dense"], features["dense"])}
    for layer, got, want in zip(reference.guidance_layers, ours["shallow"], features["shallow"]):
        diffs[f"layer_{layer}"] = _max_abs(got, want)
    diffs["attn_last"] = _max_abs(ours["attn_last"], features["attn_last"])
    return {"logits": _max_abs(same_inputs, logits), "end_to_end": _max_abs(end_to_end, logits), "features": diffs,
            "guidance": _max_abs(our_guidance, guidance) if tokens is not None else None,
            "num_images": num_images, "num_slots": int(logits.shape[1]), "slot_valid": np.asarray(dcs["slot_valid"])}


def verify_export(export_dir, seed: int = 0, *, tolerance: float = TOLERANCE, num_images: int = 2,
                  num_classes: int = 6, model=None, reference: TorchDCP | None = None, out=print) -> float:
    """Compare the JAX model and the torch reference of an export (see compare_export); print the
    features' and logits' differences, the head's logit difference on the last line. Returns it."""
    r = compare_export(export_dir, seed=seed, num_images=num_images, num_classes=num_classes, model=model,
                       reference=reference)
    out("verify: CLIP features max |jax - torch|: " + ", ".join(f"{k} {v:.1e}" for k, v in r["features"].items()))
    if r["guidance"] is not None:
        out(f"verify: re-encoded guidance text max |jax - torch| {r['guidance']:.1e}")
    out(f"verify: logits from each side's own features max |jax - torch| {r['end_to_end']:.1e}")
    out(f"verify: max |jax - torch| logit difference {r['logits']:.1e} (tolerance {tolerance:g}) on "
        f"{r['num_images']} images x {r['num_slots']} slots")
    return r["logits"]
