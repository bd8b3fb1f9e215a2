"""Lifting a user's ``nn.Module`` into a task-batched functional network (``LiftedNet``).

``torch.fx`` symbolic tracing turns the module's ``forward`` into a graph of layer calls and
operations, traced once. Every node is looked up in ``LAYERS`` — the one table of what the lifter
knows — whose entry checks it and says what it becomes in the task-major layout (NOTE [Task-major
layout] in network.py). The lifted graph is then compiled once into straight-line Python (see
``LiftedNet.code``): one line per layer or operation, calling the ops directly, so a forward
costs no graph interpretation at all.

Adding a layer type is one ``Rule`` in ``LAYERS``: the rule's lift function, its names in error
messages (``SUPPORTED_LAYERS``) and its line in the docs (``supported_table_markdown``) all come
from that entry.

NOTE [Why torch.fx]
    The other way to get a task-batched network from a module is ``torch.func.functional_call``
    under ``torch.vmap`` over the task dim, with a batching rule for the per-step batch norm.
    Tracing wins on the three things that matter here (measured with
    ``benchmarks/lifting_choice.py``, docs/networks.md): (1) the lifted forward dispatches the
    same ops as the hand-written VGG net — vmap adds its own batching work to every op of every
    forward and of both backward passes (double backward through vmapped ops); (2) only a graph
    shows that a batch norm's single user is a ReLU, so that the two fuse into one compiled op;
    (3) what cannot be lifted is found once, at construction, and named — under vmap an
    unsupported op fails (or silently loops over tasks) inside the first meta-step. Tracing
    cannot follow data-dependent control flow; a network that branches on a tensor is rejected
    with a message naming the line (MAML++ networks are fixed graphs).

NOTE [Convolution layout]
    How the convolution of T tasks runs: ``"grouped"``, one ATen grouped convolution over the
    task-major channels; ``"split"``, T ordinary convolutions on the channel slices,
    concatenated; ``"task_conv"``, the compiled ``ops.task_conv2d`` — the same grouped
    convolution, whose backward and double backward are grouped convolutions too, so a
    second-order step runs the same number of convolutions whatever T (ATen's double backward of
    a grouped convolution runs one convolution per group: per task). Same arithmetic. Each
    backend names its layout (``Backend.conv_layout``: task_conv on ``fused``, grouped on the
    others — grouped beat split on the CPU in every public setting, benchmarks/RESULTS.md,
    session of 2026-11-29); ``net.conv_layout = ...`` overrides it for the network, to compare
    layouts, and ``None`` returns to the backend's. Each layout is one function in ``CONV_IMPLS``
    with the signature of ``conv_grouped``; the generated forward calls the current one by name,
    so switching costs nothing per call.
"""

from __future__ import annotations

import copy
import math
import operator
import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Node

from .. import ops
from .task_network import BatchNormFn, BNLayer, TaskNetwork

__all__ = ["CONV_IMPLS", "CONV_LAYOUTS", "LAYERS", "LiftedNet", "Rule", "SUPPORTED_LAYERS", "SequentialNet",
           "supported_table_markdown"]


# ---------------------------------------------------------------------------------------------
# The functional pieces the generated forward calls (activations: NOTE [Task-major layout])
# ---------------------------------------------------------------------------------------------

def conv_grouped(h: Tensor, w: Tensor, b: Optional[Tensor], T: int, stride, padding, dilation, groups: int) -> Tensor:
    """Convolution of T tasks: h (B, T·C, H, W), w (T, F, C/groups, k, k), b (T, F) or None ->
    (B, T·F, H', W'), as one grouped convolution (NOTE [Convolution layout])."""
    if T == 1:
        return F.conv2d(h, w[0], b[0] if b is not None else None, stride, padding, dilation, groups)
    return F.conv2d(h, w.reshape(-1, *w.shape[2:]), b.reshape(-1) if b is not None else None, stride, padding,
                    dilation, groups * T)


def conv_split(h: Tensor, w: Tensor, b: Optional[Tensor], T: int, stride, padding, dilation, groups: int) -> Tensor:
    """``conv_grouped`` as T ordinary convolutions on the channel slices, concatenated."""
    if T == 1:
        return F.conv2d(h, w[0], b[0] if b is not None else None, stride, padding, dilation, groups)
    hs = h.chunk(T, dim=1)
    return torch.cat([F.conv2d(hs[t], w[t], b[t] if b is not None else None, stride, padding, dilation, groups)
                      for t in range(T)], dim=1)


def conv_task(h: Tensor, w: Tensor, b: Optional[Tensor], T: int, stride, padding, dilation, groups: int) -> Tensor:
    """``conv_grouped`` as the compiled ``ops.task_conv2d`` (needs the extension)."""
    return ops.task_conv2d(h, w, b, stride, padding, dilation, groups)


#: The convolution layouts (NOTE [Convolution layout]): name -> implementation.
CONV_IMPLS: dict[str, Callable] = {"grouped": conv_grouped, "split": conv_split, "task_conv": conv_task}
CONV_LAYOUTS = tuple(CONV_IMPLS)


def linear(h: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """Per-task linear layer: h (T, B, F_in), w (T, F_out, F_in), b (T, F_out) or None -> (T, B, F_out)."""
    if b is None:
        return torch.bmm(h, w.transpose(1, 2))
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))


def flatten(h: Tensor, T: int) -> Tensor:
    """Task-major images (B, T·C, H, W) -> features (T, B, C·H·W)."""
    return h.reshape(h.shape[0], T, -1).transpose(0, 1)


def spatial_mean(h: Tensor, T: int) -> Tensor:
    """Global average pooling to features: (B, T·C, H, W) -> (T, B, C)."""
    return h.mean((2, 3)).reshape(h.shape[0], T, -1).transpose(0, 1)


