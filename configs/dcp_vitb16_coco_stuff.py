r"""DCP-CLIP, OpenAI CLIP ViT-B/16 at 384x384, trained on COCO-Stuff-171: the paper's recipe.

Launch (one host, 4 GPUs = the paper's setup; an HF checkpoint dir of openai/clip-vit-base-patch16
or OpenAI's ViT-B-16.pt):

    python -m dcp_jax.train --config configs/dcp_vitb16_coco_stuff.py --workdir W \
        --config.clip.checkpoint=/path/to/clip-vit-base-patch16

A TPU slice (`:tpu`, the same recipe at global batch 16: see TPU_BATCH below; launch/tpu_pod.sh):

    python -m dcp_jax.train --config configs/dcp_vitb16_coco_stuff.py:tpu --workdir W ...

Smoke test of the same recipe (10 steps, 2 evaluation images):

    python -m dcp_jax.train --config configs/dcp_vitb16_coco_stuff.py:runlocal --workdir /tmp/b16 \
        --config.clip.checkpoint=/path/to/clip-vit-base-patch16

Every other config starts from this one and says what it changes. The keys follow
shared/design/MODEL.md (section numbers below); the paper's ablations (Tables III-VII) are the
switches under `model`. Parameter counts:
`python -m dcp_jax.models.summary --config configs/dcp_vitb16_coco_stuff.py`.
"""

import ml_collections

from dcp_jax.config import parse_arg

