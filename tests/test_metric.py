"""Metric learning on location (geoloc.metric, the ``metric`` head): bands, neighbouring states from a
BallTree, the three losses, the UCB bandit, mining over a gathered batch, the config keys."""

import json
import math

import numpy as np
import pytest
import torch

from geoloc.config import ConfigError, load_config
from geoloc.geo import haversine_km
from geoloc.metric import (
    BANDS,
    MetricMiner,
    MetricSettings,
    UCBBandit,
    location_tables,
    metric_loss,
    neighbouring_classes,
    pair_masks,
    positive_rate,
)

# four places: A and B 100 km apart in class 0; C in class 0, 900 km from A; D in class 1 (a neighbour of 0),
# 500 km from A; E in class 2 (not a neighbour), far away
POINTS = torch.tensor(
    [[40.0, -100.0], [40.9, -100.0], [48.1, -100.0], [40.0, -94.1], [30.0, -80.0]], dtype=torch.float64
)
LABELS = torch.tensor([0, 0, 0, 1, 2])
NEIGHBOURS = torch.tensor([[False, True, False], [True, False, False], [False, False, False]])


def test_pair_masks_split_the_negatives_into_bands_by_state_and_distance():
    pos, bands = pair_masks(POINTS, LABELS, slice(0, 5), NEIGHBOURS, d_pos_km=250.0)
    d = haversine_km(POINTS[:, None, 0], POINTS[:, None, 1], POINTS[None, :, 0], POINTS[None, :, 1])
    assert d[0, 1] < 250 < d[0, 3] < d[0, 2]  # the layout the rows below rely on
    assert pos[0].tolist() == [False, True, False, False, False]  # never itself
    assert bands["hard"][0].tolist() == [False, False, True, False, False]  # same state, far
    assert bands["medium"][0].tolist() == [False, False, False, True, False]  # neighbouring state
    assert bands["easy"][0].tolist() == [False, False, False, False, True]  # any other state
    assert torch.equal(bands["all"], bands["hard"] | bands["medium"] | bands["easy"])
    assert not (bands["hard"] & bands["medium"]).any() and not (bands["all"] & pos).any()
    assert not bands["all"].diagonal().any() and not pos.diagonal().any()
    pos1, bands1 = pair_masks(POINTS, LABELS, slice(3, 5), NEIGHBOURS, 250.0)  # another rank's anchors
    assert torch.equal(pos1, pos[3:5]) and all(torch.equal(bands1[b], bands[b][3:5]) for b in BANDS)


@pytest.mark.parametrize("radius", [150.0, 400.0, 3000.0])
def test_neighbouring_classes_and_positive_rate_match_brute_force(radius):
    rng = np.random.default_rng(0)
    latlon = np.stack([rng.uniform(20, 65, 400), rng.uniform(-170, -70, 400)], 1)
    latlon[:5] = [[52.0, 179.5], [51.5, -179.5], [60.0, -150.0], [21.0, -157.0], [64.0, -160.0]]  # AK, HI
    classes = np.digitize(latlon[:, 1], [-150, -130, -110, -90])  # longitude bands 0-4: few neighbours
    classes[:2] = 5  # a class whose points wrap around the antimeridian
    d = haversine_km(latlon[:, None, 0], latlon[:, None, 1], latlon[None, :, 0], latlon[None, :, 1])
    want = np.array([[d[classes == a][:, classes == b].min() <= radius for b in range(6)] for a in range(6)])
    np.fill_diagonal(want, False)
    got = neighbouring_classes(latlon, classes, 6, radius)
    assert np.array_equal(got, want) and got.any()
    assert not want[0, 4] or radius > 1000  # bands 1500+ km apart are no neighbours at short range
    share = ((d <= radius).sum(1) - 1).mean() / 399
    assert positive_rate(latlon, radius) == pytest.approx(share, rel=1e-9)


def test_neighbouring_states_from_training_points_follow_the_real_outlines():
    from geoloc.geography import sample_points

    names = ["Kansas", "Missouri", "Nebraska", "Colorado", "Oklahoma", "Maine", "Florida"]
    rng = np.random.default_rng(0)
    latlon = np.concatenate([sample_points(n, 150, rng) for n in names])
    classes = np.repeat(np.arange(len(names)), 150)
    tables = location_tables(latlon, classes, len(names), neighbour_km=100.0, d_pos_km=250.0)
    near = {names[j] for j in np.flatnonzero(tables.neighbours[0])}
    assert near == {"Missouri", "Nebraska", "Colorado", "Oklahoma"}  # Kansas's four neighbours here
    assert not tables.neighbours[5].any() and not tables.neighbours[6].any()  # Maine, Florida: none here
    assert np.array_equal(tables.neighbours, tables.neighbours.T) and not tables.neighbours.diagonal().any()
    assert 0 < tables.expected_positives(64) < 63