def batch_norm_1d(bn: BatchNormFn, idx: int, h: Tensor, slope: Optional[float]) -> Tensor:
    """Batch norm ``idx`` on features (T, B, F): to task-major (B, T·F), normalise, and back."""
    Tn, B, Fn = h.shape
    return bn(idx, h.transpose(0, 1).reshape(B, Tn * Fn), slope).reshape(B, Tn, Fn).transpose(0, 1)


def cat_channels(T: int, *hs: Tensor) -> Tensor:
    """Channel concatenation per task: (B, T·C_i, H, W) -> (B, T·ΣC_i, H, W)."""
    if T == 1:
        return torch.cat(hs, 1)
    B, rest = hs[0].shape[0], hs[0].shape[2:]
    return torch.cat([h.reshape(B, T, -1, *rest) for h in hs], 2).reshape(B, -1, *rest)


def leaky_relu(h: Tensor, slope: float) -> Tensor:
    """LeakyReLU; slope 0 is a ReLU."""
    return torch.relu(h) if slope == 0.0 else F.leaky_relu(h, slope)


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

SPATIAL, FLAT, SIZE = "spatial", "flat", "size"  # (B, T·C, H, W) images; (T, B, F) features; a size read


class _Ctx(NamedTuple):
    """An argument of the generated forward: ``weights``, ``bn`` or ``T``."""
    name: str


WEIGHTS, BN, TASKS = _Ctx("weights"), _Ctx("bn"), _Ctx("T")


class Value(NamedTuple):
    """What a graph node holds while lifting: ``var`` (its variable in the generated code; None
    for a size), ``layout`` (SPATIAL, FLAT or SIZE) and ``meta`` (the node's output for the
    probe batch on the meta device: a tensor in the user's layout, or the int / size it reads)."""
    var: Optional[str]
    layout: str
    meta: Any


@dataclass(frozen=True)
class Rule:
    """One entry of ``LAYERS``: a layer or operation the lifter knows.

    name: how errors and docs name it; doc: what it becomes (a docs table cell); lift:
    ``lift(lifter, node, module)`` (module is None for functions and methods) emits the node's
    code through the ``_Lifter`` API or raises ValueError naming what is wrong; modules,
    functions, methods: what it matches (module classes, exact; functions; ``Tensor`` method
    names); slope: for an activation that fuses into a preceding batch norm, ``slope(node,
    module)`` -> its negative slope (0.0 for ReLU).
    """

    name: str
    doc: str
    lift: Callable
    modules: tuple = ()
    functions: tuple = ()
    methods: tuple = ()
    slope: Optional[Callable] = None


