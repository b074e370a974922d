"""The CPU demo: a tiny random CLIP and a synthetic dataset written under the workdir.

    python -m dcp_jax.train --workdir runs/demo          # (no --config: this file is the default)

configs/tiny.py with these changes. A random CLIP knows nothing, so unlike the paper's recipe the
demo trains its whole image tower at the head's learning rate, uses the plain dense features (the
CAT-Seg last-block trick leaves a random tower's patch features nearly constant in space) and keeps
every class (DCS cannot rank classes with random embeddings). The README quotes what it reaches.
"""

from dcp_jax.config import parse_arg
from dcp_jax.configs import tiny


def get_config(arg=None):
    parse_arg(arg)  # the demo takes no arguments; anything given is an error
    c = tiny.get_config()
    c.train.dataset = "folder:{workdir}/synthetic"
    c.train.synthetic_images = 160
    c.train.synthetic_size = 96
    c.eval.datasets = "folder:{workdir}/synthetic"
    c.eval.during_training = "folder:{workdir}/synthetic"
    c.eval.during_training_images = 0
    c.eval.short_side = 96  # the synthetic images' size: no test-time upscaling
    c.clip.finetune = "full"
    c.clip.dense_mode = "plain"
    c.model.dcs.theta = 0.0
    c.model.dcs.num_slots = 0
    c.eval.num_slots = 0
    c.total_steps = 400
    c.log_every_steps = 20
    c.checkpoint_every_steps = 200
    c.eval_every_steps = 0
    c.optim.lr = 3e-3
    c.optim.clip_lr_mult = 1.0
    c.optim.grad_clip_norm = 1.0
    return c
