"""Datasets and episodic sampling for MAML++ (SPEC §5); see docs/data.md.

- The registry (:mod:`~mamlpp_ext.data.registry`) holds one entry per dataset: Omniglot,
  mini-ImageNet, CIFAR-FS, FC100, tieredImageNet, CUB-200-2011 and ``folder`` (your own images).
  :func:`load_dataset` finds any of them, preprocesses it once into a checked cache and returns
  an :class:`ImageDataset`; :func:`load_pools` gives its train/val/test class pools for a task
  shape, checking the shape against the data before any image is decoded.
- :func:`load_omniglot` and :func:`load_mini_imagenet` do the same for those two, with their
  own arguments (:class:`OmniglotData` has the ``maml`` (1150/50/423) and ``lake`` splits).
- :class:`EpisodeDataset` samples N-way K-shot meta-batches from a :class:`ClassPool`
  (seeded per task: reproducible, worker-count independent, resumable).
- :func:`load_one_shot_runs` and :func:`evaluate_one_shot` run Lake et al.'s original
  20-way one-shot benchmark (``all_runs.zip``).
- :mod:`~mamlpp_ext.data.download` (``mamlpp-data``) fetches the datasets that have a public
  download, only when asked; datasets are read from ``user_data_dir()`` unless a root is given.
"""

from .cache import ImageStore, atomic_write  # noqa: F401
from .dataset import (FileSource, ImageDataset, Listing, RemoteFile, Source, check_tasks,  # noqa: F401
                      seeded_split)
from .episodes import ClassPool, Episode, EpisodeDataset, EpisodeShard, TaskSpec  # noqa: F401
from .errors import CorruptImageError, DataError, DataMismatchError, DatasetNotFoundError  # noqa: F401
from .loader import load_dataset, load_mini_imagenet, load_omniglot, load_pools, omniglot_episodes  # noqa: F401
from .miniimagenet import (IMAGENET_MEAN, IMAGENET_STD, MiniImageNetData, default_mini_imagenet_root,  # noqa: F401
                           resolve_mini_imagenet_root)
from .omniglot import OmniglotData, default_omniglot_root, resolve_omniglot_root  # noqa: F401
from .one_shot import OneShotRun, evaluate_one_shot, load_one_shot_runs  # noqa: F401
from .paths import resolve_cache_dir, user_data_dir  # noqa: F401
from .registry import (DatasetSpec, dataset_names, get_dataset, register_dataset, registered_datasets,  # noqa: F401
                       unregister_dataset)

__all__ = [
    "ClassPool", "CorruptImageError", "DataError", "DataMismatchError", "DatasetNotFoundError", "DatasetSpec",
    "Episode", "EpisodeDataset", "EpisodeShard", "FileSource", "ImageDataset", "ImageStore", "Listing",
    "OmniglotData", "RemoteFile", "Source", "TaskSpec", "atomic_write", "check_tasks", "dataset_names",
    "default_omniglot_root", "get_dataset", "load_dataset", "load_omniglot", "load_pools", "omniglot_episodes",
    "register_dataset", "registered_datasets", "unregister_dataset", "resolve_cache_dir", "resolve_omniglot_root",
    "seeded_split",
    "IMAGENET_MEAN", "IMAGENET_STD", "MiniImageNetData", "load_mini_imagenet", "resolve_mini_imagenet_root",
    "OneShotRun", "evaluate_one_shot", "load_one_shot_runs", "default_mini_imagenet_root", "user_data_dir",
]
