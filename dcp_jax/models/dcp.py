"""DCP-CLIP: CLIP + Dynamic Category Selection + Text-Guided Alignment + Spatial Enhancement Decoder
(+ Tag Validation at inference). MODEL.md sections 0-5.

Forward (all static shapes; K slots fixed per call):
  images [B,S,S,3] 0..255 -> CLIP-normalise, resize to clip.image_size -> CLIP image tower
  -> DCS picks K slot classes from the vocabulary embeddings T [C,P,D]
  -> TGA (cost volume + CA/SA) -> SED (Swin blocks + upsampling) -> logits [B,K,g*2^L,g*2^L]
  -> (inference) TV rewrites slot_class for unseen classes.
Only DCS (one matmul) and TV (a [B,K,C] similarity) touch all C classes.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from dcp_jax.models import selection
from dcp_jax.models.alignment import TextGuidedAlignment
from dcp_jax.models.clip import CLIPConfig, CLIPModel, load_clip
from dcp_jax.models.decoder import SpatialEnhancementDecoder
from dcp_jax.models.tag_validation import validate_tags

ConfigDict = ml_collections.ConfigDict

# CAT-Seg's pixel statistics (0..255 RGB), i.e. OpenAI CLIP's mean/std x 255.
CLIP_MEAN = (122.7709383, 116.7460125, 104.09373615)
CLIP_STD = (68.5005327, 66.6321579, 70.32316305)
NUM_TEMPLATES = {"imagenet80": 80, "single": 1}


def num_templates(config: ConfigDict) -> int:
    """P, the number of prompt templates the text embeddings carry (config.text.templates)."""
    name = config.text.templates
    if name not in NUM_TEMPLATES:
        raise ValueError(f"config.text.templates={name!r}: expected one of {sorted(NUM_TEMPLATES)}")
    return NUM_TEMPLATES[name]


def compute_dtype(config: ConfigDict):
    """config.clip.dtype as a jnp dtype (compute only; params stay float32)."""
    name = config.clip.dtype
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"config.clip.dtype={name!r}: expected 'float32' or 'bfloat16'")
    return jnp.dtype(name)


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


class DCPCLIP(nnx.Module):
    """The DCP-CLIP model. `self.clip` is the CLIPModel (param paths `clip/vision_model/...`)."""

    def __init__(
        self,
        config: ConfigDict,
        clip_config: CLIPConfig,
        *,
        rngs: nnx.Rngs,
        clip_model: CLIPModel | None = None,
    ):
        """Build from the run config and the CLIP architecture; `clip_model` reuses loaded CLIP weights."""
        _check_config(config, clip_config)
        dtype = compute_dtype(config)
        m = config.model
        self.dtype = dtype
        self.image_size = int(config.clip.image_size)
        self.grid = clip_config.vision.grid_size
        self.guidance_layers = tuple(int(i) for i in config.clip.guidance_layers)
        self.dense_mode = str(config.clip.dense_mode)
        self.theta = float(m.dcs.theta)
        self.include_gt = bool(m.dcs.include_gt)
        self.tv_enabled = bool(m.tv.enabled)
        self.tv_k = int(m.tv.k)
        self.num_templates = num_templates(config)
        self.clip_dim = clip_config.projection_dim

        if clip_model is None:
            clip_model = CLIPModel(clip_config, dtype=dtype, rngs=rngs)
        elif clip_model.config != clip_config:
            raise ValueError("clip_model.config differs from clip_config")
        self.clip = clip_model
        self.alignment = TextGuidedAlignment(
            clip_dim=clip_config.projection_dim,
            num_templates=self.num_templates,
            hidden_dim=m.hidden_dim,
            num_heads=m.num_heads,
            cross_attention=m.tga.cross_attention,
            self_attention=m.tga.self_attention,
            guidance_prompt=m.guidance.prompt,
            guidance_cls_logit=m.guidance.cls_logit,
            dtype=dtype,
            rngs=rngs,
        )
        self.decoder = SpatialEnhancementDecoder(
            hidden_dim=m.hidden_dim,
            clip_width=clip_config.vision.hidden_size,
            grid=self.grid,
            num_templates=self.num_templates,
            num_heads=m.num_heads,
            cfg=m.decoder,
            dtype=dtype,
            rngs=rngs,
        )

    # ------------------------------------------------------------------ stages
    def preprocess(self, images: jax.Array) -> jax.Array:
        """[B,H,W,3] RGB 0..255 (float or uint8) -> CLIP-normalised [B,R,R,3] at clip.image_size (bilinear)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B,H,W,3] RGB in 0..255; got shape {images.shape}")
        x = (images.astype(jnp.float32) - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
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

    def decode_slots(
        self,
        features: dict[str, jax.Array],
        slot_text: jax.Array,
        slot_text_bar: jax.Array,
        slot_logit: jax.Array,
        slot_valid: jax.Array,
    ) -> jax.Array:
        """TGA + SED for K slots given their text: slot_text [B,K,P,D], slot_text_bar [B,K,D],
        slot_logit [B,K] -> logits float32 [B,K,g*2^L,g*2^L]. Invalid slots never affect valid ones."""
        dt = self.dtype
        cost, corr = self.alignment(
            features["dense"].astype(dt), slot_text.astype(dt), slot_text_bar.astype(dt), slot_logit.astype(dt),
            slot_valid,
        )
        shallow = [s.astype(dt) for s in features["shallow"]]
        logits = self.decoder(cost, corr, shallow, features["attn_last"].astype(dt))
        return logits.astype(jnp.float32)

    # ------------------------------------------------------------------ forward
    def __call__(
        self,
        images: jax.Array,
        text_embeds: jax.Array,
        *,
        num_slots: int,
        gt_present: jax.Array | None = None,
        seen: jax.Array | None = None,
        train: bool = False,
    ) -> dict[str, jax.Array]:
        """Segment `images` [B,S,S,3] (0..255) against the vocabulary `text_embeds` T [C,P,D] (unit vectors).

        num_slots: K (static); 0 or >= C means one slot per class. gt_present [B,C] bool: classes in the
        label (training, dcs.include_gt). seen [C] bool: training-vocabulary classes; tag validation runs
        when not `train`, config.model.tv.enabled and `seen` is given.

        Returns logits [B,K,h,w] (h = grid * 2**decoder.layers), slot_class int32 [B,K] (after TV),
        slot_valid bool [B,K], dcs_selected / dcs_dropped int32 [B], and for inspection
        slot_class_dcs (before TV), tv_relabelled [B,K], p_img [B,C].
        """
        if text_embeds.ndim != 3 or text_embeds.shape[-1] != self.clip_dim:
            raise ValueError(f"text_embeds must be T [C,P,{self.clip_dim}]; got shape {text_embeds.shape}")
        if text_embeds.shape[1] != self.num_templates:
            raise ValueError(
                f"text_embeds have P={text_embeds.shape[1]} templates but the model expects {self.num_templates} "
                "(config.text.templates)"
            )
        text_embeds = text_embeds.astype(jnp.float32)
        text_bar = selection.mean_text_embedding(text_embeds)
        feats = self.encode(images)
        b, g = feats["dense"].shape[:2]
        logit_scale = self.clip.logit_scale[...]
        dcs = selection.select_categories(
            feats["cls"], feats["dense"].reshape(b, g * g, -1), text_bar, logit_scale,
            theta=self.theta, num_slots=num_slots,
            gt_present=gt_present if (train and self.include_gt) else None,
        )
        slot_class, slot_valid = dcs["slot_class"], dcs["slot_valid"]
        slot_text_bar = text_bar[slot_class]  # [B,K,D]
        # l_k = s * cos(cls, T_bar_k): differentiable (reaches the CLIP image tower through CLS).
        cls_n = selection.l2_normalize(feats["cls"])
        slot_logit = jnp.exp(logit_scale) * jnp.einsum("bd,bkd->bk", cls_n, slot_text_bar)
        logits = self.decode_slots(feats, text_embeds[slot_class], slot_text_bar, slot_logit, slot_valid)

        final_class = slot_class
        relabelled = jnp.zeros_like(slot_valid)
        if not train and self.tv_enabled and seen is not None:
            final_class, relabelled = validate_tags(
                logits, slot_class, slot_valid, feats["dense"], text_bar, jnp.asarray(seen, jnp.bool_), k=self.tv_k
            )
        return {
            "logits": logits,
            "slot_class": final_class,
            "slot_valid": slot_valid,
            "dcs_selected": dcs["dcs_selected"],
            "dcs_dropped": dcs["dcs_dropped"],
            "slot_class_dcs": slot_class,
            "tv_relabelled": relabelled,
            "p_img": dcs["p_img"],
        }

    def predict(
        self, images: jax.Array, text_embeds: jax.Array, *, num_slots: int, seen: jax.Array | None = None
    ) -> jax.Array:
        """Label map int32 [B,H,W] over the vocabulary at the input resolution (no [C,H,W] tensor)."""
        out = self(images, text_embeds, num_slots=num_slots, seen=seen, train=False)
        return slot_argmax(out["logits"], out["slot_class"], out["slot_valid"], images.shape[1:3])


# ---------------------------------------------------------------------- outputs and loss
def upsample_logits(logits: jax.Array, size: Sequence[int]) -> jax.Array:
    """[B,K,h,w] -> [B,K,H,W] bilinear (half-pixel, torch align_corners=False)."""
    h, w = int(size[0]), int(size[1])
    if logits.shape[2:] == (h, w):
        return logits
    return jax.image.resize(logits, (*logits.shape[:2], h, w), "bilinear", antialias=False)


def slot_argmax(logits: jax.Array, slot_class: jax.Array, slot_valid: jax.Array, size: Sequence[int]) -> jax.Array:
    """Upsample slot logits to `size`, argmax over valid slots, map slots to vocabulary ids: int32 [B,H,W]."""
    up = upsample_logits(logits.astype(jnp.float32), size)
    up = jnp.where(slot_valid[:, :, None, None], up, -jnp.inf)
    best = jnp.argmax(up, axis=1)  # [B,H,W]
    return jnp.take_along_axis(slot_class[:, :, None], best.reshape(best.shape[0], 1, -1), axis=1).reshape(
        best.shape
    ).astype(jnp.int32)


def dcp_loss(outputs: dict, labels: jax.Array, *, ignore_as_negative: bool = True):
    """Per-pixel BCE on the K valid slots (MODEL.md section 6).

    Logits are bilinearly upsampled to the label size; the target of slot k at a pixel is
    (label == slot_class[k]). Labels are int32 with ignore = -1: ignore pixels are negatives for
    every slot (CAT-Seg), or left out when ignore_as_negative=False. Mean over valid slots x pixels.
    Returns (loss, metrics).
    """
    labels = jnp.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be [B,H,W] int; got shape {labels.shape}")
    slot_class, slot_valid = outputs["slot_class"], outputs["slot_valid"]
    logits = upsample_logits(outputs["logits"].astype(jnp.float32), labels.shape[1:])
    target = labels[:, None] == slot_class[:, :, None, None]  # [B,K,H,W]
    bce = optax.sigmoid_binary_cross_entropy(logits, target.astype(jnp.float32))
    weight = jnp.broadcast_to(slot_valid[:, :, None, None], bce.shape)
    if not ignore_as_negative:
        weight = weight & (labels[:, None] >= 0)
    weight = weight.astype(jnp.float32)
    loss = jnp.sum(bce * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    labelled = labels >= 0
    covered = jnp.any(target & slot_valid[:, :, None, None], axis=1) & labelled
    metrics = {
        "valid_slots": jnp.mean(jnp.sum(slot_valid, axis=1).astype(jnp.float32)),
        # Fraction of labelled pixels whose class has a valid slot (1.0 with dcs.include_gt unless dropped).
        "gt_pixel_coverage": jnp.sum(covered) / jnp.maximum(jnp.sum(labelled), 1),
    }
    return loss, metrics


def gt_presence(labels: jax.Array, num_classes: int) -> jax.Array:
    """Which vocabulary classes occur in each label map: labels int [B,H,W] (-1 = ignore) -> bool [B,C].

    Values outside 0..C-1 are ignored.
    """
    labels = jnp.asarray(labels)
    flat = labels.reshape(labels.shape[0], -1).astype(jnp.int32)
    flat = jnp.where((flat >= 0) & (flat < num_classes), flat, num_classes)  # out of range -> spare bin
    present = jax.vmap(lambda row: jnp.zeros(num_classes + 1, jnp.bool_).at[row].set(True))(flat)
    return present[:, :num_classes]


# ---------------------------------------------------------------------- trainable parameters
def _path_parts(path) -> tuple[str, ...]:
    """nnx path tuple, jax key path or '/'-joined string -> tuple of strings."""
    if isinstance(path, str):
        return tuple(p for p in path.split("/") if p)
    return tuple(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def is_clip_param(path) -> bool:
    """True for parameters of the CLIP backbone (the CLIP learning-rate multiplier applies)."""
    parts = _path_parts(path)
    return bool(parts) and parts[0] == "clip"


# Regexes (re.search over "/"-joined param paths) selecting the trainable params for each clip.finetune
# preset; `optim.trainable` in the config replaces them with any regex. Head params never start "clip/".
TRAINABLE_PRESETS = {
    "qv": r"^(?!clip/)|^clip/vision_model/.*/(q_proj|v_proj)/",  # CAT-Seg: image-tower q/v kernels+biases
    "full": r"^(?!clip/)|^clip/(vision_model|visual_projection)/",  # the whole image tower
    "none": r"^(?!clip/)",  # the head only
}


def trainable_regex(config: ConfigDict) -> str:
    """The trainable-parameter regex: config.optim.trainable if set, else the clip.finetune preset."""
    custom = config.get("optim", {}).get("trainable", "")
    if custom:
        return custom
    finetune = config.clip.finetune
    if finetune not in TRAINABLE_PRESETS:
        raise ValueError(f"config.clip.finetune={finetune!r}: expected one of {tuple(TRAINABLE_PRESETS)}")
    return TRAINABLE_PRESETS[finetune]


def is_trainable_path(path, regex: str) -> bool:
    """Whether the parameter at `path` (nnx path, key path or "/"-joined) matches the trainable regex."""
    return re.search(regex, "/".join(_path_parts(path))) is not None


@dataclasses.dataclass(frozen=True)
class TrainableFilter:
    """nnx filter (path, value) -> bool selecting the trainable nnx.Params (hashable, jit-friendly)."""

    regex: str

    def __call__(self, path, value) -> bool:
        return isinstance(value, nnx.Param) and is_trainable_path(path, self.regex)


def trainable_filter(config: ConfigDict) -> TrainableFilter:
    """The trainable params: `trainable_regex(config)` over param paths. By default the whole head plus
    the CLIP image-tower part chosen by config.clip.finetune ("qv": q_proj/v_proj kernels+biases;
    "full": vision_model + visual_projection; "none"); the text tower and logit_scale stay frozen."""
    regex = trainable_regex(config)
    try:
        re.compile(regex)
    except re.error as e:
        raise ValueError(f"config.optim.trainable={regex!r} is not a valid regex: {e}") from e
    return TrainableFilter(regex)


# ---------------------------------------------------------------------- building and loading
def build_model(config: ConfigDict, clip_config: CLIPConfig, *, seed: int = 0) -> DCPCLIP:
    """A randomly initialised DCPCLIP (CLIP included)."""
    return DCPCLIP(config, clip_config, rngs=nnx.Rngs(seed))


def _describe(cfg: CLIPConfig) -> str:
    v = cfg.vision
    return (
        f"ViT width {v.hidden_size}, {v.num_hidden_layers} blocks, patch {v.patch_size}, image {v.image_size}, "
        f"text width {cfg.text.hidden_size}, projection {cfg.projection_dim}"
    )


def _suggest_config(cfg: CLIPConfig) -> str:
    v = cfg.vision
    if (v.hidden_size, v.patch_size) == (768, 16):
        return "configs/dcp_vitb16_coco_stuff.py"
    if (v.hidden_size, v.patch_size) == (1024, 14):
        return "configs/dcp_vitl14_coco_stuff.py"
    return "a config whose clip.* keys match this checkpoint (or build with build_model_from_checkpoint)"


def load_pretrained_clip(model: DCPCLIP, path: str | os.PathLike) -> DCPCLIP:
    """Copy the CLIP weights at `path` into model.clip, strictly (every name and shape must match)."""
    loaded, cfg = load_clip(path, image_size=model.image_size, dtype=model.dtype)
    want = {"/".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(model.clip, nnx.Param))}
    have = {"/".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(loaded, nnx.Param))}
    problems = [f"missing in checkpoint: {k}" for k in sorted(want.keys() - have.keys())]
    problems += [f"unexpected in checkpoint: {k}" for k in sorted(have.keys() - want.keys())]
    problems += [
        f"{k}: checkpoint {tuple(have[k])} vs model {tuple(want[k])}"
        for k in sorted(want.keys() & have.keys()) if tuple(have[k]) != tuple(want[k])
    ]
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ValueError(
            f"CLIP checkpoint {path} ({_describe(cfg)}) does not fit the model's CLIP "
            f"({_describe(model.clip.config)}):\n  {shown}\nUse {_suggest_config(cfg)}."
        )
    nnx.update(model.clip, nnx.state(loaded, nnx.Param))
    return model


def _host_init(shape: tuple[int, ...], leaf: str, rng: np.random.Generator) -> np.ndarray:
    """flax's default initialisers for the head's params, sampled with numpy: kernels lecun_normal
    (truncated normal, variance 1/fan_in), biases 0, norm scales 1; the guidance prompt N(0, 0.02)."""
    if leaf == "kernel":
        std = np.sqrt(1.0 / max(1, int(np.prod(shape[:-1])))) / 0.87962566103423978
        value = rng.standard_normal(shape)
        while np.any(bad := np.abs(value) > 2.0):  # resample outside [-2, 2] (truncated normal)
            value[bad] = rng.standard_normal(int(bad.sum()))
        return (value * std).astype(np.float32)
    if leaf == "bias":
        return np.zeros(shape, np.float32)
    if leaf == "scale":
        return np.ones(shape, np.float32)
    return (0.02 * rng.standard_normal(shape)).astype(np.float32)


def build_model_from_checkpoint(
    config: ConfigDict, path: str | os.PathLike, *, seed: int | None = None
) -> tuple[DCPCLIP, CLIPConfig]:
    """Load CLIP from `path` at config.clip.image_size and build DCPCLIP around it. Returns (model, clip_config).

    The head is initialised on the host with flax's default initialisers (seed config.seed unless
    given): the same distributions as nnx init, without compiling one XLA program per param shape
    (tens of seconds on CPU).
    """
    clip_model, clip_config = load_clip(path, image_size=config.clip.image_size, dtype=compute_dtype(config))
    seed = config.get("seed", 0) if seed is None else seed
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DCPCLIP(config, clip_config, rngs=nnx.Rngs(0))))
    clip_params = dict(nnx.to_flat_state(nnx.state(clip_model, nnx.Param)))
    rng = np.random.default_rng(seed)
    flat = nnx.to_flat_state(state)
    for path_, var in flat:
        if path_[0] == "clip":
            var.set_value(clip_params[path_[1:]].get_value())
        else:
            var.set_value(jnp.asarray(_host_init(var.get_value().shape, str(path_[-1]), rng)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat)), clip_config


# ---------------------------------------------------------------------- vocabulary helpers
def _normalise_name(name: str) -> str:
    return " ".join(name.lower().split())


def _name_keys(name: str) -> set[str]:
    """A class name counts by its full string and by its first synonym ("building, edifice" -> "building")."""
    return {_normalise_name(name), _normalise_name(name.split(",")[0])}


def seen_mask(vocabulary: Sequence[str], train_vocabulary: Sequence[str]) -> np.ndarray:
    """np.bool_ [C]: whether each vocabulary class is in the training vocabulary (case/space-insensitive;
    the full name or its first synonym may match either form of a training name)."""
    train_keys: set[str] = set()
    for name in train_vocabulary:
        train_keys |= _name_keys(name)
    return np.array([bool(_name_keys(name) & train_keys) for name in vocabulary], dtype=np.bool_)
