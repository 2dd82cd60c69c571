"""One streaming pool of worker processes for the CPU-bound per-image work of every stage: the
DenseCRF (stage 2, evaluate.py, predict.py), stage 2's label writing, the background masks.

    with WorkerPool(workers) as pool:
        for item in items:
            for tag, result in pool.submit(job_fn, job, tag=item_id):
                handle(tag, result)          # results come back in submission order
        for tag, result in pool.finish():
            handle(tag, result)

- Bounded: at most `in_flight` jobs (default 2 × workers) are submitted and not yet handed
  back; `submit` waits for the oldest one when that many are out, so memory stays flat whatever
  the number of images.
- Ordered: results are handed back in the order the jobs were submitted.
- `workers=0` runs every job in the calling process, with the same interface.
- Workers are spawned (a forked child of a process that already ran torch's OpenMP can hang),
  started at once so that their start-up overlaps the caller's own, and run `initializer` once.
  They import only what their jobs' modules import: a job function that lives in a module
  without torch or Lightning (the CRF's, `utils.crf`) gives a worker that holds neither.
- Interruptions: the workers ignore SIGINT and SIGTERM from their first instruction (the whole
  process group receives a Ctrl-C, or SLURM's SIGTERM); the caller's process stops, and leaving
  the `with` block stops the workers after the jobs they are running (each writes whole files).
  A job's exception is raised by the `submit` / `finish` that hands its result back, after the
  pool is shut down; a worker that dies is reported as such. A worker whose caller is gone
  without shutting it down (killed: SIGKILL, the out-of-memory killer) finishes the job it runs
  and exits, instead of waiting for jobs forever.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterator

from utils.errors import BanaError


# Held by a worker while it runs a job: the watch on its caller waits for it before exiting.
_job_lock = threading.Lock()
PARENT_POLL_S = 0.5


def _watch_parent(parent: int) -> None:
    """In a worker: exit once `parent` (the caller) is gone, after the job being run."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    with _job_lock:
        os._exit(1)


def _run_job(fn: Callable, job):
    with _job_lock:
        return fn(job)


def _quiet_worker(parent: int, initializer, initargs) -> None:
    """Runs first in every worker: the watch on the caller (`parent`), one thread for the
    libraries that use them (each worker runs one job at a time; more threads would only fight
    over the cores), then `initializer`."""
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True,
                     name="watch-caller").start()
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"
    if initializer is not None:
        initializer(*initargs)
    torch = sys.modules.get("torch")  # imported by the initializer, or not at all
    if torch is not None:
        torch.set_num_threads(1)


def _ready() -> None:
    """A no-op job: one per worker starts them all before the first real job."""


class WorkerPool:
    """See the module doc. `tag` travels with a job and comes back with its result."""

    def __init__(self, workers: int, initializer: Callable | None = None, initargs=(),
                 in_flight: int | None = None):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.workers = workers
        self.in_flight = in_flight or max(1, 2 * workers)
        self._pending: deque[tuple[object, Future]] = deque()
        self._executor = None
        if workers == 0:
            if initializer is not None:
                initializer(*initargs)
            return
        # The workers inherit the ignored signals from their first instruction (imports
        # included), while the caller's own handlers stay as they were.
        ignored = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in ignored}
        try:
            self._executor = ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_quiet_worker, initargs=(os.getpid(), initializer, tuple(initargs)))
            for _ in range(workers):
                self._executor.submit(_ready)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def submit(self, fn: Callable, job, tag=None) -> list[tuple[object, object]]:
        """Run `fn(job)`; returns the (tag, result) pairs handed back meanwhile, oldest first
        (those the pool had to wait for to stay within `in_flight`)."""
        if self._executor is None:
            return [(tag, fn(job))]
        self._pending.append((tag, self._executor.submit(_run_job, fn, job)))
        done = []
        while len(self._pending) >= self.in_flight:
            done.append(self._next())
        while self._pending and self._pending[0][1].done():
            done.append(self._next())
        return done

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet handed back."""
        return len(self._pending)

    def finish(self) -> Iterator[tuple[object, object]]:
        """The (tag, result) pairs of every job still out, in submission order."""
        while self._pending:
            yield self._next()

    def _next(self) -> tuple[object, object]:
        tag, future = self._pending.popleft()
        try:
            return tag, future.result()
        except BrokenProcessPool:
            raise BanaError("a worker process died (killed, or out of memory); outputs written "
                            "so far are complete files: rerun the same command to continue, "
                            "with fewer --workers if memory ran out.") from None

    def close(self, cancel: bool = False) -> None:
        """Stop the workers: after the jobs they run, and with `cancel` without starting the
        ones still queued."""
        executor, self._executor = self._executor, None
        self._pending.clear()
        if executor is None:
            return
        try:
            executor.shutdown(wait=True, cancel_futures=cancel)
        except BaseException:
            # Interrupted while waiting (a second Ctrl-C): wait once more, or the workers would
            # outlive this process.
            executor.shutdown(wait=True, cancel_futures=True)
            raise

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(cancel=exc_type is not None)
        return False


def _apply_each(fn: Callable, jobs: list) -> list:
    return [fn(job) for job in jobs]


def run_all(fn: Callable, jobs, workers: int, desc: str, progress: bool = True,
            initializer: Callable | None = None, chunksize: int = 1) -> list:
    """[fn(job) for job in jobs] over a `WorkerPool` of `workers` processes (in this process
    when workers <= 1 or the jobs fit in one chunk), in order, with a progress bar; jobs go to the workers `chunksize` at a
    time (many tiny jobs cost less that way)."""
    from functools import partial

    from tqdm import tqdm

    jobs = list(jobs)
    chunks = [jobs[k:k + chunksize] for k in range(0, len(jobs), chunksize)]
    workers = min(workers, len(chunks))  # one chunk: here, without starting processes
    each = partial(_apply_each, fn)
    results = []
    with tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress) as bar, \
            WorkerPool(workers if workers > 1 else 0, initializer) as pool:
        def take(finished) -> None:
            for _, done in finished:
                results.extend(done)
                bar.update(len(done))

        for chunk in chunks:
            take(pool.submit(each, chunk))
        take(pool.finish())
    return results
