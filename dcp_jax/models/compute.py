"""How the model computes, apart from what it computes: the compute dtype, the attention kernels and
rematerialisation. Every module of the model (CLIP, TGA, the decoder) takes these from here.

- dtype (config.clip.dtype): "auto" is bfloat16 on GPUs and TPUs and float32 on CPU. Parameters and
  optimizer state stay float32; softmax and normalisation statistics, logits and the loss are float32.
- attention (config.model.attention): jax.nn.dot_product_attention on accelerators (cuDNN's flash
  attention on GPUs where it applies), an einsum path on CPU and wherever the probabilities are needed.
- remat (config.model.remat): a block's activations are recomputed in the backward pass instead of
  being kept, per CLIP block, TGA block, Swin block and decoder layer (decoder.py).
- bfloat16 norms and softmax: LayerNorm / GroupNorm / softmax_saved_as keep what the backward pass
  needs in the compute dtype.
- for_cost_analysis(): every loop unrolled, for XLA's FLOP counts (bench, accelerator check).
- traced_construction(): a module's constructor traced (eval_shape, jitted initialisers) without jax's
  walk for error-message origins, which made building a model quadratic in its parameter count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = ("auto", "float32", "bfloat16")


_TARGET_PLATFORM: str | None = None  # set by compiling_for()


def platform() -> str:
    """The platform the programs traced now are for: jax's default backend, or compiling_for's."""
    return _TARGET_PLATFORM or jax.default_backend()


@contextlib.contextmanager
def compiling_for(target: str, device=None):
    """Inside, every backend-dependent choice (dtype "auto", attention "auto", CPU chunks) is made for
    `target` ("tpu", "gpu", "cpu") instead of this machine's backend: ahead-of-time compiles for
    devices this machine does not have (accelerator.memory_plan, gpu_plan). `device`: one of a GPU
    target's devices; jax's cuDNN attention rules then see its compute capability (see
    _target_compute_capability)."""
    global _TARGET_PLATFORM
    saved, _TARGET_PLATFORM = _TARGET_PLATFORM, target
    jax.clear_caches()
    try:
        with _target_compute_capability(device if target == "gpu" else None):
            yield
    finally:
        _TARGET_PLATFORM = saved
        jax.clear_caches()


@contextlib.contextmanager
def _target_compute_capability(device):
    """jax's cuDNN attention rules ask the default backend's first GPU for its compute capability (head dims
    up to 256 from Hopper on, else 128). A process compiling for a GPU it does not have has a CPU backend,
    so jax would answer as for a pre-Hopper GPU and refuse shapes the target takes; inside, the two
    questions are answered from `device` (a compile-only device of the target), so the program compiled
    here is the one the GPU would build. Nothing changes where jax lacks these functions."""
    capability = getattr(device, "compute_capability", None)
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except ImportError:
        fa = None
    names = ("check_compute_capability", "is_cuda_compute_capability_equal")
    if capability is None or fa is None or not all(hasattr(fa, n) for n in names):
        yield
        return
    have = tuple(int(x) for x in str(capability).split("."))
    as_tuple = lambda text: tuple(int(x) for x in text.split("."))  # noqa: E731
    saved = [getattr(fa, n) for n in names]
    fa.check_compute_capability = lambda wanted: have >= as_tuple(wanted)
    fa.is_cuda_compute_capability_equal = lambda wanted: have == as_tuple(wanted)
    try:
        yield
    finally:
        for name, original in zip(names, saved):
            setattr(fa, name, original)


def resolve_dtype(name: str, backend: str | None = None):
    """config.clip.dtype -> a jnp dtype: "auto" is bfloat16 on gpu/tpu, float32 on cpu."""
    if name not in DTYPES:
        raise ValueError(f"config.clip.dtype={name!r}: expected one of {DTYPES}")
    if name == "auto":
        backend = platform() if backend is None else backend
        return jnp.dtype(jnp.bfloat16 if backend in ("gpu", "tpu") else jnp.float32)
    return jnp.dtype(name)


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------

# XLA:CPU writes the whole [..., h, Lq, Lk] score tensor to memory before the softmax. The decoder's window
# attention (B/16 @384, 16 slots: 340 MB of scores) and TGA's spatial attention (85 MB) ran about 2x faster
# here in chunks whose scores stay in cache; GPUs and TPUs keep one batched op.
CPU_SCORE_CHUNK_BYTES = 8 << 20


_UNROLL_SCANS = False  # True inside for_cost_analysis()


def chunks_attention() -> bool:
    """Whether attention traced now may run in chunks (the CPU backend)."""
    return platform() == "cpu"


def unroll_scans() -> bool:
    """Whether the CLIP blocks' scan traced now is unrolled (inside for_cost_analysis)."""
    return _UNROLL_SCANS


