"""geoloc.predict: predictions per sample on one rank, the gather + de-duplication, and evaluate()."""

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from geoloc.labels import LabelEncoder
from geoloc.predict import (
    Predictions,
    concat_predictions,
    dedupe_by_id,
    empty_predictions,
    evaluate,
    gather_predictions,
    predict,
)

NUM_CLASSES = 6


class FakeModel(torch.nn.Module):
    """Mean colour of the readable views -> decoded state probabilities and GPS (what an ensemble or a
    model + decoder returns); per-sample, so batching cannot matter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.cls = torch.nn.Linear(3, NUM_CLASSES)
        self.gps_head = torch.nn.Linear(3, 2)

    def forward(self, pixels, view_mask):
        assert view_mask.any(dim=1).all(), "predict must never hand the model a sample without views"
        m = view_mask[..., None].float()  # (B, V, 1)
        feat = (pixels.mean(dim=(-1, -2)) * m).sum(1) / m.sum(1)  # (B, 3)
        return {"state_probs": torch.softmax(self.cls(feat) * 5, -1), "gps": self.gps_head(feat)}


def to_pixels(images):
    return images.float() / 255.0


def make_batches(ids, batch_size, labelled=True, blind=()):
    """A list-of-batches loader in the ``geoloc.data`` batch contract, views of random colour."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        b = len(chunk)
        mask = torch.ones(b, 4, dtype=torch.bool)
        mask[:, 3] = torch.arange(b) % 2 == 0  # some samples lack their west view
        for i, sid in enumerate(chunk):
            if sid in blind:
                mask[i] = False
        label = torch.randint(0, NUM_CLASSES, (b,), generator=g) if labelled else torch.full((b,), -1)
        latlon = torch.rand(b, 2, generator=g) * 10 + torch.tensor([35.0, -100.0])
        batches.append(
            {
                "images": torch.randint(0, 256, (b, 4, 3, 8, 8), dtype=torch.uint8, generator=g),
                "view_mask": mask,
                "label": label.long(),
                "latlon": latlon if labelled else torch.full((b, 2), float("nan")),
                "sample_id": list(chunk),
            }
        )
    return batches


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def _rows_by_id(preds):
    return {sid: i for i, sid in enumerate(preds.sample_id)}


def test_predict_matches_per_sample_forward_and_sorts_ids(accelerator):
    model = FakeModel()
    ids = [f"s{i:02d}" for i in (7, 3, 11, 0, 5, 9, 1)]  # loader order is not id order
    batches = make_batches(ids, batch_size=3)
    preds = predict(model, batches, to_pixels, accelerator, progress=False)
    assert list(preds.sample_id) == sorted(ids)
    assert preds.probs.dtype == np.float32 and preds.probs.shape == (7, NUM_CLASSES)
    np.testing.assert_allclose(preds.probs.sum(1), 1.0, atol=1e-5)
    row = _rows_by_id(preds)
    for batch in batches:
        for i, sid in enumerate(batch["sample_id"]):
            with torch.no_grad():
                out = model(to_pixels(batch["images"][i : i + 1]), batch["view_mask"][i : i + 1])
            np.testing.assert_allclose(preds.probs[row[sid]], out["state_probs"][0].numpy(), atol=1e-5)
            np.testing.assert_allclose(preds.gps[row[sid]], out["gps"][0].numpy(), atol=1e-5)
            assert preds.label[row[sid]] == batch["label"][i]
            assert preds.n_views[row[sid]] == batch["view_mask"][i].sum()
            np.testing.assert_allclose(preds.latlon[row[sid]], batch["latlon"][i].numpy())


def test_predict_restores_training_mode(accelerator):
    model = FakeModel().train()
    predict(model, make_batches(["a", "b"], 2), to_pixels, accelerator, progress=False)
    assert model.training
    model.eval()
    predict(model, make_batches(["a", "b"], 2), to_pixels, accelerator, progress=False)
    assert not model.training


def test_sample_without_views_is_kept_with_nan_outputs(accelerator):
    ids = ["a", "b", "c", "d"]
    preds = predict(FakeModel(), make_batches(ids, 2, blind={"c"}), to_pixels, accelerator, progress=False)
    assert list(preds.sample_id) == ids
    c = _rows_by_id(preds)["c"]
    assert preds.n_views[c] == 0 and np.isnan(preds.probs[c]).all() and np.isnan(preds.gps[c]).all()
    others = np.delete(np.arange(4), c)
    assert np.isfinite(preds.probs[others]).all()


def test_tta_scales_average_the_scales(accelerator):
    model, batches = FakeModel(), make_batches(["a", "b", "c"], 2)
    plain = predict(model, batches, to_pixels, accelerator, progress=False)
    same = predict(model, batches, to_pixels, accelerator, tta_scales=(1.0,), progress=False)
    np.testing.assert_array_equal(plain.probs, same.probs)
    half = [dict(b, images=b["images"][..., 2:6, 2:6]) for b in batches]  # the centre half of 8x8
    cropped = predict(model, half, to_pixels, accelerator, progress=False)
    both = predict(model, batches, to_pixels, accelerator, tta_scales=(1.0, 0.5), progress=False)
    np.testing.assert_allclose(both.probs, (plain.probs + cropped.probs) / 2, atol=1e-6)
    np.testing.assert_allclose(both.gps, (plain.gps + cropped.gps) / 2, atol=1e-5)


