"""Graph mode (model/graph.py, NOTE [Graph mode]).

Without a GPU: the functions graph mode captures run on the meta device under HostSyncGuard for
each backend and across the MSL end and the DA switch (any host read of device data raises);
the guard catches each kind of host read; graph mode says it is unavailable on CPU and "auto"
falls back to identical eager results; checkpoints move between modes.
With a GPU (skipped here): graph vs eager equal over steps that cross an MSL end and a DA
switch, evaluation equal, no host sync during replay, recaptures counted.
"""

import warnings

import pytest
import torch
import torch.nn as nn

import mamlpp_ext
from mamlpp_ext.model import MAMLConfig, MAMLPlusPlus
import mamlpp_ext.model.step as step_module
from mamlpp_ext.model.graph import HostSyncError, check_capturable as _check
from backend_cases import backend_params


def check_capturable(config, backend, epochs=(0,), network=None):
    """The captured functions of a graph-mode learner of ``config``, run on the meta device."""
    return _check(MAMLPlusPlus(config, backend=backend, device="meta", network=network, graph="check"), epochs)

HAS_EXT = mamlpp_ext.has_extension()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="compiled mamlpp_ext extension not built")
GRAPH_BACKENDS = backend_params(per_task=False)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _quiet_meta_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def tiny(**kw) -> MAMLConfig:
    base = dict(ways=3, shots=1, queries=2, meta_batch=2, image_height=16, image_width=16, num_filters=4,
                inner_steps=2, eval_inner_steps=3, msl_epochs=2, first_order_to_second_order_epoch=2, grad_clamp=5.0,
                total_epochs=6)
    base.update(kw)
    return MAMLConfig(**base)


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_captured_functions_do_not_read_device_data(backend):
    # epochs 0/1: MSL on, first order; 2: MSL off, first order; 3: MSL off, second order
    ops = check_capturable(tiny(), backend, epochs=(0, 2, 3))
    assert ops > 1000  # the whole step really ran under the guard


def test_captured_functions_with_a_user_network_and_adapted_bn_affine():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(16, 3))
    cfg = tiny(adapt_bn_affine=True, per_step_bn_weights=False, bn_eval_stats="running", network="custom")
    assert check_capturable(cfg, "batched", epochs=(0, 3), network=net) > 500


@pytest.mark.parametrize("read", ["item", "tolist", "bool", "nonzero", "cpu"])
def test_the_guard_catches_host_reads(monkeypatch, read):
    real = step_module.task_losses
    reads = {"item": lambda t: t.sum().item(), "tolist": lambda t: t.tolist(), "bool": lambda t: bool(t.sum() > 0),
             "nonzero": lambda t: torch.nonzero(t), "cpu": lambda t: t.cpu()}

    def sneaky(logits, y):
        out = real(logits, y)
        reads[read](out)
        return out

    monkeypatch.setattr(step_module, "task_losses", sneaky)
    with pytest.raises(HostSyncError):
        check_capturable(tiny(), "batched")


def test_the_guard_catches_host_to_device_copies(monkeypatch):
    real = step_module.task_losses

    def sneaky(logits, y):
        return real(logits, y) * torch.ones(3, dtype=logits.dtype).to(logits.device)[0]

    monkeypatch.setattr(step_module, "task_losses", sneaky)
    with pytest.raises(HostSyncError, match="host data to the device"):
        check_capturable(tiny(), "batched")


