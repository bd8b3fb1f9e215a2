"""The table of datasets: one :class:`DatasetSpec` entry per dataset.

Everything that names a dataset reads this table: the loader (how to find and read it, its
image size, normalisation and splits), ``mamlpp-data where`` / ``download`` (its folder,
environment variable, layout and files), the training commands (``--dataset-root`` and the
checks of a config against the data) and ``mamlpp-reproduce`` (its ``--<name>-root`` option).
The presets in ``mamlpp_ext.model.config`` name a dataset by its entry's ``name``.

Adding a dataset is one module that turns a root folder into a
:class:`~mamlpp_ext.data.dataset.Source` (and says how its classes split), plus one entry:
``register_dataset(DatasetSpec(...))`` -- the built-in ones are at the bottom of this file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .dataset import ImageDataset, resolve_root
from .errors import DataError, DataMismatchError
from .paths import user_data_dir

__all__ = ["DatasetSpec", "dataset_names", "get_dataset", "register_dataset", "registered_datasets",
           "unregister_dataset"]


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: how to find and read it, and what it is.

    name: the registry key, used by ``MAMLConfig.dataset`` and the preset names ("cifar-fs").
    title: its name for people ("CIFAR-FS").
    open: ``open(root, check_counts=bool, **options) -> Source``: find the files under the root
        (raise ``DatasetNotFoundError`` saying what is missing), nothing decoded yet.
    split_ids: ``split_ids(listing, scheme=None, seed=0, **kw) -> {"train", "val", "test":
        class ids}``.
    image_size: default (height, width) of the cached images. square: the size must be square.
    channels: the channel counts it can give (1: grey, 3: RGB), the default first.
    resample: the PIL filter used to resize. mean, std: per-channel normalisation after scaling
        to [0, 1] (None: none). invert: pools return 1 − x. augment: whether training tasks are
        rotated by default (the presets say so explicitly).
    mmap: memory-map the cached array (else it is read into memory).
    check_counts: whether loading requires the complete dataset by default.
    split_schemes: names of the class splits it offers (Omniglot: "maml", "lake"); empty when the
        data fixes the split.
    folder: its sub-folder of the user's data folder (default: ``name``).
    env_vars: environment variables naming its root, in order (default ``MAMLPP_<NAME>_ROOT``).
    layout: what its root holds (one line). get: how to get it (one line).
    downloads, base_url: what ``mamlpp-data download NAME`` fetches (empty: no public download).
    source: where the dataset and its split come from (docs and ``mamlpp-data where``).
    data_class: the :class:`ImageDataset` subclass the loader returns.
    """

    name: str
    title: str
    open: Callable
    split_ids: Callable
    image_size: tuple
    channels: tuple = (3,)
    square: bool = True
    resample: str = "lanczos"
    mean: Optional[tuple] = None
    std: Optional[tuple] = None
    invert: bool = False
    augment: bool = False
    mmap: bool = True
    check_counts: bool = True
    split_schemes: tuple = ()
    folder: str = ""
    env_vars: tuple = ()
    layout: str = ""
    get: str = ""
    downloads: tuple = ()
    base_url: str = ""
    source: str = ""
    data_class: type = field(default=ImageDataset)

    def __post_init__(self) -> None:
        if not self.folder:
            object.__setattr__(self, "folder", self.name)
        if not self.env_vars:
            object.__setattr__(self, "env_vars", (f"MAMLPP_{self.name.upper().replace('-', '')}_ROOT",))

    # ---- where it is

    @property
    def env_var(self) -> str:
        """Its main environment variable (``MAMLPP_<NAME>_ROOT``)."""
        return self.env_vars[0]

    def default_root(self) -> Path:
        """Its default folder: ``<user data folder>/<folder>`` (it may not exist)."""
        return user_data_dir() / self.folder

    def resolve_root(self, root: str | os.PathLike | None = None, default: Optional[Path] = None) -> Path:
        """The root: ``root`` > the first environment variable set > ``default`` (default: the
        default folder). Raises :class:`DatasetNotFoundError` (naming the variable, the option,
        the layout and how to get the data) when the chosen folder does not exist."""
        return resolve_root(self.title, self.env_vars, default if default is not None else self.default_root(),
                            self.layout, self.get, root)

    # ---- what it gives

    def image_shape(self, shape=None) -> tuple:
        """The (C, H, W) the cache will hold for a requested ``shape`` (None: the defaults);
        raises :class:`DataMismatchError` when the data cannot give it (before any work)."""
        if shape is None:
            return (self.channels[0], *self.image_size)
        c, h, w = (int(v) for v in shape)
        problems = []
        if c not in self.channels:
            kinds = " or ".join({1: "1 (grey)", 3: "3 (RGB)"}.get(k, str(k)) for k in self.channels)
            problems.append(f"image_channels must be {kinds}")
        if h < 1 or w < 1:
            problems.append("image_height and image_width must be >= 1")
        elif self.square and h != w:
            problems.append(f"its images are square: set image_height and image_width to the same size "
                            f"(default {self.image_size[0]})")
        if problems:
            raise DataMismatchError(f"{self.title} cannot give images of shape {c}×{h}×{w} (image_channels × "
                                    f"image_height × image_width): {'; '.join(problems)}")
        return (c, h, w)

    def mode(self, channels: int) -> str:
        return "L" if channels == 1 else "RGB"


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec, replace: bool = False) -> DatasetSpec:
    """Add a dataset to the table (``replace``: allow replacing an entry of the same name)."""
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"register_dataset expects a DatasetSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"a dataset named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_dataset(name: str) -> None:
    """Remove a dataset from the table (e.g. one a test registered)."""
    _REGISTRY.pop(name, None)


