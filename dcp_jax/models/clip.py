"""CLIP (ViT image tower + text transformer) in Flax NNX, with loaders for real CLIP checkpoints.

The parameter tree mirrors HF names (MODEL.md section 0): `nnx.state(model)` paths read
`vision_model/encoder/layers/3/self_attn/q_proj/kernel`, `text_model/embeddings/token_embedding/embedding`,
`visual_projection/kernel`, `logit_scale`, ... exactly the transformers-4.x Flax tree minus its top `params/`.
So HF safetensors / pytorch_model.bin, 4.x `flax_model.msgpack` and OpenAI `.pt` archives load by the generic
rules in `clip_convert.py`.

Parameters are float32; `dtype` is the compute dtype (bfloat16 on accelerators). Outputs are returned as float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dcp_jax.models import clip_convert

# --------------------------------------------------------------------------------------------------
# Configs (HF field names and HF 5.x defaults, so a partial config.json reads like transformers reads it)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size**2 + 1


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_hf(cls, config: dict) -> "CLIPConfig":
        """Build from a transformers CLIPConfig json dict (config.json). Unknown keys are ignored."""
        if config.get("model_type", "clip") != "clip":
            raise ValueError(f"config.json has model_type={config.get('model_type')!r}; expected 'clip' (a CLIPModel)")

        def sub(name: str, klass):
            # Old hub configs carry `*_config_dict` next to `*_config`; transformers lets the former win.
            values = dict(config.get(f"{name}_config") or {})
            values.update(config.get(f"{name}_config_dict") or {})
            fields = {f.name for f in dataclasses.fields(klass)}
            kept = {k: v for k, v in values.items() if k in fields and v is not None}
            for key in ("image_size", "patch_size"):
                if isinstance(kept.get(key), (list, tuple)):
                    if len(set(kept[key])) != 1:
                        raise ValueError(f"non-square {name}_config.{key}={kept[key]} is not supported")
                    kept[key] = kept[key][0]
            if isinstance(kept.get("eos_token_id"), (list, tuple)):
                kept["eos_token_id"] = kept["eos_token_id"][0]
            return klass(**kept)

        text, vision = sub("text", CLIPTextConfig), sub("vision", CLIPVisionConfig)
        top = {k: config[k] for k in ("projection_dim", "logit_scale_init_value") if config.get(k) is not None}
        return cls(text=text, vision=vision, **top)

    def to_hf(self) -> dict:
        """A transformers CLIPConfig json dict (what `CLIPModel.from_pretrained` reads from config.json)."""
        text = dataclasses.asdict(self.text) | {"model_type": "clip_text_model", "projection_dim": self.projection_dim}
        vision = dataclasses.asdict(self.vision) | {"model_type": "clip_vision_model",
                                                     "projection_dim": self.projection_dim}
        return {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "initializer_factor": 1.0,
            "text_config": text,
            "vision_config": vision,
            "dtype": "float32",
        }

    def replace(self, **changes) -> "CLIPConfig":
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


# HF CLIP's initialisation (CLIPPreTrainedModel._init_weights), so a random CLIP has well-scaled
# activations: kernels N(0, 1/fan_in), token/position embeddings N(0, 0.02), LayerNorms 1 / 0.
_KERNEL = nnx.initializers.lecun_normal()
_EMBED = nnx.initializers.normal(0.02)
_ZEROS, _ONES = nnx.initializers.zeros, nnx.initializers.ones

# OpenAI CLIP's pixel statistics (RGB in 0..1); CAT-Seg uses the same values x 255.
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_pixels(images: jax.Array) -> jax.Array:
    """RGB in 0..255 (uint8 or float) -> CLIP's normalised input, float32."""
    return (jnp.asarray(images, jnp.float32) / 255.0 - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)


def _linear(n_in, n_out, dtype, rngs, use_bias=True):
    return nnx.Linear(n_in, n_out, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                      kernel_init=_KERNEL, bias_init=_ZEROS, rngs=rngs)


def _layer_norm(width, eps, dtype, rngs):
    return nnx.LayerNorm(width, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, scale_init=_ONES,
                         bias_init=_ZEROS, rngs=rngs)


# XLA:CPU writes the whole [..., h, Lq, Lk] score tensor to memory before the softmax. The decoder's window
# attention (B/16 @384, 16 slots: 340 MB of scores) and TGA's spatial attention (85 MB) ran about 2x faster
# here in chunks whose scores stay in cache; GPUs and TPUs keep one batched op.
CPU_SCORE_CHUNK_BYTES = 8 << 20


