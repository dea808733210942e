"""Embedding index: exact chunked search, votes, location refinement, blending, safe save/load."""

import json
import pickle

import numpy as np
import pytest
import torch

from geoloc.geography import STATE_NAMES, sample_points
from geoloc.retrieval import (
    INDEX_JSON,
    INDEX_TENSORS,
    EmbeddingIndex,
    IndexFileError,
    blend,
    knn_location,
    knn_state_probs,
    neighbour_weights,
    neighbours_in_top,
    search_chunked,
)


@pytest.fixture(scope="module")
def data():
    """300 items, 5 classes; embeddings = class direction + location-dependent part + noise."""
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    label = torch.arange(300) % 5
    states = [5, 12, 31, 43, 48]
    latlon = np.concatenate([sample_points(STATE_NAMES[states[c]], 60, rng) for c in range(5)])
    latlon = torch.tensor(latlon)[torch.argsort(torch.argsort(label, stable=True))]  # row i in class i % 5
    emb = 1.5 * torch.randn(5, 48, generator=g)[label] + torch.randn(300, 48, generator=g)
    return emb, label, latlon


@pytest.fixture(scope="module")
def index(data):
    emb, label, latlon = data
    return EmbeddingIndex.build(emb, label, latlon, cell=label * 10 + torch.arange(300) % 3)


def test_build_normalises_and_checks_shapes(index, data):
    assert torch.allclose(index.embeddings.norm(dim=1), torch.ones(300))
    assert index.latlon.dtype == torch.float64 and len(index) == 300
    with pytest.raises(ValueError, match="same N items"):
        EmbeddingIndex.build(data[0], data[1][:-1], data[2])


def test_self_retrieval(index, data):
    sims, idx = index.search(data[0], k=5)
    assert sims.shape == idx.shape == (300, 5)
    assert torch.equal(idx[:, 0], torch.arange(300))
    assert torch.allclose(sims[:, 0], torch.ones(300), atol=1e-5)
    assert (sims[:, :-1] >= sims[:, 1:]).all()  # sorted


def test_search_equals_brute_force(index):
    q = torch.randn(40, 48, generator=torch.Generator().manual_seed(1))
    sims, idx = index.search(q, k=7)
    full = torch.nn.functional.normalize(q, dim=1) @ index.embeddings.T  # (40, 300)
    want = full.topk(7, dim=1)
    assert torch.equal(idx, want.indices) and torch.allclose(sims, want.values, atol=1e-6)


def test_chunked_equals_unchunked(index):
    q = torch.randn(50, 48, generator=torch.Generator().manual_seed(2))
    one_s, one_i = search_chunked(torch.nn.functional.normalize(q, dim=1), index.embeddings, 5, 1 << 40)
    for block in (4 * 300, 4 * 300 * 7, 1):  # 1 query a chunk, 7 a chunk, and the minimum
        s, i = index.search(q, k=5, max_block_bytes=block)
        assert torch.equal(i, one_i) and torch.allclose(s, one_s, atol=1e-6)


def test_search_errors(index):
    with pytest.raises(ValueError, match="index dimension 48"):
        index.search(torch.randn(2, 7))
    with pytest.raises(ValueError, match="unknown search backend"):
        index.search(torch.randn(2, 48), backend="annoy")
    assert index.search(torch.randn(2, 48), k=1000)[1].shape == (2, 300)  # k capped at N


def test_faiss_agrees_with_torch(index):
    pytest.importorskip("faiss")
    q = torch.randn(30, 48, generator=torch.Generator().manual_seed(3))
    s_t, i_t = index.search(q, k=5, backend="torch")
    s_f, i_f = index.search(q, k=5, backend="faiss")
    assert torch.allclose(s_t, s_f, atol=1e-5)
    # the same neighbours up to float ties: faiss's items have the similarities torch found
    full = torch.nn.functional.normalize(q, dim=1) @ index.embeddings.T  # (30, 300)
    assert torch.allclose(full.gather(1, i_f), s_t, atol=1e-5) and (i_f == i_t).float().mean() > 0.9
    assert torch.equal(index.search(q, k=5, backend="auto")[1], i_t)  # auto: torch under FAISS_MIN_SIZE


def test_faiss_backend_without_faiss_is_a_clear_error(index, monkeypatch):
    from geoloc import retrieval

    monkeypatch.setattr(retrieval, "_faiss", lambda: None)
    with pytest.raises(RuntimeError, match="faiss-cpu"):
        index.search(torch.randn(2, 48), backend="faiss")
    monkeypatch.setattr(retrieval, "FAISS_MIN_SIZE", 1)
    assert index.search(torch.randn(2, 48), backend="auto")[1].shape == (2, 5)  # falls back to torch


