"""Decoders: head outputs -> state probabilities and a point, on hand-made outputs; the choices a model
cannot serve are refused naming the option; the post-training candidates and the decoder choice."""

import numpy as np
import pytest
import torch

from geoloc.config import DecodeConfig
from geoloc.decoders import Decoder, DecoderError
from geoloc.geo import haversine_km
from geoloc.geocells import GeoCells
from geoloc.labels import LabelEncoder
from geoloc.retrieval import EmbeddingIndex
from geoloc.train.index import candidates

ENCODER = LabelEncoder((3, 7, 12), ("A", "B", "C"))  # classes 0, 1, 2
# 4 cells: two in state 3 (class 0), one in 7, one in 12
CELLS = GeoCells(np.array([3, 3, 7, 12]), np.array([[30.0, -90.0], [31.0, -90.0], [40.0, -100.0], [45.0, -70.0]]),
                 np.array([30, 30, 40, 35]))  # fmt: skip


def _outputs(b=2):
    torch.manual_seed(0)
    return {
        "embedding": torch.randn(b, 8),
        "state": torch.randn(b, 3),
        "gps": torch.tensor([[35.0, -95.0]] * b),
        "cell": torch.tensor([[2.0, 1.0, 0.0, -1.0]] * b),
    }


def test_cells_state_probs_are_the_sums_of_each_states_cells():
    decode = Decoder(DecodeConfig(state="cells", gps="cell"), ["cell"], ENCODER, CELLS)
    out = decode(_outputs())
    cell = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0]), 0)
    want = torch.stack([cell[0] + cell[1], cell[2], cell[3]])
    torch.testing.assert_close(out["state_probs"][0], want)
    torch.testing.assert_close(out["gps"][0], torch.tensor([30.0, -90.0]))  # argmax cell's centroid


def test_bayes_point_has_a_lower_expected_distance_than_the_argmax_centroid():
    cells = GeoCells(np.array([3, 3, 7]), np.array([[30.0, -100.0], [30.0, -80.0], [45.0, -90.0]]),
                     np.array([30, 30, 30]))  # fmt: skip
    logits = torch.log(torch.tensor([[0.4, 0.35, 0.25]]))  # split posterior: the mode is not the best guess
    outs = {"embedding": torch.zeros(1, 8), "cell": logits}
    argmax = Decoder(DecodeConfig(state="cells", gps="cell"), ["cell"], ENCODER, cells)(outs)["gps"]
    bayes = Decoder(DecodeConfig(state="cells", gps="bayes"), ["cell"], ENCODER, cells)(outs)["gps"]
    w, pts = torch.tensor([0.4, 0.35, 0.25]), torch.as_tensor(cells.centroid, dtype=torch.float32)

    def expected_km(p):
        return (w * haversine_km(p[0, 0], p[0, 1], pts[:, 0], pts[:, 1])).sum()

    assert expected_km(bayes) < expected_km(argmax) - 50  # tens of km better than the mode
    grid = torch.stack(torch.meshgrid(torch.arange(28.0, 47.0, 0.5), torch.arange(-102.0, -78.0, 0.5),
                                      indexing="ij"), -1).reshape(-1, 1, 2)  # fmt: skip
    best_on_grid = min(expected_km(p) for p in grid)
    assert expected_km(bayes) <= best_on_grid + 1.0  # the point of least expected distance


def test_head_and_regression_pass_the_heads_through():
    outs = _outputs()
    got = Decoder(DecodeConfig(state="head", gps="regression"), ["state", "gps"], ENCODER)(outs)
    torch.testing.assert_close(got["state_probs"], torch.softmax(outs["state"], -1))
    torch.testing.assert_close(got["gps"], outs["gps"])


def test_knn_with_an_index_of_the_queries_themselves_recovers_their_points():
    torch.manual_seed(1)
    emb = torch.randn(20, 8)
    latlon = torch.stack([torch.rand(20) * 20 + 28, -torch.rand(20) * 50 - 70], 1).double()
    labels = torch.arange(20) % 3
    index = EmbeddingIndex.build(emb, labels, latlon)
    spec = DecodeConfig(state="head", gps="knn", knn_k=3, knn_temperature=0.001, knn_alpha=1.0)
    outs = {"embedding": emb, "state": torch.zeros(20, 3)}
    got = Decoder(spec, ["state"], ENCODER, index=index)(outs)
    torch.testing.assert_close(got["gps"].double(), latlon, atol=1e-3, rtol=0)  # near-exact points
    assert torch.equal(got["state_probs"].argmax(1), labels)  # the neighbours' vote is their own class


@pytest.mark.parametrize(
    "spec, heads, index, match",
    [
        (DecodeConfig(state="cells"), ["state", "gps"], None, r"decode.state=cells needs a 'cell' head"),
        (DecodeConfig(gps="regression"), ["cell"], None, r"decode.gps=regression needs a 'gps' head"),
        (DecodeConfig(gps="knn"), ["state", "gps"], None, r"need the model's retrieval index"),
        (DecodeConfig(knn_alpha=0.5), ["state", "gps"], None, r"need the model's retrieval index"),
    ],
)
def test_choices_the_model_cannot_serve_are_refused(spec, heads, index, match):
    with pytest.raises(DecoderError, match=match):
        Decoder(spec, heads, ENCODER, CELLS if "cell" in heads else None, index)


def test_auto_follows_the_heads():
    assert (
        Decoder(DecodeConfig(), ["state", "gps"], ENCODER).state,
        Decoder(DecodeConfig(), ["state", "gps"], ENCODER).gps,
    ) == ("head", "regression")
    cells = Decoder(DecodeConfig(), ["cell", "gps"], ENCODER, CELLS)
    assert (cells.state, cells.gps) == ("cells", "bayes")


def test_candidates_cover_every_decoding_the_heads_allow():
    specs = {(s.state, s.gps, s.knn_alpha) for s in candidates(DecodeConfig(), ["state", "gps", "cell"])}
    assert specs == {(s, g, a) for s in ("head", "cells") for g in ("regression", "cell", "bayes", "knn")
                     for a in (0.0, 0.5)}  # fmt: skip
    only = {(s.state, s.gps) for s in candidates(DecodeConfig(), ["state", "gps"])}
    assert only == {("head", "regression"), ("head", "knn")}


def test_passthrough_hands_raw_outputs_on_beside_the_decoded_values():
    outs = _outputs()
    spec = DecodeConfig(state="head", gps="regression")
    got = Decoder(spec, ["state", "gps"], ENCODER, passthrough=("embedding",))(outs)
    assert set(got) == {"state_probs", "gps", "embedding"}
    torch.testing.assert_close(got["embedding"], outs["embedding"], rtol=0, atol=0)
    assert set(Decoder(spec, ["state", "gps"], ENCODER)(outs)) == {"state_probs", "gps"}
