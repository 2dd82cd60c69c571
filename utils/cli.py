"""What every entry script shares: its arguments, and errors as messages.

A stage script is `main(run, description, add_arguments)`: it parses `--config-file`, `--gpu-id`,
`--opts` (plus the script's own flags) and calls `run(args)`, which loads the config and calls
the stage's `run(cfg, **options)` in engine/. A `BanaError` (or another error a user can act on:
an output path that is a file or not writable, a full disk) becomes one paragraph on stderr and
exit status 2; `--debug` shows the traceback instead. This module and the entry scripts are the
only ones that know about argparse.

Ending a run: Ctrl-C (SIGINT) and SIGTERM (`kill PID`, SLURM's scancel and time limit, torchrun
stopping its processes) end it the same way. `guarded` turns SIGTERM into `Terminated`, a
KeyboardInterrupt, so that the `with` blocks and `finally`s that end a Ctrl-C cleanly end it too:
the CRF pools wait for the images their workers are writing, the DataLoader workers stop,
Lightning stops its DDP processes. The run then prints one "interrupted" paragraph and exits with
128 + the signal (130 for Ctrl-C, 143 for SIGTERM); a second SIGTERM during that teardown is only
counted. In a run of several processes (torchrun, srun), a process that stops because another
one did (gloo's error for a lost peer, `utils.distributed.peer_lost`, or torchrun's SIGTERM after
another process failed) prints one line saying so, naming that process under torchrun, instead
of a traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import sys
import textwrap
import threading
import warnings
from pathlib import Path
from typing import Callable

from utils.errors import BanaError


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config-file", required=True, metavar="FILE", help="YAML config")
    p.add_argument("--gpu-id", default="0", metavar="ID",
                   help="GPU ids ('0', '0,1'), 'cpu', or 'cpu:N' for N CPU processes "
                        "(default 0; falls back to CPU when CUDA is absent)")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                   help="override config keys, e.g. --opts SOLVER.MAX_ITER 100 OUTPUT_DIR runs/x")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return p


def resume_arguments(parser: argparse.ArgumentParser) -> None:
    """--resume, --reconfigure and --overwrite, the flags of the training stages."""
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR/NAME/checkpoints/last.ckpt")
    parser.add_argument("--reconfigure", action="store_true",
                        help="with --resume: continue with settings that differ from the run's "
                             "record (config.yaml; the old one is kept as config.<n>.yaml)")
    parser.add_argument("--overwrite", action="store_true",
                        help="train a run folder that holds checkpoints again from iteration 0 "
                             "(its checkpoints are deleted first)")


def positive(minimum: int):
    """An argparse type: an integer of at least `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def workers_argument(parser: argparse.ArgumentParser, what: str, minimum: int = 0) -> None:
    """--workers N, default None = the number of cores (the stage decides)."""
    extra = "; 0 = in the main process" if minimum == 0 else ""
    parser.add_argument("--workers", type=positive(minimum), default=None, metavar="N",
                        help=f"{what} (default: the number of cores{extra})")


def report_error(message: str) -> None:
    # One paragraph, except a list of problems ("  1. ...", "  2. ..."): one paragraph each.
    parts = re.split(r"\n(?=  \d+\. )", message)
    wrapped = "\n".join(
        textwrap.fill(part, width=100, break_long_words=False, break_on_hyphens=False,
                      initial_indent="  " if k else "", subsequent_indent="     " if k else "")
        for k, part in enumerate(parts))
    # Start on a fresh line: a progress bar may have left the cursor mid-line.
    print(f"\nerror: {wrapped}", file=sys.stderr)


def error_message(error: BanaError) -> str:
    """The error's own words. A DataLoader worker re-raises it as "Caught BanaError in DataLoader
    worker process N. Original Traceback ...", whose last line holds them."""
    text = str(error)
    marker = f"{BanaError.__module__}.{BanaError.__qualname__}: "
    if text.startswith("Caught ") and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


_OUTPUT_FIX = ("choose a writable folder instead (the OUTPUT_DIR or DATA.PSEUDO_LABEL_DIR key, "
               "or the script's --out).")


def os_error_message(error: OSError) -> str | None:
    """A message for an OSError the user can fix (an output path that cannot be written, a full
    or read-only disk), or None for one that is a bug."""
    path = error.filename
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: {error.strerror}. Fix the permissions, or {_OUTPUT_FIX}"
    if error.errno == errno.ENOTDIR and path is not None:
        blocker = next((p for p in Path(path).parents if p.exists() and not p.is_dir()), path)
        return (f"cannot create {path}: {blocker} is a file, not a folder. Move the file away, "
                f"or {_OUTPUT_FIX}")
    if error.errno == errno.EEXIST and path is not None and not Path(path).is_dir():
        return (f"cannot create the folder {path}: a file of that name exists. Move the file "
                f"away, or {_OUTPUT_FIX}")
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"cannot write {path}: no space left on the device ({error.strerror}). Nothing "
                "half-written was kept. Free some space, then rerun the same command (stages 1 "
                "and 3: add --resume to continue from the last checkpoint); files already "
                "written are complete and are not redone.")
    return None


class Terminated(KeyboardInterrupt):
    """A termination signal (SIGTERM) raised in the main thread as a KeyboardInterrupt, so that
    it ends a run as Ctrl-C does."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Termination:
    """This process's state: the first interrupting signal it got (None: none), and whether it is
    already ending (a SIGTERM then only counts: the teardown it would cut short is under way)."""

    received: int | None = None
    ending = False
    pid: int | None = None  # the process that installed the handlers (not a fork of it)
    sigchld = None  # SIGCHLD's handler before a SIGTERM set it aside


def terminating() -> bool:
    """Whether SIGTERM raises `Terminated` in this process (an entry script is running)."""
    return _Termination.pid == os.getpid()


def _forked() -> bool:
    """Whether this is a forked child (a DataLoader worker) of the process that installed the
    handlers, which inherits them."""
    return _Termination.pid != os.getpid()


# Code that moves a tensor between processes (a DataLoader worker hands the main process a
# file descriptor over a connection of its own): an exception raised there cuts the transfer,
# and the worker prints the broken connection's traceback. A signal that arrives there is
# delivered again a moment later instead.
_TRANSFER = ("multiprocessing/resource_sharer.py", "multiprocessing/reduction.py",
             "multiprocessing/reductions.py")
REDELIVER_S = 0.02


def _deferred(signum: int, frame) -> bool:
    """Whether `frame` (where the signal interrupted this process) is inside a transfer; if so,
    the signal comes again in REDELIVER_S."""
    while frame is not None:
        if frame.f_code.co_filename.endswith(_TRANSFER):
            threading.Timer(REDELIVER_S, os.kill, (os.getpid(), signum)).start()
            return True
        frame = frame.f_back
    return False


def on_terminate(signum, frame) -> None:
    """The SIGTERM handler: the first signal raises `Terminated`, a later one only counts.

    From then on a child process that ends is no error: torch's DataLoader checks its workers
    on SIGCHLD and raises in the main thread, in the middle of the teardown (a pool waiting for
    its workers), when one was killed, as a SIGTERM to the whole group kills them.

    A forked child that inherits this handler (not torch's DataLoader workers, which install
    their own) ends as on Ctrl-C: the first signal raises KeyboardInterrupt, a later one kills
    it as it would without the handler (`multiprocessing` stops with SIGTERM a child that does
    not end by itself)."""
    if _forked():
        signal.signal(signum, signal.SIG_DFL)
        raise KeyboardInterrupt
    if _Termination.ending or _deferred(signum, frame):
        _Termination.received = _Termination.received or signum
        return
    _Termination.received = _Termination.received or signum
    _Termination.ending = True
    _Termination.sigchld = signal.signal(signal.SIGCHLD, _child_ended)
    raise Terminated(signum)


def _child_ended(signum, frame) -> None:
    """SIGCHLD during the teardown: nothing to do. A Python function, not SIG_DFL: a SIGCHLD
    that arrived just before the switch is still delivered to the handler in place, and Python
    raises "Signal 17 ignored due to race condition" wherever the main thread is when that
    handler is no function."""


def _on_interrupt(signum, frame) -> None:
    """Ctrl-C, as Python's own handler (every press raises KeyboardInterrupt), counted."""
    if not _forked():
        if _deferred(signum, frame):
            return
        _Termination.received = _Termination.received or signum
        _Termination.ending = True
    raise KeyboardInterrupt


def handle_termination() -> Callable[[], None]:
    """Make SIGTERM raise `Terminated` in this process (its main thread), and count Ctrl-C;
    returns the function that puts the previous handlers back. Processes a run starts itself
    (stage 2's process per device) call it too; pool workers ignore both signals
    (`utils.pool`)."""
    _Termination.received, _Termination.ending = None, False
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _Termination.pid = os.getpid()
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_terminate)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where it is ignored
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_interrupt)

    def restore() -> None:
        _Termination.pid = None
        if _Termination.sigchld is not None:
            previous[signal.SIGCHLD] = _Termination.sigchld
            _Termination.sigchld = None
        for signum, handler in previous.items():
            if handler is not None:  # None: not set from Python, left as it is
                signal.signal(signum, handler)

    return restore


INTERRUPTED = ("interrupted{by}; outputs written so far are complete files. Rerun the same command "
               "to continue (stages 1 and 3: add --resume to continue from the last checkpoint).")


def guarded(fn: Callable[[], object], debug: bool) -> object:
    """Run `fn`; turn user-fixable errors into a message and exit status 2, interruptions into
    a message and 128 + the signal."""
    restore = handle_termination()
    try:
        return _guarded(fn, debug)
    finally:
        _Termination.ending = True
        # A process group left to the interpreter's exit aborts the process ("terminate called
        # without an active exception") under torchrun / srun.
        from utils.distributed import destroy_process_group

        destroy_process_group()
        restore()


def _guarded(fn: Callable[[], object], debug: bool) -> object:
    # Whole lines, one write each: the processes of a torchrun / srun launch share one stdout,
    # and print() writes a text and its newline separately, so their lines would interleave
    # mid-line. In a log file, a line also appears as soon as it is printed.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True, write_through=False)
    try:
        return fn()
    except SystemExit:
        raise
    except BaseException as e:
        _Termination.ending = True
        status = _report(e, debug)
        if status is None:
            raise
        sys.exit(status)


def _report(error: BaseException, debug: bool) -> int | None:
    """Print the message for `error` and return the exit status, or None to let it raise (a
    traceback)."""
    from utils import distributed

    interrupted = isinstance(error, KeyboardInterrupt) or _Termination.received is not None
    lost = distributed.peer_lost(error)
    if interrupted or (lost and not debug):
        # Whatever this process was doing when it got the signal (or lost a peer) failed because
        # of that: the signal, or the other process's error, is what to report.
        peer = distributed.stopped_peer()
        if peer is not None or not interrupted:
            report_error(distributed.peer_message(peer))
            return 2
        signum = _Termination.received or signal.SIGINT
        report_error(INTERRUPTED.format(by=f" by {signal.Signals(signum).name}"
                                        if signum != signal.SIGINT else ""))
        return 128 + signum
    # An error of this process: the others of the run stop with a line that names it.
    distributed.announce_stop()
    if debug:
        return None
    if isinstance(error, BanaError):
        report_error(error_message(error))
        return 2
    if isinstance(error, OSError):
        message = os_error_message(error)
        if message is not None:
            report_error(message)
            return 2
    return None


def main(run: Callable[[argparse.Namespace], object], description: str,
         add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
         argv: list[str] | None = None):
    """Parse the common and the script's own arguments, then call `run(args)` with errors as
    messages."""
    parser = base_parser(description)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if not args.debug:
        # Library deprecation chatter that a user can do nothing about.
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    return guarded(lambda: run(args), args.debug)
