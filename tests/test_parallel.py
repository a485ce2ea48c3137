"""fsmis.parallel: the one thread pool for per-case work."""
from __future__ import annotations

import threading

import pytest

from fsmis.parallel import available_cpus, map_cases, worker_count


def test_worker_count():
    assert available_cpus() >= 1
    assert worker_count(None, 100) == min(available_cpus(), 100)
    assert worker_count(4, 2) == 2
    assert worker_count(3, 0) == 1
    assert worker_count(0, 5) == 1


@pytest.mark.parametrize("workers", [1, 3])
def test_results_in_job_order(workers):
    assert map_cases(lambda x: x * x, range(7), workers, progress=False) == [x * x for x in range(7)]


def test_serial_first_runs_before_the_pool():
    seen = []
    lock = threading.Lock()

    def fn(x):
        with lock:
            seen.append((x, len(seen)))
        return x

    assert map_cases(fn, range(5), 3, progress=False, serial_first=1) == list(range(5))
    assert seen[0] == (0, 0)


@pytest.mark.parametrize("workers", [1, 2])
def test_first_error_stops_the_run(workers):
    started = []
    gate = threading.Event()

    def fn(x):
        started.append(x)
        if x == 0:
            raise ValueError("case 0")
        gate.wait(1)  # long enough for the error to be seen first
        return x

    with pytest.raises(ValueError, match="case 0"):
        map_cases(fn, range(20), workers, progress=False)
    gate.set()
    assert len(started) <= workers + 1  # no case started after the error was seen


def test_progress_counts_earlier_cases(capsys):
    map_cases(lambda x: x, range(2), 1, desc="demo", progress=True, done=3)
    err = capsys.readouterr().err
    assert "demo" in err and "3/5" in err and "5/5" in err, err
