"""The preprocessing cache: one implementation for every dataset.

A cache entry is a folder ``<cache dir>/<dataset>-<key>/`` (the key hashes the source root and
the preprocessing parameters: image size, colour mode, filter) holding

    images-<fingerprint>.npy   uint8 (M, C, H, W), the images of all classes, class after class
    meta.json                  what built it and what it holds (written last: the commit marker)

The fingerprint hashes the source's listing (file names, sizes and dates, or archive members'
CRCs) and the parameters, so a changed source rebuilds the entry.

NOTE [Cache checks]
    Every load checks the entry before using it: ``meta.json`` parses and names this cache
    version and fingerprint; the array's .npy header is readable, its shape and dtype are the
    ones ``meta.json`` records, the file holds all the bytes the header announces (a truncated
    copy is caught here, not by NumPy later), the image shape is the one asked for and the class
    counts add up to the number of images. A stale or damaged entry is rebuilt, with a message
    naming it and the reason.

NOTE [Cache builds]
    A build writes the array into a temporary file beside its final name, reserving its full
    size on disk first (so a full disk is an error naming the folder, not a crash halfway), then
    fsyncs it, renames it into place and writes ``meta.json`` last, atomically. Any failure --
    bad images, a full disk, Ctrl-C -- removes the temporary file: nothing half-written is ever
    in the cache. Builds of one entry are serialised by a lock file (``<cache dir>/.locks/``),
    so processes started together (e.g. by torchrun) build it once and share it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from .errors import DataError

__all__ = ["CACHE_VERSION", "ImageCache", "ImageStore", "atomic_write", "file_listing", "hash_json", "zip_listing"]

# Bump when the on-disk cache layout or the decoding changes.
CACHE_VERSION = 2


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


# --------------------------------------------------------------------------- atomic files


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


# --------------------------------------------------------------------------- the image array


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


def _npy_header(path: Path) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, offset of the data) from a .npy file's header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if fortran:
            raise ValueError("Fortran-ordered array")
        return tuple(shape), dtype, f.tell()


def _log(message: str) -> None:
    print(f"mamlpp_ext.data: {message}", file=sys.stderr, flush=True)


def _human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform: builds are still atomic
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class ImageCache:
    """The cache entry of one dataset source with one set of preprocessing parameters (see the
    module docstring and NOTE [Cache checks] / [Cache builds]).

    Args:
        cache_dir: the cache folder. name: the dataset's cache name ("omniglot", ...).
        root: the source root (its resolved path is part of the key). params: the preprocessing
            parameters (JSON-serialisable). title: the dataset's name in messages.
        log: where messages go (default: stderr).
    """

    def __init__(self, cache_dir: str | os.PathLike, name: str, root: str | os.PathLike, params: dict,
                 title: Optional[str] = None, log: Optional[Callable[[str], None]] = None):
        key = hash_json({"root": str(Path(root).resolve()), "params": params})[:16]
        self.cache_dir = Path(cache_dir)
        self.folder = self.cache_dir / f"{name}-{key}"
        self.meta_path = self.folder / "meta.json"
        self.params = params
        self.title = title or name
        self.log = log or _log
        self._lock_path = self.cache_dir / ".locks" / f"{name}-{key}.lock"

    # ---- loading

    def lookup(self, fingerprint: str, image_shape: tuple, quiet: bool = False) -> Optional[dict]:
        """The stored metadata when the entry matches ``fingerprint`` and passes every check of
        NOTE [Cache checks] (``image_shape`` = (C, H, W)), else None; says why when an existing
        entry is not used (unless ``quiet``)."""
        meta, why = self._check(fingerprint, tuple(image_shape))
        if why and not quiet:
            self.log(f"{self.title}: the cache {self.folder} is {why}; rebuilding it")
        return meta

    def _check(self, fingerprint: str, image_shape: tuple) -> tuple[Optional[dict], Optional[str]]:
        if not self.meta_path.exists():
            return None, None
        try:
            meta = json.loads(self.meta_path.read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            return None, f"damaged ({self.meta_path.name} is unreadable: {exc})"
        if meta.get("cache_version") != CACHE_VERSION:
            return None, f"from another version of mamlpp_ext (cache format {meta.get('cache_version')})"
        if meta.get("fingerprint") != fingerprint:
            return None, "stale (the dataset's files changed)"
        path = self.folder / str(meta.get("images_file", ""))
        if not path.is_file():
            return None, f"damaged (its image array {path.name} is missing)"
        try:
            shape, dtype, offset = _npy_header(path)
        except (OSError, ValueError, EOFError) as exc:
            return None, f"damaged (the header of {path.name} is unreadable: {exc})"
        expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        actual = path.stat().st_size
        if actual != expected:
            return None, f"damaged ({path.name} holds {actual} bytes, its header announces {expected}: truncated?)"
        if dtype != np.uint8 or list(shape) != list(meta.get("shape", [])):
            return None, (f"damaged ({path.name} is {dtype} {shape}, {self.meta_path.name} says uint8 "
                          f"{meta.get('shape')})")
        if tuple(shape[1:]) != image_shape:
            return None, f"damaged (images of shape {tuple(shape[1:])}, expected {image_shape})"
        counts = meta.get("class_counts")
        if not isinstance(counts, list) or sum(counts) != shape[0] or any(c < 1 for c in counts):
            return None, f"damaged (its class counts do not add up to the {shape[0]} images)"
        return meta, None

    def images_path(self, meta: dict) -> Path:
        return self.folder / meta["images_file"]

    # ---- building

    def build(self, fingerprint: str, shape: tuple, fill: Callable[[np.ndarray], None], meta: dict) -> dict:
        """Build the entry (NOTE [Cache builds]): ``fill(array)`` writes every image into the
        uint8 array of ``shape`` (memory-mapped from the temporary file) and raises to abandon
        the build; ``meta`` (JSON-serialisable; must hold ``class_counts``) is stored with it.
        Returns the stored metadata. Another process building the same entry is waited for and
        its result used."""
        shape = tuple(int(s) for s in shape)
        with _lock(self._lock_path):
            done, _ = self._check(fingerprint, shape[1:])
            if done is not None:
                return done
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DataError(f"cannot create the cache folder {self.folder}: {exc.strerror or exc}; choose "
                                f"another with --cache-dir DIR or MAMLPP_CACHE_DIR") from None
            for stale in self.folder.glob(".images-*.tmp.npy"):  # left by a killed build (we hold the lock)
                _unlink(stale)
            images_file = f"images-{fingerprint[:20]}.npy"
            tmp = self.folder / f".images-{fingerprint[:20]}.{os.getpid()}.tmp.npy"
            nbytes = int(np.prod(shape, dtype=np.int64))
            free = shutil.disk_usage(self.folder).free
            if free < nbytes + (64 << 20):
                _remove_if_empty(self.folder)
                raise DataError(f"not enough space for the {self.title} cache in {self.folder}: it needs "
                                f"{_human(nbytes)}, {_human(free)} are free; free some space or choose another "
                                f"cache folder with --cache-dir DIR or MAMLPP_CACHE_DIR")
            try:
                arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
                _reserve(tmp, self.folder, nbytes)
                fill(arr)
                arr.flush()
                del arr
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, self.folder / images_file)
                _fsync_dir(self.folder)
                meta = dict(meta, fingerprint=fingerprint, cache_version=CACHE_VERSION, images_file=images_file,
                            shape=list(shape), dtype="uint8", params=self.params)
                atomic_write(self.meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
            except BaseException as exc:
                _unlink(tmp)
                _remove_if_empty(self.folder)
                if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
                    raise DataError(f"the disk holding the cache folder {self.folder} is full; free some space or "
                                    f"choose another cache folder with --cache-dir DIR or MAMLPP_CACHE_DIR") from None
                raise
            for old in self.folder.glob("images-*.npy"):
                if old.name != images_file:
                    _unlink(old)
            return meta


def _reserve(path: Path, folder: Path, nbytes: int) -> None:
    """Allocate the file's blocks now, so that a full disk fails here (not as SIGBUS when a
    memory-mapped page is written later)."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno == 28:
            raise
        # EINVAL/EOPNOTSUPP: the file system cannot reserve; the build goes on without it
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
