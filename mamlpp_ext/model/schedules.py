"""Epoch-dependent schedules of MAML++ (SPEC §3): MSL weights, DA and CA.

* ``msl_weights``: the per-step query-loss weights of the multi-step loss.
* ``loss_weights``: what a task's loss uses at a given epoch and phase (MSL
  weights while training and epoch < msl_epochs, else the final step only).
* ``use_second_order``: the derivative-order annealing predicate.
* ``cosine_meta_lr``: the per-epoch cosine-annealed meta learning rate.
* ``epoch_plan``: all of the above for one ``MAMLConfig`` and epoch — what a training step at
  that epoch does. Callers ask it instead of re-deriving the rules.

All of them are plain Python (no tensors), so they are exact and cheap.
"""

from __future__ import annotations

import math
from typing import NamedTuple

__all__ = ["EpochPlan", "cosine_meta_lr", "epoch_plan", "loss_weights", "meta_lr_at", "msl_active", "msl_weights",
           "use_second_order"]


def msl_weights(num_steps: int, epoch: int, msl_epochs: int) -> list[float]:
    """Multi-step loss weights v_0 … v_{S-1} at ``epoch`` (SPEC §3, MSL).

    d = 1/(S·E), m = 0.03/S; v_i = max(1/S − e·d, m) for i < S−1 and
    v_{S−1} = min(1/S + e·(S−1)·d, 1 − (S−1)·m), with S = num_steps, E = msl_epochs.
    E = 0 means MSL is never active; then the final step gets weight 1.
    """
    S = int(num_steps)
    if S < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if msl_epochs <= 0:
        return [0.0] * (S - 1) + [1.0]
    e = float(epoch)
    d = 1.0 / (S * msl_epochs)
    m = 0.03 / S
    ws = [max(1.0 / S - e * d, m) for _ in range(S - 1)]
    ws.append(min(1.0 / S + e * (S - 1) * d, 1.0 - (S - 1) * m))
    return ws


def msl_active(use_msl: bool, epoch: int, msl_epochs: int) -> bool:
    """Whether a training step at ``epoch`` scores the query set after every inner update (MSL)."""
    return bool(use_msl) and epoch < msl_epochs


def loss_weights(num_steps: int, epoch: int, *, use_msl: bool, msl_epochs: int, training: bool) -> list[float]:
    """Per-step weights of the query loss for one task, length ``num_steps``.

    MSL weights while ``training and use_msl and epoch < msl_epochs``; otherwise
    only the query loss after the final update counts, with weight 1.
    """
    if training and msl_active(use_msl, epoch, msl_epochs):
        return msl_weights(num_steps, epoch, msl_epochs)
    return [0.0] * (num_steps - 1) + [1.0]


def use_second_order(second_order: bool, epoch: int, first_order_to_second_order_epoch: int) -> bool:
    """DA: second-order meta-gradients iff ``second_order and epoch > first_order_to_second_order_epoch``."""
    return bool(second_order) and epoch > first_order_to_second_order_epoch


def cosine_meta_lr(epoch: int, meta_lr: float, min_meta_lr: float, total_epochs: int) -> float:
    """CA: β_e = β_min + ½(β₀ − β_min)(1 + cos(π·e/E_total))."""
    return min_meta_lr + 0.5 * (meta_lr - min_meta_lr) * (1.0 + math.cos(math.pi * epoch / total_epochs))


def meta_lr_at(config, epoch: int) -> float:
    """The meta learning rate a ``MAMLConfig`` uses at ``epoch`` (constant when CA is off)."""
    if not config.cosine_annealing:
        return float(config.meta_lr)
    return cosine_meta_lr(epoch, config.meta_lr, config.min_meta_lr, config.total_epochs)


class EpochPlan(NamedTuple):
    """What a training step at one epoch does (SPEC §3).

    loss_weights: per-step query-loss weights (length inner_steps); score_every_step: the
    query set is scored after every inner update (MSL active), else after the last only;
    second_order: DA; meta_lr: the Adam learning rate (CA).
    """

    loss_weights: list
    score_every_step: bool
    second_order: bool
    meta_lr: float


def epoch_plan(config, epoch: int) -> EpochPlan:
    """The ``EpochPlan`` of a ``MAMLConfig`` at ``epoch``."""
    S = config.inner_steps
    return EpochPlan(loss_weights(S, epoch, use_msl=config.use_msl, msl_epochs=config.msl_epochs, training=True),
                     msl_active(config.use_msl, epoch, config.msl_epochs),
                     use_second_order(config.second_order, epoch, config.first_order_to_second_order_epoch),
                     meta_lr_at(config, epoch))