def chunks_attention() -> bool:
    """Whether attention traced now may run in chunks (the CPU backend)."""
    return jax.default_backend() == "cpu"


@contextlib.contextmanager
def attention_in_one_op():
    """Inside, attention is traced as one batched op on every backend. For FLOP counts: XLA's cost
    analysis counts a loop body once, so it would miss most of the chunked attention's FLOPs.
    JAX's caches are cleared on entry and exit, so jitted functions trace again under the setting."""
    global CPU_SCORE_CHUNK_BYTES
    saved, CPU_SCORE_CHUNK_BYTES = CPU_SCORE_CHUNK_BYTES, 1 << 62
    jax.clear_caches()
    try:
        yield
    finally:
        CPU_SCORE_CHUNK_BYTES = saved
        jax.clear_caches()


def multi_head_attention(q, k, v, *, bias=None, mask=None):
    """Scaled dot-product attention over split heads: q [..., Lq, h, d], k [..., Lk, h, d], v [..., Lk, h, dv]
    -> (out [..., Lq, h, dv], float32 probabilities [..., h, Lq, Lk]). `bias` (added to the scores) and `mask`
    (bool, True = attend) broadcast to [..., h, Lq, Lk].

    The heads move in front of the token axes before the two matmuls: on XLA's CPU backend the batched
    matmuls with the heads between the token and feature axes ran 2-3x slower (B/16 @384: 32 -> 11 ms per
    layer; the decoder's window attention 0.23 -> 0.10 s), and GPUs and TPUs take either layout.
    On CPU, a large batch is computed in chunks of the leading axes (CPU_SCORE_CHUNK_BYTES), with the
    same result up to float32 rounding.
    """
    lead, (lq, h, _), lk = q.shape[:-3], q.shape[-3:], k.shape[-3]
    extra = [a for a in (bias, mask) if a is not None]
    per_item = h * lq * lk * 4  # float32 score bytes of one index of the leading axes
    if chunks_attention() and lead and math.prod(lead) * per_item > CPU_SCORE_CHUNK_BYTES:
        if all(jnp.ndim(a) <= 3 for a in extra):
            # bias / mask do not vary over the leading axes: chunk them all, flattened
            flat = lambda t: t.reshape(-1, *t.shape[len(lead):])  # noqa: E731
            out, probs = _chunked_attention(flat(q), flat(k), flat(v), bias, mask, per_item)
            return out.reshape(*lead, *out.shape[1:]), probs.reshape(*lead, *probs.shape[1:])
        if lead[0] > 1:
            return _chunked_attention(q, k, v, bias, mask, per_item * math.prod(lead[1:]), leading=len(lead))
    return _attention(q, k, v, bias, mask)


