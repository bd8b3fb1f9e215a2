"""pytest parameters for the backends, read from the table (``mamlpp_ext.model.BACKENDS``), so a
backend added there is tested everywhere these are used."""

import pytest

import mamlpp_ext
from mamlpp_ext.model import BACKENDS

_needs_ext = pytest.mark.skipif(not mamlpp_ext.has_extension(), reason="compiled mamlpp_ext extension not built")


def backend_params(*, compiled: bool = True, per_task: bool = True) -> list:
    """Every backend name as a pytest parameter (those needing the extension skip without it).
    ``compiled=False`` leaves out the compiled backends; ``per_task=False`` the per-task ones."""
    out = []
    for name, impl in BACKENDS.items():
        if (impl.needs_extension and not compiled) or (impl.per_task and not per_task):
            continue
        out.append(pytest.param(name, marks=_needs_ext) if impl.needs_extension else name)
    return out
