"""A tiny random CLIP and a small DCP head: tests and CPU runs (no downloads).

With clip.checkpoint = "" the trainer writes `write_tiny_clip(W/"tiny_clip", config.clip.tiny)` (a random HF
checkpoint with its own tokenizer) and starts from it. The 64x64 CLIP input gives an 8x8 patch grid, so the
decoder window is 4 and the logits are 32x32.

    python -m dcp_jax.train --config configs/tiny.py --workdir /tmp/dcp_tiny \
        --config.train.dataset=folder:/path/to/data

Config args (`configs/tiny.py:templates=imagenet80,num_slots=4`): templates ("single" | "imagenet80"),
num_slots (K in training; 0 = every class).
"""

from dcp_jax.config import parse_arg, tiny_config


def get_config(arg=None):
    arg = parse_arg(arg, templates="single", num_slots=8)
    c = tiny_config()
    c.text.templates = arg.templates
    c.model.dcs.num_slots = arg.num_slots
    return c
