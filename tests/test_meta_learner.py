"""MAMLPlusPlus: backends agree, the six components behave per SPEC §3, state round-trips,
learning works, bad input is rejected.

Small nets keep this fast: "omniglot-shaped" is 1×16×16 with 4 stages (feature map 1×1 at
the head, like 28×28), "mini-ImageNet-shaped" is 3×32×32 with 4 stages (2×2 at the head, a
multi-pixel flatten like 5×5).
"""

import io

import pytest
import torch
import torch.nn.functional as F

import mamlpp_ext
from mamlpp_ext.model.config import MAMLConfig, from_preset
from mamlpp_ext.model.meta_learner import MAMLPlusPlus
from mamlpp_ext.model.schedules import cosine_meta_lr, msl_weights
from _nets import forward_task
from backend_cases import backend_params

DT = torch.float64
HAS_EXT = mamlpp_ext.has_extension()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="compiled mamlpp_ext extension not built")
BACKENDS = backend_params()
FAST_BACKENDS = backend_params(per_task=False)

SHAPES = {
    "omniglot": dict(image_channels=1, image_height=16, image_width=16, num_filters=6, ways=3, shots=2, queries=2),
    "mini-imagenet": dict(image_channels=3, image_height=32, image_width=32, num_filters=5, ways=3, shots=1,
                          queries=3),
}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # conftest.py


def small_config(shape="omniglot", **kw) -> MAMLConfig:
    base = dict(SHAPES[shape], meta_batch=3, inner_steps=3, eval_inner_steps=3, msl_epochs=4, total_epochs=20,
                seed=0)
    base.update(kw)
    return MAMLConfig(**base)


def random_batch(cfg: MAMLConfig, T=None, seed=0):
    """Fresh random images, labels a random permutation of the ways per task."""
    g = torch.Generator().manual_seed(seed)
    T = T or cfg.meta_batch
    C, H, W = cfg.image_shape

    def labels(per_class):
        base = torch.arange(cfg.ways).repeat_interleave(per_class)
        return torch.stack([base[torch.randperm(len(base), generator=g)] for _ in range(T)])

    sy, qy = labels(cfg.shots), labels(cfg.queries)
    sx = torch.randn(T, sy.shape[1], C, H, W, generator=g, dtype=DT)
    qx = torch.randn(T, qy.shape[1], C, H, W, generator=g, dtype=DT)
    return sx, sy, qx, qy


def grads_of(learner, loss):
    return torch.autograd.grad(loss, learner.parameters())


def close(a, b, tol=1e-9):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# An independent reference of the MAML++ per-task loss, written with torch.nn.functional only.
# ---------------------------------------------------------------------------------------------

def reference_meta_loss(learner, sx, sy, qx, qy, epoch, *, detach_inner_grads, running=None):
    """Mean over tasks of the MAML++ task loss; running = (means, vars) lists updated task by task."""
    cfg = learner.config
    S = cfg.inner_steps
    msl_on = cfg.use_msl and epoch < cfg.msl_epochs
    v = msl_weights(S, epoch, cfg.msl_epochs) if msl_on else [0.0] * (S - 1) + [1.0]
    theta, lslr = learner.theta, learner.lslr
    gam, bet = learner.bn_weight, learner.bn_bias
    rm, rv = running if running is not None else ([t.clone() for t in learner.running_mean],
                                                  [t.clone() for t in learner.running_var])

    def fwd(x, w, step):
        r, rs = min(step, gam[0].shape[0] - 1), min(step, rm[0].shape[0] - 1)
        out = x
        for layer in range(cfg.num_stages):
            out = F.conv2d(out, w[2 * layer], w[2 * layer + 1], padding=1)
            out = F.batch_norm(out, rm[layer][rs], rv[layer][rs], gam[layer][r], bet[layer][r], training=True,
                               momentum=cfg.bn_momentum, eps=cfg.bn_eps)
            out = F.max_pool2d(F.leaky_relu(out, 0.01), 2, 2)
        return F.linear(out.flatten(1), w[-2], w[-1])

    total = []
    for t in range(sx.shape[0]):
        w = list(theta)
        task = 0.0
        for i in range(S):
            loss = F.cross_entropy(fwd(sx[t], w, i), sy[t])
            g = torch.autograd.grad(loss, w, create_graph=True)
            if detach_inner_grads:
                g = [x.detach() for x in g]
            col = min(i, lslr.shape[1] - 1)
            w = [p - lslr[k, col] * gk for k, (p, gk) in enumerate(zip(w, g))]
            if msl_on or i == S - 1:
                task = task + v[i] * F.cross_entropy(fwd(qx[t], w, i), qy[t])
        total.append(task)
    return torch.stack(total).mean(), (rm, rv)


