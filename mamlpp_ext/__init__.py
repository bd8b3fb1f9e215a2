"""mamlpp_ext: fast MAML++ meta-learning for PyTorch.

Importing the package loads the compiled extension ``mamlpp_ext._C`` (which
registers the ``torch.ops.mamlpp_ext.*`` operators with the dispatcher) and then
``mamlpp_ext.ops`` (fake kernels and autograd formulas, registered from Python).

The pure-PyTorch parts (reference ops, network, meta-learner with the
``sequential`` and ``batched`` backends, data) work without the compiled
extension; ``has_extension()`` says whether it was found, and
``extension_error()`` why not.
"""

from __future__ import annotations

__version__ = "0.1.0"

import torch  # noqa: F401  (loads libtorch, which _C links against)

_EXTENSION_ERROR: str | None = None
try:
    from . import _C  # noqa: F401  (registers the operators)
except ImportError as exc:  # the package can be used without the kernels
    _EXTENSION_ERROR = (
        f"the compiled extension mamlpp_ext._C could not be imported ({exc}); "
        "build it with `pip install --no-build-isolation .` (or `make build`)"
    )

if _EXTENSION_ERROR is None:
    from . import ops  # noqa: F401,E402  (registers fake kernels and autograd)


def has_extension() -> bool:
    """True when the compiled operators are available."""
    return _EXTENSION_ERROR is None


def extension_error() -> str | None:
    """Why the compiled extension is unavailable, or None when it is loaded."""
    return _EXTENSION_ERROR


def require_extension(what: str = "this feature") -> None:
    """Raise a RuntimeError that explains how to build the extension."""
    if _EXTENSION_ERROR is not None:
        raise RuntimeError(f"{what} needs the compiled mamlpp_ext kernels, but {_EXTENSION_ERROR}")


def cuda_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    if _EXTENSION_ERROR is not None:
        return False
    import torch

    return int(torch.ops.mamlpp_ext._cuda_version()) > 0


def build_info() -> dict:
    """What was compiled: extension present, CUDA kernels built and the CUDA version."""
    if _EXTENSION_ERROR is not None:
        return {"extension": False, "cuda": False, "cuda_version": None, "error": _EXTENSION_ERROR}
    import torch

    v = int(torch.ops.mamlpp_ext._cuda_version())
    return {"extension": True, "cuda": v > 0, "cuda_version": (v // 1000, (v % 1000) // 10) if v > 0 else None}
