"""Meta-training on several processes with torch.distributed (launched by ``torchrun``).

    torchrun --nproc_per_node=4 -m mamlpp_ext.training.train --preset omniglot-20way-1shot --device cuda

NOTE [Distributed meta-training]
    The meta-batch of T tasks is split across the P processes (T % P == 0): process r runs tasks
    ``b·T + r·T/P … b·T + (r+1)·T/P − 1`` of meta-batch b of the one seeded task stream
    (``EpisodeShard``), with any backend. After each backward, one flat all-reduce averages

      * every meta-gradient (θ₀, BN γ/β, LSLR rates): the mean over processes of the local
        mean-over-T/P-tasks gradients is the gradient of the mean over all T tasks, so the update
        equals the single-process update on the whole meta-batch (up to summation order);
      * every BN running-statistics buffer: the batched/fused rule (old ← (1−m)·old + m·mean over
        tasks of the task's statistics) is linear in the per-task statistics, so averaging the
        processes' buffers gives the single-process buffers exactly. The sequential backend
        updates them task after task, which is not linear that way: with it, the processes'
        buffers are averaged too, which differs from a one-process sequential run;
      * the step's loss and accuracy (so the logs show meta-batch figures), and a stop flag, so
        that a SIGINT/SIGTERM received by any process stops all of them after the same step.

    The gradient clamp runs after the reduction, on the averaged gradients, as in one process.
    Nothing overlaps the reduction with the backward: every meta-parameter is used from the
    first inner step on, so its gradient is complete only when the backward ends. The reduction
    moves ~0.5 MB (float32 Omniglot net) per step, small next to a meta-step.

    Rank 0 alone writes logs, checkpoints and plots. A checkpoint holds no process count: a
    run resumes with the same or another number of processes (the task stream is indexed by
    meta-batch, and the training state is identical on every process). Validation splits the
    fixed tasks' batches across processes and gathers the scores. A process that fails ends
    the job: torchrun stops the others; without torchrun, the others leave their next collective
    when the process group's timeout (``--dist-timeout``) expires, with an error naming it.
"""

from __future__ import annotations

import datetime
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .scoring import score_batches, summarize_scores

__all__ = ["DistributedStrategy", "flat_mean_", "init_from_env", "launched_by_torchrun", "leave_process_group"]


def launched_by_torchrun() -> bool:
    """Whether the torchrun environment (WORLD_SIZE > 1, RANK, MASTER_ADDR...) asks for several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | torch.device, timeout_s: float = 1800.0) -> torch.device:
    """Join the process group that torchrun describes in the environment; returns this process's
    device (``cuda`` becomes ``cuda:LOCAL_RANK``; ``auto`` is CUDA when available, else CPU). NCCL
    on CUDA, gloo on CPU."""
    if timeout_s <= 0:
        raise ValueError(f"--dist-timeout must be > 0 seconds, got {timeout_s}")
    if isinstance(device, str) and device.strip().lower() == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return dev


def leave_process_group(ok: bool = True) -> None:
    """Destroy the process group, if any. ``ok``: every process got here the same way (done or
    stopped together), so a barrier first makes sure none tears its connections down while
    another still uses them (which made gloo abort a process now and then). After a failure
    there is no barrier: the others may never arrive."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if ok:
        dist.barrier()
    dist.destroy_process_group()


def flat_mean_(tensors: list[torch.Tensor], world_size: Optional[int] = None) -> None:
    """Replace each tensor by its mean over the processes, in place, with one all-reduce per
    (device, dtype) group (one in practice)."""
    world = world_size or dist.get_world_size()
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for ts in groups.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for t in ts:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


class DistributedStrategy:
    """The process strategy of one of several processes of an initialised process group (NOTE
    [Process strategy] in trainer.py): rank 0 writes files, each process runs its share of every
    meta-batch, one flat all-reduce per step averages what the learner hands over, validation
    is split and gathered, and a signal on any process stops them all after the same step.

    The stop flag travels in every step's all-reduce and is accumulated on the device; it is read
    on the host every ``poll_every`` steps (every step on CPU, every 16 on CUDA, where a read per
    step would be a host sync per step), at the same step on every process, so a signal stops all
    processes within that many steps, together."""

    def __init__(self, poll_every: Optional[int] = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("DistributedStrategy needs an initialised process group (torchrun + init_from_env)")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self._agreed_stop = False
        self._stop_signal: Callable[[], Optional[int]] = lambda: None
        self._device = torch.device("cpu")
        self._poll_every = poll_every
        self._flag: Optional[torch.Tensor] = None  # max over steps of the all-reduced stop flag
        self._steps = 0

    def shard(self, stream):
        return stream.shard(self.rank, self.world_size)

    def attach(self, learner, stop_signal: Callable[[], Optional[int]]) -> None:
        self._stop_signal = stop_signal
        self._device = learner.device
        learner.cross_process_mean = self._mean_across_processes

    def _mean_across_processes(self, tensors: list[torch.Tensor]) -> None:
        ref = tensors[-1]
        flag = torch.full((1,), 1.0 if self._stop_signal() is not None else 0.0, dtype=ref.dtype, device=ref.device)
        flat_mean_(tensors + [flag], self.world_size)
        self._flag = flag if self._flag is None else torch.maximum(self._flag, flag)
        self._steps += 1
        every = self._poll_every or (1 if ref.device.type == "cpu" else 16)
        if self._steps % every == 0 and self._flag.item() > 0:
            self._agreed_stop = True

    def stop_requested(self, stop_signal: Optional[int], sync: bool = False) -> bool:
        if sync:
            flag = torch.tensor([1.0 if (stop_signal is not None or self._agreed_stop) else 0.0], device=self._device)
            if self._flag is not None:  # a signal carried by a step's all-reduce but not read yet
                flag = torch.maximum(flag, self._flag.to(flag.dtype))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self._agreed_stop = bool(flag.item() > 0)
        # Without sync, a local signal counts once the next step's all-reduce has carried it.
        return self._agreed_stop

    def validate(self, learner, dataset, progress: bool) -> dict:
        mine = range(self.rank, len(dataset), self.world_size)
        scores = score_batches([learner], dataset, mine, progress=progress and self.is_main, desc="validation")
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, scores)
        return summarize_scores([s for part in gathered for s in part])
