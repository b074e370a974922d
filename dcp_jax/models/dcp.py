"""DCP-CLIP: CLIP + Dynamic Category Selection + Text-Guided Alignment + Spatial Enhancement Decoder
(+ Tag Validation at inference). MODEL.md sections 0-5.

The forward in stages (every shape static; K slots per call):
  encode:   images [B,S,S,3] 0..255 -> CLIP features (cls, dense, shallow layers, last attention)
  select:   DCS ranks the vocabulary (text embeddings T [C,P,D]) into K slots per image
  decode:   TGA (cost volume + CA/SA) -> SED (Swin blocks + upsampling) -> logits [B,K,h,w]
  validate: (inference) TV rewrites slot_class for unseen classes
`__call__` chains them (training, tests); inference calls the stages itself so that the head runs
on as few slots as the images need (dcp_jax/forward.py). Only DCS (one matmul) and TV (a [B,K,C]
similarity) touch all C classes.

The textual guidance of each slot is a text embedding of its class: T_bar (the cached template
mean) by default, or, with `guidance.prompt = "context"` and/or `clip.text_finetune`, the class
re-encoded by the text tower (single template, learnt context vectors after the start token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dcp_jax import config as config_lib
from dcp_jax.models import compute, selection
from dcp_jax.models.alignment import TextGuidedAlignment
from dcp_jax.models.clip import CLIPConfig, CLIPModel, normalize_pixels, with_compute
from dcp_jax.models.decoder import SpatialEnhancementDecoder
from dcp_jax.models.tag_validation import validate_tags

ConfigDict = ml_collections.ConfigDict
NUM_TEMPLATES = {"imagenet80": 80, "single": 1}


def num_templates(config: ConfigDict) -> int:
    """P, the number of prompt templates the text embeddings carry (config.text.templates)."""
    name = config.text.templates
    if name not in NUM_TEMPLATES:
        raise ValueError(f"config.text.templates={name!r}: expected one of {sorted(NUM_TEMPLATES)}")
    return NUM_TEMPLATES[name]


def compute_dtype(config: ConfigDict):
    """config.clip.dtype as a jnp dtype (compute only; params stay float32): "auto" is bfloat16 on GPUs
    and TPUs, float32 on CPU (compute.resolve_dtype)."""
    return compute.resolve_dtype(config.clip.dtype)


def compute_options(config: ConfigDict) -> dict:
    """How the blocks run (dcp_jax/models/compute.py): attention, remat, scan_layers. Configs saved
    before these keys existed get the defaults.

    With FSDP (config.mesh.fsdp > 1) the CLIP blocks run as a loop whatever clip.scan_layers says: over
    a scan of fsdp-sharded weights XLA partitioned the blocks' matmuls along the sharded weights (partial
    sums, then an all-reduce of activations) instead of gathering each weight, which moves more data
    and changed a few predicted labels against the same checkpoint on one device (tests/test_train.py)."""
    attention = config.model.get("attention", "auto")
    if attention not in compute.ATTENTION_IMPLS:
        raise ValueError(f"config.model.attention={attention!r}: expected one of {compute.ATTENTION_IMPLS}")
    scan = scan_layers(config) and int(config.mesh.get("fsdp", 1)) == 1
    return dict(attention=attention, remat=compute.remat_name(config.model.get("remat", "none")), scan_layers=scan)


SCAN_LAYERS = ("auto", "true", "false")


def scan_layers(config: ConfigDict) -> bool:
    """config.clip.scan_layers ("auto", "true", "false"; a bool in configs saved before "auto") -> whether the
    CLIP blocks run as a scan. "auto": a scan on CPUs and TPUs, a loop on GPUs (for the platform traced for,
    compute.platform()): compiled for an H200, the B/16 recipe's train step as a loop launched 1622 kernels
    against 2125 as a scan (whose slicing of stacked weights and activations adds copies outside CUDA
    graphs), planned 4.84 GiB of temporaries against 5.19 and compiled in 23 s against 34 (docs/performance.md)."""
    value = config.clip.get("scan_layers", "auto")
    name = str(value).lower()
    if name not in SCAN_LAYERS:
        raise ValueError(f"config.clip.scan_layers={value!r}: expected one of {SCAN_LAYERS}")
    return compute.platform() != "gpu" if name == "auto" else name == "true"


reencodes_text = config_lib.reencodes_text  # whether the guidance text is re-encoded by the text tower


def _check_config(config: ConfigDict, clip_config: CLIPConfig) -> None:
    """Fail early, naming the config key, on combinations the model cannot build."""
    vis = clip_config.vision
    if vis.image_size != config.clip.image_size:
        raise ValueError(
            f"CLIP config has image_size={vis.image_size} but config.clip.image_size={config.clip.image_size}; "
            "load the checkpoint with load_clip(path, image_size=config.clip.image_size)"
        )
    m = config.model
    if m.hidden_dim % m.num_heads:
        raise ValueError(f"config.model.hidden_dim={m.hidden_dim} is not divisible by model.num_heads={m.num_heads}")
    if m.guidance.prompt != "none" and m.guidance.prompt_tokens < 1:
        raise ValueError(f"config.model.guidance.prompt_tokens={m.guidance.prompt_tokens}: must be >= 1 "
                         f"with guidance.prompt={m.guidance.prompt!r}")
    dec = m.decoder
    layers = tuple(config.clip.guidance_layers)
    bad = [i for i in layers if not 0 <= i < vis.num_hidden_layers]
    if bad:
        raise ValueError(
            f"config.clip.guidance_layers={layers}: {bad} out of range for a {vis.num_hidden_layers}-block CLIP"
        )
    if dec.fuse_shallow and len(layers) < dec.layers:
        raise ValueError(
            f"config.clip.guidance_layers={layers} has fewer entries than decoder.layers={dec.layers}; "
            "each decoder layer fuses one guidance layer"
        )
    grid = vis.grid_size
    if dec.spatial_enhance:
        for i in range(dec.layers):
            size = grid * 2**i
            if dec.window < size and size % dec.window:
                raise ValueError(
                    f"config.model.decoder.window={dec.window} does not divide the {size}x{size} map of decoder "
                    f"layer {i} (CLIP grid {grid} = image_size {vis.image_size} / patch {vis.patch_size}); "
                    "use a divisor of the grid"
                )


class FrozenTextQV(nnx.Module):
    """A copy of the text tower's q/v projections (filled from the CLIP checkpoint, never trained)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        w = cfg.hidden_size
        self.layers = nnx.List([nnx.Dict(q_proj=nnx.Linear(w, w, rngs=rngs), v_proj=nnx.Linear(w, w, rngs=rngs))
                                for _ in range(cfg.num_hidden_layers)])


