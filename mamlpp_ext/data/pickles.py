"""Reading the pickled datasets as they are distributed.

CIFAR-100's python archive and tieredImageNet's ``*_images_png.pkl`` / ``*_labels.pkl`` were
written by Python 2 (``cPickle``, protocol 2): their strings are Python 2 ``str`` objects and
their arrays NumPy ``ndarray`` s rebuilt through ``numpy.core.multiarray._reconstruct``. Python 3
reads them with ``encoding="latin1"`` (as torchvision does for CIFAR), which turns the ``str``
keys into ``str`` and leaves the arrays' raw bytes intact.

Both readers here are restricted: they rebuild only the NumPy objects such files hold (arrays,
dtypes, scalars) and refuse any other global, so a pickle cannot run code on load.

NOTE [Streaming the tieredImageNet pickles]
    ``train_images_png.pkl`` is one list of 448,695 small uint8 arrays, each a PNG file
    (``cv2.imencode(".png", image)[1]``, shape (n, 1)), pickled in one piece by Python 2.
    ``pickle.load`` would hold all of them (several GB), and so would the unpickler's memo,
    which keeps a reference to every string it reads. :func:`stream_pickled_arrays` instead
    runs Python's own unpickler with two changes: each array is handed to a callback as
    soon as its bytes are read (and not kept in the list), and the memo keeps no large string
    (nothing in these files refers back to one). Memory stays at one image.
"""

from __future__ import annotations

import pickle
from typing import Callable, Optional

import numpy as np

from .errors import DataError

__all__ = ["load_pickle", "stream_pickled_arrays"]

_LARGE = 1024  # strings above this many bytes are image data, never referred to again


def _numpy_globals() -> dict:
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    scalar = np.int32(0).__reduce__()[0]
    out = {}
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(core, "_reconstruct")] = reconstruct
        out[(core, "scalar")] = scalar
    out[("numpy", "ndarray")] = np.ndarray
    out[("numpy", "dtype")] = np.dtype
    import codecs

    out[("_codecs", "encode")] = codecs.encode  # Python 3 protocol-2 pickles of bytes
    return out


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds NumPy arrays, dtypes and scalars and nothing else."""

    _globals: Optional[dict] = None

    def find_class(self, module: str, name: str):
        if _SafeUnpickler._globals is None:
            _SafeUnpickler._globals = _numpy_globals()
        try:
            return _SafeUnpickler._globals[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a dataset pickle never needs "
                                         f"(refused: loading it could run code)") from None


def load_pickle(f, where: str, fix: str):
    """Load a Python-2 (or later) dataset pickle from the binary file ``f`` with
    ``encoding="latin1"``, allowing only NumPy objects. ``where`` names the file in errors and
    ``fix`` says what to do; a truncated or damaged file raises :class:`DataError`."""
    try:
        return _SafeUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            UnicodeDecodeError, MemoryError, OSError) as exc:
        raise DataError(f"{where} cannot be read as a pickle ({_why(exc)}); {fix}") from None


def _why(exc: BaseException) -> str:
    if isinstance(exc, EOFError) or "truncated" in str(exc) or "ran out of input" in str(exc).lower():
        return "it ends early: truncated"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# --------------------------------------------------------------------------- streaming


class _LeanMemo(dict):
    """The unpickler's memo, minus image data (NOTE [Streaming the tieredImageNet pickles])."""

    def __setitem__(self, key, value):
        if _is_large(value) or (isinstance(value, tuple) and any(_is_large(v) for v in value)):
            value = None
        super().__setitem__(key, value)


def _is_large(v) -> bool:
    return isinstance(v, (bytes, bytearray, str)) and len(v) > _LARGE


class _Taken:
    """What the list holds in place of each array that was handed to the callback."""

    __slots__ = ()

    def __setstate__(self, state) -> None:  # replaced per stream, see _StreamingUnpickler
        raise AssertionError


class _StreamingUnpickler(pickle._Unpickler):
    def __init__(self, f, on_array: Callable[[bytes, tuple, np.dtype], None]):
        super().__init__(f, encoding="latin1")
        self.memo = _LeanMemo()
        self.on_array = on_array
        unpickler = self

        class Taken(_Taken):
            __slots__ = ()

            def __setstate__(self, state) -> None:
                unpickler._take(state)

        self._taken = Taken()
        self.count = 0

    def _take(self, state) -> None:
        # ndarray state: (version, shape, dtype, is_fortran, raw data)
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("an array entry is not in NumPy's format")
        _, shape, dtype, _, raw = state
        if isinstance(raw, str):
            raw = raw.encode("latin1")
        elif not isinstance(raw, (bytes, bytearray)):
            raise pickle.UnpicklingError(f"an array's data is {type(raw).__name__}, expected bytes")
        self.on_array(bytes(raw), tuple(shape), np.dtype(dtype))
        self.count += 1

    def _frombuffer(self, buf, dtype, shape, order):  # arrays pickled with protocol 5
        self.on_array(bytes(buf), tuple(shape), np.dtype(dtype))
        self.count += 1
        return self._taken

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return lambda *args: self._taken
        if name == "_frombuffer" and module in ("numpy.core.numeric", "numpy._core.numeric"):
            return self._frombuffer
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")):
            return _SafeUnpickler.find_class(self, module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a dataset pickle never needs "
                                     f"(refused: loading it could run code)")


def stream_pickled_arrays(f, on_array: Callable[[bytes, tuple, np.dtype], None], where: str, fix: str) -> int:
    """Read a pickled list of NumPy arrays from the binary file ``f`` without keeping them:
    ``on_array(raw bytes, shape, dtype)`` is called for each, in list order (NOTE [Streaming the
    tieredImageNet pickles]). Returns the number of arrays. A file that is not such a list, or
    is truncated or damaged, raises :class:`DataError` naming ``where`` with ``fix``; an
    exception from ``on_array`` propagates."""
    up = _StreamingUnpickler(f, on_array)
    try:
        top = up.load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            UnicodeDecodeError, MemoryError, OSError) as exc:
        raise DataError(f"{where} cannot be read as a pickle ({_why(exc)}) after {up.count} images; {fix}") from None
    if not isinstance(top, list) or any(x is not up._taken for x in top):
        raise DataError(f"{where} is not a pickled list of images (it holds a {type(top).__name__}); {fix}")
    return up.count
