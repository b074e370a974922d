"""Slide-window / whole-image inference: image -> views -> model -> per-pixel vocabulary ids (MODEL.md section 7).

The protocol is CAT-Seg's `inference_sliding_window` (shared/research/catseg_sed.md section 5):
  slide: stretch the image to canvas x canvas (640, aspect ratio ignored), cut crop x crop windows (384) with
         `stride` (256) as torch.nn.Unfold does, append the whole image stretched to crop x crop -> V = 5 views.
         Per view the logits are upsampled to the crop and sigmoided; crops are averaged over their overlap
         counts on the canvas; the result is averaged 50/50 with the global view (upsampled to the canvas);
         then resized bilinearly to the original image size and argmaxed.
  whole: stretch to crop x crop (V = 1); the view's logits are sigmoided and resized to the original size
         (CAT-Seg's and SED's non-sliding path: sigmoid first, then `sem_seg_postprocess`).

Our model does not output a dense [C,h,w] map but K slots per view (`slot_class` [V,K] vocabulary ids,
`slot_valid` [V,K]); a class that is not among a view's valid slots scores 0 in that view (what CAT-Seg's
sigmoid gives a class with -inf logits). `combine_views` evaluates exactly CAT-Seg's procedure on the union of
the views' classes, in chunks of classes with a running argmax, so memory is O(chunk * H * W) whatever the
vocabulary size, and no step ever holds a [C,H,W] tensor.

Bilinear resizes are torch's `F.interpolate(mode="bilinear", align_corners=False)` without antialias, applied as
two-tap gathers per axis (`bilinear_taps`, `resize_axis`): exact float32 arithmetic with no matmul precision
setting involved, and O(pixels) work. The sizes may be traced values, which is what lets images of different
sizes share one compiled program: pad them to a bucketed static shape (`bucket_shape`) and pass the true sizes
as arrays.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("slide", "whole")


# --------------------------------------------------------------------------------------------------
# Geometry and bilinear interpolation
# --------------------------------------------------------------------------------------------------


def _check_mode(mode: str):
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")


def crop_positions(canvas: int, crop: int, stride: int) -> tuple[int, ...]:
    """Top (or left) offsets of the sliding-window crops along one axis of the canvas.

    torch.nn.Unfold's positions (0, stride, 2*stride, ...) when they tile the canvas exactly, as for
    CAT-Seg's 640/384/256 (0 and 256). Otherwise one more crop is added, flush with the far border, so every
    canvas pixel is covered (torch.nn.Unfold would leave the border uncovered and CAT-Seg would divide by 0).
    """
    canvas, crop, stride = int(canvas), int(crop), int(stride)
    if crop <= 0 or stride <= 0:
        raise ValueError(f"crop={crop} and stride={stride} must be positive")
    if crop > canvas:
        raise ValueError(f"crop={crop} is larger than canvas={canvas}; use a canvas >= crop")
    if stride > crop:
        raise ValueError(f"stride={stride} > crop={crop} would leave canvas pixels uncovered; use stride <= crop")
    count = math.ceil((canvas - crop) / stride) + 1
    return tuple(min(i * stride, canvas - crop) for i in range(count))


def num_views(mode: str = "slide", *, crop: int = 384, stride: int = 256, canvas: int = 640) -> int:
    """Views per image: the crops plus the global view (slide), or 1 (whole)."""
    _check_mode(mode)
    if mode == "whole":
        return 1
    return len(crop_positions(canvas, crop, stride)) ** 2 + 1


def bucket_size(n: int, multiple: int = 128) -> int:
    """Round a side up to a bucket: multiples of `multiple` up to 8 x multiple (1024), then the step doubles
    with each doubling of the side (256 up to 2048, 512 up to 4096, ...). Padding stays under 1/8 of the
    side beyond 1024, and sides up to 4096 fall into 16 buckets: a dataset of any mix of image sizes
    compiles a bounded number of programs."""
    if multiple <= 0:
        raise ValueError(f"bucket multiple={multiple} must be positive")
    n, step = int(n), int(multiple)
    while n > 8 * step:
        step *= 2
    return -(-n // step) * step


def bucket_shape(hw: Sequence[int], multiple: int = 128) -> tuple[int, int]:
    """A (height, width) rounded up side by side with `bucket_size`: a static shape shared by many image sizes."""
    return tuple(bucket_size(n, multiple) for n in hw)


def bilinear_taps(in_size, out_size, out_pad: int | None = None):
    """The two source pixels and weights of each output pixel of a torch bilinear resize along one axis.

    `F.interpolate(mode="bilinear", align_corners=False, antialias=False)`: src = max((dst + 0.5) in/out - 0.5, 0),
    neighbours floor(src) and floor(src) + 1 clamped to the input. src is computed as the exact fraction
    ((2 dst + 1) in - out) / (2 out) in integers, so the weights do not depend on how XLA fuses arithmetic (jit
    and eager agree bit for bit) and differ from torch's float32 ones by rounding only (~1e-7).

    Args:
      in_size, out_size: ints, or traced int scalars (then `out_pad` is required).
      out_pad: static number of output entries; those >= out_size get zero weights.

    Returns:
      (i0, i1, w0, w1), each [out_pad]: out[o] = w0[o] * x[i0[o]] + w1[o] * x[i1[o]], indices < in_size.
    """
    if out_pad is None:
        out_pad = int(out_size)
    return _bilinear_taps(in_size, out_size, out_pad=int(out_pad))


@functools.partial(jax.jit, static_argnames=("out_pad",))
def _bilinear_taps(in_size, out_size, *, out_pad: int):
    in_n = jnp.asarray(in_size, jnp.int32)
    out_n = jnp.asarray(out_size, jnp.int32)
    dst = jnp.arange(out_pad, dtype=jnp.int32)
    numerator = jnp.maximum((2 * dst + 1) * in_n - out_n, 0)  # src = numerator / denominator
    denominator = 2 * out_n
    i0 = jnp.minimum(numerator // denominator, in_n - 1)
    lam1 = jnp.clip((numerator - i0 * denominator).astype(jnp.float32) / denominator.astype(jnp.float32), 0.0, 1.0)
    i1 = i0 + (i0 < in_n - 1).astype(jnp.int32)
    inside = dst < out_n
    return i0, i1, jnp.where(inside, 1.0 - lam1, 0.0), jnp.where(inside, lam1, 0.0)


def resize_axis(x: jax.Array, taps, axis: int) -> jax.Array:
    """Apply `bilinear_taps` along one axis of x (two gathers and a weighted sum)."""
    i0, i1, w0, w1 = taps
    axis = axis % x.ndim
    shape = [1] * x.ndim
    shape[axis] = -1
    return (jnp.take(x, i0, axis=axis, mode="clip") * w0.reshape(shape)
            + jnp.take(x, i1, axis=axis, mode="clip") * w1.reshape(shape))


def _resize_2d(x: jax.Array, taps_y, taps_x, axes=(-2, -1)) -> jax.Array:
    return resize_axis(resize_axis(x, taps_y, axes[0]), taps_x, axes[1])


def _per_image_taps(in_sizes, out_sizes, out_pad: int):
    """Taps for every image of a batch: sizes [B] (ints or traced) -> tuple of [B,out_pad] arrays."""
    return jax.vmap(lambda i, o: _bilinear_taps(i, o, out_pad=out_pad))(in_sizes, out_sizes)


def _per_image_sizes(hw, batch: int, what: str) -> jax.Array:
    """(h, w) or [B,2] -> int32 [B,2]."""
    hw = jnp.asarray(hw, jnp.int32)
    if hw.shape not in ((2,), (batch, 2)):
        raise ValueError(f"{what} must be (height, width) or an int array [B={batch},2]; got shape {hw.shape}")
    return jnp.broadcast_to(hw.reshape(-1, 2), (batch, 2))


def _resize_images(images, sizes, out: int) -> jax.Array:
    """Stretch each image's valid [:h, :w] region ([B,Hp,Wp,C], sizes [B,2]) to out x out."""
    b = images.shape[0]
    full = jnp.full((b,), out, jnp.int32)
    taps_y = _per_image_taps(sizes[:, 0], full, out)
    taps_x = _per_image_taps(sizes[:, 1], full, out)
    return jax.vmap(lambda im, ty, tx: _resize_2d(im, ty, tx, axes=(0, 1)))(images, taps_y, taps_x)


