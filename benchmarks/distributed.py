"""Cost of the distributed reduction next to a MAML++ meta-step (issue 6).

    python benchmarks/distributed.py [--procs 2] [--preset omniglot-5way-1shot] [--steps 6]
                                     [--backend fused] [--device cpu] [--json PATH]

Starts ``--procs`` processes (gloo on CPU, NCCL on CUDA) that each run meta-steps on their
T/P tasks of random meta-batches with the real network of the preset, and times, per step,
the whole meta-step and the one flat all-reduce inside it (meta-gradients, BN running
statistics, metrics). Also times one process on all T tasks for the scaling figure. Medians
over ``--steps`` timed steps after one warm-up step. On CPU each process gets
cores // procs intra-op threads.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _batch(cfg, T, device, seed):
    g = torch.Generator().manual_seed(seed)
    C, H, W = cfg.image_shape

    def labels(per_class):
        base = torch.arange(cfg.ways).repeat_interleave(per_class)
        return torch.stack([base[torch.randperm(len(base), generator=g)] for _ in range(T)])

    sy, qy = labels(cfg.shots), labels(cfg.queries)
    sx = torch.rand(T, sy.shape[1], C, H, W, generator=g)
    qx = torch.rand(T, qy.shape[1], C, H, W, generator=g)
    return [t.to(device) for t in (sx, sy, qx, qy)]


def _run(rank, world, args, port, out_q):
    from mamlpp_ext.training import distributed as D
    from mamlpp_ext.model.config import from_preset
    from mamlpp_ext.model.meta_learner import MAMLPlusPlus

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world) if args.threads is None else args.threads)
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{rank}")
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    cfg = from_preset(args.preset)
    learner = MAMLPlusPlus(cfg, backend=args.backend, device=device)
    reduce_times = []
    if world > 1:
        def timed_mean(tensors):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            D.flat_mean_(tensors, world)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            reduce_times.append(time.perf_counter() - t0)

        learner.cross_process_mean = timed_mean
    per = cfg.meta_batch // world
    step_times = []
    for step in range(args.steps + 1):
        batch = [t[rank * per:(rank + 1) * per] for t in _batch(cfg, cfg.meta_batch, device, seed=step)]
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        learner.meta_step(*batch, epoch=0)
        step_times.append(time.perf_counter() - t0)
    numel = sum(p.numel() for p in learner.parameters()) + sum(t.numel() for t in learner.running_mean
                                                                 + learner.running_var) + 3
    if rank == 0:
        out_q.put({"procs": world, "tasks_per_proc": per, "step_s": statistics.median(step_times[1:]),
                   "allreduce_s": statistics.median(reduce_times[1:]) if reduce_times else 0.0,
                   "allreduce_floats": numel if world > 1 else 0, "threads": torch.get_num_threads()})
    if world > 1:
        D.leave_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world, args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_run, args=(r, world, args, args._port, q))
             for r in range(world)]
    for p in procs:
        p.start()
    res = q.get(timeout=3600)
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a benchmark process exited with {p.exitcode}")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--preset", default="omniglot-5way-1shot")
    ap.add_argument("--backend", default=None, help="default: fused when built, else batched")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--steps", type=int, default=6, help="timed meta-steps (after one warm-up)")
    ap.add_argument("--threads", type=int, help="intra-op threads per process (default cores // procs)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    import mamlpp_ext

    args.backend = args.backend or ("fused" if mamlpp_ext.has_extension() else "batched")
    rows = []
    for world in (args.procs, 1):
        args._port = _free_port()
        r = measure(world, args)
        r.update(preset=args.preset, backend=args.backend, device=args.device)
        rows.append(r)
    multi, single = rows
    print(f"{args.preset}, backend {args.backend}, {args.device}, {args.steps} timed steps (median)")
    print(f"  1 process  x {single['tasks_per_proc']} tasks: {single['step_s']:.3f} s/step "
          f"({single['threads']} threads)")
    print(f"  {multi['procs']} processes x {multi['tasks_per_proc']} tasks: {multi['step_s']:.3f} s/step "
          f"({multi['threads']} threads each); all-reduce of {multi['allreduce_floats']:,} floats: "
          f"{multi['allreduce_s'] * 1e3:.2f} ms = {100 * multi['allreduce_s'] / multi['step_s']:.1f}% of the step; "
          f"speed-up {single['step_s'] / multi['step_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
