"""The job's output: append-only Parquet parts in one directory.

Each part is written under a hidden temporary name (`.part-*.parquet.tmp`, which Parquet readers
skip), flushed to disk, then renamed: a part is either complete or not there. `--resume` reads
the `path` column of the complete parts and skips those files; a job killed mid-way loses only
the rows it had not yet written. No Ray here.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PART_GLOB = "part-*.parquet"
TEMP_PREFIX = ".part-"


class OutputDirError(ValueError):
    """The output directory cannot take this job's parts."""


def prepare(directory: Path, resume: bool, variant: str, embeddings: bool,
            by_segment: bool = False) -> set[str]:
    """Create `directory` if needed and return the paths its complete parts hold (resume), or
    refuse a directory that is not empty (no resume), or whose parts another kind of job wrote
    (another variant, with or without embeddings, by file or by segment). Partial parts of a
    killed job are removed."""
    if directory.exists() and not directory.is_dir():
        raise OutputDirError(f"{directory} is not a directory")
    if not resume:
        if directory.exists() and any(directory.iterdir()):
            raise OutputDirError(f"{directory} is not empty: pass --resume to add the files "
                                 "not yet scored there, or choose an empty directory")
        directory.mkdir(parents=True, exist_ok=True)
        return set()
    directory.mkdir(parents=True, exist_ok=True)
    for partial in directory.glob(TEMP_PREFIX + "*"):
        partial.unlink(missing_ok=True)
    done: set[str] = set()
    for part in sorted(directory.glob(PART_GLOB)):
        table = _read(part, ["path", "model_version"])
        others = set(table.column("model_version").to_pylist()) - {variant}
        if others:
            raise OutputDirError(f"{part} holds rows of {sorted(others)}; this job scores with "
                                 f"{variant!r}: resume with that model_version, or use another "
                                 "directory")
        names = pq.read_schema(part).names
        for flag, column, wanted in (("--embeddings", "embedding", embeddings),
                                     ("--by-segment", "segment", by_segment)):
            if (column in names) != wanted:
                raise OutputDirError(f"{part} was written {'with' if not wanted else 'without'}"
                                     f" {flag}: resume the same way, or use another directory")
        done.update(table.column("path").to_pylist())
    return done


def done_paths(directory: Path) -> set[str]:
    """Every path in the complete parts of `directory`."""
    done: set[str] = set()
    for part in sorted(directory.glob(PART_GLOB)):
        done.update(_read(part, ["path"]).column("path").to_pylist())
    return done


def _read(part: Path, columns: list[str]) -> pa.Table:
    try:
        return pq.read_table(part, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise OutputDirError(f"cannot read {part}: {exc}") from None


def read_rows(directory: Path) -> pa.Table:
    """All complete parts of `directory` as one table (for tests and notebooks)."""
    parts = sorted(directory.glob(PART_GLOB))
    return pa.concat_tables([pq.read_table(part) for part in parts]) if parts else pa.table({})


class PartWriter:
    """Collects result tables and writes them as parts of at most `part_rows` rows, or
    sooner when the oldest unwritten row is `part_s` seconds old: a slow job still saves
    its progress."""

    def __init__(self, directory: Path, part_rows: int, part_s: float):
        self.directory = directory
        self.part_rows, self.part_s = part_rows, part_s
        # A run's own prefix: parts of several runs (resumes) never share a name.
        self.run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
        self.written: list[Path] = []
        self._pending: list[pa.Table] = []
        self._rows = 0
        self._since: float | None = None

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self._since is None:
            self._since = time.monotonic()
        self._pending.append(table)
        self._rows += table.num_rows
        while self._rows >= self.part_rows:
            self._write(self.part_rows)
        if self._rows and time.monotonic() - self._since >= self.part_s:
            self._write(self._rows)

    def flush(self) -> None:
        """Write what is pending now, as one part (the writer stays usable)."""
        if self._rows:
            self._write(self._rows)

    close = flush  # at the end: what is left

    def _write(self, rows: int) -> None:
        table = pa.concat_tables(self._pending).combine_chunks()
        rows = path_boundary(table, rows)
        part, rest = table.slice(0, rows), table.slice(rows)
        self._pending = [rest] if rest.num_rows else []
        self._rows = rest.num_rows
        self._since = time.monotonic() if self._rows else None
        name = f"part-{self.run_id}-{len(self.written):05d}.parquet"
        self.written.append(write_part(self.directory, name, part))


def path_boundary(table: pa.Table, rows: int) -> int:
    """`rows`, moved on past the rows of the path it would cut: a recording's segment rows
    (which leave the engine together) stay in one part, so that a path in a complete part
    has all its rows, as --resume assumes."""
    paths = table.column("path")
    while 0 < rows < table.num_rows and paths[rows] == paths[rows - 1]:
        rows += 1
    return rows


def write_part(directory: Path, name: str, table: pa.Table) -> Path:
    """Write `table` as `directory/name`, all or nothing."""
    final = directory / name
    temporary = directory / f".{name}.tmp"
    with open(temporary, "wb") as handle:
        pq.write_table(table, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    _fsync_dir(directory)
    return final


def _fsync_dir(directory: Path) -> None:
    """The rename itself reaches the disk (a crash after it keeps the part)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

