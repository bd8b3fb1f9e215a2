"""The divergence guard (NOTE [Divergence guard] in model/step.py): a meta-step whose loss or
meta-gradients are not finite leaves nothing behind — weights, Adam's moments and step counts,
and the running statistics the forward wrote are exactly as before it — on every backend;
``meta_step`` raises, ``train_step`` reports NaN metrics and drops every later step until
``clear_divergence``; settings that cannot train are refused.

The trainer's side (the run stops naming the step and epoch, keeps the last good checkpoint,
exits non-zero, never ranks a NaN checkpoint) is in test_reliability.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from mamlpp_ext.model import DivergenceError, MAMLConfig, MAMLPlusPlus
from mamlpp_ext.model.graph import check_capturable
from mamlpp_ext.model.schedules import epoch_plan
from backend_cases import backend_params

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # conftest.py

BACKENDS = backend_params()

TINY = dict(ways=3, shots=1, queries=2, meta_batch=2, image_channels=1, image_height=16, image_width=16,
            num_stages=2, num_filters=4, inner_steps=2, eval_inner_steps=2, msl_epochs=2, total_epochs=4)


def batch(cfg: MAMLConfig, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    T = cfg.meta_batch

    def labels(k):
        return torch.stack([torch.arange(cfg.ways).repeat_interleave(k)[torch.randperm(cfg.ways * k, generator=g)]
                            for _ in range(T)])

    sy, qy = labels(cfg.shots), labels(cfg.queries)
    sx = torch.randn(T, sy.shape[1], *cfg.image_shape, generator=g, dtype=dtype)
    qx = torch.randn(T, qy.shape[1], *cfg.image_shape, generator=g, dtype=dtype)
    return sx, sy, qx, qy


def snapshot(learner: MAMLPlusPlus) -> list[torch.Tensor]:
    """Every tensor of the learner's state: meta-parameters, running statistics, Adam's state."""
    out = [t.detach().clone() for t in learner.parameters() + learner.running_stats]
    for st in learner.optimizer.state.values():
        out += [v.detach().clone() for v in st.values() if torch.is_tensor(v)]
    return out


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"state tensor {i} changed"


def learner(backend: str, **kw) -> MAMLPlusPlus:
    cfg = MAMLConfig(**{**TINY, **kw})
    return MAMLPlusPlus(cfg, backend=backend, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_step_on_nan_images_raises_and_changes_nothing(backend):
    lrn = learner(backend)
    lrn.meta_step(*batch(lrn.config, 0), epoch=0)  # Adam's state exists: the check covers it
    before, steps = snapshot(lrn), lrn.meta_steps_done
    sx, sy, qx, qy = batch(lrn.config, 1)
    sx[0, 0, 0, 3, 3] = float("nan")
    with pytest.raises(DivergenceError, match=r"epoch=0.*not finite.*not applied"):
        lrn.meta_step(sx, sy, qx, qy, epoch=0)
    assert_same(snapshot(lrn), before)
    assert lrn.meta_steps_done == steps and not lrn.diverged()
    # the learner goes on with good batches, and a good step does change the state
    out = lrn.meta_step(*batch(lrn.config, 2), epoch=0)
    assert math.isfinite(out["loss"]) and lrn.meta_steps_done == steps + 1
    assert any(not torch.equal(x, y) for x, y in zip(snapshot(lrn), before))


@pytest.mark.parametrize("recompute", ["steps", "query"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_guard_with_recomputation_changes_nothing(backend, recompute):
    """The guard and the recomputation mode together: a NaN step restores the running statistics
    the first pass wrote (the reruns write none) and applies nothing."""
    lrn = learner(backend, recompute=recompute)
    lrn.meta_step(*batch(lrn.config, 0), epoch=0)
    before = snapshot(lrn)
    sx, sy, qx, qy = batch(lrn.config, 1)
    qx[1, 0, 0, 2, 2] = float("nan")
    with pytest.raises(DivergenceError):
        lrn.meta_step(sx, sy, qx, qy, epoch=0)
    assert_same(snapshot(lrn), before)
    out = lrn.meta_step(*batch(lrn.config, 2), epoch=0)
    assert math.isfinite(out["loss"])


@pytest.mark.parametrize("backend", backend_params(per_task=False))
def test_infinite_gradient_with_a_finite_loss_is_dropped_even_with_a_clamp(backend):
    """The check runs before the clamp, which would turn ±inf into ±grad_clamp."""
    lrn = learner(backend, grad_clamp=1.0)
    lrn.meta_step(*batch(lrn.config, 0), epoch=0)
    before = snapshot(lrn)
    handle = lrn.theta[0].register_hook(lambda g: g * float("inf"))
    try:
        with pytest.raises(DivergenceError):
            lrn.meta_step(*batch(lrn.config, 1), epoch=0)
    finally:
        handle.remove()
    assert_same(snapshot(lrn), before)


@pytest.mark.parametrize("backend", backend_params(per_task=False))
def test_huge_inner_lr_diverges_and_is_caught(backend):
    """The issue's ``--set inner_lr=1e30`` (float32, as the trainer runs): NaN after one step."""
    lrn = MAMLPlusPlus(MAMLConfig(**{**TINY, "inner_lr": 1e30}), backend=backend)
    before = snapshot(lrn)
    with pytest.raises(DivergenceError):
        lrn.meta_step(*batch(lrn.config, 0, dtype=torch.float32), epoch=0)
    after = snapshot(lrn)
    assert_same(after[:len(before)], before)
    # the dropped first step created Adam's state lazily, as a fresh one: zero moments, step 0
    assert all(float(v.abs().max()) == 0 for v in after[len(before):])


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_step_reports_nan_and_drops_every_later_step_until_cleared(backend):
    lrn = learner(backend)
    lrn.train_step(*batch(lrn.config, 0), epoch=0)
    before, steps = snapshot(lrn), lrn.meta_steps_done
    sx, sy, qx, qy = batch(lrn.config, 1)
    qx[1] = float("inf")
    metrics = [lrn.train_step(sx, sy, qx, qy, epoch=0)]
    metrics += [lrn.train_step(*batch(lrn.config, s), epoch=1) for s in (2, 3)]  # good batches, still dropped
    read = torch.stack([m[:2] for m in metrics])
    assert torch.isnan(read).all()
    assert_same(snapshot(lrn), before)
    assert lrn.diverged()
    assert lrn.state_dict()["meta_steps_done"] == steps  # the dropped steps do not count
    assert lrn.clear_divergence() == 3 and lrn.meta_steps_done == steps and not lrn.diverged()
    good = lrn.train_step(*batch(lrn.config, 4), epoch=1)
    assert torch.isfinite(good).all()
    assert any(not torch.equal(x, y) for x, y in zip(snapshot(lrn), before))


