"""Omniglot: finding the data, its listing and its class splits.

Accepted layouts of the root folder (each of the two parts may be found either way):

    <root>/images_background.zip, <root>/images_evaluation.zip      the official archives
    <root>/images_background/, <root>/images_evaluation/            their extracted folders
    <root>/omniglot-py/...                                          torchvision's layout (either of the above)

inside which images sit at ``<alphabet>/<characterNN>/<id>_<drawing>.png``. The root is
``root`` argument > ``$MAMLPP_OMNIGLOT_ROOT`` > the user's data folder
(``$XDG_DATA_HOME/mamlpp_ext/omniglot``, i.e. ``~/.local/share/mamlpp_ext/omniglot`` by default).
Nothing is downloaded here; ``mamlpp-data download omniglot`` fetches the official archives
when asked (``FILES``).

Preprocessing (SPEC §5, done by the loader, ``loader.load_omniglot``): each 105×105 1-bit PNG is
converted to 8-bit grey and resized to 28×28 with Lanczos, stored as uint8 and scaled to [0, 1]
on use. The polarity is the files' own: background 1.0, strokes near 0.0 (as in the public MAML++
code); ``invert=True`` gives strokes 1.0. Classes are ordered by ``"<alphabet>/<character>"``
(sorted), images of a class by file name.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cache import file_listing
from .dataset import FileSource, ImageDataset, Listing, RemoteFile, resolve_root
from .episodes import ClassPool
from .errors import DatasetNotFoundError
from .images import ImageRef
from .paths import user_data_dir

PARTS = ("images_background", "images_evaluation")
EXPECTED = {  # part: (alphabets, characters, drawings per character)
    "images_background": (30, 964, 20),
    "images_evaluation": (20, 659, 20),
}
TITLE = "Omniglot"
ENV_ROOT = "MAMLPP_OMNIGLOT_ROOT"
SPLITS = ("maml", "lake")

# The public MAML++ split fractions (train, train+val) of the 1,623 shuffled classes.
_MAML_FRACTIONS = (0.70918052988, 0.70918052988 + 0.03080714725)

LAYOUT = ("images_background.zip and images_evaluation.zip (or their extracted folders, possibly under "
          "omniglot-py/)")
HOW_TO_GET = (
    "To get it: run `mamlpp-data download omniglot` (the official archives, into the default folder; "
    "`--root DIR` for another), or fetch python/images_background.zip and python/images_evaluation.zip "
    "from https://github.com/brendenlake/omniglot yourself, or let torchvision download it "
    "(`torchvision.datasets.Omniglot(DIR, background=True, download=True)`, then background=False; "
    "DIR/omniglot-py/ is read as it is). Then pass the folder with --dataset-root DIR (Python: root=DIR) "
    f"or set {ENV_ROOT}=DIR."
)
FIX = ("the Omniglot archives or folders are damaged: download them again (`mamlpp-data download omniglot "
       "--force`) or replace the files named")

BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
# The MD5s of the two image archives are the ones torchvision checks for the same URLs; the
# one-shot archive's MD5 and size were computed from a byte-for-byte copy of the file.
FILES = (
    RemoteFile("images_background.zip", "images_background.zip", "68d2efa1b9178cc56df9314c21c6e718",
               what="30 background alphabets, 964 characters"),
    RemoteFile("images_evaluation.zip", "images_evaluation.zip", "6b91aef0f799c5bb55b94e3f2daec811",
               what="20 evaluation alphabets, 659 characters"),
    RemoteFile("all_runs.zip", "one-shot-classification/all_runs.zip", "e8996daecdf12afeeb4a53a179f06b19",
               size=352787, what="the original 20-way one-shot benchmark", optional=True),
)


def default_omniglot_root() -> Path:
    """The default Omniglot folder: ``<user data folder>/omniglot`` (see ``user_data_dir``; it
    may not exist)."""
    return user_data_dir() / "omniglot"


def resolve_omniglot_root(root: str | os.PathLike | None = None) -> Path:
    """The Omniglot root: ``root`` > ``$MAMLPP_OMNIGLOT_ROOT`` > ``default_omniglot_root()``.

    Raises :class:`DatasetNotFoundError` (naming the environment variable, the ``--dataset-root``
    option and the download command) when no root is given and the default folder is absent, or
    when the chosen folder does not exist.
    """
    return resolve_root(TITLE, (ENV_ROOT,), default_omniglot_root(), LAYOUT, HOW_TO_GET, root)


# --------------------------------------------------------------------------- discovery


@dataclass
class _Part:
    """One of the two halves, as found on disk, with its PNGs as (alphabet, character, file, ref)."""

    name: str
    kind: str  # "zip" or "folder"
    path: Path
    entries: list = field(default_factory=list)
    zip_members: list | None = None  # (name, CRC-32, size) of a zip's files, read once

    def listing(self) -> list:
        if self.kind == "zip":
            return self.zip_members
        return file_listing((self.path / a / c / f for a, c, f, _ in self.entries), self.path)


def _find_part(root: Path, part: str) -> _Part | None:
    for base in (root, root / "omniglot-py"):
        folder = base / part
        if folder.is_dir():
            # tolerate one extra level, e.g. images_background/images_background/...
            inner = folder / part
            return _scan_folder(part, inner if inner.is_dir() else folder)
        archive = base / f"{part}.zip"
        if archive.is_file():
            return _scan_zip(part, archive)
    return None


def _scan_folder(part: str, folder: Path) -> _Part:
    p = _Part(part, "folder", folder)
    for alpha in sorted(d for d in os.listdir(folder) if (folder / d).is_dir()):
        for char in sorted(d for d in os.listdir(folder / alpha) if (folder / alpha / d).is_dir()):
            for f in sorted(os.listdir(folder / alpha / char)):
                if f.lower().endswith(".png"):
                    p.entries.append((alpha, char, f, ImageRef(str(folder / alpha / char / f))))
    return p


def _scan_zip(part: str, archive: Path) -> _Part:
    p = _Part(part, "zip", archive)
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetNotFoundError(f"cannot read the Omniglot archive {archive} ({exc}): it is damaged or truncated; "
                                   f"download it again. {HOW_TO_GET}") from None
    p.zip_members = sorted((i.filename, i.CRC, i.file_size) for i in infos if not i.is_dir())
    for name, _, _ in p.zip_members:
        bits = name.split("/")
        if not name.lower().endswith(".png") or len(bits) < 3:
            continue
        p.entries.append((bits[-3], bits[-2], bits[-1], ImageRef(str(archive), name)))
    return p


def _discover(root: Path, check_counts: bool) -> list[_Part]:
    parts, missing = [], []
    for name in PARTS:
        part = _find_part(root, name)
        if part is None or not part.entries:
            missing.append(name if part is None else f"{name} (found {part.path}, but it holds no "
                                                      "<alphabet>/<character>/*.png)")
        else:
            parts.append(part)
    if missing:
        raise DatasetNotFoundError(
            f"Omniglot root {root} is incomplete: missing {', '.join(missing)}. Expected "
            f"images_background.zip and images_evaluation.zip (or their extracted folders, possibly "
            f"under omniglot-py/). {HOW_TO_GET}")
    if check_counts:
        for part in parts:
            alphas = {a for a, _, _, _ in part.entries}
            chars: dict = {}
            for a, c, _, _ in part.entries:
                chars[(a, c)] = chars.get((a, c), 0) + 1
            exp_a, exp_c, exp_d = EXPECTED[part.name]
            bad = [k for k, v in chars.items() if v != exp_d]
            if len(alphas) != exp_a or len(chars) != exp_c or bad:
                detail = f"first character with a wrong count: {'/'.join(bad[0])} ({chars[bad[0]]})" if bad else ""
                raise DatasetNotFoundError(
                    f"Omniglot {part.name} at {part.path} is incomplete: expected {exp_a} alphabets, {exp_c} "
                    f"characters and {exp_d} drawings each, found {len(alphas)} alphabets and {len(chars)} "
                    f"characters. {detail} (pass check_counts=False to accept a partial copy.) {HOW_TO_GET}")
    return parts


def open_source(root: Path, check_counts: bool = True) -> FileSource:
    """Omniglot under ``root`` (resolved), as a :class:`FileSource`: classes are
    ``"<alphabet>/<character>"`` sorted, grouped by part ("background", "evaluation"), images by
    file name. ``check_counts`` requires the complete dataset."""
    parts = _discover(Path(root), check_counts)
    items = []  # (class name, part, file, ref)
    for part in parts:
        short = part.name.split("_")[1]
        for a, c, f, ref in part.entries:
            items.append((f"{a}/{c}", short, f, ref))
    items.sort(key=lambda it: (it[0], it[2]))
    names, groups, counts = [], [], []
    for name, short, _, _ in items:
        if names and names[-1] == name:
            counts[-1] += 1
        else:
            names.append(name)
            groups.append(short)
            counts.append(1)
    listing = Listing(names, groups, counts, [f"{n}/{f}" for n, _, f, _ in items],
                      {"sources": [str(p.path) for p in parts]})
    fingerprint = {"parts": [(p.name, p.kind, p.listing()) for p in parts]}
    return FileSource(listing, [it[3] for it in items], fingerprint, "omniglot", FIX)


def split_ids(listing: Listing, scheme: str | None = None, seed: int = 0, lake_val_alphabets: int = 5) -> dict:
    """Class indices of train/val/test for ``scheme`` ("maml", the default, or "lake"); see
    :meth:`OmniglotData.split`."""
    split = scheme or "maml"
    names = listing.classes
    n = len(names)
    if split == "maml":
        # The public MAML++ recipe: RandomState(RandomState(val_seed).randint(1, 999999)) shuffles
        # the int32 range over the sorted class names; cut at int(0.70918052988 n) and
        # int(0.73998767713 n): 1150 / 50 / 423 for the 1,623 classes.
        rng = np.random.RandomState(np.random.RandomState(seed).randint(1, 999999))
        order = np.arange(n, dtype=np.int32)
        rng.shuffle(order)
        a, b = int(_MAML_FRACTIONS[0] * n), int(_MAML_FRACTIONS[1] * n)
        return {"train": order[:a].astype(np.int64), "val": order[a:b].astype(np.int64),
                "test": order[b:].astype(np.int64)}
    if split == "lake":
        alphabets = [c.split("/")[0] for c in names]
        parts = listing.groups
        bg = sorted({a for a, p in zip(alphabets, parts) if p == "background"})
        if not 0 < lake_val_alphabets < len(bg):
            raise ValueError(f"lake_val_alphabets must be in [1, {len(bg) - 1}], got {lake_val_alphabets}")
        perm = np.random.RandomState(seed).permutation(len(bg))
        val_alphas = {bg[i] for i in perm[:lake_val_alphabets]}
        ids = np.arange(n, dtype=np.int64)
        is_bg = np.array([p == "background" for p in parts])
        is_val = np.array([a in val_alphas for a in alphabets]) & is_bg
        return {"train": ids[is_bg & ~is_val], "val": ids[is_val], "test": ids[~is_bg]}
    raise ValueError(f"split must be 'maml' or 'lake', got {split!r}")


# --------------------------------------------------------------------------- the dataset


class OmniglotData(ImageDataset):
    """All Omniglot characters, preprocessed: ``images`` uint8 (M, 1, size, size).

    Attributes (besides :class:`ImageDataset`'s):
        class_names: "<alphabet>/<character>" per class, sorted. alphabets, parts: per class
            (part is "background" or "evaluation").
        files: per image, its path inside the part ("<alphabet>/<character>/<file>").
        invert: default polarity of pools.
    """

    def __init__(self, *args, invert: bool = False, **kw):
        super().__init__(*args, **kw)
        self.alphabets: list[str] = [n.split("/")[0] for n in self.class_names]
        self.parts: list[str] = list(self.class_groups)
        self.invert = bool(invert)

    def __repr__(self) -> str:
        return (f"OmniglotData(root={str(self.root)!r}, classes={self.num_classes}, images={len(self.files)}, "
                f"cache={str(self.cache_path)!r})")

    def pool(self, class_ids, name: str = "pool", normalize: bool = True, invert: bool | None = None) -> ClassPool:
        """A :class:`ClassPool` over the given class indices (in that order)."""
        return super().pool(class_ids, name=name, normalize=normalize, invert=self.invert if invert is None else invert)

    def split_ids(self, split: str = "maml", seed: int = 0, lake_val_alphabets: int = 5) -> dict[str, np.ndarray]:
        """Class indices of train/val/test for ``split``; see :meth:`split`."""
        return split_ids(self.listing, split, seed=seed, lake_val_alphabets=lake_val_alphabets)

    def split(self, split: str = "maml", seed: int = 0, lake_val_alphabets: int = 5,
              invert: bool | None = None) -> dict[str, ClassPool]:
        """The train/val/test class pools.

        ``"maml"`` (default): all 1,623 characters in sorted "<alphabet>/<character>" order,
        shuffled as the public MAML++ code does (legacy ``np.random.RandomState`` seeded with
        ``RandomState(seed).randint(1, 999999)``, seed = its ``val_seed``, 0), then cut into
        1150 / 50 / 423 classes (train / val / test). Characters of one alphabet can land in
        different splits.

        ``"lake"``: train and val from the 30 background alphabets, test on the 659 characters
        of the 20 evaluation alphabets. Val holds out ``lake_val_alphabets`` whole background
        alphabets (default 5), the first ones of ``RandomState(seed).permutation`` over the
        sorted background alphabet names; train keeps the other 25.
        """
        ids = self.split_ids(split, seed=seed, lake_val_alphabets=lake_val_alphabets)
        return {k: self.pool(v, name=k, invert=invert) for k, v in ids.items()}

    def pools(self, scheme: str | None = None, seed: int = 0, normalize: bool = True, invert: bool | None = None,
              lake_val_alphabets: int = 5) -> dict[str, ClassPool]:
        """The train/val/test pools of ``scheme`` (default "maml"): :meth:`split`."""
        return self.split(scheme or "maml", seed=seed, lake_val_alphabets=lake_val_alphabets, invert=invert)