# --------------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------------


def make_views(images, *, mode: str = "slide", crop: int = 384, stride: int = 256, canvas: int = 640,
               image_hw=None) -> jax.Array:
    """Cut an image batch into the model's input views (compiled; static shapes except `image_hw`).

    Args:
      images: [B,H,W,3] (or one [H,W,3]) float (or uint8) RGB in 0..255. Images of different sizes may share a
        batch zero-padded at the bottom/right, with their true sizes in `image_hw` (padding is never read).
      mode: "slide" (CAT-Seg sliding window) or "whole".
      crop, stride, canvas: window size, window stride and the square canvas of the slide mode.
      image_hw: None (the whole array is the image) or the valid (h, w) per image, int [B,2] (may be traced).

    Returns:
      views [B*V, crop, crop, 3] float32, image-major. Slide: the crops in row-major order of their positions
      (`crop_positions`), then the global view, which (as in CAT-Seg) is the original image stretched directly
      to crop x crop, not the canvas. Whole: the image stretched to crop x crop (V = 1).
    """
    _check_mode(mode)
    images = jnp.asarray(images)  # converted to float32 inside the compiled program: no extra program per shape
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B,H,W,3] (or [H,W,3]) RGB; got shape {images.shape}")
    b, hp, wp, _ = images.shape
    sizes = _per_image_sizes((hp, wp) if image_hw is None else image_hw, b, "image_hw")
    if mode == "slide":
        crop_positions(canvas, crop, stride)  # validates the geometry with a readable error
    return _make_views(images, sizes, mode=mode, crop=int(crop), stride=int(stride), canvas=int(canvas))