@pytest.mark.parametrize("msl_epoch", [1, 10])  # MSL active / past msl_epochs
@pytest.mark.parametrize("second_order", [True, False])
def test_sequential_matches_independent_reference(second_order, msl_epoch):
    cfg = small_config(second_order=second_order)
    L = MAMLPlusPlus(cfg, backend="sequential", dtype=DT)
    batch = random_batch(cfg, seed=4)
    ref, (rm, rv) = reference_meta_loss(L, *batch, msl_epoch, detach_inner_grads=not second_order)
    ref_g = grads_of(L, ref)
    loss, info = L.meta_loss(*batch, epoch=msl_epoch)
    assert info["second_order"] is second_order
    close(loss, ref)
    for a, b in zip(grads_of(L, loss), ref_g):
        close(a, b)
    for a, b in zip(L.running_mean + L.running_var, rm + rv):
        close(a, b, 1e-12)


# ---------------------------------------------------------------------------------------------
# Backends agree
# ---------------------------------------------------------------------------------------------

def _run_meta_loss(cfg, backend, batch, epoch):
    L = MAMLPlusPlus(cfg, backend=backend, dtype=DT)
    loss, info = L.meta_loss(*batch, epoch=epoch)
    return L, loss, info, grads_of(L, loss)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("msl_epoch", [2, 6])
