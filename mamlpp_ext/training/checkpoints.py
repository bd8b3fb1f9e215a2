"""Training checkpoints: atomic files, the checkpoint format, and every RNG's state.

NOTE [Checkpoint format]
    A checkpoint is a dict saved with ``torch.save`` that ``torch.load(weights_only=True)``
    can read (tensors, numbers, strings, lists and dicts only): ``format``, ``learner``
    (``MAMLPlusPlus.state_dict()``), ``config`` (``MAMLConfig.to_dict()``), ``data``
    (``DataOptions`` as a dict), ``backend``, ``epoch`` (the next epoch to run),
    ``iteration`` (meta-steps done; the data stream resumes there), ``epoch_sums`` (the
    running train-loss/accuracy sums of the unfinished epoch), ``log_window`` (the sums of the
    next "train" log record; absent in older checkpoints), ``rng``, ``best`` (the
    retained top-k checkpoints), ``val`` (the validation result of the epoch it closes, or
    None for a mid-epoch checkpoint) and ``interrupted``; ``network`` (the structure record of a
    user's network, ``training/network_record.py``; absent for the package's own networks and
    in older checkpoints) and ``epochs_from`` (1: the epochs in ``best`` count from 1, as every
    file a user reads does; absent in older checkpoints, whose ``best`` counts from 0).

NOTE [Write errors]
    Every file of a run folder is written atomically (``atomic_write``): a failed write (a full
    disk, a lost mount) leaves the previous file whole. ``WriteError`` carries a one-line
    message saying which file failed, why, and that the previous one is intact; the commands
    print it and exit with status 2.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..data import atomic_write

__all__ = ["CHECKPOINT_FORMAT", "WriteError", "atomic_copy", "atomic_save", "atomic_write", "atomic_write_text",
           "load_checkpoint", "rng_state", "set_rng_state"]

CHECKPOINT_FORMAT = "mamlpp_ext.train.checkpoint/1"


class WriteError(OSError):
    """A file of a run folder could not be written (NOTE [Write errors]); ``errno`` is the
    original error's."""

    def __init__(self, message: str, errno_: Optional[int] = None) -> None:
        super().__init__(message)
        self.errno = errno_


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the file ``src`` to ``dst`` atomically."""
    with open(src, "rb") as f:
        atomic_write(dst, lambda out: shutil.copyfileobj(f, out))


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see ``mamlpp_ext.data.atomic_write``)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint (NOTE [Checkpoint format]); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (a torn or foreign file)
        raise ValueError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a mamlpp_ext training checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return ckpt


# ---------------------------------------------------------------------------
# Random number generators
# ---------------------------------------------------------------------------

def rng_state() -> dict:
    """Every global RNG state (torch CPU and CUDA, NumPy, Python) in weights_only-loadable types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out = {"torch": torch.get_rng_state(),
           "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)],
           "python": _to_lists(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
