"""Omniglot: finding the data, preprocessing it once into a cache, and the class splits.

Accepted layouts of the root folder (each of the two parts may be found either way):

    <root>/images_background.zip, <root>/images_evaluation.zip      the official archives
    <root>/images_background/, <root>/images_evaluation/            their extracted folders
    <root>/omniglot-py/...                                          torchvision's layout (either of the above)

inside which images sit at ``<alphabet>/<characterNN>/<id>_<drawing>.png``. The root is
``root`` argument > ``$MAMLPP_OMNIGLOT_ROOT`` > the user's data folder
(``$XDG_DATA_HOME/mamlpp_ext/omniglot``, i.e. ``~/.local/share/mamlpp_ext/omniglot`` by default).
Nothing is downloaded here; ``mamlpp-data download omniglot`` (``mamlpp_ext.data.download``)
fetches the official archives when asked.

Preprocessing (SPEC §5): each 105×105 1-bit PNG is converted to 8-bit grey and resized to
28×28 with Lanczos, stored as uint8 and scaled to [0, 1] on use. The polarity is the files'
own: background 1.0, strokes near 0.0 (as in the public MAML++ code); ``invert=True`` gives
strokes 1.0. Classes are ordered by ``"<alphabet>/<character>"`` (sorted), images of a class by
file name.
"""

from __future__ import annotations

import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._common import (CacheEntry, DatasetNotFoundError, ImageRef, ImageStore, decode_images, entry_for,
                      file_listing, hash_json, resample_filter, resolve_cache_dir, user_data_dir)
from .episodes import ClassPool

PARTS = ("images_background", "images_evaluation")
EXPECTED = {  # part: (alphabets, characters, drawings per character)
    "images_background": (30, 964, 20),
    "images_evaluation": (20, 659, 20),
}
ENV_ROOT = "MAMLPP_OMNIGLOT_ROOT"

# The public MAML++ split fractions (train, train+val) of the 1,623 shuffled classes.
_MAML_FRACTIONS = (0.70918052988, 0.70918052988 + 0.03080714725)

_HOW_TO_GET = (
    "To get it: run `mamlpp-data download omniglot` (the official archives, into the default folder; "
    "`--root DIR` for another), or fetch python/images_background.zip and python/images_evaluation.zip "
    "from https://github.com/brendenlake/omniglot yourself, or let torchvision download it "
    "(`torchvision.datasets.Omniglot(DIR, background=True, download=True)`, then background=False; "
    "DIR/omniglot-py/ is read as it is). Then pass the folder with --dataset-root DIR (Python: root=DIR) "
    f"or set {ENV_ROOT}=DIR."
)


def default_omniglot_root() -> Path:
    """The default Omniglot folder: ``<user data folder>/omniglot`` (see ``user_data_dir``; it
    may not exist)."""
    return user_data_dir() / "omniglot"


def resolve_omniglot_root(root: str | os.PathLike | None = None) -> Path:
    """The Omniglot root: ``root`` > ``$MAMLPP_OMNIGLOT_ROOT`` > ``default_omniglot_root()``.

    Raises :class:`DatasetNotFoundError` (naming the environment variable, the ``--dataset-root``
    option and the download command) when no root is given and the default folder is absent, or
    when the chosen folder does not exist.
    """
    if root is not None:
        where = f"root={str(root)!r}"
    elif os.environ.get(ENV_ROOT):
        root, where = os.environ[ENV_ROOT], f"${ENV_ROOT}={os.environ[ENV_ROOT]!r}"
    else:
        d = default_omniglot_root()
        if not d.is_dir():
            raise DatasetNotFoundError(
                f"Omniglot not found: no root was given, ${ENV_ROOT} is not set and the default folder {d} "
                f"does not exist. Expected images_background(.zip) and images_evaluation(.zip) in it. "
                f"{_HOW_TO_GET}")
        return d
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(f"Omniglot root {path} ({where}) is not a folder. "
                                   f"Expected it to hold images_background(.zip) and images_evaluation(.zip). "
                                   f"{_HOW_TO_GET}")
    return path


# --------------------------------------------------------------------------- discovery


@dataclass
class _Part:
    """One of the two halves, as found on disk, with its PNGs as (alphabet, character, file, ref)."""

    name: str
    kind: str  # "zip" or "folder"
    path: Path
    entries: list = field(default_factory=list)
    zip_members: list | None = None  # (name, CRC-32, size) of a zip's files, read once

    def listing(self) -> list:
        if self.kind == "zip":
            return self.zip_members
        return file_listing((self.path / a / c / f for a, c, f, _ in self.entries), self.path)


