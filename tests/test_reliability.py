"""Runs that cannot be lost or silently wrong (docs/training.md, "Reliability"):

* the run-folder lock: a second writer is refused naming the holder; a stale lock of a dead
  process is taken over with a note; a lock of another host is refused until --break-lock;
  mamlpp-eval and mamlpp-reproduce do not write reports into a folder being trained;
* divergence: the run stops at the first non-finite step, naming it, with the last good
  checkpoint kept and nothing NaN saved (and the same under torchrun: test_distributed.py);
* forks stand on their own; the dataset root is recorded absolute and a moved dataset is found
  from --dataset-root; a user network's structure is recorded and a changed one refused;
* a full disk while checkpointing leaves the previous checkpoint intact and says so;
* the smaller things: epochs counted from 1 everywhere (old runs renumbered on resume), steps/s
  after a resume, the Ctrl-C note, the TensorBoard note, --threads, safe loading in the docs.

Runs use a generated Omniglot tree and a tiny network (conftest.py: fake_root, tmp_cache).
"""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from mamlpp_ext.model.config import MAMLConfig
from mamlpp_ext.training import checkpoints as ckp
from mamlpp_ext.training import evaluate as E
from mamlpp_ext.training import reproduce as R
from mamlpp_ext.training import run_data as RD
from mamlpp_ext.training import train as T
from mamlpp_ext.training import trainer as trainer_module
from mamlpp_ext.training.runlock import LOCK_NAME, RunLock, RunLockedError
from mamlpp_ext.training.trainer import Trainer, TrainingDiverged

REPO = Path(__file__).resolve().parents[1]

TINY = dict(ways=3, shots=1, queries=1, meta_batch=2, num_stages=2, num_filters=4, inner_steps=2,
            eval_inner_steps=2, total_epochs=3, iterations_per_epoch=4, eval_tasks=6, msl_epochs=2)
TINY_SETS = [f"--set={k}={v}" for k, v in TINY.items() if k not in ("total_epochs", "iterations_per_epoch",
                                                                    "eval_tasks")]

pytestmark = pytest.mark.usefixtures("tmp_cache", "one_intra_op_thread")  # conftest.py


def _data(root) -> RD.DataOptions:
    return RD.DataOptions(root=str(root), split="lake", lake_val_alphabets=1, check_counts=False)


def _trainer(run_dir, root, **kw) -> Trainer:
    cfg = kw.pop("config", None) or MAMLConfig(**TINY)
    kw.setdefault("log", lambda m: None)
    return Trainer(cfg, run_dir, backend="batched", data=_data(root), progress=False, tensorboard=False,
                   handle_signals=False, **kw)


def _cli(root, run, *extra) -> list[str]:
    return [*TINY_SETS, "--epochs", "2", "--iters-per-epoch", "2", "--eval-tasks", "3", "--dataset-root", str(root),
            "--split", "lake", "--lake-val-alphabets", "1", "--allow-partial-data", "--run-dir", str(run),
            "--no-progress", "--no-tensorboard", "--backend", "batched", *extra]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(run: Path, pid: int, host: str) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host, "started": "2026-12-03 10:00:00 UTC",
                                             "command": "mamlpp-train --run-dir x"}) + "\n")


def _state(trainer: Trainer) -> list[torch.Tensor]:
    lrn = trainer.learner
    out = [t.detach().clone() for t in lrn.parameters() + lrn.running_stats]
    for st in lrn.optimizer.state.values():
        out += [v.detach().clone() for v in st.values() if torch.is_tensor(v)]
    return out


# ---------------------------------------------------------------------------
# The run-folder lock
# ---------------------------------------------------------------------------

def test_second_trainer_on_a_run_folder_is_refused_naming_the_holder(tmp_path, fake_root, capsys):
    run = tmp_path / "run"
    first = _trainer(run, fake_root)  # holds the lock from construction until fit() returns
    assert (run / LOCK_NAME).is_file()
    with pytest.raises(RunLockedError) as exc:
        _trainer(run, fake_root)
    msg = str(exc.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()} since 20" in msg and "UTC" in msg
    # the command line too: a one-line usage error, exit 2, naming the holder
    with pytest.raises(SystemExit) as sysexit:
        T.main(_cli(fake_root, run))
    assert sysexit.value.code == 2
    err = capsys.readouterr().err
    assert f"is locked by pid {os.getpid()}" in err and len(err.strip().splitlines()[-1]) > 40
    # the refused trainers wrote nothing: the first run goes on and ends cleanly
    first.fit()
    assert not (run / LOCK_NAME).exists()  # released when fit returns
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == TINY["total_epochs"]
    # a run refused after taking the lock (here: a bad argument) leaves no empty folder behind
    with pytest.raises(ValueError, match="keep_top_k"):
        _trainer(tmp_path / "never", fake_root, keep_top_k=0)
    assert not (tmp_path / "never").exists()