@contextlib.contextmanager
def for_cost_analysis():
    """Inside, every loop of the model is traced unrolled: attention as one batched op (no CPU chunks)
    and the scanned CLIP blocks one after the other. XLA's cost analysis counts a loop's body once, so
    FLOPs and bytes are counted on programs traced here (the same arithmetic). JAX's caches are cleared
    on entry and exit, so jitted functions trace again under the setting."""
    global CPU_SCORE_CHUNK_BYTES, _UNROLL_SCANS
    saved, CPU_SCORE_CHUNK_BYTES, _UNROLL_SCANS = CPU_SCORE_CHUNK_BYTES, 1 << 62, True
    jax.clear_caches()
    try:
        yield
    finally:
        CPU_SCORE_CHUNK_BYTES, _UNROLL_SCANS = saved, False
        jax.clear_caches()


# How attention is computed (config.model.attention): "auto" picks per backend and per site (attention_path);
# "xla" / "cudnn" force jax.nn.dot_product_attention's implementation; "reference" is the einsum + softmax
# path below, the only one that returns the probabilities.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "reference")

# cuDNN's flash attention takes bfloat16/float16 only; a sequence that jax's training check refuses (odd
# lengths: jax passes cuDNN a placeholder bias, and biased training needs even lengths) is padded up to a
# multiple of this many tokens, the padded keys masked through cuDNN's sequence lengths.
CUDNN_PAD_MULTIPLE = 8


@dataclasses.dataclass(frozen=True)
class AttentionPath:
    """Which kernel computes one attention site, decided before it is traced (attention_path)."""
    site: str  # where in the model: "clip.vision", "tga.cross", ...
    path: str  # "cudnn" | "xla" | "reference"
    q: tuple  # q's shape [..., Lq, h, d] as the site calls it, and k's
    k: tuple
    reason: str  # why this path (and why not cuDNN, where it is not)
    padded: tuple | None = None  # cuDNN: (Lq, Lk) the sequences are padded to, where they are
    valid_keys: int | None = None  # a sequence padded before the call: only the first valid_keys keys attended


_SITES: list | None = None  # collecting inside recording_attention_paths()


@contextlib.contextmanager
def recording_attention_paths():
    """Inside, every attention traced appends its AttentionPath to the yielded list (the plan's table)."""
    global _SITES
    saved, _SITES = _SITES, []
    try:
        yield _SITES
    finally:
        _SITES = saved


