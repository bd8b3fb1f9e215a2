"""A toy dataset in a format mamlpp_ext does not read -- one NumPy ``toy.npz`` holding
``images`` (N, H, W) uint8, ``labels`` (N,) and ``names`` -- added the way docs/data.md says: this
one module (a :class:`~mamlpp_ext.data.Source` and a split rule) plus one registry entry
(``SPEC``, registered by the test). Nothing else in the package changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mamlpp_ext.data import DatasetNotFoundError, DatasetSpec, Listing, Source, seeded_split


class ToySource(Source):
    cache_name = "toy"
    fix = "write toy.npz again"

    def __init__(self, root: Path, check_counts: bool = True):
        self.path = Path(root) / "toy.npz"
        if not self.path.is_file():
            raise DatasetNotFoundError(f"no toy.npz in {root}")
        st = self.path.stat()
        self.fingerprint = [st.st_size, st.st_mtime_ns]

    def _arrays(self):
        with np.load(self.path) as z:
            return z["images"], z["labels"], [str(n) for n in z["names"]]

    def listing(self) -> Listing:
        _, labels, names = self._arrays()
        counts = np.bincount(labels, minlength=len(names))
        return Listing(names, [""] * len(names), counts.tolist())

    def decode(self, decoder) -> None:
        images, labels, _ = self._arrays()
        order = np.argsort(labels, kind="stable")
        for pos, i in enumerate(order):
            decoder.add(pos, images[i])  # decoded pixels: converted and resized like any image

    def file_name(self, index: int) -> str:
        return f"{self.path}[{index}]"


def split_ids(listing: Listing, scheme=None, seed: int = 0, **kw) -> dict:
    return seeded_split(listing, seed, fractions=(0.5, 0.25, 0.25))


SPEC = DatasetSpec(name="toy", title="Toy", open=ToySource, split_ids=split_ids, image_size=(16, 16), channels=(1,),
                   layout="toy.npz", get="Write it with tests/_toy_dataset.py's make_toy.")


def make_toy(root: Path, classes: int = 12, per_class: int = 5, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    rng.shuffle(labels)
    images = rng.integers(0, 256, (len(labels), 20, 24), dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "toy.npz", images=images, labels=labels, names=np.array([f"toy{c:02d}" for c in range(classes)]))
    return root
