"""TorchDCP: the exported DCP-CLIP in PyTorch (transformers' CLIPModel + the head of head.py).

Built from an export directory alone (`load_reference(DIR)`): DIR/config.json (the run config),
DIR/clip (a transformers CLIPModel at the trained resolution) and DIR/dcp_head.safetensors. No JAX
is imported here. The stages mirror `dcp_jax.models.dcp.DCPCLIP`:
  encode    images [B,S,S,3] RGB 0..255 -> cls [B,D], dense [B,g,g,D], shallow [[B,g,g,W]], attn_last [B,N,N]
  select    DCS (selection.select_categories / rank_slots)
  decode    TGA + SED -> logits [B,K,h,w]
  validate  tag validation
and `forward` chains them like the compiled inference path (dcp_jax/forward.py, one view per image).

The CLIP features are computed from the HF model's own submodules (embeddings, layer norms,
q/k/v/out projections, MLPs) rather than its forward: we need per-block tokens, the last block's
attention probabilities and CAT-Seg's value path, which no transformers forward returns in a way
that is stable across transformers 4.x / 5.x.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcp_jax import config as config_lib
from dcp_jax.torch_ref.head import DCPHead, l2_normalize

CLIP_DIR, HEAD_FILE, CONFIG_FILE = "clip", "dcp_head.safetensors", "config.json"  # dcp_jax.export's names
# OpenAI CLIP's pixel statistics (dcp_jax.models.clip.PIXEL_MEAN / PIXEL_STD), RGB in 0..1.
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
LEVEL_GT, LEVEL_IMAGE, LEVEL_PATCH, LEVEL_NONE = 3, 2, 1, 0  # DCS priorities (selection.py)
MIN_BUCKET = 4  # forward.MIN_BUCKET


class ExportMismatchError(ValueError):
    """The head file does not match the head the config describes."""


# -------------------------------------------------------------------------------------------------
# Small functions shared with the JAX side (selection.py, forward.py)
# -------------------------------------------------------------------------------------------------

def mean_text_embedding(text_embeds: torch.Tensor) -> torch.Tensor:
    """T_bar [C,D] = normalise(mean over the P templates of T [C,P,D])."""
    return l2_normalize(text_embeds.mean(dim=-2))


def resolve_num_slots(num_slots: int, num_classes: int) -> int:
    """K actually used: 0 (or anything >= C) means one slot per class."""
    if num_slots < 0:
        raise ValueError(f"num_slots={num_slots}: must be >= 0 (0 means one slot per class)")
    return num_classes if num_slots == 0 or num_slots >= num_classes else num_slots


def slot_bucket(count: int, cap: int) -> int:
    """The smallest power of two >= max(count, 4), at most `cap` (forward.slot_bucket)."""
    k = MIN_BUCKET
    while k < count:
        k *= 2
    return max(1, min(k, int(cap)))


def selection_levels(cls, dense, text_bar, logit_scale, *, theta: float, gt_present=None):
    """(level int [B,C], p_img [B,C], votes int [B,C]); see selection.selection_levels. dense [B,N,D]."""
    s = torch.exp(logit_scale.float())
    p_img = torch.softmax(s * l2_normalize(cls.float()) @ text_bar.float().T, dim=-1)
    p_patch = torch.softmax(s * torch.einsum("bnd,cd->bnc", l2_normalize(dense.float()), text_bar.float()), dim=-1)
    winner = torch.argmax(p_patch * (1.0 - p_img)[:, None, :], dim=-1)  # [B,N]: dominant classes damped
    votes = torch.zeros(p_img.shape, dtype=torch.int64, device=p_img.device).scatter_add_(
        1, winner, torch.ones_like(winner))
    by_patch = votes > 0
    by_image = (p_img > theta) | (theta <= 0)
    level = torch.where(by_patch, LEVEL_PATCH, LEVEL_NONE)
    level = torch.where(by_image, LEVEL_IMAGE, level)
    if gt_present is not None:
        level = torch.where(torch.as_tensor(gt_present, device=level.device), LEVEL_GT, level)
    return level, p_img, votes


def rank_slots(level, p_img, num_slots: int, votes=None) -> dict:
    """Selected classes ranked into K slots by (level, votes, p_img) descending, ties by class index."""
    k = resolve_num_slots(num_slots, level.shape[-1])
    # Lexicographic order by stable sorts, the last key first: p_img, then votes, then level.
    order = torch.sort(-p_img, dim=-1, stable=True).indices
    if votes is not None:
        order = order.gather(-1, torch.sort(-votes.gather(-1, order), dim=-1, stable=True).indices)
    order = order.gather(-1, torch.sort(-level.gather(-1, order), dim=-1, stable=True).indices)
    slot_class = order[:, :k]
    num_selected = (level > LEVEL_NONE).sum(-1)
    return {"slot_class": slot_class, "slot_valid": level.gather(-1, slot_class) > LEVEL_NONE,
            "dcs_selected": num_selected, "dcs_dropped": torch.clamp_min(num_selected - k, 0)}


def validate_tags(logits, slot_class, slot_valid, dense, text_bar, seen, *, k: int):
    """tag_validation.validate_tags: (new slot_class [B,K], relabelled [B,K])."""
    b, num_slots, h, w = logits.shape
    grid = dense.shape[1]
    masked = torch.where(slot_valid[:, :, None, None], logits.float(), -math.inf)
    winner = F.one_hot(masked.argmax(dim=1), num_slots).float()  # [B,h,w,K]
    weights = winner.reshape(b, grid, h // grid, grid, w // grid, num_slots).mean(dim=(2, 4))  # [B,g,g,K]
    wins_any = weights.sum(dim=(1, 2)) > 0
    pooled = torch.einsum("bhwk,bhwd->bkd", weights, l2_normalize(dense.float()))
    sims = l2_normalize(pooled) @ text_bar.float().T  # [B,K,C]
    own = sims.gather(-1, slot_class[..., None])
    in_top_k = (sims > own).sum(-1) < k
    relabel = slot_valid & wins_any & ~seen[slot_class] & ~in_top_k
    return torch.where(relabel, sims.argmax(-1), slot_class), relabel


# -------------------------------------------------------------------------------------------------
# CLIP blocks from the HF submodules
# -------------------------------------------------------------------------------------------------

def _heads(x, num_heads):
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)  # [B,T,W] -> [B,heads,T,dh]


def clip_block(layer, x, mask=None, *, return_probs: bool = False, q_proj=None, v_proj=None):
    """One pre-LN CLIP encoder layer (HF CLIPEncoderLayer) from its submodules: x + attn(ln1(x)),
    then x + mlp(ln2(x)). mask: bool, True = attend. q_proj / v_proj replace the layer's own (the
    frozen text q/v). Returns x, or (x, probs [B,heads,T,T]) with `return_probs`."""
    attn = layer.self_attn
    y = layer.layer_norm1(x)
    q_proj = attn.q_proj if q_proj is None else q_proj
    v_proj = attn.v_proj if v_proj is None else v_proj
    heads = attn.num_heads
    q, k, v = (_heads(p(y), heads) for p in (q_proj, attn.k_proj, v_proj))
    scale = (x.shape[-1] // heads) ** -0.5  # HF and flax: head_dim ** -0.5
    if return_probs:  # explicit softmax: the caller needs the probabilities
        probs = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
        out = probs @ v
    else:
        probs, out = None, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    x = x + attn.out_proj(out.transpose(1, 2).flatten(2))
    x = x + layer.mlp(layer.layer_norm2(x))
    return (x, probs) if return_probs else x


def dense_value_path(layer, x):
    """CAT-Seg's last-block dense path: v only (out_proj(v_proj)), residual = the CLS input for all tokens."""
    attn = layer.self_attn
    v = attn.out_proj(attn.v_proj(layer.layer_norm1(x))) + x[:, :1]
    return v + layer.mlp(layer.layer_norm2(v))


