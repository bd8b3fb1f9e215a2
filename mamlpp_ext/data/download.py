"""Getting the data, only when asked: ``mamlpp-data download omniglot`` and ``mamlpp-data where``.

Nothing in mamlpp_ext downloads at run time. This command fetches Omniglot's official archives
from Lake's repository (https://github.com/brendenlake/omniglot, folder ``python/``) into an
Omniglot root that the loader reads as it is:

    images_background.zip   30 alphabets, 964 characters (the "background" set)
    images_evaluation.zip   20 alphabets, 659 characters (the "evaluation" set)
    all_runs.zip            the original 20-way one-shot benchmark (20 runs)

Each file streams into a temporary file beside its destination with a progress bar; the byte
count is checked against the server's Content-Length (and the known size, where recorded) and
the MD5 against the published checksum before the file is moved into place (``atomic_write``):
an interrupted or corrupted transfer leaves no file behind. Files already present with the right
checksum are not fetched again. The root is ``--root`` > ``$MAMLPP_OMNIGLOT_ROOT`` > the default
folder, the same order the loader uses, so a plain ``mamlpp-data download omniglot`` puts the
data where ``mamlpp-train`` looks for it.

mini-ImageNet has no official archive; ``mamlpp-data where`` prints the folder layout it reads.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ._common import DataError, Progress, atomic_write, resolve_cache_dir
from . import miniimagenet as _mini
from . import omniglot as _omniglot

__all__ = ["DownloadError", "OMNIGLOT_BASE_URL", "OMNIGLOT_FILES", "RemoteFile", "download_omniglot", "fetch",
           "file_md5", "main"]

OMNIGLOT_BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: ``name`` in the root, ``path`` under the base URL, its MD5 and, when
    known, its size in bytes; ``what`` says what it holds."""

    name: str
    path: str
    md5: str
    size: Optional[int] = None
    what: str = ""


# The MD5s of the two image archives are the ones torchvision checks for the same URLs; the
# one-shot archive's MD5 and size were computed from a byte-for-byte copy of the file.
OMNIGLOT_FILES = (
    RemoteFile("images_background.zip", "images_background.zip", "68d2efa1b9178cc56df9314c21c6e718",
               what="30 background alphabets, 964 characters"),
    RemoteFile("images_evaluation.zip", "images_evaluation.zip", "6b91aef0f799c5bb55b94e3f2daec811",
               what="20 evaluation alphabets, 659 characters"),
    RemoteFile("all_runs.zip", "one-shot-classification/all_runs.zip", "e8996daecdf12afeeb4a53a179f06b19",
               size=352787, what="the original 20-way one-shot benchmark"),
)
ONE_SHOT_FILE = "all_runs.zip"
_CHUNK = 1 << 16


class DownloadError(DataError):
    """A file could not be fetched or failed its checks; the message says which and what to do."""


