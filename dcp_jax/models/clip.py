"""CLIP (ViT image tower + text transformer) in Flax NNX, with loaders for real CLIP checkpoints.

The parameter tree mirrors HF names (MODEL.md section 0): `nnx.state(model)` paths read
`vision_model/encoder/layers/3/self_attn/q_proj/kernel`, `text_model/embeddings/token_embedding/embedding`,
`visual_projection/kernel`, `logit_scale`, ... exactly the transformers-4.x Flax tree minus its top `params/`.
So HF safetensors / pytorch_model.bin, 4.x `flax_model.msgpack` and OpenAI `.pt` archives load by the generic
rules in `clip_convert.py`.

Parameters are float32; `dtype` is the compute dtype (bfloat16 on accelerators). Outputs are returned as float32.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dcp_jax.models import clip_convert, compute
from dcp_jax.models.compute import (LayerNorm, attention_path, maybe_remat, multi_head_attention, remat_call,
                                    remat_name, traced_construction, unroll_scans)

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
    return LayerNorm(width, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, scale_init=_ONES,
                         bias_init=_ZEROS, rngs=rngs)


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with separate q/k/v/out projections (HF layout)."""

    def __init__(self, width: int, num_heads: int, *, dtype, attention: str = "auto", rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"hidden_size={width} is not divisible by num_attention_heads={num_heads}")
        self.num_heads = num_heads
        self.attention = attention
        self.head_dim = width // num_heads
        self.q_proj = _linear(width, width, dtype, rngs)
        self.k_proj = _linear(width, width, dtype, rngs)
        self.v_proj = _linear(width, width, dtype, rngs)
        self.out_proj = _linear(width, width, dtype, rngs)

    def _heads(self, x):
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)  # [B, T, heads, head_dim]

    def __call__(self, x, mask=None, *, return_probs: bool = False, site: str = "clip", kv_length=None):
        """x [B,T,W]; mask bool broadcastable to [B,heads,T,T] (True = attend); kv_length: only the first
        kv_length tokens are attended (CLIPEncoder's padding). Returns (y, probs or None)."""
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        y, probs = multi_head_attention(q, k, v, mask=mask, impl=self.attention, return_probs=return_probs,
                                        site=site, kv_length=kv_length)
        return self.out_proj(y.reshape(*x.shape[:-1], -1)), probs