@functools.partial(jax.jit, static_argnames=("mode", "crop", "stride", "canvas"))
def _make_views(images, sizes, *, mode, crop, stride, canvas):
    images = images.astype(jnp.float32)
    b = images.shape[0]
    glob = _resize_images(images, sizes, crop)
    if mode == "whole":
        return glob
    positions = crop_positions(canvas, crop, stride)
    board = _resize_images(images, sizes, canvas)
    crops = [board[:, y:y + crop, x:x + crop] for y in positions for x in positions]
    views = jnp.stack(crops + [glob], axis=1)  # [B,V,crop,crop,3]
    return views.reshape(b * views.shape[1], crop, crop, 3)


# --------------------------------------------------------------------------------------------------
# Combining the views' slots into one label map
# --------------------------------------------------------------------------------------------------


def _merge_duplicate_slots(logits, slot_class, slot_valid):
    """One slot per class per view: duplicates (tag validation can relabel two slots alike) take the max.

    The max is taken over the raw logits at the model's resolution, i.e. a view's slots are read as the dense
    per-class logit map max_{k: class k == c} logits_k, which is then processed exactly like CAT-Seg's.
    Returns (merged logits [B,V,K,h,w], first [B,V,K] bool: the valid slot that carries its class).
    """
    k = slot_class.shape[-1]
    same = (slot_class[..., :, None] == slot_class[..., None, :]) & slot_valid[..., :, None] & slot_valid[..., None, :]
    own = jnp.arange(k, dtype=jnp.int32)
    rep = jnp.where(slot_valid, jnp.argmax(same, axis=-1).astype(jnp.int32), own)  # first slot of the same class
    segment_max = functools.partial(jax.ops.segment_max, num_segments=k)
    merged = jax.vmap(jax.vmap(segment_max))(logits, rep)
    first = slot_valid & (rep == own)
    return jnp.where(first[..., None, None], merged, 0.0), first


