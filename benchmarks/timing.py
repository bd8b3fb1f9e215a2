"""Timing helpers shared by the benchmarks: warm-up, medians of many runs, CUDA events on CUDA,
and the machine description recorded next to every number."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one ``fn()`` call: CUDA events around it on CUDA, the wall clock on CPU."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn: Callable[[], object], device: torch.device | str = "cpu", *, warmup: int = 3,
                repeats: int = 20, min_time: float = 0.0) -> dict:
    """Median wall time of ``fn()`` in seconds (CUDA: events around each call).

    Runs ``warmup`` untimed calls, then at least ``repeats`` timed ones (and more until
    ``min_time`` seconds have been spent). Returns {"median", "min", "iqr", "runs"}.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start_all) < min_time:
        times.append(time_call(fn, device))
        if len(times) >= 10 * max(repeats, 1):
            break
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median": statistics.median(times), "min": min(times), "iqr": q[2] - q[0], "runs": len(times)}


def interleaved_medians(fns: dict, device: torch.device | str, repeats: int, warmup: int = 2,
                        rounds: int = 5) -> dict:
    """Median seconds per call of each fn, timed in alternating rounds (fair on a noisy machine).

    Each of ``rounds`` rounds times ``repeats // rounds`` calls of every fn in turn, so slow
    drifts of the machine's load hit all fns alike. Returns {name: {"median", "min", "runs"}}.
    """
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict = {k: [] for k in fns}
    per_round = max(1, repeats // rounds)
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(per_round):
                times[k].append(time_call(fn, device))
    return {k: {"median": statistics.median(v), "min": min(v), "runs": len(v)} for k, v in times.items()}


def copy_bandwidth(device: torch.device | str, numel: int, repeats: int = 5) -> float:
    """Same-device ``copy_`` bandwidth in GB/s (bytes read + written) of a float32 tensor."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, repeats=repeats)["median"]
    return 2 * numel * 4 / t / 1e9


def machine(device: torch.device | str = "cpu") -> dict:
    """What ran the benchmark: CPU model and threads, GPU name, torch and CUDA versions, date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Prints rows as an aligned text table; columns are (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2)
    os.replace(tmp, path)


def section_main(description: str, title: str, add_arguments: Callable, run: Callable, columns: list,
                 quick_help: str, argv=None) -> int:
    """The command line of a benchmark section run on its own: --device, --quick, --json and the
    section's options; prints the machine line, the table, and writes the JSON when asked."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", default=None, metavar="PATH", help="write the rows and the machine to PATH")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda was given but no CUDA device is available")
    info = machine(args.device)
    print(f"# {title}, {info}")
    rows = run(args)
    print_table(rows, columns)
    if args.json:
        write_json(args.json, {"machine": info, "command": " ".join(sys.argv), "rows": rows})
        print(f"\nwrote {args.json}")
    return 0
