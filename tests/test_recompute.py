"""Recomputation (MAMLConfig.recompute = "steps" or "query", model/recompute.py) and step memory
(model/memory.py).

* The same results: loss, every meta-gradient, the running statistics and the query logits equal
  those without recomputation (float64, 1e-10) on every backend, MSL on and off, first and second
  order, for the VGG net, a user nn.Sequential and adapted BN affine; the running statistics are
  updated once (the backward's reruns leave them alone); whole training steps stay bit-identical.
* Less memory, counted by LiveBytes; the count agrees between real CPU tensors, meta tensors and
  FakeTensorMode, and with the CPU allocator's own record (torch.profiler).
* The estimator, graph mode's host-sync check, config/checkpoint/CLI handling, torchrun.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import mamlpp_ext
from mamlpp_ext.model import MAMLConfig, MAMLPlusPlus
from mamlpp_ext.model.config import RECOMPUTE_MODES
from mamlpp_ext.model.graph import check_capturable
from mamlpp_ext.model.memory import LiveBytes, estimate_peak_memory, format_bytes, resident_bytes, step_peak_bytes
from mamlpp_ext.model.schedules import epoch_plan
from backend_cases import backend_params

DT = torch.float64
BACKENDS = backend_params()
MODES = [m for m in RECOMPUTE_MODES if m != "off"]
BATCHED_BACKENDS = backend_params(per_task=False)
HERE = Path(__file__).resolve().parent
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # conftest.py


def config(**kw) -> MAMLConfig:
    base = dict(image_channels=1, image_height=16, image_width=16, num_filters=6, ways=3, shots=2, queries=3,
                meta_batch=3, inner_steps=3, eval_inner_steps=3, msl_epochs=4, total_epochs=20, seed=0)
    base.update(kw)
    return MAMLConfig(**base)


def random_batch(cfg: MAMLConfig, seed=0, dtype=DT):
    """Fresh random images; labels a random permutation of the ways per task."""
    g = torch.Generator().manual_seed(seed)

    def labels(per_class):
        base = torch.arange(cfg.ways).repeat_interleave(per_class)
        return torch.stack([base[torch.randperm(len(base), generator=g)] for _ in range(cfg.meta_batch)])

    sy, qy = labels(cfg.shots), labels(cfg.queries)
    sx = torch.randn(cfg.meta_batch, sy.shape[1], *cfg.image_shape, generator=g, dtype=dtype)
    qx = torch.randn(cfg.meta_batch, qy.shape[1], *cfg.image_shape, generator=g, dtype=dtype)
    return sx, sy, qx, qy


def user_module() -> nn.Sequential:
    """A user network with what the lifter knows: BN with and without affine, ReLU and LeakyReLU,
    a conv without bias, average pooling, BatchNorm1d in the head."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5, affine=False), nn.LeakyReLU(0.2),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(20, 8), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Linear(8, 3)).double()


def meta_loss_results(cfg: MAMLConfig, backend: str, batch, epoch: int, network=None) -> dict:
    """Loss, meta-gradients, running statistics after the forward and after the backward, query
    outputs — of one meta_loss + backward."""
    learner = MAMLPlusPlus(cfg, backend=backend, dtype=DT, network=network)
    loss, info = learner.meta_loss(*batch, epoch=epoch)
    stats_forward = [t.clone() for t in learner.running_stats]
    grads = torch.autograd.grad(loss, learner.parameters())
    return dict(loss=loss.detach(), grads=grads, names=[n for n, _ in learner.named_parameters()],
                stats_forward=stats_forward, stats=[t.clone() for t in learner.running_stats],
                logits=info["query_logits"], task_losses=info["task_losses"], acc=info["task_accuracies"],
                second_order=info["second_order"])


