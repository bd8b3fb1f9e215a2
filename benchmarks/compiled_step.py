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
# NOTE [Branch-matched reference]
#     A float32 and a float64 run of the same step do not always take the same branches: where two
#     values of a max-pool window are within rounding of each other, or an activation is within
#     rounding of LeakyReLU's kink, the two precisions may pick a different index or slope, and
#     the gradient flows elsewhere. In the inner loop such a flip changes an update, so later
#     forwards differ by more than rounding, and more flips follow. On the published Omniglot
#     case this dominates: eager float32 is ~1e-2 from plain float64 (2026-12-03). So beside the
#     plain float64 reference, each float32 run is measured against a float64 run that takes
#     *its* branches: the max-pool indices and the signs that pick the activation slopes in the
#     backward are the float32 run's (read from the eager graph, or returned as extra outputs by a
#     compiled copy of the graph), everything else is computed in float64. What is left is
#     rounding.

# the argument whose sign picks the activation slope, per op of the traced step
SIGN_ARG = {"mamlpp_ext._batch_norm_backward.default": 3, "mamlpp_ext._batch_norm_double_backward.default": 6,
            "aten.leaky_relu_backward.default": 1, "aten.threshold_backward.default": 1}
POOLS = ("aten.max_pool2d_with_indices.default",)


def decision_nodes(gm) -> tuple[list, dict]:
    """(the nodes whose values decide a branch, {consumer node: (arg position, sign node)}) of a
    traced step: max-pool index outputs and the sign arguments of ``SIGN_ARG``."""
    nodes, consumers = [], {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is operator.getitem and str(getattr(n.args[0], "target", "")) in POOLS and n.args[1] == 1:
            nodes.append(n)
        pos = SIGN_ARG.get(str(n.target))
        if pos is not None and isinstance(n.args[pos], torch.fx.Node):
            consumers[n] = (pos, n.args[pos])
            if n.args[pos] not in nodes:
                nodes.append(n.args[pos])
    return nodes, consumers


def with_outputs(gm, extra: list):
    """A copy of gm that also returns ``extra`` (nodes of gm), after its own outputs."""
    g = torch.fx.Graph()
    env: dict = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            g.output((*torch.fx.map_arg(n.args[0], lambda a: env[a]), *[env[x] for x in extra]))
        else:
            env[n] = g.node_copy(n, lambda a: env[a])
    return torch.fx.GraphModule(gm, g)


def run_matched(g64, inputs64, decided: dict, sign_nodes: set, consumers: dict) -> list:
    """Run the float64 graph taking the branches in ``decided`` (node name -> the float32 run's
    value of a decision node: indices, or the tensor whose sign picks a slope)."""

    class Matched(torch.fx.Interpreter):
        def run_node(self, n):
            if n.name in decided and n.name not in sign_nodes:  # max-pool indices
                super().run_node(n)
                return decided[n.name]
            if n in consumers:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                pos, src = consumers[n]
                args = list(args)
                v, pos32 = args[pos], decided[src.name] > 0
                args[pos] = torch.where(pos32, v.abs().clamp_min(1e-300), -v.abs())
                return getattr(self, n.op)(n.target, tuple(args), kwargs)
            return super().run_node(n)

    return list(Matched(g64).run(*inputs64))


def outputs_and_stats(out, inputs, P: int, R: int) -> list:
    """[loss] + meta-gradients (zeros where None) + running statistics after a run."""
    params = inputs[:P]
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, out[1:1 + P])]
    return [out[0][0]] + grads + [t.clone() for t in inputs[P:P + R]]


