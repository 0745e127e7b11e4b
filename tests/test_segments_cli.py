"""`emotion2vec-serve segments` without the service: which files go with which recording, the
request it sends, retries, and the rows and summary it writes (against a small HTTP server of
the test's own on 127.0.0.1). Against the live service: tests/test_segments_service.py."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from http.server import BaseHTTPRequestHandler

import pytest

from serve_app.tools.segments_cli import recordings
from tests.local_http import LocalServer, send_json

ANSWER = {
    "request_id": "r1", "model_version": "base", "routed_by": None, "segmentation": "given",
    "segments": [
        {"index": 0, "start_s": 0.5, "end_s": 2.5, "speaker": "agent", "emotion": "happy",
         "label": "开心/happy", "confidence": 0.7, "scores": {"happy": 0.7, "sad": 0.3}},
        {"index": 1, "start_s": 2.3, "end_s": 4.0, "speaker": "customer", "emotion": "sad",
         "label": "难过/sad", "confidence": 0.6, "scores": {"happy": 0.4, "sad": 0.6}}],
    "speakers": {
        "agent": {"segments": 1, "speech_s": 2.0, "emotion": "happy", "confidence": 0.7,
                  "scores": {"happy": 0.7, "sad": 0.3}},
        "customer": {"segments": 1, "speech_s": 1.7, "emotion": "sad", "confidence": 0.6,
                     "scores": {"happy": 0.4, "sad": 0.6}}},
}
RTTM = "SPEAKER call 1 0.5 2.0 <NA> <NA> agent <NA> <NA>\n"


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve_app.tools.cli", "segments", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def folder(tmp_path):
    """call.wav with call.rttm beside it, memo.m4a without, and notes.txt."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "call.wav").write_bytes(b"RIFF call")
    (tmp_path / "call.rttm").write_text(RTTM)
    (tmp_path / "sub" / "memo.m4a").write_bytes(b"memo")
    (tmp_path / "notes.txt").write_text("not audio")
    return tmp_path


def test_recordings_pick_up_the_rttm_beside_them(folder):
    found = recordings([str(folder)])
    assert [(r.path.name, r.rttm and r.rttm.name, r.segments) for r in found] == [
        ("call.wav", "call.rttm", None), ("memo.m4a", None, None)]
    given = folder / "turns.json"
    given.write_text("[]")
    (one,) = recordings([str(folder / "call.wav")], segments=str(given))
    assert one.segments == given and one.rttm is None  # the named file wins over call.rttm
    with pytest.raises(ValueError, match="describe one recording"):
        recordings([str(folder)], rttm=str(folder / "call.rttm"))
    with pytest.raises(FileNotFoundError):
        recordings([str(folder / "call.wav")], rttm=str(folder / "missing.rttm"))


class RecordingServer(LocalServer):
    """Answers 503 (Retry-After: 0) to the first request, then ANSWER; keeps each body."""

    def __init__(self):
        self.bodies: list[tuple[str, bytes]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                server.bodies.append((self.path, body))
                status = 503 if len(server.bodies) == 1 else 200
                send_json(self, status, ANSWER if status == 200 else {
                    "error": {"code": "overloaded", "message": "busy"}},
                    None if status == 200 else "0")

            def log_message(self, *args):
                pass

        super().__init__(Handler)


def test_rows_per_segment_and_the_speakers_on_stderr(folder, tmp_path):
    out = tmp_path / "rows.csv"
    with RecordingServer() as server:
        done = run_cli(str(folder / "call.wav"), "--url", server.url, "--out", str(out),
                       "--channels", "split", "--model-version", "base", "--backoff", "0.05",
                       "--no-progress")
    assert done.returncode == 0, done.stderr
    assert [path for path, _ in server.bodies] == ["/v1/segments"] * 2  # retried once
    body = server.bodies[-1][1]
    assert b'name="file"; filename="call.wav"' in body and b"RIFF call" in body
    assert b'name="rttm"; filename="call.rttm"' in body and RTTM.encode() in body
    assert b'name="channels"\r\n\r\nsplit' in body and b'name="model_version"' in body
    with open(out, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == ["path", "index", "start_s", "end_s", "speaker", "emotion",
                              "confidence", "score_happy", "score_sad", "error", "request_id"]
    assert [(r["index"], r["speaker"], r["emotion"], r["score_sad"]) for r in table] == [
        ("0", "agent", "happy", "0.3"), ("1", "customer", "sad", "0.6")]
    assert all(r["path"] == str(folder / "call.wav") for r in table)
    assert "1 recordings: 1 ok, 0 failed" in done.stderr
    assert "  agent: 1 segments, 2.0 s of speech, happy 0.700" in done.stderr
    assert "  customer: 1 segments, 1.7 s of speech, sad 0.600" in done.stderr


def test_segments_json_is_sent_as_a_field_and_failures_are_rows(folder):
    given = folder / "turns.json"
    given.write_text('[{"start_s": 0, "end_s": 1}]')
    with RecordingServer() as server:
        done = run_cli(str(folder / "call.wav"), "--segments", str(given), "--url",
                       server.url, "--tries", "1", "--no-progress")
    assert done.returncode == 1
    assert b'name="segments"\r\n\r\n[{"start_s": 0, "end_s": 1}]' in server.bodies[0][1]
    assert b'name="rttm"' not in server.bodies[0][1]
    (row,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert row["path"] == str(folder / "call.wav") and row["error"] == "503 overloaded: busy"
    assert row["index"] is None


def test_usage_errors(folder):
    assert run_cli(str(folder), "--rttm", str(folder / "call.rttm")).returncode == 2
    assert run_cli(str(folder), "--rttm", "a.rttm", "--segments", "b.json").returncode == 2
    assert run_cli(str(folder), "--out", "rows.txt").returncode == 2
