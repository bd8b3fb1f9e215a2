"""Graph mode: the whole MAML++ meta-step (and evaluation) captured once as a CUDA graph and replayed.

A MAML++ step is thousands of tiny kernels with static shapes; on a GPU the host launching them
one by one sets its speed. ``GraphRunner`` captures the step — inner loop with its second-order
graph, MSL-weighted query losses, outer backward, gradient clamp and Adam — into one CUDA graph
and replays it, so neither Python nor the dispatcher runs per kernel.

NOTE [Graph mode]
    * Static buffers: each batch is copied into device buffers owned by the runner (non-blocking
      from pinned memory when the loader pins). Inputs are validated on the host before the copy.
    * What varies between replays lives in device tensors updated between replays by small
      kernels (``fill_``), never by a host read: the Adam learning rate (CA; Adam runs with
      ``capturable=True`` and a tensor ``lr``) and the MSL loss weights.
    * What changes the graph's structure — the query set scored after every step (MSL active) or
      after the last only, first or second order (DA), the batch shapes — is the capture key. A
      new key runs ``warmup_steps`` ordinary eager steps (real steps, on a side stream: they
      initialise Adam's state, cuDNN's choices and the allocator), then captures the next step
      and replays it. A run sees a handful of captures, each logged once.
    * The running statistics are updated in place inside the graph. Metrics ([loss, accuracy,
      per-task accuracies]) stay on the device in the graph's output buffer; the caller reads
      them when it logs (``MAMLPlusPlus.train_step``).
    * The divergence guard (NOTE [Divergence guard] in step.py) is part of the captured step:
      its flag, count and saved statistics are device tensors allocated with the learner, and a
      step that is not finite is dropped by ``torch.where`` and fused Adam's ``found_inf``,
      without a host read.
    * With a cross-process mean (distributed training) the step is two graphs — forward and
      backward, then clamp and Adam — with the eager all-reduce between them.
    * Evaluation (first-order adaptation and query scoring) is captured per batch shape and
      step count; it never writes the learner's state.
    * No op in the captured functions may read device data on the host (``.item()``,
      ``.tolist()``, ``int(t)``, ``nonzero``, a device-to-host copy): capture would fail or
      replay would be wrong. ``check_capturable`` runs those functions on the ``meta`` device
      under ``HostSyncGuard``, where any such read raises — a check that needs no GPU (tests).
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["GraphRunner", "HostSyncError", "HostSyncGuard", "check_capturable"]


class GraphRunner:
    """Captures and replays a learner's training step and evaluation (NOTE [Graph mode]).

    Args:
        learner: a ``MAMLPlusPlus`` on a CUDA device whose optimizer is capturable with a tensor
            learning rate (``MAMLPlusPlus(..., graph=True)`` sets that up). The runner holds it
            weakly (the learner owns the runner).
        warmup_steps: eager steps run for every new capture key before capturing (>= 1: the
            first one creates Adam's state outside the graph).
        log: where the one line per capture goes.
    """

    def __init__(self, learner, warmup_steps: int = 2,
                 log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1 (Adam's state must exist before a capture), "
                             f"got {warmup_steps!r}")
        self._learner = weakref.ref(learner)
        self.device = learner.device
        self.warmup_steps = warmup_steps
        self.log = log
        self.captures = 0
        self._weights: Optional[Tensor] = None
        with torch.cuda.device(self.device):
            # warm-up steps and every capture run on streams of the learner's device (a graph
            # captured on another device's stream would be empty)
            self._side = torch.cuda.Stream(device=self.device)
            self._capture_stream = torch.cuda.Stream(device=self.device)
        self.reset()

    @property
    def learner(self):
        lrn = self._learner()
        if lrn is None:
            raise RuntimeError("GraphRunner: its learner no longer exists")
        return lrn

    def reset(self) -> None:
        """Forget every captured graph (and free their memory pools): the next steps warm up and
        capture again. Needed when tensors a graph reads are replaced (a loaded state dict, a
        switched backend)."""
        self._train_key = None
        self._train_warm = 0
        self._train: dict = {}
        self._eval: dict = {}

    # ----------------------------------------------------------------- helpers
    def _wait_side(self) -> None:
        self._side.wait_stream(torch.cuda.current_stream(self.device))

    def _join_side(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self._side)

    def _graph(self, graph: "torch.cuda.CUDAGraph", pool=None):
        # thread_local: a DataLoader's pin-memory thread may use CUDA while we capture
        return torch.cuda.graph(graph, pool=pool, stream=self._capture_stream, capture_error_mode="thread_local")

    def set_loss_weights(self, weights: list) -> Tensor:
        """The device tensor of MSL loss weights the graph reads, updated in place (no host read)."""
        lrn = self.learner
        if self._weights is None or self._weights.numel() != len(weights):
            self._weights = torch.tensor(weights, dtype=lrn.dtype, device=lrn.device)
        else:
            for i, w in enumerate(weights):
                self._weights[i].fill_(w)
        return self._weights

    @staticmethod
    def _copy_in(static: list[Tensor], batch: tuple) -> None:
        for dst, src in zip(static, batch):
            dst.copy_(src, non_blocking=True)

    # ---------------------------------------------------- the captured functions
    def train_body(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, plan) -> Tensor:
        """One whole training step on device tensors (no cross-process mean): what a single graph
        captures. Returns [loss, accuracy, task accuracies] on the device."""
        return self.learner.step.train_body(sx, sy, qx, qy, plan)

    def eval_body(self, sx, sy, qx, qy, steps: int):
        """Adaptation and query scoring of an evaluation batch: (task losses or None, logits)."""
        task_losses, logits, _ = self.learner.step.eval_body(sx, sy, qx, qy, steps)
        return (None if task_losses is None else task_losses.detach()), logits.detach()

    # ----------------------------------------------------------------- training
    def train_step(self, batch: tuple, plan) -> Tensor:
        """Copy ``batch`` (validated host or device tensors, learner dtype) in, run the step,
        return the device metrics (valid until the next step)."""
        with torch.cuda.device(self.device):
            return self._train_step(batch, plan)

    def _train_step(self, batch: tuple, plan) -> Tensor:
        lrn = self.learner
        plan = plan._replace(loss_weights=self.set_loss_weights(plan.loss_weights))
        key = (plan.score_every_step, plan.second_order, tuple(tuple(t.shape) for t in batch),
               lrn.cross_process_mean is not None)
        if key != self._train_key:
            self._train_key, self._train_warm, self._train = key, 0, {}
        if self._train_warm < self.warmup_steps:
            self._train_warm += 1
            dev_batch = [t.to(lrn.device, non_blocking=True) for t in batch]
            self._wait_side()
            with torch.cuda.stream(self._side):
                metrics = lrn.step.train_step(*dev_batch, plan)
            self._join_side()
            return metrics
        if not self._train:
            self._capture_train(batch, plan)
        g = self._train
        self._copy_in(g["static"], batch)
        g["graph"].replay()
        if "graph_b" in g:
            lrn.cross_process_mean([p.grad for p in lrn.step.gradients()] + lrn.running_stats + [g["out"][:2]])
            g["graph_b"].replay()
        return g["out"]

    def _capture_train(self, batch, plan) -> None:
        lrn = self.learner
        static = [torch.empty(t.shape, dtype=t.dtype, device=lrn.device) for t in batch]
        self._copy_in(static, batch)
        torch.cuda.synchronize(lrn.device)
        lrn.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the gradients
        g: dict = {"static": static}
        graph = torch.cuda.CUDAGraph()
        with self._graph(graph):
            if lrn.cross_process_mean is None:
                g["out"] = self.train_body(*static, plan)
            else:
                g["out"] = lrn.step.forward_backward(*static, plan)
        g["graph"] = graph
        if lrn.cross_process_mean is not None:
            lrn.step.gradients()  # allocate any gradient the backward did not produce, outside the graph
            graph_b = torch.cuda.CUDAGraph()
            with self._graph(graph_b, pool=graph.pool()):
                lrn.step.outer_update(g["out"])  # masks the metrics of a dropped step in place
            g["graph_b"] = graph_b
        self._train = g
        self.captures += 1
        self.log(f"mamlpp_ext graph mode: captured the training step (MSL every step: {plan.score_every_step}, "
                 f"second order: {plan.second_order}, batch {[tuple(t.shape) for t in batch]}"
                 f"{', two graphs around the cross-process mean' if 'graph_b' in g else ''}); capture "
                 f"{self.captures}")

    # --------------------------------------------------------------- evaluation
    def evaluate(self, sx, sy, qx, qy, steps: int):
        """(task losses or None, logits) of an evaluation batch; the outputs are copies."""
        with torch.cuda.device(self.device):
            return self._evaluate(sx, sy, qx, qy, steps)

    def _evaluate(self, sx, sy, qx, qy, steps: int):
        lrn = self.learner
        batch = tuple(t for t in (sx, sy, qx, qy) if t is not None)
        key = (steps, qy is not None, tuple(tuple(t.shape) for t in batch))
        entry = self._eval.get(key)
        if entry is None:
            self._wait_side()
            with torch.cuda.stream(self._side):  # warm-up: evaluation changes no state
                result = self.eval_body(sx, sy, qx, qy, steps)
            self._join_side()
            static = [torch.empty(t.shape, dtype=t.dtype, device=lrn.device) for t in batch]
            self._copy_in(static, batch)
            torch.cuda.synchronize(lrn.device)
            graph = torch.cuda.CUDAGraph()
            args = static if qy is not None else static + [None]
            with self._graph(graph):
                out = self.eval_body(*args, steps)
            self._eval[key] = {"graph": graph, "static": static, "out": out}
            self.captures += 1
            self.log(f"mamlpp_ext graph mode: captured evaluation ({steps} steps, batch "
                     f"{[tuple(t.shape) for t in batch]}); capture {self.captures}")
            return result
        self._copy_in(entry["static"], batch)
        entry["graph"].replay()
        losses, logits = entry["out"]
        return (None if losses is None else losses.clone()), logits.clone()


class _BodyRunner(GraphRunner):
    """The captured functions without capture (no CUDA needed): ``check_capturable``."""

    def __init__(self, learner) -> None:
        self._learner = weakref.ref(learner)
        self.device = learner.device
        self._weights = None


class HostSyncError(RuntimeError):
    """An op read device data on the host inside a function that graph mode captures."""


class HostSyncGuard(TorchDispatchMode):
    """Raises ``HostSyncError`` on ops that read device data on the host (``.item()``,
    ``bool(t)``, ``nonzero``, ...), copy device data to the host, or copy host tensors to the
    device.

    Use it with meta tensors (``check_capturable``): there every other data-dependent read
    (``.tolist()``, printing) raises too, since meta tensors hold no data. What it cannot see: host
    reads inside a custom op's device kernel (on meta the op's fake kernel runs), and code paths
    that differ by device (torch's Adam takes its single-tensor path on meta and its foreach path
    on CUDA).
    """

    SYNC_OPS = ("aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.is_nonzero", "aten.equal",
                "aten.masked_select", "aten._unique2", "aten.unique_consecutive", "aten.unique_dim")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in self.SYNC_OPS:
            raise HostSyncError(f"{func} reads device data on the host: a CUDA graph cannot capture it")
        if name in ("aten._to_copy", "aten.copy_"):
            kwargs = kwargs or {}
            src = args[1] if name == "aten.copy_" else args[0]
            dst_device = args[0].device if name == "aten.copy_" else kwargs.get("device")
            if dst_device is not None and isinstance(src, torch.Tensor):
                src_cpu, dst_cpu = src.device.type == "cpu", torch.device(dst_device).type == "cpu"
                if dst_cpu and not src_cpu:
                    raise HostSyncError(f"{func} copies {src.device.type} data to the host")
                if src_cpu and not dst_cpu:
                    # 0-d too: a 0-d host operand is read on the host when the op is recorded, so
                    # a replay would reuse the value frozen at capture time
                    raise HostSyncError(f"{func} copies host data to the device inside the captured code "
                                        f"(a capture records the value or address of the moment, not later ones)")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _adam_capturable_on_meta():
    """Let torch's fused, capturable Adam run on meta tensors (it checks the device type only)."""
    import torch.optim.adam as adam
    import torch.optim.optimizer as optimizer

    real = adam._get_capturable_supported_devices
    real_fused = optimizer._get_fused_kernels_supported_devices
    adam._get_capturable_supported_devices = lambda supports_xla=True: [*real(supports_xla), "meta"]
    optimizer._get_fused_kernels_supported_devices = lambda: [*real_fused(), "meta"]
    try:
        yield
    finally:
        adam._get_capturable_supported_devices = real
        optimizer._get_fused_kernels_supported_devices = real_fused


