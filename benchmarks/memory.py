"""Memory of one MAML++ training meta-step beside its time, with and without recomputation (issue 17).

The figure is the *step peak* (NOTE [Step memory] in mamlpp_ext/model/memory.py): the most bytes
held at once, during ``meta_loss`` and its backward, by tensors created in that window. It is
counted on the ``meta`` device (``estimate_peak_memory``: nothing is allocated, so every case
can be counted on any machine) for each case, backend and ``recompute`` mode; ``total`` adds the
learner's state (with Adam's moments) and the batch. Public settings at epoch 0: second order,
MSL on (the query set scored after each of the 5 inner steps), fp32.

Cases: the paper's 4-stage net on Omniglot 5/20-way 1-shot and mini-ImageNet 5-way 1/5-shot, and
ResNet-12 (64-160-320-640) on mini-ImageNet 5-way 1/5-shot (presets ``...-resnet12``: 2 tasks,
5 inner steps).

Also:

* ``agree`` rows: a case that fits, counted on real CPU (or CUDA) tensors beside the meta count
  (they must be equal); on CUDA also ``torch.cuda.max_memory_allocated`` over the same window
  (the caching allocator's view: rounding to 512-byte blocks, no kernel workspaces);
* work: for the fused backend, the FLOPs of convolutions and matrix products
  (``torch.utils.flop_counter``) and the ops dispatched per meta-step, against ``"off"`` (on the
  meta device: device independent);
* time: the median s/step of real steps with recomputation off and on for ``--memory-time-cases``
  (default: Omniglot 5-way 1-shot and mini-ImageNet 5-way 1-shot, fused; a full-size ResNet-12
  step takes minutes on a CPU, so its cases are timed only when named there), timed in
  alternating rounds (``timing.interleaved_medians``);
* ``--memory-torch-checkpoint``: the same segments run through ``torch.utils.checkpoint``
  (``use_reentrant=False``) instead of the step's own recomputation, on a small case: its peak,
  how many network forwards a step runs, and whether the running statistics still equal those
  without recomputation (NOTE [Recomputed inner steps] in mamlpp_ext/model/recompute.py).

    python benchmarks/memory.py [--quick] [--device cuda] [--json out.json]
    python benchmarks/inner_loop.py --what memory          # the same, through the driver
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import meta_step  # noqa: E402
import timing  # noqa: E402

from mamlpp_ext.model import BACKENDS as _TABLE  # noqa: E402
from mamlpp_ext.model.config import RECOMPUTE_MODES  # noqa: E402

CASES = ("omniglot-5way-1shot", "omniglot-20way-1shot", "mini-imagenet-5way-1shot", "mini-imagenet-5way-5shot",
         "mini-imagenet-5way-1shot-resnet12", "mini-imagenet-5way-5shot-resnet12")
QUICK_CASES = ("omniglot-5way-1shot", "mini-imagenet-5way-1shot", "mini-imagenet-5way-1shot-resnet12")
TIME_CASES = ("omniglot-5way-1shot", "mini-imagenet-5way-1shot")
AGREE_CASE = "omniglot-5way-1shot"
BACKENDS = tuple(_TABLE)
GiB = 2**30
COLUMNS = [("case", "case", "s"), ("backend", "backend", "s"), ("recompute", "recompute", "s"),
           ("peak_gib", "step peak GiB", ".3f"), ("total_gib", "total GiB", ".3f"),
           ("reduction", "vs off", ".2f"), ("flops_ratio", "FLOPs vs off", ".3f"), ("ops_ratio", "ops vs off", ".3f"),
           ("median_s", "s/step", ".3f"), ("time_ratio", "time vs off", ".2f"),
           ("counted_real_gib", "real count GiB", ".3f"), ("cuda_allocator_gib", "cuda alloc GiB", ".3f"),
           ("note", "note", "s")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark (the driver adds --device, --quick and --json)."""
    g = parser.add_argument_group("memory benchmark")
    g.add_argument("--memory-cases", default=None,
                   help=f"comma-separated presets to count (default: {','.join(CASES)}; with --quick "
                        f"{','.join(QUICK_CASES)})")
    g.add_argument("--memory-backends", default=",".join(BACKENDS),
                   help="comma-separated backends (default: all; fused is skipped without the extension)")
    g.add_argument("--memory-time-cases", default=None,
                   help=f"presets whose real steps are timed with recompute off and on, fused backend (default "
                        f"{','.join(TIME_CASES)}; with --quick the first only; 'none': no timing). A ResNet-12 step "
                        f"takes minutes on a CPU")
    g.add_argument("--memory-repeats", type=int, default=None,
                   help="timed meta-steps per mode (default 3 with --quick, else 6)")
    g.add_argument("--memory-cpu-time", action="store_true",
                   help="time with the process's CPU time on one thread instead of the wall clock: a rough "
                        "figure that other processes on a shared machine disturb less (CPU only)")
    g.add_argument("--memory-torch-checkpoint", action="store_true",
                   help="also run the segments through torch.utils.checkpoint(use_reentrant=False) for comparison")


