"""TFDS datasets: `--pack` writes a real TFDS dataset (read back by tfds itself in a fresh process),
`tfds:` specs read it (and other TFDS segmentation datasets) through grain, for training and evaluation."""

import io
import json
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcp_jax.data import datasets
from dcp_jax.data.datasets import DatasetError, open_dataset
from dcp_jax.data.pipeline import eval_dataset, train_dataset
from dcp_jax.data.toy_world import write_benchmark
from dcp_jax.data.tfds_data import pack

tfds = pytest.importorskip("tensorflow_datasets")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def folder(tmp_path):
    path = write_benchmark(tmp_path / "syn", num_images=8, seed=1, size=32)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "unseen_classes": ["sky"], "name": "syn"}))
    return path


def _assert_same_items(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x["name"] == y["name"]
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_pack_round_trip_keeps_items_vocabulary_and_unseen_classes(folder, tmp_path):
    report = pack(f"folder:{folder}", ["train", "val"], tmp_path / "tfds", progress=False)
    builder_dir = tmp_path / "tfds/syn/1.0.0"
    assert report.builder_dir == str(builder_dir) and report.counts == {"train": 6, "val": 2}
    assert {"syn-train.array_record-00000-of-00001", "syn-val.array_record-00000-of-00001", "dataset_info.json",
            "features.json", "metadata.json"} <= {p.name for p in builder_dir.iterdir()}
    for split in ("train", "val"):
        source = open_dataset(f"folder:{folder}", split)
        packed = open_dataset("tfds:syn", split, str(tmp_path / "tfds"))
        assert (packed.name, packed.class_names, packed.unseen_classes) == (source.name, source.class_names, ["sky"])
        assert packed.num_label_classes == source.num_label_classes and packed.ignore_label == 255
        np.testing.assert_array_equal(packed.pred_to_label, source.pred_to_label)
        _assert_same_items(source, packed)
    assert "sky" not in open_dataset("tfds:syn", "train", str(tmp_path / "tfds")).class_names
    assert open_dataset("tfds:syn:val", "train", str(tmp_path / "tfds")).tfds_split == "val"  # spec split wins
    clone = pickle.loads(pickle.dumps(packed))  # what grain worker processes receive
    assert len(pickle.dumps(packed)) < 4000 and clone.notes() == []
    np.testing.assert_array_equal(clone[1]["label"], source[1]["label"])


def test_tfds_data_source_reads_the_pack_in_a_fresh_process(folder, tmp_path):
    pack(f"folder:{folder}", ["val"], tmp_path / "tfds", progress=False)
    code = ("import sys, numpy as np, tensorflow_datasets as tfds\n"
            "ds = tfds.data_source('syn', data_dir=sys.argv[1], split='val', download=False)\n"
            "x = ds[1]\n"
            "np.save(sys.argv[2], x['segmentation_mask'][..., 0])\n"
            "print(len(ds), x['image'].shape, x['file_name'].decode())\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tfds"), str(tmp_path / "mask.npy")],
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    source = open_dataset(f"folder:{folder}", "val")
    count, shape, name = result.stdout.strip().split(" ", 1)[0], result.stdout[2:].rsplit(" ", 1)[0], \
        result.stdout.split()[-1]
    assert (count, name) == ("2", source[1]["name"]) and shape.startswith("(") and shape.endswith(", 3)")
    expected = np.where(source[1]["label"] >= 0, source[1]["label"], 255)  # TFDS's own decode: ignore = 255
    np.testing.assert_array_equal(np.load(tmp_path / "mask.npy"), expected)


def test_train_and_eval_through_a_tfds_spec(folder, tmp_path):
    pack(f"folder:{folder}", ["train", "val"], tmp_path / "tfds", progress=False)
    packed = open_dataset("tfds:syn", "train", str(tmp_path / "tfds"))
    source = open_dataset(f"folder:{folder}", "train")
    args = dict(crop_size=24, global_batch_size=2, seed=0, shard_index=0, shard_count=1)
    expected = next(iter(train_dataset(source, **args)))
    it = iter(train_dataset(packed, num_workers=1, **args))  # a grain worker process opens the source itself
    try:
        batch = next(it)
    finally:
        it.close()
    for key in ("image", "label", "bad"):
        np.testing.assert_array_equal(batch[key], expected[key])
    val = open_dataset("tfds:syn", "val", str(tmp_path / "tfds"))
    items = list(eval_dataset(val, short_side=40))
    assert [x["index"] for x in items] == [0, 1] and items[0]["image"].shape[0] == 40
    np.testing.assert_array_equal(items[1]["label"], open_dataset(f"folder:{folder}", "val")[1]["label"])


