"""The LSLR op family: public wrapper, fake kernels and autograd formulas.

The schemas are in ``csrc/ops.cpp``, the kernels in ``csrc/cpu`` and ``csrc/cuda``, the
pure-PyTorch twins in :mod:`mamlpp_ext.ops.reference`. Here each op gets

* a fake (meta) kernel, so ``torch.compile`` and ``torch.library.opcheck`` can trace it, and
* an autograd formula written *with the compiled ops themselves*, so the backward is again
  differentiable and every order of derivative runs on fused kernels (NOTE [LSLR op family] in
  ``csrc/include/mamlpp/lslr.h``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["lslr_update"]

_ops = torch.ops.mamlpp_ext


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
    return _ops.lslr_update(list(params), list(grads), lrs, int(step))


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


# ---------------------------------------------------------------------------------------------
# Autograd: every formula calls the fused ops, whose own formulas are registered here too.
# ---------------------------------------------------------------------------------------------

def _fill_none(grads, meta) -> list[Tensor]:
    """Gradients of unused outputs arrive as None: replace them by zeros of the output's shape."""
    return [g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
            for g, (shape, dtype, device) in zip(grads, meta)]


def _any_rg(tensors: Sequence[Tensor]) -> bool:
    # In setup_context, ctx.needs_input_grad is flat over the list elements: ask the inputs.
    return any(t.requires_grad for t in tensors)


def _meta(tensors: Sequence[Tensor]):
    return [(t.shape, t.dtype, t.device) for t in tensors]


def _lslr_update_setup(ctx, inputs, output):
    params, grads, lrs, step = inputs
    ctx.step = step
    ctx.out_meta = _meta(params)
    ctx.need = (_any_rg(params), _any_rg(grads), lrs.requires_grad)
    # d/d grads needs lrs (a (K, S) tensor, always kept); d/d lrs needs grads.
    ctx.save_for_backward(lrs, *(grads if ctx.need[2] else []))


def _lslr_update_backward(ctx, grad_outs):
    need_p, need_g, need_lrs = ctx.need
    lrs, *grads = ctx.saved_tensors
    K = len(ctx.out_meta)
    gouts = _fill_none(grad_outs, ctx.out_meta)
    d_params = list(gouts) if need_p else [None] * K
    d_grads = _ops._lslr_scale(gouts, lrs, ctx.step, -1.0) if need_g else [None] * K
    d_lrs = _ops._lslr_dot(gouts, grads, lrs, ctx.step, -1.0) if need_lrs else None
    return d_params, d_grads, d_lrs, None


torch.library.register_autograd("mamlpp_ext::lslr_update", _lslr_update_backward,
                                setup_context=_lslr_update_setup)


def _lslr_scale_setup(ctx, inputs, output):
    xs, lrs, step, alpha = inputs
    ctx.step, ctx.alpha = step, alpha
    ctx.out_meta = _meta(xs)
    need_x, need_lrs = _any_rg(xs), lrs.requires_grad
    ctx.need = (need_x, need_lrs)
    ctx.save_for_backward(lrs, *(xs if need_lrs else []))


def _lslr_scale_backward(ctx, grad_outs):
    need_x, need_lrs = ctx.need
    lrs, *xs = ctx.saved_tensors
    K = len(ctx.out_meta)
    gouts = _fill_none(grad_outs, ctx.out_meta)
    d_xs = _ops._lslr_scale(gouts, lrs, ctx.step, ctx.alpha) if need_x else [None] * K
    d_lrs = _ops._lslr_dot(gouts, xs, lrs, ctx.step, ctx.alpha) if need_lrs else None
    return d_xs, d_lrs, None, None


torch.library.register_autograd("mamlpp_ext::_lslr_scale", _lslr_scale_backward,
                                setup_context=_lslr_scale_setup)


def _lslr_dot_setup(ctx, inputs, output):
    xs, ys, like, step, alpha = inputs
    ctx.step, ctx.alpha = step, alpha
    need_x, need_y = _any_rg(xs), _any_rg(ys)
    ctx.need = (need_x, need_y)
    ctx.K = len(xs)
    ctx.save_for_backward(*(ys if need_x else []), *(xs if need_y else []))


def _lslr_dot_backward(ctx, grad_out):
    need_x, need_y = ctx.need
    saved = ctx.saved_tensors
    K = ctx.K
    ys = saved[:K] if need_x else None
    xs = saved[K:] if need_x else saved
    # out[k, step] = alpha * <x_k, y_k>: d/dx_k = alpha * grad_out[k, step] * y_k, and symmetrically.
    d_xs = _ops._lslr_scale(list(ys), grad_out, ctx.step, ctx.alpha) if need_x else [None] * K
    d_ys = _ops._lslr_scale(list(xs), grad_out, ctx.step, ctx.alpha) if need_y else [None] * K
    return d_xs, d_ys, None, None, None


torch.library.register_autograd("mamlpp_ext::_lslr_dot", _lslr_dot_backward,
                                setup_context=_lslr_dot_setup)

