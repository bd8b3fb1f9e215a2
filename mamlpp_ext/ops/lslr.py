"""The LSLR op family: public wrapper and fake kernels.

The schemas are in ``csrc/ops.cpp``, the kernels in ``csrc/cpu`` and ``csrc/cuda``, the autograd
in ``csrc/autograd/lslr_autograd.cpp`` (C++ ``torch::autograd::Function``s at the Autograd key:
no Python runs when an op or its backward is called; every backward calls the ops again, so each
order of derivative runs on the fused kernels, NOTE [LSLR op family] in
``csrc/include/mamlpp/lslr.h``), the pure-PyTorch twins in :mod:`mamlpp_ext.ops.reference`. Here
each op gets a fake (meta) kernel, so ``torch.compile`` and ``torch.library.opcheck`` can trace it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["lslr_update"]

# The op packet, looked up once. Calling it costs one Python frame (OpOverloadPacket.__call__);
# the op's own argument parser accepts any sequence of tensors and any integer, so the wrapper
# converts nothing. torch.compile traces the call (dynamo knows op packets).
_lslr_update = torch.ops.mamlpp_ext.lslr_update


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def lslr_update(params: Sequence[Tensor], grads: Sequence[Tensor], lrs: Tensor, step: int) -> list[Tensor]:
    """The MAML++ inner-loop update with learned per-layer, per-step learning rates (LSLR).

    Args:
        params: K tensors; ``params[k]`` has shape (T, *shape_k): the fast weights of layer tensor
            k for T tasks. May be task-broadcast (``theta0[k].expand(T, ...)``), read in place.
        grads: K tensors with the shapes of ``params``.
        lrs: (K, S) learned rates, the dtype of ``params`` or float32.
        step: the inner step, 0 <= step < S.

    Returns:
        K new contiguous tensors, ``params[k] - lrs[k, step] * grads[k]``, computed in one fused
        pass over the list (one kernel launch on CUDA). Differentiable w.r.t. params, grads and
        lrs to any order; the gradient of ``lrs`` is summed deterministically.
    """
    return _lslr_update(params, grads, lrs, step)


# ---------------------------------------------------------------------------------------------
# Fake kernels: shapes only
# ---------------------------------------------------------------------------------------------

def _dense_like(t: Tensor) -> Tensor:
    return t.new_empty(t.shape)


@torch.library.register_fake("mamlpp_ext::lslr_update")
def _lslr_update_fake(params, grads, lrs, step):
    return [_dense_like(p) for p in params]


@torch.library.register_fake("mamlpp_ext::_lslr_scale")
def _lslr_scale_fake(xs, lrs, step, alpha):
    return [_dense_like(x) for x in xs]


@torch.library.register_fake("mamlpp_ext::_lslr_dot")
def _lslr_dot_fake(xs, ys, like, step, alpha):
    return _dense_like(like)
