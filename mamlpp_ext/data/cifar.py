"""CIFAR-FS and FC100: two class splits of CIFAR-100, read from its python archive.

The root holds what torchvision's ``CIFAR100`` downloads, either of

    ROOT/cifar-100-python.tar.gz       the archive (read as it is, without extracting it)
    ROOT/cifar-100-python/             its extracted folder: train, test, meta (ROOT itself may be it)

``train`` and ``test`` are pickles written by Python 2 (read with ``encoding="latin1"``, as
torchvision does; see pickles.py) holding ``data`` (N × 3072 uint8: the red, green and blue
32×32 planes of each image), ``fine_labels`` and ``coarse_labels``; ``meta`` holds
``fine_label_names`` and ``coarse_label_names``. Both datasets use all 600 images of each class
(500 from ``train``, 100 from ``test``), 32×32 RGB:

- **CIFAR-FS** (Bertinetto et al., ICLR 2019): 64 / 16 / 20 classes (``CIFAR_FS_VAL``,
  ``CIFAR_FS_TEST``; train: the other 64).
- **FC100** (Oreshkin et al., NeurIPS 2018): split by the 20 superclasses, 12 / 4 / 4
  (60 / 20 / 20 classes; ``FC100_VAL``, ``FC100_TEST``).

Both read the same files and share one cache (``cifar-100``): classes in label order (their
names sorted), each class's ``train`` images then its ``test`` images, in file order.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

from .cache import file_listing
from .dataset import Listing, RemoteFile, Source
from .errors import DataError, DatasetNotFoundError, format_list
from .images import Decoder
from .pickles import load_pickle

__all__ = ["ARCHIVE", "CIFAR_FS_TEST", "CIFAR_FS_VAL", "FC100_TEST", "FC100_VAL", "FILES", "MEAN", "STD",
           "CifarSource", "open_source", "split_cifar_fs", "split_fc100"]

ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
BASE_URL = "https://www.cs.toronto.edu/~kriz"
# torchvision checks the same MD5 for the same file.
FILES = (RemoteFile(ARCHIVE, ARCHIVE, "eb9058c3a382ffc7106e4002c42a8d85",
                    what="CIFAR-100, python version: 60,000 32×32 images of 100 classes"),)
LAYOUT = (f"{ARCHIVE} (CIFAR-100's python archive, as torchvision downloads it) or its extracted folder "
          f"{FOLDER}/ with the files train, test and meta")
HOW_TO_GET = (f"To get it: run `mamlpp-data download cifar-fs` (or fc100: the same file), or download "
              f"{BASE_URL}/{ARCHIVE} yourself, or let torchvision download it "
              f"(`torchvision.datasets.CIFAR100(DIR, download=True)`; DIR is read as it is).")
FIX = f"download the archive again (`mamlpp-data download cifar-fs --force`) or replace {ARCHIVE}"

# Per-channel mean and std of CIFAR-100's training images, as MetaOptNet normalises CIFAR-FS and FC100.
MEAN = (129.37731888 / 255, 124.10583864 / 255, 112.47758569 / 255)
STD = (68.20947949 / 255, 65.43124043 / 255, 70.45866994 / 255)

CIFAR_FS_TEST = ("whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe", "leopard", "plain",
                 "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman", "bicycle", "pickup_truck", "rocket")
CIFAR_FS_VAL = ("beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly", "sea", "camel",
                "cattle", "crab", "crocodile", "maple_tree", "motorcycle", "tractor")
FC100_TEST = ("aquatic_mammals", "insects", "medium_mammals", "people")
FC100_VAL = ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals")

_PARTS = ("train", "test")


class CifarSource(Source):
    """CIFAR-100's python archive or folder (see the module docstring)."""

    cache_name = "cifar-100"
    fix = FIX
    parallel = False  # the pixels are already decoded: no worker processes

    def __init__(self, root: Path, check_counts: bool):
        self.root = Path(root)
        self.check_counts = check_counts
        archive = self.root / ARCHIVE
        folder = next((d for d in (self.root / FOLDER, self.root) if all((d / f).is_file() for f in ("train", "test",
                                                                                                       "meta"))), None)
        if folder is not None:
            self.kind, self.path = "folder", folder
            self.fingerprint = {"folder": file_listing([folder / f for f in ("train", "test", "meta")], folder)}
        elif archive.is_file():
            self.kind, self.path = "archive", archive
            st = archive.stat()
            self.fingerprint = {"archive": [archive.name, st.st_size, st.st_mtime_ns]}
        else:
            raise DatasetNotFoundError(f"CIFAR-100 not found in {self.root}: expected {LAYOUT}. {HOW_TO_GET}")
        self._parts: Optional[dict] = None

    def _where(self, name: str) -> str:
        return f"{self.path}!{FOLDER}/{name}" if self.kind == "archive" else str(self.path / name)

    def _read_all(self) -> dict:
        """{"train": dict, "test": dict, "meta": dict}, the three pickles as loaded."""
        out = {}
        if self.kind == "folder":
            for name in ("train", "test", "meta"):
                try:
                    with open(self.path / name, "rb") as f:
                        out[name] = load_pickle(f, self._where(name), FIX)
                except OSError as exc:
                    raise DataError(f"cannot read {self.path / name}: {exc.strerror or exc}; {FIX}") from None
            return out
        try:
            with tarfile.open(self.path, "r:*") as tf:
                for member in tf:
                    base = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and base in ("train", "test", "meta") and base not in out:
                        f = tf.extractfile(member)
                        out[base] = load_pickle(io.BytesIO(f.read()), self._where(base), FIX)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise DataError(f"{self.path} is damaged or truncated ({exc}); {FIX}") from None
        missing = [n for n in ("train", "test", "meta") if n not in out]
        if missing:
            raise DataError(f"{self.path} lacks {', '.join(FOLDER + '/' + m for m in missing)}: it is not CIFAR-100's "
                            f"python archive or it is truncated; {FIX}")
        return out

    def _load(self) -> dict:
        if self._parts is not None:
            return self._parts
        raw = self._read_all()
        meta = raw["meta"]
        fine_names = _field(meta, "fine_label_names", self._where("meta"))
        coarse_names = _field(meta, "coarse_label_names", self._where("meta"))
        parts = {}
        for p in _PARTS:
            d = raw[p]
            where = self._where(p)
            data = np.asarray(_field(d, "data", where))
            fine = np.asarray(_field(d, "fine_labels", where), dtype=np.int64)
            coarse = np.asarray(_field(d, "coarse_labels", where), dtype=np.int64)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise DataError(f"{where}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072); {FIX}")
            if not (len(fine) == len(coarse) == len(data)):
                raise DataError(f"{where}: {len(data)} images but {len(fine)} fine and {len(coarse)} coarse labels; "
                                f"{FIX}")
            if len(fine) and (fine.min() < 0 or fine.max() >= len(fine_names) or coarse.min() < 0
                              or coarse.max() >= len(coarse_names)):
                raise DataError(f"{where}: labels out of range; {FIX}")
            parts[p] = (data, fine, coarse)
        self._parts = {"parts": parts, "fine_names": [str(n) for n in fine_names],
                       "coarse_names": [str(n) for n in coarse_names]}
        return self._parts

    def listing(self) -> Listing:
        d = self._load()
        fine_names, coarse_names = d["fine_names"], d["coarse_names"]
        classes, groups, counts = [], [], []
        for c, name in enumerate(fine_names):
            n = 0
            sup = set()
            for p in _PARTS:
                _, fine, coarse = d["parts"][p]
                sel = fine == c
                n += int(sel.sum())
                sup.update(int(k) for k in np.unique(coarse[sel]))
            if n == 0:
                continue
            if len(sup) != 1:
                raise DataError(f"CIFAR-100 in {self.root}: class {name!r} has images in {len(sup)} superclasses; "
                                f"{FIX}")
            classes.append(name)
            groups.append(coarse_names[sup.pop()])
            counts.append(n)
        listing = Listing(classes, groups, counts, None, {"source": str(self.path)})
        if self.check_counts:
            self.verify_counts(listing)
        return listing

    def verify_counts(self, listing: Listing) -> None:
        short = [f"{c} ({n})" for c, n in zip(listing.classes, listing.counts) if n != 600]
        if len(listing.classes) != 100 or short:
            detail = f"; classes without 600 images: {format_list(short, 5)}" if short else ""
            raise DatasetNotFoundError(f"CIFAR-100 in {self.root} is incomplete: {len(listing.classes)} classes, "
                                       f"expected 100 of 600 images{detail} (pass check_counts=False / "
                                       f"--allow-partial-data to accept a partial copy)")

    def _order(self) -> list[tuple[str, np.ndarray]]:
        """(part, row indices) in cache order: per class, its train rows then its test rows."""
        d = self._load()
        out = []
        for c in range(len(d["fine_names"])):
            for p in _PARTS:
                rows = np.flatnonzero(d["parts"][p][1] == c)
                if len(rows):
                    out.append((p, rows))
        return out

    def decode(self, decoder: Decoder) -> None:
        d = self._load()
        h, w = decoder.params["size"]
        direct = (h, w) == (32, 32) and decoder.params["mode"] == "RGB"
        pos = 0
        for p, rows in self._order():
            chw = d["parts"][p][0][rows].reshape(-1, 3, 32, 32)
            if direct:
                decoder.out[pos:pos + len(rows)] = chw
            else:
                for k in range(len(rows)):
                    decoder.add(pos + k, np.ascontiguousarray(chw[k].transpose(1, 2, 0)))
            pos += len(rows)

    def file_name(self, index: int) -> str:
        pos = 0
        for p, rows in self._order():
            if index < pos + len(rows):
                return f"{self._where(p)}[{rows[index - pos]}]"
            pos += len(rows)
        return f"image {index}"

    def close(self) -> None:
        self._parts = None


