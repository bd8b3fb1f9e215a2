"""The compiled training step (NOTE [Compiled step] in mamlpp_ext/model/compiled.py), measured.

Subcommands (each prints a table; ``--json PATH`` writes the rows):

* ``agree`` — the gate of the compiled step: the loss and every meta-gradient of one training
  step, eager float32 and compiled float32, each against an eager float64 reference from the
  same state and batch (relative error ‖g − g64‖ / ‖g64‖ per tensor). Tensors whose float64
  gradient is ~0 (the bias of a convolution in front of a batch norm: the batch norm removes any
  per-channel shift, so the exact gradient is 0 and both float32 runs return rounding noise) are
  listed as null and measured against the largest gradient's norm instead. The compiled step
  ships only if every non-null error is <= 1e-4. ``--layout-optimization`` turns inductor's
  layout optimization back on (the probe's drift, 2026-12-03).
* ``bisect`` — where a drift comes from: the traced graph cut into ``--chunks`` consecutive
  pieces, each compiled alone and fed the eager float32 values of its inputs; its outputs
  are compared with the same piece run eagerly in float32 and in float64 on those inputs
  (local error, compiled vs eager). Integer outputs (max-pool indices) count mismatches.
* ``ties`` — max-pool ties and LeakyReLU kinks: how many pooling windows of the first stage hold
  tied maxima and how many activations sit exactly at 0 on the batch, and whether the compiled
  max-pool (forward, backward, double backward) and LeakyReLU (at 0) give bit-identical
  results to eager on them.
* ``kernels`` — per meta-step, the compiled graph's generated kernels and extern calls (parsed
  from inductor's output code) plus the eager ops around it (Adam, gradient bookkeeping),
  beside the eager step's compute ops (non-view ops, ``host.OpCounter``).
* ``time`` — CPU seconds per training step, eager and compiled (interleaved medians; a
  report, not a gate), and the compile time of the first step (cold or warm cache, as found).

Cases: ``small`` (Omniglot 5-way 1-shot shapes with 8 filters, 2 tasks, 1 inner step: a
two-minute compile here), ``small5`` (the same with 5 steps), ``preset`` (omniglot-5way-1shot as
published: 64 filters, 8 tasks, 5 steps), or any preset name. Data: a real Omniglot batch,
binary as the public code resizes it (``--data omniglot``, the default when the dataset is
found), else binary random images (``--data binary``: ties and kinks as Omniglot's) or uniform
ones (``--data uniform``).

Inductor's cache lives in ``$TORCHINDUCTOR_CACHE_DIR``; a cold compile of the preset's graph takes
minutes on a 2-core CPU, a warm one seconds.

    python benchmarks/compiled_step.py agree --case small --backends batched,fused
    python benchmarks/compiled_step.py bisect --case small --layout-optimization
"""

from __future__ import annotations

import argparse
import contextlib
import operator
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timing  # noqa: E402

from mamlpp_ext.model import MAMLPlusPlus, from_preset  # noqa: E402
from mamlpp_ext.model import compiled as compiled_mode  # noqa: E402
from mamlpp_ext.model.schedules import epoch_plan  # noqa: E402

CASES = {
    "small": ("omniglot-5way-1shot", dict(num_filters=8, meta_batch=2, inner_steps=1, eval_inner_steps=1)),
    "small5": ("omniglot-5way-1shot", dict(num_filters=8, meta_batch=2)),
    "preset": ("omniglot-5way-1shot", {}),
}
GATE = 1e-4
NULL = 1e-9  # a float64 gradient below NULL x the largest one is ~0


def config_of(case: str, tasks: int | None = None):
    preset, over = CASES.get(case, (case, {}))
    cfg = from_preset(preset).replace(**over)
    return cfg.replace(meta_batch=tasks) if tasks else cfg


def batch_of(cfg, data: str, seed: int = 0):
    """(sx, sy, qx, qy) float32/int64 on the CPU."""
    if data == "omniglot":
        from mamlpp_ext.data.loader import omniglot_episodes

        eps = omniglot_episodes(cfg.ways, cfg.shots, cfg.queries, cfg.meta_batch, binary_resize=True,
                                progress=False, seed=seed)
        return tuple(eps["train"][0])
    g = torch.Generator().manual_seed(seed)
    T = cfg.meta_batch

    def labels(per_class):
        base = torch.arange(cfg.ways).repeat_interleave(per_class)
        return torch.stack([base[torch.randperm(len(base), generator=g)] for _ in range(T)])

    sy, qy = labels(cfg.shots), labels(cfg.queries)

    def images(n):
        x = torch.rand(T, n, *cfg.image_shape, generator=g)
        return (x > 0.15).float() if data == "binary" else x

    return images(sy.shape[1]), sy, images(qy.shape[1]), qy


