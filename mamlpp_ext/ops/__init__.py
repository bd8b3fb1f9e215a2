"""The ops layer of mamlpp_ext: the compiled operators and their pure-PyTorch twins.

* :mod:`mamlpp_ext.ops.lslr` — ``lslr_update``, the task-batched inner-loop update with learned
  per-layer, per-step rates (and its derivative ops ``_lslr_scale`` / ``_lslr_dot``);
* :mod:`mamlpp_ext.ops.batch_norm` — ``task_batch_norm``, per-step batch norm of task-batched
  activations with an optional fused LeakyReLU/ReLU;
* :mod:`mamlpp_ext.ops.task_conv` — ``task_conv2d``, T tasks' 2-D convolutions as one grouped
  convolution over task-major channels, every derivative (to any order) one grouped convolution;
* :mod:`mamlpp_ext.ops.reference` — the pure-PyTorch twin of every op, with the same contract
  (the semantic reference of the tests and the ops of the unfused backends).

Importing this package loads the compiled extension ``mamlpp_ext._C`` (which registers the
``torch.ops.mamlpp_ext.*`` schemas and kernels, ``csrc/``) and then registers the fake kernels and
autograd formulas. Without the extension, ``reference`` still works and ``lslr_update``,
``task_batch_norm`` and ``task_conv2d`` raise an error that says how to build it. This layer imports nothing from
the rest of the package.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch, which _C links against)

from . import reference  # noqa: F401

EXTENSION_ERROR: str | None = None
try:
    from .. import _C  # noqa: F401  (registers the operators)
except ImportError as exc:  # the package can be used without the kernels
    EXTENSION_ERROR = (
        f"the compiled extension mamlpp_ext._C could not be imported ({exc}); "
        "build it with `pip install --no-build-isolation .` (or `make build`)"
    )


def has_extension() -> bool:
    """True when the compiled operators are available."""
    return EXTENSION_ERROR is None


def cuda_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return EXTENSION_ERROR is None and int(torch.ops.mamlpp_ext._cuda_version()) > 0


def require_extension(what: str = "this feature") -> None:
    """Raise a RuntimeError that explains how to build the extension."""
    if EXTENSION_ERROR is not None:
        raise RuntimeError(f"{what} needs the compiled mamlpp_ext kernels, but {EXTENSION_ERROR}")


if EXTENSION_ERROR is None:
    from .batch_norm import task_batch_norm  # noqa: E402  (registers fakes and autograd)
    from .lslr import lslr_update  # noqa: E402
    from .task_conv import task_conv2d  # noqa: E402
else:
    def lslr_update(params, grads, lrs, step):  # noqa: D103  (same signature as ops.lslr.lslr_update)
        require_extension("mamlpp_ext.ops.lslr_update")

    def task_batch_norm(input, tasks, weight=None, bias=None, running_mean=None, running_var=None, **kw):  # noqa: D103
        require_extension("mamlpp_ext.ops.task_batch_norm")

    def task_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):  # noqa: D103
        require_extension("mamlpp_ext.ops.task_conv2d")

__all__ = ["cuda_built", "has_extension", "lslr_update", "reference", "require_extension", "task_batch_norm",
           "task_conv2d"]
