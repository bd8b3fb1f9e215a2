"""Host side of one MAML++ training meta-step, per backend: what the CPU does around the kernels.

On a GPU a MAML++ step is thousands of tiny ops, so the host — Python, the dispatcher, kernel
launches — sets its speed until the step is captured as a CUDA graph. These counts are device
independent and run anywhere:

* ``ops``: ATen/custom ops dispatched per meta-step (forward, inner gradients, outer backward,
  Adam), counted by a ``TorchDispatchMode`` below autograd; ``compute_ops``: those that are not
  views (on a GPU each is about one kernel launch); ``custom_ops``: calls of mamlpp_ext ops;
  ``conv_ops``: convolution ops (ATen's or ours); each is one convolution call on the device;
* ``py_calls``: Python function calls per meta-step (cProfile);
* ``host_ms``: median milliseconds per meta-step with the same op structure on tensors too small
  for the arithmetic to matter (4 filters, 16×16 images, one thread) — a CPU proxy of the host
  time of the eager step. (On CPU even tiny kernels cost something, notably oneDNN's setup per
  convolution, so this is an upper bound of the Python + dispatch cost.)

Cases: Omniglot 5-way 1-shot and 20-way 1-shot (meta-batch 8, 5 steps, second order, MSL), epoch 0
(``--quick``: 5-way only; the 20-way step dispatches the same ops).
``--tasks 2,8,32`` counts (no host time) at those meta-batch sizes instead: how the ops, and the
convolutions, of a meta-step grow with the number of tasks T.

``--compiled`` adds a row per batched backend in compiled mode (NOTE [Compiled step] in
mamlpp_ext/model/compiled.py): the kernels one meta-step launches — ``generated`` (inductor's own
kernels) and ``extern`` (calls inductor leaves to ATen or to our ops: convolutions, matmuls,
mamlpp_ext ops, the copies back into mutated inputs), read from inductor's output code — plus
the eager ops around the compiled graph (the guard, the clamp and Adam), against the eager
step's compute ops. The first run of a graph compiles it (minutes on a 2-core CPU; inductor's
cache in ``$TORCHINDUCTOR_CACHE_DIR`` makes later runs quick).
Run through ``benchmarks/inner_loop.py --what host`` or directly.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import re

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import meta_step  # benchmarks/ is on sys.path when run as a script or through inner_loop.py
import timing

COLUMNS = [("case", "case", "s"), ("backend", "backend", "s"), ("mode", "mode", "s"), ("T", "T", "d"),
           ("ops", "ops/step", "d"), ("compute_ops", "compute ops", "d"), ("conv_ops", "conv ops", "d"),
           ("custom_ops", "custom ops", "d"), ("py_calls", "Python calls", "d"), ("host_ms", "host-proxy ms", ".1f"),
           ("generated", "generated kernels", "d"), ("extern", "extern calls", "d"),
           ("around", "eager ops around", "d"), ("kernels", "kernels/step", "d"),
           ("vs_eager", "kernels/eager compute", ".2f")]

CASES = [("omniglot 5-way 1-shot", "omniglot-5way-1shot"), ("omniglot 20-way 1-shot", "omniglot-20way-1shot")]


class OpCounter(TorchDispatchMode):
    """Counts every op that reaches the dispatch-mode layer (below autograd)."""

    def __init__(self):
        super().__init__()
        self.ops = self.compute = self.custom = self.conv = 0
        self.by_name: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if not func.is_view:
            self.compute += 1
        name = str(func.overloadpacket)
        if name.startswith("mamlpp_ext"):
            self.custom += 1
        if "conv" in name:
            self.conv += 1
        self.by_name[name] = self.by_name.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _batch(cfg):
    return meta_step._batch(cfg, torch.device("cpu"), torch.float32)


def count_step(learner, batch) -> dict:
    """Ops and Python calls of one meta-step (after a warm-up step)."""
    learner.meta_step(*batch, epoch=0)
    counter = OpCounter()
    with counter:
        learner.meta_step(*batch, epoch=0)
    prof = cProfile.Profile()
    prof.enable()
    learner.meta_step(*batch, epoch=0)
    prof.disable()
    top = sorted(counter.by_name.items(), key=lambda kv: -kv[1])[:12]
    return dict(ops=counter.ops, compute_ops=counter.compute, conv_ops=counter.conv, custom_ops=counter.custom,
                py_calls=pstats.Stats(prof).total_calls, top_ops=top)


def parse_output_code(code: str) -> dict:
    """What one run of an inductor-compiled graph launches, from its output code: ``generated``
    (calls of the kernels it defines), ``extern`` (statements calling ``extern_kernels.*`` or
    ``torch.ops.*``, and ``.copy_`` back into mutated inputs), ``conv`` (extern convolutions and
    convolution backwards, ours included) and ``by_name`` (extern calls per callee)."""
    kernels = set(re.findall(r"^(\w+) = async_compile\.\w+\(", code, re.M))
    generated, by_name = 0, {}
    for line in code[code.index("def call("):].splitlines():
        stmt = line.strip()
        if not stmt or stmt.startswith("#"):
            continue
        m = re.match(r"^(?:\w+ = )?(\w+)(?:\.run)?\(", stmt)
        if m and m.group(1) in kernels:
            generated += 1
            continue
        m = re.match(r"^(?:[\w, ]+ = )?(extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?)\(", stmt)
        if m is None and re.match(r"^\w+\.copy_\(", stmt):
            m = re.match(r"^\w+(\.copy_)\(", stmt)
        if m:
            by_name[m.group(1)] = by_name.get(m.group(1), 0) + 1
    extern = sum(by_name.values())
    conv = sum(n for k, n in by_name.items() if "conv" in k)
    return dict(generated=generated, extern=extern, conv=conv, by_name=by_name)


def count_compiled_step(learner, batch) -> dict:
    """Kernels per meta-step of a compiled-mode learner (one capture key): the compiled graph's
    (``parse_output_code``) and the eager ops around it (counted with the compiled call itself
    hidden from the counter)."""
    from torch._inductor.graph import GraphLowering
    from torch.utils._python_dispatch import _disable_current_modes

    codes: list[str] = []
    before = GraphLowering.save_output_code
    GraphLowering.save_output_code = staticmethod(codes.append)  # also called on a cache hit
    try:
        learner.meta_step(*batch, epoch=0)
    finally:
        GraphLowering.save_output_code = before
    if not codes:
        raise RuntimeError("inductor reported no output code for the compiled step")
    k = parse_output_code(codes[-1])
    step = learner.step
    (key, fn), = step.compiled.items()

    def hidden(*a):
        with _disable_current_modes():
            return fn(*a)

    step.compiled[key] = hidden
    counter = OpCounter()
    try:
        with counter:
            learner.meta_step(*batch, epoch=0)
    finally:
        step.compiled[key] = fn
    total = k["generated"] + k["extern"] + counter.compute
    return dict(generated=k["generated"], extern=k["extern"], around=counter.compute, kernels=total,
                conv_ops=k["conv"] + counter.conv, top_ops=sorted(k["by_name"].items(), key=lambda kv: -kv[1])[:12])


def run(args) -> list[dict]:
    import mamlpp_ext
    from mamlpp_ext.model import BACKENDS, MAMLPlusPlus, from_preset

    repeats = 5 if args.quick else 20
    tasks = [int(t) for t in str(getattr(args, "tasks", "") or "").split(",") if t]
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    backends = [b for b in str(getattr(args, "backends", "") or ",".join(BACKENDS)).split(",") if b]
    # --quick: the 5-way case only (the 20-way step dispatches the same ops; only its host time differs)
    default_cases = CASES[:1] if args.quick else CASES
    cases = [c for c in str(getattr(args, "cases", "") or ",".join(p for _, p in default_cases)).split(",") if c]
    for b in backends:
        if b not in BACKENDS:
            raise SystemExit(f"--backends: unknown backend {b!r}; expected some of {tuple(BACKENDS)}")
    for c in cases:
        if c not in dict((p, n) for n, p in CASES):
            raise SystemExit(f"--cases: unknown case {c!r}; expected some of {tuple(p for _, p in CASES)}")
    try:
        for case, preset in [(n, p) for n, p in CASES if p in cases]:
            for backend in backends:
                row = dict(section="host", case=case, backend=backend, ops=None, compute_ops=None, conv_ops=None,
                           custom_ops=None, py_calls=None, host_ms=None)
                if BACKENDS[backend].needs_extension and not mamlpp_ext.has_extension():
                    rows.append(row)
                    continue
                cfg = from_preset(preset)
                row["mode"] = "eager"
                compiled = getattr(args, "compiled", False) and not BACKENDS[backend].per_task
                if tasks:  # counts only, per meta-batch size
                    for T in tasks:
                        cfg_t = cfg.replace(meta_batch=T)
                        eager = dict(row, T=T, **count_step(MAMLPlusPlus(cfg_t, backend=backend), _batch(cfg_t)))
                        rows.append(eager)
                        if compiled:
                            c = count_compiled_step(MAMLPlusPlus(cfg_t, backend=backend, compile=True), _batch(cfg_t))
                            rows.append(dict(row, T=T, mode="compiled", vs_eager=c["kernels"] / eager["compute_ops"],
                                             **c))
                    continue
                row["T"] = cfg.meta_batch
                row.update(count_step(MAMLPlusPlus(cfg, backend=backend), _batch(cfg)))
                tiny = cfg.replace(num_filters=4, image_height=16, image_width=16)
                learner, batch = MAMLPlusPlus(tiny, backend=backend), _batch(tiny)
                t = timing.median_time(lambda: learner.meta_step(*batch, epoch=0), torch.device("cpu"),
                                       warmup=2, repeats=repeats)
                row["host_ms"] = 1e3 * t["median"]
                rows.append(row)
                if compiled:
                    c = count_compiled_step(MAMLPlusPlus(cfg, backend=backend, compile=True), _batch(cfg))
                    rows.append(dict(row, mode="compiled", T=cfg.meta_batch, ops=None, compute_ops=None,
                                     custom_ops=None, py_calls=None, host_ms=None,
                                     vs_eager=c["kernels"] / row["compute_ops"], **c))
    finally:
        torch.set_num_threads(threads)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--top", action="store_true", help="also print the most frequent ops per case")
    p.add_argument("--tasks", default="", metavar="T1,T2,...",
                   help="count ops (no host time) at these meta-batch sizes, e.g. 2,8,32")
    p.add_argument("--compiled", action="store_true",
                   help="also count the compiled step's kernels (compiles each case's graph: minutes when cold)")
    p.add_argument("--backends", default="", metavar="B1,B2,...",
                   help="backends to count (default: all of the table)")
    p.add_argument("--cases", default="", metavar="PRESET,...",
                   help="presets to count (default: omniglot-5way-1shot,omniglot-20way-1shot)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    rows = run(args)
    timing.print_table(rows, COLUMNS)
    if args.top:
        for r in rows:
            print(f"\n{r['case']} / {r['backend']}: {r.get('top_ops')}")
    if args.json:
        timing.write_json(args.json, {"machine": timing.machine("cpu"), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
