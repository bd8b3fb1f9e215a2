"""Where a run's episodes come from: data options, class pools and the episode streams.

``DataOptions`` holds everything about the data that is not the task shape (which is in the
``MAMLConfig``); ``load_pools`` gives the train/val/test class pools of ``config.dataset`` (any
dataset of the data registry, ``mamlpp_ext.data.registry``), checking the config against the
data before any image is decoded; ``train_dataset`` and ``eval_dataset`` the seeded training
stream and the fixed evaluation tasks.
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

#: the named class splits of the registered datasets (Omniglot's "maml" and "lake")
SPLITS = tuple(dict.fromkeys(s for spec in D.registered_datasets() for s in spec.split_schemes))


@dataclass
class DataOptions:
    """Where a run's episodes come from (everything but the task shape, which is in the config).

    ``root``: dataset folder (None: the data package's default); ``split``: the dataset's named
    class split, for those that have several (Omniglot: "maml" or "lake"; the others' split is
    fixed by the data and "maml", the default, stands for it); ``split_seed``: seed of splits
    drawn at random (Omniglot's shuffles, an image folder without train/val/test sub-folders);
    ``lake_val_alphabets``: held-out background alphabets of the lake split; ``eval_seed``: seed
    of the fixed validation/test tasks (independent of the training seed, so every run sees the
    same tasks); ``check_counts``: require the complete dataset; ``cache_dir``: preprocessing
    cache; ``num_workers``: DataLoader workers for training.
    """

    root: Optional[str] = None
    split: str = "maml"
    lake_val_alphabets: int = 5
    split_seed: int = 0
    eval_seed: int = 0
    check_counts: bool = True
    cache_dir: Optional[str] = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        for name in ("lake_val_alphabets", "split_seed", "eval_seed", "num_workers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def with_absolute_root(config: MAMLConfig, data: DataOptions) -> DataOptions:
    """``data`` with ``root`` replaced by the absolute folder it resolves to for ``config.dataset``
    (``--dataset-root``, else the environment variable, else the default folder), as a run records
    it: the run folder then names its data wherever it is used from. Raises the data layer's
    ``DatasetNotFoundError`` when there is no such folder."""
    root = D.get_dataset(config.dataset).resolve_root(data.root)
    return dataclasses.replace(data, root=str(Path(os.path.abspath(root))))


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


def load_pools(config: MAMLConfig, data: DataOptions, progress: bool = True) -> dict:
    """The train/val/test ``ClassPool`` s of ``config.dataset`` for the config's image shape and
    task shape, both checked against the data before any image is decoded (a mismatch raises
    ``mamlpp_ext.data.DataMismatchError``, a ``ValueError``, naming the field to change)."""
    spec = D.get_dataset(config.dataset)
    split = data.split
    if not spec.split_schemes:
        if split != "maml":
            named = [s.title for s in D.registered_datasets() if s.split_schemes]
            raise ValueError(f"--split applies to {', '.join(named)} only; {spec.title} uses the split of its data")
        split = None
    return D.load_pools(spec, data.root, image_shape=config.image_shape, ways=config.ways, shots=config.shots,
                        queries=config.queries, split=split, split_seed=data.split_seed,
                        lake_val_alphabets=data.lake_val_alphabets, cache_dir=data.cache_dir,
                        check_counts=data.check_counts, progress=progress)


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
