"""The compiled training step (model/compiled.py, NOTE [Compiled step]).

Without compiling: how the resolver decides (and refuses) the mode, and the step interface it
rests on (``StepTensors``, ``MetaStep.reading``). With inductor (a C++ compiler is needed; a cold
compile of these tiny graphs takes about a minute on a 2-core CPU, a warm one seconds): the
compiled step's loss, meta-gradients and running statistics against an eager float64
reference (the shipping gate: 1e-4 relative, as the eager float32 step), a capture per key
across the MSL end and the DA switch with the MSL weights as an input, whole training steps
against eager ones, the trainer and the command line. CUDA: with graph mode (skipped here).
"""

import importlib.util
import shutil

import pytest
import torch

import mamlpp_ext
from mamlpp_ext.model import MAMLConfig, MAMLPlusPlus, resolve_execution
import mamlpp_ext.model.backends as B
from mamlpp_ext.model.compiled import INDUCTOR_OPTIONS, CompiledStep
from mamlpp_ext.model.schedules import epoch_plan
from mamlpp_ext.model.step import MetaStep, StepTensors
from backend_cases import backend_params

BATCHED = backend_params(per_task=False)
can_compile = B.compile_support(torch.device("cpu"), "batched") is None
needs_compiler = pytest.mark.skipif(not can_compile, reason="the compiled step needs a C++ compiler")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GATE = 1e-4


def tiny(**kw) -> MAMLConfig:
    base = dict(ways=3, shots=1, queries=2, meta_batch=2, image_height=8, image_width=8, num_filters=4, num_stages=2,
                inner_steps=2, eval_inner_steps=2, msl_epochs=2, first_order_to_second_order_epoch=1, total_epochs=6,
                grad_clamp=5.0)
    base.update(kw)
    return MAMLConfig(**base)


def batch(cfg, seed=0, binary=True):
    """Omniglot-like binary images (ties in max-pooling, as the real data has) and labels."""
    g = torch.Generator().manual_seed(seed)

    def labels(per_class):
        base = torch.arange(cfg.ways).repeat_interleave(per_class)
        return torch.stack([base[torch.randperm(len(base), generator=g)] for _ in range(cfg.meta_batch)])

    sy, qy = labels(cfg.shots), labels(cfg.queries)

    def images(n):
        x = torch.rand(cfg.meta_batch, n, *cfg.image_shape, generator=g)
        return (x > 0.3).float() if binary else x

    return images(sy.shape[1]), sy, images(qy.shape[1]), qy


# ------------------------------------------------------------------------------ the resolver
def test_compile_mode_is_decided_by_the_resolver():
    ex = resolve_execution("cpu", "omniglot", "batched", compile=can_compile)
    assert ex == ("batched", False, (), can_compile)
    assert resolve_execution("cpu", "omniglot", "batched") == ("batched", False, (), False)
    for bad in ("on", 1, None):
        with pytest.raises(ValueError, match="compile must be False, True or 'auto'"):
            resolve_execution("cpu", "omniglot", "batched", compile=bad)


def test_compile_refuses_what_it_cannot_run_and_auto_falls_back_with_a_note():
    with pytest.raises(ValueError, match="backend 'sequential' runs the tasks one by one"):
        resolve_execution("cpu", "omniglot", "sequential", compile=True)
    ex = resolve_execution("cpu", "omniglot", "sequential", compile="auto")
    assert not ex.compiled and ex.notes[0].startswith("compiled step off: backend 'sequential'")
    with pytest.raises(ValueError, match="runs on cpu or cuda; this learner is on meta"):
        resolve_execution("meta", "omniglot", "batched", compile=True)
    for mode in ("steps", "query"):
        with pytest.raises(ValueError, match=f"does not combine with recompute='{mode}'.*memory saving"):
            resolve_execution("cpu", "omniglot", "batched", compile=True, recompute=mode)
    assert resolve_execution("cpu", "omniglot", "batched", compile="auto", recompute="off").compiled == can_compile


def test_compile_needs_a_cxx_compiler_on_cpu_and_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
        resolve_execution("cpu", "omniglot", "batched", compile=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    assert "needs Triton on CUDA" in B.compile_support(torch.device("cuda"), "batched")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else real(name, *a))
    ex = resolve_execution("cuda", "omniglot", "batched", compile=True)  # graph mode not asked: a note says so
    assert ex.compiled and not ex.graph and "graph mode" in ex.notes[0] and "one by one" in ex.notes[0]
    ex = resolve_execution("cuda", "omniglot", "batched", True, compile=True)
    assert ex == ("batched", True, (), True)


