"""Datasets and episodic sampling for MAML++ (SPEC §5); see docs/data.md.

- :func:`load_omniglot` finds Omniglot (archives, extracted folders or torchvision's
  ``omniglot-py/``), preprocesses it once into a cache and returns :class:`OmniglotData`,
  whose :meth:`~OmniglotData.split` gives the ``maml`` (1150/50/423) or ``lake`` class pools.
- :func:`load_mini_imagenet` does the same for a ``train/ val/ test/`` image folder.
- :class:`EpisodeDataset` samples N-way K-shot meta-batches from a :class:`ClassPool`
  (seeded per task: reproducible, worker-count independent, resumable).
- :func:`load_one_shot_runs` and :func:`evaluate_one_shot` run Lake et al.'s original
  20-way one-shot benchmark (``all_runs.zip``).
- :mod:`~mamlpp_ext.data.download` (``mamlpp-data``) fetches Omniglot's official archives, only
  when asked; datasets are read from ``user_data_dir()`` unless a root is given.
"""

from ._common import (CorruptImageError, DataError, DatasetNotFoundError, ImageStore, atomic_write,  # noqa: F401
                      resolve_cache_dir, user_data_dir)
from .episodes import ClassPool, Episode, EpisodeDataset, EpisodeShard, TaskSpec  # noqa: F401
from .omniglot import (OmniglotData, default_omniglot_root, load_omniglot, omniglot_episodes,  # noqa: F401
                       resolve_omniglot_root)
from .miniimagenet import (IMAGENET_MEAN, IMAGENET_STD, MiniImageNetData, default_mini_imagenet_root,  # noqa: F401
                           load_mini_imagenet, resolve_mini_imagenet_root)
from .one_shot import OneShotRun, evaluate_one_shot, load_one_shot_runs  # noqa: F401

__all__ = [
    "ClassPool", "CorruptImageError", "DataError", "DatasetNotFoundError", "Episode", "EpisodeDataset", "EpisodeShard",
    "ImageStore", "OmniglotData", "atomic_write", "TaskSpec", "default_omniglot_root", "load_omniglot",
    "omniglot_episodes",
    "resolve_cache_dir", "resolve_omniglot_root", "IMAGENET_MEAN", "IMAGENET_STD", "MiniImageNetData",
    "load_mini_imagenet", "resolve_mini_imagenet_root", "OneShotRun", "evaluate_one_shot", "load_one_shot_runs",
    "default_mini_imagenet_root", "user_data_dir",
]
