"""What every entry script shares: its arguments, and errors as messages.

A stage script is `main(run, description, add_arguments)`: it parses `--config-file`, `--gpu-id`,
`--opts` (plus the script's own flags) and calls `run(args)`, which loads the config and calls
the stage's `run(cfg, **options)` in engine/. A `BanaError` (or another error a user can act on:
an output path that is a file or not writable, a full disk) becomes one paragraph on stderr and
exit status 2; `--debug` shows the traceback instead. This module and the entry scripts are the
only ones that know about argparse.
"""

from __future__ import annotations

import argparse
import errno
import re
import sys
import textwrap
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


def guarded(fn: Callable[[], object], debug: bool) -> object:
    """Run `fn`; turn user-fixable errors into a message and exit status 2."""
    try:
        return _guarded(fn, debug)
    finally:
        # A process group left to the interpreter's exit aborts the process ("terminate called
        # without an active exception") under torchrun / srun.
        from utils.distributed import destroy_process_group

        destroy_process_group()


def _guarded(fn: Callable[[], object], debug: bool) -> object:
    # Whole lines, one write each: the processes of a torchrun / srun launch share one stdout,
    # and print() writes a text and its newline separately, so their lines would interleave
    # mid-line. In a log file, a line also appears as soon as it is printed.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True, write_through=False)
    try:
        return fn()
    except BanaError as e:
        if debug:
            raise
        report_error(error_message(e))
    except OSError as e:
        message = os_error_message(e)
        if debug or message is None:
            raise
        report_error(message)
    except KeyboardInterrupt:
        report_error("interrupted; outputs written so far are complete files. Rerun the same "
                     "command to continue (stages 1 and 3: add --resume to continue from the "
                     "last checkpoint).")
        sys.exit(130)
    sys.exit(2)


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
