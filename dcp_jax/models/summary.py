"""Parameter counts (and optionally one forward) of a DCP-CLIP config.

    python -m dcp_jax.models.summary --config configs/dcp_vitb16_coco_stuff.py
    python -m dcp_jax.models.summary --config configs/dcp_vitb16_coco_stuff.py --forward --num-classes 150

Counts come from the abstract model (nothing is allocated); "learnable" means selected by the
optimizer's parameter rules (dcp_jax/optim.py). The CLIP architecture is read from
config.clip.checkpoint's config.json when that exists, else from config.clip.variant ("B/16",
"L/14"), else the tiny random CLIP (config.clip.tiny). --forward builds the model with random
weights and runs one jitted inference forward at config.clip.image_size on random unit text
embeddings, printing compile and run time.
"""

from __future__ import annotations

import collections
import sys
import time

import jax
import numpy as np
from flax import nnx

from dcp_jax import cli, optim, runtime
from dcp_jax.models import build, dcp
from dcp_jax.rules import flat_params


def _group(path: str) -> str:
    """Reporting group of a parameter path."""
    parts = path.split("/")
    if parts[0] == "clip":
        return "clip/" + parts[1]
    if parts[0] == "decoder" and parts[1] == "layers":
        return "/".join(parts[:4]) if len(parts) > 4 else "/".join(parts[:3])
    return "/".join(parts[:2])


def count_params(model: nnx.Module, config) -> dict[str, tuple[int, int]]:
    """{group: (total, learnable)} plus "TOTAL"; works on abstract models."""
    rules = optim.parameter_rules(config)
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for path, var in flat_params(model):
        n = int(np.prod(var.get_value().shape))
        learn = n if optim.group_of(rules, path) is not None else 0
        for key in (_group(path), "TOTAL"):
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


# The paper's Table II, DCP-CLIP row (its totals fit only the L/14 backbone: docs/MODEL.md section 8).
PAPER_TABLE_II = {"total": 443.6e6, "learnable": 80.3e6}


def format_table_ii(counts: dict[str, tuple[int, int]]) -> str:
    """Our counts beside the paper's Table II, by part. The paper gives only the total and the learnable
    count; the head it implies is its learnable count less the CLIP parameters that we train."""
    total, learnable = counts["TOTAL"]
    clip_learnable = sum(learn for key, (_, learn) in counts.items() if key.startswith("clip/"))
    head = learnable - clip_learnable
    paper_head = PAPER_TABLE_II["learnable"] - clip_learnable
    rows = [("total", total, PAPER_TABLE_II["total"]), ("learnable", learnable, PAPER_TABLE_II["learnable"]),
            ("  of which CLIP", clip_learnable, None), ("  of which the head", head, paper_head)]
    lines = ["Against the paper's Table II (DCP-CLIP: 443.6 M total, 80.3 M learnable; the head it implies is",
             "its learnable count less the CLIP parameters trained here):",
             f"{'':<24}{'ours (M)':>12}{'paper (M)':>12}{'ours - paper':>14}"]
    for name, ours, paper in rows:
        paper_text = "" if paper is None else f"{paper / 1e6:>12.2f}{(ours - paper) / 1e6:>+14.2f}"
        lines.append(f"{name:<24}{ours / 1e6:>12.2f}{paper_text}")
    return "\n".join(lines)


def run_forward(config, *, num_classes: int, num_slots: int, batch: int, seed: int = 0):
    """One jitted inference forward (with TV) on random weights; returns (compile_s, run_s, outputs)."""
    model = build.create_model(config, seed=seed)
    rng = np.random.default_rng(seed)
    text = rng.standard_normal((num_classes, dcp.num_templates(config), model.clip_dim)).astype(np.float32)
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


def main(argv=None) -> int:
    from absl import flags
    cmd = cli.Command("python -m dcp_jax.models.summary", __doc__, argv, config=cli.default_config(),
                      config_help="model config file (configs/X.py[:ARGS]); default: the ViT-B/16 recipe")
    f = cmd.flags
    flags.DEFINE_bool("forward", False, "also run one jitted forward on random weights", flag_values=f)
    flags.DEFINE_integer("num-classes", 150, "vocabulary size C for --forward", flag_values=f)
    flags.DEFINE_integer("num-slots", -1, "K for --forward; -1 = config.eval.num_slots, 0 = all classes",
                         flag_values=f)
    flags.DEFINE_integer("batch", 1, "images per forward for --forward", flag_values=f)
    args = cmd.parse()

    def body():
        config = cmd.config()
        if args.forward:  # only the forward touches a device
            runtime.start(config)
        clip_config = build.clip_config_for(config)
        v = clip_config.vision
        print(f"CLIP: width {v.hidden_size}, {v.num_hidden_layers} blocks, patch {v.patch_size}, input {v.image_size} "
              f"(grid {v.grid_size}), projection {clip_config.projection_dim}; clip.finetune={config.clip.finetune}, "
              f"clip.text_finetune={config.clip.text_finetune}")
        counts = count_params(build.abstract_model(config, clip_config), config)
        print(format_counts(counts))
        print(format_table_ii(counts))
        if args.forward:
            from tqdm import tqdm
            requested = args["num-slots"].value
            num_slots = config.eval.num_slots if requested < 0 else requested
            with tqdm(total=1, desc="compile + forward", unit="run") as bar:
                compile_s, run_s, out = run_forward(config, num_classes=args["num-classes"].value,
                                                    num_slots=num_slots, batch=args.batch)
                bar.update()
            print(f"forward on {jax.devices()[0].platform}: B={args.batch}, C={args['num-classes'].value}, "
                  f"K={out['slot_class'].shape[1]}, input {v.image_size}x{v.image_size} -> logits "
                  f"{tuple(out['logits'].shape)}; compile {compile_s:.1f} s, run {run_s:.2f} s; "
                  f"DCS selected {np.asarray(out['dcs_selected']).tolist()}, "
                  f"dropped {np.asarray(out['dcs_dropped']).tolist()}")

    return cmd.run(body)


if __name__ == "__main__":
    sys.exit(main())
