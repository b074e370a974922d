"""Spatial Enhancement Decoder, SED (MODEL.md section 4): Swin-style blocks + U-Net-like upsampling.

Every slot's map is decoded independently (the slot axis is folded into the batch), so nothing here
can mix invalid slots into valid ones. Per decoder layer l (resolution r = grid * 2**l):
- spatial enhance: a pair of Swin blocks (no relative position bias, the second shifted by half a
  window) whose Q/K see concat(X, S_l, A_l) and whose V sees X alone. S_l are shallow CLIP features
  (a guidance layer, Conv3x3 + ReLU), A_l attention-weight features (rows of the last CLIP block's
  attention, Linear(N -> attn_dim)), both per image and bilinearly resized to r;
- upsample: ConvTranspose k2s2 (c -> c/2), concat [the raw cost volume through its own
  ConvTranspose chain, shallow CLIP features through ConvTranspose + Conv3x3 + ReLU], DoubleConv.
A Conv3x3 head gives one logit per slot and pixel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dcp_jax.models.alignment import LN_EPS, MLP, attention
from dcp_jax.models import compute
from dcp_jax.models.compute import GroupNorm, LayerNorm, remat_call, remat_name


def group_count(channels: int) -> int:
    """CAT-Seg's GroupNorm(channels // 16) groups, kept >= 1 and a divisor of `channels`."""
    groups = max(1, channels // 16)
    while channels % groups:
        groups -= 1
    return groups


def resize_bilinear(x: jax.Array, size: int) -> jax.Array:
    """[..., H, W, C] -> [..., size, size, C], half-pixel bilinear (torch align_corners=False)."""
    if x.shape[-3] == size and x.shape[-2] == size:
        return x
    shape = (*x.shape[:-3], size, size, x.shape[-1])
    return jax.image.resize(x, shape, "bilinear", antialias=False).astype(x.dtype)


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """[M,H,W,C] -> [M, nW, window*window, C]."""
    m, h, w, c = x.shape
    x = x.reshape(m, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(m, (h // window) * (w // window), window * window, c)


def window_reverse(x: jax.Array, window: int, h: int, w: int) -> jax.Array:
    """Inverse of window_partition: [M, nW, window*window, C] -> [M,H,W,C]."""
    m, c = x.shape[0], x.shape[-1]
    x = x.reshape(m, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(m, h, w, c)


def shifted_window_bias(size: int, window: int, shift: int) -> np.ndarray:
    """Swin's attention mask for a cyclically shifted map: [nW, 1, T, T], -100 across regions."""
    region = np.zeros((1, size, size, 1), np.float32)
    count = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            region[:, hs, ws, :] = count
            count += 1
    ids = np.asarray(window_partition(region, window))[0, :, :, 0]  # [nW, T]
    bias = np.where(ids[:, None, :] != ids[:, :, None], -100.0, 0.0).astype(np.float32)
    return bias[:, None]


class SwinBlock(nnx.Module):
    """Pre-LN window attention (Q/K from concat(LN(x), guidance), V from LN(x)) + MLP, no rel-pos bias."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, *, dtype, attention: str = "auto",
                 rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.attention = attention
        self.norm1 = LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, rngs=rngs)
        self.q_proj = nnx.Linear(dim + guidance_dim, dim, dtype=dtype, rngs=rngs)
        self.k_proj = nnx.Linear(dim + guidance_dim, dim, dtype=dtype, rngs=rngs)
        self.v_proj = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.out_proj = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, rngs=rngs)
        self.mlp = MLP(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, guidance: jax.Array | None, window: int, shift: int) -> jax.Array:
        """x [M,H,W,c]; guidance [M,H,W,g] (already normalised) or None."""
        _, h, w, _ = x.shape
        xn = self.norm1(x)
        qk_in = xn if guidance is None else jnp.concatenate([xn, guidance.astype(xn.dtype)], axis=-1)
        q, k, v = self.q_proj(qk_in), self.k_proj(qk_in), self.v_proj(xn)
        bias = None
        if shift:
            q, k, v = (jnp.roll(t, (-shift, -shift), axis=(1, 2)) for t in (q, k, v))
            bias = jnp.asarray(shifted_window_bias(h, window, shift))
        q, k, v = (window_partition(t, window) for t in (q, k, v))
        y = window_reverse(attention(q, k, v, self.num_heads, bias, self.attention, site="decoder.swin"), window, h, w)
        if shift:
            y = jnp.roll(y, (shift, shift), axis=(1, 2))
        x = x + self.out_proj(y)
        return x + self.mlp(self.norm2(x))


class SpatialEnhance(nnx.Module):
    """Two Swin blocks, the second shifted by window // 2; guidance LayerNorm'd once (CAT-Seg wrapper)."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, window: int, *, dtype,
                 attention: str = "auto", remat="none", rngs: nnx.Rngs):
        self.window = window
        self.remat = remat_name(remat)
        self.guidance_norm = (
            LayerNorm(guidance_dim, epsilon=LN_EPS, dtype=dtype, rngs=rngs) if guidance_dim else None
        )
        self.blocks = nnx.List(
            [SwinBlock(dim, guidance_dim, num_heads, dtype=dtype, attention=attention, rngs=rngs) for _ in range(2)]
        )

    def __call__(self, x: jax.Array, guidance: jax.Array | None) -> jax.Array:
        size = x.shape[1]
        if size % self.window and self.window < size:
            raise ValueError(
                f"decoder window {self.window} does not divide the {size}x{size} decoder map; "
                "set config.model.decoder.window to a divisor of the CLIP grid (image_size / patch_size)"
            )
        window = min(self.window, size)
        shift = window // 2 if window < size else 0  # Swin: no shift when one window covers the map
        if guidance is not None:
            guidance = self.guidance_norm(guidance)
        for block, block_shift in zip(self.blocks, (0, shift)):
            x = remat_call(block, lambda b, x, g, s=block_shift: b(x, g, window, s), self.remat, x, guidance)
        return x


def conv3x3(conv: nnx.Conv, x: jax.Array) -> jax.Array:
    """`conv(x)` for a bias-free 3x3 nnx.Conv with padding 1, NHWC.

    XLA:CPU hands 2-D convolutions to YNNPACK, whose 3x3 convolutions over the decoder's 16 slot maps
    ran 1.5-2x slower here than XLA's Eigen kernels (B/16 @384: 58 -> 28 ms at 96x96, 64 -> 32
    channels). YNNPACK leaves alone a convolution whose output is larger than its input
    (xla/backends/cpu/ynn_support.cc), so on CPU the forward pads one pixel more per side and crops the
    border back off: the same numbers up to float32 summation order. The gradient is the plain conv's
    (the over-padded conv's own backward made a B/16 training step 3x slower). Other backends run the
    plain conv.
    """
    if compute.platform() != "cpu":
        return conv(x)
    kernel = conv.kernel[...].astype(conv.dtype or x.dtype)
    return _conv3x3_eigen(x.astype(kernel.dtype), kernel, conv.precision)


def _conv3x3(x, kernel, precision, padding):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3x3_eigen(x, kernel, precision):
    return _conv3x3(x, kernel, precision, ((2, 2), (2, 2)))[:, 1:-1, 1:-1]


def _conv3x3_eigen_fwd(x, kernel, precision):
    return _conv3x3_eigen(x, kernel, precision), (x, kernel)


def _conv3x3_eigen_bwd(precision, residuals, grad):
    return jax.vjp(lambda x, k: _conv3x3(x, k, precision, ((1, 1), (1, 1))), *residuals)[1](grad)


_conv3x3_eigen.defvjp(_conv3x3_eigen_fwd, _conv3x3_eigen_bwd)


class BlockConvTranspose(nnx.ConvTranspose):
    """nnx.ConvTranspose whose kernel equals its strides with VALID padding (every upsampling of the decoder):
    each input pixel writes its own s x s block of the output, so the layer is one matmul [..., C] x [C, s*s*O]
    and a depth-to-space. XLA lowers a transposed convolution to a convolution over the input dilated with
    zeros, s*s times the work: compiled for an H200, the stride-4 upsampling of the shallow CLIP features
    was a 145 GFLOP cuDNN convolution for one image's 5 slide views, where the matmul is 9 GFLOP
    (docs/performance.md, "The GPU plan"). The same parameters and result: flax's transposed convolution
    applies the kernel flipped, as the einsum does (tests/test_model_decoder.py)."""

    def __call__(self, inputs):
        strides = tuple(self.strides) if self.strides is not None else None
        if (strides != tuple(self.kernel_size) or self.padding != "VALID" or self.kernel_dilation not in (None, 1)
                or self.transpose_kernel or inputs.ndim != 4):
            return super().__call__(inputs)
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = nnx.nn.dtypes.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
        y = jnp.einsum("bhwc,ijco->bhiwjo", x, kernel[::-1, ::-1], precision=self.precision)
        b, h, si, w, sj, out = y.shape
        y = y.reshape(b, h * si, w * sj, out)
        return y if bias is None else y + bias


class DoubleConv(nnx.Module):
    """(Conv3x3 without bias - GroupNorm - ReLU) x 2."""

    def __init__(self, in_dim: int, out_dim: int, *, dtype, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_dim, out_dim, (3, 3), padding=1, use_bias=False, dtype=dtype, rngs=rngs)
        self.norm1 = GroupNorm(out_dim, num_groups=group_count(out_dim), epsilon=LN_EPS, dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(out_dim, out_dim, (3, 3), padding=1, use_bias=False, dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(out_dim, num_groups=group_count(out_dim), epsilon=LN_EPS, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.norm1(conv3x3(self.conv1, x)))
        return jax.nn.relu(self.norm2(conv3x3(self.conv2, x)))


class DecoderLayer(nnx.Module):
    """One SED layer: optional spatial enhance at r, then upsampling to 2r with fusion."""

    def __init__(
        self,
        index: int,
        in_dim: int,
        out_dim: int,
        *,
        clip_width: int,
        grid: int,
        num_templates: int,
        cfg,
        num_heads: int,
        dtype,
        attention: str = "auto",
        remat="none",
        rngs: nnx.Rngs,
    ):
        self.index = index
        self.fuse_shallow = cfg.fuse_shallow
        self.fuse_attn = cfg.fuse_attn
        self.fuse_cost = cfg.fuse_cost
        self.spatial_enhance = cfg.spatial_enhance
        # Q/K guidance for the Swin pair (only built when the pair exists).
        guidance_dim = 0
        if cfg.spatial_enhance:
            if cfg.fuse_shallow:
                qk_dim = cfg.get("shallow_qk_dim", 32)
                self.shallow_qk = nnx.Conv(clip_width, qk_dim, (3, 3), padding=1, dtype=dtype, rngs=rngs)
                guidance_dim += qk_dim
            if cfg.fuse_attn:
                self.attn_proj = nnx.Linear(grid * grid, cfg.attn_dim, dtype=dtype, rngs=rngs)
                guidance_dim += cfg.attn_dim
            self.enhance = SpatialEnhance(in_dim, guidance_dim, num_heads, cfg.window, dtype=dtype,
                                          attention=attention, remat=remat, rngs=rngs)
        # Upsampling path.
        up_dim = in_dim // 2
        self.up = BlockConvTranspose(in_dim, up_dim, (2, 2), (2, 2), padding="VALID", dtype=dtype, rngs=rngs)
        fused = up_dim
        if cfg.fuse_cost:
            cost_in = num_templates if index == 0 else cfg.cost_dims[index - 1]
            self.cost_up = BlockConvTranspose(
                cost_in, cfg.cost_dims[index], (2, 2), (2, 2), padding="VALID", dtype=dtype, rngs=rngs
            )
            fused += cfg.cost_dims[index]
        if cfg.fuse_shallow:
            stride = 2 ** (index + 1)  # grid -> this layer's output resolution in one step (CAT-Seg)
            self.shallow_up = BlockConvTranspose(
                clip_width, cfg.shallow_dims[index], (stride, stride), (stride, stride), padding="VALID",
                dtype=dtype, rngs=rngs,
            )
            self.shallow_proj = nnx.Conv(
                cfg.shallow_dims[index], cfg.shallow_proj_dims[index], (3, 3), padding=1, dtype=dtype, rngs=rngs
            )
            fused += cfg.shallow_proj_dims[index]
        self.conv = DoubleConv(fused, out_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, cost_map, shallow, attn_last, num_slots):
        """x [B*K,r,r,c]; cost_map [B*K,r,r,*]: the raw cost volume (layer 0) or the previous layer's
        upsampled cost; shallow [B,g,g,W]: this layer's guidance-layer tokens; attn_last [B,N,N].
        Returns (x [B*K,2r,2r,out], the upsampled cost map for the next layer or None)."""
        size = x.shape[1]
        # [B,...] -> [B*K,...]: the slot axis is folded into the batch as index b*K + k.
        per_image = lambda t: jnp.repeat(t, num_slots, axis=0)  # noqa: E731
        if self.spatial_enhance:
            parts = []
            if self.fuse_shallow:
                parts.append(resize_bilinear(jax.nn.relu(self.shallow_qk(shallow)), size))
            if self.fuse_attn:
                b, n, _ = attn_last.shape
                grid = int(round(n**0.5))
                attn_feat = self.attn_proj(attn_last.astype(x.dtype)).reshape(b, grid, grid, -1)
                parts.append(resize_bilinear(attn_feat, size))
            guidance = per_image(jnp.concatenate(parts, axis=-1)) if parts else None
            x = self.enhance(x, guidance)
        parts = [self.up(x)]
        next_cost = None
        if self.fuse_cost:
            next_cost = jax.nn.relu(self.cost_up(cost_map))
            parts.append(next_cost)
        if self.fuse_shallow:
            parts.append(per_image(jax.nn.relu(self.shallow_proj(self.shallow_up(shallow)))))
        return self.conv(jnp.concatenate(parts, axis=-1)), next_cost


class SpatialEnhancementDecoder(nnx.Module):
    """decoder.layers in {0,1,2} SED layers and the Conv3x3 -> 1 head."""

    def __init__(
        self,
        *,
        hidden_dim: int,
        clip_width: int,
        grid: int,
        num_templates: int,
        num_heads: int,
        cfg,
        dtype=jnp.float32,
        attention: str = "auto",
        remat="none",
        rngs: nnx.Rngs,
    ):
        if cfg.layers not in (0, 1, 2):
            raise ValueError(f"config.model.decoder.layers={cfg.layers}: must be 0, 1 or 2 (Table VI-b)")
        for key in ("dims", "cost_dims", "shallow_dims", "shallow_proj_dims"):
            if len(cfg[key]) < cfg.layers:
                raise ValueError(f"config.model.decoder.{key}={tuple(cfg[key])} needs {cfg.layers} entries")
        self.num_layers = cfg.layers
        layers, dim = [], hidden_dim
        for i in range(cfg.layers):
            layers.append(
                DecoderLayer(
                    i, dim, cfg.dims[i], clip_width=clip_width, grid=grid, num_templates=num_templates, cfg=cfg,
                    num_heads=num_heads, dtype=dtype, attention=attention, remat=remat, rngs=rngs,
                )
            )
            dim = cfg.dims[i]
        self.layers = nnx.List(layers)
        self.head = nnx.Conv(dim, 1, (3, 3), padding=1, dtype=dtype, rngs=rngs)
        self.remat = remat_name(remat)

    def __call__(self, cost: jax.Array, corr: jax.Array, shallow: list[jax.Array], attn_last: jax.Array) -> jax.Array:
        """cost [B,K,g,g,d] (TGA output), corr [B,K,g,g,P], shallow: the guidance layers' tokens
        [B,g,g,W] (one per decoder layer), attn_last [B,N,N] -> logits [B,K,g*2^L,g*2^L]."""
        b, k, g = cost.shape[:3]
        x = cost.reshape(b * k, g, g, -1)
        cost_map = corr.reshape(b * k, g, g, -1)
        for i, layer in enumerate(self.layers):
            # With remat, a whole layer (convolutions and upsampling on B*K maps: the largest activations
            # at K = 171) keeps only its inputs; its Swin blocks are rematerialised inside it as well.
            x, cost_map = remat_call(layer, lambda layer, *a: layer(*a, k), self.remat, x, cost_map,
                                     shallow[i] if i < len(shallow) else None, attn_last)
        logits = self.head(x)[..., 0]
        return logits.reshape(b, k, *logits.shape[1:])
