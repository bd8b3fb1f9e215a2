"""The original 20-way one-shot benchmark (all_runs.zip): layout, labels, polarity, scoring."""

import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from mamlpp_ext.data import DatasetNotFoundError, evaluate_one_shot, load_omniglot, load_one_shot_runs


def _nearest_neighbour(sx, sy, qx):
    return sy[torch.cdist(qx.flatten(1), sx.flatten(1)).argmin(1)]


def _png(seed):
    rng = np.random.default_rng(seed)
    arr = rng.random((105, 105)) > 0.9  # sparse True = black strokes
    im = Image.fromarray(~arr).convert("1")  # white background, like the real files
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _fake_runs(folder, runs=2, ways=3, as_zip=True):
    """runNN/{training/classXX.png, test/itemXX.png, class_labels.txt}; item i answers class perm[i]."""
    files = {}
    for r in range(1, runs + 1):
        perm = np.random.default_rng(r).permutation(ways)
        lines = []
        for c in range(ways):
            files[f"run{r:02d}/training/class{c + 1:02d}.png"] = _png(100 * r + c)
        for i in range(ways):
            files[f"run{r:02d}/test/item{i + 1:02d}.png"] = files[f"run{r:02d}/training/class{perm[i] + 1:02d}.png"]
            lines.append(f"run{r:02d}/test/item{i + 1:02d}.png run{r:02d}/training/class{perm[i] + 1:02d}.png")
        files[f"run{r:02d}/class_labels.txt"] = ("\n".join(lines) + "\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    if as_zip:
        with zipfile.ZipFile(folder / "all_runs.zip", "w") as zf:
            for n, b in files.items():
                zf.writestr(n, b)
    else:
        for n, b in files.items():
            p = folder / "all_runs" / n
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b)
    return folder


@pytest.mark.parametrize("as_zip", [True, False])
def test_fake_benchmark_layout_and_scoring(tmp_path, as_zip):
    root = _fake_runs(tmp_path / "og", as_zip=as_zip)
    runs = load_one_shot_runs(root)
    assert [r.name for r in runs] == ["run01", "run02"]
    for r in runs:
        assert r.support_x.shape == (3, 1, 28, 28) and r.query_x.shape == (3, 1, 28, 28)
        assert r.support_y.tolist() == [0, 1, 2]
        perm = np.random.default_rng(int(r.name[3:])).permutation(3)
        assert r.query_y.tolist() == perm.tolist()
        # in the fake, test items are copies of their class image
        assert torch.equal(r.query_x, r.support_x[r.query_y])
        ep = r.as_episode()
        assert ep.support_x.shape == (1, 3, 1, 28, 28) and ep.query_y.shape == (1, 3)
    res = evaluate_one_shot(_nearest_neighbour, runs)
    assert res["accuracy"] == 1.0 and res["error"] == 0.0 and len(res["runs"]) == 2
    wrong = evaluate_one_shot(lambda sx, sy, qx: (_nearest_neighbour(sx, sy, qx) + 1) % 3, runs)
    assert wrong["accuracy"] == 0.0
    scores = evaluate_one_shot(lambda sx, sy, qx: -torch.cdist(qx.flatten(1), sx.flatten(1)), runs)
    assert scores["accuracy"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        evaluate_one_shot(lambda sx, sy, qx: torch.zeros(5, dtype=torch.long), runs)


def test_missing_benchmark(tmp_path):
    (tmp_path / "og").mkdir()
    with pytest.raises(DatasetNotFoundError, match="all_runs.zip"):
        load_one_shot_runs(tmp_path / "og")


@pytest.fixture(scope="module")
def real_runs(real_omniglot_root):
    root = real_omniglot_root
    if not (root / "all_runs.zip").is_file() and not (root / "all_runs").is_dir():
        pytest.skip(f"no all_runs.zip in {root}")
    return load_one_shot_runs(root)


def test_real_runs_shapes_and_labels(real_runs):
    assert len(real_runs) == 20
    for r in real_runs:
        assert r.support_x.shape == (20, 1, 28, 28) and r.query_x.shape == (20, 1, 28, 28)
        assert r.support_y.tolist() == list(range(20))
        assert sorted(r.query_y.tolist()) == list(range(20))  # one test item per class
        assert float(r.support_x.min()) >= 0.0 and float(r.support_x.max()) <= 1.0


def test_real_runs_polarity_and_preprocessing_match_omniglot(real_runs):
    # PROVENANCE.md: run02/training/class01.png is images_evaluation/Atlantean/character01/1011_03.png
    data = load_omniglot(progress=False)
    i = data.files.index("Atlantean/character01/1011_03.png")
    run = next(r for r in real_runs if r.name == "run02")
    j = run.support_files.index("run02/training/class01.png")
    np.testing.assert_allclose(run.support_x[j, 0].numpy(), data.images[i, 0] / 255.0, atol=1e-6)
    # same polarity as the training data: mostly background, at 1.0
    means = torch.stack([r.support_x.mean() for r in real_runs])
    assert (means > 0.8).all()
    assert abs(float(means.mean()) - data.images.mean() / 255.0) < 0.05


def test_real_scoring(real_runs):
    chance = evaluate_one_shot(lambda sx, sy, qx: torch.zeros(20, dtype=torch.long), real_runs)
    assert all(abs(p["accuracy"] - 0.05) < 1e-12 for p in chance["runs"])
    nn = evaluate_one_shot(_nearest_neighbour, real_runs)
    # pixel 1-nearest-neighbour is far above chance (Lake et al. report ~22% accuracy for it)
    assert 0.12 < nn["accuracy"] < 0.5 and abs(nn["error"] - (1 - nn["accuracy"])) < 1e-12