def _preds(ids, seed=0, c=3):
    rng = np.random.default_rng(seed)
    p = rng.random((len(ids), c)).astype(np.float32)
    return Predictions(
        sample_id=np.asarray(ids, dtype=object),
        label=rng.integers(0, c, len(ids)),
        latlon=rng.random((len(ids), 2)).astype(np.float32),
        n_views=np.full(len(ids), 4),
        values={
            "state_probs": p / p.sum(1, keepdims=True),
            "gps": rng.random((len(ids), 2)).astype(np.float32),
        },
    )


def test_dedupe_sorts_and_keeps_one_copy_of_identical_duplicates():
    a, b = _preds(["x", "a", "m"], seed=0), _preds(["q"], seed=1)
    both = concat_predictions([a, b, a.take(np.array([1, 0]))])  # "a" and "x" arrive twice (two ranks)
    out = dedupe_by_id(both)
    assert list(out.sample_id) == ["a", "m", "q", "x"]
    np.testing.assert_array_equal(out.probs[0], a.probs[1])
    np.testing.assert_array_equal(out.probs[2], b.probs[0])


def test_dedupe_rejects_two_different_predictions_for_one_id():
    a, b = _preds(["s1", "s2"], seed=0), _preds(["s2"], seed=5)
    with pytest.raises(ValueError, match="s2"):
        dedupe_by_id(concat_predictions([a, b]))


def test_concat_skips_an_empty_rank_and_checks_class_counts():
    a = _preds(["a", "b"])
    out = concat_predictions([empty_predictions(), a])
    assert len(out) == 2 and out.probs.shape == (2, 3)
    with pytest.raises(ValueError, match="disagree on their values or their widths"):
        concat_predictions([a, _preds(["c"], c=4)])


def test_gather_on_one_rank_sorts_and_dedupes(accelerator):
    local = concat_predictions([_preds(["b", "a"]), _preds(["b", "a"])])
    out = gather_predictions(local, accelerator)
    assert list(out.sample_id) == ["a", "b"]


ENCODER = LabelEncoder((2, 5, 11, 17, 30, 44), tuple("ABCDEF"))  # non-consecutive original indices


def test_evaluate_equals_competition_metrics_on_labelled_rows():
    from geoloc.metrics import competition_metrics, top5_from_probs

    preds = _preds([f"s{i}" for i in range(20)], seed=3, c=6)
    preds.label[:4] = -1  # unlabelled rows are ignored
    got = evaluate(preds, ENCODER)
    lab = preds.label >= 0
    want = competition_metrics(
        top5_from_probs(preds.probs[lab], ENCODER),
        ENCODER.decode(preds.label[lab]),
        preds.gps[lab],
        preds.latlon[lab],
    )
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    assert got["n"] == 16


def test_evaluate_refuses_blind_rows_without_a_prior():
    preds = _preds(["a", "b", "c"], c=6)
    preds.n_views[1] = 0
    with pytest.raises(ValueError, match="'b'"):
        evaluate(preds, ENCODER)


def test_evaluate_rejects_a_split_without_labels():
    preds = _preds(["a", "b"], c=6)
    preds.label[:] = -1
    with pytest.raises(ValueError, match="no labelled sample"):
        evaluate(preds, ENCODER)


def test_evaluate_predicts_blind_rows_from_the_prior():
    from geoloc.metrics import Prior, competition_metrics, top5_from_probs

    preds = _preds([f"s{i}" for i in range(6)], seed=4, c=6)
    preds.n_views[2] = 0
    preds.probs[2], preds.gps[2] = np.nan, np.nan
    prior = Prior((44, 2, 5, -1, -1), 39.0, -98.0)
    top5 = top5_from_probs(np.nan_to_num(preds.probs), ENCODER)
    top5[2] = prior.top5
    gps = preds.gps.astype(np.float64)
    gps[2] = (39.0, -98.0)
    want = competition_metrics(top5, ENCODER.decode(preds.label), gps, preds.latlon)
    assert evaluate(preds, ENCODER, prior=prior) == pytest.approx(want)


def test_short_batches_are_padded_so_every_forward_has_one_shape(accelerator):
    class ShapeRecorder(FakeModel):
        def forward(self, pixels, view_mask):
            self.shapes.append(tuple(pixels.shape[:2]))
            return super().forward(pixels, view_mask)

    model = ShapeRecorder()
    model.shapes = []
    ids = [f"s{i}" for i in range(7)]
    batches = make_batches(ids, 3)  # 3, 3, 1
    padded = predict(model, batches, to_pixels, accelerator, progress=False, batch_size=4)
    assert model.shapes == [(4, 4)] * 3
    model.shapes = []
    predict(model, batches, to_pixels, accelerator, progress=False)  # default: the largest batch so far
    assert model.shapes == [(3, 4)] * 3
    plain = predict(FakeModel(), batches, to_pixels, accelerator, progress=False)
    assert list(padded.sample_id) == ids
    np.testing.assert_allclose(padded.probs, plain.probs, atol=1e-6)