class CLIPMLP(nnx.Module):
    def __init__(self, width: int, hidden: int, act: str, *, dtype, rngs: nnx.Rngs):
        self.act = _activation(act)
        self.fc1 = _linear(width, hidden, dtype, rngs)
        self.fc2 = _linear(hidden, width, dtype, rngs)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg, *, dtype, attention: str = "auto", rngs: nnx.Rngs):
        w = cfg.hidden_size
        self.self_attn = CLIPAttention(w, cfg.num_attention_heads, dtype=dtype, attention=attention, rngs=rngs)
        self.layer_norm1 = _layer_norm(w, cfg.layer_norm_eps, dtype, rngs)
        self.mlp = CLIPMLP(w, cfg.intermediate_size, cfg.hidden_act, dtype=dtype, rngs=rngs)
        self.layer_norm2 = _layer_norm(w, cfg.layer_norm_eps, dtype, rngs)

    def __call__(self, x, mask=None, *, return_probs: bool = False, site: str = "clip", kv_length=None):
        y, probs = self.self_attn(self.layer_norm1(x), mask, return_probs=return_probs, site=site,
                                  kv_length=kv_length)
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
    """The stack of blocks. With `scan_layers` the blocks run as one jax.lax.scan over their parameters
    stacked on the fly (the parameter tree keeps HF's per-layer names), so XLA compiles one block, not
    one per layer (maxtext's scan_layers); `remat` rematerialises each block (compute.REMAT_POLICIES)."""

    def __init__(self, cfg, *, dtype, attention: str = "auto", remat="none", scan_layers: bool = False,
                 rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, dtype=dtype, attention=attention, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])
        self.remat = remat_name(remat)
        self.scan_layers = bool(scan_layers)

    def __call__(self, x, mask=None, *, stop: int | None = None, collect: bool = False, site: str = "clip"):
        """Blocks 0..stop-1 (default: all) on x [B,T,W] -> (x, the residual stream after each of them
        [n,B,T,W] if `collect` else None). `site` names the blocks' attention (compute.attention_path).

        Where the blocks' attention runs on cuDNN, which refuses an odd token count in training (B/16 @384
        and L/14 @336: 577), the stream is padded once to an even length and every block attends to the
        real tokens only (kv_length); the padded rows stay finite (LayerNorm of zeros) and are cut off at
        the end, so nothing of them reaches a real token or a gradient."""
        blocks = list(self.layers)[:stop]
        if not blocks:
            return x, (x[None][:0] if collect else None)
        graphdef = nnx.split(blocks[0])[0]  # every block has the same structure
        t, kv_length = x.shape[1], None
        attn = blocks[0].self_attn
        if mask is None:
            heads = (*x.shape[:2], attn.num_heads, attn.head_dim)
            padded = attention_path(heads, heads, x.dtype, impl=attn.attention, site=site).padded
            if padded:
                x, kv_length = jnp.pad(x, [(0, 0), (0, padded[0] - t), (0, 0)]), t

        def block(x, params):
            return nnx.merge(graphdef, params)(x, mask, site=site, kv_length=kv_length)[0]

        params = [nnx.state(b) for b in blocks]
        if self.scan_layers and len(blocks) > 1:
            body = maybe_remat(block, self.remat, in_scan=True)

            def step(x, p):
                x = body(x, p)
                return x, x if collect else None

            x, hidden = jax.lax.scan(step, x, jax.tree.map(lambda *ps: jnp.stack(ps), *params),
                                     unroll=unroll_scans())
        else:
            body = maybe_remat(block, self.remat)
            hidden = []
            for p in params:
                x = body(x, p)
                hidden.append(x)
            hidden = jnp.stack(hidden) if collect else None
        return x[:, :t], (hidden[:, :, :t] if collect else None)


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
        patches = self.embed_patches(pixel_values)  # [B, h, w, W]
        b, h, w, width = patches.shape
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, width))
        x = jnp.concatenate([cls, patches.reshape(b, h * w, width)], axis=1)
        return x + self.position_embedding.embedding[...].astype(self.dtype)[None], (h, w)

    def embed_patches(self, pixel_values):
        """The patch embedding's convolution (stride = kernel size, no padding); on GPUs and TPUs as one matmul
        over the image cut into patches: on a GPU a cuBLAS call inside the step's CUDA graphs where XLA kept a
        cuDNN convolution outside them. The same sums up to their order (tests/test_clip.py); the CPU keeps the
        convolution, so that its numbers (the demo's, the tests') stay those of the convolution."""
        conv = self.patch_embedding
        if compute.platform() == "cpu":
            return conv(pixel_values)
        p = conv.kernel_size[0]
        b, height, width, c = pixel_values.shape
        h, w = height // p, width // p
        patches = pixel_values[:, :h * p, :w * p].reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
        x, kernel = conv.promote_dtype((patches.reshape(b, h, w, p * p * c), conv.kernel[...]), dtype=conv.dtype)
        return x @ kernel.reshape(p * p * c, -1)


class CLIPVisionTransformer(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs, **encoder):
        self.embeddings = CLIPVisionEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype, rngs)  # sic, HF name
        self.encoder = CLIPEncoder(cfg, dtype=dtype, rngs=rngs, **encoder)
        self.post_layernorm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype, rngs)


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                                         embedding_init=_EMBED, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype,
                                            param_dtype=jnp.float32, embedding_init=_EMBED, rngs=rngs)


