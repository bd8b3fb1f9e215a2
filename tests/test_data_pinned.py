"""Episodes pinned from before the dataset registry (issue 18): the same seed must keep giving the
same tasks for Omniglot and mini-ImageNet.

``tests/data/pinned_task_specs.json`` was written by the data code of commit d8242fb (before the
datasets were rebuilt around one registry and one cache): for a few presets and task indices,
each task's class names (in label order), its images' file names (support first) and its
rotations, as ``mamlpp-train`` builds the streams (``training.run_data``). The real-Omniglot part
also pins the float sums of two meta-batches (preprocessing and polarity). The generated trees
are those of ``mamlpp_ext.data.synthetic`` with the arguments below; a change to those
generators that alters their file layout breaks this test too, on purpose.
"""

import json
from pathlib import Path

import pytest

from mamlpp_ext.data import load_mini_imagenet, load_omniglot
from mamlpp_ext.data.synthetic import make_fake_mini_imagenet, make_fake_omniglot
from mamlpp_ext.model import from_preset
from mamlpp_ext.training.run_data import DataOptions, eval_dataset, load_pools, train_dataset

PINNED = json.loads((Path(__file__).parent / "data" / "pinned_task_specs.json").read_text())


def _specs(pools, files, cfg, data, which):
    out = {}
    for split, idxs in which.items():
        ds = (train_dataset(pools[split], cfg) if split == "train"
              else eval_dataset(pools[split], cfg, data, cfg.eval_tasks, cfg.meta_batch))
        for t in idxs:
            s = ds.task_spec(t)
            out[f"{split}/{t}"] = {"classes": [pools[split].names[c] for c in s.classes],
                                   "images": [[files[i].rsplit("/", 1)[1] for i in row] for row in s.images],
                                   "rotations": s.rotations.tolist()}
    return out


def _check(key, got):
    want = PINNED[key]
    assert sorted(got) == sorted(want)
    for task in want:
        assert got[task] == want[task], f"{key} task {task} changed"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("pinned-cache")


def test_generated_omniglot_tasks_unchanged(tmp_path, cache):
    root = make_fake_omniglot(tmp_path / "og", alphabets=(6, 3), characters=20, drawings=2)
    files = load_omniglot(root, cache_dir=cache, progress=False, check_counts=False, num_workers=0).files
    cfg = from_preset("omniglot-5way-1shot")
    data = DataOptions(root=str(root), cache_dir=str(cache), check_counts=False)
    _check("fake-omniglot/omniglot-5way-1shot/maml",
           _specs(load_pools(cfg, data), files, cfg, data, {"train": [0, 11], "val": [0], "test": [2]}))


def test_generated_mini_imagenet_tasks_unchanged(tmp_path, cache):
    root = make_fake_mini_imagenet(tmp_path / "mini", classes=(6, 5, 5), images=20)
    files = load_mini_imagenet(root, cache_dir=cache, progress=False, num_workers=0).files
    for preset in ("mini-imagenet-5way-1shot", "mini-imagenet-5way-5shot"):
        cfg = from_preset(preset)
        data = DataOptions(root=str(root), cache_dir=str(cache), check_counts=False)
        _check(f"fake-mini/{preset}",
               _specs(load_pools(cfg, data), files, cfg, data, {"train": [0, 3], "val": [0], "test": [599]}))


def test_real_omniglot_tasks_unchanged(real_omniglot_root):
    root = str(real_omniglot_root)
    files = load_omniglot(root, progress=False).files
    for preset, split, which in (
            ("omniglot-5way-1shot", "maml", {"train": [0, 1, 49999 * 8 + 7], "val": [0, 599], "test": [3]}),
            ("omniglot-20way-5shot", "lake", {"train": [5], "val": [1], "test": [599]})):
        cfg = from_preset(preset)
        data = DataOptions(root=root, split=split)
        _check(f"real-omniglot/{preset}/{split}", _specs(load_pools(cfg, data), files, cfg, data, which))
    cfg = from_preset("omniglot-5way-1shot")
    data = DataOptions(root=root)
    pools = load_pools(cfg, data)
    got = {"train/batch0": train_dataset(pools["train"], cfg)[0],
           "val/batch74": eval_dataset(pools["val"], cfg, data, 600, 8)[74]}
    for k, e in got.items():
        sums = [float(e.support_x.double().sum()), float(e.query_x.double().sum())]
        assert sums == pytest.approx(PINNED["real-omniglot-sums"][k], rel=1e-9, abs=1e-6), k
