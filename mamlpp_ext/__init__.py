"""mamlpp_ext: fast MAML++ meta-learning for PyTorch.

The package has four layers; imports point down only (application → model → ops; data stands
beside the model and is used by the application):

* :mod:`mamlpp_ext.ops` — the compiled operators (``lslr_update``, ``task_batch_norm``,
  ``task_conv2d``), their fake kernels and autograd, and their pure-PyTorch twins
  (``ops.reference``);
* :mod:`mamlpp_ext.model` — ``MAMLConfig`` and the presets, the MAML++ schedules, task-batched
  networks (the VGG net of the paper, or any ``nn.Sequential`` of standard layers) and the
  ``MAMLPlusPlus`` meta-learner with its backends;
* :mod:`mamlpp_ext.data` — Omniglot, mini-ImageNet, episode streams, the one-shot benchmark;
* :mod:`mamlpp_ext.training` — the trainer, checkpoints, scoring, distributed training and the
  ``mamlpp-train`` / ``mamlpp-eval`` / ``mamlpp-plot`` commands.

Importing the package loads the compiled extension when it was built; without it the
``sequential`` and ``batched`` backends and everything else in pure Python work, and
``extension_error()`` says why the kernels are missing.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import ops
from .model import MAMLConfig, MAMLPlusPlus, from_preset, preset_names  # noqa: E402
from .ops import has_extension, require_extension  # noqa: E402


def extension_error() -> str | None:
    """Why the compiled extension is unavailable, or None when it is loaded."""
    return ops.EXTENSION_ERROR


from .ops import cuda_built  # noqa: E402


def build_info() -> dict:
    """What was compiled: extension present, CUDA kernels built and the CUDA version."""
    if not has_extension():
        return {"extension": False, "cuda": False, "cuda_version": None, "error": ops.EXTENSION_ERROR}
    import torch

    v = int(torch.ops.mamlpp_ext._cuda_version())
    return {"extension": True, "cuda": v > 0, "cuda_version": (v // 1000, (v % 1000) // 10) if v > 0 else None}


__all__ = ["MAMLConfig", "MAMLPlusPlus", "__version__", "build_info", "cuda_built", "extension_error",
           "from_preset", "has_extension", "preset_names", "require_extension"]
