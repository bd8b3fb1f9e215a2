"""The errors of :mod:`mamlpp_ext.data`.

Every message is one line that names the file(s), folder or setting at fault and says what to do
about it; the command-line tools print it and exit with status 2. ``DataError`` is the base class:
catch it to handle any of them.
"""

from __future__ import annotations

__all__ = ["CorruptImageError", "DataError", "DataMismatchError", "DatasetNotFoundError", "format_list"]


class DataError(RuntimeError):
    """Base class of the data-loading errors of :mod:`mamlpp_ext.data`."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A dataset root is missing or does not hold what was expected (the message says what and
    how to get it)."""


class CorruptImageError(DataError):
    """Images (or the archives and pickles that hold them) could not be read.

    ``files`` lists every bad one found in the pass that raised it, as ``"name: reason"``; the
    message names them (the first few when there are many, with the count) and the fix.
    """

    def __init__(self, message: str, files: list[str] | None = None):
        super().__init__(message)
        self.files = list(files or [])


class DataMismatchError(DataError, ValueError):
    """The data cannot serve the settings asked for (image shape, ways, shots + queries), found
    before any image is decoded."""


def format_list(items: list[str], limit: int = 10) -> str:
    """``items`` joined with "; ", the first ``limit`` of them and "and N more" past that."""
    shown = "; ".join(items[:limit])
    return shown + (f"; and {len(items) - limit} more" if len(items) > limit else "")
