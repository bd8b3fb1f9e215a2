"""What every dataset module provides and gets back: the listing of a source, the source itself,
the loaded dataset and its class splits.

A dataset module (``omniglot.py``, ``cifar.py``, ...) turns a root folder into a :class:`Source`:
it finds the files, says what identifies them (a *fingerprint*, cheap to compute), lists the
classes and their images (:class:`Listing`, possibly slower: it may scan an archive), checks the
images quickly and feeds them to the decoder. ``loader.load_dataset`` does the rest, the same
way for every dataset: the cache, the checks before any decoding, and the
:class:`ImageDataset` it returns, whose :meth:`~ImageDataset.pools` are the train/val/test
:class:`~mamlpp_ext.data.episodes.ClassPool` s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .cache import ImageStore
from .episodes import ClassPool
from .errors import DataMismatchError, DatasetNotFoundError
from .images import Decoder, ImageRef, check_payloads

__all__ = ["FileSource", "ImageDataset", "Listing", "RemoteFile", "SPLIT_NAMES", "Source", "check_tasks",
           "resolve_root", "seeded_split", "split_by_group", "split_by_index_rule"]

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class RemoteFile:
    """One file ``mamlpp-data download`` fetches: ``name`` in the root, ``path`` under the
    dataset's base URL, its MD5 and, when known, its size in bytes; ``what`` says what it holds;
    ``optional`` files can be skipped (Omniglot's one-shot benchmark: ``--no-one-shot``)."""

    name: str
    path: str
    md5: str
    size: Optional[int] = None
    what: str = ""
    optional: bool = False


def resolve_root(title: str, env_vars: Sequence[str], default: Path, layout: str, get: str,
                 root: str | os.PathLike | None = None) -> Path:
    """A dataset's root: ``root`` > the first of ``env_vars`` that is set > ``default``.

    Raises :class:`DatasetNotFoundError` naming the variable, the ``--dataset-root`` option, what
    the root must hold (``layout``) and how to get it (``get``) when the chosen folder does not
    exist."""
    expects = f"Expected {layout}. " if layout else ""
    put = (f"Put the files in {default} (the default folder), or anywhere and pass that folder with --dataset-root "
           f"DIR (Python: root=DIR) or set {env_vars[0]}=DIR.")
    if root is not None:
        where = f"root={str(root)!r}"
    else:
        env = next((v for v in env_vars if os.environ.get(v)), None)
        if env is None:
            if not Path(default).is_dir():
                raise DatasetNotFoundError(f"{title} not found: no root was given, ${env_vars[0]} is not set and the "
                                           f"default folder {default} does not exist. {expects}{get} {put}")
            return Path(default)
        root, where = os.environ[env], f"${env}={os.environ[env]!r}"
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(f"{title} root {path} ({where}) is not a folder. {expects}{get} {put}")
    return path


@dataclass
class Listing:
    """The classes and images of a source, in cache order (the images of class ``i`` are the
    ``counts[i]`` images after those of classes ``0 … i−1``).

    classes: unique class names. groups: per class, the part of the source it comes from (its
    split folder, superclass, Omniglot part...; "" when none). counts: images per class.
    files: per image, its name in the source (None: named by ``file_name``). info: anything
    else the dataset module wants kept with the cache (JSON-serialisable).
    """

    classes: list
    groups: list
    counts: list
    files: Optional[list] = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (len(self.classes) == len(self.groups) == len(self.counts)):
            raise ValueError("classes, groups and counts must have the same length")

    @property
    def num_images(self) -> int:
        return int(sum(self.counts))

    def to_meta(self) -> dict:
        return {"class_names": list(self.classes), "class_groups": list(self.groups),
                "class_counts": [int(c) for c in self.counts], "files": self.files, "info": self.info}

    @classmethod
    def from_meta(cls, meta: dict) -> "Listing":
        return cls(list(meta["class_names"]), list(meta["class_groups"]), list(meta["class_counts"]),
                   meta.get("files"), dict(meta.get("info") or {}))

    def pool_names(self) -> list:
        """Class names as pools show them: without a leading "<group>/" (e.g. "train/n0153" -> "n0153")."""
        return [c[len(g) + 1:] if g and c.startswith(g + "/") else c for c, g in zip(self.classes, self.groups)]


class Source:
    """A dataset as found on disk, before any image is decoded (see the module docstring).

    Subclasses set ``fingerprint`` (JSON-serialisable: what identifies the source's files, e.g.
    their names, sizes and dates, or an archive's member CRCs), ``cache_name`` (the cache
    folder's prefix; two datasets read from the same files may share it) and ``fix`` (what to
    do about damaged files, e.g. "download the archive again"), and implement :meth:`listing`
    and :meth:`decode`; :meth:`check` is the quick pass of NOTE [Bad files] (images.py).
    """

    fingerprint: object = None
    cache_name: str = ""
    fix: str = "replace or remove the damaged files, then run again"
    parallel: bool = True  # decode in worker processes (False: the payloads are already pixels)

    def listing(self) -> Listing:
        """The classes and images (called when the cache must be built)."""
        raise NotImplementedError

    def verify_counts(self, listing: Listing) -> None:
        """Raise ``DatasetNotFoundError`` when ``listing`` is not the complete dataset (called
        with ``check_counts`` on a cache hit; a source checks its own listing when it makes it)."""

    def check(self, num_workers: Optional[int], progress: bool) -> list:
        """The quick first pass: ``"name: reason"`` for every bad file found (default: none)."""
        return []

    def decode(self, decoder: Decoder) -> None:
        """Hand every image to ``decoder.add(index, payload)`` (index in cache order)."""
        raise NotImplementedError

    def file_name(self, index: int) -> str:
        """The name of image ``index`` in messages (when the listing has no ``files``)."""
        return f"image {index}"

    def close(self) -> None:
        """Release open files (called after loading)."""


class FileSource(Source):
    """A source whose images are files or zip members (:class:`~mamlpp_ext.data.images.ImageRef`
    per image, in cache order): checked and decoded in parallel."""

    def __init__(self, listing: Listing, refs: Sequence[ImageRef], fingerprint, cache_name: str,
                 fix: str = Source.fix):
        if len(refs) != listing.num_images:
            raise ValueError(f"{len(refs)} image references for {listing.num_images} images")
        self._listing, self.refs = listing, list(refs)
        self.fingerprint, self.cache_name, self.fix = fingerprint, cache_name, fix

    def listing(self) -> Listing:
        return self._listing

    def check(self, num_workers, progress) -> list:
        bad = check_payloads(list(enumerate(self.refs)), num_workers=num_workers, progress=progress,
                             desc=f"checking {len(self.refs)} images")
        return [f"{self.refs[i]}: {why}" for i, why in bad]

    def decode(self, decoder: Decoder) -> None:
        for i, ref in enumerate(self.refs):
            decoder.add(i, ref)

    def file_name(self, index: int) -> str:
        return str(self.refs[index])


# --------------------------------------------------------------------------- class splits


def split_by_group(listing: Listing, where: str = "") -> dict:
    """Class ids of the "train", "val" and "test" groups (e.g. a folder's split sub-folders)."""
    groups = np.asarray(listing.groups, dtype=object)
    return {s: np.flatnonzero(groups == s).astype(np.int64) for s in SPLIT_NAMES}


def split_by_index_rule(listing: Listing, rule: Callable[[int], Optional[str]]) -> dict:
    """Class ids by a rule on each class's position in name order: ``rule(i)`` gives the split
    ("train", "val", "test") of the i-th class name, or None to leave it out."""
    order = sorted(range(len(listing.classes)), key=lambda i: listing.classes[i])
    out: dict = {s: [] for s in SPLIT_NAMES}
    for pos, cid in enumerate(order):
        s = rule(pos)
        if s is not None:
            out[s].append(cid)
    return {s: np.asarray(sorted(v), dtype=np.int64) for s, v in out.items()}


def seeded_split(listing: Listing, seed: int, fractions: tuple = (0.64, 0.16, 0.20)) -> dict:
    """Classes split at random by a recorded rule: the class names, sorted, are permuted by
    ``numpy.random.default_rng(seed).permutation``; the first ``round(fractions[0]·n)`` go to
    train, the next ``round(fractions[1]·n)`` to val, the rest to test (each split keeps at
    least one class when there are three or more)."""
    n = len(listing.classes)
    order = np.asarray(sorted(range(n), key=lambda i: listing.classes[i]), dtype=np.int64)
    perm = order[np.random.default_rng(seed).permutation(n)]
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    if n >= 3:
        n_train = min(max(n_train, 1), n - 2)
        n_val = min(max(n_val, 1), n - n_train - 1)
    return {"train": np.sort(perm[:n_train]), "val": np.sort(perm[n_train:n_train + n_val]),
            "test": np.sort(perm[n_train + n_val:])}


def check_tasks(title: str, listing: Listing, split_ids: dict, ways: int, shots: int, queries: int,
                root=None, splits: Sequence[str] = SPLIT_NAMES) -> None:
    """Raise :class:`DataMismatchError` when a split cannot give ``ways``-way tasks of ``shots``
    support and ``queries`` query images per class (too few classes, or a class with too few
    images), naming the split, the class and what to change. Runs on the listing, before any
    image is decoded."""
    where = f" ({root})" if root is not None else ""
    need = shots + queries
    for s in splits:
        ids = split_ids.get(s)
        n = 0 if ids is None else len(ids)
        if n < ways:
            raise DataMismatchError(
                f"{ways}-way tasks need {ways} classes, but the {s!r} split of {title}{where} has {n}; use fewer "
                f"ways (--set ways={max(n, 1)}) or give that split more classes")
        counts = np.asarray(listing.counts, dtype=np.int64)[ids]
        small = np.flatnonzero(counts < need)
        if len(small):
            worst = [f"{listing.classes[ids[j]]!r} ({counts[j]})" for j in small[:5]]
            more = f" and {len(small) - 5} more" if len(small) > 5 else ""
            raise DataMismatchError(
                f"{shots}-shot tasks with {queries} queries per class need {need} images per class, but in the "
                f"{s!r} split of {title}{where} class{'es' if len(small) > 1 else ''} {', '.join(worst)}{more} "
                f"{'have' if len(small) > 1 else 'has'} fewer; use fewer shots or queries (--set queries=...) or "
                f"add images")


# --------------------------------------------------------------------------- the loaded dataset


class ImageDataset:
    """A preprocessed dataset: ``images`` uint8 (M, C, H, W), classes contiguous, and its splits.

    Attributes: spec (its registry entry), root, store, meta (the cache's metadata), listing,
    class_names, class_groups, counts, starts (int64), files (per image; None for pickled
    sources), cache_path, built (this call decoded the images), build_seconds.
    """

    def __init__(self, spec, root: Path, store: ImageStore, meta: dict, listing: Listing, cache_path: Path,
                 built: bool, build_seconds: float, **options):
        self.spec, self.root, self.store, self.meta, self.listing = spec, root, store, meta, listing
        self.class_names: list = listing.classes
        self.class_groups: list = listing.groups
        self.counts = np.asarray(listing.counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.files = listing.files
        self.cache_path, self.built, self.build_seconds = cache_path, built, build_seconds
        self.options = options

    @property
    def images(self) -> np.ndarray:
        return self.store.array

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.spec.name!r}, root={str(self.root)!r}, classes={self.num_classes}, "
                f"images={int(self.counts.sum())}, cache={str(self.cache_path)!r})")

    def class_images(self, c: int) -> np.ndarray:
        """uint8 (count, C, H, W) images of class ``c``."""
        return self.images[self.starts[c] : self.starts[c] + self.counts[c]]

    def pool(self, class_ids, name: str = "pool", normalize: bool = True, invert: Optional[bool] = None) -> ClassPool:
        """A :class:`ClassPool` over the given class indices (in that order), scaled to [0, 1],
        inverted and normalised as the dataset's entry says (``normalize=False``: no mean/std)."""
        ids = np.asarray(class_ids, dtype=np.int64)
        names = self.listing.pool_names()
        spec = self.spec
        return ClassPool(self.store, self.starts[ids], self.counts[ids], [names[i] for i in ids],
                         invert=spec.invert if invert is None else invert,
                         mean=spec.mean if normalize else None, std=spec.std if normalize else None, name=name)

    def split_ids(self, scheme: Optional[str] = None, seed: int = 0, **kw) -> dict:
        """Class indices of "train", "val" and "test" (the dataset's entry decides how;
        ``scheme`` names one of its ``split_schemes``)."""
        return self.spec.split_ids(self.listing, scheme=scheme, seed=seed, **kw)

    def pools(self, scheme: Optional[str] = None, seed: int = 0, normalize: bool = True,
              invert: Optional[bool] = None, **kw) -> dict:
        """The "train", "val" and "test" :class:`ClassPool` s."""
        ids = self.split_ids(scheme, seed=seed, **kw)
        return {s: self.pool(ids[s], name=s, normalize=normalize, invert=invert) for s in SPLIT_NAMES}
