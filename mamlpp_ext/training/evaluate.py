"""Evaluation command of mamlpp_ext: ``mamlpp-eval`` / ``python -m mamlpp_ext.training.evaluate``.

Scores one checkpoint, or an ensemble of checkpoints (by default the top-k validation
checkpoints of a run folder, ``ensemble_top_k`` of its config; SPEC §4), on the fixed test
tasks (600 by default): the ensemble predicts the argmax of the members' query logits
averaged. Reports the mean task accuracy with its 95% confidence interval, 1.96·std/√n over
the tasks, each member's own accuracy, and optionally Lake et al.'s original 20-way one-shot
benchmark (``all_runs.zip``; for 20-way 1-shot models trained on the ``lake`` split). Writes a
JSON report. See docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import data as data_registry
from ..model import BACKENDS, MAMLConfig, MAMLPlusPlus, report_notes
from . import checkpoints as ckp
from . import distributed as D
from .network_record import check_user_network
from .run_data import DataOptions, eval_dataset, load_pools, stored_data_options
from .runlock import RunLock, RunLockedError
from .scoring import score_batches, score_tasks, summarize_scores
from .train import GRAPH_MODES, import_from_cwd
from .trainer import check_device, describe_device, resolve_run_execution

__all__ = ["resolve_members", "load_members", "evaluate_checkpoints", "one_shot_benchmark", "report_header",
           "main"]

_SHAPE_FIELDS = ("ways", "shots", "queries", "image_channels", "image_height", "image_width", "dataset")


def resolve_members(paths: Sequence[str | Path], top_k: Optional[int] = None) -> list[Path]:
    """Checkpoint files to evaluate: a file is itself; a run folder gives its best ``top_k``
    epoch checkpoints (from ``checkpoints/best.json``; default its config's ``ensemble_top_k``)."""
    if not paths:
        raise ValueError("give at least one checkpoint file or run folder")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            index = p / "checkpoints" / "best.json"
            if not index.is_file():
                raise FileNotFoundError(f"run folder {p} has no {index.relative_to(p)} (no finished epoch yet?)")
            best = json.loads(index.read_text())
            k = top_k
            if k is None:
                k = ckp.load_checkpoint(p / "checkpoints" / best[0]["path"])["config"]["ensemble_top_k"]
            out += [p / "checkpoints" / b["path"] for b in best[:k]]
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"checkpoint or run folder {p} does not exist")
    return out


def load_members(paths: Sequence[Path], backend: Optional[str] = None, device=None,
                 graph: bool | str = False) -> tuple[list, list[dict]]:
    """``(learners, checkpoints)`` for the given files; the task shapes must agree. ``graph``:
    the learners' CUDA-graph mode (evaluation captured per batch shape). A checkpoint of a user's
    network is refused when the network its function builds now differs from the one recorded
    (``network_record.check_user_network``)."""
    ckpts = [ckp.load_checkpoint(p) for p in paths]
    ref = ckpts[0]["config"]
    for p, c in zip(paths[1:], ckpts[1:]):
        diff = [f for f in _SHAPE_FIELDS if c["config"][f] != ref[f]]
        if diff:
            raise ValueError(f"cannot ensemble {paths[0]} and {p}: they differ in {diff}")
    dev = torch.device(device if device is not None else "cpu")
    learners = []
    for p, c in zip(paths, ckpts):
        execution = resolve_run_execution(dev, c["config"]["dataset"], backend, graph, stored_backend=c["backend"])
        report_notes(execution.notes)
        config = MAMLConfig.from_dict(c["config"])
        check_user_network(c.get("network"), config, f"checkpoint {p}")
        try:
            learners.append(MAMLPlusPlus.from_state_dict(c["learner"], backend=execution.backend, device=device,
                                                         graph=execution.graph))
        except (ValueError, TypeError) as exc:
            if ":" not in config.network:  # not a user's network
                raise
            raise type(exc)(f"--network {config.network} (stored in {p}): {exc}") from None
    return learners, ckpts


