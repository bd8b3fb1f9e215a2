"""Tests of the task-batched per-step batch norm ops (batch_norm, batch_norm_eval,
batch_norm_update_stats_, _batch_norm_backward, _batch_norm_double_backward).

Values, running statistics and first and second derivatives are compared with
``torch.nn.functional.batch_norm`` on the same (N, T*C, H, W) tensor with gamma/beta repeated T
times (mamlpp_ext.ops.reference.task_batch_norm) and with F.batch_norm on each task's slice; float64
gradcheck and gradgradcheck cover every variant; opcheck covers the dispatcher registrations.
CPU here; the same checks and CPU/CUDA parity on a CUDA device when one is present.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mamlpp_ext
from mamlpp_ext.ops import reference as ref

pytestmark = pytest.mark.skipif(not mamlpp_ext.has_extension(), reason=str(mamlpp_ext.extension_error()))

if mamlpp_ext.has_extension():
    from mamlpp_ext import ops

    OPS = torch.ops.mamlpp_ext

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# (N, T, C, H): SPEC section 2 stages (Omniglot C=64: 28/14/7/3; mini-ImageNet C=48: 84/42/21/10)
# at T in {1, 2, 8} and N in {1, 5, 20, 75}, a subset that keeps the file fast.
REAL_SHAPES = [
    (5, 8, 64, 28), (20, 8, 64, 14), (75, 2, 64, 7), (1, 8, 64, 3), (20, 1, 64, 3),
    (5, 2, 48, 84), (1, 1, 48, 42), (75, 2, 48, 10), (20, 8, 48, 21),
]
AFFINES = ["shared", "per_task", "none"]
# negative_slope of the fused activation: None (none), 0.01 (the LeakyReLU of SPEC section 2),
# 0.0 (ReLU), 0.2 and 1.5 (other LeakyReLU slopes, one above 1).
ACTS = [None, 0.01]
ACT_IDS = ["bn", "bn+leaky"]
SLOPES = [None, 0.01, 0.0, 0.2, 1.5]
SLOPE_IDS = ["bn", "bn+leaky", "bn+relu", "bn+leaky0.2", "bn+leaky1.5"]


def bw_slope(slope):
    """The backward ops' float negative_slope argument (read only when out is given)."""
    return 0.0 if slope is None else slope

# float32 results against the float64 reference: a few units of float32 rounding in the
# normalised values (and sums over up to ~50k elements in the derivatives).
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4),
       torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


def make_case(N, T, C, H, W=None, *, affine="shared", dtype=torch.float64, device="cpu", S=4, seed=0,
              two_d=False):
    """Fresh random input (mean and scale varying per channel), affine, running stats."""
    W = H if W is None else W
    g = torch.Generator().manual_seed(seed)
    shape = (N, T * C) if two_d else (N, T * C, H, W)
    loc = torch.randn(T * C, generator=g) * 2
    scale = torch.rand(T * C, generator=g) + 0.5
    view = (1, T * C) if two_d else (1, T * C, 1, 1)
    x = torch.randn(shape, generator=g) * scale.view(view) + loc.view(view)
    wshape = {"shared": (C,), "per_task": (T, C)}.get(affine)
    w = (1 + 0.5 * torch.randn(wshape, generator=g)) if wshape else None
    b = torch.randn(wshape, generator=g) if wshape else None
    rm = torch.randn(S, C, generator=g)
    rv = torch.rand(S, C, generator=g) + 0.5
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return cast(x), cast(w), cast(b), rm.to(device, stats_dtype), rv.to(device, stats_dtype)


def _req(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


def grads_through(fn, x, w, b, gy, vs, **kw):
    """y = fn(x, w, b); first derivatives (create_graph) and second derivatives of <grads, vs>."""
    x, w, b = _req(x, w, b)
    inputs = [t for t in (x, w, b) if t is not None]
    y = fn(x, w, b, **kw)
    gy = gy.detach().clone().requires_grad_(True)
    first = torch.autograd.grad(y, inputs, gy, create_graph=True)
    loss = sum((f * v).sum() for f, v in zip(first, vs))
    second = torch.autograd.grad(loss, inputs + [gy], allow_unused=True)
    second = [s if s is not None else torch.zeros_like(t) for s, t in zip(second, inputs + [gy])]
    return y.detach(), [f.detach() for f in first], second


def fused(T, rm=None, rv=None, **kw):
    return lambda x, w, b, **k: ops.task_batch_norm(x, T, w, b, rm, rv, **kw, **k)


def plain(T, rm=None, rv=None, **kw):
    return lambda x, w, b, **k: ref.task_batch_norm(x, T, w, b, rm, rv, **kw, **k)


def to64(ts):
    return [t.double() if t is not None else None for t in ts]


# ---- values and derivatives against ATen's batch norm -----------------------------------------

@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: "N{}-T{}-C{}-{}x{}".format(*s, s[-1]))
@pytest.mark.parametrize("slope", ACTS, ids=ACT_IDS)
def test_real_shapes_match_aten(shape, slope):
    """float32 op vs F.batch_norm evaluated in float64: output, running stats, 1st and 2nd derivatives."""
    N, T, C, H = shape
    x, w, b, rm, rv = make_case(N, T, C, H, dtype=torch.float32, seed=hash(shape) % 1000)
    rm64, rv64 = rm.double(), rv.double()
    gy = torch.randn_like(x)
    vs = [torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)]
    y, first, second = grads_through(fused(T, rm, rv, step=1, negative_slope=slope), x, w, b, gy, vs)
    y64, first64, second64 = grads_through(plain(T, rm64, rv64, step=1, negative_slope=slope),
                                           *to64([x, w, b, gy]), to64(vs))
    tol = TOL[torch.float32]
    torch.testing.assert_close(y, y64.float(), **tol)
    torch.testing.assert_close(rm, rm64.float(), **tol)
    torch.testing.assert_close(rv, rv64.float(), **tol)
    for a, e in zip(first, first64):
        torch.testing.assert_close(a, e.float(), rtol=tol["rtol"], atol=tol["atol"] * max(1.0, e.abs().max().item()))
    for a, e in zip(second, second64):
        torch.testing.assert_close(a, e.float(), rtol=tol["rtol"], atol=tol["atol"] * max(1.0, e.abs().max().item()))


