"""Benchmark of the fused per-step batch norm (``mamlpp_ext.ops.task_batch_norm``) against the
plain-PyTorch path (``mamlpp_ext.ops.reference.task_batch_norm``: repeat gamma/beta T times, ATen's
``F.batch_norm`` on (N, T*C, H, W), the running-statistics update, optional ``F.leaky_relu``).

Cases: the four conv stages of the Omniglot network (C = 64; 28, 14, 7, 3 spatial) at T = 8 tasks
for 5-way 1-shot (N = 5) and 20-way 1-shot (N = 20) support sets, and one large shape (N = 256,
C = 64, 56x56, T = 1); each without activation and with the fused LeakyReLU (negative_slope 0.01,
SPEC section 2). Training mode with a shared
(C,) affine and the (S, C) running statistics updated, as in the MAML++ support forward.
Passes: ``fwd`` (no graph), ``fwd+bwd`` (grads of input, weight, bias), ``fwd+bwd+dbwd`` (grads
with create_graph, then the gradient of a function of those grads w.r.t. input, weight and the
upstream gradient: the second-order MAML pattern).
Run through ``benchmarks/inner_loop.py --what batchnorm`` or directly.

``--bn-host`` measures the host side instead: Python function calls (cProfile) and time per call of
``task_batch_norm`` on a tiny tensor (3, 2*4, 4, 4) with LeakyReLU, for the same three passes, where
the kernels cost little and the dispatch and autograd around them is what is timed. Calls are
counted in total and in the layers that run per op call (``mamlpp_ext/ops``, ``torch/_library``,
``torch/_ops.py``, ``torch/autograd/function.py``); the rest is ``torch.autograd.grad`` itself.
"""

from __future__ import annotations

import argparse

import torch

import timing  # benchmarks/ is on sys.path when run as a script or through inner_loop.py

PASSES = ("fwd", "fwd+bwd", "fwd+bwd+dbwd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("batchnorm benchmark")
    g.add_argument("--bn-dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"],
                   help="dtype of the activations (default float32)")
    g.add_argument("--bn-no-large", action="store_true", help="skip the large (N=256, 56x56) shape")
    g.add_argument("--bn-threads", type=int, default=None,
                   help="CPU threads for both paths (torch.set_num_threads; default: torch's)")
    g.add_argument("--bn-host", action="store_true",
                   help="host side: Python calls and time per call on a tiny tensor (see the docstring)")


def fused_bytes(numel: int, elem_size: int, pass_name: str, activation: bool) -> int | None:
    """Minimum memory traffic of the fused kernels, for the bandwidth column (None: not modelled).

    fwd: read x for the statistics, read x and write out; backward: read dy and x (and out with
    the activation) for the sums and again for dx, write dx.
    """
    fwd = 3
    bwd = 5 + (2 if activation else 0)
    per = {"fwd": fwd, "fwd+bwd": fwd + bwd}.get(pass_name)
    return None if per is None else per * numel * elem_size


def cases(include_large: bool = True):
    """(name, N, T, C, H) of every benchmark shape."""
    out = []
    for ways, n in (("5w1s", 5), ("20w1s", 20)):
        for h in (28, 14, 7, 3):
            out.append((f"omniglot-{ways}-{h}x{h}", n, 8, 64, h))
    if include_large:
        out.append(("large-56x56", 256, 1, 64, 56))
    return out


def _make(N, T, C, H, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T * C, H, H, generator=gen).to(device=device, dtype=dtype)
    w = (1 + 0.1 * torch.randn(C, generator=gen)).to(device=device, dtype=dtype)
    b = (0.1 * torch.randn(C, generator=gen)).to(device=device, dtype=dtype)
    gy = torch.randn(N, T * C, H, H, generator=gen).to(device=device, dtype=dtype)
    return x, w, b, gy


def _callable(fn, pass_name, x, w, b, gy, T, slope, rm, rv):
    kw = dict(step=2, training=True, negative_slope=slope)
    if pass_name == "fwd":
        def call():
            with torch.no_grad():
                return fn(x, T, w, b, rm, rv, **kw)
        return call
    xr, wr, br = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    if pass_name == "fwd+bwd":
        def call():
            y = fn(xr, T, wr, br, rm, rv, **kw)
            return torch.autograd.grad(y, (xr, wr, br), gy)
        return call
    gyr = gy.clone().requires_grad_()
    vx = torch.randn_like(x)
    vw = torch.randn_like(w)

    def call():
        y = fn(xr, T, wr, br, rm, rv, **kw)
        dx, dw, db = torch.autograd.grad(y, (xr, wr, br), gyr, create_graph=True)
        loss = (dx * vx).sum() + (dw * vw).sum() + db.sum()
        return torch.autograd.grad(loss, (xr, wr, gyr))
    return call


