"""Benchmark of episode sampling (``mamlpp_ext.data.EpisodeDataset``): milliseconds to build one
training meta-batch of 8 tasks from a 1150-class pool of 28×28 images (the Omniglot training
pool's shape), for 5-way 1-shot and 20-way 5-shot, rotations on. Sampling runs on the host beside
every meta-step (in DataLoader workers or inline), so it must stay far below a step's time.
Run through ``benchmarks/inner_loop.py --what sampling`` or directly.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import timing  # benchmarks/ is on sys.path when run as a script or through inner_loop.py

COLUMNS = [("case", "case", "s"), ("median_ms", "median ms / meta-batch", ".2f"), ("min_ms", "min ms", ".2f")]


def run(args) -> list[dict]:
    from mamlpp_ext.data import ClassPool, EpisodeDataset

    rng = np.random.default_rng(0)
    counts = [20] * 1150
    images = rng.integers(0, 256, size=(sum(counts), 1, 28, 28), dtype=np.uint8)
    pool = ClassPool.from_arrays(images, counts)
    repeats = 10 if args.quick else 50
    rows = []
    for n, k in ((5, 1), (20, 5)):
        ds = EpisodeDataset.training(pool, n, k, 1, 8, num_batches=100_000, seed=0)
        batch = iter(range(1, 100_000))
        t = timing.median_time(lambda: ds[next(batch)], torch.device("cpu"), warmup=2, repeats=repeats)
        rows.append(dict(section="sampling", case=f"{n}-way {k}-shot, 8 tasks", median_ms=1e3 * t["median"],
                         min_ms=1e3 * t["min"]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    timing.print_table(run(args), COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