def _find_part(root: Path, part: str) -> _Part | None:
    for base in (root, root / "omniglot-py"):
        folder = base / part
        if folder.is_dir():
            # tolerate one extra level, e.g. images_background/images_background/...
            inner = folder / part
            return _scan_folder(part, inner if inner.is_dir() else folder)
        archive = base / f"{part}.zip"
        if archive.is_file():
            return _scan_zip(part, archive)
    return None


def _scan_folder(part: str, folder: Path) -> _Part:
    p = _Part(part, "folder", folder)
    for alpha in sorted(d for d in os.listdir(folder) if (folder / d).is_dir()):
        for char in sorted(d for d in os.listdir(folder / alpha) if (folder / alpha / d).is_dir()):
            for f in sorted(os.listdir(folder / alpha / char)):
                if f.lower().endswith(".png"):
                    p.entries.append((alpha, char, f, ImageRef(str(folder / alpha / char / f))))
    return p


def _scan_zip(part: str, archive: Path) -> _Part:
    p = _Part(part, "zip", archive)
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetNotFoundError(f"cannot read Omniglot archive {archive}: {exc}. {_HOW_TO_GET}") from exc
    p.zip_members = sorted((i.filename, i.CRC, i.file_size) for i in infos if not i.is_dir())
    for name, _, _ in p.zip_members:
        bits = name.split("/")
        if not name.lower().endswith(".png") or len(bits) < 3:
            continue
        p.entries.append((bits[-3], bits[-2], bits[-1], ImageRef(str(archive), name)))
    return p


def _discover(root: Path, check_counts: bool) -> list[_Part]:
    parts, missing = [], []
    for name in PARTS:
        part = _find_part(root, name)
        if part is None or not part.entries:
            missing.append(name if part is None else f"{name} (found {part.path}, but it holds no "
                                                      "<alphabet>/<character>/*.png)")
        else:
            parts.append(part)
    if missing:
        raise DatasetNotFoundError(
            f"Omniglot root {root} is incomplete: missing {', '.join(missing)}. Expected "
            f"images_background.zip and images_evaluation.zip (or their extracted folders, possibly "
            f"under omniglot-py/). {_HOW_TO_GET}")
    if check_counts:
        for part in parts:
            alphas = {a for a, _, _, _ in part.entries}
            chars: dict = {}
            for a, c, _, _ in part.entries:
                chars[(a, c)] = chars.get((a, c), 0) + 1
            exp_a, exp_c, exp_d = EXPECTED[part.name]
            bad = [k for k, v in chars.items() if v != exp_d]
            if len(alphas) != exp_a or len(chars) != exp_c or bad:
                detail = f"first character with a wrong count: {'/'.join(bad[0])} ({chars[bad[0]]})" if bad else ""
                raise DatasetNotFoundError(
                    f"Omniglot {part.name} at {part.path} is incomplete: expected {exp_a} alphabets, {exp_c} "
                    f"characters and {exp_d} drawings each, found {len(alphas)} alphabets and {len(chars)} "
                    f"characters. {detail} (pass check_counts=False to accept a partial copy.) {_HOW_TO_GET}")
    return parts


# --------------------------------------------------------------------------- the dataset


