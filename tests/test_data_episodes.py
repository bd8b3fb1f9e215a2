"""Episodic sampling: shapes, labels, per-class rotation, fixed tasks, workers, resume, speed.

Pools are built from random uint8 images, so every output image can be traced back to the
pool image it came from and the rotation applied to it.
"""

import pickle

import numpy as np
import pytest
import torch

from mamlpp_ext.data import ClassPool, EpisodeDataset


def _pool(counts=(7, 9, 7, 8, 7, 10, 7, 7, 11, 7, 8, 7), side=8, channels=1, seed=0, **kw):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (sum(counts), channels, side, side), dtype=np.uint8)
    return ClassPool.from_arrays(images, counts, **kw)


def _index(pool):
    """bytes of every rotation of every pool image -> (image index, k)."""
    table = {}
    for i, img in enumerate(pool.images):
        for k in range(4):
            table[np.ascontiguousarray(np.rot90(img, k, axes=(-2, -1))).tobytes()] = (i, k)
    assert len(table) == 4 * len(pool.images)
    return table


def _trace(x, table):
    """float (…, C, H, W) in [0, 1] -> list of (image index, k)."""
    u8 = np.rint(x.numpy() * 255.0).astype(np.uint8)
    return [table[np.ascontiguousarray(a).tobytes()] for a in u8.reshape(-1, *u8.shape[-3:])]


def _class_of(pool, image_index):
    return int(np.searchsorted(pool.starts + pool.counts, image_index, side="right"))


@pytest.mark.parametrize("n,k,q,t", [(5, 1, 1, 8), (3, 2, 4, 2), (4, 5, 0, 3)])
def test_shapes_and_dtypes(n, k, q, t):
    pool = _pool()
    ds = EpisodeDataset(pool, n, k, q, t, num_tasks=7 * t - 1, seed=1)
    assert len(ds) == 7
    e = ds[0]
    assert e.support_x.shape == (t, n * k, 1, 8, 8) and e.support_x.dtype == torch.float32
    assert e.query_x.shape == (t, n * q, 1, 8, 8) and e.query_x.dtype == torch.float32
    assert e.support_y.shape == (t, n * k) and e.support_y.dtype == torch.int64
    assert e.query_y.shape == (t, n * q) and e.query_y.dtype == torch.int64
    assert e.support_x.is_contiguous() and e.query_x.is_contiguous()
    last = ds[-1]  # the last meta-batch is short when num_tasks is not a multiple of T
    assert last.support_x.shape[0] == t - 1
    with pytest.raises(IndexError):
        ds[7]


@pytest.mark.parametrize("augment", [False, True])
def test_content_labels_and_rotation_per_class(augment):
    pool = _pool()
    table = _index(pool)
    n, k, q, t = 4, 2, 3, 5
    ds = EpisodeDataset(pool, n, k, q, t, num_tasks=200, augment=augment, seed=7)
    seen_k, label_of_class = set(), {}
    for b in range(len(ds)):
        e = ds[b]
        assert e.support_y.min() >= 0 and e.support_y.max() < n
        for ti in range(t):
            spec = ds.task_spec(b * t + ti)
            sup = _trace(e.support_x[ti], table)
            qry = _trace(e.query_x[ti], table)
            sy, qy = e.support_y[ti].tolist(), e.query_y[ti].tolist()
            assert sorted(sy) == sorted(list(range(n)) * k) and sorted(qy) == sorted(list(range(n)) * q)
            for label in range(n):
                s_items = [sup[i] for i in range(n * k) if sy[i] == label]
                q_items = [qry[i] for i in range(n * q) if qy[i] == label]
                classes = {_class_of(pool, i) for i, _ in s_items + q_items}
                assert classes == {int(spec.classes[label])}, "support and query of a label share one class"
                idx = [i for i, _ in s_items + q_items]
                assert len(set(idx)) == k + q, "no image is used twice in a task"
                assert idx == spec.images[label].tolist()
                rots = {r for _, r in s_items + q_items}
                assert len(rots) == 1, "all support and query images of a class share a rotation"
                r = rots.pop()
                assert r == (int(spec.rotations[label]) if augment else 0)
                seen_k.add(r)
                label_of_class.setdefault(int(spec.classes[label]), set()).add(label)
    assert seen_k == ({0, 1, 2, 3} if augment else {0})
    # labels are shuffled per task: classes get different labels in different tasks
    assert all(len(v) == n for v in label_of_class.values()), "each class appears under every label"
    assert len(label_of_class) == len(pool), "every class gets drawn"