def test_a_second_process_is_refused_while_the_first_trains(tmp_path, fake_root):
    """Two real processes: the issue's case (both used to exit 0 and interleave their logs)."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    long = [sys.executable, "-m", "mamlpp_ext.training.train", *TINY_SETS, "--epochs", "50", "--iters-per-epoch",
            "200", "--eval-tasks", "3", "--dataset-root", str(fake_root), "--split", "lake", "--lake-val-alphabets",
            "1", "--allow-partial-data", "--run-dir", str(run), "--no-progress", "--no-tensorboard", "--backend",
            "batched", "--threads", "1", "--seed", "0"]
    proc = subprocess.Popen(long, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "config.json").exists():
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        second = subprocess.run([*long[:-1], "1"], env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"is locked by pid {proc.pid} on host {socket.gethostname()}" in second.stderr
        assert json.loads((run / "config.json").read_text())["config"]["seed"] == 0  # not overwritten
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)


def test_a_new_run_does_not_mix_with_leftovers_of_one_that_saved_nothing(tmp_path, fake_root):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": {"seed": 1}}))
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "epoch": 1, "iteration": 3}) + "\n")
    notes = []
    _trainer(run, fake_root, log=notes.append, log_every=1).fit(stop_at_iteration=2)
    assert any("saved no checkpoint; starting afresh" in n for n in notes)
    assert json.loads((run / "config.json").read_text())["config"]["seed"] == 0
    iters = [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert iters == [1, 2, 2]  # two train records and the interrupt record, nothing of the other run


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_note(tmp_path, fake_root):
    run = tmp_path / "run"
    pid = _dead_pid()
    _write_lock(run, pid, socket.gethostname())
    notes = []
    tr = _trainer(run, fake_root, log=notes.append)
    assert any(f"taking over the stale lock of {run}: pid {pid}" in n and "no longer running" in n for n in notes)
    holder = json.loads((run / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid()
    tr.close()
    assert not (run / LOCK_NAME).exists()


def test_lock_of_another_host_is_refused_until_broken_by_hand(tmp_path, fake_root, capsys):
    run = tmp_path / "run"
    _write_lock(run, 4242, "gpu-node-17.example")
    with pytest.raises(RunLockedError, match="pid 4242 on host gpu-node-17.example.*pass --break-lock"):
        _trainer(run, fake_root)
    assert json.loads((run / LOCK_NAME).read_text())["host"] == "gpu-node-17.example"  # untouched
    with pytest.raises(SystemExit):
        T.main(_cli(fake_root, run))
    assert "--break-lock" in capsys.readouterr().err
    assert T.main(_cli(fake_root, run, "--break-lock")) == 0
    err = capsys.readouterr().err
    assert "breaking the lock" in err and "gpu-node-17.example" in err
    assert not (run / LOCK_NAME).exists()


def test_lock_waits_for_a_holder_that_finishes(tmp_path):
    held = RunLock(tmp_path / "run", "first").acquire()
    threading.Timer(0.6, held.release).start()
    t0 = time.monotonic()
    notes = []
    second = RunLock(tmp_path / "run", "second", wait=30, log=notes.append).acquire()
    assert 0.4 < time.monotonic() - t0 < 25 and second.held and any("waiting for" in n for n in notes)
    second.release()
    with pytest.raises(RunLockedError):  # without wait: refused at once
        with RunLock(tmp_path / "run", "a"):
            RunLock(tmp_path / "run", "b").acquire()


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, fake_root):
    """A finished tiny run (3 epochs of 4 steps, top 2 kept)."""
    mp = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("done")
    mp.setenv("MAMLPP_CACHE_DIR", str(base / "cache"))
    tr = _trainer(base / "run", fake_root, keep_top_k=2)
    tr.fit()
    yield base / "run"
    mp.undo()


def test_eval_does_not_write_into_a_folder_being_trained(done_run, tmp_path, capsys):
    report = done_run / "eval-test.json"
    report.unlink(missing_ok=True)
    with RunLock(done_run, "mamlpp-train"):
        with pytest.raises(SystemExit) as exc:
            E.main([str(done_run), "--tasks", "3", "--no-progress"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "is locked by pid" in err and "--wait" in err and "--output" in err
        assert not report.exists()
        # a report written elsewhere needs no lock
        assert E.main([str(done_run), "--tasks", "3", "--no-progress", "--output", str(tmp_path / "r.json")]) == 0
    # --wait: waits until the holder is done, then writes
    lock = RunLock(done_run, "mamlpp-train").acquire()
    threading.Timer(1.0, lock.release).start()
    assert E.main([str(done_run), "--tasks", "3", "--no-progress", "--wait"]) == 0
    assert report.is_file() and not (done_run / LOCK_NAME).exists()


def test_reproduce_table_marks_a_run_being_trained_busy(tmp_path, fake_root):
    runs = tmp_path / "runs"
    run = runs / R.run_dir_name("omniglot-5way-1shot", 0)
    cfg = MAMLConfig(**{**TINY, "ways": 5, "total_epochs": 1, "iterations_per_epoch": 1})  # the preset's shape
    Trainer(cfg, run, backend="batched", data=_data(fake_root), progress=False, tensorboard=False,
            handle_signals=False, log=lambda m: None).fit()
    with RunLock(run, "mamlpp-train"):
        table = R.paper_table(runs, configs=["omniglot-5way-1shot"], seeds=[0], num_tasks=3, log=lambda m: None)
    r = table["configs"][0]["runs"][0]
    assert r["status"] == "busy" and "score it when its training is done" in r["error"]
    assert not (run / "eval-test.json").exists()


def test_reproduce_train_holds_the_runs_folder(tmp_path, capsys):
    runs = tmp_path / "runs"
    with RunLock(runs, "mamlpp-reproduce train"):
        with pytest.raises(SystemExit):
            R.main(["train", "--runs-dir", str(runs), "--configs", "omniglot-5way-1shot", "--seeds", "0"])
    assert f"{runs} is locked by pid {os.getpid()}" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------

def _poison(trainer: Trainer, at_iteration: int) -> None:
    """NaN images in the meta-step that starts when ``at_iteration`` steps are done."""
    real = trainer.learner.train_step

    def poisoned(sx, sy, qx, qy, epoch):
        if trainer.iteration == at_iteration:
            sx = torch.full_like(sx, float("nan"))
        return real(sx, sy, qx, qy, epoch=epoch)

    trainer.learner.train_step = poisoned


def test_run_stops_at_the_first_bad_step_keeping_the_last_good_checkpoint(tmp_path, fake_root):
    ref = _trainer(tmp_path / "ref", fake_root, log_every=0)
    ref.fit(stop_at_iteration=5)  # the state after 5 good steps
    run = tmp_path / "run"
    tr = _trainer(run, fake_root, log_every=0)  # metrics read at the end of the epoch: steps 6-8 pending
    _poison(tr, 5)  # the 6th step (epoch 2, step 2) gets NaN images
    with pytest.raises(TrainingDiverged) as exc:
        tr.fit()
    msg = str(exc.value)
    assert "meta-step 6 (epoch 2 of 3, step 2 of 4)" in msg and "not finite" in msg
    assert f"{run / 'checkpoints' / 'latest.pt'} (epoch 1 done, meta-step 4), is kept" in msg
    assert (exc.value.iteration, exc.value.epoch) == (6, 2)
    # the learner is exactly as before the bad step: steps 7 and 8 were dropped too
    for a, b in zip(_state(tr), _state(ref)):
        assert torch.equal(a, b)
    # the last good checkpoint and the top-k list are untouched; nothing NaN was saved
    latest = ckp.load_checkpoint(run / "checkpoints" / "latest.pt")
    assert (latest["epoch"], latest["iteration"]) == (1, 4)
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert [b["epoch"] for b in best] == [1] and all(math.isfinite(b["val_accuracy"]) for b in best)
    for f in (run / "checkpoints").glob("*.pt"):
        state = ckp.load_checkpoint(f)["learner"]
        assert all(torch.isfinite(t).all() for t in state["theta"])
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"kind": "diverged", "epoch": 2, "iteration": 6} in recs
    assert [int(r["epoch"]) for r in csv.DictReader(open(run / "metrics.csv"))] == [1]
    assert not (run / LOCK_NAME).exists()


def test_cli_divergence_exits_3_naming_the_step(tmp_path, fake_root, capsys):
    """The issue's --set inner_lr=1e30: NaN from the first step; no checkpoint is ever written."""
    run = tmp_path / "run"
    assert T.main(_cli(fake_root, run, "--set", "inner_lr=1e30")) == T.EXIT_DIVERGED == 3
    err = capsys.readouterr().err
    assert "training diverged at meta-step 1 (epoch 1 of 2, step 1 of 2)" in err
    assert "no checkpoint was written before it" in err
    assert not (run / "checkpoints" / "latest.pt").exists() and not (run / "checkpoints" / "best.json").exists()


