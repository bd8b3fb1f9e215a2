"""Small generated datasets with the real layouts, for tests and smoke runs without the data.

Images are random, so nothing can be learned from them; the point is the file layout, the file
formats (archives, Python-2 pickles, image formats) and the counts: each is written as close to
the real files as we can.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np


def _binary_png(rng: np.random.Generator, size: int = 105) -> bytes:
    """A 1-bit PNG like Omniglot's: white background with a few black random strokes."""
    from PIL import Image, ImageDraw

    im = Image.new("1", (size, size), 1)
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        pts = [tuple(int(v) for v in rng.integers(5, size - 5, 2)) for _ in range(4)]
        draw.line(pts, fill=0, width=int(rng.integers(2, 6)))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def make_fake_omniglot(root: str | os.PathLike, *, alphabets=(3, 2), characters: int = 4, drawings: int = 5,
                       layout: str = "zip", seed: int = 0) -> Path:
    """Write a small Omniglot-shaped tree under ``root`` and return ``root``.

    ``alphabets`` = (background, evaluation) alphabet counts, each with ``characters``
    characters of ``drawings`` 105×105 1-bit PNGs named like the real ones. ``layout``:
    "zip" (images_background.zip, images_evaluation.zip), "folder" (extracted folders) or
    "torchvision" (extracted folders under omniglot-py/).
    """
    if layout not in ("zip", "folder", "torchvision"):
        raise ValueError(f"layout must be 'zip', 'folder' or 'torchvision', got {layout!r}")
    root = Path(root)
    base = root / "omniglot-py" if layout == "torchvision" else root
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    char_id = 0
    for part, n_alpha in zip(("images_background", "images_evaluation"), alphabets):
        files = {}
        for a in range(n_alpha):
            alpha = f"{'Bg' if part.endswith('background') else 'Ev'}_Alphabet_{a:02d}"
            for c in range(characters):
                char_id += 1
                for d in range(drawings):
                    files[f"{part}/{alpha}/character{c + 1:02d}/{char_id:04d}_{d + 1:02d}.png"] = _binary_png(rng)
        if layout == "zip":
            with zipfile.ZipFile(base / f"{part}.zip", "w") as zf:
                for name, data in files.items():
                    zf.writestr(name, data)
        else:
            for name, data in files.items():
                p = base / name
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
    return root


def make_fake_mini_imagenet(root: str | os.PathLike, *, classes=(4, 2, 3), images: int = 6, seed: int = 0) -> Path:
    """Write ``root/{train,val,test}/<class>/<image>`` with ``classes`` classes per split and
    ``images`` random RGB images per class, of assorted sizes, as JPEG and PNG; returns ``root``."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val", "test"), classes):
        for c in range(n):
            d = root / split / f"n{split[:2]}{c:06d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(images):
                h, w = (int(v) for v in rng.integers(60, 140, 2))
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                ext = "png" if i % 3 == 0 else "jpg"
                Image.fromarray(arr).save(d / f"img{i:04d}.{ext}")
    return root


# --------------------------------------------------------------------------- Python-2 pickles


class _Py2Global:
    """A global as Python 2 named it (``numpy.core.multiarray._reconstruct``)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # never called: only written
        raise TypeError("a placeholder for a Python 2 global")


class _Py2Pickler(pickle._Pickler):
    """Writes protocol 2 as Python 2's ``cPickle`` did for these datasets: byte and text strings as
    Python 2 ``str`` (SHORT_BINSTRING / BINSTRING), NumPy arrays through
    ``numpy.core.multiarray._reconstruct`` with their raw bytes in the state, dtypes through
    ``numpy.dtype``; everything memoised as cPickle does."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, f):
        super().__init__(f, protocol=2)

    def save_bytes(self, obj) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    def save_str(self, obj) -> None:
        self.save(obj.encode("latin1"))  # through the memo: short byte strings are shared objects

    def save_py2_global(self, obj) -> None:
        self.write(pickle.GLOBAL + obj.module.encode() + b"\n" + obj.name.encode() + b"\n")
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str
    dispatch[_Py2Global] = save_py2_global

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            return (_RECONSTRUCT, (_NDARRAY, (0,), b"b"), (1, obj.shape, obj.dtype, False, obj.tobytes()))
        if isinstance(obj, np.dtype):
            return (_DTYPE, (obj.str[1:], 0, 1), (3, obj.str[0], None, None, None, -1, -1, 0))
        return NotImplemented


_RECONSTRUCT = _Py2Global("numpy.core.multiarray", "_reconstruct")
_NDARRAY = _Py2Global("numpy", "ndarray")
_DTYPE = _Py2Global("numpy", "dtype")


def dump_py2_pickle(obj, f) -> None:
    """Pickle ``obj`` (dicts, lists, str, ints, NumPy arrays) into the binary file ``f`` the way
    Python 2's cPickle wrote the CIFAR-100 and tieredImageNet files (protocol 2)."""
    _Py2Pickler(f).dump(obj)


