"""The functional SPEC §2 network: shapes, init, per-task layout vs torch.nn, batched layout vs per-task.

The networks lifted from a user's nn.Sequential are tested in test_user_network.py."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mamlpp_ext.model.config import from_preset
from _nets import forward_task
from mamlpp_ext.model.network import VGGNet
from mamlpp_ext.ops import reference

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # conftest.py


def test_spec_sizes():
    om = VGGNet.from_config(from_preset("omniglot-20way-1shot"))
    assert om.feature_size == 64 and len(om.weight_shapes) == 10
    assert om.weight_shapes[0] == (64, 1, 3, 3) and om.weight_shapes[-2] == (20, 64)
    mi = VGGNet.from_config(from_preset("mini-imagenet-5way-1shot"))
    assert mi.feature_size == 48 * 25 and mi.weight_shapes[-2] == (5, 1200)
    assert mi.weight_names[:2] == ["conv0.weight", "conv0.bias"] and mi.bn_channels == [48] * 4


def test_init_follows_spec():
    net = VGGNet(3, 84, 84, 5, num_filters=48)
    ws = net.init_weights(generator=torch.Generator().manual_seed(3), dtype=DT)
    again = net.init_weights(generator=torch.Generator().manual_seed(3), dtype=DT)
    assert all(torch.equal(a, b) for a, b in zip(ws, again))
    for w, shape in zip(ws, net.weight_shapes):
        assert tuple(w.shape) == shape and w.dtype == DT
        if len(shape) == 1:
            assert torch.count_nonzero(w) == 0
        else:
            rf = math.prod(shape[2:]) if len(shape) > 2 else 1
            bound = math.sqrt(6.0 / (shape[1] * rf + shape[0] * rf))
            assert w.abs().max() <= bound
            assert w.abs().max() > 0.9 * bound  # uniform over the whole range
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


def _reference_module(net: VGGNet, weights, gamma, beta):
    layers = []
    c = net.in_channels
    for i in range(net.num_stages):
        conv = nn.Conv2d(c, net.num_filters, 3, padding=1, dtype=DT)
        bn = nn.BatchNorm2d(net.num_filters, eps=net.bn_eps, momentum=net.bn_momentum, dtype=DT)
        with torch.no_grad():
            conv.weight.copy_(weights[2 * i])
            conv.bias.copy_(weights[2 * i + 1])
            bn.weight.copy_(gamma[i])
            bn.bias.copy_(beta[i])
        layers += [conv, bn, nn.LeakyReLU(0.01), nn.MaxPool2d(2, 2)]
        c = net.num_filters
    lin = nn.Linear(net.feature_size, net.num_classes, dtype=DT)
    with torch.no_grad():
        lin.weight.copy_(weights[-2])
        lin.bias.copy_(weights[-1])
    return nn.Sequential(*layers, nn.Flatten(), lin)


@pytest.mark.parametrize("shape", [(1, 28, 28, 4), (3, 20, 12, 3)])
def test_per_task_forward_matches_torch_nn(shape):
    c, h, w, stages = shape
    net = VGGNet(c, h, w, 5, num_stages=stages, num_filters=6)
    g = torch.Generator().manual_seed(0)
    ws = net.init_weights(generator=g, dtype=DT)
    ws = [t + 0.1 * torch.randn(t.shape, generator=g, dtype=DT) for t in ws]  # non-zero biases
    gamma = [1 + 0.2 * torch.randn(6, generator=g, dtype=DT) for _ in range(stages)]
    beta = [0.2 * torch.randn(6, generator=g, dtype=DT) for _ in range(stages)]
    x = torch.randn(7, c, h, w, generator=g, dtype=DT)
    ref = _reference_module(net, ws, gamma, beta).train()
    rm = [torch.randn(6, generator=g, dtype=DT) for _ in range(stages)]
    rv = [torch.rand(6, generator=g, dtype=DT) + 0.5 for _ in range(stages)]
    for i, bn in enumerate(m for m in ref if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.copy_(rm[i])
        bn.running_var.copy_(rv[i])
    out = forward_task(net, x, ws, gamma, beta, rm, rv, "train")
    torch.testing.assert_close(out, ref(x), rtol=1e-12, atol=1e-12)
    bns = [m for m in ref if isinstance(m, nn.BatchNorm2d)]
    for i, bn in enumerate(bns):
        torch.testing.assert_close(rm[i], bn.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rv[i], bn.running_var, rtol=1e-12, atol=1e-12)
    # running mode = nn eval mode
    ref.eval()
    torch.testing.assert_close(forward_task(net, x, ws, gamma, beta, rm, rv, "running"), ref(x), rtol=1e-12, atol=1e-12)
    # "batch" mode leaves the statistics alone
    before = [t.clone() for t in rm]
    forward_task(net, x, ws, gamma, beta, rm, rv, "batch")
    assert all(torch.equal(a, b) for a, b in zip(before, rm))


@pytest.mark.parametrize("per_task_affine", [False, True])
@pytest.mark.parametrize("shape", [(1, 16, 16, 4), (3, 24, 20, 3)])
def test_batched_layout_matches_per_task(shape, per_task_affine):
    c, h, w, stages = shape
    T, B, C = 3, 5, 4
    net = VGGNet(c, h, w, 4, num_stages=stages, num_filters=C)
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(T, *s, generator=g, dtype=DT, requires_grad=True) for s in net.weight_shapes]
    aff_shape = (T, C) if per_task_affine else (C,)
    gamma = [(1 + 0.2 * torch.randn(aff_shape, generator=g, dtype=DT)).requires_grad_() for _ in range(stages)]
    beta = [(0.2 * torch.randn(aff_shape, generator=g, dtype=DT)).requires_grad_() for _ in range(stages)]
    x = torch.randn(T, B, c, h, w, generator=g, dtype=DT)
    rm0 = [torch.randn(C, generator=g, dtype=DT) for _ in range(stages)]
    rv0 = [torch.rand(C, generator=g, dtype=DT) + 0.5 for _ in range(stages)]

    rm_b, rv_b = [t.clone() for t in rm0], [t.clone() for t in rv0]
    out_b = net.forward(x, ws, batched_bn(T, gamma, beta, rm_b, rv_b, training=True))
    assert out_b.shape == (T, B, 4)
    gb = torch.autograd.grad((out_b ** 2).sum(), ws + gamma + beta)

    outs, rms, rvs = [], [], []
    for t in range(T):
        rm_t, rv_t = [r.clone() for r in rm0], [r.clone() for r in rv0]
        ga = [p[t] if per_task_affine else p for p in gamma]
        be = [p[t] if per_task_affine else p for p in beta]
        outs.append(forward_task(net, x[t], [wk[t] for wk in ws], ga, be, rm_t, rv_t, "train"))
        rms.append(rm_t)
        rvs.append(rv_t)
    out_s = torch.stack(outs)
    gs = torch.autograd.grad((out_s ** 2).sum(), ws + gamma + beta)
    torch.testing.assert_close(out_b, out_s, rtol=1e-10, atol=1e-10)
    for a, b in zip(gb, gs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # batched rule: the row gets the mean over tasks of what each task alone would give
    for i in range(stages):
        torch.testing.assert_close(rm_b[i], torch.stack([r[i] for r in rms]).mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rv_b[i], torch.stack([r[i] for r in rvs]).mean(0), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(rm_b[i], rm0[i])
    # running-statistics mode
    out_r = net.forward(x, ws, batched_bn(T, gamma, beta, rm0, rv0, training=False))
    ref_r = torch.stack([forward_task(net, x[t], [wk[t] for wk in ws],
                                          [p[t] if per_task_affine else p for p in gamma],
                                          [p[t] if per_task_affine else p for p in beta], rm0, rv0, "running")
                         for t in range(T)])
    torch.testing.assert_close(out_r, ref_r, rtol=1e-10, atol=1e-10)


def batched_bn(T, gammas, betas, rms, rvs, training):
    """The network's bn(layer, h, slope) for T tasks on (C,) running rows, with the plain-PyTorch op."""
    def bn(i, h, slope):
        return reference.task_batch_norm(h, T, gammas[i], betas[i], rms[i][None], rvs[i][None], step=0,
                                         training=training, negative_slope=slope)
    return bn


def test_network_calls_bn_per_layer_with_fused_activation():
    calls = []

    def spy(i, h, slope):
        calls.append((tuple(h.shape), i, slope))
        return F.leaky_relu(F.batch_norm(h, None, None, training=True), slope)

    net = VGGNet(1, 8, 8, 3, num_stages=2, num_filters=4, leaky_relu_slope=0.2)
    ws = [torch.randn(2, *s, dtype=DT) for s in net.weight_shapes]
    net.forward(torch.randn(2, 3, 1, 8, 8, dtype=DT), ws, spy)
    assert calls == [((3, 8, 8, 8), 0, 0.2), ((3, 8, 4, 4), 1, 0.2)]


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="too small"):
        VGGNet(1, 8, 8, 5, num_stages=4)
    with pytest.raises(ValueError, match="num_classes"):
        VGGNet(1, 28, 28, 0)
