"""One thread pool for per-case work (dataset preparation, supervoxels).

The heavy kernels (numba, scipy, nibabel's zlib) release the GIL, so threads run cases in
parallel without copying volumes between processes.
"""
from __future__ import annotations

import os
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

__all__ = ["available_cpus", "worker_count", "map_cases"]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def worker_count(workers: int | None, n_jobs: int) -> int:
    """Threads to use: ``workers`` (None: one per available CPU), at most one per job, at least 1."""
    n = available_cpus() if workers is None else int(workers)
    return max(1, min(n, n_jobs))


def map_cases(fn, jobs, workers: int | None = 1, *, desc: str = "", progress: bool = True, done: int = 0,
              serial_first: int = 0, thread_prefix: str = "cases") -> list:
    """``[fn(job) for job in jobs]``, in ``workers`` threads (see :func:`worker_count`).

    The first exception stops the run: cases not yet started are cancelled, the running ones
    finish, and the exception is raised. ``progress``: a bar over ``done + len(jobs)`` cases,
    starting at ``done`` (cases finished earlier), advanced as cases complete.
    ``serial_first``: this many jobs run alone before the pool starts (they set up state the
    others read). Returns the results in job order.
    """
    jobs = list(jobs)
    n_workers = worker_count(workers, len(jobs))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=done + len(jobs), initial=done, desc=desc, unit="case")
    results = []
    try:
        if n_workers == 1:
            serial_first = len(jobs)
        for job in jobs[:serial_first]:
            results.append(fn(job))
            if bar is not None:
                bar.update(1)
        rest = jobs[serial_first:]
        if rest:
            with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix=thread_prefix) as pool:
                futures = [pool.submit(fn, job) for job in rest]
                pending = set(futures)
                try:
                    while pending:
                        finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                        for fut in finished:
                            fut.result()  # re-raises the first error
                            if bar is not None:
                                bar.update(1)
                finally:
                    for fut in pending:  # after an error (or Ctrl-C): start no further case
                        fut.cancel()
            results.extend(fut.result() for fut in futures)
    finally:
        if bar is not None:
            bar.close()
    return results