class CLIPTextTransformer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs, **encoder):
        self.embeddings = CLIPTextEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, dtype=dtype, rngs=rngs, **encoder)
        self.final_layer_norm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype, rngs)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class CLIPModel(nnx.Module):
    """CLIP with HF parameter names; see the module docstring."""

    def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, attention: str = "auto", remat="none",
                 scan_layers: bool = False, rngs: nnx.Rngs):
        """dtype: the compute dtype (parameters are float32); attention, remat, scan_layers: how the blocks
        run (dcp_jax/models/compute.py, CLIPEncoder); none of them changes the parameters."""
        self.config = config
        self.dtype = dtype
        self.remat = remat_name(remat)
        encoder = dict(attention=attention, remat=remat, scan_layers=scan_layers)
        self.text_model = CLIPTextTransformer(config.text, dtype=dtype, rngs=rngs, **encoder)
        self.vision_model = CLIPVisionTransformer(config.vision, dtype=dtype, rngs=rngs, **encoder)
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
        early = [i for i in layers if i < num_layers - 1]
        x, hidden = vm.encoder(x, stop=num_layers - 1, collect=bool(early), site="clip.vision")
        for i in early:
            aux[f"layer_{i}"] = hidden[i][:, 1:].reshape(b, h, w, -1).astype(jnp.float32)
        out, attn_last, dense_tokens = self._last_block(x, dense_mode)
        if num_layers - 1 in layers:
            aux[f"layer_{num_layers - 1}"] = out[:, 1:].reshape(b, h, w, -1).astype(jnp.float32)
        aux["attn_last"] = attn_last[:, 1:, 1:].astype(jnp.float32)
        dense = self.visual_projection(vm.post_layernorm(dense_tokens[:, 1:]))
        aux["dense"] = dense.reshape(b, h, w, -1).astype(jnp.float32)
        embeds = self.visual_projection(vm.post_layernorm(out[:, 0]))
        return embeds.astype(jnp.float32), aux

    def _last_block(self, x, dense_mode: str):
        """The last image block, which also gives its head-mean attention map [B,T,T] (through the
        reference attention, the one path that keeps the probabilities) and the dense tokens:
        (out, attn, dense tokens). Rematerialised like the other blocks."""
        def run(last, x):
            out, probs = last(x, return_probs=True, site="clip.vision.last")
            # The head mean as adds of head slices: XLA:CPU's YNNPACK reduce over the middle head axis
            # took 24 ms here (B/16 @384), the adds under 1 ms.
            heads = probs.shape[1]
            attn = sum(probs[:, i] for i in range(heads)) / heads
            return out, attn, last.dense_value_path(x) if dense_mode == "catseg" else out

        return remat_call(self.vision_model.encoder.layers[-1], run, self.remat, x)

    def get_image_features(self, pixel_values):
        """Projected, un-normalised image embedding [B,D] (HF `CLIPModel.get_image_features`)."""
        vcfg = self.config.vision
        # Same as encode_image(...)[0] without the extra last-block outputs.
        if pixel_values.ndim != 4 or pixel_values.shape[1:3] != (vcfg.image_size, vcfg.image_size):
            return self.encode_image(pixel_values)[0]  # raises the explanatory error
        vm = self.vision_model
        x, _ = vm.embeddings(pixel_values.astype(self.dtype))
        x, _ = vm.encoder(vm.pre_layrnorm(x), site="clip.vision")
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
        x, _ = tm.encoder(x, mask, site="clip.text")
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


def abstract_clip(config: CLIPConfig, dtype=jnp.float32, **compute) -> CLIPModel:
    """A CLIPModel whose params are ShapeDtypeStructs (nothing allocated or initialised); `compute`:
    attention / remat / scan_layers (CLIPModel)."""
    with traced_construction():
        return nnx.eval_shape(lambda: CLIPModel(config, dtype=dtype, rngs=nnx.Rngs(0), **compute))


def with_compute(model: CLIPModel, dtype=jnp.float32, **compute) -> CLIPModel:
    """The same parameters (shared, not copied) in a CLIPModel that computes in `dtype` (and `compute`:
    attention / remat / scan_layers), e.g. the float32 text tower of a bfloat16 model."""
    return nnx.merge(nnx.graphdef(abstract_clip(model.config, dtype, **compute)), nnx.state(model))


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
           "load_clip", "load_clip_params", "model_from_params", "model_params", "normalize_pixels", "save_hf_checkpoint",
           "with_compute"]
