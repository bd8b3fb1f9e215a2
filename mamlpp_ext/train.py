"""Training command of mamlpp_ext: ``mamlpp-train`` / ``python -m mamlpp_ext.train``.

``Trainer`` runs the MAML++ outer loop over a run folder: it streams meta-batches (a pure
function of the seed and the iteration index), calls ``MAMLPlusPlus.meta_step``, validates on
the fixed validation tasks after every epoch, appends metrics to ``metrics.csv`` and
``metrics.jsonl`` (and TensorBoard when it imports), and checkpoints every epoch atomically,
keeping ``latest.pt`` and the best k epochs by validation accuracy. ``--resume`` continues a run
exactly where it stopped; SIGINT/SIGTERM save a checkpoint before exiting. See docs/training.md.

Run folder::

    RUN/config.json          resolved config, data options, backend (written once)
    RUN/metrics.csv          one row per epoch
    RUN/metrics.jsonl        "train" records every --log-every steps, "epoch" records (with LSLR
                             rates and MSL weights), "interrupt" records
    RUN/checkpoints/latest.pt           always the newest state (end of epoch or interruption)
    RUN/checkpoints/epoch-NNNN.pt       the best k epochs by validation accuracy
    RUN/checkpoints/best.json           those k, best first, with their validation accuracy
    RUN/tensorboard/                    when torch.utils.tensorboard imports

NOTE [Distributed seams]
    ``mamlpp_ext.distributed.DistributedTrainer`` subclasses this class: ``is_main`` says which
    process writes files, ``_shard_training_stream`` gives each process its share of every
    meta-batch, ``validate`` scores a share of the fixed tasks, and the learner's
    ``cross_process_mean`` hook (NOTE [Cross-process mean] in meta_learner.py) averages the
    meta-gradients, running statistics and step metrics after each backward, before the
    gradient clamp and the Adam step. ``_stop_requested`` lets the processes agree to stop.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from . import _training_common as C
from .config import MAMLConfig, from_preset, preset_names
from .meta_learner import BACKENDS, MAMLPlusPlus

__all__ = ["Trainer", "TrainingInterrupted", "build_config", "main", "parse_value"]

CSV_FIELDS = ["epoch", "iteration", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_ci95",
              "meta_lr", "second_order", "epoch_seconds", "steps_per_second", "val_seconds"]


class TrainingInterrupted(Exception):
    """Raised by ``Trainer.fit`` after it saved a checkpoint because of a signal."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint saved to {checkpoint}")
        self.signum = signum
        self.checkpoint = checkpoint


def default_backend() -> str:
    import mamlpp_ext

    return "fused" if mamlpp_ext.has_extension() else "batched"


