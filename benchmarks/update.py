"""Benchmark of the fused LSLR inner-loop update (``mamlpp_ext.ops.lslr_update``) against the
per-tensor PyTorch reference (``mamlpp_ext.ops.reference.lslr_update``).

Cases: the Omniglot MAML++ network's 10 fast-weight tensors (SPEC §2) at T = 8 and T = 16 tasks,
and one list of 64M elements in total (bandwidth). Passes: forward (no autograd graph), and
forward + backward (params, grads and rates all require grad, as in second-order MAML).
Run through ``benchmarks/inner_loop.py --what update`` or directly.

``--vs-torch`` (CPU) instead compares the fused forward ops with the plain-PyTorch ways of doing
the same work on the Omniglot list (dense and task-broadcast params), at each thread count of
``--threads``: a loop of ``torch.sub(p, g, alpha=lr_k)``, ``torch._foreach_*`` variants, and for
``_lslr_scale`` / ``_lslr_dot`` their PyTorch counterparts. Times are interleaved medians; minor
page faults per call, bytes moved, GB/s and a same-size ``copy_`` are reported beside them, and the
load average before and after. ``--library PATH`` loads that build of the extension's ``_C``
library instead of importing ``mamlpp_ext`` (to time an older kernel; only the raw ops then).
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

import timing  # benchmarks/ is on sys.path when run as a script or through inner_loop.py

OMNIGLOT_SHAPES = [(64, 1, 3, 3), (64,), (64, 64, 3, 3), (64,), (64, 64, 3, 3), (64,),
                   (64, 64, 3, 3), (64,), (5, 64), (5,)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("update benchmark")
    g.add_argument("--update-large-elems", type=int, default=64 * 2**20,
                   help="total elements of the large list (default 64M)")


def _case(shapes, T, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn((T, *s), generator=gen, dtype=dtype).to(device) for s in shapes]
    grads = [torch.randn((T, *s), generator=gen, dtype=dtype).to(device) for s in shapes]
    lrs = torch.full((len(shapes), 5), 0.1, dtype=dtype, device=device)
    return params, grads, lrs


def _large_shapes(total: int):
    per = total // 16
    return [(per,)] * 15 + [(total - 15 * per,)]


def run(args) -> list[dict]:
    import mamlpp_ext
    from mamlpp_ext.ops import reference as ref

    mamlpp_ext.require_extension("the update benchmark")
    from mamlpp_ext import ops

    device = torch.device(args.device)
    dtype = torch.float32
    repeats = 10 if args.quick else 50
    rows = []
    cases = [("omniglot-10-tensors", OMNIGLOT_SHAPES, 8), ("omniglot-10-tensors", OMNIGLOT_SHAPES, 16),
             ("large-list", _large_shapes(args.update_large_elems), 1)]
    copy_bw = timing.copy_bandwidth(device, args.update_large_elems, max(3, repeats // 5))
    for name, shapes, T in cases:
        numel = T * sum(torch.Size(s).numel() for s in shapes)
        reps = max(3, repeats // 5) if numel > 10_000_000 else repeats
        params, grads, lrs = _case(shapes, T, device, dtype)
        up = [torch.randn_like(p) for p in params]
        for pass_name in ("fwd", "fwd+bwd"):
            result = {}
            for impl, fn in (("reference", ref.lslr_update), ("fused", ops.lslr_update)):
                if pass_name == "fwd":
                    def call(fn=fn):
                        with torch.no_grad():
                            return fn(params, grads, lrs, 3)
                    bytes_moved = 3 * numel * 4
                else:
                    p = [x.clone().requires_grad_() for x in params]
                    g = [x.clone().requires_grad_() for x in grads]
                    r = lrs.clone().requires_grad_()

                    def call(fn=fn, p=p, g=g, r=r):
                        out = fn(p, g, r, 3)
                        return torch.autograd.grad(out, p + g + [r], up)
                    # forward 3 + backward: d grads (read up, write) + d lrs (read up, grads)
                    bytes_moved = (3 + 2 + 2) * numel * 4
                result[impl] = timing.median_time(call, device, repeats=reps, warmup=3)
            ref_t, fused_t = result["reference"]["median"], result["fused"]["median"]
            rows.append({
                "bench": "update", "case": name, "T": T, "elements": numel, "pass": pass_name,
                "device": str(device), "reference_ms": ref_t * 1e3, "fused_ms": fused_t * 1e3,
                "speedup": ref_t / fused_t, "fused_GBps": bytes_moved / fused_t / 1e9,
                "pct_of_copy_bw": 100 * bytes_moved / fused_t / 1e9 / copy_bw,
            })
    for r in rows:
        r["copy_GBps"] = copy_bw
    return rows


COLUMNS = [("case", "case", ""), ("T", "T", "d"), ("elements", "elements", ",d"), ("pass", "pass", ""),
           ("reference_ms", "reference ms", ".3f"), ("fused_ms", "fused ms", ".3f"),
           ("speedup", "speed-up", ".2f"), ("fused_GBps", "fused GB/s", ".1f"),
           ("pct_of_copy_bw", "% copy BW", ".0f")]


def _faults_and_cpu_per_call(fn, calls: int) -> tuple[float, float]:
    """Minor page faults of the whole process and CPU seconds of the calling thread per fn() call
    (after one untimed call). At one intra-op thread all work runs on the calling thread, so its
    CPU time is the call's cost without the time spent descheduled by other load."""
    fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.thread_time()
    for _ in range(calls):
        fn()
    cpu = (time.thread_time() - t0) / calls
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls, cpu


