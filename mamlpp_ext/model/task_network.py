"""The interface of a task-batched MAML++ network: ``TaskNetwork`` and ``BNLayer``.

Every network the meta-learner runs implements it: the VGG net, ``conv4`` and ``resnet12``
(``networks.py``), any network lifted from a user's ``nn.Module`` (``lifting.py``), or a class of
the user's own. The contract of ``forward`` and the activation layout are in the docstring of
``network.py`` (NOTE [Task-major layout]); ``network.py`` re-exports these names.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["BNLayer", "BatchNormFn", "TaskNetwork"]

#: ``bn(layer, h, negative_slope) -> Tensor``: see NOTE [Task-major layout] in network.py.
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
    """The interface a MAML++ network implements (see NOTE [Task-major layout] in network.py).

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

    def use_backend_layout(self, layout: str) -> None:
        """Called by the learner with the convolution layout of the backend that runs the network
        (``Backend.conv_layout``, NOTE [Convolution layout] in lifting.py); a network of its own
        may ignore it (the default)."""

    def check_input_shape(self, shape: tuple[int, int, int]) -> None:
        """Raise ValueError when images of ``shape`` (C, H, W) cannot go through the network."""