# ----------------------------------------------------------------------------- losses


def _embedding(good: bool) -> torch.Tensor:
    """Unit vectors of the five places: ``good`` puts A and B together and the others apart."""
    base = torch.eye(5, 8, dtype=torch.float32)
    if good:
        base[1] = base[0] + 0.1 * base[1]
    else:
        base[2] = base[0] + 0.1 * base[2]  # the far same-state place C sits on A, B apart
    return torch.nn.functional.normalize(base, dim=1)


@pytest.mark.parametrize("kind", ["triplet", "multi_similarity", "infonce"])
def test_each_loss_prefers_an_embedding_where_near_places_are_close(kind):
    pos, bands = pair_masks(POINTS.float(), LABELS, slice(0, 5), NEIGHBOURS, 250.0)
    losses = {}
    for good in (True, False):
        z = _embedding(good)
        per_anchor, valid = metric_loss(kind, z @ z.T, pos, bands["all"], margin=0.2, temperature=0.1)
        assert valid.tolist() == [True, True, False, False, False]  # only A and B have a positive
        assert (per_anchor[~valid] == 0).all()
        losses[good] = per_anchor[valid].mean().item()
    assert losses[True] < losses[False]


def test_triplet_is_the_hand_computed_batch_hard_value():
    sim = torch.tensor([[1.0, 0.6, 0.3, 0.5], [0.6, 1.0, 0.1, 0.2]])
    pos = torch.tensor([[False, True, False, False], [True, False, False, False]])
    neg = torch.tensor([[False, False, True, True], [False, False, True, False]])
    per_anchor, valid = metric_loss("triplet", sim, pos, neg, margin=0.2, temperature=1.0)
    assert valid.tolist() == [True, True]
    torch.testing.assert_close(per_anchor, torch.tensor([0.5 - 0.6 + 0.2, 0.0]))  # relu(0.1 - 0.6 + 0.2)


@pytest.mark.parametrize("kind", ["triplet", "multi_similarity", "infonce"])
def test_a_batch_without_triplets_gives_zero_with_finite_zero_gradients(kind):
    z = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    none = torch.zeros(4, 4, dtype=torch.bool)
    per_anchor, valid = metric_loss(kind, z @ z.T, none, ~torch.eye(4, dtype=torch.bool), 0.2, 0.1)
    loss = (per_anchor * valid).sum() / valid.sum().clamp_min(1)
    loss.backward()  # still attached to z: DDP sees every metric parameter used
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all() and (z.grad == 0).all()


# ----------------------------------------------------------------------------- the bandit


def test_bandit_tries_every_band_then_prefers_the_one_that_pays():
    bandit = UCBBandit(("hard", "medium", "easy"), c=0.5)
    payout = {0: 0.01, 1: 0.05, 2: 0.0}
    rng = np.random.default_rng(0)
    picks = []
    for _ in range(300):
        arm = bandit.choose()
        bandit.pulled(arm)
        bandit.update(arm, payout[arm] + rng.normal(0, 0.01))
        picks.append(arm)
    assert picks[:3] == [0, 1, 2]  # each band once, in order
    assert picks[-100:].count(1) > 80 and min(bandit.counts) >= 2  # mostly the best, the others explored


def test_bandit_state_round_trips_through_json_bit_for_bit():
    bandit = UCBBandit(("hard", "easy"), c=1.0)
    for i in range(7):
        arm = bandit.choose()
        bandit.pulled(arm)
        bandit.update(arm, math.sin(i) / 3)
    back = UCBBandit.from_dict(json.loads(json.dumps(bandit.state_dict())))
    assert back == bandit
    for i in range(20):  # both continue identically
        arms = [b.choose() for b in (bandit, back)]
        assert arms[0] == arms[1]
        for b in (bandit, back):
            b.pulled(arms[0])
            b.update(arms[0], math.cos(i))
    assert back.state_dict() == bandit.state_dict()


# ----------------------------------------------------------------------------- the miner


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    latlon = torch.stack([torch.rand(n, generator=g) * 6 + 38, torch.rand(n, generator=g) * 8 - 100], 1)
    return {"latlon": latlon, "label": torch.randint(0, 3, (n,), generator=g)}


SETTINGS = MetricSettings(kind="infonce", d_pos_km=400.0)