def _union_classes(slot_class, first, chunk: int):
    """Sorted distinct classes of all views' valid slots, padded to a multiple of `chunk`: ([B,U], valid [B,U])."""
    b = slot_class.shape[0]
    sentinel = jnp.iinfo(jnp.int32).max
    keys = jnp.sort(jnp.where(first, slot_class, sentinel).reshape(b, -1), axis=-1)
    new = jnp.concatenate([jnp.ones((b, 1), bool), keys[:, 1:] != keys[:, :-1]], axis=1) & (keys != sentinel)
    order = jnp.argsort(~new, axis=-1, stable=True)  # distinct classes first, still in ascending order
    classes = jnp.take_along_axis(keys, order, axis=-1)
    valid = jnp.take_along_axis(new, order, axis=-1)
    pad = -classes.shape[1] % chunk
    classes = jnp.pad(classes, ((0, 0), (0, pad)))
    valid = jnp.pad(valid, ((0, 0), (0, pad)))
    return jnp.where(valid, classes, 0), valid


def combine_views(logits, slot_class, slot_valid, *, mode: str = "slide", crop: int = 384, stride: int = 256,
                  canvas: int = 640, out_hw, out_shape: Sequence[int] | None = None, chunk: int = 16) -> jax.Array:
    """Per-pixel vocabulary ids from the views' slot logits (CAT-Seg's combination; compiled, static shapes).

    Args:
      logits: [B,V,K,h,w] per-slot sigmoid logits of each view (V from `num_views`).
      slot_class: [B,V,K] int vocabulary ids of the slots; slot_valid: [B,V,K] bool. Invalid slots are ignored
        whatever they hold (even NaN). Valid duplicates of a class within a view take the max logit.
      mode, crop, stride, canvas: as given to `make_views`.
      out_hw: output size per image, (h, w) or int [B,2] (may be traced: then `out_shape` is required).
      out_shape: static padded output shape (H, W) >= every out_hw, e.g. `bucket_shape(...)`; default out_hw.
      chunk: classes scored at once; peak memory is O(B * chunk * (V * crop^2 + canvas^2 + H * W)).

    Returns:
      labels [B,H,W] int32 vocabulary ids; pixels outside an image's out_hw are -1. The argmax runs over the
      union of the valid classes of the image's views; exact ties go to the smallest class id (as np.argmax
      over a dense class axis), so pixels where every candidate scores 0 get the image's smallest valid class.
      An image without any valid slot gets label 0 everywhere.
    """
    _check_mode(mode)
    logits = jnp.asarray(logits, jnp.float32)
    slot_class = jnp.asarray(slot_class, jnp.int32)
    slot_valid = jnp.asarray(slot_valid, bool)
    if logits.ndim != 5:
        raise ValueError(f"logits must be [B,V,K,h,w]; got shape {logits.shape}")
    b, v, k, h, w = logits.shape
    if slot_class.shape != (b, v, k) or slot_valid.shape != (b, v, k):
        raise ValueError(f"slot_class {slot_class.shape} and slot_valid {slot_valid.shape} must be [B,V,K] = "
                         f"{(b, v, k)} to match logits {logits.shape}")
    expected = num_views(mode, crop=crop, stride=stride, canvas=canvas)
    if v != expected:
        raise ValueError(f"logits have V={v} views but mode={mode!r} (crop={crop}, stride={stride}, "
                         f"canvas={canvas}) makes {expected}")
    if chunk <= 0:
        raise ValueError(f"chunk={chunk} must be positive")
    if out_shape is None:
        try:
            concrete = np.asarray(out_hw, np.int64).reshape(-1, 2)
        except jax.errors.TracerArrayConversionError as e:
            raise ValueError("out_hw is traced: pass a static out_shape (e.g. bucket_shape(max size))") from e
        out_shape = tuple(int(n) for n in concrete.max(axis=0))
    out_shape = tuple(int(n) for n in out_shape)
    out_sizes = _per_image_sizes(out_hw, b, "out_hw")
    return _combine_views(logits, slot_class, slot_valid, out_sizes, mode=mode, crop=int(crop), stride=int(stride),
                          canvas=int(canvas), out_shape=out_shape, chunk=int(chunk))


