"""Images a run could not use, kept apart so that one bad file does not cost the others.

predict.py and stage 2 go through every image; an image that cannot be read or used (a truncated
JPEG, a decompression bomb, one over the size limit, a damaged annotation) is skipped with its
reason, the others are done, and the run ends with `SkippedImages`: every skipped image and why,
exit status 2. A rerun does only what is missing.
"""

from __future__ import annotations

from pathlib import Path

from utils.errors import BanaError

# How many skipped images a message lists one by one.
LISTED = 20
# The record of a label folder's skipped images (stage 2: one JSON line per image, its reason).
SKIPPED = "skipped.jsonl"


class SkippedImages(BanaError):
    """Some images were skipped; `skipped` is [(image, reason)], `result` what the run returns
    otherwise (for callers of the Python API)."""

    def __init__(self, skipped: list[tuple[str, str]], total: int, result=None):
        self.skipped, self.total, self.result = list(skipped), total, result
        n = len(self.skipped)
        lines = [f"  {k}. {name}: {reason}" for k, (name, reason)
                 in enumerate(self.skipped[:LISTED], start=1)]
        if n > LISTED:
            lines.append(f"  {LISTED + 1}. ... and {n - LISTED} more.")
        super().__init__(
            f"{n} of {total} image(s) could not be used and were skipped; the other {total - n} "
            "are done. Fix or remove the skipped ones and run the same command again (what is "
            "done is not done again). Each skipped image and why:\n" + "\n".join(lines))


class Skips:
    """The images skipped so far, in order: add(image, reason); `raise_if_any(total)` at the
    end. With `ledger` (a path), each is also recorded there (one JSON line per image), so that
    the processes of one run (stage 2's shards) can report each other's."""

    def __init__(self, ledger: Path | None = None):
        self.items: list[tuple[str, str]] = []
        self.ledger = ledger

    def add(self, image, reason: str) -> None:
        self.items.append((str(image), reason))
        if self.ledger is not None:
            from utils.records import Ledger

            Ledger(self.ledger).add(str(image), reason=reason)

    def __len__(self) -> int:
        return len(self.items)

    def raise_if_any(self, total: int, result=None) -> None:
        if self.items:
            raise SkippedImages(self.items, total, result)


def unfinished_error(missing: list[str], total: int, ledger: Path) -> BanaError:
    """The error for images a run left without outputs: `SkippedImages` with the reasons the
    run's `Skips(ledger)` recorded for them, else (the run was cut short) the advice to rerun."""
    from utils.records import Ledger

    recorded = Ledger(ledger).read() if Path(ledger).is_file() else {}
    reasons = [(i, recorded[i]["reason"]) for i in missing if i in recorded]
    if len(reasons) == len(missing):
        return SkippedImages(reasons, total)
    return BanaError(f"{len(missing)} images still lack labels (first: {missing[:3]}); rerun "
                     "the same command to finish them.")
