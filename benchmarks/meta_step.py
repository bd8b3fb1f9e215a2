"""Benchmark of one full MAML++ training meta-step per backend (issue 4).

A meta-step is everything ``MAMLPlusPlus.meta_step`` does: the inner loop on every task's
support set (5 steps, second order), the query forwards of the multi-step loss, the outer
backward and the Adam step. Cases, with the public settings (SPEC §4), at epoch 0 (MSL on):

* omniglot-5way-1shot: meta-batch 8, 1 query per class, 1×28×28, 64 filters;
* omniglot-20way-1shot: meta-batch 8, 1 query per class;
* mini-imagenet-5way-1shot: meta-batch 2, 15 queries per class, 3×84×84, 48 filters.

Backends: ``sequential`` (tasks one after another, pure autograd; the baseline), ``batched``
(all tasks at once, pure autograd) and ``fused`` (batched + compiled ops; skipped without the
extension); on CUDA also ``batched+graph`` and ``fused+graph`` (the step captured as a CUDA
graph and replayed, batches copied in from pinned memory). Asked for by name only (each compiles
its graph first: minutes on a small CPU, seconds from inductor's cache): ``batched+compiled``,
``fused+compiled`` and on CUDA ``batched+graph+compiled``, ``fused+graph+compiled`` (the compiled
step, NOTE [Compiled step] in mamlpp_ext/model/compiled.py; its first, compiling step is a
warm-up step, its time in ``compile_s``). ``--meta-step-conv-layouts`` adds
rows per convolution layout (NOTE [Convolution layout] in model/lifting.py). Reports the median
seconds per meta-step after warm-up, the speed-up over ``sequential`` and, on CUDA, the peak
memory allocated during the timed steps.

    python benchmarks/meta_step.py [--quick] [--device cuda] [--json out.json]
    python benchmarks/inner_loop.py --what meta-step      # the same, through the driver
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timing  # noqa: E402

CASES = ("omniglot-5way-1shot", "omniglot-20way-1shot", "mini-imagenet-5way-1shot")
QUICK_CASES = ("omniglot-5way-1shot", "omniglot-20way-1shot")
from mamlpp_ext.model import BACKENDS as _TABLE  # noqa: E402

BACKENDS = tuple(_TABLE)  # every backend of the table; graph mode for those that run tasks at once
GRAPH_BACKENDS = tuple(f"{name}+graph" for name, impl in _TABLE.items() if not impl.per_task)
COMPILED_BACKENDS = tuple(f"{name}{mode}+compiled" for name, impl in _TABLE.items() if not impl.per_task
                          for mode in ("", "+graph"))
COLUMNS = [("case", "case", "s"), ("backend", "backend", "s"), ("tasks", "T", "d"),
           ("median_s", "median s/step", ".4f"), ("iqr_s", "iqr s", ".4f"), ("runs", "runs", "d"),
           ("speedup_vs_sequential", "vs sequential", ".2f"), ("speedup_vs_batched", "vs batched", ".2f"),
           ("peak_mib", "peak MiB", ".1f"), ("compile_s", "compile s", ".1f"), ("note", "note", "s")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark (the driver adds --device, --quick and --json)."""
    g = parser.add_argument_group("meta-step benchmark")
    g.add_argument("--meta-step-cases", default=None,
                   help=f"comma-separated presets to time (default: {','.join(CASES)}; with --quick "
                        f"{','.join(QUICK_CASES)}, since a mini-ImageNet step takes tens of seconds on a 2-core CPU)")
    g.add_argument("--meta-step-backends", default=",".join(BACKENDS),
                   help="comma-separated backends (default: all; fused is skipped without the extension)")
    g.add_argument("--meta-step-dtype", default="float32", choices=["float32", "float64"],
                   help="dtype of the meta-parameters and images (default float32)")
    g.add_argument("--meta-step-conv-layouts", default="",
                   help="comma-separated convolution layouts to time for the batched backends (grouped, split); "
                        "default: the learner's own choice only")
    g.add_argument("--meta-step-repeats", type=int, default=None,
                   help="timed meta-steps per backend (default 3 with --quick, else 10)")


def _batch(cfg, device, dtype, seed=0):
    """Random images in [0, 1] and per-task permuted labels: (T, N·K, C, H, W), (T, N·K), query likewise."""
    g = torch.Generator().manual_seed(seed)
    T = cfg.meta_batch

    def labels(per_class):
        base = torch.arange(cfg.ways).repeat_interleave(per_class)
        return torch.stack([base[torch.randperm(len(base), generator=g)] for _ in range(T)])

    sy, qy = labels(cfg.shots), labels(cfg.queries)
    sx = torch.rand(T, sy.shape[1], *cfg.image_shape, generator=g, dtype=dtype)
    qx = torch.rand(T, qy.shape[1], *cfg.image_shape, generator=g, dtype=dtype)
    return [t.to(device) for t in (sx, sy, qx, qy)]