def _class_scores(logits, slot_class, slot_valid, out_sizes, *, mode, crop, stride, canvas, out_shape, chunk):
    """What combine_views and top_classes reduce: (num_chunks, scores) where scores(i) gives chunk i of the
    images' candidate classes, (classes [B,c] ascending, score [B,c,H,W]): the views' sigmoid probabilities
    combined as CAT-Seg does, at each image's output size; -inf for padding classes. Traced inside their jit."""
    b, v, k, h, w = logits.shape
    merged, first = _merge_duplicate_slots(logits, slot_class, slot_valid)
    union, union_valid = _union_classes(slot_class, first, chunk)
    flat_logits = merged.reshape(b, v * k, h, w)
    view_offset = (jnp.arange(v, dtype=jnp.int32) * k)[None, None, :]

    # The final resize to each image's own size (traced sizes, static padded shape).
    source_h, source_w = (canvas, canvas) if mode == "slide" else (h, w)  # whole: native logits to the output
    out_taps_y = _per_image_taps(jnp.full((b,), source_h, jnp.int32), out_sizes[:, 0], out_shape[0])
    out_taps_x = _per_image_taps(jnp.full((b,), source_w, jnp.int32), out_sizes[:, 1], out_shape[1])
    if mode == "slide":
        positions = [(y, x) for y in crop_positions(canvas, crop, stride) for x in crop_positions(canvas, crop, stride)]
        count = np.zeros((canvas, canvas), np.float32)
        for y, x in positions:
            count[y:y + crop, x:x + crop] += 1
        inv_count = jnp.asarray(1.0 / count)
        up_taps = bilinear_taps(h, crop), bilinear_taps(w, crop)
        global_taps = bilinear_taps(crop, canvas)

    def board_of(prob):
        """[B,c,V,n,n] view probabilities -> [B,c,S,S] scores before the final resize."""
        if mode == "whole":
            return prob[:, :, 0]
        crops_sum = jnp.zeros((*prob.shape[:2], canvas, canvas), jnp.float32)
        for i, (y, x) in enumerate(positions):
            crops_sum = crops_sum.at[:, :, y:y + crop, x:x + crop].add(prob[:, :, i])
        global_view = _resize_2d(prob[:, :, -1], global_taps, global_taps)
        return 0.5 * (crops_sum * inv_count) + 0.5 * global_view

    def scores(i):
        classes = jax.lax.dynamic_slice_in_dim(union, i * chunk, chunk, axis=1)  # [B,c]
        valid = jax.lax.dynamic_slice_in_dim(union_valid, i * chunk, chunk, axis=1)
        match = (classes[:, :, None, None] == slot_class[:, None]) & first[:, None]  # [B,c,V,K]
        present = match.any(-1) & valid[:, :, None]  # [B,c,V]
        slot = jnp.argmax(match, axis=-1).astype(jnp.int32) + view_offset
        z = jnp.take_along_axis(flat_logits, slot.reshape(b, -1)[:, :, None, None], axis=1)
        z = z.reshape(b, chunk, v, h, w)
        if mode == "slide":  # upsample to the crop before the sigmoid (CAT-Seg)
            z = _resize_2d(z, *up_taps)
        prob = jnp.where(present[..., None, None], jax.nn.sigmoid(z), 0.0)
        score = jax.vmap(_resize_2d)(board_of(prob), out_taps_y, out_taps_x)  # [B,c,H,W]
        return classes, jnp.where(valid[:, :, None, None], score, -jnp.inf)

    num_chunks = (jnp.max(jnp.sum(union_valid, axis=1)) + chunk - 1) // chunk  # only chunks holding classes
    return num_chunks, scores


def _inside(out_sizes, out_shape):
    """[B,H,W] True on each image's own pixels of the padded output."""
    return ((jnp.arange(out_shape[0])[None, :, None] < out_sizes[:, 0, None, None])
            & (jnp.arange(out_shape[1])[None, None, :] < out_sizes[:, 1, None, None]))


