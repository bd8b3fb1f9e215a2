"""Tests of the LSLR op family: lslr_update, _lslr_scale, _lslr_dot (CPU here, CUDA when present).

Every value is compared with the pure-PyTorch twin in mamlpp_ext.reference on fresh random
inputs; derivatives are checked with gradcheck/gradgradcheck in float64 and against the reference
in a MAML-style second-order inner loop; opcheck covers the dispatcher registrations.
"""

from __future__ import annotations

import pytest
import torch

import mamlpp_ext
from mamlpp_ext.ops import reference as ref

pytestmark = pytest.mark.skipif(not mamlpp_ext.has_extension(), reason=str(mamlpp_ext.extension_error()))

if mamlpp_ext.has_extension():
    from mamlpp_ext import ops

    OPS = torch.ops.mamlpp_ext

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# Shapes (without the task dimension) of the Omniglot MAML++ network's 10 fast weights (SPEC §2).
OMNIGLOT_SHAPES = [(64, 1, 3, 3), (64,), (64, 64, 3, 3), (64,), (64, 64, 3, 3), (64,),
                   (64, 64, 3, 3), (64,), (5, 64), (5,)]
# Odd sizes (not multiples of any vector width), a 0-d-per-task tensor and an empty one.
ODD_SHAPES = [(7,), (13, 3), (1,), (), (0,), (3, 0, 2), (129,), (5, 5, 5)]

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-6, atol=1e-6),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def make_list(shapes, T, dtype=torch.float32, device="cpu", gen=None):
    return [torch.randn((T, *s), dtype=dtype, device=device, generator=gen) for s in shapes]


