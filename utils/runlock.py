"""One run at a time per output folder: a lock file holding who owns the folder.

    with RunLock(cfg.run_dir, "stage 3"):
        ...   # train, write checkpoints

The lock is `<folder>/.lock`, holding the owner's PID, host, start time and command. It is
created whole: written to a temporary file and hard-linked into place, which fails if it exists
(atomic, also on network filesystems that honour it; O_EXCL where links are not supported), so
a full disk is a message, never an empty lock. A second run into the same folder is refused
with that information. A lock whose process is gone (same host, no such PID)
is stale: it is taken over with a note. Only the first process of a multi-process run takes it:
Lightning's DDP workers and torchrun's other ranks (LOCAL_RANK / RANK > 0) run under the lock of
rank 0.

A run that reads a folder for its whole duration (stage 3 and its pseudo labels) holds a
`ReadLock` on it: a `RunLock` on that folder is then refused (stage 2 would delete or rewrite
the labels under it), and the reader is refused while a `RunLock` is held there.

`clean_temporary_files` removes what `utils.io`'s atomic writes leave behind when a process is
killed mid-write (`.<name>.<random>.tmp`); call it once the lock is held, when no writer can be
running in the folder.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from utils.errors import BanaError

LOCK_NAME = ".lock"


def _is_secondary_rank() -> bool:
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        value = os.environ.get(key)
        if value not in (None, "", "0"):
            return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _record(what: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "what": what,
            "command": " ".join(sys.argv)}


def _create_whole(path: Path, record: dict, what: str) -> None:
    """Create `path` holding `record`, atomically: written in full to a temporary file, then
    linked to `path`, which fails with FileExistsError when it exists. Nobody ever sees a
    half-written lock, and a failed write (a full disk) leaves nothing behind but says so.
    Where hard links are not supported, O_EXCL creation, removed again if the write fails."""
    text = json.dumps(record)
    tmp = path.with_name(f".{path.name.lstrip('.')}.{_safe(socket.gethostname())}."
                         f"{os.getpid()}.tmp")
    try:
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)
            return
        except FileExistsError:
            raise
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                                 errno.EMLINK) or not tmp.exists():
                raise
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
        except OSError:
            path.unlink(missing_ok=True)
            raise
    except OSError as err:
        if isinstance(err, FileExistsError):
            raise
        if err.errno == errno.ENOSPC:
            raise BanaError(f"cannot take {what}: the disk is full (writing {path}). Free some "
                            "space and run the command again, or choose a folder on another "
                            "disk.") from None
        raise OSError(err.errno, err.strerror, str(err.filename or path)) from None
    finally:
        tmp.unlink(missing_ok=True)


class RunLock:
    """Context manager holding `<folder>/.lock` for the duration of a run (see module doc)."""

    def __init__(self, folder, what: str):
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / LOCK_NAME
        self.owned = False

    def __enter__(self):
        if _is_secondary_rank():
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        record = _record(self.what)
        for _ in range(2):
            try:
                _create_whole(self.path, record, f"the run lock of {self.folder}")
            except FileExistsError:
                if not self._take_over_stale():
                    break
                continue
            self.owned = True
            try:
                _refuse_readers(self.folder, self.what)
            except BaseException:
                self.__exit__()
                raise
            return self
        owner = self._owner()
        raise BanaError(
            f"{self.folder} is in use by another run ({owner.get('what', '?')}, PID "
            f"{owner.get('pid', '?')} on {owner.get('host', '?')} since "
            f"{owner.get('started', '?')}: {owner.get('command', '?')}). Two runs writing one "
            f"folder would overwrite each other's files. Wait for it to finish, or choose another "
            f"folder (--opts NAME other_run, or another OUTPUT_DIR / DATA.PSEUDO_LABEL_DIR). If "
            f"no such run is alive, delete {self.path}.")

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _take_over_stale(self) -> bool:
        """Remove a lock whose process is gone (on this host); True if removed."""
        owner = self._owner()
        if not owner:  # being written right now, or unreadable: not ours to judge
            age = time.time() - self.path.stat().st_mtime if self.path.exists() else 0
            if age < 10:
                return False
        elif owner.get("host") != socket.gethostname() or _alive(int(owner.get("pid", -1))):
            return False
        print(f"note: {self.path} was left by a run that no longer exists "
              f"(PID {owner.get('pid', '?')}); taking the folder over.", flush=True)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        return True

    def __exit__(self, *exc):
        if self.owned:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.owned = False
        return False


READER_PREFIX = ".reader."


def _live(record: dict) -> bool:
    """Whether the process a lock or reader record names may still run: one on another host,
    or one whose record cannot be read, counts as alive."""
    if not record or record.get("host") != socket.gethostname():
        return True
    try:
        return _alive(int(record.get("pid", -1)))
    except (TypeError, ValueError):
        return True


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _refuse_readers(folder: Path, what: str) -> None:
    """Refuse to write `folder` while a live run reads it (`ReadLock`): stage 2 deleting or
    rewriting the labels a stage 3 trains on. A record left by a process that is gone is
    removed."""
    readers = []
    for path in sorted(folder.glob(READER_PREFIX + "*")):
        if path.name.endswith(".tmp"):
            continue
        record = _read_record(path)
        if _live(record):
            readers.append((path, record))
        else:
            path.unlink(missing_ok=True)
    if readers:
        path, owner = readers[0]
        raise BanaError(
            f"{folder} is in use by a run that reads it ({owner.get('what', '?')}, PID "
            f"{owner.get('pid', '?')} on {owner.get('host', '?')} since "
            f"{owner.get('started', '?')}: {owner.get('command', '?')}); {what} would delete or "
            "rewrite the files under it. Wait for that run to finish, or write into another "
            f"folder (another DATA.PSEUDO_LABEL_DIR). If no such run is alive, delete {path}.")


class ReadLock:
    """Context manager: a run that reads `folder` for its whole duration (stage 3 training on
    the pseudo labels of DATA.PSEUDO_LABEL_DIR) says so with `<folder>/.reader.<host>.<pid>`.
    A `RunLock` on the folder (stage 2, which deletes or rewrites labels) is refused while the
    reader lives, and the reader is refused while such a lock is held. Both write their record
    before they look for the other's, so of two runs started together one always sees the
    other. A folder this process cannot write (a read-only dataset) cannot be written by a
    stage 2 of this user either: the run goes on without a record, and says so."""

    def __init__(self, folder, what: str):
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / f"{READER_PREFIX}{_safe(socket.gethostname())}.{os.getpid()}"
        self.owned = False

    def __enter__(self):
        if _is_secondary_rank() or not self.folder.is_dir():
            return self
        try:
            # A record of this PID was left by a process gone before it: replaced.
            self.path.unlink(missing_ok=True)
            _create_whole(self.path, _record(self.what), f"the read lock of {self.folder}")
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            print(f"note: {self.folder} cannot be written ({err.strerror}), so this run cannot "
                  "mark it as in use; do not relabel it (stage 2) until this run has finished.",
                  flush=True)
            return self
        self.owned = True
        lock = self.folder / LOCK_NAME
        owner = _read_record(lock) if lock.exists() else None
        if owner is not None and _live(owner):
            self.__exit__()
            raise BanaError(
                f"{self.folder} is being written by another run ({owner.get('what', '?')}, PID "
                f"{owner.get('pid', '?')} on {owner.get('host', '?')} since "
                f"{owner.get('started', '?')}: {owner.get('command', '?')}); {self.what} would "
                "read files that are being deleted or rewritten. Wait for it to finish, or read "
                f"another folder. If no such run is alive, delete {lock}.")
        return self

    def __exit__(self, *exc):
        if self.owned:
            self.path.unlink(missing_ok=True)
            self.owned = False
        return False


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def clean_temporary_files(folder) -> int:
    """Remove the temporary files killed atomic writes left under `folder`; returns how many
    (and says so)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    leftovers = [p for p in folder.rglob(".*.tmp") if p.is_file()]
    for p in leftovers:
        p.unlink(missing_ok=True)
    if leftovers:
        print(f"Removed {len(leftovers)} temporary file(s) an interrupted run left in {folder} "
              "(incomplete writes; the files they were for are rewritten).", flush=True)
    return len(leftovers)