def attention_path(q_shape, k_shape, dtype, *, impl: str = "auto", site: str = "attention",
                   return_probs: bool = False) -> AttentionPath:
    """The kernel for an attention of these shapes ([..., L, h, d]), decided up front for both the forward
    and the backward pass: a train step differentiates what the forward traced, so a kernel that jax would
    accept forward and refuse backward (cuDNN with odd sequence lengths) must never be chosen.

    "auto": the reference path on CPU and wherever the probabilities are needed; on a GPU cuDNN's flash
    attention where jax's own training check accepts the shapes (after padding odd lengths), XLA's
    implementation elsewhere, with the reason; on a TPU XLA's. "cudnn" raises where cuDNN cannot run."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"config.model.attention={impl!r}: expected one of {ATTENTION_IMPLS}")
    q_shape, k_shape = tuple(q_shape), tuple(k_shape)

    def chosen(path, reason, padded=None):
        return AttentionPath(site, path, q_shape, k_shape, reason, padded)

    if return_probs:
        return chosen("reference", "its probabilities are used")
    if impl == "reference":
        return chosen("reference", "model.attention=reference")
    if impl == "auto" and platform() == "cpu":
        return chosen("reference", "CPU: the einsum path is faster there")
    if impl == "xla":
        return chosen("xla", "model.attention=xla")
    if impl == "auto" and platform() != "gpu":
        return chosen("xla", f"{platform()}: XLA's implementation")
    padded = tuple(_round_up(n, CUDNN_PAD_MULTIPLE) if n % 2 else n for n in (q_shape[-3], k_shape[-3]))
    refusal = cudnn_refusal(q_shape[:-3] + (padded[0],) + q_shape[-2:], k_shape[:-3] + (padded[1],) + k_shape[-2:],
                            dtype)
    if refusal:
        if impl == "cudnn":
            raise ValueError(f"config.model.attention=cudnn: cuDNN cannot compute {site} (q {q_shape}, k "
                             f"{k_shape}, {jnp.dtype(dtype).name}): {refusal}; use auto or xla")
        return chosen("xla", f"cuDNN refuses it: {refusal}")
    was_padded = padded != (q_shape[-3], k_shape[-3])
    reason = "model.attention=cudnn" if impl == "cudnn" else "cuDNN flash attention, forward and backward"
    if was_padded:
        reason += f" (odd length: tokens padded to {padded[1]}, the padding masked)"
    return chosen("cudnn", reason, padded if was_padded else None)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def cudnn_refusal(q_shape, k_shape, dtype) -> str:
    """Why jax's cuDNN attention would refuse a training step's attention of these shapes ([..., L, h, d]),
    or "" where it takes them. Asks jax's own checks (the forward rule's, run with is_training and a bias,
    as jax's backward pass runs them) where this jax has them, else applies jax 0.10's rules."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"{jnp.dtype(dtype).name} inputs (cuDNN takes bfloat16 and float16)"
    if q_shape[-1] != k_shape[-1]:
        return f"q and k head dims differ ({q_shape[-1]}, {k_shape[-1]})"
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except ImportError:
        fa = None
    if fa is None or not hasattr(fa, "check_is_flash_attention"):
        d, lq, lk = q_shape[-1], q_shape[-3], k_shape[-3]
        if d > 128 or d % 8:
            return f"head dim {d} (cuDNN: at most 128, a multiple of 8)"
        return f"odd sequence length ({lq}, {lk})" if lq % 2 or lk % 2 else ""
    try:
        version = fa.check_cudnn_version()
    except RuntimeError as e:
        return f"{str(e).rstrip('.')} (pip install -e \".[cuda12]\" on a GPU machine, \".[gpu-plan]\" to plan for one)"
    b = math.prod(q_shape[:-3])
    q = jax.ShapeDtypeStruct((b, *q_shape[-3:]), dtype)
    kv = jax.ShapeDtypeStruct((b, *k_shape[-3:]), dtype)
    try:
        fa.check_is_flash_attention(q, kv, kv, fa.AttentionLayout.BTNH.value, version, True, True)
    except (NotImplementedError, ValueError) as e:
        return str(e).rstrip(".")
    return ""