def _check_fused_adam_on_meta(func, args, kwargs) -> bool:
    """Fused Adam with a tensor learning rate has no meta kernel in torch: on meta, check that
    every tensor it reads is on the meta device (a host tensor would be frozen into a capture)
    and skip it (it returns nothing). True when ``func`` was that op."""
    if func is not torch.ops.aten._fused_adam_.tensor_lr:
        return False
    tensors = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else [a])
               if isinstance(t, torch.Tensor)]
    hosts = [tuple(t.shape) for t in tensors if t.device.type != "meta"]
    if hosts:
        raise HostSyncError(f"{func} reads host tensors of shapes {hosts}: a capture would freeze their values")
    return True


def check_capturable(learner, epochs=(0,), eval_steps: Optional[int] = None) -> int:
    """Run the functions graph mode captures — the training step at each of ``epochs`` (pick
    epochs on both sides of the MSL end and the DA switch) and evaluation with and without query
    labels — under ``HostSyncGuard``. ``learner``: a ``MAMLPlusPlus`` on the ``meta`` device set
    up as graph mode sets it up (``graph="check"``), so that any host read of device data raises
    (``HostSyncError``, or the meta device's own error). Returns the number of ops run. Needs no
    GPU."""
    from .schedules import epoch_plan

    if learner.device.type != "meta":
        raise ValueError(f"check_capturable needs a learner on the meta device, got {learner.device}")
    config = learner.config
    runner = _BodyRunner(learner)
    T = config.meta_batch
    shape = config.image_shape
    sx = torch.empty(T, config.ways * config.shots, *shape, device="meta")
    qx = torch.empty(T, config.ways * config.queries, *shape, device="meta")
    sy = torch.zeros(T, config.ways * config.shots, dtype=torch.int64, device="meta")
    qy = torch.zeros(T, config.ways * config.queries, dtype=torch.int64, device="meta")

    class Counting(HostSyncGuard):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counting.ops += 1
            if _check_fused_adam_on_meta(func, args, kwargs or {}):
                return None
            return super().__torch_dispatch__(func, types, args, kwargs)

    with _adam_capturable_on_meta(), Counting():
        for epoch in epochs:
            plan = epoch_plan(config, epoch)
            learner.step.set_meta_lr(plan.meta_lr)
            plan = plan._replace(loss_weights=runner.set_loss_weights(plan.loss_weights))
            runner.train_body(sx, sy, qx, qy, plan)
        runner.eval_body(sx, sy, qx, qy, eval_steps or config.eval_inner_steps)
        runner.eval_body(sx, sy, qx, None, eval_steps or config.eval_inner_steps)
    return Counting.ops
