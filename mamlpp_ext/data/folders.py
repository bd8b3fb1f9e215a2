"""Image folders: the user's own data, and mini-ImageNet (one such folder with a preset).

Two layouts are read, whatever the image formats (JPEG, PNG, BMP, GIF, TIFF, WebP; grey, RGB,
RGBA or palette; any size; any number of images per class):

    ROOT/train/<class>/<image>, ROOT/val/<class>/..., ROOT/test/<class>/...   the split is the folders'
    ROOT/<class>/<image>                                                       split by a seeded rule

With one tree of class folders the classes are split into train/val/test by
:func:`~mamlpp_ext.data.dataset.seeded_split` (64% / 16% / 20% of the classes, sorted by name and
permuted with ``numpy.random.default_rng(split_seed)``; ``split_seed`` is recorded with the run).
Images are converted to the configured channels (grey or RGB; alpha is dropped) and resized to
the configured size when the cache is built; the cache is keyed by that size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .cache import file_listing
from .dataset import SPLIT_NAMES, FileSource, Listing, seeded_split, split_by_group
from .errors import DatasetNotFoundError, format_list
from .images import ImageRef

__all__ = ["EXTENSIONS", "FOLDER_GET", "FOLDER_LAYOUT", "open_folder", "open_image_folder", "split_ids"]

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
FOLDER_LAYOUT = ("ROOT/train/<class>/<image>, ROOT/val/<class>/<image> and ROOT/test/<class>/<image>, or one tree "
                 "ROOT/<class>/<image> (split into train/val/test classes by a seeded rule); images in common "
                 "formats (" + ", ".join(e[1:] for e in EXTENSIONS[:8]) + ")")
FOLDER_GET = "It is your own data: arrange the images as shown (one sub-folder per class)."
FOLDER_FIX = "replace or remove the files named (or convert them to PNG), then run again"


def _dirs(d: Path) -> list[str]:
    return sorted(c for c in os.listdir(d) if not c.startswith(".") and (d / c).is_dir())


def _images(d: Path, exts) -> list[str]:
    return sorted(f for f in os.listdir(d) if not f.startswith(".") and f.lower().endswith(exts)
                  and (d / f).is_file())


def open_folder(root: Path, *, title: str, cache_name: str, layout: str, exts=EXTENSIONS,
                split_layout: Optional[bool] = None,
                expected_classes: Optional[dict] = None, expected_images: Optional[int] = None,
                check_counts: bool = False, fix: str = FOLDER_FIX) -> FileSource:
    """An image folder as a :class:`FileSource`.

    ``split_layout``: True requires ROOT/{train,val,test}/<class>/, False reads ROOT/<class>/,
    None decides by whether ROOT/train, ROOT/val or ROOT/test exists. Classes are named
    "<split>/<class>" (split layout) or "<class>", sorted; images by file name. With
    ``check_counts``, ``expected_classes`` ({split: count}) and ``expected_images`` (per class)
    must match. Every problem found is reported at once (``DatasetNotFoundError`` naming the
    folders and what was expected, ``layout``)."""
    root = Path(root)
    if split_layout is None:
        split_layout = any((root / s).is_dir() for s in SPLIT_NAMES)
    items, problems = [], []  # items: (class name, group, path)
    try:
        if split_layout:
            tops = []
            for s in SPLIT_NAMES:
                if not (root / s).is_dir():
                    problems.append(f"{root / s} is missing")
                else:
                    tops.append((s, root / s))
        else:
            tops = [("", root)]
        for s, d in tops:
            classes = _dirs(d)
            if not classes:
                problems.append(f"{d} has no class sub-folders")
            if check_counts and expected_classes and s in expected_classes and len(classes) != expected_classes[s]:
                problems.append(f"{d} holds {len(classes)} classes, expected {expected_classes[s]}")
            for c in classes:
                files = _images(d / c, exts)
                if not files:
                    problems.append(f"{d / c} holds no images")
                if check_counts and expected_images is not None and len(files) != expected_images:
                    problems.append(f"{d / c} holds {len(files)} images, expected {expected_images}")
                name = f"{s}/{c}" if s else c
                items.extend((name, s, d / c / f) for f in files)
    except OSError as exc:
        raise DatasetNotFoundError(f"cannot read the {title} folder {root}: {exc}. Expected {layout}.") from None
    if problems:
        raise DatasetNotFoundError(f"{title} root {root} is missing or incomplete: {format_list(problems, 5)}. "
                                   f"Expected {layout}.")
    names, groups, counts = [], [], []
    for name, s, _ in items:
        if names and names[-1] == name:
            counts[-1] += 1
        else:
            names.append(name)
            groups.append(s)
            counts.append(1)
    files = [p.relative_to(root).as_posix() for _, _, p in items]
    listing = Listing(names, groups, counts, files, {"layout": "split" if split_layout else "single"})
    try:
        fingerprint = {"files": file_listing((p for _, _, p in items), root)}
    except OSError as exc:
        raise DatasetNotFoundError(f"cannot read a file of the {title} folder {root}: {exc}") from None
    return FileSource(listing, [ImageRef(str(p)) for _, _, p in items], fingerprint, cache_name, fix)


def open_image_folder(root: Path, check_counts: bool = False) -> FileSource:
    """The ``folder`` dataset: either layout of the module docstring."""
    return open_folder(root, title="image folder", cache_name="folder", layout=FOLDER_LAYOUT)


def split_ids(listing: Listing, scheme: Optional[str] = None, seed: int = 0, **kw) -> dict:
    """The folders' own split, or for a single tree the seeded rule of :func:`seeded_split`."""
    if listing.info.get("layout") == "split" or (listing.groups and all(g in SPLIT_NAMES for g in listing.groups)):
        return split_by_group(listing)
    return seeded_split(listing, seed)
