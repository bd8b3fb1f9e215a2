"""The readers of CIFAR-FS / FC100, tieredImageNet, CUB-200-2011 and image folders, on small
generated fixtures written in each real format (mamlpp_ext.data.synthetic): Python-2 pickles,
tar/tgz archives, extracted folders, images of every common kind.

Each test compares what the loader cached with the files decoded independently here (PIL, the
raw pickled arrays), checks the class splits against their published definitions, and checks
that damaged files end in one clear error naming them, with nothing left in the cache.
"""

import io
import pickle
import pickletools
import tarfile
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from mamlpp_ext.data import (CorruptImageError, DataError, DataMismatchError, DatasetNotFoundError, load_dataset,
                             load_pools)
from mamlpp_ext.data import cifar
from mamlpp_ext.data.synthetic import (CIFAR100_CLASSES, make_fake_cifar100, make_fake_cub, make_fake_image_folder,
                                       make_fake_tiered_imagenet)


def _load(name, root, cache, **kw):
    kw.setdefault("check_counts", False)
    kw.setdefault("progress", False)
    kw.setdefault("num_workers", 0)
    return load_dataset(name, root, cache_dir=cache, **kw)


def _cache_files(cache):
    return sorted(p.name for p in cache.rglob("*") if p.is_file() and p.parent.name != ".locks") \
        if cache.exists() else []


# --------------------------------------------------------------------------- CIFAR-FS and FC100


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return make_fake_cifar100(tmp_path_factory.mktemp("cifar"), layout="archive", seed=3)


def _raw_cifar(root):
    """The archive's train and test pickles, read here with the standard library as torchvision does."""
    out = {}
    with tarfile.open(root / "cifar-100-python.tar.gz") as tf:
        for name in ("train", "test", "meta"):
            out[name] = pickle.load(tf.extractfile(f"cifar-100-python/{name}"), encoding="latin1")
    return out


def test_cifar_fixture_is_a_python2_pickle(cifar_root):
    with tarfile.open(cifar_root / "cifar-100-python.tar.gz") as tf:
        blob = tf.extractfile("cifar-100-python/train").read()
    ops = {op.name for op, _, _ in pickletools.genops(blob)}
    assert blob[:2] == b"\x80\x02" and {"SHORT_BINSTRING", "BINSTRING", "GLOBAL"} <= ops
    assert not ops & {"BINUNICODE", "SHORT_BINBYTES", "BINBYTES", "STACK_GLOBAL"}, "Python 3 opcodes"
    assert b"numpy.core.multiarray\n_reconstruct" in blob


def test_cifar_images_splits_and_shared_cache(cifar_root, tmp_path):
    raw = _raw_cifar(cifar_root)
    fs = _load("cifar-fs", cifar_root, tmp_path / "c")
    assert fs.built and fs.images.shape == (600, 3, 32, 32)
    names = raw["meta"]["fine_label_names"]
    assert fs.class_names == names and list(fs.counts) == [6] * 100
    # class c holds its train rows then its test rows, in file order, as (3, 32, 32)
    for c in (0, 37, 99):
        expect = np.concatenate([raw[p]["data"][np.asarray(raw[p]["fine_labels"]) == c] for p in ("train", "test")])
        np.testing.assert_array_equal(fs.class_images(c), expect.reshape(-1, 3, 32, 32))
    pools = fs.pools()
    assert [len(pools[s]) for s in ("train", "val", "test")] == [64, 16, 20]
    assert set(pools["val"].names) == set(cifar.CIFAR_FS_VAL) and set(pools["test"].names) == set(cifar.CIFAR_FS_TEST)
    # FC100 reads the same files, shares the cache, and splits by superclass
    fc = _load("fc100", cifar_root, tmp_path / "c")
    assert not fc.built and fc.cache_path == fs.cache_path
    pools = fc.pools()
    assert [len(pools[s]) for s in ("train", "val", "test")] == [60, 20, 20]
    for split, supers in (("val", cifar.FC100_VAL), ("test", cifar.FC100_TEST)):
        assert set(pools[split].names) == {n for s in supers for n in CIFAR100_CLASSES[s]}
    # normalised with CIFAR-100's per-channel statistics
    x = pools["train"].to_float(fc.images[:1])
    mean, std = np.array(cifar.MEAN)[:, None, None], np.array(cifar.STD)[:, None, None]
    expect = (fc.images[0].astype(np.float64) / 255 - mean) / std
    np.testing.assert_allclose(x[0].numpy(), expect, atol=1e-5)