def run(args) -> list[dict]:
    import mamlpp_ext
    from mamlpp_ext.ops import reference as ref

    mamlpp_ext.require_extension("the batchnorm benchmark")
    from mamlpp_ext import ops

    device = torch.device(args.device)
    dtype = getattr(torch, getattr(args, "bn_dtype", "float32"))
    if getattr(args, "bn_threads", None):
        torch.set_num_threads(args.bn_threads)
    repeats = 10 if args.quick else 50
    rows = []
    for name, N, T, C, H in cases(not getattr(args, "bn_no_large", False)):
        numel = N * T * C * H * H
        x, w, b, gy = _make(N, T, C, H, device, dtype)
        reps = max(3, repeats // 10) if numel > 10_000_000 else repeats
        for slope in (None, 0.01):
            for pass_name in PASSES:
                if args.quick and numel > 10_000_000 and pass_name != "fwd+bwd":
                    continue
                calls = {}
                # One running-statistics table per implementation: both are updated in place.
                for impl, fn in (("plain", ref.task_batch_norm), ("fused", ops.task_batch_norm)):
                    rm = torch.zeros(5, C, device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
                    rv = torch.ones_like(rm)
                    calls[impl] = _callable(fn, pass_name, x, w, b, gy, T, slope, rm, rv)
                result = timing.interleaved_medians(calls, device, reps)
                plain_t, fused_t = result["plain"]["median"], result["fused"]["median"]
                moved = fused_bytes(numel, x.element_size(), pass_name, slope is not None)
                rows.append({
                    "fused_GBps": None if moved is None else moved / fused_t / 1e9,
                    "bench": "batchnorm", "case": name, "N": N, "T": T, "C": C, "H": H, "elements": numel,
                    "negative_slope": slope, "pass": pass_name, "device": str(device),
                    "dtype": str(dtype).split(".")[-1],
                    "plain_ms": plain_t * 1e3, "fused_ms": fused_t * 1e3, "speedup": plain_t / fused_t,
                    "runs": result["fused"]["runs"], "threads": torch.get_num_threads(),
                })
    if rows:
        largest = max(r["elements"] for r in rows)
        bw = timing.copy_bandwidth(device, largest, repeats=3 if args.quick else 10)
        for r in rows:
            r["copy_GBps"] = bw
            r["pct_of_copy_bw"] = None if r["fused_GBps"] is None else 100 * r["fused_GBps"] / bw
    return rows


HOST_LAYERS = ("mamlpp_ext/ops/", "torch/_library/", "torch/_ops.py", "torch/autograd/function.py")


def host_rows(args) -> list[dict]:
    """Python calls and host time per task_batch_norm call (tiny tensor, 1 thread), per pass."""
    import cProfile
    import pstats

    import mamlpp_ext

    mamlpp_ext.require_extension("the batchnorm host benchmark")
    from mamlpp_ext import ops

    torch.set_num_threads(1)
    N, T, C, H = 3, 2, 4, 4
    x, w, b, gy = _make(N, T, C, H, args.device, torch.float32)
    rm = torch.zeros(5, C, device=args.device)
    rv = torch.ones_like(rm)
    calls_per_sample = 100
    rows = []
    for pass_name in PASSES:
        fn = _callable(ops.task_batch_norm, pass_name, x, w, b, gy, T, 0.01, rm, rv)
        for _ in range(20):
            fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls_per_sample):
            fn()
        prof.disable()
        stats = pstats.Stats(prof).stats  # {(file, line, name): (prim calls, calls, ...)}
        total = sum(v[1] for v in stats.values())
        layers = sum(v[1] for k, v in stats.items() if any(part in k[0] for part in HOST_LAYERS))
        result = timing.interleaved_medians({"fused": fn}, args.device, 10 if args.quick else 200)
        rows.append({"bench": "batchnorm-host", "pass": pass_name, "N": N, "T": T, "C": C, "H": H,
                     "negative_slope": 0.01, "device": str(args.device), "threads": 1,
                     "python_calls_per_call": total / calls_per_sample,
                     "op_layer_calls_per_call": layers / calls_per_sample,
                     "host_us_per_call": result["fused"]["median"] * 1e6, "runs": result["fused"]["runs"]})
    return rows


HOST_COLUMNS = [("pass", "pass", ""), ("python_calls_per_call", "Python calls", ".1f"),
                ("op_layer_calls_per_call", "in op layers", ".1f"), ("host_us_per_call", "us per call", ".1f")]

COLUMNS = [("case", "case", ""), ("N", "N", "d"), ("T", "T", "d"), ("negative_slope", "slope", ""),
           ("pass", "pass", ""), ("plain_ms", "plain ms", ".3f"), ("fused_ms", "fused ms", ".3f"),
           ("speedup", "speed-up", ".2f"), ("fused_GBps", "fused GB/s", ".1f"),
           ("pct_of_copy_bw", "% copy BW", ".0f")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a short smoke run")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the rows and the machine to PATH")
    add_arguments(parser)
    args = parser.parse_args(argv)
    rows = host_rows(args) if args.bn_host else run(args)
    machine = timing.machine(args.device)
    print(f"# batchnorm {'host ' if args.bn_host else ''}benchmark on {machine}")
    timing.print_table(rows, HOST_COLUMNS if args.bn_host else COLUMNS)
    if args.json:
        import sys

        timing.write_json(args.json, {"machine": machine, "command": " ".join(sys.argv), "rows": rows})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
