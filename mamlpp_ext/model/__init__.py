"""The model layer of mamlpp_ext: what a MAML++ learner is, independent of data and training.

* :mod:`~mamlpp_ext.model.config` — ``MAMLConfig`` (every setting) and the public presets;
* :mod:`~mamlpp_ext.model.schedules` — MSL weights, derivative-order annealing, cosine annealing;
* :mod:`~mamlpp_ext.model.network` — the networks' names in one place: the task-batched network
  interface (``task_network``), the lifter that turns a user's ``nn.Module`` into one
  (``lifting``: ``torch.fx`` tracing and the table of supported layers) and the built-in
  networks — the paper's VGG net, conv4 and ResNet-12 (``networks``: ``NETWORKS``);
* :mod:`~mamlpp_ext.model.backends` — the table of backends (sequential / batched / fused) and
  ``resolve_execution``, the one function that decides which backend and modes (eager or CUDA
  graph, op by op or compiled) run;
* :mod:`~mamlpp_ext.model.step` — the step: inner loop, meta-loss, outer update, behind the
  interface every execution mode calls (NOTE [Step interface]);
* :mod:`~mamlpp_ext.model.recompute` — inner steps that keep only their inputs and rerun in the
  outer backward (``MAMLConfig.recompute``, NOTE [Recomputed inner steps]);
* :mod:`~mamlpp_ext.model.memory` — the step's memory: ``LiveBytes`` (a live-storage counter)
  and ``estimate_peak_memory`` (a configuration's peak, counted without allocating it);
* :mod:`~mamlpp_ext.model.meta_learner` — ``MAMLPlusPlus``: the learner's state and public API;
* :mod:`~mamlpp_ext.model.graph` — graph mode (the step captured as CUDA graphs);
* :mod:`~mamlpp_ext.model.compiled` — the compiled step (forward and backward traced and compiled
  by inductor, NOTE [Compiled step]).

Imports only :mod:`mamlpp_ext.ops` from the rest of the package.
"""

from .backends import BACKENDS, DEFAULT_BACKENDS, Execution, report_notes, resolve_execution
from .config import MAMLConfig, from_preset, preset_names
from .meta_learner import MAMLPlusPlus
from .step import DivergenceError

__all__ = ["BACKENDS", "DEFAULT_BACKENDS", "DivergenceError", "Execution", "MAMLConfig", "MAMLPlusPlus",
           "from_preset", "preset_names", "report_notes", "resolve_execution"]
