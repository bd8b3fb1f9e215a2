"""Every dataset preset through the real commands, on fixtures built in each dataset's real
format: ``mamlpp-train --preset <dataset>-5way-{1,5}shot`` trains and validates, then
``mamlpp-eval`` scores the run on the test split, on every backend (sequential, batched, fused).
The code path is the one the real data takes; only the schedule and the network width are
shrunk (``--set``), and ``--allow-partial-data`` accepts the small copies.

Also: data errors of the commands are one line with exit status 2 -- a config the data cannot
match (rejected before any preprocessing), unreadable images, an unknown dataset -- and
``mamlpp-data download`` fetches what has a public download (over a local server) and says
which files to put where for what has none.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from functools import partial

import pytest

import mamlpp_ext
from mamlpp_ext.data import download as DL
from mamlpp_ext.data import get_dataset, load_dataset, register_dataset
from mamlpp_ext.data.synthetic import (make_fake_cifar100, make_fake_cub, make_fake_image_folder,
                                       make_fake_omniglot, make_fake_tiered_imagenet)
from mamlpp_ext.model import preset_names
from mamlpp_ext.training import evaluate as E
from mamlpp_ext.training import train as T

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

BACKENDS = ["sequential", "batched", "fused"]
SMALL = ["--set", "num_filters=8", "--set", "queries=2", "--set", "inner_steps=1", "--set", "eval_inner_steps=1",
         "--set", "msl_epochs=1", "--epochs", "1", "--iters-per-epoch", "1", "--eval-tasks", "2",
         "--allow-partial-data", "--no-progress", "--no-tensorboard"]
DATASETS = ("cifar-fs", "fc100", "tiered-imagenet", "cub", "folder")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """One fixture per dataset, in its real format, with 7+ images per class (5 shots + 2 queries)."""
    base = tmp_path_factory.mktemp("datasets")
    cifar = make_fake_cifar100(base / "cifar", train_per_class=6, test_per_class=1, layout="archive")
    return {"cifar-fs": cifar, "fc100": cifar,
            "tiered-imagenet": make_fake_tiered_imagenet(base / "tiered", classes=(6, 5, 5), images=(7, 8)),
            "cub": make_fake_cub(base / "cub", classes=20, images=(7, 8), layout="archive"),
            "folder": make_fake_image_folder(base / "folder", classes=(6, 5, 5), images=(7, 8))}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _train(run_dir, preset, root, cache, backend, *extra):
    return T.main(["--preset", preset, "--dataset-root", str(root), "--cache-dir", str(cache), "--backend", backend,
                   "--run-dir", str(run_dir), "--device", "cpu", *SMALL, *extra])


def test_every_new_dataset_has_1_and_5_shot_presets():
    for name in DATASETS:
        for k in (1, 5):
            assert f"{name}-5way-{k}shot" in preset_names()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", [f"{d}-5way-{k}shot" for d in DATASETS for k in (1, 5)])
def test_preset_trains_and_evaluates(preset, backend, roots, cache, tmp_path):
    if backend == "fused" and not mamlpp_ext.has_extension():
        pytest.skip("the fused backend needs the compiled extension")
    dataset = preset.rsplit("-5way", 1)[0]
    run = tmp_path / "run"
    assert _train(run, preset, roots[dataset], cache, backend) == 0
    stored = json.loads((run / "config.json").read_text())
    assert stored["config"]["dataset"] == dataset and stored["backend"] == backend
    assert E.main([str(run), "--tasks", "2", "--device", "cpu", "--no-progress", "--cache-dir", str(cache)]) == 0
    report = json.loads((run / "eval-test.json").read_text())
    assert report["test"]["num_tasks"] == 2 and 0.0 <= report["test"]["accuracy"] <= 1.0


# --------------------------------------------------------------------------- data errors: exit 2, one line


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_config_that_cannot_match_is_rejected_before_preprocessing(tmp_path, capsys):
    root = make_fake_omniglot(tmp_path / "og")
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit) as e:
        T.main(["--preset", "omniglot-5way-1shot", "--dataset-root", str(root), "--cache-dir", str(cache),
                "--allow-partial-data", "--set", "image_height=32", "--run-dir", str(tmp_path / "r"), "--device",
                "cpu", "--no-progress", "--no-tensorboard"])
    assert e.value.code == 2
    msg = _error(capsys)
    assert "Omniglot cannot give images of shape 1×32×28" in msg and "image_height and image_width" in msg
    assert not cache.exists() or not any(cache.iterdir()), "nothing may be preprocessed for a config that cannot match"


def test_unreadable_images_exit_2_naming_them(tmp_path, capsys):
    root = make_fake_image_folder(tmp_path / "f", classes=(6, 5, 5), images=(3, 4))
    bad = sorted(root.rglob("*.png"))[:2]
    for b in bad:
        b.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(SystemExit) as e:
        _train(tmp_path / "r", "folder-5way-1shot", root, tmp_path / "c", "batched")
    assert e.value.code == 2
    msg = _error(capsys)
    assert "2 unreadable files" in msg and all(str(b) in msg for b in bad) and "Fix:" in msg


@pytest.mark.parametrize("sets, text", [
    (["--set", "ways=6", "--set", "queries=1"], "6-way tasks need 6 classes, but the 'val' split of image folder"),
    (["--set", "queries=9"], "need 10 images per class"),
    (["--set", "dataset=nope"], "unknown dataset 'nope'; known datasets: omniglot, mini-imagenet"),
    (["--split", "lake", "--set", "queries=1"], "--split applies to Omniglot only"),
])
def test_data_mismatch_exit_2(tmp_path, capsys, sets, text):
    root = make_fake_image_folder(tmp_path / "f", classes=(6, 5, 5), images=(3, 4))
    with pytest.raises(SystemExit) as e:
        T.main(["--preset", "folder-5way-1shot", "--dataset-root", str(root), "--cache-dir", str(tmp_path / "c"),
                "--run-dir", str(tmp_path / "r"), "--device", "cpu", "--no-progress", "--no-tensorboard", *sets])
    assert e.value.code == 2 and text in _error(capsys)


# --------------------------------------------------------------------------- mamlpp-data


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def use_table():
    saved = []

    def use(name, table):
        spec = get_dataset(name)
        saved.append(spec)
        import dataclasses

        register_dataset(dataclasses.replace(spec, downloads=tuple(table)), replace=True)

    yield use
    for spec in reversed(saved):
        register_dataset(spec, replace=True)


def test_download_cifar_then_train_reads_it(tmp_path, capsys, use_table):
    site = tmp_path / "site"
    make_fake_cifar100(site, layout="archive")
    spec = get_dataset("cifar-fs")
    table = [DL.RemoteFile(f.name, f.path, hashlib.md5((site / f.path).read_bytes()).hexdigest(), what=f.what)
             for f in spec.downloads]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        use_table("cifar-fs", table)
        dest = tmp_path / "data"
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert DL.main(["download", "cifar-fs", "--root", str(dest), "--base-url", base, "--no-progress"]) == 0
        assert "mamlpp-train --preset cifar-fs-5way-1shot" in capsys.readouterr().out
        # FC100 reads the same file: already there
        use_table("fc100", table)
        assert DL.main(["download", "fc100", "--root", str(dest), "--base-url", base, "--no-progress"]) == 0
        assert "already present" in capsys.readouterr().err
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(p.name for p in dest.iterdir()) == ["cifar-100-python.tar.gz"]
    d = load_dataset("fc100", dest, cache_dir=tmp_path / "c", check_counts=False, progress=False)
    assert d.images.shape == (600, 3, 32, 32)


@pytest.mark.parametrize("name, files", [
    ("tiered-imagenet", ["train_images_png.pkl", "test_labels.pkl", "tiered-imagenet.tar"]),
    ("mini-imagenet", ["train/", "test/"]),
    ("folder", ["ROOT/<class>/<image>"]),
])
def test_download_refusal_says_which_files_go_where(name, files, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        DL.main(["download", name])
    msg = _error(capsys)
    assert e.value.code == 2 and "cannot be downloaded" in msg
    assert str(tmp_path / "mamlpp_ext" / get_dataset(name).folder) in msg and get_dataset(name).env_var in msg
    for f in files:
        assert f in msg


def test_where_lists_every_dataset(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    monkeypatch.setenv("MAMLPP_CIFAR100_ROOT", str(tmp_path / "cifar"))
    assert DL.main(["where"]) == 0
    out = capsys.readouterr().out
    for spec in ("Omniglot", "mini-ImageNet", "CIFAR-FS", "FC100", "tieredImageNet", "CUB-200-2011", "image folder"):
        assert f"{spec}: " in out
    assert f"CIFAR-FS: {tmp_path / 'cifar'} ($MAMLPP_CIFAR100_ROOT; does not exist)" in out
    assert f"CUB-200-2011: {tmp_path / 'mamlpp_ext' / 'cub'} (default; $MAMLPP_CUB_ROOT is not set" in out
    assert "mamlpp-data download cub" in out



def test_no_progress_silences_the_data_bars_too(roots, tmp_path, capsys):
    """``--no-progress`` covers the first pass over the images and their preprocessing (a fresh
    cache), not only the training bars; without it those bars are shown."""
    assert _train(tmp_path / "quiet", "folder-5way-1shot", roots["folder"], tmp_path / "cache1", "batched") == 0
    err = capsys.readouterr().err
    assert "preprocessing" not in err and "checking" not in err and "img/s" not in err, err
    argv = [a for a in SMALL if a != "--no-progress"]
    assert T.main(["--preset", "folder-5way-1shot", "--dataset-root", str(roots["folder"]), "--cache-dir",
                   str(tmp_path / "cache2"), "--backend", "batched", "--run-dir", str(tmp_path / "loud"), "--device",
                   "cpu", *argv]) == 0
    assert "preprocessing" in capsys.readouterr().err