@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("slope", SLOPES, ids=SLOPE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float64_matches_reference_exactly(affine, slope, training):
    """float64, every affine/activation slope/mode variant: to 1e-10 against the plain-PyTorch path
    (F.batch_norm, then F.leaky_relu or F.relu), values and first and second derivatives."""
    x, w, b, rm, rv = make_case(5, 8, 64, 7, affine=affine, seed=3)
    rm2, rv2 = rm.clone(), rv.clone()
    gy = torch.randn_like(x)
    vs = [torch.randn_like(t) for t in (x, w, b) if t is not None]
    kw = dict(step=2, training=training, negative_slope=slope)
    y, first, second = grads_through(fused(8, rm, rv, **kw), x, w, b, gy, vs)
    y2, first2, second2 = grads_through(plain(8, rm2, rv2, **kw), x, w, b, gy, vs)
    tol = TOL[torch.float64]
    torch.testing.assert_close(y, y2, **tol)
    torch.testing.assert_close(rm, rm2, **tol)
    torch.testing.assert_close(rv, rv2, **tol)
    for a, e in zip(first + second, first2 + second2):
        torch.testing.assert_close(a, e, **tol)


@pytest.mark.parametrize("affine", ["shared", "per_task"])
def test_matches_batch_norm_per_task_slice(affine):
    """Task t of the output equals F.batch_norm on channels [t*C, (t+1)*C) with task t's affine."""
    T, C = 3, 5
    x, w, b, _, _ = make_case(4, T, C, 6, affine=affine, seed=5)
    y = ops.task_batch_norm(x, T, w, b)
    for t in range(T):
        wt = w if w.dim() == 1 else w[t]
        bt = b if b.dim() == 1 else b[t]
        expected = F.batch_norm(x[:, t * C:(t + 1) * C], None, None, wt, bt, True, 0.1, 1e-5)
        torch.testing.assert_close(y[:, t * C:(t + 1) * C], expected, **TOL[torch.float64])


# ---- gradcheck / gradgradcheck --------------------------------------------------------------

@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("slope", SLOPES, ids=SLOPE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_gradgradcheck(affine, slope, training):
    T = 2
    x, w, b, rm, rv = make_case(3, T, 3, 3, 5, affine=affine, seed=7)
    inputs = _req(x, w, b) if w is not None else _req(x)

    def f(*args):
        xx, ww, bb = (args + (None, None))[:3]
        return ops.task_batch_norm(xx, T, ww, bb, rm, rv, step=1, training=training, negative_slope=slope,
                                   update_stats=False)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("slope", SLOPES[:4], ids=SLOPE_IDS[:4])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_third_order_through_twin(slope, training):
    """Third order (not fused: the double-backward op differentiates its pure-PyTorch twin).

    The backward ops take the saved statistics as constants whose dependence on x is inside
    their closed-form derivatives, so the numerical side of the checks recomputes the forward
    (statistics and output) from the perturbed x, exactly as autograd sees it.
    """
    T = 2
    x, w, b, rm, rv = make_case(2, T, 2, 3, affine="per_task", seed=11)
    gy = torch.randn_like(x)
    ggx, ggw, ggb = torch.randn_like(x), torch.randn_like(w), torch.randn_like(w)

    def forward(x_, w_):
        if training:
            out, mean, var = OPS.batch_norm(x_, w_, b, T, 1e-5, slope)
            return out, mean, var, 0
        return OPS.batch_norm_eval(x_, w_, b, rm, rv, T, 1, 1e-5, slope), rm, rv, 1

    def bw(gy_, x_, w_):
        out, mean, var, step = forward(x_, w_)
        return OPS._batch_norm_backward(gy_, x_, w_, out if slope is not None else None, mean, var, T, step,
                                        training, 1e-5, bw_slope(slope))

    def dbw(ggx_, ggw_, ggb_, gy_, x_, w_):
        out, mean, var, step = forward(x_, w_)
        return OPS._batch_norm_double_backward(ggx_, ggw_, ggb_, gy_, x_, w_, out if slope is not None else None,
                                               mean, var, T, step, training, 1e-5, bw_slope(slope))

    assert torch.autograd.gradcheck(dbw, _req(ggx, ggw, ggb, gy, x, w))
    assert torch.autograd.gradgradcheck(bw, _req(gy, x, w))


def test_double_backward_op_matches_twin():
    T = 4
    for affine in ["shared", "per_task", "none"]:
        for slope in SLOPES:
            x, w, b, _, _ = make_case(3, T, 5, 4, affine=affine, seed=13)
            out, mean, var = OPS.batch_norm(x, w, b, T, 1e-5, slope)
            y = out if slope is not None else None
            gy, ggx = torch.randn_like(x), torch.randn_like(x)
            shape = w.shape if w is not None else (5,)
            ggw, ggb = torch.randn(shape, dtype=x.dtype), torch.randn(shape, dtype=x.dtype)
            for args in [(ggx, ggw, ggb), (None, ggw, None), (ggx, None, None), (None, None, ggb)]:
                got = OPS._batch_norm_double_backward(*args, gy, x, w, y, mean, var, T, 0, True, 1e-5,
                                                      bw_slope(slope))
                exp = ref.batch_norm_double_backward(*args, gy, x, w, y, mean, var, T, 0, True, 1e-5,
                                                     bw_slope(slope))
                for a, e in zip(got, exp):
                    torch.testing.assert_close(a, e.detach(), **TOL[torch.float64])


# ---- opcheck ------------------------------------------------------------------------------------

def _opcheck_samples(device="cpu"):
    """(op name, args) pairs; data tensors (input, weight, bias, gradients) require grad."""
    T = 2
    x, w, b, rm, rv = make_case(3, T, 4, 5, affine="shared", dtype=torch.float32, device=device, seed=17)
    xp, wp, bp, _, _ = make_case(2, T, 4, 3, 7, affine="per_task", dtype=torch.float32, device=device, seed=18)
    x, w, b, xp, wp, bp = _req(x, w, b, xp, wp, bp)
    out, mean, var = OPS.batch_norm(x, w, b, T, 1e-5, 0.01)
    gy, ggx, ggw, ggb = _req(torch.randn_like(x), torch.randn_like(x), torch.randn_like(w), torch.randn_like(b))
    y = out.detach()
    samples = [
        ("batch_norm", (x, w, b, T, 1e-5, None)),
        ("batch_norm", (xp, wp, bp, T, 1e-5, 0.01)),
        ("batch_norm", (x, None, None, T, 1e-3, 0.01)),
        ("batch_norm_eval", (x, w, b, rm, rv, T, 2, 1e-5, 0.01)),
        ("batch_norm_eval", (xp, None, None, rm, rv, T, 0, 1e-5, None)),
        ("_batch_norm_backward", (gy, x, w, y, mean, var, T, 0, True, 1e-5, 0.01)),
        ("_batch_norm_backward", (gy, x, w, None, rm, rv, T, 3, False, 1e-5, 0.0)),
        ("_batch_norm_double_backward", (ggx, ggw, ggb, gy, x, w, y, mean, var, T, 0, True, 1e-5, 0.01)),
        ("_batch_norm_double_backward", (None, ggw, None, gy, x, w, None, rm, rv, T, 1, False, 1e-5, 0.0)),
    ]
    _, mean, var = OPS.batch_norm(x, w, b, T, 1e-5, None)
    samples.append(("batch_norm_update_stats_", (rm.clone(), rv.clone(), mean, var, T, 1, 75, 0.1)))
    # Other activation slopes: ReLU (0.0) and LeakyReLU 0.2, forward and both backward ops.
    for a in (0.0, 0.2):
        out_a, mean_a, var_a = OPS.batch_norm(x, w, b, T, 1e-5, a)
        y_a = out_a.detach()
        samples += [
            ("batch_norm", (xp, wp, bp, T, 1e-5, a)),
            ("batch_norm_eval", (x, w, b, rm, rv, T, 1, 1e-5, a)),
            ("_batch_norm_backward", (gy, x, w, y_a, mean_a, var_a, T, 0, True, 1e-5, a)),
            ("_batch_norm_double_backward", (ggx, ggw, ggb, gy, x, w, y_a, mean_a, var_a, T, 0, True, 1e-5, a)),
        ]
    return samples


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(_opcheck_samples())))
def test_opcheck(device, case):
    name, args = _opcheck_samples(device)[case]
    torch.library.opcheck(getattr(OPS, name), args)