def test_augmentation_changes_only_rotations():
    pool = _pool()
    plain = EpisodeDataset(pool, 5, 1, 2, 4, num_tasks=40, augment=False, seed=3)
    rot = EpisodeDataset(pool, 5, 1, 2, 4, num_tasks=40, augment=True, seed=3)
    for i in range(40):
        a, b = plain.task_spec(i), rot.task_spec(i)
        np.testing.assert_array_equal(a.classes, b.classes)
        np.testing.assert_array_equal(a.images, b.images)
    assert not torch.equal(plain[0].support_x, rot[0].support_x)


def test_fixed_tasks_identical_across_constructions_and_meta_batch_sizes():
    a = EpisodeDataset.evaluation(_pool(), 5, 1, 1, 8, num_tasks=600, seed=11, stream="val")
    b = EpisodeDataset.evaluation(_pool(), 5, 1, 1, 8, num_tasks=600, seed=11, stream="val")
    assert len(a) == 75 and not a.augment
    for i in (0, 37, 74):
        for x, y in zip(a[i], b[i]):
            assert torch.equal(x, y)
    # a task's content does not depend on how tasks are grouped into meta-batches
    c = EpisodeDataset.evaluation(_pool(), 5, 1, 1, 3, num_tasks=600, seed=11, stream="val")
    e8, e3 = a[1], c[3]  # task 9 is item 1 / row 1 with T=8 and item 3 / row 0 with T=3
    assert torch.equal(e8.support_x[1], e3.support_x[0]) and torch.equal(e8.query_y[1], e3.query_y[0])
    # other seeds or streams give other tasks
    d = EpisodeDataset.evaluation(_pool(), 5, 1, 1, 8, num_tasks=600, seed=12, stream="val")
    t = EpisodeDataset.evaluation(_pool(), 5, 1, 1, 8, num_tasks=600, seed=11, stream="test")
    assert not torch.equal(a[0].support_x, d[0].support_x)
    assert not torch.equal(a[0].support_x, t[0].support_x)


def test_task_specs_are_well_spread():
    ds = EpisodeDataset.evaluation(_pool(), 5, 1, 1, 8, num_tasks=600, seed=0)
    specs = {tuple(ds.task_spec(i).images.ravel().tolist()) for i in range(600)}
    assert len(specs) == 600


def test_dataloader_workers_and_resume_give_the_same_stream():
    pool = _pool(counts=(20,) * 30, side=28)
    ds = EpisodeDataset.training(pool, 5, 1, 1, 4, num_batches=12, seed=5)
    serial = list(ds.loader(num_workers=0))
    parallel = list(ds.loader(num_workers=2))
    assert len(serial) == len(parallel) == 12
    for s, p in zip(serial, parallel):
        for x, y in zip(s, p):
            assert torch.equal(x, y)
    resumed = list(ds.loader(start=7))
    assert len(resumed) == 5
    for s, r in zip(serial[7:], resumed):
        for x, y in zip(s, r):
            assert torch.equal(x, y)
    again = EpisodeDataset.training(pool, 5, 1, 1, 4, num_batches=12, seed=5)
    assert torch.equal(again[3].query_x, serial[3].query_x)
    other = EpisodeDataset.training(pool, 5, 1, 1, 4, num_batches=12, seed=6)
    assert not torch.equal(other[3].query_x, serial[3].query_x)


