"""mamlpp_ext benchmarks: fused kernels and the MAML++ meta-step against pure PyTorch.

    python benchmarks/inner_loop.py                       # everything, default sizes
    python benchmarks/inner_loop.py --what update         # the fused LSLR update
    python benchmarks/inner_loop.py --what batchnorm      # per-step batch norm
    python benchmarks/inner_loop.py --what meta-step      # one MAML++ meta-step per backend
    python benchmarks/inner_loop.py --what host           # ops, Python calls, host time per meta-step
    python benchmarks/inner_loop.py --what sampling       # episode sampling per meta-batch
    python benchmarks/inner_loop.py --what task-conv      # task-batched conv vs ATen's grouped conv
    python benchmarks/inner_loop.py --quick --json out.json

Each section warms up, takes medians of many runs (CUDA timed with events), prints a table and
adds its rows to the JSON file given by --json, with the machine, command and date.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timing  # noqa: E402

# section name -> module in benchmarks/ exposing add_arguments(parser), run(args) -> rows, COLUMNS
SECTIONS = {"update": "update", "batchnorm": "batchnorm", "meta-step": "meta_step", "sampling": "sampling",
            "host": "host", "task-conv": "task_conv"}


def _load(name: str):
    try:
        return importlib.import_module(SECTIONS[name])
    except ModuleNotFoundError as exc:
        if exc.name == SECTIONS[name]:
            return None
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", default="all",
                        help=f"comma-separated benchmarks: all or some of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a short smoke run")
    parser.add_argument("--json", default=None, metavar="PATH", help="write all rows and the machine to PATH")
    modules = {n: _load(n) for n in SECTIONS}
    for mod in modules.values():
        if mod is not None and hasattr(mod, "add_arguments"):
            mod.add_arguments(parser)
    args = parser.parse_args(argv)
    names = list(SECTIONS) if args.what == "all" else [n for n in args.what.split(",") if n]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"--what: unknown benchmark(s) {unknown}; choose from all, {', '.join(SECTIONS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda was given but no CUDA device is available")

    machine = timing.machine(args.device)
    print(f"# mamlpp_ext benchmarks, {machine}")
    all_rows, skipped = [], []
    for name in names:
        mod = modules[name]
        if mod is None:
            skipped.append(name)
            print(f"\n## {name}: not available in this checkout (benchmarks/{SECTIONS[name]}.py missing)")
            continue
        t0 = time.perf_counter()
        rows = mod.run(args)
        print(f"\n## {name} ({time.perf_counter() - t0:.0f} s)")
        timing.print_table(rows, mod.COLUMNS)
        all_rows += rows
    if args.json:
        timing.write_json(args.json, {"machine": machine, "command": " ".join(sys.argv),
                                      "rows": all_rows, "skipped": skipped})
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
