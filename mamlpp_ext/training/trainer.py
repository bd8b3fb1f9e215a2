"""The MAML++ training loop over a run folder: ``Trainer``.

``Trainer`` streams meta-batches (a pure function of the seed and the iteration index), calls
``MAMLPlusPlus.train_step`` (metrics read back in batches, NOTE [Step metrics]), validates on
the fixed validation tasks after every epoch, appends metrics to ``metrics.csv`` and
``metrics.jsonl`` (and TensorBoard when it imports), and
checkpoints every epoch atomically, keeping ``latest.pt`` and the best k epochs by validation
accuracy. Resuming continues a run exactly where it stopped; SIGINT/SIGTERM save a checkpoint
before exiting; a step that is not finite stops the run (NOTE [Divergence in a run]). While it
writes, the trainer holds the run folder's lock (``runlock.py``). The command line is
``mamlpp_ext.training.train`` (``mamlpp-train``); see docs/training.md.

Run folder::

    RUN/.lock                the lock, while a trainer (or a report writer) holds the folder
    RUN/config.json          resolved config, data options (absolute dataset root), backend, the
                             user network's structure record (written once)
    RUN/metrics.csv          one row per epoch
    RUN/metrics.jsonl        "train" records every ``log_every`` steps, "epoch" records (with
                             LSLR rates and MSL weights), "interrupt" and "diverged" records
    RUN/checkpoints/latest.pt           always the newest state (end of epoch or interruption)
    RUN/checkpoints/epoch-NNNN.pt       the best k epochs by validation accuracy
    RUN/checkpoints/best.json           those k, best first, with their validation accuracy
    RUN/tensorboard/                    when torch.utils.tensorboard imports

NOTE [Epoch numbers]
    Everything a user reads counts epochs from 1: the screen ("epoch 3/100"), the ``epoch``
    column of metrics.csv, the records of metrics.jsonl, best.json, the checkpoint file names
    (``epoch-0003.pt`` holds the state after the third epoch) and the reports of mamlpp-eval.
    Inside, an epoch's *index* counts from 0 (``MAMLPlusPlus.meta_step(epoch=...)``, the
    schedules), and a checkpoint's ``epoch`` field is the number of epochs done. Runs written
    when files counted from 0 still resume: their checkpoint file names are kept as they are,
    and their logs and top-k list are renumbered once, on resume.

NOTE [Divergence in a run]
    The learner drops a step whose meta-loss or meta-gradients are not finite, and every later
    one until told (NOTE [Divergence guard] in model/step.py), and reports it as NaN metrics.
    When the loop reads the metrics (NOTE [Step metrics]) and finds a NaN, it stops with
    ``TrainingDiverged`` naming the first bad meta-step and its epoch; nothing after the last
    checkpoint is saved, so the last good checkpoint stays as it was. Under torchrun the metrics
    are averaged across processes before the check, so every process stops at the same step.
    At the end of an epoch a non-finite validation loss, or a learner state that is not finite,
    stops the run the same way, before anything of that epoch is saved: a NaN state is never
    checkpointed, let alone ranked best.

NOTE [Process strategy]
    How the trainer shares work with other processes is a strategy object it is given
    (``SingleProcess`` here, ``mamlpp_ext.training.distributed.DistributedStrategy`` under
    torchrun): ``is_main`` says which process writes files, ``shard`` gives this process its
    share of every meta-batch, ``attach`` installs the learner's cross-process mean (NOTE
    [Cross-process mean] in model/meta_learner.py), ``validate`` scores the fixed tasks (a share
    per process, gathered) and ``stop_requested`` lets the processes agree to stop.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..model import Execution, MAMLConfig, MAMLPlusPlus, report_notes, resolve_execution
from ..model.schedules import epoch_plan
from . import checkpoints as ckp
from .network_record import check_user_network, user_network_record
from .run_data import DataOptions, eval_dataset, load_pools, train_dataset, with_absolute_root
from .runlock import RunLock
from .scoring import score_tasks

__all__ = ["CSV_FIELDS", "SingleProcess", "Trainer", "TrainingDiverged", "TrainingInterrupted", "check_device",
           "describe_device", "resolve_run_execution"]

#: a checkpoint's ``epochs_from``: the epoch numbers of its top-k list count from 1 (NOTE [Epoch numbers])
EPOCHS_FROM = 1

CSV_FIELDS = ["epoch", "iteration", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_ci95",
              "meta_lr", "second_order", "epoch_seconds", "steps_per_second", "val_seconds"]


class SingleProcess:
    """The process strategy of a run on one process (NOTE [Process strategy])."""

    rank = 0
    world_size = 1
    is_main = True

    def shard(self, stream):
        """The training stream this process runs: all of it."""
        return stream

    def attach(self, learner, stop_signal) -> None:
        """Nothing to average across processes (``stop_signal()``: the signal this process got, or None)."""

    def stop_requested(self, stop_signal: Optional[int], sync: bool = False) -> bool:
        """Stop when this process received a signal."""
        return stop_signal is not None

    def validate(self, learner, dataset, progress: bool) -> dict:
        """Score ``learner`` on every task of ``dataset``."""
        return score_tasks([learner], dataset, progress=progress, desc="validation")


class TrainingInterrupted(Exception):
    """Raised by ``Trainer.fit`` after it saved a checkpoint because of a signal."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint saved to {checkpoint}")
        self.signum = signum
        self.checkpoint = checkpoint


