"""Training command of mamlpp_ext: ``mamlpp-train`` / ``python -m mamlpp_ext.training.train``.

Builds the run's config (preset, config file, ``--set`` overrides), picks the process strategy
(one process, or several under ``torchrun``) and runs a ``Trainer`` (``trainer.py``) over the
run folder; ``--resume`` continues a run exactly where it stopped. See docs/training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from .. import data as data_registry
from ..model import BACKENDS, MAMLConfig, from_preset, preset_names
from ..model.config import RECOMPUTE_MODES
from ..model.networks import NETWORKS
from . import checkpoints as ckp
from . import distributed as D
from .run_data import SPLITS, DataOptions, stored_data_options
from .runlock import RunLockedError
from .trainer import Trainer, TrainingDiverged, TrainingInterrupted, describe_device

__all__ = ["EXIT_DIVERGED", "GRAPH_MODES", "build_config", "main", "make_parser", "parse_value"]

#: exit status of a run stopped because it diverged (2: usage, data and disk errors; 128 + n: signal n)
EXIT_DIVERGED = 3

#: --graph (and --compile) choices -> the learner's ``graph`` (``compile``) argument
GRAPH_MODES = {"auto": "auto", "on": True, "off": False}



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
    if preset is None and values.get("augment") is None:
        # no preset says whether to rotate: the dataset's registry entry does
        try:
            values["augment"] = data_registry.get_dataset(values.get("dataset", "omniglot")).augment
        except data_registry.DataError:
            pass  # an unknown dataset is reported when the data is loaded
    try:
        if preset is not None:
            return from_preset(preset, **values)
        return MAMLConfig(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mamlpp-train", description="Train a MAML++ (or MAML) meta-learner on one of the datasets of "
                                          f"docs/data.md ({', '.join(data_registry.dataset_names())}).",
        epilog="presets: " + ", ".join(preset_names()))
    p.add_argument("--preset",
                   help="a public setting (docs/method.md §6), e.g. omniglot-5way-1shot; see --list-presets")
    p.add_argument("--list-presets", action="store_true", help="print the preset names and exit")
    p.add_argument("--config", help="JSON or YAML file of MAMLConfig fields (may hold 'preset')")
    p.add_argument("--network", metavar="{" + ",".join(NETWORKS) + ",MODULE:FUNCTION}",
                   help="the network: a built-in one (" + "; ".join(f"{k}: {v.summary}" for k, v in NETWORKS.items())
                        + "; widths of conv4/resnet12 with --set network_widths=...), or one of your own: "
                        "FUNCTION(config) in MODULE (importable from the current folder or PYTHONPATH) returns an "
                        "nn.Module of standard layers or a TaskNetwork (docs/networks.md); default: vgg")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a MAMLConfig field (repeatable), e.g. --set inner_steps=3 --set grad_clamp=null")
    p.add_argument("--backend", help=f"one of {', '.join(BACKENDS)} (default: the fastest measured for the device "
                                     f"and dataset, see docs/training.md)")
    p.add_argument("--device", default="auto",
                   help="torch device: auto (CUDA when available, else CPU; the default), cpu, cuda, cuda:1")
    p.add_argument("--graph", choices=("auto", "on", "off"), default="off",
                   help="CUDA-graph mode: capture the meta-step once and replay it (auto: on for CUDA with the "
                        "batched or fused backend). Default off until a GPU run has validated it (docs/graph_mode.md)")
    p.add_argument("--recompute", choices=RECOMPUTE_MODES,
                   help="memory mode (config recompute): 'steps' keeps only each inner step's inputs and recomputes "
                        "the step in the outer backward; 'query' recomputes only the query scores. Same results, "
                        "several times less memory, more time; may be changed on --resume (default: the config's, "
                        "'off'; docs/memory.md)")
    p.add_argument("--estimate-memory", action="store_true",
                   help="print the estimated memory of one meta-step of this configuration (with and without "
                        "--recompute, counted without allocating it) and exit")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="off",
                   help="compiled training step: its forward and backward traced and compiled by inductor once per "
                        "step shape (minutes the first time, seconds from inductor's cache later; auto: where it can "
                        "run). Default off until a GPU run shows it wins (docs/compiled_step.md)")
    p.add_argument("--seed", type=int, help="seed of the initial weights and the training task stream")
    p.add_argument("--epochs", type=int, help="total epochs (config total_epochs; the CA schedule spans them)")
    p.add_argument("--iters-per-epoch", type=int, help="meta-steps per epoch (config iterations_per_epoch)")
    p.add_argument("--eval-tasks", type=int, help="number of fixed validation tasks (config eval_tasks)")
    p.add_argument("--eval-batch-size", type=int, help="tasks per evaluation batch (default: meta_batch)")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the fixed validation/test tasks (default 0)")
    p.add_argument("--dataset-root", help="dataset folder (default: the data package's, see docs/data.md)")
    p.add_argument("--cache-dir", help="preprocessing cache folder (default $MAMLPP_CACHE_DIR or ~/.cache/mamlpp_ext)")
    p.add_argument("--split", default="maml", choices=SPLITS, help="Omniglot class split (default maml)")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the class split where it is drawn at random: Omniglot's shuffles, an image folder "
                        "without train/val/test sub-folders (default 0)")
    p.add_argument("--lake-val-alphabets", type=int, default=5, help="validation alphabets of the lake split")
    p.add_argument("--allow-partial-data", action="store_true", help="accept an incomplete dataset copy")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for training batches (default 0)")
    p.add_argument("--run-dir", help="run folder (default runs/<preset>-seed<seed>)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue the run in --run-dir (or from the given checkpoint file; a checkpoint of another "
                        "run with a new --run-dir forks that run, copying what the new folder needs)")
    p.add_argument("--break-lock", action="store_true",
                   help="take over the run folder's lock left by a process on another host, once you have checked "
                        "that it no longer runs (docs/training.md, Reliability)")
    p.add_argument("--keep-top-k", type=int,
                   help="epoch checkpoints kept by validation accuracy (default ensemble_top_k)")
    p.add_argument("--log-every", type=int, default=50, help="meta-steps between train records (default 50)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-tensorboard", action="store_true",
                   help="do not write TensorBoard logs (written by default when the tensorboard package is installed; "
                        "one line says so when it is not)")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--stop-at-iteration", type=int, metavar="N",
                   help="stop once N meta-steps are done in total, saving checkpoints/latest.pt as an interruption "
                        "would (continue later with --resume); for jobs with a time limit")
    p.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="under torchrun: how long a process waits in a collective for the others before "
                        "the job fails (default 1800)")
    return p


def print_memory_estimate(config: MAMLConfig, backend: Optional[str], device: str) -> int:
    """``--estimate-memory``: the step memory of ``config`` with the backend the run would use,
    with and without recomputation (``model.memory.estimate_peak_memory``), on stdout."""
    from ..model import resolve_execution
    from ..model.memory import estimate_peak_memory, format_bytes
    from .trainer import check_device

    name = resolve_execution(check_device(device), config.dataset, backend).backend
    print(f"mamlpp-train: estimated memory of one meta-step ({config.ways}-way {config.shots}-shot, "
          f"{config.meta_batch} tasks, {config.inner_steps} inner steps, network {config.network}, backend {name}, "
          f"float32; counted on the meta device, kernel workspaces not included):")
    for mode in RECOMPUTE_MODES:
        est = estimate_peak_memory(config, backend=name, recompute=mode)
        mark = "  <- this run" if mode == config.recompute else ""
        print(f"  recompute={mode:<6} step peak {format_bytes(est['step_peak_bytes']):>10}   + state "
              f"{format_bytes(est['resident_bytes'])} + batch {format_bytes(est['batch_bytes'])} = "
              f"{format_bytes(est['total_bytes'])}{mark}")
    return 0


def import_from_cwd() -> None:
    """Let ``--network module:function`` (and a config naming one) import from the current folder,
    as ``python -m`` does; console scripts do not put it on sys.path."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def main(argv: Optional[list[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    import_from_cwd()
    if args.list_presets:
        print("\n".join(preset_names()))
        return 0
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        for name in ("epochs", "iters_per_epoch", "eval_tasks", "eval_batch_size", "keep_top_k", "stop_at_iteration"):
            v = getattr(args, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if args.preset is not None and args.preset not in preset_names():
            raise ValueError(f"--preset: unknown preset {args.preset!r}; known presets: {', '.join(preset_names())}")
        if args.dataset_root is not None and not Path(args.dataset_root).exists():
            raise ValueError(f"--dataset-root: {args.dataset_root} does not exist")
        strategy, where = None, ""
        if D.launched_by_torchrun():
            args.device = D.init_from_env(args.device, args.dist_timeout)
            strategy = D.DistributedStrategy()
            where = f" (process {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')})"
        data = DataOptions(root=args.dataset_root, split=args.split, lake_val_alphabets=args.lake_val_alphabets,
                           split_seed=args.split_seed,
                             eval_seed=args.eval_seed, check_counts=not args.allow_partial_data,
                             cache_dir=args.cache_dir, num_workers=args.workers)
        if args.resume:
            if args.run_dir is None and args.resume is True:
                raise ValueError("--resume needs --run-dir (the run to continue) or a checkpoint path")
            run_dir = Path(args.run_dir) if args.run_dir else Path(args.resume).resolve().parent.parent
            ckpt_path = run_dir / "checkpoints" / "latest.pt" if args.resume is True else Path(args.resume)
            stored = ckp.load_checkpoint(ckpt_path)
            config = MAMLConfig.from_dict(stored["config"])
            asked_fields = dict(seed=args.seed, total_epochs=args.epochs, iterations_per_epoch=args.iters_per_epoch,
                                eval_tasks=args.eval_tasks, network=args.network)
            if args.preset or args.config or args.set or any(v is not None for v in asked_fields.values()):
                if args.preset or args.config:
                    asked = build_config(args.preset, args.config, tuple(args.set), **asked_fields)
                else:
                    sets = {k.strip(): parse_value(v) for k, _, v in (s.partition("=") for s in args.set) if _}
                    asked = config.replace(**{k: v for k, v in {**asked_fields, **sets}.items() if v is not None})
                # recompute changes how a step runs, not its results: a resumed run may switch it
                if asked.recompute != config.recompute and args.recompute is None:
                    args.recompute = asked.recompute
                diff = sorted(k for k, v in asked.to_dict().items() if config.to_dict()[k] != v and k != "recompute")
                if diff:
                    raise ValueError(f"--resume continues the stored config; these settings differ from it: {diff}")
            if args.estimate_memory:
                return print_memory_estimate(config.replace(recompute=args.recompute or config.recompute),
                                             args.backend or stored.get("backend"), args.device)
            data = stored_data_options(stored["data"], args.dataset_root)
            data.num_workers = args.workers
            trainer = Trainer(None, run_dir, backend=args.backend, device=args.device, data=data, strategy=strategy,
                              keep_top_k=args.keep_top_k, eval_batch_size=args.eval_batch_size,
                              log_every=args.log_every, progress=not args.no_progress,
                              tensorboard=not args.no_tensorboard, resume=ckpt_path,
                              graph=GRAPH_MODES[args.graph], break_lock=args.break_lock,
                              recompute=args.recompute, compile=GRAPH_MODES[args.compile])
        else:
            config = build_config(args.preset, args.config, tuple(args.set), seed=args.seed,
                                  total_epochs=args.epochs, iterations_per_epoch=args.iters_per_epoch,
                                  eval_tasks=args.eval_tasks, network=args.network, recompute=args.recompute)
            if args.estimate_memory:
                return print_memory_estimate(config, args.backend, args.device)
            run_dir = Path(args.run_dir or Path("runs") / f"{args.preset or 'custom'}-seed{config.seed}")
            trainer = Trainer(config, run_dir, backend=args.backend, device=args.device, data=data, strategy=strategy,
                              keep_top_k=args.keep_top_k, eval_batch_size=args.eval_batch_size,
                              log_every=args.log_every, progress=not args.no_progress,
                              tensorboard=not args.no_tensorboard, graph=GRAPH_MODES[args.graph],
                              break_lock=args.break_lock, compile=GRAPH_MODES[args.compile])
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, RunLockedError, ckp.WriteError,
            data_registry.DataError) as exc:
        parser.error(str(exc))
    trainer.resume_command = f"continue with: mamlpp-train --run-dir {shlex.quote(str(trainer.run_dir))} --resume"
    if trainer.is_main:
        print(f"mamlpp-train: {describe_device(args.device, trainer.device)}, backend {trainer.backend}",
              file=sys.stderr)
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
        print(f"mamlpp-train{where}: {exc}; {trainer.resume_command}", file=sys.stderr, flush=True)
        return 128 + exc.signum
    except TrainingDiverged as exc:
        ok = True  # the metrics were averaged across processes: every process stopped at the same step
        if trainer.is_main:
            print(f"mamlpp-train: {exc}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except ckp.WriteError as exc:
        print(f"mamlpp-train{where}: error: {exc}", file=sys.stderr, flush=True)
        return 2
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