# ---- running statistics ----------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 2, 8])
def test_running_stats_update(T):
    x, w, b, rm, rv = make_case(5, T, 6, 4, affine="shared", seed=19)
    rm0, rv0 = rm.clone(), rv.clone()
    ops.task_batch_norm(x, T, w, b, rm, rv, step=3, momentum=0.3)
    # The definition: mean over tasks of the per-task batch mean / unbiased variance.
    xv = x.view(5, T, 6, 16)
    bm = xv.mean(dim=(0, 3)).mean(0)
    bv = xv.var(dim=(0, 3), unbiased=True).mean(0)
    torch.testing.assert_close(rm[3], 0.7 * rm0[3] + 0.3 * bm, **TOL[torch.float64])
    torch.testing.assert_close(rv[3], 0.7 * rv0[3] + 0.3 * bv, **TOL[torch.float64])
    other = [s for s in range(4) if s != 3]
    assert torch.equal(rm[other], rm0[other]) and torch.equal(rv[other], rv0[other])


def test_running_stats_skippable_and_eval_reads_them():
    x, w, b, rm, rv = make_case(4, 2, 3, 5, seed=23)
    rm0, rv0 = rm.clone(), rv.clone()
    y1 = ops.task_batch_norm(x, 2, w, b, rm, rv, step=0, update_stats=False)
    y2 = ops.task_batch_norm(x, 2, w, b)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    y = ops.task_batch_norm(x, 2, w, b, rm, rv, step=2, training=False)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    expected = F.batch_norm(x, rm[2].repeat(2), rv[2].repeat(2), w.repeat(2), b.repeat(2), False, 0.0, 1e-5)
    torch.testing.assert_close(y, expected, **TOL[torch.float64])