class OmniglotData:
    """All Omniglot characters, preprocessed: ``images`` uint8 (M, 1, size, size).

    Attributes:
        root: the source folder. images: uint8 array (memory or mmap), classes contiguous.
        class_names: "<alphabet>/<character>" per class, sorted. alphabets, parts: per class
            (part is "background" or "evaluation"). starts, counts: (num_classes,) int64.
        files: per image, its path inside the part ("<alphabet>/<character>/<file>").
        cache_path: the .npy file. built: True when this call decoded the images (cache miss).
        build_seconds: time spent decoding (0 on a cache hit). invert: default polarity of pools.
    """

    def __init__(self, root: Path, store: ImageStore, meta: dict, cache_path: Path, built: bool,
                 build_seconds: float, invert: bool):
        self.root = root
        self.store = store
        self.meta = meta
        self.class_names: list[str] = meta["class_names"]
        self.alphabets: list[str] = [n.split("/")[0] for n in self.class_names]
        self.parts: list[str] = meta["class_parts"]
        self.counts = np.asarray(meta["class_counts"], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.files: list[str] = meta["files"]
        self.cache_path = cache_path
        self.built = built
        self.build_seconds = build_seconds
        self.invert = invert

    @property
    def images(self) -> np.ndarray:
        return self.store.array

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __repr__(self) -> str:
        return (f"OmniglotData(root={str(self.root)!r}, classes={self.num_classes}, images={len(self.files)}, "
                f"cache={str(self.cache_path)!r})")

    def class_images(self, c: int) -> np.ndarray:
        """uint8 (count, 1, H, W) images of class ``c``."""
        return self.images[self.starts[c] : self.starts[c] + self.counts[c]]

    def pool(self, class_ids, name: str = "pool", invert: bool | None = None) -> ClassPool:
        """A :class:`ClassPool` over the given class indices (in that order)."""
        ids = np.asarray(class_ids, dtype=np.int64)
        return ClassPool(self.store, self.starts[ids], self.counts[ids], [self.class_names[i] for i in ids],
                         invert=self.invert if invert is None else invert, name=name)

    def split_ids(self, split: str = "maml", seed: int = 0, lake_val_alphabets: int = 5) -> dict[str, np.ndarray]:
        """Class indices of train/val/test for ``split``; see :meth:`split`."""
        n = self.num_classes
        if split == "maml":
            # The public MAML++ recipe: RandomState(RandomState(val_seed).randint(1, 999999)) shuffles
            # the int32 range over the sorted class names; cut at int(0.70918052988 n) and
            # int(0.73998767713 n): 1150 / 50 / 423 for the 1,623 classes.
            rng = np.random.RandomState(np.random.RandomState(seed).randint(1, 999999))
            order = np.arange(n, dtype=np.int32)
            rng.shuffle(order)
            a, b = int(_MAML_FRACTIONS[0] * n), int(_MAML_FRACTIONS[1] * n)
            return {"train": order[:a].astype(np.int64), "val": order[a:b].astype(np.int64),
                    "test": order[b:].astype(np.int64)}
        if split == "lake":
            bg = sorted({a for a, p in zip(self.alphabets, self.parts) if p == "background"})
            if not 0 < lake_val_alphabets < len(bg):
                raise ValueError(f"lake_val_alphabets must be in [1, {len(bg) - 1}], got {lake_val_alphabets}")
            perm = np.random.RandomState(seed).permutation(len(bg))
            val_alphas = {bg[i] for i in perm[:lake_val_alphabets]}
            ids = np.arange(n, dtype=np.int64)
            is_bg = np.array([p == "background" for p in self.parts])
            is_val = np.array([a in val_alphas for a in self.alphabets]) & is_bg
            return {"train": ids[is_bg & ~is_val], "val": ids[is_val], "test": ids[~is_bg]}
        raise ValueError(f"split must be 'maml' or 'lake', got {split!r}")

    def split(self, split: str = "maml", seed: int = 0, lake_val_alphabets: int = 5,
              invert: bool | None = None) -> dict[str, ClassPool]:
        """The train/val/test class pools.

        ``"maml"`` (default): all 1,623 characters in sorted "<alphabet>/<character>" order,
        shuffled as the public MAML++ code does (legacy ``np.random.RandomState`` seeded with
        ``RandomState(seed).randint(1, 999999)``, seed = its ``val_seed``, 0), then cut into
        1150 / 50 / 423 classes (train / val / test). Characters of one alphabet can land in
        different splits.

        ``"lake"``: train and val from the 30 background alphabets, test on the 659 characters
        of the 20 evaluation alphabets. Val holds out ``lake_val_alphabets`` whole background
        alphabets (default 5), the first ones of ``RandomState(seed).permutation`` over the
        sorted background alphabet names; train keeps the other 25.
        """
        ids = self.split_ids(split, seed=seed, lake_val_alphabets=lake_val_alphabets)
        return {k: self.pool(v, name=k, invert=invert) for k, v in ids.items()}


def load_omniglot(root: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
                  size: int = 28, resample: str = "lanczos", binary_resize: bool = False, invert: bool = False,
                  check_counts: bool = True, num_workers: int | None = None, progress: bool = True,
                  mmap: bool = False) -> OmniglotData:
    """Find Omniglot, preprocess it once (cached) and return it as :class:`OmniglotData`.

    Args:
        root: the data folder (see module docstring); default ``$MAMLPP_OMNIGLOT_ROOT`` then
            ``default_omniglot_root()`` (the user's data folder).
        cache_dir: cache folder; default ``$MAMLPP_CACHE_DIR`` then ``~/.cache/mamlpp_ext``.
        size: output side in pixels (28 in SPEC §5).
        resample: PIL filter name ("lanczos", "bicubic", "bilinear", "box", "hamming", "nearest").
        binary_resize: resize the 1-bit images as they are, as the public MAML++ code does (PIL
            then keeps them 1-bit, so the output is binary); default False converts to 8-bit grey
            first so the Lanczos filter really applies.
        invert: default polarity of the pools (False: background 1.0, strokes 0.0).
        check_counts: require the complete dataset (30+20 alphabets, 964+659 characters, 20
            drawings each).
        num_workers: decoding processes for the first build (default min(4, CPUs)).
        progress: show a progress bar while building.
        mmap: memory-map the cached array instead of reading it into memory.

    The cache is keyed by the source listing (zip members' names, CRC-32s and sizes; or files'
    paths, sizes and mtimes) and by ``size``, ``resample`` and ``binary_resize``; a change of
    any rebuilds it. Raises :class:`DatasetNotFoundError` for a missing or incomplete root and
    :class:`CorruptImageError` (naming the file) for an unreadable image.
    """
    root = resolve_omniglot_root(root)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    resample_filter(resample)  # reject an unknown filter name before any work
    parts = _discover(root, check_counts)
    params = {"size": size, "resample": resample, "binary_resize": bool(binary_resize)}
    fingerprint = hash_json({"params": params, "parts": [(p.name, p.kind, p.listing()) for p in parts]})
    cache = entry_for(resolve_cache_dir(cache_dir), "omniglot", root, params)
    meta = cache.load_meta(fingerprint)
    built, seconds = False, 0.0
    if meta is None:
        meta, seconds = _build(cache, fingerprint, parts, params, num_workers, progress)
        built = True
    path = cache.images_path(meta)
    store = ImageStore(path=path, mmap=mmap)
    if tuple(store.array.shape) != tuple(meta["shape"]):  # an array replaced under us
        raise RuntimeError(f"Omniglot cache {path} has shape {store.array.shape}, expected {meta['shape']}; "
                           f"delete {cache.folder} and retry")
    return OmniglotData(root, store, meta, path, built, seconds, invert)


def _build(cache: CacheEntry, fingerprint: str, parts: list[_Part], params: dict, num_workers, progress):
    items = []  # (class name, part, file, ref)
    for part in parts:
        short = part.name.split("_")[1]
        for a, c, f, ref in part.entries:
            items.append((f"{a}/{c}", short, f, ref))
    items.sort(key=lambda it: (it[0], it[2]))
    names, class_parts, counts = [], [], []
    for name, short, _, _ in items:
        if names and names[-1] == name:
            counts[-1] += 1
        else:
            names.append(name)
            class_parts.append(short)
            counts.append(1)
    t0 = time.perf_counter()
    images = decode_images([it[3] for it in items], mode="L", size=params["size"], resample=params["resample"],
                           binary_direct=params["binary_resize"], num_workers=num_workers, progress=progress,
                           desc=f"Omniglot: preprocessing {len(items)} images (once)")
    seconds = time.perf_counter() - t0
    meta = {"dataset": "omniglot", "params": params, "sources": [str(p.path) for p in parts],
            "class_names": names, "class_parts": class_parts, "class_counts": counts,
            "files": [f"{n}/{f}" for n, _, f, _ in items], "build_seconds": round(seconds, 3)}
    return cache.store(fingerprint, images, meta), seconds


def omniglot_episodes(n_way: int = 5, k_shot: int = 1, n_query: int = 1, meta_batch_size: int = 8, *,
                      num_batches: int = 100 * 500, num_eval_tasks: int = 600, split: str = "maml",
                      seed: int = 0, eval_seed: int = 0, augment: bool = True, data: OmniglotData | None = None,
                      **load_kw) -> dict:
    """Train/val/test :class:`~mamlpp_ext.data.episodes.EpisodeDataset` for Omniglot.

    ``train`` streams ``num_batches`` rotated meta-batches from ``seed``; ``val`` and ``test``
    are fixed lists of ``num_eval_tasks`` tasks from ``eval_seed`` (different streams for val
    and test). ``load_kw`` go to :func:`load_omniglot` when ``data`` is not given.
    """
    from .episodes import EpisodeDataset

    data = data if data is not None else load_omniglot(**load_kw)
    pools = data.split(split)
    args = (n_way, k_shot, n_query, meta_batch_size)
    return {
        "train": EpisodeDataset.training(pools["train"], *args, num_batches=num_batches, seed=seed, augment=augment),
        "val": EpisodeDataset.evaluation(pools["val"], *args, num_tasks=num_eval_tasks, seed=eval_seed),
        "test": EpisodeDataset.evaluation(pools["test"], *args, num_tasks=num_eval_tasks, seed=eval_seed),
    }