# -------------------------------------------------------------------------------------------------
# The model
# -------------------------------------------------------------------------------------------------

class TorchDCP(nn.Module):
    """DCP-CLIP in PyTorch: `clip` a transformers CLIPModel, `head` the DCPHead (all non-CLIP weights)."""

    def __init__(self, config: ml_collections.ConfigDict, clip: nn.Module):
        super().__init__()
        vc, tc = clip.config.vision_config, clip.config.text_config
        if int(vc.image_size) != int(config.clip.image_size):
            raise ExportMismatchError(
                f"the CLIP runs at {vc.image_size} px but config.clip.image_size={config.clip.image_size}; "
                "the export and the config do not belong together")
        self.config = config
        self.clip = clip
        self.image_size = int(config.clip.image_size)
        self.grid = self.image_size // int(vc.patch_size)
        self.guidance_layers = tuple(int(i) for i in config.clip.guidance_layers)
        self.dense_mode = str(config.clip.dense_mode)
        if self.dense_mode not in ("catseg", "plain"):
            raise ValueError(f"config.clip.dense_mode={self.dense_mode!r}: expected 'catseg' or 'plain'")
        self.theta = float(config.model.dcs.theta)
        self.tv_enabled, self.tv_k = bool(config.model.tv.enabled), int(config.model.tv.k)
        self.reencodes_text = (config.model.guidance.prompt == "context"
                               or config_lib.text_finetune(config) != "none")
        self.head = DCPHead(config, clip_dim=int(clip.config.projection_dim), vision_width=int(vc.hidden_size),
                            grid=self.grid, text_width=int(tc.hidden_size), text_layers=int(tc.num_hidden_layers))
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD), persistent=False)

    def _tensor(self, x, dtype=torch.float32):
        """An input (tensor, numpy or JAX array) as a tensor on this model's device."""
        if torch.is_tensor(x):
            return x.to(device=self.pixel_mean.device, dtype=dtype)
        return torch.tensor(np.asarray(x), dtype=dtype, device=self.pixel_mean.device)  # a copy: JAX's are read-only

    # ---------------------------------------------------------------- image features
    def preprocess(self, images) -> torch.Tensor:
        """[B,H,W,3] RGB 0..255 -> CLIP-normalised NCHW [B,3,R,R] (bilinear, align_corners=False, no
        antialias: DCPCLIP.preprocess / CAT-Seg's F.interpolate)."""
        x = (self._tensor(images) / 255.0 - self.pixel_mean) / self.pixel_std
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"images must be [B,H,W,3] RGB in 0..255; got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2)  # HF's patch conv is NCHW
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=False)
        return x

    def encode(self, images) -> dict:
        """CLIPModel.encode_image + DCPCLIP.encode: cls [B,D] (un-normalised), dense [B,g,g,D],
        shallow (one [B,g,g,W] per guidance layer), attn_last [B,N,N] (heads averaged, patch-to-patch)."""
        vm = self.clip.vision_model
        x = vm.pre_layrnorm(vm.embeddings(self.preprocess(images)))  # position table at the trained size
        b, g = x.shape[0], self.grid
        blocks = vm.encoder.layers
        tokens = {}
        for i, layer in enumerate(blocks[:-1]):
            x = clip_block(layer, x)
            tokens[i] = x
        out, probs = clip_block(blocks[-1], x, return_probs=True)
        tokens[len(blocks) - 1] = out
        dense_tokens = dense_value_path(blocks[-1], x) if self.dense_mode == "catseg" else out
        project = lambda t: self.clip.visual_projection(vm.post_layernorm(t))  # noqa: E731
        return {
            "cls": project(out[:, 0]),
            "dense": project(dense_tokens[:, 1:]).reshape(b, g, g, -1),
            "shallow": [tokens[i][:, 1:].reshape(b, g, g, -1) for i in self.guidance_layers],
            "attn_last": probs.mean(dim=1)[:, 1:, 1:],
        }

    # ---------------------------------------------------------------- text
    def text_features(self, input_ids, attention_mask=None, *, context=None, frozen: bool = False) -> torch.Tensor:
        """Projected, un-normalised text embeddings [R,D] (CLIPModel.get_text_features).

        context [M,W]: learnt token embeddings replacing positions 1..M (after the start token).
        frozen: use the frozen pretrained text q/v (`frozen_text_qv`, clip.text_finetune): the tower of
        the cached template embeddings (DCPCLIP.frozen_text_clip); the CLIP's own tower otherwise."""
        tm = self.clip.text_model
        ids = self._tensor(input_ids, torch.long)
        t = ids.shape[-1]
        x = tm.embeddings.token_embedding(ids)
        if context is not None:
            m = context.shape[0]
            x = torch.cat([x[:, :1], context.to(x.dtype).expand(x.shape[0], m, -1), x[:, 1 + m:]], dim=1)
        x = x + tm.embeddings.position_embedding.weight[:t]
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None, None]
        if attention_mask is not None:
            mask = mask & (self._tensor(attention_mask, torch.long) > 0)[:, None, None, :]
        frozen_qv = self.head.frozen_text_qv.layers if frozen and hasattr(self.head, "frozen_text_qv") else None
        for i, layer in enumerate(tm.encoder.layers):
            q_proj, v_proj = (frozen_qv[i]["q_proj"], frozen_qv[i]["v_proj"]) if frozen_qv is not None else (None, None)
            x = clip_block(layer, x, mask, q_proj=q_proj, v_proj=v_proj)
        x = tm.final_layer_norm(x)
        eos = self.clip.config.text_config.eos_token_id
        # EOT pooling: argmax(ids) for legacy configs (eos_token_id == 2), else the first eos position.
        pos = ids.argmax(-1) if eos == 2 else (ids == eos).int().argmax(-1)
        return self.clip.text_projection(x[torch.arange(x.shape[0], device=x.device), pos])

    def guidance_text(self, input_ids, attention_mask) -> torch.Tensor:
        """DCPCLIP.encode_guidance_text: unit embeddings [R,D] of tokenized single-template prompts
        (dcp_jax.text.guidance_tokens), with the learnt context when guidance.prompt == "context"."""
        context = getattr(self.head, "text_context", None)
        return l2_normalize(self.text_features(input_ids, attention_mask, context=context))

    # ---------------------------------------------------------------- stages
    def select(self, features, text_bar, *, num_slots: int, gt_present=None) -> dict:
        """DCS (selection.select_categories): slot_class [B,K], slot_valid, dcs_selected/dropped, p_img."""
        b, g = features["dense"].shape[:2]
        level, p_img, votes = selection_levels(features["cls"], features["dense"].reshape(b, g * g, -1), text_bar,
                                               self.clip.logit_scale, theta=self.theta, gt_present=gt_present)
        return {**rank_slots(level, p_img, num_slots, votes), "p_img": p_img, "selected": level > LEVEL_NONE}

    def decode(self, features, text_embeds, slot_class, slot_valid, guidance_text) -> torch.Tensor:
        """DCPCLIP.decode: TGA + SED on K slots -> logits [B,K,h,w]. text_embeds T [C,P,D], slot_class
        int [B,K], slot_valid bool [B,K], guidance_text [C,D]."""
        text_embeds = self._tensor(text_embeds)
        slot_class = self._tensor(slot_class, torch.long)
        slot_valid = self._tensor(slot_valid, torch.bool)
        guidance_text = self._tensor(guidance_text)
        features = {k: [self._tensor(s) for s in v] if k == "shallow" else self._tensor(v) for k, v in features.items()}
        text_bar = mean_text_embedding(text_embeds)
        slot_cos = torch.einsum("bd,bkd->bk", l2_normalize(features["cls"]), text_bar[slot_class])
        cost, corr = self.head.alignment(features["dense"], text_embeds[slot_class], guidance_text[slot_class],
                                         slot_cos, slot_valid)
        return self.head.decoder(cost, corr, features["shallow"], features["attn_last"])

    def validate(self, logits, slot_class, slot_valid, features, text_bar, seen):
        """Tag validation (a no-op when model.tv.enabled is false): (slot_class [B,K], relabelled [B,K])."""
        if not self.tv_enabled:
            return slot_class, torch.zeros_like(slot_valid)
        return validate_tags(logits, slot_class, slot_valid, features["dense"], text_bar,
                             self._tensor(seen, torch.bool), k=self.tv_k)

    def forward(self, images, text_embeds, guidance_text=None, seen=None, *, max_slots: int | None = None,
                bucket: bool = True) -> dict:
        """The inference forward of one view per image (forward.encode_select + forward.decode).

        images [B,S,S,3] RGB 0..255; text_embeds T [C,P,D] (cached template embeddings); guidance_text
        [C,D] (default T_bar; required when the config re-encodes the guidance text: `guidance_text()`);
        seen [C] bool (tag validation; None skips it). max_slots: the bucket cap (default
        config.eval.num_slots; 0 = C). bucket: K = slot_bucket(largest selected count, cap) as the
        compiled path does; False: K = cap.
        Returns logits [B,K,h,w], slot_class (after TV), slot_valid, slot_class_dcs, tv_relabelled,
        dcs_selected, p_img.
        """
        text_embeds = self._tensor(text_embeds)
        text_bar = mean_text_embedding(text_embeds)
        if guidance_text is None:
            if self.reencodes_text:
                raise ValueError("this config re-encodes the guidance text (guidance.prompt=context or "
                                 "clip.text_finetune): pass guidance_text=reference.guidance_text(ids, mask)")
            guidance_text = text_bar
        cap = resolve_num_slots(int(self.config.eval.num_slots if max_slots is None else max_slots), text_bar.shape[0])
        features = self.encode(images)
        dcs = self.select(features, text_bar, num_slots=cap)
        k = slot_bucket(int(dcs["dcs_selected"].max()), cap) if bucket else cap
        slot_class, slot_valid = dcs["slot_class"][:, :k], dcs["slot_valid"][:, :k]
        logits = self.decode(features, text_embeds, slot_class, slot_valid, guidance_text)
        final, relabelled = slot_class, torch.zeros_like(slot_valid)
        if seen is not None:
            final, relabelled = self.validate(logits, slot_class, slot_valid, features, text_bar, seen)
        return {"logits": logits, "slot_class": final, "slot_valid": slot_valid, "slot_class_dcs": slot_class,
                "tv_relabelled": relabelled, "dcs_selected": dcs["dcs_selected"], "p_img": dcs["p_img"]}


