"""Result tables written as the work goes: a row per input, flushed as soon as it is known.

A long scoring run must never lose what it has done: an interrupt, a crash or a kill leaves
every finished row on disk, and `--resume` continues from there without rescoring. The table is
append-only while running; a row torn by a kill (the file does not end with a newline) is
dropped when the table is reopened for resuming. File names that are not valid UTF-8 (possible
on Linux) are written with their undecodable bytes as `\\xNN` escapes, so the CSV stays valid
UTF-8 and one odd name cannot stop the run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

from defectlens.errors import OutputError, option


def safe_text(text: str) -> str:
    """`text` as valid UTF-8: bytes a file name could not decode become \\xNN escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def one_line(text: str) -> str:
    """`safe_text` with line breaks and other control characters escaped: a message about a
    file named 'a\nb.png' stays one line on a terminal or in a log."""
    text = safe_text(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _exclusive_lock(path: Path):
    """Hold a lock beside `path` for the table's life: two runs writing the same results
    folder would interleave their rows, so the second one is refused instead."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no protection against concurrent runs
        return None
    try:
        handle = open(path.with_name(f".{path.name}.lock"), "w")  # noqa: SIM115
    except OSError as exc:
        raise OutputError(f"{path}: cannot write it ({exc.strerror or exc})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise OutputError(
            f"{path}: another defectlens run is writing this folder; wait for it or choose "
            f"another {option('--out', 'output folder')}"
        ) from None
    return handle


class ResultsTable:
    """A CSV table opened for appending rows one by one, optionally resuming an earlier run.

    With `resume`, rows of the earlier run that `is_done(row)` accepts are kept (and reported by
    `done`); the others (errors, a torn last row) are dropped so that they are attempted again.
    """

    def __init__(
        self,
        path: Path,
        columns: Sequence[str],
        resume: bool = False,
        is_done=lambda row: True,
    ) -> None:
        self.path = path
        self.columns = list(columns)
        self.done: dict[str, dict[str, str]] = {}
        self._lock = _exclusive_lock(path)
        try:
            self._open(resume, is_done)
        except BaseException:
            self.close()
            raise
        self._writer = csv.writer(self._fh)

    def _open(self, resume: bool, is_done) -> None:
        """Keep the finished rows of an earlier run (rewritten atomically), then append."""
        path = self.path
        kept: list[dict[str, str]] = []
        if resume and path.exists():
            kept = self._read_previous(is_done)
            self.done = {row[self.columns[0]]: row for row in kept}
        tmp = path.with_name(f".{path.name}.partial")
        try:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(self.columns)
                for row in kept:
                    writer.writerow([row[c] for c in self.columns])
            os.replace(tmp, path)
            self._fh = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise OutputError(f"{path}: cannot write it ({exc.strerror or exc})") from None

    def _read_previous(self, is_done) -> list[dict[str, str]]:
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot read it ({exc.strerror or exc})") from None
        text = raw.decode("utf-8", "replace")
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]  # a row torn by a kill: drop it
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames is not None and reader.fieldnames != self.columns:
            raise OutputError(
                f"{self.path}: its columns {reader.fieldnames} are not those of a defectlens "
                f"results table ({self.columns}); cannot resume from it"
            )
        return [
            row
            for row in reader
            if None not in row and all(isinstance(v, str) for v in row.values()) and is_done(row)
        ]

    def write(self, values: Sequence[object]) -> None:
        """Append one row and push it to the OS, so a crash or a kill cannot lose it."""
        self._writer.writerow([safe_text(str(v)) for v in values])
        self._fh.flush()

    def close(self) -> None:
        if hasattr(self, "_fh") and not self._fh.closed:
            self._fh.close()
        if self._lock is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._lock.name)
            self._lock.close()
            self._lock = None

    def __enter__(self) -> ResultsTable:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_scored(row: dict[str, str]) -> bool:
    """A row of an image that was scored (predict's results.csv, evaluate's scores.csv), not
    of an input that failed: failed inputs have no score."""
    return bool(row.get("score")) and row.get("predicted") != "error"


def has_scored_rows(path: Path) -> bool:
    """Whether an earlier table holds a scored image (not only inputs that failed): a run
    that scored nothing is not worth --resume or --overwrite, its rerun just replaces it."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return any(map(is_scored, csv.DictReader(fh)))
    except (OSError, ValueError, csv.Error):
        return True  # unreadable: kept, as any earlier run's
