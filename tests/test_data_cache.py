"""The one cache every dataset uses, and how bad files are reported.

Cache: each load checks the entry (meta.json, the .npy header, the byte count, the shape, dtype
and class counts); a stale or damaged entry is rebuilt with a message naming it; a failed or
interrupted build leaves nothing behind; a full disk is an error naming the folder.

Bad files: every bad file of a dataset is listed in one error, found by a quick first pass
before any image is decoded (garbage, empty and truncated files, zip members with a bad CRC);
what only decoding can find is collected by the decoding pass, again all at once.
"""

import io
import json
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from mamlpp_ext.data import CorruptImageError, DataError, load_dataset, load_omniglot
from mamlpp_ext.data import images as images_mod
from mamlpp_ext.data.synthetic import make_fake_image_folder, make_fake_omniglot


def _load(root, cache, name="folder", **kw):
    kw.setdefault("progress", False)
    kw.setdefault("num_workers", 0)
    return load_dataset(name, root, cache_dir=cache, **kw)


@pytest.fixture
def folder(tmp_path):
    return make_fake_image_folder(tmp_path / "f", layout="split", classes=(3, 3, 3), images=(3, 5), seed=7)


def _entry_files(cache):
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*")
                  if p.is_file() and ".locks" not in p.parts) if cache.exists() else []


# --------------------------------------------------------------------------- checks on load


@pytest.mark.parametrize("damage, why", [
    ("truncate", "truncated"),
    ("meta-garbage", "unreadable"),
    ("meta-shape", "says uint8"),
    ("meta-counts", "class counts"),
    ("array-missing", "missing"),
    ("header", "header"),
])
def test_damaged_entry_is_named_and_rebuilt(folder, tmp_path, damage, why):
    cache = tmp_path / "c"
    first = _load(folder, cache)
    good = np.array(first.images)
    path, meta_path = first.cache_path, first.cache_path.parent / "meta.json"
    meta = json.loads(meta_path.read_text())
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 1000)
    elif damage == "meta-garbage":
        meta_path.write_text("{not json")
    elif damage == "meta-shape":
        meta_path.write_text(json.dumps({**meta, "shape": [meta["shape"][0] + 1, *meta["shape"][1:]]}))
    elif damage == "meta-counts":
        meta_path.write_text(json.dumps({**meta, "class_counts": [c + 1 for c in meta["class_counts"]]}))
    elif damage == "array-missing":
        path.unlink()
    elif damage == "header":
        path.write_bytes(b"garbage" * 10)
    messages = []
    again = _load(folder, cache, log=messages.append)
    assert again.built, "a damaged entry must be rebuilt"
    assert len(messages) == 1 and str(path.parent) in messages[0] and "damaged" in messages[0] and why in messages[0]
    np.testing.assert_array_equal(again.images, good)
    assert not _load(folder, cache, log=messages.append).built and len(messages) == 1


def test_stale_entry_message(folder, tmp_path):
    cache = tmp_path / "c"
    _load(folder, cache)
    Image.new("RGB", (30, 30), (1, 2, 3)).save(folder / "train" / "class_train_00" / "new.png")
    messages = []
    d = _load(folder, cache, log=messages.append)
    assert d.built and messages and "stale" in messages[0]
    assert _entry_files(cache) == sorted([f"{d.cache_path.parent.name}/meta.json",
                                          f"{d.cache_path.parent.name}/{d.cache_path.name}"])


def test_interrupted_build_leaves_nothing(folder, tmp_path, monkeypatch):
    cache = tmp_path / "c"

    def interrupt(self, index, payload):
        raise KeyboardInterrupt

    monkeypatch.setattr(images_mod.Decoder, "add", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _load(folder, cache)
    assert _entry_files(cache) == []
    monkeypatch.undo()
    assert _load(folder, cache).built


def test_full_disk(folder, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1000))
    with pytest.raises(DataError, match=r"not enough space for the image folder cache in .* free some space or "
                                        r"choose another cache folder with --cache-dir"):
        _load(folder, cache)
    monkeypatch.undo()

    def enospc(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(images_mod.Decoder, "finish", enospc)
    with pytest.raises(DataError, match="is full; free some space"):
        _load(folder, cache)
    assert _entry_files(cache) == []


# --------------------------------------------------------------------------- bad files


def _truncated_png(path):
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])


