"""EMA of trainable weights: hand values, fp32 shadows, swap in/out, state round trip, clear errors."""

import pytest
import torch

from geoloc.train.ema import EMA


class Two(torch.nn.Module):
    """One trainable scalar weight and one frozen one."""

    def __init__(self, value: float = 0.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([value]))
        self.frozen = torch.nn.Parameter(torch.tensor([7.0]), requires_grad=False)


def _set(model, value):
    with torch.no_grad():
        model.w.fill_(value)


def test_hand_values_decay_half():
    model = Two(0.0)
    ema = EMA(model, decay=0.5)
    _set(model, 2.0)
    ema.update(model)  # 0.5 * 0 + 0.5 * 2
    assert ema.shadow["w"].item() == pytest.approx(1.0)
    _set(model, 4.0)
    ema.update(model)  # 0.5 * 1 + 0.5 * 4
    assert ema.shadow["w"].item() == pytest.approx(2.5)
    assert ema.num_updates == 2


def test_only_trainable_params_are_shadowed():
    assert set(EMA(Two(), 0.9).shadow) == {"w"}


def test_shadow_is_fp32_and_keeps_small_steps_of_a_bf16_model():
    model = Two(1.0).to(torch.bfloat16)
    ema = EMA(model, decay=0.999)
    _set(model, 1.0078125)  # next bf16 value above 1
    ema.update(model)
    assert ema.shadow["w"].dtype == torch.float32
    # 1 + 0.001 * 0.0078125: lost if the shadow were bf16
    assert ema.shadow["w"].item() == pytest.approx(1.0 + 0.001 * 0.0078125, rel=1e-7)


def test_apply_to_swaps_in_and_restores_even_on_error():
    model = Two(0.0)
    ema = EMA(model, 0.5)
    _set(model, 2.0)
    ema.update(model)
    _set(model, 10.0)
    with ema.apply_to(model):
        assert model.w.item() == pytest.approx(1.0)
    assert model.w.item() == pytest.approx(10.0)
    with pytest.raises(RuntimeError, match="boom"), ema.apply_to(model):
        raise RuntimeError("boom")
    assert model.w.item() == pytest.approx(10.0)


def test_state_dict_roundtrip():
    model = Two(0.0)
    ema = EMA(model, 0.5)
    _set(model, 2.0)
    ema.update(model)
    other = EMA(Two(5.0), 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.shadow["w"].item() == pytest.approx(1.0)
    assert (other.decay, other.num_updates) == (0.5, 1)
    bad = {"decay": 0.5, "num_updates": 0, "shadow": {"x": torch.zeros(1)}}
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict(bad)


def test_unfreezing_after_build_is_an_error():
    model = Two()
    ema = EMA(model, 0.9)
    model.frozen.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        ema.update(model)


def test_wrapped_model_matches_plain_names():
    model = Two(0.0)
    ema = EMA(model, 0.5)
    _set(model, 2.0)
    ema.update(torch.compile(model))  # wrapper prefixes names with _orig_mod.; not run, so no compile cost
    assert ema.shadow["w"].item() == pytest.approx(1.0)


def test_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        EMA(Two(), 1.0)
