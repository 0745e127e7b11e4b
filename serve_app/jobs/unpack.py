"""An uploaded archive, unpacked by its job into the job's folder (where every node of the
cluster reads it), with the bombs refused (serve_app/jobs/archive.py)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from serve_app.jobs.archive import ArchiveLimits, extract
from serve_app.jobs.settings import JobSettings
from serve_app.jobs.store import JobStore

FILES = "files"


def limits_of(jobs: JobSettings) -> ArchiveLimits:
    return ArchiveLimits(max_entries=jobs.max_archive_entries,
                         max_unpacked_bytes=jobs.max_unpacked_bytes)


def unpack(store: JobStore, owner: str, job_id: str, archive: str, jobs: JobSettings
           ) -> tuple[list[str], str]:
    """(the archive's files, as the job reads them; the prefix that makes a file's name in
    the archive). A jobs_dir URI gets the files copied up."""
    from serve_app.tools.client import AUDIO_SUFFIXES

    limits = limits_of(jobs)
    if store.local:
        folder = store.local_folder(owner, job_id)
        written = extract(folder / archive, folder / FILES, limits)
        prefix = f"{folder / FILES}/"
        return [str(path) for path in written if path.suffix.lower() in AUDIO_SUFFIXES], prefix
    scratch = Path(tempfile.mkdtemp(prefix="e2v-job-"))
    try:
        local_archive = scratch / archive
        with store.fs.open_input_stream(f"{store.folder(owner, job_id)}/{archive}") as stream, \
                open(local_archive, "wb") as out:
            shutil.copyfileobj(stream, out, 1024 * 1024)
        written = extract(local_archive, scratch / FILES, limits)
        remote = f"{store.folder(owner, job_id)}/{FILES}"
        files = []
        for path in written:
            if path.suffix.lower() not in AUDIO_SUFFIXES:
                continue
            relative = path.relative_to(scratch / FILES).as_posix()
            target = f"{remote}/{relative}"
            store.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with store.fs.open_output_stream(target) as out, open(path, "rb") as source:
                shutil.copyfileobj(source, out, 1024 * 1024)
            files.append(_uri(store, target))
        return files, _uri(store, remote) + "/"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _uri(store: JobStore, path: str) -> str:
    """A path inside jobs_dir's filesystem as a URI the decode tasks open."""
    return f"{store.location.split('://', 1)[0]}://{path}"