def get_dataset(name) -> DatasetSpec:
    """The entry of ``name`` (a DatasetSpec passes through); an unknown name raises
    :class:`DataError` listing the known ones."""
    if isinstance(name, DatasetSpec):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}") from None


def dataset_names() -> list[str]:
    """The registered dataset names, in registration order."""
    return list(_REGISTRY)


def registered_datasets() -> list[DatasetSpec]:
    """The registered entries, in registration order."""
    return list(_REGISTRY.values())


# --------------------------------------------------------------------------- the built-in datasets
# One entry per dataset; the modules they name read the files.

from . import cifar, cub, folders, miniimagenet, omniglot, tiered  # noqa: E402

_IMAGENET_MEAN, _IMAGENET_STD = miniimagenet.IMAGENET_MEAN, miniimagenet.IMAGENET_STD

register_dataset(DatasetSpec(
    name="omniglot", title="Omniglot", open=omniglot.open_source, split_ids=omniglot.split_ids,
    image_size=(28, 28), channels=(1,), mmap=False, augment=True, split_schemes=omniglot.SPLITS,
    layout=omniglot.LAYOUT, get=omniglot.HOW_TO_GET, downloads=omniglot.FILES, base_url=omniglot.BASE_URL,
    data_class=omniglot.OmniglotData,
    source="Lake, Salakhutdinov & Tenenbaum, Science 2015; 'maml' split of the public MAML++ code (1150/50/423)"))
register_dataset(DatasetSpec(
    name="mini-imagenet", title="mini-ImageNet", open=miniimagenet.open_source, split_ids=folders.split_ids,
    image_size=(84, 84), mean=_IMAGENET_MEAN, std=_IMAGENET_STD, check_counts=False, layout=miniimagenet.LAYOUT,
    get=miniimagenet.HOW_TO_GET, data_class=miniimagenet.MiniImageNetData,
    source="Vinyals et al., NeurIPS 2016; split of Ravi & Larochelle, ICLR 2017 (64/16/20 classes)"))
register_dataset(DatasetSpec(
    name="cifar-fs", title="CIFAR-FS", open=cifar.open_source, split_ids=cifar.split_cifar_fs,
    image_size=(32, 32), mean=cifar.MEAN, std=cifar.STD, folder="cifar-100",
    env_vars=("MAMLPP_CIFARFS_ROOT", "MAMLPP_CIFAR100_ROOT"), layout=cifar.LAYOUT, get=cifar.HOW_TO_GET,
    downloads=cifar.FILES, base_url=cifar.BASE_URL,
    source="Bertinetto et al., ICLR 2019: CIFAR-100's classes split 64/16/20"))
register_dataset(DatasetSpec(
    name="fc100", title="FC100", open=cifar.open_source, split_ids=cifar.split_fc100,
    image_size=(32, 32), mean=cifar.MEAN, std=cifar.STD, folder="cifar-100",
    env_vars=("MAMLPP_FC100_ROOT", "MAMLPP_CIFAR100_ROOT"), layout=cifar.LAYOUT, get=cifar.HOW_TO_GET,
    downloads=cifar.FILES, base_url=cifar.BASE_URL,
    source="Oreshkin et al., NeurIPS 2018: CIFAR-100 split by superclass 12/4/4 (60/20/20 classes)"))
register_dataset(DatasetSpec(
    name="tiered-imagenet", title="tieredImageNet", open=tiered.open_source, split_ids=tiered.split_ids,
    image_size=(84, 84), mean=_IMAGENET_MEAN, std=_IMAGENET_STD, layout=tiered.LAYOUT, get=tiered.HOW_TO_GET,
    source="Ren et al., ICLR 2018: 608 ImageNet classes in 34 categories, split by category 351/97/160"))
register_dataset(DatasetSpec(
    name="cub", title="CUB-200-2011", open=cub.open_source, split_ids=cub.split_ids,
    image_size=(84, 84), mean=_IMAGENET_MEAN, std=_IMAGENET_STD, layout=cub.LAYOUT, get=cub.HOW_TO_GET,
    downloads=cub.FILES, base_url=cub.BASE_URL,
    source="Wah et al., Caltech tech. report 2011; split of Chen et al., ICLR 2019 (100/50/50 classes)"))
register_dataset(DatasetSpec(
    name="folder", title="image folder", open=folders.open_image_folder, split_ids=folders.split_ids,
    image_size=(84, 84), channels=(3, 1), square=False, check_counts=False, layout=folders.FOLDER_LAYOUT,
    get=folders.FOLDER_GET, source="your own images"))
