"""What a user gets without options: augmentation per dataset on the training stream the CLI
builds, ``--device auto``, the trainer's use of the default backend table (the table itself:
test_backends.py), and the default data folders with the
errors that say what to do when the data is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mamlpp_ext.data import DatasetNotFoundError, resolve_mini_imagenet_root, resolve_omniglot_root, user_data_dir
from mamlpp_ext.data.synthetic import make_fake_mini_imagenet
from mamlpp_ext.model.config import MAMLConfig
from mamlpp_ext.training import checkpoints as ckp
from mamlpp_ext.training import evaluate as E
from mamlpp_ext.training import train as T
from mamlpp_ext.training import trainer as TR

pytestmark = pytest.mark.usefixtures("tmp_cache")  # conftest.py

TINY_SETS = ["ways=3", "shots=1", "queries=1", "meta_batch=2", "num_stages=2", "num_filters=4", "inner_steps=1",
             "eval_inner_steps=1", "msl_epochs=1"]
COMMON = ["--epochs", "1", "--iters-per-epoch", "3", "--eval-tasks", "2", "--allow-partial-data", "--no-progress",
          "--no-tensorboard", "--backend", "batched", "--device", "cpu", "--log-every", "0"]


@pytest.fixture(scope="module")
def fake_mini(tmp_path_factory):
    return make_fake_mini_imagenet(tmp_path_factory.mktemp("mini"), classes=(5, 3, 3), images=4)


def _cli_stream(monkeypatch, argv) -> TR.Trainer:
    """Run mamlpp-train with ``argv`` and return the Trainer the command built (its training
    stream is the one the command trained on)."""
    built = []

    class Recording(TR.Trainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built.append(self)

    monkeypatch.setattr(T, "Trainer", Recording)
    assert T.main(argv) == 0
    assert len(built) == 1
    return built[0]


def _rotations(trainer: TR.Trainer, batches: int = 3) -> list[int]:
    """For every support and query image of the first ``batches`` training meta-batches, the k in
    {0, 1, 2, 3} such that the image is a pool image rotated by k·90° (asserting that one is)."""
    pool = trainer.pools["train"]
    images = torch.cat([pool.to_float(pool.class_images(c)) for c in range(len(pool))])  # (M, C, H, W)
    ks = []
    for b in range(batches):
        sx, _, qx, _ = trainer.train_set[b]
        for x in torch.cat([sx.flatten(0, 1), qx.flatten(0, 1)]):
            found = [k for k in range(4)
                     if (images - torch.rot90(x, -k, dims=(-2, -1))).abs().amax(dim=(1, 2, 3)).min() < 1e-6]
            assert found, "an episode image is no rotation of any pool image"
            ks.append(found[0])
    return ks


def test_cli_stream_mini_imagenet_is_not_rotated(tmp_path, monkeypatch, fake_mini):
    run = tmp_path / "mini"
    tr = _cli_stream(monkeypatch, ["--preset", "mini-imagenet-5way-1shot", "--dataset-root", str(fake_mini),
                                   "--run-dir", str(run), *COMMON, "--set", "image_height=16",
                                   "--set", "image_width=16", *[f"--set={s}" for s in TINY_SETS]])
    assert tr.config.augment is False and tr.train_set.augment is False
    assert set(_rotations(tr)) == {0}
    assert json.loads((run / "config.json").read_text())["config"]["augment"] is False
    assert ckp.load_checkpoint(run / "checkpoints" / "latest.pt")["config"]["augment"] is False

    # a checkpoint written before the field existed resumes with its dataset's default (off)
    state = ckp.load_checkpoint(run / "checkpoints" / "latest.pt")
    del state["config"]["augment"]
    del state["learner"]["config"]["augment"]
    ckp.atomic_save(state, run / "checkpoints" / "latest.pt")
    old = TR.Trainer(None, run, resume=True, progress=False, tensorboard=False, handle_signals=False)
    assert old.config.augment is False and old.train_set.augment is False


def test_cli_stream_omniglot_is_rotated_unless_turned_off(tmp_path, monkeypatch, fake_root):
    argv = ["--preset", "omniglot-5way-1shot", "--dataset-root", str(fake_root), "--split", "lake",
            "--lake-val-alphabets", "1", *COMMON, *[f"--set={s}" for s in TINY_SETS]]
    tr = _cli_stream(monkeypatch, argv + ["--run-dir", str(tmp_path / "on")])
    assert tr.config.augment is True and tr.train_set.augment is True
    ks = _rotations(tr)
    assert len(set(ks)) > 1, ks  # 18 classes, each rotated by its own k: all k = 0 would be a 1-in-4^18 draw
    assert json.loads((tmp_path / "on" / "config.json").read_text())["config"]["augment"] is True

    tr = _cli_stream(monkeypatch, argv + ["--run-dir", str(tmp_path / "off"), "--set", "augment=false"])
    assert tr.config.augment is False and set(_rotations(tr)) == {0}
    assert json.loads((tmp_path / "off" / "config.json").read_text())["config"]["augment"] is False


# --------------------------------------------------------------------------- device and backend


def test_device_auto(monkeypatch):
    assert TR.check_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert TR.check_device("auto") == torch.device("cpu")
    assert "no CUDA device" in TR.describe_device("auto", torch.device("cpu"))
    assert TR.describe_device("cpu", torch.device("cpu")) == "device cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert TR.check_device("auto") == torch.device("cuda")
    assert "a CUDA device is available" in TR.describe_device("auto", torch.device("cuda"))


def test_every_cli_defaults_to_device_auto():
    from mamlpp_ext.training import reproduce as R

    assert T.make_parser().parse_args([]).device == "auto"
    assert E.make_parser().parse_args(["run"]).device == "auto"
    for sub in (["plan"], ["train"], ["table"]):
        assert R.make_parser().parse_args(sub).device == "auto"


def test_train_prints_the_device(tmp_path, fake_root, capsys):
    argv = ["--preset", "omniglot-5way-1shot", "--dataset-root", str(fake_root), "--split", "lake",
            "--lake-val-alphabets", "1", *COMMON, *[f"--set={s}" for s in TINY_SETS], "--run-dir", str(tmp_path / "r")]
    argv[argv.index("--device") + 1] = "auto"
    assert T.main(argv) == 0
    err = capsys.readouterr().err
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"mamlpp-train: device {expected} (--device auto: " in err and "backend batched" in err


def test_trainer_uses_the_table(tmp_path, fake_root, monkeypatch):
    from mamlpp_ext.training.run_data import DataOptions

    from mamlpp_ext.model import backends

    monkeypatch.setitem(backends.DEFAULT_BACKENDS, ("cpu", "omniglot"), "sequential")
    cfg = MAMLConfig(ways=3, shots=1, queries=1, meta_batch=2, num_stages=2, num_filters=4, inner_steps=1,
                     eval_inner_steps=1, total_epochs=1, iterations_per_epoch=1, eval_tasks=2)
    tr = TR.Trainer(cfg, tmp_path / "r", device="cpu", progress=False, tensorboard=False, handle_signals=False,
                    data=DataOptions(root=str(fake_root), split="lake", lake_val_alphabets=1, check_counts=False))
    assert tr.backend == "sequential"


# --------------------------------------------------------------------------- default data folders


def test_default_data_folders_are_in_the_user_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    from mamlpp_ext.data import miniimagenet, omniglot

    assert omniglot.default_omniglot_root() == tmp_path / "xdg" / "mamlpp_ext" / "omniglot"
    assert miniimagenet.default_mini_imagenet_root() == tmp_path / "xdg" / "mamlpp_ext" / "mini-imagenet"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert user_data_dir() == Path.home() / ".local" / "share" / "mamlpp_ext"
    repo = Path(__file__).resolve().parents[1]
    for d in (omniglot.default_omniglot_root(), miniimagenet.default_mini_imagenet_root()):
        assert repo.parent not in d.parents or repo in d.parents  # nothing beside the repository


def test_missing_data_errors_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("MAMLPP_OMNIGLOT_ROOT", raising=False)
    monkeypatch.delenv("MAMLPP_MINIIMAGENET_ROOT", raising=False)
    with pytest.raises(DatasetNotFoundError) as e:
        resolve_omniglot_root()
    msg = str(e.value)
    for part in ("MAMLPP_OMNIGLOT_ROOT", "--dataset-root", "mamlpp-data download omniglot",
                 str(tmp_path / "xdg" / "mamlpp_ext" / "omniglot"), "images_background"):
        assert part in msg, (part, msg)
    with pytest.raises(DatasetNotFoundError) as e:
        resolve_mini_imagenet_root()
    msg = str(e.value)
    for part in ("MAMLPP_MINIIMAGENET_ROOT", "--dataset-root", "train/", "cannot be downloaded"):
        assert part in msg, (part, msg)
    # the default folder is used once it exists
    (tmp_path / "xdg" / "mamlpp_ext" / "omniglot").mkdir(parents=True)
    assert resolve_omniglot_root() == tmp_path / "xdg" / "mamlpp_ext" / "omniglot"


def test_train_without_data_exits_with_the_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("MAMLPP_OMNIGLOT_ROOT", raising=False)
    with pytest.raises(SystemExit) as e:
        T.main(["--preset", "omniglot-5way-1shot", "--run-dir", str(tmp_path / "r"), "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "mamlpp-data download omniglot" in err and "MAMLPP_OMNIGLOT_ROOT" in err and "--dataset-root" in err