def assert_same_results(got: dict, want: dict) -> None:
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got["loss"], want["loss"], **tol)
    torch.testing.assert_close(got["task_losses"], want["task_losses"], **tol)
    torch.testing.assert_close(got["logits"], want["logits"], **tol)
    assert torch.equal(got["acc"], want["acc"])
    assert got["names"] == want["names"]
    for name, a, b in zip(want["names"], got["grads"], want["grads"]):
        assert b.abs().sum() > 0, f"{name}: zero meta-gradient, the comparison would not see an error"
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"meta-gradient of {name}: {m}")
    assert len(got["stats"]) == len(want["stats"]) > 0
    for i, (a, b) in enumerate(zip(got["stats"], want["stats"])):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"running statistics {i}: {m}")
    # the reruns in the backward did not update the running statistics a second time
    for a, b in zip(got["stats_forward"], got["stats"]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# The same results
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("second_order", [True, False])
@pytest.mark.parametrize("epoch", [1, 6])  # MSL on (every step scored) / past msl_epochs (last step only)
def test_recompute_gives_the_same_loss_gradients_and_running_stats(backend, second_order, epoch, mode):
    cfg = config(second_order=second_order)
    batch = random_batch(cfg, seed=4)
    want = meta_loss_results(cfg, backend, batch, epoch)
    got = meta_loss_results(cfg.replace(recompute=mode), backend, batch, epoch)
    assert got["second_order"] is want["second_order"] is second_order
    assert_same_results(got, want)
    # the statistics did move (per-step rows, from 0 and 1): the comparison is not of untouched tensors
    assert not torch.equal(want["stats"][0], torch.zeros_like(want["stats"][0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("second_order", [True, False])
def test_recompute_with_a_user_sequential(backend, second_order):
    cfg = config(second_order=second_order, network="custom")
    batch = random_batch(cfg, seed=5)
    for epoch in (0, 5):
        want = meta_loss_results(cfg, backend, batch, epoch, network=user_module())
        for mode in MODES:
            got = meta_loss_results(cfg.replace(recompute=mode), backend, batch, epoch, network=user_module())
            assert_same_results(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["adapt-bn-affine", "plain-maml", "mini-imagenet-shaped"])
def test_recompute_on_variants(backend, variant):
    kw = {"adapt-bn-affine": dict(adapt_bn_affine=True, per_step_bn_weights=False),
          "plain-maml": dict(use_msl=False, per_step_bn_statistics=False, per_step_bn_weights=False,
                             learnable_inner_lr=False, per_step_inner_lr=False, cosine_annealing=False),
          "mini-imagenet-shaped": dict(image_channels=3, image_height=32, image_width=32, num_filters=5,
                                       shots=1, meta_batch=2, inner_steps=4)}[variant]
    cfg = config(**kw)
    batch = random_batch(cfg, seed=6)
    want = meta_loss_results(cfg, backend, batch, 1)
    for mode in MODES:
        assert_same_results(meta_loss_results(cfg.replace(recompute=mode), backend, batch, 1), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_steps_are_bit_identical(backend):
    """Whole meta-steps (Adam included), float32, across the MSL end: identical states."""
    learners = [MAMLPlusPlus(config(recompute=mode, msl_epochs=1), backend=backend) for mode in RECOMPUTE_MODES]
    for step, epoch in enumerate((0, 0, 1)):
        batch = random_batch(learners[0].config, seed=10 + step, dtype=torch.float32)
        metrics = [L.train_step(*batch, epoch=epoch) for L in learners]
        assert all(torch.equal(metrics[0], m) for m in metrics[1:])
    first, *others = (L.parameters() + L.running_stats for L in learners)
    for other in others:
        assert all(torch.equal(x, y) for x, y in zip(first, other))
    ev = [L.evaluate(*random_batch(learners[0].config, seed=99, dtype=torch.float32))["logits"] for L in learners]
    assert all(torch.equal(ev[0], e) for e in ev[1:])


def test_the_meta_gradient_cannot_be_differentiated_again():
    """Recomputed segments give the meta-gradient but no graph of it: a backward with
    create_graph=True (a Hessian-vector product of the meta-loss, which works without
    recomputation here: first order, batched) raises rather than silently coming out wrong."""
    cfg = config(second_order=False)
    batch = random_batch(cfg)
    for mode in RECOMPUTE_MODES:
        learner = MAMLPlusPlus(cfg.replace(recompute=mode), backend="batched", dtype=DT)
        loss, _ = learner.meta_loss(*batch, epoch=0)
        if mode == "off":
            grads = torch.autograd.grad(loss, learner.theta, create_graph=True)
            assert torch.autograd.grad(sum(g.sum() for g in grads), learner.theta)[0].abs().sum() > 0
        else:
            with pytest.raises(RuntimeError, match="create_graph=True reached a recomputed inner step"):
                torch.autograd.grad(loss, learner.theta, create_graph=True)


# ---------------------------------------------------------------------------------------------
# Memory: recomputation keeps less, and the count is right
# ---------------------------------------------------------------------------------------------

def _real_peak(cfg, backend, dtype=torch.float32, network=None):
    learner = MAMLPlusPlus(cfg, backend=backend, dtype=dtype, network=network)
    batch = random_batch(cfg, seed=1, dtype=dtype)
    return step_peak_bytes(learner, (*batch[:2], batch[2], batch[3]), epoch=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_recompute_keeps_less(backend):
    # mini-ImageNet-like: 1 shot, many queries (the query forwards dominate), 5 inner steps
    cfg = config(inner_steps=5, eval_inner_steps=5, shots=1, queries=8)
    off, steps, query = (_real_peak(cfg.replace(recompute=m), backend) for m in ("off", "steps", "query"))
    assert steps * 2.5 < off and steps < query < off / 1.5, tuple(map(format_bytes, (off, steps, query)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", ["off", "steps"])
def test_counted_on_meta_and_fake_tensors_equals_a_real_run(backend, recompute):
    """The estimate (meta tensors) and FakeTensorMode (which runs the custom ops' fake kernels)
    count exactly the bytes of a real CPU run."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = config(recompute=recompute, meta_batch=2, inner_steps=2)  # the meta device runs ops slowly
    real = _real_peak(cfg, backend)
    assert estimate_peak_memory(cfg, backend=backend)["step_peak_bytes"] == real

    learner = MAMLPlusPlus(cfg, backend=backend)
    fake_mode = FakeTensorMode()

    def fake(t):
        return None if t is None else fake_mode.from_tensor(t)

    learner.theta = [fake(t) for t in learner.theta]
    learner.lslr = fake(learner.lslr)
    for name in ("bn_weight", "bn_bias", "running_mean", "running_var"):
        setattr(learner, name, [fake(t) for t in getattr(learner, name)])
    with fake_mode:
        batch = [fake_mode.from_tensor(t) for t in random_batch(cfg, seed=1, dtype=torch.float32)]
        assert step_peak_bytes(learner, batch) == real


@pytest.mark.parametrize("backend", BATCHED_BACKENDS)
@pytest.mark.parametrize("recompute", RECOMPUTE_MODES)
def test_count_agrees_with_the_cpu_allocator(backend, recompute):
    """The profiler's record of every CPU allocation and free (allocator level, workspaces inside
    the kernels included) peaks within 2% above the count of live tensor storages."""
    from torch.profiler import ProfilerActivity, profile

    cfg = config(recompute=recompute, num_filters=16, queries=5)
    counted = _real_peak(cfg, backend)
    learner = MAMLPlusPlus(cfg, backend=backend)
    batch = random_batch(cfg, seed=1, dtype=torch.float32)
    plan = epoch_plan(cfg, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss, _ = learner.step.meta_loss(*batch, plan)
            loss.backward()
            del loss
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    assert counted <= peak <= 1.02 * counted, (counted, peak)


def test_live_bytes_counts_new_storages_only():
    with LiveBytes() as m:
        a = torch.randn(1000, dtype=torch.float64)  # 8000 bytes
        v = a.view(10, 100)  # a view allocates nothing
        a.mul_(2)  # nor does an in-place op
        b = a + 1  # 8000 more
        assert m.live == 16000
        del a
        assert m.live == 16000  # v keeps a's storage alive
        del v
        assert m.live == 8000
        m.reset_peak()
        del b
    assert m.live == 0 and m.peak == 8000
    x = torch.randn(10)
    with LiveBytes() as m:
        y = x.detach()  # aliases storage that existed before the mode
        assert m.live == 0 and y is not None


# ---------------------------------------------------------------------------------------------
# The estimator and the command line
# ---------------------------------------------------------------------------------------------

def test_estimator_reports_the_parts():
    cfg = config(inner_steps=2)
    est = estimate_peak_memory(cfg, backend="batched")
    learner = MAMLPlusPlus(cfg, backend="batched")
    assert est["resident_bytes"] == resident_bytes(learner)
    assert est["batch_bytes"] == sum(t.numel() * t.element_size() for t in random_batch(cfg, dtype=torch.float32))
    assert est["total_bytes"] == est["step_peak_bytes"] + est["resident_bytes"] + est["batch_bytes"]
    assert est["config"] == cfg and est["config"].recompute == "off"
    bigger = estimate_peak_memory(cfg, backend="batched", meta_batch=6)
    assert bigger["config"].meta_batch == 6 and bigger["step_peak_bytes"] > 1.5 * est["step_peak_bytes"]
    steps = estimate_peak_memory(cfg, backend="batched", recompute="steps")
    assert steps["config"].recompute == "steps" and steps["step_peak_bytes"] < est["step_peak_bytes"]
    # float64: twice the floating-point tensors (max-pool indices stay int64)
    f64 = estimate_peak_memory(cfg, backend="batched", dtype=torch.float64)["step_peak_bytes"]
    assert 1.8 * est["step_peak_bytes"] < f64 < 2 * est["step_peak_bytes"]
    assert format_bytes(3 * 2**30) == "3.00 GiB" and format_bytes(1536) == "1.5 KiB"


def test_estimator_takes_a_preset_and_a_user_network():
    est = estimate_peak_memory("omniglot-5way-1shot", backend="batched", inner_steps=2, num_filters=8)
    assert est["config"].ways == 5 and est["config"].inner_steps == 2 and est["step_peak_bytes"] > 0
    cfg = config(network="custom")
    est = estimate_peak_memory(cfg, backend="batched", network=user_module().float())
    assert est["step_peak_bytes"] == _real_peak(cfg, "batched", network=user_module().float())


def test_cli_estimate_memory(capsys):
    from mamlpp_ext.training import train as T

    code = T.main(["--preset", "omniglot-5way-1shot", "--set", "num_filters=8", "--set", "inner_steps=2",
                   "--backend", "batched", "--device", "cpu", "--recompute", "steps", "--estimate-memory"])
    out = capsys.readouterr().out
    assert code == 0
    lines = [line for line in out.splitlines() if "recompute=" in line]
    assert len(lines) == len(RECOMPUTE_MODES) and "<- this run" in lines[1] and "steps" in lines[1]
    assert sum("<- this run" in line for line in lines) == 1
    assert "backend batched" in out


# ---------------------------------------------------------------------------------------------
# Config, checkpoints, trainer, command line, graph mode, torchrun
# ---------------------------------------------------------------------------------------------

def test_config_field():
    assert MAMLConfig().recompute == "off"
    with pytest.raises(ValueError, match="recompute must be one of"):
        MAMLConfig(recompute="on")
    old = MAMLConfig().to_dict()
    del old["recompute"]  # a config stored before the field existed
    assert MAMLConfig.from_dict(old).recompute == "off"
    learner = MAMLPlusPlus(config(recompute="steps"), backend="batched")
    again = MAMLPlusPlus.from_state_dict(learner.state_dict())
    assert again.config.recompute == "steps"


@pytest.mark.parametrize("backend", BATCHED_BACKENDS)
def test_graph_mode_functions_run_with_recompute_without_host_reads(backend):
    """What graph mode captures (the training step with the segments' backward reruns, and
    evaluation) runs on the meta device under the host-sync guard (model/graph.py)."""
    cfg = MAMLConfig(ways=3, shots=1, queries=2, meta_batch=2, image_height=16, image_width=16, num_filters=4,
                     inner_steps=2, eval_inner_steps=3, msl_epochs=2, first_order_to_second_order_epoch=2,
                     grad_clamp=5.0, total_epochs=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        off = check_capturable(MAMLPlusPlus(cfg, backend=backend, device="meta", graph="check"), (0, 2, 3))
        on = check_capturable(MAMLPlusPlus(cfg.replace(recompute="steps"), backend=backend, device="meta",
                                           graph="check"), (0, 2, 3))
    assert on > off > 1000  # the reruns ran under the guard too


@pytest.mark.usefixtures("tmp_cache")
def test_cli_recompute_and_switching_it_on_resume(tmp_path, fake_root):
    """--recompute is recorded in the run's config; a resumed run may switch it, and the result
    equals the run without recomputation, bit for bit."""
    from mamlpp_ext.training import checkpoints as ckp
    from mamlpp_ext.training import train as T

    sets = [f"--set={k}={v}" for k, v in dict(ways=3, shots=1, queries=1, meta_batch=2, num_stages=2,
                                                num_filters=4, inner_steps=2, eval_inner_steps=2,
                                                msl_epochs=1).items()]
    common = ["--dataset-root", str(fake_root), "--split", "lake", "--lake-val-alphabets", "1",
              "--allow-partial-data", "--backend", "batched", "--device", "cpu", "--epochs", "2",
              "--iters-per-epoch", "3", "--eval-tasks", "3", "--no-progress", "--no-tensorboard", *sets]
    assert T.main([*common, "--run-dir", str(tmp_path / "plain")]) == 0
    assert T.main([*common, "--run-dir", str(tmp_path / "mixed"), "--recompute", "steps",
                   "--stop-at-iteration", "4"]) == 0
    stopped = ckp.load_checkpoint(tmp_path / "mixed" / "checkpoints" / "latest.pt")
    assert stopped["config"]["recompute"] == "steps"
    assert T.main(["--resume", "--run-dir", str(tmp_path / "mixed"), "--recompute", "off", "--no-progress",
                   "--no-tensorboard"]) == 0
    plain = ckp.load_checkpoint(tmp_path / "plain" / "checkpoints" / "latest.pt")
    mixed = ckp.load_checkpoint(tmp_path / "mixed" / "checkpoints" / "latest.pt")
    assert mixed["config"]["recompute"] == "off" and mixed["iteration"] == plain["iteration"] == 6
    for key in ("theta", "bn_weight", "bn_bias", "running_mean", "running_var"):
        for a, b in zip(plain["learner"][key], mixed["learner"][key]):
            assert torch.equal(a, b), key
    # --set recompute=... on resume is accepted too (and no other changed setting is)
    assert T.main(["--resume", "--run-dir", str(tmp_path / "mixed"), "--set", "recompute=steps", "--epochs", "2",
                   "--no-progress", "--no-tensorboard"]) == 0


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_torchrun_two_processes_with_recompute_match_one_without(tmp_path):
    import os

    out = tmp_path / "states.pt"
    # the processes import this checkout's package, as the test does
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(HERE / "dist_worker.py"), "equivalence", str(out), "steps"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sys.path.insert(0, str(HERE))
    import dist_worker as W

    got = torch.load(out, weights_only=False)
    assert len(got) == (4 if mamlpp_ext.has_extension() else 2)
    for key, two in got.items():
        backend, second_order = key.rsplit("-", 1)
        ref = W.run_steps(backend, second_order == "True")  # one process, no recomputation
        for name in ("theta", "bn_weight", "bn_bias", "running_mean", "running_var"):
            for a, b in zip(two[name], ref[name]):
                # as in test_distributed.py: conv biases in front of a BN have a zero gradient up
                # to round-off, which Adam turns into order-dependent moves of ~1e-11
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-9, msg=lambda m: f"{key} {name}: {m}")
        assert two["config"]["recompute"] == "steps"


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_recompute_gives_the_same_results(backend):
    cfg = config()
    batch = random_batch(cfg, seed=4)
    res = []
    for mode in RECOMPUTE_MODES:
        learner = MAMLPlusPlus(cfg.replace(recompute=mode), backend=backend, device="cuda", dtype=DT)
        loss, _ = learner.meta_loss(*batch, epoch=1)
        res.append([loss.detach(), *torch.autograd.grad(loss, learner.parameters()), *learner.running_stats])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", BATCHED_BACKENDS)
def test_cuda_graph_replay_with_recompute(backend):
    """Graph mode captures the recomputed step (the reruns happen inside the captured backward):
    replays equal eager steps without recomputation, float64."""
    cfg = config(meta_batch=2, msl_epochs=1)
    eager = MAMLPlusPlus(cfg, backend=backend, device="cuda", dtype=DT, graph="check")
    graph = MAMLPlusPlus(cfg.replace(recompute="steps"), backend=backend, device="cuda", dtype=DT, graph=True)
    for step, epoch in enumerate((0, 0, 0, 0, 1, 1, 1, 1)):
        batch = [t.cuda() for t in random_batch(cfg, seed=step)]
        a = eager.train_step(*batch, epoch=epoch).clone()
        b = graph.train_step(*batch, epoch=epoch).clone()
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9, msg=lambda m: f"step {step}: {m}")
    assert graph.graph.captures == 2
    names = [n for n, _ in graph.named_parameters()]
    for name, x, y in zip(names, graph.parameters(), eager.parameters()):
        if not (name.startswith("conv") and name.endswith(".bias")):  # pre-BN biases: see test_graph_mode.py
            torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-9, msg=lambda m: f"{name}: {m}")


@needs_cuda
@pytest.mark.cuda
def test_cuda_count_matches_the_allocator():
    """On the GPU the count of live storages and the caching allocator's peak (less what was
    allocated before the step) agree within the allocator's rounding."""
    cfg = config(num_filters=32, queries=5)
    learner = MAMLPlusPlus(cfg, backend="batched", device="cuda")
    batch = [t.cuda() for t in random_batch(cfg, seed=1, dtype=torch.float32)]
    learner.meta_loss(*batch, epoch=0)[0].backward()  # warm-up (cuDNN, allocator)
    for p in learner.parameters():
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    counted = step_peak_bytes(learner, batch)
    torch.cuda.synchronize()
    allocator = torch.cuda.max_memory_allocated() - before
    assert 0.97 * allocator <= counted <= 1.03 * allocator + 2**20, (counted, allocator)
