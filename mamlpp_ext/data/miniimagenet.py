"""mini-ImageNet: an image folder with the usual split, read by :mod:`~mamlpp_ext.data.folders`.

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
from pathlib import Path

import numpy as np

from .dataset import SPLIT_NAMES, FileSource, ImageDataset, resolve_root
from .episodes import ClassPool
from .folders import open_folder
from .paths import user_data_dir

SPLITS = SPLIT_NAMES
EXPECTED_CLASSES = {"train": 64, "val": 16, "test": 20}
EXPECTED_IMAGES_PER_CLASS = 600
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TITLE = "mini-ImageNet"
ENV_ROOT = "MAMLPP_MINIIMAGENET_ROOT"
EXTENSIONS = (".jpg", ".jpeg", ".png")
LAYOUT = ("ROOT/train/, ROOT/val/ and ROOT/test/, each with one sub-folder of .jpg/.jpeg/.png images per class "
          "(e.g. the Ravi & Larochelle split, 64/16/20 classes of 600 images)")
HOW_TO_GET = ("mini-ImageNet cannot be downloaded by mamlpp_ext: build it from ImageNet with the split's CSV files "
              "(the image lists of Ravi & Larochelle's split) into that layout.")


def default_mini_imagenet_root() -> Path:
    """The default mini-ImageNet folder: ``<user data folder>/mini-imagenet`` (see ``user_data_dir``;
    it may not exist)."""
    return user_data_dir() / "mini-imagenet"


def resolve_mini_imagenet_root(root: str | os.PathLike | None = None) -> Path:
    """The mini-ImageNet root: ``root`` > ``$MAMLPP_MINIIMAGENET_ROOT`` > ``default_mini_imagenet_root()``."""
    return resolve_root(TITLE, (ENV_ROOT,), default_mini_imagenet_root(), LAYOUT, HOW_TO_GET, root)


def open_source(root: Path, check_counts: bool = False) -> FileSource:
    """mini-ImageNet under ``root`` (resolved); ``check_counts`` requires 64/16/20 classes of 600 images."""
    return open_folder(root, title=TITLE, cache_name="mini-imagenet", layout=LAYOUT, exts=EXTENSIONS,
                       split_layout=True, expected_classes=EXPECTED_CLASSES, expected_images=EXPECTED_IMAGES_PER_CLASS,
                       check_counts=check_counts)


class MiniImageNetData(ImageDataset):
    """All mini-ImageNet images, preprocessed: ``images`` uint8 (M, 3, size, size).

    Attributes (besides :class:`ImageDataset`'s): class_names ("<split>/<class>"), class_splits.
    """

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.class_splits: list[str] = [n.split("/")[0] for n in self.class_names]

    def __repr__(self) -> str:
        n = {s: self.class_splits.count(s) for s in SPLITS}
        return f"MiniImageNetData(root={str(self.root)!r}, classes={n}, images={len(self.files)})"

    def split(self, normalize: bool = True) -> dict[str, ClassPool]:
        """The train/val/test :class:`ClassPool` s (the folder's own split), ImageNet-normalised
        unless ``normalize=False`` (then values are in [0, 1])."""
        out = {}
        for s in SPLITS:
            ids = np.array([i for i, cs in enumerate(self.class_splits) if cs == s], dtype=np.int64)
            out[s] = self.pool(ids, name=s, normalize=normalize)
        return out
