"""Test helper: one task through a network's functional forward, with batch norm done by
``F.batch_norm`` directly (an independent check of the per-step batch-norm contract).

``forward_task(net, x, weights, gammas, betas, running_means, running_vars, mode)``: x (B, C, H, W),
weights without a task dim, per BN layer γ/β (C,) and running-statistics rows (C,) or None;
mode "train" (batch statistics, rows updated in place), "batch" (batch statistics, no update)
or "running" (normalise with the rows). Returns logits (B, num_classes).
"""

import torch.nn.functional as F


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