def evaluate_checkpoints(paths: Sequence[Path], *, split_set: str = "test", num_tasks: int = 600,
                         batch_size: Optional[int] = None, backend: Optional[str] = None, device=None,
                         data: Optional[DataOptions] = None, pools: Optional[dict] = None,
                         progress: bool = False, learners=None, ckpts=None) -> dict:
    """Score the ensemble of ``paths`` on ``num_tasks`` fixed tasks of ``split_set`` ("test" or
    "val"). ``data`` defaults to the first checkpoint's data options; ``pools`` skips loading.
    Returns ``score_tasks``' dict plus ``split`` and ``seconds``."""
    if split_set not in ("test", "val"):
        raise ValueError(f"--split-set must be 'test' or 'val', got {split_set!r}")
    if learners is None:
        learners, ckpts = load_members(paths, backend, device)
    cfg = learners[0].config
    data = data or stored_data_options(ckpts[0]["data"])
    pools = pools if pools is not None else load_pools(cfg, data, progress=progress)
    ds = eval_dataset(pools[split_set], cfg, data, num_tasks, batch_size or cfg.meta_batch)
    t0 = time.perf_counter()
    desc = f"{split_set} ({len(learners)} model(s))"
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # under torchrun: each process scores every P-th batch; the scores are gathered
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = score_batches(learners, ds, range(rank, len(ds), world), progress=progress and rank == 0, desc=desc)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        res = summarize_scores([s for part in gathered for s in part])
    else:
        res = score_tasks(learners, ds, progress=progress, desc=desc)
    res.update(split=split_set, seconds=round(time.perf_counter() - t0, 3))
    return res


def report_header(paths: Sequence[Path], learners: Sequence[MAMLPlusPlus], ckpts: Sequence[dict],
                  data: DataOptions, device) -> dict:
    """The part of a JSON report that says what was scored: the members (path, epoch, iteration,
    validation accuracy; ``epoch`` counts from 1, None for a mid-epoch checkpoint), the ensemble
    size, the config, the data options, backend and device."""
    return {"members": [{"path": str(p), "epoch": c["epoch"] if c.get("val") else None,  # counted from 1
                         "iteration": c["iteration"], "val_accuracy": (c.get("val") or {}).get("accuracy")}
                        for p, c in zip(paths, ckpts)],
            "ensemble_size": len(paths), "config": learners[0].config.to_dict(), "data": data.to_dict(),
            "backend": learners[0].backend, "device": str(device)}


def one_shot_benchmark(learners: Sequence[MAMLPlusPlus], root=None) -> dict:
    """Lake et al.'s 20 runs of 20-way 1-shot, predicted by the ensemble's averaged logits."""
    from ..data import evaluate_one_shot, load_one_shot_runs

    cfg = learners[0].config
    if cfg.ways != 20 or cfg.shots != 1 or cfg.dataset != "omniglot":
        raise ValueError(f"--one-shot: the benchmark is Omniglot 20-way 1-shot, but the model is {cfg.dataset} "
                         f"{cfg.ways}-way {cfg.shots}-shot (train e.g. --preset omniglot-20way-1shot --split lake)")
    runs = load_one_shot_runs(root, size=cfg.image_height)

    def predict(sx, sy, qx):
        total = None
        for lrn in learners:
            logits = lrn.evaluate(sx[None], sy[None], qx[None])["logits"][0].float().cpu()
            total = logits if total is None else total + logits
        return total

    return evaluate_one_shot(predict, runs)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mamlpp-eval",
                                description="Test accuracy (± 95% CI) of a MAML++ checkpoint or an ensemble of them.")
    p.add_argument("paths", nargs="+", help="checkpoint files and/or run folders (a folder gives its top-k)")
    p.add_argument("--top-k", type=int, help="checkpoints taken from each run folder (default: config ensemble_top_k)")
    p.add_argument("--split-set", default="test", choices=("test", "val"), help="which fixed tasks (default test)")
    p.add_argument("--tasks", type=int, default=600, help="number of fixed tasks (default 600)")
    p.add_argument("--eval-batch-size", type=int, help="tasks per batch (default: meta_batch)")
    p.add_argument("--eval-seed", type=int, help="seed of the fixed tasks (default: the run's)")
    p.add_argument("--backend", help=f"one of {', '.join(BACKENDS)} (default: the checkpoint's)")
    p.add_argument("--device", default="auto",
                   help="torch device: auto (CUDA when available, else CPU; the default), cpu, cuda, cuda:1")
    p.add_argument("--graph", choices=("auto", "on", "off"), default="off",
                   help="CUDA-graph mode for the evaluation batches (auto: on for CUDA with the batched or fused "
                        "backend; default off, see docs/graph_mode.md)")
    p.add_argument("--dataset-root", help="dataset folder (default: the run's)")
    p.add_argument("--cache-dir", help="preprocessing cache folder")
    p.add_argument("--one-shot", action="store_true", help="also run the all_runs.zip 20-way one-shot benchmark")
    p.add_argument("--one-shot-only", action="store_true", help="run only the one-shot benchmark")
    p.add_argument("--output", help="JSON report path (default: <run folder>/eval-<split-set>.json, or ./eval.json)")
    p.add_argument("--wait", action="store_true",
                   help="when the report goes into a run folder that another command holds (a training run), wait "
                        "until it is done instead of refusing")
    p.add_argument("--break-lock", action="store_true",
                   help="take over a run folder's lock left by a process on another host (docs/training.md)")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="under torchrun (the test tasks split across the processes): how long a process waits "
                        "for the others (default 1800)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    import_from_cwd()
    import torch.distributed as dist

    lock = None
    try:
        if args.tasks < 1:
            raise ValueError(f"--tasks must be >= 1, got {args.tasks}")
        if args.eval_batch_size is not None and args.eval_batch_size < 1:
            raise ValueError(f"--eval-batch-size must be >= 1, got {args.eval_batch_size}")
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        if args.dataset_root is not None and not Path(args.dataset_root).exists():
            raise ValueError(f"--dataset-root: {args.dataset_root} does not exist")
        device = check_device(args.device)
        if D.launched_by_torchrun():
            device = D.init_from_env(device, args.dist_timeout)
        main_process = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        out = report_path(args.paths, args.output, args.split_set)
        if main_process and (out.parent / "checkpoints").is_dir():
            # the report goes into a run folder: not while a trainer writes it (NOTE [Run folder lock])
            lock = RunLock(out.parent, "mamlpp-eval", wait=math.inf if args.wait else 0.0, break_lock=args.break_lock,
                           advice="pass --wait to wait until it is done, or --output FILE to write the report "
                                  "elsewhere").acquire()
        paths = resolve_members(args.paths, args.top_k)
        learners, ckpts = load_members(paths, args.backend, device, graph=GRAPH_MODES[args.graph])
        data = stored_data_options(ckpts[0]["data"], args.dataset_root)
        if args.cache_dir:
            data.cache_dir = args.cache_dir
        if args.eval_seed is not None:
            data.eval_seed = args.eval_seed
    except (ValueError, TypeError, FileNotFoundError, RunLockedError, data_registry.DataError) as exc:
        if lock is not None:
            lock.release()
        parser.error(str(exc))
    try:
        return _evaluate(args, parser, paths, learners, ckpts, data, device, main_process, out)
    finally:
        if lock is not None:
            lock.release()


