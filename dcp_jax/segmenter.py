"""One inference path for evaluation, prediction and the Python API: images + vocabulary -> label maps.

    seg = Segmenter.from_workdir("runs/b16")            # the trained model (latest checkpoint)
    seg.set_vocabulary(["cat", "dog", "grass"])
    labels = seg.segment([image])[0]                    # int32 [H,W] ids into the vocabulary

Every image goes through the test-time resize (short side `eval.short_side`), the views of
`eval.mode` (CAT-Seg's slide window or the whole image), the model per view (DCS per view), and the
combination of the views' slots at the original size (`dcp_jax.inference`). `evaluate` and `predict`
both call `segment`, so they give the same labels for the same image.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dcp_jax import checkpoint as ckpt_lib
from dcp_jax import inference
from dcp_jax import text as text_lib
from dcp_jax.data import transforms
from dcp_jax.models import clip as clip_lib
from dcp_jax.models import dcp

TOKENIZER_DIR = "tokenizer"
CLIP_CONFIG_NAME = "clip_config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "bpe_simple_vocab_16e6.txt.gz")


# ---------------------------------------------------------------------------------------------
# What a workdir needs for inference besides the checkpoint (written by the trainer)
# ---------------------------------------------------------------------------------------------

def save_inference_assets(workdir: Path, clip_path: Path, clip_config: clip_lib.CLIPConfig) -> None:
    """Copy the tokenizer files and the CLIP architecture into W, so W alone suffices for inference."""
    ckpt_lib.write_json(workdir / CLIP_CONFIG_NAME, clip_config.to_hf())
    source = clip_path if clip_path.is_dir() else clip_path.parent
    target = workdir / TOKENIZER_DIR
    target.mkdir(exist_ok=True)
    for name in _TOKENIZER_FILES:
        if (source / name).exists() and not (target / name).exists():
            tmp = target / f".{name}.tmp"
            shutil.copyfile(source / name, tmp)
            os.replace(tmp, target / name)


def load_clip_config(workdir: Path) -> clip_lib.CLIPConfig:
    path = workdir / CLIP_CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: {workdir} was not written by dcp_jax.train (it saves the "
                                "CLIP architecture there at start).")
    return clip_lib.CLIPConfig.from_hf(json.loads(path.read_text()))


def restore_model(workdir: str | os.PathLike, config: ml_collections.ConfigDict | None = None,
                  checkpoint: str | int | None = None) -> tuple[dcp.DCPCLIP, ml_collections.ConfigDict, int]:
    """The trained model of a workdir: (model, config, step). `checkpoint`: None (latest), a step or a step dir."""
    workdir = Path(workdir)
    config = ckpt_lib.load_config(workdir) if config is None else config
    directory, step = ckpt_lib.resolve_checkpoint(workdir, checkpoint)
    clip_config = load_clip_config(workdir)
    # Abstract model (no allocation) whose Param leaves are the restore targets, placed on this
    # process's first device: without a target sharding Orbax reuses the saved one, which fails when
    # the checkpoint was written on another number of devices (e.g. 4 GPUs, restored on 1).
    model = nnx.eval_shape(lambda: dcp.DCPCLIP(
        config, clip_config, rngs=nnx.Rngs(0),
        clip_model=clip_lib.abstract_model(clip_config, dcp.compute_dtype(config))))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    nnx.update(model, jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                                   nnx.state(model, nnx.Param)))
    checkpointer = ckpt_lib.Checkpointer(directory, read_only=True)
    try:
        checkpointer.restore_model(step, model)
    finally:
        checkpointer.close()
    return model, config, step


# ---------------------------------------------------------------------------------------------
# The segmenter
# ---------------------------------------------------------------------------------------------

class Segmenter:
    """Segments images against a vocabulary with a trained DCP-CLIP model or the zero-shot CLIP baseline."""

    def __init__(self, model, config: ml_collections.ConfigDict, tokenizer, *,
                 train_classes: Sequence[str] | None = None, zero_shot: bool = False, text_cache_dir=None):
        self.config = config
        self.tokenizer = tokenizer
        self.zero_shot = zero_shot
        self.train_classes = list(train_classes) if train_classes is not None else None
        self.text_cache_dir = text_cache_dir
        self.clip = model if zero_shot else model.clip
        # Params replicated over this host's devices; the views of a batch are split over them.
        self.mesh = Mesh(np.array(jax.local_devices()), ("data",))
        self._graphdef, state = nnx.split(model)
        self._state = jax.device_put(_host_local(state), NamedSharding(self.mesh, PartitionSpec()))
        self.class_names: list[str] | None = None
        self._forward = None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_workdir(cls, workdir: str | os.PathLike, config: ml_collections.ConfigDict | None = None,
                     checkpoint: str | int | None = None) -> "Segmenter":
        workdir = Path(workdir)
        model, config, step = restore_model(workdir, config, checkpoint)
        seg = cls(model, config, text_lib.load_tokenizer(workdir / TOKENIZER_DIR),
                  train_classes=ckpt_lib.load_train_classes(workdir))
        seg.step = step
        seg.checkpoint_dir = str(ckpt_lib.resolve_checkpoint(workdir, checkpoint)[0] / str(step))
        return seg

    @classmethod
    def from_clip(cls, clip_path: str | os.PathLike, config: ml_collections.ConfigDict) -> "Segmenter":
        """The zero-shot baseline: dense CLIP similarity with no trained head (the floor to beat)."""
        clip_model, _ = clip_lib.load_clip(clip_path, image_size=config.clip.image_size,
                                           dtype=dcp.compute_dtype(config))
        seg = cls(clip_model, config, text_lib.load_tokenizer(clip_path), zero_shot=True)
        seg.step = 0
        return seg

    # -- vocabulary -----------------------------------------------------------------------------
    def set_vocabulary(self, class_names: Sequence[str]) -> None:
        """Embed the vocabulary (cached on disk) and prepare the compiled forward for it."""
        class_names = [str(c) for c in class_names]
        if not class_names or any(not c.strip() for c in class_names):
            raise ValueError("the vocabulary is empty or contains an empty class name; give at least one "
                             "non-empty class name")
        if class_names == self.class_names:
            return
        text_embeds = text_lib.embed_vocabulary(
            self.clip, self.tokenizer, class_names, self.config.text.templates,
            batch_size=self.config.text.batch_size, cache_dir=self.text_cache_dir)
        self.class_names = class_names
        self._text_embeds = jax.device_put(jnp.asarray(text_embeds), NamedSharding(self.mesh, PartitionSpec()))
        num_slots = int(self.config.eval.num_slots)
        if self.zero_shot:
            model = nnx.merge(self._graphdef, self._state)
            self._forward = inference.zero_shot_forward(model, self._text_embeds, num_slots=num_slots,
                                                        clip_image_size=int(self.config.clip.image_size))
            return
        seen = None
        if self.config.model.tv.enabled and self.train_classes is not None:
            seen = jnp.asarray(dcp.seen_mask(class_names, self.train_classes))
        graphdef = self._graphdef

        @jax.jit
        def forward(state, views, text_embeds):
            model = nnx.merge(graphdef, state)
            out = model(views, text_embeds, num_slots=num_slots, seen=seen, train=False)
            return {k: out[k] for k in ("logits", "slot_class", "slot_valid")}

        self._forward = lambda views: forward(self._state, views, self._text_embeds)

    # -- segmentation ---------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return max(1, int(self.config.eval.batch_size)) * len(self.mesh.devices.flat)

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
        if self._forward is None:
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
        labels = inference.predict_labels(self._sharded_forward, batch, image_hw=in_hw,
                                          out_hw=np.array(out_sizes, np.int32), out_shape=out_shape,
                                          **self.geometry())
        return labels[:n]

    def _sharded_forward(self, views):
        if views.shape[0] % len(self.mesh.devices.flat) == 0:
            views = jax.device_put(views, NamedSharding(self.mesh, PartitionSpec("data")))
        return self._forward(views)


def _host_local(tree):
    """Global replicated arrays (multi-host training) -> this host's copy, usable by host-local programs."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else a, tree)