def test_non_finite_validation_is_never_ranked(tmp_path, fake_root, monkeypatch):
    run = tmp_path / "run"
    tr = _trainer(run, fake_root)
    vals = iter([0.5, float("nan")])
    monkeypatch.setattr(tr, "validate", lambda: {"accuracy": 0.4, "ci95": 0.0, "loss": next(vals), "num_tasks": 6})
    with pytest.raises(TrainingDiverged, match="epoch 2 of 3: the validation loss is not finite"):
        tr.fit()
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert [b["epoch"] for b in best] == [1]
    assert ckp.load_checkpoint(run / "checkpoints" / "latest.pt")["iteration"] == 4


@pytest.mark.parametrize("argv, needle", [
    (["--set", "inner_lr=0"], "MAMLConfig.inner_lr must be > 0"),
    (["--set", "inner_lr=-1"], "MAMLConfig.inner_lr must be > 0"),
])
def test_settings_that_cannot_train_are_refused(argv, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        T.main([*argv, "--run-dir", str(tmp_path / "r")])
    assert exc.value.code == 2 and needle in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Forks, dataset roots, user networks
# ---------------------------------------------------------------------------

def test_fork_from_another_runs_checkpoint_stands_on_its_own(done_run, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(done_run, src)
    best = json.loads((src / "checkpoints" / "best.json").read_text())
    point = src / "checkpoints" / best[-1]["path"]  # an epoch checkpoint of the source run
    at = ckp.load_checkpoint(point)
    fork = tmp_path / "fork"
    assert T.main(["--resume", str(point), "--run-dir", str(fork), "--no-progress", "--no-tensorboard"]) == 0
    assert "forked" in capsys.readouterr().err
    assert json.loads((fork / "config.json").read_text())["forked_from"] == str(point.resolve())
    shutil.rmtree(src)  # the fork needs nothing from where it came
    kept = json.loads((fork / "checkpoints" / "best.json").read_text())
    assert all((fork / "checkpoints" / b["path"]).is_file() for b in kept)
    assert any(b["path"] == point.name for b in kept) or len(kept) == 2
    rows = list(csv.DictReader(open(fork / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, TINY["total_epochs"] + 1))  # the source's rows too
    assert at["epoch"] < TINY["total_epochs"]
    assert E.main([str(fork), "--tasks", "3", "--no-progress"]) == 0
    # a fork into a folder that holds another run is refused
    other = tmp_path / "other"
    shutil.copytree(fork, other)
    with pytest.raises(SystemExit):
        T.main(["--resume", str(fork / "checkpoints" / kept[0]["path"]), "--run-dir", str(other), "--no-progress"])
    assert "needs a new or empty --run-dir" in capsys.readouterr().err


def test_dataset_root_is_recorded_absolute_and_a_moved_dataset_is_found_again(tmp_path, fake_root, monkeypatch,
                                                                              capsys):
    data_copy = tmp_path / "data" / "omniglot"
    shutil.copytree(fake_root, data_copy)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    argv = _cli("data/omniglot", run, "--stop-at-iteration", "2")  # a relative root
    assert T.main(argv) == 0
    stored = json.loads((run / "config.json").read_text())["data"]["root"]
    assert stored == str(data_copy.resolve())
    assert ckp.load_checkpoint(run / "checkpoints" / "latest.pt")["data"]["root"] == stored
    # the environment variable's root is recorded too (it used to be stored as null)
    monkeypatch.setenv("MAMLPP_OMNIGLOT_ROOT", str(data_copy))
    env_run = tmp_path / "env_run"
    no_root = [a for a in _cli(data_copy, env_run, "--stop-at-iteration", "1") if a not in ("--dataset-root",
                                                                                           str(data_copy))]
    assert T.main(no_root) == 0
    assert json.loads((env_run / "config.json").read_text())["data"]["root"] == str(data_copy.resolve())
    monkeypatch.delenv("MAMLPP_OMNIGLOT_ROOT")
    # the dataset moves: resume and eval say what to do, then find it from --dataset-root
    moved = tmp_path / "moved-omniglot"
    data_copy.rename(moved)
    with pytest.raises(SystemExit) as exc:
        T.main(["--run-dir", str(run), "--resume", "--no-progress", "--no-tensorboard"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"dataset root {stored} does not exist" in err and "--dataset-root" in err
    assert T.main(["--run-dir", str(run), "--resume", "--no-progress", "--no-tensorboard",
                   "--dataset-root", str(moved)]) == 0
    assert f"using --dataset-root {moved}" in capsys.readouterr().err
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)  # mamlpp-eval from another folder
    latest = run / "checkpoints" / "latest.pt"
    assert E.main([str(latest), "--tasks", "3", "--no-progress", "--dataset-root", str(moved)]) == 0


NET_V1 = '''
import torch.nn as nn


def net(config):
    return nn.Sequential(nn.Conv2d(config.image_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.{pool}(2), nn.Flatten(),
                         nn.Linear(4 * (config.image_height // 2) * (config.image_width // 2), config.ways))


def broken(config):
    raise RuntimeError("my bug")


def not_a_network(config):
    return 42
'''


def test_user_network_is_recorded_and_a_changed_one_refused(tmp_path, fake_root, monkeypatch, capsys):
    """The issue's case: MaxPool2d became AvgPool2d after training; mamlpp-eval scored the other network."""
    code = tmp_path / "code"
    code.mkdir()
    mod = code / "rel_nets.py"
    mod.write_text(textwrap.dedent(NET_V1).replace("{pool}", "MaxPool2d"))
    monkeypatch.chdir(code)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(code))])
    run = tmp_path / "run"
    assert T.main(_cli(fake_root, run, "--network", "rel_nets:net")) == 0
    record = json.loads((run / "config.json").read_text())["network"]
    assert record["source"] == "rel_nets:net"
    types = [r["type"].rsplit(".", 1)[-1] for r in record["structure"]]
    assert types == ["Sequential", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Flatten", "Linear"]
    conv = record["structure"][1]
    assert conv["params"] == {"weight": [4, 1, 3, 3], "bias": [4]} and "kernel_size=(3, 3)" in conv["config"]
    assert ckp.load_checkpoint(run / "checkpoints" / "latest.pt")["network"] == record
    # the user edits the function
    mod.write_text(textwrap.dedent(NET_V1).replace("{pool}", "AvgPool2d"))
    sys.modules.pop("rel_nets", None)
    with pytest.raises(SystemExit) as exc:
        E.main([str(run), "--tasks", "3", "--no-progress", "--output", str(tmp_path / "e.json")])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "--network rel_nets:net: the network it builds now is not the one" in err
    assert "layer '3' was MaxPool2d(kernel_size=2" in err and "now AvgPool2d(kernel_size=2" in err
    with pytest.raises(SystemExit):
        T.main(["--run-dir", str(run), "--resume", "--no-progress", "--no-tensorboard"])
    assert "now AvgPool2d" in capsys.readouterr().err
    # restored: accepted again
    mod.write_text(textwrap.dedent(NET_V1).replace("{pool}", "MaxPool2d"))
    sys.modules.pop("rel_nets", None)
    assert E.main([str(run), "--tasks", "3", "--no-progress", "--output", str(tmp_path / "e.json")]) == 0
    # bad --network values: each error names --network
    for spec, needle in [("no_such_module:net", "PYTHONPATH"), ("rel_nets:missing", "has no function 'missing'"),
                         ("rel_nets:broken", "calling broken(config) failed: RuntimeError: my bug"),
                         ("rel_nets:not_a_network", "returned a int")]:
        with pytest.raises(SystemExit):
            T.main(_cli(fake_root, tmp_path / "bad", "--network", spec))
        err = capsys.readouterr().err
        assert f"--network {spec}" in err and needle in err, err
    sys.modules.pop("rel_nets", None)


def test_structure_record_of_any_module(tmp_path):
    """Generic: any nn.Module, hyperparameters from extra_repr and public attributes."""
    import torch.nn as nn

    from mamlpp_ext.training.network_record import network_structure, structure_diff

    class Scale(nn.Module):
        def __init__(self, s):
            super().__init__()
            self.s = s

        def forward(self, x):
            return x * self.s

    a = network_structure(nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.LeakyReLU(0.1), Scale(2.0)))
    b = network_structure(nn.Sequential(nn.Conv2d(1, 2, 3, stride=1), nn.LeakyReLU(0.2), Scale(3.0)))
    diff = structure_diff(a, b)
    assert "stride=(2, 2)" in diff[0] and "stride=(1, 1)" in diff[0]
    assert "negative_slope=0.1" in diff[1] and "negative_slope=0.2" in diff[1]
    assert "s was 2.0, now 3.0" in diff[2]
    assert structure_diff(a, a) == []
    json.dumps(a)  # JSON- (and weights_only-) safe


# ---------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------

def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, fake_root, monkeypatch, capsys):
    run = tmp_path / "run"
    tr = _trainer(run, fake_root)
    real_save = torch.save
    saves = {"n": 0}

    def enospc_in_epoch_2(obj, f, *a, **k):
        if obj.get("epoch") == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        saves["n"] += 1
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", enospc_in_epoch_2)
    with pytest.raises(ckp.WriteError) as exc:
        tr.fit()
    msg = str(exc.value)
    assert "No space left on device" in msg and "is intact" in msg and "(epoch 1 done, meta-step 4)" in msg
    assert exc.value.errno == errno.ENOSPC
    monkeypatch.setattr(torch, "save", real_save)
    latest = ckp.load_checkpoint(run / "checkpoints" / "latest.pt")
    assert (latest["epoch"], latest["iteration"]) == (1, 4)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp file left
    assert not (run / LOCK_NAME).exists()
    # the command line: one line, exit 2
    monkeypatch.setattr(torch, "save", enospc_in_epoch_2)
    assert T.main(_cli(fake_root, tmp_path / "cli")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mamlpp-train: error: cannot write") and "No space left on device" in last


# ---------------------------------------------------------------------------
# Smaller things
# ---------------------------------------------------------------------------

def test_old_runs_counting_epochs_from_0_resume_and_are_renumbered(tmp_path, fake_root):
    run = tmp_path / "run"
    _trainer(run, fake_root, keep_top_k=2, log_every=2).fit(stop_at_iteration=8)
    # rewrite the run as the code before epochs counted from 1 wrote it
    ck = run / "checkpoints"
    old_best = []
    for b in sorted(json.loads((ck / "best.json").read_text()), key=lambda b: b["epoch"]):  # no overwrite
        old_name = f"epoch-{b['epoch'] - 1:04d}.pt"
        (ck / b["path"]).rename(ck / old_name)
        old_best.append({**b, "epoch": b["epoch"] - 1, "path": old_name})
    state = ckp.load_checkpoint(ck / "latest.pt")
    del state["epochs_from"]
    state["best"] = old_best
    torch.save(state, ck / "latest.pt")
    (ck / "best.json").write_text(json.dumps(old_best))
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=trainer_module.CSV_FIELDS)
        w.writeheader()
        w.writerows({**r, "epoch": int(r["epoch"]) - 1} for r in rows)
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps({**r, "epoch": r["epoch"] - 1}) + "\n" for r in recs))
    # resume twice (the renumbering must not apply twice), then finish
    Trainer(None, run, backend="batched", data=_data(fake_root), progress=False, tensorboard=False,
            handle_signals=False, resume=True, log=lambda m: None).close()
    tr = Trainer(None, run, backend="batched", data=_data(fake_root), progress=False, tensorboard=False,
                 handle_signals=False, resume=True, log_every=2, log=lambda m: None)
    tr.fit()
    assert [int(r["epoch"]) for r in csv.DictReader(open(run / "metrics.csv"))] == [1, 2, 3]
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs if r["kind"] == "epoch"] == [1, 2, 3]
    assert min(r["epoch"] for r in recs) == 1
    best = json.loads((ck / "best.json").read_text())
    for b in best:  # old files keep their names; every entry is numbered from 1 and exists
        assert (ck / b["path"]).is_file() and b["epoch"] >= 1
        assert ckp.load_checkpoint(ck / b["path"])["epoch"] == b["epoch"]


