r"""DCP-CLIP, OpenAI CLIP ViT-L/14@336px, trained on COCO-Stuff-171 (the paper's L/14 model).

Launch (an HF checkpoint dir of openai/clip-vit-large-patch14-336 or OpenAI's ViT-L-14-336px.pt). One
image per device needs no FSDP: XLA plans 8.2 GiB per device for the train step (bfloat16, K = 32; 4.8 GiB
with `--config.mesh.fsdp=4`, which then all-gathers the ~1.7 GB of weights every step), so a 24 GB card
holds it; "Memory per device" in docs/performance.md has the figures and how they were made.

    python -m dcp_jax.train --config configs/dcp_vitl14_coco_stuff.py --workdir W \
        --config.clip.checkpoint=/path/to/clip-vit-large-patch14-336

The B/16 recipe (configs/dcp_vitb16_coco_stuff.py) with these changes: CLIP input 336 (the native
24x24 grid, no position-embedding resize), guidance layers 7 and 15. Config args as for B/16
(`:runlocal`).
"""

from dcp_jax.configs import dcp_vitb16_coco_stuff


def get_config(arg=None):
    c = dcp_vitb16_coco_stuff.get_config(arg)
    c.clip.variant = "L/14"
    c.clip.image_size = 336
    c.clip.guidance_layers = (7, 15)
    return c
