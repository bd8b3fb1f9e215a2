"""The built-in networks, and ``NETWORKS``: the table ``MAMLConfig.network`` names.

Each is an ordinary ``nn.Module`` (``vgg_module``, ``conv4_module``, ``resnet12_module``) lifted
by ``lifting.LiftedNet``; the classes add the initialisation, drawn from the learner's seeded
generator so that every device and backend starts from the same θ₀:

* ``vgg`` — the 4-stage network of MAML++ (conv 3×3 with bias → BN → LeakyReLU(0.01) → max-pool,
  ×``num_stages``; flatten; linear). Xavier-uniform weights, zero biases.
* ``conv4`` — the network of the original MAML (Finn et al., 2017): four stages of conv 3×3
  (with bias) → BN → ReLU → max-pool 2×2; flatten; linear. 32 filters per stage for
  mini-ImageNet, 64 for Omniglot (``MAMLConfig.network_widths`` overrides). Xavier-uniform
  weights, zero biases, as the VGG net.
* ``resnet12`` — the ResNet-12 of current few-shot work (MetaOptNet, learn2learn, ALFA): four
  residual blocks of widths 64-160-320-640; a block is three conv 3×3 (no bias) each followed
  by BN, LeakyReLU(0.1) after the first two and after the residual sum, a shortcut conv 1×1
  (no bias) + BN, and a 2×2 max-pool; then global average pooling and a linear head. No
  DropBlock (random masks would make the inner loop non-deterministic). Convolutions
  Kaiming-normal (fan-out, leaky_relu gain, as learn2learn's ResNet12), head Xavier-uniform
  with zero bias.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lifting import LiftedNet, SequentialNet
from .task_network import TaskNetwork

__all__ = ["Conv4Net", "NETWORKS", "NetworkSpec", "ResNet12Net", "VGGNet", "conv4_module", "network_widths",
           "resnet12_module", "vgg_module"]

RESNET12_WIDTHS = (64, 160, 320, 640)
RESNET12_SLOPE = 0.1


def _positive_ints(owner: str, **values) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {v!r}")


def _check_widths(owner: str, widths: Sequence[int]) -> tuple[int, ...]:
    widths = tuple(widths)
    if not widths or any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths):
        raise ValueError(f"{owner}: widths must be a non-empty sequence of positive ints, got {widths!r}")
    return widths


def _check_side(owner: str, height: int, width: int, stages: int) -> None:
    if (height >> stages) < 1 or (width >> stages) < 1:
        raise ValueError(f"{owner}: image {height}x{width} is too small for {stages} stages "
                         f"(each halves the feature map; need >= {2 ** stages})")


def _draw(shapes: Sequence[tuple[int, ...]], init_matrix: Callable[[Tensor, torch.Generator], None],
          generator: Optional[torch.Generator], dtype: torch.dtype, device) -> list[Tensor]:
    """θ₀ drawn on the CPU from ``generator`` (same numbers on every device and backend), in
    weight order: tensors with more than one dim through ``init_matrix``, biases zero."""
    out = []
    for shape in shapes:
        t = torch.empty(shape, dtype=dtype)
        if len(shape) > 1:
            init_matrix(t, generator)
        else:
            t.zero_()
        out.append(t.to(device) if device is not None else t)
    return out


def _xavier(t: Tensor, generator: Optional[torch.Generator]) -> None:
    nn.init.xavier_uniform_(t, generator=generator)


# ---------------------------------------------------------------------------------------------
# The paper's network
# ---------------------------------------------------------------------------------------------

def vgg_module(in_channels: int, image_height: int, image_width: int, num_classes: int, num_stages: int = 4,
               num_filters: int = 64, leaky_relu_slope: float = 0.01, bn_momentum: float = 0.1,
               bn_eps: float = 1e-5) -> nn.Sequential:
    """The MAML++ network as an ``nn.Sequential``: ``num_stages`` × [conv3×3 (bias) → BN →
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
    """The "VGG" network of MAML++ (see ``vgg_module``), Xavier-uniform weights and zero biases.

    Fast weights, in order (K = 2·num_stages + 2 tensors; 10 for 4 stages): ``conv{i}.weight``
    (F, C_i, 3, 3), ``conv{i}.bias`` (F,) per stage, ``linear.weight`` (num_classes, features),
    ``linear.bias`` (num_classes,), with F = num_filters, C_0 = in_channels, C_i = F and
    features = F · (H >> num_stages) · (W >> num_stages). One BN layer per stage (bn{i}, F
    channels), each followed by the fused LeakyReLU.
    """

    def __init__(self, in_channels: int, image_height: int, image_width: int, num_classes: int,
                 num_stages: int = 4, num_filters: int = 64, leaky_relu_slope: float = 0.01,
                 bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> None:
        _positive_ints("VGGNet", in_channels=in_channels, image_height=image_height, image_width=image_width,
                       num_classes=num_classes, num_stages=num_stages, num_filters=num_filters)
        _check_side("VGGNet", image_height, image_width, num_stages)
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
        """Fresh fast weights: Xavier-uniform conv/linear weights, zero biases.

        Drawn on the CPU from ``generator`` (so every device and backend gets the same numbers
        for the same seed), then moved to ``device``. Returns K tensors.
        """
        return _draw(self.weight_shapes, _xavier, generator, dtype, device)


# ---------------------------------------------------------------------------------------------
# Conv-4, the original MAML network
# ---------------------------------------------------------------------------------------------

def conv4_module(in_channels: int, image_height: int, image_width: int, num_classes: int,
                 widths: Sequence[int] = (32, 32, 32, 32), bn_momentum: float = 0.1,
                 bn_eps: float = 1e-5) -> nn.Sequential:
    """Conv-4 as an ``nn.Sequential``: per width, conv3×3 (padding 1, bias) → BN → ReLU →
    max-pool 2×2; then flatten → linear. Layer names: conv{i}, bn{i}, relu{i}, pool{i}, flatten,
    linear."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c = in_channels
    for i, w in enumerate(widths):
        layers[f"conv{i}"] = nn.Conv2d(c, w, 3, padding=1, bias=True, device="meta")
        layers[f"bn{i}"] = nn.BatchNorm2d(w, eps=bn_eps, momentum=bn_momentum)
        layers[f"relu{i}"] = nn.ReLU()
        layers[f"pool{i}"] = nn.MaxPool2d(2)
        c = w
    layers["flatten"] = nn.Flatten()
    s = len(widths)
    layers["linear"] = nn.Linear(c * (image_height >> s) * (image_width >> s), num_classes, device="meta")
    return nn.Sequential(layers)


class Conv4Net(SequentialNet):
    """Conv-4 (``conv4_module``) lifted, with Xavier-uniform weights and zero biases.

    Fast weights: ``conv{i}.weight``, ``conv{i}.bias`` per stage, ``linear.weight``,
    ``linear.bias``; one BN layer per stage with the ReLU fused.
    """

    def __init__(self, in_channels: int, image_height: int, image_width: int, num_classes: int,
                 widths: Sequence[int] = (32, 32, 32, 32), bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> None:
        _positive_ints("Conv4Net", in_channels=in_channels, image_height=image_height, image_width=image_width,
                       num_classes=num_classes)
        self.widths = _check_widths("Conv4Net", widths)
        _check_side("Conv4Net", image_height, image_width, len(self.widths))
        super().__init__(conv4_module(in_channels, image_height, image_width, num_classes, self.widths, bn_momentum,
                                      bn_eps), (in_channels, image_height, image_width))

    @classmethod
    def from_config(cls, config) -> "Conv4Net":
        return cls(config.image_channels, config.image_height, config.image_width, config.ways,
                   widths=network_widths(config), bn_momentum=config.bn_momentum, bn_eps=config.bn_eps)

    def init_weights(self, *, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> list[Tensor]:
        """Xavier-uniform weights, zero biases, drawn on the CPU from ``generator``."""
        return _draw(self.weight_shapes, _xavier, generator, dtype, device)


# ---------------------------------------------------------------------------------------------
# ResNet-12
# ---------------------------------------------------------------------------------------------

class ResNet12Block(nn.Module):
    """One residual block of ResNet-12: three conv3×3 → BN (LeakyReLU after the first two), plus
    a conv1×1 → BN shortcut, summed, LeakyReLU, max-pool 2×2."""

    def __init__(self, in_channels: int, width: int, slope: float, bn_momentum: float, bn_eps: float) -> None:
        super().__init__()
        self.slope = slope

        def conv(c_in, k):
            return nn.Conv2d(c_in, width, k, padding=k // 2, bias=False, device="meta")

        def bn():
            return nn.BatchNorm2d(width, eps=bn_eps, momentum=bn_momentum)

        self.conv1, self.bn1 = conv(in_channels, 3), bn()
        self.conv2, self.bn2 = conv(width, 3), bn()
        self.conv3, self.bn3 = conv(width, 3), bn()
        self.shortcut_conv, self.shortcut_bn = conv(in_channels, 1), bn()

    def forward(self, x: Tensor) -> Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)), self.slope)
        out = F.leaky_relu(self.bn2(self.conv2(out)), self.slope)
        out = self.bn3(self.conv3(out))
        out = F.leaky_relu(out + self.shortcut_bn(self.shortcut_conv(x)), self.slope)
        return F.max_pool2d(out, 2)


class ResNet12(nn.Module):
    """ResNet-12: residual blocks of ``widths`` (``ResNet12Block``), global average pooling and a
    linear head. Layer names: block{i}.conv1..3, block{i}.bn1..3, block{i}.shortcut_conv,
    block{i}.shortcut_bn, head."""

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int] = RESNET12_WIDTHS,
                 slope: float = RESNET12_SLOPE, bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> None:
        super().__init__()
        c = in_channels
        for i, w in enumerate(widths):
            self.add_module(f"block{i}", ResNet12Block(c, w, slope, bn_momentum, bn_eps))
            c = w
        self.num_blocks = len(widths)
        self.head = nn.Linear(c, num_classes, device="meta")

    def forward(self, x: Tensor) -> Tensor:
        for i in range(self.num_blocks):
            x = getattr(self, f"block{i}")(x)
        return self.head(x.mean((2, 3)))


def resnet12_module(in_channels: int, num_classes: int, widths: Sequence[int] = RESNET12_WIDTHS,
                    slope: float = RESNET12_SLOPE, bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> ResNet12:
    """A ResNet-12 ``nn.Module`` (parameters on the ``meta`` device: shapes only)."""
    return ResNet12(in_channels, num_classes, widths, slope, bn_momentum, bn_eps)


def _kaiming_fan_out(t: Tensor, generator: Optional[torch.Generator]) -> None:
    if t.dim() == 4:
        nn.init.kaiming_normal_(t, mode="fan_out", nonlinearity="leaky_relu", generator=generator)
    else:
        nn.init.xavier_uniform_(t, generator=generator)


class ResNet12Net(LiftedNet):
    """ResNet-12 (``resnet12_module``) lifted. Fast weights: every convolution weight (four per
    block, no biases) and the head's weight and bias (K = 4·blocks + 2; 18 for four blocks); four
    BN layers per block, the first two with the LeakyReLU fused.

    Initialisation: convolutions Kaiming-normal (fan-out, leaky_relu gain √2), head
    Xavier-uniform with zero bias, drawn on the CPU from the learner's generator.
    """

    def __init__(self, in_channels: int, image_height: int, image_width: int, num_classes: int,
                 widths: Sequence[int] = RESNET12_WIDTHS, bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> None:
        _positive_ints("ResNet12Net", in_channels=in_channels, image_height=image_height, image_width=image_width,
                       num_classes=num_classes)
        self.widths = _check_widths("ResNet12Net", widths)
        _check_side("ResNet12Net", image_height, image_width, len(self.widths))
        super().__init__(resnet12_module(in_channels, num_classes, self.widths, RESNET12_SLOPE, bn_momentum, bn_eps),
                         (in_channels, image_height, image_width))

    @classmethod
    def from_config(cls, config) -> "ResNet12Net":
        return cls(config.image_channels, config.image_height, config.image_width, config.ways,
                   widths=network_widths(config), bn_momentum=config.bn_momentum, bn_eps=config.bn_eps)

    def init_weights(self, *, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> list[Tensor]:
        return _draw(self.weight_shapes, _kaiming_fan_out, generator, dtype, device)


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

class NetworkSpec(NamedTuple):
    """A built-in network ``MAMLConfig.network`` can name.

    build(config) -> TaskNetwork; stages(config) -> how many times the network halves the
    image (the config checks the image size against it); default_widths(config) -> the widths
    used when ``config.network_widths`` is None (None: the network has no widths setting);
    summary: one line for docs and ``--help``.
    """

    build: Callable[..., TaskNetwork]
    stages: Callable[..., int]
    default_widths: Callable[..., Optional[tuple[int, ...]]]
    summary: str


def network_widths(config) -> tuple[int, ...]:
    """The widths a config's network runs with: ``config.network_widths``, or the network's default."""
    if config.network_widths is not None:
        return tuple(config.network_widths)
    return NETWORKS[config.network].default_widths(config)


def _conv4_widths(config) -> tuple[int, ...]:
    return (64,) * 4 if "omniglot" in config.dataset else (32,) * 4


NETWORKS: dict[str, NetworkSpec] = {
    "vgg": NetworkSpec(VGGNet.from_config, lambda c: c.num_stages, lambda c: None,
                       "the MAML++ paper's 4-stage network (num_stages, num_filters, leaky_relu_slope)"),
    "conv4": NetworkSpec(Conv4Net.from_config, lambda c: len(network_widths(c)), _conv4_widths,
                         "the original MAML network: 4 × conv3x3-BN-ReLU-maxpool, 32 filters (64 for Omniglot)"),
    "resnet12": NetworkSpec(ResNet12Net.from_config, lambda c: len(network_widths(c)), lambda c: RESNET12_WIDTHS,
                            "ResNet-12, widths 64-160-320-640, LeakyReLU(0.1), no DropBlock"),
}
