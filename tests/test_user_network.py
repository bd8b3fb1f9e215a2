"""MAML++ on a user's own nn.Sequential (network.SequentialNet): the lifted network's meta-loss,
meta-gradients and running statistics equal running the user's module task by task with
torch.func.functional_call (float64, second order, MSL), for several layer mixes and every
backend; unsupported layers are rejected by name; the network travels through config,
checkpoints and the CLI.
"""

import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import mamlpp_ext
from mamlpp_ext.model import MAMLConfig, MAMLPlusPlus
from mamlpp_ext.model.network import SUPPORTED_LAYERS, SequentialNet, TaskNetwork, VGGNet
from _nets import functional_call_meta_loss, random_batch
from backend_cases import backend_params
from mamlpp_ext.model import BACKENDS as BACKENDS_TABLE
from mamlpp_ext.model.lifting import CONV_LAYOUTS

DT = torch.float64
needs_ext = pytest.mark.skipif(not mamlpp_ext.has_extension(), reason="compiled mamlpp_ext extension not built")
BACKENDS = backend_params()


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # conftest.py


def four_conv_relu(c_in=1, ways=3, filters=8):
    """The '4-conv with ReLU' of many MAML papers (32 filters there; fewer here for speed)."""
    layers = []
    for i in range(4):
        layers += [nn.Conv2d(c_in if i == 0 else filters, filters, 3, padding=1), nn.BatchNorm2d(filters), nn.ReLU(),
                   nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters, ways))


def no_pooling(c_in=1, ways=3):
    """Strided convolutions, no max-pooling; a bias-free conv; a BN without affine; global pooling."""
    return nn.Sequential(
        nn.Conv2d(c_in, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6, momentum=0.3), nn.LeakyReLU(0.2),
        nn.Conv2d(6, 5, 5, padding=2, bias=False), nn.BatchNorm2d(5, affine=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, ways))


def grouped_mlp_head(c_in=2, ways=3):
    """Grouped and dilated convolutions, average pooling, dropout p=0, a nested Sequential, and an
    MLP head with BatchNorm1d; a BN not followed by an activation."""
    return nn.Sequential(
        nn.Conv2d(c_in, 4, 3, padding=2, dilation=2, groups=2), nn.BatchNorm2d(4, eps=1e-3),
        nn.Sequential(nn.ReLU(), nn.AvgPool2d(2)),
        nn.Conv2d(4, 6, 3, stride=1, padding="same", groups=2), nn.LeakyReLU(0.1), nn.Dropout(0.0),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, ways))


def image_mlp(c_in=1, ways=3):
    """No convolution at all: flatten the image, then Linear -> BatchNorm1d -> LeakyReLU -> Linear."""
    return nn.Sequential(nn.Flatten(), nn.Linear(c_in * 8 * 8, 9), nn.BatchNorm1d(9), nn.LeakyReLU(0.05),
                         nn.Identity(), nn.Linear(9, ways))


NETS = {
    "four_conv_relu": (four_conv_relu, (1, 16, 16)),
    "no_pooling": (no_pooling, (1, 12, 12)),
    "grouped_mlp_head": (grouped_mlp_head, (2, 8, 8)),
    "image_mlp": (image_mlp, (1, 8, 8)),
}


def make(name, seed=0, **cfg_kw):
    factory, (c, h, w) = NETS[name]
    torch.manual_seed(seed)
    module = factory(c_in=c, ways=3).to(DT)
    with torch.no_grad():  # non-trivial BN affine and biases so that every path matters
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.uniform_(-0.2, 0.2)
    cfg = MAMLConfig(**{**dict(ways=3, shots=2, queries=2, meta_batch=3, image_channels=c, image_height=h,
                               image_width=w, inner_steps=2, eval_inner_steps=2, msl_epochs=3, seed=0,
                               network="custom"), **cfg_kw})
    return module, cfg


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("net", list(NETS))
def test_lifted_network_matches_functional_call(net, backend):
    module, cfg = make(net)
    learner = MAMLPlusPlus(cfg, backend=backend, dtype=DT, network=module)
    batch = random_batch(cfg)
    for epoch in (0, 5):  # MSL active, then final step only
        expect, rm, rv = functional_call_meta_loss(module, learner, batch, epoch)
        got, _ = learner.meta_loss(*batch, epoch=epoch)
        torch.testing.assert_close(got, expect, rtol=1e-9, atol=1e-10)
        params = learner.parameters()
        g_got = torch.autograd.grad(got, params)
        g_exp = torch.autograd.grad(expect, params)
        for (name, _), a, b in zip(learner.named_parameters(), g_got, g_exp):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")
            assert b.abs().sum() > 0, f"{name}: zero meta-gradient, the test would not see an error"
        if backend == "sequential":  # task after task: the same running statistics
            for a, b in zip(learner.running_stats, [t for t in rm + rv if t is not None]):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_user_network_trains_and_evaluates(backend):
    module, cfg = make("four_conv_relu", meta_batch=4)
    learner = MAMLPlusPlus(cfg, backend=backend, dtype=DT, network=module)
    batch = random_batch(cfg, seed=3)
    before = learner.evaluate(*batch)["loss"]
    for _ in range(12):
        learner.meta_step(*batch, epoch=0)
    after = learner.evaluate(*batch)
    assert after["loss"] < before and after["logits"].shape == (4, 6, 3)
    fast = learner.adapt(batch[0], batch[1])
    assert set(fast) == set(learner.net.weight_names)
    torch.testing.assert_close(learner.predict(batch[2], fast), after["logits"], rtol=1e-9, atol=1e-9)


