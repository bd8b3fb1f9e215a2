"""Task-batched networks for MAML++: the interface, networks lifted from ``nn.Sequential``, and
the VGG net of the paper.

A MAML++ network is *functional*: it owns no parameters. Every forward takes the fast weights of
T tasks and a batch-norm callable, and runs the T tasks at once:

* ``x``: (T, B, C, H, W) — B images per task;
* ``weights``: K tensors, ``weights[k]`` of shape (T, *weight_shapes[k]) — the fast weights;
* ``bn(layer, h, negative_slope)``: the per-step batch norm of BN layer ``layer`` applied to the
  task-major activations ``h`` — (B, T·C, H, W) or (B, T·C), channel t·C + c is channel c of
  task t — followed by LeakyReLU(negative_slope) when that is not None (0.0 is ReLU). The
  meta-learner supplies it: it knows the inner step, the per-step statistics and affine tables,
  training or evaluation, and which op (compiled or plain PyTorch) the backend runs;
* returns logits (T, B, num_classes).

NOTE [Task-major layout]
    Activations of T tasks live as (B, T·C, H, W): a convolution is one grouped convolution
    (groups = T × the layer's own groups), pooling and activations are elementwise per channel,
    batch norm over T·C channels gives per-task statistics, and after ``Flatten`` the features
    become (T, B, F), where a linear layer is one batched matmul. T = 1 is the ordinary layout:
    the sequential backend runs each task alone this way, as the public MAML++ code does.

Implement :class:`TaskNetwork` for a network of your own, or hand the meta-learner an
``nn.Sequential`` of standard layers, which :class:`SequentialNet` lifts (see
``SUPPORTED_LAYERS``). :class:`VGGNet` is the paper's network (SPEC §2) as a ``SequentialNet``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BNLayer", "BatchNormFn", "SUPPORTED_LAYERS", "SequentialNet", "TaskNetwork", "VGGNet"]

#: ``bn(layer, h, negative_slope) -> Tensor``: see the module docstring.
BatchNormFn = Callable[[int, Tensor, Optional[float]], Tensor]


class BNLayer(NamedTuple):
    """A per-step batch-norm layer of a network.

    name: its name (e.g. "bn0"); channels: C; affine: has γ/β (meta-learned per step, BNWB);
    track_running_stats: keeps per-step running statistics (BNRS); momentum, eps: of the running
    statistics and the normalisation; weight_init, bias_init: (C,) initial γ/β (None without
    affine); mean_init, var_init: (C,) initial running statistics (None without them).
    """

    name: str
    channels: int
    affine: bool
    track_running_stats: bool
    momentum: float
    eps: float
    weight_init: Optional[Tensor]
    bias_init: Optional[Tensor]
    mean_init: Optional[Tensor]
    var_init: Optional[Tensor]


class TaskNetwork:
    """The interface a MAML++ network implements (see the module docstring for ``forward``).

    Attributes a subclass sets: ``weight_names`` and ``weight_shapes`` (the K fast-weight tensors,
    without the task dim), ``bn_layers`` (one ``BNLayer`` per call index of ``bn``, in order) and
    ``num_classes``.
    """

    weight_names: list[str]
    weight_shapes: list[tuple[int, ...]]
    bn_layers: list[BNLayer]
    num_classes: int

    @property
    def bn_channels(self) -> list[int]:
        """Channels C of each batch-norm layer."""
        return [b.channels for b in self.bn_layers]

    def init_weights(self, *, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> list[Tensor]:
        """The initial fast weights θ₀: K tensors of ``weight_shapes``."""
        raise NotImplementedError

    def forward(self, x: Tensor, weights: Sequence[Tensor], bn: BatchNormFn) -> Tensor:
        """Logits (T, B, num_classes) of x (T, B, C, H, W) under per-task ``weights``."""
        raise NotImplementedError

    def check_input_shape(self, shape: tuple[int, int, int]) -> None:
        """Raise ValueError when images of ``shape`` (C, H, W) cannot go through the network."""


# ---------------------------------------------------------------------------------------------
# Lifting an nn.Sequential
# ---------------------------------------------------------------------------------------------

#: Layers ``SequentialNet`` lifts (nested ``nn.Sequential`` are flattened).
SUPPORTED_LAYERS = ("Conv2d", "BatchNorm2d", "BatchNorm1d", "ReLU", "LeakyReLU", "MaxPool2d", "AvgPool2d",
                    "AdaptiveAvgPool2d", "Flatten", "Linear", "Dropout (p=0 or eval mode)", "Identity")

# NOTE [Convolution layout]
#     ``conv_layout = "grouped"`` runs a convolution of T tasks as one grouped convolution over
#     the task-major channels; ``"split"`` runs T ordinary convolutions on the channel slices
#     and concatenates them. Same arithmetic. Measured on the CPU for the public Omniglot and
#     mini-ImageNet settings, grouped was faster in every case (benchmarks/RESULTS.md, session of
#     2026-11-29), so it is the default; set ``net.conv_layout`` to compare on another device.
CONV_LAYOUTS = ("grouped", "split")


def _flatten_modules(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            out += _flatten_modules(child, full + ".")
        else:
            out.append((full, child))
    return out


def _activation_slope(m: nn.Module) -> Optional[float]:
    if type(m) is nn.ReLU:
        return 0.0
    if type(m) is nn.LeakyReLU:
        return float(m.negative_slope)
    return None


def _act(h: Tensor, slope: float) -> Tensor:
    return torch.relu(h) if slope == 0.0 else F.leaky_relu(h, slope)


class SequentialNet(TaskNetwork):
    """A task-batched functional network lifted from an ``nn.Sequential`` of standard layers.

    Args:
        module: the ``nn.Sequential`` (nested ones are flattened); layers from
            ``SUPPORTED_LAYERS``, anything else is rejected by name. It is not modified and not
            used after construction except as the source of the initial values.
        input_shape: (C, H, W) of one image, to check that the module accepts it and produces
            (B, num_classes) logits (run once on the ``meta`` device: no compute).

    What becomes what: the weights and biases of ``Conv2d`` and ``Linear`` are the fast weights
    (adapted in the inner loop; names as in ``module.named_parameters()``); every ``BatchNorm``
    becomes a per-step batch-norm layer (its γ/β meta-learned per step, its running statistics
    kept per step; momentum and eps from the module); a ``ReLU`` / ``LeakyReLU`` right after a
    batch norm is fused into it. ``init_weights`` returns copies of the module's current conv and
    linear parameters (the module's initialisation is θ₀).
    """

    def __init__(self, module: nn.Module, input_shape: Sequence[int]) -> None:
        if not isinstance(module, nn.Sequential):
            raise TypeError(f"network: expected an nn.Sequential (or a TaskNetwork), got {type(module).__name__}")
        input_shape = tuple(int(v) for v in input_shape)
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ValueError(f"network: input_shape must be (C, H, W) with positive sizes, got {input_shape}")
        self.input_shape = input_shape
        self._conv_layout = "grouped"
        self._flat = False  # while lifting: are the activations flat (after Flatten) yet
        self.weight_names: list[str] = []
        self.weight_shapes: list[tuple[int, ...]] = []
        self.bn_layers: list[BNLayer] = []
        self._init: list[Tensor] = []
        self._layers: list[Callable] = []  # each: (h, weights, bn, T) -> h
        layers = _flatten_modules(module)
        if not layers:
            raise ValueError("network: the nn.Sequential is empty")
        i = 0
        while i < len(layers):
            name, m = layers[i]
            nxt = layers[i + 1][1] if i + 1 < len(layers) else None
            consumed = self._lift(name, m, nxt)
            i += consumed
        self.num_classes = self._check_module(module, input_shape)

    @property
    def conv_layout(self) -> str:
        """How T tasks' convolutions run (NOTE [Convolution layout]): "grouped" or "split"."""
        return self._conv_layout

    @conv_layout.setter
    def conv_layout(self, value: str) -> None:
        if value not in CONV_LAYOUTS:
            raise ValueError(f"conv_layout must be one of {CONV_LAYOUTS}, got {value!r}")
        self._conv_layout = value

    # ------------------------------------------------------------------ lifting
    def _need(self, name: str, kind: type, flat: bool) -> None:
        """Layers before ``Flatten`` see (B, C, H, W) images, layers after it (B, F) features."""
        if flat != self._flat:
            where = "after nn.Flatten()" if flat else "before nn.Flatten() (on images)"
            raise ValueError(f"network: layer {name!r} ({kind.__name__}) must come {where}; the lifted network "
                             f"runs image layers on (B, C, H, W) and feature layers on flattened (B, F) inputs")
    def _fast(self, name: str, t: Optional[Tensor]) -> Optional[int]:
        if t is None:
            return None
        self.weight_names.append(name)
        self.weight_shapes.append(tuple(t.shape))
        self._init.append(t.detach().clone())
        return len(self.weight_names) - 1

    def _lift(self, name: str, m: nn.Module, nxt: Optional[nn.Module]) -> int:
        """Append the functional form of layer ``m``; returns how many layers it consumed."""
        kind = type(m)
        if kind is nn.Conv2d:
            self._need(name, kind, flat=False)
            if m.padding_mode != "zeros":
                raise ValueError(f"network: layer {name!r} (Conv2d) has padding_mode={m.padding_mode!r}; "
                                 f"only 'zeros' is supported")
            kw = self._fast(name + ".weight", m.weight)
            kb = self._fast(name + ".bias", m.bias)
            self._layers.append(self._conv(kw, kb, m.stride, m.padding, m.dilation, m.groups))
            return 1
        if kind is nn.Linear:
            self._need(name, kind, flat=True)
            kw = self._fast(name + ".weight", m.weight)
            kb = self._fast(name + ".bias", m.bias)
            self._layers.append(self._linear(kw, kb))
            return 1
        if kind in (nn.BatchNorm2d, nn.BatchNorm1d):
            self._need(name, kind, flat=kind is nn.BatchNorm1d)
            if m.momentum is None:
                raise ValueError(f"network: layer {name!r} ({kind.__name__}) has momentum=None (cumulative "
                                 f"average); per-step running statistics need a momentum, e.g. 0.1")
            idx = len(self.bn_layers)
            affine = m.weight is not None
            track = m.running_mean is not None
            self.bn_layers.append(BNLayer(
                name, int(m.num_features), affine, track, float(m.momentum), float(m.eps),
                m.weight.detach().clone() if affine else None, m.bias.detach().clone() if affine else None,
                m.running_mean.detach().clone() if track else None, m.running_var.detach().clone() if track else None))
            slope = _activation_slope(nxt) if nxt is not None else None
            if slope is not None and slope < 0:  # the fused op needs a >= 0 slope: apply it as its own layer
                slope = None
            self._layers.append(self._batch_norm(idx, slope, spatial=kind is nn.BatchNorm2d))
            return 2 if slope is not None else 1
        slope = _activation_slope(m)
        if slope is not None:
            self._layers.append(lambda h, w, bn, T, s=slope: _act(h, s))
            return 1
        if kind in (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d):
            self._need(name, kind, flat=False)
        if kind is nn.MaxPool2d:
            if m.return_indices:
                raise ValueError(f"network: layer {name!r} (MaxPool2d) has return_indices=True; not supported")
            args = (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
            self._layers.append(lambda h, w, bn, T, a=args: F.max_pool2d(h, *a))
            return 1
        if kind is nn.AvgPool2d:
            args = (m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override)
            self._layers.append(lambda h, w, bn, T, a=args: F.avg_pool2d(h, *a))
            return 1
        if kind is nn.AdaptiveAvgPool2d:
            self._layers.append(lambda h, w, bn, T, o=m.output_size: F.adaptive_avg_pool2d(h, o))
            return 1
        if kind is nn.Flatten:
            if m.start_dim != 1 or m.end_dim != -1:
                raise ValueError(f"network: layer {name!r} (Flatten) must flatten dims 1..-1 (the default), got "
                                 f"start_dim={m.start_dim}, end_dim={m.end_dim}")
            self._layers.append(self._flatten)
            self._flat = True
            return 1
        if kind is nn.Dropout:
            if m.p > 0 and m.training:
                raise ValueError(f"network: layer {name!r} is Dropout(p={m.p}) in training mode; the inner loop "
                                 f"needs a deterministic network: use p=0 or put the layer in eval mode")
            return 1
        if kind is nn.Identity:
            return 1
        raise ValueError(f"network: layer {name!r} ({kind.__name__}) is not supported; supported layers: "
                         f"{', '.join(SUPPORTED_LAYERS)} (or implement mamlpp_ext.model.network.TaskNetwork)")

    # ------------------------------------------------- functional layers
    # Activations are (B, T·C, H, W) ("spatial", NOTE [Task-major layout]) until Flatten, then
    # (T, B, F) ("flat").

    def _conv(self, kw: int, kb: Optional[int], stride, padding, dilation, groups: int):
        def conv(h: Tensor, weights: Sequence[Tensor], bn, T: int) -> Tensor:
            w = weights[kw]
            b = weights[kb] if kb is not None else None
            if T == 1:
                return F.conv2d(h, w[0], b[0] if b is not None else None, stride, padding, dilation, groups)
            if self._conv_layout == "split":
                hs = h.chunk(T, dim=1)
                return torch.cat([F.conv2d(hs[t], w[t], b[t] if b is not None else None, stride, padding, dilation,
                                           groups) for t in range(T)], dim=1)
            return F.conv2d(h, w.reshape(-1, *w.shape[2:]), b.reshape(-1) if b is not None else None, stride,
                            padding, dilation, groups * T)
        return conv

    @staticmethod
    def _linear(kw: int, kb: Optional[int]):
        def linear(h: Tensor, weights: Sequence[Tensor], bn, T: int) -> Tensor:
            w = weights[kw]
            if h.dim() != 3:
                raise RuntimeError("network: a Linear layer needs flat features; put nn.Flatten() before it")
            if kb is None:
                return torch.bmm(h, w.transpose(1, 2))
            return torch.baddbmm(weights[kb].unsqueeze(1), h, w.transpose(1, 2))
        return linear

    @staticmethod
    def _batch_norm(idx: int, slope: Optional[float], spatial: bool):
        if spatial:
            return lambda h, w, bn, T: bn(idx, h, slope)

        def bn1d(h: Tensor, weights, bn, T: int) -> Tensor:
            # (T, B, F) -> (B, T·F) task-major, normalise, and back
            Tn, B, Fn = h.shape
            out = bn(idx, h.transpose(0, 1).reshape(B, Tn * Fn), slope)
            return out.reshape(B, Tn, Fn).transpose(0, 1)
        return bn1d

    @staticmethod
    def _flatten(h: Tensor, weights, bn, T: int) -> Tensor:
        if h.dim() == 3:
            return h
        B = h.shape[0]
        return h.reshape(B, T, -1).transpose(0, 1)

    # ------------------------------------------------------------- checks
    def _check_module(self, module: nn.Module, input_shape: tuple[int, int, int]) -> int:
        try:
            probe = copy.deepcopy(module).to("meta")
            dtype = next((p.dtype for p in probe.parameters()), torch.get_default_dtype())
            with torch.no_grad():
                out = probe(torch.empty((2, *input_shape), device="meta", dtype=dtype))
        except Exception as exc:  # noqa: BLE001  (any layer may reject the shape)
            raise ValueError(f"network: the module does not accept images of shape {input_shape} "
                             f"(tried a batch of 2): {type(exc).__name__}: {exc}") from None
        if out.dim() != 2 or out.shape[0] != 2:
            raise ValueError(f"network: the module must map (B, C, H, W) images to (B, num_classes) logits; "
                             f"for input {(2, *input_shape)} it returns shape {tuple(out.shape)} (missing Flatten?)")
        return int(out.shape[1])

    def check_input_shape(self, shape: tuple[int, int, int]) -> None:
        if tuple(shape) != self.input_shape:
            raise ValueError(f"network: built for images of shape {self.input_shape}, got {tuple(shape)}")

    # ------------------------------------------------------------ interface
    def init_weights(self, *, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> list[Tensor]:
        """Copies of the module's conv/linear parameters (``generator`` is not used)."""
        return [t.to(dtype=dtype, device=device, copy=True) for t in self._init]

    def forward(self, x: Tensor, weights: Sequence[Tensor], bn: BatchNormFn) -> Tensor:
        T, B = x.shape[0], x.shape[1]
        h = x.reshape(B, *x.shape[2:]) if T == 1 else x.transpose(0, 1).reshape(B, T * x.shape[2], *x.shape[3:])
        for layer in self._layers:
            h = layer(h, weights, bn, T)
        if h.dim() != 3:
            raise RuntimeError("network: the last layer must produce flat (T, B, num_classes) logits")
        return h

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(input_shape={self.input_shape}, fast_weights={len(self.weight_names)}, "
                f"bn_layers={len(self.bn_layers)}, num_classes={self.num_classes})")


# ---------------------------------------------------------------------------------------------
# The paper's network
# ---------------------------------------------------------------------------------------------

def vgg_module(in_channels: int, image_height: int, image_width: int, num_classes: int, num_stages: int = 4,
               num_filters: int = 64, leaky_relu_slope: float = 0.01, bn_momentum: float = 0.1,
               bn_eps: float = 1e-5) -> nn.Sequential:
    """The SPEC §2 network as an ``nn.Sequential``: ``num_stages`` × [conv3×3 (bias) → BN →
    LeakyReLU → maxpool 2×2] → flatten → linear. Layer names: conv{i}, bn{i}, act{i}, pool{i},
    flatten, linear."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c = in_channels
    for i in range(num_stages):
        layers[f"conv{i}"] = nn.Conv2d(c, num_filters, 3, stride=1, padding=1, bias=True, device="meta")
        layers[f"bn{i}"] = nn.BatchNorm2d(num_filters, eps=bn_eps, momentum=bn_momentum)
        layers[f"act{i}"] = nn.LeakyReLU(leaky_relu_slope)
        layers[f"pool{i}"] = nn.MaxPool2d(2, 2)
        c = num_filters
    layers["flatten"] = nn.Flatten()
    features = num_filters * (image_height >> num_stages) * (image_width >> num_stages)
    layers["linear"] = nn.Linear(features, num_classes, bias=True, device="meta")
    return nn.Sequential(layers)


class VGGNet(SequentialNet):
    """The SPEC §2 "VGG" network of MAML++ (see ``vgg_module``), initialised per SPEC §2.

    Fast weights, in order (K = 2·num_stages + 2 tensors; 10 for 4 stages): ``conv{i}.weight``
    (F, C_i, 3, 3), ``conv{i}.bias`` (F,) per stage, ``linear.weight`` (num_classes, features),
    ``linear.bias`` (num_classes,), with F = num_filters, C_0 = in_channels, C_i = F and
    features = F · (H >> num_stages) · (W >> num_stages). One BN layer per stage (bn{i}, F
    channels), each followed by the fused LeakyReLU.
    """

    def __init__(self, in_channels: int, image_height: int, image_width: int, num_classes: int,
                 num_stages: int = 4, num_filters: int = 64, leaky_relu_slope: float = 0.01,
                 bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> None:
        for name, v in (("in_channels", in_channels), ("image_height", image_height),
                        ("image_width", image_width), ("num_classes", num_classes),
                        ("num_stages", num_stages), ("num_filters", num_filters)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"VGGNet: {name} must be a positive int, got {v!r}")
        if (image_height >> num_stages) < 1 or (image_width >> num_stages) < 1:
            raise ValueError(f"VGGNet: image {image_height}x{image_width} is too small for {num_stages} stages "
                             f"(each halves the feature map; need >= {2 ** num_stages})")
        self.in_channels, self.image_height, self.image_width = in_channels, image_height, image_width
        self.num_stages = num_stages
        self.num_filters = num_filters
        self.bn_momentum, self.bn_eps = float(bn_momentum), float(bn_eps)
        self.leaky_relu_slope = float(leaky_relu_slope)
        self.feature_size = num_filters * (image_height >> num_stages) * (image_width >> num_stages)
        super().__init__(vgg_module(in_channels, image_height, image_width, num_classes, num_stages, num_filters,
                                    leaky_relu_slope, bn_momentum, bn_eps),
                         (in_channels, image_height, image_width))

    @classmethod
    def from_config(cls, config) -> "VGGNet":
        """The network of a ``MAMLConfig``."""
        return cls(config.image_channels, config.image_height, config.image_width, config.ways,
                   num_stages=config.num_stages, num_filters=config.num_filters,
                   leaky_relu_slope=config.leaky_relu_slope, bn_momentum=config.bn_momentum, bn_eps=config.bn_eps)

    def init_weights(self, *, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> list[Tensor]:
        """Fresh fast weights per SPEC §2: Xavier-uniform conv/linear weights, zero biases.

        Drawn on the CPU from ``generator`` (so every device and backend gets the same numbers
        for the same seed), then moved to ``device``. Returns K tensors.
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