def test_pool_conversion_invert_and_normalisation():
    pool = _pool(channels=3)
    raw = pool.class_images(2)
    x = pool.to_float(raw)
    np.testing.assert_allclose(x.numpy(), raw / 255.0, rtol=0, atol=1e-6)
    inv = _pool(channels=3, invert=True).to_float(raw)
    np.testing.assert_allclose(inv.numpy(), 1 - raw / 255.0, atol=1e-6)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    norm = _pool(channels=3, mean=mean, std=std).to_float(raw)
    ref = (raw / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(norm.numpy(), ref, atol=1e-5)
    with pytest.raises(ValueError, match="mean and std"):
        _pool(mean=mean)


def test_rejected_arguments():
    pool = _pool()
    with pytest.raises(ValueError, match="n_way=13"):
        EpisodeDataset(pool, 13, 1, 1, num_tasks=1)
    with pytest.raises(ValueError, match="k_shot \\+ n_query = 8"):
        EpisodeDataset(pool, 2, 5, 3, num_tasks=1)
    for kw in ({"n_way": 0}, {"k_shot": 0}, {"n_query": -1}, {"meta_batch_size": 0}, {"num_tasks": 0},
               {"k_shot": 1.5}, {"n_way": True}):
        args = {"n_way": 2, "k_shot": 1, "n_query": 1, "meta_batch_size": 1, "num_tasks": 4, **kw}
        name = next(iter(kw))
        with pytest.raises(ValueError, match=name):
            EpisodeDataset(pool, args["n_way"], args["k_shot"], args["n_query"], args["meta_batch_size"],
                           num_tasks=args["num_tasks"])
    ds = EpisodeDataset(pool, 2, 1, 1, num_tasks=4)
    with pytest.raises(IndexError):
        ds.task_spec(4)
    with pytest.raises(ValueError, match="start"):
        ds.loader(start=5)
    with pytest.raises(ValueError, match="counts sum"):
        ClassPool.from_arrays(pool.images, [1, 2])


def test_pickles_by_path_when_file_backed(tmp_path):
    from mamlpp_ext.data import ImageStore

    arr = np.random.default_rng(0).integers(0, 256, (40, 1, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "a.npy", arr)
    pool = ClassPool(ImageStore(path=tmp_path / "a.npy", mmap=True), [0, 20], [20, 20], ["a", "b"])
    ds = EpisodeDataset(pool, 2, 1, 1, 2, num_tasks=4, seed=1)
    ref = ds[1]
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000, "the image array must not be pickled"
    back = pickle.loads(blob)
    assert torch.equal(back[1].support_x, ref.support_x)


def test_shards_split_each_meta_batch_disjointly_and_completely():
    """EpisodeShard (distributed training): the P shares of meta-batch b, concatenated, are
    meta-batch b; the loader of a share resumes like the full stream's."""
    pool = _pool()
    full = EpisodeDataset.training(pool, 3, 1, 2, 4, num_batches=5, seed=3)
    for P in (1, 2, 4):
        shards = [full.shard(r, P) for r in range(P)]
        assert all(len(s) == len(full) and s.meta_batch_size == 4 // P for s in shards)
        for b in (0, 3):
            whole = full[b]
            parts = [s[b] for s in shards]
            for i in range(4):
                assert torch.equal(torch.cat([p[i] for p in parts]), whole[i])
    loaded = list(full.shard(1, 2).loader(start=2))
    assert len(loaded) == 3 and torch.equal(loaded[0][0], full.shard(1, 2)[2][0])
    with pytest.raises(ValueError, match="cannot be split evenly across 3 processes"):
        full.shard(0, 3)
    with pytest.raises(ValueError, match=r"index must be in \[0, count\)"):
        full.shard(2, 2)