def _vs_torch_impls(ops_entry, params, grads, lrs, step):
    """name -> (kind, fn) for the forward update, scale and dot, fused and plain PyTorch."""
    lr = lrs[:, step].tolist()       # host floats for the PyTorch calls, read once (not timed)
    neg_lr = [-x for x in lr]
    ops_raw = torch.ops.mamlpp_ext
    update = ops_entry or ops_raw.lslr_update.default
    return {
        "fused lslr_update": ("update", lambda: update(params, grads, lrs, step)),
        "torch.sub loop": ("update", lambda: [torch.sub(p, g, alpha=a) for p, g, a in zip(params, grads, lr)]),
        "_foreach_mul+_foreach_sub": ("update", lambda: torch._foreach_sub(params, torch._foreach_mul(grads, lr))),
        "_foreach_add(p, _foreach_mul(g, -lr))": (
            "update", lambda: torch._foreach_add(params, torch._foreach_mul(grads, neg_lr))),
        "_foreach_sub(alpha=one lr)*": ("update", lambda: torch._foreach_sub(params, grads, alpha=lr[0])),
        "fused _lslr_scale": ("scale", lambda: ops_raw._lslr_scale.default(grads, lrs, step, -0.5)),
        "_foreach_mul(g, lr)": ("scale", lambda: torch._foreach_mul(grads, lr)),
        "torch.mul loop": ("scale", lambda: [torch.mul(g, a) for g, a in zip(grads, lr)]),
        "fused _lslr_dot": ("dot", lambda: ops_raw._lslr_dot.default(params, grads, lrs, step, 1.0)),
        "torch.dot loop (float32 acc)*": ("dot", lambda: [torch.dot(p.reshape(-1), g.reshape(-1))
                                                          for p, g in zip(params, grads)]),
    }


