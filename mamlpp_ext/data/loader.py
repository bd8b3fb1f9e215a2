"""Loading any registered dataset, the same way for all: :func:`load_dataset` and :func:`load_pools`.

1. Find the root (argument > environment variable > default folder) and open the source: the
   files are found and identified, nothing is decoded (a missing or incomplete dataset is an
   error here, saying what to put where).
2. Look the source up in the cache (NOTE [Cache checks] in cache.py). On a hit the classes come
   from the cache's metadata; otherwise the source lists them.
3. Check the request against the listing before any decoding: the image shape the dataset can
   give, and -- for :func:`load_pools` -- that every split has enough classes for the ways and
   every class enough images for the shots and queries.
4. On a miss: the quick check of every image (NOTE [Bad files] in images.py), then the decoding
   pass straight into the cache file (NOTE [Cache builds]); any bad file stops the build with
   one error listing them all.

``load_omniglot`` and ``load_mini_imagenet`` are this with those datasets' arguments.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

from .cache import ImageCache, ImageStore, hash_json
from .dataset import ImageDataset, Listing, check_tasks
from .errors import CorruptImageError, DataError, format_list
from .images import Decoder, default_workers, resample_filter
from .miniimagenet import MiniImageNetData, resolve_mini_imagenet_root
from .omniglot import OmniglotData, resolve_omniglot_root
from .paths import resolve_cache_dir
from .registry import DatasetSpec, get_dataset

__all__ = ["cache_folder", "load_dataset", "load_mini_imagenet", "load_omniglot", "load_pools", "omniglot_episodes"]


def load_dataset(dataset: str | DatasetSpec, root: str | os.PathLike | None = None, *, image_shape=None,
                 resample: Optional[str] = None, binary_resize: bool = False,
                 cache_dir: str | os.PathLike | None = None, check_counts: Optional[bool] = None,
                 num_workers: Optional[int] = None, progress: bool = True, mmap: Optional[bool] = None,
                 log: Optional[Callable[[str], None]] = None,
                 before_build: Optional[Callable[[Listing], None]] = None, **data_options) -> ImageDataset:
    """Find ``dataset`` (a registered name or entry), preprocess it once (cached) and return it.

    Args:
        root: its folder (default: its environment variable, then its default folder).
        image_shape: (C, H, W) of the cached images (default: the entry's); checked against what
            the dataset can give before any work.
        resample: PIL filter name (default: the entry's, "lanczos").
        binary_resize: resize 1-bit images as they are (Omniglot: as the public MAML++ code).
        cache_dir: cache folder (default ``$MAMLPP_CACHE_DIR``, then ``~/.cache/mamlpp_ext``).
        check_counts: require the complete dataset (default: the entry's).
        num_workers: decoding processes for a build (default min(4, CPUs)).
        progress: show progress bars while building. mmap: memory-map the cached array
            (default: the entry's). log: where cache messages go (default stderr).
        before_build: called with the listing before any image is decoded (a hit or a miss);
            raise from it to stop.
        data_options: passed to the entry's ``data_class`` (e.g. Omniglot's ``invert``).

    Raises ``DatasetNotFoundError`` (missing or incomplete data), ``DataMismatchError`` (a shape
    the data cannot give), ``CorruptImageError`` (every bad file, listed) and ``DataError``
    (damaged archives or pickles, a full disk); nothing is left half-written in the cache.
    """
    spec = get_dataset(dataset)
    shape = spec.image_shape(image_shape)
    resample = resample or spec.resample
    resample_filter(resample)  # reject an unknown filter name before any work
    root_path = spec.resolve_root(root)
    check_counts = spec.check_counts if check_counts is None else bool(check_counts)
    try:
        source = spec.open(root_path, check_counts=check_counts)
    except OSError as exc:
        raise _os_error(spec, root_path, exc) from None
    try:
        params = _params(spec, shape, resample, binary_resize)
        fingerprint = hash_json({"params": params, "source": source.fingerprint})
        cache = ImageCache(resolve_cache_dir(cache_dir), source.cache_name, root_path, params, spec.title, log)
        meta = cache.lookup(fingerprint, shape)
        if meta is not None:
            listing = Listing.from_meta(meta)
            if check_counts:
                source.verify_counts(listing)
        else:
            listing = source.listing()
        if before_build is not None:
            before_build(listing)
        built, seconds = False, 0.0
        if meta is None:
            meta, seconds = _build(spec, source, cache, fingerprint, shape, listing, params, root_path, num_workers,
                                   progress)
            built = True
    except OSError as exc:  # e.g. a file or folder that cannot be read, met while listing or building
        raise _os_error(spec, root_path, exc) from None
    finally:
        source.close()
    path = cache.images_path(meta)
    store = ImageStore(path=path, mmap=spec.mmap if mmap is None else mmap)
    store.array  # read (or map) it now: a later rebuild of the entry must not pull it away
    return spec.data_class(spec, root_path, store, meta, listing, path, built, seconds, **data_options)


def _os_error(spec: DatasetSpec, root: Path, exc: OSError) -> DataError:
    if isinstance(exc, DataError):
        return exc
    where = exc.filename or root
    return DataError(f"cannot read {where} ({spec.title}, {root}): {exc.strerror or exc}; check that it exists and "
                     f"is readable (permissions), or replace it")


def _params(spec: DatasetSpec, shape: tuple, resample: str, binary_resize: bool) -> dict:
    return {"size": [shape[1], shape[2]], "mode": spec.mode(shape[0]), "resample": resample,
            "binary_resize": bool(binary_resize)}


def cache_folder(dataset: str | DatasetSpec, root: str | os.PathLike | None = None, *, image_shape=None,
                 resample: Optional[str] = None, binary_resize: bool = False,
                 cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache entry folder :func:`load_dataset` uses for these arguments (nothing is read or
    written; e.g. to place a cache copied from another machine)."""
    spec = get_dataset(dataset)
    shape = spec.image_shape(image_shape)
    root_path = spec.resolve_root(root)
    name = spec.open(root_path, check_counts=False).cache_name
    params = _params(spec, shape, resample or spec.resample, binary_resize)
    return ImageCache(resolve_cache_dir(cache_dir), name, root_path, params).folder


def _bad_files_error(spec: DatasetSpec, root: Path, bad: list, fix: str, cache: ImageCache) -> CorruptImageError:
    report = ""
    if len(bad) > 10:
        listing_file = cache.cache_dir / f"bad-files-{spec.name}.txt"
        try:
            listing_file.parent.mkdir(parents=True, exist_ok=True)
            listing_file.write_text("".join(b + "\n" for b in bad))
            report = f" (all {len(bad)} are listed in {listing_file})"
        except OSError:
            pass
    return CorruptImageError(f"{len(bad)} unreadable file{'s' if len(bad) > 1 else ''} in {spec.title} ({root}): "
                             f"{format_list(bad)}{report}. Fix: {fix}; nothing was cached.", bad)


def _build(spec, source, cache, fingerprint, shape, listing, params, root, num_workers, progress):
    n = listing.num_images
    bad = source.check(num_workers, progress)
    if bad:
        raise _bad_files_error(spec, root, bad, source.fix, cache)
    stored = {"dataset": spec.name, **listing.to_meta()}
    t0 = time.perf_counter()

    def fill(arr):
        workers = default_workers(num_workers) if getattr(source, "parallel", True) else 1
        with Decoder(arr, mode=params["mode"], size=params["size"], resample=params["resample"],
                     binary_direct=params["binary_resize"], num_workers=workers, progress=progress, total=n,
                     desc=f"{spec.title}: preprocessing {n} images (once)") as dec:
            source.decode(dec)
            failed = dec.finish()
        if failed:
            names = listing.files
            raise _bad_files_error(spec, root, [f"{_name(source, names, i, root)}: {why}" for i, why in failed],
                                   source.fix, cache)
        stored["build_seconds"] = round(time.perf_counter() - t0, 3)

    meta = cache.build(fingerprint, (n, *shape), fill, stored)
    return meta, time.perf_counter() - t0


def _name(source, files, i: int, root: Path) -> str:
    name = source.file_name(i)
    if name == f"image {i}" and files is not None:
        return str(root / files[i])
    return name


# --------------------------------------------------------------------------- pools for a task shape


def load_pools(dataset: str | DatasetSpec, root: str | os.PathLike | None = None, *, image_shape=None,
               ways: int = 1, shots: int = 1, queries: int = 0, split: Optional[str] = None, split_seed: int = 0,
               lake_val_alphabets: int = 5, **load_kw) -> dict:
    """The "train", "val" and "test" class pools of ``dataset`` for ``ways``-way tasks of
    ``shots`` + ``queries`` images per class: the image shape, the classes per split and the
    images per class are checked before any image is decoded (``DataMismatchError`` naming the
    split, the class and what to change). ``split`` names one of the entry's ``split_schemes``
    (Omniglot: "maml", "lake"; None: its default); ``split_seed`` seeds splits drawn at random.
    ``load_kw`` go to :func:`load_dataset`."""
    spec = get_dataset(dataset)
    if split is not None and split not in spec.split_schemes:
        raise ValueError(f"split {split!r} is not one of {spec.title}'s class splits"
                         + (f" ({', '.join(spec.split_schemes)})" if spec.split_schemes
                            else " (its split is fixed by the data)"))
    kw = {"lake_val_alphabets": lake_val_alphabets} if "lake" in spec.split_schemes else {}

    root_path = spec.resolve_root(root)

    def check(listing: Listing) -> None:
        ids = spec.split_ids(listing, scheme=split, seed=split_seed, **kw)
        check_tasks(spec.title, listing, ids, ways, shots, queries, root=root_path)

    data = load_dataset(spec, root_path, image_shape=image_shape, before_build=check, **load_kw)
    return data.pools(split, seed=split_seed, **kw)


# --------------------------------------------------------------------------- Omniglot and mini-ImageNet


def load_omniglot(root: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
                  size: int = 28, resample: str = "lanczos", binary_resize: bool = False, invert: bool = False,
                  check_counts: bool = True, num_workers: int | None = None, progress: bool = True,
                  mmap: bool = False, log=None) -> OmniglotData:
    """Find Omniglot, preprocess it once (cached) and return it as :class:`OmniglotData`.

    Args:
        root: the data folder (see omniglot.py); default ``$MAMLPP_OMNIGLOT_ROOT`` then
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
    :class:`CorruptImageError` (naming every bad file) for unreadable images.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return load_dataset("omniglot", resolve_omniglot_root(root), image_shape=(1, size, size), resample=resample,
                        binary_resize=binary_resize, cache_dir=cache_dir, check_counts=check_counts,
                        num_workers=num_workers, progress=progress, mmap=mmap, log=log, invert=invert)


def load_mini_imagenet(root: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
                       size: int = 84, resample: str = "lanczos", check_counts: bool = False,
                       num_workers: int | None = None, progress: bool = True, mmap: bool = True,
                       log=None) -> MiniImageNetData:
    """Find mini-ImageNet, preprocess it once (cached, keyed by every file's path, size and
    mtime and by ``size``/``resample``) and return :class:`MiniImageNetData`.

    ``check_counts`` requires 64/16/20 classes of 600 images. ``mmap`` (default) maps the cached
    uint8 array (1.3 GB for the full set) instead of reading it. Raises
    :class:`DatasetNotFoundError` for a missing or incomplete root and
    :class:`CorruptImageError` naming every unreadable image.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return load_dataset("mini-imagenet", resolve_mini_imagenet_root(root), image_shape=(3, size, size),
                        resample=resample, cache_dir=cache_dir, check_counts=check_counts, num_workers=num_workers,
                        progress=progress, mmap=mmap, log=log)


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