def test_running_stats_float32_with_float64_input():
    x, w, b, rm, rv = make_case(4, 2, 3, 5, seed=29)
    rm32, rv32 = rm.float(), rv.float()
    ops.task_batch_norm(x, 2, w, b, rm32, rv32, step=1)
    ref.task_batch_norm(x, 2, w, b, rm, rv, step=1)
    torch.testing.assert_close(rm32, rm.float())
    torch.testing.assert_close(rv32, rv.float())
    y = ops.task_batch_norm(x, 2, w, b, rm32, rv32, step=1, training=False)
    torch.testing.assert_close(y, ref.task_batch_norm(x, 2, w, b, rm32.double(), rv32.double(), step=1,
                                                      training=False), **TOL[torch.float64])


# ---- layouts, sizes, dtypes ------------------------------------------------------------------

LAYOUTS = {
    # name: (make_case kwargs, transform applied to the (leaf) input before the op)
    "non_contiguous": (dict(N=4, H=6), lambda x: torch.cat([x, x], dim=1)[:, ::2]),
    "channels_last": (dict(N=4, H=6), lambda x: x.contiguous(memory_format=torch.channels_last)),
    "expanded": (dict(N=4, H=6), lambda x: x[:1].expand(4, -1, -1, -1)),
    "transposed_hw": (dict(N=4, H=6, W=5), lambda x: x.transpose(2, 3)),
    "two_d": (dict(N=7, H=1, two_d=True), lambda x: x),
    "two_d_strided": (dict(N=7, H=1, two_d=True), lambda x: x.t().contiguous().t()),
    "odd": (dict(N=3, H=5, W=7), lambda x: x),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts(layout):
    T, C = 2, 3
    kwargs, transform = LAYOUTS[layout]
    x, w, b, rm, rv = make_case(T=T, C=C, affine="per_task", seed=31, **kwargs)
    assert layout in ("two_d", "odd") or not transform(x).is_contiguous()
    rm2, rv2 = rm.clone(), rv.clone()
    gy = torch.randn_like(transform(x))
    vs = [torch.randn_like(t) for t in (x, w, b)]
    kw = dict(step=1, negative_slope=0.01)
    got = grads_through(lambda x_, w_, b_: ops.task_batch_norm(transform(x_), T, w_, b_, rm, rv, **kw), x, w, b, gy, vs)
    exp = grads_through(lambda x_, w_, b_: ref.task_batch_norm(transform(x_), T, w_, b_, rm2, rv2, **kw), x, w, b, gy,
                        vs)
    for a, e in zip([got[0]] + got[1] + got[2], [exp[0]] + exp[1] + exp[2]):
        torch.testing.assert_close(a, e, **TOL[torch.float64])
    torch.testing.assert_close(rm, rm2, **TOL[torch.float64])
    torch.testing.assert_close(rv, rv2, **TOL[torch.float64])


def test_empty_batch():
    x, w, b, rm, rv = make_case(0, 2, 3, 4, seed=31)
    rm0, rv0 = rm.clone(), rv.clone()
    x_, w_, b_ = _req(x, w, b)
    y = ops.task_batch_norm(x_, 2, w_, b_, rm, rv, step=1, negative_slope=0.01)
    assert y.shape == x.shape
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)  # nothing to average: unchanged
    dx, dw, db = torch.autograd.grad(y.sum(), (x_, w_, b_))
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("slope", ACTS, ids=ACT_IDS)
def test_reduced_precision(dtype, slope):
    """Statistics in float32: forward and backward within the dtype's rounding of the float64 reference."""
    x, w, b, rm, rv = make_case(5, 8, 16, 7, dtype=dtype, seed=37)
    out, mean, var = OPS.batch_norm(x, w, b, 8, 1e-5, slope)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    gy = torch.randn_like(x)
    xd, wd, bd = _req(*to64([x, w, b]))
    yd = ref.task_batch_norm(xd, 8, wd, bd, negative_slope=slope)
    torch.testing.assert_close(out, yd.to(dtype), **TOL[dtype])
    torch.testing.assert_close(mean, xd.detach().view(5, 128, 49).mean(dim=(0, 2)).float(), **TOL[torch.float32])
    x_, w_, b_ = _req(x, w, b)
    grads = torch.autograd.grad(ops.task_batch_norm(x_, 8, w_, b_, negative_slope=slope), (x_, w_, b_), gy)
    grads_d = torch.autograd.grad(yd, (xd, wd, bd), gy.double())
    for a, e in zip(grads, grads_d):
        assert a.dtype == dtype
        torch.testing.assert_close(a, e.to(dtype), rtol=TOL[dtype]["rtol"],
                                   atol=TOL[dtype]["atol"] * max(1.0, e.abs().max().item()))


