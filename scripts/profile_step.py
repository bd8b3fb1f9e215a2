"""Where one eager MAML++ meta-step's time goes on a GPU: torch.profiler (CPU + CUDA activities)
over a few training steps of Omniglot 5-way 1-shot, per backend.

    python scripts/profile_step.py [--device cuda] [--backends batched,fused] [--steps 3] [--out DIR]

Reports per backend, averaged per step: wall time; host time in op calls by category (mamlpp_ext
custom ops, convolutions, batch norm, elementwise, reductions, views, optimizer, autograd engine
overhead, other); kernels launched and their summed device time; device idle time (the gaps
between consecutive kernels on the stream, where the GPU waits for the host); and every
host-synchronising call seen (cudaStreamSynchronize, cudaDeviceSynchronize, blocking memcpy).
Writes profile_<backend>.json (the summary) and, with --trace, a Chrome trace per backend.
On CPU the same script runs (CPU activity only) and reports the host side alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

CATEGORIES = (
    ("custom", ("mamlpp_ext::",)),
    ("convolution", ("convolution", "conv2d", "cudnn_convolution")),
    ("batch_norm", ("batch_norm", "native_batch_norm")),
    ("optimizer", ("_foreach_", "Optimizer.step", "adam")),
    ("reduction", ("sum", "mean", "max_pool", "amax", "argmax", "cross_entropy", "log_softmax", "nll_loss")),
    ("view", ("aten::view", "aten::reshape", "aten::transpose", "aten::expand", "aten::select", "aten::slice",
              "aten::unsqueeze", "aten::squeeze", "aten::unbind", "aten::as_strided", "aten::permute", "aten::detach",
              "aten::alias", "aten::t", "aten::_unsafe_view", "aten::flatten", "aten::chunk", "aten::split")),
    ("elementwise", ("add", "mul", "sub", "div", "leaky_relu", "relu", "threshold", "copy_", "fill_", "zero_",
                     "clamp", "where", "neg", "pow", "sqrt", "rsqrt", "exp", "empty", "zeros", "ones", "cat",
                     "stack", "bmm", "baddbmm", "mm", "addmm")),
)
SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ",
              "cudaMemcpy\t")


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if cat == "view":
            if name in keys:
                return cat
        elif any(k.lower() in low for k in keys):
            return cat
    if "autograd" in low or "backward" in low:
        return "autograd"
    return "other"


def batch(cfg, device):
    g = torch.Generator().manual_seed(0)
    T = cfg.meta_batch
    sy = torch.stack([torch.randperm(cfg.ways, generator=g).repeat_interleave(cfg.shots) for _ in range(T)])
    qy = torch.stack([torch.randperm(cfg.ways, generator=g).repeat_interleave(cfg.queries) for _ in range(T)])
    return [torch.rand(T, sy.shape[1], *cfg.image_shape, generator=g).to(device), sy.to(device),
            torch.rand(T, qy.shape[1], *cfg.image_shape, generator=g).to(device), qy.to(device)]


def summarize(prof, steps: int, wall: float, cuda: bool) -> dict:
    host = defaultdict(float)
    calls = defaultdict(int)
    syncs = defaultdict(int)
    kernels = []
    for ev in prof.events():
        name = ev.name
        if any(s.strip() in name for s in SYNC_NAMES) or name.startswith("cudaMemcpy") and "Async" not in name:
            syncs[name] += 1
        if cuda and ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels.append((ev.time_range.start, ev.time_range.end))
            continue
        if ev.device_type != torch.autograd.DeviceType.CPU or ev.cpu_parent is not None:
            continue  # top-level CPU ops only: their times include their children
        cat = category(name)
        host[cat] += ev.cpu_time_total
        calls[cat] += 1
    out = {"steps": steps, "wall_ms_per_step": 1e3 * wall / steps,
           "host_ms_per_step_by_category": {k: round(v / 1e3 / steps, 3) for k, v in sorted(host.items())},
           "top_level_op_calls_per_step": {k: v // steps for k, v in sorted(calls.items())},
           "host_syncs": dict(syncs)}
    if cuda and kernels:
        kernels.sort()
        busy = sum(e - s for s, e in kernels)
        idle, last_end = 0.0, kernels[0][1]
        for s, e in kernels[1:]:
            if s > last_end:
                idle += s - last_end
            last_end = max(last_end, e)
        span = kernels[-1][1] - kernels[0][0]
        out.update(kernels_per_step=len(kernels) // steps, device_busy_ms_per_step=busy / 1e3 / steps,
                   device_span_ms_per_step=span / 1e3 / steps, device_idle_ms_per_step=idle / 1e3 / steps,
                   device_idle_fraction=idle / span if span else None)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="omniglot-5way-1shot")
    p.add_argument("--backends", default="batched,fused")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--trace", action="store_true", help="also write a Chrome trace per backend")
    args = p.parse_args(argv)
    from mamlpp_ext.model import MAMLPlusPlus, from_preset

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = from_preset(args.preset)
    os.makedirs(args.out, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for backend in [b for b in args.backends.split(",") if b]:
        learner = MAMLPlusPlus(cfg, backend=backend, device=device)
        b = batch(cfg, device)
        for _ in range(2):
            learner.meta_step(*b, epoch=0)
        if cuda:
            torch.cuda.synchronize(device)
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                learner.train_step(*b, epoch=0)
            if cuda:
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - t0
        summary = {"backend": backend, "preset": args.preset, "device": str(device),
                   "gpu": torch.cuda.get_device_name(device) if cuda else None, "torch": torch.__version__,
                   **summarize(prof, args.steps, wall, cuda)}
        path = os.path.join(args.out, f"profile_{backend}.json")
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
        if args.trace:
            prof.export_chrome_trace(os.path.join(args.out, f"trace_{backend}.json"))
        print(json.dumps(summary, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
