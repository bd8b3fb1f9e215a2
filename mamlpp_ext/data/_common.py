"""Shared plumbing for the dataset loaders: errors, cache folders, atomic writes,
fingerprints, image decoding (optionally in a process pool) and progress reporting.

Everything here is independent of a particular dataset. The cache format is one
folder per (dataset, source root, preprocessing parameters) under the cache
directory, holding ``meta.json`` (written last, atomically: it is the commit
marker) and ``images-<fingerprint>.npy`` (uint8 array, loadable with mmap). A
changed source gives a new fingerprint, so the entry is rebuilt and the stale
array removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

# Bump when the on-disk cache layout or the decoding changes.
CACHE_VERSION = 1

_RESAMPLE_NAMES = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")


class DataError(RuntimeError):
    """Base class of the data-loading errors of :mod:`mamlpp_ext.data`."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A dataset root is missing or does not hold what was expected."""


class CorruptImageError(DataError):
    """An image file could not be decoded; the message names its path."""


# --------------------------------------------------------------------------- paths


def user_data_dir() -> Path:
    """The user's data folder of mamlpp_ext: ``$XDG_DATA_HOME/mamlpp_ext``, else
    ``~/.local/share/mamlpp_ext``. Datasets live in sub-folders (``omniglot/``,
    ``mini-imagenet/``) unless a root is given; ``mamlpp-data download`` writes there. Not
    created here."""
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "mamlpp_ext"


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir`` > ``$MAMLPP_CACHE_DIR`` > ``$XDG_CACHE_HOME/mamlpp_ext``
    > ``~/.cache/mamlpp_ext``. The folder is not created here."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MAMLPP_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mamlpp_ext"


def resample_filter(name: str):
    """PIL resampling filter for a lower-case name ("lanczos", "bicubic", ...)."""
    from PIL import Image

    if name not in _RESAMPLE_NAMES:
        raise ValueError(f"resample must be one of {_RESAMPLE_NAMES}, got {name!r}")
    return getattr(Image.Resampling, name.upper())


# --------------------------------------------------------------------------- image sources


@dataclass(frozen=True)
class ImageRef:
    """Where one image lives: a plain file (``member`` None) or a member of a zip archive."""

    path: str
    member: str | None = None

    def __str__(self) -> str:  # the name used in error messages
        return self.path if self.member is None else f"{self.path}!{self.member}"


def decode_image(data: bytes | str, mode: str, size: int, resample: str, binary_direct: bool) -> np.ndarray:
    """Decode one image and resize it to ``size``×``size``; returns uint8 (C, H, W)."""
    from PIL import Image

    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with Image.open(src) as im:
        im.load()
        if binary_direct:
            # What PIL does with a 1-bit image resized as is: it stays 1-bit
            # (PIL falls back to nearest neighbour for mode "1").
            out = im.resize((size, size), resample_filter(resample)).convert("L")
        else:
            im = im.convert(mode)
            out = im.resize((size, size), resample_filter(resample)) if im.size != (size, size) else im
    arr = np.asarray(out, dtype=np.uint8)
    if arr.ndim == 2:
        return arr[None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _decode_chunk(args) -> tuple[int, np.ndarray | None, str | None]:
    """Worker: decode ``refs`` into a uint8 array, or report the first failure."""
    start, refs, mode, size, resample, binary_direct = args
    channels = 3 if mode == "RGB" else 1
    out = np.empty((len(refs), channels, size, size), dtype=np.uint8)
    zips: dict[str, zipfile.ZipFile] = {}
    try:
        for i, ref in enumerate(refs):
            try:
                if ref.member is None:
                    data: bytes | str = ref.path
                else:
                    zf = zips.get(ref.path)
                    if zf is None:
                        zf = zips[ref.path] = zipfile.ZipFile(ref.path)
                    data = zf.read(ref.member)
                out[i] = decode_image(data, mode, size, resample, binary_direct)
            except Exception as exc:  # noqa: BLE001 - reported with the path below
                return start, None, f"cannot read image {ref}: {type(exc).__name__}: {exc}"
    finally:
        for zf in zips.values():
            zf.close()
    return start, out, None


def decode_images(
    refs: Sequence[ImageRef],
    *,
    mode: str,
    size: int,
    resample: str,
    binary_direct: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
    desc: str = "decoding images",
) -> np.ndarray:
    """Decode and resize every image of ``refs``.

    Returns uint8 of shape (len(refs), C, size, size) with C = 3 for ``mode="RGB"``
    and 1 for ``mode="L"``. ``num_workers`` processes (default: up to 4, at most the
    CPU count; 0 or 1 decodes in this process). Raises :class:`CorruptImageError`
    naming the first image that cannot be read.
    """
    n = len(refs)
    channels = 3 if mode == "RGB" else 1
    out = np.empty((n, channels, size, size), dtype=np.uint8)
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)
    chunk = 512
    jobs = [(s, list(refs[s : s + chunk]), mode, size, resample, binary_direct) for s in range(0, n, chunk)]
    bar = Progress(n, desc, enabled=progress)
    try:
        if num_workers <= 1 or len(jobs) <= 1:
            results: Iterable = map(_decode_chunk, jobs)
            pool = None
        else:
            import concurrent.futures
            import multiprocessing

            ctx = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
            pool = concurrent.futures.ProcessPoolExecutor(max_workers=min(num_workers, len(jobs)), mp_context=ctx)
            results = pool.map(_decode_chunk, jobs)
        try:
            for start, arr, err in results:
                if err is not None:
                    raise CorruptImageError(err)
                out[start : start + len(arr)] = arr
                bar.update(len(arr))
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
    return out