def _field(d, key: str, where: str):
    if not isinstance(d, dict):
        raise DataError(f"{where} holds a {type(d).__name__}, expected a dict; {FIX}")
    if key not in d:
        raise DataError(f"{where} has no {key!r} (keys: {sorted(map(str, d))}); {FIX}")
    return d[key]


def open_source(root: Path, check_counts: bool = True) -> CifarSource:
    """CIFAR-100 under ``root`` (resolved): the archive or its extracted folder."""
    return CifarSource(Path(root), check_counts)


def _split_by(keys: list, val: tuple, test: tuple) -> dict:
    ids: dict = {"train": [], "val": [], "test": []}
    for i, k in enumerate(keys):
        ids["val" if k in val else "test" if k in test else "train"].append(i)
    return {k: np.asarray(v, dtype=np.int64) for k, v in ids.items()}


def split_cifar_fs(listing: Listing, scheme: Optional[str] = None, seed: int = 0, **kw) -> dict:
    """CIFAR-FS's classes: ``CIFAR_FS_VAL``, ``CIFAR_FS_TEST``, and the other 64 for training."""
    return _split_by(listing.classes, CIFAR_FS_VAL, CIFAR_FS_TEST)


def split_fc100(listing: Listing, scheme: Optional[str] = None, seed: int = 0, **kw) -> dict:
    """FC100's classes: those of the superclasses ``FC100_VAL`` and ``FC100_TEST``, and the
    other 60 for training."""
    return _split_by(listing.groups, FC100_VAL, FC100_TEST)
