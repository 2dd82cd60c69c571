"""Run many small independent file-writing jobs over a process pool, with a progress bar."""

from __future__ import annotations

from multiprocessing import Pool
from typing import Callable, Sequence

from tqdm import tqdm


def count_done(fn: Callable[[object], int], jobs: Sequence, workers: int, desc: str,
               progress: bool = True, chunksize: int = 32) -> int:
    """Sum of `fn(job)` over `jobs` (e.g. 1 per file written, 0 per file skipped), in `workers`
    processes (in this process when workers <= 1). `with`: on an error the bar is closed before
    the message is printed, not after it."""
    total = 0
    with tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress) as bar:
        if workers <= 1:
            for job in jobs:
                total += fn(job)
                bar.update()
        else:
            with Pool(workers) as pool:
                for done in pool.imap_unordered(fn, jobs, chunksize=chunksize):
                    total += done
                    bar.update()
    return total
