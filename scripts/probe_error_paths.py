"""Call the compiled ops with bad arguments, each in its own child process, and report whether
each call raised a Python exception (as it must) or killed the process.

    python scripts/probe_error_paths.py [--device cpu|cuda] [--gdb]

A crash on an error path (seen once on a GPU machine: torch 2.11, /opt/gcc) kills pytest and
hides which call did it; this prints one line per call instead. With --gdb the first crashing
call is re-run under gdb/cuda-gdb (whichever exists) and the native backtrace printed.
Exit status 1 when any call crashed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import shutil
import subprocess
import sys

PRELUDE = """
import torch, mamlpp_ext
from mamlpp_ext import ops
OPS = torch.ops.mamlpp_ext
dev = {device!r}
g = torch.Generator().manual_seed(0)
p = [torch.randn(2, 3, 4, generator=g).to(dev), torch.randn(2, 5, generator=g).to(dev)]
gr = [torch.randn_like(t) for t in p]
r = torch.rand(2, 3, generator=g).to(dev)
x = torch.randn(6, 4, 3, 3, generator=g).to(dev)
w, b = torch.ones(4, device=dev), torch.zeros(4, device=dev)
"""

CASES = {
    "aten (control: a stock op's error)": "torch.ones(2, device=dev) + torch.ones(3, device=dev)",
    "lslr_update length (autograd path)": "ops.lslr_update(p, gr[:1], r, 0)",
    "lslr_update length (below autograd)":
        "with torch._C._AutoDispatchBelowAutograd():\n    OPS.lslr_update.default(p, gr[:1], r, 0)",
    "lslr_update step (autograd path)": "ops.lslr_update(p, gr, r, 7)",
    "lslr_update integer lrs": "ops.lslr_update(p, gr, r.long(), 0)",
    "_lslr_scale integer xs": "OPS._lslr_scale([p[0].int()], r[:1], 0, 1.0)",
    "batch_norm 3-D input": "OPS.batch_norm(x[0], w, b, 2, 1e-5, None)",
    "batch_norm tasks=0": "OPS.batch_norm(x, None, None, 0, 1e-5, None)",
    "batch_norm negative_slope=-1": "OPS.batch_norm(x, w, b, 1, 1e-5, -1.0)",
    "batch_norm weight shape (below autograd)":
        "with torch._C._AutoDispatchBelowAutograd():\n    OPS.batch_norm.default(x, w[:3], b[:3], 2, 1e-5, None)",
    "TORCH_CHECK from C++ with no tensors": "OPS._cuda_version() if False else OPS.lslr_update([], [], r, 9)",
}


def run_case(body: str, device: str, timeout: float = 120.0) -> tuple[str, str]:
    code = PRELUDE.format(device=device) + "\ntry:\n" + "".join(
        "    " + line + "\n" for line in body.splitlines()) + (
        "except Exception as e:\n    print('RAISED', type(e).__name__, str(e).splitlines()[0][:110])\n"
        "else:\n    print('NO ERROR')\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "hung", ""
    if out.returncode < 0:
        return f"CRASHED (signal {-out.returncode})", code
    if out.returncode != 0:
        return f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1][:120] if out.stderr.strip() else ''}", code
    return out.stdout.strip(), code


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gdb", action="store_true", help="backtrace the first crash under gdb or cuda-gdb")
    args = ap.parse_args(argv)
    crashed = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = pool.map(lambda body: run_case(body, args.device), CASES.values())
        for name, (verdict, code) in zip(CASES, results):
            print(f"{name:45s} {verdict}", flush=True)
            if verdict.startswith("CRASHED"):
                crashed.append(code)
    if crashed and args.gdb:
        dbg = shutil.which("gdb") or shutil.which("cuda-gdb")
        if dbg is None:
            print("no gdb or cuda-gdb on PATH")
        else:
            print(f"== {dbg} backtrace of the first crash", flush=True)
            cmd = [dbg, "-batch", "-nx", "-ex", "set pagination off", "-ex", "run", "-ex", "bt 40",
                   "--args", sys.executable, "-c", crashed[0]]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
                lines = (out.stdout + out.stderr).splitlines()
                keep = [ln for ln in lines if ln.startswith("#") or "SIG" in ln or "signal" in ln]
                print("\n".join(keep[-60:] or lines[-60:]))
            except subprocess.TimeoutExpired:
                print("debugger timed out")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