class TrainingDiverged(Exception):
    """Raised by ``Trainer.fit`` when a step (or a validation) was not finite (NOTE [Divergence in
    a run]). ``iteration``: the first bad meta-step (counted from 1), or the last step of the
    epoch whose validation failed; ``epoch``: its epoch, counted from 1; ``checkpoint``: the last
    good checkpoint (None when none was written)."""

    def __init__(self, message: str, iteration: int, epoch: int, checkpoint: Optional[Path]):
        super().__init__(message)
        self.iteration, self.epoch, self.checkpoint = iteration, epoch, checkpoint


def resolve_run_execution(device: torch.device, dataset: str, backend: Optional[str], graph: bool | str,
                          stored_backend: Optional[str] = None, compile: bool | str = False,
                          recompute: str = "off") -> Execution:
    """``model.resolve_execution`` for a run, with the command-line flag (``--backend``,
    ``--graph`` or ``--compile``) named in its errors."""
    try:
        resolve_execution(device, dataset, backend, False, stored_backend=stored_backend)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"--backend: {exc}") from None
    try:
        resolve_execution(device, dataset, backend, graph, stored_backend=stored_backend)
    except ValueError as exc:
        raise ValueError(f"--graph: {exc}") from None
    try:
        return resolve_execution(device, dataset, backend, graph, stored_backend=stored_backend, compile=compile,
                                 recompute=recompute)
    except ValueError as exc:
        raise ValueError(f"--compile: {exc}") from None



def _speed(steps_per_second: Optional[float]) -> str:
    """The epoch line's speed: steps/s, or s/step when a step takes longer than ten seconds (a
    ResNet-12 step on a CPU), so that it never reads 0.00."""
    if not steps_per_second:
        return "- steps/s"
    if steps_per_second < 0.1:
        return f"{1.0 / steps_per_second:.0f} s/step"
    return f"{steps_per_second:.2f} steps/s"