# The `:tpu` recipe's global batch: 16 images fill a v5e-8 slice at 2 per chip (16 GiB each) and a
# v4-8 at 4 per chip (32 GiB each; XLA's plans per chip are in docs/performance.md), where the paper's batch 4
# would leave chips idle (or, on 8 chips, not divide). The same number of images is seen (80k x 4 =
# 20k x 16); the learning rate follows the square-root rule for Adam-type optimisers (Malladi et al.,
# "On the SDEs and scaling rules for adaptive gradient algorithms", 2022): 2e-4 x sqrt(16 / 4) = 4e-4.
PAPER_BATCH, TPU_BATCH = 4, 16


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, tpu=False)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 80_000
    c.log_every_steps = 50
    c.checkpoint_every_steps = 5_000
    c.eval_every_steps = 5_000  # evaluates eval.during_training; 0 = only the final table
    c.keep_checkpoints = 3
    # "gpu" | "tpu" | "cpu": stop at start-up when jax finds another backend (the launch scripts set it);
    # "" runs on whatever jax found (dcp_jax/runtime.py).
    c.require_backend = ""

    # --- CLIP backbone (MODEL.md section 0) ---
    c.clip = ml_collections.ConfigDict()
    c.clip.checkpoint = ""  # HF checkpoint dir or OpenAI .pt on local disk
    c.clip.variant = "B/16"  # architecture for summaries and benchmarks when no checkpoint is at hand
    c.clip.image_size = 384  # CLIP input; the position embedding is resized 14x14 -> 24x24 at load
    c.clip.guidance_layers = (3, 7)  # 0-based blocks whose patch tokens guide the decoder
    c.clip.dense_mode = "catseg"  # "catseg" (last-block value path) | "plain"
    c.clip.finetune = "qv"  # image tower: "qv" (CAT-Seg) | "full" | "none"; see dcp_jax/optim.py
    # Text tower: "none" (frozen) | "guidance" (q/v trained, the slots' guidance re-encoded each step) |
    # "cost" (also the cost volume's template embeddings of the slot classes: CAT-Seg's text training)
    c.clip.text_finetune = "none"
    # Compute dtype: "auto" = bfloat16 on GPU/TPU, float32 on CPU | "float32" | "bfloat16". Parameters,
    # optimizer state, softmax/norm statistics, logits and the loss stay float32 (models/compute.py).
    c.clip.dtype = "auto"
    # CLIP blocks as one scanned block ("true": XLA compiles one block, not one per layer) or a loop ("false");
    # "auto": the scan on CPUs and TPUs, the loop on GPUs, where it launches fewer kernels, plans less memory and
    # compiles faster (docs/performance.md, "The GPU plan"); a loop under FSDP whatever it says (dcp.compute_options)
    c.clip.scan_layers = "auto"
    c.clip.tiny = ml_collections.ConfigDict()  # architecture of a random CLIP when checkpoint == "" (tiny.py)

    # --- text side (MODEL.md section 1) ---
    c.text = ml_collections.ConfigDict()
    c.text.templates = "imagenet80"  # "imagenet80" (P = 80, the paper) | "single" (P = 1, CAT-Seg)
    c.text.batch_size = 256  # prompts per text-encoder call when embedding a vocabulary
    # text_finetune / prompt=context: classes re-encoded per step; training refuses fewer than a batch's slots,
    # train.batch_size x model.dcs.num_slots = 4 x 32 (0 = every class of the vocabulary)
    c.text.finetune_rows = 128

    # --- the DCP head (MODEL.md sections 2-5) ---
    c.model = ml_collections.ConfigDict()
    c.model.hidden_dim = 128  # d
    c.model.num_heads = 4
    # "auto": jax.nn.dot_product_attention on GPU/TPU (cuDNN flash attention where it applies), the
    # einsum path on CPU | "xla" | "cudnn" | "reference" (models/compute.py)
    c.model.attention = "auto"
    # Recompute each CLIP / TGA / Swin block's and decoder layer's activations in the backward pass:
    # "none" | "full" (or "true") | "dots" (keeps the weight matmuls' outputs). Trades compute for
    # memory (docs/performance.md: memory per device; models/compute.py).
    c.model.remat = "none"
    c.model.dcs = ml_collections.ConfigDict(dict(
        theta=0.5,  # image-level threshold; 0 selects every class ("no DCS", Table VII)
        num_slots=32,  # K in training; 0 = one slot per class
        include_gt=True,  # training: the classes in the crop's label are always selected
    ))
    c.model.guidance = ml_collections.ConfigDict(dict(
        prompt="tokens",  # Table V: "tokens" | "context" | "none" (MODEL.md section 3)
        prompt_tokens=4,  # M learnable tokens (or context vectors)
        cls_logit=True,  # the image-level cosine c_k in each slot's guidance
    ))
    c.model.tga = ml_collections.ConfigDict(dict(
        cross_attention=True, self_attention=True,  # Table IV
        # "clip": CA on the patch features at CLIP's joint width, then projected to hidden_dim (Eqs. 8-11);
        # "head": projected to hidden_dim first (cheaper; the versions before this key)
        cross_attention_width="clip",
    ))
    c.model.decoder = ml_collections.ConfigDict(dict(
        layers=2,  # Table VI-b: 0, 1 or 2
        spatial_enhance=True,  # Table VI-a
        fuse_shallow=True,  # Table VI-c: shallow CLIP features in Q/K and the upsampling path
        fuse_attn=True,  # Table VI-c: attention-weight features in Q/K
        fuse_cost=True,  # the initial cost map in the upsampling path
        window=12,
        dims=(64, 32),
        attn_dim=32,
        shallow_qk_dim=32,  # shallow CLIP feature channels in the Swin blocks' Q/K
        shallow_dims=(256, 128),
        shallow_proj_dims=(32, 16),
        cost_dims=(32, 16),
    ))
    c.model.tv = ml_collections.ConfigDict(dict(enabled=True, k=3))  # tag validation, inference only

    # --- training (MODEL.md section 6) ---
    c.train = ml_collections.ConfigDict()
    c.train.dataset = "coco_stuff_171"  # a dataset spec (see the table in docs/data.md)
    c.train.data_root = ""  # "" = $DETECTRON2_DATASETS, else ./datasets
    c.train.batch_size = 4  # global batch, split over every device of every host
    c.train.crop_size = 384
    c.train.num_workers = 4  # grain worker processes per host (0 = in-process)
    c.train.skip_bad_samples = False  # skip (and count) unreadable samples instead of failing
    c.train.ignore_as_negative = True  # ignore pixels are negatives for every slot (CAT-Seg)
    c.train.synthetic_images = 0  # > 0: write the toy world's benchmark at train.dataset (folder:) if missing
    c.train.synthetic_size = 96  # ... its image side
    c.train.synthetic_val_images = 60  # ... and how many of its images are the val split

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-4
    c.optim.clip_lr_mult = 0.01  # CLIP parameters train at lr x this (CAT-Seg's CLIP_MULTIPLIER)
    c.optim.weight_decay = 1e-4  # none on norm layers (detectron2's WEIGHT_DECAY_NORM = 0)
    c.optim.schedule = "cosine"  # "cosine" | "constant"
    c.optim.warmup_steps = 0
    c.optim.grad_clip_norm = 0.01  # full-model gradient clipping (L2)
    # Parameter groups: ((regex, {"lr_mult", "weight_decay"}) or (regex, None) = frozen, ...), the first
    # match wins. () = the preset named by clip.finetune / clip.text_finetune (dcp_jax/optim.py).
    c.optim.rules = ()

    # --- devices (MODEL.md section 6) ---
    c.mesh = ml_collections.ConfigDict()
    c.mesh.fsdp = 1  # devices sharing one copy of the params (FSDP); 1 = data parallel
    c.mesh.shard_rules = ((".*", "fsdp"),)  # (regex, "fsdp" | "replicate"), first match wins
    c.mesh.min_shard_size = 2**14  # smaller leaves stay replicated

    # --- evaluation (MODEL.md section 7) ---
    c.eval = ml_collections.ConfigDict()
    c.eval.datasets = "ade847,pc459,ade150,pc59,voc20"  # the final table (and python -m dcp_jax.evaluate)
    c.eval.during_training = "ade150"  # what eval_every_steps runs: one cheap set, as CAT-Seg does
    c.eval.during_training_images = 500  # ... its first N images (0 = all)
    c.eval.data_root = ""
    c.eval.mode = "slide"  # "slide" | "whole"
    c.eval.num_slots = 256  # the largest slot bucket at inference (CAT-Seg keeps 256); 0 = one slot per class
    c.eval.batch_size = 1  # images per device step
    c.eval.short_side = 640  # test-time ResizeShortestEdge
    c.eval.slide_canvas = 640  # slide mode: the image is stretched to canvas x canvas ...
    c.eval.slide_stride = 256  # ... and cut into train.crop_size crops with this stride
    c.eval.max_images = 0  # 0 = every image (a positive value evaluates a prefix)
    c.eval.zero_shot_baseline = False  # the final table also scores the starting CLIP with no head (W/eval/zero_shot)

    if arg.tpu:  # a TPU slice: larger global batch, same images seen (TPU_BATCH above)
        scale = TPU_BATCH // PAPER_BATCH
        c.train.batch_size = TPU_BATCH
        c.text.finetune_rows = 0  # 16 x 32 slots: every class (COCO-Stuff has 171)
        c.optim.lr = c.optim.lr * scale**0.5
        c.total_steps //= scale
        c.checkpoint_every_steps //= scale
        c.eval_every_steps //= scale
        c.log_every_steps = 10
        c.require_backend = "tpu"
    if arg.runlocal:  # the same recipe, a few steps and images: a smoke test before a long run
        c.total_steps = 10
        c.log_every_steps = 1
        c.checkpoint_every_steps = 5
        c.eval_every_steps = 5
        c.train.num_workers = 0
        c.eval.during_training_images = 2
        c.eval.max_images = 2
    return c
