"""DCP-CLIP, OpenAI CLIP ViT-B/16 at 384x384, trained on COCO-Stuff-171 (the paper's main B/16 model).

Launch (HF checkpoint dir of openai/clip-vit-base-patch16, or OpenAI's ViT-B-16.pt):

    python -m dcp_jax.train --config configs/dcp_vitb16_coco_stuff.py --workdir W \
        --config.clip.checkpoint=/path/to/clip-vit-base-patch16

Paper hyper-parameters (MODEL.md section 6): AdamW lr 2e-4 (CLIP x0.01), weight decay 1e-4, cosine,
no warmup, full-model gradient clip 0.01, global batch 4, 80k steps, 384 crops; P = 80 ImageNet
templates; CLIP q/v fine-tuning; guidance layers 3 and 7; DCS theta 0.5; TV k = 3.
Parameter counts: `python -m dcp_jax.models.summary --config configs/dcp_vitb16_coco_stuff.py`.
"""

from dcp_jax.config import base_config, parse_arg


def get_config(arg=None):
    parse_arg(arg)  # no config args: override keys with --config.KEY=VALUE
    c = base_config()
    c.clip.variant = "B/16"  # architecture for summaries when no checkpoint is at hand
    c.clip.image_size = 384  # position embedding resized 14x14 -> 24x24 at load
    c.clip.guidance_layers = (3, 7)
    c.text.templates = "imagenet80"
    c.model.decoder.shallow_qk_dim = 32  # shallow CLIP feature channels in the decoder's Q/K
    return c
