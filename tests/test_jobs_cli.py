"""`emotion2vec-serve jobs`: what each command sends and its exit status, against a scripted
service (httpx's MockTransport). No Ray, no network."""

from __future__ import annotations

import json

import httpx
import pytest

from serve_app.tools import cli, jobs_cli

JOB = "job-0123456789abcdef0123"


def _status(state: str) -> dict:
    return {"job_id": JOB, "state": state, "files": {"total": 2, "done": 2, "failed": 0},
            "audio_s": 4.0, "eta_s": None}


def run(monkeypatch, argv: list[str], answer) -> tuple[int, list[httpx.Request]]:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return answer(request)

    def client(args):
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        return httpx.Client(base_url=args.url, headers=headers,
                            transport=httpx.MockTransport(handler))

    monkeypatch.setattr(jobs_cli, "_client", client)
    parser = cli._parser()
    args = parser.parse_args(argv)
    return jobs_cli.main(args, parser), sent


def test_submit_sends_the_inputs_and_fields_as_json(monkeypatch, capsys):
    code, sent = run(monkeypatch, ["jobs", "submit", "/data/calls", "--model-version", "base",
                                   "--metadata", '{"batch": 3}', "--api-key", "k"],
                     lambda r: httpx.Response(202, json={"job_id": JOB, "state": "queued"}))
    assert code == 0 and capsys.readouterr().out.strip() == JOB
    (request,) = sent
    assert (request.method, request.url.path) == ("POST", "/v1/jobs")
    assert request.headers["authorization"] == "Bearer k"
    assert json.loads(request.content) == {"inputs": ["/data/calls"], "model_version": "base",
                                           "metadata": {"batch": 3}, "by_segment": False,
                                           "embeddings": False}


@pytest.mark.parametrize("command, state, expected", [
    ("cancel", "cancelled", 0), ("cancel", "succeeded", 0), ("cancel", "failed", 1),
    ("status", "running", 0), ("status", "cancelled", 1), ("status", "failed", 1)])
def test_exit_status_follows_the_job(monkeypatch, command, state, expected):
    code, sent = run(monkeypatch, ["jobs", command, JOB],
                     lambda r: httpx.Response(200, json=_status(state)))
    assert code == expected
    assert sent[0].method == ("DELETE" if command == "cancel" else "GET")
    assert sent[0].url.path == f"/v1/jobs/{JOB}"


def test_a_refusal_exits_2_with_the_services_message(monkeypatch, capsys):
    code, _ = run(monkeypatch, ["jobs", "status", JOB], lambda r: httpx.Response(
        404, json={"error": {"code": "unknown_job", "message": f"no job {JOB!r}"}}))
    assert code == 2 and "unknown_job" in capsys.readouterr().err
