"""The DCP head (TGA + SED) as plain torch modules, one class per flax module of dcp_jax/models.

Module and parameter names are the flax ones, so `state_dict()` keys are exactly the names of
`dcp_head.safetensors` (dcp_jax/export.py: nnx paths joined with ".", `kernel`/`scale` -> `weight`).
Where torch and flax differ:
- Layout: the flax code is channels-last (NHWC) everywhere. Activations stay NHWC here too, so the
  code reads like the flax code; `conv()` permutes to NCHW for nn.Conv2d / nn.ConvTranspose2d and back
  (a permuted contiguous NHWC tensor is channels_last in memory, which torch's CPU convs like).
- Weights: nn.Linear [out, in] and conv OIHW are the export's layouts already; ConvTranspose kernels
  were flipped by the export (flax's transpose conv does not flip, torch's does), so
  nn.ConvTranspose2d(k, stride=k, padding=0) reproduces flax's VALID ConvTranspose exactly.
- GELU: exact (erf), as `jax.nn.gelu(approximate=False)`; torch's default.
- LayerNorm / GroupNorm: eps 1e-5 as the flax modules are built (flax's own default is 1e-6);
  GroupNorm groups follow `group_count` (CAT-Seg's channels // 16, kept a divisor).
- Attention: scores / sqrt(head_dim) plus an additive float bias (-1e9 for masked slots, Swin's
  -100 across shifted-window regions), softmax in float32, as `dcp_jax.models.alignment.attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dcp_jax import config as config_lib

LN_EPS = 1e-5  # the flax head builds every LayerNorm / GroupNorm with PyTorch's default eps
NUM_TEMPLATES = {"imagenet80": 80, "single": 1}  # P per config.text.templates (dcp_jax.models.dcp)


def group_count(channels: int) -> int:
    """CAT-Seg's GroupNorm(channels // 16) groups, kept >= 1 and a divisor (decoder.group_count)."""
    groups = max(1, channels // 16)
    while channels % groups:
        groups -= 1
    return groups


def conv(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply an NCHW torch conv to an NHWC tensor (the flax layout), returning NHWC."""
    return layer(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """x * rsqrt(max(|x|^2, eps)), exactly selection.l2_normalize (not F.normalize's max(|x|, eps))."""
    return x * torch.rsqrt(torch.clamp_min((x * x).sum(dim, keepdim=True), eps))


def resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """NHWC half-pixel bilinear resize: jax.image.resize(..., "bilinear", antialias=False) is torch's
    align_corners=False (both clamp at the borders when upsampling)."""
    if x.shape[-3] == size and x.shape[-2] == size:
        return x
    y = F.interpolate(x.permute(0, 3, 1, 2), size=(size, size), mode="bilinear", align_corners=False,
                      antialias=False)
    return y.permute(0, 2, 3, 1)


def attention(q, k, v, num_heads: int, bias=None):
    """alignment.attention: q [..., Lq, d], k [..., Lk, d], v [..., Lk, dv]; `bias` broadcasts to
    [..., heads, Lq, Lk] and is added to the scaled scores. Returns [..., Lq, dv]."""
    d = q.shape[-1]
    split = lambda t: t.unflatten(-1, (num_heads, -1)).transpose(-2, -3)  # noqa: E731  [..., heads, L, dh]
    # SDPA computes softmax(q k^T * scale + bias) v (the math / flash kernels agree to float32 rounding).
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias,
                                         scale=1.0 / math.sqrt(d // num_heads))
    return out.transpose(-2, -3).flatten(-2)


class MLP(nn.Module):
    """Linear(d -> ratio*d) - exact GELU - Linear(-> d)."""

    def __init__(self, dim: int, ratio: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


# -------------------------------------------------------------------------------------------------
# Text-Guided Alignment (dcp_jax/models/alignment.py)
# -------------------------------------------------------------------------------------------------

class CrossAttentionBlock(nn.Module):
    """Visual tokens (queries) attend to slot guidance (+ the M prompt tokens); post-LN residual + MLP."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLP(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, tokens, guidance, slot_valid, prompt=None):
        """tokens [B,N,d], guidance [B,K,d], slot_valid bool [B,K], prompt [M,d] or None."""
        guidance = torch.where(slot_valid[..., None], guidance, torch.zeros_like(guidance))  # no NaN leaks
        if prompt is not None:  # never masked
            b, m = guidance.shape[0], prompt.shape[0]
            guidance = torch.cat([guidance, prompt.to(guidance.dtype).expand(b, m, -1)], dim=1)
            slot_valid = torch.cat([slot_valid, slot_valid.new_ones(b, m)], dim=1)
        bias = torch.where(slot_valid, 0.0, -1e9).to(tokens.dtype)[:, None, None, :]  # [B,1,1,K(+M)]
        attended = attention(self.q_proj(tokens), self.k_proj(guidance), self.v_proj(guidance), self.num_heads, bias)
        x = self.norm1(tokens + self.out_proj(attended))
        return self.norm2(x + self.mlp(x))


class SpatialSelfAttentionBlock(nn.Module):
    """Per slot: Q, K, V = Linear(concat(cost, visual)), attention over positions (identity when
    `attend` is false: SA off, CA on), residual onto the cost, post-LN + MLP."""

    def __init__(self, dim: int, num_heads: int, *, attend: bool = True):
        super().__init__()
        self.num_heads, self.attend = num_heads, attend
        if attend:
            self.q_proj, self.k_proj = nn.Linear(2 * dim, dim), nn.Linear(2 * dim, dim)
        self.v_proj = nn.Linear(2 * dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLP(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, cost, visual):
        """cost [B,K,N,d], visual [B,N,d] -> [B,K,N,d]."""
        x = torch.cat([cost, visual[:, None].expand_as(cost)], dim=-1)
        v = self.v_proj(x)
        attended = attention(self.q_proj(x), self.k_proj(x), v, self.num_heads) if self.attend else v
        y = self.norm1(cost + self.out_proj(attended))
        return self.norm2(y + self.mlp(y))


class TextGuidedAlignment(nn.Module):
    """Cost volume, Conv7x7 cost embedding, CA / SA branches (config.model.tga, guidance)."""

    def __init__(self, *, clip_dim: int, num_templates: int, hidden_dim: int, num_heads: int,
                 cross_attention: bool, self_attention: bool, guidance_prompt: str, prompt_tokens: int,
                 guidance_cls_logit: bool, cross_attention_width: str = "head"):
        super().__init__()
        self.cross_attention, self.self_attention = cross_attention, self_attention
        self.guidance_cls_logit = guidance_cls_logit
        self.ca_at_clip_width = cross_attention and cross_attention_width == "clip"  # CA at D, then project to d
        ca_dim = clip_dim if self.ca_at_clip_width else hidden_dim
        self.cost_embed = nn.Conv2d(num_templates, hidden_dim, 7, padding=3)
        if cross_attention or self_attention:
            self.visual_proj = nn.Conv2d(clip_dim, hidden_dim, 3, padding=1)
        if cross_attention:
            if guidance_prompt == "tokens":  # M tokens in CA's width, extra keys/values of CA
                self.prompt_tokens = nn.Parameter(torch.zeros(prompt_tokens, ca_dim))
            self.guidance_proj = nn.Linear(clip_dim + (1 if guidance_cls_logit else 0), ca_dim)
            self.cross_block = CrossAttentionBlock(ca_dim, num_heads)
        if cross_attention or self_attention:
            self.self_block = SpatialSelfAttentionBlock(hidden_dim, num_heads, attend=self_attention)

    def guidance(self, slot_guidance_text, slot_cos):
        """g_k = Linear([T_k ; c_k]) [B,K,d]."""
        parts = [slot_guidance_text]
        if self.guidance_cls_logit:
            parts.append(slot_cos[..., None].to(slot_guidance_text.dtype))
        return self.guidance_proj(torch.cat(parts, dim=-1))

    def forward(self, dense, slot_text, slot_guidance_text, slot_cos, slot_valid):
        """dense [B,g,g,D], slot_text [B,K,P,D], slot_guidance_text [B,K,D], slot_cos [B,K], slot_valid [B,K]
        -> (cost features [B,K,g,g,d], corr [B,K,g,g,P])."""
        b, gh, gw, _ = dense.shape
        k, p = slot_text.shape[1], slot_text.shape[2]
        corr = torch.einsum("bhwd,bkpd->bkhwp", l2_normalize(dense), slot_text)
        cost = conv(self.cost_embed, corr.reshape(b * k, gh, gw, p)).reshape(b, k, gh * gw, -1)
        if not (self.cross_attention or self.self_attention):
            return cost.reshape(b, k, gh, gw, -1), corr
        prompt = getattr(self, "prompt_tokens", None)
        if self.ca_at_clip_width:
            refined = self.cross_block(dense.reshape(b, gh * gw, -1), self.guidance(slot_guidance_text, slot_cos),
                                       slot_valid, prompt).reshape(dense.shape)
            visual = F.relu(conv(self.visual_proj, refined)).reshape(b, gh * gw, -1)
        else:
            visual = F.relu(conv(self.visual_proj, dense)).reshape(b, gh * gw, -1)
            if self.cross_attention:
                visual = self.cross_block(visual, self.guidance(slot_guidance_text, slot_cos), slot_valid, prompt)
        cost = self.self_block(cost, visual)
        return cost.reshape(b, k, gh, gw, -1), corr


# -------------------------------------------------------------------------------------------------
# Spatial Enhancement Decoder (dcp_jax/models/decoder.py)
# -------------------------------------------------------------------------------------------------

def window_partition(x, window: int):
    """[M,H,W,C] -> [M, nW, window*window, C]."""
    m, h, w, c = x.shape
    x = x.reshape(m, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(m, (h // window) * (w // window), window * window, c)


def window_reverse(x, window: int, h: int, w: int):
    """[M, nW, window*window, C] -> [M,H,W,C]."""
    m, c = x.shape[0], x.shape[-1]
    x = x.reshape(m, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(m, h, w, c)


def shifted_window_bias(size: int, window: int, shift: int, device=None):
    """Swin's mask for the cyclically shifted map: [nW, 1, T, T], -100 between different regions."""
    region = torch.zeros(1, size, size, 1, device=device)
    count = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            region[:, hs, ws, :] = count
            count += 1
    ids = window_partition(region, window)[0, :, :, 0]  # [nW, T]
    return torch.where(ids[:, None, :] != ids[:, :, None], -100.0, 0.0)[:, None]


class SwinBlock(nn.Module):
    """Pre-LN window attention, Q/K from concat(LN(x), guidance), V from LN(x), no rel-pos bias; MLP."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.q_proj = nn.Linear(dim + guidance_dim, dim)
        self.k_proj = nn.Linear(dim + guidance_dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLP(dim)

    def forward(self, x, guidance, window: int, shift: int):
        """x [M,H,W,c]; guidance [M,H,W,g] (already normalised) or None."""
        _, h, w, _ = x.shape
        xn = self.norm1(x)
        qk_in = xn if guidance is None else torch.cat([xn, guidance.to(xn.dtype)], dim=-1)
        q, k, v = self.q_proj(qk_in), self.k_proj(qk_in), self.v_proj(xn)
        bias = None
        if shift:
            q, k, v = (torch.roll(t, (-shift, -shift), dims=(1, 2)) for t in (q, k, v))
            bias = shifted_window_bias(h, window, shift, device=x.device).to(x.dtype)
        q, k, v = (window_partition(t, window) for t in (q, k, v))
        y = window_reverse(attention(q, k, v, self.num_heads, bias), window, h, w)
        if shift:
            y = torch.roll(y, (shift, shift), dims=(1, 2))
        x = x + self.out_proj(y)
        return x + self.mlp(self.norm2(x))


class SpatialEnhance(nn.Module):
    """Two Swin blocks, the second shifted by window // 2; the guidance LayerNorm'd once."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, window: int):
        super().__init__()
        self.window = window
        self.guidance_norm = nn.LayerNorm(guidance_dim, eps=LN_EPS) if guidance_dim else None
        self.blocks = nn.ModuleList([SwinBlock(dim, guidance_dim, num_heads) for _ in range(2)])

    def forward(self, x, guidance):
        size = x.shape[1]
        if size % self.window and self.window < size:
            raise ValueError(f"decoder window {self.window} does not divide the {size}x{size} decoder map")
        window = min(self.window, size)
        shift = window // 2 if window < size else 0  # no shift when one window covers the map
        if guidance is not None:
            guidance = self.guidance_norm(guidance)
        x = self.blocks[0](x, guidance, window, 0)
        return self.blocks[1](x, guidance, window, shift)


class DoubleConv(nn.Module):
    """(Conv3x3 without bias - GroupNorm - ReLU) x 2, NHWC in and out."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(group_count(out_dim), out_dim, eps=LN_EPS)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(group_count(out_dim), out_dim, eps=LN_EPS)

    def forward(self, x):
        x = x.permute(0, 3, 1, 2)  # GroupNorm wants channels at dim 1
        x = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(x))).permute(0, 2, 3, 1)


class DecoderLayer(nn.Module):
    """One SED layer: optional spatial enhance at r, then upsampling to 2r with fusion."""

    def __init__(self, index: int, in_dim: int, out_dim: int, *, clip_width: int, grid: int,
                 num_templates: int, cfg, num_heads: int):
        super().__init__()
        self.fuse_shallow, self.fuse_attn = bool(cfg.fuse_shallow), bool(cfg.fuse_attn)
        self.fuse_cost, self.spatial_enhance = bool(cfg.fuse_cost), bool(cfg.spatial_enhance)
        guidance_dim = 0
        if self.spatial_enhance:
            if self.fuse_shallow:
                qk_dim = cfg.get("shallow_qk_dim", 32)
                self.shallow_qk = nn.Conv2d(clip_width, qk_dim, 3, padding=1)
                guidance_dim += qk_dim
            if self.fuse_attn:
                self.attn_proj = nn.Linear(grid * grid, cfg.attn_dim)
                guidance_dim += cfg.attn_dim
            self.enhance = SpatialEnhance(in_dim, guidance_dim, num_heads, cfg.window)
        up_dim = in_dim // 2
        self.up = nn.ConvTranspose2d(in_dim, up_dim, 2, stride=2)
        fused = up_dim
        if self.fuse_cost:
            cost_in = num_templates if index == 0 else cfg.cost_dims[index - 1]
            self.cost_up = nn.ConvTranspose2d(cost_in, cfg.cost_dims[index], 2, stride=2)
            fused += cfg.cost_dims[index]
        if self.fuse_shallow:
            stride = 2 ** (index + 1)  # the CLIP grid -> this layer's output resolution in one step
            self.shallow_up = nn.ConvTranspose2d(clip_width, cfg.shallow_dims[index], stride, stride=stride)
            self.shallow_proj = nn.Conv2d(cfg.shallow_dims[index], cfg.shallow_proj_dims[index], 3, padding=1)
            fused += cfg.shallow_proj_dims[index]
        self.conv = DoubleConv(fused, out_dim)

    def forward(self, x, cost_map, shallow, attn_last, num_slots: int):
        """x [B*K,r,r,c], cost_map [B*K,r,r,*] or None, shallow [B,g,g,W], attn_last [B,N,N]
        -> (x [B*K,2r,2r,out], the upsampled cost map or None)."""
        size = x.shape[1]
        per_image = lambda t: t.repeat_interleave(num_slots, dim=0)  # noqa: E731  [B,...] -> [B*K,...], b*K + k
        if self.spatial_enhance:
            parts = []
            if self.fuse_shallow:
                parts.append(resize_bilinear(F.relu(conv(self.shallow_qk, shallow)), size))
            if self.fuse_attn:
                b, n, _ = attn_last.shape
                grid = int(round(n ** 0.5))
                parts.append(resize_bilinear(self.attn_proj(attn_last).reshape(b, grid, grid, -1), size))
            guidance = per_image(torch.cat(parts, dim=-1)) if parts else None
            x = self.enhance(x, guidance)
        parts = [conv(self.up, x)]
        next_cost = None
        if self.fuse_cost:
            next_cost = F.relu(conv(self.cost_up, cost_map))
            parts.append(next_cost)
        if self.fuse_shallow:
            parts.append(per_image(F.relu(conv(self.shallow_proj, conv(self.shallow_up, shallow)))))
        return self.conv(torch.cat(parts, dim=-1)), next_cost


class SpatialEnhancementDecoder(nn.Module):
    """decoder.layers in {0,1,2} SED layers and the Conv3x3 -> 1 head."""

    def __init__(self, *, hidden_dim: int, clip_width: int, grid: int, num_templates: int, num_heads: int, cfg):
        super().__init__()
        if cfg.layers not in (0, 1, 2):
            raise ValueError(f"config.model.decoder.layers={cfg.layers}: must be 0, 1 or 2")
        layers, dim = [], hidden_dim
        for i in range(cfg.layers):
            layers.append(DecoderLayer(i, dim, cfg.dims[i], clip_width=clip_width, grid=grid,
                                       num_templates=num_templates, cfg=cfg, num_heads=num_heads))
            dim = cfg.dims[i]
        self.layers = nn.ModuleList(layers)
        self.head = nn.Conv2d(dim, 1, 3, padding=1)

    def forward(self, cost, corr, shallow, attn_last):
        """cost [B,K,g,g,d], corr [B,K,g,g,P], shallow: [B,g,g,W] per decoder layer, attn_last [B,N,N]
        -> logits [B,K,g*2^L,g*2^L]."""
        b, k, g = cost.shape[:3]
        x = cost.reshape(b * k, g, g, -1)
        cost_map = corr.reshape(b * k, g, g, -1)
        for i, layer in enumerate(self.layers):
            x, cost_map = layer(x, cost_map, shallow[i] if i < len(shallow) else None, attn_last, k)
        logits = conv(self.head, x)[..., 0]
        return logits.reshape(b, k, *logits.shape[1:])


# -------------------------------------------------------------------------------------------------
# Everything that is not CLIP (dcp_jax/models/dcp.py's non-clip attributes)
# -------------------------------------------------------------------------------------------------

class FrozenTextQV(nn.Module):
    """The pretrained text q/v, kept frozen (clip.text_finetune): the template embeddings' tower."""

    def __init__(self, width: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict(dict(q_proj=nn.Linear(width, width), v_proj=nn.Linear(width, width)))
                                     for _ in range(num_layers)])


class DCPHead(nn.Module):
    """Every DCP-CLIP parameter outside CLIP; `state_dict()` names = the export's head tensor names."""

    def __init__(self, config, *, clip_dim: int, vision_width: int, grid: int, text_width: int, text_layers: int):
        super().__init__()
        m = config.model
        if config.text.templates not in NUM_TEMPLATES:
            raise ValueError(f"config.text.templates={config.text.templates!r}: expected one of "
                             f"{sorted(NUM_TEMPLATES)}")
        if m.guidance.prompt not in ("tokens", "context", "none"):
            raise ValueError(f"config.model.guidance.prompt={m.guidance.prompt!r}: expected tokens, context or none")
        self.num_templates = NUM_TEMPLATES[config.text.templates]
        if config_lib.text_finetune(config) != "none":
            self.frozen_text_qv = FrozenTextQV(text_width, text_layers)
        if m.guidance.prompt == "context":  # CoOp context vectors in the text tower's token space
            self.text_context = nn.Parameter(torch.zeros(m.guidance.prompt_tokens, text_width))
        self.alignment = TextGuidedAlignment(
            clip_dim=clip_dim, num_templates=self.num_templates, hidden_dim=m.hidden_dim, num_heads=m.num_heads,
            cross_attention=bool(m.tga.cross_attention), self_attention=bool(m.tga.self_attention),
            guidance_prompt=m.guidance.prompt, prompt_tokens=m.guidance.prompt_tokens,
            guidance_cls_logit=bool(m.guidance.cls_logit),
            cross_attention_width=m.tga.get("cross_attention_width", "head"))
        self.decoder = SpatialEnhancementDecoder(hidden_dim=m.hidden_dim, clip_width=vision_width, grid=grid,
                                                 num_templates=self.num_templates, num_heads=m.num_heads,
                                                 cfg=m.decoder)
