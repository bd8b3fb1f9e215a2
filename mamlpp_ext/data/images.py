"""Reading images: decoding and resizing one image, a quick validity check, and the pass that
decodes a whole dataset into the cache array (in a process pool).

Every image reaches the decoder as a *payload*: an :class:`ImageRef` (a file, or a member of a
zip archive), the encoded bytes (from a tar archive or a pickle), or an already decoded uint8
array (H, W) or (H, W, C). Whatever the source, the output is uint8 (C, H, W) with C = 1 for
mode "L" and 3 for mode "RGB", resized to the configured size.

NOTE [Bad files]
    A dataset with damaged files is reported once, with every bad file: ``check_payloads`` is a
    quick first pass that parses each image's header and looks for its end marker (PNG ``IEND``,
    JPEG ``EOI``) without decoding the pixels, so garbage, empty, truncated and unreadable files
    and zip members with a bad CRC are found in seconds, before the long decoding pass; a file
    that looks truncated is decoded there to be sure. The decoding pass then collects whatever
    it still finds instead of stopping at the first. Either pass raises one
    :class:`~mamlpp_ext.data.errors.CorruptImageError` listing them all; nothing is written to
    the cache.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from .progress import Progress

__all__ = ["Decoder", "ImageRef", "RESAMPLE_NAMES", "check_payloads", "decode_image", "decode_into", "default_workers",
           "resample_filter"]

RESAMPLE_NAMES = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
_JPEG_END = b"\xff\xd9"
_TAIL = 2048


def resample_filter(name: str):
    """PIL resampling filter for a lower-case name ("lanczos", "bicubic", ...)."""
    from PIL import Image

    if name not in RESAMPLE_NAMES:
        raise ValueError(f"resample must be one of {RESAMPLE_NAMES}, got {name!r}")
    return getattr(Image.Resampling, name.upper())


@dataclass(frozen=True)
class ImageRef:
    """Where one image lives: a plain file (``member`` None) or a member of a zip archive."""

    path: str
    member: str | None = None

    def __str__(self) -> str:  # the name used in error messages
        return self.path if self.member is None else f"{self.path}!{self.member}"


_ZIPS: dict = {"pid": None, "open": {}}


def _zip(path: str) -> zipfile.ZipFile:
    """An open ZipFile for ``path``, kept for this process: opening one parses its whole central
    directory (about a second for Omniglot's 20,000 members on a busy machine), so it is done
    once per process, not once per chunk of images. A forked child never uses its parent's."""
    if _ZIPS["pid"] != os.getpid():
        _ZIPS["pid"], _ZIPS["open"] = os.getpid(), {}
    zf = _ZIPS["open"].get(path)
    if zf is None:
        zf = _ZIPS["open"][path] = zipfile.ZipFile(path)
    return zf


def close_archives() -> None:
    """Close the zip archives this process keeps open (after a pass over a dataset)."""
    if _ZIPS["pid"] == os.getpid():
        for zf in _ZIPS["open"].values():
            zf.close()
    _ZIPS["pid"], _ZIPS["open"] = os.getpid(), {}


def _size_hw(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def _to_mode(im, mode: str):
    """``im`` converted to "L" or "RGB". 16- and 32-bit grey images are scaled to 8 bits first
    (PIL's own conversion clips them); alpha is dropped, as torchvision's image loader does."""
    from PIL import Image

    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.rint(np.asarray(im) * 255.0), 0, 255).astype(np.uint8), "L")
    return im if im.mode == mode else im.convert(mode)