# --------------------------------------------------------------------------- CIFAR-100


# CIFAR-100's 20 superclasses and their 100 classes, with the names its meta file uses.
CIFAR100_CLASSES = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}


def make_fake_cifar100(root: str | os.PathLike, *, train_per_class: int = 5, test_per_class: int = 1,
                       layout: str = "archive", seed: int = 0) -> Path:
    """Write CIFAR-100's python version under ``root`` with random pixels and ``train_per_class``
    + ``test_per_class`` images of each of the 100 classes (the real set: 500 + 100); returns
    ``root``.

    As the real files: ``cifar-100-python/{train,test,meta}`` pickled by Python 2 (protocol 2,
    ``str`` keys as Python 2 strings, ``data`` a uint8 (N, 3072) array of the R, G, B planes,
    ``fine_labels`` / ``coarse_labels`` lists, ``filenames``, ``batch_label``), the classes
    shuffled through the files. ``layout``: "archive" (``cifar-100-python.tar.gz``, as
    torchvision downloads it) or "folder" (extracted).
    """
    if layout not in ("archive", "folder"):
        raise ValueError(f"layout must be 'archive' or 'folder', got {layout!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fine_names = sorted(n for names in CIFAR100_CLASSES.values() for n in names)
    coarse_names = sorted(CIFAR100_CLASSES)
    coarse_of = {n: coarse_names.index(c) for c, names in CIFAR100_CLASSES.items() for n in names}
    files = {}
    for part, per in (("train", train_per_class), ("test", test_per_class)):
        fine = np.repeat(np.arange(100), per)
        rng.shuffle(fine)
        data = rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8)
        d = {"filenames": [f"img_{part}_{i:05d}.png" for i in range(len(fine))],
             "batch_label": f"{'training' if part == 'train' else 'testing'} batch 1 of 1",
             "fine_labels": [int(f) for f in fine], "coarse_labels": [coarse_of[fine_names[f]] for f in fine],
             "data": data}
        buf = io.BytesIO()
        dump_py2_pickle(d, buf)
        files[part] = buf.getvalue()
    buf = io.BytesIO()
    dump_py2_pickle({"fine_label_names": fine_names, "coarse_label_names": coarse_names}, buf)
    files["meta"] = buf.getvalue()
    files["file.txt~"] = b""
    if layout == "folder":
        d = root / "cifar-100-python"
        d.mkdir(exist_ok=True)
        for name, blob in files.items():
            (d / name).write_bytes(blob)
    else:
        with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tf:
            info = tarfile.TarInfo("cifar-100-python")
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
            for name, blob in files.items():
                info = tarfile.TarInfo(f"cifar-100-python/{name}")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    return root