def test_vote_probabilities(index, data):
    sims, idx = index.search(data[0], k=5)
    probs = knn_state_probs(sims, idx, index.label, 5)
    assert probs.shape == (300, 5) and torch.allclose(probs.sum(1), torch.ones(300))
    assert (probs.argmax(1) == index.label).float().mean() > 0.95  # classes are well separated here
    # hand case: two neighbours of class 1 at sim 0.9, one of class 0 at 0.8, temperature 0.1
    s, i = torch.tensor([[0.9, 0.9, 0.8]]), torch.tensor([[0, 1, 2]])
    p = knn_state_probs(s, i, torch.tensor([1, 1, 0]), 3, temperature=0.1)
    e = np.exp([9.0, 9.0, 8.0])
    want = torch.tensor([[e[2], e[0] + e[1], 0.0]], dtype=torch.float32) / e.sum()
    assert torch.allclose(p, want, atol=1e-6)


def test_cell_votes_use_cell_ids(index, data):
    sims, idx = index.search(data[0], k=5)
    probs = knn_state_probs(sims, idx, index.cell, 50)
    assert torch.allclose(probs.sum(1), torch.ones(300)) and probs.shape == (300, 50)


def test_weights_need_positive_temperature():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        neighbour_weights(torch.zeros(1, 2), 0.0)


def test_refinement_with_an_index_of_the_set_itself_recovers_the_points(index, data):
    sims, idx = index.search(data[0], k=5)
    got = knn_location(sims, idx, index.latlon, temperature=0.05)
    assert torch.allclose(got, index.latlon, atol=1e-6)  # self weighs > 1/2: the median is the point


def test_location_restricted_to_top_states():
    latlon = torch.tensor([[40.0, -105.0], [41.0, -104.0], [30.0, -90.0], [31.0, -91.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    sims, idx = torch.tensor([[0.9, 0.9, 0.8, 0.8]]), torch.tensor([[2, 3, 0, 1]])
    head = torch.tensor([[0.9, 0.1]])  # the head says class 0; the top neighbours are class 1
    allowed = neighbours_in_top(idx, labels, head, top=1)
    assert allowed.tolist() == [[False, False, True, True]]
    restricted = knn_location(sims, idx, latlon, allowed=allowed)
    assert 40.0 <= restricted[0, 0] <= 41.0  # between the two class-0 points
    free = knn_location(sims, idx, latlon)
    assert free[0, 0] < 35.0  # the nearer (class-1) neighbours pull it south
    none = knn_location(sims, idx, latlon, allowed=torch.zeros(1, 4, dtype=torch.bool))
    assert torch.allclose(none, free)  # no allowed neighbour: all of them


def test_blend():
    head, knn = torch.tensor([[0.8, 0.2]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(blend(head, knn, 0.25), torch.tensor([[0.6, 0.4]]))
    assert torch.equal(blend(head, knn, 0.0), head)
    with pytest.raises(ValueError, match="alpha"):
        blend(head, knn, 1.5)


def test_save_load_round_trip(index, tmp_path):
    index.save(tmp_path / "idx")
    back = EmbeddingIndex.load(tmp_path / "idx")
    for key in ("embeddings", "label", "latlon", "cell"):
        assert torch.equal(getattr(back, key), getattr(index, key)), key
    no_cell = EmbeddingIndex.build(index.embeddings, index.label, index.latlon)
    assert EmbeddingIndex.load(no_cell.save(tmp_path / "nc")).cell is None


class _Bomb:
    def __reduce__(self):
        return (open, ("/tmp/geoloc_pwned_by_index", "w"))


def test_hostile_and_malformed_files_are_errors_not_code(index, tmp_path):
    folder = index.save(tmp_path / "idx")
    (folder / INDEX_TENSORS).write_bytes(pickle.dumps(_Bomb()))
    with pytest.raises(IndexFileError, match="index.safetensors: not a readable safetensors"):
        EmbeddingIndex.load(folder)
    assert not __import__("os").path.exists("/tmp/geoloc_pwned_by_index")
    index.save(folder)
    meta = json.loads((folder / INDEX_JSON).read_text())
    (folder / INDEX_JSON).write_text(json.dumps({**meta, "num_items": 7}))
    with pytest.raises(IndexFileError, match="tensor 'embeddings' should be \\(7, 48\\)"):
        EmbeddingIndex.load(folder)
    (folder / INDEX_JSON).write_text("{not json")
    with pytest.raises(IndexFileError, match="index.json: cannot read"):
        EmbeddingIndex.load(folder)
    (folder / INDEX_JSON).write_text(json.dumps({"version": 1, "dim": 48, "has_cell": True}))
    with pytest.raises(IndexFileError, match="missing key 'num_items'"):
        EmbeddingIndex.load(folder)