# -------------------------------------------------------------------------------------------------
# Loading
# -------------------------------------------------------------------------------------------------

def _tuples(obj):  # JSON lists back to the config's tuples (checkpoint.load_config does the same)
    if isinstance(obj, dict):
        return {k: _tuples(v) for k, v in obj.items()}
    return tuple(_tuples(v) for v in obj) if isinstance(obj, list) else obj


def load_config(export_dir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The run config of an export (DIR/config.json), as dcp_jax.checkpoint.load_config reads it."""
    path = Path(export_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: {export_dir} is not a dcp_jax export (python -m dcp_jax.export)")
    return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))


def check_head_tensors(expected: dict, given: dict, where: str) -> None:
    """Strict name and shape check (load_state_dict(strict=True) plus shapes, with a readable error)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(f"{n} {tuple(given[n].shape)} vs {tuple(expected[n].shape)} expected"
                   for n in set(expected) & set(given) if tuple(given[n].shape) != tuple(expected[n].shape))
    problems = [f"{what} ({len(names)}): {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
                for what, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names]
    if problems:
        raise ExportMismatchError(f"{where} does not match the DCP head the config describes: {'; '.join(problems)}. "
                                  "The export and the config do not belong together")


def load_reference(export_dir: str | os.PathLike, config: ml_collections.ConfigDict | None = None, *,
                   device: str | torch.device = "cpu") -> TorchDCP:
    """The PyTorch reference of an export directory (float32, eval mode). `config`: the run config
    (default DIR/config.json). Strict: every head tensor must be there with its shape, and no other."""
    from safetensors.torch import load_file
    from transformers import CLIPModel

    export_dir = Path(export_dir)
    for need in (CLIP_DIR, HEAD_FILE):
        if not (export_dir / need).exists():
            raise FileNotFoundError(f"{export_dir / need} missing: {export_dir} is not a dcp_jax export "
                                    "(python -m dcp_jax.export writes it)")
    config = load_config(export_dir) if config is None else config
    clip = CLIPModel.from_pretrained(str(export_dir / CLIP_DIR)).float().eval()
    model = TorchDCP(config, clip)
    tensors = load_file(str(export_dir / HEAD_FILE))
    check_head_tensors(model.head.state_dict(), tensors, str(export_dir / HEAD_FILE))
    model.head.load_state_dict(tensors, strict=True)
    return model.to(device).eval()