def decode_image(data, mode: str, size, resample: str, binary_direct: bool = False) -> np.ndarray:
    """Decode one image and resize it to ``size`` (an int: square; or (height, width));
    returns uint8 (C, H, W).

    ``data``: encoded bytes, a file path, or a decoded uint8 array (H, W) / (H, W, C).
    ``binary_direct``: resize a 1-bit image as it is (PIL then keeps it 1-bit, using nearest
    neighbour), as the public MAML++ code does for Omniglot.
    """
    from PIL import Image

    h, w = _size_hw(size)
    if isinstance(data, np.ndarray):
        im = Image.fromarray(data)
        ctx = None
    else:
        ctx = im = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data)
    try:
        im.load()
        if binary_direct:
            out = im.resize((w, h), resample_filter(resample)).convert("L")
        else:
            im = _to_mode(im, mode)
            out = im.resize((w, h), resample_filter(resample)) if im.size != (w, h) else im
        arr = np.asarray(out, dtype=np.uint8)
    finally:
        if ctx is not None:
            ctx.close()
    if arr.ndim == 2:
        return arr[None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


# --------------------------------------------------------------------------- the quick check


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (zipfile.BadZipFile, zlib.error)) or "CRC" in str(exc):
        return f"damaged archive member ({exc})"
    if type(exc).__name__ == "UnidentifiedImageError":
        return "not a readable image"
    if isinstance(exc, (PermissionError, IsADirectoryError)) or (isinstance(exc, OSError) and exc.errno):
        return f"cannot read the file ({exc.strerror or exc})"
    text = str(exc)
    if "truncated" in text or isinstance(exc, EOFError):
        return f"truncated ({text})" if text else "truncated"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_encoded(head, tail: bytes, full: Callable[[], object]) -> None:
    """Check an encoded image from its first bytes (``head``: bytes, or a binary file object at
    its start) and its last ones (``tail``); decode it in full (``full()``) when its end marker
    is missing. PNG and JPEG (nearly every dataset) are checked from their signature, header
    and end marker alone; other formats by PIL's header parser. Raises on a bad image."""
    start = head[:64] if isinstance(head, (bytes, bytearray)) else head.read(64)
    if start[:8] == _PNG_SIGNATURE:
        # IHDR: length 13, then width and height (big-endian, > 0)
        if len(start) < 24 or start[12:16] != b"IHDR" or start[16:20] == bytes(4) or start[20:24] == bytes(4):
            raise ValueError("not a readable image (a damaged PNG header)")
        if _PNG_END not in tail[-64:]:
            full()
        return
    if start[:3] == b"\xff\xd8\xff":
        if _JPEG_END not in tail:
            full()
        return
    from PIL import Image

    if not isinstance(head, (bytes, bytearray)):
        head.seek(0)
    with Image.open(io.BytesIO(head) if isinstance(head, (bytes, bytearray)) else head) as im:
        if im.width < 1 or im.height < 1:
            raise ValueError("image of size 0")
    if not tail:
        full()


