"""Where the ops of one second-order meta-step come from: per phase and per op family.

    python benchmarks/op_families.py [--backend fused] [--tasks 8] [--min 5] [--json out.json]

Counts (device independent, CPU) the compute ops — non-view ops reaching a ``TorchDispatchMode``
below autograd, as ``benchmarks/host.py`` counts them — of one Omniglot 5-way 1-shot meta-step at
epoch 0 (second order, MSL, 5 inner steps), after a warm-up step, in three phases:

* ``meta_loss``: the inner loop and the query losses (the forward of the outer step, which holds
  the inner backwards and updates);
* ``backward``: the outer backward; each op is attributed to the autograd node that ran it (or to
  the engine's gradient accumulation when no node is current), which is how the ``add`` ops of
  the second-order step are accounted for: most are the sums of gradient contributions that
  autograd makes where one tensor feeds several ops;
* ``outer``: the divergence guard, the gradient clamp and Adam.

Prints one table per phase (ops with at least ``--min`` calls) and the totals.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import host  # noqa: E402


class FamilyCounter(TorchDispatchMode):
    """Compute ops per (op, autograd node running it)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            node = torch._C._current_autograd_node()
            where = node.name() if node is not None else "(engine: gradient accumulation)"
            self.counts[(str(func.overloadpacket), where)] += 1
        return func(*args, **(kwargs or {}))


def count(backend: str, tasks: int) -> dict:
    from mamlpp_ext.model import MAMLPlusPlus, from_preset

    cfg = from_preset("omniglot-5way-1shot").replace(meta_batch=tasks)
    learner = MAMLPlusPlus(cfg, backend=backend)
    batch = host._batch(cfg)
    learner.meta_step(*batch, epoch=0)  # warm-up
    phases = {}
    with FamilyCounter() as c:
        loss, _ = learner.meta_loss(*batch, epoch=0)
    phases["meta_loss"] = c.counts
    with FamilyCounter() as c:
        learner.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    phases["backward"] = c.counts
    with FamilyCounter() as c:
        learner.step.outer_update()
    phases["outer"] = c.counts
    return phases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="fused", help="backend of the table (default fused)")
    p.add_argument("--tasks", type=int, default=8, help="tasks per meta-batch (default 8)")
    p.add_argument("--min", type=int, default=5, help="print the (op, node) pairs with at least this many calls")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    from mamlpp_ext.model import BACKENDS

    if args.backend not in BACKENDS:
        p.error(f"--backend: unknown backend {args.backend!r}; expected one of {tuple(BACKENDS)}")
    if args.tasks < 1:
        p.error(f"--tasks: expected a positive number of tasks, got {args.tasks}")
    torch.set_num_threads(1)
    phases = count(args.backend, args.tasks)
    total = 0
    for name, counts in phases.items():
        n = sum(counts.values())
        total += n
        by_op = collections.Counter()
        for (op, _), v in counts.items():
            by_op[op] += v
        print(f"\n## {name}: {n} compute ops")
        print("   by op: " + ", ".join(f"{op} {v}" for op, v in by_op.most_common() if v >= args.min))
        if name == "backward":
            for (op, where), v in counts.most_common():
                if v >= args.min:
                    print(f"  {v:5d}  {op:<40s} {where}")
    print(f"\ntotal compute ops per meta-step: {total} (backend {args.backend}, T = {args.tasks})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({name: [dict(op=op, node=where, count=v) for (op, where), v in counts.most_common()]
                       for name, counts in phases.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
