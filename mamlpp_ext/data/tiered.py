"""tieredImageNet from the pickled PNG files most copies are distributed in.

The root holds, for each split ``train``, ``val`` and ``test``,

    {split}_images_png.pkl   a list of the split's images, each a PNG file (84×84 RGB) as a uint8
                             array, pickled in one piece by Python 2 (see pickles.py)
    {split}_labels.pkl       a dict: "label_specific" (per image, its class index in the split),
                             "label_specific_str" (class names), "label_general" and
                             "label_general_str" (the 34 ImageNet categories the split is made of)

either directly, in a ``tiered-imagenet/`` sub-folder (how ``tiered-imagenet.tar`` extracts), or
inside ``tiered-imagenet.tar`` itself, read without extracting it. These are the files written
by Ren et al.'s code for "Meta-Learning for Semi-Supervised Few-Shot Classification" (ICLR
2018), which defined the dataset: 608 classes in 34 categories, split by category 20 / 6 / 8 =
351 / 97 / 160 classes (448,695 / 124,261 / 206,209 images).

The image pickles are streamed (NOTE [Streaming the tieredImageNet pickles]) and the images
decoded straight into the memory-mapped cache (about 16 GB at 84×84): the dataset is never held
in memory. Classes are ordered by split, then by their index in the labels file; the images of a
class keep their order in the pickle.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Optional

import numpy as np

from .cache import file_listing
from .dataset import SPLIT_NAMES, Listing, Source, split_by_group
from .errors import CorruptImageError, DataError, DatasetNotFoundError, format_list
from .images import Decoder
from .pickles import load_pickle, stream_pickled_arrays

__all__ = ["EXPECTED", "TieredSource", "open_source", "split_ids"]

TAR = "tiered-imagenet.tar"
SUBFOLDER = "tiered-imagenet"
EXPECTED = {"train": (351, 448695), "val": (97, 124261), "test": (160, 206209)}  # classes, images
LAYOUT = ("train_images_png.pkl, train_labels.pkl, val_images_png.pkl, val_labels.pkl, test_images_png.pkl and "
          f"test_labels.pkl (directly, in {SUBFOLDER}/, or inside {TAR})")
HOW_TO_GET = ("tieredImageNet has no official download that mamlpp_ext can fetch: get tiered-imagenet.tar (the "
              "pickled PNG version from Ren et al.'s few-shot-ssl-public project, as learn2learn and torchmeta "
              "read it) and put it, or the six .pkl files it holds, in the root.")
FIX = f"get a fresh copy of {TAR} (the file is truncated or damaged)"


def _files(split: str) -> tuple[str, str]:
    return f"{split}_images_png.pkl", f"{split}_labels.pkl"


class TieredSource(Source):
    """tieredImageNet's pickles under a root (see the module docstring)."""

    cache_name = "tiered-imagenet"
    fix = FIX

    def __init__(self, root: Path, check_counts: bool):
        self.root = Path(root)
        self.check_counts = check_counts
        names = [n for s in SPLIT_NAMES for n in _files(s)]
        folder = next((d for d in (self.root, self.root / SUBFOLDER) if all((d / n).is_file() for n in names)), None)
        if folder is not None:
            self.kind, self.path = "folder", folder
            self.fingerprint = {"folder": file_listing([folder / n for n in names], folder)}
        elif (self.root / TAR).is_file():
            self.kind, self.path = "tar", self.root / TAR
            st = self.path.stat()
            self.fingerprint = {"tar": [TAR, st.st_size, st.st_mtime_ns]}
        else:
            present = [n for n in names if (self.root / n).is_file() or (self.root / SUBFOLDER / n).is_file()]
            missing = [n for n in names if n not in present]
            what = f"missing {', '.join(missing)}" if present else "none of its files are there"
            raise DatasetNotFoundError(f"tieredImageNet not found in {self.root} ({what}): expected {LAYOUT}. "
                                       f"{HOW_TO_GET}")
        self._labels: Optional[dict] = None
        self._tar_members: Optional[dict] = None

    # ---- files

    def _where(self, name: str) -> str:
        return f"{self.path}!{name}" if self.kind == "tar" else str(self.path / name)

    def _open(self, name: str, tf: Optional[tarfile.TarFile] = None):
        if self.kind == "folder":
            try:
                return open(self.path / name, "rb")
            except OSError as exc:
                raise DataError(f"cannot read {self.path / name}: {exc.strerror or exc}") from None
        if self._tar_members is None:
            try:
                with tarfile.open(self.path, "r:") as t:
                    self._tar_members = {m.name.rsplit("/", 1)[-1]: m for m in t.getmembers() if m.isfile()}
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise DataError(f"{self.path} is damaged or truncated ({exc}); {FIX}") from None
        member = self._tar_members.get(name)
        if member is None:
            raise DatasetNotFoundError(f"{self.path} has no {name}: expected {LAYOUT}. {HOW_TO_GET}")
        return tf.extractfile(member)

    def _labels_of(self, split: str, tf) -> dict:
        name = _files(split)[1]
        with self._open(name, tf) as f:
            d = load_pickle(f, self._where(name), FIX)
        if not isinstance(d, dict):
            raise DataError(f"{self._where(name)} holds a {type(d).__name__}, expected a dict; {FIX}")
        d = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}
        for key in ("label_specific", "label_specific_str"):
            if key not in d:
                raise DataError(f"{self._where(name)} has no {key!r} (keys: {sorted(d)}); {FIX}")
        labels = np.asarray(d["label_specific"]).astype(np.int64).reshape(-1)
        names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in d["label_specific_str"]]
        if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
            raise DataError(f"{self._where(name)}: class indices out of range of its {len(names)} names; {FIX}")
        general = d.get("label_general")
        general_names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in d.get("label_general_str", [])]
        return {"labels": labels, "names": names,
                "general": None if general is None else np.asarray(general).astype(np.int64).reshape(-1),
                "general_names": general_names}

    def _all_labels(self) -> dict:
        if self._labels is None:
            out = {}
            with self._tar() as tf:
                for s in SPLIT_NAMES:
                    out[s] = self._labels_of(s, tf)
            self._labels = out
        return self._labels

    def _tar(self):
        import contextlib

        if self.kind != "tar":
            return contextlib.nullcontext(None)
        try:
            return tarfile.open(self.path, "r:")
        except (tarfile.TarError, OSError) as exc:
            raise DataError(f"{self.path} is damaged or truncated ({exc}); {FIX}") from None

    # ---- listing and images

    def listing(self) -> Listing:
        labels = self._all_labels()
        classes, groups, counts, categories = [], [], [], []
        for s in SPLIT_NAMES:
            d = labels[s]
            per = np.bincount(d["labels"], minlength=len(d["names"]))
            for c, name in enumerate(d["names"]):
                if per[c] == 0:
                    continue
                classes.append(f"{s}/{name}")
                groups.append(s)
                counts.append(int(per[c]))
                cat = ""
                if d["general"] is not None and len(d["general"]) == len(d["labels"]) and d["general_names"]:
                    g = d["general"][np.argmax(d["labels"] == c)]
                    cat = d["general_names"][g] if 0 <= g < len(d["general_names"]) else ""
                categories.append(cat)
        listing = Listing(classes, groups, counts, None, {"source": str(self.path), "categories": categories})
        if self.check_counts:
            self.verify_counts(listing)
        return listing

    def verify_counts(self, listing: Listing) -> None:
        problems = []
        for s in SPLIT_NAMES:
            n_cls = sum(1 for g in listing.groups if g == s)
            n_img = sum(n for g, n in zip(listing.groups, listing.counts) if g == s)
            if (n_cls, n_img) != EXPECTED[s]:
                problems.append(f"{s}: {n_cls} classes and {n_img} images, expected {EXPECTED[s][0]} and "
                                f"{EXPECTED[s][1]}")
        if problems:
            raise DatasetNotFoundError(f"tieredImageNet in {self.root} is incomplete: {'; '.join(problems)} (pass "
                                       f"check_counts=False / --allow-partial-data to accept a partial copy)")

    def _positions(self) -> dict:
        """Per split: the cache index of each image in pickle order."""
        labels = self._all_labels()
        out, offset = {}, 0
        for s in SPLIT_NAMES:
            lab = labels[s]["labels"]
            order = np.argsort(lab, kind="stable")
            pos = np.empty(len(lab), dtype=np.int64)
            pos[order] = offset + np.arange(len(lab))
            out[s] = pos
            offset += len(lab)
        return out

    def decode(self, decoder: Decoder) -> None:
        positions = self._positions()
        with self._tar() as tf:
            for s in SPLIT_NAMES:
                name = _files(s)[0]
                pos = positions[s]
                seen = [0]
                bad_items: list = []

                def on_array(raw: bytes, shape, dtype, pos=pos, seen=seen, bad_items=bad_items, name=name) -> None:
                    k = seen[0]
                    seen[0] += 1
                    if k >= len(pos):
                        raise DataError(f"{self._where(name)} holds more images than its labels file "
                                        f"({len(pos)}); {FIX}")
                    if dtype != np.uint8:
                        bad_items.append(f"{self._where(name)}[{k}]: a {dtype} array, not the bytes of a PNG")
                        return
                    decoder.add(int(pos[k]), raw)

                with self._open(name, tf) as f:
                    n = stream_pickled_arrays(f, on_array, self._where(name), FIX)
                if bad_items:
                    raise CorruptImageError(f"{len(bad_items)} entries of {self._where(name)} are not images: "
                                            f"{format_list(bad_items)}; {FIX}", bad_items)
                if n != len(pos):
                    raise DataError(f"{self._where(name)} holds {n} images but {self._where(_files(s)[1])} labels "
                                    f"{len(pos)}; the two files do not belong together: {FIX}")

    def file_name(self, index: int) -> str:
        for s, pos in self._positions().items():
            hit = np.flatnonzero(pos == index)
            if len(hit):
                return f"{self._where(_files(s)[0])}[{int(hit[0])}]"
        return f"image {index}"

    def close(self) -> None:
        self._labels = None
        self._tar_members = None


def open_source(root: Path, check_counts: bool = True) -> TieredSource:
    """tieredImageNet under ``root`` (resolved)."""
    return TieredSource(Path(root), check_counts)


def split_ids(listing: Listing, scheme: Optional[str] = None, seed: int = 0, **kw) -> dict:
    """The split of the files (train, val and test pickles)."""
    return split_by_group(listing)
