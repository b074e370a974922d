"""ArrayRecord packing: round trip, pipelines over packed data, errors, and the datasets command line."""

import pickle

import numpy as np
import pytest

from dcp_jax.data import datasets
from dcp_jax.data.datasets import DatasetError, open_dataset, pack_array_record
from dcp_jax.data.pipeline import eval_dataset, train_dataset
from dcp_jax.data.synthetic import write_synthetic_dataset


@pytest.fixture()
def folder(tmp_path):
    return write_synthetic_dataset(tmp_path / "syn", num_images=8, seed=1, size=32)


def test_round_trip_matches_the_folder_dataset(folder, tmp_path):
    source = open_dataset(f"folder:{folder}", "train")
    out = pack_array_record(source, tmp_path / "packed", num_shards=2, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train-00000-of-00002.array_record",
                                                     "train-00001-of-00002.array_record"]
    packed = open_dataset(f"arrayrecord:{tmp_path / 'packed'}", "train")
    assert len(packed) == len(source) == 6
    assert (packed.name, packed.class_names, packed.ignore_label) == (source.name, source.class_names, 255)
    np.testing.assert_array_equal(packed.pred_to_label, source.pred_to_label)
    for i in range(len(source)):
        a, b = source[i], packed[i]
        assert a["name"] == b["name"]
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    clone = pickle.loads(pickle.dumps(packed))  # what grain worker processes receive
    np.testing.assert_array_equal(clone[5]["label"], source[5]["label"])
    args = dict(crop_size=24, global_batch_size=2, seed=0, shard_index=0, shard_count=1)
    a, b = next(iter(train_dataset(source, **args))), next(iter(train_dataset(packed, **args)))
    np.testing.assert_array_equal(a["image"], b["image"])
    assert eval_dataset(packed, short_side=40)[0]["image"].shape[:2] == eval_dataset(source, short_side=40)[0][
        "image"].shape[:2]


def test_corrupt_sample_is_named_and_skippable(folder, tmp_path):
    (folder / "images/train/000002.png").write_bytes(b"corrupt")
    packed_dir = pack_array_record(open_dataset(f"folder:{folder}", "train"), tmp_path / "p", progress=False)
    packed = open_dataset(f"arrayrecord:{tmp_path / 'p'}", "train")
    with pytest.raises(DatasetError, match=r"record 2 \(000002\) image"):
        packed[2]
    batch = next(iter(train_dataset(packed, crop_size=24, global_batch_size=6, seed=0, skip_bad_samples=True,
                                    shard_index=0, shard_count=1)))
    assert batch["bad"].sum() == 1
    with pytest.raises(FileExistsError):
        pack_array_record(open_dataset(f"folder:{folder}", "train"), tmp_path / "p", progress=False)
    assert packed_dir == tmp_path / "p" / "train"


def test_missing_packed_split(folder, tmp_path):
    pack_array_record(open_dataset(f"folder:{folder}", "val"), tmp_path / "p", progress=False)
    with pytest.raises(DatasetError, match=r"train/meta\.json \(splits found: val\)"):
        open_dataset(f"arrayrecord:{tmp_path / 'p'}", "train")
    with pytest.raises(TypeError, match="needs a SegDataset"):
        pack_array_record([], tmp_path / "q")


def test_command_line_check_and_pack(folder, tmp_path, capsys):
    datasets.main([f"folder:{folder}", "--split", "train", "--check"])
    out = capsys.readouterr().out
    assert "every sample reads cleanly" in out and "0 bad of 6" in out
    (folder / "annotations/train/000001.png").write_bytes(b"junk")
    datasets.main([f"folder:{folder}", "--split", "train", "--check", "--pack", str(tmp_path / "p")])
    out = capsys.readouterr().out
    assert "cannot read label" in out and "000001.png" in out and "1 bad of 6" in out
    assert len(open_dataset(f"arrayrecord:{tmp_path / 'p'}", "train")) == 6


def test_command_line_error_exits_with_the_message(tmp_path):
    with pytest.raises(SystemExit, match="(?s)directory not found.*prepare ade150"):
        datasets.main(["ade150", "--data-root", str(tmp_path)])
