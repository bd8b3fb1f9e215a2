"""MAML++ on networks that are graphs, not chains (lifting.LiftedNet), and the built-in conv4 and
ResNet-12 (networks.py).

The core check: the lifted network's meta-loss, every meta-gradient and (sequential backend) the
running statistics equal running the module itself task by task through
torch.func.functional_call (float64, second order, MSL on and off), for a graph with residual
additions, per-task concatenations, functional activations, shared layers and a batch norm whose
output has two users; for a residual network written the usual way; for ResNet-12 at small widths
and images; and for conv4 — on every backend. Then: the table drives the error messages and the
docs, what cannot be lifted is named, the networks travel through config, checkpoints and the CLI.
"""

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mamlpp_ext
from _nets import DT, functional_call_meta_loss, random_batch
from mamlpp_ext.model import MAMLConfig, MAMLPlusPlus, from_preset
from mamlpp_ext.model.lifting import LAYERS, SUPPORTED_LAYERS, LiftedNet, supported_table_markdown
from mamlpp_ext.model.networks import NETWORKS, Conv4Net, ResNet12Net, conv4_module, resnet12_module
from backend_cases import backend_params

needs_ext = pytest.mark.skipif(not mamlpp_ext.has_extension(), reason="compiled mamlpp_ext extension not built")
BACKENDS = backend_params()

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # conftest.py