def test_a_good_step_is_unchanged_by_the_guard():
    """A finite step runs exactly as an unguarded fused Adam step (the check multiplies by 1)."""
    lrn = learner("batched")
    lrn.meta_step(*batch(lrn.config, 0), epoch=0)
    ref = learner("batched")
    ref.load_state_dict(lrn.state_dict())
    b = batch(lrn.config, 1)
    lrn.meta_step(*b, epoch=0)
    # the same step by hand: loss and backward, then plain fused Adam without found_inf
    ref.outer.set_lr(ref.meta_lr(0))
    metrics = ref.step.forward_backward(*b, epoch_plan(ref.config, 0))
    assert torch.isfinite(metrics).all()
    ref.optimizer.step()
    for x, y in zip(snapshot(lrn), snapshot(ref)):
        assert torch.equal(x, y)


def test_load_state_dict_clears_the_flag():
    lrn = learner("batched")
    good = lrn.state_dict()
    sx, sy, qx, qy = batch(lrn.config, 0)
    sx[:] = float("nan")
    lrn.train_step(sx, sy, qx, qy, epoch=0)
    assert lrn.diverged()
    lrn.load_state_dict(good)
    assert not lrn.diverged()
    assert torch.isfinite(lrn.train_step(*batch(lrn.config, 1), epoch=0)).all()


def test_guarded_step_stays_capturable():
    """The guard adds no host read to what graph mode captures (meta device, HostSyncGuard)."""
    cfg = MAMLConfig(**TINY)
    lrn = MAMLPlusPlus(cfg, backend="batched", device="meta", graph="check")
    assert check_capturable(lrn, epochs=(0, 3)) > 0


@pytest.mark.parametrize("value", [0.0, -0.1, 0])
def test_inner_lr_must_be_positive(value):
    with pytest.raises(ValueError, match=r"MAMLConfig\.inner_lr must be > 0"):
        MAMLConfig(**{**TINY, "inner_lr": value})


# ---------------------------------------------------------------------------
# On a GPU (skipped here): the guard in eager CUDA steps and inside a captured graph, no host sync
# ---------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_batch(cfg: MAMLConfig, seed: int):
    return tuple(t.pin_memory() for t in batch(cfg, seed, dtype=torch.float32))


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("backend", backend_params(per_task=False))
def test_cuda_nan_step_is_dropped_without_a_host_sync(backend, graph):
    cfg = MAMLConfig(**{**TINY, "grad_clamp": 5.0})
    lrn = MAMLPlusPlus(cfg, backend=backend, device="cuda", graph=graph)
    for s in range(4):  # graph mode: two warm-up steps, the capture, a replay
        lrn.train_step(*_cuda_batch(cfg, s), epoch=0)
    torch.cuda.synchronize()
    before = snapshot(lrn)
    sx, sy, qx, qy = _cuda_batch(cfg, 10)
    sx[0, 0, 0, 2, 2] = float("nan")
    good = [_cuda_batch(cfg, s) for s in (11, 12)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = [lrn.train_step(sx, sy, qx, qy, epoch=0).clone()]
        out += [lrn.train_step(*b, epoch=0).clone() for b in good]  # dropped as well (sticky)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isnan(m[:2]).all() for m in out)
    assert_same(snapshot(lrn), before)
    assert lrn.clear_divergence() == 3
    assert torch.isfinite(lrn.train_step(*_cuda_batch(cfg, 13), epoch=0)).all()
    if graph:
        assert lrn.graph.captures == 1  # the dropped steps were replays of the same graph
