"""grain pipelines: determinism, resume from a global position (any host count, threads and worker
processes), epoch coverage, per-host sharding, bad-sample skipping, global batches on 4 CPU devices,
eval order."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dcp_jax.data.datasets import DatasetError, open_dataset
from dcp_jax.data.pipeline import eval_dataset, make_global_batch, train_dataset
from dcp_jax.data.toy_world import write_benchmark


class IdentitySource:
    """Item i: image and label filled with i, so a sample's identity survives crop and flip.

    Indices in `bad` raise DatasetError like an unreadable file.
    """

    name = "identity"

    def __init__(self, n, bad=(), hw=(24, 32)):
        self.n, self.bad, self.hw = n, set(bad), hw

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            raise DatasetError(f"cannot read image /fake/{i:03d}.jpg: broken")
        return {"image": np.full((*self.hw, 3), i, np.uint8), "label": np.full(self.hw, i, np.int32), "name": str(i)}


def ids(batch):
    return [int(x) for x in batch["label"][:, 0, 0]]


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = write_benchmark(tmp_path_factory.mktemp("syn") / "syn", num_images=20, seed=0, size=48)
    return open_dataset(f"folder:{path}", "train")


def _train(source, **kw):
    args = dict(crop_size=32, global_batch_size=4, seed=0, shard_index=0, shard_count=1)
    args.update(kw)
    return train_dataset(source, **args)


def test_batches_are_deterministic_for_a_seed(synthetic):
    a = take(iter(_train(synthetic)), 3)
    b = take(iter(_train(synthetic)), 3)
    assert_batches_equal(a, b)
    assert a[0]["image"].shape == (4, 32, 32, 3) and a[0]["image"].dtype == np.uint8
    assert a[0]["label"].shape == (4, 32, 32) and a[0]["label"].dtype == np.int32
    assert a[0]["bad"].shape == (4,) and a[0]["bad"].dtype == np.int32
    labels = np.concatenate([x["label"].ravel() for x in a])
    assert labels.min() >= -1 and labels.max() < len(synthetic.class_names)
    c = take(iter(_train(synthetic, seed=1)), 1)
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_a_stream_started_at_a_position_continues_the_uninterrupted_one(synthetic):
    """What the trainer resumes with: the global sample position, whatever the host count or batch size."""
    uninterrupted = take(iter(_train(synthetic)), 5)  # global batch 4: positions 0..19
    resumed = take(iter(_train(synthetic, start_position=8)), 3)
    assert_batches_equal(resumed, uninterrupted[2:])
    # stopped on one host, resumed on two: the hosts' k-th batches make up the same global batch
    hosts = [take(iter(_train(synthetic, start_position=8, shard_index=h, shard_count=2)), 3) for h in (0, 1)]
    for k in range(3):
        for key in ("image", "label", "bad"):
            both = np.stack([hosts[0][k][key], hosts[1][k][key]], axis=1).reshape(uninterrupted[2 + k][key].shape)
            np.testing.assert_array_equal(both, uninterrupted[2 + k][key])
    # resumed with a global batch of 2: the same samples, two per batch
    halves = take(iter(_train(synthetic, start_position=8, global_batch_size=2)), 2)
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in halves]), uninterrupted[2]["image"])
    with pytest.raises(ValueError, match="negative"):
        _train(synthetic, start_position=-1)


def test_worker_processes_do_not_change_the_stream(synthetic):
    # one worker-process iterator only: starting worker processes costs seconds
    it = iter(_train(synthetic, num_workers=2, start_position=4))
    try:
        with_workers = take(it, 3)
    finally:
        it.close()
    assert_batches_equal(with_workers, take(iter(_train(synthetic)), 4)[1:])


def test_each_epoch_covers_the_data_once_in_a_new_order():
    it = iter(_train(IdentitySource(12), global_batch_size=4))
    epoch1 = sum((ids(b) for b in take(it, 3)), [])
    epoch2 = sum((ids(b) for b in take(it, 3)), [])
    assert sorted(epoch1) == sorted(epoch2) == list(range(12))
    assert epoch1 != epoch2 and epoch1 != list(range(12))


def test_host_shards_are_disjoint_and_make_up_the_global_batch():
    source = IdentitySource(16)
    single = take(iter(_train(source, global_batch_size=4)), 4)
    hosts = [take(iter(_train(source, global_batch_size=4, shard_index=h, shard_count=2)), 4) for h in (0, 1)]
    for k in range(4):
        h0, h1 = ids(hosts[0][k]), ids(hosts[1][k])
        assert len(h0) == len(h1) == 2
        assert not set(h0) & set(h1)
        assert sorted(h0 + h1) == sorted(ids(single[k]))
        # the same sample gets the same augmentation whatever the host count
        for h, local in ((0, hosts[0][k]), (1, hosts[1][k])):
            for j in range(2):
                np.testing.assert_array_equal(local["image"][j], single[k]["image"][2 * j + h])
    first_epoch = [i for h in hosts for b in h for i in ids(b)]
    assert sorted(first_epoch) == list(range(16))


def test_batch_must_divide_over_hosts():
    with pytest.raises(ValueError, match="not divisible by the 3 hosts"):
        _train(IdentitySource(8), global_batch_size=4, shard_count=3)


def test_skip_bad_samples_substitutes_the_next_and_counts():
    it = iter(_train(IdentitySource(8, bad={2, 5}), global_batch_size=8, skip_bad_samples=True))
    for batch in take(it, 2):  # two epochs
        got = ids(batch)
        assert sorted(got) == [0, 1, 3, 3, 4, 6, 6, 7]  # 2 -> 3 and 5 -> 6
        assert batch["bad"].sum() == 2
        assert sorted(np.array(got)[batch["bad"] == 1]) == [3, 6]


def test_bad_sample_error_propagates_with_the_file_name():
    it = iter(_train(IdentitySource(4, bad={0, 1, 2, 3})))
    with pytest.raises(DatasetError, match=r"/fake/00\d\.jpg"):
        next(it)
    it = iter(_train(IdentitySource(4, bad={0, 1, 2, 3}), skip_bad_samples=True))
    with pytest.raises(DatasetError, match="no readable sample in identity"):
        next(it)


def test_skip_a_truly_corrupt_file(tmp_path):
    path = write_benchmark(tmp_path / "syn", num_images=4, seed=0, size=32)
    (path / "images/train/000001.png").write_bytes(b"corrupt")
    ds = open_dataset(f"folder:{path}", "train")
    batch = next(iter(_train(ds, global_batch_size=4, skip_bad_samples=True)))
    assert batch["bad"].tolist().count(1) == 1
    with pytest.raises(DatasetError, match=r"000001\.png"):
        next(iter(_train(ds, global_batch_size=4)))


def test_make_global_batch_on_four_devices(synthetic):
    assert jax.device_count() == 4
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    batch = next(iter(_train(synthetic, global_batch_size=4)))
    arrays = make_global_batch(batch, sharding)
    for key, value in batch.items():
        assert arrays[key].shape == value.shape and arrays[key].dtype == value.dtype
        assert arrays[key].sharding == sharding
        np.testing.assert_array_equal(np.asarray(arrays[key]), value)
        assert len(arrays[key].addressable_shards) == 4
    per_key = {k: sharding for k in batch}
    per_key["bad"] = NamedSharding(mesh, P())
    arrays = make_global_batch(batch, per_key)
    assert arrays["bad"].sharding.is_fully_replicated


def test_eval_dataset_order_resize_and_host_shards():
    source = IdentitySource(10)
    ds = eval_dataset(source, short_side=48)
    assert len(ds) == 10
    items = list(ds)
    assert [x["name"] for x in items] == [str(i) for i in range(10)]
    assert [x["index"] for x in items] == list(range(10))
    assert items[3]["image"].shape == (48, 64, 3)  # 24 x 32 -> short side 48
    np.testing.assert_array_equal(items[3]["label"], np.full((24, 32), 3))  # original label
    assert len(eval_dataset(source, max_images=4)) == 4
    shards = [[x["index"] for x in eval_dataset(source, short_side=0, shard_index=h, shard_count=3)] for h in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    with pytest.raises(ValueError, match="shard_index 3"):
        eval_dataset(source, shard_index=3, shard_count=3)
