"""Memory of a MAML++ meta-step: counting live tensor bytes, and estimating a configuration's peak
without allocating it.

NOTE [Step memory]
    The figure this module reports is the *step peak*: the largest number of bytes held at one
    time, during ``meta_loss`` and its backward, by tensor storages created in that window — the
    saved graph, activations, inner gradients, fast weights and the meta-gradients. What exists
    before the step (θ₀, BN tables, running statistics, Adam's moments, the batch) is the
    *resident state*, reported apart. ``LiveBytes`` counts it below autograd, as a
    ``TorchDispatchMode``: every op output whose storage is new (not one of the op's inputs'
    storages: views and in-place ops allocate nothing) adds ``untyped_storage().nbytes()``; a
    ``weakref.finalize`` on the storage subtracts it when the storage is freed. The same count
    runs on real tensors (a measurement), on ``meta`` tensors (an estimate that allocates
    nothing: shapes only) and under ``FakeTensorMode``; tests/test_memory.py checks that the
    three agree on a case that fits, and that a real CPU run's count matches the allocator's own
    record (``torch.profiler`` with ``profile_memory=True``).

    What it does not see: buffers a kernel allocates internally and frees before returning
    (oneDNN / cuDNN workspaces), the CUDA caching allocator's rounding (blocks of 512 bytes) and
    its fragmentation, and the CUDA context. On a GPU, ``torch.cuda.max_memory_allocated`` minus
    the bytes allocated before the step is the allocator's view of the same quantity
    (scripts/gpu_check.sh records both).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .config import MAMLConfig, from_preset

__all__ = ["LiveBytes", "estimate_peak_memory", "format_bytes", "resident_bytes", "step_peak_bytes"]


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created while the mode is active and still alive
    (NOTE [Step memory]). ``live``: bytes now; ``peak``: the most at any time since entry or
    ``reset_peak()``. Works with real, meta and fake tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: set[int] = set()

    def reset_peak(self) -> None:
        """Start a new peak from the bytes alive now."""
        self.peak = self.live

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._alive.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._alive:
                continue
            if inputs is None:  # an output sharing an input's storage (a view, an in-place op) is not new
                inputs = {a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)}
            if key in inputs:
                continue
            nbytes = storage.nbytes()
            self._alive.add(key)
            self.live += nbytes
            weakref.finalize(storage, self._freed, key, nbytes)
        if self.live > self.peak:
            self.peak = self.live
        return out


def step_peak_bytes(learner, batch: tuple, epoch: int = 0) -> int:
    """The step peak (NOTE [Step memory]) of ``meta_loss`` + backward of ``learner`` on ``batch``
    = (sx, sy, qx, qy), validated tensors on the learner's device and dtype (labels int64).
    Runs one real training forward and backward (the running statistics are updated; the
    meta-gradients are left in ``.grad``; no outer update)."""
    from .schedules import epoch_plan

    plan = epoch_plan(learner.config, epoch)
    for p in learner.parameters():
        p.grad = None
    with LiveBytes() as counter:
        loss, _ = learner.step.meta_loss(*batch, plan)
        loss.backward()
        del loss
    return counter.peak


def resident_bytes(learner, with_adam: bool = True) -> int:
    """Bytes of the learner's state: θ₀, LSLR rates, BN tables and running statistics, plus
    Adam's two moments per meta-parameter (as after the first step) when ``with_adam``."""
    params = learner.parameters()
    n = sum(t.numel() * t.element_size() for t in params)
    n += sum(t.numel() * t.element_size() for t in learner.running_stats)
    if not learner.config.learnable_inner_lr:
        n += learner.lslr.numel() * learner.lslr.element_size()
    if with_adam:
        n += 2 * sum(t.numel() * t.element_size() for t in params)
    return n


def estimate_peak_memory(config: MAMLConfig | str, *, backend: str = "fused", network=None,
                         dtype: torch.dtype = torch.float32, epoch: int = 0, recompute: Optional[str] = None,
                         **overrides) -> dict:
    """Estimate the memory of one training meta-step of ``config`` without allocating it: the
    step runs on the ``meta`` device (shapes only, no arithmetic) under ``LiveBytes``.

    Args:
        config: a ``MAMLConfig`` or a preset name; ``overrides``: fields to change (e.g.
            ``meta_batch=4``).
        backend: which backend's step to count ("fused" by default; the backends keep
            different intermediate tensors).
        network: as ``MAMLPlusPlus``'s ``network`` argument (None: the one the config names).
        dtype: of the meta-parameters and images.
        epoch: the epoch whose step is counted (MSL on or off, first or second order follow
            the schedules).
        recompute: a ``RECOMPUTE_MODES`` value to override ``config.recompute``.

    Returns a dict: ``step_peak_bytes`` (NOTE [Step memory]), ``resident_bytes`` (learner state
    with Adam's moments), ``batch_bytes`` (one meta-batch on the device), ``total_bytes`` (their
    sum: what the device must hold, less kernel workspaces and allocator overhead), and the
    ``config`` counted. A few seconds on the CPU for the largest public cases.
    """
    from .meta_learner import MAMLPlusPlus

    if isinstance(config, str):
        config = from_preset(config)
    if recompute is not None:
        overrides["recompute"] = recompute
    if overrides:
        config = config.replace(**overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # meta tensors warn about ops that have no data
        learner = MAMLPlusPlus(config, backend=backend, device="meta", dtype=dtype, network=network)
        batch = _meta_batch(config, dtype)
        peak = step_peak_bytes(learner, batch, epoch)
    batch_bytes = sum(t.numel() * t.element_size() for t in batch)
    resident = resident_bytes(learner)
    return dict(step_peak_bytes=peak, resident_bytes=resident, batch_bytes=batch_bytes,
                total_bytes=peak + resident + batch_bytes, config=config)


def _meta_batch(config: MAMLConfig, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    T, shape = config.meta_batch, config.image_shape
    s, q = config.ways * config.shots, config.ways * config.queries
    return (torch.empty(T, s, *shape, device="meta", dtype=dtype), torch.empty(T, s, dtype=torch.int64, device="meta"),
            torch.empty(T, q, *shape, device="meta", dtype=dtype), torch.empty(T, q, dtype=torch.int64, device="meta"))


def format_bytes(n: float) -> str:
    """``n`` bytes as "1.23 GiB" / "456.7 MiB" / "12.3 KiB"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