def test_deterministic_and_thread_count_independent():
    x, w, b, _, _ = make_case(20, 8, 64, 7, dtype=torch.float32, seed=41)
    gy, ggx = torch.randn_like(x), torch.randn_like(x)

    def everything():
        out, mean, var = OPS.batch_norm(x, w, b, 8, 1e-5, 0.01)
        bw = OPS._batch_norm_backward(gy, x, w, out, mean, var, 8, 0, True, 1e-5, 0.01)
        dbw = OPS._batch_norm_double_backward(ggx, w, b, gy, x, w, out, mean, var, 8, 0, True, 1e-5, 0.01)
        return (out, mean, var) + tuple(bw) + tuple(dbw)

    threads = torch.get_num_threads()
    a = everything()
    b2 = everything()
    try:
        torch.set_num_threads(1)
        c = everything()
    finally:
        torch.set_num_threads(threads)
    for u, v, w2 in zip(a, b2, c):
        assert torch.equal(u, v) and torch.equal(u, w2)


@pytest.mark.parametrize("slope", [0.01, 0.0, 0.2], ids=["leaky", "relu", "leaky0.2"])
def test_maml_second_order_inner_step(slope):
    """One second-order inner step of a grouped conv + batch norm + LeakyReLU layer: the meta-gradient
    w.r.t. conv weight, gamma and beta tables matches the plain-PyTorch path."""
    T, C, N, S, step = 4, 6, 5, 3, 1
    g = torch.Generator().manual_seed(43)
    xs = torch.randn(N, T * 2, 6, 6, generator=g, dtype=torch.float64)
    xq = torch.randn(N, T * 2, 6, 6, generator=g, dtype=torch.float64)
    w0 = torch.randn(C, 2, 3, 3, generator=g, dtype=torch.float64)
    gam = 1 + 0.3 * torch.randn(S, C, generator=g, dtype=torch.float64)
    bet = 0.3 * torch.randn(S, C, generator=g, dtype=torch.float64)

    def meta_grads(bn):
        w, gm, bt = _req(w0, gam, bet)
        wt = w.expand(T, -1, -1, -1, -1)

        def net(x, wt, s):
            h = F.conv2d(x, wt.reshape(T * C, 2, 3, 3), padding=1, groups=T)
            return bn(h, T, gm[s], bt[s], step=s, negative_slope=slope).square().mean()

        inner = net(xs, wt, step)
        (gw,) = torch.autograd.grad(inner, wt, create_graph=True)
        outer = net(xq, wt - 0.1 * gw, step + 1)
        return torch.autograd.grad(outer, (w, gm, bt))

    for a, e in zip(meta_grads(ops.task_batch_norm), meta_grads(ref.task_batch_norm)):
        torch.testing.assert_close(a, e, **TOL[torch.float64])


# ---- rejected inputs ---------------------------------------------------------------------------

