"""Distributed meta-training (mamlpp_ext.distributed) on CPU with gloo, launched by torchrun:
P processes x T/P tasks equal 1 process x T tasks; runs resume across process counts; a failing
process ends the job. Each torchrun launch costs a few seconds of process start-up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import mamlpp_ext
from mamlpp_ext.training import checkpoints as ckp
from mamlpp_ext.training import train as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_worker as W  # noqa: E402

pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available"),
              pytest.mark.usefixtures("tmp_cache")]  # fake_root and tmp_cache: conftest.py

HERE = Path(__file__).resolve().parent


def torchrun(nproc: int, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    import os

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                                  f"stderr:\n{proc.stderr[-5000:]}")


# ---------------------------------------------------------------------------------------------
# 2 processes x T/2 tasks == 1 process x T tasks (float64, several meta-steps)
# ---------------------------------------------------------------------------------------------

def test_two_processes_match_one_process(tmp_path):
    out = tmp_path / "states.pt"
    _check(torchrun(2, str(HERE / "dist_worker.py"), "equivalence", str(out)))
    got = torch.load(out, weights_only=False)
    expected_keys = {f"{b}-{so}" for b, so in W.COMBOS if b != "fused" or mamlpp_ext.has_extension()}
    assert set(got) == expected_keys
    for backend, second_order in W.COMBOS:
        key = f"{backend}-{second_order}"
        if key not in got:
            continue
        ref = W.run_steps(backend, second_order)
        two = got[key]
        # atol 1e-9: the conv biases feed a batch norm, so their gradient is zero up to round-off
        # (~1e-17) and Adam turns that noise into ~1e-11 moves that depend on summation order.
        for name in ("theta", "bn_weight", "bn_bias", "running_mean", "running_var"):
            for i, (a, b) in enumerate(zip(two[name], ref[name])):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-9, msg=lambda m: f"{key} {name}[{i}]: {m}")
        torch.testing.assert_close(two["lslr"], ref["lslr"], rtol=1e-10, atol=1e-9)
        # the run moved away from the initial weights (the comparison is not of untouched tensors)
        init = W.MAMLPlusPlus(W.equivalence_config(second_order), backend=backend, dtype=torch.float64)
        assert not torch.allclose(two["theta"][0], init.theta[0].detach())


# ---------------------------------------------------------------------------------------------
# The CLI under torchrun: resume across process counts
# ---------------------------------------------------------------------------------------------

TINY = dict(ways=3, shots=1, queries=1, meta_batch=4, num_stages=2, num_filters=4, inner_steps=2,
            eval_inner_steps=2, msl_epochs=2)


def _cli_args(root, run_dir, *extra):
    sets = [f"--set={k}={v}" for k, v in TINY.items()]
    return ["--dataset-root", str(root), "--split", "lake", "--lake-val-alphabets", "1", "--allow-partial-data",
            "--run-dir", str(run_dir), "--backend", "batched", "--epochs", "2", "--iters-per-epoch", "3",
            "--eval-tasks", "6", "--no-progress", "--no-tensorboard", "--threads", "1", *sets, *extra]


def _state(run_dir) -> dict:
    return ckp.load_checkpoint(Path(run_dir) / "checkpoints" / "latest.pt")


def _assert_close_states(a: dict, b: dict) -> None:
    assert (a["epoch"], a["iteration"]) == (b["epoch"], b["iteration"])
    la, lb = a["learner"], b["learner"]
    from mamlpp_ext.model.config import MAMLConfig
    from mamlpp_ext.model.meta_learner import MAMLPlusPlus

    names = MAMLPlusPlus(MAMLConfig.from_dict(a["config"])).net.weight_names
    n = 0
    # Not compared: a conv bias feeding a batch norm has a zero gradient up to round-off, which
    # Adam (eps 1e-8) turns into float32 noise steps of up to ~lr that depend on summation order,
    # and the running means track those biases. (test_two_processes_match_one_process compares
    # everything, running statistics included, in float64.)
    for name in ("theta", "bn_weight", "bn_bias", "running_var"):
        for i, (x, y) in enumerate(zip(la[name], lb[name])):
            if name == "theta" and names[i].startswith("conv") and names[i].endswith(".bias"):
                continue
            # float32, different summation order (two half-batch means averaged)
            torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-6, msg=lambda m: f"{name}[{i}]: {m}")
            n += 1
    torch.testing.assert_close(la["lslr"], lb["lslr"], rtol=2e-5, atol=2e-6)
    assert n > 8


def test_cli_resume_across_process_counts(tmp_path, fake_root):
    # reference: one process, uninterrupted
    assert T.main(_cli_args(fake_root, tmp_path / "one")) == 0
    ref = _state(tmp_path / "one")
    assert ref["iteration"] == 6 and not ref["interrupted"]

    # two processes until iteration 4 (mid-epoch), then one process to the end
    _check(torchrun(2, "-m", "mamlpp_ext.training.train",
                    *_cli_args(fake_root, tmp_path / "a", "--stop-at-iteration", "4")))
    part = _state(tmp_path / "a")
    assert part["iteration"] == 4 and part["interrupted"]
    assert T.main(["--resume", "--run-dir", str(tmp_path / "a"), "--no-progress", "--no-tensorboard",
                   "--threads", "1"]) == 0
    _assert_close_states(_state(tmp_path / "a"), ref)

    # one process until iteration 2, then two processes to the end
    assert T.main(_cli_args(fake_root, tmp_path / "b", "--stop-at-iteration", "2")) == 0
    _check(torchrun(2, "-m", "mamlpp_ext.training.train", "--resume", "--run-dir", str(tmp_path / "b"), "--no-progress",
                    "--no-tensorboard", "--threads", "1"))
    _assert_close_states(_state(tmp_path / "b"), ref)

    # rank 0 alone wrote the logs: one row per epoch, validation on all 6 tasks
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(r["val_num_tasks"] == 6 for r in epochs)
    ref_rows = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    ref_epochs = [r for r in ref_rows if r["kind"] == "epoch"]
    for r, e in zip(epochs, ref_epochs):
        assert r["val_accuracy"] == pytest.approx(e["val_accuracy"], abs=1e-6)
        assert r["train_loss"] == pytest.approx(e["train_loss"], rel=1e-4)


def test_meta_batch_not_divisible_is_a_clear_error(tmp_path, fake_root):
    proc = torchrun(3, "-m", "mamlpp_ext.training.train", *_cli_args(fake_root, tmp_path / "c"))
    assert proc.returncode != 0
    assert "cannot be split evenly across 3 processes" in proc.stderr


def test_eval_split_across_processes_matches_one_process(tmp_path, fake_root):
    from mamlpp_ext.training import evaluate as E

    assert T.main(_cli_args(fake_root, tmp_path / "run", "--epochs", "1")) == 0
    common = [str(tmp_path / "run"), "--tasks", "10", "--eval-batch-size", "3", "--no-progress"]
    assert E.main(common + ["--output", str(tmp_path / "one.json")]) == 0
    _check(torchrun(2, "-m", "mamlpp_ext.training.evaluate", *common, "--output", str(tmp_path / "two.json")))
    one = json.loads((tmp_path / "one.json").read_text())["test"]
    two = json.loads((tmp_path / "two.json").read_text())["test"]
    assert two["num_tasks"] == one["num_tasks"] == 10
    assert two["task_accuracies"] == pytest.approx(one["task_accuracies"], abs=1e-12)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-9)


# ---------------------------------------------------------------------------------------------
# A failing process ends the whole job
# ---------------------------------------------------------------------------------------------

def test_failing_process_ends_the_job(tmp_path, fake_root):
    """A job whose rank 1 fails must end, non-zero (a hang would exceed the subprocess timeout
    and fail the test with TimeoutExpired)."""
    proc = torchrun(2, str(HERE / "dist_worker.py"), "fail", str(fake_root), str(tmp_path / "run"), timeout=240)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Divergence: every process takes the same decision
# ---------------------------------------------------------------------------------------------

def test_a_nan_on_one_process_stops_every_process_at_the_same_step(tmp_path, fake_root):
    """NOTE [Divergence guard]: the check runs on the averaged gradients and loss, so a NaN in
    rank 1's share of a meta-batch is seen by both ranks, which drop the same step, keep the same
    state and stop together (exit code of the job: each rank returned after TrainingDiverged)."""
    out = tmp_path / "seen"
    _check(torchrun(2, str(HERE / "dist_worker.py"), "diverge", str(fake_root), str(tmp_path / "run"), str(out),
                    timeout=240))
    a, b = (torch.load(f"{out}.{r}.pt", weights_only=True) for r in (0, 1))
    assert (a["iteration"], a["epoch"]) == (b["iteration"], b["epoch"]) == (6, 2)
    for x, y in zip(a["state"], b["state"]):
        assert torch.equal(x, y) and torch.isfinite(x).all()
    latest = ckp.load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert latest["iteration"] == 4  # the last good checkpoint: the end of epoch 1
    for x, y in zip(latest["learner"]["theta"], a["state"]):
        assert not torch.equal(x, y)  # steps 5 went on after it; the state is the one before step 6
