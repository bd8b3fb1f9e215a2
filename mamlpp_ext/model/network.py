"""Task-batched networks for MAML++: the names of the interface, the lifter and the built-in
networks, in one place.

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
    batch norm over T·C channels gives per-task statistics, an elementwise sum of two such
    tensors is per task, a concatenation along channels goes through (B, T, C, H, W) so that
    each task's channels stay together, and after flattening the features become (T, B, F),
    where a linear layer is one batched matmul. T = 1 is the ordinary layout: the sequential
    backend runs each task alone this way, as the public MAML++ code does.

Where things live:

* ``task_network.py``: :class:`TaskNetwork` (implement it for a network of your own) and
  :class:`BNLayer`;
* ``lifting.py``: :class:`LiftedNet`, which turns an ``nn.Module`` built from standard layers
  into a ``TaskNetwork`` (``LAYERS``, the table of what it knows; ``SUPPORTED_LAYERS``), and
  :class:`SequentialNet`, the same for an ``nn.Sequential``;
* ``networks.py``: the built-in networks — :class:`VGGNet` (the paper's, SPEC §2), ``conv4``
  and ``resnet12`` — and ``NETWORKS``, the table ``MAMLConfig.network`` names.
"""

from .lifting import CONV_IMPLS, CONV_LAYOUTS, LAYERS, SUPPORTED_LAYERS, LiftedNet, SequentialNet
from .networks import NETWORKS, Conv4Net, ResNet12Net, VGGNet, conv4_module, resnet12_module, vgg_module
from .task_network import BatchNormFn, BNLayer, TaskNetwork

__all__ = ["BNLayer", "BatchNormFn", "CONV_IMPLS", "CONV_LAYOUTS", "Conv4Net", "LAYERS", "LiftedNet", "NETWORKS",
           "ResNet12Net", "SUPPORTED_LAYERS", "SequentialNet", "TaskNetwork", "VGGNet", "conv4_module",
           "resnet12_module", "vgg_module"]
