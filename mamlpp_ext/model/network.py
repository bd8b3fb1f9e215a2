"""The SPEC §2 "VGG" network of MAML++, written functionally.

The network owns no parameters: every forward takes the fast weights (conv
weights and biases, linear weight and bias), the batch-norm affine parameters
of the step being run and the running-statistics rows of that step. The
meta-learner keeps θ₀, the per-step BN tensors and the running statistics, and
picks the rows (see ``meta_learner.py``).

Two layouts run the same arithmetic:

* per task (``forward_task``): x (B, C, H, W), weights without a task dim;
  this is how the public MAML++ code runs, one task after another.
* task-batched (``forward_tasks``): x (T, B, C, H, W), fast weights with a
  leading task dim T. Activations live as (B, T·C, H, W) with channels
  task-major (channel t·C + c is channel c of task t), so each convolution is
  one grouped convolution with groups = T, batch norm is one ATen batch norm
  over T·C channels (per-channel statistics = per-task statistics), and the
  head is one batched matmul.

Batch norm goes through one swappable function (``VGGNet.batch_norm``, default
``aten_batch_norm``) so a backend can replace it with a compiled op.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["VGGNet", "aten_batch_norm", "BN_MODES"]

#: "train": normalise with batch statistics and update the running statistics
#: (when given); "batch": batch statistics, no update; "running": normalise with
#: the running statistics.
BN_MODES = ("train", "batch", "running")


def aten_batch_norm(x: Tensor, gamma: Tensor, beta: Tensor, running_mean: Optional[Tensor],
                    running_var: Optional[Tensor], *, num_tasks: int, mode: str, momentum: float,
                    eps: float) -> Tensor:
    """Per-task batch norm of task-major activations with ATen's batch norm.

    x: (N, T·C, H, W), channels task-major (T = ``num_tasks``; T = 1 is the
    per-task layout). gamma, beta: (C,) shared by all tasks, or (T, C) one row
    per task. running_mean, running_var: (C,) rows of the step being run
    (updated in place in "train" mode), or None. Returns (N, T·C, H, W).

    Running statistics in "train" mode: with T = 1 this is ATen's own update
    (r ← (1−m)·r + m·batch_stat, unbiased variance). With T > 1 the row is
    updated once, with the mean over tasks of the per-task batch mean and of
    the per-task unbiased batch variance (the batched rule, NOTE in
    ``meta_learner.py``).
    """
    T = num_tasks
    C = x.shape[1] // T
    w = gamma.reshape(-1) if gamma.dim() == 2 else (gamma if T == 1 else gamma.repeat(T))
    b = beta.reshape(-1) if beta.dim() == 2 else (beta if T == 1 else beta.repeat(T))
    if mode == "running":
        if running_mean is None or running_var is None:
            raise ValueError("aten_batch_norm: mode='running' needs running_mean and running_var")
        rm = running_mean if T == 1 else running_mean.repeat(T)
        rv = running_var if T == 1 else running_var.repeat(T)
        return F.batch_norm(x, rm, rv, w, b, training=False, momentum=0.0, eps=eps)
    if mode == "batch" or running_mean is None:
        return F.batch_norm(x, None, None, w, b, training=True, momentum=0.0, eps=eps)
    if mode != "train":
        raise ValueError(f"aten_batch_norm: unknown mode {mode!r}, expected one of {BN_MODES}")
    if T == 1:
        return F.batch_norm(x, running_mean, running_var, w, b, training=True, momentum=momentum, eps=eps)
    # momentum 1 makes ATen write the per-channel batch mean / unbiased variance into the scratch
    # buffers; they are then averaged over tasks and folded into the shared row.
    scratch_mean = x.new_zeros(T * C)
    scratch_var = x.new_ones(T * C)
    y = F.batch_norm(x, scratch_mean, scratch_var, w, b, training=True, momentum=1.0, eps=eps)
    with torch.no_grad():
        running_mean.mul_(1.0 - momentum).add_(scratch_mean.view(T, C).mean(0), alpha=momentum)
        running_var.mul_(1.0 - momentum).add_(scratch_var.view(T, C).mean(0), alpha=momentum)
    return y


def fused_batch_norm(x: Tensor, gamma: Tensor, beta: Tensor, running_mean: Optional[Tensor],
                     running_var: Optional[Tensor], *, num_tasks: int, mode: str, momentum: float,
                     eps: float) -> Tensor:
    """``aten_batch_norm``'s contract on the compiled per-step batch norm
    (``mamlpp_ext.ops.task_batch_norm``): one fused op forward, backward and double backward.

    The running-statistics rows (C,) are passed as (1, C) views with step 0, so the in-place
    update lands in the caller's row of its (S, C) table.
    """
    from ..ops import task_batch_norm

    if mode not in BN_MODES:
        raise ValueError(f"fused_batch_norm: unknown mode {mode!r}, expected one of {BN_MODES}")
    rm = running_mean.unsqueeze(0) if running_mean is not None else None
    rv = running_var.unsqueeze(0) if running_var is not None else None
    if mode == "running":
        if rm is None or rv is None:
            raise ValueError("fused_batch_norm: mode='running' needs running_mean and running_var")
        return task_batch_norm(x, num_tasks, gamma, beta, rm, rv, step=0, training=False, eps=eps)
    if mode == "batch" or rm is None:
        return task_batch_norm(x, num_tasks, gamma, beta, eps=eps)
    return task_batch_norm(x, num_tasks, gamma, beta, rm, rv, step=0, training=True,
                           momentum=momentum, eps=eps)


BatchNormFn = Callable[..., Tensor]


class VGGNet:
    """Functional SPEC §2 network: ``num_stages`` × [conv3×3 (bias) → BN → LeakyReLU → maxpool 2×2] → linear.

    Fast weights, in order (K = 2·num_stages + 2 tensors; 10 for 4 stages):
    ``conv{i}.weight`` (F_i, C_i, 3, 3), ``conv{i}.bias`` (F_i,) for each stage i,
    ``linear.weight`` (num_classes, features), ``linear.bias`` (num_classes,),
    with F_i = num_filters, C_0 = in_channels, C_i = num_filters, and
    features = num_filters · (H >> num_stages) · (W >> num_stages).
    """

    def __init__(self, in_channels: int, image_height: int, image_width: int, num_classes: int,
                 num_stages: int = 4, num_filters: int = 64, leaky_relu_slope: float = 0.01,
                 bn_momentum: float = 0.1, bn_eps: float = 1e-5,
                 batch_norm: Optional[BatchNormFn] = None) -> None:
        for name, v in (("in_channels", in_channels), ("image_height", image_height),
                        ("image_width", image_width), ("num_classes", num_classes),
                        ("num_stages", num_stages), ("num_filters", num_filters)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"VGGNet: {name} must be a positive int, got {v!r}")
        if (image_height >> num_stages) < 1 or (image_width >> num_stages) < 1:
            raise ValueError(f"VGGNet: image {image_height}x{image_width} is too small for {num_stages} stages "
                             f"(each halves the feature map; need >= {2 ** num_stages})")
        self.in_channels = in_channels
        self.image_height = image_height
        self.image_width = image_width
        self.num_classes = num_classes
        self.num_stages = num_stages
        self.num_filters = num_filters
        self.leaky_relu_slope = float(leaky_relu_slope)
        self.bn_momentum = float(bn_momentum)
        self.bn_eps = float(bn_eps)
        self.batch_norm: BatchNormFn = batch_norm or aten_batch_norm
        self.feature_size = num_filters * (image_height >> num_stages) * (image_width >> num_stages)

    @classmethod
    def from_config(cls, config, batch_norm: Optional[BatchNormFn] = None) -> "VGGNet":
        """The network of a ``MAMLConfig``."""
        return cls(config.image_channels, config.image_height, config.image_width, config.ways,
                   num_stages=config.num_stages, num_filters=config.num_filters,
                   leaky_relu_slope=config.leaky_relu_slope, bn_momentum=config.bn_momentum,
                   bn_eps=config.bn_eps, batch_norm=batch_norm)

    # -------------------------------------------------------------- metadata
    @property
    def weight_names(self) -> list[str]:
        """Names of the K fast-weight tensors, in order."""
        names = []
        for i in range(self.num_stages):
            names += [f"conv{i}.weight", f"conv{i}.bias"]
        return names + ["linear.weight", "linear.bias"]

    @property
    def weight_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the K fast-weight tensors (without a task dim), in order."""
        shapes: list[tuple[int, ...]] = []
        c = self.in_channels
        for _ in range(self.num_stages):
            shapes += [(self.num_filters, c, 3, 3), (self.num_filters,)]
            c = self.num_filters
        return shapes + [(self.num_classes, self.feature_size), (self.num_classes,)]

    @property
    def bn_channels(self) -> list[int]:
        """Channels C of each batch-norm layer (one per stage)."""
        return [self.num_filters] * self.num_stages

    def init_weights(self, *, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> list[Tensor]:
        """Fresh fast weights per SPEC §2: Xavier-uniform conv/linear weights, zero biases.

        Drawn on the CPU from ``generator`` (so every device and backend gets the same
        numbers for the same seed), then moved to ``device``. Returns K tensors.
        """
        out = []
        for shape in self.weight_shapes:
            t = torch.empty(shape, dtype=dtype)
            if len(shape) > 1:
                torch.nn.init.xavier_uniform_(t, generator=generator)
            else:
                t.zero_()
            out.append(t.to(device) if device is not None else t)
        return out

    # --------------------------------------------------------------- forward
    def forward_task(self, x: Tensor, weights: Sequence[Tensor], gammas: Sequence[Tensor],
                     betas: Sequence[Tensor], running_means: Optional[Sequence[Tensor]] = None,
                     running_vars: Optional[Sequence[Tensor]] = None, bn_mode: str = "train") -> Tensor:
        """One task. x: (B, C, H, W); weights: K tensors of ``weight_shapes``;
        gammas, betas: per stage (C,); running_means/vars: per stage (C,) rows or None.
        Returns logits (B, num_classes)."""
        out = x
        for i in range(self.num_stages):
            out = F.conv2d(out, weights[2 * i], weights[2 * i + 1], stride=1, padding=1)
            out = self.batch_norm(out, gammas[i], betas[i],
                                  running_means[i] if running_means is not None else None,
                                  running_vars[i] if running_vars is not None else None,
                                  num_tasks=1, mode=bn_mode, momentum=self.bn_momentum, eps=self.bn_eps)
            out = F.leaky_relu(out, self.leaky_relu_slope)
            out = F.max_pool2d(out, kernel_size=2, stride=2)
        out = out.flatten(1)
        return F.linear(out, weights[-2], weights[-1])

    def forward_tasks(self, x: Tensor, weights: Sequence[Tensor], gammas: Sequence[Tensor],
                      betas: Sequence[Tensor], running_means: Optional[Sequence[Tensor]] = None,
                      running_vars: Optional[Sequence[Tensor]] = None, bn_mode: str = "train") -> Tensor:
        """T tasks at once. x: (T, B, C, H, W); weights: K tensors (T, *weight_shapes[k]);
        gammas, betas: per stage (C,) shared or (T, C) per task; running_means/vars: per
        stage (C,) rows or None. Returns logits (T, B, num_classes)."""
        T, B = x.shape[0], x.shape[1]
        out = x.transpose(0, 1).reshape(B, T * x.shape[2], x.shape[3], x.shape[4])
        for i in range(self.num_stages):
            w, b = weights[2 * i], weights[2 * i + 1]
            out = F.conv2d(out, w.reshape(T * w.shape[1], *w.shape[2:]), b.reshape(T * b.shape[1]),
                           stride=1, padding=1, groups=T)
            out = self.batch_norm(out, gammas[i], betas[i],
                                  running_means[i] if running_means is not None else None,
                                  running_vars[i] if running_vars is not None else None,
                                  num_tasks=T, mode=bn_mode, momentum=self.bn_momentum, eps=self.bn_eps)
            out = F.leaky_relu(out, self.leaky_relu_slope)
            out = F.max_pool2d(out, kernel_size=2, stride=2)
        # (B, T·C, h, w) -> (T, B, C·h·w): the same flatten order as the per-task layout.
        feats = out.reshape(B, T, -1).transpose(0, 1)
        return torch.baddbmm(weights[-1].unsqueeze(1), feats, weights[-2].transpose(1, 2))
