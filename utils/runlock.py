"""One run at a time per output folder: a lock file holding who owns the folder.

    with RunLock(cfg.run_dir, "stage 3"):
        ...   # train, write checkpoints

The lock is `<folder>/.lock`, created with O_EXCL (atomic, also on network filesystems that
honour it) and holding the owner's PID, host, start time and command. A second run into the same
folder is refused with that information. A lock whose process is gone (same host, no such PID)
is stale: it is taken over with a note. Only the first process of a multi-process run takes it:
Lightning's DDP workers and torchrun's other ranks (LOCAL_RANK / RANK > 0) run under the lock of
rank 0.

`clean_temporary_files` removes what `utils.io`'s atomic writes leave behind when a process is
killed mid-write (`.<name>.<random>.tmp`); call it once the lock is held, when no writer can be
running in the folder.
"""

from __future__ import annotations

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
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "what": self.what,
                  "command": " ".join(sys.argv)}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._take_over_stale():
                    break
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            self.owned = True
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