def _chunked_attention(q, k, v, bias, mask, per_item, leading=1):
    """`_attention` mapped over axis 0 of q, k, v, in batches of about CPU_SCORE_CHUNK_BYTES of scores.
    bias / mask: mapped along when they have that axis at full size, else the same for every chunk."""
    n = q.shape[0]
    mapped = lambda a: a is not None and jnp.ndim(a) == leading + 3 and a.shape[0] == n  # noqa: E731
    drop = lambda a: a[0] if a is not None and jnp.ndim(a) == leading + 3 else a  # noqa: E731  (size-1 axis 0)
    xs = (q, k, v, bias if mapped(bias) else None, mask if mapped(mask) else None)
    shared_bias, shared_mask = (None if mapped(a) else drop(a) for a in (bias, mask))

    def one(item):
        qi, ki, vi, bi, mi = item
        return _attention(qi, ki, vi, shared_bias if bi is None else bi, shared_mask if mi is None else mi)

    return jax.lax.map(one, xs, batch_size=max(1, CPU_SCORE_CHUNK_BYTES // per_item))


def _attention(q, k, v, bias, mask):
    qh, kh, vh = (jnp.swapaxes(t, -2, -3) for t in (q, k, v))  # [..., h, L, d]
    scores = jnp.einsum("...qd,...kd->...qk", qh, kh, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("...qk,...kd->...qd", probs.astype(v.dtype), vh)
    return jnp.swapaxes(out, -2, -3), probs


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with separate q/k/v/out projections (HF layout)."""

    def __init__(self, width: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"hidden_size={width} is not divisible by num_attention_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.q_proj = _linear(width, width, dtype, rngs)
        self.k_proj = _linear(width, width, dtype, rngs)
        self.v_proj = _linear(width, width, dtype, rngs)
        self.out_proj = _linear(width, width, dtype, rngs)

    def _heads(self, x):
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)  # [B, T, heads, head_dim]

    def __call__(self, x, mask=None, *, return_probs: bool = False):
        """x [B,T,W]; mask bool broadcastable to [B,heads,T,T] (True = attend). Returns (y, probs or None)."""
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        y, probs = multi_head_attention(q, k, v, mask=mask)
        return self.out_proj(y.reshape(*x.shape[:-1], -1)), probs if return_probs else None


class CLIPMLP(nnx.Module):
    def __init__(self, width: int, hidden: int, act: str, *, dtype, rngs: nnx.Rngs):
        self.act = _activation(act)
        self.fc1 = _linear(width, hidden, dtype, rngs)
        self.fc2 = _linear(hidden, width, dtype, rngs)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        w = cfg.hidden_size
        self.self_attn = CLIPAttention(w, cfg.num_attention_heads, dtype=dtype, rngs=rngs)
        self.layer_norm1 = _layer_norm(w, cfg.layer_norm_eps, dtype, rngs)
        self.mlp = CLIPMLP(w, cfg.intermediate_size, cfg.hidden_act, dtype=dtype, rngs=rngs)
        self.layer_norm2 = _layer_norm(w, cfg.layer_norm_eps, dtype, rngs)

    def __call__(self, x, mask=None, *, return_probs: bool = False):
        y, probs = self.self_attn(self.layer_norm1(x), mask, return_probs=return_probs)
        x = x + y
        x = x + self.mlp(self.layer_norm2(x))
        return x, probs

    def dense_value_path(self, x):
        """CAT-Seg `forward_dense`: v-path only (out_proj applied to v), residual = CLS input for every token."""
        attn = self.self_attn
        v = attn.out_proj(attn.v_proj(self.layer_norm1(x)))
        v = v + x[:, :1]
        return v + self.mlp(self.layer_norm2(v))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        w, p = cfg.hidden_size, cfg.patch_size
        self.patch_embedding = nnx.Conv(cfg.num_channels, w, kernel_size=(p, p), strides=(p, p), padding="VALID",
                                        use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                                        kernel_init=_KERNEL, rngs=rngs)
        self.class_embedding = nnx.Param(nnx.initializers.normal(w**-0.5)(rngs.params(), (w,), jnp.float32))
        self.position_embedding = nnx.Embed(cfg.num_positions, w, dtype=dtype, param_dtype=jnp.float32,
                                            embedding_init=_EMBED, rngs=rngs)
        self.dtype = dtype

    def __call__(self, pixel_values):
        patches = self.patch_embedding(pixel_values)  # [B, h, w, W]
        b, h, w, width = patches.shape
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, width))
        x = jnp.concatenate([cls, patches.reshape(b, h * w, width)], axis=1)
        return x + self.position_embedding.embedding[...].astype(self.dtype)[None], (h, w)


class CLIPVisionTransformer(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.embeddings = CLIPVisionEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype, rngs)  # sic, HF name
        self.encoder = CLIPEncoder(cfg, dtype=dtype, rngs=rngs)
        self.post_layernorm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype, rngs)


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                                         embedding_init=_EMBED, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype,
                                            param_dtype=jnp.float32, embedding_init=_EMBED, rngs=rngs)


class CLIPTextTransformer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.embeddings = CLIPTextEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, dtype=dtype, rngs=rngs)
        self.final_layer_norm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype, rngs)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class CLIPModel(nnx.Module):
    """CLIP with HF parameter names; see the module docstring."""

    def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.text_model = CLIPTextTransformer(config.text, dtype=dtype, rngs=rngs)
        self.vision_model = CLIPVisionTransformer(config.vision, dtype=dtype, rngs=rngs)
        self.visual_projection = _linear(config.vision.hidden_size, config.projection_dim, dtype, rngs, use_bias=False)
        self.text_projection = _linear(config.text.hidden_size, config.projection_dim, dtype, rngs, use_bias=False)
        self.logit_scale = nnx.Param(jnp.full((), config.logit_scale_init_value, jnp.float32))  # log temperature

    # ---------------------------------------------------------------- image tower
    def encode_image(self, pixel_values, *, layers: Sequence[int] = (), dense_mode: str = "catseg"):
        """Run the image tower.

        Args:
          pixel_values: [B,H,W,3] float, CLIP-normalised, H == W == config.vision.image_size.
          layers: 0-based block indices whose raw residual-stream patch tokens go into aux as `layer_{i}`.
          dense_mode: "catseg" (CAT-Seg v-path trick in the last block) or "plain" (normal last-block tokens).

        Returns:
          (embeds [B,D] = visual_projection(post_layernorm(CLS)), un-normalised, like HF;
           aux dict: `dense` [B,h,w,D], `layer_{i}` [B,h,w,W], `attn_last` [B,N,N] (heads averaged,
           patch-to-patch)). All float32.
        """
        vcfg = self.config.vision
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != vcfg.num_channels:
            raise ValueError(f"pixel_values must be NHWC [B,H,W,{vcfg.num_channels}]; got shape {pixel_values.shape}")
        if pixel_values.shape[1:3] != (vcfg.image_size, vcfg.image_size):
            raise ValueError(f"pixel_values are {pixel_values.shape[1]}x{pixel_values.shape[2]} but this CLIP expects "
                             f"{vcfg.image_size}x{vcfg.image_size}; resize the input or load with image_size=...")
        if dense_mode not in ("catseg", "plain"):
            raise ValueError(f"dense_mode={dense_mode!r}; expected 'catseg' or 'plain'")
        num_layers = vcfg.num_hidden_layers
        layers = tuple(int(i) for i in layers)
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: the image tower has blocks 0..{num_layers - 1}")

        vm = self.vision_model
        x, (h, w) = vm.embeddings(pixel_values.astype(self.dtype))
        x = vm.pre_layrnorm(x)
        b = x.shape[0]
        aux: dict[str, jax.Array] = {}
        blocks = vm.encoder.layers
        for i in range(num_layers - 1):
            x, _ = blocks[i](x)
            if i in layers:
                aux[f"layer_{i}"] = x[:, 1:].reshape(b, h, w, -1).astype(jnp.float32)
        last = blocks[num_layers - 1]
        out, probs = last(x, return_probs=True)
        if num_layers - 1 in layers:
            aux[f"layer_{num_layers - 1}"] = out[:, 1:].reshape(b, h, w, -1).astype(jnp.float32)
        # The head mean as adds of head slices: XLA:CPU's YNNPACK reduce over the middle head axis took
        # 24 ms here (B/16 @384), the adds under 1 ms.
        heads = probs.shape[1]
        aux["attn_last"] = (sum(probs[:, i] for i in range(heads)) / heads)[:, 1:, 1:].astype(jnp.float32)

        dense_tokens = last.dense_value_path(x) if dense_mode == "catseg" else out
        dense = self.visual_projection(vm.post_layernorm(dense_tokens[:, 1:]))
        aux["dense"] = dense.reshape(b, h, w, -1).astype(jnp.float32)
        embeds = self.visual_projection(vm.post_layernorm(out[:, 0]))
        return embeds.astype(jnp.float32), aux

    def get_image_features(self, pixel_values):
        """Projected, un-normalised image embedding [B,D] (HF `CLIPModel.get_image_features`)."""
        vcfg = self.config.vision
        # Same as encode_image(...)[0] without the extra last-block outputs.
        if pixel_values.ndim != 4 or pixel_values.shape[1:3] != (vcfg.image_size, vcfg.image_size):
            return self.encode_image(pixel_values)[0]  # raises the explanatory error
        vm = self.vision_model
        x, _ = vm.embeddings(pixel_values.astype(self.dtype))
        x = vm.pre_layrnorm(x)
        for block in vm.encoder.layers:
            x, _ = block(x)
        return self.visual_projection(vm.post_layernorm(x[:, 0])).astype(jnp.float32)

    # ---------------------------------------------------------------- text tower
    def encode_text_tokens(self, input_ids, attention_mask=None, context=None):
        """Final-LayerNormed text tokens [B,T,W] (causal + padding mask), before pooling and projection.

        context [M,W]: learnt token embeddings that replace positions 1..M (after the start token;
        CoOp / CAT-Seg's text prompt), for input ids that hold M placeholder tokens there.
        """
        tcfg = self.config.text
        t = input_ids.shape[-1]
        if t > tcfg.max_position_embeddings:
            raise ValueError(f"input_ids have length {t} > max_position_embeddings={tcfg.max_position_embeddings}")
        tm = self.text_model
        x = tm.embeddings.token_embedding(input_ids)
        if context is not None:
            m = context.shape[0]
            x = x.at[:, 1:1 + m].set(jnp.broadcast_to(context.astype(x.dtype), (x.shape[0], m, x.shape[-1])))
        x = x + tm.embeddings.position_embedding.embedding[...][:t].astype(self.dtype)[None]
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, None, :] > 0)
        for block in tm.encoder.layers:
            x, _ = block(x, mask)
        return tm.final_layer_norm(x)

    def get_text_features(self, input_ids, attention_mask=None, context=None):
        """Projected, un-normalised text embedding [B,D] (HF `CLIPModel.get_text_features`).

        Pools at the EOT token: argmax(input_ids) for legacy configs with eos_token_id == 2 (OpenAI behaviour,
        EOT has the largest id), else the first position equal to eos_token_id. `context`: see encode_text_tokens.
        """
        input_ids = jnp.asarray(input_ids, jnp.int32)
        x = self.encode_text_tokens(input_ids, attention_mask, context)
        eos = self.config.text.eos_token_id
        pos = jnp.argmax(input_ids, axis=-1) if eos == 2 else jnp.argmax(input_ids == eos, axis=-1)
        pooled = jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]
        return self.text_projection(pooled).astype(jnp.float32)


# --------------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------------


def abstract_clip(config: CLIPConfig, dtype=jnp.float32) -> CLIPModel:
    """A CLIPModel whose params are ShapeDtypeStructs (nothing allocated or initialised)."""
    return nnx.eval_shape(lambda: CLIPModel(config, dtype=dtype, rngs=nnx.Rngs(0)))


def expected_param_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
    """Our flat param names ('/'-joined) -> shapes for this config."""
    return clip_convert.param_shapes(config)


def model_from_params(config: CLIPConfig, params: dict[str, np.ndarray], dtype=jnp.float32) -> CLIPModel:
    """Build a CLIPModel from flat params (our names). Strict: names and shapes must match the config exactly."""
    clip_convert.check_params(params, expected_param_shapes(config), what="the CLIP config")
    graphdef, state = nnx.split(abstract_clip(config, dtype))
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(jnp.asarray(params["/".join(map(str, path))], jnp.float32))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def model_params(model: CLIPModel) -> dict[str, np.ndarray]:
    """Flat float32 numpy params of a CLIPModel (our names)."""
    return {"/".join(map(str, path)): np.asarray(v.get_value(), np.float32)
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_clip_params(path: str | os.PathLike, image_size: int | None = None) -> tuple[dict[str, np.ndarray], CLIPConfig]:
    """Read a CLIP checkpoint as host arrays: (flat float32 params with our names, config).

    Args:
      path: an HF checkpoint directory (config.json + model.safetensors | pytorch_model.bin | flax_model.msgpack),
        or an OpenAI `.pt` file (TorchScript archive or a plain state dict; its config is inferred from shapes).
      image_size: input resolution to run at; the vision position embedding is resized bicubically
        (PyTorch semantics) and the returned config carries the new image_size.
    """
    params, config = clip_convert.read_checkpoint(path, CLIPConfig)
    if image_size is not None and int(image_size) != config.vision.image_size:
        image_size = int(image_size)
        if image_size % config.vision.patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of the patch size {config.vision.patch_size}")
        key = clip_convert.VISION_POSEMB
        params[key] = clip_convert.resize_posemb(params[key], image_size // config.vision.patch_size)
        config = config.replace(vision=dataclasses.replace(config.vision, image_size=image_size))
    return params, config


def load_clip(path: str | os.PathLike, image_size: int | None = None,
              dtype=jnp.float32) -> tuple[CLIPModel, CLIPConfig]:
    """Load a CLIP checkpoint into a CLIPModel on the default device: (model, config).

    See `load_clip_params` for the arguments; `dtype` is the compute dtype (params are float32).
    """
    params, config = load_clip_params(path, image_size)
    return model_from_params(config, params, dtype), config


def save_hf_checkpoint(model: CLIPModel, config: CLIPConfig, out_dir: str | os.PathLike) -> Path:
    """Write config.json + model.safetensors (PyTorch layout) that transformers' CLIPModel.from_pretrained loads.

    The exact inverse of `load_clip` for HF directories; `config` must describe the model's params (e.g. the
    config `load_clip` returned, which carries a resized image_size).
    """
    params = model_params(model)
    clip_convert.check_params(params, expected_param_shapes(config), what="the config given to save_hf_checkpoint")
    return clip_convert.write_hf_checkpoint(params, config.to_hf(), out_dir)


__all__ = ["CLIPConfig", "CLIPModel", "CLIPTextConfig", "CLIPVisionConfig", "abstract_clip", "expected_param_shapes",
           "load_clip", "load_clip_params", "model_from_params", "model_params", "normalize_pixels", "save_hf_checkpoint"]
