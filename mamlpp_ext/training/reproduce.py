"""Reproducing the paper's table: ``mamlpp-reproduce`` / ``python -m mamlpp_ext.training.reproduce``.

Antoniou, Edwards and Storkey, "How to train your MAML" (ICLR 2019), report MAML++'s test
accuracy on six configurations -- Omniglot 5/20-way 1/5-shot and mini-ImageNet 5-way 1/5-shot --
as the mean ± spread over three independent runs. Each run is scored by ensembling its top-5
validation checkpoints on 600 fixed test tasks. Three sub-commands:

* ``plan``  prints the ``mamlpp-train`` command of every configuration × seed;
* ``train`` runs them one after another (finished runs are skipped, interrupted ones resumed);
* ``table`` scores every run folder it finds (``training/evaluate.py``'s functions; the result is
  kept in the run's ``eval-test.json`` and reused while the run's checkpoints are the same),
  and prints, per configuration, the mean ± std over seeds beside the paper's numbers, as text
  and as JSON. Missing and unfinished seeds are listed, not dropped silently.

Run folders are ``<runs-dir>/<preset>-seed<seed>``, the names ``mamlpp-train`` gives by default.
``--epochs`` / ``--iters-per-epoch`` / ``--eval-tasks`` shorten the schedule for a smoke run; the
table then says that the schedule was shortened. See docs/reproduce.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .. import data as data_registry
from ..model import from_preset
from . import checkpoints as ckp
from .evaluate import evaluate_checkpoints, load_members, report_header, resolve_members
from .run_data import stored_data_options
from .runlock import RunLock, RunLockedError
from .trainer import check_device, describe_device

__all__ = ["CONFIGS", "PAPER", "PAPER_CITATION", "SEEDS", "find_seeds", "main", "paper_table", "run_dir_name",
           "run_status", "train_command"]

PAPER_CITATION = ('Antreas Antoniou, Harrison Edwards, Amos Storkey, "How to train your MAML", ICLR 2019 '
                  '(arXiv:1810.09502)')

CONFIGS = ("omniglot-5way-1shot", "omniglot-5way-5shot", "omniglot-20way-1shot", "omniglot-20way-5shot",
           "mini-imagenet-5way-1shot", "mini-imagenet-5way-5shot")
SEEDS = (0, 1, 2)

# Test accuracy in percent, (mean, ±), as the paper reports it. MAML++: ± over 3 seeds.
# MAML: the original MAML paper's figures (Finn et al., 2017), which the MAML++ paper quotes.
PAPER = {
    "omniglot-5way-1shot": {"MAML++": (99.47, 0.16), "MAML": (98.7, 0.4)},
    "omniglot-5way-5shot": {"MAML++": (99.93, 0.09), "MAML": (99.9, 0.1)},
    "omniglot-20way-1shot": {"MAML++": (97.65, 0.05), "MAML": (95.8, 0.3)},
    "omniglot-20way-5shot": {"MAML++": (99.33, 0.03), "MAML": (98.9, 0.2)},
    "mini-imagenet-5way-1shot": {"MAML++": (52.15, 0.26), "MAML": (48.70, 1.84)},
    "mini-imagenet-5way-5shot": {"MAML++": (68.32, 0.44), "MAML": (63.11, 0.92)},
}

# Fields a smoke run may change without making it another configuration (reported as notes).
_SCHEDULE_FIELDS = ("total_epochs", "iterations_per_epoch", "eval_tasks")
_IGNORED_FIELDS = ("seed",) + _SCHEDULE_FIELDS
_SHAPE_FIELDS = ("dataset", "ways", "shots")


def run_dir_name(preset: str, seed: int) -> str:
    """The run folder's name: the one ``mamlpp-train --preset P --seed S`` uses by default."""
    return f"{preset}-seed{seed}"


def _pretty(preset: str) -> str:
    m = re.fullmatch(r"(.+)-(\d+)way-(\d+)shot", preset)
    if not m or m.group(1) not in data_registry.dataset_names():
        return preset
    return f"{data_registry.get_dataset(m.group(1)).title} {m.group(2)}-way {m.group(3)}-shot"


