"""Benchmark of the task-batched convolution (``mamlpp_ext.ops.task_conv2d``) against ATen's
grouped convolution on the same layout (``mamlpp_ext.ops.reference.task_conv2d``: ``F.conv2d``
with the (T*C_out, ...) weight and groups = T).

Two parts:

* ``ops`` (device independent): the ops one conv layer dispatches in the forward, the backward
  with ``create_graph`` and the second-order (double) backward of the MAML++ pattern (the input,
  weight and bias gradients taken with create_graph, then a function of them differentiated w.r.t.
  input, weight and bias), at T = 2, 8 and 32. ``ops``/``compute``/``conv``: ops counted by a
  ``TorchDispatchMode`` below autograd (as ``benchmarks/host.py`` counts a meta-step): all, non-view,
  and convolution ops (ATen's convolution ops or ours); ``aten_conv_calls``: ATen convolution entry
  points (``aten::convolution``, ``aten::_convolution``, ``aten::convolution_backward``, outermost
  only) seen by the profiler, including the ones our ops make inside their kernels — the
  convolution calls that reach the device either way.
* ``time``: median milliseconds of ``fwd`` (no graph), ``fwd+bwd`` and ``fwd+bwd+dbwd`` (the
  pattern above) per layer, ours vs ATen's, interleaved rounds after a warm-up, at the public
  layer shapes: Omniglot (T = 8, 64 filters, 28/14/7/3, N = 5 or 20 support images per task) and
  mini-ImageNet (T = 2, 48 filters, 84/42/21/10, N = 5 support, 75 query images per task).

Run through ``benchmarks/inner_loop.py --what task-conv`` or directly::

    python benchmarks/task_conv.py --tc-part ops
    python benchmarks/task_conv.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import timing  # benchmarks/ is on sys.path when run as a script or through inner_loop.py

PASSES = ("fwd", "fwd+bwd", "fwd+bwd+dbwd")
COUNT_TASKS = (2, 8, 32)
ATEN_CONV_ENTRIES = ("aten::convolution", "aten::_convolution", "aten::convolution_backward")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("task-conv benchmark")
    g.add_argument("--tc-part", default="all", choices=["all", "ops", "time"],
                   help="op counts (device independent), timings, or both (default)")
    g.add_argument("--tc-dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    g.add_argument("--tc-threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    g.add_argument("--tc-cases", default="", metavar="SUBSTRING",
                   help="time only the layers whose name contains SUBSTRING (e.g. omniglot-5w1s)")


def layer_cases():
    """(name, N, T, C_in, C_out, H) of the timed layers."""
    out = []
    for ways, n in (("5w1s", 5), ("20w1s", 20)):
        for c_in, h in ((1, 28), (64, 14), (64, 7), (64, 3)):
            out.append((f"omniglot-{ways}-{c_in}x{h}x{h}", n, 8, c_in, 64, h))
    for part, n in (("support", 5), ("query", 75)):
        for c_in, h in ((3, 84), (48, 42), (48, 21), (48, 10)):
            out.append((f"mini-imagenet-5w1s-{part}-{c_in}x{h}x{h}", n, 2, c_in, 48, h))
    return out


def _make(N, T, C_in, C_out, H, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    x = cast(torch.randn(N, T * C_in, H, H, generator=gen))
    w = cast(torch.randn(T, C_out, C_in, 3, 3, generator=gen) * (2.0 / (9 * C_in)) ** 0.5)
    b = cast(0.1 * torch.randn(T, C_out, generator=gen))
    return x, w, b


def _callable(conv, pass_name, x, w, b):
    """One pass of one conv layer (3x3, stride 1, padding 1, as in the VGG network)."""
    if pass_name == "fwd":
        def call():
            with torch.no_grad():
                return conv(x, w, b, 1, 1)
        return call
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    if pass_name == "fwd+bwd":
        def call():
            y = conv(xr, wr, br, 1, 1)
            return torch.autograd.grad(y, (xr, wr, br), torch.ones_like(y))
        return call

    def call():
        y = conv(xr, wr, br, 1, 1)
        gx, gw, gb = torch.autograd.grad((y * y).sum(), (xr, wr, br), create_graph=True)
        return torch.autograd.grad((gx * gx).sum() + (gw * gw).sum() + (gb * gb).sum(), (xr, wr, br))
    return call


# ---------------------------------------------------------------------------------------------
# Op counts
# ---------------------------------------------------------------------------------------------

class OpCounter(TorchDispatchMode):
    """Ops reaching the dispatch-mode layer (below autograd); ops of ours are counted as one."""

    def __init__(self):
        super().__init__()
        self.ops = self.compute = self.conv = 0
        self.by_name: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if not func.is_view:
            self.compute += 1
        name = str(func.overloadpacket)
        if "conv" in name:
            self.conv += 1
        self.by_name[name] = self.by_name.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def aten_conv_calls(fn) -> int:
    """Outermost ATen convolution entry points that fn() runs (the profiler sees the calls made
    inside our ops' kernels too)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    count = 0
    for evt in prof.events():
        if evt.name not in ATEN_CONV_ENTRIES:
            continue
        parent, nested = evt.cpu_parent, False
        while parent is not None:
            if parent.name in ATEN_CONV_ENTRIES:
                nested = True
                break
            parent = parent.cpu_parent
        count += not nested
    return count


def count_layer(conv, T: int, device, dtype) -> list[dict]:
    """Counts per phase of one Omniglot stage-2 layer (N=5, 64 -> 64, 14x14) at T tasks."""
    x, w, b = _make(5, T, 64, 64, 14, device, dtype)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    state: dict = {}

    def forward():
        state["y"] = conv(xr, wr, br, 1, 1)

    def backward():
        y = state["y"]
        state["g"] = torch.autograd.grad((y * y).sum(), (xr, wr, br), create_graph=True)

    def double_backward():
        gx, gw, gb = state["g"]
        torch.autograd.grad((gx * gx).sum() + (gw * gw).sum() + (gb * gb).sum(), (xr, wr, br))

    rows = []
    for phase, fn in (("forward", forward), ("backward", backward), ("double backward", double_backward)):
        # The loss's own ops (mul, sum, their backward) are counted too, alike for both.
        counter = OpCounter()
        with counter:
            fn()
        rows.append(dict(phase=phase, ops=counter.ops, compute=counter.compute, conv=counter.conv,
                         by_name=counter.by_name))
    # ATen convolution calls of each phase, from the same graph state (run again, profiled).
    forward()
    rows[0]["aten_conv_calls"] = aten_conv_calls(forward)
    rows[1]["aten_conv_calls"] = aten_conv_calls(backward)
    rows[2]["aten_conv_calls"] = aten_conv_calls(double_backward)
    return rows


def count_rows(device, dtype) -> list[dict]:
    from mamlpp_ext import ops
    from mamlpp_ext.ops import reference as ref

    rows = []
    for impl, conv in (("aten grouped", ref.task_conv2d), ("task_conv", ops.task_conv2d)):
        for T in COUNT_TASKS:
            for r in count_layer(conv, T, device, dtype):
                rows.append(dict(bench="task-conv-ops", impl=impl, T=T, device=str(device),
                                 dtype=str(dtype).split(".")[-1], **r))
    return rows


# ---------------------------------------------------------------------------------------------
# Timings
# ---------------------------------------------------------------------------------------------

def time_rows(args, device, dtype) -> list[dict]:
    from mamlpp_ext import ops
    from mamlpp_ext.ops import reference as ref

    repeats = 5 if args.quick else 50
    rows = []
    for name, N, T, C_in, C_out, H in layer_cases():
        if getattr(args, "tc_cases", "") not in name:
            continue
        x, w, b = _make(N, T, C_in, C_out, H, device, dtype)
        for pass_name in PASSES:
            calls = {"aten": _callable(ref.task_conv2d, pass_name, x, w, b),
                     "ours": _callable(ops.task_conv2d, pass_name, x, w, b)}
            result = timing.interleaved_medians(calls, device, repeats, warmup=1 if args.quick else 3,
                                                rounds=1 if args.quick else 5)
            aten_t, ours_t = result["aten"]["median"], result["ours"]["median"]
            rows.append(dict(bench="task-conv-time", case=name, N=N, T=T, C_in=C_in, C_out=C_out, H=H,
                             pass_=pass_name, device=str(device), dtype=str(dtype).split(".")[-1],
                             aten_ms=aten_t * 1e3, ours_ms=ours_t * 1e3, speedup=aten_t / ours_t,
                             runs=result["ours"]["runs"], threads=torch.get_num_threads()))
    return rows


COUNT_COLUMNS = [("impl", "impl", ""), ("T", "T", "d"), ("phase", "phase", ""), ("ops", "ops", "d"),
                 ("compute", "compute ops", "d"), ("conv", "conv ops", "d"),
                 ("aten_conv_calls", "ATen conv calls", "d")]
TIME_COLUMNS = [("case", "case", ""), ("N", "N", "d"), ("T", "T", "d"), ("pass_", "pass", ""),
                ("aten_ms", "ATen ms", ".3f"), ("ours_ms", "ours ms", ".3f"), ("speedup", "speed-up", ".2f")]
# inner_loop.py prints one table per section: the timing columns plus the count columns.
COLUMNS = [("bench", "bench", "")] + TIME_COLUMNS + COUNT_COLUMNS


def run(args) -> list[dict]:
    import mamlpp_ext

    mamlpp_ext.require_extension("the task-conv benchmark")
    device = torch.device(args.device)
    dtype = getattr(torch, getattr(args, "tc_dtype", "float32"))
    if getattr(args, "tc_threads", None):
        torch.set_num_threads(args.tc_threads)
    part = getattr(args, "tc_part", "all")
    rows = []
    if part in ("all", "ops"):
        rows += count_rows(device, dtype)
    if part in ("all", "time"):
        rows += time_rows(args, device, dtype)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (few repeats)")
    parser.add_argument("--json", default=None, metavar="PATH")
    add_arguments(parser)
    args = parser.parse_args(argv)
    rows = run(args)
    counts = [r for r in rows if r["bench"] == "task-conv-ops"]
    times = [r for r in rows if r["bench"] == "task-conv-time"]
    machine = timing.machine(args.device)
    print(f"# task-conv benchmark, {machine}")
    if counts:
        print("\n## ops of one conv layer (Omniglot stage 2, N=5, 64->64, 14x14), per phase")
        timing.print_table(counts, COUNT_COLUMNS)
    if times:
        print(f"\n## time per layer, {times[0]['device']}, {times[0]['dtype']}, {times[0]['threads']} threads")
        timing.print_table(times, TIME_COLUMNS)
    if args.json:
        for r in counts:
            r.pop("by_name", None)
        timing.write_json(args.json, {"machine": machine, "command": " ".join(sys.argv), "rows": rows})
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