def run_vs_torch(args) -> list[dict]:
    device = torch.device("cpu")
    ops_entry = None
    if args.library:
        torch.ops.load_library(args.library)
        library = os.path.abspath(args.library)
    else:
        import mamlpp_ext

        mamlpp_ext.require_extension("the update benchmark")
        from mamlpp_ext import ops

        ops_entry = ops.lslr_update
        library = os.path.abspath(mamlpp_ext._C.__file__)
    T, step = args.vs_torch_tasks, 3
    params, grads, lrs = _case(OMNIGLOT_SHAPES, T, device, torch.float32)
    gen = torch.Generator().manual_seed(1)
    lrs = torch.rand(lrs.shape, generator=gen) * 0.1  # a different rate per tensor
    theta = [torch.randn(s, generator=gen) for s in OMNIGLOT_SHAPES]
    bcast = [t.expand(T, *t.shape) for t in theta]
    numel = sum(p.numel() for p in params)
    row_numel = numel // T
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        copy_src = torch.randn(numel)
        copy_dst = torch.empty_like(copy_src)
        for params_kind, ps in (("dense", params), ("task-broadcast", bcast)):
            impls = _vs_torch_impls(ops_entry, ps, grads, lrs, step)
            if params_kind == "task-broadcast":  # torch.dot needs dense operands
                impls = {k: v for k, v in impls.items() if not k.startswith("torch.dot")}
            if args.impls:  # a subset, e.g. one implementation alone in the process
                impls = {k: v for k, v in impls.items() if any(w in k for w in args.impls)}
            fns = {k: fn for k, (_, fn) in impls.items()}
            if not args.impls or "copy" in args.impls:
                fns["copy_ (same size)"] = lambda: copy_dst.copy_(copy_src)
            load_before = os.getloadavg()
            with torch.no_grad():
                res = timing.interleaved_medians(fns, device, repeats=args.vs_torch_repeats, warmup=20,
                                                 rounds=10)
                faults_cpu = {k: _faults_and_cpu_per_call(fn, 100) for k, fn in fns.items()}
            load_after = os.getloadavg()
            p_bytes = (row_numel if params_kind == "task-broadcast" else numel) * 4
            traffic = {"update": p_bytes + 2 * numel * 4, "scale": 2 * numel * 4,
                       "dot": p_bytes + numel * 4, "copy": 2 * numel * 4}
            base = {kind: res[name]["median"] if name in res else float("nan") for kind, name in (
                ("update", "torch.sub loop"), ("scale", "torch.mul loop"), ("dot", "fused _lslr_dot"),
                ("copy", "copy_ (same size)"))}
            copy_GBps = traffic["copy"] / base["copy"] / 1e9
            for name, r in res.items():
                kind = impls[name][0] if name in impls else "copy"
                GBps = traffic[kind] / r["median"] / 1e9
                rows.append({
                    "bench": "update-vs-torch", "threads": threads, "params": params_kind, "T": T,
                    "elements": numel, "op": kind, "impl": name, "median_ms": r["median"] * 1e3,
                    "min_ms": r["min"] * 1e3, "runs": r["runs"],
                    "speedup_vs_torch": base[kind] / r["median"], "GBps": GBps,
                    "pct_of_copy": 100 * GBps / copy_GBps, "faults_per_call": faults_cpu[name][0],
                    "thread_cpu_ms": faults_cpu[name][1] * 1e3,
                    "load_before": round(load_before[0], 2), "load_after": round(load_after[0], 2),
                    "library": library, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                })
    return rows


VS_TORCH_COLUMNS = [("threads", "thr", "d"), ("params", "params", ""), ("op", "op", ""), ("impl", "impl", ""),
                    ("median_ms", "median ms", ".3f"), ("min_ms", "min ms", ".3f"),
                    ("speedup_vs_torch", "vs torch", ".2f"), ("GBps", "GB/s", ".1f"),
                    ("pct_of_copy", "% copy", ".0f"), ("faults_per_call", "faults/call", ".0f"),
                    ("thread_cpu_ms", "cpu ms", ".3f"),
                    ("load_before", "load0", ".2f"), ("load_after", "load1", ".2f")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--vs-torch", action="store_true",
                        help="CPU: fused forward ops against plain-PyTorch equivalents (see above)")
    parser.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                        help="--vs-torch: comma-separated intra-op thread counts (default 1,2)")
    parser.add_argument("--library", default=None,
                        help="--vs-torch: path of a built _C library to load instead of mamlpp_ext")
    parser.add_argument("--impls", type=lambda s: s.split(","), default=None,
                        help="--vs-torch: only implementations whose name contains one of these "
                             "comma-separated words (the same-size copy_ runs only if one is 'copy')")
    parser.add_argument("--vs-torch-tasks", type=int, default=8, help="--vs-torch: T (default 8)")
    parser.add_argument("--vs-torch-repeats", type=int, default=400,
                        help="--vs-torch: timed calls per implementation (default 400)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.vs_torch:
        rows = run_vs_torch(args)
        machine = timing.machine("cpu")
        print(f"# update vs torch on {machine}; library {rows[0]['library'] if rows else '-'}; "
              f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
        print("# vs torch: update vs the torch.sub loop, scale vs the torch.mul loop, dot vs fused dot; "
              "* = not the same computation (one rate for all tensors / float32 accumulation)")
        timing.print_table(rows, VS_TORCH_COLUMNS)
        if args.json:
            timing.write_json(args.json, {"machine": machine, "command": "python benchmarks/update.py "
                                          + " ".join(argv if argv is not None else os.sys.argv[1:]),
                                          "rows": rows})
        return
    rows = run(args)
    print(f"# update benchmark on {timing.machine(args.device)}")
    timing.print_table(rows, COLUMNS)
    if args.json:
        timing.write_json(args.json, {"machine": timing.machine(args.device), "rows": rows})


if __name__ == "__main__":
    main()
