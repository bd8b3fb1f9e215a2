"""Scoring learners on fixed task lists: accuracy, 95% confidence interval, ensembles."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["confidence_interval", "score_batches", "score_tasks", "summarize_scores"]


def confidence_interval(task_accuracies: Sequence[float]) -> float:
    """Half-width of the 95% confidence interval of the mean: 1.96·std/√n (std over tasks, ddof=0)."""
    a = np.asarray(task_accuracies, dtype=np.float64)
    if a.size == 0:
        return float("nan")
    return float(1.96 * a.std() / math.sqrt(a.size))


def score_tasks(learners: Sequence, dataset, progress: bool = False, desc: str = "eval") -> dict:
    """Adapt and score every task of ``dataset`` with one learner or an ensemble.

    An ensemble's prediction is the argmax of the members' query logits averaged (SPEC §4).
    Returns ``accuracy`` (mean over tasks), ``ci95`` (1.96·std/√n), ``std``, ``num_tasks``,
    ``loss`` (mean over members and tasks of the query cross-entropy), ``task_accuracies``
    (list) and ``member_accuracies`` (each member's own mean accuracy).
    """
    return summarize_scores(score_batches(learners, dataset, range(len(dataset)), progress, desc))


def score_batches(learners: Sequence, dataset, batches: Sequence[int], progress: bool = False,
                  desc: str = "eval") -> list[dict]:
    """Per-batch raw scores of ``dataset[b]`` for b in ``batches``: dicts with ``batch``,
    ``accuracies`` (ensemble, per task), ``losses`` (per member and task) and ``member_correct``
    (per member, per task). ``summarize_scores`` turns any set of them into the report; a
    distributed validation scores a share of the batches per process and gathers them."""
    if not learners:
        raise ValueError("score_tasks needs at least one learner")
    out = []
    bar = None
    if progress:
        from tqdm import tqdm

        T = dataset.meta_batch_size
        bar = tqdm(total=sum(min(T, dataset.num_tasks - b * T) for b in batches), desc=desc, unit="task",
                   leave=False, dynamic_ncols=True)
    for b in batches:
        sx, sy, qx, qy = dataset[b]
        logit_sum = None
        losses, member_correct = [], []
        for learner in learners:
            res = learner.evaluate(sx, sy, qx, qy)
            logits = res["logits"].float().cpu()
            losses.append(res["task_losses"].float().cpu())
            member_correct.append((logits.argmax(-1) == qy).float().mean(-1))
            logit_sum = logits if logit_sum is None else logit_sum + logits
        out.append({"batch": int(b), "accuracies": (logit_sum.argmax(-1) == qy).float().mean(-1),
                    "losses": torch.cat(losses), "member_correct": member_correct})
        if bar is not None:
            bar.update(sx.shape[0])
    if bar is not None:
        bar.close()
    return out


def summarize_scores(scores: Sequence[dict]) -> dict:
    """The report of ``score_tasks`` from per-batch scores (any order; sorted by batch here)."""
    scores = sorted(scores, key=lambda r: r["batch"])
    if not scores:
        raise ValueError("no scored batches")
    task_acc = torch.cat([r["accuracies"] for r in scores]).double().numpy()
    members = len(scores[0]["member_correct"])
    return {"accuracy": float(task_acc.mean()), "ci95": confidence_interval(task_acc), "std": float(task_acc.std()),
            "num_tasks": int(task_acc.size),
            "loss": float(torch.cat([r["losses"] for r in scores]).double().mean()),
            "task_accuracies": task_acc.tolist(),
            "member_accuracies": [float(torch.cat([r["member_correct"][m] for r in scores]).double().mean())
                                  for m in range(members)]}