@needs_compiler
def test_the_learner_takes_its_step_from_the_mode():
    assert type(MAMLPlusPlus(tiny(), backend="batched").step) is MetaStep
    learner = MAMLPlusPlus(tiny(), backend="batched", compile=True)
    assert isinstance(learner.step, CompiledStep) and learner.execution.compiled
    with pytest.raises(ValueError, match="cannot switch a compiled learner to backend 'sequential'"):
        learner.backend = "sequential"
    assert learner.backend == "batched"
    again = MAMLPlusPlus.from_state_dict(learner.state_dict(), compile=True)
    assert isinstance(again.step, CompiledStep)
    assert INDUCTOR_OPTIONS == {"layout_optimization": False}  # the measured choice (NOTE [Compiled step])


# ------------------------------------------------------------------------------ the step interface it uses
def test_step_tensors_from_flat_follow_the_learner_layout():
    learner = MAMLPlusPlus(tiny(), backend="batched")
    st = StepTensors.from_flat(learner, learner.parameters(), learner.running_stats)
    assert all(a is b for a, b in zip(st.theta, learner.theta))
    assert all(a is b for a, b in zip(st.bn_weight + st.bn_bias, learner.bn_weight + learner.bn_bias))
    assert st.lslr is learner.lslr and all(a is b for a, b in zip(st.running_var, learner.running_var))
    with pytest.raises(ValueError, match="expected .* parameters and .* running statistics"):
        StepTensors.from_flat(learner, learner.parameters()[:-1], learner.running_stats)
    fixed = MAMLPlusPlus(tiny(learnable_inner_lr=False), backend="batched")
    st = StepTensors.from_flat(fixed, fixed.parameters(), fixed.running_stats)
    assert st.lslr is fixed.lslr


def test_reading_points_the_step_at_other_tensors():
    cfg = tiny()
    learner = MAMLPlusPlus(cfg, backend="batched")
    data = batch(cfg)
    plan = epoch_plan(cfg, 0)
    params = [p.detach().clone().requires_grad_() for p in learner.parameters()]
    stats = [t.clone() for t in learner.running_stats]
    before = [t.clone() for t in learner.running_stats]
    with learner.step.reading(StepTensors.from_flat(learner, params, stats)):
        loss, _ = learner.step.meta_loss(*data, plan)
        grads = torch.autograd.grad(loss, params)
    # the learner's own tensors were neither read nor written; the given ones were
    assert all(torch.equal(a, b) for a, b in zip(before, learner.running_stats))
    assert not all(torch.equal(a, b) for a, b in zip(before, stats))
    own, _ = learner.step.meta_loss(*data, plan)
    own_grads = torch.autograd.grad(own, learner.parameters())
    assert torch.equal(loss, own) and all(torch.equal(a, b) for a, b in zip(grads, own_grads))
    with learner.step.reading(StepTensors.from_flat(learner, [p * 1.5 for p in params], stats)):
        assert not torch.equal(learner.step.meta_loss(*data, plan)[0], own)


# ------------------------------------------------------------------------------ compiled, against float64
def one_step(learner, data, plan):
    sx, sy, qx, qy = data
    metrics = learner.step.forward_backward(sx.to(learner.dtype), sy, qx.to(learner.dtype), qy, plan)
    grads = [None if p.grad is None else p.grad.detach().clone() for p in learner.parameters()]
    return metrics.detach().clone(), grads, [t.clone() for t in learner.running_stats]


def errors(got, ref):
    """Relative errors of metrics, every meta-gradient that is not ~0 in float64 (a conv bias in
    front of a batch norm has an exact gradient of 0: its float32 value is rounding noise) and the
    running statistics."""
    (m, g, s), (rm, rg, rs) = got, ref
    scale = max(float(t.norm()) for t in rg if t is not None)
    out = [float((m.double() - rm).norm() / rm.norm())]
    for a, r in zip(g, rg):
        assert (a is None) == (r is None)
        if r is not None and float(r.norm()) > 1e-9 * scale:
            out.append(float((a.double() - r).norm() / r.norm()))
        elif r is not None:  # a null gradient: its noise is tiny next to the largest gradient
            assert float((a.double() - r).norm()) < 1e-5 * scale
    out += [float((a.double() - r).norm() / r.norm()) for a, r in zip(s, rs)]
    return out


