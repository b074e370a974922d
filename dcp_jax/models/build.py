"""Building models: one path from a config to a module whose arrays already sit in their shardings.

    abstract -> shardings -> init under jit -> loaded weights placed

1. The abstract model (`nnx.eval_shape`): the parameter tree with shapes, nothing allocated.
2. A NamedSharding per parameter from `config.mesh.shard_rules` (dcp_jax/distributed.py).
3. Every parameter that is not loaded is initialised by one jitted program whose outputs are
   created directly in their shardings (`jax.jit(..., out_shardings=...)`), so a sharded model is
   never materialised whole on one device.
4. Loaded weights (a CLIP checkpoint, host numpy arrays) are placed straight into their shardings.

Random weights (tests, the parameter summary, benchmarks, the random tiny CLIP that `write_tiny_clip`
saves as a checkpoint) take the same path
with nothing loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx

from dcp_jax import config as config_lib
from dcp_jax import distributed
from dcp_jax import rules as rules_lib
from dcp_jax.models import clip as clip_lib
from dcp_jax.models.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from dcp_jax.models.compute import traced_construction
from dcp_jax.models.dcp import DCPCLIP
from dcp_jax.models.tiny_clip import tiny_clip_config, tiny_tokenizer_files

# OpenAI CLIP architectures (the HF openai/clip-vit-* config.json values), for building without weights.
OPENAI_CLIP = {
    "B/16": CLIPConfig(
        vision=CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                image_size=224, patch_size=16),
        text=CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        projection_dim=512,
    ),
    "L/14": CLIPConfig(
        vision=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, image_size=336, patch_size=14),
        text=CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        projection_dim=768,
    ),
}


def clip_config_for(config) -> CLIPConfig:
    """The CLIP architecture a config runs at (image_size = config.clip.image_size).

    From config.clip.checkpoint's config.json when that exists, else config.clip.variant ("B/16",
    "L/14"), else the random tiny CLIP of config.clip.tiny.
    """
    checkpoint = Path(config.clip.checkpoint).expanduser() if config.clip.checkpoint else None
    variant = config.clip.get("variant", "")
    if checkpoint is not None and (checkpoint / "config.json").exists():
        cfg = CLIPConfig.from_hf(json.loads((checkpoint / "config.json").read_text()))
    elif variant:
        if variant not in OPENAI_CLIP:
            raise ValueError(f"config.clip.variant={variant!r}: expected one of {sorted(OPENAI_CLIP)}")
        cfg = OPENAI_CLIP[variant]
    elif not config.clip.checkpoint:
        cfg = tiny_clip_config(config.clip.tiny.to_dict())
    else:
        raise ValueError(
            f"cannot tell the CLIP architecture: {checkpoint} has no config.json and config.clip.variant is empty"
        )
    return cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=int(config.clip.image_size)))


# ---------------------------------------------------------------------------------------------
# The generic path
# ---------------------------------------------------------------------------------------------

def default_mesh():
    """One local device: where models live when the caller names no mesh (tests, tools)."""
    return distributed.make_mesh(devices=jax.local_devices()[:1])


def init_module(make: Callable[[nnx.Rngs], nnx.Module], *, mesh_config, mesh=None, seed: int = 0,
                given: dict[str, np.ndarray] | None = None) -> nnx.Module:
    """Build `make(rngs)` on `mesh`: parameters named in `given` (path -> host array) are placed as
    given, every other one is initialised under jit straight into its sharding."""
    mesh = default_mesh() if mesh is None else mesh
    given = dict(given or {})
    with traced_construction():
        abstract = nnx.eval_shape(lambda: make(nnx.Rngs(seed)))
    shapes = {path: tuple(var.get_value().shape) for path, var in rules_lib.flat_params(abstract)}
    unknown = sorted(set(given) - set(shapes))
    if unknown:
        raise ValueError(f"weights for parameters the model does not have: {unknown[:5]}")
    wrong = [f"{p}: {np.shape(v)} vs {shapes[p]}" for p, v in given.items() if tuple(np.shape(v)) != shapes[p]]
    if wrong:
        raise ValueError(f"weights of the wrong shape: {wrong[:5]}")

    def is_given(path, _):
        return rules_lib.path_str(path) in given

    graphdef, abstract_given, abstract_init = nnx.split(abstract, is_given, ...)
    init_shardings = distributed.tree_shardings(abstract_init, mesh, mesh_config)

    def init():
        return nnx.split(make(nnx.Rngs(seed)), is_given, ...)[2]  # XLA drops the unused initialisers

    platform = mesh.devices.flat[0].platform
    with traced_construction():
        initialised = _initialise(init, init_shardings, platform) if jax.tree.leaves(abstract_init) else abstract_init
    given_shardings = distributed.tree_shardings(abstract_given, mesh, mesh_config)
    flat, flat_shardings = nnx.to_flat_state(abstract_given), dict(nnx.to_flat_state(given_shardings))
    for path, var in flat:
        value = np.asarray(given[rules_lib.path_str(path)], dtype=var.get_value().dtype)
        var.set_value(distributed.put(value, flat_shardings[path].get_value()))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), initialised)


def _initialise(init, shardings, platform: str):
    """init() -> its arrays in `shardings` (on devices of `platform`), computed on the host's CPU.

    The initialisers run once and are a fusion per parameter: XLA:CPU with its optimisation passes off
    compiles them in seconds, where a GPU compile took minutes (3 min 41 s for B/16 on an H200). On a
    GPU/TPU mesh the host's values are then placed (every process computes the same values from the
    seed, so each places its own shards); without a CPU backend (JAX_PLATFORMS naming only the
    accelerator) they are computed on the mesh."""
    fast = {"xla_backend_optimization_level": 0}
    if platform == "cpu":
        return jax.jit(init, out_shardings=shardings, compiler_options=fast)()
    try:
        host = jax.devices("cpu")[0]
    except RuntimeError:
        return jax.jit(init, out_shardings=shardings)()
    with jax.default_device(host):
        values = jax.jit(init, compiler_options=fast)()
    return jax.tree.map(lambda v, s: distributed.put(np.asarray(v), s), values, shardings)


# ---------------------------------------------------------------------------------------------
# DCP-CLIP and CLIP
# ---------------------------------------------------------------------------------------------

def abstract_model(config, clip_config: CLIPConfig | None = None) -> DCPCLIP:
    """The model with ShapeDtypeStruct parameters (nothing allocated)."""
    clip_config = clip_config_for(config) if clip_config is None else clip_config
    with traced_construction():
        return nnx.eval_shape(lambda: DCPCLIP(config, clip_config, rngs=nnx.Rngs(config.seed)))


def create_model(config, clip_config: CLIPConfig | None = None, *, mesh=None,
                 clip_params: dict[str, np.ndarray] | None = None, seed: int | None = None) -> DCPCLIP:
    """DCP-CLIP on `mesh`: the CLIP from `clip_params` (our flat names, e.g. from `load_clip_params`)
    or random, the head freshly initialised (seed: config.seed)."""
    clip_config = clip_config_for(config) if clip_config is None else clip_config
    given = {}
    if clip_params is not None:
        _check_clip_params(clip_params, clip_config)
        given = {f"clip/{name}": value for name, value in clip_params.items()}
        if config_lib.text_finetune(config) != "none":  # the frozen copy starts as the pretrained text q/v
            for name, value in clip_params.items():
                parts = name.split("/")
                if parts[:3] == ["text_model", "encoder", "layers"] and parts[4] == "self_attn" and \
                        parts[5] in ("q_proj", "v_proj"):
                    given[f"frozen_text_qv/layers/{parts[3]}/{parts[5]}/{parts[6]}"] = value
    seed = config.seed if seed is None else seed
    return init_module(lambda rngs: DCPCLIP(config, clip_config, rngs=rngs), mesh_config=config.mesh, mesh=mesh,
                       seed=seed, given=given)


def model_from_clip_checkpoint(config, path: str | os.PathLike, *, mesh=None):
    """(DCP-CLIP with the CLIP weights at `path` and a fresh head, clip_config, the CLIP params).

    The checkpoint defines the CLIP architecture; when config.clip.variant names one, they must agree."""
    params, clip_config = clip_lib.load_clip_params(path, image_size=config.clip.image_size)
    check_variant(config, clip_config, what=f"the CLIP checkpoint {path}")
    return create_model(config, clip_config, mesh=mesh, clip_params=params), clip_config, params


def describe(clip_config: CLIPConfig) -> str:
    v, t = clip_config.vision, clip_config.text
    return (f"ViT width {v.hidden_size}, {v.num_hidden_layers} blocks, patch {v.patch_size}; text width "
            f"{t.hidden_size}, {t.num_hidden_layers} blocks; projection {clip_config.projection_dim}")


def check_variant(config, clip_config: CLIPConfig, *, what: str) -> None:
    """A clear error when a CLIP is not the architecture config.clip.variant names (image size aside)."""
    variant = config.clip.get("variant", "")
    if not variant or variant not in OPENAI_CLIP:
        return
    want = OPENAI_CLIP[variant]
    same_size = lambda c: c.replace(vision=dataclasses.replace(c.vision, image_size=0))  # noqa: E731
    if (same_size(want).vision, want.text.hidden_size, want.projection_dim) != (
            same_size(clip_config).vision, clip_config.text.hidden_size, clip_config.projection_dim):
        configs = {"B/16": "configs/dcp_vitb16_coco_stuff.py", "L/14": "configs/dcp_vitl14_coco_stuff.py"}
        guess = next((name for name, c in OPENAI_CLIP.items() if same_size(c).vision == same_size(clip_config).vision),
                     None)
        fix = f"use {configs[guess]}" if guess else "set --config.clip.variant= (empty) for another architecture"
        raise ValueError(f"{what} is a {describe(clip_config)}, but config.clip.variant={variant!r} is a "
                         f"{describe(want)}; {fix}")


def random_clip(clip_config: CLIPConfig, *, seed: int = 0, dtype=np.float32) -> clip_lib.CLIPModel:
    """A randomly initialised CLIP on one device (the random tiny CLIP, tests)."""
    import ml_collections
    replicate = ml_collections.ConfigDict(dict(shard_rules=((".*", "replicate"),), min_shard_size=0))
    return init_module(lambda rngs: clip_lib.CLIPModel(clip_config, dtype=dtype, rngs=rngs), mesh_config=replicate,
                       seed=seed)


def write_tiny_clip(out_dir: str | os.PathLike, arch: dict, seed: int = 0) -> Path:
    """Write a random tiny CLIP as an HF checkpoint directory (config, weights, tokenizer); deterministic per seed.

    `arch` has the shape of `configs/tiny.py`'s TINY_CLIP; `text.vocab_size` defaults to 1024.
    """
    out_dir = Path(out_dir)
    config = tiny_clip_config(arch)
    clip_lib.save_hf_checkpoint(random_clip(config, seed=seed), config, out_dir)
    for name, content in tiny_tokenizer_files(config.text.vocab_size).items():
        (out_dir / name).write_text(content, encoding="utf-8")
    return out_dir


def _check_clip_params(params: dict, clip_config: CLIPConfig) -> None:
    from dcp_jax.models import clip_convert
    clip_convert.check_params(params, clip_convert.param_shapes(clip_config), what=f"a CLIP ({describe(clip_config)})")
