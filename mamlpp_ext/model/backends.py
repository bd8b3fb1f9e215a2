"""What runs a MAML++ step: the table of backends and the one function that decides.

A *backend* says how the algorithm is computed (``BACKENDS``); a *mode* says how the step is
executed — eagerly, op by op, or captured once as a CUDA graph and replayed (NOTE [Graph mode]
in graph.py) — and whether its forward and backward run as one compiled graph (NOTE [Compiled
step] in compiled.py). ``resolve_execution`` turns (device, dataset, requested backend, requested modes)
into what runs, and says why whenever it runs something other than what was asked. The learner's
constructor and backend switch, ``MAMLPlusPlus.from_state_dict``, the trainer and the command
lines all ask it; nothing else chooses.

Backends (same algorithm, same state, same results up to float rounding) differ in three things
only: whether the tasks of a meta-batch run one at a time or all at once, which inner-loop update
op runs, and which per-step batch-norm op runs:

* ``"sequential"``: tasks one after another (each alone, T = 1), plain-PyTorch update and batch
  norm — as the public MAML++ code runs; the semantic reference.
* ``"batched"``: all T tasks at once (NOTE [Task-major layout] in network.py), plain PyTorch.
* ``"fused"``: all T tasks at once, the compiled ``ops.lslr_update``, ``ops.task_batch_norm``
  (with the activation after a batch norm fused into it) and ``ops.task_conv2d`` (whose double
  backward is a grouped convolution, not one per task); needs the compiled extension (and its
  CUDA kernels on a CUDA device).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import importlib.util
import os
import shutil
import sys

import torch

from .. import ops
from ..ops import reference

__all__ = ["BACKENDS", "DEFAULT_BACKENDS", "Backend", "Execution", "backend_unavailable", "compile_support",
           "graph_support", "report_notes", "resolve_execution"]


@dataclass(frozen=True)
class Backend:
    """How a backend runs the algorithm.

    per_task: run the tasks of a meta-batch one at a time (T = 1 each) instead of all at once.
    update: the inner-loop update, contract of ``ops.reference.lslr_update``.
    batch_norm: the per-step batch norm, contract of ``ops.reference.task_batch_norm``.
    needs_extension: the ops are the compiled ones.
    conv_layout: how the networks run their convolutions (NOTE [Convolution layout] in
        lifting.py), unless a network's ``conv_layout`` is set.
    """

    name: str
    per_task: bool
    update: Callable
    batch_norm: Callable
    needs_extension: bool
    conv_layout: str


BACKENDS: dict[str, Backend] = {
    "sequential": Backend("sequential", True, reference.lslr_update, reference.task_batch_norm, False, "grouped"),
    "batched": Backend("batched", False, reference.lslr_update, reference.task_batch_norm, False, "grouped"),
    "fused": Backend("fused", False, ops.lslr_update, ops.task_batch_norm, True, "task_conv"),
}

# NOTE [Default backend]
#     The backend a run uses when none is named: the fastest measured meta-step on that device
#     type for that dataset (benchmarks/RESULTS.md, sections "MAML++ meta-step per backend" (CPU,
#     with its mini-ImageNet subsection) and "H100 run"; s/step, second order, public networks).
#     Change an entry when new measurements say so. A missing pair falls back to
#     _FALLBACK_BACKEND; a default that cannot run here (the compiled kernels for the device are
#     not built) falls back to "batched", with a note.
DEFAULT_BACKENDS = {
    # CPU, idle 2-core machine, 2026-11-29 (RESULTS.md, "Session of 2026-11-29"): Omniglot 5-way
    # 1-shot fused 0.487 < batched 0.703 < sequential 0.929 s/step; 20-way 1-shot fused 2.073 <
    # batched 2.681 < sequential 2.842 (5 timed steps each, grouped convolutions).
    ("cpu", "omniglot"): "fused",
    # CPU, same run, mini-ImageNet 5-way 1-shot: fused 5.308 < sequential 7.175 < batched 8.402.
    ("cpu", "mini-imagenet"): "fused",
    # H100, Omniglot 20-way 1-shot: fused 0.0855 < batched 0.1080 < sequential 0.6234
    # (5-way: batched 0.1006, fused 0.1065, sequential 0.5598 -- one run each, eager steps).
    ("cuda", "omniglot"): "fused",
    # H100, mini-ImageNet 5-way 1-shot: fused 0.1009 < batched 0.1197 < sequential 0.1622.
    ("cuda", "mini-imagenet"): "fused",
}
_FALLBACK_BACKEND = "fused"


class Execution(NamedTuple):
    """What runs: ``backend`` (a name in ``BACKENDS``), ``graph`` (True: graph mode), ``notes``
    (one line per thing that runs otherwise than asked, with the reason; empty when none) and
    ``compiled`` (True: the compiled training step)."""

    backend: str
    graph: bool
    notes: tuple[str, ...]
    compiled: bool = False


def backend_unavailable(name: str, device: torch.device) -> Optional[str]:
    """None when backend ``name`` can run on ``device`` here, else why not (one line)."""
    impl = BACKENDS[name]
    if impl.needs_extension and not ops.has_extension():
        return f"backend={name!r} needs the compiled mamlpp_ext kernels, but {ops.EXTENSION_ERROR}"
    if impl.needs_extension and device.type == "cuda" and not ops.cuda_built():
        return (f"backend={name!r} needs the CUDA kernels of mamlpp_ext, but this build has none (it was "
                f"compiled without nvcc or with MAMLPP_NO_CUDA)")
    return None


def graph_support(device: torch.device, backend: str) -> Optional[str]:
    """None when graph mode can run for this device and backend, else why not (one line)."""
    if device.type != "cuda":
        return f"graph mode needs a CUDA device (CUDA graphs); this learner is on {device.type}"
    if not torch.cuda.is_available():
        return "graph mode needs CUDA, which is not available"
    if BACKENDS[backend].per_task:
        return (f"backend {backend!r} runs the tasks one by one as the plain reference; graph mode captures "
                "the batched and fused backends")
    return None


def compile_support(device: torch.device, backend: str, recompute: str = "off") -> Optional[str]:
    """None when the compiled step (NOTE [Compiled step] in compiled.py) can run for this device,
    backend and recomputation mode (``MAMLConfig.recompute``), else why not (one line)."""
    if device.type not in ("cpu", "cuda"):
        return f"the compiled step runs on cpu or cuda; this learner is on {device.type}"
    if BACKENDS[backend].per_task:
        return (f"backend {backend!r} runs the tasks one by one as the plain reference; the compiled step "
                "compiles the batched and fused backends")
    if recompute not in (None, "off"):
        return (f"the compiled step does not combine with recompute={recompute!r}: the compiler would merge the "
                "recomputed ops back into the forward and the memory saving would not hold; use one or the other")
    if device.type == "cpu":
        compilers = [os.environ.get("CXX"), "c++", "g++", "clang++"]
        if not any(c and shutil.which(c) for c in compilers):
            return "the compiled step needs a C++ compiler on the CPU (none found: set CXX or install g++)"
    elif importlib.util.find_spec("triton") is None:
        return "the compiled step needs Triton on CUDA (the triton package is not installed)"
    return None


def resolve_execution(device: torch.device | str, dataset: str = "omniglot", backend: Optional[str] = None,
                      graph: bool | str = False, *, stored_backend: Optional[str] = None,
                      compile: bool | str = False, recompute: str = "off") -> Execution:
    """Decide what runs a learner's steps.

    Args:
        device: where the learner lives.
        dataset: the config's dataset name (picks the measured default, NOTE [Default backend]).
        backend: the backend asked for by name, or None. A named backend must be able to run
            here: an unknown name is a ValueError, a compiled backend without its kernels a
            RuntimeError (both name the backend and the alternatives).
        graph: the mode asked for: False (eager), True (graph mode; a ValueError where it cannot
            run) or "auto" (graph mode where it can run, else eager with a note).
        stored_backend: the backend a checkpoint was saved with, used when ``backend`` is None
            (and replaced by the default, with a note, when it cannot run here).
        compile: the compiled training step (NOTE [Compiled step] in compiled.py): False, True (a
            ValueError where it cannot run) or "auto" (where it can run, else eager with a note).
        recompute: the config's recomputation mode (``MAMLConfig.recompute``; the compiled step
            refuses every mode but "off").

    Returns an ``Execution``.
    """
    device = torch.device(device)
    if not (graph is True or graph is False or (isinstance(graph, str) and graph == "auto")):
        raise ValueError(f"graph must be False, True or 'auto', got {graph!r}")
    if not (compile is True or compile is False or (isinstance(compile, str) and compile == "auto")):
        raise ValueError(f"compile must be False, True or 'auto', got {compile!r}")
    notes: list[str] = []
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        why = backend_unavailable(backend, device)
        if why is not None:
            others = " or ".join(repr(n) for n in BACKENDS if backend_unavailable(n, device) is None)
            raise RuntimeError(f"{why}; use backend={others}")
        chosen = backend
    else:
        chosen = None
        if stored_backend is not None:
            if stored_backend not in BACKENDS:
                notes.append(f"the stored backend {stored_backend!r} is unknown; using the default")
            elif (why := backend_unavailable(stored_backend, device)) is not None:
                notes.append(f"{why}; using the default backend instead of the stored one")
            else:
                chosen = stored_backend
        if chosen is None:
            chosen = DEFAULT_BACKENDS.get((device.type, dataset), _FALLBACK_BACKEND)
            if (why := backend_unavailable(chosen, device)) is not None:
                notes.append(f"{why}; running 'batched'")
                chosen = "batched"
    use_graph = False
    if graph is True or graph == "auto":
        why = graph_support(device, chosen)
        if why is None:
            use_graph = True
        elif graph is True:
            raise ValueError(why)
        else:
            notes.append(f"graph mode off: {why}")
    use_compile = False
    if compile is True or compile == "auto":
        why = compile_support(device, chosen, recompute)
        if why is None:
            use_compile = True
            if device.type == "cuda" and not use_graph:
                notes.append("compiled step without graph mode: its kernels are launched one by one; graph mode "
                             "(graph=True, --graph on) replays it as a CUDA graph")
        elif compile is True:
            raise ValueError(why)
        else:
            notes.append(f"compiled step off: {why}")
    return Execution(chosen, use_graph, tuple(notes), use_compile)


_REPORTED: set = set()  # notes already printed by report_notes


def report_notes(notes) -> None:
    """Print each note of an ``Execution`` on stderr as "mamlpp_ext: NOTE", once per note and process."""
    for note in notes:
        if note not in _REPORTED:
            _REPORTED.add(note)
            print(f"mamlpp_ext: {note}", file=sys.stderr, flush=True)
