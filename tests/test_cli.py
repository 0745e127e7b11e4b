"""`emotion2vec-serve predict` as a user runs it: a subprocess against the test cluster, and
its retry logic against a small HTTP server of the test's own on 127.0.0.1."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler

import pytest
import yaml

from serve_app.config import RouterSettings
from serve_app.tools.cli import API_KEY_ENV, main
from serve_app.tools.client import backoff_delay, expand, retry_after_s
from serve_app.traffic.access import AccessControl
from tests.local_http import LocalServer, send_json

EMOTIONS = ["angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised",
            "unknown"]


def run_cli(*args: str, timeout: float = 180,
            env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve_app.tools.cli", "predict", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def audio_dir(clips, tmp_path):
    """A directory with three clips (one in a subfolder) and a file that is not audio."""
    folder = tmp_path / "batch"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(clips["tone_16k_mono_wav"], folder / "a.wav")
    shutil.copy(clips["stereo_44k_flac"], folder / "sub" / "b.flac")
    shutil.copy(clips["noise_22k_ogg"], folder / "c.ogg")
    (folder / "notes.txt").write_text("not audio")
    return folder


def test_expand_finds_audio_in_directories(audio_dir, clips):
    files = expand([str(audio_dir), str(clips["tone_48k_mp3"]), str(audio_dir / "a.wav")])
    assert [p.relative_to(audio_dir).as_posix() for p in files[:3]] == [
        "a.wav", "c.ogg", "sub/b.flac"]
    assert files[3] == clips["tone_48k_mp3"] and len(files) == 4
    with pytest.raises(FileNotFoundError):
        expand([str(audio_dir / "missing.wav")])


def test_recordings_of_every_kind_in_a_directory(service, tmp_path):
    from tests.media import FORMATS, encode

    folder = tmp_path / "phone"
    folder.mkdir()
    kinds = {"memo.m4a": "m4a_aac", "call.MP4": "mp4_video_aac", "clip.mov": "mov_aac",
             "old.3gp": "3gp_amr", "browser.webm": "webm_opus", "talk.mkv": "mkv_vorbis",
             "raw.aac": "adts_aac", "voicemail.wma": "wma", "phone.amr": "amr"}
    for filename, kind in kinds.items():
        (folder / filename).write_bytes(encode(FORMATS[kind][0], 0.5))
    (folder / "notes.txt").write_text("not audio")
    assert sorted(path.name for path in expand([str(folder)])) == sorted(kinds)
    done = run_cli(str(folder), "--url", service.url, "--model-version", "base",
                   "--no-progress")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == len(kinds) and all(row["status"] == "ok" for row in rows), rows


def test_jsonl_for_files_and_a_directory(service, clips, audio_dir, tmp_path):
    out = tmp_path / "results.jsonl"
    done = run_cli(str(clips["tone_48k_mp3"]), str(audio_dir), "--url", service.url,
                   "--model-version", "base", "--out", str(out), "--concurrency", "3")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == [str(clips["tone_48k_mp3"]), str(audio_dir / "a.wav"),
                                         str(audio_dir / "c.ogg"),
                                         str(audio_dir / "sub" / "b.flac")]
    for row in rows:
        assert row["status"] == "ok" and row["http_status"] == 200 and row["error"] is None
        assert row["model_version"] == "base"
        assert list(row["scores"]) == EMOTIONS
        assert row["emotion"] == max(row["scores"], key=row["scores"].get)
        assert row["confidence"] == row["scores"][row["emotion"]]
        assert "timeline" not in row
    # The summary: counts per emotion, on stderr (with the progress bar).
    assert "4 files: 4 ok, 0 failed" in done.stderr
    counts = {}
    for row in rows:
        counts[row["emotion"]] = counts.get(row["emotion"], 0) + 1
    emotions_line = next(line for line in done.stderr.splitlines()
                         if line.startswith("emotions: "))
    assert {name: int(n) for name, n in
                (part.rsplit(" ", 1) for part in emotions_line[10:].split(", "))} == counts
    assert "4/4" in done.stderr  # the progress bar reached the end


def test_csv_with_frame_granularity(service, clips, tmp_path):
    out = tmp_path / "results.csv"
    done = run_cli(str(clips["tone_16k_mono_wav"]), str(clips["tone_5s_16k_wav"]),
                   "--url", service.url, "--model-version", "fast", "--granularity", "frame",
                   "--out", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    assert list(rows[0])[:8] == ["path", "status", "http_status", "emotion", "confidence",
                                 "model_version", "error", "request_id"]
    assert list(rows[0])[8:] == [f"score_{name}" for name in EMOTIONS]
    for row in rows:
        assert row["status"] == "ok" and row["model_version"] == "turbo" and row["error"] == ""
        scores = {name: float(row[f"score_{name}"]) for name in EMOTIONS}
        assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
        assert float(row["confidence"]) == max(scores.values())
    # The same run as JSON lines carries each file's timeline.
    jsonl = run_cli(str(clips["tone_5s_16k_wav"]), "--url", service.url, "--granularity",
                    "frame", "--no-progress")
    (row,) = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert len(row["timeline"]) == 9 and row["timeline"][0]["start_s"] == 0.0


def test_unknown_version_fails_with_a_non_zero_exit(service, clips, tmp_path):
    out = tmp_path / "results.jsonl"
    done = run_cli(str(clips["tone_16k_mono_wav"]), str(clips["stereo_44k_flac"]),
                   "--url", service.url, "--model-version", "huge", "--out", str(out))
    assert done.returncode == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert all(r["http_status"] == 400 and r["attempts"] == 1 for r in rows)  # no retry on 4xx
    assert all(r["error"].startswith("400 unknown_model_version") for r in rows)
    assert "2 files: 0 ok, 2 failed" in done.stderr
    assert f"{clips['tone_16k_mono_wav']}: 400 unknown_model_version" in done.stderr


def test_a_failed_file_among_good_ones(service, clips, tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF not really")
    done = run_cli(str(clips["tone_16k_mono_wav"]), str(bad), "--url", service.url,
                   "--no-progress")
    assert done.returncode == 1
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert rows[1]["http_status"] == 415 and "unsupported_audio" in rows[1]["error"]
    assert "2 files: 1 ok, 1 failed" in done.stderr


def test_usage_errors(tmp_path):
    assert run_cli(str(tmp_path / "missing.wav")).returncode == 2
    assert run_cli(str(tmp_path)).returncode == 2  # an empty directory: no audio
    assert run_cli(str(tmp_path), "--out", "results.txt").returncode == 2


# -- stream ------------------------------------------------------------------------------------
def run_stream(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve_app.tools.cli", "stream", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_stream_fast_prints_windows_and_the_result_of_predict(service, client, clips):
    """A 44.1 kHz stereo FLAC, decoded by the CLI and streamed as float32: the windows and the
    result equal predict on the same samples (the result: on the file itself)."""
    import numpy as np
    import soundfile

    from tests.test_stream import assert_scores_equal, predicted

    path = clips["stereo_44k_flac"]
    done = run_stream(str(path), "--url", service.url, "--model-version", "base", "--fast",
                      "--jsonl", "--window-s", "1", "--hop-s", "0.5")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["type"] for e in events] == ["ready", "window", "window", "window", "result"]
    stereo, rate = soundfile.read(path, dtype="float32")
    mono = stereo.mean(axis=1, dtype=np.float32)
    for window in events[1:-1]:
        assert window["skipped"] == 0 and window["lag_ms"] >= 0
        samples = mono[round(window["start_s"] * rate):round(window["end_s"] * rate)]
        assert_scores_equal(window, predicted(client, samples, rate, "base"))
    assert [w["end_s"] for w in events[1:-1]] == [0.5, 1.0, 1.5]
    result = events[-1]
    response = client.post("/v1/predict", files={"file": (path.name, path.read_bytes())},
                           data={"model_version": "base"})
    assert_scores_equal(result, response.json())
    assert result["audio"]["sample_rate"] == 44_100


def test_stream_at_real_time_pace_prints_lines(service, clips):
    done = run_stream(str(clips["tone_8k_24bit_wav"]), "--url", service.url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "streaming to large: 8000 Hz, 2 s windows every 0.5 s"
    assert [line.split(" s ")[0].split() for line in lines[1:3]] == [["0.00-", "0.50"],
                                                                    ["0.00-", "1.00"]]
    assert all(" lag " in line and line.split()[3] in EMOTIONS for line in lines[1:3])
    assert lines[3].startswith("result: ") and "over 1 s (large; 2 windows, 0 skipped)" in lines[3]


def test_stream_errors_exit_non_zero(service, clips, tmp_path):
    done = run_stream(str(clips["tone_16k_mono_wav"]), "--url", service.url,
                      "--model-version", "huge", "--fast")
    assert done.returncode == 1
    assert done.stdout.startswith("error: unknown_model_version: unknown model_version 'huge'")
    assert run_stream(str(tmp_path / "missing.wav")).returncode == 2
    (tmp_path / "notes.wav").write_text("not audio")
    done = run_stream(str(tmp_path / "notes.wav"), "--url", service.url)
    assert done.returncode == 1 and "cannot decode" in done.stderr
# -- API keys ------------------------------------------------------------------------------------
def test_api_key_from_the_option_or_the_environment(keyed, clips):
    clip = str(clips["tone_16k_mono_wav"])
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    from_env = run_cli(clip, "--url", keyed.url, "--no-progress",
                       env={**env, API_KEY_ENV: keyed.keys["cli"]})
    assert from_env.returncode == 0, from_env.stderr
    # The option wins over the environment.
    from_option = run_cli(clip, "--url", keyed.url, "--no-progress", "--api-key",
                          keyed.keys["cli"], env={**env, API_KEY_ENV: "e2v_stale"})
    assert from_option.returncode == 0, from_option.stderr
    for done in (from_env, from_option):
        (row,) = [json.loads(line) for line in done.stdout.splitlines()]
        assert row["status"] == "ok" and row["model_version"] == "base"
    without = run_cli(clip, "--url", keyed.url, "--no-progress", env=env)
    assert without.returncode == 1
    (row,) = [json.loads(line) for line in without.stdout.splitlines()]
    assert row["http_status"] == 401 and row["attempts"] == 1  # not retried
    assert row["error"].startswith("401 unauthorized")


def test_keys_new_prints_a_key_and_its_config_line(capsys):
    assert main(["keys", "new", "ops", "--rpm", "60", "--audio-spm", "600"]) == 0
    lines = capsys.readouterr().out.splitlines()
    key, config_line = lines[1], lines[-1]
    spec = yaml.safe_load(config_line)
    assert spec == {"ops": {"sha256": hashlib.sha256(key.encode()).hexdigest(),
                            "requests_per_minute": 60, "audio_seconds_per_minute": 600.0}}
    gate = AccessControl()
    gate.configure(RouterSettings(api_keys=spec))
    assert gate.authenticate({"Authorization": f"Bearer {key}"}) == "ops"
    assert key.startswith("e2v_") and len(key) > 40 and key not in config_line
    assert main(["keys", "new", "ops"]) == 0
    assert capsys.readouterr().out.splitlines()[1] != key  # a new key every time
    with pytest.raises(SystemExit):
        main(["keys", "new", "bad id"])


# -- retries -----------------------------------------------------------------------------------
def test_backoff_delay():
    assert [backoff_delay(a, None, 0.5, 30) for a in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff_delay(0, "3", 0.5, 30) == 3.0       # the server asks for longer
    assert backoff_delay(3, "1", 0.5, 30) == 4.0       # the backoff is longer
    assert backoff_delay(10, None, 0.5, 30) == 30      # capped
    assert backoff_delay(0, "120", 0.5, 30) == 30
    assert retry_after_s("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert retry_after_s("soon") == 0.0 and retry_after_s(None) == 0.0


class FlakyServer(LocalServer):
    """Answers 429 once, then 503 (each with Retry-After: 1), `failures` times in all, then
    200 with a result. `lost`: the first answers are instead those of a server that dies
    mid-request: "500" (Serve's proxy, plain text), "502" (a load balancer) or "drop" (the
    connection closed without an answer)."""

    def __init__(self, failures: int, lost: tuple[str, ...] = ()):
        self.failures, self.lost = failures, lost
        self.times: list[float] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                server.times.append(time.monotonic())
                if len(server.times) <= len(server.lost):
                    how = server.lost[len(server.times) - 1]
                    if how == "drop":
                        self.close_connection = True
                        return
                    self.send_response(int(how))
                    self.send_header("content-length", "21")
                    self.end_headers()
                    self.wfile.write(b"Internal Server Error")
                    return
                if len(server.times) == 1 and server.failures:
                    body, status = {"error": {"code": "rate_limited", "message": "quota"}}, 429
                elif len(server.times) <= server.failures:
                    body, status = {"error": {"code": "overloaded", "message": "busy"}}, 503
                else:
                    body, status = {"emotion": "happy", "confidence": 0.9, "model_version": "x",
                                    "request_id": "r1", "scores": {"happy": 0.9, "sad": 0.1}}, 200
                send_json(self, status, body, None if status == 200 else "1")

            def log_message(self, *args):
                pass

        super().__init__(Handler)


def test_429_and_503_are_retried_after_retry_after(clips):
    with FlakyServer(failures=2) as server:
        done = run_cli(str(clips["tone_16k_mono_wav"]), "--url", server.url, "--tries", "4",
                       "--backoff", "0.1", "--no-progress", timeout=60)
    assert done.returncode == 0, done.stderr
    (row,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert row["status"] == "ok" and row["attempts"] == 3 and row["emotion"] == "happy"
    gaps = [b - a for a, b in zip(server.times, server.times[1:])]
    assert len(gaps) == 2 and all(gap >= 0.95 for gap in gaps)  # Retry-After 1 s, not 0.1 s


def test_retries_are_bounded(clips):
    with FlakyServer(failures=100) as server:
        done = run_cli(str(clips["tone_16k_mono_wav"]), "--url", server.url, "--tries", "2",
                       "--backoff", "0.1", "--no-progress", timeout=60)
    assert done.returncode == 1
    (row,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert row["status"] == "failed" and row["attempts"] == 2 and row["http_status"] == 503
    assert row["error"] == "503 overloaded: busy" and len(server.times) == 2


def test_requests_lost_with_a_dying_server_are_sent_again(clips):
    """Predict has no side effects: a plain 500, a 502 and a dropped connection are retried
    (with the backoff); a 4xx is not (test_unknown_version_fails_with_a_non_zero_exit)."""
    with FlakyServer(failures=0, lost=("500", "drop", "502")) as server:
        done = run_cli(str(clips["tone_16k_mono_wav"]), "--url", server.url, "--tries", "4",
                       "--backoff", "0.1", "--no-progress", timeout=60)
    assert done.returncode == 0, done.stderr
    (row,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert row["status"] == "ok" and row["attempts"] == 4 and len(server.times) == 4
