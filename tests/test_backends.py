"""The one place that decides what runs (model/backends.py): ``resolve_execution`` for every
backend in ``BACKENDS``, the measured default table, fallbacks with their notes, errors naming
the argument, and the learner, ``from_state_dict``, the trainer and the CLIs asking it."""

from __future__ import annotations

import pytest
import torch

import mamlpp_ext
from mamlpp_ext import ops
from mamlpp_ext.model import BACKENDS, DEFAULT_BACKENDS, MAMLConfig, MAMLPlusPlus, resolve_execution
from mamlpp_ext.model import backends as B

CPU = torch.device("cpu")


def tiny() -> MAMLConfig:
    return MAMLConfig(ways=3, shots=1, queries=1, meta_batch=2, image_height=16, image_width=16, num_filters=4,
                      inner_steps=2)


def runnable(name: str, device=CPU) -> bool:
    return B.backend_unavailable(name, torch.device(device)) is None


@pytest.fixture
def no_extension(monkeypatch):
    monkeypatch.setattr(ops, "has_extension", lambda: False)
    monkeypatch.setattr(ops, "EXTENSION_ERROR", "it was not built (test)")


@pytest.mark.parametrize("name", list(BACKENDS))
def test_a_named_backend_runs_as_asked_or_fails_saying_why(name):
    if runnable(name):
        assert resolve_execution("cpu", "omniglot", name) == (name, False, (), False)
        assert MAMLPlusPlus(tiny(), backend=name).backend == name
    else:
        with pytest.raises(RuntimeError, match=f"backend={name!r} needs the compiled"):
            resolve_execution("cpu", "omniglot", name)


def test_the_default_table():
    # every entry names a real backend, for each device type and dataset the presets use
    assert set(DEFAULT_BACKENDS.values()) <= set(BACKENDS)
    assert {t for t, _ in DEFAULT_BACKENDS} == {"cpu", "cuda"}
    for (dev, dataset), want in DEFAULT_BACKENDS.items():
        if dev == "cpu":
            ex = resolve_execution(dev, dataset)
            assert ex.backend == (want if runnable(want) else "batched")
            assert bool(ex.notes) == (not runnable(want))
    # a dataset without a measurement takes the fallback
    assert resolve_execution("cpu", "no-such-dataset").backend == (B._FALLBACK_BACKEND if runnable(
        B._FALLBACK_BACKEND) else "batched")


def test_an_unrunnable_default_falls_back_with_a_note(no_extension, monkeypatch):
    monkeypatch.setitem(DEFAULT_BACKENDS, ("cpu", "omniglot"), "fused")
    ex = resolve_execution("cpu", "omniglot")
    assert ex.backend == "batched" and len(ex.notes) == 1 and "backend='fused' needs the compiled" in ex.notes[0]
    monkeypatch.setitem(DEFAULT_BACKENDS, ("cpu", "omniglot"), "sequential")
    assert resolve_execution("cpu", "omniglot") == ("sequential", False, (), False)


def test_a_named_compiled_backend_without_kernels_is_an_error(no_extension):
    with pytest.raises(RuntimeError, match="backend='fused' needs the compiled mamlpp_ext kernels.*"
                                           "use backend='sequential' or 'batched'"):
        resolve_execution("cpu", "omniglot", "fused")
    with pytest.raises(RuntimeError, match="backend='fused' needs the compiled"):
        MAMLPlusPlus(tiny(), backend="fused")


@pytest.mark.skipif(not mamlpp_ext.has_extension(), reason="compiled mamlpp_ext extension not built")
def test_fused_on_cuda_needs_the_cuda_kernels(monkeypatch):
    monkeypatch.setattr(ops, "cuda_built", lambda: False)
    with pytest.raises(RuntimeError, match="needs the CUDA kernels"):
        resolve_execution("cuda", "omniglot", "fused")
    ex = resolve_execution("cuda", "omniglot")  # the default (fused on CUDA) falls back
    assert ex.backend == "batched" and "needs the CUDA kernels" in ex.notes[0]


def test_stored_backend_is_used_when_it_can_run(no_extension):
    assert resolve_execution("cpu", "omniglot", stored_backend="sequential").backend == "sequential"
    ex = resolve_execution("cpu", "omniglot", stored_backend="fused")
    assert ex.backend == "batched" and "instead of the stored one" in ex.notes[0]
    ex = resolve_execution("cpu", "omniglot", stored_backend="warp")
    assert ex.backend == "batched" and "'warp' is unknown" in ex.notes[0]
    # a name asked for wins over the stored one
    assert resolve_execution("cpu", "omniglot", "sequential", stored_backend="batched").backend == "sequential"


def test_graph_mode_on_cpu():
    with pytest.raises(ValueError, match="graph mode needs a CUDA device"):
        resolve_execution("cpu", "omniglot", "batched", True)
    ex = resolve_execution("cpu", "omniglot", "batched", "auto")
    assert ex == ("batched", False, ("graph mode off: graph mode needs a CUDA device (CUDA graphs); this learner "
                                     "is on cpu",), False)
    for bad in ("on", 1, None, "yes"):
        with pytest.raises(ValueError, match="graph must be False, True or 'auto'"):
            resolve_execution("cpu", "omniglot", "batched", bad)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_graph_support_per_backend_on_cuda(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    why = B.graph_support(torch.device("cuda"), name)
    assert (why is None) == (not BACKENDS[name].per_task)
    if BACKENDS[name].per_task:
        assert "runs the tasks one by one" in why


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="unknown backend 'jax'; expected one of " + ", ".join(BACKENDS)):
        resolve_execution("cpu", "omniglot", "jax")


def test_learner_records_what_runs_and_switches_through_the_resolver(no_extension):
    learner = MAMLPlusPlus(tiny(), backend="sequential")
    assert learner.execution == ("sequential", False, (), False)
    learner.backend = "batched"
    assert learner.backend == "batched" and learner.execution.backend == "batched"
    with pytest.raises(RuntimeError, match="needs the compiled"):
        learner.backend = "fused"
    with pytest.raises(ValueError, match="unknown backend"):
        learner.backend = "jax"
    assert learner.backend == "batched"


def test_from_state_dict_falls_back_from_an_unrunnable_stored_backend(no_extension, capsys, monkeypatch):
    monkeypatch.setattr(B, "_REPORTED", set())
    state = MAMLPlusPlus(tiny(), backend="batched").state_dict()
    state["backend"] = "fused"  # saved on a machine with the kernels
    learner = MAMLPlusPlus.from_state_dict(state)
    assert learner.backend == "batched"
    assert "instead of the stored one" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="needs the compiled"):
        MAMLPlusPlus.from_state_dict(state, backend="fused")


def test_cli_errors_name_the_flag():
    from mamlpp_ext.training.trainer import resolve_run_execution

    with pytest.raises(ValueError, match="^--backend: unknown backend 'turbo'"):
        resolve_run_execution(CPU, "omniglot", "turbo", False)
    with pytest.raises(ValueError, match="^--graph: graph mode needs a CUDA device"):
        resolve_run_execution(CPU, "omniglot", "batched", True)