def test_the_user_module_is_theta0_and_left_untouched():
    module, cfg = make("no_pooling")
    snapshot = {k: v.clone() for k, v in module.state_dict().items()}
    learner = MAMLPlusPlus(cfg, backend="batched", dtype=DT, network=module)
    named = dict(module.named_parameters())
    for name, t in zip(learner.net.weight_names, learner.theta):
        assert torch.equal(t.detach(), named[name].detach()) and t.data_ptr() != named[name].data_ptr()
    assert torch.equal(learner.bn_weight[0][1], named["1.weight"].detach())  # every step row starts there
    assert learner.bn_weight[1] is None and learner.running_mean[1] is not None  # affine=False keeps stats
    learner.meta_step(*random_batch(cfg), epoch=0)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in snapshot.items())


def test_state_dict_round_trip_with_a_user_network():
    module, cfg = make("grouped_mlp_head")
    a = MAMLPlusPlus(cfg, backend="batched", dtype=DT, network=module)
    a.meta_step(*random_batch(cfg), epoch=0)
    assert a.config.network == "custom"
    with pytest.raises(ValueError, match="pass the same network="):
        MAMLPlusPlus.from_state_dict(a.state_dict())
    b = MAMLPlusPlus.from_state_dict(a.state_dict(), network=module)
    batch = random_batch(cfg, seed=7)
    torch.testing.assert_close(a.evaluate(*batch)["logits"], b.evaluate(*batch)["logits"], rtol=0, atol=0)


def test_unsupported_layers_are_rejected_by_name():
    cases = [
        (nn.Sequential(nn.Conv2d(1, 4, 3), nn.PReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)), "'1' (PReLU)"),
        (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(256, 3)),
         "padding_mode='reflect'"),
        (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Dropout(0.5), nn.Flatten(), nn.Linear(144, 3)), "Dropout(p=0.5)"),
        (nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.Flatten(), nn.Linear(144, 3)),
         "momentum=None"),
        (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(start_dim=2), nn.Linear(36, 3)), "start_dim=2"),
    ]
    for module, words in cases:
        with pytest.raises(ValueError, match="network: ") as info:
            SequentialNet(module, (1, 8, 8))
        assert words in str(info.value)
    with pytest.raises(ValueError) as info:
        SequentialNet(nn.Sequential(nn.Conv2d(1, 4, 3), nn.PReLU()), (1, 8, 8))
    assert all(layer in str(info.value) for layer in SUPPORTED_LAYERS)
    with pytest.raises(TypeError, match="nn.Sequential"):
        SequentialNet(nn.Linear(3, 3), (1, 8, 8))


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="does not accept images of shape"):
        SequentialNet(nn.Sequential(nn.Flatten(), nn.Linear(10, 3)), (1, 8, 8))
    with pytest.raises(ValueError, match="missing Flatten"):
        SequentialNet(nn.Sequential(nn.Conv2d(1, 3, 8)), (1, 8, 8))
    module, cfg = make("image_mlp")
    with pytest.raises(ValueError, match="3 outputs but the config has ways=5"):
        MAMLPlusPlus(cfg.replace(ways=5), network=module)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        MAMLPlusPlus(cfg.replace(bn_eval_stats="running"),
                     network=nn.Sequential(nn.Flatten(), nn.Linear(64, 3),
                                           nn.BatchNorm1d(3, track_running_stats=False)))
    with pytest.raises(ValueError, match="affine=True"):
        MAMLPlusPlus(cfg.replace(adapt_bn_affine=True, per_step_bn_weights=False),
                     network=nn.Sequential(nn.Flatten(), nn.Linear(64, 3), nn.BatchNorm1d(3, affine=False)))


def test_vgg_is_a_lifted_sequential():
    net = VGGNet(1, 28, 28, 5)
    assert isinstance(net, SequentialNet) and isinstance(net, TaskNetwork)
    assert net.weight_names[:2] == ["conv0.weight", "conv0.bias"] and [b.name for b in net.bn_layers] == [
        "bn0", "bn1", "bn2", "bn3"]


NETWORK_MODULE = '''
import torch.nn as nn

def small_convnet(config):
    """A user network for the tests: called with the run's MAMLConfig."""
    return nn.Sequential(nn.Conv2d(config.image_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * (config.image_height // 2) * (config.image_width // 2), config.ways))
'''


