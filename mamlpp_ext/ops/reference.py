"""Pure-PyTorch twins of every mamlpp_ext operator.

Each function here computes what the matching ``torch.ops.mamlpp_ext`` op
computes, with ordinary differentiable PyTorch ops, one tensor at a time. They
are the semantic reference for the tests, the baseline for the benchmarks and
the fallback when the compiled extension is missing. Keep them simple and
obviously right; speed is the compiled ops' job.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["lslr_update", "lslr_scale", "lslr_dot", "task_batch_norm", "batch_norm_double_backward", "task_conv2d",
           "task_conv_backward"]


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


# ---------------------------------------------------------------------------------------------
# Per-step batch norm of task-batched activations (twin of mamlpp_ext.batch_norm & co.)
# ---------------------------------------------------------------------------------------------

def _per_group_affine(t: Tensor | None, tasks: int) -> Tensor | None:
    """(C,) shared or (T, C) per-task affine -> the (T*C,) per-channel vector of F.batch_norm."""
    if t is None:
        return None
    return t.repeat(tasks) if t.dim() == 1 else t.reshape(-1)


def _check_negative_slope(negative_slope: float | None) -> None:
    """The contract of the compiled op: None, or a finite float >= 0."""
    if negative_slope is not None and not (math.isfinite(negative_slope) and negative_slope >= 0):
        raise ValueError("task_batch_norm: expected negative_slope to be None (no activation) or a finite "
                         f"float >= 0 (the LeakyReLU slope; 0 is ReLU), but got negative_slope={negative_slope}")


def task_batch_norm(input: Tensor, tasks: int, weight: Tensor | None = None, bias: Tensor | None = None,
                    running_mean: Tensor | None = None, running_var: Tensor | None = None, *,
                    step: int = 0, training: bool = True, update_stats: bool = True,
                    momentum: float = 0.1, eps: float = 1e-5, negative_slope: float | None = None) -> Tensor:
    """The plain-PyTorch path of per-step batch norm on task-batched activations.

    input: (N, T*C) or (N, T*C, H, W), channel t*C + c = channel c of task t.
    weight, bias: None, (C,) (shared; pass row ``step`` of the (S, C) tables) or (T, C) (per task).
    running_mean, running_var: (S, C) or None. Training: normalise each (task, channel) with its
    batch statistics and, when ``update_stats``, update row ``step`` in place with the mean over
    tasks of the batch mean and unbiased variance (momentum). Evaluation: normalise with row
    ``step``. ``negative_slope``: None, no activation; a float a >= 0: ``F.leaky_relu(out, a)``
    (``F.relu`` for a = 0) applied to the result; a < 0 or non-finite is rejected, as by the op.
    Repeats gamma/beta T times and runs ATen's ``F.batch_norm`` on the whole tensor.
    """
    _check_negative_slope(negative_slope)
    C = input.shape[1] // tasks
    w = _per_group_affine(weight, tasks)
    b = _per_group_affine(bias, tasks)
    if training:
        rm = rv = None
        if running_mean is not None and update_stats:
            rm = running_mean[step].repeat(tasks)
            rv = running_var[step].repeat(tasks)
        out = torch.nn.functional.batch_norm(input, rm, rv, w, b, True, momentum, eps)
        if rm is not None:
            with torch.no_grad():
                running_mean[step] = rm.view(tasks, C).mean(0)
                running_var[step] = rv.view(tasks, C).mean(0)
    else:
        out = torch.nn.functional.batch_norm(input, running_mean[step].repeat(tasks),
                                             running_var[step].repeat(tasks), w, b, False, 0.0, eps)
    if negative_slope is not None:
        if negative_slope == 0:
            out = torch.nn.functional.relu(out)
        else:
            out = torch.nn.functional.leaky_relu(out, negative_slope)
    return out


def _bn_fixed_slope_forward(x: Tensor, weight: Tensor | None, bias: Tensor, tasks: int,
                            slope: Tensor | None, training: bool, mean: Tensor, var: Tensor,
                            step: int, eps: float) -> Tensor:
    """a * (gamma * x^ + beta) with the activation slope ``a`` held fixed (None: no activation).

    Training: x^ uses the batch statistics of x (as differentiable functions of x); evaluation:
    the constants ``mean[step]``, ``var[step]`` ((S, C) tables). Used to differentiate the
    backward ops (the slope of a LeakyReLU is piecewise constant).
    """
    N, G = x.shape[0], x.shape[1]
    xv = x.reshape(N, G, -1)
    if training:
        mu = xv.mean(dim=(0, 2))
        sigma2 = xv.var(dim=(0, 2), unbiased=False)
    else:
        mu = mean[step].to(x.dtype).repeat(tasks)
        sigma2 = var[step].to(x.dtype).repeat(tasks)
    xhat = (xv - mu[:, None]) / torch.sqrt(sigma2[:, None] + eps)
    gamma = _per_group_affine(weight, tasks)
    z = xhat * gamma[:, None] if gamma is not None else xhat
    z = z + _per_group_affine(bias, tasks)[:, None]
    if slope is not None:
        z = z * slope.reshape(N, G, -1)
    return z.reshape(x.shape)


def _as_leaf_if_needed(t: Tensor | None) -> Tensor | None:
    if t is None or t.requires_grad:
        return t
    return t.detach().requires_grad_(True)


def batch_norm_double_backward(grad_grad_input: Tensor | None, grad_grad_weight: Tensor | None,
                               grad_grad_bias: Tensor | None, grad_out: Tensor, input: Tensor,
                               weight: Tensor | None, out: Tensor | None, mean: Tensor, var: Tensor,
                               tasks: int, step: int, training: bool, eps: float,
                               negative_slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """Twin of ``_batch_norm_double_backward``, by differentiating the reference twice.

    Returns (grad_grad_out, grad_input, grad_weight) as differentiable functions of every tensor
    argument (so a further derivative can be taken through it). ``out``: the forward output when
    the activation is fused, else None; its sign fixes the slope (1 where out > 0, else
    ``negative_slope``, which is read only when ``out`` is given).
    """
    C = input.shape[1] // tasks
    affine_shape = weight.shape if weight is not None else (C,)
    slope = None
    if out is not None:
        _check_negative_slope(negative_slope)
        one = torch.ones((), dtype=input.dtype, device=input.device)
        slope = torch.where(out > 0, one, one * negative_slope).detach()
    with torch.enable_grad():
        gy = _as_leaf_if_needed(grad_out)
        x = _as_leaf_if_needed(input)
        w = _as_leaf_if_needed(weight) if weight is not None else torch.ones(
            affine_shape, dtype=input.dtype, device=input.device, requires_grad=True)
        b = torch.zeros(affine_shape, dtype=input.dtype, device=input.device, requires_grad=True)
        y = _bn_fixed_slope_forward(x, w, b, tasks, slope, training, mean, var, step, eps)
        dx, dw, db = torch.autograd.grad(y, (x, w, b), gy, create_graph=True)
        total = dx.new_zeros(())
        if grad_grad_input is not None:
            total = total + (dx * grad_grad_input).sum()
        if grad_grad_weight is not None:
            total = total + (dw * grad_grad_weight).sum()
        if grad_grad_bias is not None:
            total = total + (db * grad_grad_bias).sum()
        if total.requires_grad:
            res = torch.autograd.grad(total, (gy, x, w), create_graph=True, allow_unused=True)
        else:  # every upstream gradient is None
            res = (None, None, None)
    like = (grad_out, input, w)
    return tuple(r if r is not None else torch.zeros_like(t) for r, t in zip(res, like))


# ---------------------------------------------------------------------------------------------
# Task-batched convolution (twin of mamlpp_ext.task_conv / _task_conv_backward)
# ---------------------------------------------------------------------------------------------

def task_conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                groups: int = 1) -> Tensor:
    """T tasks' ``F.conv2d`` as one ATen grouped convolution (groups = T * groups).

    input: (N, T*C_in, H, W), channel t*C_in + c = channel c of task t; weight:
    (T, C_out, C_in/groups, kh, kw); bias: (T, C_out) or None; stride, padding (also "valid" /
    "same"), dilation and groups as in ``F.conv2d``. Returns (N, T*C_out, H', W'). The twin of
    ``mamlpp_ext.ops.task_conv2d``; its derivatives are ATen's (the double backward of a grouped
    convolution computes its weight term group by group).
    """
    T = weight.shape[0]
    return torch.nn.functional.conv2d(input, weight.reshape(-1, *weight.shape[2:]),
                                      bias.reshape(-1) if bias is not None else None, stride, padding, dilation,
                                      groups * T)


def task_conv_backward(grad_out: Tensor, input: Tensor, weight: Tensor, stride, padding, dilation, groups: int,
                       output_mask: Sequence[bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_input, grad_weight, grad_bias) of :func:`task_conv2d` for grad_out, shaped like input,
    weight and (T, C_out); None where ``output_mask`` is False. The twin of ``_task_conv_backward``
    (ATen's ``convolution_backward`` with T*groups groups; differentiable by ATen's formulas)."""
    T, C_out = weight.shape[:2]
    gi, gw, gb = torch.ops.aten.convolution_backward(
        grad_out, input, weight.reshape(-1, *weight.shape[2:]), [T * C_out], list(stride), list(padding),
        list(dilation), False, [0, 0], groups * T, list(output_mask))
    return (gi if output_mask[0] else None, gw.reshape(weight.shape) if output_mask[1] else None,
            gb.reshape(T, C_out) if output_mask[2] else None)