def agree(args) -> list[dict]:
    from torch._inductor.compile_fx import compile_fx

    rows = []
    for backend in args.backends.split(","):
        cfg = config_of(args.case, args.tasks)
        batch = batch_of(cfg, args.data)
        for epoch in [int(e) for e in args.epochs.split(",")]:
            plan = epoch_plan(cfg, epoch)
            l32 = MAMLPlusPlus(cfg, backend=backend, compile=True)
            l64 = MAMLPlusPlus(cfg, backend=backend, dtype=torch.float64, compile=True)
            l64.load_state_dict(l32.state_dict())
            state = l32.state_dict()
            P, R = len(l32.parameters()), len(l32.running_stats)
            g32, in32 = traced(l32, batch, plan)
            g64, in64 = traced(l64, batch, plan)
            if [str(n.target) for n in g32.graph.nodes] != [str(n.target) for n in g64.graph.nodes]:
                raise SystemExit("the float32 and float64 graphs differ")

            def fresh(inputs):
                return [t.detach().clone() for t in inputs]

            # the runs: eager (the learner's own step), compiled (the shipped step), plain float64
            eager_l = MAMLPlusPlus(cfg, backend=backend)
            eager_l.load_state_dict(state)
            eager = one_step(eager_l, batch, plan)
            with layout_optimization(args.layout_optimization):
                comp_l = MAMLPlusPlus(cfg, backend=backend, compile=True)
                comp_l.load_state_dict(state)
                t0 = time.perf_counter()
                comp = one_step(comp_l, batch, plan)
                first = time.perf_counter() - t0
            i64 = fresh(in64)
            plain = outputs_and_stats(g64(*i64), i64, P, R)

            # decisions: the eager graph's (replayed), the compiled graph's (returned as extra outputs)
            nodes, consumers = decision_nodes(g32)
            sign_nodes = {n.name for n in consumers.values() for n in [n[1]]}
            i32 = fresh(in32)
            out_node = next(n for n in g32.graph.nodes if n.op == "output")
            keep = {n.name for n in nodes} | {a.name for a in out_node.args[0] if a is not None}
            env = record(g32, i32, keep)
            replay = outputs_and_stats(env_output(g32, env), i32, P, R)
            dec_e = {n.name: env[n.name] for n in nodes}
            gx = with_outputs(g32, nodes)
            ix = fresh(in32)
            options = dict(compiled_mode.INDUCTOR_OPTIONS, layout_optimization=args.layout_optimization)
            with torch._inductor.config.patch(options), torch.no_grad():
                outx = compile_fx(gx, fresh(in32))(*ix)
            n_out = len(outx) - len(nodes)
            compx = outputs_and_stats(list(outx[:n_out]), ix, P, R)
            dec_c = {n.name: v for n, v in zip(nodes, outx[n_out:])}
            i64 = fresh(in64)
            matched_e = outputs_and_stats(run_matched(g64, i64, dec_e, sign_nodes, consumers), i64, P, R)
            i64 = fresh(in64)
            matched_c = outputs_and_stats(run_matched(g64, i64, dec_c, sign_nodes, consumers), i64, P, R)
            dec_64 = {n.name: record_value for n, record_value in zip(nodes, decision_values(g64, fresh(in64), nodes))}

            def flips(a, b):
                total = 0
                for n in nodes:
                    x, y = a[n.name], b[n.name]
                    total += int((x != y).sum()) if n.name not in sign_nodes else int(((x > 0) != (y > 0)).sum())
                return total

            names = ["loss"] + [n for n, _ in l32.named_parameters()]
            names += [f"running_{k}[{i}]" for k in ("mean", "var") for i in range(len(l32.running_mean))]
            scale = max(float(g.double().norm()) for g in plain[1:P + 1])
            runs = {"eager_vs_f64": (eager, plain), "compiled_vs_f64": (comp, plain),
                    "eager_vs_matched": (eager, matched_e), "compiled_vs_matched": (compx, matched_c),
                    "compiled_vs_eager": (comp, eager)}
            worst = {k: 0.0 for k in runs}
            for i, name in enumerate(names):
                null = 1 <= i <= P and float(plain[i].double().norm()) < NULL * scale
                row = dict(case=args.case, backend=backend, epoch=epoch, tensor=name,
                           kind="null: abs/largest" if null else "relative")
                for k, (a, r) in runs.items():
                    if null:
                        row[k] = float((a[i].double() - r[i].double()).norm()) / scale
                    else:
                        row[k] = rel(a[i], r[i])
                        worst[k] = max(worst[k], row[k])
                rows.append(row)
            gate = worst["compiled_vs_matched"] <= GATE and worst["compiled_vs_f64"] <= max(GATE, 2 * worst[
                "eager_vs_f64"])
            rows.append(dict(case=args.case, backend=backend, epoch=epoch, tensor="WORST (non-null)",
                             kind=f"gate: {'pass' if gate else 'FAIL'}", **worst))
            same_replay = all(torch.equal(a, b) for a, b in zip(replay, eager))
            same_x = max(rel(a, b) if float(b.double().norm()) > 0 else 0.0 for a, b in zip(compx, comp))
            print(f"{args.case}/{backend}/epoch {epoch} ({args.data} data): first compiled step {first:.1f} s "
                  f"(trace + compile or cache load), layout_optimization={args.layout_optimization}; branch flips "
                  f"vs plain float64: eager {flips(dec_e, dec_64)}, compiled {flips(dec_c, dec_64)}; compiled vs "
                  f"eager {flips(dec_c, dec_e)} (of {sum(dec_e[n.name].numel() for n in nodes)} decisions); fx replay "
                  f"== eager: {same_replay}; compiled with decision outputs vs shipped: {same_x:.1e}", flush=True)
    cols = [("backend", "backend", "s"), ("epoch", "epoch", "d"), ("tensor", "tensor", "s"), ("kind", "error", "s")]
    cols += [(k, k.replace("_", " "), ".2e") for k in ("eager_vs_f64", "compiled_vs_f64", "eager_vs_matched",
                                                       "compiled_vs_matched", "compiled_vs_eager")]
    timing.print_table(rows, cols)
    return rows


