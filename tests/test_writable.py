"""Output paths checked before any work (geoloc.writable), and train.py's --output-dir check that uses it."""

import pytest

from geoloc.writable import OutputPathError, check_dir_writable, check_file_writable


def test_a_writable_folder_passes_and_nothing_is_created(tmp_path):
    check_dir_writable(tmp_path, "--x")
    check_dir_writable(tmp_path / "new" / "deeper", "--x")  # created later by the tool, not by the check
    check_file_writable(tmp_path / "new" / "sub.csv", "--x")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_path_that_is_a_file_or_lies_under_one_is_refused(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(OutputPathError, match=rf"^--x {a_file}: is a file, not a folder$"):
        check_dir_writable(a_file, "--x")
    with pytest.raises(OutputPathError, match=rf"^--x {a_file}/run/b: lies under the file {a_file}$"):
        check_dir_writable(a_file / "run" / "b", "--x")
    with pytest.raises(OutputPathError, match=rf"^--out {a_file}/s.csv: lies under the file {a_file}$"):
        check_file_writable(a_file / "s.csv", "--out")


def test_a_file_path_that_is_a_folder_is_refused(tmp_path):
    with pytest.raises(OutputPathError, match=rf"^--out {tmp_path}: is a folder; give a file name$"):
        check_file_writable(tmp_path, "--out")


def test_a_read_only_folder_is_refused(read_only_dir):
    with pytest.raises(
        OutputPathError, match=rf"--x {read_only_dir}/a/b: cannot write in {read_only_dir} \("
    ):
        check_dir_writable(read_only_dir / "a" / "b", "--x")
    with pytest.raises(
        OutputPathError, match=rf"--out {read_only_dir}/s.csv: cannot write in {read_only_dir}"
    ):
        check_file_writable(read_only_dir / "s.csv", "--out")


def test_train_cli_refuses_an_unwritable_output_dir_before_the_run(tmp_path, capsys, read_only_dir):
    from geoloc.train.cli import main

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for run_dir, match in (
        (a_file / "run", f"lies under the file {a_file}"),
        (read_only_dir / "run", "cannot write"),
    ):
        with pytest.raises(SystemExit) as exit_:  # parser.error: before phases.run is even imported
            main(["--shards", str(tmp_path / "shards"), "--output-dir", str(run_dir)])
        assert exit_.value.code == 2
        assert f"train.py: error: --output-dir {run_dir}: {match}" in capsys.readouterr().err