def file_md5(path: str | os.PathLike) -> str:
    """MD5 hex digest of a file."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _by_hand(url: str, dest: Path) -> str:
    return f"You can also download {url} by hand (a browser, curl or wget) and save it as {dest}."


def fetch(url: str, dest: str | os.PathLike, *, md5: str, size: Optional[int] = None, timeout: float = 60.0,
          progress: bool = True, desc: Optional[str] = None) -> int:
    """Download ``url`` to ``dest`` atomically, checking the byte count and the MD5; returns the
    number of bytes written. Raises :class:`DownloadError` (``dest`` untouched) on a network or
    HTTP error, a short transfer, or a checksum mismatch."""
    dest = Path(dest)
    req = urllib.request.Request(url, headers={"User-Agent": "mamlpp_ext-data-download"})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"could not download {url}: the server answered HTTP {exc.code} {exc.reason}. "
                            f"{_by_hand(url, dest)}") from None
    except (urllib.error.URLError, socket.timeout, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"could not download {url}: {reason}. Check the network connection (and a proxy, if "
                            f"you need one: $https_proxy). {_by_hand(url, dest)}") from None
    with resp:
        length = resp.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        total = expected if expected is not None else size
        bar = Progress(total, desc or dest.name, enabled=progress, unit="B", leave=True)
        received = 0

        def write(f) -> None:
            nonlocal received
            h = hashlib.md5(usedforsecurity=False)
            while True:
                try:
                    block = resp.read(_CHUNK)
                except (http.client.IncompleteRead, socket.timeout, OSError) as exc:
                    raise DownloadError(f"the transfer of {url} broke off after {received} bytes ({exc}); "
                                        f"run the command again. {_by_hand(url, dest)}") from None
                if not block:
                    break
                f.write(block)
                h.update(block)
                received += len(block)
                bar.update(len(block))
            for what, want in (("the server announced", expected), ("the file's known size is", size)):
                if want is not None and received != want:
                    raise DownloadError(f"incomplete download of {url}: received {received} bytes, but {what} "
                                        f"{want}; run the command again. {_by_hand(url, dest)}")
            got = h.hexdigest()
            if got != md5:
                raise DownloadError(f"checksum mismatch for {url}: MD5 {got}, expected {md5} ({received} bytes). "
                                    f"The file was not saved. A proxy or mirror may have altered it, or the "
                                    f"source changed; {_by_hand(url, dest)}")

        try:
            atomic_write(dest, write)
        finally:
            bar.close()
    return received


def default_download_root() -> Path:
    """Where ``download omniglot`` writes without ``--root``: ``$MAMLPP_OMNIGLOT_ROOT`` when set,
    else the default Omniglot folder (the loader looks in the same places, in the same order)."""
    env = os.environ.get(_omniglot.ENV_ROOT)
    return Path(env).expanduser() if env else _omniglot.default_omniglot_root()


def download_omniglot(root: str | os.PathLike | None = None, *, one_shot: bool = True, force: bool = False,
                      base_url: str = OMNIGLOT_BASE_URL, files: Sequence[RemoteFile] | None = None,
                      timeout: float = 60.0, progress: bool = True,
                      log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> list[dict]:
    """Fetch Omniglot's archives into ``root`` (default: ``default_download_root()``).

    ``one_shot``: also ``all_runs.zip``; ``force``: fetch even files already present with the
    right checksum; ``base_url``: where the files are (``OMNIGLOT_BASE_URL``, or a mirror with the
    same paths); ``files``: the table of files (default ``OMNIGLOT_FILES``). Returns one dict per
    file: ``name``, ``path``, ``status`` ("downloaded" or "present") and ``bytes``. Raises
    :class:`DownloadError` at the first file that fails; the files fetched before it stay.
    """
    root = Path(root).expanduser() if root is not None else default_download_root()
    files = OMNIGLOT_FILES if files is None else tuple(files)
    if not one_shot:
        files = tuple(f for f in files if f.name != ONE_SHOT_FILE)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create the folder {root}: {exc}") from None
    out = []
    for rf in files:
        dest = root / rf.name
        if dest.is_file() and not force:
            if file_md5(dest) == rf.md5:
                log(f"{rf.name}: already present, checksum OK ({dest})")
                out.append({"name": rf.name, "path": str(dest), "status": "present", "bytes": dest.stat().st_size})
                continue
            log(f"{rf.name}: present but its checksum differs; downloading it again")
        url = base_url.rstrip("/") + "/" + rf.path
        log(f"{rf.name}: downloading {url}" + (f" ({rf.what})" if rf.what else ""))
        n = fetch(url, dest, md5=rf.md5, size=rf.size, timeout=timeout, progress=progress, desc=rf.name)
        out.append({"name": rf.name, "path": str(dest), "status": "downloaded", "bytes": n})
    return out


# --------------------------------------------------------------------------- command line


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mamlpp-data", description="Get the datasets of mamlpp_ext, or see where they "
                                "are looked for. Nothing else in mamlpp_ext downloads anything.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="download a dataset's official archives (Omniglot)",
                       description="Download Omniglot's official archives (images_background.zip, "
                                   "images_evaluation.zip, all_runs.zip) with checksum checks.")
    d.add_argument("dataset", help="omniglot (mini-ImageNet cannot be downloaded: see `mamlpp-data where`)")
    d.add_argument("--root", help="folder to write (default: $MAMLPP_OMNIGLOT_ROOT, else "
                                  f"{_omniglot.default_omniglot_root()})")
    d.add_argument("--no-one-shot", action="store_true", help="skip all_runs.zip (the one-shot benchmark)")
    d.add_argument("--force", action="store_true", help="download files even when present with the right checksum")
    d.add_argument("--base-url", default=OMNIGLOT_BASE_URL,
                   help=f"where the files are: the official {OMNIGLOT_BASE_URL} (default) or a mirror with the "
                        f"same paths")
    d.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default 60)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_parser("where", help="print where the datasets and the cache are looked for",
                   description="Print the Omniglot and mini-ImageNet folders the commands would read, and the "
                               "preprocessing cache folder.")
    return p


def _where() -> int:
    for name, env, default, layout in (
            ("Omniglot", _omniglot.ENV_ROOT, _omniglot.default_omniglot_root(),
             "images_background.zip + images_evaluation.zip (+ all_runs.zip), or their extracted folders, "
             "or torchvision's omniglot-py/"),
            ("mini-ImageNet", _mini.ENV_ROOT, _mini.default_mini_imagenet_root(),
             "train/, val/, test/, each with one folder of images per class")):
        value = os.environ.get(env)
        path, how = (Path(value).expanduser(), f"${env}") if value else (default, f"default; ${env} is not set")
        state = "exists" if path.is_dir() else "does not exist"
        print(f"{name}: {path} ({how}; {state})\n    expects: {layout}")
    print(f"cache: {resolve_cache_dir()} ($MAMLPP_CACHE_DIR, else the user's cache folder)")
    print("A command's --dataset-root DIR overrides the dataset folder.")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command == "where":
        return _where()
    dataset = args.dataset.lower().replace("_", "-")
    if dataset in ("mini-imagenet", "miniimagenet"):
        parser.error("mini-ImageNet cannot be downloaded by mamlpp_ext: it is built from ImageNet with the "
                     "split's CSV files. " + _mini.LAYOUT_HELP)
    if dataset != "omniglot":
        parser.error(f"unknown dataset {args.dataset!r}; only 'omniglot' can be downloaded")
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0, got {args.timeout}")
    root = Path(args.root).expanduser() if args.root else default_download_root()
    print(f"mamlpp-data: downloading Omniglot into {root}", file=sys.stderr, flush=True)
    try:
        download_omniglot(root, one_shot=not args.no_one_shot, force=args.force, base_url=args.base_url,
                          timeout=args.timeout, progress=not args.no_progress)
    except DownloadError as exc:
        print(f"mamlpp-data: error: {exc}", file=sys.stderr, flush=True)
        return 1
    found_by_default = root.resolve() == default_download_root().resolve()
    hint = "" if found_by_default else (f" Pass --dataset-root {root} to the commands, or set "
                                        f"{_omniglot.ENV_ROOT}={root}.")
    print(f"mamlpp-data: Omniglot is ready in {root}.{hint} Next: mamlpp-train --preset omniglot-5way-1shot",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
