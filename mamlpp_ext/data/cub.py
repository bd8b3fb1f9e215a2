"""CUB-200-2011 (Wah et al., Caltech-UCSD Birds): 200 bird species, 11,788 images.

The root holds the official archive or its extracted folder:

    ROOT/CUB_200_2011.tgz                         read as it is (two passes, nothing extracted)
    ROOT/CUB_200_2011/images/<class>/<image>.jpg  the extracted folder (ROOT may also be
                                                  CUB_200_2011/ itself)

The class split is the one most few-shot papers use, from Chen et al., "A Closer Look at Few-shot
Classification" (ICLR 2019): the 200 class folders sorted by name, the i-th (from 0) goes to
train when i % 2 == 0 (100 classes), to val when i % 4 == 1 (50) and to test when i % 4 == 3
(50). Images are converted to RGB (a few are grey) and resized to 84×84.
"""

from __future__ import annotations

import tarfile
import zlib
from pathlib import Path
from typing import Optional

from .dataset import FileSource, Listing, RemoteFile, Source, split_by_index_rule
from .errors import DataError, DatasetNotFoundError
from .folders import open_folder
from .images import Decoder, check_payloads

__all__ = ["ARCHIVE", "CubArchiveSource", "FILES", "open_source", "split_ids"]

ARCHIVE = "CUB_200_2011.tgz"
FOLDER = "CUB_200_2011"
EXPECTED_CLASSES, EXPECTED_IMAGES = 200, 11788
BASE_URL = "https://data.caltech.edu/records/65de6-vp158/files"
FILES = (RemoteFile(ARCHIVE, f"{ARCHIVE}?download=1", "97eceeb196236b17998738112f37df78",
                    what="CUB-200-2011: 11,788 images of 200 bird species"),)
LAYOUT = f"{ARCHIVE} (the official archive) or its extracted folder {FOLDER}/images/<class>/<image>.jpg"
HOW_TO_GET = (f"To get it: run `mamlpp-data download cub`, or download {ARCHIVE} from "
              f"https://www.vision.caltech.edu/datasets/cub_200_2011/ yourself.")
FIX = "download the archive again (`mamlpp-data download cub --force`) or replace the files named"


def _image_key(name: str) -> Optional[tuple[str, str]]:
    """(class, file) of an archive member ".../images/<class>/<file>.jpg", else None."""
    bits = name.split("/")
    if len(bits) >= 3 and bits[-3] == "images" and bits[-1].lower().endswith(".jpg") and not bits[-1].startswith("."):
        return bits[-2], bits[-1]
    return None


class CubArchiveSource(Source):
    """The official ``CUB_200_2011.tgz``, read in two streaming passes: the first lists the
    images and checks each one quickly (NOTE [Bad files]), the second decodes them."""

    cache_name = "cub"
    fix = FIX

    def __init__(self, archive: Path, check_counts: bool):
        self.path = Path(archive)
        self.check_counts = check_counts
        st = self.path.stat()
        self.fingerprint = {"archive": [self.path.name, st.st_size, st.st_mtime_ns]}
        self._listing: Optional[Listing] = None
        self._index: dict = {}
        self._bad: list = []

    def _members(self):
        """(member name, bytes) of every image member, in archive order."""
        try:
            with tarfile.open(self.path, "r:*") as tf:
                for m in tf:
                    if m.isfile() and _image_key(m.name) is not None:
                        f = tf.extractfile(m)
                        yield m.name, f.read()
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise DataError(f"{self.path} is damaged or truncated ({exc}); {FIX}") from None

    def listing(self) -> Listing:
        if self._listing is not None:
            return self._listing
        found = []
        bad = []
        for name, data in self._members():
            found.append((*_image_key(name), name))
            problem = check_payloads([(0, data)], num_workers=0, progress=False)
            if problem:
                bad.append(f"{self.path}!{name}: {problem[0][1]}")
        if not found:
            raise DatasetNotFoundError(f"{self.path} holds no images/<class>/<image>.jpg: expected {LAYOUT}. "
                                       f"{HOW_TO_GET}")
        found.sort()
        classes, counts, files = [], [], []
        for c, f, name in found:
            if classes and classes[-1] == c:
                counts[-1] += 1
            else:
                classes.append(c)
                counts.append(1)
            self._index[name] = len(files)
            files.append(f"{c}/{f}")
        self._bad = bad
        self._listing = Listing(classes, [""] * len(classes), counts, files, {"source": str(self.path)})
        if self.check_counts:
            self.verify_counts(self._listing)
        return self._listing

    def verify_counts(self, listing: Listing) -> None:
        _verify(listing, self.path)

    def check(self, num_workers, progress) -> list:
        self.listing()
        return list(self._bad)

    def decode(self, decoder: Decoder) -> None:
        self.listing()
        for name, data in self._members():
            decoder.add(self._index[name], data)

    def file_name(self, index: int) -> str:
        files = self.listing().files
        return f"{self.path}!{FOLDER}/images/{files[index]}" if 0 <= index < len(files) else f"image {index}"


def _verify(listing: Listing, where: Path) -> None:
    if (len(listing.classes), listing.num_images) != (EXPECTED_CLASSES, EXPECTED_IMAGES):
        raise DatasetNotFoundError(
            f"CUB-200-2011 in {where} is incomplete: {len(listing.classes)} classes and {listing.num_images} images, "
            f"expected {EXPECTED_CLASSES} and {EXPECTED_IMAGES} (pass check_counts=False / --allow-partial-data to "
            f"accept a partial copy)")


def open_source(root: Path, check_counts: bool = True) -> Source:
    """CUB-200-2011 under ``root`` (resolved): the extracted ``images/`` folder when present,
    else the archive."""
    root = Path(root)
    for images in (root / FOLDER / "images", root / "images"):
        if images.is_dir():
            src: FileSource = open_folder(images, title="CUB-200-2011", cache_name="cub", layout=LAYOUT,
                                          exts=(".jpg", ".jpeg"), split_layout=False, fix=FIX)
            if check_counts:
                _verify(src.listing(), images)
            return src
    if (root / ARCHIVE).is_file():
        return CubArchiveSource(root / ARCHIVE, check_counts)
    raise DatasetNotFoundError(f"CUB-200-2011 not found in {root}: expected {LAYOUT}. {HOW_TO_GET}")


def split_ids(listing: Listing, scheme: Optional[str] = None, seed: int = 0, **kw) -> dict:
    """Chen et al.'s split of the class names in sorted order: i % 2 == 0 train, i % 4 == 1 val,
    i % 4 == 3 test."""
    return split_by_index_rule(listing, lambda i: "train" if i % 2 == 0 else "val" if i % 4 == 1 else "test")
