"""Lake et al.'s original one-shot benchmark: ``all_runs.zip`` (20 runs of 20-way 1-shot).

Each run ``runNN/`` holds ``training/class01.png … class20.png`` (one drawing of each of 20
characters, from the evaluation alphabets), ``test/item01.png … item20.png`` (another drawing
of each), and ``class_labels.txt`` whose lines read ``runNN/test/itemXX.png
runNN/training/classYY.png``: the answer for each test item. The layout is read from the
archive (or its extracted ``all_runs/`` folder), not assumed.

The images get the same preprocessing as :func:`~mamlpp_ext.data.load_omniglot` (8-bit grey,
28×28 Lanczos, [0, 1]) and the same polarity: these PNGs, like the other Omniglot PNGs, have a
white background, so background is 1.0 and strokes near 0.0 unless ``invert=True``. (The
benchmark's own demo code inverts them when it reads them; we do not, so that a model trained
on :func:`load_omniglot` data sees the same polarity here.) Since the runs' characters come
from the evaluation alphabets, score models trained on the ``lake`` split.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from .errors import CorruptImageError, DatasetNotFoundError
from .images import decode_image, resample_filter
from .episodes import Episode
from .omniglot import resolve_omniglot_root


class OneShotRun(NamedTuple):
    """One 20-way 1-shot run.

    support_x: (20, 1, H, W) float32, the training images in class order; support_y: (20,) int64 = 0…19
    query_x: (20, 1, H, W) float32, the test items in file order; query_y: (20,) int64, their classes
    name: "run01"…; support_files, query_files: the images' paths inside the benchmark.
    """

    name: str
    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    support_files: tuple
    query_files: tuple

    def as_episode(self) -> Episode:
        """The run as a meta-batch of one task: support_x (1, 20, 1, H, W), etc."""
        return Episode(self.support_x[None], self.support_y[None], self.query_x[None], self.query_y[None])


def _find_runs(root: Path):
    """``(read, where, runs, show)``: ``read(relpath) -> bytes`` for a path like
    "run01/test/item01.png", the archive or folder found, the run names ("run01", …), and
    ``show(relpath)``, the full name of a file for error messages."""
    cands = [root] if root.suffix == ".zip" or root.name == "all_runs" else [
        root / "all_runs.zip", root / "all_runs", root / "omniglot-py" / "all_runs.zip",
        root / "omniglot-py" / "all_runs"]
    for c in cands:
        if c.is_file() and c.suffix == ".zip":
            try:
                zf = zipfile.ZipFile(c)
            except (zipfile.BadZipFile, OSError) as exc:
                raise DatasetNotFoundError(f"cannot read the one-shot benchmark archive {c}: {exc}") from exc
            names = set(zf.namelist())
            labels = sorted(n for n in names if n.endswith("/class_labels.txt"))
            prefix = labels[0].rsplit("/", 2)[0] + "/" if labels and labels[0].count("/") >= 2 else ""

            def read(rel: str, zf=zf, prefix=prefix, c=c):
                try:
                    return zf.read(prefix + rel)
                except KeyError:
                    raise DatasetNotFoundError(f"{c} has no member {prefix + rel}") from None

            return read, c, sorted(n[len(prefix):].split("/")[0] for n in labels), \
                lambda rel, c=c, prefix=prefix: f"{c}!{prefix}{rel}"
        if c.is_dir():
            runs = sorted(d for d in os.listdir(c) if (c / d / "class_labels.txt").is_file())

            def read(rel: str, c=c):
                try:
                    return (c / rel).read_bytes()
                except OSError as exc:
                    raise DatasetNotFoundError(f"cannot read {c / rel}: {exc}") from exc

            return read, c, runs, lambda rel, c=c: str(c / rel)
    raise DatasetNotFoundError(
        f"the one-shot benchmark was not found under {root}: expected all_runs.zip or an extracted all_runs/ "
        "folder (runNN/class_labels.txt, runNN/training/classNN.png, runNN/test/itemNN.png). It is "
        "python/one-shot-classification/all_runs.zip of https://github.com/brendenlake/omniglot; "
        "`mamlpp-data download omniglot` fetches it with the other Omniglot archives.")


def load_one_shot_runs(root: str | os.PathLike | None = None, *, size: int = 28, resample: str = "lanczos",
                       binary_resize: bool = False, invert: bool = False) -> list[OneShotRun]:
    """The 20 runs of the benchmark, preprocessed like :func:`load_omniglot` (see the module docstring).

    ``root`` is the Omniglot root (resolved the same way: argument > ``$MAMLPP_OMNIGLOT_ROOT`` >
    the default folder) holding ``all_runs.zip`` or ``all_runs/``, or the path of either itself.
    """
    resample_filter(resample)  # reject an unknown filter name before any work
    if root is not None and str(root).endswith(".zip"):
        root_path = Path(root).expanduser()
    else:
        root_path = resolve_omniglot_root(root)
    read, where, runs, show = _find_runs(root_path)
    if not runs:
        raise DatasetNotFoundError(f"{where} holds no runNN/class_labels.txt")

    def image(rel: str) -> np.ndarray:
        try:
            return decode_image(read(rel), "L", size, resample, binary_resize)
        except DatasetNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CorruptImageError(f"cannot read image {show(rel)}: {type(exc).__name__}: {exc}") from exc

    out = []
    for run in runs:
        answers = {}
        for line in read(f"{run}/class_labels.txt").decode().splitlines():
            if line.strip():
                test_file, train_file = line.split()
                answers[test_file] = train_file
        train_files = sorted(set(answers.values()))
        test_files = sorted(answers)
        cls = {f: i for i, f in enumerate(train_files)}
        sx = np.stack([image(f) for f in train_files])
        qx = np.stack([image(f) for f in test_files])

        def to_float(a):
            t = torch.from_numpy(a).to(torch.float32).div_(255.0)
            return 1.0 - t if invert else t

        out.append(OneShotRun(run, to_float(sx), torch.arange(len(train_files), dtype=torch.int64), to_float(qx),
                              torch.tensor([cls[answers[f]] for f in test_files], dtype=torch.int64),
                              tuple(train_files), tuple(test_files)))
    return out


def evaluate_one_shot(predict: Callable, runs: list[OneShotRun] | None = None, **load_kw) -> dict:
    """Score ``predict(support_x, support_y, query_x) -> labels`` on every run.

    ``predict`` gets support_x (20, 1, H, W), support_y (20,) and query_x (20, 1, H, W) and
    returns the 20 predicted labels (a tensor, array or list), or (20, 20) scores whose argmax
    is taken. ``runs`` default to :func:`load_one_shot_runs` (``load_kw`` are passed on).

    Returns ``{"runs": [{"run", "correct", "total", "accuracy", "error"}, ...], "accuracy",
    "error", "accuracy_std"}``: overall accuracy is the mean over runs (all runs have 20 items),
    error = 1 − accuracy, as in Lake et al.'s tables (in fractions, not percent).
    """
    runs = runs if runs is not None else load_one_shot_runs(**load_kw)
    per_run = []
    for r in runs:
        pred = _as_labels(predict(r.support_x, r.support_y, r.query_x))
        if pred.shape != r.query_y.shape:
            raise ValueError(f"predict returned labels of shape {tuple(pred.shape)} for run {r.name}, "
                             f"expected {tuple(r.query_y.shape)}")
        correct = int((pred.cpu() == r.query_y).sum())
        acc = correct / len(r.query_y)
        per_run.append({"run": r.name, "correct": correct, "total": len(r.query_y), "accuracy": acc, "error": 1 - acc})
    accs = np.array([p["accuracy"] for p in per_run])
    return {"runs": per_run, "accuracy": float(accs.mean()), "error": float(1 - accs.mean()),
            "accuracy_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0}


def _as_labels(pred) -> torch.Tensor:
    t = pred.detach() if torch.is_tensor(pred) else torch.as_tensor(np.asarray(pred))
    if t.ndim == 2:
        t = t.argmax(-1)
    return t.to(torch.int64)