def _check_one(payload) -> None:
    if isinstance(payload, np.ndarray):
        return
    if isinstance(payload, (bytes, bytearray, memoryview)):
        data = bytes(payload)
        _check_encoded(data, data[-_TAIL:], lambda: decode_image(data, "RGB", 1, "nearest"))
        return
    with open(payload.path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise EOFError("empty file")
        f.seek(max(0, size - _TAIL))
        tail = f.read()
        f.seek(0)
        _check_encoded(f, tail, lambda: decode_image(payload.path, "RGB", 1, "nearest"))


def _check_chunk(args) -> list[tuple[int, str]]:
    indices, payloads = args
    bad = []
    for i, p in zip(indices, payloads):
        try:
            if isinstance(p, ImageRef) and p.member is not None:
                data = _zip(p.path).read(p.member)  # checks the CRC-32
                _check_encoded(data, data[-_TAIL:], lambda: decode_image(data, "RGB", 1, "nearest"))
            else:
                _check_one(p)
        except Exception as exc:  # noqa: BLE001 - reported with the file's name
            bad.append((int(i), _reason(exc)))
    return bad


# --------------------------------------------------------------------------- decoding


def _decode_chunk(args) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Worker: decode ``payloads`` into uint8 (n, C, H, W); bad images stay zero and are reported."""
    indices, payloads, params = args
    h, w = _size_hw(params["size"])
    channels = 3 if params["mode"] == "RGB" else 1
    out = np.zeros((len(payloads), channels, h, w), dtype=np.uint8)
    bad = []
    for j, (i, p) in enumerate(zip(indices, payloads)):
        try:
            if isinstance(p, ImageRef):
                data = p.path if p.member is None else _zip(p.path).read(p.member)
            else:
                data = p
            out[j] = decode_image(data, params["mode"], (h, w), params["resample"], params["binary_direct"])
        except Exception as exc:  # noqa: BLE001 - reported with the file's name
            bad.append((int(i), _reason(exc)))
    return np.asarray(indices, dtype=np.int64), out, bad


class _Pool:
    """Runs ``fn(job)`` for submitted jobs in this process or in up to ``num_workers`` processes,
    handing each result to ``on_result``, with at most ``2 * num_workers`` jobs in flight (so a
    streamed source is never read far ahead of the decoders)."""

    def __init__(self, fn, num_workers: int, on_result: Callable):
        self.fn, self.on_result = fn, on_result
        self.num_workers = max(1, int(num_workers))
        self._pool = None
        self._pending: deque = deque()

    def submit(self, job) -> None:
        if self.num_workers <= 1:
            self.on_result(self.fn(job))
            return
        if self._pool is None:
            import concurrent.futures
            import multiprocessing

            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork") if "fork" in methods else None
            self._pool = concurrent.futures.ProcessPoolExecutor(max_workers=self.num_workers, mp_context=ctx)
        self._pending.append(self._pool.submit(self.fn, job))
        while len(self._pending) >= 2 * self.num_workers:
            self.on_result(self._pending.popleft().result())

    def drain(self) -> None:
        while self._pending:
            self.on_result(self._pending.popleft().result())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _run(fn, jobs: Iterable, num_workers: int, on_result: Callable) -> None:
    pool = _Pool(fn, num_workers, on_result)
    try:
        for job in jobs:
            pool.submit(job)
        pool.drain()
    finally:
        pool.close()


def default_workers(num_workers: int | None) -> int:
    """The decoding processes: ``num_workers``, or up to 4 (at most the CPU count)."""
    return min(4, os.cpu_count() or 1) if num_workers is None else int(num_workers)


def _chunks(payloads: Iterable[tuple[int, object]], size: int):
    idx: list[int] = []
    items: list = []
    for i, p in payloads:
        idx.append(i)
        items.append(p)
        if len(items) >= size:
            yield idx, items
            idx, items = [], []
    if items:
        yield idx, items


def check_payloads(payloads: Sequence[tuple[int, object]], *, num_workers: int | None = None,
                   progress: bool = True, desc: str = "checking images") -> list[tuple[int, str]]:
    """The quick first pass (NOTE [Bad files]) over ``(index, payload)`` pairs: returns
    ``(index, reason)`` for every bad image, sorted."""
    bad: list[tuple[int, str]] = []
    bar = Progress(len(payloads), desc, enabled=progress)
    jobs = list(_chunks(payloads, 256))
    sizes = iter([len(j[0]) for j in jobs])

    def done(res):
        bad.extend(res)
        bar.update(next(sizes))

    try:
        _run(_check_chunk, jobs, min(default_workers(num_workers), len(jobs)), done)
    finally:
        close_archives()
        bar.close()
    return sorted(bad)


class Decoder:
    """Decodes images into ``out`` (uint8 (M, C, H, W), e.g. a memory-mapped cache file being
    built) as they are handed to :meth:`add`, in chunks of ``chunk`` images spread over
    ``num_workers`` processes. :meth:`finish` waits for the last ones and returns ``(index,
    reason)`` for every image that could not be decoded (its slot stays zero), sorted. Use as a
    context manager (the worker processes end with it)."""

    def __init__(self, out: np.ndarray, *, mode: str, size, resample: str, binary_direct: bool = False,
                 num_workers: int | None = None, progress: bool = True, total: int | None = None,
                 desc: str = "decoding images", chunk: int = 256):
        self.out = out
        self.params = {"mode": mode, "size": _size_hw(size), "resample": resample,
                       "binary_direct": bool(binary_direct)}
        self.bad: list[tuple[int, str]] = []
        self.chunk = int(chunk)
        self._idx: list[int] = []
        self._items: list = []
        self._bar = Progress(total, desc, enabled=progress)
        workers = 1 if total is not None and total <= chunk else default_workers(num_workers)
        self._pool = _Pool(_decode_chunk, workers, self._done)

    def _done(self, res) -> None:
        idx, arr, errs = res
        self.out[idx] = arr
        self.bad.extend(errs)
        self._bar.update(len(idx))

    def add(self, index: int, payload) -> None:
        self._idx.append(int(index))
        self._items.append(payload)
        if len(self._items) >= self.chunk:
            self._flush()

    def _flush(self) -> None:
        if self._items:
            self._pool.submit((self._idx, self._items, self.params))
            self._idx, self._items = [], []

    def finish(self) -> list[tuple[int, str]]:
        self._flush()
        self._pool.drain()
        return sorted(self.bad)

    def close(self) -> None:
        self._pool.close()
        close_archives()
        self._bar.close()

    def __enter__(self) -> "Decoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decode_into(out: np.ndarray, payloads: Iterable[tuple[int, object]], **kw) -> list[tuple[int, str]]:
    """Decode every ``(index, payload)`` into ``out[index]`` with a :class:`Decoder` (``kw``: its
    arguments); returns ``(index, reason)`` for every image that could not be decoded, sorted."""
    with Decoder(out, **kw) as dec:
        for i, p in payloads:
            dec.add(i, p)
        return dec.finish()
