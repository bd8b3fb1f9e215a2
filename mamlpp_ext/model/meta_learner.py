"""The MAML++ meta-learner (SPEC §3) with three interchangeable backends.

``MAMLPlusPlus`` holds the meta-parameters — θ₀ (the K network fast-weight
tensors), the LSLR rates (K', R) and per-layer BN γ/β (R_w, C) — the per-step BN
running statistics (R_s, C), and the Adam outer optimiser with per-epoch cosine
annealing. It runs the inner loop with MSL, DA, BNRS, BNWB and LSLR, each of
which can be switched off (all off is plain MAML).

Backends (same algorithm, same state, same results up to float rounding):

* ``"sequential"``: pure autograd, the tasks of a meta-batch one after another
  with the per-task network layout, as the public MAML++ code runs. The
  semantic reference.
* ``"batched"``: pure autograd, all T tasks at once: fast weights carry a
  leading task dim, convolutions are grouped (groups = T) over task-major
  channels, the head is a batched matmul, BN is one ATen batch norm over T·C
  channels. The update is ``reference.lslr_update``.
* ``"fused"``: the batched algorithm with the compiled
  ``mamlpp_ext.ops.lslr_update`` as the inner-loop update and the compiled per-step batch
  norm (``network.fused_batch_norm``) (needs the extension).

The two swap points are ``self._update`` (inner-loop parameter update, the
signature of ``reference.lslr_update``) and ``self.net.batch_norm`` (the BN
call, the signature of ``network.aten_batch_norm``).

NOTE [Rows beyond S]
    With S training steps, the per-step tensors have S rows (or 1 when the
    component is off). Evaluation may run more inner steps than S; step i then
    uses row min(i, rows − 1) of the LSLR rates, BN γ/β and BN running
    statistics, i.e. every step from S−1 on reuses row S−1.

NOTE [Running statistics, sequential vs batched]
    Each forward in training mode updates the running-statistics row of its
    step with momentum m = bn_momentum (0.1): r ← (1−m)·r + m·s, where s is the
    batch mean or the unbiased batch variance. The sequential backend does this
    once per task per forward, task after task, as the public code does. The
    batched backends do it once per forward for the whole meta-batch, with s the
    mean over tasks of the per-task statistic. Because the update is linear in s
    and the batch statistics do not depend on the running ones, the batched
    result equals the mean over tasks of what the sequential backend gives when
    each task is run alone from the same starting statistics; with T = 1 the
    two backends agree exactly. Outputs never depend on the difference unless
    ``bn_eval_stats == "running"``.

NOTE [Evaluation and running statistics]
    ``evaluate`` and ``adapt`` never build second-order graphs and never change
    the learner's state: running statistics are cloned before each evaluation
    (before each task in the sequential backend) and copied back after it. With
    ``bn_eval_stats == "batch"`` (the public code's behaviour) the forwards
    normalise with batch statistics and update the statistics as in training
    (then restored); with ``"running"`` they normalise with the per-step running
    statistics.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import reference
from .config import MAMLConfig, from_preset
from .network import VGGNet, aten_batch_norm, fused_batch_norm
from .schedules import loss_weights, meta_lr_at, use_second_order

__all__ = ["MAMLPlusPlus", "BACKENDS"]

BACKENDS = ("sequential", "batched", "fused")
_STATE_FORMAT = "mamlpp_ext.MAMLPlusPlus/1"


class MAMLPlusPlus:
    """A MAML++ meta-learner.

    Args:
        config: a ``MAMLConfig`` or a preset name (see ``config.preset_names()``).
        backend: "sequential", "batched" or "fused".
        device, dtype: where and in which floating type the meta-parameters live.

    State (K = 2·num_stages + 2 network tensors, K' = K, or K + 2·num_stages with
    ``adapt_bn_affine``; S = inner_steps; C = num_filters):

    * ``theta``: K leaf tensors, θ₀ (``net.weight_shapes``).
    * ``lslr``: (K', S) rates, or (K', 1) without ``per_step_inner_lr``; a leaf that
      requires grad iff ``learnable_inner_lr``. Initialised to ``inner_lr``; never clamped.
    * ``bn_weight`` / ``bn_bias``: per stage (S, C), or (1, C) without ``per_step_bn_weights``.
    * ``running_mean`` / ``running_var``: per stage (S, C), or (1, C) without
      ``per_step_bn_statistics``; init 0 / 1.
    * ``optimizer``: Adam over θ₀, BN γ/β and (if learnable) the LSLR rates; its
      learning rate is set per epoch by CA.
    """

    def __init__(self, config: MAMLConfig | str, backend: str = "batched",
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        if isinstance(config, str):
            config = from_preset(config)
        if not isinstance(config, MAMLConfig):
            raise TypeError(f"config must be a MAMLConfig or a preset name, got {type(config).__name__}")
        config.validate()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.config = config
        self.backend = backend
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype

        self.net = VGGNet.from_config(config)
        self._update = reference.lslr_update
        if backend == "fused":
            from .. import ops

            if not ops.has_extension():
                raise RuntimeError(f"backend='fused' needs the compiled mamlpp_ext kernels, but "
                                   f"{ops.EXTENSION_ERROR}; use backend='batched' or 'sequential'")

            self._update = ops.lslr_update
            # The compiled per-step batch norm (forward, backward, double backward fused).
            self.net.batch_norm = fused_batch_norm

        g = torch.Generator().manual_seed(config.seed)
        dev, dt = self.device, dtype
        self.theta: list[Tensor] = [t.requires_grad_() for t in self.net.init_weights(generator=g, dtype=dt, device=dev)]
        S = config.inner_steps
        rows_w = S if config.per_step_bn_weights else 1
        rows_s = S if config.per_step_bn_statistics else 1
        self.bn_weight = [torch.ones(rows_w, c, dtype=dt, device=dev, requires_grad=True) for c in self.net.bn_channels]
        self.bn_bias = [torch.zeros(rows_w, c, dtype=dt, device=dev, requires_grad=True) for c in self.net.bn_channels]
        self.running_mean = [torch.zeros(rows_s, c, dtype=dt, device=dev) for c in self.net.bn_channels]
        self.running_var = [torch.ones(rows_s, c, dtype=dt, device=dev) for c in self.net.bn_channels]
        k_fast = len(self.theta) + (2 * config.num_stages if config.adapt_bn_affine else 0)
        rows_lr = S if config.per_step_inner_lr else 1
        self.lslr = torch.full((k_fast, rows_lr), float(config.inner_lr), dtype=dt, device=dev,
                               requires_grad=config.learnable_inner_lr)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=meta_lr_at(config, 0))
        self.last_epoch: Optional[int] = None
        self.meta_steps_done = 0
        # NOTE [Cross-process mean]: when set (mamlpp_ext.distributed), meta_step calls it once per
        # step, after the backward and before the gradient clamp and the Adam step, with every
        # meta-gradient, every running-statistics buffer and a float vector of step metrics; it
        # must replace each by its mean over the processes, in place (one flat all-reduce).
        self.cross_process_mean: Optional[Callable[[list[Tensor]], None]] = None

    # ------------------------------------------------------------- accessors
    def parameters(self) -> list[Tensor]:
        """Meta-learned tensors, in optimiser order: θ₀, then γ/β per stage, then LSLR (if learnable)."""
        ps = list(self.theta)
        for w, b in zip(self.bn_weight, self.bn_bias):
            ps += [w, b]
        if self.config.learnable_inner_lr:
            ps.append(self.lslr)
        return ps

    def named_parameters(self) -> list[tuple[str, Tensor]]:
        """(name, tensor) pairs in the order of ``parameters()``."""
        names = list(self.net.weight_names)
        for i in range(self.config.num_stages):
            names += [f"bn{i}.weight", f"bn{i}.bias"]
        if self.config.learnable_inner_lr:
            names.append("lslr")
        return list(zip(names, self.parameters()))

    @property
    def fast_weight_names(self) -> list[str]:
        """Names of the K' fast-weight tensors (rows of ``lslr``)."""
        names = list(self.net.weight_names)
        if self.config.adapt_bn_affine:
            for i in range(self.config.num_stages):
                names += [f"bn{i}.weight", f"bn{i}.bias"]
        return names

    def meta_lr(self, epoch: int) -> float:
        """The Adam learning rate used at ``epoch`` (CA)."""
        return meta_lr_at(self.config, epoch)

    # ------------------------------------------------------------ validation
    def _check_batch(self, x: Tensor, y: Optional[Tensor], xname: str, yname: str,
                     num_tasks: Optional[int] = None) -> tuple[Tensor, Optional[Tensor]]:
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
        if not (x.dtype.is_floating_point or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
            raise TypeError(f"{xname} must hold real numbers, got dtype {x.dtype}")
        if num_tasks is not None and T != num_tasks:
            raise ValueError(f"{xname} has {T} tasks but the support set has {num_tasks}")
        x = x.to(device=self.device, dtype=self.dtype)
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
            raise ValueError(f"{yname} holds labels in [{lo}, {hi}] but must be in [0, {cfg.ways - 1}] (ways={cfg.ways})")
        return x, y.to(device=self.device, dtype=torch.int64)

    def _check_inputs(self, support_x, support_y, query_x, query_y):
        sx, sy = self._check_batch(support_x, support_y, "support_x", "support_y")
        qx, qy = self._check_batch(query_x, query_y, "query_x", "query_y", num_tasks=sx.shape[0])
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

    # ------------------------------------------------------------ inner loop
    def _initial_fast(self, num_tasks: Optional[int], detach: bool) -> list[Tensor]:
        """Initial fast weights: θ₀ (+ BN γ/β row 0 with adapt_bn_affine), expanded to (T, ...) when
        ``num_tasks`` is given. With ``detach`` they are fresh leaves (evaluation)."""
        src = list(self.theta)
        if self.config.adapt_bn_affine:
            for w, b in zip(self.bn_weight, self.bn_bias):
                src += [w[0], b[0]]
        if detach:
            src = [t.detach().requires_grad_() for t in src]
        if num_tasks is None:
            return src
        return [t.unsqueeze(0).expand(num_tasks, *t.shape) for t in src]

    def _task_losses(self, logits: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy per task: logits (T, B, N) / y (T, B) -> (T,), or (B, N) / (B,) -> ()."""
        n = logits.shape[-1]
        ce = F.cross_entropy(logits.reshape(-1, n), y.reshape(-1), reduction="none")
        return ce.view(y.shape).mean(-1)

    def _inner_loop(self, sx: Tensor, sy: Tensor, qx: Optional[Tensor], qy: Optional[Tensor], *,
                    steps: int, batched: bool, create_graph: bool, weights: Sequence[float], score_every_step: bool,
                    bn_mode: str, detach_meta: bool):
        """Run ``steps`` inner updates and score the query set.

        Layouts: batched (sx (T, B, C, H, W), sy (T, B)) or per task (sx (B, C, H, W), sy (B,)).
        ``weights``: per-step query-loss weights (length ``steps``); the query set is scored
        after every update when ``score_every_step`` (MSL), else after the last one only.
        Returns (weighted query loss per task: (T,) or (), final query logits, fast weights).
        """
        cfg = self.config
        K = len(self.theta)
        fast = self._initial_fast(sx.shape[0] if batched else None, detach=detach_meta)
        lslr = self.lslr.detach() if detach_meta else self.lslr
        bn_w = [t.detach() for t in self.bn_weight] if detach_meta else self.bn_weight
        bn_b = [t.detach() for t in self.bn_bias] if detach_meta else self.bn_bias
        forward = self.net.forward_tasks if batched else self.net.forward_task
        n_lr, n_w, n_s = lslr.shape[1], bn_w[0].shape[0], self.running_mean[0].shape[0]

        def run(x: Tensor, fast_w: list[Tensor], step: int) -> Tensor:
            if cfg.adapt_bn_affine:
                gammas, betas = fast_w[K::2], fast_w[K + 1::2]
            else:
                r = min(step, n_w - 1)
                gammas, betas = [t[r] for t in bn_w], [t[r] for t in bn_b]
            rs = min(step, n_s - 1)
            rms = [t[rs] for t in self.running_mean]
            rvs = [t[rs] for t in self.running_var]
            return forward(x, fast_w[:K], gammas, betas, rms, rvs, bn_mode)

        total = None
        q_logits = None
        for i in range(steps):
            s_loss = self._task_losses(run(sx, fast, i), sy)
            grads = torch.autograd.grad(s_loss.sum(), fast, create_graph=create_graph)
            fast = self._update(fast, grads, lslr, min(i, n_lr - 1))
            if qx is not None and (score_every_step or i == steps - 1):
                q_logits = run(qx, fast, i)
                if qy is not None:
                    term = weights[i] * self._task_losses(q_logits, qy)
                    total = term if total is None else total + term
        return total, q_logits, fast

    def _bn_mode_eval(self) -> str:
        return "train" if self.config.bn_eval_stats == "batch" else "running"

    def _backup_stats(self) -> list[Tensor]:
        return [t.clone() for t in self.running_mean + self.running_var]

    def _restore_stats(self, backup: list[Tensor]) -> None:
        with torch.no_grad():
            for t, b in zip(self.running_mean + self.running_var, backup):
                t.copy_(b)

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
        return self._meta_loss(*self._check_inputs(support_x, support_y, query_x, query_y), epoch)

    def _meta_loss(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, epoch: int) -> tuple[Tensor, dict]:
        """``meta_loss`` on validated inputs (already on the learner's device and dtype)."""
        cfg = self.config
        S = cfg.inner_steps
        lw = loss_weights(S, epoch, use_msl=cfg.use_msl, msl_epochs=cfg.msl_epochs, training=True)
        msl_active = cfg.use_msl and epoch < cfg.msl_epochs
        second = use_second_order(cfg.second_order, epoch, cfg.first_order_to_second_order_epoch)
        kw = dict(steps=S, create_graph=second, weights=lw, score_every_step=msl_active, bn_mode="train",
                  detach_meta=False)
        with torch.enable_grad():
            if self.backend == "sequential":
                losses, logits = [], []
                for t in range(sx.shape[0]):
                    l_t, q_t, _ = self._inner_loop(sx[t], sy[t], qx[t], qy[t], batched=False, **kw)
                    losses.append(l_t)
                    logits.append(q_t)
                task_losses = torch.stack(losses)
                q_logits = torch.stack(logits)
            else:
                task_losses, q_logits, _ = self._inner_loop(sx, sy, qx, qy, batched=True, **kw)
            loss = task_losses.mean()
        acc = (q_logits.detach().argmax(-1) == qy).to(self.dtype).mean(-1)
        info = dict(task_losses=task_losses.detach(), task_accuracies=acc, query_logits=q_logits.detach(),
                    loss_weights=lw, second_order=second)
        return loss, info

    def meta_step(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                  epoch: int) -> dict:
        """One outer step: meta loss, backward, optional gradient clamp, Adam step at the CA rate of ``epoch``.

        Shapes as in ``meta_loss``. Returns a dict: ``loss`` (float, the meta-batch loss),
        ``accuracy`` (float, mean final query accuracy) — both averaged over the processes when
        ``cross_process_mean`` is set — ``task_accuracies`` (list of this process's T floats),
        ``loss_weights`` (list of S floats), ``meta_lr`` (float), ``second_order`` (bool),
        ``epoch`` (int).
        """
        epoch = self._check_epoch(epoch)
        batch = self._check_inputs(support_x, support_y, query_x, query_y)  # before any state changes
        lr = self.meta_lr(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.last_epoch = epoch
        loss, info = self._meta_loss(*batch, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        metrics = torch.cat([loss.detach().reshape(1), info["task_accuracies"].mean().reshape(1)])
        if self.cross_process_mean is not None:
            params = self.parameters()
            for p in params:  # every process must contribute the same layout
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.cross_process_mean([p.grad for p in params] + self.running_mean + self.running_var + [metrics])
        if self.config.grad_clamp is not None:
            c = float(self.config.grad_clamp)
            for p in self.theta + self.bn_weight + self.bn_bias:
                if p.grad is not None:
                    p.grad.clamp_(-c, c)
        self.optimizer.step()
        self.meta_steps_done += 1
        stats = torch.cat([metrics, info["task_accuracies"]]).tolist()
        return dict(loss=stats[0], accuracy=stats[1], task_accuracies=stats[2:], loss_weights=info["loss_weights"],
                    meta_lr=lr, second_order=info["second_order"], epoch=epoch)

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
        weights = [0.0] * (steps - 1) + [1.0]
        kw = dict(steps=steps, create_graph=False, weights=weights, score_every_step=False,
                  bn_mode=self._bn_mode_eval(), detach_meta=True)
        with torch.enable_grad():
            if self.backend == "sequential":
                losses, logits = [], []
                for t in range(sx.shape[0]):
                    backup = self._backup_stats()
                    try:
                        l_t, q_t, _ = self._inner_loop(sx[t], sy[t], qx[t], None if qy is None else qy[t],
                                                       batched=False, **kw)
                    finally:
                        self._restore_stats(backup)
                    losses.append(l_t)
                    logits.append(q_t)
                q_logits = torch.stack(logits).detach()
                task_losses = None if qy is None else torch.stack(losses).detach()
            else:
                backup = self._backup_stats()
                try:
                    task_losses, q_logits, _ = self._inner_loop(sx, sy, qx, qy, batched=True, **kw)
                finally:
                    self._restore_stats(backup)
                q_logits = q_logits.detach()
                task_losses = None if task_losses is None else task_losses.detach()
        out: dict = dict(logits=q_logits)
        if qy is not None:
            acc = (q_logits.argmax(-1) == qy).to(self.dtype).mean(-1)
            out.update(task_accuracies=acc, task_losses=task_losses, accuracy=float(acc.mean()),
                       loss=float(task_losses.mean()))
        return out

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: Optional[int] = None) -> dict[str, Tensor]:
        """Fast weights after ``steps`` inner updates on each task's support set (evaluation rules).

        support_x: (T, N·K, C, H, W); support_y: (T, N·K). Returns {name: (T, *shape)} for
        ``fast_weight_names`` (detached). Running statistics are restored afterwards.
        """
        steps = self._eval_steps(steps)
        sx, sy = self._check_batch(support_x, support_y, "support_x", "support_y")
        kw = dict(steps=steps, create_graph=False, weights=[1.0] * steps, score_every_step=False,
                  bn_mode=self._bn_mode_eval(), detach_meta=True)
        backup = self._backup_stats()
        try:
            with torch.enable_grad():
                if self.backend == "sequential":
                    per_task = []
                    for t in range(sx.shape[0]):
                        _, _, fast = self._inner_loop(sx[t], sy[t], None, None, batched=False, **kw)
                        per_task.append(fast)
                        self._restore_stats(backup)
                    fast = [torch.stack([f[k] for f in per_task]) for k in range(len(per_task[0]))]
                else:
                    _, _, fast = self._inner_loop(sx, sy, None, None, batched=True, **kw)
        finally:
            self._restore_stats(backup)
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
        for n, t, shape in zip(names, fw, self.net.weight_shapes):
            if tuple(t.shape) != (T, *shape):
                raise ValueError(f"fast_weights[{n!r}] must have shape {(T, *shape)}, got {tuple(t.shape)}")
        K = len(self.theta)
        if self.config.adapt_bn_affine:
            gammas, betas = fw[K::2], fw[K + 1::2]
        else:
            r = min(bn_step, self.bn_weight[0].shape[0] - 1)
            gammas = [t[r].detach() for t in self.bn_weight]
            betas = [t[r].detach() for t in self.bn_bias]
        rs = min(bn_step, self.running_mean[0].shape[0] - 1)
        backup = self._backup_stats()
        try:
            with torch.no_grad():
                return self.net.forward_tasks(x, fw[:K], gammas, betas, [t[rs] for t in self.running_mean],
                                              [t[rs] for t in self.running_var], self._bn_mode_eval())
        finally:
            self._restore_stats(backup)

    # ----------------------------------------------------------- persistence
    def _state_tensors(self) -> dict[str, list[Tensor]]:
        return dict(theta=self.theta, bn_weight=self.bn_weight, bn_bias=self.bn_bias,
                    running_mean=self.running_mean, running_var=self.running_var, lslr=[self.lslr])

    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically: config, θ₀, BN γ/β and running statistics,
        LSLR rates, Adam state, the scheduler's last epoch and the meta-step count. Tensors are copies."""
        out = {k: [t.detach().clone() for t in v] for k, v in self._state_tensors().items()}
        out["lslr"] = out["lslr"][0]
        out.update(format=_STATE_FORMAT, config=self.config.to_dict(), backend=self.backend,
                   optimizer=copy.deepcopy(self.optimizer.state_dict()),
                   scheduler=dict(last_epoch=self.last_epoch), meta_steps_done=self.meta_steps_done)
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
                if tuple(a.shape) != tuple(b.shape):
                    raise ValueError(f"state[{key!r}][{i}] has shape {tuple(b.shape)}, expected {tuple(a.shape)}")
        with torch.no_grad():
            for key, tensors in mine.items():
                theirs = [state[key]] if key == "lslr" else list(state[key])
                for a, b in zip(tensors, theirs):
                    a.copy_(b)
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.last_epoch = state.get("scheduler", {}).get("last_epoch")
        if self.last_epoch is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.meta_lr(self.last_epoch)
        self.meta_steps_done = int(state.get("meta_steps_done", 0))

    @classmethod
    def from_state_dict(cls, state: dict, backend: Optional[str] = None, device=None,
                        dtype: Optional[torch.dtype] = None) -> "MAMLPlusPlus":
        """A learner built from the config stored in ``state`` and loaded with it."""
        if not isinstance(state, dict) or "config" not in state:
            raise ValueError("state is not a MAMLPlusPlus state_dict (no 'config')")
        dtype = dtype or state["theta"][0].dtype
        learner = cls(MAMLConfig.from_dict(state["config"]), backend=backend or state.get("backend", "batched"),
                      device=device, dtype=dtype)
        learner.load_state_dict(state)
        return learner

    def __repr__(self) -> str:
        c = self.config
        return (f"MAMLPlusPlus(backend={self.backend!r}, {c.ways}-way {c.shots}-shot, stages={c.num_stages}, "
                f"filters={c.num_filters}, inner_steps={c.inner_steps}, device={self.device}, dtype={self.dtype})")