# One fresh interpreter = one grain worker's first use of tensorflow_datasets (issue 22: a worker hung for an hour
# in `import tensorflow_datasets` on a read thread; tfds_data._OPEN_LOCK says why). THREADS threads read every item
# of the train split at once, from a source that is: "worker": unpickled on the main thread, as grain's worker does
# (so already open); "cold": unpickled by each thread itself (tfds imported and opened on several threads at
# once); "shared": opened by open_dataset on the main thread and read first on the threads, as with num_workers=0
# (opened once, under the lock). A hang dumps every thread's stack and exits 1.
_THREADS_READ = """
import faulthandler, json, pickle, sys, threading
faulthandler.dump_traceback_later(60, exit=True)
mode, blob, data_dir, threads = sys.argv[1], open(sys.argv[2], "rb").read(), sys.argv[3], int(sys.argv[4])
opens = []
if mode == "worker":
    shared = pickle.loads(blob)
    assert shared._source is not None, "not opened on unpickling"
elif mode == "shared":
    import tensorflow_datasets as tfds
    from dcp_jax.data.datasets import open_dataset
    shared = open_dataset("tfds:syn", "train", data_dir)
    real = tfds.builder_from_directory
    tfds.builder_from_directory = lambda *a, **k: opens.append(1) or real(*a, **k)
else:
    shared = None
barrier, out = threading.Barrier(threads), [None] * threads
def read(t):
    barrier.wait()
    ds = shared if shared is not None else pickle.loads(blob)
    items = {k: ds[k] for k in [(t + i) % len(ds) for i in range(len(ds))]}
    out[t] = [[items[k]["name"], int(items[k]["image"].sum()), int(items[k]["label"].sum())] for k in sorted(items)]
workers = [threading.Thread(target=read, args=(t,), name=f"read-{t}") for t in range(threads)]
[w.start() for w in workers]
[w.join() for w in workers]
print(json.dumps({"opens": len(opens), "items": out}))
"""


def test_worker_first_read_from_several_threads_never_hangs(folder, tmp_path):
    pack(f"folder:{folder}", ["train"], tmp_path / "tfds", progress=False)
    (tmp_path / "ds.pkl").write_bytes(pickle.dumps(open_dataset("tfds:syn", "train", str(tmp_path / "tfds"))))
    source = open_dataset(f"folder:{folder}", "train")
    expected = [[x["name"], int(x["image"].sum()), int(x["label"].sum())] for x in (source[i] for i in range(6))]
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def run(mode):
        args = [mode, tmp_path / "ds.pkl", tmp_path / "tfds", 4]
        return mode, subprocess.run([sys.executable, "-c", _THREADS_READ, *map(str, args)], capture_output=True,
                                    text=True, timeout=120, env=env)

    with ThreadPoolExecutor(2) as pool:  # 20 fresh interpreters, two at a time
        for mode, result in pool.map(run, ["worker", "cold", "shared", "worker", "cold"] * 4):
            assert result.returncode == 0, f"{mode}: {result.stderr[-6000:]}"
            out = json.loads(result.stdout)
            assert out["items"] == [expected] * 4, mode
            assert out["opens"] == (1 if mode == "shared" else 0), mode  # the shared source opened once


def test_many_classes_pack_as_16_bit_masks(tmp_path):
    path = tmp_path / "big"
    (path / "images").mkdir(parents=True)
    (path / "annotations").mkdir()
    (path / "classes.json").write_text(json.dumps([f"c{i}" for i in range(300)]))
    (path / "meta.json").write_text(json.dumps({"ignore_label": 65535, "name": "Big Set"}))
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(path / "images/x.png")
    Image.fromarray(np.array([[299, 65535, 0], [256, 1, 65535]], np.uint16)).save(path / "annotations/x.tif")
    report = pack(f"folder:{path}", "val", tmp_path / "tfds", progress=False)
    assert report.name == "big_set"
    packed = open_dataset("tfds:big_set", "val", str(tmp_path / "tfds"))
    assert packed.ignore_label == 65535 and len(packed.class_names) == 300
    np.testing.assert_array_equal(packed[0]["label"], [[299, -1, 0], [256, 1, -1]])


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_foreign(data_dir: Path) -> None:
    """A TFDS dataset shaped like TFDS's scene_parse150: 'image' and a 3-channel 'annotation' (R = class)."""

    class FakeSceneParse(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "annotation": tfds.features.Image(encoding_format="png")}), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(), "validation": self._generate_examples()}

        def _generate_examples(self):
            red = np.array([[0, 1, 150], [2, 0, 3]], np.uint8)
            annotation = np.stack([red, red * 0 + 7, red * 0], -1)  # G holds instance ids
            yield "a", {"image": _png(np.full((2, 3, 3), 9)), "annotation": _png(annotation)}

    FakeSceneParse(data_dir=str(data_dir), file_format="array_record").download_and_prepare(
        download_dir=str(data_dir / "dl"))


