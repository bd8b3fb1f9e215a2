"""Epoch-dependent schedules of MAML++ (SPEC §3): MSL weights, DA and CA.

* ``msl_weights``: the per-step query-loss weights of the multi-step loss.
* ``loss_weights``: what a task's loss uses at a given epoch and phase (MSL
  weights while training and epoch < msl_epochs, else the final step only).
* ``use_second_order``: the derivative-order annealing predicate.
* ``cosine_meta_lr``: the per-epoch cosine-annealed meta learning rate.

All of them are plain Python (no tensors), so they are exact and cheap.
"""

from __future__ import annotations

import math

__all__ = ["msl_weights", "loss_weights", "use_second_order", "cosine_meta_lr", "meta_lr_at"]


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


def loss_weights(num_steps: int, epoch: int, *, use_msl: bool, msl_epochs: int, training: bool) -> list[float]:
    """Per-step weights of the query loss for one task, length ``num_steps``.

    MSL weights while ``training and use_msl and epoch < msl_epochs``; otherwise
    only the query loss after the final update counts, with weight 1.
    """
    if training and use_msl and epoch < msl_epochs:
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