@pytest.mark.parametrize("second_order", [True, False])
@pytest.mark.parametrize("shape", ["omniglot", "mini-imagenet"])
def test_backends_agree_with_sequential(shape, second_order, msl_epoch, backend):
    cfg = small_config(shape, second_order=second_order)
    batch = random_batch(cfg, seed=11)
    Ls, loss_s, info_s, g_s = _run_meta_loss(cfg, "sequential", batch, msl_epoch)
    Lb, loss_b, info_b, g_b = _run_meta_loss(cfg, backend, batch, msl_epoch)
    close(loss_b, loss_s)
    close(info_b["task_losses"], info_s["task_losses"])
    close(info_b["query_logits"], info_s["query_logits"])
    assert torch.equal(info_b["task_accuracies"], info_s["task_accuracies"])
    assert info_b["loss_weights"] == info_s["loss_weights"]
    names = [n for n, _ in Ls.named_parameters()]
    assert "lslr" in names and "bn0.weight" in names
    for n, a, b in zip(names, g_b, g_s):
        assert a.abs().sum() > 0, n
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"{n}: {m}")
    # running statistics: the batched rule = mean over tasks of each task run alone (sequential)
    alone = []
    for t in range(cfg.meta_batch):
        L1 = MAMLPlusPlus(cfg, backend="sequential", dtype=DT)
        L1.meta_loss(*(x[t:t + 1] for x in batch), epoch=msl_epoch)
        alone.append(L1.running_mean + L1.running_var)
    for i, got in enumerate(Lb.running_mean + Lb.running_var):
        close(got, torch.stack([a[i] for a in alone]).mean(0), 1e-12)
    # ... which differs from the sequential task-after-task rule when T > 1
    assert not torch.allclose(Lb.running_mean[0], Ls.running_mean[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_configured_activation_slope_is_what_runs(backend):
    """config.leaky_relu_slope reaches the network's fused BN + activation: the backends agree with
    the sequential reference at slope 0.2, and the result differs from slope 0.01."""
    batch = random_batch(small_config(), seed=3)
    cfg = small_config(leaky_relu_slope=0.2)
    _, loss_s, _, g_s = _run_meta_loss(cfg, "sequential", batch, 0)
    _, loss_b, _, g_b = _run_meta_loss(cfg, backend, batch, 0)
    close(loss_b, loss_s)
    for a, b in zip(g_b, g_s):
        close(a, b)
    _, loss_001, _, _ = _run_meta_loss(small_config(leaky_relu_slope=0.01), backend, batch, 0)
    assert abs(float(loss_001) - float(loss_b)) > 1e-6


@needs_ext
@pytest.mark.parametrize("bn_eval_stats", ["batch", "running"])
def test_fused_backend_runs_no_separate_activation_or_batch_norm(bn_eval_stats):
    """The fused backend's network forwards go through the compiled BN op with the activation fused,
    in training and in evaluation: no ATen batch norm or LeakyReLU op is dispatched."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Names(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    cfg = small_config(bn_eval_stats=bn_eval_stats)
    learner = MAMLPlusPlus(cfg, backend="fused", dtype=DT)
    batch = random_batch(cfg, seed=4)
    for run in (lambda: learner.meta_step(*batch, epoch=0), lambda: learner.evaluate(*batch)):
        with Names() as names:
            run()
        assert "mamlpp_ext.batch_norm" in names.seen or "mamlpp_ext.batch_norm_eval" in names.seen
        banned = {n for n in names.seen if "leaky_relu" in n or n.startswith("aten.") and "batch_norm" in n}
        assert not banned, banned


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_one_task_running_stats_identical(backend):
    cfg = small_config(meta_batch=1)
    batch = random_batch(cfg, seed=5)
    Ls, *_ = _run_meta_loss(cfg, "sequential", batch, 0)
    Lb, *_ = _run_meta_loss(cfg, backend, batch, 0)
    for a, b in zip(Lb.running_mean + Lb.running_var, Ls.running_mean + Ls.running_var):
        close(a, b, 1e-12)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("variant", ["plain-maml", "adapt-bn-affine", "no-per-step-lr-learnable"])
def test_backends_agree_on_variants(variant, backend):
    kw = {
        "plain-maml": dict(use_msl=False, per_step_bn_statistics=False, per_step_bn_weights=False,
                           learnable_inner_lr=False, per_step_inner_lr=False, cosine_annealing=False),
        "adapt-bn-affine": dict(adapt_bn_affine=True, per_step_bn_weights=False),
        "no-per-step-lr-learnable": dict(per_step_inner_lr=False, per_step_bn_statistics=False),
    }[variant]
    cfg = small_config(**kw)
    batch = random_batch(cfg, seed=21)
    Ls, loss_s, _, g_s = _run_meta_loss(cfg, "sequential", batch, 1)
    Lb, loss_b, _, g_b = _run_meta_loss(cfg, backend, batch, 1)
    close(loss_b, loss_s)
    for a, b in zip(g_b, g_s):
        close(a, b)
    if variant == "plain-maml":
        assert not Ls.lslr.requires_grad and Ls.lslr.shape == (10, 1)
        assert Ls.bn_weight[0].shape == (1, 6) and Ls.running_mean[0].shape == (1, 6)
    if variant == "adapt-bn-affine":
        assert Ls.lslr.shape == (18, 3)
        fw_s = Ls.adapt(batch[0], batch[1])
        fw_b = Lb.adapt(batch[0], batch[1])
        assert fw_s["bn0.weight"].shape == (3, 6)
        assert not torch.allclose(fw_s["bn0.weight"], Ls.bn_weight[0][0].expand(3, 6))  # adapted per task
        for n in fw_s:
            close(fw_b[n], fw_s[n])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("bn_eval_stats", ["batch", "running"])
def test_evaluate_agrees_and_restores_state(bn_eval_stats, backend):
    cfg = small_config("mini-imagenet", bn_eval_stats=bn_eval_stats, eval_inner_steps=5)  # 5 > S = 3
    batch = random_batch(cfg, seed=2)
    learners = [MAMLPlusPlus(cfg, backend=b, dtype=DT) for b in ("sequential", backend)]
    for L in learners:  # make the running statistics non-trivial first (same for both: T = 1)
        L.meta_loss(*(x[:1] for x in random_batch(cfg, seed=9)), epoch=0)
    before = [[t.clone() for t in L.running_mean + L.running_var] for L in learners]
    outs = [L.evaluate(*batch) for L in learners]
    for L, b in zip(learners, before):
        assert all(torch.equal(x, y) for x, y in zip(L.running_mean + L.running_var, b))
    close(outs[1]["logits"], outs[0]["logits"])
    close(outs[1]["task_losses"], outs[0]["task_losses"])
    assert torch.equal(outs[1]["task_accuracies"], outs[0]["task_accuracies"])
    assert outs[0]["logits"].shape == (3, 9, 3)
    # adapt + predict reproduce evaluate's logits, and leave the state alone too
    for L, out in zip(learners, outs):
        fw = L.adapt(batch[0], batch[1])
        close(L.predict(batch[2], fw), out["logits"])
        assert all(torch.equal(x, y) for x, y in zip(L.running_mean + L.running_var, before[learners.index(L)]))


def test_eval_stats_modes_differ_and_running_uses_rows():
    cfg = small_config(bn_eval_stats="running")
    L = MAMLPlusPlus(cfg, backend="batched", dtype=DT)
    L.meta_loss(*random_batch(cfg, seed=1), epoch=0)
    batch = random_batch(cfg, seed=3)
    out_running = L.evaluate(*batch)["logits"]
    Lb = MAMLPlusPlus(cfg.replace(bn_eval_stats="batch"), backend="batched", dtype=DT)
    Lb.load_state_dict(L.state_dict())
    out_batch = Lb.evaluate(*batch)["logits"]
    assert not torch.allclose(out_running, out_batch)
    # with statistics reset to the batch statistics' values, "running" changes, proving they are used
    with torch.no_grad():
        for t in L.running_mean:
            t.add_(0.5)
    assert not torch.allclose(L.evaluate(*batch)["logits"], out_running)


def test_eval_steps_beyond_training_reuse_last_row():
    """Evaluation with more steps than S: step i uses row min(i, S-1) of LSLR, BN γ/β and statistics."""
    cfg = small_config(inner_steps=2, eval_inner_steps=4, bn_eval_stats="running")
    L = MAMLPlusPlus(cfg, backend="sequential", dtype=DT)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # make every row different
        L.lslr.copy_(0.05 + 0.1 * torch.rand(L.lslr.shape, generator=g, dtype=DT))
        for t in L.bn_weight + L.bn_bias + L.running_mean:
            t.add_(0.3 * torch.rand(t.shape, generator=g, dtype=DT))
    sx, sy, qx, qy = random_batch(cfg, T=1, seed=8)
    net = L.net
    w = [t.detach() for t in L.theta]
    def rows(ts, i):
        return [t[min(i, 1)].detach() for t in ts]
    for i in range(4):
        w = [p.requires_grad_() for p in w]
        out = forward_task(net, sx[0], w, rows(L.bn_weight, i), rows(L.bn_bias, i), rows(L.running_mean, i),
                               rows(L.running_var, i), "running")
        gr = torch.autograd.grad(F.cross_entropy(out, sy[0]), w)
        w = [(p - L.lslr[k, min(i, 1)].detach() * gk).detach() for k, (p, gk) in enumerate(zip(w, gr))]
    expect = forward_task(net, qx[0], w, rows(L.bn_weight, 3), rows(L.bn_bias, 3), rows(L.running_mean, 3),
                              rows(L.running_var, 3), "running")
    for backend in backend_params(compiled=False):
        L.backend = backend
        close(L.evaluate(sx, sy, qx, qy)["logits"][0], expect)


# ---------------------------------------------------------------------------------------------
# DA, CA, LSLR, gradient clamp
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_da_switches_order_at_configured_epoch(backend):
    cfg = small_config(use_msl=False, second_order=True, first_order_to_second_order_epoch=2)
    batch = random_batch(cfg, seed=6)
    L = MAMLPlusPlus(cfg, backend=backend, dtype=DT)
    loss_fo, info_fo = L.meta_loss(*batch, epoch=2)
    g_fo = grads_of(L, loss_fo)
    loss_so, info_so = L.meta_loss(*batch, epoch=3)
    g_so = grads_of(L, loss_so)
    assert info_fo["second_order"] is False and info_so["second_order"] is True
    ref_fo, _ = reference_meta_loss(L, *batch, 2, detach_inner_grads=True)
    ref_so, _ = reference_meta_loss(L, *batch, 3, detach_inner_grads=False)
    for a, b in zip(g_fo, grads_of(L, ref_fo)):
        close(a, b)
    for a, b in zip(g_so, grads_of(L, ref_so)):
        close(a, b)
    close(loss_fo, loss_so)  # same value, different derivatives
    assert max((a - b).abs().max().item() for a, b in zip(g_fo, g_so)) > 1e-6


@pytest.mark.parametrize("backend", backend_params(compiled=False))
def test_ca_sets_meta_lr_per_epoch(backend):
    cfg = small_config(meta_lr=2e-3, min_meta_lr=1e-5, total_epochs=20)
    L = MAMLPlusPlus(cfg, backend=backend, dtype=DT)
    batch = random_batch(cfg)
    for e in (0, 7, 20):
        m = L.meta_step(*batch, epoch=e)
        assert m["meta_lr"] == pytest.approx(cosine_meta_lr(e, 2e-3, 1e-5, 20), rel=1e-15)
        assert L.optimizer.param_groups[0]["lr"] == m["meta_lr"]
        assert m["epoch"] == e and len(m["task_accuracies"]) == 3
        assert m["loss_weights"] == (msl_weights(3, e, 4) if e < 4 else [0.0, 0.0, 1.0])
    off = MAMLPlusPlus(cfg.replace(cosine_annealing=False), backend=backend, dtype=DT)
    assert off.meta_step(*batch, epoch=7)["meta_lr"] == 2e-3


@pytest.mark.parametrize("backend", backend_params(compiled=False))
def test_lslr_learns_and_may_go_negative(backend):
    cfg = small_config(inner_lr=0.01, meta_lr=0.05, min_meta_lr=0.05)
    L = MAMLPlusPlus(cfg, backend=backend, dtype=DT)
    assert L.lslr.shape == (10, 3) and torch.all(L.lslr == 0.01)
    before = L.lslr.detach().clone()
    L.meta_step(*random_batch(cfg, seed=3), epoch=0)
    g = L.lslr.grad
    # every layer and step receives gradient, except the conv biases: the batch norm after each conv
    # cancels a per-channel bias, so their gradients (and their rates') are zero up to rounding
    conv_bias = torch.tensor(["conv" in n and n.endswith(".bias") for n in L.fast_weight_names])
    assert torch.all(g[~conv_bias] != 0)
    assert torch.all(g[conv_bias].abs() < 1e-20)
    # first Adam step moves each rate by lr·sign(grad), unclamped: rates with positive grad go negative
    close(L.lslr.detach(), before - 0.05 * g / (g.abs() + 1e-8), 1e-9)
    assert torch.equal(L.lslr.detach()[~conv_bias] < 0, g[~conv_bias] > 0)
    assert (L.lslr < 0).any()
    # negative rates are kept and used: one adaptation step ascends the support loss
    with torch.no_grad():
        L.lslr.fill_(-0.2)
    L.meta_step(*random_batch(cfg, seed=4), epoch=0)
    assert torch.all(L.lslr < -0.1)
    sx, sy, _, _ = random_batch(cfg, seed=5)
    fw = L.adapt(sx, sy, steps=1)
    w0 = [t.detach().requires_grad_() for t in L.theta]
    out = forward_task(L.net, sx[0], w0, [t[0].detach() for t in L.bn_weight], [t[0].detach() for t in L.bn_bias],
                             None, None, "batch")
    gr = torch.autograd.grad(F.cross_entropy(out, sy[0]), w0)
    for k, name in enumerate(L.fast_weight_names):
        close(fw[name][0], w0[k].detach() - L.lslr[k, 0].detach() * gr[k])


def test_grad_clamp_on_network_weights_only():
    cfg = small_config(grad_clamp=1e-3)
    L = MAMLPlusPlus(cfg, backend="batched", dtype=DT)
    loss, _ = MAMLPlusPlus(cfg, backend="batched", dtype=DT).meta_loss(*random_batch(cfg), epoch=0)
    L.meta_step(*random_batch(cfg), epoch=0)
    net_grads = torch.cat([p.grad.flatten() for p in L.theta + L.bn_weight + L.bn_bias])
    assert net_grads.abs().max() <= 1e-3 and (net_grads.abs() == 1e-3).any()
    assert L.lslr.grad.abs().max() > 1e-3  # the LSLR rates are not network weights
    unclamped = MAMLPlusPlus(cfg.replace(grad_clamp=None), backend="batched", dtype=DT)
    unclamped.meta_step(*random_batch(cfg), epoch=0)
    assert torch.cat([p.grad.flatten() for p in unclamped.theta]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# State round trip
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_resumes_bit_identically(backend):
    cfg = small_config(total_epochs=4, msl_epochs=2)
    A = MAMLPlusPlus(cfg, backend=backend, dtype=torch.float32)
    batches = [random_batch(cfg, seed=s) for s in range(5)]
    A.meta_step(*batches[0], epoch=0)
    A.meta_step(*batches[1], epoch=1)
    buf = io.BytesIO()
    torch.save(A.state_dict(), buf)
    m_a = [A.meta_step(*batches[2 + i], epoch=2 + i) for i in range(3)]
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    B = MAMLPlusPlus(cfg.replace(seed=123), backend=backend, dtype=torch.float32)
    assert not torch.equal(B.theta[0], A.theta[0])
    B.load_state_dict(state)
    assert B.last_epoch == 1 and B.meta_steps_done == 2
    m_b = [B.meta_step(*batches[2 + i], epoch=2 + i) for i in range(3)]
    assert m_a == m_b
    sa, sb = A.state_dict(), B.state_dict()
    for key in ("theta", "bn_weight", "bn_bias", "running_mean", "running_var"):
        assert all(torch.equal(x, y) for x, y in zip(sa[key], sb[key])), key
    assert torch.equal(sa["lslr"], sb["lslr"])
    for i, st in sa["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, sb["optimizer"]["state"][i][k]), (i, k)
    C = MAMLPlusPlus.from_state_dict(sa, backend="sequential")
    assert C.config == cfg and all(torch.equal(x, y) for x, y in zip(C.theta, A.theta))


def test_state_dict_is_a_copy_and_rejects_mismatch():
    cfg = small_config()
    A = MAMLPlusPlus(cfg, dtype=DT)
    A.meta_step(*random_batch(cfg), epoch=0)
    sd = A.state_dict()
    snapshot = sd["optimizer"]["state"][0]["exp_avg"].clone()
    A.meta_step(*random_batch(cfg, seed=1), epoch=0)
    assert torch.equal(sd["optimizer"]["state"][0]["exp_avg"], snapshot)
    other = MAMLPlusPlus(cfg.replace(num_filters=7), dtype=DT)
    with pytest.raises(ValueError, match=r"state\['theta'\]\[0\] has shape"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match="not a MAMLPlusPlus state_dict"):
        other.load_state_dict({"theta": []})


# ---------------------------------------------------------------------------------------------
# Learning works
# ---------------------------------------------------------------------------------------------

def prototype_tasks(protos, T, ways, shots, queries, noise, g):
    """Classes are fixed prototypes (a 3×3 patch pattern) plus Gaussian noise; labels permuted per task."""
    xs, ys, xq, yq = [], [], [], []
    for _ in range(T):
        p = protos[torch.randperm(protos.shape[0], generator=g)[:ways]]
        sy = torch.arange(ways).repeat_interleave(shots)
        qy = torch.arange(ways).repeat_interleave(queries)
        xs.append(p[sy] + noise * torch.randn(len(sy), *p.shape[1:], generator=g))
        xq.append(p[qy] + noise * torch.randn(len(qy), *p.shape[1:], generator=g))
        ys.append(sy)
        yq.append(qy)
    return torch.stack(xs), torch.stack(ys), torch.stack(xq), torch.stack(yq)


@pytest.mark.parametrize("backend", BACKENDS)
def test_learning_raises_query_accuracy(backend):
    torch.manual_seed(0)
    cfg = MAMLConfig(ways=5, shots=1, queries=3, meta_batch=4, image_channels=1, image_height=8, image_width=8,
                     num_stages=2, num_filters=8, inner_steps=3, eval_inner_steps=3, meta_lr=1e-2,
                     min_meta_lr=1e-2, total_epochs=10, msl_epochs=2)
    g = torch.Generator().manual_seed(0)
    protos = torch.zeros(40, 1, 8, 8)
    protos[:, :, 2:5, 2:5] = 1.5 * torch.randn(40, 1, 3, 3, generator=g)
    L = MAMLPlusPlus(cfg, backend=backend)
    test_tasks = prototype_tasks(protos, 30, 5, 1, 3, 0.5, torch.Generator().manual_seed(1))
    before = L.evaluate(*test_tasks)["accuracy"]
    for it in range(40):
        L.meta_step(*prototype_tasks(protos, 4, 5, 1, 3, 0.5, g), epoch=it // 10)
    after = L.evaluate(*test_tasks)["accuracy"]
    assert after >= 0.7 and after >= before + 0.1, (before, after)  # chance is 0.2


# ---------------------------------------------------------------------------------------------
# Rejected input
# ---------------------------------------------------------------------------------------------

def test_rejects_bad_construction():
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        MAMLPlusPlus(small_config(), backend="jax")
    with pytest.raises(ValueError, match="unknown preset"):
        MAMLPlusPlus("omniglot-3way-1shot")
    with pytest.raises(TypeError, match="config must be a MAMLConfig"):
        MAMLPlusPlus({"ways": 5})
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        MAMLPlusPlus(small_config(), dtype=torch.int64)
    assert MAMLPlusPlus("omniglot-5way-1shot-maml").lslr.shape == (10, 1)


@pytest.mark.skipif(HAS_EXT, reason="extension is built")
def test_fused_without_extension_is_a_clear_error():
    with pytest.raises(RuntimeError, match="backend='fused' needs the compiled mamlpp_ext kernels"):
        MAMLPlusPlus(small_config(), backend="fused")


def _bad(batch, idx, value):
    b = list(batch)
    b[idx] = value
    return b


@pytest.mark.parametrize("backend", backend_params(compiled=False))
def test_rejects_bad_batches(backend):
    cfg = small_config()
    L = MAMLPlusPlus(cfg, backend=backend, dtype=DT)
    sx, sy, qx, qy = batch = random_batch(cfg)
    cases = [
        (_bad(batch, 0, sx[0]), ValueError, r"support_x must have shape \(T, N·K, C, H, W\)"),
        (_bad(batch, 0, sx.repeat(1, 1, 3, 1, 1)), ValueError,
         "support_x has 3 channels but the network expects image_channels=1"),
        (_bad(batch, 2, qx[..., :8, :8]), ValueError, "query_x has images of 8x8"),
        (_bad(batch, 1, sy[:, :-1]), ValueError, "support_y must have shape"),
        (_bad(batch, 3, qy + cfg.ways), ValueError, r"query_y holds labels in \[3, 5\] but must be in \[0, 2\]"),
        (_bad(batch, 1, sy - 1), ValueError, "support_y holds labels in"),
        (_bad(batch, 1, sy.to(torch.float32)), TypeError, "support_y must hold integer class labels"),
        (_bad(batch, 2, qx[:2]), ValueError, "query_x has 2 tasks but the support set has 3"),
        (_bad(batch, 3, qy[:2]), ValueError, "query_y must have shape"),
        (_bad(batch, 0, sx.numpy()), TypeError, "support_x must be a torch.Tensor"),
        (_bad(batch, 0, sx[:, :0]), ValueError, "support_x must hold at least one"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            L.meta_step(*args, epoch=0)
        with pytest.raises(exc, match=match):
            L.evaluate(*args)
    with pytest.raises(ValueError, match="epoch must be a non-negative integer"):
        L.meta_step(*batch, epoch=-1)
    with pytest.raises(ValueError, match="epoch must be a non-negative integer"):
        L.meta_step(*batch, epoch=1.5)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        L.evaluate(*batch, steps=0)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        L.adapt(sx, sy, steps=2.0)
    fw = L.adapt(sx, sy)
    with pytest.raises(ValueError, match="fast_weights is missing"):
        L.predict(qx, {k: v for k, v in fw.items() if k != "linear.bias"})
    with pytest.raises(ValueError, match=r"fast_weights\['conv0.weight'\] must have shape"):
        L.predict(qx[:2], fw)
    with pytest.raises(ValueError, match="bn_step must be a non-negative int"):
        L.predict(qx, fw, bn_step=-1)
    # nothing above changed the learner
    assert L.last_epoch is None and L.meta_steps_done == 0
    fresh = MAMLPlusPlus(cfg, backend=backend, dtype=DT)
    assert all(torch.equal(a, b) for a, b in zip(L.theta + L.running_mean, fresh.theta + fresh.running_mean))


# ---------------------------------------------------------------------------------------------
# CUDA (run on a GPU machine by scripts/gpu_check.sh; skipped here)
# ---------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda"


@needs_cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("second_order", [True, False])
@pytest.mark.parametrize("shape", ["omniglot", "mini-imagenet"])
def test_cuda_backends_match_cpu_sequential(shape, second_order, backend):
    """float64: every backend on CUDA gives the CPU sequential loss, gradients and running stats."""
    cfg = small_config(shape, second_order=second_order)
    batch = random_batch(cfg, seed=21)
    Lc, loss_c, info_c, g_c = _run_meta_loss(cfg, "sequential", batch, 2)
    Lg = MAMLPlusPlus(cfg, backend=backend, device="cuda", dtype=DT)
    loss_g, info_g = Lg.meta_loss(*batch, epoch=2)
    g_g = grads_of(Lg, loss_g)
    close(loss_g.cpu(), loss_c)
    names = [n for n, _ in Lc.named_parameters()]
    for n, a, b in zip(names, g_g, g_c):
        assert a.is_cuda, n
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9, msg=lambda m: f"{n}: {m}")
    if backend == "sequential":
        for a, b in zip(Lg.running_mean + Lg.running_var, Lc.running_mean + Lc.running_var):
            close(a.cpu(), b, 1e-12)


@needs_cuda
@needs_ext
@pytest.mark.parametrize("preset", ["omniglot-5way-1shot", "mini-imagenet-5way-1shot"])
def test_cuda_fused_float32_full_size_as_accurate_as_batched(preset):
    """The real network sizes in float32, second order: measured against a float64 run of the
    batched backend, the fused backend's loss and meta-gradients are as accurate as the batched
    backend's own float32 ones (BN over a handful of 1x1 maps amplifies round-off, so the two
    float32 runs differ from each other by more than a fixed tight tolerance would allow)."""
    cfg = from_preset(preset, meta_batch=2)
    g = torch.Generator().manual_seed(3)
    C, H, W = cfg.image_shape
    sy = torch.stack([torch.randperm(cfg.ways * cfg.shots, generator=g) % cfg.ways for _ in range(2)])
    qy = torch.stack([torch.randperm(cfg.ways * cfg.queries, generator=g) % cfg.ways for _ in range(2)])
    sx = torch.rand(2, sy.shape[1], C, H, W, generator=g)
    qx = torch.rand(2, qy.shape[1], C, H, W, generator=g)
    state = MAMLPlusPlus(cfg, backend="batched", device=DEVICE, dtype=torch.float64).state_dict()
    out = {}
    for backend, dt in (("batched", torch.float64), ("batched", torch.float32), ("fused", torch.float32)):
        L = MAMLPlusPlus.from_state_dict(state, backend=backend, device=DEVICE, dtype=dt)
        loss, _ = L.meta_loss(sx, sy, qx, qy, epoch=0)
        out[backend, dt] = [loss.detach().double().cpu()] + [x.double().cpu() for x in grads_of(L, loss)]
    ref = out["batched", torch.float64]
    names = ["loss"] + [n for n, _ in L.named_parameters()]
    for n, r, b, f in zip(names, ref, out["batched", torch.float32], out["fused", torch.float32]):
        scale = r.norm().item() + 1e-3  # conv biases before BN have (mathematically) zero gradient
        err_b, err_f = (b - r).norm().item() / scale, (f - r).norm().item() / scale
        assert err_f <= max(4 * err_b, 1e-5), f"{n}: fused float32 error {err_f:.2e} vs batched {err_b:.2e}"
