"""grain pipelines: the training stream (per-host batches) and the evaluation source (per image).

Training stream, as one global sequence that every host slices:

    range(N).seed(seed) -> shuffle (new order each epoch) -> repeat (infinite)
      -> random_map(read + augment; rng from (seed, global position))
      -> [start_position:] -> [shard_index::shard_count] -> batch(global_batch // shard_count, drop_remainder)
      -> to_iter_dataset -> mp_prefetch(num_workers)            (optional worker processes)

Sharding after the augmentation map keeps every sample's rng tied to its global position, so
hosts never share augmentation draws, and the union of the hosts' k-th batches is the k-th
global batch whatever the host count. The trainer resumes the stream from the global sample
position it saved (`start_position`), not from a per-host iterator state, so a run stopped on
N hosts continues the same global sequence on any other number of hosts (or another batch size).
"""

from __future__ import annotations

import logging

import grain
import numpy as np

from dcp_jax.data import transforms
from dcp_jax.data.sources import DatasetError

__all__ = ["train_dataset", "eval_dataset", "make_global_batch", "shard_for_host"]

log = logging.getLogger(__name__)


class _ReadAndAugment(grain.transforms.RandomMap):
    """index -> {"image", "label", "bad"}: reads source[index] and applies the training augmentation.

    With skip_bad_samples an unreadable sample is replaced by the next readable one in source
    order and marked bad=1; without it the DatasetError (naming the file) propagates.
    """

    def __init__(self, source, crop_size: int, skip_bad_samples: bool, image_pad_value: int,
                 color_jitter: bool):
        self.source = source
        self.crop_size = crop_size
        self.skip_bad_samples = skip_bad_samples
        self.image_pad_value = image_pad_value
        self.color_jitter = color_jitter

    def _read(self, index: int) -> tuple[dict, int]:
        try:
            return self.source[index], 0
        except DatasetError as error:
            if not self.skip_bad_samples:
                raise
            log.warning("skipping bad sample %d: %s", index, error)
        n = len(self.source)
        for offset in range(1, n):
            try:
                return self.source[(index + offset) % n], 1
            except DatasetError as error:
                log.warning("skipping bad sample %d: %s", (index + offset) % n, error)
        raise DatasetError(f"no readable sample in {getattr(self.source, 'name', 'the dataset')} "
                           f"({n} items, all failed)")

    def random_map(self, index, rng: np.random.Generator) -> dict:
        sample, bad = self._read(int(index))
        image, label = transforms.train_augment(sample["image"], sample["label"], self.crop_size, rng,
                                                color_jitter=self.color_jitter,
                                                image_pad_value=self.image_pad_value)
        return {"image": image, "label": label, "bad": np.int32(bad)}


def train_dataset(source, *, crop_size: int, global_batch_size: int, seed: int, num_workers: int = 0,
                  skip_bad_samples: bool = False, shard_index: int | None = None,
                  shard_count: int | None = None, start_position: int = 0, read_threads: int = 2,
                  prefetch_batches: int = 4,
                  image_pad_value: int = transforms.IMAGE_PAD_VALUE,
                  color_jitter: bool = True) -> grain.IterDataset:
    """The infinite, shuffled, augmented training stream of per-host batches.

    Yields {"image": uint8 [b, S, S, 3], "label": int32 [b, S, S] (ignore -1),
    "bad": int32 [b] (1 = substituted after a read error)} with S = crop_size and
    b = global_batch_size // shard_count.

    Args:
      source: a random-access dataset (e.g. `open_dataset(...)`) with items {"image", "label"}.
      crop_size: training crop S (CAT-Seg: 384).
      global_batch_size: batch over all hosts; must be divisible by shard_count.
      seed: seeds the per-epoch shuffle and every sample's augmentation.
      num_workers: grain worker processes per host (0 = read in this process, with threads).
      skip_bad_samples: replace unreadable samples by the next readable one (marked "bad").
      shard_index, shard_count: this host's slice; default jax.process_index() / process_count().
      start_position: the global sample position to start at (samples the run has already trained on).
      read_threads, prefetch_batches: grain ReadOptions per process (threads; buffered batches).
      image_pad_value: image fill when a crop is smaller than S (label fill is -1).
      color_jitter: apply the SSD colour augmentation (on by default, as CAT-Seg).
    """
    if shard_index is None or shard_count is None:
        import jax  # imported here so grain worker processes need not import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if global_batch_size < 1 or global_batch_size % shard_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the {shard_count} hosts")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} outside 0..{shard_count - 1}")
    if len(source) == 0:
        raise ValueError(f"training dataset {getattr(source, 'name', source)!r} is empty")
    if start_position < 0:
        raise ValueError(f"start_position {start_position} is negative")
    ds = (grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat()
          .random_map(_ReadAndAugment(source, crop_size, skip_bad_samples, image_pad_value, color_jitter)))
    ds = ds[int(start_position):][shard_index::shard_count]
    ds = ds.batch(global_batch_size // shard_count, drop_remainder=True)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches))
    if num_workers > 0:
        _mark_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it_ds


def _mark_absl_flags_parsed() -> None:
    """grain 0.2.18 worker processes read an absl flag and fail unless flags count as parsed
    (grain issue #1355); programs not run under absl.app get them marked parsed here."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_global_batch(batch: dict, sharding) -> dict:
    """Per-host numpy batch -> dict of global jax.Arrays (jax.make_array_from_process_local_data).

    `sharding` is one jax.sharding.Sharding for every entry (e.g. NamedSharding(mesh, P("data")),
    which splits the leading batch axis) or a dict of them keyed like `batch`.
    """
    import jax

    out = {}
    for key, value in batch.items():
        s = sharding[key] if isinstance(sharding, dict) else sharding
        out[key] = jax.make_array_from_process_local_data(s, np.asarray(value))
    return out


class _EvalResize(grain.transforms.Map):
    def __init__(self, short_side: int, max_size: int):
        self.short_side = short_side
        self.max_size = max_size

    def map(self, element: dict) -> dict:
        return {**element, "image": transforms.eval_resize(element["image"], self.short_side, self.max_size)}


class _WithIndex(grain.transforms.MapWithIndex):
    def map_with_index(self, index: int, element: dict) -> dict:
        return {**element, "index": index}


def shard_for_host(ds: grain.MapDataset, shard_index: int, shard_count: int) -> grain.MapDataset:
    """Items i with i % shard_count == shard_index (multi-host evaluation)."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} outside 0..{shard_count - 1}")
    return ds[shard_index::shard_count]


def eval_dataset(source, *, short_side: int = 640, max_size: int = 2560, max_images: int = 0,
                 shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
    """Ordered per-image evaluation items (no shuffle, no batching: sizes vary).

    Items: {"image": uint8 resized so the short side is `short_side` (bilinear; long side at most
    `max_size`, detectron2's test ResizeShortestEdge(640, 2560)), "label": the ORIGINAL int32 label
    (ignore -1), "name": file stem, "index": position in the source}. `max_images` > 0 keeps a
    prefix; shard_index/shard_count keep items i with i % shard_count == shard_index.
    """
    ds = grain.MapDataset.source(source).map_with_index(_WithIndex())
    if max_images > 0:
        ds = ds[:max_images]
    ds = shard_for_host(ds, shard_index, shard_count)
    return ds.map(_EvalResize(short_side, max_size))
