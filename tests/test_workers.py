"""The sharder's process pool (geoloc.sharding.workers.ordered_map): results in item order, a worker's
error ends the map with nothing started after it, a worker killed by the OS is an error, not a hang.

Each multi-process case runs in a child interpreter under a hard timeout, so a hang fails the test."""

import subprocess
import sys
import textwrap

from geoloc.sharding.workers import ordered_map

CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from geoloc.sharding.workers import ordered_map

    MARKS = Path(sys.argv[2])

    def square(i):
        return i * i

    def fail_on_3(i):
        (MARKS / str(i)).touch()  # which tasks started
        if i == 3:
            raise ValueError("bad item 3")
        time.sleep(0.01)
        return i

    def killed_on_2(i):
        if i == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return i

    if __name__ == "__main__":
        case = sys.argv[1]
        with ordered_map(2) as imap:
            if case == "order":
                print(list(imap(square, range(50), 3)) == [i * i for i in range(50)])
            elif case == "error":
                try:
                    for _ in imap(fail_on_3, range(400), 1):
                        pass
                except ValueError as err:
                    print("raised:", err)
            elif case == "killed":
                try:
                    list(imap(killed_on_2, range(20), 1))
                except Exception as err:
                    print("raised:", type(err).__name__)
        started = len(list(MARKS.iterdir()))
        time.sleep(0.5)
        print("started", started, len(list(MARKS.iterdir())))  # nothing starts after the exit
    """
)


def _child(tmp_path, case: str) -> str:
    script, marks = tmp_path / "child.py", tmp_path / "marks"
    script.write_text(CHILD)
    marks.mkdir()
    out = subprocess.run(
        [sys.executable, str(script), case, str(marks)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_results_come_in_item_order(tmp_path):
    assert _child(tmp_path, "order").splitlines()[0] == "True"


def test_a_workers_error_is_raised_and_the_queued_tasks_never_start(tmp_path):
    lines = _child(tmp_path, "error").splitlines()
    assert lines[0] == "raised: bad item 3"
    _, before, after = lines[1].split()
    assert before == after and int(before) < 400  # cancelled, and none started after the exit


def test_a_worker_killed_by_the_os_is_an_error_not_a_hang(tmp_path):
    assert _child(tmp_path, "killed").splitlines()[0] == "raised: BrokenProcessPool"


def test_one_worker_maps_in_process():
    with ordered_map(1) as imap:
        assert list(imap(abs, [-2, 3, -4], 2)) == [2, 3, 4]
