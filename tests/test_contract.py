"""The data contract readers: state mapping variants, required columns, ids kept as strings."""

import pytest

from geoloc.contract import (
    DataContractError,
    read_state_mapping,
    read_submission_template,
    read_train_table,
    sample_key,
)


def test_state_mapping_accepts_state_or_state_name_and_ignores_extras(tmp_path):
    (tmp_path / "state_mapping.csv").write_text("state_idx,state,abbr\n4,California,CA\n31,New York,NY\n")
    assert read_state_mapping(tmp_path) == {4: "California", 31: "New York"}
    (tmp_path / "state_mapping.csv").write_text("state_idx,state_name\n0,Alabama\n")
    assert read_state_mapping(tmp_path) == {0: "Alabama"}


@pytest.mark.parametrize(
    "text, match",
    [
        ("state_idx,name\n1,x\n", "state_name"),
        ("state_idx,state\n1,a\n1,b\n", "line 3.*twice"),
        ("state_idx,state\n70,a\n", "line 2.*0..49"),
        ("state_idx,state\n0,Alabama\nx,Foo\n", "line 3.*'x'.*0..49"),
        ("state_idx,state\n0,Alabama\n1.5,Foo\n", "line 3.*0..49"),
    ],
)
def test_state_mapping_errors_name_file_and_line(tmp_path, text, match):
    (tmp_path / "state_mapping.csv").write_text(text)
    with pytest.raises(DataContractError, match=match) as err:
        read_state_mapping(tmp_path)
    assert "state_mapping.csv" in str(err.value)


def test_missing_file_and_columns_are_named(tmp_path):
    with pytest.raises(DataContractError, match="train_ground_truth.csv: file not found"):
        read_train_table(tmp_path)
    (tmp_path / "train_ground_truth.csv").write_text("sample_id,state\n1,a\n")
    with pytest.raises(DataContractError, match="missing column"):
        read_train_table(tmp_path)


def test_sample_ids_stay_strings(tmp_path):
    path = tmp_path / "sample_submission.csv"
    path.write_text("sample_id,image_north,image_east,image_south,image_west\n000123,a,b,c,d\n")
    assert read_submission_template(path)["sample_id"].tolist() == ["000123"]


def test_sample_key_has_no_dots():
    assert sample_key("img.001/a b") == "img_001_a_b"
    assert sample_key("img_000001") == "img_000001"