def _root_option(dataset: str) -> str:
    """The attribute of the ``--<dataset>-root`` option."""
    return dataset.replace("-", "_") + "_root"


def _roots(args) -> dict:
    return {name: getattr(args, _root_option(name), None) for name in data_registry.dataset_names()}


# --------------------------------------------------------------------------- runs


def train_command(preset: str, seed: int, runs_dir: str | Path, *, epochs: Optional[int] = None,
                  iters_per_epoch: Optional[int] = None, eval_tasks: Optional[int] = None, device: str = "auto",
                  backend: Optional[str] = None, threads: Optional[int] = None, dataset_root: Optional[str] = None,
                  sets: Sequence[str] = (), extra: Sequence[str] = (), resume: bool = False, progress: bool = True,
                  program: Sequence[str] = ("mamlpp-train",)) -> list[str]:
    """The ``mamlpp-train`` command line of one configuration and seed (``extra``: more
    ``mamlpp-train`` arguments, appended as they are)."""
    run_dir = Path(runs_dir) / run_dir_name(preset, seed)
    cmd = [*program, "--preset", preset, "--seed", str(seed), "--run-dir", str(run_dir)]
    for flag, value in (("--epochs", epochs), ("--iters-per-epoch", iters_per_epoch), ("--eval-tasks", eval_tasks),
                        ("--backend", backend), ("--threads", threads), ("--dataset-root", dataset_root)):
        if value is not None:
            cmd += [flag, str(value)]
    if device != "auto":
        cmd += ["--device", device]
    for s in sets:
        cmd += ["--set", s]
    cmd += list(extra)
    if resume:
        cmd.append("--resume")
    if not progress:
        cmd.append("--no-progress")
    return cmd


def run_status(run_dir: str | Path) -> dict:
    """Where a run folder stands: ``state`` is "missing" (no folder), "empty" (no checkpoint yet),
    "unfinished" (stopped before its last epoch) or "finished"; with ``epochs_done``,
    ``total_epochs``, ``iterations_per_epoch``, ``config`` (a dict) and ``has_best`` (an epoch
    checkpoint exists) when a checkpoint was found."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return {"state": "missing"}
    latest = run_dir / "checkpoints" / "latest.pt"
    if not latest.is_file():
        return {"state": "empty"}
    try:
        c = ckp.load_checkpoint(latest)
    except (ValueError, FileNotFoundError) as exc:
        return {"state": "unreadable", "error": str(exc)}
    cfg = c["config"]
    done, total = int(c["epoch"]), int(cfg["total_epochs"])
    return {"state": "finished" if done >= total else "unfinished", "epochs_done": done, "total_epochs": total,
            "iterations_per_epoch": int(cfg["iterations_per_epoch"]), "iteration": int(c["iteration"]),
            "config": cfg, "has_best": (run_dir / "checkpoints" / "best.json").is_file()}


def find_seeds(runs_dir: str | Path, preset: str, expected: Sequence[int] = SEEDS) -> list[int]:
    """The expected seeds and any other seed whose run folder exists, sorted."""
    pattern = re.compile(re.escape(preset) + r"-seed(\d+)")
    found = set(expected)
    runs_dir = Path(runs_dir)
    if runs_dir.is_dir():
        for p in runs_dir.iterdir():
            m = pattern.fullmatch(p.name)
            if m and p.is_dir():
                found.add(int(m.group(1)))
    return sorted(found)


# --------------------------------------------------------------------------- scoring


def _stored_report(run_dir: Path, paths: list[Path], num_tasks: int, eval_seed: int) -> Optional[dict]:
    """The run's ``eval-test.json`` when it scored exactly these checkpoints (same files, same
    meta-step) on the same tasks, else None."""
    f = run_dir / "eval-test.json"
    try:
        rep = json.loads(f.read_text())
        members = [(str(Path(m["path"]).resolve()), m["iteration"]) for m in rep["members"]]
        ok = (rep["test"]["num_tasks"] == num_tasks and rep["data"]["eval_seed"] == eval_seed
              and members == [(str(p.resolve()), ckp.load_checkpoint(p)["iteration"]) for p in paths])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rep if ok else None


def score_run(run_dir: Path, *, num_tasks: int = 600, top_k: Optional[int] = None, device=None,
              backend: Optional[str] = None, dataset_root: Optional[str] = None, cache_dir: Optional[str] = None,
              batch_size: Optional[int] = None, rescore: bool = False, progress: bool = False) -> dict:
    """Score a run's top-k ensemble on ``num_tasks`` fixed test tasks (reusing its stored report
    when it matches); returns the report, as ``mamlpp-eval`` writes it, plus ``reused``. Holds the
    run folder's lock meanwhile (``RunLockedError`` while a trainer writes it)."""
    with RunLock(run_dir, "mamlpp-reproduce table", advice="score it when its training is done"):
        return _score_run(run_dir, num_tasks=num_tasks, top_k=top_k, device=device, backend=backend,
                          dataset_root=dataset_root, cache_dir=cache_dir, batch_size=batch_size, rescore=rescore,
                          progress=progress)


