"""MAMLConfig: presets (SPEC §4), overrides, validation and (de)serialisation."""

import json

import pytest

from mamlpp_ext.model.config import MAMLConfig, from_preset, preset_names

SIX_COMPONENTS = ("use_msl", "per_step_bn_statistics", "per_step_bn_weights", "learnable_inner_lr",
                  "per_step_inner_lr", "cosine_annealing")


def test_every_public_setting_has_presets():
    names = set(preset_names())
    for base in ("omniglot-5way-1shot", "omniglot-5way-5shot", "omniglot-20way-1shot", "omniglot-20way-5shot",
                 "mini-imagenet-5way-1shot", "mini-imagenet-5way-5shot"):
        for suffix in ("", "-maml", "-fomaml"):
            assert base + suffix in names
            assert isinstance(from_preset(base + suffix), MAMLConfig)


@pytest.mark.parametrize("ways,shots", [(5, 1), (5, 5), (20, 1), (20, 5)])
def test_omniglot_presets_follow_spec(ways, shots):
    c = from_preset(f"omniglot-{ways}way-{shots}shot")
    assert (c.ways, c.shots, c.queries, c.meta_batch) == (ways, shots, 1, 8)
    assert c.image_shape == (1, 28, 28) and c.num_filters == 64 and c.num_stages == 4
    assert (c.inner_steps, c.eval_inner_steps, c.inner_lr) == (5, 5, 0.1)
    assert (c.meta_lr, c.min_meta_lr, c.total_epochs, c.iterations_per_epoch) == (1e-3, 1e-5, 100, 500)
    assert c.msl_epochs == 10 and c.grad_clamp is None
    assert all(getattr(c, n) for n in SIX_COMPONENTS) and c.second_order
    assert c.first_order_to_second_order_epoch == -1 and c.bn_eval_stats == "batch"


@pytest.mark.parametrize("shots", [1, 5])
def test_mini_imagenet_presets_follow_spec(shots):
    c = from_preset(f"mini-imagenet-5way-{shots}shot")
    assert (c.ways, c.shots, c.queries, c.meta_batch) == (5, shots, 15, 2)
    assert c.image_shape == (3, 84, 84) and c.num_filters == 48
    assert c.inner_lr == 0.01 and c.meta_lr == 1e-3 and c.min_meta_lr == 1e-3
    assert c.msl_epochs == 15 and c.grad_clamp == 10.0


def test_plain_maml_presets_switch_all_components_off():
    pp = from_preset("omniglot-20way-1shot")
    m = from_preset("omniglot-20way-1shot-maml")
    fo = from_preset("omniglot-20way-1shot-fomaml")
    assert not any(getattr(m, n) for n in SIX_COMPONENTS)
    assert m.second_order and not fo.second_order
    # same task shape and budget as the MAML++ preset
    for f in ("ways", "shots", "queries", "meta_batch", "image_height", "num_filters", "inner_steps", "inner_lr"):
        assert getattr(m, f) == getattr(pp, f)


def test_overrides_and_replace():
    c = from_preset("omniglot-5way-1shot", num_filters=8, inner_steps=3)
    assert c.num_filters == 8 and c.inner_steps == 3 and c.ways == 5
    d = c.replace(ways=3)
    assert d.ways == 3 and c.ways == 5
    with pytest.raises(ValueError, match="unknown MAMLConfig override"):
        from_preset("omniglot-5way-1shot", num_filter=8)
    with pytest.raises(ValueError, match="inner_steps"):
        c.replace(inner_steps=0)


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match=r"unknown preset 'omniglot-7way'.*known presets"):
        from_preset("omniglot-7way")


def test_dict_round_trip_through_json():
    c = from_preset("mini-imagenet-5way-5shot-maml", seed=7, bn_eval_stats="running")
    d = json.loads(json.dumps(c.to_dict()))
    assert MAMLConfig.from_dict(d) == c
    with pytest.raises(ValueError, match="unknown MAMLConfig key"):
        MAMLConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(TypeError, match="from_dict expects a dict"):
        MAMLConfig.from_dict([1, 2])


@pytest.mark.parametrize("field,value,exc,match", [
    ("ways", 0, ValueError, "ways must be >= 1"),
    ("shots", 1.5, TypeError, "shots must be an int"),
    ("queries", True, TypeError, "queries must be an int"),
    ("meta_batch", -2, ValueError, "meta_batch"),
    ("image_channels", 0, ValueError, "image_channels"),
    ("num_stages", 0, ValueError, "num_stages"),
    ("num_filters", 0, ValueError, "num_filters"),
    ("inner_steps", 0, ValueError, "inner_steps"),
    ("eval_inner_steps", 0, ValueError, "eval_inner_steps"),
    ("inner_lr", float("nan"), ValueError, "inner_lr must be finite"),
    ("meta_lr", 0.0, ValueError, "meta_lr must be >"),
    ("min_meta_lr", -1e-5, ValueError, "min_meta_lr"),
    ("min_meta_lr", 1.0, ValueError, "min_meta_lr .* must be <= meta_lr"),
    ("bn_momentum", 1.5, ValueError, "bn_momentum"),
    ("bn_eps", 0.0, ValueError, "bn_eps"),
    ("grad_clamp", -1.0, ValueError, "grad_clamp"),
    ("total_epochs", 0, ValueError, "total_epochs"),
    ("msl_epochs", -1, ValueError, "msl_epochs"),
    ("first_order_to_second_order_epoch", 1.0, TypeError, "first_order_to_second_order_epoch"),
    ("use_msl", 1, TypeError, "use_msl must be a bool"),
    ("second_order", "yes", TypeError, "second_order must be a bool"),
    ("bn_eval_stats", "moving", ValueError, "bn_eval_stats must be one of"),
    ("image_height", 8, ValueError, "image_height=8 is too small for num_stages=4"),
    ("seed", -1, ValueError, "seed"),
])
def test_rejected_values_name_the_field(field, value, exc, match):
    with pytest.raises(exc, match=match):
        MAMLConfig(**{field: value})


def test_adapt_bn_affine_needs_shared_bn_weights():
    with pytest.raises(ValueError, match="adapt_bn_affine"):
        MAMLConfig(adapt_bn_affine=True)
    assert MAMLConfig(adapt_bn_affine=True, per_step_bn_weights=False).adapt_bn_affine