def _fits(device: torch.device, nbytes: int) -> bool:
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < 0.8 * free


def _measure_real(cfg, backend: str, device: torch.device) -> dict:
    """A real step on ``device``: the live-storage count and, on CUDA, the allocator's peak."""
    from mamlpp_ext.model import MAMLPlusPlus
    from mamlpp_ext.model.memory import step_peak_bytes

    learner = MAMLPlusPlus(cfg, backend=backend, device=device)
    batch = meta_step._batch(cfg, device, torch.float32)
    out = {}
    if device.type == "cuda":
        step_peak_bytes(learner, batch)  # warm-up: cuDNN choices, allocator pools
        for p in learner.parameters():
            p.grad = None
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out["counted_real_gib"] = step_peak_bytes(learner, batch) / GiB
        torch.cuda.synchronize(device)
        out["cuda_allocator_gib"] = (torch.cuda.max_memory_allocated(device) - before) / GiB
    else:
        out["counted_real_gib"] = step_peak_bytes(learner, batch) / GiB
    del learner, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _work(cfg, backend: str) -> tuple[int, int]:
    """(FLOPs, ops dispatched) of meta_loss + backward of ``cfg`` on the meta device."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    from mamlpp_ext.model import MAMLPlusPlus
    from mamlpp_ext.model.schedules import epoch_plan

    class Ops(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.count += 1
            return func(*args, **(kwargs or {}))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner = MAMLPlusPlus(cfg, backend=backend, device="meta")
        batch = [torch.empty(t.shape, dtype=t.dtype, device="meta")
                 for t in meta_step._batch(cfg, torch.device("cpu"), torch.float32)]
        with FlopCounterMode(display=False) as flops, Ops():
            loss, _ = learner.step.meta_loss(*batch, epoch_plan(cfg, 0))
            loss.backward()
    return flops.get_total_flops(), Ops.count


def _time(cfg, device: torch.device, repeats: int, quick: bool, cpu_time: bool = False) -> dict:
    """Median s/step per recompute mode, fused backend, timed in alternating rounds; with
    ``cpu_time``: the process's CPU time on one thread, one step of each mode in turn."""
    import statistics
    import time

    from mamlpp_ext.model import MAMLPlusPlus

    fns = {}
    for mode in RECOMPUTE_MODES:
        learner = MAMLPlusPlus(cfg.replace(recompute=mode), backend="fused", device=device)
        batch = meta_step._batch(cfg, device, torch.float32)
        fns[mode] = (lambda L=learner, b=batch: L.meta_step(*b, epoch=0))
    if not cpu_time:
        res = timing.interleaved_medians(fns, device, repeats=repeats, warmup=1,
                                         rounds=1 if quick else max(1, repeats // 2))
        return {mode: r["median"] for mode, r in res.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times: dict = {mode: [] for mode in fns}
        for fn in fns.values():
            fn()  # warm-up
        for _ in range(repeats):
            for mode, fn in fns.items():
                start = time.process_time()
                fn()
                times[mode].append(time.process_time() - start)
    finally:
        torch.set_num_threads(threads)
    return {mode: statistics.median(v) for mode, v in times.items()}


def run(args) -> list[dict]:
    """One row per (case, backend, recompute mode); agreement and comparison rows after them."""
    import mamlpp_ext
    from mamlpp_ext.model.config import from_preset
    from mamlpp_ext.model.memory import estimate_peak_memory

    device = torch.device(args.device)
    cases = [c for c in (getattr(args, "memory_cases", None) or ",".join(QUICK_CASES if args.quick else CASES))
             .split(",") if c]
    backends = [b for b in getattr(args, "memory_backends", ",".join(BACKENDS)).split(",") if b]
    for b in backends:
        if b not in BACKENDS:
            raise SystemExit(f"--memory-backends: unknown backend {b!r}; expected some of {BACKENDS}")
    time_arg = getattr(args, "memory_time_cases", None)
    if time_arg is None:
        time_cases = TIME_CASES[:1] if args.quick else TIME_CASES
    else:
        time_cases = () if time_arg == "none" else tuple(c for c in time_arg.split(",") if c)
    repeats = getattr(args, "memory_repeats", None) or (3 if args.quick else 6)

    rows = []
    for case in cases:
        cfg = from_preset(case)
        for backend in backends:
            off_peak = off_work = None
            for mode in RECOMPUTE_MODES:
                row = dict(section="memory", case=case, backend=backend, recompute=mode, network=cfg.network,
                           tasks=cfg.meta_batch, inner_steps=cfg.inner_steps, dtype="float32", note="")
                if _TABLE[backend].needs_extension and not mamlpp_ext.has_extension():
                    row["note"] = "extension not built"
                    rows.append(row)
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    est = estimate_peak_memory(cfg, backend=backend, recompute=mode)
                row.update(peak_gib=est["step_peak_bytes"] / GiB, total_gib=est["total_bytes"] / GiB,
                           counted="meta")
                work = _work(cfg.replace(recompute=mode), backend) if backend == "fused" else None
                if mode == "off":
                    off_peak, off_work = est["step_peak_bytes"], work
                else:
                    row["reduction"] = off_peak / est["step_peak_bytes"]
                    if work is not None:
                        row.update(flops_ratio=work[0] / off_work[0], ops_ratio=work[1] / off_work[1])
                if _fits(device, est["total_bytes"]):  # a real step on the GPU beside the count
                    row.update(_measure_real(cfg.replace(recompute=mode), backend, device))
                rows.append(row)
        if case in time_cases and "fused" in backends and mamlpp_ext.has_extension():
            cpu_time = getattr(args, "memory_cpu_time", False) and device.type == "cpu"
            times = _time(cfg, device, repeats, args.quick, cpu_time)
            for r in rows:
                if r["case"] == case and r["backend"] == "fused" and r["recompute"] in times:
                    r["median_s"] = times[r["recompute"]]
                    r["time_ratio"] = times[r["recompute"]] / times["off"]
                    r["clock"] = "cpu time, 1 thread" if cpu_time else "wall"

    if device.type == "cpu":  # the method against a real CPU run, on a case that fits
        cfg = from_preset(AGREE_CASE)
        for backend in [b for b in backends if not _TABLE[b].needs_extension or mamlpp_ext.has_extension()]:
            for mode in RECOMPUTE_MODES:
                est = estimate_peak_memory(cfg, backend=backend, recompute=mode)["step_peak_bytes"]
                real = _measure_real(cfg.replace(recompute=mode), backend, device)
                rows.append(dict(section="memory", case=f"agree: {AGREE_CASE}", backend=backend, recompute=mode,
                                 peak_gib=est / GiB, **real,
                                 note="equal" if abs(real["counted_real_gib"] * GiB - est) < 1 else "DIFFERENT"))
    if getattr(args, "memory_torch_checkpoint", False):
        rows += compare_torch_checkpoint(device)
    return rows


# ---------------------------------------------------------------------------------------------
# torch.utils.checkpoint in place of the step's own recomputation
# ---------------------------------------------------------------------------------------------

def compare_torch_checkpoint(device: torch.device, preset: str = "omniglot-5way-1shot") -> list[dict]:
    """Rows for recompute off, the step's own recomputation, and the same two segments per inner
    step run through ``torch.utils.checkpoint(use_reentrant=False)``: the step peak (counted on
    real tensors), the network forwards per meta-step, and the largest difference of the running
    statistics from the run without recomputation."""
    from torch.utils.checkpoint import checkpoint

    import mamlpp_ext
    from mamlpp_ext.model import MAMLPlusPlus
    from mamlpp_ext.model.config import from_preset
    from mamlpp_ext.model.memory import step_peak_bytes
    from mamlpp_ext.model.step import MetaStep

    backend = "fused" if mamlpp_ext.has_extension() else "batched"

    def ckpt_update(update, fast, lslr, affine, step, create_graph):
        k = len(fast)

        def fn(*inputs):  # the whole update, running statistics included, as a user would checkpoint it
            return tuple(update(list(inputs[:k]), step, list(inputs[k + 1:]), inputs[k], create_graph))

        return list(checkpoint(fn, *fast, lslr, *affine, use_reentrant=False))

    def ckpt_score(score, fast, affine, step):
        k = len(fast)

        def fn(*inputs):
            q_logits, term = score(list(inputs[:k]), step, list(inputs[k:]))
            return term, q_logits

        return checkpoint(fn, *fast, *affine, use_reentrant=False)

    cfg = from_preset(preset)
    batch = meta_step._batch(cfg, device, torch.float32)
    rows, reference = [], None
    for label in ("off", "steps", "torch.utils.checkpoint"):
        learner = MAMLPlusPlus(cfg.replace(recompute="off" if label == "off" else "steps"), backend=backend,
                               device=device)
        forwards = [0]
        real_forward = learner.net.forward

        def counting_forward(*a, **k):
            forwards[0] += 1
            return real_forward(*a, **k)

        learner.net.forward = counting_forward
        saved = MetaStep._recomputed_update, MetaStep._recomputed_score
        if label == "torch.utils.checkpoint":
            MetaStep._recomputed_update = staticmethod(ckpt_update)
            MetaStep._recomputed_score = staticmethod(ckpt_score)
        try:
            peak = step_peak_bytes(learner, batch)
        finally:
            MetaStep._recomputed_update, MetaStep._recomputed_score = (staticmethod(saved[0]), staticmethod(saved[1]))
        grads = [p.grad.clone() for p in learner.parameters()]
        stats = [t.clone() for t in learner.running_stats]
        if reference is None:
            reference = (grads, stats)
        dg = max(float((a - b).abs().max()) for a, b in zip(grads, reference[0]))
        ds = max(float((a - b).abs().max()) for a, b in zip(stats, reference[1]))
        rows.append(dict(section="memory", case=f"compare: {preset}", backend=backend, recompute=label,
                         counted_real_gib=peak / GiB, network_forwards=forwards[0],
                         note=f"{forwards[0]} network forwards; max |Δ meta-grad| {dg:.1e}; "
                              f"max |Δ running stats| {ds:.1e}"))
    return rows


def main(argv=None) -> int:
    return timing.section_main(__doc__, "MAML++ meta-step memory benchmark", add_arguments, run, COLUMNS,
                               "fewer cases and repeats", argv)


if __name__ == "__main__":
    raise SystemExit(main())