def _bad_calls():
    x, w, b, rm, rv = make_case(3, 2, 4, 5, dtype=torch.float32, seed=47)
    out, mean, var = OPS.batch_norm(x, w, b, 2, 1e-5, None)
    gy = torch.randn_like(x)
    return [
        ("input to be 2-D", lambda: OPS.batch_norm(x[0], w, b, 2, 1e-5, None)),
        ("input to be 2-D", lambda: OPS.batch_norm(x[:, :, 0], w, b, 2, 1e-5, None)),
        ("input to be 2-D", lambda: OPS.batch_norm(x.flatten()[:8], None, None, 2, 1e-5, None)),
        ("multiple of tasks=3", lambda: OPS.batch_norm(x, None, None, 3, 1e-5, None)),
        ("tasks >= 1", lambda: OPS.batch_norm(x, None, None, 0, 1e-5, None)),
        ("floating-point", lambda: OPS.batch_norm(x.long(), None, None, 2, 1e-5, None)),
        ("weight to have shape", lambda: OPS.batch_norm(x, w[:3], b[:3], 2, 1e-5, None)),
        ("weight to have shape", lambda: OPS.batch_norm(x, w.repeat(3, 1), b.repeat(3, 1), 2, 1e-5, None)),
        ("both given or both None", lambda: OPS.batch_norm(x, w, None, 2, 1e-5, None)),
        ("weight and bias to have one shape", lambda: OPS.batch_norm(x, w, b.repeat(2, 1), 2, 1e-5, None)),
        ("weight to have the dtype of input", lambda: OPS.batch_norm(x, w.double(), b.double(), 2, 1e-5, None)),
        ("more than one value", lambda: OPS.batch_norm(x[:1, :, :1, :1], w, b, 2, 1e-5, None)),
        ("step in [0, 4)", lambda: OPS.batch_norm_eval(x, w, b, rm, rv, 2, 4, 1e-5, None)),
        ("step in [0, 4)", lambda: OPS.batch_norm_eval(x, w, b, rm, rv, 2, -1, 1e-5, None)),
        ("running_mean to be a 2-D (S, C=4)", lambda: OPS.batch_norm_eval(x, w, b, rm[:, :3], rv, 2, 0, 1e-5, None)),
        ("running_var to be a 2-D (S, C=4)", lambda: OPS.batch_norm_eval(x, w, b, rm, rv[0], 2, 0, 1e-5, None)),
        ("running_mean to have the dtype of input", lambda: OPS.batch_norm_eval(x, w, b, rm.half(), rv, 2, 0, 1e-5,
                                                                                None)),
        ("step in [0, 4)", lambda: OPS.batch_norm_update_stats_(rm, rv, mean, var, 2, 4, 75, 0.1)),
        ("running_var to be a 2-D (S, C=4)", lambda: OPS.batch_norm_update_stats_(rm, rv[:, :2], mean, var, 2, 0,
                                                                                   75, 0.1)),
        ("multiple of tasks=3", lambda: OPS.batch_norm_update_stats_(rm, rv, mean, var, 3, 0, 75, 0.1)),
        ("count (elements per task and channel) != 1",
         lambda: OPS.batch_norm_update_stats_(rm, rv, mean, var, 2, 0, 1, 0.1)),
        ("grad_out to have the shape of input", lambda: OPS._batch_norm_backward(gy[:2], x, w, None, mean, var, 2, 0,
                                                                                 True, 1e-5, 0.0)),
        ("out to have the dtype of input", lambda: OPS._batch_norm_backward(gy, x, w, out.double(), mean, var, 2, 0,
                                                                            True, 1e-5, 0.0)),
        ("mean to be a 1-D (T*C=8,)", lambda: OPS._batch_norm_backward(gy, x, w, None, mean[:4], var, 2, 0, True,
                                                                       1e-5, 0.0)),
        ("var to have dtype Float", lambda: OPS._batch_norm_backward(gy, x, w, None, mean, var.double(), 2, 0, True,
                                                                     1e-5, 0.0)),
        ("grad_grad_weight to have shape", lambda: OPS._batch_norm_double_backward(None, w[:2], None, gy, x, w, None,
                                                                                  mean, var, 2, 0, True, 1e-5, 0.0)),
        ("grad_grad_input to have the shape of input",
         lambda: OPS._batch_norm_double_backward(gy[:1], None, None, gy, x, w, None, mean, var, 2, 0, True, 1e-5, 0.0)),
        ("negative_slope to be None (no activation) or a finite float >= 0",
         lambda: OPS.batch_norm(x, w, b, 2, 1e-5, -0.01)),
        ("but got negative_slope=nan", lambda: OPS.batch_norm(x, w, b, 2, 1e-5, float("nan"))),
        ("but got negative_slope=inf", lambda: OPS.batch_norm_eval(x, w, b, rm, rv, 2, 0, 1e-5, float("inf"))),
        ("but got negative_slope=-1", lambda: OPS._batch_norm_backward(gy, x, w, out, mean, var, 2, 0, True, 1e-5,
                                                                       -1.0)),
        ("but got negative_slope=-1", lambda: OPS._batch_norm_double_backward(gy, None, None, gy, x, w, out, mean,
                                                                              var, 2, 0, True, 1e-5, -1.0)),
        ("but got negative_slope=-0.2", lambda: ops.task_batch_norm(x, 2, w, b, negative_slope=-0.2)),
        ("but got negative_slope=-0.2", lambda: ops.task_batch_norm(x, 2, w, b, rm, rv, training=False,
                                                                    negative_slope=-0.2)),
        ("but got negative_slope=-0.2", lambda: ref.task_batch_norm(x, 2, w, b, negative_slope=-0.2)),
        ("but got negative_slope=inf", lambda: ref.task_batch_norm(x, 2, w, b, negative_slope=float("inf"))),
        ("needs running_mean", lambda: ops.task_batch_norm(x, 2, w, b, training=False)),
        ("both given or both None", lambda: ops.task_batch_norm(x, 2, w, b, rm, None)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_rejects_bad_input(case):
    match, call = _bad_calls()[case]
    with pytest.raises((RuntimeError, ValueError), match=match.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("*", r"\*")):
        call()


def test_stats_requiring_grad_are_refused():
    x, w, b, rm, rv = make_case(3, 2, 4, 5, seed=53)
    with pytest.raises(RuntimeError, match="running statistics are constants"):
        OPS.batch_norm_eval(x, w, b, rm.requires_grad_(), rv, 2, 0, 1e-5, None)
    _, mean, var = OPS.batch_norm(x, w, b, 2, 1e-5, None)
    gy = torch.randn_like(x)
    for op, args in [("_batch_norm_backward", (gy, x, w, None, mean.requires_grad_(), var, 2, 0, True, 1e-5, 0.0)),
                     ("_batch_norm_double_backward", (gy, None, None, gy, x, w, None, mean, var, 2, 0, True, 1e-5,
                                                      0.0))]:
        with pytest.raises(RuntimeError, match="mean and var are treated as constants"):
            getattr(OPS, op)(*args)


# ---- how the ops are wired: C++ autograd, torch.compile ----------------------------------------

def _python_functions_called(fn):
    """(file, function) of every Python function that runs inside fn()."""
    import sys

    called = set()

    def profile(frame, event, arg):
        if event == "call":
            called.add((frame.f_code.co_filename, frame.f_code.co_name))

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return called


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_autograd_runs_no_python(training, device):
    """Forward, backward with create_graph and the double backward (second-order MAML) run the
    C++ autograd kernels: no Python function other than the wrapper itself runs in the ops' layer
    or in torch.library's Python autograd (NOTE [Batch norm autograd in C++])."""
    T = 2
    x, w, b, rm, rv = make_case(3, T, 4, 5, affine="shared", device=device, seed=73)
    x, w, b = _req(x, w, b)
    gy = torch.randn_like(x).requires_grad_()
    vx = torch.randn_like(x)

    def second_order():
        y = ops.task_batch_norm(x, T, w, b, rm, rv, step=1, training=training, negative_slope=0.01)
        dx, dw, db = torch.autograd.grad(y, (x, w, b), gy, create_graph=True)
        torch.autograd.grad((dx * vx).sum() + dw.sum() + db.sum(), (x, w, gy))

    called = _python_functions_called(second_order)
    ours = {name for f, name in called if f.endswith("mamlpp_ext/ops/batch_norm.py")}
    library = {(f, name) for f, name in called if "torch/_library" in f}
    assert ours == {"task_batch_norm"}, ours
    assert not library, sorted(library)[:5]


def test_update_stats_bumps_version_and_records_no_graph():
    x, w, b, rm, rv = make_case(4, 2, 3, 5, seed=79)
    x, w, b = _req(x, w, b)
    v_mean, v_var = rm._version, rv._version
    ops.task_batch_norm(x, 2, w, b, rm, rv, step=1)
    assert rm._version > v_mean and rv._version > v_var
    assert not rm.requires_grad and rm.grad_fn is None


def test_backward_op_without_affine_is_differentiable():
    """Without weight, _batch_norm_backward's grad_weight / grad_bias (the sums for a unit affine)
    are differentiable too: their upstream gradients reach the double backward."""
    T = 2
    x, _, _, _, _ = make_case(2, T, 2, 3, affine="none", seed=83)
    gy = torch.randn_like(x)

    def bw(gy_, x_):
        out, mean, var = OPS.batch_norm(x_, None, None, T, 1e-5, 0.2)
        return OPS._batch_norm_backward(gy_, x_, None, out, mean, var, T, 0, True, 1e-5, 0.2)

    assert torch.autograd.gradcheck(bw, _req(gy, x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph(training, device):
    """torch.compile (fullgraph, AOT autograd) of forward + running-statistics update; the
    backward of the compiled graph; against eager."""
    T = 2
    x, w, b, rm, rv = make_case(3, T, 4, 5, affine="shared", dtype=torch.float32, device=device, seed=89)
    rm2, rv2 = rm.clone(), rv.clone()

    def f(x_, w_, b_, rm_, rv_):
        return ops.task_batch_norm(x_, T, w_, b_, rm_, rv_, step=1, training=training, negative_slope=0.2)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    gy = torch.randn_like(x)
    xa, wa, ba = _req(x, w, b)
    ya = compiled(xa, wa, ba, rm, rv)
    ga = torch.autograd.grad(ya, (xa, wa, ba), gy)
    xe, we, be = _req(x, w, b)
    ye = f(xe, we, be, rm2, rv2)
    ge = torch.autograd.grad(ye, (xe, we, be), gy)
    torch.testing.assert_close(ya, ye)
    for a, e in zip(ga, ge):
        torch.testing.assert_close(a, e)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


# ---- CUDA ---------------------------------------------------------------------------------------

@needs_cuda
def test_rejects_mixed_devices():
    x, w, b, rm, rv = make_case(3, 2, 4, 5, dtype=torch.float32, seed=59)
    with pytest.raises(RuntimeError, match="weight to be on the device of input"):
        OPS.batch_norm(x.cuda(), w, b.cuda(), 2, 1e-5, None)
    with pytest.raises(RuntimeError, match="running_mean to be on the device of input"):
        OPS.batch_norm_eval(x.cuda(), w.cuda(), b.cuda(), rm, rv.cuda(), 2, 0, 1e-5, None)


# (shape, affine, negative_slope, training): every variant on two shapes, the MAML one on the
# others, and the other activation slopes (ReLU, 0.2, 1.5) on one shape.
CUDA_CASES = (
    [((5, 8, 64, 28), a, sl, t) for a in AFFINES for sl in ACTS for t in (True, False)]
    + [((75, 2, 48, 10), a, sl, t) for a in AFFINES for sl in ACTS for t in (True, False)]
    + [(s, "shared", 0.01, True) for s in REAL_SHAPES if s not in ((5, 8, 64, 28), (75, 2, 48, 10))]
    + [(s, "per_task", None, False) for s in REAL_SHAPES[:4]]
    + [((20, 8, 48, 21), "shared", sl, True) for sl in SLOPES[2:]]
    + [((20, 8, 48, 21), "per_task", sl, False) for sl in SLOPES[2:]]
)


def keep_off_the_kink(x, T, w, b, rm, rv, *, step, training, delta=1e-3):
    """x with the few elements whose pre-activation lies within ``delta`` of LeakyReLU's kink
    moved away from it (pre-activations computed in float64).

    Two correct kernels may put a pre-activation within round-off of 0 on opposite sides and
    pick slopes 1 and a (the first H100 run saw 1 such element in 2M); inputs with a gap
    around the kink make an element-wise comparison of the two meaningful.
    """
    x = x.clone()
    w64, b64 = (None, None) if w is None else (w.double(), b.double())

    def pre_activation(v):
        return ref.task_batch_norm(v.double(), T, w64, b64, rm.double().clone(), rv.double().clone(), step=step,
                                   training=training, update_stats=False, negative_slope=None)

    for _ in range(10):
        z = pre_activation(x)
        near = z.abs() < delta
        if not near.any():
            return x
        h = 1e-3
        slope = (pre_activation(x + h * near) - z) / h  # dz/dx of the moved elements
        direction = torch.where(z >= 0, 1.0, -1.0)
        step_x = torch.where(near, direction * 4 * delta / slope.where(near, torch.ones_like(slope)), 0.0)
        x = (x.double() + step_x).to(x.dtype)
    raise AssertionError("could not move the inputs off the LeakyReLU kink")


def _cuda_vs_cpu(shape, affine, slope, training, dtype, second_order=True):
    N, T, C, H = shape
    x, w, b, rm, rv = make_case(N, T, C, H, affine=affine, dtype=dtype, seed=61)
    if slope is not None:
        x = keep_off_the_kink(x, T, w, b, rm, rv, step=2, training=training)
    rmc, rvc = rm.cuda(), rv.cuda()
    gy = torch.randn_like(x)
    vs = [torch.randn_like(t) for t in (x, w, b) if t is not None]
    kw = dict(step=2, training=training, negative_slope=slope)
    cuda = lambda t: t.cuda() if t is not None else None  # noqa: E731
    got = grads_through(fused(T, rmc, rvc, **kw), cuda(x), cuda(w), cuda(b), gy.cuda(), [v.cuda() for v in vs])
    exp = grads_through(fused(T, rm, rv, **kw), x, w, b, gy, vs)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else TOL[dtype]
    pairs = list(zip([got[0]] + got[1], [exp[0]] + exp[1]))
    if second_order:
        pairs += list(zip(got[2], exp[2]))
    for a, e in pairs:
        scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
        torch.testing.assert_close(a.cpu(), e, rtol=tol["rtol"], atol=tol["atol"] * scale)
    torch.testing.assert_close(rmc.cpu(), rm, **TOL[torch.float32])
    torch.testing.assert_close(rvc.cpu(), rv, **TOL[torch.float32])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: "N{}-T{}-C{}-{}-{}-{}-{}".format(
    *c[0], c[1], SLOPE_IDS[SLOPES.index(c[2])], "train" if c[3] else "eval"))
def test_cuda_matches_cpu(case, dtype):
    """Forward, running stats, first and second derivatives: CUDA vs CPU kernels."""
    _cuda_vs_cpu(*case, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 8, 64, 28), (20, 8, 48, 21)], ids=str)
@pytest.mark.parametrize("slope", ACTS, ids=ACT_IDS)
def test_cuda_matches_cpu_reduced_precision(shape, slope, dtype):
    _cuda_vs_cpu(shape, "shared", slope, True, dtype, second_order=False)


# Every affine with no activation and the network's LeakyReLU; the other slopes with one affine.
CUDA_GRADCHECK_CASES = ([(a, sl) for a in AFFINES for sl in ACTS]
                        + [("per_task", sl) for sl in SLOPES[2:]])


@needs_cuda
@pytest.mark.parametrize("affine, slope", CUDA_GRADCHECK_CASES,
                         ids=[f"{a}-{SLOPE_IDS[SLOPES.index(sl)]}" for a, sl in CUDA_GRADCHECK_CASES])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_gradcheck_gradgradcheck(affine, slope, training):
    T = 2
    x, w, b, rm, rv = make_case(3, T, 3, 3, 5, affine=affine, device="cuda", seed=67)
    inputs = _req(x, w, b) if w is not None else _req(x)

    def f(*args):
        xx, ww, bb = (args + (None, None))[:3]
        return ops.task_batch_norm(xx, T, ww, bb, rm, rv, step=1, training=training, negative_slope=slope,
                                   update_stats=False)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@needs_cuda
def test_cuda_layouts_and_determinism():
    x, w, b, rm, rv = make_case(20, 8, 64, 7, dtype=torch.float32, device="cuda", seed=71)
    for xx in (x, x.contiguous(memory_format=torch.channels_last), torch.cat([x, x], 1)[:, ::2]):
        a = OPS.batch_norm(xx, w, b, 8, 1e-5, 0.01)
        c = OPS.batch_norm(xx, w, b, 8, 1e-5, 0.01)
        cpu = OPS.batch_norm(xx.cpu(), w.cpu(), b.cpu(), 8, 1e-5, 0.01)
        for u, v, e in zip(a, c, cpu):
            assert torch.equal(u, v)
            torch.testing.assert_close(u.cpu(), e, **TOL[torch.float32])
    gy = torch.randn_like(x)
    out, mean, var = OPS.batch_norm(x, w, b, 8, 1e-5, 0.01)
    r1 = OPS._batch_norm_double_backward(gy, w, b, gy, x, w, out, mean, var, 8, 0, True, 1e-5, 0.01)
    r2 = OPS._batch_norm_double_backward(gy, w, b, gy, x, w, out, mean, var, 8, 0, True, 1e-5, 0.01)
    assert all(torch.equal(u, v) for u, v in zip(r1, r2))
