"""What GET /v1/jobs/{id} answers: the job's record (the request as admitted), the status its
driver writes, and, while the status does not say the job ended, Ray's own word on the driver
(a driver that died, or a job stopped before its driver started, says nothing itself). Pure:
unit-tested on its own."""

from __future__ import annotations

import datetime

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
ENDED = frozenset({"succeeded", "failed", "cancelled"})
RAY_ENDED = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


def iso_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def parse_time(text: str | None) -> float | None:
    """An iso_now() time as seconds since the epoch (None when absent or unreadable)."""
    try:
        return datetime.datetime.fromisoformat(text).timestamp() if text else None
    except (TypeError, ValueError):
        return None


def job_view(record: dict, status: dict | None, ray_state: tuple[str, str] | None,
             cancel_requested: bool = False) -> dict:
    """The job as the API shows it. `ray_state`: (Ray's JobStatus name, its message), or None
    when not asked (the status already says the job ended) or unknown."""
    status = dict(status or {"state": "queued"})
    if status["state"] not in ENDED and ray_state is not None and ray_state[0] in RAY_ENDED:
        # The driver is gone without saying how the job ended.
        if cancel_requested or ray_state[0] == "STOPPED":
            status.update(state="cancelled", error={"code": "cancelled",
                                                    "message": "the job was cancelled"})
        else:
            status.update(state="failed", error={
                "code": "job_lost", "message": f"the job's driver ended without a summary: "
                f"{ray_state[1] or ray_state[0]}"[:2000]})
        status.setdefault("finished", None)
    files = status.get("files") or {"total": None, "done": 0, "failed": 0}
    head = record.get("head")
    return {
        "job_id": record["job_id"],
        "state": status["state"],
        "model_version": record["variant"],
        "head": None if not head else {key: head[key] for key in ("name", "revision",
                                                                  "sha256")},
        "files": files,
        "audio_s": status.get("audio_s", 0.0),
        "rows": status.get("rows", 0),
        "parts": status.get("parts", 0),
        "created": record["created"],
        "started": status.get("started"),
        "finished": status.get("finished"),
        "eta_s": status.get("eta_s"),
        "error": status.get("error"),
        "refused": status.get("refused"),
        "callback": status.get("callback") if status.get("callback") else (
            {"url": record["callback"]["url"], "delivered": False, "attempts": []}
            if record.get("callback") else None),
        "metadata": record.get("metadata"),
        "status_url": record["status_url"],
        "results_url": record["results_url"],
    }


def page_of(sizes: list[tuple[str, int]], start: int, count: int
            ) -> list[tuple[str, int, int]]:
    """Rows [start, start + count) of parts of these sizes (in order): (part, its first row
    taken, rows taken) for each part the page reads."""
    reads, seen = [], 0
    for name, rows in sizes:
        first = max(start - seen, 0)
        take = min(rows - first, start + count - seen - first)
        if first < rows and take > 0:
            reads.append((name, first, take))
        seen += rows
        if seen >= start + count:
            break
    return reads
