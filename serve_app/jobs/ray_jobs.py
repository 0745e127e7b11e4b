"""The Router's side of Ray Jobs: each job is a Ray Job (Ray's job submission API, through the
dashboard's job server) whose driver is serve_app/jobs/driver.py, so that a job lives in the
cluster, not in the Router replica that admitted it. Blocking calls: the routes run them in a
thread, each bounded."""

from __future__ import annotations

import shlex
import sys

OWNER_KEY, APP_KEY = "emotion2vec_owner", "emotion2vec_app"
IN_FLIGHT = frozenset({"PENDING", "RUNNING"})


class RayJobs:
    """Submits, asks after and stops the jobs of one cluster."""

    def __init__(self, dashboard_url: str | None = None):
        self.dashboard_url = dashboard_url
        self._client = None
        self._client_url: str | None = None

    def _url(self) -> str:
        if self.dashboard_url:
            return self.dashboard_url
        from ray._private.services import get_webui_url_from_internal_kv

        url = get_webui_url_from_internal_kv()
        if not url:
            raise RuntimeError("the cluster has no job server (start Ray with its dashboard)")
        return url if "://" in url else f"http://{url}"

    def client(self):
        from ray.job_submission import JobSubmissionClient

        url = self._url()
        if self._client is None or url != self._client_url:
            self._client, self._client_url = JobSubmissionClient(url), url
        return self._client

    def submit(self, job_id: str, jobs_dir: str, owner: str, app: str) -> None:
        import ray

        # The cluster's GCS, named: Ray's job server tells a driver the machine's latest
        # cluster, which is another one where two clusters share a machine.
        address = ray.get_runtime_context().gcs_address
        entrypoint = shlex.join([sys.executable, "-m", "serve_app.jobs.driver",
                                 "--jobs-dir", jobs_dir, "--owner", owner, "--job", job_id,
                                 "--address", address])
        self.client().submit_job(entrypoint=entrypoint, submission_id=job_id,
                                 metadata={OWNER_KEY: owner, APP_KEY: app})

    def state(self, job_id: str) -> tuple[str, str] | None:
        """(Ray's status name, its message), or None when Ray does not know the job."""
        try:
            info = self.client().get_job_info(job_id)
        except RuntimeError as exc:  # the job server says 404 as a RuntimeError
            if "does not exist" in str(exc) or "404" in str(exc):
                return None
            raise
        return str(info.status.value), info.message or ""

    def stop(self, job_id: str) -> None:
        self.client().stop_job(job_id)

    def in_flight(self, app: str) -> list[tuple[str, str]]:
        """(owner, job id) of this application's jobs whose drivers Ray has queued or running
        (a driver still posting its callback runs after its job ended)."""
        return [((info.metadata or {}).get(OWNER_KEY, ""), info.submission_id)
                for info in self.client().list_jobs()
                if (info.metadata or {}).get(APP_KEY) == app
                and str(info.status.value) in IN_FLIGHT]
