"""DCP-CLIP, OpenAI CLIP ViT-L/14@336px, trained on COCO-Stuff-171 (the paper's L/14 model).

Launch (HF checkpoint dir of openai/clip-vit-large-patch14-336, or OpenAI's ViT-L-14-336px.pt):

    python -m dcp_jax.train --config configs/dcp_vitl14_coco_stuff.py --workdir W \
        --config.clip.checkpoint=/path/to/clip-vit-large-patch14-336

Same hyper-parameters as B/16 (MODEL.md section 6); CLIP input 336 (native 24x24 grid, no
position-embedding resize), guidance layers 7 and 15, joint dim 768, width 1024.
Parameter counts: `python -m dcp_jax.models.summary --config configs/dcp_vitl14_coco_stuff.py`.
"""

from dcp_jax.config import base_config, parse_arg


def get_config(arg=None):
    parse_arg(arg)  # no config args: override keys with --config.KEY=VALUE
    c = base_config()
    c.clip.variant = "L/14"  # architecture for summaries when no checkpoint is at hand
    c.clip.image_size = 336
    c.clip.guidance_layers = (7, 15)
    c.text.templates = "imagenet80"
    c.model.decoder.shallow_qk_dim = 32  # shallow CLIP feature channels in the decoder's Q/K
    return c