def default_data() -> str:
    try:
        from mamlpp_ext.data import resolve_omniglot_root

        resolve_omniglot_root()
        return "omniglot"
    except Exception:
        return "binary"


@contextlib.contextmanager
def layout_optimization(on: bool):
    before = dict(compiled_mode.INDUCTOR_OPTIONS)
    compiled_mode.INDUCTOR_OPTIONS["layout_optimization"] = bool(on)
    try:
        yield
    finally:
        compiled_mode.INDUCTOR_OPTIONS.clear()
        compiled_mode.INDUCTOR_OPTIONS.update(before)


def one_step(learner, batch, plan):
    """[loss] + meta-gradients (zeros where none) + running statistics after one forward_backward."""
    sx, sy, qx, qy = batch
    metrics = learner.step.forward_backward(sx.to(learner.dtype), sy, qx.to(learner.dtype), qy, plan)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in learner.parameters()]
    return [metrics[0].detach().clone()] + grads + [t.detach().clone() for t in learner.running_stats]


def rel(a, r) -> float:
    a, r = a.double(), r.double()
    return float((a - r).norm() / r.norm()) if r.norm() > 0 else float((a - r).norm())


# ------------------------------------------------------------------------------------ agree
def agree(args) -> list[dict]:
    rows = []
    for backend in args.backends.split(","):
        cfg = config_of(args.case, args.tasks)
        batch = batch_of(cfg, args.data)
        for epoch in [int(e) for e in args.epochs.split(",")]:
            plan = epoch_plan(cfg, epoch)
            l64 = MAMLPlusPlus(cfg, backend=backend, dtype=torch.float64)
            base = l64.state_dict()
            ref = one_step(l64, batch, plan)
            l32 = MAMLPlusPlus(cfg, backend=backend)
            l32.load_state_dict(base)
            eager = one_step(l32, batch, plan)
            with layout_optimization(args.layout_optimization):
                lc = MAMLPlusPlus(cfg, backend=backend, compile=True)
                lc.load_state_dict(base)
                t0 = time.perf_counter()
                comp = one_step(lc, batch, plan)
                first = time.perf_counter() - t0
            names = ["loss"] + [n for n, _ in l32.named_parameters()]
            names += [f"running_{k}[{i}]" for k in ("mean", "var") for i in range(len(l32.running_mean))]
            scale = max(float(g.double().norm()) for g in ref[1:len(l32.parameters()) + 1])
            worst = {"eager": 0.0, "compiled": 0.0}
            P = len(l32.parameters())
            for i, (name, r, e, c) in enumerate(zip(names, ref, eager, comp)):
                null = 1 <= i <= P and float(r.double().norm()) < NULL * scale
                if null:
                    ee, cc = float((e.double() - r).norm()) / scale, float((c.double() - r).norm()) / scale
                else:
                    ee, cc = rel(e, r), rel(c, r)
                    worst["eager"], worst["compiled"] = max(worst["eager"], ee), max(worst["compiled"], cc)
                rows.append(dict(case=args.case, backend=backend, epoch=epoch, tensor=name,
                                 kind="null (vs largest)" if null else "relative", eager_fp32=ee, compiled_fp32=cc,
                                 ratio=cc / ee if ee > 0 else float("nan")))
            rows.append(dict(case=args.case, backend=backend, epoch=epoch, tensor="WORST (non-null)",
                             kind=f"gate {GATE:g}: {'pass' if worst['compiled'] <= GATE else 'FAIL'}",
                             eager_fp32=worst["eager"], compiled_fp32=worst["compiled"],
                             ratio=worst["compiled"] / max(worst["eager"], 1e-30)))
            print(f"{args.case}/{backend}/epoch {epoch}: first compiled step {first:.1f} s "
                  f"(trace + compile or cache load); layout_optimization={args.layout_optimization}", flush=True)
    timing.print_table(rows, [("backend", "backend", "s"), ("epoch", "epoch", "d"), ("tensor", "tensor", "s"),
                              ("kind", "error", "s"), ("eager_fp32", "eager fp32", ".2e"),
                              ("compiled_fp32", "compiled fp32", ".2e"), ("ratio", "ratio", ".2f")])
    return rows


