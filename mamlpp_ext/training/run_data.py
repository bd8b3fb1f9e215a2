"""Where a run's episodes come from: data options, class pools and the episode streams.

``DataOptions`` holds everything about the data that is not the task shape (which is in the
``MAMLConfig``); ``load_pools`` gives the train/val/test class pools of ``config.dataset``;
``train_dataset`` and ``eval_dataset`` the seeded training stream and the fixed evaluation tasks.
A run records the absolute dataset root it used (``with_absolute_root``); ``stored_data_options``
gives a stored run's options back, checking that root (a moved dataset is found again from
``--dataset-root``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .. import data as D
from ..model import MAMLConfig

__all__ = ["SPLITS", "DataOptions", "eval_dataset", "load_pools", "stored_data_options", "train_dataset",
           "with_absolute_root"]

SPLITS = ("maml", "lake")


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


#: how each dataset finds its root from ``--dataset-root`` (None: environment variable, then the
#: default folder). (With the data layer's dataset table this is its entry's resolver.)
_ROOT_RESOLVERS = {"omniglot": D.resolve_omniglot_root, "mini-imagenet": D.resolve_mini_imagenet_root}


def with_absolute_root(config: MAMLConfig, data: DataOptions) -> DataOptions:
    """``data`` with ``root`` replaced by the absolute folder it resolves to for ``config.dataset``
    (``--dataset-root``, else the environment variable, else the default folder), as a run records
    it: the run folder then names its data wherever it is used from. Raises the data layer's
    ``DatasetNotFoundError`` when there is no such folder."""
    resolve = _ROOT_RESOLVERS.get(config.dataset)
    if resolve is None:
        return data
    return dataclasses.replace(data, root=str(Path(os.path.abspath(resolve(data.root)))))


def stored_data_options(stored: dict, root: Optional[str] = None,
                        log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> DataOptions:
    """The data options a run or checkpoint recorded (``stored``: ``DataOptions.to_dict()``), for
    using the run again: ``root`` (``--dataset-root``) replaces the recorded root, with a note
    when they differ; a recorded root that no longer exists, with no ``root`` given, is a
    ``ValueError`` that says to pass ``--dataset-root`` (an older run that recorded no root
    keeps the environment variable / default folder lookup)."""
    data = DataOptions.from_dict(stored)
    recorded = data.root
    if root is not None:
        if recorded is not None and Path(recorded).expanduser().resolve() != Path(root).expanduser().resolve():
            log(f"note: using --dataset-root {root} (the run recorded {recorded})")
        data.root = root
    elif recorded is not None and not Path(recorded).expanduser().is_dir():
        raise ValueError(f"the run's dataset root {recorded} does not exist (moved or deleted?); pass --dataset-root "
                         f"with its new location")
    return data


def load_pools(config: MAMLConfig, data: DataOptions) -> dict:
    """The train/val/test ``ClassPool`` s of ``config.dataset``."""
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
    return D.EpisodeDataset.evaluation(pool, config.ways, config.shots, config.queries, batch_size,
                                     num_tasks=num_tasks, seed=data.eval_seed)


def train_dataset(pool, config: MAMLConfig):
    """The training stream: epochs × iterations meta-batches from ``config.seed``, each class of a
    task rotated by a random multiple of 90° when ``config.augment`` (Omniglot's default)."""
    return D.EpisodeDataset.training(pool, config.ways, config.shots, config.queries, config.meta_batch,
                                     num_batches=config.total_epochs * config.iterations_per_epoch, seed=config.seed,
                                     augment=config.augment)
