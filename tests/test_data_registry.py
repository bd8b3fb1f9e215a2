"""The registry of datasets: every entry is complete, every consumer reads it (presets, the
training commands, reproduce, mamlpp-data), and adding a dataset is one module plus one entry
(tests/_toy_dataset.py, trained and evaluated end to end through the trainer's own data path)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mamlpp_ext.data import (DataError, DataMismatchError, dataset_names, get_dataset, load_dataset,
                             register_dataset, registered_datasets, unregister_dataset)
from mamlpp_ext.model import MAMLConfig, from_preset, preset_names
from mamlpp_ext.model.config import default_augment
from mamlpp_ext.training import reproduce as R
from mamlpp_ext.training.evaluate import evaluate_checkpoints, resolve_members
from mamlpp_ext.training.run_data import DataOptions, load_pools
from mamlpp_ext.training.trainer import Trainer

import _toy_dataset as toy

BUILT_IN = ("omniglot", "mini-imagenet", "cifar-fs", "fc100", "tiered-imagenet", "cub", "folder")


def test_built_in_entries_are_complete():
    assert tuple(dataset_names()) == BUILT_IN
    for spec in registered_datasets():
        assert re.fullmatch(r"MAMLPP_[A-Z0-9]+_ROOT", spec.env_var), spec.name
        assert spec.env_var == f"MAMLPP_{spec.name.upper().replace('-', '')}_ROOT"
        assert spec.layout and spec.get and spec.source and spec.title
        assert spec.default_root().name == spec.folder
        c, h, w = spec.image_shape()
        assert c in (1, 3) and h == spec.image_size[0] and w == spec.image_size[1]
        assert (spec.mean is None) == (spec.std is None)
        for f in spec.downloads:
            assert re.fullmatch(r"[0-9a-f]{32}", f.md5) and spec.base_url.startswith("https://")
        # the config's fallback for augment agrees with the entry (presets set it explicitly)
        assert default_augment(spec.name) == spec.augment, spec.name
    assert get_dataset("cifar-fs").default_root() == get_dataset("fc100").default_root()
    assert [s.name for s in registered_datasets() if s.downloads] == ["omniglot", "cifar-fs", "fc100", "cub"]


def test_presets_name_registered_datasets_and_fit_them():
    for name in preset_names():
        cfg = from_preset(name)
        spec = get_dataset(cfg.dataset)
        assert spec.image_shape(cfg.image_shape) == cfg.image_shape, name
        assert cfg.augment == spec.augment, name


def test_unknown_and_mismatched():
    with pytest.raises(DataError, match="unknown dataset 'cifar'; known datasets: omniglot, mini-imagenet"):
        get_dataset("cifar")
    with pytest.raises(DataMismatchError, match=r"Omniglot cannot give images of shape 3×28×28"):
        get_dataset("omniglot").image_shape((3, 28, 28))
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(get_dataset("cub"))


def test_reproduce_reads_the_registry():
    parser = R.make_parser()
    args = parser.parse_args(["table", "--cub-root", "/x", "--tiered-imagenet-root", "/y"])
    assert R._roots(args)["cub"] == "/x" and R._roots(args)["tiered-imagenet"] == "/y"
    assert R._pretty("cifar-fs-5way-1shot") == "CIFAR-FS 5-way 1-shot"
    assert R._pretty("mini-imagenet-5way-5shot") == "mini-ImageNet 5-way 5-shot"


@pytest.fixture
def toy_registered():
    register_dataset(toy.SPEC)
    yield toy.SPEC
    unregister_dataset("toy")


def test_toy_dataset_one_module_one_entry(toy_registered, tmp_path):
    root = toy.make_toy(tmp_path / "toy")
    d = load_dataset("toy", root, cache_dir=tmp_path / "c", progress=False)
    assert d.images.shape == (60, 1, 16, 16) and list(d.counts) == [5] * 12
    # a decoded array goes through the same conversion and resize as any image
    from PIL import Image

    with np.load(root / "toy.npz") as z:
        first = z["images"][np.argsort(z["labels"], kind="stable")[0]]
    ref = np.asarray(Image.fromarray(first).resize((16, 16), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(d.images[0, 0], ref)
    assert [len(v) for v in d.split_ids().values()] == [6, 3, 3]

    # the training application's own data path: trainer, validation, checkpoints, evaluation
    cfg = MAMLConfig(dataset="toy", ways=3, shots=1, queries=1, meta_batch=2, image_channels=1, image_height=16,
                     image_width=16, num_stages=2, num_filters=4, inner_steps=1, eval_inner_steps=1, total_epochs=1,
                     iterations_per_epoch=2, eval_tasks=2, msl_epochs=1)
    data = DataOptions(root=str(root), cache_dir=str(tmp_path / "c"))
    assert len(load_pools(cfg, data)["test"]) == 3
    trainer = Trainer(cfg, tmp_path / "run", backend="batched", data=data, progress=False, tensorboard=False,
                      handle_signals=False)
    trainer.fit()
    res = evaluate_checkpoints(resolve_members([tmp_path / "run"]), num_tasks=2)
    assert res["num_tasks"] == 2 and 0.0 <= res["accuracy"] <= 1.0
    with pytest.raises(DataMismatchError, match="4-way tasks need 4 classes, but the 'val' split of Toy"):
        load_pools(cfg.replace(ways=4), data)
