"""Recomputation: a piece of the inner loop that keeps only its inputs and is rerun, with its graph,
during the outer backward.

NOTE [Recomputed inner steps]
    Second-order MAML keeps, until the outer backward, the graph of every inner step: the
    support forward, the graph of its gradient (built by ``torch.autograd.grad(create_graph=
    True)``) and, under MSL, the query forward scored after the step. That is almost all of a
    meta-step's memory, and it grows linearly with the inner steps. With
    ``MAMLConfig.recompute = "steps"`` the inner loop (``MetaStep.inner_loop``) runs each step as
    two *segments*, each an autograd node (``recomputed``) that saves only its inputs:

    * the update: (θᵢ, LSLR rates, BN γ/β rows, support batch) → θᵢ₊₁;
    * the query score: (θᵢ₊₁, BN γ/β rows, query batch) → the step's weighted query loss (and
      the logits, not differentiable).

    Forward: each segment runs once without keeping a graph — the support forward and a
    first-order inner gradient, the update under no-grad; the query forward under no-grad — and
    updates the BN running statistics exactly as the step without recomputation does (same
    rows, same order, same values). Backward: the engine reaches the segments one at a time,
    last first; each reruns its forward (and, for the update, the inner gradient with
    ``create_graph`` when second order) from its saved inputs *without* touching the running
    statistics — a second update when a segment reruns a batch norm is the known trap of
    checkpointed MAML — and backpropagates the incoming gradients through the rebuilt graph,
    which is freed before the next segment runs. So at most one segment's graph is alive: the
    peak is that of the largest segment (with MSL, usually the query score) plus the saved fast
    weights of every step, instead of all steps' graphs at once. The rerun computes the same
    values as the forward (deterministic kernels), so the loss, the meta-gradients and the
    running statistics equal those without recomputation (tests/test_recompute.py, float64).
    The cost is one more forward (and first-order backward) of the support set and one more
    forward of the query set per step (docs/memory.md).

    ``recompute = "query"`` makes only the query score a segment and keeps the update's graph as
    without recomputation: when the query set is much larger than the support set (mini-ImageNet
    1-shot: 75 query images per task, 5 support images) most of the memory goes, for only one
    more query forward per step.

    Why not ``torch.utils.checkpoint``: with ``use_reentrant=False`` it does give the right
    second-order gradients, but the inner ``torch.autograd.grad`` *inside* the checkpointed
    function unpacks tensors the checkpoint has already discarded, which reruns the function
    during the forward too (three runs of every step instead of two), and each rerun updates
    the running statistics again. ``use_reentrant=True`` does not support ``torch.autograd.grad``
    inside the region at all. Here the first pass and the rerun are separate functions, so the
    running statistics are updated once and the forward keeps no graph.

    The node is differentiable once: its backward gives the meta-gradient, but builds no graph
    of it. A backward with ``create_graph=True`` (to differentiate the meta-gradient again, e.g.
    a Hessian-vector product of the meta-loss) raises at once, instead of returning a gradient
    whose graph silently misses the recomputed parts.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["recomputed"]


class _Segment:
    __slots__ = ("first_pass", "replay", "non_differentiable")

    def __init__(self, first_pass, replay, non_differentiable):
        self.first_pass = first_pass
        self.replay = replay
        self.non_differentiable = non_differentiable


class _Recomputed(torch.autograd.Function):
    """One recomputed segment (NOTE [Recomputed inner steps]): saves its inputs, reruns in backward."""

    @staticmethod
    def forward(ctx, segment: _Segment, *inputs: Optional[Tensor]):
        ctx.segment = segment
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs)
        outputs = tuple(segment.first_pass(inputs))
        if segment.non_differentiable:
            ctx.mark_non_differentiable(*(outputs[j] for j in segment.non_differentiable))
        return outputs

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):
        if torch.is_grad_enabled():
            raise RuntimeError("mamlpp_ext: a backward with create_graph=True reached a recomputed inner step "
                               "(MAMLConfig.recompute != 'off'), which gives the meta-gradient but no graph of "
                               "it; to differentiate the meta-gradient again, use recompute='off'")
        needs = ctx.needs_input_grad[1:]
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_(n) for t, n in zip(ctx.saved_tensors, needs)]
            outputs = ctx.segment.replay(leaves)
            pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o is not None and o.requires_grad]
            wrt = [leaf for leaf, n in zip(leaves, needs) if n]
            if pairs and wrt:
                got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True))
            else:
                got = iter([None] * len(wrt))
        return (None, *(next(got) if n else None for n in needs))


def recomputed(first_pass: Callable[[Sequence[Optional[Tensor]]], Sequence[Tensor]],
               replay: Callable[[list[Optional[Tensor]]], Sequence[Tensor]], inputs: Sequence[Optional[Tensor]],
               non_differentiable: tuple[int, ...] = ()) -> tuple[Tensor, ...]:
    """Run a segment that keeps only ``inputs`` and is rerun in the backward (NOTE [Recomputed
    inner steps]).

    Args:
        first_pass: ``first_pass(inputs)`` -> the output tensors, computed now, without a graph
            (it runs with grad mode off; it may enable it inside, e.g. for an inner gradient,
            and must leave nothing attached to the outputs). Side effects (the running
            statistics) happen here only.
        replay: ``replay(leaves)`` -> the same outputs, with their graph from ``leaves``: the
            inputs detached, each requiring grad where the backward needs its gradient. Runs in
            the backward with grad mode on; must have no side effects.
        inputs: tensors or None; saved (not copied) until the backward.
        non_differentiable: indices of outputs that carry no gradient.

    Returns the outputs of ``first_pass``, attached to one autograd node.
    """
    return _Recomputed.apply(_Segment(first_pass, replay, tuple(non_differentiable)), *inputs)
