"""Getting the data, only when asked: ``mamlpp-data download NAME`` and ``mamlpp-data where``.

Nothing in mamlpp_ext downloads at run time. ``download`` fetches a dataset's public files, as
its registry entry lists them (``DatasetSpec.downloads``), into the root the loader reads:

    omniglot     images_background.zip, images_evaluation.zip (and the one-shot benchmark's
                 all_runs.zip) from Lake's repository https://github.com/brendenlake/omniglot
    cifar-fs     cifar-100-python.tar.gz (CIFAR-100's python version) from
    fc100        https://www.cs.toronto.edu/~kriz/ -- the same file for both
    cub          CUB_200_2011.tgz from Caltech's data repository

Each file streams into a temporary file beside its destination with a progress bar; the byte
count is checked against the server's Content-Length (and the known size, where recorded) and
the MD5 against the published checksum before the file is moved into place (``atomic_write``):
an interrupted or corrupted transfer leaves no file behind. Files already present with the right
checksum are not fetched again. The root is ``--root`` > the dataset's environment variable >
its default folder, the same order the loader uses, so a plain ``mamlpp-data download NAME``
puts the data where ``mamlpp-train`` looks for it. Archives are read as they are: nothing needs
extracting.

The datasets without a public download (mini-ImageNet, tieredImageNet, your own folders) are
refused with the list of files to put where; ``mamlpp-data where`` prints every dataset's folder
and the layout it reads.
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
from pathlib import Path
from typing import Callable, Optional, Sequence

from .cache import atomic_write
from .dataset import RemoteFile
from .errors import DataError
from .omniglot import BASE_URL as OMNIGLOT_BASE_URL
from .omniglot import FILES as OMNIGLOT_FILES
from .paths import resolve_cache_dir
from .progress import Progress
from .registry import DatasetSpec, get_dataset, registered_datasets

__all__ = ["DownloadError", "OMNIGLOT_BASE_URL", "OMNIGLOT_FILES", "RemoteFile", "download_dataset",
           "download_omniglot", "fetch", "file_md5", "main"]

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


def default_download_root(dataset: str | DatasetSpec = "omniglot") -> Path:
    """Where ``download NAME`` writes without ``--root``: the dataset's environment variable
    when set, else its default folder (the loader looks in the same places, in the same order)."""
    spec = get_dataset(dataset)
    env = next((os.environ[v] for v in spec.env_vars if os.environ.get(v)), None)
    return Path(env).expanduser() if env else spec.default_root()


def download_dataset(dataset: str | DatasetSpec, root: str | os.PathLike | None = None, *, optional: bool = True,
                     force: bool = False, base_url: Optional[str] = None, files: Sequence[RemoteFile] | None = None,
                     timeout: float = 60.0, progress: bool = True,
                     log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> list[dict]:
    """Fetch a dataset's public files into ``root`` (default: ``default_download_root(dataset)``).

    ``optional``: also the files marked optional (Omniglot's ``all_runs.zip``); ``force``: fetch
    even files already present with the right checksum; ``base_url``: where the files are (the
    entry's, or a mirror with the same paths); ``files``: the table of files (default: the
    entry's ``downloads``). Returns one dict per file: ``name``, ``path``, ``status``
    ("downloaded" or "present") and ``bytes``. Raises :class:`DownloadError` at the first file
    that fails (the files fetched before it stay), or when the dataset has no public download.
    """
    spec = get_dataset(dataset)
    files = tuple(spec.downloads if files is None else files)
    if not files:
        raise DownloadError(no_download_message(spec))
    root = Path(root).expanduser() if root is not None else default_download_root(spec)
    base_url = base_url or spec.base_url
    if not optional:
        files = tuple(f for f in files if not f.optional)
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


def download_omniglot(root: str | os.PathLike | None = None, *, one_shot: bool = True, force: bool = False,
                      base_url: str = OMNIGLOT_BASE_URL, files: Sequence[RemoteFile] | None = None,
                      timeout: float = 60.0, progress: bool = True,
                      log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> list[dict]:
    """Fetch Omniglot's archives into ``root`` (default: ``default_download_root("omniglot")``):
    :func:`download_dataset` with ``one_shot`` (also ``all_runs.zip``) for ``optional`` and
    ``OMNIGLOT_FILES`` as the default table."""
    files = tuple(OMNIGLOT_FILES if files is None else files)
    if not one_shot:
        files = tuple(f for f in files if f.name != ONE_SHOT_FILE)
    return download_dataset("omniglot", root, optional=one_shot, force=force, base_url=base_url, files=files,
                            timeout=timeout, progress=progress, log=log)


def no_download_message(spec: DatasetSpec) -> str:
    """Why ``download`` refuses a dataset, and which files to put where instead."""
    return (f"{spec.title} cannot be downloaded by mamlpp_ext (it has no public download it can fetch). "
            f"{spec.get} Expected {spec.layout}, in {default_download_root(spec)} (its default folder) or in a folder "
            f"you pass with --dataset-root DIR or name in {spec.env_var}.")


# --------------------------------------------------------------------------- command line


def make_parser() -> argparse.ArgumentParser:
    names = [s.name for s in registered_datasets()]
    fetchable = [s.name for s in registered_datasets() if s.downloads]
    p = argparse.ArgumentParser(prog="mamlpp-data", description="Get the datasets of mamlpp_ext, or see where they "
                                "are looked for. Nothing else in mamlpp_ext downloads anything.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help=f"download a dataset's public files ({', '.join(fetchable)})",
                       description="Download a dataset's public files with checksum checks, into the folder the "
                                   "other commands read. " + "; ".join(
                                       f"{s.name}: {', '.join(f.name for f in s.downloads)}"
                                       for s in registered_datasets() if s.downloads) + ".")
    others = ", ".join(n for n in names if n not in fetchable)
    d.add_argument("dataset", help=f"one of {', '.join(fetchable)} (the others, {others}, cannot be downloaded: see "
                                   "`mamlpp-data where`)")
    d.add_argument("--root", help="folder to write (default: the dataset's environment variable, else its default "
                                  f"folder under {registered_datasets()[0].default_root().parent})")
    d.add_argument("--no-one-shot", action="store_true", help="omniglot: skip all_runs.zip (the one-shot benchmark)")
    d.add_argument("--force", action="store_true", help="download files even when present with the right checksum")
    d.add_argument("--base-url", help="where the files are: a mirror with the same paths (default: the official "
                                      "address, e.g. " + OMNIGLOT_BASE_URL + " for omniglot)")
    d.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default 60)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_parser("where", help="print where the datasets and the cache are looked for",
                   description="Print the folder each dataset is read from, whether it exists, the layout "
                               "expected there, and the preprocessing cache folder.")
    return p


def _where() -> int:
    for spec in registered_datasets():
        env = next((v for v in spec.env_vars if os.environ.get(v)), None)
        if env:
            path, how = Path(os.environ[env]).expanduser(), f"${env}"
        else:
            path, how = spec.default_root(), f"default; ${spec.env_var} is not set"
        state = "exists" if path.is_dir() else "does not exist"
        get = f"mamlpp-data download {spec.name}" if spec.downloads else "no public download (see docs/data.md)"
        print(f"{spec.title}: {path} ({how}; {state})\n    name: {spec.name}; expects: {spec.layout}\n"
              f"    get it: {get}")
    print(f"cache: {resolve_cache_dir()} ($MAMLPP_CACHE_DIR, else the user's cache folder)")
    print("A command's --dataset-root DIR overrides the dataset folder.")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command == "where":
        return _where()
    name = args.dataset.lower().replace("_", "-")
    name = {"miniimagenet": "mini-imagenet", "tieredimagenet": "tiered-imagenet", "cifarfs": "cifar-fs",
            "cub-200-2011": "cub"}.get(name, name)
    try:
        spec = get_dataset(name)
    except DataError:
        fetchable = [s.name for s in registered_datasets() if s.downloads]
        parser.error(f"unknown dataset {args.dataset!r}; the datasets that can be downloaded are "
                     f"{', '.join(fetchable)}")
    if not spec.downloads:
        parser.error(no_download_message(spec))
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0, got {args.timeout}")
    root = Path(args.root).expanduser() if args.root else default_download_root(spec)
    print(f"mamlpp-data: downloading {spec.title} into {root}", file=sys.stderr, flush=True)
    try:
        download_dataset(spec, root, optional=not args.no_one_shot, force=args.force, base_url=args.base_url,
                         timeout=args.timeout, progress=not args.no_progress)
    except DownloadError as exc:
        print(f"mamlpp-data: error: {exc}", file=sys.stderr, flush=True)
        return 1
    found_by_default = root.resolve() == default_download_root(spec).resolve()
    hint = "" if found_by_default else (f" Pass --dataset-root {root} to the commands, or set {spec.env_var}={root}.")
    preset = f"{spec.name}-5way-1shot"
    print(f"mamlpp-data: {spec.title} is ready in {root}.{hint} Next: mamlpp-train --preset {preset}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