# --------------------------------------------------------------------------- tieredImageNet


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_fake_tiered_imagenet(root: str | os.PathLike, *, classes=(6, 5, 5), images=(3, 6), categories: int = 2,
                              layout: str = "folder", seed: int = 0) -> Path:
    """Write tieredImageNet's pickled PNG files under ``root`` with random 84×84 RGB images;
    returns ``root``.

    ``classes``: per split (train, val, test); ``images``: the range of images per class (uneven,
    as the real ones); ``categories``: ImageNet categories per split. As the real files:
    ``{split}_images_png.pkl``, a Python 2 pickle (protocol 2) of one list of uint8 (n, 1) arrays,
    each a PNG file, the images of a class one after another; ``{split}_labels.pkl``, a dict
    with ``label_specific`` / ``label_general`` (int32 arrays) and ``label_specific_str`` /
    ``label_general_str`` (lists of names). ``layout``: "folder" (the six files in ``root``),
    "subfolder" (in ``root/tiered-imagenet/``) or "tar" (``root/tiered-imagenet.tar``).
    """
    if layout not in ("folder", "subfolder", "tar"):
        raise ValueError(f"layout must be 'folder', 'subfolder' or 'tar', got {layout!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    files = {}
    for split, n_cls in zip(("train", "val", "test"), classes):
        arrays, specific, general = [], [], []
        names = [f"n{split[:2]}{c:05d} {split} class {c}" for c in range(n_cls)]
        cats = [f"{split} category {k}" for k in range(categories)]
        for c in range(n_cls):
            for _ in range(int(rng.integers(images[0], images[1] + 1))):
                png = _png(rng.integers(0, 256, (84, 84, 3), dtype=np.uint8))
                arrays.append(np.frombuffer(png, dtype=np.uint8).reshape(-1, 1))
                specific.append(c)
                general.append(c % categories)
        for name, obj in ((f"{split}_images_png.pkl", arrays),
                          (f"{split}_labels.pkl", {"label_specific": np.array(specific, np.int32),
                                                   "label_general": np.array(general, np.int32),
                                                   "label_specific_str": names, "label_general_str": cats})):
            buf = io.BytesIO()
            dump_py2_pickle(obj, buf)
            files[name] = buf.getvalue()
    if layout == "tar":
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(root / "tiered-imagenet.tar", "w") as tf:
            for name, blob in files.items():
                info = tarfile.TarInfo(f"tiered-imagenet/{name}")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    else:
        d = root / "tiered-imagenet" if layout == "subfolder" else root
        d.mkdir(parents=True, exist_ok=True)
        for name, blob in files.items():
            (d / name).write_bytes(blob)
    return root


# --------------------------------------------------------------------------- CUB-200-2011


def make_fake_cub(root: str | os.PathLike, *, classes: int = 20, images=(3, 6), layout: str = "archive",
                  seed: int = 0) -> Path:
    """Write a CUB-200-2011-shaped tree under ``root`` with random JPEGs of assorted sizes (some
    grey, as a few real ones are); returns ``root``.

    ``CUB_200_2011/images/NNN.Species_NNN/Species_NNN_XXXX_YYYYY.jpg`` plus the metadata files
    (images.txt, classes.txt, image_class_labels.txt, train_test_split.txt) and the archive's
    top-level attributes.txt. ``layout``: "archive" (``CUB_200_2011.tgz``) or "folder" (extracted).
    """
    from PIL import Image

    if layout not in ("archive", "folder"):
        raise ValueError(f"layout must be 'archive' or 'folder', got {layout!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    images_txt, labels_txt, split_txt, classes_txt = [], [], [], []
    k = 0
    for c in range(1, classes + 1):
        cls = f"{c:03d}.Species_{c:03d}"
        classes_txt.append(f"{c} {cls}")
        for _ in range(int(rng.integers(images[0], images[1] + 1))):
            k += 1
            h, w = (int(v) for v in rng.integers(40, 90, 2))
            grey = k % 7 == 0
            arr = rng.integers(0, 256, (h, w) if grey else (h, w, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=85)
            name = f"{cls}/Species_{c:03d}_{k:04d}_{int(rng.integers(10000, 99999))}.jpg"
            files[f"CUB_200_2011/images/{name}"] = buf.getvalue()
            images_txt.append(f"{k} {name}")
            labels_txt.append(f"{k} {c}")
            split_txt.append(f"{k} {k % 2}")
    for name, lines in (("images.txt", images_txt), ("classes.txt", classes_txt),
                        ("image_class_labels.txt", labels_txt), ("train_test_split.txt", split_txt)):
        files[f"CUB_200_2011/{name}"] = ("\n".join(lines) + "\n").encode()
    files["CUB_200_2011/README"] = b"fake CUB-200-2011\n"
    files["attributes.txt"] = b"1 has_bill_shape::curved_(up_or_down)\n"
    if layout == "archive":
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(root / "CUB_200_2011.tgz", "w:gz") as tf:
            for name, blob in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    else:
        for name, blob in files.items():
            p = root / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(blob)
    return root


# --------------------------------------------------------------------------- image folders


def make_fake_image_folder(root: str | os.PathLike, *, classes=(6, 5, 5), images=(2, 6), layout: str = "split",
                           seed: int = 0) -> Path:
    """Write a user's image folder under ``root``: ``layout`` "split" gives
    ``root/{train,val,test}/<class>/`` with ``classes`` classes per split, "single" gives one tree
    ``root/<class>/`` of ``sum(classes)`` classes. Class sizes are uneven (``images`` range) and
    the images mix what users have: grey, RGB, RGBA and palette images, 16-bit grey PNGs,
    non-square sizes, as PNG, JPEG, BMP, GIF and WebP. Returns ``root``."""
    from PIL import Image

    if layout not in ("split", "single"):
        raise ValueError(f"layout must be 'split' or 'single', got {layout!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    kinds = [("RGB", "png"), ("RGB", "jpg"), ("L", "png"), ("RGBA", "png"), ("P", "gif"), ("RGB", "bmp"),
             ("I;16", "png"), ("RGB", "webp"), ("L", "jpeg")]
    tops = [(s, n) for s, n in zip(("train", "val", "test"), classes)] if layout == "split" else [("", sum(classes))]
    k = 0
    for split, n in tops:
        for c in range(n):
            d = root / split / f"class_{split or 'all'}_{c:02d}" if split else root / f"class_{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(int(rng.integers(images[0], images[1] + 1))):
                mode, ext = kinds[k % len(kinds)]
                k += 1
                h, w = (int(v) for v in rng.integers(20, 70, 2))
                if mode == "I;16":
                    im = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
                elif mode in ("L", "P"):
                    im = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
                    if mode == "P":
                        im = im.convert("P")
                else:
                    im = Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8), mode)
                im.save(d / f"img{i:03d}.{ext}")
    return root
