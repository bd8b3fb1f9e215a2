"""mamlpp-reproduce: the training plan (6 configurations x 3 seeds, folder names the table step
finds, shortened schedules), running it (skip finished, resume unfinished), and the paper-style
table (each run's top-k ensemble on the fixed test tasks; mean ± std over seeds beside the
paper's numbers; missing and unfinished seeds reported), as text and JSON. Runs are tiny networks
on a generated Omniglot tree."""

from __future__ import annotations

import json
import math
import shlex

import pytest

from mamlpp_ext.training import evaluate as E
from mamlpp_ext.training import reproduce as R
from mamlpp_ext.training.run_data import DataOptions
from mamlpp_ext.training.trainer import Trainer
from mamlpp_ext.model.config import from_preset

pytestmark = pytest.mark.usefixtures("tmp_cache")  # conftest.py

PRESET = "omniglot-5way-1shot"
TINY = dict(num_stages=2, num_filters=4, inner_steps=1, eval_inner_steps=1, meta_batch=2, msl_epochs=1)
TINY_SETS = [f"--set={k}={v}" for k, v in TINY.items()]
DATA_ARGS = ["--split", "lake", "--lake-val-alphabets", "1", "--allow-partial-data"]


def test_paper_numbers_and_configs():
    assert R.CONFIGS == tuple(R.PAPER) and len(R.CONFIGS) == 6 and R.SEEDS == (0, 1, 2)
    assert R.PAPER["omniglot-5way-1shot"] == {"MAML++": (99.47, 0.16), "MAML": (98.7, 0.4)}
    assert R.PAPER["omniglot-20way-5shot"]["MAML++"] == (99.33, 0.03)
    assert R.PAPER["mini-imagenet-5way-5shot"] == {"MAML++": (68.32, 0.44), "MAML": (63.11, 0.92)}
    assert "How to train your MAML" in R.PAPER_CITATION and "ICLR 2019" in R.PAPER_CITATION
    for preset in R.CONFIGS:
        from_preset(preset)  # each configuration is a preset


