"""Why networks are lifted with torch.fx rather than run under torch.vmap (issue 17).

Two ways to run a user's ``nn.Module`` on T tasks at once with per-task fast weights:

* ``fx``: what the library does — ``lifting.LiftedNet`` traces the module once and compiles a
  forward over the task-major layout (grouped convolutions, batched matmuls, one batch norm over
  T·C channels);
* ``vmap``: ``torch.vmap`` over the task dim of ``torch.func.functional_call(module, ...)``, the
  per-task batch norm coming from vmap's own batching rule for ``F.batch_norm``.

Both run the same inner loop (the VGG net of MAML++ with 4 filters on 16×16 images, 5-way
1-shot, 1 query per class, T = 8 tasks, 5 inner steps, second order, query loss after every
step, batch statistics, shared BN γ/β) followed by the outer backward, and must give the same
loss. Reported per meta-step: ops dispatched below autograd (``ops``; ``compute`` = not views,
about one kernel each on a GPU) — device independent — and the median host milliseconds on tensors
too small for the arithmetic to matter (one thread; a CPU proxy of the per-op cost that decides a
GPU step). The vmap path also has no fused batch norm + activation and no per-step tables, so it
does *less* than the library's step; it is still the more expensive one.

    python benchmarks/lifting_choice.py [--repeats 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timing  # noqa: E402
from host import OpCounter  # noqa: E402

from mamlpp_ext.model.network import VGGNet, vgg_module  # noqa: E402
from mamlpp_ext.ops import reference  # noqa: E402

T, WAYS, SHOTS, QUERIES, STEPS, FILTERS, SIDE, LR = 8, 5, 1, 1, 5, 4, 16, 0.1
COLUMNS = [("method", "method", "s"), ("ops", "ops/step", "d"), ("compute_ops", "compute ops", "d"),
           ("host_ms", "host ms/step", ".2f"), ("loss", "loss", ".6f")]


def setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    net = VGGNet(1, SIDE, SIDE, WAYS, num_filters=FILTERS)
    theta = [t.requires_grad_() for t in net.init_weights(generator=g)]
    gammas = [torch.empty(FILTERS).uniform_(0.5, 1.5, generator=g).requires_grad_() for _ in net.bn_layers]
    betas = [torch.empty(FILTERS).uniform_(-0.3, 0.3, generator=g).requires_grad_() for _ in net.bn_layers]
    sx = torch.randn(T, WAYS * SHOTS, 1, SIDE, SIDE, generator=g)
    qx = torch.randn(T, WAYS * QUERIES, 1, SIDE, SIDE, generator=g)
    sy = torch.arange(WAYS).repeat_interleave(SHOTS).repeat(T, 1)
    qy = torch.arange(WAYS).repeat_interleave(QUERIES).repeat(T, 1)
    return net, theta, gammas, betas, (sx, sy, qx, qy)


def inner_loop(forward, theta, batch):
    """Meta-loss of T tasks (MSL with equal weights) through ``forward(x, fast) -> (T, B, N)`` logits."""
    sx, sy, qx, qy = batch
    fast = [t.unsqueeze(0).expand(T, *t.shape) for t in theta]
    total = 0.0
    for _ in range(STEPS):
        logits = forward(sx, fast)
        loss = F.cross_entropy(logits.reshape(-1, WAYS), sy.reshape(-1), reduction="sum") / sy.shape[1]
        grads = torch.autograd.grad(loss, fast, create_graph=True)
        fast = [w - LR * gw for w, gw in zip(fast, grads)]
        q = forward(qx, fast)
        total = total + F.cross_entropy(q.reshape(-1, WAYS), qy.reshape(-1)) / STEPS
    return total


def fx_step(net, theta, gammas, betas, batch):
    def bn(i, h, slope):
        return reference.task_batch_norm(h, T, gammas[i], betas[i], None, None, training=True, update_stats=False,
                                         negative_slope=slope)

    loss = inner_loop(lambda x, fast: net.forward(x, fast, bn), theta, batch)
    loss.backward()
    return loss


def make_vmap_step(net):
    module = vgg_module(1, SIDE, SIDE, WAYS, num_filters=FILTERS).to_empty(device="cpu")
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # batch statistics only, like the fx path here
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    names = net.weight_names
    bn_names = [b.name for b in net.bn_layers]

    def step(_, theta, gammas, betas, batch):
        shared = {}
        for n, gw, gb in zip(bn_names, gammas, betas):
            shared[f"{n}.weight"], shared[f"{n}.bias"] = gw, gb

        def one_task(fast_t, x):
            return functional_call(module, ({**dict(zip(names, fast_t)), **shared}, {}), (x,))

        batched = torch.vmap(one_task, in_dims=(0, 0))
        loss = inner_loop(lambda x, fast: batched(fast, x), theta, batch)
        loss.backward()
        return loss
    return step


def measure(step, args_fn, repeats: int) -> dict:
    def once():
        for t in args_fn()[1] + args_fn()[2] + args_fn()[3]:
            t.grad = None
        return step(*args_fn())

    loss = float(once().detach())
    counter = OpCounter()
    with counter:
        once()
    t = timing.median_time(once, "cpu", warmup=2, repeats=repeats)
    return dict(ops=counter.ops, compute_ops=counter.compute, host_ms=1e3 * t["median"], loss=loss)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    state = setup()
    net = state[0]
    rows = [dict(method="fx (LiftedNet)", **measure(fx_step, lambda: state, args.repeats)),
            dict(method="vmap(functional_call)", **measure(make_vmap_step(net), lambda: state, args.repeats))]
    if abs(rows[0]["loss"] - rows[1]["loss"]) > 1e-4 * max(1.0, abs(rows[0]["loss"])):
        raise SystemExit(f"the two paths disagree: {rows[0]['loss']} vs {rows[1]['loss']}")
    timing.print_table(rows, COLUMNS)
    if args.json:
        timing.write_json(args.json, {"machine": timing.machine("cpu"), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