def _bad_idat_png(path, size=(40, 30)):
    """A PNG whose header and IEND are intact but whose pixel data is garbage: only decoding finds it."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(buf, "PNG")
    blob = bytearray(buf.getvalue())
    i = blob.index(b"IDAT") + 20
    blob[i:i + 40] = bytes(40)
    path.write_bytes(bytes(blob))


def test_all_bad_files_listed_before_any_decoding(folder, tmp_path, monkeypatch):
    victims = sorted(folder.rglob("*.png"))[:2] + sorted(folder.rglob("*.jp*g"))[:1] + sorted(folder.rglob("*.bmp"))[:1]
    _truncated_png(victims[0])
    victims[1].write_bytes(b"")
    jpeg = victims[2].read_bytes()
    victims[2].write_bytes(jpeg[: len(jpeg) * 2 // 3])
    victims[3].write_bytes(b"this is not an image at all")

    def never(self, index, payload):
        raise AssertionError("the decoding pass must not start when the first pass found bad files")

    monkeypatch.setattr(images_mod.Decoder, "add", never)
    with pytest.raises(CorruptImageError) as e:
        _load(folder, tmp_path / "c")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("4 unreadable files in image folder")
    for v in victims:
        assert str(v) in msg
    assert "truncated" in msg and "empty file" in msg and "not a readable image" in msg
    assert "Fix: replace or remove the files named" in msg and "nothing was cached" in msg
    assert len(e.value.files) == 4 and _entry_files(tmp_path / "c") == []


def test_what_only_decoding_finds_is_listed_too(folder, tmp_path):
    pngs = sorted(folder.rglob("*.png"))
    for p in (pngs[0], pngs[3]):
        _bad_idat_png(p)
    assert images_mod.check_payloads([(0, images_mod.ImageRef(str(pngs[0])))], num_workers=0, progress=False) == []
    with pytest.raises(CorruptImageError) as e:
        _load(folder, tmp_path / "c")
    assert str(pngs[0]) in str(e.value) and str(pngs[3]) in str(e.value) and len(e.value.files) == 2
    assert _entry_files(tmp_path / "c") == []


def test_many_bad_files_are_listed_in_a_report(folder, tmp_path):
    files = sorted(f for f in folder.rglob("*") if f.is_file())[:12]
    for f in files:
        f.write_bytes(b"junk")
    with pytest.raises(CorruptImageError, match=r"12 unreadable files.*; and 2 more \(all 12 are listed in ") as e:
        _load(folder, tmp_path / "c", num_workers=2)
    report = tmp_path / "c" / "bad-files-folder.txt"
    assert sorted(line.split(": ")[0] for line in report.read_text().splitlines()) == sorted(map(str, files))
    assert len(e.value.files) == 12


def test_zip_crc_error_is_named(tmp_path):
    root = make_fake_omniglot(tmp_path / "og", layout="zip")
    archive = root / "images_evaluation.zip"
    with zipfile.ZipFile(archive) as zf:
        info = sorted(zf.infolist(), key=lambda i: i.filename)[3]
    blob = bytearray(archive.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    blob[start + info.compress_size // 2] ^= 0xFF
    archive.write_bytes(bytes(blob))
    with pytest.raises(CorruptImageError, match=rf"images_evaluation.zip!{info.filename}: damaged archive member"):
        load_omniglot(root, cache_dir=tmp_path / "c", check_counts=False, progress=False, num_workers=0)
    assert _entry_files(tmp_path / "c") == []


def test_damaged_zip_is_named(tmp_path):
    root = make_fake_omniglot(tmp_path / "og", layout="zip")
    blob = (root / "images_background.zip").read_bytes()
    (root / "images_background.zip").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="images_background.zip.*damaged or truncated; download it again"):
        load_omniglot(root, cache_dir=tmp_path / "c", check_counts=False, progress=False)


def test_unreadable_folder_is_one_data_error(tmp_path, monkeypatch):
    """A folder or file the process cannot read (simulated: the tests may run as root) is a
    DataError naming it, not a traceback."""
    import os

    from mamlpp_ext.data import omniglot as omniglot_mod

    root = make_fake_omniglot(tmp_path / "og", layout="folder")
    real = os.listdir

    def listdir(p):
        if "Ev_Alphabet_01" in str(p):
            raise PermissionError(13, "Permission denied", str(p))
        return real(p)

    monkeypatch.setattr(omniglot_mod.os, "listdir", listdir)
    with pytest.raises(DataError, match=r"cannot read .*Ev_Alphabet_01 \(Omniglot, .*\): Permission denied; check"):
        load_omniglot(root, cache_dir=tmp_path / "c", check_counts=False, progress=False)


def test_cache_folder_is_where_the_loader_builds(tmp_path):
    """scripts/gpu_check.sh places a carried Omniglot cache with cache_folder()."""
    from mamlpp_ext.data.loader import cache_folder

    root = make_fake_omniglot(tmp_path / "og", layout="zip")
    d = load_omniglot(root, cache_dir=tmp_path / "c", check_counts=False, progress=False, num_workers=0)
    assert cache_folder("omniglot", root, cache_dir=tmp_path / "c") == d.cache_path.parent
    copied = tmp_path / "c2" / d.cache_path.parent.name
    shutil.copytree(d.cache_path.parent, copied)
    again = load_omniglot(root, cache_dir=tmp_path / "c2", check_counts=False, progress=False)
    assert not again.built, "a copied entry is used as it is"
