"""Compiled mode: the training step's meta-loss and meta-gradients as one graph compiled by inductor.

``CompiledStep`` is a ``MetaStep`` (NOTE [Step interface] in step.py) whose
``loss_and_gradients`` — the forward and backward half of a training step — runs as one compiled
graph instead of op by op. Everything else (the outer update, the cross-process mean, evaluation)
is the eager step's, so graph mode, distributed training and every caller of the step interface
use it unchanged.

NOTE [Compiled step]
    * What is compiled: the function (meta-parameters, running statistics, support and query
      batches, MSL loss weights) -> ([loss, accuracy, T task accuracies], meta-gradients), i.e.
      the eager ``loss_and_gradients`` with ``torch.autograd.grad`` in place of ``backward``.
      It is traced once per capture key with ``make_fx`` on fake tensors (no arithmetic runs),
      which records the inner loop, its second-order graph and the outer backward as one graph
      of aten and mamlpp_ext ops (~3,000 nodes for Omniglot's VGG net, 5 steps), and compiled
      with ``torch.compile`` (inductor): generated kernels for the elementwise and reduction
      ops, extern calls (convolutions, matmuls, our ops) for the rest. The running statistics
      are graph inputs updated in place; the gradients are graph outputs, set as ``.grad``
      (None where the backward produces none, as eagerly). The clamp and Adam stay eager.
    * Capture key, as graph mode's (NOTE [Graph mode] in graph.py): the backend, MSL scoring after
      every step or the last only, first or second order (DA), the batch shapes. A new key
      traces and compiles once (logged once); the MSL weights are a graph input, so their
      per-epoch values never recompile.
    * Inductor option ``layout_optimization=False``: with it on (inductor's default) the CPU
      graph hands convolutions channels-last tensors, and oneDNN's channels-last weight
      gradient rounds the long, cancelling sums of a convolution in front of a batch norm
      several times worse (benchmarks/RESULTS.md, 2026-12-03); the second-order meta-gradients
      then drifted 5-7x further from a float64 reference than eager's. Off, the compiled step
      is as close to float64 as the eager step (benchmarks/compiled_step.py checks it).
    * Cache: inductor's on-disk caches (the FX graph and AOT autograd caches) keep the compiled
      code across runs, in ``$TORCHINDUCTOR_CACHE_DIR`` (torch's default is a folder under the
      system's temporary directory). A later run with the same graph loads it in seconds instead
      of compiling (minutes); the trace itself runs every time. A cache entry is not reused when the graph
      changes (network, shapes, dtype, backend, inner steps, MSL or order), when torch or
      the inductor options change, or when the C++/CUDA compiler changes.
    * On CUDA the compiled kernels are launched one by one unless graph mode is on too: then the
      graph runner captures the compiled step (warm-up steps compile it) and replays it.
    * Refused (``resolve_execution``): the sequential backend (tasks one by one is the plain
      reference), devices other than CPU and CUDA, no C++ compiler on the CPU or no Triton on
      CUDA, and the recomputation memory mode (the compiler would merge the recomputed ops back
      into the forward, so the memory saving would silently not hold).
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import make_fx

from .schedules import EpochPlan
from .step import MetaStep, StepTensors

__all__ = ["INDUCTOR_OPTIONS", "CompiledStep"]

#: the inductor options of the compiled step (NOTE [Compiled step])
INDUCTOR_OPTIONS = {"layout_optimization": False}


class CompiledStep(MetaStep):
    """A ``MetaStep`` whose ``loss_and_gradients`` is traced and compiled once per capture key
    (NOTE [Compiled step]).

    Args:
        learner: a ``MAMLPlusPlus`` (held weakly, as every step does).
        log: where the one line per compiled key goes.
    """

    def __init__(self, learner, log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)
                 ) -> None:
        super().__init__(learner)
        self.log = log
        self.compiles = 0
        self.compiled: dict = {}
        self.weights: Optional[Tensor] = None
        self.weight_values: Optional[list] = None

    def reset(self) -> None:
        """Forget every compiled graph (the next steps trace and compile again, or load from the
        cache)."""
        self.compiled = {}

    def loss_weights(self, weights) -> Tensor:
        """The MSL weights as a tensor in the learner's dtype on its device: a device tensor is used
        as it is (graph mode's); a list fills one kept tensor, only when its values change."""
        if isinstance(weights, Tensor):
            return weights
        lrn = self.learner
        values = [float(w) for w in weights]
        if self.weights is None or values != self.weight_values or self.weights.device != lrn.device:
            self.weights = torch.tensor(values, dtype=lrn.dtype, device=lrn.device)
            self.weight_values = values
        return self.weights

    def key(self, sx: Tensor, qx: Tensor, plan: EpochPlan) -> tuple:
        """The capture key of a step (NOTE [Compiled step])."""
        lrn = self.learner
        return (lrn.backend, bool(plan.score_every_step), bool(plan.second_order), tuple(sx.shape),
                tuple(qx.shape), lrn.dtype, str(lrn.device))

    def loss_and_gradients(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, plan: EpochPlan) -> Tensor:
        lrn = self.learner
        weights = self.loss_weights(plan.loss_weights)
        batch = (sx.contiguous(), sy.contiguous(), qx.contiguous(), qy.contiguous())
        params = lrn.parameters()
        inputs = (*params, *lrn.running_stats, *batch, weights)
        key = self.key(sx, qx, plan)
        fn = self.compiled.get(key)
        if fn is None:
            t0 = time.perf_counter()
            gm = self.trace(inputs, plan)
            t1 = time.perf_counter()
            fn = torch.compile(gm, backend="inductor", fullgraph=True, dynamic=False,
                               options=dict(INDUCTOR_OPTIONS))
            with torch.no_grad():  # the first call compiles (or loads from the cache)
                out = fn(*inputs)
            self.compiled[key] = fn
            self.compiles += 1
            nodes = sum(1 for n in gm.graph.nodes if n.op == "call_function")
            self.log(f"mamlpp_ext compiled mode: compiled the training step (backend {key[0]}, MSL every step: "
                     f"{key[1]}, second order: {key[2]}, batch {list(key[3])}/{list(key[4])}; {nodes} graph ops) "
                     f"in {time.perf_counter() - t0:.1f} s (trace {t1 - t0:.1f} s); compile {self.compiles}")
        else:
            with torch.no_grad():
                out = fn(*inputs)
        lrn.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params, out[1:]):
            p.grad = g
        return out[0]

    # ------------------------------------------------------------------ trace and compile
    def traced_body(self, params: list[Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor,
                    plan: EpochPlan) -> tuple:
        """What is traced: metrics and the gradients of the meta-loss w.r.t. ``params`` (None
        where it has none), with the step reading ``params`` (``reading`` around the call)."""
        loss, info = self.meta_loss(sx, sy, qx, qy, plan)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        acc = info["task_accuracies"]
        metrics = torch.cat([loss.detach().reshape(1), acc.mean().reshape(1), acc])
        return (metrics, *grads)

    def trace(self, inputs: tuple, plan: EpochPlan) -> torch.fx.GraphModule:
        """The step as an fx graph of aten and mamlpp_ext ops over ``inputs`` = (the learner's
        parameters, its running statistics, sx, sy, qx, qy, MSL weights), traced on fake tensors."""
        lrn = self.learner
        P, R = len(lrn.parameters()), len(lrn.running_stats)

        def step(*flat):
            ps, rs = list(flat[:P]), list(flat[P:P + R])
            sx, sy, qx, qy, w = flat[P + R:]
            with self.reading(StepTensors.from_flat(lrn, ps, rs)):
                return self.traced_body(ps, sx, sy, qx, qy, plan._replace(loss_weights=w))

        with torch.enable_grad():
            return make_fx(step, tracing_mode="fake")(*inputs)