def multi_head_attention(q, k, v, *, bias=None, mask=None, impl: str = "auto", return_probs: bool = False,
                         site: str = "attention", kv_length: int | None = None):
    """Scaled dot-product attention over split heads: q [..., Lq, h, d], k [..., Lk, h, d], v [..., Lk, h, dv]
    -> (out [..., Lq, h, dv], float32 probabilities [..., h, Lq, Lk] if `return_probs` else None). `bias`
    (added to the float32 scores) and `mask` (bool, True = attend) broadcast to [..., h, Lq, Lk];
    `kv_length`: only the first kv_length keys are attended (a sequence padded for cuDNN).

    The kernel is attention_path's choice for this `site` (recorded inside recording_attention_paths): on
    CPU the reference path (XLA's implementation of jax.nn.dot_product_attention measured 1.6-3x slower
    there: its heads sit between the token and feature axes; B/16 @384 forward 40 vs 19-22 ms per layer);
    on a GPU cuDNN's flash attention, which keeps no [..., h, Lq, Lk] probabilities for the backward pass,
    where it takes the shapes, else XLA's. `return_probs` always takes the reference path (the last CLIP
    block's attention map feeds the decoder).
    """
    choice = attention_path(q.shape, k.shape, q.dtype, impl=impl, site=site, return_probs=return_probs)
    if _SITES is not None:
        _SITES.append(dataclasses.replace(choice, valid_keys=kv_length))
    if kv_length is not None and kv_length < k.shape[-3]:
        keys = jnp.arange(k.shape[-3]) < kv_length
        if choice.path == "reference":
            mask = keys if mask is None else jnp.logical_and(mask, keys)
    else:
        kv_length = None
    if choice.path == "reference":
        out, probs = reference_attention(q, k, v, bias=bias, mask=mask)
        return out, probs if return_probs else None
    return _fused_attention(q, k, v, bias, mask, choice, kv_length), None


def _fused_attention(q, k, v, bias, mask, choice: AttentionPath, kv_length):
    """jax.nn.dot_product_attention over the leading axes flattened into one batch axis; for cuDNN, odd
    sequences padded to choice.padded with the padded keys masked by their length (never by a bias: cuDNN
    would materialise it), and bias / mask broadcast to full [B, h, Lq, Lk] where cuDNN needs it."""
    lead, lq, lk = q.shape[:-3], q.shape[-3], k.shape[-3]
    n = math.prod(lead)
    q4, k4, v4 = (t.reshape(n, *t.shape[-3:]) for t in (q, k, v))
    v4 = v4.astype(q4.dtype)
    bias4, mask4 = (_as_bnts(a, lead) for a in (bias, mask))
    if choice.path == "xla":
        lengths = None if kv_length is None else jnp.full((n,), kv_length, jnp.int32)
        out = jax.nn.dot_product_attention(q4, k4, v4, bias=bias4, mask=mask4, key_value_seq_lengths=lengths,
                                           implementation="xla")
        return out.reshape(*lead, *out.shape[1:])
    pq, pk = choice.padded or (lq, lk)
    pad = lambda t, length: jnp.pad(t, [(0, 0), (0, length - t.shape[1]), (0, 0), (0, 0)])  # noqa: E731
    q4, k4, v4 = pad(q4, pq), pad(k4, pk), pad(v4, pk)
    if bias4 is not None:  # cuDNN takes a bias of full [B or 1, h or 1, Lq, Lk] only
        bias4 = jnp.broadcast_to(bias4, (*bias4.shape[:2], lq, lk)).astype(q4.dtype)
        bias4 = jnp.pad(bias4, [(0, 0), (0, 0), (0, pq - lq), (0, pk - lk)])
    if mask4 is not None:
        mask4 = jnp.broadcast_to(mask4, (*mask4.shape[:2], lq, lk))
        mask4 = jnp.pad(mask4, [(0, 0), (0, 0), (0, pq - lq), (0, pk - lk)], constant_values=True)
    valid = kv_length if kv_length is not None else (lk if pk != lk else None)
    lengths = None if valid is None else jnp.full((n,), valid, jnp.int32)
    out = jax.nn.dot_product_attention(q4, k4, v4, bias=bias4, mask=mask4, key_value_seq_lengths=lengths,
                                       implementation="cudnn")[:, :lq]
    return out.reshape(*lead, *out.shape[1:])


def _as_bnts(a, lead):
    """A bias / mask broadcastable to [*lead, h, Lq, Lk] -> 4-D [B or 1, h or 1, Lq, Lk] over the
    flattened leading axes (jax.nn.dot_product_attention's layout)."""
    if a is None:
        return None
    a = jnp.asarray(a)
    a = a.reshape((1,) * (len(lead) + 3 - a.ndim) + a.shape)
    head = a.shape[:len(lead)]
    if all(s == 1 for s in head):
        return a.reshape(1, *a.shape[len(lead):])
    return jnp.broadcast_to(a, (*lead, *a.shape[len(lead):])).reshape(math.prod(lead), *a.shape[len(lead):])


