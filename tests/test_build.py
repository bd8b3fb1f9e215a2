"""Properties of the compiled extension itself (not of one op).

The first GPU-machine run (torch 2.11, a compiler driver that links libstdc++ statically)
produced an extension holding its own copy of the C++ runtime; every error message that
formatted an integer then segfaulted, killing pytest. These tests catch that here.
"""

import shutil
import subprocess
import sys

import pytest

import mamlpp_ext

pytestmark = pytest.mark.skipif(not mamlpp_ext.has_extension(), reason="compiled mamlpp_ext extension not built")

# Symbols that only a copy of libstdc++'s own runtime would define (the locale machinery and
# the stream inserters libstdc++ instantiates in its shared library).
RUNTIME_MARKERS = ("std::locale::", "std::ios_base::", "std::codecvt", "::_M_insert<")


def test_extension_does_not_embed_the_cpp_runtime():
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not on PATH")
    import mamlpp_ext._C as ext

    out = subprocess.run([nm, "-C", "--defined-only", ext.__file__], capture_output=True, text=True, check=True)
    embedded = [ln for ln in out.stdout.splitlines() if any(m in ln for m in RUNTIME_MARKERS)]
    assert not embedded, f"{len(embedded)} libstdc++ runtime symbols defined in {ext.__file__}, e.g. {embedded[:3]}"


CHILD = r"""
import torch, mamlpp_ext
from mamlpp_ext import ops
OPS = torch.ops.mamlpp_ext
p = [torch.randn(2, 3), torch.randn(2, 5)]
calls = [
    lambda: ops.lslr_update(p, p[:1], torch.rand(2, 3), 0),           # lengths 2 and 1
    lambda: ops.lslr_update(p, p, torch.rand(2, 3), 7),               # step=7
    lambda: OPS.batch_norm(torch.randn(6, 4, 3, 3), None, None, 0, 1e-5, None),  # tasks=0
]
for call in calls:
    try:
        call()
    except RuntimeError as e:
        print("raised:", str(e).splitlines()[0])
    else:
        print("no error")
"""


def test_error_messages_with_numbers_raise_in_a_child_process():
    """Bad calls whose messages format integers raise RuntimeError; run in a child process so
    that a crash is reported as this test's failure instead of ending the test session."""
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (f"child ended with {out.returncode} (negative: killed by that signal)\n"
                                 f"{out.stderr[-2000:]}")
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and all(ln.startswith("raised: mamlpp_ext.") for ln in lines), out.stdout
    assert "but got 2 and 1" in lines[0] and "step=7" in lines[1] and "tasks=0" in lines[2], out.stdout
