"""Parameter counts (and optionally one forward) of a DCP-CLIP config.

    python -m dcp_jax.models.summary --config configs/dcp_vitb16_coco_stuff.py
    python -m dcp_jax.models.summary --config configs/dcp_vitb16_coco_stuff.py --forward --num-classes 150

Counts come from `nnx.eval_shape` (nothing is allocated); "learnable" means selected by
`dcp.trainable_filter(config)`. The CLIP architecture is read from config.clip.checkpoint's config.json
when that exists, else from config.clip.variant ("B/16", "L/14"), else the tiny random CLIP
(config.clip.tiny). --forward fills random weights on the host (no init compile) and runs one jitted
forward at config.clip.image_size with random unit text embeddings, printing compile and run time.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from dcp_jax.models import dcp
from dcp_jax.models.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

# OpenAI CLIP architectures (the HF openai/clip-vit-* config.json values), for counting without weights.
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
    """The CLIP architecture a config runs at (image_size = config.clip.image_size); see module doc."""
    checkpoint = Path(config.clip.checkpoint).expanduser() if config.clip.checkpoint else None
    variant = config.clip.get("variant", "")
    if checkpoint is not None and (checkpoint / "config.json").exists():
        cfg = CLIPConfig.from_hf(json.loads((checkpoint / "config.json").read_text()))
    elif variant:
        if variant not in OPENAI_CLIP:
            raise ValueError(f"config.clip.variant={variant!r}: expected one of {sorted(OPENAI_CLIP)}")
        cfg = OPENAI_CLIP[variant]
    elif not config.clip.checkpoint:
        from dcp_jax.models.tiny_clip import tiny_config

        cfg = tiny_config(config.clip.tiny.to_dict())
    else:
        raise ValueError(
            f"cannot tell the CLIP architecture: {checkpoint} has no config.json and config.clip.variant is empty"
        )
    return cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=int(config.clip.image_size)))


def abstract_model(config, clip_config: CLIPConfig) -> dcp.DCPCLIP:
    """The model with ShapeDtypeStruct params (no allocation, no compile)."""
    return nnx.eval_shape(lambda: dcp.DCPCLIP(config, clip_config, rngs=nnx.Rngs(0)))


def random_model(config, clip_config: CLIPConfig, seed: int = 0) -> dcp.DCPCLIP:
    """A model with random host-generated params: kernels ~ N(0, 1/fan_in), norm scales ~1, small
    biases, CLIP logit scale log(100). Much cheaper than nnx init on CPU (no per-shape compiles)."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(abstract_model(config, clip_config))
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        shape, leaf = var.get_value().shape, str(path[-1])
        if leaf == "logit_scale":
            value = np.full(shape, np.log(100.0))
        elif leaf == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif leaf == "bias":
            value = 0.05 * rng.standard_normal(shape)
        elif leaf == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        else:  # embeddings, class embedding, prompt
            value = 0.1 * rng.standard_normal(shape)
        var.set_value(jnp.asarray(value, jnp.float32))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _group(path: tuple) -> str:
    """Reporting group of a parameter path."""
    parts = [str(p) for p in path]
    if parts[0] == "clip":
        return "clip/" + parts[1]
    if parts[0] == "decoder" and parts[1] == "layers":
        return "/".join(parts[:4]) if len(parts) > 4 else "/".join(parts[:3])
    return "/".join(parts[:2])


def count_params(model: nnx.Module, config) -> dict[str, tuple[int, int]]:
    """{group: (total, learnable)} plus "TOTAL"; works on abstract models."""
    trainable = dcp.trainable_filter(config)
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = int(np.prod(var.get_value().shape))
        group = _group(path)
        learn = n if trainable(path, var) else 0
        for key in (group, "TOTAL"):
            counts[key][0] += n
            counts[key][1] += learn
    return {k: (v[0], v[1]) for k, v in counts.items()}


def format_counts(counts: dict[str, tuple[int, int]]) -> str:
    lines = [f"{'module':<44}{'total':>14}{'learnable':>14}"]
    for key in sorted(k for k in counts if k != "TOTAL"):
        total, learn = counts[key]
        lines.append(f"{key:<44}{total:>14,}{learn:>14,}")
    total, learn = counts["TOTAL"]
    lines.append(f"{'TOTAL':<44}{total:>14,}{learn:>14,}")
    lines.append(f"{'TOTAL (M)':<44}{total / 1e6:>14.2f}{learn / 1e6:>14.2f}")
    return "\n".join(lines)


def run_forward(config, clip_config: CLIPConfig, *, num_classes: int, num_slots: int, batch: int, seed: int = 0):
    """One jitted inference forward (with TV) on random weights; returns (compile_s, run_s, outputs)."""
    model = random_model(config, clip_config, seed)
    p = dcp.num_templates(config)
    rng = np.random.default_rng(seed)
    text = rng.standard_normal((num_classes, p, clip_config.projection_dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    size = int(config.clip.image_size)
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    seen = np.arange(num_classes) < num_classes // 2
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, images, text, seen):
        return nnx.merge(graphdef, state)(images, text, num_slots=num_slots, seen=seen, train=False)

    start = time.perf_counter()
    compiled = forward.lower(state, images, text, seen).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(state, images, text, seen))
    return compile_s, time.perf_counter() - start, out


def _define_flags() -> None:
    # Defined only when run as a program, so importing this module defines no global absl flags.
    config_flags.DEFINE_config_file("config", None, "Model config file (configs/*.py[:args]).", lock_config=True)
    flags.DEFINE_bool("forward", False, "Also run one jitted forward on random weights.")
    flags.DEFINE_integer("num-classes", 150, "Vocabulary size C for --forward.")
    flags.DEFINE_integer("num-slots", -1, "K for --forward; -1 = config.eval.num_slots, 0 = all classes.")
    flags.DEFINE_integer("batch", 1, "Images per forward for --forward.")
    flags.mark_flag_as_required("config")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    config = f.config
    num_classes, requested_slots, batch = f["num-classes"].value, f["num-slots"].value, f.batch
    clip_config = clip_config_for(config)
    v = clip_config.vision
    print(f"CLIP: width {v.hidden_size}, {v.num_hidden_layers} blocks, patch {v.patch_size}, input {v.image_size} "
          f"(grid {v.grid_size}), projection {clip_config.projection_dim}; clip.finetune={config.clip.finetune}")
    print(format_counts(count_params(abstract_model(config, clip_config), config)))
    if f.forward:
        from tqdm import tqdm

        num_slots = config.eval.num_slots if requested_slots < 0 else requested_slots
        with tqdm(total=1, desc="compile + forward", unit="run") as bar:
            compile_s, run_s, out = run_forward(
                config, clip_config, num_classes=num_classes, num_slots=num_slots, batch=batch
            )
            bar.update()
        print(f"forward on {jax.devices()[0].platform}: B={batch}, C={num_classes}, "
              f"K={out['slot_class'].shape[1]}, input {v.image_size}x{v.image_size} -> logits "
              f"{tuple(out['logits'].shape)}; compile {compile_s:.1f} s, run {run_s:.2f} s; "
              f"DCS selected {np.asarray(out['dcs_selected']).tolist()}, "
              f"dropped {np.asarray(out['dcs_dropped']).tolist()}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