# ------------------------------------------------------------------------------------ bisect
def record(gm, inputs) -> dict:
    env = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            env[n.name] = out = super().run_node(n)
            return out

    Recorder(gm).run(*inputs)
    return env


def chunk(gm, lo: int, hi: int):
    """Nodes [lo, hi) of gm (not cutting a multi-output op from its getitems) as a graph whose
    inputs are the values it reads from outside and whose outputs are the tensors read after it."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    while lo < len(nodes) and nodes[lo].target is operator.getitem:
        lo += 1
    while hi < len(nodes) and nodes[hi].target is operator.getitem:
        hi += 1
    inside = nodes[lo:hi]
    inset = set(inside)
    g = torch.fx.Graph()
    env, ext = {}, []

    def arg(a):
        if a not in env:
            env[a] = g.placeholder(a.name)
            ext.append(a.name)
        return env[a]

    for n in inside:
        env[n] = g.node_copy(n, lambda a: env[a] if a in env else arg(a))
    outs = [n for n in inside if any(u not in inset for u in n.users) and isinstance(n.meta.get("val"), torch.Tensor)]
    g.output(tuple(env[n] for n in outs))
    return torch.fx.GraphModule(gm, g), ext, [n.name for n in outs], (lo, hi)


def traced(learner, batch, plan):
    step = learner.step
    inputs = (*learner.parameters(), *learner.running_stats, batch[0].to(learner.dtype), batch[1],
              batch[2].to(learner.dtype), batch[3], step.loss_weights(plan.loss_weights))
    return step.trace(inputs, plan), inputs


def bisect(args) -> list[dict]:
    from torch._inductor.compile_fx import compile_fx

    cfg = config_of(args.case, args.tasks)
    batch = batch_of(cfg, args.data)
    plan = epoch_plan(cfg, 0)
    backend = args.backends.split(",")[0]
    l32 = MAMLPlusPlus(cfg, backend=backend, compile=True)
    l64 = MAMLPlusPlus(cfg, backend=backend, dtype=torch.float64, compile=True)
    l64.load_state_dict(l32.state_dict())
    g32, in32 = traced(l32, batch, plan)
    g64, _ = traced(l64, batch, plan)
    if [n.target for n in g32.graph.nodes] != [n.target for n in g64.graph.nodes]:
        raise SystemExit("the float32 and float64 graphs differ")
    env = record(g32, [t.detach().clone() for t in in32])
    N = sum(1 for n in g32.graph.nodes if n.op not in ("placeholder", "output"))
    if args.lo is not None:
        bounds = [(args.lo, args.hi)]
    else:
        bounds = [(N * i // args.chunks, N * (i + 1) // args.chunks) for i in range(args.chunks)]

    def cast(v):
        return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    rows = []
    options = dict(compiled_mode.INDUCTOR_OPTIONS, layout_optimization=args.layout_optimization)
    for lo, hi in bounds:
        c32, ext, outs, span = chunk(g32, lo, hi)
        c64, ext64, outs64, _ = chunk(g64, lo, hi)
        ins = [env[e] for e in ext]
        ref = c64(*[cast(x.clone()) for x in ins])
        eager = c32(*[x.clone() for x in ins])
        with torch._inductor.config.patch(options):
            fn = compile_fx(c32, [x.clone() for x in ins])
        got = fn(*[x.clone() for x in ins])
        for name, r, e, c in zip(outs, ref, eager, got):
            if r.is_floating_point():
                ee, cc = rel(e, r), rel(c, r)
            else:
                ee, cc = float((e != r).sum()), float((c != r).sum())
            rows.append(dict(span=f"[{span[0]},{span[1]})", node=name, shape=str(tuple(r.shape)), eager_fp32=ee,
                             compiled_fp32=cc, ratio=cc / ee if ee > 0 else (float("inf") if cc > 0 else 1.0)))
    rows.sort(key=lambda r: -r["ratio"] if r["ratio"] == r["ratio"] else 0)
    timing.print_table(rows[:args.top], [("span", "nodes", "s"), ("node", "output", "s"), ("shape", "shape", "s"),
                                         ("eager_fp32", "eager local", ".2e"),
                                         ("compiled_fp32", "compiled local", ".2e"), ("ratio", "ratio", ".2f")])
    return rows


# ------------------------------------------------------------------------------------ ties
def ties(args) -> list[dict]:
    import torch.nn.functional as F

    cfg = config_of(args.case, args.tasks)
    sx = batch_of(cfg, args.data)[0]
    learner = MAMLPlusPlus(cfg, backend="batched")
    T, B = sx.shape[:2]
    x = sx.transpose(0, 1).reshape(B, T * cfg.image_channels, *cfg.image_shape[1:])
    w = torch.cat([learner.theta[0]] * T)
    h = F.conv2d(x, w, torch.cat([learner.theta[1]] * T), padding=1, groups=T)
    h = F.batch_norm(h, None, None, training=True)
    windows = h.unfold(2, 2, 2).unfold(3, 2, 2).reshape(*h.shape[:2], -1, 4)
    top = windows.max(-1, keepdim=True).values
    tied = int(((windows == top).sum(-1) > 1).sum())
    zeros = int((h == 0).sum())
    rows = [dict(check="pool windows with tied maxima (stage 1)", value=f"{tied} of {windows[..., 0].numel()}"),
            dict(check="activations exactly 0 at the LeakyReLU (stage 1)", value=f"{zeros} of {h.numel()}")]

    def pool_chain(h, g, gg):
        h = h.detach().requires_grad_()
        out, idx = F.max_pool2d_with_indices(h, 2, 2)
        (dh,) = torch.autograd.grad(out, h, g, create_graph=True)
        (ddh,) = torch.autograd.grad(dh, h, gg, allow_unused=True, create_graph=False)
        gout = torch.autograd.grad(dh, g, gg)[0] if g.requires_grad else None
        return out, idx, dh, gout if gout is not None else torch.zeros(()), ddh if ddh is not None else torch.zeros(())

    gen = torch.Generator().manual_seed(1)
    g = torch.randn(*h.shape[:2], h.shape[2] // 2, h.shape[3] // 2, generator=gen).requires_grad_()
    gg = torch.randn(h.shape, generator=gen)
    e = pool_chain(h, g, gg)
    c = torch.compile(pool_chain, backend="inductor", fullgraph=False)(h, g, gg)
    same = all(torch.equal(a, b) for a, b in zip(e, c))
    rows.append(dict(check="compiled max-pool: values, indices, backward, double backward bit-identical",
                     value=str(same)))

    def kink(z, g, gg, slope):
        z = z.detach().requires_grad_()
        y = F.leaky_relu(z, slope)
        (dz,) = torch.autograd.grad(y, z, g, create_graph=True)
        (dg,) = torch.autograd.grad(dz, g, gg)
        return y, dz, dg

    z = h.clone()
    z.view(-1)[::7] = 0.0  # more exact kinks
    gk = torch.randn(z.shape, generator=gen).requires_grad_()
    e = kink(z, gk, gg, cfg.leaky_relu_slope)
    c = torch.compile(kink, backend="inductor")(z, gk, gg, cfg.leaky_relu_slope)
    same = all(torch.equal(a, b) for a, b in zip(e, c))
    rows.append(dict(check=f"compiled LeakyReLU at {int((z == 0).sum())} exact zeros: bit-identical", value=str(same)))
    timing.print_table(rows, [("check", "check", "s"), ("value", "result", "s")])
    return rows


# ------------------------------------------------------------------------------------ kernels
def parse_kernels(code: str) -> dict:
    """Kernel launches and extern calls in the ``call`` function of inductor's output code."""
    kernels = set(re.findall(r"^(\w+) = async_compile\.\w+\(", code, re.M))
    body = code[code.index("def call("):] if "def call(" in code else code
    launches = sum(len(re.findall(rf"\b{k}(?:\.run)?\(", body)) for k in kernels)
    externs = re.findall(r"\b(extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?|aten\.\w+(?:\.\w+)?)\(", body)
    copies = len(re.findall(r"\.copy_\(", body))
    by: dict[str, int] = {}
    for e in externs:
        by[e] = by.get(e, 0) + 1
    return dict(generated=launches, extern=len(externs) + copies, distinct_kernels=len(kernels), externs_by=by,
                copies=copies)


