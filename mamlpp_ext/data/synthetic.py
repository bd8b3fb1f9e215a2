"""Small generated datasets with the real layouts, for tests and smoke runs without the data.

Images are random, so nothing can be learned from them; the point is the file layout, the
image formats and the counts.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np


def _binary_png(rng: np.random.Generator, size: int = 105) -> bytes:
    """A 1-bit PNG like Omniglot's: white background with a few black random strokes."""
    from PIL import Image, ImageDraw

    im = Image.new("1", (size, size), 1)
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        pts = [tuple(int(v) for v in rng.integers(5, size - 5, 2)) for _ in range(4)]
        draw.line(pts, fill=0, width=int(rng.integers(2, 6)))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def make_fake_omniglot(root: str | os.PathLike, *, alphabets=(3, 2), characters: int = 4, drawings: int = 5,
                       layout: str = "zip", seed: int = 0) -> Path:
    """Write a small Omniglot-shaped tree under ``root`` and return ``root``.

    ``alphabets`` = (background, evaluation) alphabet counts, each with ``characters``
    characters of ``drawings`` 105×105 1-bit PNGs named like the real ones. ``layout``:
    "zip" (images_background.zip, images_evaluation.zip), "folder" (extracted folders) or
    "torchvision" (extracted folders under omniglot-py/).
    """
    if layout not in ("zip", "folder", "torchvision"):
        raise ValueError(f"layout must be 'zip', 'folder' or 'torchvision', got {layout!r}")
    root = Path(root)
    base = root / "omniglot-py" if layout == "torchvision" else root
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    char_id = 0
    for part, n_alpha in zip(("images_background", "images_evaluation"), alphabets):
        files = {}
        for a in range(n_alpha):
            alpha = f"{'Bg' if part.endswith('background') else 'Ev'}_Alphabet_{a:02d}"
            for c in range(characters):
                char_id += 1
                for d in range(drawings):
                    files[f"{part}/{alpha}/character{c + 1:02d}/{char_id:04d}_{d + 1:02d}.png"] = _binary_png(rng)
        if layout == "zip":
            with zipfile.ZipFile(base / f"{part}.zip", "w") as zf:
                for name, data in files.items():
                    zf.writestr(name, data)
        else:
            for name, data in files.items():
                p = base / name
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
    return root


def make_fake_mini_imagenet(root: str | os.PathLike, *, classes=(4, 2, 3), images: int = 6, seed: int = 0) -> Path:
    """Write ``root/{train,val,test}/<class>/<image>`` with ``classes`` classes per split and
    ``images`` random RGB images per class, of assorted sizes, as JPEG and PNG; returns ``root``."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val", "test"), classes):
        for c in range(n):
            d = root / split / f"n{split[:2]}{c:06d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(images):
                h, w = (int(v) for v in rng.integers(60, 140, 2))
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                ext = "png" if i % 3 == 0 else "jpg"
                Image.fromarray(arr).save(d / f"img{i:04d}.{ext}")
    return root
