"""Where datasets and the preprocessing cache live.

A dataset's root is chosen in this order: the ``root`` argument (``--dataset-root`` on the
command line), then its environment variable ``MAMLPP_<NAME>_ROOT``, then its sub-folder of the
user's data folder (``user_data_dir()``). The cache folder is ``cache_dir`` >
``$MAMLPP_CACHE_DIR`` > ``$XDG_CACHE_HOME/mamlpp_ext`` > ``~/.cache/mamlpp_ext``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["resolve_cache_dir", "user_data_dir"]


def user_data_dir() -> Path:
    """The user's data folder of mamlpp_ext: ``$XDG_DATA_HOME/mamlpp_ext``, else
    ``~/.local/share/mamlpp_ext``. Datasets live in sub-folders (``omniglot/``,
    ``mini-imagenet/``, ...) unless a root is given; ``mamlpp-data download`` writes there. Not
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