def kernels(args) -> list[dict]:
    from torch._inductor.graph import GraphLowering

    import host

    rows = []
    for backend in args.backends.split(","):
        for tasks in [int(t) for t in args.task_counts.split(",")]:
            cfg = config_of(args.case, tasks)
            batch = batch_of(cfg, "uniform" if args.data == "omniglot" else args.data)
            plan = epoch_plan(cfg, 0)
            eager = MAMLPlusPlus(cfg, backend=backend)
            eager.meta_step(*batch, epoch=0)
            counter = host.OpCounter()
            with counter:
                eager.meta_step(*batch, epoch=0)
            codes: list[str] = []
            lc = MAMLPlusPlus(cfg, backend=backend, compile=True)
            before = GraphLowering.save_output_code
            GraphLowering.save_output_code = staticmethod(codes.append)
            try:
                lc.meta_step(*batch, epoch=0)
            finally:
                GraphLowering.save_output_code = before
            k = parse_kernels(codes[-1]) if codes else dict(generated=None, extern=None, distinct_kernels=None)
            around = host.OpCounter()  # the eager ops around the compiled graph (Adam, .grad bookkeeping)
            with around:
                lc.step.outer_update()
            total = None if k["generated"] is None else k["generated"] + k["extern"] + around.compute
            rows.append(dict(case=args.case, backend=backend, tasks=tasks, plan=f"MSL {plan.score_every_step}, "
                             f"second order {plan.second_order}", eager_compute_ops=counter.compute,
                             generated=k["generated"], extern=k["extern"], around=around.compute, compiled_total=total,
                             ratio=None if total is None else total / counter.compute,
                             externs_by=k.get("externs_by")))
    timing.print_table(rows, [("backend", "backend", "s"), ("tasks", "T", "d"),
                              ("eager_compute_ops", "eager compute ops", "d"), ("generated", "generated kernels", "d"),
                              ("extern", "extern calls", "d"), ("around", "eager ops around", "d"),
                              ("compiled_total", "compiled total", "d"), ("ratio", "compiled/eager", ".2f")])
    if args.verbose:
        for r in rows:
            print(r["backend"], r["tasks"], r["externs_by"])
    return rows


