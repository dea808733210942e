"""Losses against hand values, gradient flow, and the combined loss's weights and logged terms."""

import math

import pytest
import torch

from geoloc.config import LossConfig
from geoloc.geo import EARTH_RADIUS_KM
from geoloc.losses import SMOOTH_L1_BETA, combined_loss, gps_loss, soft_cross_entropy

KM_PER_DEG = math.pi * EARTH_RADIUS_KM / 180  # ~111.195 km


def test_soft_ce_uniform_logits_one_hot_is_log_c():
    logits = torch.zeros(3, 7)
    target = torch.eye(7)[[0, 3, 6]]
    assert soft_cross_entropy(logits, target).item() == pytest.approx(math.log(7))


def test_soft_ce_hand_computed_batch_mean():
    # row 0: softmax([0, ln 2]) = [1/3, 2/3], target [1/2, 1/2] -> -(ln(1/3) + ln(2/3)) / 2
    # row 1: logits [0, 0] -> [1/2, 1/2], target [1, 0] -> ln 2
    logits = torch.tensor([[0.0, math.log(2)], [0.0, 0.0]])
    target = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    row0 = -(math.log(1 / 3) + math.log(2 / 3)) / 2
    assert soft_cross_entropy(logits, target).item() == pytest.approx((row0 + math.log(2)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="differ"):
        soft_cross_entropy(logits, target[:, :1])


def test_haversine_loss_one_degree():
    pred = torch.tensor([[41.0, -100.0], [30.0, -90.0]])
    target = torch.tensor([[40.0, -100.0], [30.0, -90.0]])  # 1 degree of latitude, then 0 km
    assert gps_loss(pred, target, "haversine").item() == pytest.approx(KM_PER_DEG / 2 / 5000, rel=1e-5)


def test_normalised_losses_hand_values():
    # 9 degrees of latitude and 18 of longitude are both 0.1 after lat/90, lon/180
    pred, target = torch.tensor([[9.0, -82.0]]), torch.tensor([[0.0, -100.0]])
    assert gps_loss(pred, target, "mse").item() == pytest.approx(0.01, rel=1e-5)
    assert gps_loss(pred, target, "mae").item() == pytest.approx(0.1, rel=1e-5)
    # |0.1| > beta: linear branch |x| - beta / 2
    assert gps_loss(pred, target, "smooth_l1").item() == pytest.approx(0.1 - SMOOTH_L1_BETA / 2, rel=1e-5)
    # 0.45 degrees of latitude = 0.005 < beta: quadratic 0.5 x^2 / beta, averaged with the zero lon term
    small = gps_loss(torch.tensor([[0.45, 0.0]]), torch.zeros(1, 2), "smooth_l1").item()
    assert small == pytest.approx(0.5 * 0.005**2 / SMOOTH_L1_BETA / 2, rel=1e-4)
    with pytest.raises(ValueError, match="choose one of"):
        gps_loss(pred, target, "huber")


def _batch(b=4, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g, requires_grad=True)
    latlon = torch.stack([torch.rand(b, generator=g) * 20 + 28, -torch.rand(b, generator=g) * 50 - 70], 1)
    gps = (latlon + torch.randn(b, 2, generator=g)).requires_grad_()
    label = torch.arange(b) % c
    soft = torch.softmax(torch.randn(b, c, generator=g), -1)
    return logits, gps, label, latlon, soft


@pytest.mark.parametrize("kind", ["mse", "mae", "smooth_l1", "haversine"])
def test_combined_weights_terms_and_gradients(kind):
    logits, gps, label, latlon, soft = _batch()
    cfg = LossConfig(gps_loss=kind, cls_weight=0.3, gps_weight=2.0)
    total, terms = combined_loss(logits, gps, label, latlon, soft, cfg)
    assert set(terms) == {"loss_cls", "loss_gps", "loss"}
    assert all(not t.requires_grad and t.dim() == 0 for t in terms.values())
    assert terms["loss_cls"].item() == pytest.approx(soft_cross_entropy(logits, soft).item())
    assert terms["loss_gps"].item() == pytest.approx(gps_loss(gps, latlon, kind).item())
    expected = 0.3 * terms["loss_cls"].item() + 2.0 * terms["loss_gps"].item()
    assert total.item() == pytest.approx(expected) and terms["loss"].item() == pytest.approx(expected)
    total.backward()
    for grad in (logits.grad, gps.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_combined_zero_weight_blocks_gradient_and_one_hot_default():
    logits, gps, label, latlon, _ = _batch()
    total, terms = combined_loss(logits, gps, label, latlon, None, LossConfig(cls_weight=1.0, gps_weight=0.0))
    total.backward()
    assert gps.grad.abs().sum() == 0 and logits.grad.abs().sum() > 0
    one_hot = torch.nn.functional.one_hot(label, 5).float()
    assert terms["loss_cls"].item() == pytest.approx(soft_cross_entropy(logits, one_hot).item())


def test_haversine_gradient_finite_at_exact_prediction():
    latlon = torch.tensor([[40.0, -100.0], [35.0, -80.0]])
    gps = latlon.clone().requires_grad_()
    loss = gps_loss(gps, latlon, "haversine")
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(gps.grad).all()


def test_bf16_inputs_give_float32_losses():
    logits, gps, label, latlon, soft = _batch()
    total, _ = combined_loss(logits.bfloat16(), gps.bfloat16(), label, latlon, soft, LossConfig())
    assert total.dtype == torch.float32 and torch.isfinite(total)