@needs_compiler
@pytest.mark.parametrize("backend", BATCHED)
@pytest.mark.parametrize("epoch", [0, 2])  # MSL with first order; the last step only with second order
def test_compiled_step_is_as_close_to_float64_as_eager(backend, epoch):
    cfg = tiny()
    data = batch(cfg)
    plan = epoch_plan(cfg, epoch)
    ref_learner = MAMLPlusPlus(cfg, backend=backend, dtype=torch.float64)
    state = ref_learner.state_dict()
    ref = one_step(ref_learner, data, plan)
    eager = MAMLPlusPlus(cfg, backend=backend)
    eager.load_state_dict(state)
    comp = MAMLPlusPlus(cfg, backend=backend, compile=True)
    comp.load_state_dict(state)
    e, c = errors(one_step(eager, data, plan), ref), errors(one_step(comp, data, plan), ref)
    assert comp.step.compiles == 1
    assert max(e) < GATE, f"eager float32 misses the gate: {max(e):.2e}"
    assert max(c) < GATE, f"compiled float32 misses the gate: {max(c):.2e} (eager {max(e):.2e})"
    assert max(c) > 0  # really a float32 computation


@needs_compiler
def test_one_compile_per_capture_key_and_training_steps_match_eager():
    cfg = tiny(first_order_to_second_order_epoch=0)
    eager = MAMLPlusPlus(cfg, backend="batched")
    logs = []
    comp = MAMLPlusPlus(cfg, backend="batched", compile=True)
    comp.step.log = logs.append
    comp.load_state_dict(eager.state_dict())
    # epochs 0 and 1: MSL (different weights), first order then second order (DA after epoch 0);
    # 2 and 3: last step only, second order
    for step, epoch in enumerate([0, 0, 1, 2, 3]):
        data = batch(cfg, seed=step)
        a = eager.meta_step(*data, epoch=epoch)
        b = comp.meta_step(*data, epoch=epoch)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert comp.step.compiles == 3 and len(logs) == 3  # (MSL, first), (MSL, second), (last only, second)
    assert "MSL every step: True, second order: False" in logs[0]
    for (name, p), q in zip(eager.named_parameters(), comp.parameters()):
        # a conv bias in front of a batch norm has an exact meta-gradient of 0: Adam turns the
        # rounding noise it gets instead into steps of ±lr, in eager and compiled runs alike
        if not (name.startswith("conv") and name.endswith(".bias")):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)
    for p, q in zip(eager.running_var, comp.running_var):  # (the means follow those biases)
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)
    # a checkpoint from the compiled learner resumes in an eager one and vice versa
    assert eager.state_dict()["optimizer"]["state"].keys() == comp.state_dict()["optimizer"]["state"].keys()


@needs_compiler
@pytest.mark.skipif(not mamlpp_ext.has_extension(), reason="compiled mamlpp_ext extension not built")
def test_trainer_and_command_line_switch(tmp_path):
    from mamlpp_ext.training.train import make_parser
    from mamlpp_ext.training.trainer import resolve_run_execution

    assert make_parser().parse_args([]).compile == "off"
    assert make_parser().parse_args(["--compile", "on"]).compile == "on"
    with pytest.raises(ValueError, match="^--compile: backend 'sequential'"):
        resolve_run_execution(torch.device("cpu"), "omniglot", "sequential", False, compile=True)
    assert resolve_run_execution(torch.device("cpu"), "omniglot", "fused", False, compile=True).compiled


@needs_cuda
@needs_compiler
@pytest.mark.parametrize("backend", BATCHED)
def test_compiled_step_in_graph_mode_matches_eager_on_cuda(backend):
    cfg = tiny()
    eager = MAMLPlusPlus(cfg, backend=backend, device="cuda")
    comp = MAMLPlusPlus(cfg, backend=backend, device="cuda", graph=True, compile=True)
    comp.load_state_dict(eager.state_dict())
    for step, epoch in enumerate([0, 0, 0, 0, 2, 2, 2, 2]):
        data = batch(cfg, seed=step)
        a = eager.meta_step(*data, epoch=epoch)
        b = comp.meta_step(*data, epoch=epoch)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert comp.graph.captures == 2 and comp.step.compiles == 2
    for (name, p), q in zip(eager.named_parameters(), comp.parameters()):
        if not (name.startswith("conv") and name.endswith(".bias")):  # see the CPU test above
            torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-5)
