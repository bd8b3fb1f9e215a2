"""mini-ImageNet from a user folder, preprocessed once into a cache.

Layout::

    <root>/train/<class>/<image>.jpg|.jpeg|.png   (64 classes of 600 images in the usual split)
    <root>/val/<class>/...                        (16)
    <root>/test/<class>/...                       (20)

The root is ``root`` argument > ``$MAMLPP_MINIIMAGENET_ROOT`` > the user's data folder
(``$XDG_DATA_HOME/mamlpp_ext/mini-imagenet``, i.e. ``~/.local/share/mamlpp_ext/mini-imagenet`` by
default). It cannot be downloaded by this package. Each image is converted to RGB and
resized to 84×84 (Lanczos by default), cached as uint8 (M, 3, 84, 84) and, on use, scaled to
[0, 1] and normalised with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ._common import (DatasetNotFoundError, ImageRef, ImageStore, decode_images, entry_for, file_listing,
                      hash_json, resample_filter, resolve_cache_dir, user_data_dir)
from .episodes import ClassPool

SPLITS = ("train", "val", "test")
EXPECTED_CLASSES = {"train": 64, "val": 16, "test": 20}
EXPECTED_IMAGES_PER_CLASS = 600
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENV_ROOT = "MAMLPP_MINIIMAGENET_ROOT"
_EXTS = (".jpg", ".jpeg", ".png")
LAYOUT_HELP = ("Expected ROOT/train/, ROOT/val/ and ROOT/test/, each with one sub-folder of .jpg/.jpeg/.png "
           "images per class (e.g. the Ravi & Larochelle split, 64/16/20 classes of 600 images). "
           "mini-ImageNet cannot be downloaded by mamlpp_ext: build it from ImageNet with the split's "
           f"CSV files, then pass the folder with --dataset-root ROOT (Python: root=ROOT) or set {ENV_ROOT}=ROOT.")


def default_mini_imagenet_root() -> Path:
    """The default mini-ImageNet folder: ``<user data folder>/mini-imagenet`` (see ``user_data_dir``;
    it may not exist)."""
    return user_data_dir() / "mini-imagenet"


def resolve_mini_imagenet_root(root: str | os.PathLike | None = None) -> Path:
    """The mini-ImageNet root: ``root`` > ``$MAMLPP_MINIIMAGENET_ROOT`` > ``default_mini_imagenet_root()``."""
    if root is None and os.environ.get(ENV_ROOT):
        root = os.environ[ENV_ROOT]
    if root is None:
        d = default_mini_imagenet_root()
        if not d.is_dir():
            raise DatasetNotFoundError(f"mini-ImageNet not found: no root was given, ${ENV_ROOT} is not set and the "
                                       f"default folder {d} does not exist. {LAYOUT_HELP}")
        return d
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(f"mini-ImageNet root {path} is not a folder. {LAYOUT_HELP}")
    return path


class MiniImageNetData:
    """All mini-ImageNet images, preprocessed: ``images`` uint8 (M, 3, size, size).

    Attributes: root, class_names ("<split>/<class>"), class_splits, starts, counts (int64),
    files (relative paths), cache_path, built, build_seconds.
    """

    def __init__(self, root: Path, store: ImageStore, meta: dict, cache_path: Path, built: bool, seconds: float):
        self.root, self.store, self.meta = root, store, meta
        self.class_names: list[str] = meta["class_names"]
        self.class_splits: list[str] = [n.split("/")[0] for n in self.class_names]
        self.counts = np.asarray(meta["class_counts"], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.files: list[str] = meta["files"]
        self.cache_path, self.built, self.build_seconds = cache_path, built, seconds

    @property
    def images(self) -> np.ndarray:
        return self.store.array

    def __repr__(self) -> str:
        n = {s: self.class_splits.count(s) for s in SPLITS}
        return f"MiniImageNetData(root={str(self.root)!r}, classes={n}, images={len(self.files)})"

    def split(self, normalize: bool = True) -> dict[str, ClassPool]:
        """The train/val/test :class:`ClassPool` s (the folder's own split), ImageNet-normalised
        unless ``normalize=False`` (then values are in [0, 1])."""
        out = {}
        for s in SPLITS:
            ids = np.array([i for i, cs in enumerate(self.class_splits) if cs == s], dtype=np.int64)
            out[s] = ClassPool(self.store, self.starts[ids], self.counts[ids],
                               [self.class_names[i].split("/", 1)[1] for i in ids],
                               mean=IMAGENET_MEAN if normalize else None, std=IMAGENET_STD if normalize else None,
                               name=s)
        return out


def _scan(root: Path, check_counts: bool) -> list[tuple[str, str, Path]]:
    """(split, class, path) of every image, sorted; validates the layout."""
    items, problems = [], []
    for s in SPLITS:
        d = root / s
        if not d.is_dir():
            problems.append(f"{d} is missing")
            continue
        classes = sorted(c for c in os.listdir(d) if (d / c).is_dir())
        if not classes:
            problems.append(f"{d} has no class sub-folders")
        for c in classes:
            files = sorted(f for f in os.listdir(d / c) if f.lower().endswith(_EXTS))
            if not files:
                problems.append(f"{d / c} holds no images")
            items.extend((s, c, d / c / f) for f in files)
            if check_counts and len(files) != EXPECTED_IMAGES_PER_CLASS:
                problems.append(f"{d / c} holds {len(files)} images, expected {EXPECTED_IMAGES_PER_CLASS}")
        if check_counts and len(classes) != EXPECTED_CLASSES[s]:
            problems.append(f"{d} holds {len(classes)} classes, expected {EXPECTED_CLASSES[s]}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DatasetNotFoundError(f"mini-ImageNet root {root} is missing or incomplete: {shown}. {LAYOUT_HELP}")
    return items


def load_mini_imagenet(root: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
                       size: int = 84, resample: str = "lanczos", check_counts: bool = False,
                       num_workers: int | None = None, progress: bool = True, mmap: bool = True) -> MiniImageNetData:
    """Find mini-ImageNet, preprocess it once (cached, keyed by every file's path, size and
    mtime and by ``size``/``resample``) and return :class:`MiniImageNetData`.

    ``check_counts`` requires 64/16/20 classes of 600 images. ``mmap`` (default) maps the cached
    uint8 array (1.3 GB for the full set) instead of reading it. Raises
    :class:`DatasetNotFoundError` for a missing or incomplete root and
    :class:`CorruptImageError` naming an unreadable image.
    """
    root = resolve_mini_imagenet_root(root)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    resample_filter(resample)  # reject an unknown filter name before any work
    items = _scan(root, check_counts)
    params = {"size": size, "resample": resample}
    fingerprint = hash_json({"params": params, "files": file_listing((p for _, _, p in items), root)})
    cache = entry_for(resolve_cache_dir(cache_dir), "mini-imagenet", root, params)
    meta = cache.load_meta(fingerprint)
    built, seconds = False, 0.0
    if meta is None:
        names, counts = [], []
        for s, c, _ in items:
            if names and names[-1] == f"{s}/{c}":
                counts[-1] += 1
            else:
                names.append(f"{s}/{c}")
                counts.append(1)
        t0 = time.perf_counter()
        images = decode_images([ImageRef(str(p)) for _, _, p in items], mode="RGB", size=size, resample=resample,
                               num_workers=num_workers, progress=progress,
                               desc=f"mini-ImageNet: preprocessing {len(items)} images (once)")
        seconds = time.perf_counter() - t0
        meta = cache.store(fingerprint, images, {
            "dataset": "mini-imagenet", "params": params, "class_names": names, "class_counts": counts,
            "files": [p.relative_to(root).as_posix() for _, _, p in items], "build_seconds": round(seconds, 3)})
        del images
        built = True
    path = cache.images_path(meta)
    return MiniImageNetData(root, ImageStore(path=path, mmap=mmap), meta, path, built, seconds)
