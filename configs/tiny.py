r"""A tiny random CLIP and a small DCP head: tests and CPU runs (no downloads).

    python -m dcp_jax.train --config configs/tiny.py --workdir /tmp/dcp_tiny \
        --config.train.dataset=folder:/path/to/data

The B/16 recipe scaled down. With clip.checkpoint = "" the trainer writes a random HF CLIP of the
architecture `clip.tiny` (with its own tokenizer) to W/tiny_clip and starts from it. The 64x64 CLIP
input gives an 8x8 patch grid, so the decoder window is 4 and the logits are 32x32.
Config args (`configs/tiny.py:templates=imagenet80,num_slots=4`): templates ("single" | "imagenet80"),
num_slots (K in training; 0 = every class).
"""

from dcp_jax.config import parse_arg
from dcp_jax.configs import dcp_vitb16_coco_stuff

# The random CLIP's architecture (HF config names); text.vocab_size defaults to 1024.
TINY_CLIP = dict(
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                image_size=64, patch_size=8),
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=77),
    projection_dim=32,
)


def get_config(arg=None):
    arg = parse_arg(arg, templates="single", num_slots=8)
    c = dcp_vitb16_coco_stuff.get_config()
    c.clip.checkpoint = ""
    c.clip.variant = ""
    c.clip.tiny = TINY_CLIP
    c.clip.image_size = 64  # 8x8 patch grid with the tiny patch size 8
    c.clip.guidance_layers = (1, 2)
    c.text.templates = arg.templates
    c.text.finetune_rows = c.train.batch_size * arg.num_slots  # every slot of a batch (num_slots 0: every class)
    c.model.hidden_dim = 32
    c.model.dcs.num_slots = arg.num_slots
    c.model.decoder.update(window=4, dims=(32, 16), attn_dim=16, shallow_qk_dim=16, shallow_dims=(32, 16),
                           shallow_proj_dims=(16, 8), cost_dims=(16, 8))
    c.train.crop_size = 64
    c.train.num_workers = 0
    c.eval.num_slots = 8
    c.eval.mode = "whole"
    # Slide geometry scaled to the 64 crop as CAT-Seg's 640/384/256 is to 384: a 2x2 grid of crops.
    c.eval.slide_canvas = 107
    c.eval.slide_stride = 43
    return c
