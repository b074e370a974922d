"""Configuration: the defaults every config file starts from, and `parse_arg`.

Config files in `configs/` define `get_config(arg)` and return an `ml_collections.ConfigDict`
built from `base_config()` (big_vision style). Every key below is documented where it is set;
the paper's ablations (Tables III-VII) are switches under `model`.
"""

from __future__ import annotations

import ml_collections

ConfigDict = ml_collections.ConfigDict

# Architecture of the random CLIP that tiny/demo configs write when `clip.checkpoint` is empty.
TINY_CLIP = dict(
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                image_size=64, patch_size=8),
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=77),
    projection_dim=32,
)


def base_config() -> ConfigDict:
    """DCP-CLIP ViT-B/16 on COCO-Stuff-171 with the paper's hyper-parameters (MODEL.md section 6)."""
    c = ConfigDict()
    c.seed = 0
    c.total_steps = 80_000
    c.log_every_steps = 50
    c.checkpoint_every_steps = 5_000
    c.eval_every_steps = 5_000  # 0: evaluate only at the end
    c.keep_checkpoints = 3

    # --- CLIP backbone (MODEL.md section 0) ---
    c.clip = ConfigDict()
    c.clip.checkpoint = ""  # HF checkpoint dir or OpenAI .pt; "" = write a tiny random CLIP (tests/demo)
    c.clip.variant = "B/16"  # architecture name, for summaries without a checkpoint ("" = clip.tiny)
    c.clip.image_size = 384  # CLIP input resolution; position embedding resized at load
    c.clip.guidance_layers = (3, 7)  # 0-based blocks whose patch tokens feed the decoder
    c.clip.dense_mode = "catseg"  # "catseg" | "plain"
    c.clip.finetune = "qv"  # "qv" | "none" | "full" (image tower; text tower frozen)
    c.clip.dtype = "float32"  # compute dtype: "float32" | "bfloat16"; params stay float32
    c.clip.tiny = ConfigDict(TINY_CLIP)  # used only when checkpoint == ""

    # --- text side (MODEL.md section 1) ---
    c.text = ConfigDict()
    c.text.templates = "imagenet80"  # "imagenet80" (P=80) | "single" (P=1)
    c.text.batch_size = 256  # prompts per text-encoder call when embedding a vocabulary

    # --- the DCP head (MODEL.md sections 2-5) ---
    c.model = ConfigDict()
    c.model.hidden_dim = 128  # d
    c.model.num_heads = 4
    c.model.dcs = ConfigDict(dict(
        theta=0.5,  # image-level threshold; 0 selects every class ("no DCS", Table VII)
        num_slots=32,  # K in training; 0 means K = C (all classes)
        include_gt=True,  # training: classes present in the crop are always selected
    ))
    c.model.guidance = ConfigDict(dict(prompt=True, cls_logit=True))  # Table V
    c.model.tga = ConfigDict(dict(cross_attention=True, self_attention=True))  # Table IV
    c.model.decoder = ConfigDict(dict(
        layers=2,  # Table VI-b: 0, 1 or 2
        spatial_enhance=True,  # Table VI-a
        fuse_shallow=True,  # Table VI-c: shallow CLIP features in Q/K and the upsampling path
        fuse_attn=True,  # Table VI-c: attention-weight features in Q/K
        fuse_cost=True,  # initial cost map in the upsampling path
        window=12,
        dims=(64, 32),
        attn_dim=32,
        shallow_qk_dim=32,  # shallow CLIP feature channels in the Swin blocks' Q/K
        shallow_dims=(256, 128),
        shallow_proj_dims=(32, 16),
        cost_dims=(32, 16),
    ))
    c.model.tv = ConfigDict(dict(enabled=True, k=3))  # tag validation, inference only

    # --- training (MODEL.md section 6) ---
    c.train = ConfigDict()
    c.train.dataset = "coco_stuff_171"  # dataset spec: benchmark name or folder:PATH
    c.train.data_root = ""  # "" = $DETECTRON2_DATASETS or ./datasets
    c.train.batch_size = 4  # global batch, split over every device of every host
    c.train.crop_size = 384
    c.train.num_workers = 4  # grain worker processes per host (0 = in-process)
    c.train.skip_bad_samples = False  # skip (and count) unreadable samples instead of failing
    c.train.ignore_as_negative = True  # ignore pixels are negatives for every slot (CAT-Seg)
    c.train.synthetic_images = 0  # > 0: write a synthetic folder dataset at train.dataset if missing
    c.train.synthetic_size = 128

    c.optim = ConfigDict()
    c.optim.lr = 2e-4
    c.optim.clip_lr_mult = 0.01
    c.optim.weight_decay = 1e-4
    c.optim.schedule = "cosine"  # "cosine" | "constant"
    c.optim.warmup_steps = 0
    c.optim.grad_clip_norm = 0.01  # full-model gradient clipping (L2)
    # Trainable params: a regex searched in "/"-joined param paths; "" = the clip.finetune preset
    # (dcp_jax.models.dcp.TRAINABLE_PRESETS; "qv" = head + image-tower q_proj/v_proj). Params whose
    # path starts with "clip/" train at lr x clip_lr_mult; everything else is frozen.
    c.optim.trainable = ""

    # --- evaluation (MODEL.md section 7) ---
    c.eval = ConfigDict()
    c.eval.datasets = "ade847,pc459,ade150,pc59,voc20"
    c.eval.data_root = ""
    c.eval.mode = "slide"  # "slide" | "whole"
    c.eval.num_slots = 64  # K at inference; 0 means K = C
    c.eval.batch_size = 1  # images per device step
    c.eval.short_side = 640  # test-time ResizeShortestEdge
    c.eval.slide_canvas = 640  # slide mode: the image is stretched to canvas x canvas ...
    c.eval.slide_stride = 256  # ... and cut into train.crop_size crops with this stride
    c.eval.max_images = 0  # 0 = every image (a positive value evaluates a prefix, for smoke tests)
    return c


