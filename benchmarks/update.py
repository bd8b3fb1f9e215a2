"""Benchmark of the fused LSLR inner-loop update (``mamlpp_ext.ops.lslr_update``) against the
per-tensor PyTorch reference (``mamlpp_ext.ops.reference.lslr_update``).

Cases: the Omniglot MAML++ network's 10 fast-weight tensors (SPEC §2) at T = 8 and T = 16 tasks,
and one list of 64M elements in total (bandwidth). Passes: forward (no autograd graph), and
forward + backward (params, grads and rates all require grad, as in second-order MAML).
Run through ``benchmarks/inner_loop.py --what update`` or directly.
"""

from __future__ import annotations

import argparse

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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    add_arguments(parser)
    args = parser.parse_args(argv)
    rows = run(args)
    print(f"# update benchmark on {timing.machine(args.device)}")
    timing.print_table(rows, COLUMNS)
    if args.json:
        timing.write_json(args.json, {"machine": timing.machine(args.device), "rows": rows})


if __name__ == "__main__":
    main()
