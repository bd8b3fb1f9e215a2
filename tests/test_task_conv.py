"""Tests of the task-batched convolution ops (task_conv, _task_conv_backward) and their wrapper
``mamlpp_ext.ops.task_conv2d``.

Values and first, second and third derivatives are compared on fresh random inputs with the
pure-PyTorch twin (one ATen grouped convolution, ``mamlpp_ext.ops.reference.task_conv2d``) and
with ``F.conv2d`` on each task's channel slice; float64 gradcheck and gradgradcheck cover every
variant; opcheck covers the dispatcher registrations and fake kernels. The claim of the op — every
derivative order is grouped convolutions of ours, so their number does not grow with the tasks —
is checked by counting the ops a second-order backward dispatches. CPU here; CUDA against the CPU
when a CUDA device is present.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import mamlpp_ext
from mamlpp_ext.ops import reference as ref

# Small convolutions: one intra-op thread (immune to OpenMP spin-waiting on a shared machine).
pytestmark = [pytest.mark.skipif(not mamlpp_ext.has_extension(), reason=str(mamlpp_ext.extension_error())),
              pytest.mark.usefixtures("one_intra_op_thread")]

if mamlpp_ext.has_extension():
    from mamlpp_ext import ops

    OPS = torch.ops.mamlpp_ext

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4),
       torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=4e-2, atol=4e-2)}


class Case:
    """One convolution: N, T, C_in, C_out, (H, W), kernel, stride, padding, dilation, groups, bias."""

    def __init__(self, N, T, C_in, C_out, hw, k=3, stride=1, padding=1, dilation=1, groups=1, bias=True):
        self.N, self.T, self.C_in, self.C_out = N, T, C_in, C_out
        self.hw = (hw, hw) if isinstance(hw, int) else hw
        self.k = (k, k) if isinstance(k, int) else k
        self.stride, self.padding, self.dilation, self.groups, self.bias = stride, padding, dilation, groups, bias

    def conv_args(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def op_args(self):
        """(stride, padding, dilation, groups) as the ops take them: pairs."""
        pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
        return pair(self.stride), pair(self.padding), pair(self.dilation), self.groups

    def make(self, dtype=torch.float64, device="cpu", seed=0):
        """Fresh random (input, weight, bias)."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(self.N, self.T * self.C_in, *self.hw, generator=g)
        w = torch.randn(self.T, self.C_out, self.C_in // self.groups, *self.k, generator=g) * 0.5
        b = torch.randn(self.T, self.C_out, generator=g) if self.bias else None
        cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return cast(x), cast(w), cast(b)

    def __repr__(self):
        return (f"N{self.N}-T{self.T}-{self.C_in}to{self.C_out}-{self.hw[0]}x{self.hw[1]}-k{self.k}-s{self.stride}"
                f"-p{self.padding}-d{self.dilation}-g{self.groups}{'-bias' if self.bias else ''}")


# The VGG layers of the public settings (Omniglot C=64 at 28/14/7/3 with 1 input channel first,
# mini-ImageNet C=48 at 84/42/21/10 with 3), smaller batch where it keeps the file fast, and a
# matrix of stride / padding / dilation / groups / bias / odd sizes / T = 1.
CASES = [
    Case(5, 8, 1, 64, 28), Case(5, 8, 64, 64, 7), Case(20, 2, 64, 64, 3), Case(2, 2, 3, 48, 84),
    Case(3, 2, 48, 48, 21), Case(4, 1, 48, 48, 10),
    Case(3, 3, 4, 6, (7, 9), k=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
    Case(2, 2, 6, 9, (11, 5), k=(1, 3), stride=3, padding=2, dilation=1, groups=3, bias=False),
    Case(1, 4, 2, 2, 6, k=2, stride=2, padding=0, dilation=2, groups=2),
    Case(2, 5, 3, 4, (5, 8), k=(5, 1), stride=(1, 2), padding=(2, 0), dilation=(1, 1), groups=1, bias=False),
    Case(3, 2, 4, 4, 9, k=3, stride=2, padding=1, dilation=3, groups=4),
    Case(2, 3, 2, 3, 4, k=4, stride=1, padding=3, dilation=1, groups=1),
]
# Small cases for gradcheck / gradgradcheck (finite differences in float64: one perturbation per
# element of every input and upstream gradient, so the shapes are kept tiny).
SMALL = [
    Case(1, 2, 2, 3, 4, k=3, stride=1, padding=1),
    Case(1, 2, 4, 2, (5, 4), k=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
    Case(1, 2, 2, 4, 5, k=2, stride=2, padding=1, dilation=2, groups=2, bias=False),
    Case(2, 1, 1, 2, 4, k=3, stride=1, padding=0),
]


def _req(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


def per_task(x, w, b, case):
    """F.conv2d on each task's channel slice, concatenated: the definition of the op."""
    xs = x.chunk(case.T, dim=1)
    return torch.cat([F.conv2d(xs[t], w[t], b[t] if b is not None else None, **case.conv_args())
                      for t in range(case.T)], dim=1)


def derivatives(fn, x, w, b, seed=1):
    """y = fn(x, w, b); first derivatives (create_graph) w.r.t. x, w, b; the gradient of
    <first, v> w.r.t. (x, w, b, gy); and the third-order gradient of <second, u> w.r.t. (x, w, gy)."""
    x, w, b = _req(x, w, b)
    inputs = [t for t in (x, w, b) if t is not None]
    y = fn(x, w, b)
    g = torch.Generator().manual_seed(seed)
    rnd = lambda t: torch.randn(t.shape, generator=g).to(t)  # noqa: E731
    gy = rnd(y).requires_grad_(True)
    first = torch.autograd.grad(y, inputs, gy, create_graph=True)
    loss2 = sum((f * rnd(f)).sum() for f in first)
    # (the first derivatives do not depend on the bias: its second derivative is None, zero)
    second = torch.autograd.grad(loss2, inputs + [gy], create_graph=True, allow_unused=True)
    second = [s if s is not None else torch.zeros_like(i) for s, i in zip(second, inputs + [gy])]
    loss3 = sum((s * rnd(s)).sum() for s in second)
    third = torch.autograd.grad(loss3, [x, w, gy], allow_unused=True)
    third = [t if t is not None else torch.zeros_like(i) for t, i in zip(third, [x, w, gy])]
    return [y.detach()] + [t.detach() for t in first] + [t.detach() for t in second] + list(third)


def fused(case):
    return lambda x, w, b: ops.task_conv2d(x, w, b, **case.conv_args())


def twin(case):
    return lambda x, w, b: ref.task_conv2d(x, w, b, **case.conv_args())


def close(a, e, tol):
    scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
    torch.testing.assert_close(a, e, rtol=tol["rtol"], atol=tol["atol"] * scale)


# ---- values and derivatives ---------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=repr)
def test_forward_matches_twin_and_per_task_conv(case):
    x, w, b = case.make(seed=hash(repr(case)) % 1000)
    y = ops.task_conv2d(x, w, b, **case.conv_args())
    assert y.shape == per_task(x, w, b, case).shape
    torch.testing.assert_close(y, ref.task_conv2d(x, w, b, **case.conv_args()), **TOL[torch.float64])
    torch.testing.assert_close(y, per_task(x, w, b, case), **TOL[torch.float64])
    # float32 against the float64 result
    y32 = ops.task_conv2d(x.float(), w.float(), b.float() if b is not None else None, **case.conv_args())
    close(y32, y.float(), TOL[torch.float32])


@pytest.mark.parametrize("case", CASES[:3] + CASES[6:], ids=repr)
def test_derivatives_to_third_order_match_twin(case):
    """First, second and third derivatives (float64) of the op against the ATen twin's."""
    x, w, b = case.make(seed=7)
    got = derivatives(fused(case), x, w, b)
    exp = derivatives(twin(case), x, w, b)
    assert len(got) == len(exp)
    for a, e in zip(got, exp):
        close(a, e, TOL[torch.float64])


@pytest.mark.parametrize("case", CASES[:2] + CASES[6:8], ids=repr)
def test_float32_derivatives_match_float64(case):
    x, w, b = case.make(dtype=torch.float32, seed=11)
    got = derivatives(fused(case), x, w, b)
    exp = derivatives(twin(case), *[t.double() if t is not None else None for t in (x, w, b)])
    for a, e in zip(got, exp):
        close(a, e.float(), TOL[torch.float32])


@pytest.mark.parametrize("case", SMALL, ids=repr)
def test_gradcheck_gradgradcheck(case):
    x, w, b = _req(*case.make(seed=13))
    inputs = [t for t in (x, w, b) if t is not None]

    def f(*args):
        return ops.task_conv2d(args[0], args[1], args[2] if len(args) > 2 else None, **case.conv_args())

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("case", SMALL[:3], ids=repr)
def test_third_order_gradgradcheck_of_backward_op(case):
    """gradgradcheck of _task_conv_backward (every output) is a third-order check of task_conv."""
    x, w, _ = case.make(seed=17)
    stride, padding, dilation, groups = case.op_args()
    gy = torch.randn_like(ref.task_conv2d(x, w, None, **case.conv_args()))
    inputs = _req(gy, x, w)

    def bw(gy_, x_, w_):
        return OPS._task_conv_backward(gy_, x_, w_, stride, padding, dilation, groups, [True, True, True])

    assert torch.autograd.gradcheck(bw, inputs)
    assert torch.autograd.gradgradcheck(bw, inputs)


@pytest.mark.parametrize("mask", list(itertools.product([False, True], repeat=3)), ids=str)
def test_backward_op_matches_twin_for_every_mask(mask):
    case = CASES[6]
    x, w, _ = case.make(seed=19)
    stride, padding, dilation, groups = case.op_args()
    gy = torch.randn_like(ref.task_conv2d(x, w, None, **case.conv_args()))
    got = OPS._task_conv_backward(gy, x, w, stride, padding, dilation, groups, list(mask))
    exp = ref.task_conv_backward(gy, x, w, stride, padding, dilation, groups, mask)
    for m, a, e, like in zip(mask, got, exp, (x, w, w[:, :, 0, 0, 0])):
        if not m:
            assert a is None and e is None
        else:
            assert a.shape == like.shape and a.is_contiguous()
            torch.testing.assert_close(a, e, **TOL[torch.float64])


def test_only_needed_gradients_are_computed_and_undefined_ones_are_zero():
    """No bias; input not requiring grad (the first layer); a second-order loss that uses only
    the weight gradient: every derivative still matches the twin."""
    case = CASES[0]
    x, w, _ = case.make(seed=23)

    def second(fn):
        ww = w.clone().requires_grad_(True)
        y = fn(x, ww, None)
        (gw,) = torch.autograd.grad((y * y).sum(), ww, create_graph=True)
        return torch.autograd.grad((gw * gw).sum(), ww)[0]

    torch.testing.assert_close(second(fused(case)), second(twin(case)), **TOL[torch.float64])


# ---- layouts, shapes, dtypes --------------------------------------------------------------------

def _layouts(x, w, b):
    """(name, x, w, b) variants with the same values: non-contiguous input, channels_last,
    task-broadcast (expanded) weight, permuted weight and bias storage."""
    w0 = w[:1].clone()
    return [
        ("contiguous", x, w, b),
        ("sliced-input", torch.cat([x, x], dim=3)[..., ::2], w, b),
        ("channels-last", x.contiguous(memory_format=torch.channels_last), w, b),
        ("transposed-hw", x.transpose(2, 3).contiguous().transpose(2, 3), w, b),
        ("expanded-weight", x, w0.expand_as(w), b),
        ("permuted-weight", x, w.permute(1, 0, 2, 3, 4).contiguous().permute(1, 0, 2, 3, 4),
         b.t().contiguous().t() if b is not None else None),
    ]


@pytest.mark.parametrize("name", ["contiguous", "sliced-input", "channels-last", "transposed-hw", "expanded-weight",
                                  "permuted-weight"])
def test_layouts(name):
    case = Case(3, 4, 4, 6, (7, 6), k=3, stride=(1, 2), padding=1, groups=2)
    x, w, b = case.make(seed=29)
    _, xx, ww, bb = next(v for v in _layouts(x, w, b) if v[0] == name)
    got = derivatives(fused(case), xx, ww, bb)
    exp = derivatives(twin(case), xx.contiguous(), ww.contiguous(), bb.contiguous())
    for a, e in zip(got, exp):
        close(a, e, TOL[torch.float64])
    y = ops.task_conv2d(xx, ww, bb, **case.conv_args())
    if name == "channels-last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()


def test_empty_batch():
    case = Case(0, 3, 2, 4, 5, groups=2)
    x, w, b = _req(*case.make(seed=31))
    y = ops.task_conv2d(x, w, b, **case.conv_args())
    assert y.shape == (0, 12, 5, 5)
    gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reduced_precision_cpu(dtype):
    """ATen's CPU convolution supports every floating dtype; values and first derivatives vs
    float64 (second-order in float32 is covered above)."""
    case = Case(5, 4, 8, 8, 9, groups=2)
    x, w, b = case.make(dtype=dtype, seed=37)
    xs, ws, bs = _req(x, w, b)
    y = ops.task_conv2d(xs, ws, bs, **case.conv_args())
    assert y.dtype == dtype
    got = [y] + list(torch.autograd.grad(y, (xs, ws, bs), torch.ones_like(y)))
    x64, w64, b64 = _req(x.double(), w.double(), b.double())
    y64 = ref.task_conv2d(x64, w64, b64, **case.conv_args())
    exp = [y64] + list(torch.autograd.grad(y64, (x64, w64, b64), torch.ones_like(y64)))
    for a, e in zip(got, exp):
        assert a.dtype == dtype
        close(a.double(), e, TOL[dtype])


@pytest.mark.parametrize("padding, k, dilation", [("same", 3, 1), ("same", 4, 1), ("same", (2, 3), (3, 1)),
                                                  ("valid", 3, 2)])
def test_string_padding(padding, k, dilation):
    """padding="same" / "valid" as in F.conv2d (an odd total padding: the extra row/column at the
    bottom/right), derivatives included."""
    case = Case(2, 3, 2, 4, (6, 7), k=k, stride=1, padding=padding, dilation=dilation)
    x, w, b = case.make(seed=41)
    got = derivatives(fused(case), x, w, b)
    exp = derivatives(twin(case), x, w, b)
    for a, e in zip(got, exp):
        close(a, e, TOL[torch.float64])


# ---- opcheck --------------------------------------------------------------------------------------

def _opcheck_samples(device="cpu"):
    samples = []
    for i, case in enumerate([CASES[6], CASES[7], SMALL[2], Case(0, 2, 2, 2, 4)]):
        x, w, b = case.make(dtype=torch.float32, device=device, seed=43 + i)
        stride, padding, dilation, groups = case.op_args()
        x, w, b = _req(x, w, b)
        gy = _req(torch.randn_like(ref.task_conv2d(x, w, None, **case.conv_args())))[0]
        samples.append(("task_conv", (x, w, b, stride, padding, dilation, groups)))
        for mask in ([True, True, True], [False, True, False], [True, False, False], [False, False, True]):
            samples.append(("_task_conv_backward", (gy, x, w, stride, padding, dilation, groups, mask)))
    x, w, b = _req(*CASES[6].make(dtype=torch.float32, device=device, seed=47))
    stride, padding, dilation, groups = CASES[6].op_args()
    samples.append(("task_conv", (x.contiguous(memory_format=torch.channels_last), w, b, stride, padding, dilation,
                                  groups)))
    return samples


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(_opcheck_samples())))
def test_opcheck(device, case):
    name, args = _opcheck_samples(device)[case]
    torch.library.opcheck(getattr(OPS, name), args)


def test_torch_compile_fullgraph():
    """torch.compile (fullgraph, AOT autograd) of the wrapper, forward and backward, vs eager."""
    case = CASES[6]
    x, w, b = case.make(dtype=torch.float32, seed=53)

    def f(x_, w_, b_):
        return ops.task_conv2d(x_, w_, b_, **case.conv_args()).sin()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xa, wa, ba = _req(x, w, b)
    ya = compiled(xa, wa, ba)
    ga = torch.autograd.grad(ya.sum(), (xa, wa, ba))
    xe, we, be = _req(x, w, b)
    ye = f(xe, we, be)
    ge = torch.autograd.grad(ye.sum(), (xe, we, be))
    torch.testing.assert_close(ya, ye)
    for a, e in zip(ga, ge):
        torch.testing.assert_close(a, e)


# ---- the point of the op: derivatives are grouped convolutions of ours, whatever T ---------------

class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _second_order_ops(conv, T):
    """Ops dispatched by the double backward of one conv layer (the MAML++ second-order pattern:
    the weight gradient taken with create_graph, then differentiated w.r.t. input and weight)."""
    case = Case(2, T, 4, 4, 6, groups=1)
    x, w, b = _req(*case.make(dtype=torch.float32, seed=59))
    y = conv(x, w, b, **case.conv_args())
    gx, gw, gb = torch.autograd.grad((y * y).sum(), (x, w, b), create_graph=True)
    loss = (gw * gw).sum() + (gx * gx).sum() + (gb * gb).sum()
    counter = _OpCounter()
    with counter:
        torch.autograd.grad(loss, (x, w, b))
    return counter.names


def test_second_order_is_grouped_convolutions_of_ours_whatever_T():
    ours = {T: _second_order_ops(ops.task_conv2d, T) for T in (2, 8)}
    aten = {T: _second_order_ops(ref.task_conv2d, T) for T in (2, 8)}
    for names in ours.values():
        assert not any(n.startswith("aten.") and "conv" in n for n in names), names
        assert any(n == "mamlpp_ext.task_conv" for n in names)
        assert any(n == "mamlpp_ext._task_conv_backward" for n in names)
    assert ours[2] == ours[8]
    # ATen's double backward grows with T (its weight term runs group by group).
    conv = lambda names: sum("conv" in n for n in names)  # noqa: E731
    assert conv(aten[8]) > conv(aten[2]) and conv(aten[2]) > conv(ours[2])


# ---- how the ops are wired: C++ autograd ---------------------------------------------------------

def test_autograd_runs_no_python():
    """Forward, backward with create_graph and the double backward run C++ autograd kernels: no
    Python runs in the ops' layer other than the wrapper, nor in torch.library's Python autograd."""
    import sys

    case = CASES[6]
    x, w, b = _req(*case.make(seed=61))

    def second_order():
        y = ops.task_conv2d(x, w, b, **case.conv_args())
        gx, gw, gb = torch.autograd.grad((y * y).sum(), (x, w, b), create_graph=True)
        torch.autograd.grad((gx * gx).sum() + (gw * gw).sum() + gb.sum(), (x, w, b))

    called = set()

    def profile(frame, event, arg):
        if event == "call":
            called.add((frame.f_code.co_filename, frame.f_code.co_name))

    sys.setprofile(profile)
    try:
        second_order()
    finally:
        sys.setprofile(None)
    ours = {name for f, name in called if f.endswith("mamlpp_ext/ops/task_conv.py")}
    assert ours == {"task_conv2d"}, ours
    assert not {(f, n) for f, n in called if "torch/_library" in f}


# ---- rejected inputs ------------------------------------------------------------------------------

def _bad_calls():
    case = Case(2, 2, 4, 6, 5, groups=2)
    x, w, b = case.make(dtype=torch.float32, seed=67)
    s, p, d, g = case.op_args()
    gy = torch.randn(2, 12, 5, 5)
    m = [True, True, True]
    return [
        ("expected input to be 4-D (N, T*C_in, H, W)", lambda: OPS.task_conv(x[0], w, b, s, p, d, g)),
        ("expected input to be a floating-point tensor", lambda: OPS.task_conv(x.long(), w, b, s, p, d, g)),
        ("expected weight to be 5-D (T, C_out, C_in/groups, kh, kw)", lambda: OPS.task_conv(x, w[0], b, s, p, d, g)),
        ("expected weight to have the dtype of input", lambda: OPS.task_conv(x, w.double(), b, s, p, d, g)),
        ("expected bias to have the dtype of input", lambda: OPS.task_conv(x, w, b.double(), s, p, d, g)),
        ("expected groups >= 1, but got groups=0", lambda: OPS.task_conv(x, w, b, s, p, d, 0)),
        ("expected weight to hold at least one task", lambda: OPS.task_conv(x[:, :0], w[:0], None, s, p, d, g)),
        ("to be a positive multiple of groups=4", lambda: OPS.task_conv(x, w[:, :, :1], b, s, p, d, 4)),
        ("expected input to have T*C_in = 8 channels (T=2", lambda: OPS.task_conv(x[:, :6], w, b, s, p, d, g)),
        ("expected input to have T*C_in = 12 channels (T=3", lambda: OPS.task_conv(x, w.repeat(2, 1, 1, 1, 1)[:3],
                                                                                    None, s, p, d, g)),
        ("expected weight to have at least one input channel", lambda: OPS.task_conv(x[:, :0], w[:, :, :0], b, s, p,
                                                                                      d, g)),
        ("expected every value of stride to be >= 1", lambda: OPS.task_conv(x, w, b, [1, 0], p, d, g)),
        ("expected every value of padding to be >= 0", lambda: OPS.task_conv(x, w, b, s, [-1, 1], d, g)),
        ("expected every value of dilation to be >= 1", lambda: OPS.task_conv(x, w, b, s, p, [0, 1], g)),
        ("expected stride to have 2 values", lambda: OPS.task_conv(x, w, b, [1, 1, 1], p, d, g)),
        ("expected the padded input width (5 + 2*padding 0 = 5) to be at least the dilated kernel width (7)",
         lambda: OPS.task_conv(x, w, b, s, [1, 0], [1, 3], g)),
        ("expected bias to have shape (T, C_out) = (2, 6)", lambda: OPS.task_conv(x, w, b[0], s, p, d, g)),
        ("expected bias to have shape (T, C_out) = (2, 6)", lambda: OPS.task_conv(x, w, b[:, :3], s, p, d, g)),
        ("expected grad_out to have the shape of task_conv's output (2, 12, 5, 5)",
         lambda: OPS._task_conv_backward(gy[:, :6], x, w, s, p, d, g, m)),
        ("expected grad_out to have the shape of task_conv's output (2, 12, 3, 3)",
         lambda: OPS._task_conv_backward(gy, x, w, [2, 2], p, d, g, m)),
        ("expected grad_out to have the dtype of input", lambda: OPS._task_conv_backward(gy.double(), x, w, s, p, d,
                                                                                          g, m)),
        ("_task_conv_backward: expected input to have T*C_in", lambda: OPS._task_conv_backward(gy, x[:, :4], w, s, p,
                                                                                                d, g, m)),
        ("padding='same' needs stride 1", lambda: ops.task_conv2d(x, w, b, 2, "same", 1, 2)),
        ("expected padding to be an int, a pair, 'valid' or 'same'", lambda: ops.task_conv2d(x, w, b, 1, "full", 1,
                                                                                              2)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_rejects_bad_input(case):
    match, call = _bad_calls()[case]
    with pytest.raises((RuntimeError, ValueError), match=match.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("*", r"\*").replace("+", r"\+")):
        call()


# ---- CUDA ---------------------------------------------------------------------------------------

@needs_cuda
def test_rejects_mixed_devices():
    x, w, b = Case(2, 2, 4, 6, 5).make(dtype=torch.float32, seed=71)
    with pytest.raises(RuntimeError, match="expected weight to be on the device of input"):
        OPS.task_conv(x.cuda(), w, b.cuda(), [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="expected bias to be on the device of input"):
        OPS.task_conv(x.cuda(), w.cuda(), b, [1, 1], [1, 1], [1, 1], 1)


# The Omniglot and mini-ImageNet first layers, a 64-filter layer and the stride / padding /
# dilation / groups matrix (a subset: the CPU reference of third derivatives is the slow part).
CUDA_CASES = [CASES[0], CASES[1], CASES[3], CASES[6], CASES[7], CASES[8], CASES[10]]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CUDA_CASES, ids=repr)
def test_cuda_matches_cpu(case, dtype):
    """Values and first to third derivatives on CUDA (cuDNN) vs the CPU: the same sums in another
    order (TF32 off: with it, float32 convolutions round their inputs to 10-bit mantissas)."""
    x, w, b = case.make(dtype=dtype, seed=73)
    cuda = [t.cuda() if t is not None else None for t in (x, w, b)]
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        got = derivatives(fused(case), *cuda)
    exp = derivatives(fused(case), x, w, b)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)
    for a, e in zip(got, exp):
        close(a.cpu(), e, tol)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_reduced_precision(dtype):
    case = Case(5, 8, 64, 64, 14)
    x, w, b = case.make(dtype=dtype, device="cuda", seed=79)
    xs, ws, bs = _req(x, w, b)
    y = ops.task_conv2d(xs, ws, bs, **case.conv_args())
    got = [y] + list(torch.autograd.grad(y, (xs, ws, bs), torch.ones_like(y)))
    x64, w64, b64 = _req(x.double(), w.double(), b.double())
    y64 = ref.task_conv2d(x64, w64, b64, **case.conv_args())
    exp = [y64] + list(torch.autograd.grad(y64, (x64, w64, b64), torch.ones_like(y64)))
    for a, e in zip(got, exp):
        assert a.dtype == dtype
        close(a.double(), e, TOL[dtype])


@needs_cuda
@pytest.mark.parametrize("case", SMALL, ids=repr)
def test_cuda_gradcheck_gradgradcheck(case):
    """(cuDNN's deterministic algorithms: gradcheck also checks that two backward calls agree
    exactly, which cuDNN's non-deterministic weight-gradient algorithms need not.)"""
    x, w, b = _req(*case.make(device="cuda", seed=83))
    inputs = [t for t in (x, w, b) if t is not None]

    def f(*args):
        return ops.task_conv2d(args[0], args[1], args[2] if len(args) > 2 else None, **case.conv_args())

    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):
        assert torch.autograd.gradcheck(f, inputs)
        assert torch.autograd.gradgradcheck(f, inputs)


@needs_cuda
@pytest.mark.parametrize("name", ["contiguous", "channels-last", "expanded-weight"])
def test_cuda_layouts(name):
    case = Case(20, 8, 64, 64, 7)
    x, w, b = case.make(dtype=torch.float32, device="cuda", seed=89)
    _, xx, ww, bb = next(v for v in _layouts(x, w, b) if v[0] == name)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        y = ops.task_conv2d(xx, ww, bb, **case.conv_args())
    close(y.cpu(), per_task(xx.cpu(), ww.cpu(), bb.cpu(), case), dict(rtol=1e-3, atol=1e-3))
    if name == "channels-last":
        assert y.is_contiguous(memory_format=torch.channels_last)