class Trainer:
    """The MAML++ training loop over a run folder.

    Args:
        config: the run's ``MAMLConfig`` (ignored with ``resume``: the checkpoint's is used).
        run_dir: the run folder (created).
        backend, device: of the ``MAMLPlusPlus`` learner (default backend: fused when the
            extension is built, else batched).
        data: ``DataOptions`` (dataset root, split, eval seed, ...).
        pools: ready ``{"train", "val"}`` ``ClassPool`` s instead of loading ``config.dataset``.
        keep_top_k: epoch checkpoints kept by validation accuracy (default ``config.ensemble_top_k``).
        eval_batch_size: tasks per evaluation batch (default ``config.meta_batch``).
        log_every: steps between "train" records in metrics.jsonl (0: none).
        progress: show tqdm bars. tensorboard: also log to TensorBoard when it imports.
        resume: continue from ``run_dir/checkpoints/latest.pt`` (True) or from a checkpoint path.
        handle_signals: install SIGINT/SIGTERM handlers during ``fit`` (main thread only).
    """

    def __init__(self, config: Optional[MAMLConfig], run_dir: str | os.PathLike, *, backend: Optional[str] = None,
                 device: str | torch.device | None = None, data: Optional[C.DataOptions] = None,
                 pools: Optional[dict] = None, keep_top_k: Optional[int] = None,
                 eval_batch_size: Optional[int] = None, log_every: int = 50, progress: bool = True,
                 tensorboard: bool = True, resume: bool | str | os.PathLike = False,
                 handle_signals: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.latest_path = self.ckpt_dir / "latest.pt"
        ckpt = None
        if resume:
            path = self.latest_path if resume is True else Path(resume)
            if not path.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint at {path} (the run folder must hold "
                                        f"checkpoints/latest.pt from an earlier run)")
            ckpt = C.load_checkpoint(path)
            config = MAMLConfig.from_dict(ckpt["config"])
            data = C.DataOptions.from_dict(ckpt["data"]) if data is None else data
            backend = backend or ckpt["backend"]
        elif self.latest_path.exists():
            raise FileExistsError(f"run folder {self.run_dir} already holds {self.latest_path}; pass --resume to "
                                  f"continue it or choose another --run-dir")
        if not isinstance(config, MAMLConfig):
            raise TypeError(f"config must be a MAMLConfig, got {type(config).__name__}")
        self.config = config
        self.data = data or C.DataOptions()
        self.backend = backend or default_backend()
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {BACKENDS}")
        self.device = _check_device(device)
        self.keep_top_k = config.ensemble_top_k if keep_top_k is None else int(keep_top_k)
        if self.keep_top_k < 1:
            raise ValueError(f"keep_top_k must be >= 1, got {keep_top_k}")
        self.eval_batch_size = int(eval_batch_size or config.meta_batch)
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        self.log_every = int(log_every)
        self.progress = bool(progress)
        self.handle_signals = handle_signals

        self.learner = MAMLPlusPlus(config, backend=self.backend, device=self.device)
        self.pools = pools if pools is not None else C.load_pools(config, self.data)
        for name in ("train", "val"):
            if name not in self.pools:
                raise ValueError(f"pools must hold a {name!r} ClassPool")
        self.train_set = self._shard_training_stream(C.train_dataset(self.pools["train"], config))
        self.val_set = C.eval_dataset(self.pools["val"], config, self.data, config.eval_tasks, self.eval_batch_size)

        self.epoch = 0  # next epoch to run
        self.iteration = 0  # meta-steps done
        self.epoch_sums = {"loss": 0.0, "accuracy": 0.0, "steps": 0}
        self.best: list[dict] = []  # [{"epoch", "val_accuracy", "path"}], best first
        self._stop: Optional[int] = None
        if ckpt is not None:
            self._restore(ckpt)
            self._truncate_logs()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main and not (self.run_dir / "config.json").exists():
            C.atomic_write_text(self.run_dir / "config.json", json.dumps(
                {"config": config.to_dict(), "data": self.data.to_dict(), "backend": self.backend,
                 "keep_top_k": self.keep_top_k, "eval_batch_size": self.eval_batch_size}, indent=2) + "\n")
        self._tb = self._open_tensorboard() if tensorboard and self.is_main else None

    # ------------------------------------------------------------- seams
    @property
    def is_main(self) -> bool:
        """Whether this process writes logs and checkpoints (always, without distribution)."""
        return True

    def _shard_training_stream(self, stream):
        """The training stream this process runs: all of it here (NOTE [Distributed seams])."""
        return stream

    def _stop_requested(self, sync: bool = False) -> bool:
        """Whether to stop now: a SIGINT/SIGTERM was received (by any process when distributed;
        ``sync``: at a point every process reaches together, e.g. the end of an epoch)."""
        return self._stop is not None

    # ------------------------------------------------------------- state
    def _checkpoint(self, val: Optional[dict], interrupted: bool = False) -> dict:
        return {"format": C.CHECKPOINT_FORMAT, "learner": self.learner.state_dict(),
                "config": self.config.to_dict(), "data": self.data.to_dict(), "backend": self.backend,
                "epoch": self.epoch, "iteration": self.iteration, "epoch_sums": dict(self.epoch_sums),
                "rng": C.rng_state(), "best": [dict(b) for b in self.best], "keep_top_k": self.keep_top_k,
                "val": val, "interrupted": interrupted}

    def _restore(self, ckpt: dict) -> None:
        self.learner.load_state_dict(ckpt["learner"])
        self.epoch, self.iteration = int(ckpt["epoch"]), int(ckpt["iteration"])
        self.epoch_sums = dict(ckpt["epoch_sums"])
        self.best = [dict(b) for b in ckpt["best"]]
        C.set_rng_state(ckpt["rng"])

    def _truncate_logs(self) -> None:
        """Drop log records written after the checkpoint we resume from (a crash can leave some)."""
        if not self.is_main:
            return
        jl = self.run_dir / "metrics.jsonl"
        if jl.exists():
            keep = [line for line in jl.read_text().splitlines()
                    if line.strip() and json.loads(line).get("iteration", 0) <= self.iteration]
            C.atomic_write_text(jl, "".join(line + "\n" for line in keep))
        cf = self.run_dir / "metrics.csv"
        if cf.exists():
            with open(cf, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < self.epoch]
            C.atomic_write_text(cf, _csv_text(rows, header=True))

    def save_latest(self, val: Optional[dict] = None, interrupted: bool = False) -> Path:
        C.atomic_save(self._checkpoint(val, interrupted), self.latest_path)
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
            C.atomic_save(state, path)
        C.atomic_save(state, self.latest_path)
        C.atomic_write_text(self.ckpt_dir / "best.json", json.dumps(kept, indent=2) + "\n")
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
        return C.score_tasks([self.learner], self.val_set, progress=self.progress, desc="validation")

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
        I, E = cfg.iterations_per_epoch, cfg.total_epochs
        last_row: dict = {}
        if self.iteration >= E * I:
            return last_row
        batches = iter(self.train_set.loader(start=self.iteration, num_workers=self.data.num_workers))
        window = {"loss": 0.0, "accuracy": 0.0, "steps": 0}
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
                    out = self.learner.meta_step(*next(batches), epoch=epoch)
                    self.iteration += 1
                    s = self.epoch_sums
                    s["loss"] += out["loss"]
                    s["accuracy"] += out["accuracy"]
                    s["steps"] += 1
                    window["loss"] += out["loss"]
                    window["accuracy"] += out["accuracy"]
                    window["steps"] += 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{s['loss'] / s['steps']:.3f}", acc=f"{s['accuracy'] / s['steps']:.3f}",
                                        refresh=False)
                    if self.log_every and self.iteration % self.log_every == 0:
                        self._log_json({"kind": "train", "epoch": epoch, "iteration": self.iteration,
                                        "loss": window["loss"] / window["steps"],
                                        "accuracy": window["accuracy"] / window["steps"], "meta_lr": out["meta_lr"]})
                        window = {"loss": 0.0, "accuracy": 0.0, "steps": 0}
                    if self._stop_requested() or (stop_at_iteration is not None
                                                  and self.iteration >= stop_at_iteration):
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
            row = {"epoch": epoch, "iteration": self.iteration, "train_loss": s["loss"] / steps,
                   "train_accuracy": s["accuracy"] / steps, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                   "val_ci95": val["ci95"], "meta_lr": self.learner.meta_lr(epoch),
                   "second_order": bool(cfg.second_order and epoch > cfg.first_order_to_second_order_epoch),
                   "epoch_seconds": round(train_seconds, 3),
                   "steps_per_second": round(s["steps"] / train_seconds, 4) if train_seconds > 0 else None,
                   "val_seconds": round(val_seconds, 3)}
            from .schedules import loss_weights

            extra = {"msl_weights": loss_weights(cfg.inner_steps, epoch, use_msl=cfg.use_msl,
                                                 msl_epochs=cfg.msl_epochs, training=True),
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

    def _interrupt(self) -> dict:
        path = self.save_latest(interrupted=True) if self.is_main else self.latest_path
        self._log_json({"kind": "interrupt", "epoch": self.epoch, "iteration": self.iteration,
                        "signal": None if self._stop is None else signal.Signals(self._stop).name})
        if self._stop is not None:
            raise TrainingInterrupted(self._stop, path)
        return {"interrupted": True, "epoch": self.epoch, "iteration": self.iteration}


def _csv_text(rows: list[dict], header: bool) -> str:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    if header:
        w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def _check_device(device) -> torch.device:
    try:
        dev = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device: cannot parse {device!r} ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return dev


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def parse_value(text: str) -> Any:
    """A ``--set`` value: null/none, true/false, an int, a float, else the string itself."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config: no such file {path}")
    text = p.read_text()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text)
        else:
            d = json.loads(text)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"--config: cannot parse {path}: {exc}") from None
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ValueError(f"--config: {path} must hold a mapping of config fields, got {type(d).__name__}")
    return d


def build_config(preset: Optional[str] = None, config_file: Optional[str] = None, sets: tuple = (),
                 **fields: Any) -> MAMLConfig:
    """The run's config: preset, then the config file's fields (it may name a ``preset`` too),
    then ``--set key=value`` pairs, then explicit ``fields`` (those that are not None)."""
    known = {f.name: f for f in dataclasses.fields(MAMLConfig)}
    values: dict = {}
    file_values = _read_config_file(config_file) if config_file else {}
    file_preset = file_values.pop("preset", None)
    preset = preset or file_preset
    for origin, items in (("--config " + str(config_file), file_values), ("--set", None)):
        if items is None:
            items = {}
            for s in sets:
                if "=" not in s:
                    raise ValueError(f"--set expects key=value, got {s!r}")
                k, v = s.split("=", 1)
                items[k.strip().replace("-", "_")] = parse_value(v)
        for k, v in items.items():
            if k not in known:
                raise ValueError(f"{origin}: unknown config field {k!r}; known fields: {sorted(known)}")
            values[k] = v
    values.update({k: v for k, v in fields.items() if v is not None})
    try:
        if preset is not None:
            return from_preset(preset, **values)
        return MAMLConfig(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mamlpp-train", description="Train a MAML++ (or MAML) meta-learner on Omniglot or mini-ImageNet.",
        epilog="presets: " + ", ".join(preset_names()))
    p.add_argument("--preset", help="a public setting (SPEC §4), e.g. omniglot-5way-1shot; see --list-presets")
    p.add_argument("--list-presets", action="store_true", help="print the preset names and exit")
    p.add_argument("--config", help="JSON or YAML file of MAMLConfig fields (may hold 'preset')")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a MAMLConfig field (repeatable), e.g. --set inner_steps=3 --set grad_clamp=null")
    p.add_argument("--backend", help=f"one of {', '.join(BACKENDS)} (default: fused when the extension is built)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--seed", type=int, help="seed of the initial weights and the training task stream")
    p.add_argument("--epochs", type=int, help="total epochs (config total_epochs; the CA schedule spans them)")
    p.add_argument("--iters-per-epoch", type=int, help="meta-steps per epoch (config iterations_per_epoch)")
    p.add_argument("--eval-tasks", type=int, help="number of fixed validation tasks (config eval_tasks)")
    p.add_argument("--eval-batch-size", type=int, help="tasks per evaluation batch (default: meta_batch)")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the fixed validation/test tasks (default 0)")
    p.add_argument("--dataset-root", help="dataset folder (default: the data package's, see docs/data.md)")
    p.add_argument("--cache-dir", help="preprocessing cache folder (default $MAMLPP_CACHE_DIR or ~/.cache/mamlpp_ext)")
    p.add_argument("--split", default="maml", choices=C.SPLITS, help="Omniglot class split (default maml)")
    p.add_argument("--lake-val-alphabets", type=int, default=5, help="validation alphabets of the lake split")
    p.add_argument("--allow-partial-data", action="store_true", help="accept an incomplete dataset copy")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for training batches (default 0)")
    p.add_argument("--run-dir", help="run folder (default runs/<preset>-seed<seed>)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue the run in --run-dir (or from the given checkpoint file)")
    p.add_argument("--keep-top-k", type=int, help="epoch checkpoints kept by validation accuracy (default ensemble_top_k)")
    p.add_argument("--log-every", type=int, default=50, help="meta-steps between train records (default 50)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard logs")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--stop-at-iteration", type=int, metavar="N",
                   help="stop once N meta-steps are done in total, saving checkpoints/latest.pt as an interruption "
                        "would (continue later with --resume); for jobs with a time limit")
    p.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="under torchrun: how long a process waits in a collective for the others before "
                        "the job fails (default 1800)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.list_presets:
        print("\n".join(preset_names()))
        return 0
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        if args.backend is not None and args.backend not in BACKENDS:
            raise ValueError(f"--backend: unknown backend {args.backend!r}; expected one of {', '.join(BACKENDS)}")
        if args.backend == "fused":
            import mamlpp_ext

            if not mamlpp_ext.has_extension():
                raise ValueError(f"--backend fused needs the compiled extension: {mamlpp_ext.extension_error()}")
        for name in ("epochs", "iters_per_epoch", "eval_tasks", "eval_batch_size", "keep_top_k", "stop_at_iteration"):
            v = getattr(args, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if args.preset is not None and args.preset not in preset_names():
            raise ValueError(f"--preset: unknown preset {args.preset!r}; known presets: {', '.join(preset_names())}")
        if args.dataset_root is not None and not Path(args.dataset_root).exists():
            raise ValueError(f"--dataset-root: {args.dataset_root} does not exist")
        from . import distributed as D

        trainer_cls, where = Trainer, ""
        if D.launched_by_torchrun():
            args.device = D.init_from_env(args.device, args.dist_timeout)
            trainer_cls = D.DistributedTrainer
            where = f" (process {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')})"
        data = C.DataOptions(root=args.dataset_root, split=args.split, lake_val_alphabets=args.lake_val_alphabets,
                             eval_seed=args.eval_seed, check_counts=not args.allow_partial_data,
                             cache_dir=args.cache_dir, num_workers=args.workers)
        if args.resume:
            if args.run_dir is None and args.resume is True:
                raise ValueError("--resume needs --run-dir (the run to continue) or a checkpoint path")
            run_dir = Path(args.run_dir) if args.run_dir else Path(args.resume).resolve().parent.parent
            ckpt_path = run_dir / "checkpoints" / "latest.pt" if args.resume is True else Path(args.resume)
            stored = C.load_checkpoint(ckpt_path)
            config = MAMLConfig.from_dict(stored["config"])
            if args.preset or args.config or args.set or any(
                    v is not None for v in (args.seed, args.epochs, args.iters_per_epoch, args.eval_tasks)):
                asked = build_config(args.preset, args.config, tuple(args.set), seed=args.seed,
                                     total_epochs=args.epochs, iterations_per_epoch=args.iters_per_epoch,
                                     eval_tasks=args.eval_tasks) if args.preset or args.config else \
                    config.replace(**{k: v for k, v in dict(
                        seed=args.seed, total_epochs=args.epochs, iterations_per_epoch=args.iters_per_epoch,
                        eval_tasks=args.eval_tasks, **{s.split("=", 1)[0].strip(): parse_value(s.split("=", 1)[1])
                                                       for s in args.set if "=" in s}).items() if v is not None})
                diff = sorted(k for k, v in asked.to_dict().items() if config.to_dict()[k] != v)
                if diff:
                    raise ValueError(f"--resume continues the stored config; these settings differ from it: {diff}")
            data = C.DataOptions.from_dict({**stored["data"], **({"root": args.dataset_root} if args.dataset_root
                                                                  else {}), "num_workers": args.workers})
            trainer = trainer_cls(None, run_dir, backend=args.backend, device=args.device, data=data,
                              keep_top_k=args.keep_top_k, eval_batch_size=args.eval_batch_size,
                              log_every=args.log_every, progress=not args.no_progress,
                              tensorboard=not args.no_tensorboard, resume=ckpt_path)
        else:
            config = build_config(args.preset, args.config, tuple(args.set), seed=args.seed,
                                  total_epochs=args.epochs, iterations_per_epoch=args.iters_per_epoch,
                                  eval_tasks=args.eval_tasks)
            run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / f"{args.preset or 'custom'}-seed{config.seed}"
            trainer = trainer_cls(config, run_dir, backend=args.backend, device=args.device, data=data,
                              keep_top_k=args.keep_top_k, eval_batch_size=args.eval_batch_size,
                              log_every=args.log_every, progress=not args.no_progress,
                              tensorboard=not args.no_tensorboard)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as exc:
        parser.error(str(exc))
    if trainer.is_main:
        print(f"mamlpp-train: {trainer.learner!r}, run folder {trainer.run_dir}, starting at epoch {trainer.epoch} "
              f"iteration {trainer.iteration}{where}", file=sys.stderr, flush=True)
    ok = False
    try:
        out = trainer.fit(stop_at_iteration=args.stop_at_iteration)
        ok = True
        if out.get("interrupted") and trainer.is_main:
            print(f"mamlpp-train: stopped at iteration {trainer.iteration} (--stop-at-iteration); checkpoint "
                  f"saved to {trainer.latest_path}", file=sys.stderr, flush=True)
    except TrainingInterrupted as exc:
        ok = True  # every process stopped after the same step
        print(f"mamlpp-train{where}: {exc}", file=sys.stderr, flush=True)
        return 128 + exc.signum
    except Exception as exc:  # noqa: BLE001
        if not where:
            raise
        # A collective that timed out, or a peer that died: say so on this process and fail the job.
        print(f"mamlpp-train{where}: failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              f"(another process may have failed first, or the --dist-timeout of {args.dist_timeout:g} s "
              f"expired); the last checkpoint written stays valid", file=sys.stderr, flush=True)
        return 1
    finally:
        if where:
            D.leave_process_group(ok)
    if out.get("interrupted"):
        return 0
    best = trainer.best[0] if trainer.best else None
    if best and trainer.is_main:
        print(f"mamlpp-train: done; best validation accuracy {best['val_accuracy']:.4f} at epoch {best['epoch']} "
              f"({trainer.ckpt_dir / best['path']})", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
