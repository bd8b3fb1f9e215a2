"""Test helpers.

``random_batch(cfg, T=None, seed=1, dtype=float64)``: fresh random images and shuffled labels of a
config's task shape: (support_x, support_y, query_x, query_y).

``functional_call_meta_loss(module, learner, batch, epoch)``: the MAML++ meta-loss written with
the user's module and ``torch.func.functional_call``, task by task (the reference for lifted
networks).

``forward_task(net, x, weights, gammas, betas, running_means, running_vars, mode)``: one task
through a network's functional forward, with batch norm done by ``F.batch_norm`` directly (an
independent check of the per-step batch-norm contract). x (B, C, H, W),
weights without a task dim, per BN layer γ/β (C,) and running-statistics rows (C,) or None;
mode "train" (batch statistics, rows updated in place), "batch" (batch statistics, no update)
or "running" (normalise with the rows). Returns logits (B, num_classes).
"""

import torch
import torch.nn.functional as F
from torch.func import functional_call

from mamlpp_ext.model.schedules import epoch_plan

DT = torch.float64


def forward_task(net, x, weights, gammas, betas, running_means=None, running_vars=None, mode="train"):
    layers = net.bn_layers

    def bn(i, h, slope):
        rm = running_means[i] if running_means is not None else None
        rv = running_vars[i] if running_vars is not None else None
        if mode == "running":
            out = F.batch_norm(h, rm, rv, gammas[i], betas[i], training=False, eps=layers[i].eps)
        elif mode == "batch" or rm is None:
            out = F.batch_norm(h, None, None, gammas[i], betas[i], training=True, eps=layers[i].eps)
        else:
            out = F.batch_norm(h, rm, rv, gammas[i], betas[i], training=True, momentum=layers[i].momentum,
                               eps=layers[i].eps)
        return out if slope is None else F.leaky_relu(out, slope)

    return net.forward(x[None], [w[None] for w in weights], bn)[0]


def random_batch(cfg, T=None, seed=1, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    T = T or cfg.meta_batch

    def labels(per_class):
        base = torch.arange(cfg.ways).repeat_interleave(per_class)
        return torch.stack([base[torch.randperm(len(base), generator=g)] for _ in range(T)])

    sy, qy = labels(cfg.shots), labels(cfg.queries)
    sx = torch.randn(T, sy.shape[1], *cfg.image_shape, generator=g, dtype=dtype)
    qx = torch.randn(T, qy.shape[1], *cfg.image_shape, generator=g, dtype=dtype)
    return sx, sy, qx, qy


def functional_call_meta_loss(module, learner, batch, epoch):
    """The MAML++ meta-loss computed with the user's module itself, task after task, through
    torch.func.functional_call: fast weights and per-step BN rows substituted by name, the BN
    running-statistics rows updated in place by the module's own batch norm."""
    cfg = learner.config
    plan = epoch_plan(cfg, epoch)
    names = learner.net.weight_names
    bns = learner.bn_layers
    rm = [None if t is None else t.clone() for t in learner.running_mean]
    rv = [None if t is None else t.clone() for t in learner.running_var]
    module.train()
    sx, sy, qx, qy = batch

    def forward(x, fast, step):
        params = dict(zip(names, fast))
        buffers = {}
        for j, layer in enumerate(bns):
            if layer.affine:
                r = min(step, learner.bn_weight[j].shape[0] - 1)
                params[f"{layer.name}.weight"] = learner.bn_weight[j][r]
                params[f"{layer.name}.bias"] = learner.bn_bias[j][r]
            if layer.track_running_stats:
                rs = min(step, rm[j].shape[0] - 1)
                buffers[f"{layer.name}.running_mean"] = rm[j][rs]
                buffers[f"{layer.name}.running_var"] = rv[j][rs]
        return functional_call(module, (params, buffers), (x,))

    losses = []
    for t in range(sx.shape[0]):
        fast = list(learner.theta)
        task = 0.0
        for i in range(cfg.inner_steps):
            loss = F.cross_entropy(forward(sx[t], fast, i), sy[t])
            grads = torch.autograd.grad(loss, fast, create_graph=plan.second_order)
            fast = [p - learner.lslr[k, i] * g for k, (p, g) in enumerate(zip(fast, grads))]
            if plan.score_every_step or i == cfg.inner_steps - 1:
                task = task + plan.loss_weights[i] * F.cross_entropy(forward(qx[t], fast, i), qy[t])
        losses.append(task)
    return torch.stack(losses).mean(), rm, rv
