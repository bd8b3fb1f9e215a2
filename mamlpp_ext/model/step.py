"""The MAML++ step: the inner loop, the meta-loss and the outer update of a learner.

``MAMLPlusPlus`` (meta_learner.py) holds the state — θ₀, LSLR rates, BN γ/β and running
statistics, the outer optimiser — and the public API; this module holds what a step *does* with
that state, behind a small interface that every execution mode calls.

NOTE [Step interface]
    ``learner.step`` (a ``MetaStep``) is the one way into a learner's step. Eager mode (the
    learner's own ``train_step``/``evaluate``), graph mode (graph.py) and any later mode use only
    these methods, never the learner's private members:

    * ``forward_backward(sx, sy, qx, qy, plan)`` — meta-loss and its backward into the
      meta-parameters' ``.grad``; returns the step's device metrics [loss, accuracy, T task
      accuracies]. Updates the running statistics (a training forward).
    * ``gradients()`` — the meta-parameters, each with a ``.grad`` (zeros where the backward
      produced none): the layout a cross-process mean averages.
    * ``outer_update(metrics)`` — the guarded outer update: the finiteness check, the optional
      gradient clamp and the Adam step, all dropped when the step is not finite (NOTE [Divergence
      guard]); ``metrics`` (what ``forward_backward`` returned) are masked in place.
    * ``train_body(...)`` = ``forward_backward`` + ``outer_update``: a whole single-process step
      (what one CUDA graph captures); ``train_step(...)`` adds the cross-process mean between
      them (the eager step).
    * ``nonfinite`` / ``clear_nonfinite()`` — the device flag of the divergence guard and its
      reset (a host-side call between steps).
    * ``eval_body(sx, sy, qx, qy, steps)`` — first-order adaptation and query scoring; changes
      no state.
    * ``set_meta_lr(lr)`` — Adam's learning rate for the coming steps (CA).

    ``forward_backward`` computes through ``loss_and_gradients`` (same contract: the meta-loss's
    gradients into ``.grad``, the device metrics returned), the one method another execution of
    the step replaces (the compiled step, NOTE [Compiled step] in compiled.py); the step reads
    the learner's tensors through ``tensors()``, which ``reading(...)`` points at other tensors
    for a block (how the compiled step traces the step with its inputs as graph inputs).

    Inputs are validated device tensors in the learner's dtype (the learner validates); ``plan``
    is the ``EpochPlan`` of the step's epoch (schedules.py), whose ``loss_weights`` may be a
    device tensor (graph mode updates it between replays).

NOTE [Outer optimiser modes]
    Adam is torch's fused Adam (``fused=True``: one kernel over every meta-parameter, step counts
    on the device, and a ``found_inf`` flag that drops a whole update on the device, which the
    divergence guard uses). It runs in one of two modes: *plain* (float learning rate) or
    *capturable* (the learning rate is a device tensor, so a captured step reads it on the
    device and CA changes the rate with a ``fill_`` between replays).
    The capturable learning rate is float32 whatever the learner's dtype: torch keeps Adam's step
    counts (and so its bias corrections) as float32 tensors and divides the rate by them, whose
    fused CUDA path needs matching dtypes; and in half or bfloat16 a rate such as 1e-5 would be
    rounded (subnormal in half). Checkpoints always store the plain form, so either mode loads
    either.

NOTE [Divergence guard]
    A step whose meta-loss or any meta-gradient is not finite (NaN or ±inf) leaves nothing behind:
    ``forward_backward`` first copies the running statistics aside (the forward updates them in
    place); ``outer_update`` checks the loss and every gradient with one op
    (``torch._amp_foreach_non_finite_check_and_unscale_``, which multiplies by 1 and sets the
    0-d flag ``nonfinite`` to 1 when anything is not finite; the check runs before the clamp,
    which would turn ±inf into finite values), puts the saved statistics back where the flag is
    set (``torch.where``), and hands the flag to fused Adam as ``found_inf``, which then changes
    no weight, no moment and no step count. The step's metrics become NaN where the flag is set,
    so a caller that reads them sees the dropped step.

    Everything stays on the device: no host read, so the guard runs inside a captured CUDA graph
    (``graph.check_capturable`` checks it) and the eager ``train_step`` keeps its promise of no
    host sync. The flag is sticky: once set, every later step is dropped as well (and reports
    NaN) until ``clear_nonfinite()`` — so the learner stays exactly as it was before the first
    bad step however late the caller reads the metrics. ``dropped`` counts the dropped steps.

    Under a cross-process mean the check runs after the mean, on the averaged gradients and
    loss: a NaN on one process reaches every process, so all of them drop the same step.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .recompute import recomputed
from .schedules import EpochPlan

__all__ = ["DivergenceError", "MetaStep", "OuterOptimizer", "StepTensors", "task_losses"]


def task_losses(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy per task: logits (T, B, N) / y (T, B) -> (T,)."""
    n = logits.shape[-1]
    ce = F.cross_entropy(logits.reshape(-1, n), y.reshape(-1), reduction="none")
    return ce.view(y.shape).mean(-1)


