"""What a user's network was: a record kept with a run, checked when the run is used again.

A run trained with ``--network package.module:function`` stores only the import path in its
config; the function's code lives outside the run folder and may change. So the run also keeps
the network's *structure*, taken from what the function returns — for an ``nn.Module``, every
module of ``named_modules()``: its type, its hyperparameters (``extra_repr()`` and its public
scalar attributes: kernel, stride, pooling kind, slope, ...), its train/eval mode and the shapes
of its own parameters and buffers; for a ``TaskNetwork``, its type, weight names and shapes and
batch-norm layers. ``--resume`` and ``mamlpp-eval`` rebuild the network and refuse it, naming
what changed, when its structure differs from the record.

The record is read from the module the user's function returns, not from how the model layer
lifts it, so it works for any module the lifter accepts.
"""

from __future__ import annotations

import importlib
import math
from typing import Optional

__all__ = ["NetworkChangedError", "build_user_network", "check_user_network", "network_structure",
           "structure_diff", "user_network_record"]

_SCALARS = (bool, int, float, str, type(None))


class NetworkChangedError(ValueError):
    """The user's network is not the one a run was trained with."""


def is_user_network(network: str) -> bool:
    """Whether ``MAMLConfig.network`` names a function of the user's ("package.module:function")."""
    return isinstance(network, str) and ":" in network


def build_user_network(source: str, config):
    """Import ``source`` ("package.module:function") and call it with ``config``; errors name
    ``--network`` and, for an import that fails, where the module is looked for."""
    module_name, _, func_name = source.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--network {source}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}). "
                         f"It is imported from the current folder and PYTHONPATH: run the command from the folder "
                         f"that holds it, or add that folder to PYTHONPATH") from None
    func = getattr(module, func_name, None)
    if func is None or not callable(func):
        where = getattr(module, "__file__", None) or module_name
        raise ValueError(f"--network {source}: module {module_name!r} ({where}) has no function {func_name!r}")
    try:
        net = func(config)
    except Exception as exc:  # noqa: BLE001  (the user's code)
        raise ValueError(f"--network {source}: calling {func_name}(config) failed: "
                         f"{type(exc).__name__}: {exc}") from exc
    from torch import nn

    from ..model.network import TaskNetwork

    if not isinstance(net, (nn.Module, TaskNetwork)):
        raise ValueError(f"--network {source}: {func_name}(config) returned a {type(net).__name__}; expected an "
                         f"nn.Module of standard layers or a mamlpp_ext TaskNetwork (docs/networks.md)")
    return net


def _value(v):
    """``v`` in types a checkpoint loaded with ``weights_only=True`` and JSON both keep, or None."""
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, _SCALARS):
        return v
    if isinstance(v, (tuple, list)) and all(isinstance(x, _SCALARS) for x in v):
        return list(v)
    return None


def network_structure(net) -> list[dict]:
    """The structure record of ``net`` (an ``nn.Module`` or a ``TaskNetwork``): one dict per
    module with ``name``, ``type`` (qualified class name), ``config`` (``extra_repr()``),
    ``attributes`` (public scalar attributes), ``training`` and the shapes of its own
    ``params`` and ``buffers``."""
    from torch import nn

    rows = []
    if isinstance(net, nn.Module):
        for name, m in net.named_modules():
            attrs = {}
            for k, v in sorted(vars(m).items()):
                if k.startswith("_") or k == "training":
                    continue
                val = _value(v)
                if val is not None or v is None:
                    attrs[k] = val
            rows.append({"name": name, "type": f"{type(m).__module__}.{type(m).__qualname__}",
                         "config": m.extra_repr(), "attributes": attrs, "training": bool(m.training),
                         "params": {k: list(p.shape) for k, p in m.named_parameters(recurse=False)},
                         "buffers": {k: list(b.shape) for k, b in m.named_buffers(recurse=False) if b is not None}})
        return rows
    bn = [{k: _value(v) for k, v in layer._asdict().items() if not k.endswith("_init")}
          for layer in getattr(net, "bn_layers", [])]
    rows.append({"name": "", "type": f"{type(net).__module__}.{type(net).__qualname__}", "config": "",
                 "attributes": {"num_classes": _value(getattr(net, "num_classes", None)), "bn_layers": bn},
                 "training": False,
                 "params": {n: list(s) for n, s in zip(getattr(net, "weight_names", []),
                                                      getattr(net, "weight_shapes", []))},
                 "buffers": {}})
    return rows


def user_network_record(config) -> Optional[dict]:
    """``{"source", "structure"}`` of the network ``config.network`` names when it is the user's
    ("package.module:function"); None for the package's own networks."""
    if not is_user_network(config.network):
        return None
    net = build_user_network(config.network, config)
    return {"source": config.network, "structure": network_structure(net)}


def _short(row: dict) -> str:
    return f"{row['type'].rsplit('.', 1)[-1]}({row['config']})"


def structure_diff(old: list[dict], new: list[dict], limit: int = 3) -> list[str]:
    """What differs between two structure records, one phrase per module (at most ``limit``,
    then a count)."""
    by_old = {r["name"]: r for r in old}
    by_new = {r["name"]: r for r in new}
    names = list(by_old) + [n for n in by_new if n not in by_old]
    out = []
    for name in names:
        label = f"layer {name!r}" if name else "the network itself"
        a, b = by_old.get(name), by_new.get(name)
        if b is None:
            out.append(f"{label} ({_short(a)}) is gone")
        elif a is None:
            out.append(f"{label} ({_short(b)}) is new")
        elif a["type"] != b["type"] or a["config"] != b["config"]:
            out.append(f"{label} was {_short(a)}, now {_short(b)}")
        elif a["attributes"] != b["attributes"]:
            keys = sorted(k for k in set(a["attributes"]) | set(b["attributes"])
                          if a["attributes"].get(k) != b["attributes"].get(k))
            out.append(f"{label} ({_short(b)}): " + ", ".join(
                f"{k} was {a['attributes'].get(k)!r}, now {b['attributes'].get(k)!r}" for k in keys))
        elif a["params"] != b["params"] or a["buffers"] != b["buffers"]:
            out.append(f"{label} ({_short(b)}): parameter/buffer shapes were {a['params']} {a['buffers']}, "
                       f"now {b['params']} {b['buffers']}")
        elif a["training"] != b["training"]:
            out.append(f"{label} ({_short(b)}) was in {'training' if a['training'] else 'eval'} mode, now in "
                       f"{'training' if b['training'] else 'eval'} mode")
    if len(out) > limit:
        out = out[:limit] + [f"and {len(out) - limit} more difference(s)"]
    return out


def check_user_network(record: Optional[dict], config, what: str) -> None:
    """Refuse (``NetworkChangedError``) when the network ``config.network`` builds now is not the
    one ``record`` (a run's ``user_network_record``) describes. ``what``: the run or checkpoint,
    for the message. Nothing to check for the package's own networks or a record-less run."""
    if record is None or not is_user_network(config.network):
        return
    now = network_structure(build_user_network(config.network, config))
    diff = structure_diff(record["structure"], now)
    if diff:
        raise NetworkChangedError(
            f"--network {config.network}: the network it builds now is not the one {what} was trained with: "
            f"{'; '.join(diff)}. Restore the function as it was, or train a new run")