@functools.partial(jax.jit, static_argnames=("mode", "crop", "stride", "canvas", "out_shape", "chunk"))
def _combine_views(logits, slot_class, slot_valid, out_sizes, *, mode, crop, stride, canvas, out_shape, chunk):
    num_chunks, scores = _class_scores(logits, slot_class, slot_valid, out_sizes, mode=mode, crop=crop,
                                       stride=stride, canvas=canvas, out_shape=out_shape, chunk=chunk)
    b = logits.shape[0]

    def best_of_chunk(i, carry):
        best, labels = carry
        classes, score = scores(i)
        arg = jnp.argmax(score, axis=1)
        chunk_best = jnp.max(score, axis=1)
        chunk_labels = jnp.take_along_axis(classes, arg.reshape(b, -1), axis=1).reshape(arg.shape)
        better = chunk_best > best  # strict: earlier (smaller) class ids win exact ties
        return jnp.where(better, chunk_best, best), jnp.where(better, chunk_labels, labels)

    init = (jnp.full((b, *out_shape), -jnp.inf, jnp.float32), jnp.zeros((b, *out_shape), jnp.int32))
    _, labels = jax.lax.fori_loop(0, num_chunks, best_of_chunk, init)
    return jnp.where(_inside(out_sizes, out_shape), labels, -1)


def top_classes(logits, slot_class, slot_valid, *, mode: str = "slide", crop: int = 384, stride: int = 256,
                canvas: int = 640, out_hw, out_shape: Sequence[int] | None = None, chunk: int = 16,
                top: int = 5) -> tuple[jax.Array, jax.Array]:
    """Each pixel's `top` best classes with their scores: the per-class scores that `combine_views` argmaxes
    (the views' sigmoid probabilities combined as CAT-Seg does, in 0..1), ranked instead of argmaxed.

    Arguments as `combine_views` (out_hw must be concrete unless `out_shape` is given). Returns
    (classes int32 [B,H,W,top], scores float32 [B,H,W,top]), best first, exact ties to the smaller class id,
    so classes[..., 0] equals combine_views' labels inside each image (an image with valid slots). Ranks past
    an image's candidate classes, and pixels outside its out_hw, hold class -1 with score -inf.
    """
    _check_mode(mode)
    logits = jnp.asarray(logits, jnp.float32)
    b, v, k = logits.shape[:3]
    if logits.ndim != 5 or np.shape(slot_class) != (b, v, k) or np.shape(slot_valid) != (b, v, k):
        raise ValueError(f"logits {logits.shape} must be [B,V,K,h,w] and slot_class {np.shape(slot_class)} / "
                         f"slot_valid {np.shape(slot_valid)} [B,V,K]")
    if out_shape is None:
        out_shape = np.asarray(out_hw, np.int64).reshape(-1, 2).max(axis=0)
    return _top_classes(logits, jnp.asarray(slot_class, jnp.int32), jnp.asarray(slot_valid, bool),
                        _per_image_sizes(out_hw, b, "out_hw"), mode=mode, crop=int(crop), stride=int(stride),
                        canvas=int(canvas), out_shape=tuple(int(n) for n in out_shape), chunk=int(chunk),
                        top=int(top))


@functools.partial(jax.jit, static_argnames=("mode", "crop", "stride", "canvas", "out_shape", "chunk", "top"))
def _top_classes(logits, slot_class, slot_valid, out_sizes, *, mode, crop, stride, canvas, out_shape, chunk, top):
    num_chunks, scores = _class_scores(logits, slot_class, slot_valid, out_sizes, mode=mode, crop=crop,
                                       stride=stride, canvas=canvas, out_shape=out_shape, chunk=chunk)

    def top_of_chunk(i, carry):
        best, best_ids = carry  # [B,H,W,top]
        classes, score = scores(i)
        score = jnp.moveaxis(score, 1, -1)  # [B,H,W,c]
        # The running best come first: lax.top_k keeps the lower index on exact ties, i.e. the smaller class.
        values = jnp.concatenate([best, score], axis=-1)
        ids = jnp.concatenate([best_ids, jnp.broadcast_to(classes[:, None, None, :], score.shape)], axis=-1)
        best, order = jax.lax.top_k(values, top)
        return best, jnp.take_along_axis(ids, order, axis=-1)

    b = logits.shape[0]
    init = (jnp.full((b, *out_shape, top), -jnp.inf, jnp.float32), jnp.full((b, *out_shape, top), -1, jnp.int32))
    best, classes = jax.lax.fori_loop(0, num_chunks, top_of_chunk, init)
    keep = _inside(out_sizes, out_shape)[..., None] & (best > -jnp.inf)
    return jnp.where(keep, classes, -1), jnp.where(keep, best, -jnp.inf)


