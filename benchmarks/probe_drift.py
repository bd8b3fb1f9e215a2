"""Scratch probe (not shipped): trace the meta-gradient function with make_fx and compare eager
fp32, compiled fp32 against an fp64 eager reference."""
from __future__ import annotations

import os
import sys
import time
import contextlib

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mamlpp_ext.model import MAMLPlusPlus
from mamlpp_ext.model.config import from_preset
from mamlpp_ext.model.schedules import epoch_plan
from torch.fx.experimental.proxy_tensor import make_fx


def omniglot_batch(T, ways=5, shots=1, queries=1, seed=0):
    from mamlpp_ext.data.loader import omniglot_episodes
    eps = omniglot_episodes(ways, shots, queries, T, cache_dir=".cache/data", binary_resize=True, progress=False,
                            seed=seed, root="/work/shared/data/omniglot")
    b = eps["train"][0]
    return tuple(b)


@contextlib.contextmanager
def swapped(lrn, params, stats):
    """Temporarily make the learner read ``params`` (parameters() order) and ``stats``."""
    old = (list(lrn.theta), list(lrn.bn_weight), list(lrn.bn_bias), lrn.lslr, list(lrn.running_mean),
           list(lrn.running_var))
    it = iter(params)
    K = len(lrn.theta)
    for i in range(K):
        lrn.theta[i] = next(it)
    for i, w in enumerate(old[1]):
        if w is not None:
            lrn.bn_weight[i] = next(it)
            lrn.bn_bias[i] = next(it)
    if lrn.config.learnable_inner_lr:
        lrn.lslr = next(it)
    sit = iter(stats)
    for i, m in enumerate(old[4]):
        if m is not None:
            lrn.running_mean[i] = next(sit)
    for i, v in enumerate(old[5]):
        if v is not None:
            lrn.running_var[i] = next(sit)
    try:
        yield
    finally:
        lrn.theta[:], lrn.bn_weight[:], lrn.bn_bias[:] = old[0], old[1], old[2]
        lrn.lslr = old[3]
        lrn.running_mean[:], lrn.running_var[:] = old[4], old[5]


def meta_grad_fn(lrn, plan):
    P = len(lrn.parameters())

    def f(*flat):
        params, rest = list(flat[:P]), flat[P:]
        stats, (sx, sy, qx, qy) = rest[:-4], rest[-4:]
        with swapped(lrn, params, stats):
            loss, info = lrn.step.meta_loss(sx, sy, qx, qy, plan)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        return (loss.detach(), *grads)
    return f


def inputs_of(lrn, batch, requires_grad=True):
    params = [p.detach().clone().requires_grad_(requires_grad) for p in lrn.parameters()]
    stats = [s.detach().clone() for s in lrn.running_stats]
    sx, sy, qx, qy = batch
    return params + stats + [sx.to(lrn.dtype), sy, qx.to(lrn.dtype), qy]


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def main():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="batched")
    ap.add_argument("--filters", type=int, default=8)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--epoch", type=int, default=0)
    ap.add_argument("--cfg", action="append", default=[], help="inductor config key=python-literal")
    ap.add_argument("--decomp-exclude", action="append", default=[])
    args = ap.parse_args()
    import ast
    import torch._inductor.config as icfg
    for kv in args.cfg:
        k, v = kv.split("=", 1)
        obj = icfg
        *path, last = k.split(".")
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, last, ast.literal_eval(v))
        print("config", k, "=", getattr(obj, last))
    cfg = from_preset("omniglot-5way-1shot").replace(num_filters=args.filters, meta_batch=args.tasks,
                                                     inner_steps=args.steps, eval_inner_steps=args.steps)
    l32 = MAMLPlusPlus(cfg, backend=args.backend)
    l64 = MAMLPlusPlus(cfg, backend=args.backend, dtype=torch.float64)
    l64.load_state_dict(l32.state_dict())
    batch = omniglot_batch(args.tasks)
    plan = epoch_plan(cfg, args.epoch)
    names = [n for n, _ in l32.named_parameters()]
    ref = meta_grad_fn(l64, plan)(*inputs_of(l64, batch))
    e32 = meta_grad_fn(l32, plan)(*inputs_of(l32, batch))
    t = time.time()
    gm = make_fx(meta_grad_fn(l32, plan))(*inputs_of(l32, batch))
    print(f"make_fx: {len(gm.graph.nodes)} nodes, {time.time() - t:.1f}s")
    fx = gm(*inputs_of(l32, batch, False))
    rows = [("eager32", e32), ("fx32", fx)]
    if args.compile:
        t = time.time()
        c = torch.compile(gm)
        out = c(*inputs_of(l32, batch, False))
        print(f"compile+run: {time.time() - t:.1f}s")
        rows.append(("inductor32", out))
    print(f"{'tensor':24s}" + "".join(f"{r[0]:>14s}" for r in rows))
    for i, n in enumerate(["loss"] + names):
        print(f"{n:24s}" + "".join(f"{rel(r[1][i], ref[i]):14.3e}" for r in rows))


if __name__ == "__main__":
    main()


def decomp_check(backend="fused", filters=8, tasks=2, steps=5, exclude=()):
    from torch._inductor.decomposition import select_decomp_table
    cfg = from_preset("omniglot-5way-1shot").replace(num_filters=filters, meta_batch=tasks,
                                                     inner_steps=steps, eval_inner_steps=steps)
    l32 = MAMLPlusPlus(cfg, backend=backend)
    l64 = MAMLPlusPlus(cfg, backend=backend, dtype=torch.float64)
    l64.load_state_dict(l32.state_dict())
    batch = omniglot_batch(tasks)
    plan = epoch_plan(cfg, 0)
    ref = meta_grad_fn(l64, plan)(*inputs_of(l64, batch))
    gm = make_fx(meta_grad_fn(l32, plan))(*inputs_of(l32, batch))
    table = {k: v for k, v in select_decomp_table().items() if str(k) not in exclude}
    gd = make_fx(gm, decomposition_table=table)(*inputs_of(l32, batch, False))
    return l32, ref, gm, gd, batch
