"""The model layer of mamlpp_ext: what a MAML++ learner is, independent of data and training.

* :mod:`~mamlpp_ext.model.config` — ``MAMLConfig`` (every setting) and the public presets;
* :mod:`~mamlpp_ext.model.schedules` — MSL weights, derivative-order annealing, cosine annealing;
* :mod:`~mamlpp_ext.model.network` — the networks' names in one place: the task-batched network
  interface (``task_network``), the lifter that turns a user's ``nn.Module`` into one
  (``lifting``: ``torch.fx`` tracing and the table of supported layers) and the built-in
  networks — the paper's VGG net, conv4 and ResNet-12 (``networks``: ``NETWORKS``);
* :mod:`~mamlpp_ext.model.meta_learner` — ``MAMLPlusPlus``: the inner and outer loops, with a
  table of backends (sequential / batched / fused).

Imports only :mod:`mamlpp_ext.ops` from the rest of the package.
"""

from .config import MAMLConfig, from_preset, preset_names
from .meta_learner import BACKENDS, MAMLPlusPlus

__all__ = ["BACKENDS", "MAMLConfig", "MAMLPlusPlus", "from_preset", "preset_names"]