def test_cifar_extracted_folder_equals_archive(cifar_root, tmp_path):
    folder = make_fake_cifar100(tmp_path / "f", layout="folder", seed=3)
    a = _load("cifar-fs", cifar_root, tmp_path / "c")
    b = _load("cifar-fs", folder, tmp_path / "c")
    assert b.built and b.cache_path != a.cache_path
    np.testing.assert_array_equal(a.images, b.images)
    # torchvision's root (the folder holding cifar-100-python/) and the extracted folder itself both work
    c = _load("cifar-fs", folder / "cifar-100-python", tmp_path / "c")
    np.testing.assert_array_equal(a.images, c.images)


def test_cifar_resized_and_counts(cifar_root, tmp_path):
    d = _load("cifar-fs", cifar_root, tmp_path / "c", image_shape=(3, 20, 20))
    ref = np.asarray(Image.fromarray(_load("cifar-fs", cifar_root, tmp_path / "c").images[5].transpose(1, 2, 0))
                     .resize((20, 20), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
    np.testing.assert_array_equal(d.images[5], ref)
    with pytest.raises(DatasetNotFoundError, match="expected 100 of 600 images"):
        _load("cifar-fs", cifar_root, tmp_path / "c", check_counts=True)
    with pytest.raises(DataMismatchError, match="image_channels must be 3"):
        _load("cifar-fs", cifar_root, tmp_path / "c", image_shape=(1, 32, 32))


def test_truncated_cifar_archive(cifar_root, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    blob = (cifar_root / "cifar-100-python.tar.gz").read_bytes()
    (bad / "cifar-100-python.tar.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="cifar-100-python.tar.gz is damaged or truncated.*download") as e:
        _load("cifar-fs", bad, tmp_path / "c")
    assert "\n" not in str(e.value)
    assert _cache_files(tmp_path / "c") == []


def test_cifar_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python.tar.gz.*mamlpp-data download cifar-fs"):
        _load("cifar-fs", tmp_path, tmp_path / "c")


# --------------------------------------------------------------------------- tieredImageNet


@pytest.fixture(scope="module")
def tiered_root(tmp_path_factory):
    return make_fake_tiered_imagenet(tmp_path_factory.mktemp("tiered"), layout="folder", seed=5)


def test_tiered_images_and_splits(tiered_root, tmp_path):
    d = _load("tiered-imagenet", tiered_root, tmp_path / "c")
    pools = d.pools()
    assert [len(pools[s]) for s in ("train", "val", "test")] == [6, 5, 5]
    start = 0
    for split in ("train", "val", "test"):
        with open(tiered_root / f"{split}_images_png.pkl", "rb") as f:
            pngs = pickle.load(f, encoding="latin1")  # the usual way, for the reference
        with open(tiered_root / f"{split}_labels.pkl", "rb") as f:
            labels = pickle.load(f, encoding="latin1")
        assert set(labels) == {"label_specific", "label_general", "label_specific_str", "label_general_str"}
        order = np.argsort(labels["label_specific"], kind="stable")
        for k in (0, len(order) // 2, len(order) - 1):
            with Image.open(io.BytesIO(pngs[order[k]].tobytes())) as im:
                ref = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
            np.testing.assert_array_equal(d.images[start + k], ref)
        start += len(order)
        assert pools[split].names[0] == labels["label_specific_str"][0]
    assert d.listing.info["categories"][0] == "train category 0"


@pytest.mark.parametrize("layout", ["subfolder", "tar"])
def test_tiered_layouts_agree(tiered_root, tmp_path, layout):
    ref = _load("tiered-imagenet", tiered_root, tmp_path / "c")
    root = make_fake_tiered_imagenet(tmp_path / layout, layout=layout, seed=5)
    other = _load("tiered-imagenet", root, tmp_path / "c")
    assert other.class_names == ref.class_names
    np.testing.assert_array_equal(other.images, ref.images)


def test_tiered_streams_the_pickles(tmp_path):
    """The image pickles are never held in memory: the peak of Python allocations while building
    does not grow with the size of the pickles (a plain pickle.load would hold them all)."""
    peaks, sizes = [], []
    for n in (4, 16):
        root = make_fake_tiered_imagenet(tmp_path / f"t{n}", classes=(n, 1, 1), images=(60, 60), seed=1)
        sizes.append(sum((root / f"{s}_images_png.pkl").stat().st_size for s in ("train", "val", "test")))
        tracemalloc.start()
        try:
            _load("tiered-imagenet", root, tmp_path / "c", mmap=True)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert sizes[1] > 3 * sizes[0] and sizes[1] > 20_000_000
    assert peaks[1] < 1.25 * peaks[0] and peaks[1] < sizes[1] / 2, (peaks, sizes)


def test_tiered_damaged_files(tiered_root, tmp_path):
    import shutil

    root = tmp_path / "t"
    shutil.copytree(tiered_root, root)
    # a truncated image pickle: named, with the fix; nothing cached
    blob = (root / "val_images_png.pkl").read_bytes()
    (root / "val_images_png.pkl").write_bytes(blob[: len(blob) * 2 // 3])
    with pytest.raises(DataError, match=r"val_images_png.pkl cannot be read as a pickle \(it ends early: truncated\)"):
        _load("tiered-imagenet", root, tmp_path / "c")
    assert _cache_files(tmp_path / "c") == []
    # a damaged PNG inside the pickle: every bad image named by file and index
    shutil.copy(tiered_root / "val_images_png.pkl", root / "val_images_png.pkl")
    with open(root / "train_images_png.pkl", "rb") as f:
        pngs = pickle.load(f, encoding="latin1")
    for k in (1, 4):
        pngs[k] = np.frombuffer(pngs[k].tobytes()[:200], np.uint8).reshape(-1, 1)
    from mamlpp_ext.data.synthetic import dump_py2_pickle

    with open(root / "train_images_png.pkl", "wb") as f:
        dump_py2_pickle(pngs, f)
    with pytest.raises(CorruptImageError, match=r"2 unreadable files.*train_images_png.pkl\[1\].*"
                                                r"train_images_png.pkl\[4\]") as e:
        _load("tiered-imagenet", root, tmp_path / "c")
    assert len(e.value.files) == 2 and _cache_files(tmp_path / "c") == []
    # labels that do not belong to the images
    shutil.copy(tiered_root / "train_images_png.pkl", root / "train_images_png.pkl")
    shutil.copy(tiered_root / "val_labels.pkl", root / "train_labels.pkl")
    with pytest.raises(DataError, match="do not belong together|more images than its labels"):
        _load("tiered-imagenet", root, tmp_path / "c")


def test_tiered_refuses_other_globals(tiered_root, tmp_path):
    import shutil

    root = tmp_path / "t"
    shutil.copytree(tiered_root, root)
    with open(root / "test_labels.pkl", "wb") as f:
        pickle.dump({"label_specific": [0], "label_specific_str": [print]}, f, protocol=2)
    with pytest.raises(DataError, match=r"(__builtin__|builtins)\.print.*refused"):
        _load("tiered-imagenet", root, tmp_path / "c")


def test_tiered_missing_names_the_files(tmp_path):
    (tmp_path / "train_images_png.pkl").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError, match="missing train_labels.pkl.*no official download"):
        _load("tiered-imagenet", tmp_path, tmp_path / "c")
    with pytest.raises(DatasetNotFoundError, match="expected 351 and 448695"):
        _load("tiered-imagenet", make_fake_tiered_imagenet(tmp_path / "t"), tmp_path / "c", check_counts=True)


# --------------------------------------------------------------------------- CUB-200-2011


def test_cub_archive_and_folder_and_split(tmp_path):
    arc = _load("cub", make_fake_cub(tmp_path / "a", layout="archive", seed=2), tmp_path / "c")
    folder_root = make_fake_cub(tmp_path / "f", layout="folder", seed=2)
    fol = _load("cub", folder_root, tmp_path / "c")
    assert arc.class_names == fol.class_names and arc.files == fol.files
    np.testing.assert_array_equal(arc.images, fol.images)
    # the extracted CUB_200_2011/ folder itself is a valid root too
    np.testing.assert_array_equal(_load("cub", folder_root / "CUB_200_2011", tmp_path / "c").images, fol.images)
    # Chen et al.: sorted class i -> train if i % 2 == 0, val if i % 4 == 1, test if i % 4 == 3
    ids = fol.split_ids()
    names = sorted(fol.class_names)
    for split, rule in (("train", lambda i: i % 2 == 0), ("val", lambda i: i % 4 == 1), ("test", lambda i: i % 4 == 3)):
        assert sorted(fol.class_names[i] for i in ids[split]) == [n for i, n in enumerate(names) if rule(i)]
    # every image: RGB (grey JPEGs converted), Lanczos to 84x84
    for k in (0, 6, 13):
        with Image.open(folder_root / "CUB_200_2011" / "images" / fol.files[k]) as im:
            ref = np.asarray(im.convert("RGB").resize((84, 84), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
        np.testing.assert_array_equal(fol.images[k], ref)


def test_cub_damaged(tmp_path):
    root = make_fake_cub(tmp_path / "a", layout="archive")
    blob = (root / "CUB_200_2011.tgz").read_bytes()
    (root / "CUB_200_2011.tgz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="CUB_200_2011.tgz is damaged or truncated.*mamlpp-data download cub"):
        _load("cub", root, tmp_path / "c")
    root = make_fake_cub(tmp_path / "b", layout="archive")
    with pytest.raises(DatasetNotFoundError, match="expected 200 and 11788"):
        _load("cub", root, tmp_path / "c", check_counts=True)
    assert _cache_files(tmp_path / "c") == []


# --------------------------------------------------------------------------- image folders


def test_image_folder_mixed_formats(tmp_path):
    root = make_fake_image_folder(tmp_path / "f", layout="split", seed=4)
    d = _load("folder", root, tmp_path / "c")
    pools = d.pools()
    assert [len(pools[s]) for s in ("train", "val", "test")] == [6, 5, 5]
    assert len(set(d.counts)) > 1, "uneven class sizes"
    seen = set()
    for k, f in enumerate(d.files):
        with Image.open(root / f) as im:
            seen.add(im.mode)
            if im.mode == "I;16":
                a = np.asarray(im, dtype=np.float64)
                im = Image.fromarray(np.clip(np.rint(a * 255 / 65535), 0, 255).astype(np.uint8), "L")
            ref = np.asarray(im.convert("RGB").resize((84, 84), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
        np.testing.assert_array_equal(d.images[k], ref, err_msg=f)
    assert {"L", "RGB", "RGBA", "P", "I;16"} <= seen
    assert pools["train"].mean is None, "the user's images are scaled to [0, 1], not normalised"


def test_image_folder_size_channels_and_key(tmp_path):
    root = make_fake_image_folder(tmp_path / "f", layout="split", seed=4)
    a = _load("folder", root, tmp_path / "c", image_shape=(1, 32, 48))
    assert a.images.shape[1:] == (1, 32, 48)
    with Image.open(root / a.files[3]) as im:
        if im.mode == "I;16":
            pytest.skip("the 16-bit image is checked above")
        ref = np.asarray(im.convert("L").resize((48, 32), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(a.images[3, 0], ref)
    b = _load("folder", root, tmp_path / "c")
    assert b.built and b.cache_path.parent != a.cache_path.parent, "the cache is keyed by the image size"
    assert not _load("folder", root, tmp_path / "c", image_shape=(1, 32, 48)).built


def test_single_tree_seeded_split(tmp_path):
    root = make_fake_image_folder(tmp_path / "s", layout="single", classes=(10, 3, 2), seed=1)
    d = _load("folder", root, tmp_path / "c")
    ids = d.split_ids(seed=0)
    assert [len(ids[s]) for s in ("train", "val", "test")] == [10, 2, 3]  # round(.64*15), round(.16*15), rest
    assert sorted(np.concatenate(list(ids.values())).tolist()) == list(range(15))
    # the rule: names sorted, permuted by default_rng(seed)
    names = sorted(d.class_names)
    perm = np.random.default_rng(0).permutation(15)
    assert sorted(d.class_names[i] for i in ids["val"]) == sorted(names[i] for i in perm[10:12])
    assert {k: v.tolist() for k, v in d.split_ids(seed=0).items()} == {k: v.tolist() for k, v in ids.items()}
    assert d.split_ids(seed=1)["train"].tolist() != ids["train"].tolist()


def test_task_shape_checked_before_any_decoding(tmp_path):
    root = make_fake_image_folder(tmp_path / "f", layout="split", classes=(6, 4, 5), images=(3, 6), seed=2)
    with pytest.raises(DataMismatchError, match=r"5-way tasks need 5 classes, but the 'val' split .* has 4"):
        load_pools("folder", root, ways=5, shots=1, queries=1, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(DataMismatchError, match=r"need 16 images per class.*'train' split.*class_train_00"):
        load_pools("folder", root, ways=3, shots=1, queries=15, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(DataMismatchError, match="square"):
        load_pools("cifar-fs", make_fake_cifar100(tmp_path / "cf"), image_shape=(3, 32, 28), cache_dir=tmp_path / "c")
    assert _cache_files(tmp_path / "c") == [], "nothing is decoded or cached before the checks"
    pools = load_pools("folder", root, ways=3, shots=1, queries=1, cache_dir=tmp_path / "c", progress=False)
    assert len(pools["val"]) == 4


def test_empty_class_folder_is_named(tmp_path):
    root = make_fake_image_folder(tmp_path / "f", layout="split")
    (root / "val" / "empty_class").mkdir()
    with pytest.raises(DatasetNotFoundError, match="empty_class holds no images"):
        _load("folder", root, tmp_path / "c")
