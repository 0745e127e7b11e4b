"""The jobs API's settings (`jobs:` in the Router's user_config; docs/jobs.md): what a job may
read, how big an upload may be, how many jobs run at once, where callbacks may go, and what each
job's Ray Data pipeline gets. Every default lives here."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

GIB = 1024**3


class JobSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Path and URI prefixes a job may read (`/mnt/archive/`, `s3://bucket/calls/`); an input
    # outside all of them is refused at submission (403 input_not_allowed). Uploads are always
    # allowed: they are the job's own.
    allow_inputs: list[str] = Field(default_factory=list)
    max_inputs: int = Field(default=1000, ge=1, le=100_000, description="entries in `inputs`")
    max_archive_bytes: int = Field(default=2 * GIB, ge=1024, description="an uploaded archive")
    max_archive_entries: int = Field(default=10_000, ge=1, le=1_000_000)
    max_unpacked_bytes: int = Field(default=8 * GIB, ge=1024,
                                    description="an uploaded archive, unpacked")
    max_jobs_per_key: int = Field(default=4, ge=1, description="queued or running (429)")
    max_jobs: int = Field(default=16, ge=1, description="queued or running, all keys (503)")
    retention_days: float = Field(default=7.0, gt=0, description="a finished job's folder "
                                  "is deleted this long after it ended")
    # Hosts a callback_url may name (`hooks.example.org`, `*.example.org`, `127.0.0.1:9000`):
    # none, so callbacks are off until an operator allows some. A private, loopback or
    # link-local address must be named exactly.
    callback_hosts: list[str] = Field(default_factory=list)

    @field_validator("callback_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        from serve_app.jobs.callbacks import check_allowed_hosts

        check_allowed_hosts(hosts)  # an entry that could never match is a config error
        return hosts
    # Signs callbacks when the API is open (no keys); with keys, each key's callbacks are
    # signed with the key's own callback secret (`emotion2vec-serve keys new` prints it).
    callback_secret: str | None = Field(default=None, min_length=16)
    callback_attempts: int = Field(default=5, ge=1, le=20)
    callback_timeout_s: float = Field(default=10.0, gt=0, le=120)
    callback_backoff_s: float = Field(default=2.0, gt=0, le=600,
                                      description="the first retry's wait; doubled each time")
    # The job server (Ray's dashboard); None: the cluster's own, as the GCS records it.
    dashboard_url: str | None = None
    # Each job's pipeline (as `emotion2vec-serve batch` flags): engine actors and their CPUs
    # and GPUs, decode tasks, and how often rows are saved (partial results are readable).
    engines: int = Field(default=1, ge=1, le=1024)
    engine_num_cpus: float = Field(default=1.0, gt=0)
    engine_num_gpus: float = Field(default=0.0, ge=0)
    decode_num_cpus: float = Field(default=0.5, gt=0)
    files_per_task: int = Field(default=16, ge=1, le=10_000)
    part_rows: int = Field(default=2000, ge=1)
    part_s: float = Field(default=5.0, gt=0)
    start_timeout_s: float = Field(default=600.0, gt=0,
                                   description="the engines' start, model load included")
    max_page_rows: int = Field(default=1000, ge=1, le=100_000,
                               description="rows in one page of GET /v1/jobs/{id}/results")