class OuterOptimizer:
    """Adam over the meta-parameters, with CA's per-epoch rate (NOTE [Outer optimiser modes]).

    Args:
        params: the meta-parameters, in the learner's ``parameters()`` order.
        lr: the initial learning rate.
        device: where a capturable state lives.
        capturable: the mode.
    """

    def __init__(self, params: list[Tensor], lr: float, device: torch.device, capturable: bool) -> None:
        self.device = device
        self.capturable = bool(capturable)
        self.lr = float(lr)
        self.optimizer = torch.optim.Adam(params, lr=self.lr, fused=True)
        self.configure()

    def step(self, skip: Tensor) -> None:
        """One Adam step, dropped on the device where ``skip`` (0-d float32, 0 or 1) is 1."""
        self.optimizer.found_inf = skip
        self.optimizer.step()

    def set_lr(self, lr: float) -> None:
        """The learning rate of the coming steps: a float in plain mode, the device tensor filled
        in place in capturable mode (no host read; a captured step sees the new value)."""
        self.lr = float(lr)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(self.lr)
            else:
                group["lr"] = self.lr

    def configure(self) -> None:
        """Put Adam's groups and state in this object's mode (after construction, and after a
        state from the other mode was loaded)."""
        cap = self.capturable
        for group in self.optimizer.param_groups:
            group["capturable"] = cap
            group["fused"], group["foreach"] = True, None  # a loaded state may name another path
            # float32: NOTE [Outer optimiser modes]
            group["lr"] = torch.tensor(self.lr, dtype=torch.float32, device=self.device) if cap else self.lr
        for state in self.optimizer.state.values():
            if "step" in state:  # fused Adam keeps its float32 step counts on the device
                state["step"] = state["step"].to(device=self.device, dtype=torch.float32)

    def portable_state(self) -> dict:
        """Adam's state as a plain-mode optimizer stores it (float rate, CPU step counts, not
        capturable), whatever this object's mode."""
        st = copy.deepcopy(self.optimizer.state_dict())
        for group in st["param_groups"]:
            group["lr"], group["capturable"], group["fused"] = self.lr, False, None
        for s in st["state"].values():
            if "step" in s:
                s["step"] = s["step"].detach().to("cpu")
        return st

    def load_state(self, state: dict, lr: float) -> None:
        """Load a ``portable_state()`` (or a state of either mode) and set the rate to ``lr``."""
        self.optimizer.load_state_dict(copy.deepcopy(state))
        self.lr = float(lr)
        self.configure()


class DivergenceError(FloatingPointError):
    """A meta-step's loss or meta-gradients were not finite; the step was not applied
    (NOTE [Divergence guard])."""