def test_steps_per_second_is_right_after_a_resume(tmp_path, fake_root, monkeypatch):
    """A fake clock that moves one second per meta-step: every epoch runs at 1 step/s, including
    the one that was interrupted (the old code divided the whole epoch's steps by the time since
    the resume: 2 steps/s)."""
    clock = {"t": 0.0}

    class FakeTime:
        @staticmethod
        def perf_counter():
            return clock["t"]

    monkeypatch.setattr(trainer_module, "time", FakeTime)

    def ticking(trainer):
        real = trainer.learner.train_step

        def step(*a, **k):
            clock["t"] += 1.0
            return real(*a, **k)

        trainer.learner.train_step = step
        return trainer

    run = tmp_path / "run"
    ticking(_trainer(run, fake_root)).fit(stop_at_iteration=6)  # stops 2 steps into epoch 2
    clock["t"] += 1000.0  # a long pause between the runs does not count
    tr = Trainer(None, run, backend="batched", data=_data(fake_root), progress=False, tensorboard=False,
                 handle_signals=False, resume=True, log=lambda m: None)
    ticking(tr).fit()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [float(r["steps_per_second"]) for r in rows] == [1.0, 1.0, 1.0]
    assert [float(r["epoch_seconds"]) for r in rows] == [4.0, 4.0, 4.0]


