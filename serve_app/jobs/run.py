"""The body of a job's driver (serve_app/jobs/driver.py): the batch job's pipeline over the
job's inputs, with the Router's limits and the variant's model, its rows saved as parts in the
job's folder, its audio charged to the key."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from serve_app.config import RouterSettings
from serve_app.jobs.store import JobStore

QUOTA_CHECK_S = 1.0  # the key's balance is exchanged with the Router replicas this often
JOIN_TRIES = 4


class Stop(Exception):
    """The job stops early: `code` says why (quota_exceeded)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class JobQuota:
    """The key's audio quota, as the Router replicas hold it: this job is one more member of
    their quota board (serve_app/traffic/quota_share.py), so its spending reaches them and
    theirs reaches it."""

    def __init__(self, key_id: str | None, router: RouterSettings, app: str, job_id: str):
        from serve_app.api.quota_board import GcsBoard
        from serve_app.traffic.access import AccessControl
        from serve_app.traffic.quota_share import QuotaShare

        self.key_id = key_id
        spec = router.api_keys.get(key_id) if key_id else None
        self.active = bool(spec and spec.audio_seconds_per_minute)
        if self.active:
            self.access = AccessControl(clock=time.monotonic)
            self.access.configure(router.model_copy(update={"api_keys": {key_id: spec},
                                                            "api_keys_file": None}))
            self.share = QuotaShare(self.access)
            self.board = GcsBoard(app, f"job-{job_id}")
            self._exchanged = 0.0
            self.exchange(force=True)

    def exchange(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.active or (not force and now - self._exchanged < QUOTA_CHECK_S):
            return
        self._exchanged = now
        try:
            drop = self.share.absorb(self.board.exchange(self.share.note()))
            if drop:
                self.board.forget(drop)
        except Exception:
            pass  # the board unreachable a moment: this job's own count still holds

    def charge(self, seconds: float) -> None:
        """Charge scored audio; Stop(quota_exceeded) once the key's balance is spent."""
        from serve_app.errors import AccessDenied

        if not self.active:
            return
        self.access.charge_audio(self.key_id, seconds)
        self.exchange()
        try:
            self.access.check_audio(self.key_id)
        except AccessDenied as exc:
            self.exchange(force=True)  # the Routers learn this job's last spending
            raise Stop("quota_exceeded", exc.message) from None

    def close(self) -> None:
        if self.active:
            self.exchange(force=True)


def _plan(record: dict, router: RouterSettings):
    from serve_app.heads.headfile import decode
    from serve_app.heads.registry import read_file
    from serve_app.tools.batch.plan import job_plan

    head = None
    if record.get("head"):
        head = decode(read_file(record["head"]["uri"]), router.heads.max_head_bytes)
        if head.sha256 != record["head"]["sha256"]:  # the revision admitted, exactly
            raise RuntimeError(f"head {head.name}@{head.revision} changed since the job was "
                               "admitted")
    labels = tuple(record["labels"]) if record.get("labels") else None
    return job_plan(router, record["variant"], record["model"], head=head, labels=labels)


def _inputs(store: JobStore, owner: str, job_id: str, record: dict,
            router: RouterSettings) -> tuple[list[str], str | None, list[str]]:
    """(the files to score, the prefix to strip from their row paths, the refused files)."""
    from serve_app.jobs.inputs import list_inputs
    from serve_app.tools.client import AUDIO_SUFFIXES

    archive = record.get("archive")
    if not archive:
        files, refused = list_inputs(record["inputs"], router.jobs.allow_inputs,
                                     AUDIO_SUFFIXES)
        return files, None, refused
    from serve_app.jobs.unpack import unpack

    files, prefix = unpack(store, owner, job_id, archive, router.jobs)
    return files, prefix, []


def _relabel(table: pa.Table, prefix: str | None) -> pa.Table:
    """Rows of an uploaded archive's files name them as the archive does."""
    if prefix is None:
        return table
    paths = [path[len(prefix):] if path.startswith(prefix) else path
             for path in table.column("path").to_pylist()]
    return table.set_column(table.schema.get_field_index("path"), "path",
                            pa.array(paths, pa.string()))


def _pipeline_args(record: dict, router: RouterSettings) -> argparse.Namespace:
    jobs = router.jobs
    return argparse.Namespace(
        files_per_task=jobs.files_per_task, decode_cpus=jobs.decode_num_cpus, no_progress=True,
        start_timeout_s=jobs.start_timeout_s, concurrency=(jobs.engines, jobs.engines),
        num_cpus=jobs.engine_num_cpus, num_gpus=jobs.engine_num_gpus,
        embeddings=bool(record.get("embeddings")), by_segment=bool(record.get("by_segment")))


def _join_cluster(address: str, tries: int = JOIN_TRIES) -> None:
    """Join the job's cluster; a loaded head can miss one connection deadline."""
    import ray

    for attempt in range(tries):
        try:
            ray.init(address=address, log_to_driver=False)
            return
        except ConnectionError:
            if attempt + 1 == tries:
                raise
            time.sleep(2.0 * (attempt + 1))


def run_job(store: JobStore, owner: str, job_id: str, record: dict, progress,
            address: str = "auto") -> None:
    from serve_app.tools.batch.job import Tally, dataset
    from serve_app.tools.batch.parts import PartWriter

    _join_cluster(address)
    router = RouterSettings.model_validate(record["router"])
    plan = _plan(record, router)
    files, prefix, refused = _inputs(store, owner, job_id, record, router)
    if refused:
        progress.status["refused"] = {"count": len(refused), "examples": refused[:20],
                                      "why": "outside jobs.allow_inputs (through a link)"}
    if not files:
        raise FileNotFoundError("no audio files found in the job's inputs")
    local_parts = store.local_folder(owner, job_id) / "results" if store.local else None
    directory = local_parts or Path(tempfile.mkdtemp(prefix="e2v-job-"))
    writer = PartWriter(directory, router.jobs.part_rows, router.jobs.part_s)
    tally, quota, uploaded = Tally(), JobQuota(record.get("key_id"), router, record["app"],
                                               job_id), 0

    def publish() -> None:  # parts written locally reach a jobs_dir URI
        nonlocal uploaded
        if local_parts is None:
            for part in writer.written[uploaded:]:
                store.upload_part(owner, job_id, part)
            uploaded = len(writer.written)

    args = _pipeline_args(record, router)
    try:
        for table in dataset(plan, pa.array(files, pa.string()), args).iter_batches(
                batch_format="pyarrow", batch_size=None):
            table = _relabel(table, prefix)
            writer.add(table)
            if not writer.written:
                writer.flush()  # the first rows readable at once, not part_s later
            tally.add(table)
            publish()
            progress.scored(tally, len(writer.written), len(files))
            quota.charge(_scored_s(table))
    finally:
        writer.close()
        publish()
        progress.scored(tally, len(writer.written), len(files))
        quota.close()
        if local_parts is None:
            shutil.rmtree(directory, ignore_errors=True)


def _scored_s(table: pa.Table) -> float:
    import pyarrow.compute as pc

    ok = table.filter(pc.equal(table.column("status"), "ok"))
    if "segment" in ok.column_names:  # a recording's duration once, on its first row
        ok = ok.filter(pc.fill_null(pc.equal(ok.column("segment"), 0), True))
    return pc.sum(ok.column("duration_s")).as_py() or 0.0
