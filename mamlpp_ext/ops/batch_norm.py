"""Per-step batch norm of task-batched activations: public wrapper, fake kernels, autograd.

Schemas: ``csrc/ops.cpp``; kernels: ``csrc/cpu/batch_norm_cpu.cpp``,
``csrc/cuda/batch_norm_cuda.cu``; arithmetic: ``csrc/include/mamlpp/batch_norm.h`` (NOTE
[Task-batched batch norm]); plain-PyTorch twin: :func:`mamlpp_ext.ops.reference.task_batch_norm`.

Derivative chain (every order second-order MAML needs runs on fused kernels):

* ``batch_norm`` / ``batch_norm_eval``  --backward-->  ``_batch_norm_backward``
* ``_batch_norm_backward``  --backward-->  ``_batch_norm_double_backward``
* ``_batch_norm_double_backward``  --backward-->  differentiates the pure-PyTorch twin
  :func:`mamlpp_ext.ops.reference.batch_norm_double_backward` (third order and beyond: correct, not
  fused).

The first two links (and ``batch_norm_update_stats_``, run outside autograd) are C++ autograd
kernels (``csrc/autograd/batch_norm_autograd.cpp``, NOTE [Batch norm autograd in C++]): no Python
runs per call or per backward. The third stays here, in Python; the fake kernels too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference as _reference

__all__ = ["task_batch_norm"]

_ops = torch.ops.mamlpp_ext
# The overloads themselves: calling them skips the packet's overload resolution.
_batch_norm = _ops.batch_norm.default
_batch_norm_eval = _ops.batch_norm_eval.default
_update_stats = _ops.batch_norm_update_stats_.default


def task_batch_norm(input: Tensor, tasks: int, weight: Tensor | None = None, bias: Tensor | None = None,
                    running_mean: Tensor | None = None, running_var: Tensor | None = None, *,
                    step: int = 0, training: bool = True, update_stats: bool = True,
                    momentum: float = 0.1, eps: float = 1e-5, negative_slope: float | None = None) -> Tensor:
    """Per-step batch norm of T tasks' activations in one fused op (optionally + LeakyReLU/ReLU).

    Args:
        input: (N, T*C) or (N, T*C, H, W); channel t*C + c is channel c of task t. Any memory
            layout (channels_last is read through a contiguous copy); the output is contiguous.
        tasks: T.
        weight, bias: both None, both (C,) (shared by the tasks: pass row ``step`` of the (S, C)
            per-step tables, so the gradient lands in that row) or both (T, C) (per task, e.g.
            BN affine adapted in the inner loop). Dtype of input.
        running_mean, running_var: (S, C) per-step running statistics (dtype of input or float32)
            or None.
        step: the inner step s: row of the running statistics to update (training) or to
            normalise with (evaluation).
        training: True: normalise each (task, channel) with its batch mean and biased variance
            over (N, H, W); then, if running statistics are given and ``update_stats``, update
            row ``step`` in place (no autograd) with the mean over tasks of the batch mean and of
            the unbiased batch variance, momentum ``momentum``. False: normalise with row
            ``step`` of the running statistics (required), which are not changed.
        negative_slope: None: no activation. A finite float a >= 0: LeakyReLU with negative slope a
            (``z if z > 0 else a * z``; a = 0 is ReLU) applied to the result, fused in the op.
            a < 0 or non-finite is rejected (the backward reads the slope from the sign of the
            output, which is right only for a >= 0).

    Returns:
        (N, T*C[, H, W]) tensor. Differentiable w.r.t. input, weight and bias to any order;
        backward and double backward are fused kernels.
    """
    # Runs ~40 times per meta-step: argument checks are the ops' (in C++), except the pairing of
    # the running statistics, which only this wrapper sees.
    if (running_mean is None) != (running_var is None):
        raise ValueError("task_batch_norm: expected running_mean and running_var to be both "
                         "given or both None")
    if training:
        out, mean, var = _batch_norm(input, weight, bias, tasks, eps, negative_slope)
        if update_stats and running_mean is not None:
            shape = input.shape
            count = shape[0] * shape[2] * shape[3] if len(shape) == 4 else shape[0]
            _update_stats(running_mean, running_var, mean, var, tasks, step, count, momentum)
        return out
    if running_mean is None:
        raise ValueError("task_batch_norm: evaluation mode (training=False) needs running_mean "
                         "and running_var")
    return _batch_norm_eval(input, weight, bias, running_mean, running_var, tasks, step, eps, negative_slope)


# ---------------------------------------------------------------------------------------------
# Fake kernels: shapes only
# ---------------------------------------------------------------------------------------------

def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _affine_shape(input: Tensor, tasks: int, weight: Tensor | None):
    return tuple(weight.shape) if weight is not None else (input.shape[1] // tasks,)


@torch.library.register_fake("mamlpp_ext::batch_norm")
def _batch_norm_fake(input, weight, bias, tasks, eps, negative_slope):
    stats = input.new_empty((input.shape[1],), dtype=_stats_dtype(input.dtype))
    return input.new_empty(input.shape), stats, torch.empty_like(stats)


@torch.library.register_fake("mamlpp_ext::batch_norm_eval")
def _batch_norm_eval_fake(input, weight, bias, running_mean, running_var, tasks, step, eps, negative_slope):
    return input.new_empty(input.shape)


@torch.library.register_fake("mamlpp_ext::batch_norm_update_stats_")
def _batch_norm_update_stats_fake(running_mean, running_var, mean, var, tasks, step, count, momentum):
    return None


@torch.library.register_fake("mamlpp_ext::_batch_norm_backward")
def _batch_norm_backward_fake(grad_out, input, weight, out, mean, var, tasks, step, training, eps,
                              negative_slope):
    shape = _affine_shape(input, tasks, weight)
    return input.new_empty(input.shape), input.new_empty(shape), input.new_empty(shape)


@torch.library.register_fake("mamlpp_ext::_batch_norm_double_backward")
def _batch_norm_double_backward_fake(grad_grad_input, grad_grad_weight, grad_grad_bias, grad_out, input,
                                     weight, out, mean, var, tasks, step, training, eps, negative_slope):
    return (input.new_empty(input.shape), input.new_empty(input.shape),
            input.new_empty(_affine_shape(input, tasks, weight)))


# ---------------------------------------------------------------------------------------------
# Autograd of _batch_norm_double_backward (the others are C++ kernels: NOTE [Batch norm autograd in
# C++] in csrc/autograd/batch_norm_autograd.cpp)
# ---------------------------------------------------------------------------------------------

def _check_constant_stats(op: str, mean: Tensor, var: Tensor) -> None:
    # The saved statistics' dependence on input is inside the closed-form derivative w.r.t.
    # input; a gradient w.r.t. them as separate inputs is not provided: refuse, never drop it.
    if mean.requires_grad or var.requires_grad:
        raise RuntimeError(f"mamlpp_ext.{op}: mean and var are treated as constants (their dependence "
                           "on input is in the closed-form derivative); they must not require grad")


def _batch_norm_double_backward_setup(ctx, inputs, output):
    (gg_input, gg_weight, gg_bias, grad_out, input, weight, out, mean, var, tasks, step, training,
     eps, negative_slope) = inputs
    _check_constant_stats("_batch_norm_double_backward", mean, var)
    ctx.args = (tasks, step, training, eps, negative_slope)
    ctx.save_for_backward(gg_input, gg_weight, gg_bias, grad_out, input, weight, out, mean, var)


def _batch_norm_double_backward_backward(ctx, g_ggo, g_gx, g_gw):
    # Third order: not fused. Differentiate the pure-PyTorch twin, built from the saved inputs
    # themselves, so the result is again differentiable (create_graph when grad mode is on).
    saved = ctx.saved_tensors
    gg_input, gg_weight, gg_bias, grad_out, input, weight, out, mean, var = saved
    create = torch.is_grad_enabled()
    candidates = [(0, gg_input), (1, gg_weight), (2, gg_bias), (3, grad_out), (4, input), (5, weight)]
    wanted = [(i, t) for i, t in candidates if t is not None and ctx.needs_input_grad[i]]
    result = [None] * 14
    if not wanted:
        return tuple(result)
    with torch.enable_grad():
        leaves = {i: (t if t.requires_grad else t.detach().requires_grad_(True)) for i, t in candidates
                  if t is not None}
        outs = _reference.batch_norm_double_backward(
            leaves.get(0), leaves.get(1), leaves.get(2), leaves[3], leaves[4], leaves.get(5), out, mean, var,
            *ctx.args)
        pairs = [(o, g) for o, g in zip(outs, (g_ggo, g_gx, g_gw)) if g is not None and o.requires_grad]
        if pairs:
            grads = torch.autograd.grad([o for o, _ in pairs], [leaves[i] for i, _ in wanted],
                                        [g for _, g in pairs], create_graph=create, allow_unused=True)
        else:
            grads = [None] * len(wanted)
    for (i, t), g in zip(wanted, grads):
        result[i] = g if g is not None else torch.zeros_like(t)
    return tuple(result)


torch.library.register_autograd("mamlpp_ext::_batch_norm_double_backward", _batch_norm_double_backward_backward,
                                setup_context=_batch_norm_double_backward_setup)
