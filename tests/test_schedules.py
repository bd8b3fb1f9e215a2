"""MSL weights, DA predicate and CA meta learning rate (SPEC §3)."""

import math

import pytest

from mamlpp_ext.model.config import MAMLConfig
from mamlpp_ext.model.schedules import cosine_meta_lr, loss_weights, meta_lr_at, msl_weights, use_second_order


@pytest.mark.parametrize("epoch,non_final,final", [(0, 0.2, 0.2), (5, 0.10, 0.60), (9, 0.02, 0.92)])
def test_msl_matches_spec_table(epoch, non_final, final):
    w = msl_weights(5, epoch, 10)
    assert len(w) == 5
    assert w[:4] == pytest.approx([non_final] * 4, abs=1e-12)
    assert w[4] == pytest.approx(final, abs=1e-12)


def test_msl_floor_and_ceiling():
    # far past the decay, non-final weights stop at m = 0.03/S and the final one at 1 - (S-1)m
    w = msl_weights(5, 40, 10)
    assert w[:4] == pytest.approx([0.006] * 4, abs=1e-15)
    assert w[4] == pytest.approx(1 - 4 * 0.006, abs=1e-15)


@pytest.mark.parametrize("S,E", [(1, 10), (2, 3), (5, 10), (5, 15), (7, 4)])
def test_msl_weights_formula_and_sum(S, E):
    for e in range(0, 2 * E + 2):
        w = msl_weights(S, e, E)
        d, m = 1.0 / (S * E), 0.03 / S
        for i in range(S - 1):
            assert w[i] == pytest.approx(max(1.0 / S - e * d, m), abs=1e-15)
        assert w[-1] == pytest.approx(min(1.0 / S + e * (S - 1) * d, 1 - (S - 1) * m), abs=1e-15)
        assert sum(w) == pytest.approx(1.0, abs=1e-12)


def test_loss_weights_phase_rules():
    assert loss_weights(5, 3, use_msl=True, msl_epochs=10, training=True) == msl_weights(5, 3, 10)
    final_only = [0.0, 0.0, 0.0, 0.0, 1.0]
    assert loss_weights(5, 10, use_msl=True, msl_epochs=10, training=True) == final_only
    assert loss_weights(5, 3, use_msl=True, msl_epochs=10, training=False) == final_only
    assert loss_weights(5, 3, use_msl=False, msl_epochs=10, training=True) == final_only
    assert loss_weights(1, 0, use_msl=True, msl_epochs=10, training=True) == [1.0]


def test_da_predicate():
    assert use_second_order(True, 0, -1)
    assert not use_second_order(False, 100, -1)
    assert not use_second_order(True, 50, 50)
    assert use_second_order(True, 51, 50)
    assert not use_second_order(True, 0, 0)


def test_ca_formula():
    b0, bmin, E = 1e-3, 1e-5, 100
    assert cosine_meta_lr(0, b0, bmin, E) == pytest.approx(b0, rel=1e-15)
    assert cosine_meta_lr(E, b0, bmin, E) == pytest.approx(bmin, rel=1e-12)
    assert cosine_meta_lr(E // 2, b0, bmin, E) == pytest.approx((b0 + bmin) / 2, rel=1e-12)
    for e in (1, 17, 63, 99):
        expect = bmin + 0.5 * (b0 - bmin) * (1 + math.cos(math.pi * e / E))
        assert cosine_meta_lr(e, b0, bmin, E) == pytest.approx(expect, rel=1e-14)
    lrs = [cosine_meta_lr(e, b0, bmin, E) for e in range(E + 1)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_meta_lr_at_config():
    c = MAMLConfig(meta_lr=2e-3, min_meta_lr=1e-4, total_epochs=10)
    assert meta_lr_at(c, 5) == pytest.approx(1e-4 + 0.5 * (2e-3 - 1e-4), rel=1e-14)
    off = MAMLConfig(meta_lr=2e-3, min_meta_lr=1e-4, total_epochs=10, cosine_annealing=False)
    assert meta_lr_at(off, 5) == 2e-3
    same = MAMLConfig(meta_lr=1e-3, min_meta_lr=1e-3)  # the public mini-ImageNet setting: no annealing
    assert meta_lr_at(same, 37) == pytest.approx(1e-3, rel=1e-15)
