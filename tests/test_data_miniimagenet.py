"""mini-ImageNet loading on small generated folders of the real layout."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from mamlpp_ext.data import (IMAGENET_MEAN, IMAGENET_STD, CorruptImageError, DatasetNotFoundError, EpisodeDataset,
                             load_mini_imagenet, resolve_mini_imagenet_root)
from mamlpp_ext.data import miniimagenet as mini_mod
from mamlpp_ext.data.synthetic import make_fake_mini_imagenet


def _load(root, cache, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("num_workers", 0)
    return load_mini_imagenet(root, cache_dir=cache, **kw)


@pytest.fixture
def fake(tmp_path):
    return make_fake_mini_imagenet(tmp_path / "mini")


def test_load_shapes_splits_and_cache(fake, tmp_path):
    d = _load(fake, tmp_path / "c")
    assert d.built
    assert d.images.shape == (9 * 6, 3, 84, 84) and d.images.dtype == np.uint8
    pools = d.split()
    assert [len(pools[s]) for s in ("train", "val", "test")] == [4, 2, 3]
    assert all((p.counts == 6).all() for p in pools.values())
    assert pools["val"].names[0] == "nva000000"
    again = _load(fake, tmp_path / "c")
    assert not again.built
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(d.images))
    # a new image in a class invalidates the cache
    Image.fromarray(np.zeros((90, 90, 3), np.uint8)).save(fake / "test" / "nte000001" / "extra.png")
    third = _load(fake, tmp_path / "c")
    assert third.built and len(third.files) == len(d.files) + 1


def test_resize_and_imagenet_normalisation(fake, tmp_path):
    colour = (200, 100, 50)
    Image.new("RGB", (120, 97), colour).save(fake / "train" / "ntr000000" / "solid.png")
    d = _load(fake, tmp_path / "c")
    i = d.files.index("train/ntr000000/solid.png")
    np.testing.assert_array_equal(d.images[i], np.broadcast_to(np.array(colour, np.uint8)[:, None, None], (3, 84, 84)))
    pools = d.split()
    x = pools["train"].to_float(d.images[i : i + 1])
    expected = (np.array(colour) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x[0, :, 5, 7].numpy(), expected, atol=1e-5)
    raw = d.split(normalize=False)["train"].to_float(d.images[i : i + 1])
    np.testing.assert_allclose(raw[0, :, 0, 0].numpy(), np.array(colour) / 255.0, atol=1e-6)
    # a random image goes through PIL's Lanczos resize of the RGB image
    j = d.files.index("train/ntr000001/img0001.jpg")
    with Image.open(fake / d.files[j]) as im:
        ref = np.asarray(im.convert("RGB").resize((84, 84), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
    np.testing.assert_array_equal(d.images[j], ref)


def test_episodes_and_pickling(fake, tmp_path):
    d = _load(fake, tmp_path / "c")
    pools = d.split()
    ds = EpisodeDataset.training(pools["train"], 3, 2, 2, 2, num_batches=4, seed=0)
    e = ds[0]
    assert e.support_x.shape == (2, 6, 3, 84, 84) and e.query_x.shape == (2, 6, 3, 84, 84)
    assert e.support_x.dtype == torch.float32 and abs(float(e.support_x.mean())) < 1.0
    blob = pickle.dumps(ds)  # memory-mapped store pickles by path
    assert len(blob) < 10_000
    assert torch.equal(pickle.loads(blob)[0].query_x, e.query_x)


def test_missing_and_incomplete_roots(tmp_path, fake, monkeypatch):
    with pytest.raises(DatasetNotFoundError, match="train/"):
        _load(tmp_path / "nothing", tmp_path / "c")
    import shutil
    shutil.rmtree(fake / "val")
    with pytest.raises(DatasetNotFoundError, match="val is missing"):
        _load(fake, tmp_path / "c")
    monkeypatch.delenv("MAMLPP_MINIIMAGENET_ROOT", raising=False)
    monkeypatch.setattr(mini_mod, "default_mini_imagenet_root", lambda: tmp_path / "absent")
    with pytest.raises(DatasetNotFoundError, match="MAMLPP_MINIIMAGENET_ROOT"):
        resolve_mini_imagenet_root()
    monkeypatch.setenv("MAMLPP_MINIIMAGENET_ROOT", str(tmp_path))
    assert resolve_mini_imagenet_root() == tmp_path


def test_check_counts(fake, tmp_path):
    with pytest.raises(DatasetNotFoundError, match="expected 600"):
        _load(fake, tmp_path / "c", check_counts=True)


def test_corrupt_image_is_named(fake, tmp_path):
    bad = fake / "val" / "nva000001" / "img0002.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(CorruptImageError, match="val/nva000001/img0002.jpg"):
        _load(fake, tmp_path / "c")
