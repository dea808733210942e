"""The README's main command end to end (smaller sizes): a submission that validates and beats the prior."""

import pandas as pd

from geoloc import demo
from geoloc.contract import SUBMISSION_COLUMNS
from geoloc.infer.submission import validate_submission


def test_demo_pipeline_beats_the_prior_baseline(tmp_path):
    rows = demo.main(
        ["--out", str(tmp_path), "--n-train", "200", "--n-test", "40", "--epochs-frozen", "3",
         "--epochs-finetune", "1"]
    )  # fmt: skip
    submission = tmp_path / "submission.csv"
    template = pd.read_csv(tmp_path / "data" / "sample_submission.csv", dtype={"sample_id": str})
    assert validate_submission(submission, template) == []
    sub = pd.read_csv(submission, dtype={"sample_id": str})
    assert list(sub.columns) == list(SUBMISSION_COLUMNS)
    assert sub["sample_id"].tolist() == template["sample_id"].tolist()
    for split in ("val", "test"):
        model, prior = rows[f"{split} model"], rows[f"{split} prior"]
        assert model["score"] > prior["score"] + 0.2, (split, model["score"], prior["score"])
        assert model["median_km"] < prior["median_km"]
    assert rows["test model"]["n"] == 40
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    assert (tmp_path / "report" / "report.json").is_file()