class DCPCLIP(nnx.Module):
    """The DCP-CLIP model. `self.clip` is the CLIPModel (param paths `clip/vision_model/...`)."""

    def __init__(self, config: ConfigDict, clip_config: CLIPConfig, *, rngs: nnx.Rngs):
        _check_config(config, clip_config)
        dtype = compute_dtype(config)
        m = config.model
        self.dtype = dtype
        self.image_size = int(config.clip.image_size)
        self.guidance_layers = tuple(int(i) for i in config.clip.guidance_layers)
        self.dense_mode = str(config.clip.dense_mode)
        self.theta = float(m.dcs.theta)
        self.tv_enabled = bool(m.tv.enabled)
        self.tv_k = int(m.tv.k)
        self.num_templates = num_templates(config)
        self.clip_dim = clip_config.projection_dim

        options = compute_options(config)
        self.clip = CLIPModel(clip_config, dtype=dtype, rngs=rngs, **options)
        if config_lib.text_finetune(config) != "none":
            # The pretrained text q/v, kept frozen: DCS and the cost volume use the template embeddings
            # of the frozen tower for any vocabulary (MODEL.md section 1).
            self.frozen_text_qv = FrozenTextQV(clip_config.text, rngs=rngs)
        if m.guidance.prompt == "context":  # CoOp context vectors, in the text tower's token space
            width = clip_config.text.hidden_size
            self.text_context = nnx.Param(
                jax.random.normal(rngs.params(), (m.guidance.prompt_tokens, width), jnp.float32) * 0.02)
        self.alignment = TextGuidedAlignment(
            clip_dim=clip_config.projection_dim,
            num_templates=self.num_templates,
            hidden_dim=m.hidden_dim,
            num_heads=m.num_heads,
            cross_attention=m.tga.cross_attention,
            self_attention=m.tga.self_attention,
            guidance_prompt=m.guidance.prompt,
            prompt_tokens=m.guidance.prompt_tokens,
            guidance_cls_logit=m.guidance.cls_logit,
            cross_attention_width=m.tga.get("cross_attention_width", "head"),  # configs saved before the key: "head"
            dtype=dtype,
            attention=options["attention"],
            remat=options["remat"],
            rngs=rngs,
        )
        self.decoder = SpatialEnhancementDecoder(
            hidden_dim=m.hidden_dim,
            clip_width=clip_config.vision.hidden_size,
            grid=clip_config.vision.grid_size,
            num_templates=self.num_templates,
            num_heads=m.num_heads,
            cfg=m.decoder,
            dtype=dtype,
            attention=options["attention"],
            remat=options["remat"],
            rngs=rngs,
        )

    # ------------------------------------------------------------------ stages
    def preprocess(self, images: jax.Array) -> jax.Array:
        """[B,H,W,3] RGB 0..255 (float or uint8) -> CLIP-normalised [B,R,R,3] at clip.image_size (bilinear)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B,H,W,3] RGB in 0..255; got shape {images.shape}")
        x = normalize_pixels(images)
        if x.shape[1:3] != (self.image_size, self.image_size):
            # CAT-Seg: F.interpolate(bilinear, align_corners=False), no antialiasing.
            x = jax.image.resize(x, (x.shape[0], self.image_size, self.image_size, 3), "bilinear", antialias=False)
        return x

    def encode(self, images: jax.Array) -> dict[str, jax.Array]:
        """CLIP features: cls [B,D], dense [B,g,g,D], shallow (list of [B,g,g,W]), attn_last [B,N,N]."""
        embeds, aux = self.clip.encode_image(
            self.preprocess(images), layers=self.guidance_layers, dense_mode=self.dense_mode
        )
        return {
            "cls": embeds,
            "dense": aux["dense"],
            "shallow": [aux[f"layer_{i}"] for i in self.guidance_layers],
            "attn_last": aux["attn_last"],
        }

    def select(self, features, text_bar, *, num_slots: int, gt_present=None) -> dict[str, jax.Array]:
        """DCS on the features (see selection.select_categories)."""
        b, g = features["dense"].shape[:2]
        return selection.select_categories(
            features["cls"], features["dense"].reshape(b, g * g, -1), text_bar, self.clip.logit_scale[...],
            theta=self.theta, num_slots=num_slots, gt_present=gt_present)

    def encode_guidance_text(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Unit guidance embeddings [R,D] of R tokenized prompts (with the learnt context, if any)."""
        context = self.text_context[...] if hasattr(self, "text_context") else None
        return selection.l2_normalize(self.clip.get_text_features(input_ids, attention_mask, context=context))

    def decode(self, features, text_embeds, slot_class, slot_valid, guidance_text) -> jax.Array:
        """TGA + SED on K slots: text_embeds T [C,P,D] (cost volume), slot_class int [B,K], slot_valid [B,K],
        guidance_text [C,D] -> logits float32 [B,K,h,w]. Invalid slots never affect valid ones."""
        dt = self.dtype
        text_bar = selection.mean_text_embedding(text_embeds)
        # c_k = cos(cls, T_bar_k): bounded, independent of the logit scale and of C; differentiable
        # (reaches the image tower through CLS).
        slot_cos = jnp.einsum("bd,bkd->bk", selection.l2_normalize(features["cls"]), text_bar[slot_class])
        cost, corr = self.alignment(features["dense"].astype(dt), text_embeds[slot_class].astype(dt),
                                    guidance_text[slot_class].astype(dt), slot_cos.astype(dt), slot_valid)
        shallow = [s.astype(dt) for s in features["shallow"]]
        logits = self.decoder(cost, corr, shallow, features["attn_last"].astype(dt))
        return logits.astype(jnp.float32)

    def validate(self, logits, slot_class, slot_valid, features, text_bar, seen) -> tuple[jax.Array, jax.Array]:
        """Tag validation (a no-op when model.tv.enabled is false): (slot_class [B,K], relabelled [B,K])."""
        if not self.tv_enabled:
            return slot_class, jnp.zeros_like(slot_valid)
        return validate_tags(logits, slot_class, slot_valid, features["dense"], text_bar,
                             jnp.asarray(seen, jnp.bool_), k=self.tv_k)

    def frozen_text_clip(self) -> CLIPModel:
        """The CLIP whose text tower gives the cost-volume / DCS template embeddings, computing in float32
        whatever the model's compute dtype (they are computed once per vocabulary): self.clip's arrays,
        with the pretrained text q/v when the text tower is fine-tuned."""
        state = nnx.state(self.clip)
        if hasattr(self, "frozen_text_qv"):
            frozen = nnx.to_pure_dict(nnx.state(self.frozen_text_qv))["layers"]
            pure = nnx.to_pure_dict(state)
            for i, layer in frozen.items():
                pure["text_model"]["encoder"]["layers"][i]["self_attn"].update(layer)
            nnx.replace_by_pure_dict(state, pure)
        return with_compute(nnx.merge(nnx.graphdef(self.clip), state), jnp.float32)

    def check_text(self, text_embeds: jax.Array) -> None:
        if text_embeds.ndim != 3 or text_embeds.shape[-1] != self.clip_dim:
            raise ValueError(f"text_embeds must be T [C,P,{self.clip_dim}]; got shape {text_embeds.shape}")
        if text_embeds.shape[1] != self.num_templates:
            raise ValueError(
                f"text_embeds have P={text_embeds.shape[1]} templates but the model expects {self.num_templates} "
                "(config.text.templates)"
            )

    # ------------------------------------------------------------------ forward
    def __call__(
        self,
        images: jax.Array,
        text_embeds: jax.Array,
        *,
        num_slots: int,
        gt_present: jax.Array | None = None,
        seen: jax.Array | None = None,
        guidance_tokens: tuple[jax.Array, jax.Array] | None = None,
        guidance_rows: int = 0,
        cost_tokens: tuple[jax.Array, jax.Array] | None = None,
        train: bool = False,
    ) -> dict[str, jax.Array]:
        """Segment `images` [B,S,S,3] (0..255) against the vocabulary `text_embeds` T [C,P,D] (unit vectors).

        num_slots: K (static); 0 or >= C means one slot per class. gt_present [B,C] bool: classes in the
        label (training, dcs.include_gt). seen [C] bool: training-vocabulary classes (tag validation, when
        not `train`). guidance_tokens (input_ids, attention_mask) [C,L]: the vocabulary's single-template
        prompts; given, the classes in the batch's slots (at most `guidance_rows` of them, lowest slots
        first; 0 = every class) are re-encoded by the text tower for the guidance, the others keep T_bar
        and are counted in guidance_dropped (training refuses rows that cannot hold a batch's slots:
        config.check_finetune_rows). cost_tokens
        (input_ids, attention_mask) [C,P,L] (clip.text_finetune = "cost"): the same classes' P template
        prompts are re-encoded for the cost volume too; selection keeps `text_embeds`.

        Returns logits [B,K,h,w] (h = grid * 2**decoder.layers), slot_class int32 [B,K] (after TV),
        slot_valid bool [B,K], dcs_selected / dcs_dropped / guidance_dropped int32 [B], and for inspection
        slot_class_dcs (before TV), tv_relabelled [B,K], p_img [B,C].
        """
        self.check_text(text_embeds)
        text_embeds = text_embeds.astype(jnp.float32)
        text_bar = selection.mean_text_embedding(text_embeds)
        features = self.encode(images)
        dcs = self.select(features, text_bar, num_slots=num_slots, gt_present=gt_present if train else None)
        slot_class, slot_valid = dcs["slot_class"], dcs["slot_valid"]
        guidance_text, guidance_dropped = text_bar, jnp.zeros(slot_class.shape[:1], jnp.int32)
        if guidance_tokens is not None:
            guidance_text, guidance_dropped = self._reencode_slots(text_bar, slot_class, slot_valid,
                                                                   guidance_tokens, guidance_rows)
        if cost_tokens is not None:
            text_embeds = self._reencode_cost_text(text_embeds, slot_class, slot_valid, cost_tokens, guidance_rows)
        logits = self.decode(features, text_embeds, slot_class, slot_valid, guidance_text)
        final_class, relabelled = slot_class, jnp.zeros_like(slot_valid)
        if not train and seen is not None:
            final_class, relabelled = self.validate(logits, slot_class, slot_valid, features, text_bar, seen)
        return {
            "logits": logits,
            "slot_class": final_class,
            "slot_valid": slot_valid,
            "dcs_selected": dcs["dcs_selected"],
            "dcs_dropped": dcs["dcs_dropped"],
            "guidance_dropped": guidance_dropped,
            "slot_class_dcs": slot_class,
            "tv_relabelled": relabelled,
            "p_img": dcs["p_img"],
        }

    @staticmethod
    def _slot_union(slot_class, slot_valid, num_classes: int, rows: int):
        """The batch's distinct valid slot classes in slot order (highest DCS priority first), a static
        `rows` of them: (classes [rows] (0 where unused), present [rows] bool, dropped: classes beyond rows)."""
        flat = jnp.where(slot_valid, slot_class, num_classes).T.reshape(-1)  # slot-major: best slots first
        never = flat.size
        first_seen = jnp.full(num_classes + 1, never, jnp.int32).at[flat].min(jnp.arange(never, dtype=jnp.int32))
        first_seen = first_seen.at[num_classes].set(never)  # the invalid-slot sentinel is no class
        union = jnp.argsort(first_seen, stable=True)[:rows]  # classes in order of first appearance
        present = first_seen[union] < never
        dropped = jnp.maximum(jnp.sum(first_seen < never) - rows, 0).astype(jnp.int32)
        return jnp.where(present, union, 0), present, dropped

    def _reencode_slots(self, text_bar, slot_class, slot_valid, tokens, rows: int):
        """text_bar [C,D] with the rows of the batch's slot classes re-encoded (a static number of rows);
        unused rows encode class 0 and are discarded; classes beyond `rows` keep T_bar and are counted."""
        num_classes = text_bar.shape[0]
        rows = min(int(rows) or num_classes, num_classes)
        classes, present, dropped = self._slot_union(slot_class, slot_valid, num_classes, rows)
        ids, mask = (jnp.asarray(t) for t in tokens)
        encoded = self.encode_guidance_text(ids[classes], mask[classes])
        guidance = text_bar.at[jnp.where(present, classes, num_classes)].set(encoded, mode="drop")
        return guidance, jnp.broadcast_to(dropped, slot_class.shape[:1])

    def _reencode_cost_text(self, text_embeds, slot_class, slot_valid, tokens, rows: int):
        """T [C,P,D] with the batch's slot classes (the same rows as the guidance) re-encoded in every
        template by the trained text tower: CAT-Seg's cost volume follows its text training."""
        num_classes, p, d = text_embeds.shape
        rows = min(int(rows) or num_classes, num_classes)
        classes, present, _ = self._slot_union(slot_class, slot_valid, num_classes, rows)
        ids, mask = (jnp.asarray(t) for t in tokens)
        length = ids.shape[-1]
        encoded = self.clip.get_text_features(ids[classes].reshape(rows * p, length),
                                              mask[classes].reshape(rows * p, length))
        encoded = selection.l2_normalize(encoded.astype(jnp.float32)).reshape(rows, p, d)
        return text_embeds.at[jnp.where(present, classes, num_classes)].set(encoded, mode="drop")
