"""Warm-up + cosine schedule: hand values of the factor and per-group lrs through LambdaLR."""

import itertools
import math

import pytest
import torch

from geoloc.train.schedule import lr_factor, make_scheduler


def test_warmup_is_linear_and_peaks_at_its_last_step():
    # total 10, warm-up 4: updates 0..3 run at 1/4, 2/4, 3/4, 4/4 of the peak
    assert [lr_factor(s, 10, 4) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_factor(4, 10, 4) == pytest.approx(1.0)  # first decay update: cos(0)


def test_cosine_midpoint_and_end():
    # decay spans steps 4..10; midpoint step 7 is halfway between 1 and min_ratio
    assert lr_factor(7, 10, 4, min_ratio=0.1) == pytest.approx(0.55)
    assert lr_factor(9, 10, 4, min_ratio=0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 5 / 6)))
    assert lr_factor(10, 10, 4, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(25, 10, 4, min_ratio=0.1) == pytest.approx(0.1)  # past the end: stays at the floor
    assert lr_factor(10, 10, 4) == pytest.approx(0.0)


def test_decay_is_monotone():
    values = [lr_factor(s, 100, 10, 0.05) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert min(values) >= 0.05


def test_edge_cases():
    assert lr_factor(0, 10, 0) == pytest.approx(1.0)  # no warm-up: start at the peak
    assert lr_factor(0, 1, 0) == pytest.approx(1.0)  # a single update runs at the peak
    assert lr_factor(0, 1, 1) == pytest.approx(1.0)
    assert lr_factor(4, 5, 5) == pytest.approx(1.0)  # all warm-up
    for bad in [(0, 0), (5, 6)]:
        with pytest.raises(ValueError, match="steps"):
            lr_factor(0, *bad)
    with pytest.raises(ValueError, match="min_ratio"):
        lr_factor(0, 5, 1, min_ratio=1.5)


def _two_group_optimizer():
    head, backbone = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    groups = [{"params": head.parameters(), "lr": 1e-3}, {"params": backbone.parameters(), "lr": 1e-5}]
    return torch.optim.AdamW(groups)


def test_scheduler_scales_each_group_and_keeps_ratios():
    opt = _two_group_optimizer()
    sched = make_scheduler(opt, total_steps=8, warmup_steps=2, min_ratio=0.1)
    seen = []
    for step in range(8):
        lrs = [g["lr"] for g in opt.param_groups]  # lr used by update `step`
        seen.append(lrs)
        factor = lr_factor(step, 8, 2, 0.1)
        assert lrs == pytest.approx([1e-3 * factor, 1e-5 * factor])
        opt.step()
        sched.step()
    assert seen[0][0] == pytest.approx(0.5e-3)  # first update is not wasted at lr 0
    assert seen[1][0] == pytest.approx(1e-3)  # peak at the end of warm-up
    assert all(head / backbone == pytest.approx(100.0) for head, backbone in seen)


def test_scheduler_state_roundtrip():
    opt = _two_group_optimizer()
    sched = make_scheduler(opt, 8, 2)
    for _ in range(5):
        opt.step()
        sched.step()
    opt2 = _two_group_optimizer()
    sched2 = make_scheduler(opt2, 8, 2)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == 5
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
