"""Tests of the training command (mamlpp_ext.train): run folder contents, exact resume, atomic
checkpoints, top-k retention, SIGTERM, config building and rejected command lines.

Runs use a small generated Omniglot tree (lake split, one validation alphabet) and a tiny
network, so each takes a fraction of a second; one test trains on the real Omniglot when it
is present.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mamlpp_ext.training import checkpoints as ckp
from mamlpp_ext.training import run_data as RD
from mamlpp_ext.training import train as T
from mamlpp_ext.training.trainer import Trainer
from mamlpp_ext.model.config import MAMLConfig, from_preset

REPO = Path(__file__).resolve().parents[1]

TINY = dict(ways=3, shots=1, queries=1, meta_batch=2, num_stages=2, num_filters=4, inner_steps=2,
            eval_inner_steps=2, total_epochs=3, iterations_per_epoch=4, eval_tasks=6, msl_epochs=2)
TINY_SETS = [f"--set={k}={v}" for k, v in TINY.items() if k not in ("total_epochs", "iterations_per_epoch",
                                                                    "eval_tasks")]


pytestmark = pytest.mark.usefixtures("tmp_cache")  # fake_root and tmp_cache: conftest.py


def _data(root) -> RD.DataOptions:
    return RD.DataOptions(root=str(root), split="lake", lake_val_alphabets=1, check_counts=False)


def _trainer(run_dir, root, backend="batched", **kw) -> Trainer:
    cfg = kw.pop("config", None) or MAMLConfig(**TINY)
    return Trainer(cfg, run_dir, backend=backend, data=_data(root), progress=False, tensorboard=False,
                     handle_signals=False, **kw)


def _resume(run_dir, root, backend="batched", **kw) -> Trainer:
    return Trainer(None, run_dir, backend=backend, data=_data(root), progress=False, tensorboard=False,
                     handle_signals=False, resume=True, **kw)


def _full_state(trainer: Trainer) -> dict:
    s = trainer.learner.state_dict()
    return {"theta": s["theta"], "bn_weight": s["bn_weight"], "bn_bias": s["bn_bias"],
            "running_mean": s["running_mean"], "running_var": s["running_var"], "lslr": [s["lslr"]],
            "adam": [v for st in s["optimizer"]["state"].values() for v in st.values() if torch.is_tensor(v)]}


def _assert_same_state(a: Trainer, b: Trainer) -> None:
    sa, sb = _full_state(a), _full_state(b)
    assert sa.keys() == sb.keys()
    n = 0
    for k in sa:
        assert len(sa[k]) == len(sb[k]), k
        for x, y in zip(sa[k], sb[k]):
            assert torch.equal(x, y), f"{k} differs after resume (max |diff| {(x - y).abs().max().item()})"
            n += 1
    assert n > 10
    assert a.learner.optimizer.param_groups[0]["lr"] == b.learner.optimizer.param_groups[0]["lr"]
    assert a.learner.meta_steps_done == b.learner.meta_steps_done
    assert (a.epoch, a.iteration) == (b.epoch, b.iteration)


# ---------------------------------------------------------------------------
# A short run and its files
# ---------------------------------------------------------------------------

def test_short_run_writes_metrics_and_checkpoints(tmp_path, fake_root):
    run = tmp_path / "run"
    tr = _trainer(run, fake_root, keep_top_k=2, log_every=2)
    before = [t.clone() for t in tr.learner.theta]
    row = tr.fit()
    assert row["epoch"] == 3 and row["iteration"] == 12  # epochs count from 1 in what a user reads
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.learner.theta))  # it trained

    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [int(r["iteration"]) for r in rows] == [4, 8, 12]
    for r in rows:
        assert 0.0 <= float(r["val_accuracy"]) <= 1.0 and float(r["val_ci95"]) >= 0.0
        assert float(r["train_loss"]) > 0
    # CA over 3 epochs: the meta lr falls
    lrs = [float(r["meta_lr"]) for r in rows]
    assert lrs[0] == pytest.approx(1e-3) and lrs[0] > lrs[1] > lrs[2]

    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    epoch_recs = [r for r in recs if r["kind"] == "epoch"]
    assert [r["iteration"] for r in train_recs] == [2, 4, 6, 8, 10, 12]
    assert len(epoch_recs) == 3
    lslr = torch.tensor(epoch_recs[-1]["lslr"])
    assert lslr.shape == tr.learner.lslr.shape and torch.equal(lslr, tr.learner.lslr.detach())
    assert len(epoch_recs[-1]["lslr_names"]) == lslr.shape[0]
    # MSL weights: the first epoch uniform, the third (index 2 >= msl_epochs) final step only
    assert epoch_recs[0]["msl_weights"] == pytest.approx([0.5, 0.5])
    assert epoch_recs[2]["msl_weights"] == [0.0, 1.0]

    ck = run / "checkpoints"
    best = json.loads((ck / "best.json").read_text())
    assert len(best) == 2
    assert sorted(p.name for p in ck.glob("*.pt")) == sorted(["latest.pt"] + [b["path"] for b in best])
    val_by_epoch = {int(r["epoch"]): float(r["val_accuracy"]) for r in rows}
    ranked = sorted(val_by_epoch.items(), key=lambda kv: (-kv[1], kv[0]))[:2]
    assert [b["epoch"] for b in best] == [e for e, _ in ranked]
    latest = ckp.load_checkpoint(ck / "latest.pt")
    assert latest["epoch"] == 3 and latest["iteration"] == 12 and not latest["interrupted"]
    assert json.loads((run / "config.json").read_text())["config"]["ways"] == 3


def test_top_k_retention_keeps_the_k_best(tmp_path, fake_root, monkeypatch):
    """Feed chosen validation accuracies: the kept files are always the k best so far."""
    accs = iter([0.5, 0.7, 0.6, 0.9, 0.1])
    cfg = MAMLConfig(**{**TINY, "total_epochs": 5, "iterations_per_epoch": 1})
    tr = _trainer(tmp_path / "run", fake_root, config=cfg, keep_top_k=2)
    monkeypatch.setattr(tr, "validate", lambda: {"accuracy": next(accs), "ci95": 0.0, "loss": 1.0, "num_tasks": 6})
    tr.fit()
    ck = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ck.glob("epoch-*.pt")) == ["epoch-0002.pt", "epoch-0004.pt"]
    best = json.loads((ck / "best.json").read_text())
    assert [(b["epoch"], b["val_accuracy"]) for b in best] == [(4, 0.9), (2, 0.7)]
    # the kept epoch checkpoint holds that epoch's state: epoch-0004.pt after the fourth epoch
    assert ckp.load_checkpoint(ck / "epoch-0004.pt")["iteration"] == 4


def test_run_dir_with_checkpoint_needs_resume(tmp_path, fake_root):
    cfg = MAMLConfig(**{**TINY, "total_epochs": 1, "iterations_per_epoch": 1})
    _trainer(tmp_path / "run", fake_root, config=cfg).fit()
    with pytest.raises(FileExistsError, match="--resume"):
        _trainer(tmp_path / "run", fake_root, config=cfg)


# ---------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("stop_at", [6, 8])  # mid-epoch, and exactly at an epoch boundary
def test_interrupt_and_resume_equals_uninterrupted(tmp_path, fake_root, stop_at):
    full = _trainer(tmp_path / "full", fake_root)
    full.fit()

    part = _trainer(tmp_path / "part", fake_root)
    out = part.fit(stop_at_iteration=stop_at)
    assert out["interrupted"] and part.iteration == stop_at
    torch.manual_seed(1234)  # scramble the global RNG: resume must restore it
    resumed = _resume(tmp_path / "part", fake_root)
    assert resumed.iteration == stop_at
    assert torch.equal(resumed.learner.theta[0], part.learner.theta[0])
    resumed.fit()
    _assert_same_state(full, resumed)

    # the logs of the two runs agree (numbers and epochs; timings differ)
    def epochs(run):
        with open(run / "metrics.csv", newline="") as f:
            return [(r["epoch"], r["iteration"], r["train_loss"], r["val_accuracy"], r["val_loss"])
                    for r in csv.DictReader(f)]

    assert epochs(tmp_path / "full") == epochs(tmp_path / "part")
    assert json.loads((tmp_path / "full" / "checkpoints" / "best.json").read_text()) == \
        json.loads((tmp_path / "part" / "checkpoints" / "best.json").read_text())


def test_resumed_train_records_equal_uninterrupted(tmp_path, fake_root):
    """The "train" records (every 4 steps) of a run stopped at step 6 and resumed equal those of
    an uninterrupted run: the unfinished log window is checkpointed."""
    full = _trainer(tmp_path / "full", fake_root, log_every=4)
    full.fit()
    part = _trainer(tmp_path / "part", fake_root, log_every=4)
    part.fit(stop_at_iteration=6)
    _resume(tmp_path / "part", fake_root, log_every=4).fit()

    def records(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [(r["iteration"], r["loss"], r["accuracy"]) for r in map(json.loads, lines) if r["kind"] == "train"]

    assert len(records(tmp_path / "full")) == 3 and records(tmp_path / "full") == records(tmp_path / "part")


def test_resume_restores_rng_and_drops_logs_after_the_checkpoint(tmp_path, fake_root):
    part = _trainer(tmp_path / "run", fake_root, log_every=1)
    part.fit(stop_at_iteration=5)
    torch.manual_seed(7)
    expected = torch.rand(3)
    ckpt = ckp.load_checkpoint(part.latest_path)
    # a crash after logging but before the next checkpoint leaves stale records behind
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "epoch": 1, "iteration": 6, "loss": 9.0}) + "\n")
    torch.manual_seed(7)
    ckp.set_rng_state(ckp.rng_state())  # round trip of the format
    assert torch.equal(torch.rand(3), expected)
    resumed = _resume(tmp_path / "run", fake_root, log_every=1)
    assert torch.equal(torch.get_rng_state(), ckpt["rng"]["torch"])
    iters = [json.loads(line)["iteration"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(iters) == 5
    resumed.fit()
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs if r["kind"] == "train"] == list(range(1, 13))


def test_resume_cli_rejects_a_changed_config(tmp_path, fake_root, capsys):
    run = tmp_path / "run"
    base = [*TINY_SETS, "--epochs", "2", "--iters-per-epoch", "2", "--eval-tasks", "3", "--dataset-root",
            str(fake_root), "--split", "lake", "--lake-val-alphabets", "1", "--allow-partial-data", "--run-dir",
            str(run), "--no-progress", "--no-tensorboard", "--backend", "batched"]
    assert T.main(base) == 0
    with pytest.raises(SystemExit):
        T.main(["--run-dir", str(run), "--resume", "--set", "inner_lr=0.5", "--no-progress"])
    assert "inner_lr" in capsys.readouterr().err
    # resuming a finished run is a no-op that succeeds
    assert T.main(["--run-dir", str(run), "--resume", "--no-progress", "--no-tensorboard"]) == 0


# ---------------------------------------------------------------------------
# Atomic checkpoints
# ---------------------------------------------------------------------------

def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, fake_root, monkeypatch):
    tr = _trainer(tmp_path / "run", fake_root)
    tr.fit(stop_at_iteration=4)  # end of epoch 0: latest.pt written
    good = tr.latest_path.read_bytes()

    real_save = torch.save

    def torn_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(100)  # half a file, then the "crash"
        raise OSError("disk vanished")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk vanished"):
        tr.save_latest()
    monkeypatch.setattr(torch, "save", real_save)
    assert tr.latest_path.read_bytes() == good
    assert ckp.load_checkpoint(tr.latest_path)["iteration"] == 4
    assert [p.name for p in tr.ckpt_dir.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "x.pt"
    ckp.atomic_save({"a": torch.arange(3)}, p)
    ckp.atomic_save({"a": torch.arange(5)}, p)
    assert torch.equal(torch.load(p, weights_only=True)["a"], torch.arange(5))


def test_load_checkpoint_rejects_foreign_and_torn_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckp.load_checkpoint(tmp_path / "nope.pt")
    torch.save({"hello": 1}, tmp_path / "f.pt")
    with pytest.raises(ValueError, match="not a mamlpp_ext training checkpoint"):
        ckp.load_checkpoint(tmp_path / "f.pt")
    (tmp_path / "t.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        ckp.load_checkpoint(tmp_path / "t.pt")


# ---------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------

def test_sigterm_saves_a_checkpoint(tmp_path, fake_root):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mamlpp_ext.training.train", *TINY_SETS, "--epochs", "50", "--iters-per-epoch", "200",
           "--eval-tasks", "3", "--dataset-root", str(fake_root), "--split", "lake", "--lake-val-alphabets", "1",
           "--allow-partial-data", "--run-dir", str(run), "--no-progress", "--no-tensorboard", "--log-every", "1",
           "--backend", "batched", "--threads", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        log = run / "metrics.jsonl"
        while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 3):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "checkpoint saved" in err
    ck = ckp.load_checkpoint(run / "checkpoints" / "latest.pt")
    assert ck["interrupted"] and ck["iteration"] >= 3
    last = json.loads(log.read_text().splitlines()[-1])
    assert last == {"kind": "interrupt", "epoch": 1, "iteration": ck["iteration"], "signal": "SIGTERM"}


# ---------------------------------------------------------------------------
# Config building and rejected command lines
# ---------------------------------------------------------------------------

def test_build_config_precedence(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("preset: omniglot-20way-5shot\ninner_steps: 3\nmeta_lr: 0.002\n")
    cfg = T.build_config(None, str(yml), ("inner_steps=4", "grad_clamp=null", "use_msl=false"), total_epochs=7)
    assert (cfg.ways, cfg.shots) == (20, 5)
    assert cfg.inner_steps == 4 and cfg.meta_lr == 0.002 and cfg.grad_clamp is None and cfg.use_msl is False
    assert cfg.total_epochs == 7
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"num_filters": 8}))
    cfg = T.build_config("mini-imagenet-5way-1shot", str(js), ("min_meta_lr=1e-5",))
    assert cfg.num_filters == 8 and cfg.min_meta_lr == 1e-5 and cfg.image_channels == 3
    assert T.build_config("omniglot-5way-1shot-maml").learnable_inner_lr is False
    assert T.parse_value("1e-3") == 1e-3 and T.parse_value("3") == 3 and T.parse_value("abc") == "abc"


def test_every_preset_builds():
    from mamlpp_ext.model.config import preset_names

    for name in preset_names():
        assert T.build_config(name) == from_preset(name)


@pytest.mark.parametrize("argv, needle", [
    (["--preset", "omniglot-7way-1shot"], "--preset: unknown preset 'omniglot-7way-1shot'"),
    (["--set", "no_such_field=1"], "unknown config field 'no_such_field'"),
    (["--set", "inner_steps"], "--set expects key=value"),
    (["--set", "inner_steps=0"], "inner_steps must be >= 1"),
    (["--set", "ways=two"], "MAMLConfig.ways must be an int"),
    (["--backend", "turbo"], "--backend: unknown backend 'turbo'"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "bogus"], "--device"),
    (["--dataset-root", "/no/such/folder"], "--dataset-root: /no/such/folder does not exist"),
    (["--config", "/no/such.yaml"], "--config: no such file"),
    (["--resume"], "--resume needs --run-dir"),
    (["--graph", "on", "--device", "cpu"], "graph mode needs a CUDA device"),
])
def test_bad_command_lines_name_the_argument(argv, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        T.main([*argv, "--run-dir", str(tmp_path / "r")] if argv != ["--resume"] else argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_missing_data_root_says_what_was_expected(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        T.main(["--preset", "omniglot-5way-1shot", "--dataset-root", str(empty), "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert "images_background" in err


def test_bad_config_file_contents(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(SystemExit):
        T.main(["--config", str(f), "--run-dir", str(tmp_path / "r")])
    assert "must hold a mapping" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------

def test_short_real_omniglot_run_learns(tmp_path, real_omniglot_root):
    import mamlpp_ext

    backend = "fused" if mamlpp_ext.has_extension() else "batched"
    # 5-way 1-shot, a narrower net and first-order steps so that it fits in well under a minute
    cfg = from_preset("omniglot-5way-1shot", num_filters=16, meta_batch=4, inner_steps=2, eval_inner_steps=2,
                      second_order=False, use_msl=False, total_epochs=1, iterations_per_epoch=60, eval_tasks=100,
                      meta_lr=3e-3, cosine_annealing=False)
    tr = Trainer(cfg, tmp_path / "run", backend=backend, progress=False, tensorboard=False, handle_signals=False,
                   eval_batch_size=25)
    row = tr.fit()
    assert row["val_accuracy"] > 0.5, row  # chance is 0.2