# --------------------------------------------------------------------------- progress


class Progress:
    """A progress bar on stderr: tqdm when installed, else a plain line every few seconds.
    ``total`` may be None (unknown); ``unit="B"`` counts bytes (shown as kB, MB, ...)."""

    def __init__(self, total: int | None, desc: str, enabled: bool = True, unit: str = "img", leave: bool = False):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.done = 0
        self._t0 = self._last = time.monotonic()
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B",
                                 unit_divisor=1024 if unit == "B" else 1000, file=sys.stderr, leave=leave)
            except ImportError:
                print(f"{desc}: 0/{total}", file=sys.stderr, flush=True)

    def update(self, k: int) -> None:
        self.done += k
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(k)
            return
        now = time.monotonic()
        if now - self._last >= 2.0 or (self.total is not None and self.done >= self.total):
            self._last = now
            print(f"{self.desc}: {self.done}/{self.total} ({now - self._t0:.1f}s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# --------------------------------------------------------------------------- fingerprints


def hash_json(obj) -> str:
    """sha256 hex digest of a JSON-serialisable object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def zip_listing(path: Path) -> list:
    """Content listing of a zip: (name, CRC-32, size) of every file member, sorted."""
    with zipfile.ZipFile(path) as zf:
        return sorted((i.filename, i.CRC, i.file_size) for i in zf.infolist() if not i.is_dir())


def file_listing(paths: Iterable[Path], base: Path) -> list:
    """(relative path, size, mtime in ns) of every file, sorted."""
    out = []
    for p in paths:
        st = p.stat()
        out.append((p.relative_to(base).as_posix(), st.st_size, st.st_mtime_ns))
    out.sort()
    return out


# --------------------------------------------------------------------------- cache entries


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` through ``write(file)`` so that it is either the old or the new file, never
    a torn one: write a temporary file beside it (the folder is created), flush and fsync it,
    ``os.replace`` it over ``path``, then fsync the folder. On any error the temporary file is
    removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


class CacheEntry:
    """One cached, preprocessed image set: ``<cache_dir>/<name>/``.

    ``meta.json`` holds the fingerprint of the source and preprocessing, the
    array's file name and shape, and any dataset metadata (class names...).
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta_path = self.folder / "meta.json"

    def load_meta(self, fingerprint: str) -> dict | None:
        """The stored metadata when it matches ``fingerprint`` and its array exists, else None."""
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return None
        if meta.get("fingerprint") != fingerprint or meta.get("cache_version") != CACHE_VERSION:
            return None
        if not (self.folder / meta.get("images_file", "")).is_file():
            return None
        return meta

    def images_path(self, meta: dict) -> Path:
        return self.folder / meta["images_file"]

    def store(self, fingerprint: str, images: np.ndarray, meta: dict) -> dict:
        """Write ``images`` then ``meta.json`` atomically; remove arrays of older fingerprints."""
        self.folder.mkdir(parents=True, exist_ok=True)
        images_file = f"images-{fingerprint[:20]}.npy"
        atomic_write(self.folder / images_file, lambda f: np.save(f, images, allow_pickle=False))
        meta = dict(meta, fingerprint=fingerprint, cache_version=CACHE_VERSION, images_file=images_file,
                    shape=list(images.shape), dtype=str(images.dtype))
        atomic_write(self.meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
        for old in self.folder.glob("images-*.npy"):
            if old.name != images_file:
                try:
                    old.unlink()
                except OSError:
                    pass
        return meta


def entry_for(cache_dir: Path, dataset: str, root: Path, params: dict) -> CacheEntry:
    """The cache entry of ``dataset`` read from ``root`` with preprocessing ``params``."""
    key = hash_json({"root": str(Path(root).resolve()), "params": params})[:16]
    return CacheEntry(Path(cache_dir) / f"{dataset}-{key}")


class ImageStore:
    """A uint8 image array of shape (M, C, H, W), in memory or memory-mapped from a .npy file.

    Pickles by path when backed by a file (so DataLoader workers started with
    ``spawn`` re-open the file instead of copying the array).
    """

    def __init__(self, array: np.ndarray | None = None, path: str | os.PathLike | None = None, mmap: bool = False):
        if array is None and path is None:
            raise ValueError("ImageStore needs an array or a path")
        self.path = None if path is None else str(path)
        self.mmap = mmap
        self._array = array

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r" if self.mmap else None, allow_pickle=False)
        return self._array

    def __getstate__(self):
        if self.path is not None:
            return {"path": self.path, "mmap": self.mmap, "_array": None}
        return self.__dict__.copy()

    def __setstate__(self, state):
        self.__dict__.update(state)