def run(args) -> list[dict]:
    """Time one training meta-step per (case, backend); returns one row per pair."""
    import mamlpp_ext
    from mamlpp_ext.model.config import from_preset
    from mamlpp_ext.model.meta_learner import MAMLPlusPlus

    device = torch.device(args.device)
    dtype = getattr(torch, getattr(args, "meta_step_dtype", "float32"))
    cases_arg = getattr(args, "meta_step_cases", None) or ",".join(QUICK_CASES if args.quick else CASES)
    cases = [c for c in cases_arg.split(",") if c]
    backends = [b for b in getattr(args, "meta_step_backends", ",".join(BACKENDS)).split(",") if b]
    for b in backends:
        if b not in BACKENDS + GRAPH_BACKENDS + COMPILED_BACKENDS:
            raise SystemExit(f"--meta-step-backends: unknown backend {b!r}; expected some of "
                             f"{BACKENDS + GRAPH_BACKENDS + COMPILED_BACKENDS}")
    if device.type == "cuda" and getattr(args, "meta_step_backends", None) in (None, ",".join(BACKENDS)):
        backends += [b for b in GRAPH_BACKENDS if b.split("+")[0] in backends]
    layouts = [v for v in getattr(args, "meta_step_conv_layouts", "").split(",") if v]
    variants = [(b, None) for b in backends]
    variants += [(b, lay) for lay in layouts for b in backends if b != "sequential"]
    repeats = getattr(args, "meta_step_repeats", None) or (3 if args.quick else 10)
    warmup = 1 if args.quick else 2

    rows = []
    for case in cases:
        cfg = from_preset(case)  # second order, MSL on at epoch 0, 5 inner steps: the public settings
        batch = _batch(cfg, device, dtype)
        case_rows = []
        for backend, layout in variants:
            label = backend if layout is None else f"{backend}/{layout}"
            name, graph, compiled = backend.split("+")[0], "+graph" in backend, backend.endswith("+compiled")
            row = dict(section="meta-step", case=case, backend=label, tasks=cfg.meta_batch, ways=cfg.ways,
                       shots=cfg.shots, queries=cfg.queries, inner_steps=cfg.inner_steps, device=str(device),
                       dtype=str(dtype).replace("torch.", ""), median_s=None, note="")
            if name == "fused" and not mamlpp_ext.has_extension():
                row["note"] = "extension not built"
                case_rows.append(row)
                continue
            learner = MAMLPlusPlus(cfg, backend=name, device=device, dtype=dtype, graph=graph, compile=compiled)
            if compiled:  # the first step traces and compiles (or loads from inductor's cache)
                t0 = time.perf_counter()
                learner.meta_step(*batch, epoch=0)
                row["compile_s"] = time.perf_counter() - t0
            if layout is not None:
                learner.net.conv_layout = layout
            row["conv_layout"] = learner.net.conv_layout
            if device.type == "cuda":
                gc.collect()  # earlier learners (and their graph pools) must be gone before the peak is reset
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            if graph:  # host batch (pinned) copied into the graph's buffers; no read-back per step
                host = [t.cpu().pin_memory() for t in batch]
                t = timing.median_time(lambda: learner.train_step(*host, epoch=0), device,
                                       warmup=warmup + learner.graph.warmup_steps + 1, repeats=repeats)
                row["captures"] = learner.graph.captures
            else:
                t = timing.median_time(lambda: learner.meta_step(*batch, epoch=0), device, warmup=warmup,
                                       repeats=repeats)
            row.update(median_s=t["median"], min_s=t["min"], iqr_s=t["iqr"], runs=t["runs"])
            if device.type == "cuda":
                row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            case_rows.append(row)

        times = {r["backend"]: r["median_s"] for r in case_rows if r["median_s"] is not None}
        for r in case_rows:
            if r["median_s"] is None:
                continue
            if "sequential" in times:
                r["speedup_vs_sequential"] = times["sequential"] / r["median_s"]
            if "batched" in times:
                r["speedup_vs_batched"] = times["batched"] / r["median_s"]
        rows += case_rows
    return rows


def main(argv=None) -> int:
    return timing.section_main(__doc__, "MAML++ meta-step benchmark", add_arguments, run, COLUMNS,
                               "fewer repeats: finishes in a couple of minutes on CPU", argv)


if __name__ == "__main__":
    raise SystemExit(main())
