"""Pieces shared by the training and evaluation commands (``train.py``, ``evaluate.py``).

- atomic checkpoint files (``atomic_save``) and loading them back (``load_checkpoint``);
- the episode datasets a run uses, built from the config and the run's data options
  (``DataOptions``, ``build_datasets``);
- scoring one learner or an ensemble on a fixed task list, with a 95% confidence interval
  (``score_tasks``);
- a snapshot of every random number generator (``rng_state`` / ``set_rng_state``).

NOTE [Checkpoint format]
    A checkpoint is a dict saved with ``torch.save`` that ``torch.load(weights_only=True)``
    can read (tensors, numbers, strings, lists and dicts only): ``format``, ``learner``
    (``MAMLPlusPlus.state_dict()``), ``config`` (``MAMLConfig.to_dict()``), ``data``
    (``DataOptions`` as a dict), ``backend``, ``epoch`` (the next epoch to run),
    ``iteration`` (meta-steps done; the data stream resumes there), ``epoch_sums`` (the
    running train-loss/accuracy sums of the unfinished epoch), ``rng``, ``best`` (the
    retained top-k checkpoints), ``val`` (the validation result of the epoch it closes, or
    None for a mid-epoch checkpoint) and ``interrupted``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .config import MAMLConfig
from .data._common import atomic_write  # noqa: F401  (re-exported: C.atomic_write)

CHECKPOINT_FORMAT = "mamlpp_ext.train.checkpoint/1"
SPLITS = ("maml", "lake")


# ---------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------

# One writer for the data cache and the run folder: mamlpp_ext.data._common.atomic_write.


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see ``atomic_write``)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
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


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

@dataclass
class DataOptions:
    """Where a run's episodes come from (everything but the task shape, which is in the config).

    ``root``: dataset folder (None: the data package's default); ``split``: Omniglot class
    split ("maml" or "lake"); ``lake_val_alphabets``: held-out background alphabets of the
    lake split; ``eval_seed``: seed of the fixed validation/test tasks (independent of the
    training seed, so every run sees the same tasks); ``check_counts``: require the complete
    dataset; ``cache_dir``: preprocessing cache; ``num_workers``: DataLoader workers for training.
    """

    root: Optional[str] = None
    split: str = "maml"
    lake_val_alphabets: int = 5
    eval_seed: int = 0
    check_counts: bool = True
    cache_dir: Optional[str] = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        for name in ("lake_val_alphabets", "eval_seed", "num_workers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def load_pools(config: MAMLConfig, data: DataOptions) -> dict:
    """The train/val/test ``ClassPool`` s of ``config.dataset``."""
    from . import data as D

    if config.dataset == "omniglot":
        od = D.load_omniglot(data.root, cache_dir=data.cache_dir, check_counts=data.check_counts,
                             size=config.image_height)
        if config.image_height != config.image_width or config.image_channels != 1:
            raise ValueError(f"Omniglot images are 1×{config.image_height}×{config.image_height}; the config asks for "
                             f"{config.image_shape} (image_channels/image_height/image_width)")
        return od.split(data.split, seed=0, lake_val_alphabets=data.lake_val_alphabets)
    if config.dataset == "mini-imagenet":
        if data.split != "maml":
            raise ValueError("--split applies to Omniglot only; mini-ImageNet uses its folder's train/val/test")
        mi = D.load_mini_imagenet(data.root, cache_dir=data.cache_dir, check_counts=data.check_counts,
                                  size=config.image_height)
        return mi.split()
    raise ValueError(f"MAMLConfig.dataset must be 'omniglot' or 'mini-imagenet', got {config.dataset!r}")


def eval_dataset(pool, config: MAMLConfig, data: DataOptions, num_tasks: int, batch_size: int):
    """The fixed evaluation tasks of ``pool`` (content independent of ``batch_size``)."""
    from .data import EpisodeDataset

    return EpisodeDataset.evaluation(pool, config.ways, config.shots, config.queries, batch_size,
                                     num_tasks=num_tasks, seed=data.eval_seed)


def train_dataset(pool, config: MAMLConfig):
    """The training stream: epochs × iterations meta-batches from ``config.seed`` (rotations on)."""
    from .data import EpisodeDataset

    return EpisodeDataset.training(pool, config.ways, config.shots, config.queries, config.meta_batch,
                                   num_batches=config.total_epochs * config.iterations_per_epoch, seed=config.seed)


# ---------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------

def confidence_interval(task_accuracies: Sequence[float]) -> float:
    """Half-width of the 95% confidence interval of the mean: 1.96·std/√n (std over tasks, ddof=0)."""
    a = np.asarray(task_accuracies, dtype=np.float64)
    if a.size == 0:
        return float("nan")
    return float(1.96 * a.std() / math.sqrt(a.size))


def score_tasks(learners: Sequence, dataset, progress: bool = False, desc: str = "eval") -> dict:
    """Adapt and score every task of ``dataset`` with one learner or an ensemble.

    An ensemble's prediction is the argmax of the members' query logits averaged (SPEC §4).
    Returns ``accuracy`` (mean over tasks), ``ci95`` (1.96·std/√n), ``std``, ``num_tasks``,
    ``loss`` (mean over members and tasks of the query cross-entropy), ``task_accuracies``
    (list) and ``member_accuracies`` (each member's own mean accuracy).
    """
    return summarize_scores(score_batches(learners, dataset, range(len(dataset)), progress, desc))


def score_batches(learners: Sequence, dataset, batches: Sequence[int], progress: bool = False,
                  desc: str = "eval") -> list[dict]:
    """Per-batch raw scores of ``dataset[b]`` for b in ``batches``: dicts with ``batch``,
    ``accuracies`` (ensemble, per task), ``losses`` (per member and task) and ``member_correct``
    (per member, per task). ``summarize_scores`` turns any set of them into the report; a
    distributed validation scores a share of the batches per process and gathers them."""
    if not learners:
        raise ValueError("score_tasks needs at least one learner")
    out = []
    bar = None
    if progress:
        from tqdm import tqdm

        T = dataset.meta_batch_size
        bar = tqdm(total=sum(min(T, dataset.num_tasks - b * T) for b in batches), desc=desc, unit="task",
                   leave=False, dynamic_ncols=True)
    for b in batches:
        sx, sy, qx, qy = dataset[b]
        logit_sum = None
        losses, member_correct = [], []
        for learner in learners:
            res = learner.evaluate(sx, sy, qx, qy)
            logits = res["logits"].float().cpu()
            losses.append(res["task_losses"].float().cpu())
            member_correct.append((logits.argmax(-1) == qy).float().mean(-1))
            logit_sum = logits if logit_sum is None else logit_sum + logits
        out.append({"batch": int(b), "accuracies": (logit_sum.argmax(-1) == qy).float().mean(-1),
                    "losses": torch.cat(losses), "member_correct": member_correct})
        if bar is not None:
            bar.update(sx.shape[0])
    if bar is not None:
        bar.close()
    return out


def summarize_scores(scores: Sequence[dict]) -> dict:
    """The report of ``score_tasks`` from per-batch scores (any order; sorted by batch here)."""
    scores = sorted(scores, key=lambda r: r["batch"])
    if not scores:
        raise ValueError("no scored batches")
    task_acc = torch.cat([r["accuracies"] for r in scores]).double().numpy()
    members = len(scores[0]["member_correct"])
    return {"accuracy": float(task_acc.mean()), "ci95": confidence_interval(task_acc), "std": float(task_acc.std()),
            "num_tasks": int(task_acc.size),
            "loss": float(torch.cat([r["losses"] for r in scores]).double().mean()),
            "task_accuracies": task_acc.tolist(),
            "member_accuracies": [float(torch.cat([r["member_correct"][m] for r in scores]).double().mean())
                                  for m in range(members)]}