def test_first_signal_says_it_stops_after_the_step_and_how_to_resume(tmp_path, fake_root):
    notes = []
    tr = _trainer(tmp_path / "run", fake_root, log=notes.append)
    tr.resume_command = "continue with: mamlpp-train --run-dir X --resume"
    before = signal.getsignal(signal.SIGINT)
    try:
        tr._on_signal(signal.SIGINT, None)
        tr._on_signal(signal.SIGINT, None)  # a second one says nothing more (it stops at once)
    finally:
        signal.signal(signal.SIGINT, before)
        tr.close()
    assert len(notes) == 1
    assert "SIGINT received: stopping after the current meta-step" in notes[0]
    assert "mamlpp-train --run-dir X --resume" in notes[0] and "Ctrl-C again stops at once" in notes[0]


def test_missing_tensorboard_is_said_once(tmp_path, fake_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    notes = []
    tr = Trainer(MAMLConfig(**{**TINY, "total_epochs": 2, "iterations_per_epoch": 1}), tmp_path / "run",
                 backend="batched", data=_data(fake_root), progress=False, tensorboard=True, handle_signals=False,
                 log=notes.append)
    tr.fit()
    tb = [n for n in notes if "TensorBoard" in n]
    assert len(tb) == 1 and "pip install tensorboard" in tb[0] and "--no-tensorboard" in tb[0]


def test_threads_option_of_eval_and_table(done_run, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        assert E.main([str(done_run), "--tasks", "3", "--no-progress", "--threads", "1",
                       "--output", str(tmp_path / "e.json")]) == 0
        assert torch.get_num_threads() == 1
        with pytest.raises(SystemExit):
            E.main([str(done_run), "--threads", "0"])
        assert "--threads must be >= 1" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            R.main(["table", str(tmp_path), "--threads", "0"])
        assert "--threads must be >= 1" in capsys.readouterr().err
        assert "--threads" in R.make_parser()._subparsers._group_actions[0].choices["table"].format_help()
    finally:
        torch.set_num_threads(before)


def test_docs_load_checkpoints_safely():
    for doc in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        assert "weights_only=False" not in doc.read_text(), doc


def test_epoch_line_speed_never_reads_zero():
    """A slow step (a ResNet-12 step on a CPU takes minutes) is shown as seconds per step."""
    from mamlpp_ext.training.trainer import _speed

    assert _speed(2.5) == "2.50 steps/s"
    assert _speed(0.0031) == "323 s/step"
    assert _speed(None) == "- steps/s"
