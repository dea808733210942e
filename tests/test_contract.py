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


# ---------------------------------------------------------------- bad input: unreadable CSVs

TEMPLATE_HEADER = "sample_id,image_north,image_east,image_south,image_west\n"
TRAIN_HEADER = "sample_id,state,state_idx,latitude,longitude,image_north,image_east,image_south,image_west\n"
# (file name, reader, header, a good row, how many fields a row has)
READERS = {
    "template": ("sample_submission.csv", lambda root: read_submission_template(root / "sample_submission.csv"),
                 TEMPLATE_HEADER, "000001,a.jpg,b.jpg,c.jpg,d.jpg\n"),
    "train": ("train_ground_truth.csv", read_train_table, TRAIN_HEADER,
              "000001,Alabama,0,32.1,-86.5,a.jpg,b.jpg,c.jpg,d.jpg\n"),
    "mapping": ("state_mapping.csv", read_state_mapping, "state_idx,state\n", "0,Alabama\n"),
}  # fmt: skip


def _broken(kind: str, header: str, row: str) -> tuple[bytes, str]:
    """File bytes with one kind of damage on line 3 (or none at all), and what the error must say."""
    good = (header + row).encode()
    if kind == "empty":
        return b"", r": the file is empty"
    if kind == "not_utf8":
        return good + row.replace("\n", "\xe9\n").encode("latin-1"), r", line 3: not UTF-8 text \(byte 0xe9"
    if kind == "ragged":
        return good + row.replace("\n", ",extra\n").encode(), r", line 3: \d+ fields, the header has \d+"
    if kind == "unclosed_quote":
        return good + (
            '"' + row
        ).encode() + row.encode(), r", line 3: a quoted field opened here is never closed"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["empty", "not_utf8", "ragged", "unclosed_quote"])
@pytest.mark.parametrize("reader", sorted(READERS))
def test_unreadable_csv_is_an_error_naming_the_file_and_line(tmp_path, reader, kind):
    name, read, header, row = READERS[reader]
    data, match = _broken(kind, header, row)
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataContractError, match=match) as err:
        read(tmp_path)
    assert str(tmp_path / name) in str(err.value)


def test_a_byte_order_mark_is_dropped(tmp_path):
    (tmp_path / "state_mapping.csv").write_bytes("\ufeffstate_idx,state\n4,California\n".encode())
    assert read_state_mapping(tmp_path) == {4: "California"}


# ---------------------------------------------------------------- bad input: ids, templates, mapping


def test_ids_and_image_names_are_stripped(tmp_path):
    path = tmp_path / "sample_submission.csv"
    path.write_text(TEMPLATE_HEADER + " 000123 ,  a.jpg,b.jpg ,c.jpg,\td.jpg\n000124,e,f,g,\n")
    df = read_submission_template(path)
    assert df["sample_id"].tolist() == ["000123", "000124"]
    assert df.iloc[0, 1:].tolist() == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert df["image_west"].isna().tolist() == [False, True]  # an empty cell stays missing


def test_an_empty_sample_id_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "sample_submission.csv"
    path.write_text(TEMPLATE_HEADER + "000001,a,b,c,d\n   ,a,b,c,d\n,a,b,c,d\n")
    with pytest.raises(
        DataContractError, match=r"sample_submission\.csv, line\(s\) \[3, 4\]: empty sample_id"
    ):
        read_submission_template(path)


@pytest.mark.parametrize(
    "rows, match",
    [
        ("000001,a,b,c,d\n000002,a,b,c,d\n000001,e,f,g,h\n", r"'000001' on lines \[2, 4\]"),
        ("000002,a,b,c,d\n000002 ,e,f,g,h\n", r"'000002' on lines \[2, 3\]"),  # the same id once stripped
        ("", r"no rows"),
    ],
)
def test_a_template_with_a_repeated_id_or_no_rows_is_refused(tmp_path, rows, match):
    path = tmp_path / "sample_submission.csv"
    path.write_text(TEMPLATE_HEADER + rows)
    with pytest.raises(DataContractError, match=match) as err:
        read_submission_template(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "text, match",
    [
        ("state_idx,state\n", r"state_mapping\.csv: no rows"),
        ("state_idx,state\n0,Alabama\n1,Texas\n2, alabama \n", r"lines \[2, 4\]: state name 'alabama'"),
        ("state_idx,state\n0,Alabama\n1,\n", r"line 3: state_idx 1 has no state name"),
    ],
)
def test_state_mapping_without_rows_or_with_a_name_twice_is_refused(tmp_path, text, match):
    (tmp_path / "state_mapping.csv").write_text(text)
    with pytest.raises(DataContractError, match=match):
        read_state_mapping(tmp_path)


def test_state_names_are_stripped(tmp_path):
    (tmp_path / "state_mapping.csv").write_text("state_idx,state\n4, California \n")
    assert read_state_mapping(tmp_path) == {4: "California"}


@pytest.mark.parametrize(
    "cell, code",
    [
        ("img_1_north.jpg", None),
        ("sub/img_1_north.jpg", None),
        ("train_images/img_1_north.jpg", None),
        ("/etc/passwd", "absolute"),
        ("../secret.jpg", "'..'"),
        ("sub/../../secret.jpg", "'..'"),
        ("sub/../img.jpg", "'..'"),  # harmless lexically, but after a symlinked folder it climbs out
    ],
)
def test_image_path_problem_refuses_absolute_paths_and_dotdot(cell, code):
    from geoloc.contract import image_path_problem

    problem = image_path_problem(cell)
    assert (problem is None) if code is None else (code in problem and repr(cell) in problem)