# --------------------------------------------------------------------------------------------------
# Convenience: the whole chain
# --------------------------------------------------------------------------------------------------

ForwardFn = Callable[[jax.Array], dict]


def split_views(outputs: dict, batch: int, views: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Check a forward's outputs (logits [B*V,K,h,w], slot_class/slot_valid [B*V,K]) and reshape to [B,V,...]."""
    missing = {"logits", "slot_class", "slot_valid"} - set(outputs)
    if missing:
        raise ValueError(f"the forward function must return a dict with logits, slot_class, slot_valid; "
                         f"missing {sorted(missing)}")
    logits, slot_class, slot_valid = outputs["logits"], outputs["slot_class"], outputs["slot_valid"]
    n = batch * views
    if logits.ndim != 4 or logits.shape[0] != n:
        raise ValueError(f"forward returned logits of shape {logits.shape}; expected [{n},K,h,w] "
                         f"({batch} images x {views} views)")
    k = logits.shape[1]
    if slot_class.shape != (n, k) or slot_valid.shape != (n, k):
        raise ValueError(f"forward returned slot_class {slot_class.shape} / slot_valid {slot_valid.shape}; "
                         f"expected [{n},{k}]")
    return (logits.reshape(batch, views, *logits.shape[1:]), slot_class.reshape(batch, views, k),
            slot_valid.reshape(batch, views, k))


def predict_labels(forward: ForwardFn, images, *, mode: str = "slide", crop: int = 384, stride: int = 256,
                   canvas: int = 640, image_hw=None, out_hw=None, out_shape: Sequence[int] | None = None,
                   chunk: int = 16, finish: Callable[[jax.Array, jax.Array], jax.Array] | None = None):
    """make_views -> forward -> combine_views, for one image or a batch.

    Args:
      forward: views [N,crop,crop,3] float 0..255 -> dict(logits [N,K,h,w], slot_class [N,K], slot_valid [N,K]).
      images: [H,W,3] or [B,H,W,3] RGB (uint8 or float 0..255); a batch may be zero-padded with `image_hw`.
      image_hw: valid (h, w) per image (default: the array's size).
      out_hw: label-map size per image (default: image_hw), e.g. the original size when `images` were resized.
      out_shape: static padded output shape; default the largest out_hw (pass `bucket_shape(...)` to share one
        compiled program between many sizes).
      finish: (labels [B,H,W] on device, out_hw [B,2]) -> labels, applied before the labels leave the device
        (the Segmenter's tag validation on the final prediction).

    Returns:
      one [h,w] int32 label map for a single image, a list of them for a batch (each cropped to its out_hw).
    """
    arr = images if isinstance(images, jax.Array) else np.asarray(images)  # a device array stays where it is
    single = arr.ndim == 3
    if single:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must be [H,W,3] or [B,H,W,3] RGB; got shape {np.shape(images)}")
    b, hp, wp, _ = arr.shape
    sizes = np.broadcast_to(np.asarray((hp, wp) if image_hw is None else image_hw, np.int64).reshape(-1, 2), (b, 2))
    outs = sizes if out_hw is None else np.broadcast_to(np.asarray(out_hw, np.int64).reshape(-1, 2), (b, 2))
    if out_shape is None:
        out_shape = tuple(int(n) for n in outs.max(axis=0))
    geometry = dict(mode=mode, crop=crop, stride=stride, canvas=canvas)
    views = make_views(arr, image_hw=jnp.asarray(sizes, jnp.int32), **geometry)
    logits, slot_class, slot_valid = split_views(forward(views), b, num_views(**geometry))
    out_sizes = jnp.asarray(outs, jnp.int32)
    labels = combine_views(logits, slot_class, slot_valid, out_hw=out_sizes, out_shape=tuple(out_shape), chunk=chunk,
                           **geometry)
    labels = np.asarray(labels if finish is None else finish(labels, out_sizes))
    result = [labels[i, :outs[i, 0], :outs[i, 1]] for i in range(b)]
    return result[0] if single else result
