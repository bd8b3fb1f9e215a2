"""The task-batched convolution: public wrapper and fake kernels.

T tasks' 2-D convolutions as one grouped convolution over the task-major layout (channel
t*C + c is channel c of task t), with every derivative again one grouped convolution call of our
own ops, so second- and higher-order gradients never fall back to ATen's per-group double
backward (one convolution per task there).

Schemas: ``csrc/ops.cpp``; implementation (one ATen convolution call per op, the same for CPU
and CUDA): ``csrc/task_conv.cpp``, NOTE [Task-batched convolution] in
``csrc/include/mamlpp/task_conv.h``; autograd: ``csrc/autograd/task_conv_autograd.cpp`` (C++ at
the Autograd key, no Python per call or per backward):

* ``task_conv``  --backward-->  ``_task_conv_backward``
* ``_task_conv_backward``  --backward-->  ``task_conv`` and ``_task_conv_backward`` (any order)

Plain-PyTorch twin: :func:`mamlpp_ext.ops.reference.task_conv2d`. Here: the wrapper and the fake
(meta) kernels, so ``torch.compile`` and ``torch.library.opcheck`` can trace the ops.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

__all__ = ["task_conv2d"]

# The overload itself: calling it skips the packet's overload resolution.
_task_conv = torch.ops.mamlpp_ext.task_conv.default

_Pair = Union[int, Sequence[int]]


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def task_conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: _Pair = 1,
                padding: Union[_Pair, str] = 0, dilation: _Pair = 1, groups: int = 1) -> Tensor:
    """T tasks' ``F.conv2d`` in one grouped convolution over task-major channels.

    The arguments are ``F.conv2d``'s, with a leading task dimension on the weight and bias:

    Args:
        input: (N, T*C_in, H, W); channel t*C_in + c is channel c of task t. Any memory layout.
        weight: (T, C_out, C_in/groups, kh, kw): task t's weight (may be task-broadcast,
            ``w.expand(T, ...)``). Dtype and device of input (float32, float64, float16, bfloat16).
        bias: (T, C_out) or None.
        stride, padding, dilation: one int or a (height, width) pair, as in ``F.conv2d``;
            ``padding`` may also be ``"valid"`` or ``"same"`` (stride 1; an odd total padding puts
            the extra row/column at the bottom/right, as ``F.conv2d`` does).
        groups: the layer's own groups (the grouped convolution has T*groups groups).

    Returns:
        (N, T*C_out, H', W') in input's memory format (contiguous or channels_last): channels
        t*C_out ... (t+1)*C_out - 1 are ``F.conv2d(input[:, t*C_in:(t+1)*C_in], weight[t],
        bias[t], stride, padding, dilation, groups)``. Differentiable w.r.t. input, weight and
        bias to any order, each derivative one grouped convolution whatever T.
    """
    if isinstance(padding, str):
        input, padding = _string_padding(input, weight, padding, stride, dilation)
    return _task_conv(input, weight, bias, stride, padding, dilation, groups)


def _pair(v: _Pair, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(v)
    if len(v) == 1:
        return v[0], v[0]
    if len(v) != 2:
        raise ValueError(f"task_conv2d: expected {name} to be one int or a (height, width) pair, got {v!r}")
    return v


def _string_padding(input: Tensor, weight: Tensor, padding: str, stride: _Pair,
                    dilation: _Pair) -> tuple[Tensor, tuple[int, int]]:
    """(input, numeric padding) for ``padding="valid"`` or ``"same"``; an odd total padding pads
    the input by one more row/column at the bottom/right (differentiably) first."""
    if padding == "valid":
        return input, (0, 0)
    if padding != "same":
        raise ValueError(f"task_conv2d: expected padding to be an int, a pair, 'valid' or 'same', got {padding!r}")
    if _pair(stride, "stride") != (1, 1):
        raise ValueError("task_conv2d: padding='same' needs stride 1 (as in F.conv2d), got "
                         f"stride={stride!r}")
    if weight.dim() != 5:
        raise ValueError("task_conv2d: expected weight to be 5-D (T, C_out, C_in/groups, kh, kw), but got shape "
                         f"{tuple(weight.shape)}")
    dil = _pair(dilation, "dilation")
    total = [d * (k - 1) for d, k in zip(dil, weight.shape[3:])]
    left = [t // 2 for t in total]
    extra = [t - lt - lt for t, lt in zip(total, left)]  # 0 or 1 per dim
    if any(extra):
        input = torch.nn.functional.pad(input, (0, extra[1], 0, extra[0]))
    return input, (left[0], left[1])


# ---------------------------------------------------------------------------------------------
# Fake kernels: shapes only (the C++ checks name the same arguments with more detail)
# ---------------------------------------------------------------------------------------------

def _check_and_out_shape(op: str, input, weight, bias, stride, padding, dilation, groups):
    torch._check(input.dim() == 4, lambda: f"{op}: expected input to be 4-D (N, T*C_in, H, W), got shape "
                                           f"{tuple(input.shape)}")
    torch._check(weight.dim() == 5, lambda: f"{op}: expected weight to be 5-D (T, C_out, C_in/groups, kh, kw), "
                                            f"got shape {tuple(weight.shape)}")
    torch._check(input.dtype.is_floating_point, lambda: f"{op}: expected input to be a floating-point tensor, "
                                                         f"got dtype {input.dtype}")
    torch._check(weight.dtype == input.dtype, lambda: f"{op}: expected weight to have the dtype of input "
                                                      f"({input.dtype}), got {weight.dtype}")
    torch._check(groups >= 1, lambda: f"{op}: expected groups >= 1, got groups={groups}")
    T, C_out, C_in_g = weight.shape[0], weight.shape[1], weight.shape[2]
    torch._check(T >= 1, lambda: f"{op}: expected weight to hold at least one task (dim 0)")
    torch._check(C_out >= 1 and C_out % groups == 0,
                 lambda: f"{op}: expected the output channels of weight to be a positive multiple of groups={groups}")
    torch._check(input.shape[1] == T * groups * C_in_g,
                 lambda: f"{op}: expected input to have T*C_in = {T * groups * C_in_g} channels, got shape "
                         f"{tuple(input.shape)}")
    for name, v, lo in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        torch._check(len(v) == 2 and v[0] >= lo and v[1] >= lo,
                     lambda: f"{op}: expected {name} to be two values >= {lo}, got {list(v)}")
    out = []
    for d in range(2):
        padded = input.shape[2 + d] + 2 * padding[d]
        span = dilation[d] * (weight.shape[3 + d] - 1) + 1
        torch._check(padded >= span, lambda: f"{op}: expected the padded input to be at least the dilated kernel")
        out.append((padded - span) // stride[d] + 1)
    if bias is not None:
        torch._check(bias.dim() == 2 and bias.shape[0] == T and bias.shape[1] == C_out,
                     lambda: f"{op}: expected bias to have shape (T, C_out) = ({T}, {C_out}), got "
                             f"{tuple(bias.shape)}")
        torch._check(bias.dtype == input.dtype, lambda: f"{op}: expected bias to have the dtype of input")
    return (input.shape[0], T * C_out, out[0], out[1])


def _empty_like_layout(shape, like: Tensor) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=suggest_memory_format(like))


@torch.library.register_fake("mamlpp_ext::task_conv")
def _task_conv_fake(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    shape = _check_and_out_shape("mamlpp_ext.task_conv", input, weight, bias, stride, padding, dilation, groups)
    return _empty_like_layout(shape, input)


@torch.library.register_fake("mamlpp_ext::_task_conv_backward")
def _task_conv_backward_fake(grad_out, input, weight, stride, padding, dilation, groups, output_mask):
    op = "mamlpp_ext._task_conv_backward"
    shape = _check_and_out_shape(op, input, weight, None, stride, padding, dilation, groups)
    torch._check(tuple(grad_out.shape) == tuple(shape),
                 lambda: f"{op}: expected grad_out to have the shape of task_conv's output {tuple(shape)}, got "
                         f"{tuple(grad_out.shape)}")
    return (_empty_like_layout(input.shape, input) if output_mask[0] else None,
            weight.new_empty(weight.shape) if output_mask[1] else None,
            weight.new_empty(weight.shape[:2]) if output_mask[2] else None)