def test_the_guard_catches_0d_host_to_device_copies(monkeypatch):
    """A 0-d host tensor used by a device op is read on the host when a capture records the op:
    every replay would reuse that value."""
    real = step_module.task_losses

    def sneaky(logits, y):
        return real(logits, y) * torch.tensor(2.0, dtype=logits.dtype).to(logits.device)

    monkeypatch.setattr(step_module, "task_losses", sneaky)
    with pytest.raises(HostSyncError, match="host data to the device"):
        check_capturable(tiny(), "batched")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_capturable_learning_rate_is_float32_whatever_the_learner_dtype(dtype):
    """NOTE [Outer optimiser modes]: Adam's step counts are float32 tensors, and 1e-5 must not be
    rounded in half precision."""
    learner = MAMLPlusPlus(tiny(min_meta_lr=1e-5), backend="batched", dtype=dtype, graph="check")
    learner.step.set_meta_lr(1e-5)
    lr = learner.optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.dtype == torch.float32
    assert lr.item() == torch.tensor(1e-5, dtype=torch.float32).item()
    assert learner.state_dict()["optimizer"]["param_groups"][0]["lr"] == 1e-5


def test_graph_mode_is_unavailable_on_cpu_and_auto_falls_back(capsys, monkeypatch):
    import mamlpp_ext.model.backends as B

    monkeypatch.setattr(B, "_REPORTED", set())  # the line is printed once per reason and process
    cfg = tiny()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        MAMLPlusPlus(cfg, graph=True)
    with pytest.raises(ValueError, match="graph must be"):
        MAMLPlusPlus(cfg, graph="yes")
    auto = MAMLPlusPlus(cfg, backend="batched", graph="auto", dtype=torch.float64)
    assert auto.graph is None and "graph mode off: graph mode needs a CUDA device" in capsys.readouterr().err
    eager = MAMLPlusPlus(cfg, backend="batched", dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.randn(2, 3, 1, 16, 16, generator=g), torch.randn(2, 6, 1, 16, 16, generator=g)
    sy, qy = torch.arange(3).repeat(2, 1), torch.arange(3).repeat_interleave(2).repeat(2, 1)
    for epoch in (0, 3):
        assert auto.meta_step(sx, sy, qx, qy, epoch) == eager.meta_step(sx, sy, qx, qy, epoch)
    assert all(torch.equal(a, b) for a, b in zip(auto.parameters(), eager.parameters()))


def test_train_step_returns_device_metrics_matching_meta_step():
    cfg = tiny()
    a, b = MAMLPlusPlus(cfg, dtype=torch.float64), MAMLPlusPlus(cfg, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(2, 3, 1, 16, 16, generator=g), torch.arange(3).repeat(2, 1),
             torch.randn(2, 6, 1, 16, 16, generator=g), torch.arange(3).repeat_interleave(2).repeat(2, 1))
    out = a.train_step(*batch, epoch=1)
    ref = b.meta_step(*batch, epoch=1)
    assert isinstance(out, torch.Tensor) and out.shape == (4,)
    assert out.tolist() == [ref["loss"], ref["accuracy"], *ref["task_accuracies"]]


def test_checkpoints_move_between_eager_and_capturable_optimizer_state():
    """A graph-mode learner's optimizer is capturable (tensor lr, device step counts); its
    state_dict is stored as an eager learner's, and either mode loads either."""
    cfg = tiny()
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(2, 3, 1, 16, 16, generator=g), torch.arange(3).repeat(2, 1),
             torch.randn(2, 6, 1, 16, 16, generator=g), torch.arange(3).repeat_interleave(2).repeat(2, 1))
    eager = MAMLPlusPlus(cfg, dtype=torch.float64)
    eager.meta_step(*batch, epoch=3)
    captured = MAMLPlusPlus(cfg, dtype=torch.float64, graph="check")  # capturable state, no runner
    captured.load_state_dict(eager.state_dict())
    group = captured.optimizer.param_groups[0]
    assert group["capturable"] and isinstance(group["lr"], torch.Tensor)
    assert float(group["lr"]) == pytest.approx(captured.meta_lr(3), rel=1e-6)  # float32 on the device
    stored = captured.state_dict()["optimizer"]
    assert not stored["param_groups"][0]["capturable"] and isinstance(stored["param_groups"][0]["lr"], float)
    back = MAMLPlusPlus(cfg, dtype=torch.float64)
    back.load_state_dict(captured.state_dict())
    eager.meta_step(*batch, epoch=4)
    back.meta_step(*batch, epoch=4)
    assert all(torch.equal(x, y) for x, y in zip(eager.parameters(), back.parameters()))