class StepTensors(NamedTuple):
    """The learner's tensors that a step reads (shapes in ``MAMLPlusPlus``): θ₀, the BN γ/β
    tables (None for a layer without affine), the LSLR rates, the running statistics (None for a
    layer that keeps none; updated in place by a training forward)."""

    theta: Sequence[Tensor]
    bn_weight: Sequence[Optional[Tensor]]
    bn_bias: Sequence[Optional[Tensor]]
    lslr: Tensor
    running_mean: Sequence[Optional[Tensor]]
    running_var: Sequence[Optional[Tensor]]

    @classmethod
    def of(cls, learner) -> "StepTensors":
        """The learner's own tensors."""
        return cls(learner.theta, learner.bn_weight, learner.bn_bias, learner.lslr, learner.running_mean,
                   learner.running_var)

    @classmethod
    def from_flat(cls, learner, params: Sequence[Tensor], running_stats: Sequence[Tensor]) -> "StepTensors":
        """Tensors laid out like ``learner.parameters()`` and ``learner.running_stats`` (same
        order, same count; the LSLR rates are the learner's own when they are not learned), as a
        ``StepTensors`` with the learner's structure."""
        mine = cls.of(learner)
        if len(params) != len(learner.parameters()) or len(running_stats) != len(learner.running_stats):
            raise ValueError(f"StepTensors.from_flat: expected {len(learner.parameters())} parameters and "
                             f"{len(learner.running_stats)} running statistics, got {len(params)} and "
                             f"{len(running_stats)}")
        it = iter(params)
        theta = [next(it) for _ in mine.theta]
        weight, bias = [], []
        for w in mine.bn_weight:
            weight.append(None if w is None else next(it))
            bias.append(None if w is None else next(it))
        lslr = next(it) if learner.config.learnable_inner_lr else mine.lslr
        stats = iter(running_stats)
        mean = [None if t is None else next(stats) for t in mine.running_mean]
        var = [None if t is None else next(stats) for t in mine.running_var]
        return cls(theta, weight, bias, lslr, mean, var)