# ------------------------------------------------------------------------------------ time
def time_steps(args) -> list[dict]:
    rows = []
    for backend in args.backends.split(","):
        cfg = config_of(args.case, args.tasks)
        batch = batch_of(cfg, args.data)
        eager = MAMLPlusPlus(cfg, backend=backend)
        comp = MAMLPlusPlus(cfg, backend=backend, compile=True)
        t0 = time.perf_counter()
        comp.meta_step(*batch, epoch=0)
        first = time.perf_counter() - t0
        res = timing.interleaved_medians({"eager": lambda: eager.meta_step(*batch, epoch=0),
                                          "compiled": lambda: comp.meta_step(*batch, epoch=0)},
                                         "cpu", repeats=args.repeats, warmup=1)
        rows.append(dict(case=args.case, backend=backend, threads=torch.get_num_threads(),
                         eager_s=res["eager"]["median"], compiled_s=res["compiled"]["median"],
                         speedup=res["eager"]["median"] / res["compiled"]["median"], first_step_s=first))
    timing.print_table(rows, [("case", "case", "s"), ("backend", "backend", "s"), ("threads", "threads", "d"),
                              ("eager_s", "eager s/step", ".3f"), ("compiled_s", "compiled s/step", ".3f"),
                              ("speedup", "eager/compiled", ".2f"), ("first_step_s", "first step s", ".1f")])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("agree", "bisect", "ties", "kernels", "time"))
    p.add_argument("--case", default="small", help=f"{', '.join(CASES)} or a preset name (default small)")
    p.add_argument("--tasks", type=int, default=None, help="meta-batch size (default: the case's)")
    p.add_argument("--backends", default="batched,fused")
    p.add_argument("--data", choices=("omniglot", "binary", "uniform"), default=None)
    p.add_argument("--epochs", default="0", help="agree: comma-separated epochs (MSL/DA phases)")
    p.add_argument("--layout-optimization", action="store_true",
                   help="compile with inductor's layout optimization on (its default; off in the shipped step)")
    p.add_argument("--chunks", type=int, default=6, help="bisect: pieces")
    p.add_argument("--lo", type=int, default=None, help="bisect: first node of one piece")
    p.add_argument("--hi", type=int, default=None, help="bisect: end of that piece")
    p.add_argument("--top", type=int, default=20, help="bisect: rows shown")
    p.add_argument("--task-counts", default="2,8", help="kernels: comma-separated meta-batch sizes")
    p.add_argument("--repeats", type=int, default=5, help="time: timed steps per mode")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    args.data = args.data or default_data()
    rows = {"agree": agree, "bisect": bisect, "ties": ties, "kernels": kernels, "time": time_steps}[args.what](args)
    if args.json:
        timing.write_json(args.json, {"machine": timing.machine("cpu"), "what": args.what, "case": args.case,
                                      "data": args.data, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