# ---------------------------------------------------------------------------------------------
# CUDA: replay equals eager, no host sync while replaying
# ---------------------------------------------------------------------------------------------

def _cuda_batches(cfg, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        T = cfg.meta_batch
        sy = torch.stack([torch.randperm(cfg.ways, generator=g).repeat_interleave(cfg.shots) for _ in range(T)])
        qy = torch.stack([torch.randperm(cfg.ways, generator=g).repeat_interleave(cfg.queries) for _ in range(T)])
        out.append(tuple(t.pin_memory() for t in (torch.randn(T, sy.shape[1], *cfg.image_shape, generator=g), sy,
                                                   torch.randn(T, qy.shape[1], *cfg.image_shape, generator=g), qy)))
    return out


@pytest.fixture
def deterministic_cudnn():
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_cuda_graph_replay_equals_eager(backend, deterministic_cudnn):
    cfg = tiny(meta_batch=4, iterations_per_epoch=3)
    # The eager reference runs the same capturable Adam as graph mode ("check": eager steps with
    # the capturable optimizer state): plain Adam computes its bias corrections in float64 on the
    # host, the capturable one in float32 on the device, and that alone moves the last bits.
    eager = MAMLPlusPlus(cfg, backend=backend, device="cuda", graph="check")
    graph = MAMLPlusPlus(cfg, backend=backend, device="cuda", graph=True)
    # epochs 0, 1 (MSL, first order), 2 (final step only), 3 (second order): 3 structures
    plan = [e for e in range(4) for _ in range(4)]
    for i, (batch, epoch) in enumerate(zip(_cuda_batches(cfg, len(plan)), plan)):
        a = eager.train_step(*batch, epoch=epoch).clone()
        b = graph.train_step(*batch, epoch=epoch).clone()
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m: f"step {i}: {m}")
    # A conv bias right in front of a batch norm does not change the network's output (the batch
    # statistics subtract it again), so its meta-gradient is pure rounding noise (1.6e-8 to 5e-8
    # measured on the CPU), yet above Adam's eps: Adam turns it into steps of about ±lr whose signs
    # rounding decides, differently in two runs. Those biases, and the running means that add
    # them up, may therefore differ by up to 2·lr per step between eager and replay; every other
    # tensor must agree closely.
    drift = 2 * cfg.meta_lr * len(plan)
    names = [n for n, _ in graph.named_parameters()]
    for name, x, y in zip(names, graph.parameters(), eager.parameters()):
        pre_bn_bias = name.startswith("conv") and name.endswith(".bias")
        torch.testing.assert_close(x, y, rtol=1e-4, atol=drift if pre_bn_bias else 1e-5, msg=lambda m: f"{name}: {m}")
    for x, y in zip(graph.running_mean, eager.running_mean):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=drift)
    for x, y in zip(graph.running_var, eager.running_var):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    # (MSL, first order), (final step, first order), (final step, second order): one capture each
    assert graph.graph.captures == 3
    sx, sy, qx, qy = _cuda_batches(cfg, 1, seed=9)[0]
    for _ in range(2):  # first call captures, second replays
        ge, ee = graph.evaluate(sx, sy, qx, qy), eager.evaluate(sx, sy, qx, qy)
        torch.testing.assert_close(ge["logits"], ee["logits"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ge["task_losses"], ee["task_losses"], rtol=1e-4, atol=1e-5)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_cuda_graph_replay_does_not_sync(backend):
    cfg = tiny(meta_batch=4)
    learner = MAMLPlusPlus(cfg, backend=backend, device="cuda", graph=True)
    batches = _cuda_batches(cfg, 5)
    for b in batches[:3]:  # warm-up steps and the capture
        learner.train_step(*b, epoch=3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches[3:]:
            learner.train_step(*b, epoch=3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