def env_output(gm, env) -> list:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return [None if a is None else env[a.name] for a in out.args[0]]


def decision_values(gm, inputs, nodes) -> list:
    env = record(gm, inputs, {n.name for n in nodes})
    return [env[n.name] for n in nodes]


# ------------------------------------------------------------------------------------ bisect
def record(gm, inputs, keep=None) -> dict:
    """Run gm eagerly; {node name: value} of every node (or of the names in ``keep``)."""
    env = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if keep is None or n.name in keep:
                env[n.name] = out
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
def kernels(args) -> list[dict]:
    """The compiled step's kernels per meta-step against the eager step's compute ops (the counting
    is host.py's: ``host.count_step``, ``host.count_compiled_step``)."""
    import host

    rows = []
    for backend in args.backends.split(","):
        for tasks in [int(t) for t in args.task_counts.split(",")]:
            cfg = config_of(args.case, tasks)
            batch = batch_of(cfg, "uniform" if args.data == "omniglot" else args.data)
            eager = host.count_step(MAMLPlusPlus(cfg, backend=backend), batch)
            comp = host.count_compiled_step(MAMLPlusPlus(cfg, backend=backend, compile=True), batch)
            rows.append(dict(case=args.case, backend=backend, tasks=tasks, eager_compute_ops=eager["compute_ops"],
                             eager_conv_ops=eager["conv_ops"], **comp,
                             ratio=comp["kernels"] / eager["compute_ops"]))
    timing.print_table(rows, [("backend", "backend", "s"), ("tasks", "T", "d"),
                              ("eager_compute_ops", "eager compute ops", "d"),
                              ("eager_conv_ops", "eager conv ops", "d"), ("generated", "generated kernels", "d"),
                              ("extern", "extern calls", "d"), ("around", "eager ops around", "d"),
                              ("kernels", "compiled kernels", "d"), ("conv_ops", "compiled conv calls", "d"),
                              ("ratio", "compiled/eager", ".2f")])
    if args.verbose:
        for r in rows:
            print(r["backend"], r["tasks"], r["top_ops"])
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