def test_network_named_in_the_config(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(textwrap.dedent(NETWORK_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = MAMLConfig(ways=3, shots=1, queries=1, meta_batch=2, image_height=8, image_width=8, inner_steps=1,
                     eval_inner_steps=1, network="my_nets:small_convnet")
    learner = MAMLPlusPlus(cfg, backend="batched")
    assert learner.net.weight_names == ["0.weight", "0.bias", "5.weight", "5.bias"]
    again = MAMLPlusPlus.from_state_dict(learner.state_dict())  # rebuilt from the stored config
    assert again.net.weight_names == learner.net.weight_names
    with pytest.raises(ValueError, match="cannot import it"):
        MAMLPlusPlus(cfg.replace(network="my_nets:nope"))
    with pytest.raises(ValueError, match="import path"):
        MAMLConfig(network="my_nets.small_convnet")
    sys.modules.pop("my_nets", None)


@pytest.mark.usefixtures("tmp_cache")  # fake_root and tmp_cache: conftest.py
def test_cli_trains_and_evaluates_a_user_network(tmp_path, monkeypatch, fake_root):
    from mamlpp_ext.training import evaluate as E
    from mamlpp_ext.training import train as T

    code = tmp_path / "code"
    code.mkdir()
    (code / "cli_nets.py").write_text(textwrap.dedent(NETWORK_MODULE))
    monkeypatch.chdir(code)  # the CLI imports --network from the current folder
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(code))])
    run = tmp_path / "run"
    sets = ["--set=ways=3", "--set=shots=1", "--set=queries=1", "--set=meta_batch=2", "--set=inner_steps=1",
            "--set=eval_inner_steps=1"]
    common = ["--dataset-root", str(fake_root), "--split", "lake", "--lake-val-alphabets", "1", "--allow-partial-data"]
    assert T.main([*sets, "--network", "cli_nets:small_convnet", "--epochs", "2", "--iters-per-epoch", "2",
                   "--eval-tasks", "4", "--backend", "batched", "--run-dir", str(run), "--no-progress",
                   "--no-tensorboard", *common]) == 0
    stored = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert stored["config"]["network"] == "cli_nets:small_convnet"
    assert E.main([str(run), "--tasks", "4", "--output", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    with pytest.raises(SystemExit):  # a network that does not import is a usage error naming it
        T.main([*sets, "--network", "cli_nets:missing", "--run-dir", str(tmp_path / "bad"), "--no-progress",
                *common])
    sys.modules.pop("cli_nets", None)


def test_layers_on_the_wrong_side_of_flatten_are_rejected_when_lifting():
    for module, words in [
        (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Linear(6, 3)), "'1' (Linear) must come after nn.Flatten()"),
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.BatchNorm2d(4)), "'2' (BatchNorm2d) must come before"),
        (nn.Sequential(nn.Flatten(), nn.MaxPool2d(2)), "'1' (MaxPool2d) must come before"),
        (nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(144, 3)),
         "'1' (BatchNorm1d) must come after"),
    ]:
        with pytest.raises(ValueError, match="network: ") as info:
            SequentialNet(module, (1, 8, 8))
        assert words in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_leaky_relu_after_batch_norm_runs_unfused(backend):
    """LeakyReLU(-0.1) after a batch norm cannot be fused (the op needs slope >= 0): it runs as its
    own layer, and the result still equals the user's module."""
    torch.manual_seed(3)
    module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(-0.1), nn.Flatten(),
                           nn.Linear(4 * 8 * 8, 3)).to(DT)
    cfg = MAMLConfig(ways=3, shots=2, queries=2, meta_batch=2, image_height=8, image_width=8, inner_steps=2,
                     eval_inner_steps=2, msl_epochs=3, network="custom")
    learner = MAMLPlusPlus(cfg, backend=backend, dtype=DT, network=module)
    batch = random_batch(cfg)
    expect, _, _ = functional_call_meta_loss(module, learner, batch, 0)
    torch.testing.assert_close(learner.meta_loss(*batch, epoch=0)[0], expect, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("layout", [pytest.param(n, marks=needs_ext) if n == "task_conv" else n
                                    for n in CONV_LAYOUTS if n != "grouped"])
@pytest.mark.parametrize("backend", backend_params(per_task=False))
def test_convolution_layouts_equal_grouped(backend, layout):
    """Every convolution layout (NOTE [Convolution layout]) gives ATen's grouped convolution's
    loss and meta-gradients (float64, second order), on each batched backend."""
    module, cfg = make("grouped_mlp_head")
    learner = MAMLPlusPlus(cfg, backend=backend, dtype=DT, network=module)
    assert learner.net.conv_layout == BACKENDS_TABLE[backend].conv_layout  # the backend's by default
    batch = random_batch(cfg)
    learner.net.conv_layout = "grouped"
    grouped = learner.meta_loss(*batch, epoch=0)[0]
    g_grouped = torch.autograd.grad(grouped, learner.parameters())
    learner.net.conv_layout = layout
    other = learner.meta_loss(*batch, epoch=0)[0]
    torch.testing.assert_close(other, grouped, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(other, learner.parameters()), g_grouped):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    learner.net.conv_layout = None  # back to the backend's
    assert learner.net.conv_layout == BACKENDS_TABLE[backend].conv_layout
    with pytest.raises(ValueError, match="conv_layout must be one of"):
        learner.net.conv_layout = "bogus"
