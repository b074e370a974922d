"""One inference path for evaluation, prediction and the Python API: images + vocabulary -> label maps.

    seg = Segmenter.from_workdir("runs/b16")            # the trained model (latest checkpoint)
    seg.set_vocabulary(["cat", "dog", "grass"])
    labels = seg.segment([image])[0]                    # int32 [H,W] ids into the vocabulary

Every image goes through the test-time resize (short side `eval.short_side`), the views of
`eval.mode` (CAT-Seg's slide window or the whole image), the two compiled stages of
dcp_jax/forward.py (CLIP + selection on every view; the head on the slot bucket the batch needs),
and the combination of the views at the original size (dcp_jax/inference.py). `evaluate` and
`predict` both call `segment`, so they give the same labels for the same image.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dcp_jax import checkpoint as ckpt_lib
from dcp_jax import config as config_lib
from dcp_jax import distributed, forward, inference, runtime
from dcp_jax import text as text_lib
from dcp_jax.data import transforms
from dcp_jax.models import clip as clip_lib
from dcp_jax.models import dcp, selection


CLASS_PADS = (16, 64, 256, 1024)  # with pad_classes, a vocabulary is padded to the first that holds it


def padded_count(num_classes: int) -> int:
    """The rows a vocabulary of `num_classes` is padded to: the smallest of CLASS_PADS that holds it (itself
    beyond the largest)."""
    return next((p for p in CLASS_PADS if p >= num_classes), num_classes)


class Segmenter:
    """Segments images against a vocabulary with a trained DCP-CLIP model or the zero-shot CLIP baseline.

    `model`: a DCPCLIP (or, with zero_shot=True, a CLIPModel). Its parameters may live anywhere (the
    trainer's mesh, other hosts): they are copied onto this host's devices.
    `pad_classes`: pad every vocabulary with masked rows to `padded_count(C)` (the class count is a static shape
    of every compiled program, so without it each new count compiles them all again; the serve page pads).
    Padding rows are never selected, decoded as a valid slot, ranked by tag validation or labelled: the labels
    are those of the unpadded vocabulary.
    """

    def __init__(self, model, config: ml_collections.ConfigDict, tokenizer, *,
                 train_classes: Sequence[str] | None = None, zero_shot: bool = False, text_cache_dir=None,
                 step: int = 0, checkpoint_dir: str = "", pad_classes: bool = False):
        self.config = config
        self.tokenizer = tokenizer
        self.zero_shot = zero_shot
        self.train_classes = list(train_classes) if train_classes is not None else None
        self.text_cache_dir = text_cache_dir
        self.step = int(step)
        self.checkpoint_dir = str(checkpoint_dir)
        self.mesh = distributed.local_mesh(config.mesh.fsdp)
        self._graphdef, params = nnx.split(model)
        self._params = distributed.to_mesh(params, self.mesh, config.mesh)
        local_model = nnx.merge(self._graphdef, self._params)
        # The vocabulary's template embeddings in float32, whatever the model computes in.
        self._text_model = clip_lib.with_compute(local_model) if zero_shot else local_model.frozen_text_clip()
        self.class_names: list[str] | None = None
        self.pad_classes = bool(pad_classes)
        self._class_valid = None  # [rows] bool when the vocabulary is padded
        # {"selected", "bucket", "relabelled" (slots tag validation relabelled in the batch's images),
        #  "dropped" (per image: selected classes beyond the cap)} of the last batch (not for zero-shot)
        self.last_slots: dict | None = None
        runtime.enable_compilation_cache()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_workdir(cls, workdir: str | os.PathLike, config: ml_collections.ConfigDict | None = None,
                     checkpoint: str | int | None = None, *, pad_classes: bool = False) -> "Segmenter":
        model, config, step, checkpoint_dir = ckpt_lib.restore_model(workdir, config, checkpoint)
        return cls(model, config, text_lib.load_tokenizer(ckpt_lib.tokenizer_dir(workdir)),
                   train_classes=ckpt_lib.load_train_classes(workdir), step=step, checkpoint_dir=checkpoint_dir,
                   pad_classes=pad_classes)

    @classmethod
    def from_clip(cls, clip_path: str | os.PathLike, config: ml_collections.ConfigDict, *,
                  pad_classes: bool = False) -> "Segmenter":
        """The zero-shot baseline: dense CLIP similarity with no trained head (the floor to beat)."""
        clip_model, _ = clip_lib.load_clip(clip_path, image_size=config.clip.image_size,
                                           dtype=dcp.compute_dtype(config))
        return cls(clip_model, config, text_lib.load_tokenizer(clip_path), zero_shot=True, pad_classes=pad_classes)

    # -- what benchmarks measure ---------------------------------------------------------------
    def model(self):
        """The model with its parameters on this host's devices (a DCPCLIP, or the CLIP for zero-shot)."""
        return nnx.merge(self._graphdef, self._params)

    @property
    def text_embeddings(self) -> jax.Array:
        """The vocabulary's template embeddings [C, templates, D] in float32, as selection reads them."""
        if self.class_names is None:
            raise RuntimeError("call set_vocabulary(class_names) first")
        return self._text_embeds[:len(self.class_names)] if self.pad_classes else self._text_embeds

    @property
    def num_rows(self) -> int:
        """The vocabulary's rows in the compiled programs: its size, or the padded size."""
        return padded_count(len(self.class_names)) if self.pad_classes else len(self.class_names)

    # -- vocabulary -----------------------------------------------------------------------------
    def set_vocabulary(self, class_names: Sequence[str]) -> None:
        """Embed the vocabulary (cached on disk); a no-op for the vocabulary already set."""
        class_names = [str(c) for c in class_names]
        if not class_names or any(not c.strip() for c in class_names):
            raise ValueError("the vocabulary is empty or contains an empty class name; give at least one "
                             "non-empty class name")
        if class_names == self.class_names:
            return
        replicated = distributed.replicated(self.mesh)
        count = len(class_names)
        rows = padded_count(count) if self.pad_classes else count

        def put(x, fill=0):  # onto the devices, padded to `rows` (zero embeddings; masked everywhere they matter)
            x = np.asarray(x)  # padded on the host: an eager jnp.pad would compile a program per class count
            if rows > len(x):
                x = np.pad(x, [(0, rows - len(x))] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
            return jax.device_put(x, replicated)

        text = text_lib.embed_vocabulary(self._text_model, self.tokenizer, class_names, self.config.text.templates,
                                         batch_size=self.config.text.batch_size, cache_dir=self.text_cache_dir)
        self._text_embeds = put(text)
        self._cost_text = self._text_embeds  # what the head's cost volume reads
        self._class_valid = put(np.ones(count, bool), False) if self.pad_classes else None
        if not self.zero_shot and config_lib.text_finetune(self.config) == "cost":
            # The cost volume was trained on the trained text tower's embeddings of each class's first synonym
            # (text.template_tokens, as CAT-Seg): the same text here. Selection keeps the frozen synonym mean.
            trained = clip_lib.with_compute(nnx.merge(self._graphdef, self._params).clip, jnp.float32)
            cost = text_lib.embed_vocabulary(trained, self.tokenizer, class_names, self.config.text.templates,
                                             batch_size=self.config.text.batch_size, cache_dir=self.text_cache_dir,
                                             synonyms="first")
            self._cost_text = put(cost)
        if not self.zero_shot:
            # Padded first, so the eager mean's shape (a program of its own) is the padded one; per row, the same.
            self._guidance_text = put(self._guidance(class_names, np.asarray(put(text))))
            seen = (text_lib.seen_mask(class_names, self.train_classes) if self.train_classes is not None
                    else np.ones(len(class_names), bool))  # no training vocabulary known: TV has nothing to check
            self._seen = put(seen, True)
        self.class_names = class_names

    def _guidance(self, class_names: list[str], text: np.ndarray) -> jax.Array:
        """The slots' guidance text for the whole vocabulary: T_bar, or the re-encoded prompts."""
        if not dcp.reencodes_text(self.config):
            return selection.mean_text_embedding(jnp.asarray(text))
        num_context = self.config.model.guidance.prompt_tokens if self.config.model.guidance.prompt == "context" else 0
        ids, mask = text_lib.guidance_tokens(self.tokenizer, class_names, num_context=num_context,
                                             context_length=self._text_model.config.text.max_position_embeddings)
        rows = max(1, int(self.config.text.batch_size))
        parts = [forward.guidance_embeddings(self._graphdef, self._params, ids[i:i + rows], mask[i:i + rows])
                 for i in range(0, len(class_names), rows)]
        return jnp.concatenate(parts, axis=0)

    # -- segmentation ---------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return max(1, int(self.config.eval.batch_size)) * self.mesh.devices.size

    def geometry(self) -> dict:
        e = self.config.eval
        return dict(mode=e.mode, crop=int(self.config.train.crop_size), stride=int(e.slide_stride),
                    canvas=int(e.slide_canvas))

    def segment(self, images: Sequence[np.ndarray], *, resized: bool = False,
                original_sizes: Sequence[tuple[int, int]] | None = None) -> list[np.ndarray]:
        """Label maps (int32 vocabulary ids) at each image's original size.

        `images`: uint8 RGB arrays. With `resized=True` they already had the test-time resize and
        `original_sizes` gives the size to predict at (the evaluation pipeline does that resize).
        """
        if self.class_names is None:
            raise RuntimeError("call set_vocabulary(class_names) before segment()")
        images = list(images)
        if resized:
            if original_sizes is None or len(original_sizes) != len(images):
                raise ValueError("resized=True needs original_sizes, one (h, w) per image")
            sizes = [tuple(map(int, s)) for s in original_sizes]
        else:
            sizes = [tuple(im.shape[:2]) for im in images]
            images = [transforms.eval_resize(im, self.config.eval.short_side) for im in images]
        results = []
        for start in range(0, len(images), self.batch_size):
            results += self._segment_batch(images[start:start + self.batch_size],
                                           sizes[start:start + self.batch_size])
        return results

    def _segment_batch(self, images: list[np.ndarray], out_sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        n = len(images)
        pad = self.batch_size - n  # a fixed batch size keeps one compiled program
        images = images + [images[-1]] * pad
        out_sizes = out_sizes + [out_sizes[-1]] * pad
        in_hw = np.array([im.shape[:2] for im in images], np.int32)
        # Bucketed static shapes: a handful of compiled programs serve every image size.
        in_shape = inference.bucket_shape(in_hw.max(axis=0))
        out_shape = inference.bucket_shape(np.max(out_sizes, axis=0))
        batch = np.zeros((len(images), *in_shape, 3), np.uint8)
        for i, im in enumerate(images):
            batch[i, :im.shape[0], :im.shape[1]] = im
        # The images split over this host's devices from the start: every stage (views, CLIP, head,
        # combination) runs on all of them.
        batch = jax.device_put(batch, distributed.batch_sharding(self.mesh))
        self.last_slots = None
        labels = inference.predict_labels(self.forward_views, batch, image_hw=in_hw,
                                          out_hw=np.array(out_sizes, np.int32), out_shape=out_shape,
                                          finish=functools.partial(self._validate_final, num_images=n),
                                          **self.geometry())
        if self.last_slots is not None:  # the padding images do not count
            self.last_slots["dropped"] = self.last_slots["dropped"][:n]
        return labels[:n]

    def forward_views(self, views) -> dict:
        """Views [B*V,S,S,3] (image-major) -> logits [B*V,K,h,w], slot_class, slot_valid [B*V,K].

        Records the bucket used, the largest selected count and the slots tag validation relabelled in
        `self.last_slots` (for benchmarks and the evaluation JSON)."""
        if views.shape[0] % self.mesh.devices.size == 0:
            views = jax.device_put(views, distributed.batch_sharding(self.mesh))
        if self.zero_shot:
            return forward.zero_shot(self._graphdef, self._params, views, self._text_embeds,
                                     num_slots=int(self.config.eval.num_slots), class_valid=self._class_valid)
        per_image = inference.num_views(**self.geometry())
        cap = forward.bucket_cap(self.config.eval.num_slots, self.num_rows)
        features, ranked = forward.encode_select(self._graphdef, self._params, views, self._text_embeds,
                                                 views_per_image=per_image, max_slots=cap,
                                                 class_valid=self._class_valid)
        selected_per_image, dropped = (np.asarray(a) for a in jax.device_get((ranked["dcs_selected"],
                                                                             ranked["dcs_dropped"])))
        selected = int(selected_per_image.max())
        k = forward.slot_bucket(selected, cap)
        out = forward.decode(self._graphdef, self._params, features, self._cost_text, self._guidance_text,
                             ranked["slot_class"], ranked["slot_valid"], self._seen, views_per_image=per_image,
                             num_slots=k, pad_to=cap, tag_validation=False)
        # Tag validation runs on the final label map (_validate_final): each image's candidates and the
        # dense features of its whole-image view (the last view in slide mode, the only one in whole mode).
        self._tv_inputs = (ranked["slot_class"][:, :k], ranked["slot_valid"][:, :k],
                           features["dense"][per_image - 1::per_image])
        self.last_slots = {"selected": selected, "bucket": k, "relabelled": 0, "dropped": dropped}
        return out

    def _validate_final(self, labels: jax.Array, out_sizes: jax.Array, *, num_images: int) -> jax.Array:
        """Tag validation on the combined label maps (MODEL.md section 5); counts the slots it relabelled in
        the first `num_images` images (the rest are the batch's padding)."""
        if self.zero_shot or not self.config.model.tv.enabled:
            return labels
        slot_class, slot_valid, dense = self._tv_inputs
        labels, relabelled = forward.validate_labels(labels, out_sizes, slot_class, slot_valid, dense,
                                                     self._text_embeds, self._seen, k=int(self.config.model.tv.k),
                                                     class_valid=self._class_valid)
        self.last_slots["relabelled"] = int(np.asarray(jax.device_get(relabelled))[:num_images].sum())
        return labels

    # -- one image, explained (the serve page) ---------------------------------------------------
    def segment_details(self, image: np.ndarray, *, top: int = 5) -> dict:
        """One image's label map, the same as `segment([image])[0]`, with what made it:

          labels       int32 [H,W] vocabulary ids
          top_classes  int32 [H,W,top] each pixel's best classes by the views' combined score (before tag
                       validation), best first, -1 past the image's candidates; top_scores float32 [H,W,top]
                       their scores (0..1)
          selected     the vocabulary ids decoded for the image, ranked as selection ranked them (None for
                       zero-shot); dropped: selected classes beyond the largest bucket, never decoded
          bucket       K, the slot bucket the head ran on (None for zero-shot)
          relabels     [(from id, to id, pixels)]: the regions tag validation relabelled
          before_tv    int32 [H,W] the labels before tag validation (the same as labels when it is off)
        """
        if self.class_names is None:
            raise RuntimeError("call set_vocabulary(class_names) before segment_details()")
        kept = {}

        def forward(views):
            kept["views"] = self.forward_views(views)
            return kept["views"]

        def finish(labels, out_sizes):
            kept["before"] = labels
            return self._validate_final(labels, out_sizes, num_images=1)

        # _segment_batch's path for one image (padded to the batch size: the same compiled programs).
        size = tuple(image.shape[:2])
        resized = transforms.eval_resize(image, self.config.eval.short_side)
        in_shape, out_shape = inference.bucket_shape(resized.shape[:2]), inference.bucket_shape(size)
        batch = np.zeros((self.batch_size, *in_shape, 3), np.uint8)
        batch[:, :resized.shape[0], :resized.shape[1]] = resized
        batch = jax.device_put(batch, distributed.batch_sharding(self.mesh))
        in_hw = np.array([resized.shape[:2]] * self.batch_size, np.int32)
        out_hw = np.array([size] * self.batch_size, np.int32)
        self.last_slots = None
        labels = inference.predict_labels(forward, batch, image_hw=in_hw, out_hw=out_hw, out_shape=out_shape,
                                          finish=finish, **self.geometry())[0]
        per_image = inference.num_views(**self.geometry())
        logits, slot_class, slot_valid = inference.split_views(kept["views"], self.batch_size, per_image)
        classes, scores = inference.top_classes(logits[:1], slot_class[:1], slot_valid[:1], out_hw=out_hw[:1],
                                                out_shape=out_shape, top=top, **self.geometry())
        h, w = size
        before = np.asarray(kept["before"])[0, :h, :w]
        changed = before != labels
        pairs, counts = np.unique(np.stack([before[changed], labels[changed]]), axis=1, return_counts=True)
        first_view = np.asarray(jax.device_get(slot_class[0, 0])), np.asarray(jax.device_get(slot_valid[0, 0]))
        slots = self.last_slots
        return {"labels": labels, "top_classes": np.asarray(classes)[0, :h, :w],
                "top_scores": np.asarray(scores)[0, :h, :w],
                "selected": None if slots is None else [int(c) for c in first_view[0][first_view[1]]],
                "dropped": 0 if slots is None else int(slots["dropped"][0]),
                "bucket": None if slots is None else int(slots["bucket"]),
                "relabels": [(int(a), int(b), int(n)) for (a, b), n in zip(pairs.T, counts)], "before_tv": before}
