"""Losses against hand values, gradient flow, and the criterion's weights and named terms."""

import math

import pytest
import torch

from geoloc.geo import EARTH_RADIUS_KM, distance_matrix, haversine_km, make_soft_labels
from geoloc.heads import Targets
from geoloc.losses import SMOOTH_L1_BETA, Criterion, gps_loss, soft_cross_entropy

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


def _targets(kind="haversine", cells=None, tau=75.0):
    centroids = torch.tensor([[30.0, -90.0], [35.0, -100.0], [40.0, -80.0], [45.0, -110.0], [33.0, -84.0]])
    return Targets(centroids, distance_matrix(centroids), cells, "sample", tau, kind)


@pytest.mark.parametrize("kind", ["mse", "mae", "smooth_l1", "haversine"])
def test_criterion_weights_named_terms_and_gradients(kind):
    logits, gps, label, latlon, _ = _batch()
    targets = _targets(kind)
    criterion = Criterion(["state", "gps"], {"state": 0.3, "gps": 2.0, "cell": 9.0}, targets)
    terms = criterion({"state": logits, "gps": gps, "embedding": None}, {"label": label, "latlon": latlon})
    assert set(terms) == {"loss", "loss_state", "loss_gps"}  # only the model's heads, named by head
    soft = make_soft_labels("sample", label, latlon, targets.centroids, targets.dist, 75.0)
    assert terms["loss_state"].item() == pytest.approx(soft_cross_entropy(logits, soft).item())
    assert terms["loss_gps"].item() == pytest.approx(gps_loss(gps, latlon, kind).item())
    expected = 0.3 * terms["loss_state"].item() + 2.0 * terms["loss_gps"].item()
    assert terms["loss"].item() == pytest.approx(expected)
    terms["loss"].backward()
    for grad in (logits.grad, gps.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_zero_weight_blocks_gradient():
    logits, gps, label, latlon, _ = _batch()
    criterion = Criterion(["state", "gps"], {"state": 1.0, "gps": 0.0}, _targets())
    criterion({"state": logits, "gps": gps}, {"label": label, "latlon": latlon})["loss"].backward()
    assert gps.grad.abs().sum() == 0 and logits.grad.abs().sum() > 0


def test_cell_term_is_cross_entropy_against_haversine_smoothed_cells():
    cells = torch.tensor([[30.0, -90.0], [31.0, -90.0], [45.0, -110.0]])  # (K, 2)
    latlon = torch.tensor([[30.1, -90.0], [44.0, -109.0]])
    logits = torch.randn(2, 3, requires_grad=True)
    terms = Criterion(["cell"], {"cell": 1.0}, _targets(cells=cells, tau=50.0))(
        {"cell": logits}, {"label": torch.tensor([0, 3]), "latlon": latlon}
    )
    d = haversine_km(latlon[:, None, 0], latlon[:, None, 1], cells[None, :, 0], cells[None, :, 1])
    want = torch.softmax(-d / 50.0, -1)  # (2, 3): nearest cell gets most of the mass
    assert want[0].argmax() == 0 and want[1].argmax() == 2
    assert terms["loss_cell"].item() == pytest.approx(soft_cross_entropy(logits, want).item(), rel=1e-6)


def test_a_head_without_a_weight_is_refused():
    with pytest.raises(ValueError, match=r"no weight for head\(s\) \['cell'\]"):
        Criterion(["state", "cell"], {"state": 1.0}, _targets())


def test_haversine_gradient_finite_at_exact_prediction():
    latlon = torch.tensor([[40.0, -100.0], [35.0, -80.0]])
    gps = latlon.clone().requires_grad_()
    loss = gps_loss(gps, latlon, "haversine")
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(gps.grad).all()


def test_bf16_inputs_give_float32_losses():
    logits, gps, label, latlon, _ = _batch()
    criterion = Criterion(["state", "gps"], {"state": 0.8, "gps": 0.2}, _targets())
    total = criterion(
        {"state": logits.bfloat16(), "gps": gps.bfloat16()}, {"label": label, "latlon": latlon}
    )["loss"]
    assert total.dtype == torch.float32 and torch.isfinite(total)
