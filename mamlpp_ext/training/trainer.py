"""The MAML++ training loop over a run folder: ``Trainer``.

``Trainer`` streams meta-batches (a pure function of the seed and the iteration index), calls
``MAMLPlusPlus.train_step`` (metrics read back in batches, NOTE [Step metrics]), validates on
the fixed validation tasks after every epoch, appends metrics to ``metrics.csv`` and
``metrics.jsonl`` (and TensorBoard when it imports), and
checkpoints every epoch atomically, keeping ``latest.pt`` and the best k epochs by validation
accuracy. Resuming continues a run exactly where it stopped; SIGINT/SIGTERM save a checkpoint
before exiting. The command line is ``mamlpp_ext.training.train`` (``mamlpp-train``); see
docs/training.md.

Run folder::

    RUN/config.json          resolved config, data options, backend (written once)
    RUN/metrics.csv          one row per epoch
    RUN/metrics.jsonl        "train" records every ``log_every`` steps, "epoch" records (with
                             LSLR rates and MSL weights), "interrupt" records
    RUN/checkpoints/latest.pt           always the newest state (end of epoch or interruption)
    RUN/checkpoints/epoch-NNNN.pt       the best k epochs by validation accuracy
    RUN/checkpoints/best.json           those k, best first, with their validation accuracy
    RUN/tensorboard/                    when torch.utils.tensorboard imports

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
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ..model import Execution, MAMLConfig, MAMLPlusPlus, report_notes, resolve_execution
from ..model.schedules import epoch_plan
from . import checkpoints as ckp
from .run_data import DataOptions, eval_dataset, load_pools, train_dataset
from .scoring import score_tasks

__all__ = ["CSV_FIELDS", "SingleProcess", "Trainer", "TrainingInterrupted", "check_device", "describe_device",
           "resolve_run_execution"]

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


class Trainer:
    """The MAML++ training loop over a run folder.

    Args:
        config: the run's ``MAMLConfig`` (ignored with ``resume``: the checkpoint's is used).
        run_dir: the run folder (created).
        backend, device: of the ``MAMLPlusPlus`` learner (device "auto": CUDA when available,
            else CPU; backend None: the checkpoint's when resuming, else the measured default for
            the device and dataset — ``model.resolve_execution`` decides, with ``graph``).
        data: ``DataOptions`` (dataset root, split, eval seed, ...).
        pools: ready ``{"train", "val"}`` ``ClassPool`` s instead of loading ``config.dataset``.
        keep_top_k: epoch checkpoints kept by validation accuracy (default ``config.ensemble_top_k``).
        eval_batch_size: tasks per evaluation batch (default ``config.meta_batch``).
        log_every: steps between "train" records in metrics.jsonl (0: none).
        progress: show tqdm bars. tensorboard: also log to TensorBoard when it imports.
        resume: continue from ``run_dir/checkpoints/latest.pt`` (True) or from a checkpoint path.
        handle_signals: install SIGINT/SIGTERM handlers during ``fit`` (main thread only).
        strategy: how work is shared with other processes (NOTE [Process strategy]); default
            ``SingleProcess()``.
        graph: CUDA-graph mode of the learner (False, True or "auto"; NOTE [Graph mode] in
            model/graph.py).
        compile: the learner's compiled training step (False, True or "auto"; NOTE [Compiled
            step] in model/compiled.py).
    """

    def __init__(self, config: Optional[MAMLConfig], run_dir: str | os.PathLike, *, backend: Optional[str] = None,
                 device: str | torch.device | None = None, data: Optional[DataOptions] = None,
                 pools: Optional[dict] = None, keep_top_k: Optional[int] = None,
                 eval_batch_size: Optional[int] = None, log_every: int = 50, progress: bool = True,
                 tensorboard: bool = True, resume: bool | str | os.PathLike = False,
                 handle_signals: bool = True, strategy=None, graph: bool | str = False,
                 compile: bool | str = False) -> None:
        self.strategy = strategy if strategy is not None else SingleProcess()
        if not self.strategy.is_main:
            progress = False
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.latest_path = self.ckpt_dir / "latest.pt"
        ckpt = None
        if resume:
            path = self.latest_path if resume is True else Path(resume)
            if not path.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint at {path} (the run folder must hold "
                                        f"checkpoints/latest.pt from an earlier run)")
            ckpt = ckp.load_checkpoint(path)
            config = MAMLConfig.from_dict(ckpt["config"])
            data = DataOptions.from_dict(ckpt["data"]) if data is None else data
        elif self.latest_path.exists():
            raise FileExistsError(f"run folder {self.run_dir} already holds {self.latest_path}; pass --resume to "
                                  f"continue it or choose another --run-dir")
        if not isinstance(config, MAMLConfig):
            raise TypeError(f"config must be a MAMLConfig, got {type(config).__name__}")
        self.config = config
        self.data = data or DataOptions()
        self.device = check_device(device)
        self.execution = resolve_run_execution(self.device, config.dataset, backend, graph,
                                               stored_backend=ckpt["backend"] if ckpt is not None else None,
                                               compile=compile, recompute=getattr(config, "recompute", "off"))
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
        if self.strategy.is_main:
            report_notes(self.execution.notes)
        self.learner = MAMLPlusPlus(config, backend=self.backend, device=self.device, graph=self.execution.graph,
                                    compile=self.execution.compiled)
        self.pools = pools if pools is not None else load_pools(config, self.data)
        for name in ("train", "val"):
            if name not in self.pools:
                raise ValueError(f"pools must hold a {name!r} ClassPool")
        self.train_set = self.strategy.shard(train_dataset(self.pools["train"], config))
        self.val_set = eval_dataset(self.pools["val"], config, self.data, config.eval_tasks, self.eval_batch_size)

        self.epoch = 0  # next epoch to run
        self.iteration = 0  # meta-steps done
        self.epoch_sums = {"loss": 0.0, "accuracy": 0.0, "steps": 0}
        self._window = {"loss": 0.0, "accuracy": 0.0, "steps": 0}  # of the next "train" log record
        self.best: list[dict] = []  # [{"epoch", "val_accuracy", "path"}], best first
        self._stop: Optional[int] = None
        if ckpt is not None:
            self._restore(ckpt)
            self._truncate_logs()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main and not (self.run_dir / "config.json").exists():
            ckp.atomic_write_text(self.run_dir / "config.json", json.dumps(
                {"config": config.to_dict(), "data": self.data.to_dict(), "backend": self.backend,
                 "keep_top_k": self.keep_top_k, "eval_batch_size": self.eval_batch_size}, indent=2) + "\n")
        self._tb = self._open_tensorboard() if tensorboard and self.is_main else None
        self.strategy.attach(self.learner, lambda: self._stop)

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs and checkpoints."""
        return self.strategy.is_main

    def _stop_requested(self, sync: bool = False) -> bool:
        """Whether to stop now: a SIGINT/SIGTERM was received (by any process when distributed;
        ``sync``: at a point every process reaches together, e.g. the end of an epoch)."""
        if not self.strategy.stop_requested(self._stop, sync):
            return False
        if self._stop is None:
            self._stop = signal.SIGTERM  # another process was signalled: stop as if this one was
        return True

    # ------------------------------------------------------------- state
    def _checkpoint(self, val: Optional[dict], interrupted: bool = False) -> dict:
        return {"format": ckp.CHECKPOINT_FORMAT, "learner": self.learner.state_dict(),
                "config": self.config.to_dict(), "data": self.data.to_dict(), "backend": self.backend,
                "epoch": self.epoch, "iteration": self.iteration, "epoch_sums": dict(self.epoch_sums),
                "log_window": dict(self._window),
                "rng": ckp.rng_state(), "best": [dict(b) for b in self.best], "keep_top_k": self.keep_top_k,
                "val": val, "interrupted": interrupted}

    def _restore(self, ckpt: dict) -> None:
        self.learner.load_state_dict(ckpt["learner"])
        self.epoch, self.iteration = int(ckpt["epoch"]), int(ckpt["iteration"])
        self.epoch_sums = dict(ckpt["epoch_sums"])
        self._window = dict(ckpt.get("log_window", {"loss": 0.0, "accuracy": 0.0, "steps": 0}))
        self.best = [dict(b) for b in ckpt["best"]]
        ckp.set_rng_state(ckpt["rng"])

    def _truncate_logs(self) -> None:
        """Drop log records written after the checkpoint we resume from (a crash can leave some)."""
        if not self.is_main:
            return
        jl = self.run_dir / "metrics.jsonl"
        if jl.exists():
            keep = [line for line in jl.read_text().splitlines()
                    if line.strip() and json.loads(line).get("iteration", 0) <= self.iteration]
            ckp.atomic_write_text(jl, "".join(line + "\n" for line in keep))
        cf = self.run_dir / "metrics.csv"
        if cf.exists():
            with open(cf, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < self.epoch]
            ckp.atomic_write_text(cf, _csv_text(rows, header=True))

    def save_latest(self, val: Optional[dict] = None, interrupted: bool = False) -> Path:
        """Write ``checkpoints/latest.pt`` (main process only); returns its path."""
        if not self.is_main:
            return self.latest_path
        ckp.atomic_save(self._checkpoint(val, interrupted), self.latest_path)
        return self.latest_path

    def _save_epoch(self, epoch: int, val: dict) -> None:
        """Write latest.pt, and epoch-NNNN.pt when it ranks in the top k; drop the ones that fell out."""
        path = self.ckpt_dir / f"epoch-{epoch:04d}.pt"
        ranked = sorted(self.best + [{"epoch": epoch, "val_accuracy": val["accuracy"], "path": path.name}],
                        key=lambda b: (-b["val_accuracy"], b["epoch"]))
        kept, dropped = ranked[:self.keep_top_k], ranked[self.keep_top_k:]
        self.best = kept
        state = self._checkpoint(val)
        if any(b["epoch"] == epoch for b in kept):
            ckp.atomic_save(state, path)
        ckp.atomic_save(state, self.latest_path)
        ckp.atomic_write_text(self.ckpt_dir / "best.json", json.dumps(kept, indent=2) + "\n")
        for b in dropped:
            (self.ckpt_dir / b["path"]).unlink(missing_ok=True)

    # ------------------------------------------------------------- logging
    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # noqa: BLE001  (tensorboard not installed)
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _log_json(self, record: dict) -> None:
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()

    def _log_epoch(self, row: dict, extra: dict) -> None:
        if not self.is_main:
            return
        path = self.run_dir / "metrics.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            f.write(_csv_text([row], header=new))
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
        self._stop = signum
        # a second signal stops at once, without a checkpoint
        signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)

    def fit(self, stop_at_iteration: Optional[int] = None) -> dict:
        """Train until ``config.total_epochs`` are done; returns the last epoch's metrics row.

        ``stop_at_iteration`` stops early once that many meta-steps are done, after saving
        ``latest.pt`` as an interruption would (used to test resuming). A SIGINT/SIGTERM makes
        it save ``latest.pt`` and raise ``TrainingInterrupted``.
        """
        handlers = {}
        if self.handle_signals:
            import threading

            if threading.current_thread() is threading.main_thread():
                for s in (signal.SIGINT, signal.SIGTERM):
                    handlers[s] = signal.signal(s, self._on_signal)
        try:
            return self._fit(stop_at_iteration)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            if self._tb is not None:
                self._tb.flush()

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
            t0 = time.perf_counter()
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
            train_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            val = self.validate()
            val_seconds = time.perf_counter() - t1
            s = self.epoch_sums
            steps = max(s["steps"], 1)
            plan = epoch_plan(cfg, epoch)
            row = {"epoch": epoch, "iteration": self.iteration, "train_loss": s["loss"] / steps,
                   "train_accuracy": s["accuracy"] / steps, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                   "val_ci95": val["ci95"], "meta_lr": plan.meta_lr,
                   "second_order": plan.second_order,
                   "epoch_seconds": round(train_seconds, 3),
                   "steps_per_second": round(s["steps"] / train_seconds, 4) if train_seconds > 0 else None,
                   "val_seconds": round(val_seconds, 3)}
            extra = {"msl_weights": plan.loss_weights,
                     "lslr": self.learner.lslr.detach().cpu().tolist(),
                     "lslr_names": self.learner.fast_weight_names, "val_num_tasks": val["num_tasks"]}
            self.epoch += 1
            self.epoch_sums = {"loss": 0.0, "accuracy": 0.0, "steps": 0}
            self._log_epoch(row, extra)
            if self.is_main:
                self._save_epoch(epoch, {k: val[k] for k in ("accuracy", "ci95", "loss", "num_tasks")})
            last_row = row
            msg = (f"epoch {epoch + 1}/{E}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} | "
                   f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f} ± {val['ci95']:.4f} | "
                   f"{row['steps_per_second'] or 0:.2f} steps/s")
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
    def _read_metrics(self, epoch: int, bar) -> None:
        if not self._pending:
            return
        rows = torch.stack(self._pending).tolist()
        first = self.iteration - len(rows) + 1
        self._pending = []
        s, w = self.epoch_sums, self._window
        for it, (loss, acc) in enumerate(rows, start=first):
            s["loss"] += loss
            s["accuracy"] += acc
            s["steps"] += 1
            w["loss"] += loss
            w["accuracy"] += acc
            w["steps"] += 1
            if self.log_every and it % self.log_every == 0:
                self._log_json({"kind": "train", "epoch": epoch, "iteration": it, "loss": w["loss"] / w["steps"],
                                "accuracy": w["accuracy"] / w["steps"], "meta_lr": self.learner.meta_lr(epoch)})
                self._window = w = {"loss": 0.0, "accuracy": 0.0, "steps": 0}
        if bar is not None:
            bar.set_postfix(loss=f"{s['loss'] / s['steps']:.3f}", acc=f"{s['accuracy'] / s['steps']:.3f}",
                            refresh=False)

    def _interrupt(self) -> dict:
        path = self.save_latest(interrupted=True) if self.is_main else self.latest_path
        self._log_json({"kind": "interrupt", "epoch": self.epoch, "iteration": self.iteration,
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