def test_foreign_tfds_dataset_given_its_class_list(tmp_path):
    data_dir = tmp_path / "tfds"
    _write_foreign(data_dir)
    with pytest.raises(DatasetError, match=r"no class list for 'fake_scene_parse'; put a dcp_jax\.json"):
        open_dataset("tfds:fake_scene_parse", "val", str(data_dir))
    (data_dir / "fake_scene_parse/dcp_jax.json").write_text(json.dumps(
        {"class_names": "ade150", "ignore_label": 0, "label_offset": -1}))
    ds = open_dataset("tfds:fake_scene_parse", "val", str(data_dir))  # 'val' resolves to 'validation'
    assert ds.tfds_split == "validation" and len(ds.class_names) == 150 and ds.label_key == "annotation"
    item = ds[0]
    assert item["name"] == "validation_000000" and item["image"].shape == (2, 3, 3)
    np.testing.assert_array_equal(item["label"], [[-1, 0, 149], [1, -1, 2]])  # R channel, 0 = unlabeled


def test_tfds_errors_name_the_place_and_the_fix(folder, tmp_path):
    with pytest.raises(DatasetError, match=rf"no TFDS dataset 'nope' under {tmp_path}.*--pack DIR"):
        open_dataset("tfds:nope", "val", str(tmp_path))
    pack(f"folder:{folder}", ["val"], tmp_path / "tfds", progress=False)
    with pytest.raises(DatasetError, match=r"has no split 'test'; it has val \(choose one with tfds:syn:SPLIT\)"):
        open_dataset("tfds:syn:test", "val", str(tmp_path / "tfds"))
    with pytest.raises(DatasetError, match=r"bad tfds spec"):
        open_dataset("tfds:9bad name", "val", str(tmp_path))
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "tfds").rglob("*"))
    with pytest.raises(DatasetError, match=r"syn/1\.0\.0 already exists; remove it or choose another --name"):
        pack(f"folder:{folder}", ["val"], tmp_path / "tfds", progress=False)
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "tfds").rglob("*")) == before
    with pytest.raises(DatasetError, match=r"'mnist' is a TFDS catalog dataset"):
        pack(f"folder:{folder}", ["val"], tmp_path / "tfds", name="mnist", progress=False)


def test_bad_sample_stops_the_pack_or_is_left_out(folder, tmp_path):
    (folder / "images/train/000002.png").write_bytes(b"corrupt")
    with pytest.raises(DatasetError, match=r"cannot read image .*000002\.png"):
        pack(f"folder:{folder}", ["train"], tmp_path / "tfds", progress=False)
    assert not (tmp_path / "tfds/syn").exists()  # nothing half-written
    report = pack(f"folder:{folder}", ["train"], tmp_path / "tfds", skip_bad=True, progress=False)
    assert report.counts == {"train": 5} and len(report.bad) == 1 and "000002.png" in report.bad[0]
    assert len(open_dataset("tfds:syn", "train", str(tmp_path / "tfds"))) == 5


def test_command_line_pack_and_check(folder, tmp_path, capsys):
    assert datasets.main([f"folder:{folder}", "--split", "train,val", "--pack", str(tmp_path / "tfds")]) == 0
    out = capsys.readouterr().out
    assert f"read it as tfds:syn --data-root {tmp_path / 'tfds'}" in out and "train 6, val 2" in out
    assert datasets.main(["tfds:syn", "--split", "val", "--data-root", str(tmp_path / "tfds"), "--check"]) == 0
    assert "every sample reads cleanly" in capsys.readouterr().out
    assert datasets.main(["tfds:nope", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m dcp_jax.data.datasets: error: no TFDS dataset 'nope'") and err.count("\n") == 1