def report_path(paths: Sequence[str], output: Optional[str], split_set: str) -> Path:
    """Where ``mamlpp-eval`` writes its report: ``output``, else ``<run folder>/eval-<split>.json``
    for a single run folder, else ./eval.json."""
    if output:
        return Path(output)
    if len(paths) == 1 and Path(paths[0]).is_dir():
        return Path(paths[0]) / f"eval-{split_set}.json"
    return Path("eval.json")


def _evaluate(args, parser, paths, learners, ckpts, data, device, main_process: bool, out: Path) -> int:
    report = report_header(paths, learners, ckpts, data, device)
    if main_process:
        print(f"mamlpp-eval: {describe_device(args.device, device)}, backend {learners[0].backend}", file=sys.stderr,
              flush=True)
    t0 = time.perf_counter()
    try:
        if not args.one_shot_only:
            res = evaluate_checkpoints(paths, split_set=args.split_set, num_tasks=args.tasks,
                                       batch_size=args.eval_batch_size, data=data, progress=not args.no_progress,
                                       learners=learners, ckpts=ckpts)
            report[args.split_set] = res
            if main_process:
                print(f"{args.split_set}: accuracy {100 * res['accuracy']:.2f}% ± {100 * res['ci95']:.2f}% "
                      f"(95% CI over {res['num_tasks']} tasks, {len(paths)} model(s); members "
                      f"{', '.join(f'{100 * a:.2f}%' for a in res['member_accuracies'])})", flush=True)
        if (args.one_shot or args.one_shot_only) and main_process:
            if data.split != "lake":
                print("warning: the one-shot benchmark's characters come from the evaluation alphabets; with the "
                      f"{data.split!r} split the model may have trained on them", file=sys.stderr)
            os_res = one_shot_benchmark(learners, data.root)
            report["one_shot"] = os_res
            print(f"one-shot benchmark: accuracy {100 * os_res['accuracy']:.2f}% (error {100 * os_res['error']:.2f}%, "
                  f"{len(os_res['runs'])} runs)", flush=True)
    except (ValueError, FileNotFoundError, data_registry.DataError) as exc:
        parser.error(str(exc))
    report["seconds"] = round(time.perf_counter() - t0, 3)
    D.leave_process_group()
    if not main_process:
        return 0
    try:
        ckp.atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    except OSError as exc:
        print(f"mamlpp-eval: error: cannot write the report {out}: {exc.strerror or exc}; any earlier report "
              f"there is intact", file=sys.stderr, flush=True)
        return 2
    print(f"report written to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