def test_mining_over_a_gathered_batch_keeps_gradients_on_the_local_rows():
    """Two simulated ranks: each scores its own anchors against both batches; the gradient on its own
    rows equals the one-process computation's on those rows (other ranks' rows are constants)."""
    full = _batch(8)
    z = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    rows = torch.cat([z, full["latlon"], full["label"][:, None].float()], 1)
    for rank in (0, 1):
        mine = slice(4 * rank, 4 * rank + 4)
        miner = MetricMiner(SETTINGS, NEIGHBOURS, gather=lambda local, rows=rows: rows.clone(), rank=rank)
        local = z[mine].clone().requires_grad_()
        terms = miner(local, {k: v[mine] for k, v in full.items()})
        terms["loss"].backward()

        ref_z = z.clone().requires_grad_()  # one process holding both batches, anchors of this rank
        pos, bands = pair_masks(full["latlon"], full["label"], mine, NEIGHBOURS, SETTINGS.d_pos_km)
        per_anchor, valid = metric_loss("infonce", ref_z[mine] @ ref_z.T, pos, bands["hard"], 0.2, 0.1)
        ref = (per_anchor * valid).sum() / valid.sum().clamp_min(1)
        ref.backward()
        assert terms["band_hard"].item() == 1.0  # the first band on a fresh bandit
        torch.testing.assert_close(terms["loss"], ref)
        torch.testing.assert_close(local.grad, ref_z.grad[mine])


def test_every_rank_makes_the_same_band_choices():
    """Both simulated ranks see the same gathered batches, so their bandits stay identical."""
    batches = [_batch(8, seed) for seed in range(12)]
    zs = [torch.nn.functional.normalize(torch.randn(8, 16), dim=1) for _ in batches]
    states = []
    for rank in (0, 1):
        miner = MetricMiner(SETTINGS, NEIGHBOURS, rank=rank)
        miner.gather = None
        bands = []
        for b, z in zip(batches, zs):
            rows = torch.cat([z, b["latlon"], b["label"][:, None].float()], 1)
            miner.gather = lambda local, rows=rows: rows.clone()
            mine = slice(4 * rank, 4 * rank + 4)
            terms = miner(z[mine], {k: v[mine] for k, v in b.items()})
            bands.append([terms[f"band_{n}"].item() for n in SETTINGS.bands])
        states.append((bands, json.dumps(miner.state_dict())))
    assert states[0] == states[1]
    assert json.loads(states[0][1])["bandit"]["updates"] > 0  # the bandit did learn from rewards


def test_miner_state_restores_the_bandit_and_its_pending_reward():
    miner = MetricMiner(SETTINGS, NEIGHBOURS)
    for seed in range(5):
        b = _batch(8, seed)
        miner(torch.nn.functional.normalize(torch.randn(8, 16), dim=1), b)
    saved = json.loads(json.dumps(miner.state_dict()))
    assert saved["pending"] is not None and sum(saved["bandit"]["counts"]) == 5
    fresh = MetricMiner(SETTINGS, NEIGHBOURS)
    fresh.load_state_dict(saved)
    z, b = torch.nn.functional.normalize(torch.randn(8, 16), dim=1), _batch(8, 9)
    assert {k: v.item() for k, v in fresh(z, b).items()} == {k: v.item() for k, v in miner(z, b).items()}
    assert fresh.state_dict() == miner.state_dict()
    with pytest.raises(ValueError, match="arms"):
        MetricMiner(MetricSettings(bands=("easy",)), NEIGHBOURS).load_state_dict(saved)


# ----------------------------------------------------------------------------- config


def test_metric_and_vae_heads_are_off_by_default_and_their_keys_are_checked():
    cfg = load_config()
    assert "metric" not in cfg.model.heads and "vae" not in cfg.model.heads
    cfg = load_config(overrides=["model.heads=[state,gps,metric]", "loss.metric_bands=[hard,easy]"])
    assert cfg.loss.metric_bands == ["hard", "easy"] and cfg.loss.metric_loss == "infonce"
    for bad, words in (
        ("loss.metric_bands=[hard,near]", ["loss.metric_bands", "'near'"]),
        ("loss.metric_bands=[hard,hard]", ["give each band once"]),
        ("loss.metric_loss=arcface", ["loss.metric_loss", "infonce"]),
        ("loss.metric_d_pos_km=0", ["loss.metric_d_pos_km", "> 0"]),
        ("loss.vae_kl_weight=-1", ["loss.vae_kl_weight", ">= 0"]),
    ):
        with pytest.raises(ConfigError) as err:
            load_config(overrides=[bad])
        assert all(w in str(err.value) for w in words), str(err.value)
