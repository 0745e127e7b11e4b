"""Where jobs are kept: `jobs_dir`, a local directory or a filesystem URI (`s3://`, `gs://`,
`file://`, through pyarrow's filesystems) that the Router and every node see.

Layout, one folder per job under its owner (the API key id, or `anonymous`), so that a key
reaches only its own jobs (another key's job id is simply not there: 404):

    <jobs_dir>/<owner>/<job_id>/job.json       the request, as admitted (written once)
                               /status.json    progress, written by the job's driver
                               /cancel         present once DELETE asked the job to stop
                               /upload.<ext>   an uploaded archive
                               /results/part-*.parquet   the rows, each part complete or absent

The Router writes the record and the cancel mark; the driver (serve_app/jobs/driver.py) writes
the status and the parts. No Ray, no torch.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path

from serve_app.errors import ApiError
from serve_app.heads.registry import open_location

JOB_ID = re.compile(r"job-[0-9a-f]{20}")
RECORD, STATUS, CANCEL, RESULTS = "job.json", "status.json", "cancel", "results"
ANONYMOUS_OWNER = "anonymous"
PART = re.compile(r"part-[0-9A-Za-z-]{1,80}\.parquet")


def new_job_id() -> str:
    """Creation second first (ids sort as jobs were made), then 48 random bits."""
    return f"job-{int(time.time()):08x}{secrets.token_hex(6)}"


def unknown_job(job_id: str) -> ApiError:
    return ApiError(404, "unknown_job", f"no job {job_id[:40]!r}")


class JobStore:
    """The jobs under one jobs_dir."""

    def __init__(self, location: str):
        self.location = location
        self.fs, self.root = open_location(location)

    @property
    def local(self) -> bool:
        """Whether jobs_dir is a plain directory (parts are written into it directly)."""
        return "://" not in self.location

    def folder(self, owner: str, job_id: str) -> str:
        if not JOB_ID.fullmatch(job_id):
            raise unknown_job(job_id)
        return f"{self.root.rstrip('/')}/{owner}/{job_id}"

    def local_folder(self, owner: str, job_id: str) -> Path:
        return Path(self.folder(owner, job_id))

    # -- files ----------------------------------------------------------------------------
    def _write(self, path: str, data: bytes) -> None:
        """Write all or nothing: a reader sees the old file or the new one."""
        temporary = f"{path}.{secrets.token_hex(4)}.tmp"
        with self.fs.open_output_stream(temporary) as stream:
            stream.write(data)
        self.fs.move(temporary, path)

    def _read(self, path: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(path) as stream:
                return stream.read()
        except (FileNotFoundError, OSError) as exc:
            if isinstance(exc, FileNotFoundError) or "not found" in str(exc).lower() \
                    or "no such file" in str(exc).lower():
                return None
            raise

    def _exists(self, path: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(path).type != fs.FileType.NotFound

    # -- records --------------------------------------------------------------------------
    def create(self, owner: str, job_id: str, record: dict) -> None:
        folder = self.folder(owner, job_id)
        self.fs.create_dir(f"{folder}/{RESULTS}", recursive=True)
        self._write(f"{folder}/{RECORD}", json.dumps(record).encode())

    def open_archive_writer(self, owner: str, job_id: str, name: str):
        """Where the uploaded archive goes (`name`: upload.zip or upload.tar)."""
        folder = self.folder(owner, job_id)
        self.fs.create_dir(folder, recursive=True)
        return self.fs.open_output_stream(f"{folder}/{name}")

    def record(self, owner: str, job_id: str) -> dict:
        raw = self._read(f"{self.folder(owner, job_id)}/{RECORD}")
        if raw is None:
            raise unknown_job(job_id)
        return json.loads(raw)

    def status(self, owner: str, job_id: str) -> dict | None:
        raw = self._read(f"{self.folder(owner, job_id)}/{STATUS}")
        return None if raw is None else json.loads(raw)

    def write_status(self, owner: str, job_id: str, status: dict) -> None:
        self._write(f"{self.folder(owner, job_id)}/{STATUS}", json.dumps(status).encode())

    def job_ids(self, owner: str) -> list[str]:
        """The owner's jobs, oldest first (their ids begin with their creation time)."""
        from pyarrow import fs

        infos = self.fs.get_file_info(fs.FileSelector(f"{self.root.rstrip('/')}/{owner}",
                                                      allow_not_found=True))
        return sorted(info.base_name for info in infos
                      if info.type == fs.FileType.Directory and JOB_ID.fullmatch(info.base_name))

    def owners(self) -> list[str]:
        from pyarrow import fs

        infos = self.fs.get_file_info(fs.FileSelector(self.root, allow_not_found=True))
        return [info.base_name for info in infos if info.type == fs.FileType.Directory]

    # -- cancelling -----------------------------------------------------------------------
    def request_cancel(self, owner: str, job_id: str) -> None:
        self._write(f"{self.folder(owner, job_id)}/{CANCEL}", b"")

    def cancel_requested(self, owner: str, job_id: str) -> bool:
        return self._exists(f"{self.folder(owner, job_id)}/{CANCEL}")

    # -- results --------------------------------------------------------------------------
    def results_folder(self, owner: str, job_id: str) -> str:
        return f"{self.folder(owner, job_id)}/{RESULTS}"

    def parts(self, owner: str, job_id: str) -> list[str]:
        """The complete parts, in the order they were written (their names sort so)."""
        from pyarrow import fs

        infos = self.fs.get_file_info(fs.FileSelector(self.results_folder(owner, job_id),
                                                      allow_not_found=True))
        return sorted(info.base_name for info in infos if PART.fullmatch(info.base_name))

    def part_path(self, owner: str, job_id: str, name: str) -> str:
        if not PART.fullmatch(name):
            raise ApiError(404, "unknown_part", f"no part {name[:80]!r}")
        return f"{self.results_folder(owner, job_id)}/{name}"

    def read_part(self, owner: str, job_id: str, name: str) -> bytes:
        data = self._read(self.part_path(owner, job_id, name))
        if data is None:
            raise ApiError(404, "unknown_part", f"no part {name[:80]!r}")
        return data

    def part_rows(self, owner: str, job_id: str, name: str) -> int:
        import pyarrow.parquet as pq

        with self.fs.open_input_file(self.part_path(owner, job_id, name)) as handle:
            return pq.ParquetFile(handle).metadata.num_rows

    def read_rows(self, owner: str, job_id: str, name: str, start: int, count: int):
        """Rows [start, start + count) of one part, as a pyarrow Table."""
        import pyarrow.parquet as pq

        with self.fs.open_input_file(self.part_path(owner, job_id, name)) as handle:
            return pq.read_table(handle).slice(start, count)

    def upload_part(self, owner: str, job_id: str, local: Path) -> None:
        """A part the driver wrote locally, copied in (jobs_dir is a URI)."""
        self._write(f"{self.results_folder(owner, job_id)}/{local.name}", local.read_bytes())

    def delete(self, owner: str, job_id: str) -> None:
        self.fs.delete_dir(self.folder(owner, job_id))

    def sweep(self, retention_s: float, now: float | None = None) -> list[str]:
        """Delete the folders of jobs that ended more than `retention_s` ago (by the time their
        status says); the ids deleted. Jobs still running, or without a status, stay."""
        from serve_app.jobs.view import ENDED, parse_time

        now = time.time() if now is None else now
        deleted = []
        for owner in self.owners():
            for job_id in self.job_ids(owner):
                status = self.status(owner, job_id) or {}
                finished = parse_time(status.get("finished"))
                if status.get("state") in ENDED and finished is not None \
                        and now - finished > retention_s:
                    self.delete(owner, job_id)
                    deleted.append(job_id)
        return deleted