class ConcatNet(nn.Module):
    """A graph with most of what the lifter knows: per-task channel concatenation of three
    tensors, feature concatenation, functional activations (fused and not), a batch norm whose
    output has two users (not fused), a convolution called twice (tied weights), residual
    addition, scalar arithmetic, tanh/sigmoid, grouped convolution, global mean, view-flatten
    and BatchNorm1d."""

    def __init__(self, c_in=2, ways=3):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(c_in, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.branch_a, self.bn_a = nn.Conv2d(4, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3, momentum=0.3)
        self.branch_b = nn.Conv2d(4, 5, 1)
        self.bn_cat = nn.BatchNorm2d(12)
        self.mix = nn.Conv2d(12, 6, 3, padding=1, groups=2)
        self.shared = nn.Conv2d(6, 6, 3, padding=1)
        self.bn_feat = nn.BatchNorm1d(30)
        self.head = nn.Linear(30, ways)

    def forward(self, x):
        h = torch.relu(self.bn0(self.stem(x)))  # fused
        n = self.bn_a(self.branch_a(h))
        a = F.leaky_relu(n, 0.2) + 0.5 * n  # the batch norm has two users: not fused
        b = torch.tanh(self.branch_b(h))
        c = F.relu(self.bn_cat(torch.cat([h, a, b], dim=1)))  # per-task concatenation, then fused
        d = F.max_pool2d(self.mix(c), 2)
        d = d + self.shared(F.relu(self.shared(d))).sigmoid()  # one convolution, called twice
        g = torch.cat([d.mean((2, 3)), torch.flatten(F.avg_pool2d(d, 2), 1)], dim=1)  # features 6 + 24
        g = self.bn_feat(g.view(g.size(0), -1))
        return self.head(F.silu(g))


class UserResNet(nn.Module):
    """A residual network written the usual way: a block class, one activation module used three
    times, ``out += identity``, an identity shortcut and a projection shortcut, x.view flatten."""

    class Block(nn.Module):
        def __init__(self, c_in, c_out):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
            self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
            self.relu = nn.LeakyReLU(0.1, inplace=True)
            self.down = None if c_in == c_out else nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False),
                                                                 nn.BatchNorm2d(c_out))

        def forward(self, x):
            identity = x if self.down is None else self.down(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += identity
            return self.relu(out)

    def __init__(self, c_in=1, ways=3):
        super().__init__()
        self.layer1 = self.Block(c_in, 4)
        self.layer2 = self.Block(4, 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, ways)

    def forward(self, x):
        x = self.pool(self.layer2(self.layer1(x)))
        return self.fc(x.view(x.size(0), -1))


USER_NETS = {"concat": (ConcatNet, (2, 8, 8)), "user_resnet": (UserResNet, (1, 8, 8))}
BUILTIN = {  # built-in networks at small widths and images
    "resnet12": dict(network="resnet12", network_widths=(3, 4, 5, 4), image_channels=3, image_height=16,
                     image_width=16),
    "conv4": dict(network="conv4", network_widths=(4, 5, 4, 3), image_channels=1, image_height=16, image_width=16),
}
SMALL = dict(ways=3, shots=2, queries=2, meta_batch=3, inner_steps=2, eval_inner_steps=2, msl_epochs=3, seed=0)


def randomize(learner, seed=5):
    """Non-trivial θ₀ biases, BN γ/β rows and LSLR rates, so that every path of the graph matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in learner.theta:
            if t.dim() == 1:
                t.copy_(torch.empty(t.shape, dtype=DT).uniform_(-0.2, 0.2, generator=g))
        for w, b in zip(learner.bn_weight, learner.bn_bias):
            if w is not None:
                w.copy_(torch.empty(w.shape, dtype=DT).uniform_(0.5, 1.5, generator=g))
                b.copy_(torch.empty(b.shape, dtype=DT).uniform_(-0.3, 0.3, generator=g))
        learner.lslr.copy_(torch.empty(learner.lslr.shape, dtype=DT).uniform_(0.05, 0.15, generator=g))


def build(name, backend):
    """(the module to compare against, the learner) for a user net or a built-in one."""
    if name in USER_NETS:
        factory, (c, h, w) = USER_NETS[name]
        torch.manual_seed(0)
        module = factory(c, 3).to(DT)
        cfg = MAMLConfig(**SMALL, image_channels=c, image_height=h, image_width=w, network="custom")
        learner = MAMLPlusPlus(cfg, backend=backend, dtype=DT, network=module)
    else:
        cfg = MAMLConfig(**SMALL, **BUILTIN[name])
        learner = MAMLPlusPlus(cfg, backend=backend, dtype=DT)
        widths = cfg.network_widths
        module = (resnet12_module(cfg.image_channels, 3, widths) if name == "resnet12" else
                  conv4_module(cfg.image_channels, cfg.image_height, cfg.image_width, 3, widths))
        module = module.to_empty(device="cpu").to(DT)  # every tensor is substituted by the reference
    randomize(learner)
    return module, learner


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(USER_NETS) + list(BUILTIN))
def test_lifted_graph_matches_functional_call(name, backend):
    module, learner = build(name, backend)
    batch = random_batch(learner.config)
    for epoch in (0, 5):  # MSL on, then the final step only; second order in both
        expect, rm, rv = functional_call_meta_loss(module, learner, batch, epoch)
        got, _ = learner.meta_loss(*batch, epoch=epoch)
        torch.testing.assert_close(got, expect, rtol=1e-9, atol=1e-10)
        params = learner.parameters()
        g_got = torch.autograd.grad(got, params)
        g_exp = torch.autograd.grad(expect, params)
        for (pname, _), a, b in zip(learner.named_parameters(), g_got, g_exp):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=lambda m: f"{pname}: {m}")
            assert b.abs().sum() > 0, f"{pname}: zero meta-gradient, the test would not see an error"
        if backend == "sequential":  # task after task: the same running statistics
            for a, b in zip(learner.running_stats, [t for t in rm + rv if t is not None]):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["batched", pytest.param("fused", marks=needs_ext)])
def test_split_convolution_layout_on_a_graph(backend):
    _, learner = build("concat", backend)
    batch = random_batch(learner.config)
    grouped = learner.meta_loss(*batch, epoch=0)[0]
    g_grouped = torch.autograd.grad(grouped, learner.parameters())
    learner.net.conv_layout = "split"
    split = learner.meta_loss(*batch, epoch=0)[0]
    torch.testing.assert_close(split, grouped, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(split, learner.parameters()), g_grouped):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def spy_slopes(net, shape, T=2):
    """The negative_slope of every bn call of one forward (None: no activation fused)."""
    calls = []

    def bn(i, h, slope):
        calls.append((i, slope))
        return h

    x = torch.randn(T, 2, *shape)
    net.forward(x, [torch.randn(T, *s) for s in net.weight_shapes], bn)
    return calls


def test_activation_fusion_follows_the_graph():
    net = LiftedNet(ConcatNet(), (2, 8, 8))
    names = [b.name for b in net.bn_layers]
    assert names == ["bn0", "bn_a", "bn_cat", "bn_feat"]
    assert spy_slopes(net, (2, 8, 8)) == [(0, 0.0), (1, None), (2, 0.0), (3, None)]
    assert net.weight_names == ["stem.weight", "stem.bias", "branch_a.weight", "branch_b.weight", "branch_b.bias",
                                "mix.weight", "mix.bias", "shared.weight", "shared.bias", "head.weight",
                                "head.bias"]  # the shared convolution once
    resnet = ResNet12Net(3, 16, 16, 5, widths=(2, 3, 4, 5))
    per_block = [0.1, 0.1, None, None]  # conv1, conv2 fused; conv3 and the shortcut before the sum: not
    assert [s for _, s in spy_slopes(resnet, (3, 16, 16))] == per_block * 4


def test_a_lifted_network_deep_copies():
    import copy

    net = LiftedNet(ConcatNet().to(DT), (2, 8, 8))
    x = torch.randn(3, 4, 2, 8, 8, dtype=DT)
    w = [torch.randn(3, *s, dtype=DT) for s in net.weight_shapes]

    def bn(i, h, slope):
        return h if slope is None else F.leaky_relu(h, slope)

    expect = net.forward(x, w, bn)
    for other in (copy.deepcopy(net),):
        assert other.code == net.code and other.weight_names == net.weight_names
        torch.testing.assert_close(other.forward(x, w, bn), expect, rtol=0, atol=0)
        other.conv_layout = "split"  # the copy's own generated forward follows its own setting
        torch.testing.assert_close(other.forward(x, w, bn), expect, rtol=1e-12, atol=1e-12)
        assert net.conv_layout == "grouped" and other._run is not net._run


def test_resnet12_follows_the_published_shape():
    net = ResNet12Net.from_config(from_preset("mini-imagenet-5way-1shot-resnet12"))
    assert net.widths == (64, 160, 320, 640) and len(net.weight_names) == 18 and len(net.bn_layers) == 16
    c = 3
    for i, w in enumerate((64, 160, 320, 640)):
        shapes = dict(zip(net.weight_names, net.weight_shapes))
        assert shapes[f"block{i}.conv1.weight"] == (w, c, 3, 3)
        assert shapes[f"block{i}.conv2.weight"] == shapes[f"block{i}.conv3.weight"] == (w, w, 3, 3)
        assert shapes[f"block{i}.shortcut_conv.weight"] == (w, c, 1, 1)
        c = w
    assert net.weight_shapes[-2:] == [(5, 640), (5,)]
    module = resnet12_module(3, 5)
    lifted = sum(torch.Size(s).numel() for s in net.weight_shapes) + 2 * sum(net.bn_channels)
    assert lifted == sum(p.numel() for p in module.parameters()) and 12.4e6 < lifted < 12.5e6  # nothing left out
    feats, module = torch.empty(2, 3, 84, 84, device="meta"), module.to("meta")
    for i in range(4):
        feats = getattr(module, f"block{i}")(feats)
    assert tuple(feats.shape) == (2, 640, 5, 5)  # 84 -> 42 -> 21 -> 10 -> 5, then global average pooling


def test_builtin_initialisation():
    net = ResNet12Net(3, 32, 32, 5)
    g = torch.Generator().manual_seed(1)
    ws = net.init_weights(generator=g, dtype=DT)
    again = net.init_weights(generator=torch.Generator().manual_seed(1), dtype=DT)
    assert all(torch.equal(a, b) for a, b in zip(ws, again))
    conv = dict(zip(net.weight_names, ws))["block3.conv2.weight"]  # fan-out 640·9: std √(2/5760)
    assert abs(conv.std().item() / (2 / (640 * 9)) ** 0.5 - 1) < 0.02 and abs(conv.mean().item()) < 1e-3
    assert torch.count_nonzero(ws[-1]) == 0 and ws[-2].abs().max() <= (6 / (640 + 5)) ** 0.5
    c4 = Conv4Net(1, 28, 28, 5, widths=(64,) * 4)
    w0 = c4.init_weights(generator=torch.Generator().manual_seed(1))[0]
    assert w0.abs().max() <= (6 / (9 + 64 * 9)) ** 0.5 and w0.std() > 0


def test_conv4_widths_follow_the_dataset():
    assert Conv4Net.from_config(from_preset("omniglot-5way-1shot", network="conv4")).widths == (64,) * 4
    mi = Conv4Net.from_config(from_preset("mini-imagenet-5way-1shot", network="conv4"))
    assert mi.widths == (32,) * 4 and mi.weight_shapes[-2] == (5, 32 * 5 * 5)
    assert [s for _, s in spy_slopes(Conv4Net(1, 16, 16, 3, widths=(2, 2, 2, 2)), (1, 16, 16))] == [0.0] * 4


def test_supported_table_drives_messages_and_docs():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "networks.md").read_text()
    assert supported_table_markdown() in docs, "docs/networks.md's table is stale: paste supported_table_markdown()"
    seen = set()
    for rule in LAYERS:
        for key in rule.modules + rule.functions + tuple(("method", m) for m in rule.methods):
            assert key not in seen, f"{key} is in two rules"
            seen.add(key)
    with pytest.raises(ValueError) as info:
        LiftedNet(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Softmax(1), nn.Flatten(), nn.Linear(72, 3)), (1, 8, 8))
    assert "'1' (Softmax) is not supported" in str(info.value)
    assert all(name in str(info.value) for name in SUPPORTED_LAYERS)


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(128, 3)

    def forward(self, x):
        h = self.conv(x)
        if h.mean() > 0:  # data-dependent control flow
            h = -h
        return self.fc(h.flatten(1))


class Looping(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        return torch.stack([self.fc(row.flatten()) for row in x])


class Wrap(nn.Module):
    """A module from a forward function (for the rejection cases)."""

    def __init__(self, fn, c=1):
        super().__init__()
        self.fn = fn
        self.conv, self.conv2, self.fc = nn.Conv2d(c, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Linear(4 * 64, 3)
        self.bn = nn.BatchNorm2d(4)
        self.w = nn.Parameter(torch.randn(4, c, 3, 3))

    def forward(self, x):
        return self.fn(self, x)


def test_what_cannot_be_lifted_is_named():
    with pytest.raises(ValueError, match="control flow") as info:
        LiftedNet(Branching(), (1, 8, 8))
    assert "test_graph_networks.py" in str(info.value) and "if h.mean() > 0" in str(info.value)
    with pytest.raises(ValueError, match="network: the forward of Looping"):
        LiftedNet(Looping(), (1, 8, 8))
    cases = [
        (lambda s, x: s.fc(torch.softmax(s.conv(x), 1).flatten(1)), "(torch.softmax) is not supported"),
        (lambda s, x: s.fc(F.conv2d(x, s.w, padding=1).flatten(1)), "reads the parameter, buffer or constant 'w'"),
        (lambda s, x: s.fc((s.conv(x) + s.conv(x)[:, :1]).flatten(1)), "indexes or slices a tensor"),
        (lambda s, x: s.fc((s.conv(x) * x).flatten(1)), "must agree in batch and channel size"),
        (lambda s, x: s.fc(s.conv(x).mean(1).flatten(1).repeat(1, 4)), "only the spatial mean"),
        (lambda s, x: s.fc(s.conv(x).view(2, 4, -1).flatten(1)), "reshapes (2, 4, 8, 8) to (2, 4, 64)"),
        (lambda s, x: (s.fc(s.conv(x).flatten(1)), x), "must return one tensor of logits"),
        (lambda s, x: s.fc(s.conv(x)), "must come after nn.Flatten()"),
        (lambda s, x: s.conv2(s.conv(x).flatten(1)), "must come before nn.Flatten() (on images)"),
        (lambda s, x: s.fc((s.conv(x) + s.conv(x).mean((2, 3))).flatten(1)),
         "combines an image tensor with a feature"),
        (lambda s, x: s.fc(F.max_pool2d(s.conv(x), 1, return_indices=True)[0].flatten(1)),
         "(torch.nn.functional.max_pool2d_with_indices) is not supported"),
        (lambda s, x: s.fc(F.dropout(s.conv(x), 0.5, training=True).flatten(1)), "Dropout(p=0.5)"),
        (lambda s, x: s.fc(F.relu(s.conv(x)).flatten(1) * x.size(1)), "computes with a size"),
    ]
    for fn, words in cases:
        with pytest.raises(ValueError, match="network: ") as info:
            LiftedNet(Wrap(fn), (1, 8, 8))
        assert words in str(info.value), (words, str(info.value))

    def in_place_then_read(s, x):
        h = s.conv(x)
        y = h.relu_()  # changes h ...
        return s.fc((y + h).flatten(1))  # ... and h is read again: out of place would differ

    with pytest.raises(ValueError, match="changes its input in place"):
        LiftedNet(Wrap(in_place_then_read), (1, 8, 8))

    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x

    with pytest.raises(ValueError, match="only argument"):
        LiftedNet(TwoInputs(), (1, 8, 8))
    with pytest.raises(ValueError, match="does not accept images of shape"):
        LiftedNet(UserResNet(), (3, 8, 8))
    with pytest.raises(TypeError, match="nn.Module"):
        LiftedNet(lambda x: x, (1, 8, 8))


def test_in_place_forms_run_out_of_place():
    def fn(s, x):
        h = s.conv(x)
        h = F.relu(h, inplace=True)
        h = h.add_(1.0)  # in place, but nothing reads the old h afterwards
        return s.fc(torch.relu_(h).flatten(1))

    module = Wrap(fn).to(DT)
    net = LiftedNet(module, (1, 8, 8))
    x = torch.randn(1, 3, 1, 8, 8, dtype=DT)
    got = net.forward(x, [t[None] for t in net.init_weights(dtype=DT)], lambda i, h, s: h)
    torch.testing.assert_close(got[0], module(x[0]), rtol=1e-12, atol=1e-12)


def test_config_records_the_network():
    cfg = MAMLConfig(network="resnet12", network_widths=[8, 16], image_height=16, image_width=16)
    assert cfg.network_widths == (8, 16)
    assert MAMLConfig.from_dict(cfg.to_dict()) == cfg
    assert MAMLConfig(network="conv4", network_widths="4, 5,6").network_widths == (4, 5, 6)  # as --set gives it
    old = from_preset("omniglot-5way-1shot").to_dict()
    del old["network_widths"]  # a config stored before the field existed
    assert MAMLConfig.from_dict(old).network_widths is None
    for kw, words in [
        (dict(network="resnet12", network_widths=[8, 0]), "network_widths must be None or a non-empty list"),
        (dict(network="conv4", network_widths="a,b"), "network_widths must be None"),
        (dict(network="conv4", network_widths=32), "network_widths must be None"),
        (dict(network="vgg", network_widths=[8]), "does not apply to network='vgg'"),
        (dict(network="resnet12", image_height=8, image_width=8), "image_height=8 is too small for the 4 stages"),
        (dict(network="resnet13"), "must be one of ['conv4', 'resnet12', 'vgg'], 'custom'"),
    ]:
        with pytest.raises(ValueError, match="MAMLConfig.") as info:
            MAMLConfig(**kw)
        assert words in str(info.value)
    assert set(NETWORKS) == {"vgg", "conv4", "resnet12"}
    for shots in (1, 5):
        p = from_preset(f"mini-imagenet-5way-{shots}shot-resnet12")
        assert (p.network, p.meta_batch, p.inner_steps, p.second_order, p.shots, p.queries) == (
            "resnet12", 2, 5, True, shots, 15)


def test_builtin_network_rebuilds_from_a_checkpoint():
    cfg = MAMLConfig(**SMALL, **BUILTIN["resnet12"])
    a = MAMLPlusPlus(cfg, backend="batched", dtype=DT)
    batch = random_batch(cfg)
    a.meta_step(*batch, epoch=0)
    b = MAMLPlusPlus.from_state_dict(a.state_dict())
    assert isinstance(b.net, ResNet12Net) and b.net.widths == (3, 4, 5, 4) and b.config.network == "resnet12"
    torch.testing.assert_close(a.evaluate(*batch)["logits"], b.evaluate(*batch)["logits"], rtol=0, atol=0)


@pytest.mark.usefixtures("tmp_cache")  # fake_root and tmp_cache: conftest.py
@pytest.mark.parametrize("network", ["resnet12", "conv4"])
def test_cli_trains_resumes_and_evaluates_a_builtin_network(tmp_path, fake_root, network):
    from mamlpp_ext.training import evaluate as E
    from mamlpp_ext.training import train as T

    run = tmp_path / "run"
    sets = ["--set=ways=3", "--set=shots=1", "--set=queries=1", "--set=meta_batch=2", "--set=inner_steps=1",
            "--set=eval_inner_steps=1", "--set=network_widths=2,3,2,2"]
    common = ["--dataset-root", str(fake_root), "--split", "lake", "--lake-val-alphabets", "1", "--allow-partial-data",
              "--eval-tasks", "2", "--backend", "batched", "--run-dir", str(run), "--no-progress", "--no-tensorboard"]
    assert T.main([*sets, "--network", network, "--epochs", "2", "--iters-per-epoch", "1",
                   "--stop-at-iteration", "1", *common]) == 0
    stored = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert stored["config"]["network"] == network and tuple(stored["config"]["network_widths"]) == (2, 3, 2, 2)
    assert T.main(["--resume", *common]) == 0  # rebuilt from the stored config
    assert E.main([str(run), "--tasks", "2", "--output", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    with pytest.raises(SystemExit):
        T.main(["--network", "resnet13", "--run-dir", str(tmp_path / "bad"), "--no-progress"])
    assert "resnet12" in T.make_parser().format_help()
