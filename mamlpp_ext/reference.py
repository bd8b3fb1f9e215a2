"""Pure-PyTorch twins of every mamlpp_ext operator.

Each function here computes what the matching ``torch.ops.mamlpp_ext`` op
computes, with ordinary differentiable PyTorch ops, one tensor at a time. They
are the semantic reference for the tests, the baseline for the benchmarks and
the fallback when the compiled extension is missing. Keep them simple and
obviously right; speed is the compiled ops' job.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["lslr_update", "lslr_scale", "lslr_dot"]


def lslr_update(params: Sequence[Tensor], grads: Sequence[Tensor], lrs: Tensor, step: int) -> list[Tensor]:
    """Inner-loop SGD step with learned per-layer, per-step rates (LSLR).

    params[k], grads[k]: (T, *shape_k), T tasks' fast weights of layer tensor k.
    lrs: (K, S) learned rates; step in [0, S).
    Returns [params[k] - lrs[k, step] * grads[k] for k in range(K)].
    """
    return [p - lrs[k, step] * g for k, (p, g) in enumerate(zip(params, grads))]


def lslr_scale(xs: Sequence[Tensor], lrs: Tensor, step: int, alpha: float) -> list[Tensor]:
    """[alpha * lrs[k, step] * xs[k] for k]: the twin of ``_lslr_scale``."""
    return [alpha * lrs[k, step] * x for k, x in enumerate(xs)]


def lslr_dot(xs: Sequence[Tensor], ys: Sequence[Tensor], like: Tensor, step: int, alpha: float) -> Tensor:
    """A tensor shaped and typed like ``like`` (K, S), zero except column ``step``, where row k
    holds alpha * sum(xs[k] * ys[k]) (accumulated in float64). The twin of ``_lslr_dot``: the
    gradient of the learned rates."""
    out = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
    for k, (x, y) in enumerate(zip(xs, ys)):
        out[k, step] = alpha * (x.double() * y.double()).sum()
    return out