class Trainer:
    """The MAML++ training loop over a run folder.

    Args:
        config: the run's ``MAMLConfig`` (ignored with ``resume``: the checkpoint's is used).
        run_dir: the run folder (created).
        backend, device: of the ``MAMLPlusPlus`` learner (device "auto": CUDA when available,
            else CPU; backend None: the checkpoint's when resuming, else the measured default for
            the device and dataset — ``model.resolve_execution`` decides, with ``graph``).
        data: ``DataOptions`` (dataset root, split, eval seed, ...). The run records the absolute
            dataset root it loads from.
        pools: ready ``{"train", "val"}`` ``ClassPool`` s instead of loading ``config.dataset``.
        keep_top_k: epoch checkpoints kept by validation accuracy (default ``config.ensemble_top_k``).
        eval_batch_size: tasks per evaluation batch (default ``config.meta_batch``).
        log_every: steps between "train" records in metrics.jsonl (0: none).
        progress: show tqdm bars. tensorboard: also log to TensorBoard (one line says so when the
            ``tensorboard`` package is missing).
        resume: continue from ``run_dir/checkpoints/latest.pt`` (True) or from a checkpoint path.
            A checkpoint of another run folder *forks* that run into ``run_dir``, which must hold
            no run yet: the checkpoint, the epoch checkpoints its top-k list names and the logs
            up to it are copied, so the new folder stands on its own.
        handle_signals: install SIGINT/SIGTERM handlers during ``fit`` (main thread only).
        strategy: how work is shared with other processes (NOTE [Process strategy]); default
            ``SingleProcess()``.
        graph: CUDA-graph mode of the learner (False, True or "auto"; NOTE [Graph mode] in
            model/graph.py).
        break_lock: take over a run-folder lock left by a process of another host (NOTE [Run
            folder lock] in runlock.py).
        recompute: None (the config's, or the checkpoint's when resuming) or a
            ``MAMLConfig.recompute`` value that replaces it — also when resuming: recomputation
            changes the memory and time of a step, not its results (docs/memory.md).
        log: where one-line notes go (stderr).
        compile: the learner's compiled training step (False, True or "auto"; NOTE [Compiled
            step] in model/compiled.py).

    The run folder's lock is taken here (by the process that writes files) and held until
    ``fit`` returns or raises; ``fit`` and ``save_latest`` take it again when needed, ``close``
    drops it.
    """

    def __init__(self, config: Optional[MAMLConfig], run_dir: str | os.PathLike, *, backend: Optional[str] = None,
                 device: str | torch.device | None = None, data: Optional[DataOptions] = None,
                 pools: Optional[dict] = None, keep_top_k: Optional[int] = None,
                 eval_batch_size: Optional[int] = None, log_every: int = 50, progress: bool = True,
                 tensorboard: bool = True, resume: bool | str | os.PathLike = False,
                 handle_signals: bool = True, strategy=None, graph: bool | str = False, break_lock: bool = False,
                 recompute: Optional[str] = None,
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
                 compile: bool | str = False) -> None:
        self.strategy = strategy if strategy is not None else SingleProcess()
        if not self.strategy.is_main:
            progress = False
        self.log = log
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.latest_path = self.ckpt_dir / "latest.pt"
        #: how a user continues this run (the command line sets its own): the Ctrl-C note says it
        self.resume_command = f"continue it with --resume on run folder {self.run_dir}"
        created = not self.run_dir.exists()
        self._lock = RunLock(self.run_dir, "mamlpp-train", break_lock=break_lock, log=log) if self.is_main else None
        if self._lock is not None:
            self._lock.acquire()
        try:
            self._setup(config, backend, device, data, pools, keep_top_k, eval_batch_size, log_every, progress,
                        tensorboard, resume, handle_signals, graph, recompute, compile)
        except BaseException:
            self.close()
            if created and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()  # nothing half-made left behind
            raise

    def _setup(self, config, backend, device, data, pools, keep_top_k, eval_batch_size, log_every, progress,
               tensorboard, resume, handle_signals, graph, recompute, compile) -> None:
        ckpt, source_run = None, None
        if resume:
            path = self.latest_path if resume is True else Path(resume)
            if not path.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint at {path} (the run folder must hold "
                                        f"checkpoints/latest.pt from an earlier run)")
            ckpt = ckp.load_checkpoint(path)
            source_run = path.resolve().parent.parent
            if source_run == self.run_dir.resolve():
                source_run = None
            elif self.latest_path.exists():
                raise FileExistsError(f"--resume {path} --run-dir {self.run_dir}: that run folder already holds a run "
                                      f"({self.latest_path}); a run forked from another run's checkpoint needs a new "
                                      f"or empty --run-dir")
            config = MAMLConfig.from_dict(ckpt["config"])
            data = DataOptions.from_dict(ckpt["data"]) if data is None else data
        elif self.latest_path.exists():
            raise FileExistsError(f"run folder {self.run_dir} already holds {self.latest_path}; pass --resume to "
                                  f"continue it or choose another --run-dir")
        if not isinstance(config, MAMLConfig):
            raise TypeError(f"config must be a MAMLConfig, got {type(config).__name__}")
        if recompute is not None and recompute != config.recompute:
            config = config.replace(recompute=recompute)
        self.config = config
        self.data = data or DataOptions()
        self.device = check_device(device)
        self.execution = resolve_run_execution(self.device, config.dataset, backend, graph,
                                               stored_backend=ckpt["backend"] if ckpt is not None else None,
                                               compile=compile, recompute=config.recompute)
        self.backend = self.execution.backend
        self.keep_top_k = config.ensemble_top_k if keep_top_k is None else int(keep_top_k)
        if self.keep_top_k < 1:
            raise ValueError(f"keep_top_k must be >= 1, got {keep_top_k}")
        self.eval_batch_size = int(eval_batch_size or config.meta_batch)
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        self.log_every = int(log_every)
        self.progress = bool(progress)
        self.handle_signals = handle_signals

        if config.meta_batch % self.strategy.world_size:
            raise ValueError(f"meta_batch={config.meta_batch} tasks cannot be split evenly across "
                             f"{self.strategy.world_size} processes; choose a meta_batch divisible by the number "
                             f"of processes")
        if pools is None:  # the run records the absolute root it loads from
            self.data = with_absolute_root(config, self.data)
        # a user's network: its structure is recorded with the run and checked on resume
        if ckpt is not None:
            self.network_record = ckpt.get("network")
            where = self.latest_path if resume is True else Path(resume)
            check_user_network(self.network_record, config, f"checkpoint {where}")
        else:
            self.network_record = user_network_record(config)
        if self.strategy.is_main:
            report_notes(self.execution.notes)
        try:
            self.learner = MAMLPlusPlus(config, backend=self.backend, device=self.device, graph=self.execution.graph,
                                        compile=self.execution.compiled)
        except (ValueError, TypeError) as exc:
            if self.network_record is None:
                raise
            raise type(exc)(f"--network {config.network}: {exc}") from None
        self.pools = pools if pools is not None else load_pools(config, self.data, progress=progress)
        for name in ("train", "val"):
            if name not in self.pools:
                raise ValueError(f"pools must hold a {name!r} ClassPool")
        self.train_set = self.strategy.shard(train_dataset(self.pools["train"], config))
        self.val_set = eval_dataset(self.pools["val"], config, self.data, config.eval_tasks, self.eval_batch_size)

        self.epoch = 0  # epochs done = index of the next epoch to run
        self.iteration = 0  # meta-steps done
        self.epoch_sums = {"loss": 0.0, "accuracy": 0.0, "steps": 0, "seconds": 0.0, "timed_steps": 0}
        self._window = {"loss": 0.0, "accuracy": 0.0, "steps": 0}  # of the next "train" log record
        self.best: list[dict] = []  # [{"epoch" (from 1), "val_accuracy", "path"}], best first
        self._stop: Optional[int] = None
        self._saved: Optional[tuple[int, int]] = None  # (epochs done, iteration) of latest.pt on disk
        self._clock: Optional[tuple[float, int]] = None  # (time, iteration) the epoch's timing started at
        if ckpt is not None:
            self._restore(ckpt)
            self._saved = (self.epoch, self.iteration)
            if source_run is not None and self.is_main:
                self._adopt_fork(source_run, Path(resume))
            if self.is_main:
                self._renumber_old_logs(ckpt)
            self._truncate_logs()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if ckpt is None and self.is_main:
            self._clear_leftovers()
        if self.is_main and not (self.run_dir / "config.json").exists():
            self._write(self.run_dir / "config.json", lambda p: ckp.atomic_write_text(p, json.dumps(
                {"config": config.to_dict(), "data": self.data.to_dict(), "backend": self.backend,
                 "keep_top_k": self.keep_top_k, "eval_batch_size": self.eval_batch_size,
                 "network": self.network_record,
                 **({"forked_from": str(Path(resume).resolve())} if source_run is not None else {})},
                indent=2) + "\n"))
        self._tb = self._open_tensorboard() if tensorboard and self.is_main else None
        self.strategy.attach(self.learner, lambda: self._stop)

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs and checkpoints."""
        return self.strategy.is_main

    # ------------------------------------------------------------- the run folder's lock
    def close(self) -> None:
        """Release the run folder's lock (a later ``fit`` or ``save_latest`` takes it again)."""
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _hold_lock(self) -> bool:
        """Take the lock if this process writes and does not hold it; True when it was taken now."""
        if self._lock is None or self._lock.held:
            return False
        self._lock.acquire()
        return True

    def _stop_requested(self, sync: bool = False) -> bool:
        """Whether to stop now: a SIGINT/SIGTERM was received (by any process when distributed;
        ``sync``: at a point every process reaches together, e.g. the end of an epoch)."""
        if not self.strategy.stop_requested(self._stop, sync):
            return False
        if self._stop is None:
            self._stop = signal.SIGTERM  # another process was signalled: stop as if this one was
        return True

    # ------------------------------------------------------------- state
    def _timing(self) -> tuple[float, int]:
        """(training seconds, steps they cover) of the unfinished epoch, across resumes."""
        s = self.epoch_sums
        seconds, steps = float(s.get("seconds", 0.0)), int(s.get("timed_steps", 0))
        if self._clock is not None:
            t0, it0 = self._clock
            seconds += time.perf_counter() - t0
            steps += self.iteration - it0
        return seconds, steps

    def _checkpoint(self, val: Optional[dict], interrupted: bool = False) -> dict:
        seconds, steps = self._timing()
        sums = {**self.epoch_sums, "seconds": seconds, "timed_steps": steps} if val is None else dict(self.epoch_sums)
        return {"format": ckp.CHECKPOINT_FORMAT, "learner": self.learner.state_dict(),
                "config": self.config.to_dict(), "data": self.data.to_dict(), "backend": self.backend,
                "epoch": self.epoch, "iteration": self.iteration, "epoch_sums": sums,
                "log_window": dict(self._window),
                "rng": ckp.rng_state(), "best": [dict(b) for b in self.best], "keep_top_k": self.keep_top_k,
                "val": val, "interrupted": interrupted, "network": self.network_record, "epochs_from": EPOCHS_FROM}

    def _restore(self, ckpt: dict) -> None:
        self.learner.load_state_dict(ckpt["learner"])
        self.epoch, self.iteration = int(ckpt["epoch"]), int(ckpt["iteration"])
        self.epoch_sums = {"seconds": 0.0, "timed_steps": 0, **ckpt["epoch_sums"]}
        self._window = dict(ckpt.get("log_window", {"loss": 0.0, "accuracy": 0.0, "steps": 0}))
        shift = 0 if ckpt.get("epochs_from") == EPOCHS_FROM else 1  # NOTE [Epoch numbers]
        self.best = [{**b, "epoch": int(b["epoch"]) + shift} for b in ckpt["best"]]
        ckp.set_rng_state(ckpt["rng"])

    def _adopt_fork(self, source_run: Path, checkpoint: Path) -> None:
        """Make a run forked from ``checkpoint`` (of run folder ``source_run``) stand on its own:
        copy the checkpoint as latest.pt, the epoch checkpoints its top-k list names (an entry
        whose file is gone from the source is dropped, with a note) and the source's logs."""
        src_ckpts = source_run / "checkpoints"
        kept = []
        for b in self.best:
            src = src_ckpts / b["path"]
            if src.is_file():
                self._write(self.ckpt_dir / b["path"], lambda p, src=src: ckp.atomic_copy(src, p))
                kept.append(b)
            else:
                self.log(f"mamlpp-train: fork: {src} no longer exists; epoch {b['epoch']} leaves the top-k list")
        self.best = kept
        self._write(self.latest_path, lambda p: ckp.atomic_copy(checkpoint, p))
        self._write(self.ckpt_dir / "best.json", lambda p: ckp.atomic_write_text(p, json.dumps(kept, indent=2) + "\n"))
        for name in ("metrics.csv", "metrics.jsonl"):
            if (source_run / name).is_file():
                self._write(self.run_dir / name, lambda p, name=name: ckp.atomic_copy(source_run / name, p))
        self.log(f"mamlpp-train: forked {checkpoint} into {self.run_dir}: copied it, {len(kept)} top-k checkpoint(s) "
                 f"and the logs up to it")

    def _clear_leftovers(self) -> None:
        """A new run in a folder whose earlier run stopped before its first checkpoint: that run's
        config and logs describe nothing resumable, and would mix with this run's. They go."""
        names = [n for n in ("config.json", "metrics.csv", "metrics.jsonl") if (self.run_dir / n).exists()]
        if not names:
            return
        for n in names:
            (self.run_dir / n).unlink()
        self.log(f"mamlpp-train: {self.run_dir} held {', '.join(names)} of a run that saved no checkpoint; "
                 f"starting afresh")

    def _renumber_old_logs(self, ckpt: dict) -> None:
        """Logs of a run written when epochs counted from 0 count from 1 from now on (NOTE [Epoch
        numbers]). Idempotent: a file whose epochs already start at 1 is left alone."""
        if ckpt.get("epochs_from") == EPOCHS_FROM:
            return
        cf = self.run_dir / "metrics.csv"
        if cf.exists():
            rows = _csv_rows(cf)
            if rows and min(int(r["epoch"]) for r in rows) == 0:
                rows = [{**r, "epoch": int(r["epoch"]) + 1} for r in rows]
                self._write(cf, lambda p: ckp.atomic_write_text(p, _csv_text(rows, header=True)))
        jl = self.run_dir / "metrics.jsonl"
        if jl.exists():
            recs = _jsonl_records(jl)
            if any(r.get("epoch") == 0 for r in recs):
                text = "".join(json.dumps({**r, "epoch": r["epoch"] + 1} if isinstance(r.get("epoch"), int) else r)
                               + "\n" for r in recs)
                self._write(jl, lambda p: ckp.atomic_write_text(p, text))

    def _truncate_logs(self) -> None:
        """Drop log records written after the checkpoint we resume from (a crash can leave some,
        and a torn last line after a full disk)."""
        if not self.is_main:
            return
        jl = self.run_dir / "metrics.jsonl"
        if jl.exists():
            keep = [r for r in _jsonl_records(jl) if r.get("iteration", 0) <= self.iteration]
            self._write(jl, lambda p: ckp.atomic_write_text(p, "".join(json.dumps(r) + "\n" for r in keep)))
        cf = self.run_dir / "metrics.csv"
        if cf.exists():
            rows = [r for r in _csv_rows(cf) if int(r["epoch"]) <= self.epoch]
            self._write(cf, lambda p: ckp.atomic_write_text(p, _csv_text(rows, header=True)))

    def _write(self, path: Path, write: Callable[[Path], None]) -> None:
        """``write(path)``, with a failure turned into a one-line ``WriteError`` (NOTE [Write
        errors] in checkpoints.py)."""
        try:
            write(path)
        except OSError as exc:
            if isinstance(exc, ckp.WriteError):
                raise
            why = exc.strerror or str(exc) or type(exc).__name__
            if self._saved is not None and path.suffix == ".pt":
                kept = (f"the previous checkpoint {self.latest_path} (epoch {self._saved[0]} done, meta-step "
                        f"{self._saved[1]}) is intact; free some space and continue with --resume")
            elif path.suffix == ".pt":
                kept = "no checkpoint of this run existed yet; free some space and start it again"
            else:
                kept = "the previous version of the file is intact; free some space and continue with --resume"
            raise ckp.WriteError(f"cannot write {path}: {why}; {kept}", exc.errno) from exc

    def save_latest(self, val: Optional[dict] = None, interrupted: bool = False) -> Path:
        """Write ``checkpoints/latest.pt`` (main process only); returns its path."""
        if not self.is_main:
            return self.latest_path
        took = self._hold_lock()
        try:
            self._write(self.latest_path, lambda p: ckp.atomic_save(self._checkpoint(val, interrupted), p))
            self._saved = (self.epoch, self.iteration)
        finally:
            if took:
                self.close()
        return self.latest_path

    def _save_epoch(self, epoch: int, val: dict) -> None:
        """Write latest.pt, and epoch-NNNN.pt when it ranks in the top k; drop the ones that fell
        out. ``epoch``: the epoch just done, counted from 1."""
        path = self.ckpt_dir / f"epoch-{epoch:04d}.pt"
        ranked = sorted(self.best + [{"epoch": epoch, "val_accuracy": val["accuracy"], "path": path.name}],
                        key=lambda b: (-b["val_accuracy"], b["epoch"]))
        kept, dropped = ranked[:self.keep_top_k], ranked[self.keep_top_k:]
        state = self._checkpoint(val) | {"best": [dict(b) for b in kept]}
        if any(b["epoch"] == epoch for b in kept):
            self._write(path, lambda p: ckp.atomic_save(state, p))
        self._write(self.latest_path, lambda p: ckp.atomic_save(state, p))
        self.best = kept
        self._saved = (self.epoch, self.iteration)
        self._write(self.ckpt_dir / "best.json", lambda p: ckp.atomic_write_text(p, json.dumps(kept, indent=2) + "\n"))
        for b in dropped:
            (self.ckpt_dir / b["path"]).unlink(missing_ok=True)

    # ------------------------------------------------------------- logging
    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as exc:  # noqa: BLE001  (tensorboard not installed)
            self.log(f"mamlpp-train: no TensorBoard logs: {type(exc).__name__}: {exc} (pip install tensorboard; "
                     f"--no-tensorboard turns this note off); metrics.csv and metrics.jsonl are written as always")
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _append(self, name: str, text: str) -> None:
        def write(path: Path) -> None:
            with open(path, "a", newline="") as f:
                f.write(text)
                f.flush()

        self._write(self.run_dir / name, write)

    def _log_json(self, record: dict) -> None:
        if self.is_main:
            self._append("metrics.jsonl", json.dumps(record) + "\n")

    def _log_epoch(self, row: dict, extra: dict) -> None:
        if not self.is_main:
            return
        path = self.run_dir / "metrics.csv"
        self._append("metrics.csv", _csv_text([row], header=not path.exists()))
        self._log_json({"kind": "epoch", **row, **extra})
        if self._tb is not None:
            for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "meta_lr"):
                self._tb.add_scalar(k, row[k], row["epoch"])
            self._tb.flush()

    # ------------------------------------------------------------- loop
    def validate(self) -> dict:
        """Score the learner on the fixed validation tasks: accuracy, ci95, loss, ..."""
        return self.strategy.validate(self.learner, self.val_set, self.progress)

    def _on_signal(self, signum, frame) -> None:
        first = self._stop is None
        self._stop = signum
        # a second signal stops at once, without a checkpoint
        signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)
        if first and self.is_main:
            again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
            self.log(f"\nmamlpp-train: {signal.Signals(signum).name} received: stopping after the current meta-step "
                     f"and saving {self.latest_path}; then {self.resume_command}. ({again} again stops at once, "
                     f"without saving)")

    def fit(self, stop_at_iteration: Optional[int] = None) -> dict:
        """Train until ``config.total_epochs`` are done; returns the last epoch's metrics row.

        ``stop_at_iteration`` stops early once that many meta-steps are done, after saving
        ``latest.pt`` as an interruption would (used to test resuming). A SIGINT/SIGTERM makes
        it save ``latest.pt`` and raise ``TrainingInterrupted``; a step or validation that is not
        finite raises ``TrainingDiverged`` (NOTE [Divergence in a run]). The run folder's lock is
        held until it returns.
        """
        self._hold_lock()
        handlers = {}
        try:
            if self.handle_signals:
                import threading

                if threading.current_thread() is threading.main_thread():
                    for s in (signal.SIGINT, signal.SIGTERM):
                        handlers[s] = signal.signal(s, self._on_signal)
            return self._fit(stop_at_iteration)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            if self._tb is not None:
                self._tb.flush()
            self.close()

    def _fit(self, stop_at_iteration: Optional[int]) -> dict:
        cfg = self.config
        I, E = cfg.iterations_per_epoch, cfg.total_epochs  # noqa: E741  (the paper's names)
        last_row: dict = {}
        if self.iteration >= E * I:
            return last_row
        pin = self.learner.graph is not None  # graph mode copies each batch into its buffers asynchronously
        batches = iter(self.train_set.loader(start=self.iteration, num_workers=self.data.num_workers,
                                             pin_memory=pin))
        self._pending: list = []  # per-step device metrics not read yet (NOTE [Step metrics])
        while self.epoch < E:
            epoch = self.epoch
            self._clock = (time.perf_counter(), self.iteration)
            done_in_epoch = self.iteration - epoch * I
            bar = None
            if self.progress:
                from tqdm import tqdm

                bar = tqdm(total=I, initial=done_in_epoch, desc=f"epoch {epoch + 1}/{E}", unit="step",
                           dynamic_ncols=True, leave=True)
            try:
                for _ in range(done_in_epoch, I):
                    stats = self.learner.train_step(*next(batches), epoch=epoch)
                    self.iteration += 1
                    self._pending.append(stats[:2].clone() if pin else stats[:2])
                    if bar is not None:
                        bar.update(1)
                    stop = self._stop_requested() or (stop_at_iteration is not None
                                                      and self.iteration >= stop_at_iteration)
                    if (len(self._pending) >= 100 or stop or self.iteration == (epoch + 1) * I
                            or (self.log_every and self.iteration % self.log_every == 0)):
                        self._read_metrics(epoch, bar)
                    if stop:
                        break
            finally:
                if bar is not None:
                    bar.close()
            if self.iteration < (epoch + 1) * I:  # stopped mid-epoch
                return self._interrupt()
            train_seconds, timed_steps = self._timing()
            self._clock = None
            t1 = time.perf_counter()
            val = self.validate()
            val_seconds = time.perf_counter() - t1
            self._check_finite_after_epoch(epoch, val)
            s = self.epoch_sums
            steps = max(s["steps"], 1)
            plan = epoch_plan(cfg, epoch)
            row = {"epoch": epoch + 1, "iteration": self.iteration, "train_loss": s["loss"] / steps,
                   "train_accuracy": s["accuracy"] / steps, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                   "val_ci95": val["ci95"], "meta_lr": plan.meta_lr,
                   "second_order": plan.second_order,
                   "epoch_seconds": round(train_seconds, 3),
                   "steps_per_second": round(timed_steps / train_seconds, 4) if train_seconds > 0 else None,
                   "val_seconds": round(val_seconds, 3)}
            extra = {"msl_weights": plan.loss_weights,
                     "lslr": self.learner.lslr.detach().cpu().tolist(),
                     "lslr_names": self.learner.fast_weight_names, "val_num_tasks": val["num_tasks"]}
            self.epoch += 1
            self.epoch_sums = {"loss": 0.0, "accuracy": 0.0, "steps": 0, "seconds": 0.0, "timed_steps": 0}
            self._log_epoch(row, extra)
            if self.is_main:
                self._save_epoch(epoch + 1, {k: val[k] for k in ("accuracy", "ci95", "loss", "num_tasks")})
            last_row = row
            msg = (f"epoch {epoch + 1}/{E}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} | "
                   f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f} ± {val['ci95']:.4f} | "
                   f"{_speed(row['steps_per_second'])}")
            if (self.progress or self.log_every) and self.is_main:
                print(msg, file=sys.stderr, flush=True)
            if self._stop_requested(sync=True):
                return self._interrupt()
            if stop_at_iteration is not None and self.iteration >= stop_at_iteration and self.epoch < E:
                return self._interrupt()
        return last_row

    # NOTE [Step metrics]
    #     A step's loss and accuracy stay on the device (``MAMLPlusPlus.train_step``); the loop
    #     keeps them and reads them in one transfer at log points, at the end of an epoch, before
    #     stopping, and at least every 100 steps. Then they are summed on the host one step at a
    #     time, in order, so the epoch sums and the "train" records' window (both checkpointed) do
    #     not depend on when they were read: a resumed run logs what an uninterrupted one does.
    #     A NaN there is a dropped step (NOTE [Divergence in a run]).
    def _read_metrics(self, epoch: int, bar) -> None:
        if not self._pending:
            return
        rows = torch.stack(self._pending).tolist()
        first = self.iteration - len(rows) + 1
        self._pending = []
        s, w = self.epoch_sums, self._window
        for it, (loss, acc) in enumerate(rows, start=first):
            if not math.isfinite(loss):
                self._diverged(it, epoch)
            s["loss"] += loss
            s["accuracy"] += acc
            s["steps"] += 1
            w["loss"] += loss
            w["accuracy"] += acc
            w["steps"] += 1
            if self.log_every and it % self.log_every == 0:
                self._log_json({"kind": "train", "epoch": epoch + 1, "iteration": it,
                                "loss": w["loss"] / w["steps"], "accuracy": w["accuracy"] / w["steps"],
                                "meta_lr": self.learner.meta_lr(epoch)})
                self._window = w = {"loss": 0.0, "accuracy": 0.0, "steps": 0}
        if bar is not None:
            bar.set_postfix(loss=f"{s['loss'] / s['steps']:.3f}", acc=f"{s['accuracy'] / s['steps']:.3f}",
                            refresh=False)

    def _last_good(self) -> str:
        if self._saved is None:
            return "no checkpoint was written before it"
        return (f"the last good checkpoint, {self.latest_path} (epoch {self._saved[0]} done, meta-step "
                f"{self._saved[1]}), is kept as it was")

    def _diverged(self, iteration: int, epoch: int) -> None:
        """Stop at the dropped meta-step ``iteration`` of epoch index ``epoch``."""
        I = self.config.iterations_per_epoch  # noqa: E741
        self._log_json({"kind": "diverged", "epoch": epoch + 1, "iteration": iteration})
        raise TrainingDiverged(
            f"training diverged at meta-step {iteration} (epoch {epoch + 1} of {self.config.total_epochs}, step "
            f"{iteration - epoch * I} of {I}): the meta-loss or a meta-gradient was not finite. That step and any "
            f"after it were not applied, and nothing after the last checkpoint was saved: {self._last_good()}. Lower "
            f"inner_lr or meta_lr, or set grad_clamp (--set), and start a new run",
            iteration, epoch + 1, self.latest_path if self._saved is not None else None)

    def _check_finite_after_epoch(self, epoch: int, val: dict) -> None:
        """Stop before saving anything of epoch index ``epoch`` when its validation loss or the
        learner's state is not finite (the step guard keeps the state finite: this is the last
        line of defence of "never a NaN checkpoint")."""
        tensors = [t.detach() for t in self.learner.parameters() + self.learner.running_stats]
        finite = bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
        if finite and math.isfinite(val["loss"]):
            return
        what = "the validation loss" if finite else "the learner's state"
        self._log_json({"kind": "diverged", "epoch": epoch + 1, "iteration": self.iteration, "in": "validation"})
        raise TrainingDiverged(
            f"training diverged in epoch {epoch + 1} of {self.config.total_epochs}: {what} is not finite after "
            f"meta-step {self.iteration}; nothing of this epoch was saved: {self._last_good()}. Lower inner_lr or "
            f"meta_lr (or eval_inner_steps), or set grad_clamp, and start a new run",
            self.iteration, epoch + 1, self.latest_path if self._saved is not None else None)

    def _interrupt(self) -> dict:
        path = self.save_latest(interrupted=True) if self.is_main else self.latest_path
        I = self.config.iterations_per_epoch  # noqa: E741
        self._log_json({"kind": "interrupt", "epoch": max(1, -(-self.iteration // I)), "iteration": self.iteration,
                        "signal": None if self._stop is None else signal.Signals(self._stop).name})
        if self._stop is not None:
            raise TrainingInterrupted(self._stop, path)
        return {"interrupted": True, "epoch": self.epoch, "iteration": self.iteration}


def describe_device(requested, device: torch.device) -> str:
    """One line for the start of a command: the device used and, for "auto", why."""
    if isinstance(requested, str) and requested.strip().lower() == "auto":
        why = "a CUDA device is available" if device.type == "cuda" else "no CUDA device is available"
        return f"device {device} (--device auto: {why})"
    return f"device {device}"


def _csv_text(rows: list[dict], header: bool) -> str:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    if header:
        w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def _csv_rows(path: Path) -> list[dict]:
    """The rows of metrics.csv whose epoch reads as a number (a torn last row is dropped)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        try:
            int(r["epoch"])
        except (TypeError, ValueError, KeyError):
            continue
        out.append(r)
    return out


def _jsonl_records(path: Path) -> list[dict]:
    """The records of metrics.jsonl that parse (a torn last line is dropped)."""
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict):
            out.append(r)
    return out


def check_device(device) -> torch.device:
    """``device`` as a ``torch.device`` ("auto": CUDA when available, else CPU; None: CPU);
    a ValueError naming ``--device`` when it cannot be parsed or CUDA is asked for but absent."""
    if isinstance(device, str) and device.strip().lower() == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device: cannot parse {device!r} ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return dev
