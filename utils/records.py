"""What produced each output file, so that "already done" means done from the same inputs.

A stage that skips outputs already written (stage 2's labels, predict.py's label maps) keeps a
ledger beside them: one JSON line per output, appended once the output is complete, holding
the fingerprint of everything that shaped it (the model file, the settings, the image, its
boxes). An output counts as done only when its ledger line matches what would make it now; a
mismatch is named (which input changed) and the stage either redoes exactly those outputs or
refuses, pointing at the flag that redoes them.

The ledger is append-only and each line is one `write` of a few hundred bytes with O_APPEND, so
processes of one run (workers, torchrun ranks) can add to it at once, and a run killed mid-line
leaves at most one torn last line, which is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able values and byte strings (numpy arrays: their bytes,
    dtype and shape)."""
    digest = hashlib.sha256()
    for part in parts:
        if hasattr(part, "tobytes"):
            digest.update(f"{part.dtype}{part.shape}".encode())
            digest.update(part.tobytes())
        elif isinstance(part, bytes):
            digest.update(part)
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:20]


class Ledger:
    """The JSON-lines record of a folder's outputs: {key: entry} (the last line of a key wins)."""

    def __init__(self, path):
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> dict[str, dict]:
        entries = {}
        if not self.path.is_file():
            return entries
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a killed run: its output is redone
            if isinstance(entry, dict) and "key" in entry:
                entries[entry["key"]] = entry
        return entries

    def add(self, key: str, **entry) -> None:
        """Append one line (flushed to the disk before returning)."""
        self.add_many({key: entry})

    def add_many(self, entries: dict[str, dict]) -> None:
        """Append one line per {key: entry}, in one write flushed to the disk."""
        if not entries:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps({"key": key, **entry}, sort_keys=True) + "\n"
                       for key, entry in entries.items())
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