def parse_arg(arg: str | None, **spec):
    """Parse a config-file argument "key=value,flag" against typed defaults (big_vision idiom).

    A bare key means True; a lone unnamed value fills the first key; an unknown key is an error.
    """
    result = dict(spec)
    if not arg:
        return ml_collections.ConfigDict(result)
    keys = list(spec)
    for i, part in enumerate(p for p in arg.split(",") if p):
        if "=" in part:
            key, value = part.split("=", 1)
        elif part in spec:
            key, value = part, "True"
        elif i == 0 and keys:
            key, value = keys[0], part
        else:
            raise ValueError(f"config arg {part!r}: unknown; known keys are {keys}")
        if key not in spec:
            raise ValueError(f"config arg {key!r}: unknown; known keys are {keys}")
        default = spec[key]
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config arg {key}={value!r}: expected true/false")
            result[key] = value.lower() in ("true", "1")
        else:
            result[key] = type(default)(value) if default is not None else value
    return ml_collections.ConfigDict(result)


def tiny_config() -> ConfigDict:
    """A tiny random CLIP and a small head: tests and CPU runs (no downloads)."""
    c = base_config()
    c.clip.checkpoint = ""
    c.clip.variant = ""
    c.clip.image_size = 64  # 8x8 patch grid with the tiny patch size 8
    c.clip.guidance_layers = (1, 2)
    c.model.hidden_dim = 32
    c.model.num_heads = 4
    c.model.dcs.num_slots = 8
    c.model.decoder.window = 4
    c.model.decoder.dims = (32, 16)
    c.model.decoder.attn_dim = 16
    c.model.decoder.shallow_qk_dim = 16
    c.model.decoder.shallow_dims = (32, 16)
    c.model.decoder.shallow_proj_dims = (16, 8)
    c.model.decoder.cost_dims = (16, 8)
    c.text.templates = "single"
    c.train.crop_size = 64
    c.train.num_workers = 0
    c.eval.num_slots = 8
    c.eval.mode = "whole"
    # Slide geometry scaled to the 64 crop as CAT-Seg's 640/384/256 is to 384: a 2x2 grid of crops.
    c.eval.slide_canvas = 107
    c.eval.slide_stride = 43
    return c


def demo_config() -> ConfigDict:
    """The built-in CPU demo: tiny random CLIP, synthetic data written under the workdir.

    A random CLIP knows nothing, so unlike the paper's recipe the demo trains its whole image
    tower at the head's learning rate, uses the plain dense features (the CAT-Seg last-block trick
    leaves a random tower's patch features nearly constant in space) and keeps every class
    (DCS cannot rank classes with random embeddings). It reaches mIoU > 50 on the synthetic
    validation split in a few CPU minutes; see the README for measured numbers.
    """
    c = tiny_config()
    c.train.dataset = "folder:{workdir}/synthetic"
    c.train.synthetic_images = 160
    c.train.synthetic_size = 96
    c.eval.datasets = "folder:{workdir}/synthetic"
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


def apply_overrides(config: ConfigDict, overrides: dict) -> ConfigDict:
    """Set dotted keys, e.g. {"model.dcs.theta": 0.0}; an unknown key is an error (like --config.KEY)."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise KeyError(f"config key {key!r} does not exist")
        node[leaf] = value
    return config