def make_case(shapes, T=4, S=5, dtype=torch.float32, device="cpu", lr_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [t.to(device) for t in make_list(shapes, T, dtype, gen=g)]
    grads = [t.to(device) for t in make_list(shapes, T, dtype, gen=g)]
    lrs = torch.randn(len(shapes), S, generator=g).to(device=device, dtype=lr_dtype or dtype)
    return params, grads, lrs


def expected_update(params, grads, lrs, step):
    """The reference evaluated in float64, rounded once to the inputs' dtype."""
    out = ref.lslr_update([p.double() for p in params], [g.double() for g in grads], lrs.double(), step)
    return [o.to(p.dtype) for o, p in zip(out, params)]


def assert_list_close(actual, expected, dtype):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype and a.device == e.device
        torch.testing.assert_close(a, e, **TOL[dtype])


# ------------------------------------------------------------------------------------------------
# Forward values
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shapes", [OMNIGLOT_SHAPES, ODD_SHAPES], ids=["omniglot", "odd"])
def test_update_matches_reference(device, dtype, shapes):
    params, grads, lrs = make_case(shapes, T=8, dtype=dtype, device=device)
    for step in (0, 3, 4):
        out = ops.lslr_update(params, grads, lrs, step)
        assert_list_close(out, expected_update(params, grads, lrs, step), dtype)
        assert all(o.is_contiguous() for o in out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_float32_rates_with_other_dtypes(device, dtype):
    params, grads, lrs = make_case(OMNIGLOT_SHAPES, T=2, dtype=dtype, device=device, lr_dtype=torch.float32)
    out = ops.lslr_update(params, grads, lrs, 1)
    assert_list_close(out, expected_update(params, grads, lrs, 1), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_task_broadcast_params_are_read_in_place(device):
    """Step 0 of MAML: params = theta0.expand(T, ...) (stride 0 over tasks)."""
    g = torch.Generator().manual_seed(1)
    T = 6
    theta = [torch.randn(s, generator=g).to(device) for s in OMNIGLOT_SHAPES + [(17,)]]
    params = [t.expand(T, *t.shape) for t in theta]
    assert params[0].stride(0) == 0
    grads = [torch.randn(T, *t.shape, generator=g).to(device) for t in theta]
    lrs = torch.randn(len(theta), 3, generator=g).to(device)
    out = ops.lslr_update(params, grads, lrs, 2)
    assert_list_close(out, expected_update(params, grads, lrs, 2), torch.float32)
    # Broadcast grads too, and a broadcast operand whose task rows are not a multiple of 4.
    gb = [torch.randn(t.shape, generator=g).to(device).expand(T, *t.shape) for t in theta]
    out = ops.lslr_update(params, gb, lrs, 1)
    assert_list_close(out, expected_update(params, gb, lrs, 1), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    g = torch.Generator().manual_seed(2)
    T = 3
    params = [torch.randn(T, 9, 7, generator=g).to(device).transpose(1, 2),   # transposed
              torch.randn(T, 20, generator=g).to(device)[:, ::2],             # strided
              torch.randn(T, 4, 5, generator=g).to(device).permute(0, 2, 1)]
    grads = [torch.randn(p.shape, generator=g).to(device).transpose(-1, -2).contiguous().transpose(-1, -2)
             if p.dim() == 3 else torch.randn(p.shape, generator=g).to(device) for p in params]
    lrs = torch.randn(3, 2, generator=g).to(device)[:, [1, 0]]  # non-contiguous rates too
    out = ops.lslr_update(params, grads, lrs, 0)
    assert_list_close(out, expected_update(params, grads, lrs, 0), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_more_tensors_than_one_launch(device):
    """More tensors (and chunks) than one multi-tensor-apply launch holds on CUDA (36 / 320)."""
    shapes = [(11,), (3, 5)] * 30 + [(70000,), (300, 1000)]
    params, grads, lrs = make_case(shapes, T=2, device=device, seed=3)
    for step in (0, 4):
        out = ops.lslr_update(params, grads, lrs, step)
        assert_list_close(out, expected_update(params, grads, lrs, step), torch.float32)
    d = OPS._lslr_dot(grads, params, lrs, 2, 0.5)
    torch.testing.assert_close(d, ref.lslr_dot(grads, params, lrs, 2, 0.5), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_list(device):
    lrs = torch.randn(0, 3, device=device)
    assert ops.lslr_update([], [], lrs, 1) == []
    assert OPS._lslr_scale([], lrs, 0, 2.0) == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_scale_and_dot_match_reference(device, dtype):
    xs, ys, lrs = make_case(OMNIGLOT_SHAPES + ODD_SHAPES, T=3, dtype=dtype, device=device, seed=4)
    lrs32 = lrs.float()
    for alpha in (1.0, -0.75):
        out = OPS._lslr_scale(xs, lrs, 2, alpha)
        exp = [e.to(dtype) for e in ref.lslr_scale([x.double() for x in xs], lrs.double(), 2, alpha)]
        assert_list_close(out, exp, dtype)
        d = OPS._lslr_dot(xs, ys, lrs32, 3, alpha)
        e = ref.lslr_dot(xs, ys, lrs32, 3, alpha)
        assert d.dtype == torch.float32 and d.shape == lrs.shape
        torch.testing.assert_close(d, e, rtol=1e-5, atol=1e-5)
        assert (d[:, [0, 1, 2, 4]] == 0).all()


def test_dot_is_deterministic_and_thread_count_independent():
    xs, ys, lrs = make_case([(300_000,), (64, 64, 3, 3)], T=8, seed=5)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results += [OPS._lslr_dot(xs, ys, lrs, 1, 1.0) for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert torch.equal(r, results[0])
    torch.testing.assert_close(results[0], ref.lslr_dot(xs, ys, lrs, 1, 1.0), rtol=1e-6, atol=1e-4)


# Large enough that the CPU pass is split over threads (kMinElementsPerThread = 32768 per thread in
# csrc/cpu/lslr_cpu.cpp), with sizes that put part and block (kDotBlock = 16384) boundaries inside
# tensors, plus an empty tensor, a 0-d-per-task tensor and tensors smaller than one vector.
SPLIT_SHAPES = [(5,), (0,), (12_289,), (), (3, 7), (40_001,), (64, 64, 3, 3), (1,), (16_384,), (129,)]


def _at_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bcast", ["dense", "params", "both"])
def test_cpu_parallel_pass_is_thread_count_independent(dtype, bcast):
    """update, scale and dot give bit-identical results at 1, 2 and 3 threads, and match the reference."""
    T = 4
    params, grads, lrs = make_case(SPLIT_SHAPES, T=T, dtype=dtype, seed=21)
    if bcast in ("params", "both"):
        params = [p[0].expand_as(p) if p.dim() > 0 and p.shape[0] == T else p for p in params]
    if bcast == "both":
        grads = [g[1].expand_as(g) for g in grads]
    assert sum(p.numel() for p in params) > 3 * 32768
    results = {}
    for n in (1, 2, 3):
        results[n] = _at_threads(n, lambda: (ops.lslr_update(params, grads, lrs, 2),
                                             OPS._lslr_scale(grads, lrs, 1, -0.5),
                                             OPS._lslr_dot(params, grads, lrs, 3, 0.25)))
    for n in (2, 3):
        for a, b in zip(results[1][0] + results[1][1], results[n][0] + results[n][1]):
            assert torch.equal(a, b)
        assert torch.equal(results[1][2], results[n][2])
    up, sc, dot = results[2]
    assert_list_close(up, expected_update(params, grads, lrs, 2), dtype)
    exp_sc = [e.to(dtype) for e in ref.lslr_scale([g.double() for g in grads], lrs.double(), 1, -0.5)]
    assert_list_close(sc, exp_sc, dtype)
    exp_dot = ref.lslr_dot([p.double() for p in params], [g.double() for g in grads], lrs.double(), 3, 0.25)
    torch.testing.assert_close(dot, exp_dot.to(dot.dtype), **TOL[dtype])


def test_dot_broadcast_is_thread_count_independent():
    """_lslr_dot with task-broadcast operands (step-0 params) gives one result at any thread count."""
    g = torch.Generator().manual_seed(22)
    T = 8
    theta = [torch.randn(s, generator=g) for s in OMNIGLOT_SHAPES]
    xs = [t.expand(T, *t.shape) for t in theta]
    ys = make_list(OMNIGLOT_SHAPES, T, gen=g)
    lrs = torch.randn(len(theta), 5, generator=g)
    results = [_at_threads(n, lambda: OPS._lslr_dot(xs, ys, lrs, 4, -1.5)) for n in (1, 2, 3, 1)]
    for r in results[1:]:
        assert torch.equal(r, results[0])
    exp = ref.lslr_dot([x.double() for x in xs], [y.double() for y in ys], lrs.double(), 4, -1.5)
    torch.testing.assert_close(results[0], exp.float(), **TOL[torch.float32])


@pytest.mark.parametrize("op", ["update", "scale"])
def test_cpu_outputs_are_independent_tensors(op):
    """The CPU outputs share one allocation (NOTE [One allocation for the outputs]) but behave as
    separate tensors: own storages, no overlap, each value survives the others, resize_ works."""
    params, grads, lrs = make_case(SPLIT_SHAPES, T=3, seed=23)
    if op == "update":
        outs = ops.lslr_update(params, grads, lrs, 1)
        expected = expected_update(params, grads, lrs, 1)
    else:
        outs = OPS._lslr_scale(params, lrs, 1, 2.0)
        expected = ref.lslr_scale(params, lrs, 1, 2.0)
    spans = []
    for o, p in zip(outs, params):
        st = o.untyped_storage()
        assert o.is_contiguous() and o.storage_offset() == 0 and o.shape == p.shape
        assert st.nbytes() == o.numel() * o.element_size()
        if o.numel():
            spans.append((st.data_ptr(), st.data_ptr() + st.nbytes()))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no two outputs overlap
    # Writing one output changes no other; dropping all but one keeps its values.
    keep = 6
    outs[keep - 1].fill_(7.0)
    torch.testing.assert_close(outs[keep], expected[keep])
    kept = outs[keep]
    del outs
    import gc

    gc.collect()
    _ = [torch.randn(p.shape) for p in params]  # reuse freed memory, if any was freed
    torch.testing.assert_close(kept, expected[keep])
    # The storage is resizable (it keeps the CPU allocator): growing copies the values over.
    flat = kept.reshape(-1).clone()
    kept.resize_(kept.numel() + 1000)
    assert torch.equal(kept[: flat.numel()], flat)


# ------------------------------------------------------------------------------------------------
# Derivatives
# ------------------------------------------------------------------------------------------------

def _grad_inputs(device, T=3, S=4, seed=6):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 3), (5,), (1,), ()]
    theta = [torch.randn(s, generator=g, dtype=torch.float64).to(device).requires_grad_() for s in shapes]
    dense = torch.randn(T, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    grads = [torch.randn(T, *s, generator=g, dtype=torch.float64).to(device).requires_grad_()
             for s in shapes + [(4,)]]
    lrs = torch.randn(len(shapes) + 1, S, generator=g, dtype=torch.float64).to(device).requires_grad_()
    return theta, dense, grads, lrs


@pytest.mark.parametrize("device", DEVICES)
def test_update_gradcheck_and_gradgradcheck(device):
    theta, dense, grads, lrs = _grad_inputs(device)
    T = dense.shape[0]

    def f(*args):
        th, d, gs, r = args[:4], args[4], args[5:10], args[10]
        params = [t.expand(T, *t.shape) for t in th] + [d]  # broadcast and dense params
        return tuple(ops.lslr_update(params, list(gs), r, 2))

    inputs = (*theta, dense, *grads, lrs)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_third_order(device):
    theta, dense, grads, lrs = _grad_inputs(device, seed=7)

    def f(*args):
        out = ops.lslr_update([args[0].expand(3, 2, 3), args[1]], [args[2], args[3]], args[4], 1)
        loss = sum((o.sin() * o).sum() for o in out)
        return torch.autograd.grad(loss, args, create_graph=True)

    inputs = (theta[0], dense, grads[0], grads[4], lrs[[0, 4]].detach().requires_grad_())
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_scale_and_dot_gradgradcheck(device):
    g = torch.Generator().manual_seed(8)
    xs = [torch.randn(3, 4, generator=g, dtype=torch.float64).to(device).requires_grad_(),
          torch.randn(3, 2, 2, generator=g, dtype=torch.float64).to(device).requires_grad_()]
    ys = [torch.randn_like(x).requires_grad_() for x in xs]
    lrs = torch.randn(2, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    def scale(a, b, r):
        return tuple(OPS._lslr_scale([a, b], r, 1, -0.5))

    def dot(a, b, c, d):
        return OPS._lslr_dot([a, b], [c, d], lrs.detach(), 2, 1.5)

    assert torch.autograd.gradcheck(scale, (*xs, lrs))
    assert torch.autograd.gradgradcheck(scale, (*xs, lrs))
    assert torch.autograd.gradcheck(dot, (*xs, *ys))
    assert torch.autograd.gradgradcheck(dot, (*xs, *ys))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_reference_float32(device):
    params, grads, lrs = make_case(OMNIGLOT_SHAPES, T=8, device=device, seed=9)
    up = make_list(OMNIGLOT_SHAPES, 8, gen=torch.Generator().manual_seed(10))
    up = [u.to(device) for u in up]

    def run(fn, dtype):
        p = [x.to(dtype, copy=True).requires_grad_() for x in params]
        g = [x.to(dtype, copy=True).requires_grad_() for x in grads]
        r = lrs.to(dtype, copy=True).requires_grad_()
        out = fn(p, g, r, 3)
        torch.autograd.backward(out, [u.to(dtype) for u in up])
        return [x.grad for x in p] + [x.grad for x in g] + [r.grad]

    # The reference runs in float64: the rates' gradient sums ~300k products, where a float32
    # sum would be the less accurate side of the comparison.
    for a, e in zip(run(ops.lslr_update, torch.float32), run(ref.lslr_update, torch.float64)):
        torch.testing.assert_close(a, e.float(), rtol=1e-6, atol=1e-6)


def _maml_second_order(update, device, seed=11):
    """A two-layer regression net, 3 inner steps with LSLR, second-order outer gradient."""
    g = torch.Generator().manual_seed(seed)
    T, S = 4, 3
    w1 = (0.5 * torch.randn(8, 3, generator=g, dtype=torch.float64)).to(device).requires_grad_()
    b1 = torch.zeros(8, dtype=torch.float64, device=device).requires_grad_()
    w2 = (0.5 * torch.randn(1, 8, generator=g, dtype=torch.float64)).to(device).requires_grad_()
    lrs = torch.full((3, S), 0.1, dtype=torch.float64, device=device).requires_grad_()
    xs = torch.randn(T, 10, 3, generator=g, dtype=torch.float64).to(device)
    ys = torch.randn(T, 10, 1, generator=g, dtype=torch.float64).to(device)
    xq = torch.randn(T, 10, 3, generator=g, dtype=torch.float64).to(device)
    yq = torch.randn(T, 10, 1, generator=g, dtype=torch.float64).to(device)

    def net(fast, x):
        a, b, c = fast
        h = torch.tanh(torch.baddbmm(b.unsqueeze(1), x, a.transpose(1, 2)))
        return torch.bmm(h, c.transpose(1, 2))

    fast = [w1.expand(T, 8, 3), b1.expand(T, 8), w2.expand(T, 1, 8)]
    for step in range(S):
        loss = ((net(fast, xs) - ys) ** 2).mean(dim=(1, 2)).sum()
        grads = torch.autograd.grad(loss, fast, create_graph=True)
        fast = update(fast, list(grads), lrs, step)
    outer = ((net(fast, xq) - yq) ** 2).mean()
    return torch.autograd.grad(outer, [w1, b1, w2, lrs])


@pytest.mark.parametrize("device", DEVICES)
def test_maml_second_order_matches_reference(device):
    fused = _maml_second_order(ops.lslr_update, device)
    refd = _maml_second_order(ref.lslr_update, device)
    for a, e in zip(fused, refd):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    assert fused[3].abs().sum() > 0  # the rates do receive gradient


# ------------------------------------------------------------------------------------------------
# The C++ autograd (csrc/autograd/lslr_autograd.cpp): undefined output gradients, mixed
# requires_grad, saved tensors, third order (NOTE [LSLR autograd: lists, undefined gradients,
# saved tensors])
# ------------------------------------------------------------------------------------------------

_AG_SHAPES = [(2, 3), (5,), (), (4, 1), (3,)]


def _ag_case(device, seed, T=3, S=4, broadcast=(0, 3)):
    """float64 inputs: theta leaves (params[k] = theta[k].expand(T, ...) for k in `broadcast`,
    a dense leaf otherwise), grads and rates, all requiring grad, fresh random values."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(device).requires_grad_()

    leaves = [rnd(*s) if k in broadcast else rnd(T, *s) for k, s in enumerate(_AG_SHAPES)]
    grads = [rnd(T, *s) for s in _AG_SHAPES]
    lrs = rnd(len(_AG_SHAPES), S)
    return leaves, grads, lrs


def _params_of(leaves, T=3, broadcast=(0, 3)):
    return [x.expand(T, *x.shape) if k in broadcast else x for k, x in enumerate(leaves)]


def _assert_grads_equal(actual, expected, **tol):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert (a is None) == (e is None), f"gradient {i}: {a is None} vs {e is None}"
        if a is not None:
            torch.testing.assert_close(a, e, **(tol or dict(rtol=1e-12, atol=1e-12)))


def _weights(outs, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device) for o in outs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("used", [(1, 3, 4), (0, 1), (2,), (0, 1, 2, 3, 4), ()],
                         ids=["gaps", "head", "middle", "all", "none"])
def test_undefined_output_gradients(device, used):
    """Outputs the loss does not use send undefined gradients: the gradients of every input,
    first and second order, equal the reference's (None where the reference's is None)."""
    leaves, grads, lrs = _ag_case(device, seed=20)
    inputs = leaves + grads + [lrs]

    def grads_of(update):
        out = update(_params_of(leaves), grads, lrs, 2)
        w = _weights(out, 21)
        loss = sum(((out[k] * w[k]).sin() * out[k]).sum() for k in used) + 0 * lrs.sum()
        first = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
        loss2 = sum((f * f).sum() for f in first if f is not None and f.requires_grad)
        second = torch.autograd.grad(loss2, inputs, allow_unused=True) if torch.is_tensor(loss2) else ()
        return first, second

    (f1, s1), (f2, s2) = grads_of(ops.lslr_update), grads_of(ref.lslr_update)
    _assert_grads_equal([x.detach() if x is not None else None for x in f1],
                        [x.detach() if x is not None else None for x in f2])
    _assert_grads_equal(s1, s2)


@pytest.mark.parametrize("device", DEVICES)
def test_undefined_output_gradients_gradcheck(device):
    """gradcheck/gradgradcheck of a function that returns only some outputs of each op (so the
    others' gradients are undefined at every order), with broadcast params."""
    leaves, grads, lrs = _ag_case(device, seed=22)
    n = len(leaves)

    def update(*args):
        out = ops.lslr_update(_params_of(args[:n]), list(args[n:2 * n]), args[2 * n], 1)
        return out[1], out[3], out[4]

    def scale(*args):
        out = OPS._lslr_scale(list(args[:n]), args[n], 3, -0.5)
        return out[0], out[2]

    def dot(*args):
        return OPS._lslr_dot([args[0], args[2]], [args[1], args[3]], lrs.detach()[:2], 0, 1.5)

    inputs = (*leaves, *grads, lrs)
    assert torch.autograd.gradcheck(update, inputs)
    assert torch.autograd.gradgradcheck(update, inputs)
    assert torch.autograd.gradcheck(scale, (*grads, lrs))
    assert torch.autograd.gradgradcheck(scale, (*grads, lrs))
    dot_in = (grads[0], torch.randn_like(grads[0]).requires_grad_(), grads[4], torch.randn_like(grads[4]))
    assert torch.autograd.gradcheck(dot, dot_in)
    assert torch.autograd.gradgradcheck(dot, dot_in)


def _record_ops(fn):
    """Names of the ops that `fn` dispatches below autograd (the kernels that run)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    names = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(str(func.overloadpacket).split("::")[-1].split(".")[-1])
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return names


@pytest.mark.parametrize("device", DEVICES)
def test_undefined_output_gradients_create_no_weight_sized_zeros(device):
    """No zeros tensor shaped like a weight is created for an unused output: the ops run on the
    sub-list of the used outputs; only (rows, S) pieces of the rates' gradient are zero-filled."""
    leaves, grads, lrs = _ag_case(device, seed=23)
    S = lrs.shape[1]
    out = ops.lslr_update(_params_of(leaves), grads, lrs, 1)
    loss = (out[1] * 2).sum() + out[3].sum()
    from torch.utils._python_dispatch import TorchDispatchMode

    filled = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            r = func(*args, **(kwargs or {}))
            if name in ("zeros", "zeros_like", "new_zeros", "zero_", "fill_", "full", "full_like"):
                filled.append(tuple((r if torch.is_tensor(r) else args[0]).shape))
            return r

    with Record():
        torch.autograd.grad(loss, leaves + grads + [lrs], allow_unused=True)
    assert filled, "expected the (K, S)-sized zero fills of the rates' gradient"
    assert all(len(s) == 2 and s[1] == S and s[0] <= len(leaves) for s in filled), filled


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("needs", ["params", "grads", "lrs", "params+lrs", "some-elements"])
def test_mixed_requires_grad(device, needs):
    """Only the inputs that require grad get a gradient; the derivatives of the others are not
    computed (no _lslr_scale / _lslr_dot runs for them) and their operands are not saved."""
    g = torch.Generator().manual_seed(24)
    T, S, K = 3, 4, len(_AG_SHAPES)
    theta = [torch.randn(s, generator=g, dtype=torch.float64).to(device) for s in _AG_SHAPES]
    grads = [torch.randn(T, *s, generator=g, dtype=torch.float64).to(device) for s in _AG_SHAPES]
    lrs = torch.randn(K, S, generator=g, dtype=torch.float64).to(device)
    rg_theta = {"params": range(K), "params+lrs": range(K), "some-elements": (1, 2)}.get(needs, ())
    rg_grads = {"grads": range(K), "some-elements": (0, 2, 4)}.get(needs, ())
    for k in rg_theta:
        theta[k].requires_grad_()
    for k in rg_grads:
        grads[k].requires_grad_()
    lrs.requires_grad_("lrs" in needs)
    wanted = ([theta[k] for k in rg_theta] + [grads[k] for k in rg_grads] + ([lrs] if lrs.requires_grad else []))

    def run(update):
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            out = update([t.expand(T, *t.shape) for t in theta], grads, lrs, 1)
        w = _weights(out, 25)
        loss = sum((o * wk).sum() for o, wk in zip(out, w))
        ran = _record_ops(lambda: torch.autograd.grad(loss, wanted))
        return torch.autograd.grad(sum((o * wk).sum() for o, wk in zip(update(
            [t.expand(T, *t.shape) for t in theta], grads, lrs, 1), w)), wanted), packed, ran, out

    fused, packed, ran, out = run(ops.lslr_update)
    expected = torch.autograd.grad(sum((o * wk).sum() for o, wk in zip(ref.lslr_update(
        [t.expand(T, *t.shape) for t in theta], grads, lrs, 1), _weights(out, 25))), wanted)
    _assert_grads_equal(fused, expected)
    assert all(o.requires_grad for o in out)
    # Derivatives computed: d grads is one _lslr_scale, d lrs one _lslr_dot, d params none.
    assert ran.count("_lslr_scale") == (1 if rg_grads else 0), ran
    assert ran.count("_lslr_dot") == (1 if lrs.requires_grad else 0), ran
    # Saved: the rates when grads or rates need a gradient; grads only when the rates do.
    n_saved = (1 if (rg_grads or lrs.requires_grad) else 0) + (K if lrs.requires_grad else 0)
    assert len(packed) == n_saved, (needs, len(packed))


@pytest.mark.parametrize("device", DEVICES)
def test_no_graph_without_grad(device):
    leaves, grads, lrs = _ag_case(device, seed=26)
    with torch.no_grad():
        out = ops.lslr_update(_params_of(leaves), grads, lrs, 0)
    assert all(o.grad_fn is None and not o.requires_grad for o in out)
    plain = [g.detach() for g in grads]
    out = OPS._lslr_scale(plain, lrs.detach(), 1, 2.0)
    assert all(not o.requires_grad for o in out)
    # `like` lends only its shape: a like that requires grad does not make the result require it.
    assert not OPS._lslr_dot(plain, plain, lrs, 1, 2.0).requires_grad
    d = OPS._lslr_dot(grads, plain, lrs, 1, 2.0)
    assert d.requires_grad
    assert torch.autograd.grad(d.sum(), [lrs, grads[0]], allow_unused=True)[0] is None


def _third_order(update, inputs, n, step, seed):
    """Gradients of order 1, 2 and 3 of a non-polynomial loss of update(params, grads, lrs)."""
    leaves, grads, lrs = inputs[:n], inputs[n:2 * n], inputs[2 * n]
    out = update(_params_of(leaves), list(grads), lrs, step)
    w = _weights(out, seed)
    loss = sum((torch.tanh(o * wk) * o * o).sum() for o, wk in zip(out, w))
    g1 = torch.autograd.grad(loss, inputs, create_graph=True)
    v = _weights(g1, seed + 1)
    g2 = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g1, v)), inputs, create_graph=True)
    u = _weights(g2, seed + 2)
    g3 = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g2, u)), inputs, allow_unused=True)
    return [x.detach() for x in g1], [x.detach() for x in g2], list(g3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [30, 31])
def test_third_order_matches_reference(device, seed):
    leaves, grads, lrs = _ag_case(device, seed=seed)
    inputs = (*leaves, *grads, lrs)
    fused = _third_order(ops.lslr_update, inputs, len(leaves), 3, seed)
    expected = _third_order(ref.lslr_update, inputs, len(leaves), 3, seed)
    for a, e in zip(fused, expected):
        _assert_grads_equal(a, e, rtol=1e-10, atol=1e-12)
    assert fused[2][-1].abs().sum() > 0  # third-order gradient of the rates is not trivially zero


@pytest.mark.parametrize("device", DEVICES)
def test_scale_and_dot_third_order_match_reference(device):
    g = torch.Generator().manual_seed(32)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(device).requires_grad_()

    xs, ys, lrs = [rnd(3, 4), rnd(3, 2, 2), rnd(2)], [rnd(3, 4), rnd(3, 2, 2), rnd(2)], rnd(3, 5)

    def orders(scale, dot):
        inputs = xs + ys + [lrs]
        s = scale(xs, lrs, 2, -0.75)
        d = dot(s, ys, lrs, 4, 1.25)  # a dot of a scale: both ops at every order
        loss = (torch.sin(d) * d).sum() + sum((torch.cos(a) * a).sum() for a in s)
        g1 = torch.autograd.grad(loss, inputs, create_graph=True)
        g2 = torch.autograd.grad(sum((a * a).sum() for a in g1), inputs, create_graph=True)
        g3 = torch.autograd.grad(sum((a.sin()).sum() for a in g2), inputs, allow_unused=True)
        return [x.detach() for x in g1 + g2] + list(g3)

    fused = orders(OPS._lslr_scale, OPS._lslr_dot)
    expected = orders(ref.lslr_scale, ref.lslr_dot)
    _assert_grads_equal(fused, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_mixed_requires_grad(device):
    params, grads, lrs = make_case([(3, 4), (5,), (2, 2, 2)], T=3, device=device, seed=33)
    params[1].requires_grad_()
    grads[2].requires_grad_()
    torch.library.opcheck(OPS.lslr_update, (params, grads, lrs, 1))
    torch.library.opcheck(OPS.lslr_update, (params, [g.detach() for g in grads], lrs.requires_grad_(), 2))
    torch.library.opcheck(OPS._lslr_scale, (grads, lrs.detach(), 2, -1.0))
    torch.library.opcheck(OPS._lslr_dot, (params, [g.detach() for g in grads], lrs.detach(), 0, 2.0))


def test_torch_compile_with_backward():
    """A compiled (aot_eager, fullgraph) update + loss, differentiated through the C++ autograd."""
    leaves, grads, lrs = _ag_case("cpu", seed=34)
    inputs = leaves + grads + [lrs]

    def step(update):
        def f(leaves, grads, lrs):
            out = update(_params_of(leaves), grads, lrs, 2)
            return sum((torch.tanh(o) * o).sum() for o in out)
        return f

    compiled = torch.compile(step(ops.lslr_update), fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(leaves, grads, lrs), inputs)
    want = torch.autograd.grad(step(ref.lslr_update)(leaves, grads, lrs), inputs)
    _assert_grads_equal(got, want)


# ------------------------------------------------------------------------------------------------
# Registration: opcheck (schema, fake kernel, autograd registration, AOT dispatch)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    params, grads, lrs = make_case([(3, 4), (5,), (2, 2, 2)], T=3, device=device, seed=12)
    p = [x.requires_grad_() for x in params]
    g = [x.requires_grad_() for x in grads]
    r = lrs.requires_grad_()
    torch.library.opcheck(OPS.lslr_update, (p, g, r, 1))
    torch.library.opcheck(OPS.lslr_update, (params, grads, lrs.detach(), 4))
    torch.library.opcheck(OPS._lslr_scale, (p, r, 2, -1.0))
    torch.library.opcheck(OPS._lslr_dot, (p, g, lrs.detach(), 0, 2.0))


def test_torch_compile_fullgraph():
    params, grads, lrs = make_case([(3, 4), (5,)], T=2, seed=13)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(p, g, r):
        return ops.lslr_update(p, g, r, 1)

    assert_list_close(step(params, grads, lrs), expected_update(params, grads, lrs, 1), torch.float32)


# ------------------------------------------------------------------------------------------------
# Rejected inputs: a clear error naming the argument, never a crash
# ------------------------------------------------------------------------------------------------

def _bad(match, params, grads, lrs, step):
    with pytest.raises(RuntimeError, match=match):
        ops.lslr_update(params, grads, lrs, step)


def test_rejects_bad_inputs():
    p, g, r = make_case([(3, 4), (5,)], T=2, S=3, seed=14)
    _bad(r"params and grads to have the same length, but got 2 and 1", p, g[:1], r, 0)
    _bad(r"grads\[1\] to have the shape of params\[1\]", p, [g[0], g[1][:, :4]], r, 0)
    _bad(r"step in \[0, 3\).*step=3", p, g, r, 3)
    _bad(r"step in \[0, 3\).*step=-1", p, g, r, -1)
    _bad(r"lrs to be a 2-D \(K, S\) tensor", p, g, r[:, 0], 0)
    _bad(r"lrs.size\(0\) == 2", p, g, r[:1], 0)
    _bad(r"params\[1\] to be a floating-point tensor.*Long", [p[0], p[1].long()], [g[0], g[1].long()], r, 0)
    _bad(r"lrs to be a floating-point tensor", p, g, r.long(), 0)
    _bad(r"every tensor of params to have one dtype", [p[0], p[1].double()], [g[0], g[1].double()], r, 0)
    _bad(r"grads\[0\] to have the dtype of params\[0\]", p, [g[0].double(), g[1]], r, 0)
    _bad(r"lrs to have the dtype of the tensors \(Double\) or float32", [x.double() for x in p],
         [x.double() for x in g], r.half(), 0)
    with pytest.raises(RuntimeError, match=r"like.size\(0\) == 2"):
        OPS._lslr_dot(p, g, r[:1], 0, 1.0)
    with pytest.raises(RuntimeError, match=r"xs\[0\] to be a floating-point tensor"):
        OPS._lslr_scale([p[0].int()], r[:1], 0, 1.0)


def test_rejected_input_leaves_nothing_half_done():
    """Validation happens before any output is written: inputs are untouched after an error."""
    p, g, r = make_case([(3, 4), (5,)], T=2, S=3, seed=15)
    before = [x.clone() for x in p + g] + [r.clone()]
    _bad("step", p, g, r, 7)
    for a, b in zip(p + g + [r], before):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Build and CUDA
# ------------------------------------------------------------------------------------------------

def test_cuda_kernels_registered_when_built():
    info = mamlpp_ext.build_info()
    for op in ("lslr_update", "_lslr_scale", "_lslr_dot"):
        name = f"mamlpp_ext::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA") == info["cuda"], (
            f"build_info says cuda={info['cuda']} but {op}'s CUDA kernel registration disagrees")


@needs_cuda
def test_mixed_devices_rejected():
    p, g, r = make_case([(3, 4), (5,)], T=2, S=3, seed=16)
    _bad(r"params\[1\] to be on the device of the rates", [p[0].cuda(), p[1]], [x.cuda() for x in g], r.cuda(), 0)
    _bad(r"to be on the device of the rates \(cpu\)", p, [g[0].cuda(), g[1]], r, 0)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    shapes = OMNIGLOT_SHAPES + ODD_SHAPES + [(70000,)]
    p, g, r = make_case(shapes, T=8, dtype=dtype, seed=17)
    for step in (0, 2):
        a = ops.lslr_update([x.cuda() for x in p], [x.cuda() for x in g], r.cuda(), step)
        b = ops.lslr_update(p, g, r, step)
        assert_list_close([x.cpu() for x in a], b, dtype)
    d_gpu = OPS._lslr_dot([x.cuda() for x in p], [x.cuda() for x in g], r.float().cuda(), 1, -1.0)
    d_cpu = OPS._lslr_dot(p, g, r.float(), 1, -1.0)
    torch.testing.assert_close(d_gpu.cpu(), d_cpu, rtol=1e-4, atol=1e-3)


@needs_cuda
def test_cuda_no_host_sync_and_graph_capture():
    p, g, r = make_case(OMNIGLOT_SHAPES, T=8, device="cuda", seed=18)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.lslr_update(p, g, r, 1)
        OPS._lslr_dot(out, g, r, 1, 1.0)
        OPS._lslr_scale(out, r, 1, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Warm up on a side stream, then capture and replay with new rates.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.lslr_update(p, g, r, 1)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.lslr_update(p, g, r, 1)
    r.copy_(torch.randn_like(r))
    graph.replay()
    torch.cuda.synchronize()
    assert_list_close(captured, expected_update(p, g, r, 1), torch.float32)


@needs_cuda
def test_cuda_second_order_matches_cpu():
    a = _maml_second_order(ops.lslr_update, "cuda")
    b = _maml_second_order(ops.lslr_update, "cpu")
    for x, y in zip(a, b):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-9, atol=1e-11)