def _score_run(run_dir: Path, *, num_tasks, top_k, device, backend, dataset_root, cache_dir, batch_size, rescore,
               progress) -> dict:
    paths = resolve_members([run_dir], top_k)
    first = ckp.load_checkpoint(paths[0])
    data = stored_data_options(first["data"], dataset_root)
    if cache_dir:
        data.cache_dir = cache_dir
    if not rescore:
        rep = _stored_report(run_dir, paths, num_tasks, data.eval_seed)
        if rep is not None:
            return {**rep, "reused": True}
    learners, ckpts = load_members(paths, backend, device)
    res = evaluate_checkpoints(paths, num_tasks=num_tasks, batch_size=batch_size, data=data, learners=learners,
                               ckpts=ckpts, progress=progress)
    rep = {**report_header(paths, learners, ckpts, data, device), "test": res, "seconds": res["seconds"]}
    ckp.atomic_write_text(run_dir / "eval-test.json", json.dumps(rep, indent=2) + "\n")
    return {**rep, "reused": False}


def _notes(preset: str, status: dict) -> list[str]:
    cfg = status.get("config")
    if not cfg:
        return []
    ref = from_preset(preset).to_dict()
    notes = []
    e, i = cfg["total_epochs"], cfg["iterations_per_epoch"]
    if (e, i) != (ref["total_epochs"], ref["iterations_per_epoch"]):
        notes.append(f"shortened schedule: {e} epoch{'s' if e != 1 else ''} x {i} meta-steps (paper: "
                     f"{ref['total_epochs']} x {ref['iterations_per_epoch']})")
    if cfg.get("eval_tasks") != ref["eval_tasks"]:
        notes.append(f"{cfg.get('eval_tasks')} validation tasks (paper: {ref['eval_tasks']})")
    other = sorted(k for k in ref if k not in _IGNORED_FIELDS and cfg.get(k, ref[k]) != ref[k])
    if other:
        notes.append("settings differ from the preset: " + ", ".join(f"{k}={cfg.get(k)!r}" for k in other))
    return notes