def reference_attention(q, k, v, *, bias=None, mask=None):
    """multi_head_attention as einsums and a float32 softmax: (out, probabilities [..., h, Lq, Lk]).

    The heads move in front of the token axes before the two matmuls: on XLA's CPU backend the batched
    matmuls with the heads between the token and feature axes ran 2-3x slower (B/16 @384: 32 -> 11 ms per
    layer; the decoder's window attention 0.23 -> 0.10 s). On CPU, a large batch is computed in chunks of
    the leading axes (CPU_SCORE_CHUNK_BYTES), with the same result up to float32 rounding.
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
    probs = softmax_saved_as(scores, v.dtype)
    out = jnp.einsum("...qk,...kd->...qd", probs.astype(v.dtype), vh)
    return jnp.swapaxes(out, -2, -3), probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_saved_as(scores, dtype):
    """jax.nn.softmax over the last axis (float32), keeping its output for the backward pass in `dtype`:
    with bfloat16 compute, the [..., h, Lq, Lk] probabilities are the largest activation a step saves,
    and float32 would double them. The gradient is computed in float32 from the rounded probabilities
    (relative error 2^-9, like the bfloat16 matmul that consumes them)."""
    return jax.nn.softmax(scores, axis=-1)


def _softmax_fwd(scores, dtype):
    probs = jax.nn.softmax(scores, axis=-1)
    return probs, probs.astype(dtype)


def _softmax_bwd(dtype, saved, g):
    probs = saved.astype(jnp.float32)
    return (probs * (g - jnp.sum(g * probs, axis=-1, keepdims=True)),)


softmax_saved_as.defvjp(_softmax_fwd, _softmax_bwd)


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------

def _narrow(dtype) -> bool:
    return dtype is not None and jnp.dtype(dtype).itemsize < 4


class LayerNorm(nnx.LayerNorm):
    """nnx.LayerNorm that, computing in bfloat16, keeps only its input and each row's float32 mean and 1/std for
    the backward pass (`normalized`): autodiff of nnx's norm keeps three float32 copies of every normalised
    activation (x^2, x - mean, the normalised x). float32 as nnx's."""

    def __call__(self, x, *, mask=None):
        if not _narrow(self.dtype) or mask is not None or self.scale is None or self.bias is None:
            return super().__call__(x, mask=mask)
        x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
        return normalized(x, scale, bias, (x.ndim - 1,), self.epsilon)


class GroupNorm(nnx.GroupNorm):
    """nnx.GroupNorm with LayerNorm's bfloat16 rule: the input and each group's statistics kept for the backward."""

    def __call__(self, x, *, mask=None):
        if (not _narrow(self.dtype) or mask is not None or self.scale is None or self.bias is None
                or self.reduction_axes is not None):
            return super().__call__(x, mask=mask)
        x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
        grouped = x.reshape(x.shape[:-1] + (self.num_groups, self.group_size))
        group = (self.num_groups, self.group_size)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)  # every axis but the batch and the group
        return normalized(grouped, scale.reshape(group), bias.reshape(group), axes, self.epsilon).reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalized(x, scale, bias, axes: tuple[int, ...], epsilon: float):
    """(x - mean) / sqrt(var + epsilon) * scale + bias with the mean and variance over `axes` in float32, in x's
    dtype: nnx's norm arithmetic (its fast variance, E[x^2] - E[x]^2), with a backward pass that keeps x and the
    float32 statistics only and computes the gradient in one pass (no recomputed statistics, two row sums).
    scale and bias have the shape of x's trailing axes."""
    return _normalized_fwd(x, scale, bias, axes, epsilon)[0]


