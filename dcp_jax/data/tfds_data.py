"""TFDS datasets: the `tfds:NAME[:SPLIT]` spec kind (read through grain) and `--pack` (write any spec as one).

TPU users keep their data as TFDS ArrayRecord datasets, often on GCS. Both directions work without
TensorFlow: records are read with `builder.as_data_source` and images/masks are kept as encoded
bytes (`tfds.decode.SkipDecoding`), then decoded here exactly as folder files are (PIL, EXIF
orientation), so a packed split gives the same items as the spec it was packed from.

The vocabulary of a `tfds:` dataset comes from, in this order:
  1. its metadata.json, which `pack` writes (class_names, ignore_label, pred_to_label, ...);
  2. a `dcp_jax.json` the user puts in the dataset's folder (DATA_DIR/NAME[/CONFIG]/) or its version
     folder, for any other TFDS dataset with an image and a segmentation-mask feature, e.g.
       {"class_names": "ade150" (a built-in list) or ["wall", ...], "ignore_label": 0,
        "label_offset": -1, "label_key": "annotation", "label_channel": 0}
     (label = raw value + label_offset after the ignore value is set aside);
  3. the names of a `tfds.features.LabeledImage` mask feature.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from dcp_jax.data import classnames
from dcp_jax.data.sources import DatasetError, SegSource, open_dataset, register_kind, vocabulary_for_split

__all__ = ["TfdsSegDataset", "open_tfds", "pack"]

IMAGE_KEY, LABEL_KEY, NAME_KEY = "image", "segmentation_mask", "file_name"
_LABEL_KEYS = (LABEL_KEY, "annotation", "label", "mask", "segmentation")
_META_FORMAT = "dcp_jax.segmentation.v1"
_SPEC = re.compile(r"^(?P<name>[A-Za-z]\w*)(?:/(?P<config>[\w+\-.]+))?(?::(?P<version>\d+\.\d+\.\d+))?"
                   r"(?::(?P<split>.+))?$")
_SPLIT_ALIASES = {"val": ("validation", "valid"), "validation": ("val",)}


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DatasetError("tfds: specs need tensorflow-datasets; install it with "
                           "`pip install 'dcp_jax[tfds]'` (TensorFlow itself is not needed)") from e
    return tfds


def default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


# Why sources open under a lock, and in __setstate__ (issue 22: a grain worker hung in `import tensorflow_datasets`,
# at LazyModule.__getattr__ under a functools.cached_property, its main thread waiting on the read). Opening a
# source is a grain worker's first use of tensorflow_datasets, and grain calls `__getitem__` from its read threads
# (ReadOptions.num_threads) at once; opened lazily there, `import tensorflow_datasets` and the lazy imports tfds
# resolves while it builds the data source (etils `epy.lazy_imports`: dataset_info, json_format, tree, array_record)
# ran on several threads together. etils resolves a lazy module by importing it while holding its own locks (a
# per-module threading.Lock, inside functools.cached_property, whose RLock on Python 3.11 is one lock shared by
# every LazyModule), and tfds' module bodies touch lazy modules while Python holds their import lock: threads that
# take those locks in opposite orders wait for each other for ever, unseen by importlib's deadlock detection, which
# knows only its own module locks. So a worker opens its source while it unpickles the dataset (grain does that in
# the worker's main thread, before any read thread exists), and every open, there or on a read thread
# (num_workers = 0, a retry after a failed open), holds this lock: first-time tfds imports run on one thread.
_OPEN_LOCK = threading.Lock()


@dataclasses.dataclass(eq=False, kw_only=True)
class TfdsSegDataset(SegSource):
    """One split of a TFDS dataset. The data source is left out of its pickle (cheap to send to grain workers) and
    opens on the first read, or as a copy is unpickled (in a grain worker: before its read threads start)."""

    builder_dir: str
    tfds_split: str
    num_examples: int
    image_key: str = IMAGE_KEY
    label_key: str = LABEL_KEY
    name_key: str | None = NAME_KEY

    def __post_init__(self):
        super().__post_init__()
        self._source = None

    def __getstate__(self):
        state = super().__getstate__()
        state["_source"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        try:  # before grain's read threads start: see _OPEN_LOCK
            self._records()
        except Exception:  # the first read raises it again, where the pipeline reports read errors
            pass

    def __len__(self) -> int:
        return self.num_examples

    def _records(self):
        source = self._source
        if source is None:
            with _OPEN_LOCK:  # see its comment: never import or open tfds from two threads at once
                source = self._source
                if source is None:
                    tfds = _tfds()
                    builder = tfds.builder_from_directory(self.builder_dir)
                    keep = {key: tfds.decode.SkipDecoding() for key in (self.image_key, self.label_key)}
                    source = self._source = builder.as_data_source(split=self.tfds_split, decoders=keep)
        return source

    def _raw(self, index: int):
        record = self._records()[index]
        name = record.get(self.name_key) if self.name_key else None
        name = name.decode("utf-8") if isinstance(name, bytes) else f"{self.tfds_split}_{index:06d}"
        where = f"{self.builder_dir} [{self.tfds_split}] record {index} ({name})"
        return record[self.image_key], record[self.label_key], name, f"{where} image", f"{where} label"

    def __repr__(self) -> str:
        return (f"TfdsSegDataset(name={self.name!r}, split={self.tfds_split!r}, images={len(self)}, "
                f"classes={len(self.class_names)}, dir={self.builder_dir!r})")


# --------------------------------------------------------------------------------------------
# reading


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])  # data_dir may be gs://...: no os.path


def _builder_dir(name: str, config: str | None, version: str | None, data_dir: str) -> str:
    from etils import epath

    dataset_dir = _join(data_dir, name, *([config] if config else []))
    if version is None:
        path = epath.Path(dataset_dir)
        versions = sorted((tuple(int(x) for x in p.name.split(".")), p.name) for p in path.iterdir()
                          if re.fullmatch(r"\d+\.\d+\.\d+", p.name)) if path.is_dir() else []
        if not versions:
            raise DatasetError(f"no TFDS dataset {name!r} under {data_dir} (no {dataset_dir}/<version>/); "
                               "point --data-root at the TFDS data_dir that holds it, or write one with "
                               "`python -m dcp_jax.data.datasets SPEC --pack DIR`")
        version = versions[-1][1]
    builder_dir = _join(dataset_dir, version)
    if not epath.Path(_join(builder_dir, "dataset_info.json")).exists():
        raise DatasetError(f"{builder_dir}: no dataset_info.json, so not a prepared TFDS dataset; "
                           "prepare it (tfds build / --pack) or fix the name and version")
    return builder_dir


def _user_meta(builder_dir: str) -> dict:
    from etils import epath

    for path in (epath.Path(builder_dir) / "dcp_jax.json", epath.Path(builder_dir).parent / "dcp_jax.json"):
        if path.exists():
            try:
                meta = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise DatasetError(f"cannot read {path}: {e}; fix the JSON") from e
            if not isinstance(meta, dict):
                raise DatasetError(f"{path}: expected a JSON object with \"class_names\"")
            return {**meta, "_file": str(path)}
    return {}


def _pick_keys(features, meta: dict, builder_dir: str) -> tuple[str, str]:
    tfds = _tfds()
    images = {k: f for k, f in features.items() if isinstance(f, tfds.features.Image)}
    image_key = meta.get("image_key") or (IMAGE_KEY if IMAGE_KEY in images else None)
    label_key = meta.get("label_key") or next((k for k in _LABEL_KEYS if k in images), None)
    if label_key is None:
        labeled = [k for k, f in images.items() if isinstance(f, tfds.features.LabeledImage)]
        label_key = labeled[0] if len(labeled) == 1 else None
    if image_key is None and label_key is not None:
        rest = [k for k in images if k != label_key]
        image_key = rest[0] if len(rest) == 1 else None
    for key, what in ((image_key, "image_key"), (label_key, "label_key")):
        if key not in images:
            raise DatasetError(f"{builder_dir}: cannot tell the {what.split('_')[0]} feature among "
                               f"{', '.join(features.keys())}; name it as \"{what}\" in dcp_jax.json")
    return image_key, label_key


def open_tfds(name_and_split: str, split: str, data_dir: str | None, *, full_vocabulary: bool = False
              ) -> TfdsSegDataset:
    """Open `NAME[/CONFIG][:VERSION][:SPLIT]` under `data_dir` (default $TFDS_DATA_DIR or ~/tensorflow_datasets)."""
    match = _SPEC.match(name_and_split)
    if not match:
        raise DatasetError(f"bad tfds spec 'tfds:{name_and_split}'; write tfds:NAME[/CONFIG][:VERSION][:SPLIT]")
    tfds = _tfds()
    data_dir = str(data_dir or default_data_dir())
    builder_dir = _builder_dir(match["name"], match["config"], match["version"], data_dir)
    try:
        builder = tfds.builder_from_directory(builder_dir)
    except Exception as e:  # tfds raises several types for unreadable metadata
        raise DatasetError(f"cannot read the TFDS dataset {builder_dir}: {e}; prepare or copy it again") from e
    info = builder.info
    available = list(info.splits)
    wanted = match["split"] or split
    tfds_split = wanted if wanted.split("[")[0] in available else next(
        (a for a in _SPLIT_ALIASES.get(wanted, ()) if a in available), None)
    if tfds_split is None:
        raise DatasetError(f"{builder_dir} has no split {wanted!r}; it has {', '.join(available)} "
                           f"(choose one with tfds:{match['name']}:SPLIT)")

    meta = dict(info.metadata or {})
    if meta.get("format") != _META_FORMAT:
        meta = _user_meta(builder_dir)
    image_key, label_key = _pick_keys(info.features, meta, builder_dir)
    names = meta.get("class_names")
    if isinstance(names, str):
        names = classnames.load(names) if names in classnames.BUILTIN else None
    if names is None and isinstance(info.features[label_key], tfds.features.LabeledImage):
        names = info.features[label_key].names or None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise DatasetError(f"{builder_dir}: no class list for {match['name']!r}; put a dcp_jax.json with "
                           "{\"class_names\": [...] or a built-in list name} into that folder or its parent")
    num_examples = builder.info.splits[tfds_split].num_examples
    vocab = vocabulary_for_split(names, list(meta.get("unseen_classes", [])), tfds_split, builder_dir,
                                 full_vocabulary)
    if "num_label_classes" in meta and vocab.get("label_lut") is None:  # e.g. voc20b: 59 names, 21 scored
        vocab["num_label_classes"] = int(meta["num_label_classes"])
        vocab["pred_to_label"] = np.asarray(meta.get("pred_to_label", range(len(names))), np.int32)
    return TfdsSegDataset(
        name=str(meta.get("name") or match["name"]), split=split, ignore_label=int(meta.get("ignore_label", 255)),
        **vocab, builder_dir=builder_dir, tfds_split=tfds_split, num_examples=num_examples, image_key=image_key,
        label_key=label_key, name_key=NAME_KEY if NAME_KEY in info.features else None,
        label_offset=int(meta.get("label_offset", 0)), label_channel=int(meta.get("label_channel", 0)))


register_kind("tfds:", open_tfds)


# --------------------------------------------------------------------------------------------
# packing


@dataclasses.dataclass
class PackReport:
    builder_dir: str
    name: str
    counts: dict  # split -> examples written
    bad: list  # messages of samples left out (skip_bad)
    notes: list  # the sources' read-time notes (e.g. pc459's 65535 pixels)

    def lines(self) -> list[str]:
        lines = [f"wrote TFDS dataset {self.name} to {self.builder_dir}: "
                 + ", ".join(f"{s} {n}" for s, n in self.counts.items())
                 + f"; read it as tfds:{self.name} --data-root {Path(self.builder_dir).parent.parent}"]
        if self.bad:
            lines += [f"left out: {b}" for b in self.bad] + [f"{len(self.bad)} unreadable samples left out"]
        return lines + [f"note: {n}" for n in self.notes]


def _dataset_name(name: str) -> str:
    out = re.sub(r"[^0-9a-z_]+", "_", name.lower()).strip("_")
    return out if out[:1].isalpha() else f"d_{out}"


def _image_bytes(source, decoded: np.ndarray) -> bytes:
    """The image's encoded bytes as they are, unless a TFDS reader would decode them differently
    (EXIF rotation, not JPEG/PNG, not RGB or grey): then the decoded pixels as PNG."""
    data = Path(source).read_bytes() if isinstance(source, (str, os.PathLike)) else bytes(source)
    with Image.open(io.BytesIO(data)) as im:
        keep = im.format in ("JPEG", "PNG") and im.mode in ("RGB", "L") and im.getexif().get(0x0112, 1) == 1
    return data if keep else _png(decoded)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _outermost_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what a failed pack removes), or None."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def check_pack(spec: str, splits, out_dir, *, data_root: str | None = None, name: str | None = None,
               version: str = "1.0.0") -> tuple[dict, str, Path]:
    """Open `spec`'s splits and check, before any work, that they can be packed as OUT_DIR/NAME/VERSION (which must
    not exist). Returns (split -> source, name, builder_dir)."""
    tfds = _tfds()
    splits = [splits] if isinstance(splits, str) else list(splits)
    sources = {s: open_dataset(spec, s, data_root, full_vocabulary=True) for s in splits}
    first = sources[splits[0]]
    for s, ds in sources.items():
        if (ds.class_names, ds.num_label_classes, ds.unseen_classes) != (
                first.class_names, first.num_label_classes, first.unseen_classes):
            raise DatasetError(f"{spec}: splits {splits[0]} and {s} have different vocabularies; pack them apart")
    if first.num_label_classes >= 65535:
        raise DatasetError(f"{spec}: {first.num_label_classes} classes do not fit a 16-bit mask")
    name = name or _dataset_name(first.name)
    if not tfds.core.naming.is_valid_dataset_name(name) or "/" in name or ":" in name:
        raise DatasetError(f"--name {name!r} is not a valid TFDS dataset name; use letters, digits and _")
    if name in tfds.list_builders(with_community_datasets=False):
        raise DatasetError(f"{name!r} is a TFDS catalog dataset, so tfds.data_source({name!r}) would read that "
                           "one; choose another --name")
    if Path(out_dir).is_file():
        raise DatasetError(f"--pack {out_dir} is a file; give a directory (new, or one that holds TFDS datasets)")
    builder_dir = Path(out_dir) / name / version
    if builder_dir.exists():
        raise DatasetError(f"{builder_dir} already exists; remove it or choose another --name or --version")
    return sources, name, builder_dir


def pack(spec: str, splits, out_dir, *, data_root: str | None = None, name: str | None = None,
         version: str = "1.0.0", skip_bad: bool = False, progress: bool = True) -> PackReport:
    """Write `spec`'s splits as the TFDS dataset OUT_DIR/NAME/VERSION (array_record files).

    Labels are stored mapped (ignore 255, or 65535 above 255 classes) with the full vocabulary, so
    unseen classes stay in the data and `tfds:` leaves them out of the train split again. A bad
    sample stops the pack with its message (nothing is written) unless skip_bad, which lists it.
    """
    tfds = _tfds()
    sources, name, builder_dir = check_pack(spec, splits, out_dir, data_root=data_root, name=name, version=version)
    splits, first = list(sources), next(iter(sources.values()))
    num_classes = first.num_label_classes
    dtype, ignore = (np.uint8, 255) if num_classes <= 255 else (np.uint16, 65535)
    metadata = {"format": _META_FORMAT, "name": first.name, "class_names": first.class_names,
                "num_label_classes": num_classes, "pred_to_label": first.pred_to_label.tolist(),
                "ignore_label": ignore, "unseen_classes": first.unseen_classes}
    counts, bad = {s: 0 for s in splits}, []

    def examples(split):
        ds = sources[split]
        for i in range(len(ds)):
            try:
                item = ds[i]
            except DatasetError as e:
                if not skip_bad:
                    raise
                bad.append(str(e))
                continue
            label = np.where(item["label"] >= 0, item["label"], ignore).astype(dtype)
            counts[split] += 1
            yield f"{i:08d}", {IMAGE_KEY: _image_bytes(ds._raw(i)[0], item["image"]),
                               LABEL_KEY: _png(label), NAME_KEY: item["name"]}

    features = tfds.features.FeaturesDict({
        IMAGE_KEY: tfds.features.Image(doc="the original encoded file"),
        LABEL_KEY: tfds.features.LabeledImage(labels=len(first.class_names), dtype=dtype, encoding_format="png",
                                              doc=f"class index per pixel, {ignore} = ignore"),
        NAME_KEY: tfds.features.Text(doc="file stem"),
    })

    class _Pack(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)

        def _info(self):  # disable_shuffling: records keep the source's order (evaluation order, names)
            return tfds.core.DatasetInfo(builder=self, features=features, metadata=tfds.core.MetadataDict(metadata),
                                         description=f"{first.name} packed by dcp_jax from spec {spec}",
                                         disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {s: examples(s) for s in splits}

        def _generate_examples(self, split):  # unused: _split_generators hands over the generators
            yield from examples(split)

    _Pack.name = name
    created = _outermost_missing(Path(out_dir) / name) if "://" not in str(out_dir) else None
    if not progress:
        tfds.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as downloads:
            _Pack(data_dir=str(out_dir), file_format="array_record").download_and_prepare(download_dir=downloads)
    except BaseException:
        if created is not None:  # TFDS removes its incomplete folder; drop the folders made for it too
            shutil.rmtree(created, ignore_errors=True)
        raise
    return PackReport(str(builder_dir), name, counts, bad, [n for ds in sources.values() for n in ds.notes()])
