"""Text-Guided Alignment, TGA (MODEL.md section 3).

Cost volume between the dense CLIP features and the K slot classes' P template embeddings, a 7x7
conv per slot (P -> d), then two attention branches:
- cross-attention (CA): visual tokens attend to the K slots' textual guidance (invalid slots masked)
  and, with `guidance.prompt = "tokens"`, to M learnable guidance tokens that are never masked, so a
  patch can attend to "none of these classes" (a prompt that is not a constant: it is a key/value of
  its own, where a vector concatenated to every slot's input would only add a bias);
- self-attention (SA): per slot, attention over the grid positions of concat(cost feature, refined
  visual feature), added back onto the cost feature.
Invalid slots never reach a valid one: CA masks them (and zeroes their guidance so even NaN garbage
cannot leak through 0 * NaN); everything else is computed per slot.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx

from dcp_jax.models.selection import l2_normalize
from dcp_jax.models.compute import LayerNorm, multi_head_attention, remat_call, remat_name

LN_EPS = 1e-5  # PyTorch's LayerNorm / GroupNorm default, so exported weights behave the same
CA_WIDTHS = ("head", "clip")  # config.model.tga.cross_attention_width
PROMPTS = ("tokens", "context", "none")  # config.model.guidance.prompt (Table V)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, bias: jax.Array | None = None,
              impl: str = "auto", site: str = "attention") -> jax.Array:
    """Multi-head scaled dot-product attention on projected inputs.

    q [..., Lq, d], k [..., Lk, d], v [..., Lk, dv]; `bias` broadcasts to [..., heads, Lq, Lk] and is
    added to the float32 scores (use a large negative value to mask); `impl`: compute.ATTENTION_IMPLS;
    `site`: the name compute.attention_path records. Returns [..., Lq, dv].
    """
    d, dv = q.shape[-1], v.shape[-1]
    if d % num_heads or dv % num_heads:
        raise ValueError(f"attention width {d}/{dv} is not divisible by num_heads={num_heads}")
    split = lambda x: x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)  # noqa: E731
    out, _ = multi_head_attention(split(q), split(k), split(v), bias=bias, impl=impl, site=site)
    return out.reshape(*out.shape[:-2], dv)


class MLP(nnx.Module):
    """Linear(d -> ratio*d) - GELU - Linear(-> d)."""

    def __init__(self, dim: int, ratio: int = 4, *, dtype, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, ratio * dim, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(ratio * dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class CrossAttentionBlock(nnx.Module):
    """Visual tokens (queries) attend to slot guidance (keys/values); post-LN residual + MLP."""

    def __init__(self, dim: int, num_heads: int, *, dtype, attention: str = "auto", rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.attention = attention
        self.q_proj = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.k_proj = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.v_proj = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.out_proj = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.norm1 = LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, rngs=rngs)
        self.mlp = MLP(dim, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array, guidance: jax.Array, slot_valid: jax.Array,
                 prompt: jax.Array | None = None) -> jax.Array:
        """tokens [B,N,d], guidance [B,K,d], slot_valid [B,K], prompt [M,d] (always attended) ->
        refined tokens [B,N,d]."""
        guidance = jnp.where(slot_valid[..., None], guidance, 0)
        if prompt is not None:
            b, m = guidance.shape[0], prompt.shape[0]
            guidance = jnp.concatenate([guidance, jnp.broadcast_to(prompt.astype(guidance.dtype),
                                                                   (b, m, prompt.shape[1]))], axis=1)
            slot_valid = jnp.concatenate([slot_valid, jnp.ones((b, m), bool)], axis=1)
        bias = jnp.where(slot_valid, 0.0, -1e9).astype(jnp.float32)[:, None, None, :]  # [B,1,1,K(+M)]
        attended = attention(self.q_proj(tokens), self.k_proj(guidance), self.v_proj(guidance), self.num_heads, bias,
                             self.attention, site="tga.cross")
        x = self.norm1(tokens + self.out_proj(attended))
        return self.norm2(x + self.mlp(x))


class SpatialSelfAttentionBlock(nnx.Module):
    """Per slot: Q, K, V = Linear(concat(cost, visual)) (2d -> d), attention over grid positions,
    residual onto the cost feature, post-LN + MLP.

    With `attend=False` the attention matrix is the identity (each position keeps its own value):
    the same concat-and-project fusion without spatial mixing. DCP uses it when SA is switched off
    but CA is on, so the refined visual features still reach the cost features (Table IV, "CA only").
    """

    def __init__(self, dim: int, num_heads: int, *, attend: bool = True, dtype, attention: str = "auto",
                 rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.attend = attend
        self.attention = attention
        if attend:
            self.q_proj = nnx.Linear(2 * dim, dim, dtype=dtype, rngs=rngs)
            self.k_proj = nnx.Linear(2 * dim, dim, dtype=dtype, rngs=rngs)
        self.v_proj = nnx.Linear(2 * dim, dim, dtype=dtype, rngs=rngs)
        self.out_proj = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.norm1 = LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, rngs=rngs)
        self.mlp = MLP(dim, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, rngs=rngs)

    def __call__(self, cost: jax.Array, visual: jax.Array) -> jax.Array:
        """cost [B,K,N,d], visual [B,N,d] -> refined cost [B,K,N,d]."""
        x = jnp.concatenate([cost, jnp.broadcast_to(visual[:, None], cost.shape)], axis=-1)
        v = self.v_proj(x)
        attended = (attention(self.q_proj(x), self.k_proj(x), v, self.num_heads, impl=self.attention, site="tga.self")
                    if self.attend else v)
        y = self.norm1(cost + self.out_proj(attended))
        return self.norm2(y + self.mlp(y))


class TextGuidedAlignment(nnx.Module):
    """Cost volume + conv embedding + CA / SA branches (each switchable, Table IV / V)."""

    def __init__(
        self,
        *,
        clip_dim: int,
        num_templates: int,
        hidden_dim: int,
        num_heads: int,
        cross_attention: bool = True,
        self_attention: bool = True,
        guidance_prompt: str = "tokens",
        prompt_tokens: int = 4,
        guidance_cls_logit: bool = True,
        cross_attention_width: str = "head",
        dtype=jnp.float32,
        attention: str = "auto",
        remat="none",
        rngs: nnx.Rngs,
    ):
        self.num_templates = num_templates
        self.remat = remat_name(remat)
        self.cross_attention = cross_attention
        self.self_attention = self_attention
        if guidance_prompt not in PROMPTS:
            raise ValueError(f"config.model.guidance.prompt={guidance_prompt!r}: expected one of {PROMPTS}")
        self.guidance_cls_logit = guidance_cls_logit
        if cross_attention_width not in CA_WIDTHS:
            raise ValueError(f"config.model.tga.cross_attention_width={cross_attention_width!r}: expected one of "
                             f"{CA_WIDTHS}")
        # "clip": CA on the patch features at CLIP's joint width D, projected to d afterwards (Eqs. 8-11: the
        # refined features are "projected to match the channel of" the cost features); "head": projected first.
        self.ca_at_clip_width = cross_attention and cross_attention_width == "clip"
        ca_dim = clip_dim if self.ca_at_clip_width else hidden_dim
        # Cost embedding: per slot, Conv7x7 over the P template channels (CAT-Seg conv1, no activation).
        self.cost_embed = nnx.Conv(num_templates, hidden_dim, (7, 7), padding=3, dtype=dtype, rngs=rngs)
        if cross_attention or self_attention:
            # Visual features Fv = ReLU(Conv3x3(dense)) (CAT-Seg's appearance-guidance projection).
            self.visual_proj = nnx.Conv(clip_dim, hidden_dim, (3, 3), padding=1, dtype=dtype, rngs=rngs)
        if cross_attention:
            if guidance_prompt == "tokens":  # (with "context" the prompt lives in the text encoder)
                self.prompt_tokens = nnx.Param(
                    jax.random.normal(rngs.params(), (prompt_tokens, ca_dim), jnp.float32) * 0.02)
            guidance_in = clip_dim + (1 if guidance_cls_logit else 0)
            self.guidance_proj = nnx.Linear(guidance_in, ca_dim, dtype=dtype, rngs=rngs)
            self.cross_block = CrossAttentionBlock(ca_dim, num_heads, dtype=dtype, attention=attention, rngs=rngs)
        if cross_attention or self_attention:
            self.self_block = SpatialSelfAttentionBlock(
                hidden_dim, num_heads, attend=self_attention, dtype=dtype, attention=attention, rngs=rngs
            )

    def guidance(self, slot_guidance_text: jax.Array, slot_cos: jax.Array) -> jax.Array:
        """g_k = Linear([T_k ; c_k]) -> [B,K,d]; c_k = cos(cls, T_bar_k) is bounded in [-1, 1]."""
        parts = [slot_guidance_text]
        if self.guidance_cls_logit:
            parts.append(slot_cos[..., None].astype(slot_guidance_text.dtype))
        return self.guidance_proj(jnp.concatenate(parts, axis=-1))

    def __call__(
        self,
        dense: jax.Array,
        slot_text: jax.Array,
        slot_guidance_text: jax.Array,
        slot_cos: jax.Array,
        slot_valid: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        """Align the K slots with the image.

        dense [B,g,g,D] joint-space patch features; slot_text [B,K,P,D] unit template embeddings of
        each slot's class (the cost volume); slot_guidance_text [B,K,D] the guidance's text embedding
        (T_bar_k, or the re-encoded one with a learnt context / text fine-tuning); slot_cos [B,K] =
        cos(cls, T_bar_k); slot_valid [B,K]. Returns (cost features [B,K,g,g,d], corr [B,K,g,g,P]).
        """
        b, gh, gw, _ = dense.shape
        k, p = slot_text.shape[1], slot_text.shape[2]
        if p != self.num_templates:
            raise ValueError(
                f"text embeddings have P={p} templates but the model was built for {self.num_templates}; "
                "set config.text.templates to match the cached embeddings"
            )
        corr = jnp.einsum("bhwd,bkpd->bkhwp", l2_normalize(dense), slot_text)
        cost = self.cost_embed(corr.reshape(b * k, gh, gw, p)).reshape(b, k, gh * gw, -1)
        if not (self.cross_attention or self.self_attention):
            return cost.reshape(b, k, gh, gw, -1), corr
        prompt = self.prompt_tokens[...] if hasattr(self, "prompt_tokens") else None
        cross = lambda tokens: remat_call(self.cross_block, lambda block, *a: block(*a), self.remat,  # noqa: E731
                                          tokens, self.guidance(slot_guidance_text, slot_cos), slot_valid, prompt)
        if self.ca_at_clip_width:
            refined = cross(dense.reshape(b, gh * gw, -1)).reshape(dense.shape)
            visual = jax.nn.relu(self.visual_proj(refined)).reshape(b, gh * gw, -1)
        else:
            visual = jax.nn.relu(self.visual_proj(dense)).reshape(b, gh * gw, -1)
            if self.cross_attention:
                visual = cross(visual)
        cost = remat_call(self.self_block, lambda block, *a: block(*a), self.remat, cost, visual)
        return cost.reshape(b, k, gh, gw, -1), corr