def paper_table(runs_dir: str | Path, *, configs: Sequence[str] = CONFIGS, seeds: Sequence[int] = SEEDS,
                num_tasks: int = 600, top_k: Optional[int] = None, device=None, backend: Optional[str] = None,
                roots: Optional[dict] = None, cache_dir: Optional[str] = None, batch_size: Optional[int] = None,
                include_unfinished: bool = False, rescore: bool = False, progress: bool = False,
                log=lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """Score every run of ``configs`` under ``runs_dir`` and aggregate per configuration.

    Returns a JSON-friendly dict: ``citation``, ``protocol`` and ``configs``, one entry per
    configuration with ``paper`` (MAML++ and MAML, percent), ``runs`` (one per seed: ``seed``,
    ``run_dir``, ``status``, and for a scored run ``accuracy`` and ``ci95`` in percent,
    ``members``, ``epochs_done``, ``notes``), and ``scored``, ``mean`` and ``std`` (percent; the
    std is the sample std over the scored seeds, None below two)."""
    runs_dir = Path(runs_dir)
    roots = roots or {}
    out = {"citation": PAPER_CITATION,
           "protocol": {"test_tasks": num_tasks, "ensemble": f"top-{top_k}" if top_k else "top ensemble_top_k (5)",
                        "std": "sample std over seeds (ddof=1)", "expected_seeds": list(seeds),
                        "runs_dir": str(runs_dir)},
           "configs": []}
    for preset in configs:
        entry = {"config": preset, "name": _pretty(preset), "paper": {k: list(v) for k, v in PAPER[preset].items()},
                 "runs": []}
        for seed in find_seeds(runs_dir, preset, seeds):
            rd = runs_dir / run_dir_name(preset, seed)
            st = run_status(rd)
            run = {"seed": seed, "run_dir": str(rd), "status": st["state"],
                   **{k: st[k] for k in ("epochs_done", "total_epochs", "iterations_per_epoch") if k in st}}
            if st["state"] == "unreadable":
                run["error"] = st["error"]
            cfg = st.get("config")
            if cfg and any(cfg.get(f) != from_preset(preset).to_dict()[f] for f in _SHAPE_FIELDS):
                run["status"] = "wrong configuration"
                run["error"] = (f"the folder holds a {cfg.get('dataset')} {cfg.get('ways')}-way "
                                f"{cfg.get('shots')}-shot run, not {preset}")
            run["notes"] = _notes(preset, st)
            scorable = run["status"] == "finished" or (include_unfinished and run["status"] == "unfinished"
                                                        and st.get("has_best"))
            if scorable:
                log(f"mamlpp-reproduce: scoring {rd} ...")
                try:
                    rep = score_run(rd, num_tasks=num_tasks, top_k=top_k, device=device, backend=backend,
                                    dataset_root=roots.get(cfg["dataset"]), cache_dir=cache_dir,
                                    batch_size=batch_size, rescore=rescore, progress=progress)
                except RunLockedError as exc:
                    run["status"], run["error"] = "busy", str(exc)
                except (ValueError, FileNotFoundError, RuntimeError) as exc:
                    run["status"], run["error"] = "scoring failed", f"{type(exc).__name__}: {exc}"
                else:
                    t = rep["test"]
                    run.update(accuracy=100 * t["accuracy"], ci95=100 * t["ci95"], num_tasks=t["num_tasks"],
                               members=len(rep["members"]), member_accuracies=[100 * a for a in t["member_accuracies"]],
                               reused_report=rep["reused"])
                    if run["status"] == "unfinished":
                        run["notes"].append(f"unfinished (epoch {st['epochs_done']} of {st['total_epochs']}), "
                                            f"scored anyway (--include-unfinished)")
            entry["runs"].append(run)
        accs = [r["accuracy"] for r in entry["runs"] if "accuracy" in r]
        entry["scored"] = len(accs)
        entry["mean"] = sum(accs) / len(accs) if accs else None
        entry["std"] = (math.sqrt(sum((a - entry["mean"]) ** 2 for a in accs) / (len(accs) - 1))
                        if len(accs) >= 2 else None)
        out["configs"].append(entry)
    return out


def _run_text(r: dict) -> str:
    if "accuracy" in r:
        return f"{r['seed']}: {r['accuracy']:.2f} ± {r['ci95']:.2f}"
    if r["status"] == "unfinished":
        return f"{r['seed']}: unfinished ({r.get('epochs_done')}/{r.get('total_epochs')} epochs)"
    return f"{r['seed']}: {r['status']}"


def format_table(table: dict) -> str:
    """The table as text (a Markdown table, then notes)."""
    lines = [f"MAML++ test accuracy (%) beside {table['citation']}.",
             f"Each run: its top-k validation checkpoints ensembled on {table['protocol']['test_tasks']} fixed test "
             f"tasks (± 95% CI over tasks); ours: mean ± sample std over the scored seeds.",
             "",
             "| configuration | ours: mean ± std | seeds scored | per seed: accuracy ± 95% CI | paper MAML++ "
             "| paper MAML |",
             "|---|---|---|---|---|---|"]
    notes = []
    for e in table["configs"]:
        if e["mean"] is None:
            ours = "—"
        elif e["std"] is None:
            ours = f"{e['mean']:.2f}"
        else:
            ours = f"{e['mean']:.2f} ± {e['std']:.2f}"
        pp, pm = e["paper"]["MAML++"], e["paper"]["MAML"]
        lines.append(f"| {e['name']} | {ours} | {e['scored']} of {len(e['runs'])} | "
                     f"{'; '.join(_run_text(r) for r in e['runs'])} | {pp[0]} ± {pp[1]} | {pm[0]} ± {pm[1]} |")
        for r in e["runs"]:
            for n in r.get("notes", []) + ([r["error"]] if r.get("error") else []):
                notes.append(f"- {Path(r['run_dir']).name}: {n}")
    if notes:
        lines += ["", "Notes:"] + notes
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), metavar="PRESET",
                   help=f"configurations (default: all six: {' '.join(CONFIGS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="seeds (default 0 1 2)")
    p.add_argument("--device", default="auto",
                   help="torch device: auto (CUDA when available, else CPU; the default), cpu, cuda, cuda:1")
    p.add_argument("--backend", help="sequential, batched or fused (default: the training command's default)")
    for spec in data_registry.registered_datasets():
        p.add_argument(f"--{spec.name}-root", dest=_root_option(spec.name),
                       help=f"{spec.title} folder (default: ${spec.env_var}, else the default folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mamlpp-reproduce",
        description="Reproduce the MAML++ paper's table: 6 configurations x 3 seeds, trained with mamlpp-train, "
                    "then scored and aggregated beside the paper's numbers. See docs/reproduce.md.",
        epilog=f"Paper: {PAPER_CITATION}.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, what in (("plan", "print the training commands"), ("train", "run the training commands")):
        s = sub.add_parser(name, help=what, description=f"{what[0].upper()}{what[1:]} of every configuration x seed "
                                                         f"(run folders RUNS_DIR/<preset>-seed<seed>).")
        s.add_argument("--runs-dir", default="runs/paper", help="folder of the run folders (default runs/paper)")
        _add_selection(s)
        s.add_argument("--epochs", type=int, help="shorten the schedule: total epochs (paper: 100)")
        s.add_argument("--iters-per-epoch", type=int, help="shorten the schedule: meta-steps per epoch (paper: 500)")
        s.add_argument("--eval-tasks", type=int, help="validation tasks after each epoch (paper: 600)")
        s.add_argument("--threads", type=int, help="torch intra-op threads of each run")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="passed to every run's mamlpp-train --set (repeatable)")
        s.epilog = ("Any other option is passed to every mamlpp-train command as it is "
                    "(e.g. --workers 2, --cache-dir DIR).")
    t = sub.add_parser("table", help="score the runs and print the table",
                       description="Score each run's top-k ensemble on the fixed test tasks and print, per "
                                   "configuration, the mean ± std over seeds beside the paper's numbers.")
    t.add_argument("runs_dir", nargs="?", default="runs/paper", help="folder of the run folders (default runs/paper)")
    _add_selection(t)
    t.add_argument("--tasks", type=int, default=600, help="fixed test tasks per run (default 600)")
    t.add_argument("--top-k", type=int, help="checkpoints per run ensemble (default: the run's ensemble_top_k, 5)")
    t.add_argument("--eval-batch-size", type=int, help="tasks per batch (default: meta_batch)")
    t.add_argument("--cache-dir", help="preprocessing cache folder")
    t.add_argument("--threads", type=int, help="torch intra-op threads")
    t.add_argument("--include-unfinished", action="store_true",
                   help="also score unfinished runs (their best checkpoints so far); marked in the table")
    t.add_argument("--rescore", action="store_true", help="score again even when a run's eval-test.json matches")
    t.add_argument("--output", help="JSON file (default: RUNS_DIR/paper-table.json)")
    return p


