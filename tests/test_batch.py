"""`emotion2vec-serve batch` as a user runs it: a subprocess joining the test cluster beside the
tiny app (small --num-cpus), on generated files (speech, several formats, corrupt, empty, too
short, a bomb), its rows compared with POST /v1/predict on the same files; a job killed
mid-way and resumed; a cluster without room."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from serve_app.tools.batch.parts import read_rows
from tests import clips as clip_maker
from tests import conversation
from tests.clips import espeak_available
from tests.jobs_util import all_rows, submit, wait_job
from tests.media import FORMATS, bomb, encode
from tests.test_segments_service import segments
from tests.waiting import eventually

# The job shares the session's 2-CPU cluster with the tiny app: a quarter CPU per stage.
SMALL = ("--num-cpus", "0.25", "--decode-cpus", "0.25", "--no-progress")
JOB_TIMEOUT_S = 600  # a hung job fails the test; a loaded machine imports torch slowly
# file name -> the error code the service gives it
BAD = {"corrupt.wav": "unsupported_audio", "empty.wav": "empty_audio",
       "short.wav": "audio_too_short", "bomb.webm": "audio_too_long"}


def run_batch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve_app.tools.cli", "batch", *args],
                          capture_output=True, text=True, timeout=JOB_TIMEOUT_S)


@pytest.fixture(scope="module")
def archive(clips, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("archive")
    (folder / "calls").mkdir()
    for name, path in clips.items():  # wav, flac, ogg, mp3, 24-bit; speech with espeak-ng
        shutil.copy(path, folder / "calls" / f"{name}{path.suffix}")
    for name, kind in (("memo.m4a", "m4a_aac"), ("browser.webm", "webm_opus")):
        (folder / name).write_bytes(encode(FORMATS[kind][0], 1.5))  # FFmpeg's formats
    (folder / "corrupt.wav").write_bytes(b"RIFF" + np.random.default_rng(1).bytes(4000))
    (folder / "empty.wav").write_bytes(b"")
    clip_maker.write(folder / "short.wav", clip_maker.tone(0.05, 16_000), 16_000)
    (folder / "bomb.webm").write_bytes(bomb(FORMATS["webm_opus"][0], 3600))  # 1 h of silence
    (folder / "notes.txt").write_text("not audio: not listed")
    return folder


@pytest.fixture(scope="module")
def first_run(archive, service_config, address, tmp_path_factory):
    out = tmp_path_factory.mktemp("scored") / "out"
    done = run_batch(str(archive), "--out", str(out), "--config", str(service_config),
                     "--address", address, "--model-version", "base", "--embeddings",
                     "--batch-size", "4", "--files-per-task", "3", "--part-rows", "4", *SMALL)
    return out, done


def test_rows_equal_predict_and_bad_files_are_error_rows(first_run, archive, client, service):
    out, done = first_run
    assert done.returncode == 1, done.stderr  # some files failed: exit status 1
    table = read_rows(out)
    rows = {row["path"]: row for row in table.to_pylist()}
    files = sorted(p for p in archive.rglob("*") if p.is_file() and p.suffix != ".txt")
    assert table.num_rows == len(files) and sorted(rows) == [str(p) for p in files]
    parts = [pq.read_metadata(part).num_rows for part in out.glob("part-*.parquet")]
    assert len(parts) >= -(-len(files) // 4) and max(parts) <= 4  # --part-rows 4
    sha256 = hashlib.sha256((service.checkpoints["base"] / "model.pt").read_bytes()).hexdigest()
    for path in files:
        row = rows[str(path)]
        response = client.post("/v1/predict", files={"file": (path.name, path.read_bytes())},
                               data={"model_version": "base", "extract_embedding": "true"})
        if path.name in BAD:
            error = response.json()["error"]
            assert (row["status"], row["error_code"], error["code"]) == (
                "failed", BAD[path.name], BAD[path.name]), row
            assert row["error"] == error["message"] and row["emotion"] is None
            continue
        assert response.status_code == 200, response.text
        body = response.json()
        assert (row["status"], row["error_code"], row["model_version"]) == ("ok", None, "base")
        assert (row["model_sha256"], row["weights"]) == (sha256, "random")
        assert row["duration_s"] == body["audio"]["duration_s"]
        scores = [row[f"score_{name}"] for name in body["scores"]]
        assert np.abs(np.subtract(scores, list(body["scores"].values()))).max() <= 1e-4
        assert abs(row["confidence"] - body["confidence"]) <= 1e-4
        top2 = sorted(body["scores"].values())[-2:]
        if top2[1] - top2[0] > 2e-4:  # random weights: near ties may swap within 1e-4
            assert row["emotion"] == body["emotion"]
        assert len(row["embedding"]) == len(body["embedding"]) == 64
        assert np.abs(np.subtract(row["embedding"], body["embedding"])).max() <= 1e-4
    ok = len(files) - len(BAD)
    assert f"{len(files)} files" in done.stderr and f"{ok} ok, {len(BAD)} failed" in done.stderr
    assert "hours of audio per hour" in done.stderr


def test_a_job_over_http_on_the_same_folder_gives_batchs_rows(first_run, archive, client):
    """POST /v1/jobs over the same folder, with the same model and embeddings, gives the rows
    `batch` wrote (error rows too; padded passes of another size: 1e-4)."""
    out, _ = first_run
    batch = {row["path"]: row for row in read_rows(out).to_pylist()}
    accepted = submit(client, inputs=[str(archive)], model_version="base", embeddings=True)
    job = wait_job(client, accepted["job_id"])
    assert job["state"] == "succeeded", job["error"]
    assert job["files"] == {"total": len(batch), "done": len(batch), "failed": len(BAD)}
    rows = {row["path"]: row for row in all_rows(client, accepted["job_id"], limit=5)}
    assert sorted(rows) == sorted(batch)
    for path, row in rows.items():
        for name, value in batch[path].items():
            if name == "node_id":
                continue
            if isinstance(value, float | list):
                assert np.abs(np.subtract(row[name], value)).max() <= 1e-4, (path, name)
            else:
                assert row[name] == value, (path, name, row[name], value)


def test_a_directory_with_results_is_refused_without_resume(first_run, archive, service_config):
    out, _ = first_run
    before = sorted(out.iterdir())
    done = run_batch(str(archive), "--out", str(out), "--config", str(service_config), *SMALL)
    assert done.returncode == 2 and "is not empty: pass --resume" in done.stderr
    assert sorted(out.iterdir()) == before


def test_a_killed_job_resumes_and_writes_each_path_once(service_config, address, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    clip = clip_maker.write(tmp_path / "clip.wav", clip_maker.tone(0.5, 16_000), 16_000)
    count = 300
    for index in range(count):
        os.link(clip, folder / f"{index:03d}.wav")
    out = tmp_path / "out"
    args = [str(folder), "--out", str(out), "--config", str(service_config), "--address", address,
            "--model-version", "large", "--files-per-task", "2", "--part-rows", "3", *SMALL]
    job = subprocess.Popen([sys.executable, "-m", "serve_app.tools.cli", "batch", *args],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        eventually(lambda: list(out.glob("part-*.parquet")) or job.poll() is not None,
                   "a part written (or the job ended)", JOB_TIMEOUT_S, interval_s=0.02)
        assert job.poll() is None, f"the job ended before it could be killed: {job.stderr}"
        job.send_signal(signal.SIGKILL)
    finally:
        job.kill()
        job.communicate(timeout=60)
    kept = read_rows(out).num_rows  # complete parts only, each readable
    assert 0 < kept < count
    done = run_batch(*args, "--resume")
    assert done.returncode == 0, done.stderr
    assert f"{count - kept} files" in done.stderr and f"{kept} already there" in done.stderr
    paths = read_rows(out).column("path").to_pylist()
    assert sorted(paths) == sorted(str(p) for p in folder.iterdir())  # each exactly once
    assert not list(out.glob(".*"))  # no partial part left behind


def test_a_cluster_without_room_is_named_and_the_job_exits(archive, service_config, address,
                                                           tmp_path):
    started = time.monotonic()
    done = run_batch(str(archive / "calls"), "--out", str(tmp_path / "out"), "--config",
                     str(service_config), "--address", address, "--num-cpus", "4",
                     "--placement-timeout-s", "2", "--no-progress")
    assert done.returncode == 2, done.stderr
    assert "1 engine actor(s) x {CPU: 4}" in done.stderr and "missing {CPU:" in done.stderr
    assert time.monotonic() - started < JOB_TIMEOUT_S


def test_an_engine_that_cannot_load_stops_the_job_with_its_reason(service, archive, address,
                                                                   tmp_path):
    app = {**service.app, "deployments": [
        {**d, "user_config": {"source": str(tmp_path / "no-model")}} if d["name"] == "base"
        else d for d in service.app["deployments"]]}
    config = tmp_path / "broken.yaml"
    config.write_text(yaml.safe_dump({"applications": [app]}))
    done = run_batch(str(archive / "calls"), "--out", str(tmp_path / "out"), "--config",
                     str(config), "--address", address, "--model-version", "base", *SMALL)
    assert done.returncode == 2, done.stderr
    assert "error: the engines did not start" in done.stderr
    assert f"model directory {tmp_path / 'no-model'} does not exist" in done.stderr


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
def test_by_segment_rows_equal_the_segments_route(service_config, address, client, tmp_path):
    folder = tmp_path / "recordings"
    folder.mkdir()
    call = conversation.make()
    call.write(folder / "call.wav")
    (folder / "call.rttm").write_text(call.rttm())  # given turns
    conversation.make(gaps=[0.5], script=[conversation.SCRIPT[1]]).write(folder / "memo.wav")
    clip_maker.write(folder / "quiet.wav", np.zeros(32_000, np.float32), 16_000)  # no speech
    call.write(folder / "late.wav")
    late_rttm = "SPEAKER late 1 0.0 999.0 <NA> <NA> agent <NA> <NA>\n"  # past the audio's end
    (folder / "late.rttm").write_text(late_rttm)
    (folder / "corrupt.wav").write_bytes(b"RIFF" + bytes(100))
    out = tmp_path / "out"
    args = [str(folder), "--out", str(out), "--config", str(service_config), "--address", address,
            "--model-version", "base", "--by-segment", "--files-per-task", "2"]
    done = run_batch(*args, "--part-rows", "2", *SMALL)
    assert done.returncode == 1, done.stderr  # late and corrupt failed
    table = read_rows(out)
    rows: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        rows.setdefault(Path(row["path"]).name, []).append(row)
    assert sorted(rows) == ["call.wav", "corrupt.wav", "late.wav", "memo.wav", "quiet.wav"]

    for name, rttm in (("call.wav", call.rttm()), ("memo.wav", None), ("quiet.wav", None)):
        response = segments(client, (folder / name).read_bytes(), name, rttm,
                            model_version="base")
        assert response.status_code == 200, response.text
        expected = response.json()["segments"]
        got = rows[name]
        if not expected:  # no speech: one row that says so
            assert [(r["status"], r["segments"], r["segment"], r["emotion"]) for r in got] == [
                ("ok", 0, None, None)]
            continue
        assert [r["segment"] for r in got] == list(range(len(expected)))
        for row, segment in zip(got, expected):
            assert (row["status"], row["segments"]) == ("ok", len(expected))
            assert (row["start_s"], row["end_s"], row["speaker"]) == (
                segment["start_s"], segment["end_s"], segment["speaker"])
            scores = [row[f"score_{label}"] for label in segment["scores"]]
            assert np.abs(np.subtract(scores, list(segment["scores"].values()))).max() <= 1e-4
    assert [r["speaker"] for r in rows["call.wav"]] == [turn.speaker for turn in call.turns]
    assert len(rows["memo.wav"]) == 1 and rows["memo.wav"][0]["speaker"] is None

    refused = segments(client, (folder / "late.wav").read_bytes(), "late.wav", late_rttm,
                       model_version="base").json()["error"]
    assert [(r["status"], r["error_code"], r["error"]) for r in rows["late.wav"]] == [
        ("failed", refused["code"], refused["message"])]
    assert rows["corrupt.wav"][0]["error_code"] == "unsupported_audio"
    # --part-rows 2, yet a recording's rows are never split between parts (resume needs it).
    in_parts = [path for part in out.glob("part-*.parquet")
                for path in set(pq.read_table(part, columns=["path"]).column("path").to_pylist())]
    assert len(in_parts) == len(set(in_parts)) == 5
    segment_count = len(rows["call.wav"]) + len(rows["memo.wav"])
    assert "5 files" in done.stderr and f"3 ok, 2 failed ({segment_count} segments)" in \
        done.stderr

    again = run_batch(*args, "--resume", *SMALL)
    assert again.returncode == 0 and "nothing to do: all 5 files" in again.stderr, again.stderr
    mixed = run_batch(*[a for a in args if a != "--by-segment"], "--resume", *SMALL)
    assert mixed.returncode == 2 and "written with --by-segment" in mixed.stderr, mixed.stderr