def _arg(node: Node, i: int, key: str, default):
    """Argument ``i`` / keyword ``key`` of a call node."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def _in_place(node: Node, module: Optional[nn.Module]) -> bool:
    if module is not None:
        return bool(getattr(module, "inplace", False))
    if node.kwargs.get("inplace") is True:
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def _out_of_place(node: Node):
    """The out-of-place function of a function or method node, and its args/kwargs without ``inplace``."""
    kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
    if node.op == "call_method":
        return getattr(torch.Tensor, node.target.rstrip("_")), node.args, kwargs
    fn = node.target
    name = getattr(fn, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        for owner in (torch, F):
            if getattr(owner, name, None) is fn and hasattr(owner, name[:-1]):
                fn = getattr(owner, name[:-1])
                break
    return fn, node.args, kwargs


def _pointwise(module_call: Callable[[nn.Module], tuple]):
    """Lift of an elementwise activation: the module form runs ``module_call(module)`` ->
    (function, constant args, constant kwargs); the function/method forms run out of place as written."""
    def lift(lx: "_Lifter", node: Node, m: Optional[nn.Module]) -> None:
        h = lx.tensor_arg(node, 0)
        if m is not None:
            fn, consts, kwargs = module_call(m)
            lx.emit(node, fn, [h, *consts], h.layout, kwargs)
        else:
            fn, args, kwargs = _out_of_place(node)
            lx.emit(node, fn, [h, *args[1:]], h.layout, kwargs)
    return lift


def _relu_slope(node: Node, m: Optional[nn.Module]) -> float:
    return 0.0


def _leaky_slope(node: Node, m: Optional[nn.Module]):
    """The slope of a LeakyReLU node (as written; a Node when it is computed from the input)."""
    slope = m.negative_slope if m is not None else _arg(node, 1, "negative_slope", 0.01)
    return float(slope) if isinstance(slope, (int, float)) else slope


def _lift_leaky_relu(lx: "_Lifter", node: Node, m: Optional[nn.Module]) -> None:
    h = lx.tensor_arg(node, 0)
    lx.emit(node, leaky_relu, [h, _leaky_slope(node, m)], h.layout)


def _lift_conv(lx: "_Lifter", node: Node, m: nn.Conv2d) -> None:
    h = lx.tensor_arg(node, 0, need=SPATIAL, module=m)
    if m.padding_mode != "zeros":
        raise lx.error(node, f"has padding_mode={m.padding_mode!r}; only 'zeros' is supported")
    kw, kb = lx.fast_weight(node, "weight"), lx.fast_weight(node, "bias")
    lx.emit(node, "conv", [h, lx.weight(kw), lx.weight(kb), TASKS, m.stride, m.padding, m.dilation, m.groups],
            SPATIAL)


def _lift_linear(lx: "_Lifter", node: Node, m: nn.Linear) -> None:
    h = lx.tensor_arg(node, 0, need=FLAT, module=m)
    kw, kb = lx.fast_weight(node, "weight"), lx.fast_weight(node, "bias")
    lx.emit(node, linear, [h, lx.weight(kw), lx.weight(kb)], FLAT)


def _lift_batch_norm(lx: "_Lifter", node: Node, m: nn.modules.batchnorm._BatchNorm) -> None:
    spatial = type(m) is nn.BatchNorm2d
    h = lx.tensor_arg(node, 0, need=SPATIAL if spatial else FLAT, module=m)
    if m.momentum is None:
        raise lx.error(node, "has momentum=None (cumulative average); per-step running statistics need a "
                             "momentum, e.g. 0.1")
    idx = lx.batch_norm_layer(node, m)
    slope = lx.fuse_activation(node)
    if spatial:
        lx.emit(node, BN, [idx, h, slope], SPATIAL)
    else:
        lx.emit(node, batch_norm_1d, [BN, idx, h, slope], FLAT)


def _lift_pool(module_call: Callable[[nn.Module], tuple]):
    def lift(lx: "_Lifter", node: Node, m: Optional[nn.Module]) -> None:
        h = lx.tensor_arg(node, 0, need=SPATIAL, module=m)
        if getattr(m, "return_indices", False) or node.kwargs.get("return_indices", False):
            raise lx.error(node, "has return_indices=True; not supported")
        if m is not None:
            fn, *consts = module_call(m)
            lx.emit(node, fn, [h, *consts], SPATIAL)
        else:
            lx.emit(node, node.target, [h, *node.args[1:]], SPATIAL, dict(node.kwargs))
    return lift


def _lift_reshape(lx: "_Lifter", node: Node, m: Optional[nn.Module]) -> None:
    if isinstance(m, nn.Flatten) and (m.start_dim != 1 or m.end_dim != -1):
        raise lx.error(node, f"must flatten dims 1..-1 (the default), got start_dim={m.start_dim}, "
                             f"end_dim={m.end_dim}")
    h = lx.tensor_arg(node, 0)
    lx.size_args_only(node)
    src, out = tuple(h.meta.shape), tuple(lx.meta(node).shape)
    if out == src:  # a reshape to the same shape (e.g. flattening features again)
        lx.alias(node, h)
    elif h.layout == SPATIAL and len(out) == 2 and out[0] == src[0]:
        lx.emit(node, flatten, [h, TASKS], FLAT)
    else:
        raise lx.error(node, f"reshapes {src} to {out}; only flattening images (B, C, H, W) to features "
                             f"(B, C·H·W) is supported")


def _lift_mean(lx: "_Lifter", node: Node, m: None) -> None:
    h = lx.tensor_arg(node, 0, need=SPATIAL)
    dims = _arg(node, 1, "dim", None)
    dims = (dims,) if isinstance(dims, int) else dims
    keepdim = _arg(node, 2, "keepdim", False)
    if dims is None or sorted(d % 4 for d in dims) != [2, 3] or node.kwargs.get("dtype") is not None:
        raise lx.error(node, f"averages over dims {dims}; only the spatial mean over dims (2, 3) of images "
                             f"(global average pooling) is supported")
    if keepdim:
        lx.emit(node, torch.mean, [h, (2, 3), True], SPATIAL)
    else:
        lx.emit(node, spatial_mean, [h, TASKS], FLAT)


def _lift_arithmetic(lx: "_Lifter", node: Node, m: None) -> None:
    fn = getattr(torch.Tensor, node.target) if node.op == "call_method" else node.target
    if _in_place(node, None):
        fn, _, _ = _out_of_place(node)
    operands = [lx.value(a) if isinstance(a, Node) else a for a in node.args]
    tensors = [v for v in operands if isinstance(v, Value)]
    for v in tensors:
        if v.layout == SIZE:
            raise lx.error(node, "computes with a size read from a tensor; sizes are supported only as the "
                                 "shape of a flattening view/reshape")
    if len(tensors) == 2:
        a, b = tensors
        if a.layout != b.layout:
            raise lx.error(node, f"combines an image tensor with a feature tensor (shapes {tuple(a.meta.shape)} "
                                 f"and {tuple(b.meta.shape)})")
        keep = 2 if a.layout == SPATIAL else 1  # batch and channels must match; H, W / features may broadcast
        if a.meta.dim() != b.meta.dim() or a.meta.shape[:keep] != b.meta.shape[:keep]:
            raise lx.error(node, f"combines tensors of shapes {tuple(a.meta.shape)} and {tuple(b.meta.shape)}; "
                                 f"the operands must agree in {'batch and channel' if keep == 2 else 'batch'} size")
    kwargs = {k: v for k, v in node.kwargs.items() if k != "out"}
    if "out" in node.kwargs or any(isinstance(v, Node) for v in kwargs.values()):
        raise lx.error(node, "takes tensor keyword arguments; write the operands positionally")
    lx.emit(node, fn, operands, tensors[0].layout, kwargs)


def _lift_cat(lx: "_Lifter", node: Node, m: None) -> None:
    items = _arg(node, 0, "tensors", ())
    dim = _arg(node, 1, "dim", 0)
    if not isinstance(items, (list, tuple)) or not all(isinstance(t, Node) for t in items) or not items:
        raise lx.error(node, "must concatenate a list of tensors computed by the network")
    hs = [lx.value(t) for t in items]
    layouts = {h.layout for h in hs}
    if len(layouts) != 1 or SIZE in layouts:
        raise lx.error(node, "concatenates image and feature tensors (or sizes) together")
    layout = layouts.pop()
    d = dim % (4 if layout == SPATIAL else 2)
    if layout == SPATIAL and d == 1:
        lx.emit(node, cat_channels, [TASKS, *hs], SPATIAL)
    elif layout == SPATIAL:  # batch, height or width: the task-major layout leaves these dims alone
        lx.emit(node, torch.cat, [list(hs), d], SPATIAL)
    else:  # features (T, B, F): the user's dims 0, 1 are dims 1, 2
        lx.emit(node, torch.cat, [list(hs), d + 1], FLAT)


def _lift_dropout(lx: "_Lifter", node: Node, m: Optional[nn.Module]) -> None:
    h = lx.tensor_arg(node, 0)
    p = m.p if m is not None else float(_arg(node, 1, "p", 0.5))
    training = m.training if m is not None else bool(_arg(node, 2, "training", True))
    if p > 0 and training:
        raise lx.error(node, f"is Dropout(p={p}) in training mode; the inner loop needs a deterministic network: "
                             f"use p=0 or put the layer in eval mode", plain=True)
    lx.alias(node, h)


def _lift_identity(lx: "_Lifter", node: Node, m: Optional[nn.Module]) -> None:
    lx.alias(node, lx.tensor_arg(node, 0))


def _lift_size(lx: "_Lifter", node: Node, m: None) -> None:
    src = node.args[0]
    v = lx.value(src) if isinstance(src, Node) else None
    if v is None:
        raise lx.error(node, "reads from something that is not a tensor of the network")
    if node.target is getattr and node.args[1] != "shape":
        raise lx.error(node, f"reads the attribute {node.args[1]!r} of a tensor; only .shape is supported")
    if node.target is operator.getitem and v.layout != SIZE:
        raise lx.error(node, "indexes or slices a tensor; not supported (sizes, e.g. x.shape[0], are)")
    lx.define(node, Value(None, SIZE, lx.meta(node)))


_RELU_FNS = (F.relu, torch.relu, torch.relu_)
_ACT_DOC = "applied elementwise (per channel of each task)"

#: Every layer and operation the lifter knows, in the order the docs list them.
LAYERS: tuple[Rule, ...] = (
    Rule("Conv2d", "its weight and bias (if any) are **fast weights**, one LSLR rate per tensor and step; any "
         "kernel, stride, padding (incl. `\"same\"`), dilation and groups; `padding_mode=\"zeros\"`",
         _lift_conv, modules=(nn.Conv2d,)),
    Rule("Linear", "fast weights, as above; on features (after flattening)", _lift_linear, modules=(nn.Linear,)),
    Rule("BatchNorm2d", "a **per-step batch norm**: γ/β become (S, C) meta-learned tables (BNWB), the running "
         "statistics (S, C) tables (BNRS); momentum and eps from the layer; `affine=False` and "
         "`track_running_stats=False` honoured", _lift_batch_norm, modules=(nn.BatchNorm2d,)),
    Rule("BatchNorm1d", "the same, on features (after flattening)", _lift_batch_norm, modules=(nn.BatchNorm1d,)),
    Rule("ReLU", f"{_ACT_DOC}; right after a batch norm whose output has no other use, **fused** into the "
         "batch-norm op. Module, `F.relu`, `torch.relu`, `x.relu()` and the in-place forms",
         _pointwise(lambda m: (torch.relu, (), {})), modules=(nn.ReLU,), functions=_RELU_FNS, methods=("relu", "relu_"),
         slope=_relu_slope),
    Rule("LeakyReLU", "the same (fused when slope ≥ 0); module, `F.leaky_relu` and the in-place forms",
         _lift_leaky_relu, modules=(nn.LeakyReLU,), functions=(F.leaky_relu, F.leaky_relu_), slope=_leaky_slope),
    Rule("ELU", f"{_ACT_DOC} (module or `F.elu`)", _pointwise(lambda m: (F.elu, (m.alpha,), {})),
         modules=(nn.ELU,), functions=(F.elu, F.elu_)),
    Rule("GELU", f"{_ACT_DOC} (module or `F.gelu`)",
         _pointwise(lambda m: (F.gelu, (), {"approximate": m.approximate})), modules=(nn.GELU,), functions=(F.gelu,)),
    Rule("SiLU", f"{_ACT_DOC} (module or `F.silu`)", _pointwise(lambda m: (F.silu, (), {})), modules=(nn.SiLU,),
         functions=(F.silu,)),
    Rule("Sigmoid", f"{_ACT_DOC} (module, `torch.sigmoid` or `x.sigmoid()`)",
         _pointwise(lambda m: (torch.sigmoid, (), {})), modules=(nn.Sigmoid,), functions=(torch.sigmoid, F.sigmoid),
         methods=("sigmoid",)),
    Rule("Tanh", f"{_ACT_DOC} (module, `torch.tanh` or `x.tanh()`)", _pointwise(lambda m: (torch.tanh, (), {})),
         modules=(nn.Tanh,), functions=(torch.tanh, F.tanh), methods=("tanh",)),
    Rule("MaxPool2d", "applied per channel (module or `F.max_pool2d`; no `return_indices`)",
         _lift_pool(lambda m: (F.max_pool2d, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)),
         modules=(nn.MaxPool2d,), functions=(F.max_pool2d,)),
    Rule("AvgPool2d", "applied per channel (module or `F.avg_pool2d`)",
         _lift_pool(lambda m: (F.avg_pool2d, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                               m.divisor_override)), modules=(nn.AvgPool2d,), functions=(F.avg_pool2d,)),
    Rule("AdaptiveAvgPool2d", "applied per channel (module or `F.adaptive_avg_pool2d`)",
         _lift_pool(lambda m: (F.adaptive_avg_pool2d, m.output_size)), modules=(nn.AdaptiveAvgPool2d,),
         functions=(F.adaptive_avg_pool2d,)),
    Rule("AdaptiveMaxPool2d", "applied per channel (module or `F.adaptive_max_pool2d`; no `return_indices`)",
         _lift_pool(lambda m: (F.adaptive_max_pool2d, m.output_size)), modules=(nn.AdaptiveMaxPool2d,),
         functions=(F.adaptive_max_pool2d,)),
    Rule("Flatten", "images (B, C, H, W) become features (B, C·H·W): `nn.Flatten()` (default dims), "
         "`torch.flatten(x, 1)`, `x.flatten(1)`, `x.view(x.size(0), -1)`, `x.reshape(B, -1)`, `x.squeeze()` of "
         "(B, C, 1, 1); any other reshape is rejected",
         _lift_reshape, modules=(nn.Flatten,), functions=(torch.flatten, torch.reshape, torch.squeeze),
         methods=("flatten", "view", "reshape", "squeeze")),
    Rule("mean over (2, 3)", "global average pooling: `x.mean((2, 3))` gives features, with `keepdim=True` "
         "images; other reductions are rejected", _lift_mean, functions=(torch.mean,), methods=("mean",)),
    Rule("+ - * /", "elementwise between tensors of the same kind (batch and channel sizes equal; height and "
         "width may broadcast) or with a number: residual additions, gating; `torch.add`/`sub`/`mul`/`div` and "
         "the methods", _lift_arithmetic,
         functions=(operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                    torch.div),
         methods=("add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_")),
    Rule("torch.cat", "along channels: per task (each task's channels stay together); along batch, height, "
         "width or features as written", _lift_cat, functions=(torch.cat, torch.concat)),
    Rule("Dropout", "p = 0 or in eval mode only (module or `F.dropout`): removed", _lift_dropout,
         modules=(nn.Dropout,), functions=(F.dropout,)),
    Rule("Identity", "removed (also `x.contiguous()`)", _lift_identity, modules=(nn.Identity,),
         methods=("contiguous",)),
    Rule("sizes", "`x.size(0)`, `x.shape[0]` and the like, only as the shape of a flattening view/reshape",
         _lift_size, functions=(getattr, operator.getitem), methods=("size",)),
)

#: Names of the supported layers and operations (error messages list them).
SUPPORTED_LAYERS = tuple(rule.name for rule in LAYERS)

_BY_MODULE = {cls: rule for rule in LAYERS for cls in rule.modules}
_BY_FUNCTION = {fn: rule for rule in LAYERS for fn in rule.functions}
_BY_METHOD = {name: rule for rule in LAYERS for name in rule.methods}


def supported_table_markdown() -> str:
    """The docs' table of supported layers and operations (docs/networks.md holds this text)."""
    rows = ["| layer or operation | in the meta-learner |", "|---|---|"]
    rows += [f"| {rule.name} | {rule.doc} |" for rule in LAYERS]
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# Tracing and lifting
# ---------------------------------------------------------------------------------------------