def _normalized_fwd(x, scale, bias, axes, epsilon):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axes, keepdims=True)
    var = jnp.maximum(0.0, jnp.mean(xf * xf, axes, keepdims=True) - mean * mean)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (xf - mean) * (rstd * scale) + bias
    return y.astype(x.dtype), (x, mean, rstd, scale, bias)


def _normalized_bwd(axes, epsilon, saved, g):
    del epsilon
    x, mean, rstd, scale, bias = saved
    xhat = (x.astype(jnp.float32) - mean) * rstd
    g = g.astype(jnp.float32)
    param_axes = tuple(range(x.ndim - scale.ndim))  # scale and bias span x's trailing axes
    d_scale = jnp.sum(g * xhat, param_axes).astype(scale.dtype)
    d_bias = jnp.sum(g, param_axes).astype(bias.dtype)
    gs = g * scale
    dx = rstd * (gs - jnp.mean(gs, axes, keepdims=True) - xhat * jnp.mean(gs * xhat, axes, keepdims=True))
    return dx.astype(x.dtype), d_scale, d_bias


normalized.defvjp(_normalized_fwd, _normalized_bwd)


# --------------------------------------------------------------------------------------------------
# Rematerialisation
# --------------------------------------------------------------------------------------------------

# config.model.remat (a string, so that the command line takes every value): what a rematerialised block
# keeps for the backward pass. "full" (or "true") keeps only its input and recomputes everything inside;
# "dots" also keeps the outputs of its weight matmuls (no batch dimensions: the projections, not the
# attention scores); "none" (or "false") keeps everything.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def remat_name(value) -> str:
    """config.model.remat (a policy name, "true" / "false", or a bool) -> a key of REMAT_POLICIES."""
    name = str(value or "none").lower()
    name = {"true": "full", "false": "none"}.get(name, name)
    if name not in REMAT_POLICIES:
        raise ValueError(f"config.model.remat={value!r}: expected true/false or one of {tuple(REMAT_POLICIES)}")
    return name


def maybe_remat(fn, remat: str, *, static_argnums=(), in_scan: bool = False):
    """`fn` (a pure function of arrays) wrapped in jax.checkpoint with the named policy; "none" returns
    `fn` itself. Inside a scan, CSE cannot undo the recomputation, so prevent_cse is off there."""
    if remat_name(remat) == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[remat_name(remat)], prevent_cse=not in_scan,
                          static_argnums=static_argnums)


def remat_call(module: nnx.Module, fn, remat, *args):
    """fn(module, *args) with the activations inside rematerialised per `remat` (args: arrays or None;
    close Python values such as window sizes over in `fn`)."""
    if remat_name(remat) == "none":
        return fn(module, *args)
    graphdef, params = nnx.split(module)
    return maybe_remat(lambda params, *a: fn(nnx.merge(graphdef, params), *a), remat)(params, *args)


_TRACING_LOCK = threading.RLock()


@contextlib.contextmanager
def traced_construction():
    """Around tracing a module's constructor (eval_shape, the jitted initialisers).

    flax's Variable.set_value compares the sharding of each new RNG count with the old one; on a tracer,
    jax answers with an AttributeError whose message names the traced operations the value came from
    (DynamicJaxprTracer._origin_msg walks every equation traced so far), so building a model costs time
    quadratic in its parameter count. flax catches the error and never reads the message: while the
    constructor is traced, the message is left empty (a random B/16 model on this project's 2-core CPU:
    28 s -> 23 s to create). The switch is process-wide while it lasts: another thread's tracer errors in
    that window lose their origin line too, nothing else. Where jax's internals differ, nothing is changed."""
    try:
        from jax._src.interpreters.partial_eval import DynamicJaxprTracer
    except ImportError:
        DynamicJaxprTracer = None
    with _TRACING_LOCK:  # threads take turns, so none saves another's patch as the original
        original = getattr(DynamicJaxprTracer, "_origin_msg", None)
        if original is None:
            yield
            return
        DynamicJaxprTracer._origin_msg = lambda self: ""
        try:
            yield
        finally:
            DynamicJaxprTracer._origin_msg = original
