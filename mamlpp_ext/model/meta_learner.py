"""The MAML++ meta-learner (SPEC §3): a small core and a table of backends.

``MAMLPlusPlus`` holds the meta-parameters — θ₀ (the K fast-weight tensors of the network), the
LSLR rates (K', R) and per-BN-layer γ/β (R_w, C) — the per-step BN running statistics (R_s, C),
and the Adam outer optimiser with per-epoch cosine annealing. It runs the inner loop with MSL,
DA, BNRS, BNWB and LSLR, each of which can be switched off (all off is plain MAML). The network
is the paper's VGG net, a user's ``nn.Sequential`` (lifted by ``network.SequentialNet``) or any
``network.TaskNetwork``.

What runs the step — the backend (``BACKENDS``: sequential, batched, fused) and the modes (eager or
CUDA graph; op by op or compiled) — is decided by ``backends.resolve_execution``; what the step does is in step.py
(NOTE [Step interface]): this module holds the learner's state and its public API.

NOTE [Rows beyond S]
    With S training steps, the per-step tensors have S rows (or 1 when the component is off).
    Evaluation may run more inner steps than S; step i then uses row min(i, rows − 1) of the
    LSLR rates, BN γ/β and BN running statistics, i.e. every step from S−1 on reuses row S−1.

NOTE [Running statistics, sequential vs batched]
    Each forward in training mode updates the running-statistics row of its step with momentum
    m (the layer's, 0.1 in the presets): r ← (1−m)·r + m·s, where s is the batch mean or the
    unbiased batch variance. The sequential backend does this once per task per forward, task
    after task, as the public code does. The batched backends do it once per forward for the
    whole meta-batch, with s the mean over tasks of the per-task statistic. Because the update
    is linear in s and the batch statistics do not depend on the running ones, the batched
    result equals the mean over tasks of what the sequential backend gives when each task is
    run alone from the same starting statistics; with T = 1 the two agree exactly. Outputs never
    depend on the difference unless ``bn_eval_stats == "running"``.

NOTE [Evaluation and running statistics]
    ``evaluate``, ``adapt`` and ``predict`` never build second-order graphs and never change the
    learner's state. With ``bn_eval_stats == "batch"`` (the public code's behaviour) they
    normalise with batch statistics and do not update the running statistics (the public code
    updates them and then means to restore a backup — a shallow copy, so it restores nothing;
    outputs are the same either way); with ``"running"`` they normalise with the per-step
    running statistics.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .backends import BACKENDS, Backend, report_notes, resolve_execution
from .compiled import CompiledStep
from .config import MAMLConfig, from_preset
from .graph import GraphRunner
from .network import NETWORKS, LiftedNet, TaskNetwork, VGGNet
from .schedules import epoch_plan, meta_lr_at
from .step import DivergenceError, MetaStep, OuterOptimizer

__all__ = ["BACKENDS", "Backend", "DivergenceError", "MAMLPlusPlus", "build_network"]

_STATE_FORMAT = "mamlpp_ext.MAMLPlusPlus/1"


def build_network(config: MAMLConfig, network=None) -> TaskNetwork:
    """The network a learner runs: ``network`` (an ``nn.Module`` of standard layers or a
    ``TaskNetwork``) when given, else the one ``config.network`` names (a built-in of
    ``network.NETWORKS``, or "package.module:function" called with the config). Its output size
    must be ``config.ways``."""
    source = "network"
    if network is None:
        if config.network in NETWORKS:
            return NETWORKS[config.network].build(config)
        if config.network == "custom":
            raise ValueError("MAMLConfig.network='custom': the network was handed to the learner as an object; "
                             "pass the same network= to rebuild the learner")
        source = f"MAMLConfig.network={config.network!r}"
        module_name, _, func_name = config.network.partition(":")
        try:
            func = getattr(importlib.import_module(module_name), func_name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"{source}: cannot import it ({type(exc).__name__}: {exc})") from None
        network = func(config)
    if isinstance(network, nn.Module):
        network = LiftedNet(network, config.image_shape)
    if not isinstance(network, TaskNetwork):
        raise TypeError(f"{source}: expected an nn.Module or a mamlpp_ext.model.network.TaskNetwork, got "
                        f"{type(network).__name__}")
    network.check_input_shape(config.image_shape)
    if network.num_classes != config.ways:
        raise ValueError(f"{source}: the network has {network.num_classes} outputs but the config has "
                         f"ways={config.ways}")
    return network


class MAMLPlusPlus:
    """A MAML++ meta-learner.

    Args:
        config: a ``MAMLConfig`` or a preset name (see ``config.preset_names()``).
        backend: "sequential", "batched" or "fused" (``BACKENDS``), or None: the measured default
            for the device and ``config.dataset`` (``backends.resolve_execution``, which also
            decides ``graph``; ``execution`` records what it chose and why).
        device, dtype: where and in which floating type the meta-parameters live.
        network: None (the network ``config.network`` names: the VGG net by default), an
            ``nn.Sequential`` of standard layers (docs/networks.md) or a ``TaskNetwork``. Its
            input is ``config.image_shape`` and its output size must be ``config.ways``; the
            learner's config then records ``network="custom"``.
        graph: CUDA-graph mode (NOTE [Graph mode] in graph.py): False (eager), True (capture the
            training step and evaluation; raises when the device or backend cannot), or "auto"
            (graph mode when it can run, else eager with one line on stderr saying why).
        compile: the compiled training step (NOTE [Compiled step] in compiled.py): False (op by
            op), True (forward and backward traced and compiled once per capture key; raises
            when it cannot run here) or "auto" (compiled where it can run, else op by op with a
            note). Evaluation stays op by op.

    State (K fast-weight tensors of the network; K' = K, or K + 2 per affine BN layer with
    ``adapt_bn_affine``; S = inner_steps; C = a BN layer's channels):

    * ``theta``: K leaf tensors, θ₀ (``net.weight_shapes``).
    * ``lslr``: (K', S) rates, or (K', 1) without ``per_step_inner_lr``; a leaf that requires
      grad iff ``learnable_inner_lr``. Initialised to ``inner_lr``; never clamped.
    * ``bn_weight`` / ``bn_bias``: per BN layer (S, C), or (1, C) without
      ``per_step_bn_weights``; None for a layer without affine.
    * ``running_mean`` / ``running_var``: per BN layer (S, C), or (1, C) without
      ``per_step_bn_statistics``; None for a layer that keeps no running statistics.
    * ``optimizer``: Adam over θ₀, BN γ/β and (if learnable) the LSLR rates; its learning rate
      is set per epoch by CA. ``outer`` wraps it (plain or capturable mode, NOTE [Outer optimiser
      modes] in step.py).

    The step itself — inner loop, meta-loss, outer update — is ``step`` (a ``step.MetaStep``,
    NOTE [Step interface]; a ``compiled.CompiledStep`` in compiled mode); ``graph`` is the
    graph-mode runner or None.
    """

    def __init__(self, config: MAMLConfig | str, backend: Optional[str] = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 network=None, graph: bool | str = False, compile: bool | str = False) -> None:
        if isinstance(config, str):
            config = from_preset(config)
        if not isinstance(config, MAMLConfig):
            raise TypeError(f"config must be a MAMLConfig or a preset name, got {type(config).__name__}")
        config.validate()
        if network is not None and config.network != "custom":
            config = config.replace(network="custom")  # recorded in state_dict(): rebuild with network=
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        if not (graph is True or graph is False or (isinstance(graph, str) and graph in ("auto", "check"))):
            raise ValueError(f"graph must be False, True or 'auto', got {graph!r}")
        self.config = config
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        # "check": eager steps with the capturable optimizer state, no runner (graph.check_capturable)
        self.execution = resolve_execution(self.device, config.dataset, backend, False if graph == "check" else graph,
                                           compile=compile, recompute=config.recompute)
        report_notes(self.execution.notes)
        self.backend_impl: Backend = BACKENDS[self.execution.backend]
        self.net = build_network(config, network)
        self.net.use_backend_layout(self.backend_impl.conv_layout)
        self.bn_layers = list(self.net.bn_layers)
        if config.bn_eval_stats == "running" and not all(b.track_running_stats for b in self.bn_layers):
            raise ValueError("bn_eval_stats='running' needs running statistics in every BN layer, but "
                             f"{[b.name for b in self.bn_layers if not b.track_running_stats]} keep none "
                             "(track_running_stats=False)")
        if config.adapt_bn_affine and not all(b.affine for b in self.bn_layers):
            raise ValueError("adapt_bn_affine=True needs BN layers with affine=True, but "
                             f"{[b.name for b in self.bn_layers if not b.affine]} have none")

        g = torch.Generator().manual_seed(config.seed)
        dev, dt = self.device, dtype
        self.theta: list[Tensor] = [t.requires_grad_()
                                    for t in self.net.init_weights(generator=g, dtype=dt, device=dev)]
        S = config.inner_steps
        rows_w = S if config.per_step_bn_weights else 1
        rows_s = S if config.per_step_bn_statistics else 1

        def table(init: Optional[Tensor], rows: int, grad: bool) -> Optional[Tensor]:
            if init is None:
                return None
            return init.to(device=dev, dtype=dt).repeat(rows, 1).requires_grad_(grad)

        self.bn_weight = [table(b.weight_init, rows_w, True) for b in self.bn_layers]
        self.bn_bias = [table(b.bias_init, rows_w, True) for b in self.bn_layers]
        self.running_mean = [table(b.mean_init, rows_s, False) for b in self.bn_layers]
        self.running_var = [table(b.var_init, rows_s, False) for b in self.bn_layers]
        rows_lr = S if config.per_step_inner_lr else 1
        self.lslr = torch.full((len(self.fast_weight_names), rows_lr), float(config.inner_lr), dtype=dt, device=dev,
                               requires_grad=config.learnable_inner_lr)
        capturable = graph == "check" or self.execution.graph
        self.outer = OuterOptimizer(self.parameters(), meta_lr_at(config, 0), self.device, capturable)
        self.optimizer: torch.optim.Adam = self.outer.optimizer
        self.step = CompiledStep(self) if self.execution.compiled else MetaStep(self)
        self.graph: Optional[GraphRunner] = GraphRunner(self) if self.execution.graph else None
        self.last_epoch: Optional[int] = None
        self.meta_steps_done = 0
        # NOTE [Cross-process mean]: when set (training.distributed), meta_step calls it once per
        # step, after the backward and before the gradient clamp and the Adam step, with every
        # meta-gradient, every running-statistics buffer and a float vector of step metrics; it
        # must replace each by its mean over the processes, in place (one flat all-reduce).
        self.cross_process_mean: Optional[Callable[[list[Tensor]], None]] = None

    # ------------------------------------------------------------- accessors
    @property
    def backend(self) -> str:
        """The backend's name; assign another name to switch (the state is shared by all backends)."""
        return self.backend_impl.name

    @backend.setter
    def backend(self, name: str) -> None:
        graph = self.graph is not None
        compiled = self.execution.compiled
        try:
            execution = resolve_execution(self.device, self.config.dataset, name, graph, compile=compiled,
                                          recompute=self.config.recompute)
        except ValueError as exc:
            if not (graph or compiled) or name not in BACKENDS:
                raise
            mode = "graph-mode" if graph else "compiled"
            raise ValueError(f"cannot switch a {mode} learner to backend {name!r}: {exc}") from None
        self.execution = execution
        self.backend_impl = BACKENDS[name]
        self.net.use_backend_layout(self.backend_impl.conv_layout)
        if graph:
            self.graph.reset()  # the captured graphs run the old backend's ops

    def parameters(self) -> list[Tensor]:
        """Meta-learned tensors, in optimiser order: θ₀, then γ/β per affine BN layer, then LSLR (if learnable)."""
        ps = list(self.theta)
        for w, b in zip(self.bn_weight, self.bn_bias):
            if w is not None:
                ps += [w, b]
        if self.config.learnable_inner_lr:
            ps.append(self.lslr)
        return ps

    def named_parameters(self) -> list[tuple[str, Tensor]]:
        """(name, tensor) pairs in the order of ``parameters()``."""
        names = list(self.net.weight_names)
        for layer in self.bn_layers:
            if layer.affine:
                names += [f"{layer.name}.weight", f"{layer.name}.bias"]
        if self.config.learnable_inner_lr:
            names.append("lslr")
        return list(zip(names, self.parameters()))

    @property
    def fast_weight_names(self) -> list[str]:
        """Names of the K' fast-weight tensors (rows of ``lslr``)."""
        names = list(self.net.weight_names)
        if self.config.adapt_bn_affine:
            for layer in self.bn_layers:
                names += [f"{layer.name}.weight", f"{layer.name}.bias"]
        return names

    @property
    def running_stats(self) -> list[Tensor]:
        """Every running-statistics buffer: the means, then the variances (None entries left out)."""
        return [t for t in self.running_mean + self.running_var if t is not None]

    def meta_lr(self, epoch: int) -> float:
        """The Adam learning rate used at ``epoch`` (CA)."""
        return meta_lr_at(self.config, epoch)

    # ------------------------------------------------------------ validation
    def _check_batch(self, x: Tensor, y: Optional[Tensor], xname: str, yname: str,
                     num_tasks: Optional[int] = None, move: bool = True) -> tuple[Tensor, Optional[Tensor]]:
        """Validate images x (T, B, C, H, W) and labels y (T, B) (label range read where y lives);
        return them in the learner's dtype, on its device when ``move`` (else where they are)."""
        cfg = self.config
        if not isinstance(x, Tensor):
            raise TypeError(f"{xname} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 5:
            raise ValueError(f"{xname} must have shape (T, N·K, C, H, W), got {tuple(x.shape)}")
        T, B, C, H, W = x.shape
        if T < 1 or B < 1:
            raise ValueError(f"{xname} must hold at least one task and one image per task, got {tuple(x.shape)}")
        if C != cfg.image_channels:
            raise ValueError(f"{xname} has {C} channels but the network expects image_channels="
                             f"{cfg.image_channels} (shape {tuple(x.shape)})")
        if (H, W) != (cfg.image_height, cfg.image_width):
            raise ValueError(f"{xname} has images of {H}x{W} but the network expects "
                             f"{cfg.image_height}x{cfg.image_width} (shape {tuple(x.shape)})")
        if not (x.dtype.is_floating_point or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32,
                                                          torch.int64)):
            raise TypeError(f"{xname} must hold real numbers, got dtype {x.dtype}")
        if num_tasks is not None and T != num_tasks:
            raise ValueError(f"{xname} has {T} tasks but the support set has {num_tasks}")
        x = x.to(device=self.device if move else x.device, dtype=self.dtype)
        if y is None:
            return x, None
        if not isinstance(y, Tensor):
            raise TypeError(f"{yname} must be a torch.Tensor, got {type(y).__name__}")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise TypeError(f"{yname} must hold integer class labels, got dtype {y.dtype}")
        if tuple(y.shape) != (T, B):
            raise ValueError(f"{yname} must have shape (T, N·K) = {(T, B)} to match {xname}, got {tuple(y.shape)}")
        lo, hi = torch.aminmax(y)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= cfg.ways:
            raise ValueError(f"{yname} holds labels in [{lo}, {hi}] but must be in [0, {cfg.ways - 1}] "
                             f"(ways={cfg.ways})")
        return x, y.to(device=self.device if move else y.device, dtype=torch.int64)

    def _check_inputs(self, support_x, support_y, query_x, query_y, move: bool = True):
        sx, sy = self._check_batch(support_x, support_y, "support_x", "support_y", move=move)
        qx, qy = self._check_batch(query_x, query_y, "query_x", "query_y", num_tasks=sx.shape[0], move=move)
        return sx, sy, qx, qy

    @staticmethod
    def _check_epoch(epoch) -> int:
        if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or epoch != int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        return int(epoch)

    @staticmethod
    def _check_steps(steps, name: str = "steps") -> int:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{name} must be a positive int, got {steps!r}")
        return steps

    # -------------------------------------------------------------- training
    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                  epoch: int) -> tuple[Tensor, dict]:
        """The MAML++ meta-batch loss at ``epoch``, with its graph to the meta-parameters.

        support_x: (T, N·K, C, H, W); support_y: (T, N·K) int labels in [0, ways);
        query_x: (T, Q, C, H, W); query_y: (T, Q). Updates the running statistics as a
        training forward does. Returns (loss: scalar tensor, info dict with
        ``task_losses`` (T,), ``task_accuracies`` (T,), ``query_logits`` (T, Q, ways),
        ``loss_weights`` (list of S floats), ``second_order`` (bool)).
        """
        epoch = self._check_epoch(epoch)
        batch = self._check_inputs(support_x, support_y, query_x, query_y)
        return self.step.meta_loss(*batch, epoch_plan(self.config, epoch))

    def meta_step(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                  epoch: int) -> dict:
        """One outer step: meta loss, backward, optional gradient clamp, Adam step at the CA rate of ``epoch``.

        Shapes as in ``meta_loss``. Returns a dict: ``loss`` (float, the meta-batch loss),
        ``accuracy`` (float, mean final query accuracy) — both averaged over the processes when
        ``cross_process_mean`` is set — ``task_accuracies`` (list of this process's T floats),
        ``loss_weights`` (list of S floats), ``meta_lr`` (float), ``second_order`` (bool),
        ``epoch`` (int). Reads the metrics back to the host: ``train_step`` does not.

        Raises ``DivergenceError`` when the meta-loss or a meta-gradient is not finite; the
        step is then not applied (weights, Adam's state and running statistics as before it;
        NOTE [Divergence guard] in step.py) and the learner can go on with other batches.
        """
        epoch = self._check_epoch(epoch)
        plan = epoch_plan(self.config, epoch)
        stats = self.train_step(support_x, support_y, query_x, query_y, epoch).tolist()
        if not math.isfinite(stats[0]):
            self.clear_divergence()
            raise DivergenceError(
                f"meta_step(epoch={epoch}): the meta-loss or a meta-gradient is not finite, so the step was not "
                f"applied (weights, Adam's state and running statistics are as before it; {self.meta_steps_done} "
                f"meta-steps done). Check the batch for NaN/inf values, or lower inner_lr or meta_lr, or set "
                f"grad_clamp")
        return dict(loss=stats[0], accuracy=stats[1], task_accuracies=stats[2:], loss_weights=plan.loss_weights,
                    meta_lr=plan.meta_lr, second_order=plan.second_order, epoch=epoch)

    def train_step(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                   epoch: int) -> Tensor:
        """``meta_step`` without reading anything back: returns a device tensor [loss, accuracy,
        T task accuracies] (in graph mode, valid until the next step). Inputs are validated on
        their own device before any state changes: pass CPU labels (as the data loaders give)
        to keep the step free of host syncs.

        A step whose meta-loss or a meta-gradient is not finite is dropped on the device and
        reports NaN metrics; so does every later step until ``clear_divergence()``, which keeps
        the learner as it was before the first bad step until the caller reads the metrics
        (NOTE [Divergence guard] in step.py)."""
        epoch = self._check_epoch(epoch)
        graph = self.graph is not None
        batch = self._check_inputs(support_x, support_y, query_x, query_y, move=not graph)
        plan = epoch_plan(self.config, epoch)
        self.outer.set_lr(plan.meta_lr)
        self.last_epoch = epoch
        out = self.graph.train_step(batch, plan) if graph else self.step.train_step(*batch, plan)
        self.meta_steps_done += 1
        return out

    def diverged(self) -> bool:
        """Whether a step was dropped by the divergence guard since the last ``clear_divergence``
        (reads a device flag: a host sync)."""
        return bool(self.step.nonfinite.item())

    def clear_divergence(self) -> int:
        """Let training go on after dropped steps: resets the guard's flag and returns how many
        steps it dropped (they no longer count in ``meta_steps_done``)."""
        dropped = int(self.step.dropped.item())
        self.meta_steps_done -= dropped
        self.step.clear_nonfinite()
        return dropped

    # ------------------------------------------------------------ evaluation
    def _eval_steps(self, steps: Optional[int]) -> int:
        return self.config.eval_inner_steps if steps is None else self._check_steps(steps)

    def evaluate(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Optional[Tensor] = None,
                 steps: Optional[int] = None) -> dict:
        """Adapt to each task and score its query set; leaves the learner's state unchanged.

        support_x: (T, N·K, C, H, W); support_y: (T, N·K); query_x: (T, Q, C, H, W);
        query_y: (T, Q) or None. ``steps`` defaults to ``eval_inner_steps`` (may exceed
        ``inner_steps``, NOTE [Rows beyond S]). First-order inner loop, final-step loss only,
        BN per ``bn_eval_stats`` (NOTE [Evaluation and running statistics]).
        Returns ``logits`` (T, Q, ways) and, with query_y, ``task_accuracies`` (T,),
        ``task_losses`` (T,), ``accuracy`` (float), ``loss`` (float).
        """
        steps = self._eval_steps(steps)
        sx, sy = self._check_batch(support_x, support_y, "support_x", "support_y")
        qx, qy = self._check_batch(query_x, query_y, "query_x", "query_y", num_tasks=sx.shape[0])
        if self.graph is not None:
            task_losses, q_logits = self.graph.evaluate(sx, sy, qx, qy, steps)
        else:
            task_losses, q_logits, _ = self.step.eval_body(sx, sy, qx, qy, steps)
        out: dict = dict(logits=q_logits.detach())
        if qy is not None:
            acc = (out["logits"].argmax(-1) == qy).to(self.dtype).mean(-1)
            task_losses = task_losses.detach()
            out.update(task_accuracies=acc, task_losses=task_losses, accuracy=float(acc.mean()),
                       loss=float(task_losses.mean()))
        return out

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: Optional[int] = None) -> dict[str, Tensor]:
        """Fast weights after ``steps`` inner updates on each task's support set (evaluation rules).

        support_x: (T, N·K, C, H, W); support_y: (T, N·K). Returns {name: (T, *shape)} for
        ``fast_weight_names`` (detached). The learner's state is unchanged.
        """
        steps = self._eval_steps(steps)
        sx, sy = self._check_batch(support_x, support_y, "support_x", "support_y")
        _, _, fast = self.step.eval_body(sx, sy, None, None, steps)
        return {name: t.detach() for name, t in zip(self.fast_weight_names, fast)}

    def predict(self, x: Tensor, fast_weights: dict[str, Tensor], bn_step: Optional[int] = None) -> Tensor:
        """Logits (T, B, ways) of images x (T, B, C, H, W) under per-task ``fast_weights`` from ``adapt``.

        BN uses row ``bn_step`` (default ``eval_inner_steps − 1``, the row of the query forward
        after the last update; NOTE [Rows beyond S]) with the ``bn_eval_stats`` rule; the running
        statistics are left unchanged.
        """
        x, _ = self._check_batch(x, None, "x", "")
        bn_step = self.config.eval_inner_steps - 1 if bn_step is None else bn_step
        if isinstance(bn_step, bool) or not isinstance(bn_step, int) or bn_step < 0:
            raise ValueError(f"bn_step must be a non-negative int, got {bn_step!r}")
        names = self.fast_weight_names
        missing = [n for n in names if n not in fast_weights]
        if missing:
            raise ValueError(f"fast_weights is missing {missing}")
        fw = [fast_weights[n].to(device=self.device, dtype=self.dtype) for n in names]
        T = x.shape[0]
        shapes = list(self.net.weight_shapes)
        if self.config.adapt_bn_affine:
            for layer in self.bn_layers:
                shapes += [(layer.channels,), (layer.channels,)]
        for n, t, shape in zip(names, fw, shapes):
            if tuple(t.shape) != (T, *shape):
                raise ValueError(f"fast_weights[{n!r}] must have shape {(T, *shape)}, got {tuple(t.shape)}")
        K = len(self.theta)
        adapt_affine = self.config.adapt_bn_affine
        r = min(bn_step, self.config.inner_steps - 1) if self.config.per_step_bn_weights else 0
        gammas = [None if t is None else t[r].detach() for t in self.bn_weight]
        betas = [None if t is None else t[r].detach() for t in self.bn_bias]

        def task(x: Tensor, *fw: Tensor):
            if adapt_affine:  # per-task (T, C) γ/β from the fast weights
                return (self.net.forward(x, fw[:K], self.step.batch_norm(x.shape[0], bn_step, False, fw[K::2],
                                                                      fw[K + 1::2])),)
            return (self.net.forward(x, fw, self.step.batch_norm(x.shape[0], bn_step, False, gammas, betas)),)

        with torch.no_grad():
            return self.step.per_backend(task, x, *fw)[0]

    # ----------------------------------------------------------- persistence
    def _state_tensors(self) -> dict[str, list[Optional[Tensor]]]:
        return dict(theta=self.theta, bn_weight=self.bn_weight, bn_bias=self.bn_bias,
                    running_mean=self.running_mean, running_var=self.running_var, lslr=[self.lslr])

    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically: config, θ₀, BN γ/β and running statistics,
        LSLR rates, Adam state, the scheduler's last epoch and the meta-step count. Tensors are copies."""
        out = {k: [None if t is None else t.detach().clone() for t in v] for k, v in self._state_tensors().items()}
        out["lslr"] = out["lslr"][0]
        out.update(format=_STATE_FORMAT, config=self.config.to_dict(), backend=self.backend,
                   optimizer=self.outer.portable_state(),
                   scheduler=dict(last_epoch=self.last_epoch),
                   meta_steps_done=self.meta_steps_done - (0 if self.device.type == "meta"
                                                           else int(self.step.dropped.item())))
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()``; tensor shapes must match this learner's.

        The learner keeps its own config (the stored one is informational; use
        ``from_state_dict`` to rebuild from it) and its backend, device and dtype.
        """
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"state is not a MAMLPlusPlus state_dict (expected format {_STATE_FORMAT!r})")
        mine = self._state_tensors()
        for key, tensors in mine.items():
            if key not in state:
                raise ValueError(f"state is missing {key!r}")
            theirs = [state[key]] if key == "lslr" else list(state[key])
            if len(theirs) != len(tensors):
                raise ValueError(f"state[{key!r}] holds {len(theirs)} tensors, expected {len(tensors)}")
            for i, (a, b) in enumerate(zip(tensors, theirs)):
                if (a is None) != (b is None) or (a is not None and tuple(a.shape) != tuple(b.shape)):
                    raise ValueError(f"state[{key!r}][{i}] has shape {None if b is None else tuple(b.shape)}, "
                                     f"expected {None if a is None else tuple(a.shape)}")
        with torch.no_grad():
            for key, tensors in mine.items():
                theirs = [state[key]] if key == "lslr" else list(state[key])
                for a, b in zip(tensors, theirs):
                    if a is not None:
                        a.copy_(b)
        self.last_epoch = state.get("scheduler", {}).get("last_epoch")
        # the stored state may come from the other (plain/capturable) mode: NOTE [Outer optimiser modes]
        self.outer.load_state(state["optimizer"], self.meta_lr(self.last_epoch if self.last_epoch is not None else 0))
        if self.graph is not None:
            self.graph.reset()  # the captured step read the optimizer state and lr tensors just replaced
        self.step.clear_nonfinite()
        self.meta_steps_done = int(state.get("meta_steps_done", 0))

    @classmethod
    def from_state_dict(cls, state: dict, backend: Optional[str] = None, device=None,
                        dtype: Optional[torch.dtype] = None, network=None, graph: bool | str = False,
                        compile: bool | str = False) -> "MAMLPlusPlus":
        """A learner built from the config stored in ``state`` and loaded with it. ``backend``:
        as in the constructor; None runs the stored backend where it can run here, else the
        default (with a note). ``network``, ``graph``, ``compile``: as in the constructor (``network`` is needed
        when the learner was built with a network object rather than one its config names)."""
        if not isinstance(state, dict) or "config" not in state:
            raise ValueError("state is not a MAMLPlusPlus state_dict (no 'config')")
        dtype = dtype or state["theta"][0].dtype
        config = MAMLConfig.from_dict(state["config"])
        execution = resolve_execution(device if device is not None else "cpu", config.dataset, backend,
                                      graph, stored_backend=state.get("backend"), compile=compile,
                                      recompute=config.recompute)
        report_notes(execution.notes)
        learner = cls(config, backend=execution.backend, device=device, dtype=dtype, network=network, graph=graph,
                      compile=compile)
        learner.load_state_dict(state)
        return learner

    def __repr__(self) -> str:
        c = self.config
        net = "vgg" if isinstance(self.net, VGGNet) else type(self.net).__name__
        return (f"MAMLPlusPlus(backend={self.backend!r}, {c.ways}-way {c.shots}-shot, network={net}, "
                f"fast_weights={len(self.theta)}, bn_layers={len(self.bn_layers)}, inner_steps={c.inner_steps}, "
                f"device={self.device}, dtype={self.dtype})")