_TORCH_DIR = os.path.dirname(torch.__file__)


def _user_frame(exc: BaseException) -> str:
    """' (at file:line: source)' for the innermost frame of ``exc`` outside torch and this file."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_TORCH_DIR) and os.path.abspath(f.filename) != os.path.abspath(__file__)]
    if not frames:
        return ""
    f = frames[-1]
    line = (f.line or "").strip()
    return f" (at {f.filename}:{f.lineno}{': ' + line if line else ''})"


def _trace(module: nn.Module) -> torch.fx.Graph:
    """The graph of ``module.forward``, traced symbolically, with clear errors."""
    try:
        return torch.fx.Tracer().trace(module)
    except Exception as exc:  # noqa: BLE001  (tracing runs the user's code)
        where = _user_frame(exc)
        text = str(exc)
        if isinstance(exc, torch.fx.proxy.TraceError) or any(
                words in text for words in ("control flow", "cannot be iterated", "'len' is not supported")):
            raise ValueError(
                f"network: the forward of {type(module).__name__} depends on the values or sizes of a tensor in "
                f"Python control flow{where} ({type(exc).__name__}: {text}). A lifted network is one fixed graph "
                f"of layers and operations, traced once: make the decision when the module is built (a "
                f"constructor argument), or implement mamlpp_ext.model.network.TaskNetwork") from None
        raise ValueError(f"network: cannot trace the forward of {type(module).__name__}{where}: "
                         f"{type(exc).__name__}: {text}") from None


def _describe(node: Node, module: Optional[nn.Module]) -> str:
    if node.op == "call_module":
        return f"layer {node.target!r} ({type(module).__name__})"
    if node.op == "call_method":
        return f"operation {node.name!r} (Tensor.{node.target})"
    if node.op == "get_attr":
        return f"attribute {node.target!r}"
    fn = node.target
    mod = getattr(fn, "__module__", None) or "torch"
    if mod.startswith("torch._C"):
        mod = "torch"
    return f"operation {node.name!r} ({mod}.{getattr(fn, '__name__', repr(fn))})"


def _constant_text(c) -> Optional[str]:
    """Python source for a constant that round-trips through repr, else None."""
    if c is None or isinstance(c, (bool, int, str)):
        return repr(c)
    if isinstance(c, float) and math.isfinite(c):
        return repr(c)
    if isinstance(c, tuple) and all(_constant_text(v) is not None for v in c):
        return repr(c)
    return None


class _Lifter:
    """Walks the traced graph once, node by node, and writes the lifted forward.

    For each node it finds the ``LAYERS`` rule, checks the inputs' layouts, computes the node's
    output for a probe batch of 2 images on the meta device (no compute; gives every shape, and
    the error when the module does not accept the images) and lets the rule emit a line of code.
    """

    def __init__(self, net: "LiftedNet", root: nn.Module, graph: torch.fx.Graph, input_shape) -> None:
        self.net, self.root, self.graph, self.input_shape = net, root, graph, input_shape
        self.probe = copy.deepcopy(root).to("meta")
        self.dtype = next((p.dtype for p in root.parameters()), torch.get_default_dtype())
        self.values: dict[Node, Value] = {}
        self.metas: dict[Node, Any] = {}
        self.fused: dict[Node, Node] = {}  # activation node -> the batch-norm node it is fused into
        self.fast_ids: dict[int, int] = {}  # id(parameter) -> fast-weight index (shared layers share weights)
        self.bn_ids: dict[int, int] = {}  # id(module) -> BN layer index
        self.lines: list[tuple[str, str, list[str]]] = []  # (out var, expression, input vars)
        self.namespace: dict[str, Any] = {}
        self.order = {n: i for i, n in enumerate(graph.nodes)}

    # ----------------------------------------------------------- rule API
    def error(self, node: Node, what: str, plain: bool = False) -> ValueError:
        """A ValueError naming the node; ``plain``: 'layer 'x' is ...' without the layer's type."""
        module = self.module(node)
        text = f"layer {node.target!r}" if plain and node.op == "call_module" else _describe(node, module)
        return ValueError(f"network: {text} {what}")

    def module(self, node: Node) -> Optional[nn.Module]:
        return self.root.get_submodule(node.target) if node.op == "call_module" else None

    def value(self, node: Node) -> Value:
        return self.values[node]

    def tensor_arg(self, node: Node, i: int, need: Optional[str] = None, module: Optional[nn.Module] = None) -> Value:
        """The tensor argument ``i`` of ``node``, checked to be images (need=SPATIAL) or features (FLAT)."""
        a = node.args[i] if len(node.args) > i else None
        if not isinstance(a, Node):
            raise self.error(node, f"needs a tensor as argument {i}")
        v = self.values[a]
        if v.layout == SIZE:
            raise self.error(node, "computes with a size read from a tensor; sizes are supported only as the "
                                   "shape of a flattening view/reshape")
        if node.op == "call_module" and (len(node.args) != 1 or node.kwargs):
            raise self.error(node, "must be called with one tensor argument")
        if need is not None and v.layout != need:
            where = "after nn.Flatten()" if need == FLAT else "before nn.Flatten() (on images)"
            raise self.error(node, f"must come {where}; the lifted network runs image layers on (B, C, H, W) and "
                                   f"feature layers on flattened (B, F) inputs")
        return v

    def size_args_only(self, node: Node) -> None:
        """Arguments after the tensor may only be constants and sizes (a view's shape)."""
        for a in list(node.args[1:]) + list(node.kwargs.values()):
            for n in (a if isinstance(a, (list, tuple)) else [a]):
                if isinstance(n, Node) and self.values[n].layout != SIZE:
                    raise self.error(node, "takes a second tensor; not supported")

    def meta(self, node: Node):
        """The node's output for the probe batch (computed once)."""
        if node not in self.metas:
            args = torch.fx.node.map_arg(node.args, lambda n: self.metas[n])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: self.metas[n])
            try:
                if node.op == "call_module":
                    out = self.probe.get_submodule(node.target)(*args, **kwargs)
                elif node.op == "call_method":
                    out = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    out = node.target(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001  (any layer may reject the shape)
                raise ValueError(f"network: the module does not accept images of shape {self.input_shape} "
                                 f"(tried a batch of 2): at {_describe(node, self.module(node))}: "
                                 f"{type(exc).__name__}: {exc}") from None
            self.metas[node] = out
        return self.metas[node]

    def define(self, node: Node, value: Value) -> None:
        self.values[node] = value

    def alias(self, node: Node, value: Value) -> None:
        """The node computes nothing: its value is ``value``."""
        self.meta(node)
        self.values[node] = Value(value.var, value.layout, self.metas[node])

    def fast_weight(self, node: Node, attr: str) -> Optional[int]:
        """Register the parameter ``attr`` of the node's layer as a fast weight; its index (None if absent)."""
        p = getattr(self.module(node), attr)
        if p is None:
            return None
        if id(p) not in self.fast_ids:
            net = self.net
            net.weight_names.append(f"{node.target}.{attr}")
            net.weight_shapes.append(tuple(p.shape))
            net._init.append(p.detach().clone())
            self.fast_ids[id(p)] = len(net.weight_names) - 1
        return self.fast_ids[id(p)]

    @staticmethod
    def weight(k: Optional[int]):
        return None if k is None else _Weight(k)

    def batch_norm_layer(self, node: Node, m) -> int:
        """Register the node's batch norm as a per-step BN layer; its index."""
        if id(m) not in self.bn_ids:
            affine, track = m.weight is not None, m.running_mean is not None
            self.net.bn_layers.append(BNLayer(
                node.target, int(m.num_features), affine, track, float(m.momentum), float(m.eps),
                m.weight.detach().clone() if affine else None, m.bias.detach().clone() if affine else None,
                m.running_mean.detach().clone() if track else None, m.running_var.detach().clone() if track else None))
            self.bn_ids[id(m)] = len(self.net.bn_layers) - 1
        return self.bn_ids[id(m)]

    def fuse_activation(self, node: Node) -> Optional[float]:
        """When the node's only user is a ReLU / LeakyReLU (slope >= 0) on it, mark that user as
        fused into this node and return its slope; else None."""
        if len(node.users) != 1:
            return None
        (user,) = node.users
        if user.op not in ("call_module", "call_function", "call_method") or user.args[:1] != (node,):
            return None
        module = self.module(user)
        rule = self.rule(user, module, strict=False)
        if rule is None or rule.slope is None:
            return None
        slope = rule.slope(user, module)
        if not isinstance(slope, float) or slope < 0:  # the fused op needs slope >= 0: run the activation alone
            return None
        self.fused[user] = node
        return slope

    def emit(self, node: Node, fn, args: Sequence, layout: str, kwargs: Optional[dict] = None) -> None:
        """Write ``v_<node> = fn(*args, **kwargs)``. ``fn``: a callable, the name of a namespace
        entry ("conv"), or BN; args: Values, WEIGHTS / BN / TASKS, _Weight(k), lists of Values,
        or constants."""
        self.meta(node)
        out = f"v_{node.name}"
        used: list[str] = []

        def text(a) -> str:
            if isinstance(a, Node):
                raise self.error(node, f"takes {a.name!r}, computed from the input, as a setting; only constants "
                                       f"are supported there")
            if isinstance(a, Value):
                used.append(a.var)
                return a.var
            if isinstance(a, _Ctx):
                return a.name
            if isinstance(a, _Weight):
                return f"weights[{a.k}]"
            if isinstance(a, list):
                return "[" + ", ".join(text(v) for v in a) + "]"
            src = _constant_text(a)
            if src is None:
                src = self.constant(a)
            return src

        if fn is BN:
            name = "bn"
        elif isinstance(fn, str):
            name = fn
        else:
            name = self.function(fn)
        parts = [text(a) for a in args] + [f"{k}={text(v)}" for k, v in (kwargs or {}).items()]
        self.lines.append((out, f"{name}({', '.join(parts)})", used))
        self.values[node] = Value(out, layout, self.metas[node])

    def function(self, fn) -> str:
        base = "".join(ch if ch.isalnum() else "_" for ch in getattr(fn, "__name__", "fn")).strip("_") or "fn"
        name, i = f"f_{base}", 1
        while name in self.namespace and self.namespace[name] is not fn:
            name, i = f"f_{base}_{i}", i + 1
        self.namespace[name] = fn
        return name

    def constant(self, c) -> str:
        name = f"k{len(self.namespace)}"
        self.namespace[name] = c
        return name

    # ---------------------------------------------------------------- walk
    def rule(self, node: Node, module: Optional[nn.Module], strict: bool = True) -> Optional[Rule]:
        if node.op == "call_module":
            rule = _BY_MODULE.get(type(module))
        elif node.op == "call_method":
            rule = _BY_METHOD.get(node.target)
        else:
            try:
                rule = _BY_FUNCTION.get(node.target)
            except TypeError:  # an unhashable target
                rule = None
        if rule is None and strict:
            raise ValueError(f"network: {_describe(node, module)} is not supported; supported layers and "
                             f"operations: {', '.join(SUPPORTED_LAYERS)} (or implement "
                             f"mamlpp_ext.model.network.TaskNetwork)")
        return rule

    def check_in_place(self) -> None:
        """An in-place op runs out of place here: reject one whose input is read again after it."""
        for node in self.graph.nodes:
            if node.op not in ("call_module", "call_function", "call_method") or not node.args:
                continue
            module = self.module(node)
            if not _in_place(node, module) or not isinstance(node.args[0], Node):
                continue
            later = [u for u in node.args[0].users if u is not node and self.order[u] > self.order[node]]
            if later:
                raise self.error(node, f"changes its input in place, and {later[0].name!r} reads that input "
                                       f"afterwards; write it out of place (e.g. out = out + residual)")

    def run(self) -> int:
        """Lift every node; returns num_classes."""
        self.check_in_place()
        for node in reversed(list(self.graph.nodes)):  # drop what the output does not depend on
            if node.op not in ("placeholder", "output") and not node.users:
                self.graph.erase_node(node)
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ValueError(f"network: the module's forward must take the images as its only argument, it takes "
                             f"{[n.target for n in placeholders]}")
        for node in self.graph.nodes:
            if node.op == "placeholder":
                self.metas[node] = torch.empty((2, *self.input_shape), device="meta", dtype=self.dtype)
                self.input_var = f"v_{node.name}"
                self.values[node] = Value(self.input_var, SPATIAL, self.metas[node])
            elif node.op == "get_attr":
                raise ValueError(f"network: the forward reads the parameter, buffer or constant {node.target!r} "
                                 f"directly; only the parameters of supported layers are lifted (fast weights of "
                                 f"Conv2d and Linear, batch-norm tables) — call the layer instead of F.conv2d(x, "
                                 f"self.weight) and the like")
            elif node.op == "output":
                return self.output(node)
            else:
                module = self.module(node)
                rule = self.rule(node, module)
                if node in self.fused:
                    self.alias(node, self.values[self.fused[node]])
                else:
                    rule.lift(self, node, module)
        raise AssertionError("graph without output")  # pragma: no cover

    def output(self, node: Node) -> int:
        out = node.args[0]
        if not isinstance(out, Node):
            raise ValueError(f"network: the module's forward must return one tensor of logits, it returns "
                             f"{type(out).__name__}")
        v = self.values[out]
        shape = tuple(v.meta.shape) if isinstance(v.meta, Tensor) else v.meta
        if v.layout != FLAT:
            raise ValueError(f"network: the module must map (B, C, H, W) images to (B, num_classes) logits; for "
                             f"input {(2, *self.input_shape)} it returns shape {shape} (missing Flatten?)")
        self.result = v.var
        return int(shape[1])

    def source(self) -> str:
        """The generated forward, deleting each value after its last use."""
        last: dict[str, int] = {}
        for i, (_, _, used) in enumerate(self.lines):
            for var in used:
                last[var] = i
        body = []
        for i, (out, expr, used) in enumerate(self.lines):
            body.append(f"    {out} = {expr}")
            dead = sorted({v for v in used if last[v] == i and v != self.result})
            if dead:
                body.append(f"    del {', '.join(dead)}")
        head = f"def lifted_forward({self.input_var}, weights, bn, T):"
        return "\n".join([head, *body, f"    return {self.result}", ""])


class _Weight(NamedTuple):
    """Fast weight k (``weights[k]`` in the generated code)."""
    k: int


# ---------------------------------------------------------------------------------------------
# The lifted network
# ---------------------------------------------------------------------------------------------

class LiftedNet(TaskNetwork):
    """A task-batched functional network lifted from an ``nn.Module`` built from standard layers.

    Args:
        module: the network. Its ``forward`` takes a batch of images and returns logits, and is a
            graph of the layers and operations of ``LAYERS`` (``SUPPORTED_LAYERS``; chains,
            residual additions, concatenations, ...); anything else is rejected by name. It is
            traced with ``torch.fx`` (NOTE [Why torch.fx]): Python control flow that depends on a
            tensor is rejected. Not modified, and not used after construction except as the
            source of the initial values.
        input_shape: (C, H, W) of one image; every shape is checked once on the ``meta`` device
            (no compute), and the module must produce (B, num_classes) logits.

    What becomes what: the weights and biases of ``Conv2d`` and ``Linear`` are the fast weights
    (adapted in the inner loop; named as in ``module.named_parameters()``, in the order the
    forward first uses them; a layer called twice shares them); every batch norm becomes a
    per-step batch-norm layer (named by its module path; momentum and eps from the module); a
    ReLU / LeakyReLU (slope >= 0) that is the only use of a batch norm's output is fused into
    it. ``init_weights`` returns copies of the module's current conv and linear parameters.
    ``code`` is the generated forward (Python source), for reading.
    """

    def __init__(self, module: nn.Module, input_shape: Sequence[int]) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"network: expected an nn.Module (or a TaskNetwork), got {type(module).__name__}")
        input_shape = tuple(int(v) for v in input_shape)
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ValueError(f"network: input_shape must be (C, H, W) with positive sizes, got {input_shape}")
        self.input_shape = input_shape
        self.weight_names: list[str] = []
        self.weight_shapes: list[tuple[int, ...]] = []
        self.bn_layers: list[BNLayer] = []
        self._init: list[Tensor] = []
        root = copy.deepcopy(module)  # tracing runs the user's forward: never on their module
        lifter = _Lifter(self, root, _trace(root), input_shape)
        self.num_classes = lifter.run()
        self.code = lifter.source()
        self._namespace = dict(lifter.namespace, conv=conv_grouped)
        self._conv_layout: Optional[str] = None  # None: the backend's (use_backend_layout)
        self._backend_layout = "grouped"
        self._compile()

    def _compile(self) -> None:
        """Compile ``code`` into ``_namespace`` (the functions and constants it calls, and ``conv``)."""
        exec(compile(self.code, f"<lifted {type(self).__name__}>", "exec"), self._namespace)  # noqa: S102
        self._run = self._namespace["lifted_forward"]

    def __getstate__(self) -> dict:  # copy.deepcopy: the copy compiles its own generated function
        state = dict(self.__dict__)
        del state["_run"]
        state["_namespace"] = {k: v for k, v in self._namespace.items() if k not in ("__builtins__", "lifted_forward")}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._compile()

    @property
    def conv_layout(self) -> str:
        """How T tasks' convolutions run (NOTE [Convolution layout]): one of ``CONV_LAYOUTS``.
        Reads the layout in use; set a layout to override the backend's, or None to follow it."""
        return self._conv_layout or self._backend_layout

    @conv_layout.setter
    def conv_layout(self, value: Optional[str]) -> None:
        if value is not None and value not in CONV_IMPLS:
            raise ValueError(f"conv_layout must be one of {CONV_LAYOUTS} or None, got {value!r}")
        if value == "task_conv" and not ops.has_extension():
            raise RuntimeError(f"conv_layout='task_conv' needs the compiled mamlpp_ext kernels, but "
                               f"{ops.EXTENSION_ERROR}")
        self._conv_layout = value
        self._namespace["conv"] = CONV_IMPLS[self.conv_layout]

    def use_backend_layout(self, layout: str) -> None:
        """The layout of the backend that runs this network (``Backend.conv_layout``), used unless
        ``conv_layout`` was set."""
        if layout not in CONV_IMPLS:
            raise ValueError(f"unknown convolution layout {layout!r}; expected one of {CONV_LAYOUTS}")
        self._backend_layout = layout
        self._namespace["conv"] = CONV_IMPLS[self.conv_layout]

    def check_input_shape(self, shape: tuple[int, int, int]) -> None:
        if tuple(shape) != self.input_shape:
            raise ValueError(f"network: built for images of shape {self.input_shape}, got {tuple(shape)}")

    def init_weights(self, *, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> list[Tensor]:
        """Copies of the module's conv/linear parameters (``generator`` is not used)."""
        return [t.to(dtype=dtype, device=device, copy=True) for t in self._init]

    def forward(self, x: Tensor, weights: Sequence[Tensor], bn: BatchNormFn) -> Tensor:
        T, B = x.shape[0], x.shape[1]
        h = x.reshape(B, *x.shape[2:]) if T == 1 else x.transpose(0, 1).reshape(B, T * x.shape[2], *x.shape[3:])
        return self._run(h, weights, bn, T)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(input_shape={self.input_shape}, fast_weights={len(self.weight_names)}, "
                f"bn_layers={len(self.bn_layers)}, num_classes={self.num_classes})")


class SequentialNet(LiftedNet):
    """A ``LiftedNet`` of an ``nn.Sequential`` (nested ones are flattened by the tracer)."""

    def __init__(self, module: nn.Module, input_shape: Sequence[int]) -> None:
        if not isinstance(module, nn.Sequential):
            raise TypeError(f"network: expected an nn.Sequential (or a TaskNetwork), got {type(module).__name__}")
        if len(module) == 0:
            raise ValueError("network: the nn.Sequential is empty")
        super().__init__(module, input_shape)
