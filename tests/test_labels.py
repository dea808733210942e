"""LabelEncoder: non-consecutive original state indices <-> contiguous classes, saved and reloaded."""

import numpy as np
import pytest

from geoloc.labels import LabelEncoder


def test_fit_sorts_and_encodes_non_consecutive_indices():
    enc = LabelEncoder.fit([41, 3, 17, 3, 41], {3: "California", 17: "Kansas", 41: "Tennessee"})
    assert enc.state_indices == (3, 17, 41)
    assert enc.state_names == ("California", "Kansas", "Tennessee")
    assert enc.num_classes == 3
    np.testing.assert_array_equal(enc.encode([41, 3, 17]), [2, 0, 1])
    np.testing.assert_array_equal(enc.decode([2, 0, 1]), [41, 3, 17])


def test_decode_keeps_minus_one_padding():
    enc = LabelEncoder.fit([5, 9])
    np.testing.assert_array_equal(enc.decode([[1, 0, -1, -1, -1]]), [[9, 5, -1, -1, -1]])


def test_unknown_state_is_named():
    enc = LabelEncoder.fit([5, 9])
    with pytest.raises(KeyError, match="state index 7"):
        enc.encode([5, 7])


def test_round_trip(tmp_path):
    enc = LabelEncoder.fit([12, 0, 49], {0: "Alabama", 12: "Idaho", 49: "Wyoming"})
    enc.save(tmp_path / "enc.json")
    assert LabelEncoder.load(tmp_path / "enc.json") == enc
    assert LabelEncoder.from_dict(enc.to_dict()) == enc


def test_rejects_duplicates():
    with pytest.raises(ValueError, match="duplicated"):
        LabelEncoder((1, 1), ("a", "b"))