def _check_selection(parser, args) -> None:
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad:
        parser.error(f"--configs: unknown configuration(s) {bad}; the paper's are {', '.join(CONFIGS)}")
    if any(s < 0 for s in args.seeds):
        parser.error("--seeds must be >= 0")
    for name in ("epochs", "iters_per_epoch", "eval_tasks", "threads", "tasks", "top_k", "eval_batch_size"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def _commands(args, program: Sequence[str]) -> list[tuple[str, int, list[str], dict]]:
    roots = _roots(args)
    out = []
    for preset in args.configs:
        for seed in args.seeds:
            st = run_status(Path(args.runs_dir) / run_dir_name(preset, seed))
            cmd = train_command(preset, seed, args.runs_dir, epochs=args.epochs, iters_per_epoch=args.iters_per_epoch,
                                eval_tasks=args.eval_tasks, device=args.device, backend=args.backend,
                                threads=args.threads, dataset_root=roots[from_preset(preset).dataset],
                                sets=args.set, extra=args.extra, resume=st["state"] == "unfinished",
                                progress=not args.no_progress, program=program)
            out.append((preset, seed, cmd, st))
    return out


def _train_all(args) -> int:
    """``mamlpp-reproduce train``: every configuration x seed one after another."""
    failed = []
    for preset, seed, cmd, st in _commands(args, (sys.executable, "-m", "mamlpp_ext.training.train")):
        name = run_dir_name(preset, seed)
        if st["state"] == "finished":
            print(f"mamlpp-reproduce: {name}: already finished, skipped", file=sys.stderr, flush=True)
            continue
        how = "resuming" if st["state"] == "unfinished" else "training"
        print(f"mamlpp-reproduce: {name}: {how}: {shlex.join(['mamlpp-train', *cmd[3:]])}", file=sys.stderr,
              flush=True)
        t0 = time.perf_counter()
        try:
            rc = subprocess.call(cmd)
        except KeyboardInterrupt:
            rc = 130
        if rc in (130, 143):  # Ctrl-C / SIGTERM: the run saved its checkpoint; stop here
            print(f"mamlpp-reproduce: interrupted during {name}; run the same command again to resume",
                  file=sys.stderr, flush=True)
            return rc
        print(f"mamlpp-reproduce: {name}: exit code {rc} after {time.perf_counter() - t0:.0f} s", file=sys.stderr,
              flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"mamlpp-reproduce: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr, flush=True)
        return 1
    print(f"mamlpp-reproduce: done. Next: mamlpp-reproduce table {args.runs_dir}", file=sys.stderr, flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "table":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    _check_selection(parser, args)
    if args.command == "plan":
        for preset, seed, cmd, st in _commands(args, ("mamlpp-train",)):
            state = "" if st["state"] in ("missing", "empty") else f"   # {st['state']}"
            print(shlex.join(cmd) + state)
        print(shlex.join(["mamlpp-reproduce", "table", args.runs_dir]
                         + (["--configs", *args.configs] if list(args.configs) != list(CONFIGS) else [])
                         + (["--seeds", *map(str, args.seeds)] if list(args.seeds) != list(SEEDS) else [])))
        return 0
    if args.command == "train":
        try:  # one `train` per runs folder at a time (each run also locks its own folder)
            lock = RunLock(args.runs_dir, "mamlpp-reproduce train",
                           advice="wait until it is done, or use another --runs-dir").acquire()
        except RunLockedError as exc:
            parser.error(str(exc))
        try:
            return _train_all(args)
        finally:
            lock.release()
    # table
    try:
        device = check_device(args.device)
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
    except ValueError as exc:
        parser.error(str(exc))
    if not Path(args.runs_dir).is_dir():
        parser.error(f"no such folder {args.runs_dir} (train the runs first: mamlpp-reproduce train)")
    print(f"mamlpp-reproduce: {describe_device(args.device, device)}", file=sys.stderr, flush=True)
    table = paper_table(args.runs_dir, configs=args.configs, seeds=args.seeds, num_tasks=args.tasks, top_k=args.top_k,
                        device=device, backend=args.backend,
                        roots=_roots(args),
                        cache_dir=args.cache_dir, batch_size=args.eval_batch_size,
                        include_unfinished=args.include_unfinished, rescore=args.rescore,
                        progress=not args.no_progress)
    print(format_table(table), flush=True)
    out = Path(args.output) if args.output else Path(args.runs_dir) / "paper-table.json"
    ckp.atomic_write_text(out, json.dumps(table, indent=2) + "\n")
    print(f"\nJSON written to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