class MetaStep:
    """The step of a ``MAMLPlusPlus`` learner (NOTE [Step interface]). Holds the learner weakly
    (the learner owns its step) and reads the learner's public state on every call, so a switched backend
    or a loaded state is seen at once.

    The divergence guard's device state (NOTE [Divergence guard]) lives here, allocated once so
    that a captured graph keeps reading the same memory: ``nonfinite`` (0-d float32, 1 once a
    step was not finite), ``dropped`` (0-d float32, steps dropped since the last
    ``clear_nonfinite``) and a copy of every running-statistics buffer."""

    def __init__(self, learner) -> None:
        # a proxy, not a reference: no cycle keeps a deleted learner's (device) memory alive, and
        # reading through it costs no Python call on the hot path
        self.learner = weakref.proxy(learner)
        self._reading: Optional[StepTensors] = None
        dev = learner.device
        self.nonfinite = torch.zeros((), dtype=torch.float32, device=dev)
        self.dropped = torch.zeros((), dtype=torch.float32, device=dev)
        self._one = torch.ones((), dtype=torch.float32, device=dev)
        self._saved_stats = [torch.empty_like(t) for t in learner.running_stats]

    def clear_nonfinite(self) -> None:
        """Reset the guard's flag and count (between steps): the next step runs normally."""
        self.nonfinite.zero_()
        self.dropped.zero_()

    def tensors(self) -> StepTensors:
        """The tensors the step reads: the learner's, or those of an enclosing ``reading``."""
        return StepTensors.of(self.learner) if self._reading is None else self._reading

    @contextlib.contextmanager
    def reading(self, tensors: StepTensors) -> Iterator[None]:
        """Within the block, the step reads ``tensors`` instead of the learner's (the learner and
        its optimizer are untouched)."""
        outer, self._reading = self._reading, tensors
        try:
            yield
        finally:
            self._reading = outer

    # ------------------------------------------------------------------ the interface
    def forward_backward(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, plan: EpochPlan) -> Tensor:
        """Meta-loss and its backward into the meta-parameters' ``.grad``; returns [loss, mean
        accuracy, T task accuracies] on the device."""
        if self._saved_stats:  # the forward updates them in place: NOTE [Divergence guard]
            torch._foreach_copy_(self._saved_stats, self.learner.running_stats)
        return self.loss_and_gradients(sx, sy, qx, qy, plan)

    def loss_and_gradients(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, plan: EpochPlan) -> Tensor:
        """What ``forward_backward`` computes, eagerly: the meta-loss, its gradients into the
        meta-parameters' ``.grad`` (None where the backward produces none) and [loss, mean
        accuracy, T task accuracies] on the device."""
        lrn = self.learner
        loss, info = self.meta_loss(sx, sy, qx, qy, plan)
        lrn.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        acc = info["task_accuracies"]
        return torch.cat([loss.detach().reshape(1), acc.mean().reshape(1), acc])

    def gradients(self) -> list[Tensor]:
        """The meta-parameters, each with a ``.grad`` (zeros where the backward produced none),
        so that every process contributes the same layout to a cross-process mean."""
        params = self.learner.parameters()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return params

    def outer_update(self, metrics: Optional[Tensor] = None) -> None:
        """The guarded outer update (NOTE [Divergence guard]): the finiteness check of the loss
        (``metrics[0]``, when given) and of every meta-gradient, the optional gradient clamp
        (network weights and BN γ/β, not the LSLR rates) and Adam; a step that is not finite
        changes nothing (running statistics restored, Adam skipped) and its ``metrics`` are
        set to NaN in place."""
        lrn = self.learner
        params = lrn.parameters()
        checked = [p.grad for p in params if p.grad is not None]
        if metrics is not None:
            checked.append(metrics[:1])
        flag = self.nonfinite
        if checked:
            torch._amp_foreach_non_finite_check_and_unscale_(checked, flag, self._one)
        if lrn.config.grad_clamp is not None:
            c = float(lrn.config.grad_clamp)
            for p in lrn.theta + [t for t in lrn.bn_weight + lrn.bn_bias if t is not None]:
                if p.grad is not None:
                    p.grad.clamp_(-c, c)
        bad = flag > 0
        for stats, saved in zip(lrn.running_stats, self._saved_stats):
            torch.where(bad, saved, stats, out=stats)
        lrn.outer.step(flag)
        self.dropped.add_(flag)
        if metrics is not None:
            metrics.masked_fill_(bad, float("nan"))

    def train_body(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, plan: EpochPlan) -> Tensor:
        """A whole single-process step: ``forward_backward`` then ``outer_update``."""
        metrics = self.forward_backward(sx, sy, qx, qy, plan)
        self.outer_update(metrics)
        return metrics

    def train_step(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, plan: EpochPlan) -> Tensor:
        """The eager step: ``forward_backward``, the cross-process mean when the learner has one
        (NOTE [Cross-process mean] in meta_learner.py), ``outer_update``."""
        lrn = self.learner
        metrics = self.forward_backward(sx, sy, qx, qy, plan)
        if lrn.cross_process_mean is not None:
            lrn.cross_process_mean([p.grad for p in self.gradients()] + lrn.running_stats + [metrics[:2]])
        self.outer_update(metrics)
        return metrics

    def eval_body(self, sx: Tensor, sy: Tensor, qx: Optional[Tensor], qy: Optional[Tensor], steps: int):
        """First-order adaptation of ``steps`` inner updates and query scoring (final step only),
        BN per ``bn_eval_stats``. Returns (task losses (T,) or None, final query logits (T, Q, N)
        or None, fast weights); changes no state."""
        weights = [0.0] * (steps - 1) + [1.0]

        def task(sx, sy, qx, qy):
            return self.inner_loop(sx, sy, qx, qy, steps=steps, create_graph=False, weights=weights,
                                   score_every_step=False, training=False)

        with torch.enable_grad():
            return self.per_backend(task, sx, sy, qx, qy)

    def set_meta_lr(self, lr: float) -> None:
        """Adam's learning rate for the coming steps (NOTE [Outer optimiser modes])."""
        self.learner.outer.set_lr(lr)

    # ------------------------------------------------------------------ the algorithm
    def meta_loss(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, plan: EpochPlan) -> tuple[Tensor, dict]:
        """The meta-batch loss with its graph to the meta-parameters, on validated inputs; info as
        ``MAMLPlusPlus.meta_loss`` documents."""
        lrn = self.learner
        recompute = lrn.config.recompute

        def task(sx, sy, qx, qy):
            return self.inner_loop(sx, sy, qx, qy, steps=lrn.config.inner_steps, create_graph=plan.second_order,
                                   weights=plan.loss_weights, score_every_step=plan.score_every_step,
                                   training=True, recompute=recompute)[:2]

        with torch.enable_grad():
            losses, q_logits = self.per_backend(task, sx, sy, qx, qy)
            loss = losses.mean()
        acc = (q_logits.detach().argmax(-1) == qy).to(lrn.dtype).mean(-1)
        info = dict(task_losses=losses.detach(), task_accuracies=acc, query_logits=q_logits.detach(),
                    loss_weights=plan.loss_weights, second_order=plan.second_order)
        return loss, info

    def batch_norm(self, num_tasks: int, step: int, training: bool, gammas: Sequence[Optional[Tensor]],
                   betas: Sequence[Optional[Tensor]], update_stats: Optional[bool] = None):
        """The network's ``bn(layer, h, negative_slope)`` for one forward at inner ``step``
        (NOTE [Rows beyond S] in meta_learner.py): the backend's batch-norm op with the layer's
        γ/β (rows or per-task fast weights), its (R_s, C) running statistics and row
        ``min(step, R_s − 1)``. ``training``: batch statistics, updating the running statistics
        unless ``update_stats`` is False (a recomputed forward, NOTE [Recomputed inner steps] in
        recompute.py); False: evaluation (NOTE [Evaluation and running statistics] in
        meta_learner.py)."""
        lrn = self.learner
        cfg = lrn.config
        fn = lrn.backend_impl.batch_norm
        # called per network forward: read the statistics without building a StepTensors
        st = lrn if self._reading is None else self._reading
        layers, means, variances = lrn.bn_layers, st.running_mean, st.running_var
        row = min(step, cfg.inner_steps - 1) if cfg.per_step_bn_statistics else 0
        norm_with_batch = training or cfg.bn_eval_stats == "batch"
        update = training if update_stats is None else (training and update_stats)

        def bn(i: int, h: Tensor, negative_slope: Optional[float]) -> Tensor:
            layer = layers[i]
            return fn(h, num_tasks, gammas[i], betas[i], means[i], variances[i], step=row, training=norm_with_batch,
                      update_stats=update, momentum=layer.momentum, eps=layer.eps, negative_slope=negative_slope)
        return bn

    def inner_loop(self, sx: Tensor, sy: Tensor, qx: Optional[Tensor], qy: Optional[Tensor], *, steps: int,
                   create_graph: bool, weights: Sequence[float], score_every_step: bool, training: bool,
                   recompute: str = "off"):
        """Run ``steps`` inner updates on T tasks and score the query set.

        sx (T, B, C, H, W), sy (T, B); qx, qy likewise or None. ``weights``: per-step query-loss
        weights (length ``steps``); the query set is scored after every update when
        ``score_every_step`` (MSL), else after the last one only. ``training``: the meta-parameters
        are differentiated through and BN updates the running statistics; else the inner loop
        starts from detached copies (evaluation). ``recompute`` (training only; a
        ``MAMLConfig.recompute`` value): "steps" keeps only each step's inputs and reruns the step
        in the outer backward, "query" does so for the query scores only (NOTE [Recomputed inner
        steps] in recompute.py). Returns (weighted query loss per task (T,) or None, final query logits
        (T, Q, N) or None, fast weights (T, ...)).
        """
        lrn = self.learner
        cfg = lrn.config
        backend = lrn.backend_impl
        T = sx.shape[0]
        st = self.tensors()
        K = len(st.theta)
        adapt_affine = cfg.adapt_bn_affine
        src = list(st.theta)
        if adapt_affine:
            for w, b in zip(st.bn_weight, st.bn_bias):
                src += [w[0], b[0]]
        bn_w, bn_b, lslr = st.bn_weight, st.bn_bias, st.lslr
        if not training:
            src = [t.detach().requires_grad_() for t in src]
            bn_w = [None if t is None else t.detach() for t in bn_w]
            bn_b = [None if t is None else t.detach() for t in bn_b]
            lslr = lslr.detach()
        fast = [t.unsqueeze(0).expand(T, *t.shape) for t in src]
        n_lr, n_w = lslr.shape[1], cfg.inner_steps if cfg.per_step_bn_weights else 1
        forward = lrn.net.forward

        # The rows of the BN γ/β tables, split once: the backward then stacks each table's row
        # gradients in one op instead of scattering every use into a zero table.
        w_rows = [None if t is None else t.unbind(0) for t in bn_w]
        b_rows = [None if t is None else t.unbind(0) for t in bn_b]

        def rows(step: int) -> list[Optional[Tensor]]:
            """BN γ rows then β rows of a forward at ``step`` (none with adapted affine)."""
            if adapt_affine:
                return []
            r = min(step, n_w - 1)
            return [None if t is None else t[r] for t in w_rows] + [None if t is None else t[r] for t in b_rows]

        def run(x: Tensor, fast_w: Sequence[Tensor], step: int, affine: Sequence[Optional[Tensor]],
                update_stats: bool = True) -> Tensor:
            if adapt_affine:
                gammas, betas = fast_w[K::2], fast_w[K + 1::2]
                fast_w = fast_w[:K]
            else:
                half = len(affine) // 2
                gammas, betas = affine[:half], affine[half:]
            bn = self.batch_norm(T, step, training, gammas, betas, update_stats)
            return forward(x, fast_w, bn)

        def update(fast_w: list[Tensor], step: int, affine, lrs: Tensor, create: bool,
                   update_stats: bool = True) -> list[Tensor]:
            s_loss = task_losses(run(sx, fast_w, step, affine, update_stats), sy)
            grads = torch.autograd.grad(s_loss.sum(), fast_w, create_graph=create)
            return backend.update(fast_w, grads, lrs, min(step, n_lr - 1))

        def score(fast_w: Sequence[Tensor], step: int, affine, update_stats: bool = True):
            q_logits = run(qx, fast_w, step, affine, update_stats)
            return q_logits, (None if qy is None else weights[step] * task_losses(q_logits, qy))

        total = None
        q_logits = None
        for i in range(steps):
            affine = rows(i)
            scored = qx is not None and (score_every_step or i == steps - 1)
            if training and recompute == "steps":
                fast = self._recomputed_update(update, fast, lslr, affine, i, create_graph)
            else:
                fast = update(fast, i, affine, lslr, create_graph)
            term = None
            if scored and training and recompute != "off":
                term, q_logits = self._recomputed_score(score, fast, affine, i)
            elif scored:
                q_logits, term = score(fast, i, affine)
            if scored and term is not None:
                total = term if total is None else total + term
        return total, q_logits, fast

    @staticmethod
    def _recomputed_update(update: Callable, fast: list[Tensor], lslr: Tensor, affine: list, step: int,
                           create_graph: bool) -> list[Tensor]:
        """θᵢ₊₁ of ``update`` as a recomputed segment: (θᵢ, rates, γ/β rows) saved, the step rerun
        in the backward (NOTE [Recomputed inner steps] in recompute.py)."""
        k, a = len(fast), len(affine)

        def first_pass(inputs):
            with torch.enable_grad():  # the inner gradient, first order: no graph is kept
                leaves = [t.detach().requires_grad_() for t in inputs[:k]]
                aff = [None if t is None else t.detach() for t in inputs[k + 1:]]
                return [t.detach() for t in update(leaves, step, aff, inputs[k].detach(), False)]

        def replay(leaves):
            fast_w = [t if t.requires_grad else t.requires_grad_() for t in leaves[:k]]
            return update(fast_w, step, leaves[k + 1:k + 1 + a], leaves[k], create_graph, update_stats=False)

        return list(recomputed(first_pass, replay, [*fast, lslr, *affine]))

    @staticmethod
    def _recomputed_score(score: Callable, fast: list[Tensor], affine: list, step: int) -> tuple[Tensor, Tensor]:
        """(weighted query loss (T,), logits) of ``score`` as a recomputed segment."""
        k = len(fast)

        def first_pass(inputs):
            q_logits, term = score(inputs[:k], step, inputs[k:])
            return term, q_logits

        def replay(leaves):
            q_logits, term = score(leaves[:k], step, leaves[k:], update_stats=False)
            return term, q_logits

        return recomputed(first_pass, replay, [*fast, *affine], non_differentiable=(1,))

    def per_backend(self, fn: Callable, *tensors: Optional[Tensor]) -> list:
        """``fn(*tensors)`` on all tasks at once, or task by task (T = 1 slices) for a per-task
        backend, with each output concatenated over tasks (None stays None)."""
        if not self.learner.backend_impl.per_task:
            return list(fn(*tensors))
        parts = [fn(*(None if t is None else t[i:i + 1] for t in tensors)) for i in range(tensors[0].shape[0])]
        out = []
        for j in range(len(parts[0])):
            first = parts[0][j]
            if first is None:
                out.append(None)
            elif isinstance(first, Tensor):
                out.append(torch.cat([p[j] for p in parts]))
            else:  # a list of tensors (fast weights)
                out.append([torch.cat([p[j][k] for p in parts]) for k in range(len(first))])
        return out