def test_plan(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert R.main(["plan", "--runs-dir", str(runs), "--epochs", "2", "--iters-per-epoch", "10", "--eval-tasks", "50",
                   "--device", "cpu", "--workers", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 * 3 + 1
    cmds = [shlex.split(line) for line in lines[:-1]]
    assert {(c[c.index("--preset") + 1], int(c[c.index("--seed") + 1])) for c in cmds} == \
        {(p, s) for p in R.CONFIGS for s in R.SEEDS}
    for c in cmds:
        assert c[0] == "mamlpp-train"
        assert c[c.index("--run-dir") + 1] == str(runs / f"{c[c.index('--preset') + 1]}-seed{c[c.index('--seed') + 1]}")
        for flag, value in (("--epochs", "2"), ("--iters-per-epoch", "10"), ("--eval-tasks", "50"),
                            ("--device", "cpu"), ("--workers", "2")):
            assert c[c.index(flag) + 1] == value
    assert shlex.split(lines[-1]) == ["mamlpp-reproduce", "table", str(runs)]
    # the folder name is the one mamlpp-train gives by default
    assert R.run_dir_name(PRESET, 2) == f"{PRESET}-seed2"


def test_rejected_arguments(capsys):
    for argv, text in ((["plan", "--configs", "omniglot-5way-1shot-maml"], "unknown configuration"),
                       (["plan", "--epochs", "0"], "--epochs must be >= 1"),
                       (["table", "--unknown-option"], "unrecognized arguments"),
                       (["table", "/nonexistent/runs"], "no such folder")):
        with pytest.raises(SystemExit) as e:
            R.main(argv)
        assert e.value.code == 2 and text in capsys.readouterr().err, argv


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fake_root):
    """Seeds 0 and 1 of omniglot-5way-1shot trained by `mamlpp-reproduce train` (2 epochs x 2
    steps), seed 3 stopped half-way, seed 2 missing."""
    mp = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("repro")
    mp.setenv("MAMLPP_CACHE_DIR", str(base / "cache"))
    runs_dir = base / "runs"
    argv = ["train", "--runs-dir", str(runs_dir), "--configs", PRESET, "--seeds", "0", "1", "--epochs", "2",
            "--iters-per-epoch", "2", "--eval-tasks", "6", "--device", "cpu", "--backend", "batched",
            "--omniglot-root", str(fake_root), "--no-progress", *TINY_SETS, *DATA_ARGS, "--no-tensorboard"]
    assert R.main(argv) == 0
    cfg = from_preset(PRESET, seed=3, total_epochs=2, iterations_per_epoch=2, eval_tasks=6, **TINY)
    data = DataOptions(root=str(fake_root), split="lake", lake_val_alphabets=1, check_counts=False)
    Trainer(cfg, runs_dir / f"{PRESET}-seed3", backend="batched", data=data, progress=False, tensorboard=False,
            handle_signals=False).fit(stop_at_iteration=3)
    yield runs_dir, argv
    mp.undo()


def test_train_skips_finished_runs_and_resumes_unfinished(runs, capsys):
    runs_dir, argv = runs
    for seed in (0, 1):
        st = R.run_status(runs_dir / f"{PRESET}-seed{seed}")
        assert st["state"] == "finished" and st["epochs_done"] == 2 and st["config"]["seed"] == seed
    st = R.run_status(runs_dir / f"{PRESET}-seed3")
    assert st["state"] == "unfinished" and st["epochs_done"] == 1
    assert R.run_status(runs_dir / f"{PRESET}-seed2") == {"state": "missing"}
    # the plan marks the finished runs and resumes the unfinished one
    assert R.main(["plan", "--runs-dir", str(runs_dir), "--configs", PRESET, "--seeds", "0", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("# finished") and "--resume" not in lines[0]
    assert "--resume" in lines[1] and lines[1].endswith("# unfinished")
    # running again trains nothing
    assert R.main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("already finished, skipped") == 2 and "training:" not in err


def test_table(runs, tmp_path, capsys):
    runs_dir, _ = runs
    argv = ["table", str(runs_dir), "--configs", PRESET, "omniglot-20way-1shot", "--tasks", "20", "--device", "cpu",
            "--no-progress", "--output", str(tmp_path / "table.json")]
    assert R.main(argv) == 0
    out = capsys.readouterr().out
    table = json.loads((tmp_path / "table.json").read_text())
    entry, empty = table["configs"]
    assert entry["config"] == PRESET and empty["config"] == "omniglot-20way-1shot"
    by_seed = {r["seed"]: r for r in entry["runs"]}
    assert sorted(by_seed) == [0, 1, 2, 3]
    assert by_seed[2]["status"] == "missing" and by_seed[3]["status"] == "unfinished"
    assert "accuracy" not in by_seed[3] and "accuracy" not in by_seed[2]
    accs = [by_seed[s]["accuracy"] for s in (0, 1)]
    assert entry["scored"] == 2
    assert entry["mean"] == pytest.approx(sum(accs) / 2)
    assert entry["std"] == pytest.approx(math.sqrt(sum((a - entry["mean"]) ** 2 for a in accs)))  # ddof=1, n=2
    for s in (0, 1):
        r = by_seed[s]
        assert r["members"] == 2 and r["num_tasks"] == 20 and 0 <= r["accuracy"] <= 100
        assert any("shortened schedule: 2 epochs x 2 meta-steps (paper: 100 x 500)" in n for n in r["notes"])
        assert any("settings differ from the preset" in n and "num_filters=4" in n for n in r["notes"])
    assert entry["paper"] == {"MAML++": [99.47, 0.16], "MAML": [98.7, 0.4]}
    assert [r["status"] for r in empty["runs"]] == ["missing"] * 3 and empty["mean"] is None
    assert table["citation"] == R.PAPER_CITATION and table["protocol"]["test_tasks"] == 20
    # the text: one row per configuration, beside the paper's numbers, missing/unfinished seeds named
    row = next(line for line in out.splitlines() if line.startswith("| Omniglot 5-way 1-shot |"))
    assert f"{entry['mean']:.2f} ± {entry['std']:.2f}" in row and "2 of 4" in row
    assert "2: missing" in row and "3: unfinished (1/2 epochs)" in row and "99.47 ± 0.16" in row and "98.7 ± 0.4" in row
    assert "| Omniglot 20-way 1-shot | — | 0 of 3 |" in out and "How to train your MAML" in out
    # each run's report is stored in mamlpp-eval's format and reused while its checkpoints are the same
    rep = json.loads((runs_dir / f"{PRESET}-seed0" / "eval-test.json").read_text())
    assert rep["test"]["num_tasks"] == 20 and 100 * rep["test"]["accuracy"] == pytest.approx(by_seed[0]["accuracy"])
    assert R.main(argv + ["--include-unfinished"]) == 0
    again = json.loads((tmp_path / "table.json").read_text())["configs"][0]
    again_by_seed = {r["seed"]: r for r in again["runs"]}
    assert again_by_seed[0]["reused_report"] and again_by_seed[0]["accuracy"] == by_seed[0]["accuracy"]
    assert "accuracy" in again_by_seed[3] and any("scored anyway" in n for n in again_by_seed[3]["notes"])
    assert again["scored"] == 3


def test_table_agrees_with_mamlpp_eval(runs, tmp_path, capsys):
    """mamlpp-eval's report on a run folder is the table's for that run (the same functions)."""
    runs_dir, _ = runs
    run = runs_dir / f"{PRESET}-seed1"
    assert E.main([str(run), "--tasks", "12", "--device", "cpu", "--no-progress"]) == 0
    rep = json.loads((run / "eval-test.json").read_text())
    table = R.paper_table(runs_dir, configs=[PRESET], seeds=[1], num_tasks=12, device="cpu", log=lambda m: None)
    r = next(r for r in table["configs"][0]["runs"] if r["seed"] == 1)
    assert r["reused_report"] and r["accuracy"] == pytest.approx(100 * rep["test"]["accuracy"])
    fresh = R.paper_table(runs_dir, configs=[PRESET], seeds=[1], num_tasks=12, device="cpu", rescore=True,
                          log=lambda m: None)
    r2 = next(r for r in fresh["configs"][0]["runs"] if r["seed"] == 1)
    assert not r2["reused_report"] and r2["accuracy"] == pytest.approx(r["accuracy"])


def test_wrong_configuration_in_a_folder(runs, tmp_path):
    """A folder named after a configuration but holding another task shape is reported, not scored."""
    runs_dir, _ = runs
    import shutil

    other = tmp_path / "runs"
    shutil.copytree(runs_dir / f"{PRESET}-seed0", other / "omniglot-20way-1shot-seed0")
    table = R.paper_table(other, configs=["omniglot-20way-1shot"], seeds=[0], num_tasks=6, device="cpu",
                          log=lambda m: None)
    r = table["configs"][0]["runs"][0]
    assert r["status"] == "wrong configuration" and "not omniglot-20way-1shot" in r["error"] and "accuracy" not in r
