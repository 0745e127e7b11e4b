"""POST /v1/segments through the live service (tiny checkpoints, the session's cluster): VAD
against a two-voice call with known turns, the RTTM and JSON paths, exactness against
POST /v1/predict, refusals, NDJSON, dual-channel calls, m4a and webm, and a 30-minute call
within the config's own proxy timeout."""

from __future__ import annotations

import io
import json
import time

import httpx
import numpy as np
import pytest
import soundfile
import yaml

from tests import conversation
from tests.clips import espeak_available
from tests.conftest import TINY_CONFIG
from tests.test_vad import assert_spans_match

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
EXACT = 1e-4


@pytest.fixture(scope="module")
def call():
    return conversation.make()


def float_wav(samples: np.ndarray, rate: int = 16_000) -> bytes:
    """A file whose decoded samples are exactly these (float32 WAV at 16 kHz)."""
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def segments(client, data: bytes, name: str = "call.wav", rttm: str | None = None,
             timeout: float = 120, headers: dict | None = None, **fields) -> httpx.Response:
    files = {"file": (name, data)}
    if rttm is not None:
        files["rttm"] = ("call.rttm", rttm.encode())
    return client.post("/v1/segments", files=files, data=fields, timeout=timeout,
                       headers=headers)


def predicted(client, samples: np.ndarray, variant: str) -> dict:
    response = client.post("/v1/predict", files={"file": ("s.wav", float_wav(samples))},
                           data={"model_version": variant})
    assert response.status_code == 200, response.text
    return response.json()


def assert_scores_equal(segment: dict, prediction: dict) -> None:
    assert segment["emotion"] == prediction["emotion"]
    for name, score in prediction["scores"].items():
        assert abs(segment["scores"][name] - score) < EXACT, (name, segment, prediction)


def assert_speakers_are_weighted_means(body: dict) -> None:
    for name, speaker in body["speakers"].items():
        rows = [s for s in body["segments"] if (s["speaker"] or "unknown") == name]
        weights = np.array([s["end_s"] - s["start_s"] for s in rows])
        assert speaker["segments"] == len(rows)
        assert speaker["speech_s"] == pytest.approx(weights.sum(), abs=2e-3)
        for emotion, score in speaker["scores"].items():
            expected = np.dot(weights, [s["scores"][emotion] for s in rows]) / weights.sum()
            assert score == pytest.approx(expected, abs=1e-6)
        assert speaker["emotion"] == max(speaker["scores"], key=speaker["scores"].get)


def test_vad_finds_the_turns_and_each_segment_scores_as_predict(service, client, call):
    mono = call.mono
    response = segments(client, float_wav(mono), model_version="base")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["segmentation"] == "vad" and body["model_version"] == "base"
    assert body["audio"]["duration_s"] == pytest.approx(call.duration_s, abs=1e-3)
    rows = body["segments"]
    assert [s["index"] for s in rows] == list(range(len(rows)))
    assert_spans_match([(s["start_s"], s["end_s"]) for s in rows], call.turns)
    assert list(body["speakers"]) == ["unknown"]
    assert_speakers_are_weighted_means(body)
    for row in rows:  # exactly predict on [round(start_s*16k), round(end_s*16k))
        samples = mono[round(row["start_s"] * 16_000):round(row["end_s"] * 16_000)]
        assert_scores_equal(row, predicted(client, samples, "base"))
    assert body["timings_ms"]["vad"] > 0 and body["model"]["weights"] == "random"


def test_rttm_and_json_give_the_speakers_back(service, client, call):
    data = float_wav(call.mono)
    by_rttm = segments(client, data, rttm=call.rttm(), model_version="large")
    assert by_rttm.status_code == 200, by_rttm.text
    body = by_rttm.json()
    assert body["segmentation"] == "given"
    assert [s["speaker"] for s in body["segments"]] == [t.speaker for t in call.turns]
    assert list(body["speakers"]) == ["agent", "customer"]
    assert {n: s["segments"] for n, s in body["speakers"].items()} == {"agent": 3,
                                                                        "customer": 3}
    assert_speakers_are_weighted_means(body)
    # JSON, given out of order and overlapping: answered in start order, each scored
    turns = json.loads(call.segments_json())
    given = [*reversed(turns), {"start_s": 1.0, "end_s": 6.0, "speaker": "both"}]
    by_json = segments(client, data, segments=json.dumps(given), model_version="large")
    assert by_json.status_code == 200, by_json.text
    rows = by_json.json()["segments"]
    assert [(s["start_s"], s["speaker"]) for s in rows][:3] == [
        (turns[0]["start_s"], "agent"), (1.0, "both"), (turns[1]["start_s"], "customer")]
    from_rttm = {(s["speaker"], round(s["start_s"], 3)): s["scores"] for s in body["segments"]}
    for row in rows:
        if row["speaker"] != "both":
            expected = from_rttm[(row["speaker"], round(row["start_s"], 3))]
            assert all(abs(row["scores"][k] - v) < EXACT for k, v in expected.items())


def test_a_label_set_scores_every_segment_and_speaker_over_those_labels(service, client, call):
    """labels=angry,happy,neutral,sad: each segment equals predict with the same label set on
    its samples; the speakers' means are over those four; an unknown name is a 400."""
    subset = "angry,happy,neutral,sad"
    response = segments(client, float_wav(call.mono), rttm=call.rttm(), model_version="base",
                        labels=subset)
    assert response.status_code == 200, response.text
    body = response.json()
    for row in body["segments"][:2]:
        assert set(row["scores"]) == set(subset.split(","))
        start, end = round(row["start_s"] * 16_000), round(row["end_s"] * 16_000)
        expected = client.post("/v1/predict", files={"file": ("s.wav", float_wav(
            call.mono[start:end]))}, data={"model_version": "base", "labels": subset})
        assert expected.status_code == 200, expected.text
        assert_scores_equal(row, expected.json())
    assert all(set(s["scores"]) == set(subset.split(",")) for s in body["speakers"].values())
    assert_speakers_are_weighted_means(body)
    refused = segments(client, float_wav(call.mono), rttm=call.rttm(), labels="happy,bored")
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "unknown_label"


@pytest.mark.parametrize("fields, rttm, status, code, where", [
    ({"segments": '[{"start_s": 2, "end_s": 1}]'}, None, 422, "invalid_segments",
     {"index": 0}),
    ({"segments": '[{"start_s": 0, "end_s": 1}, {"start_s": 20, "end_s": 40}]'}, None, 422,
     "invalid_segments", {"index": 1}),  # past the end of the audio
    ({}, "SPEAKER a 1 0 1 <NA> <NA> x <NA> <NA>\nSPEAKER b 1 2 1 <NA> <NA> y <NA> <NA>\n",
     422, "invalid_segments", {"line": 2}),
    ({"segments": "[]"}, "SPEAKER a 1 0 1 <NA> <NA> x <NA> <NA>\n", 422, "invalid_segments",
     {}),
    ({"channels": "split"}, None, 422, "invalid_parameter", {}),  # a mono recording
    ({"channels": "left"}, None, 422, "invalid_parameter", {}),
    ({"granularity": "frame"}, None, 422, "unknown_field", {}),
])
def test_refusals(service, client, fields, rttm, status, code, where):
    data = float_wav(conversation.make(gaps=[0.5], script=[conversation.SCRIPT[0]]).mono)
    response = segments(client, data, rttm=rttm, **fields)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert {key: error[key] for key in where} == where


def test_ndjson_lines_as_segments_finish_then_the_summary(service, client, call):
    data = float_wav(call.mono)
    whole = segments(client, data, rttm=call.rttm(), model_version="base").json()
    lines = []
    with client.stream("POST", "/v1/segments", files={"file": ("c.wav", data),
                       "rttm": ("c.rttm", call.rttm().encode())},
                       data={"model_version": "base"},
                       headers={"Accept": "application/x-ndjson"}, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    *rows, summary = lines
    assert all(row["type"] == "segment" for row in rows) and summary["type"] == "summary"
    assert sorted(rows, key=lambda r: r["index"]) == [
        {"type": "segment", **row} for row in whole["segments"]]
    assert summary["speakers"] == whole["speakers"] and summary["segments"] == len(rows)


def test_dual_channel_calls_score_each_channel_alone(service, client, call):
    stereo = np.stack([call.left, call.right], axis=1)
    response = segments(client, float_wav(stereo), channels="split", model_version="base")
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body["speakers"]) == ["ch0", "ch1"] and body["audio"]["channels"] == 2
    for channel, speaker in ((0, "agent"), (1, "customer")):
        rows = [s for s in body["segments"] if s["speaker"] == f"ch{channel}"]
        assert all(s["channel"] == channel for s in rows)
        assert_spans_match([(s["start_s"], s["end_s"]) for s in rows],
                           [t for t in call.turns if t.speaker == speaker])
        alone = stereo[:, channel]
        samples = alone[round(rows[0]["start_s"] * 16_000):round(rows[0]["end_s"] * 16_000)]
        assert_scores_equal(rows[0], predicted(client, samples, "base"))
    # given segments name the channel as their speaker
    given = segments(client, float_wav(stereo), channels="split", model_version="base",
                     rttm=call.rttm(channels=True))
    assert given.status_code == 200, given.text
    assert [s["channel"] for s in given.json()["segments"]] == [0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("kind", ["m4a_aac", "webm_opus"])
def test_recordings_in_m4a_and_webm(service, client, call, kind):
    import soxr

    from tests.media import FORMATS, encode

    spec, fmt = FORMATS[kind]
    samples = soxr.resample(call.mono, 16_000, spec.rate).astype(np.float32)[None, :]
    response = segments(client, encode(spec, samples=samples), name=f"call.{kind[:4]}",
                        model_version="base")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["audio"]["format"] == fmt
    # lossy codecs and a resampling shift the edges a little: the same turns are found
    assert len(body["segments"]) == len(call.turns)


def test_a_30_minute_call_within_the_configs_own_timeout(service, client, call):
    """tests' cluster sets no proxy timeout: the request carries tiny.yaml's, as Ray Serve's
    per-request header; every model call is bounded by the router's model_timeout_s."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    timeout_s = config["http_options"]["request_timeout_s"]
    long_call = conversation.tile(call, 1790)  # whole copies of the call: 64 x 28 s
    buffer = io.BytesIO()
    soundfile.write(buffer, long_call.mono, 16_000, format="WAV", subtype="PCM_16")
    started = time.monotonic()
    response = segments(client, buffer.getvalue(), model_version="base", timeout=timeout_s + 30,
                        headers={"x-request-timeout-seconds": str(timeout_s)})
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    assert 1780 <= body["audio"]["duration_s"] <= 1800 and elapsed < timeout_s
    assert_spans_match([(s["start_s"], s["end_s"]) for s in body["segments"]],
                       long_call.turns)
    print(f"30-minute call: {len(body['segments'])} segments in {elapsed:.1f} s "
          f"(timeout {timeout_s} s); timings {body['timings_ms']}")


def test_stream_utterance_events_score_as_predict(service, client, call):
    """WS /v1/stream?segments=true: an utterance event per turn, each scored as predict on
    those samples of the stream; the windows go on as before."""
    import asyncio

    from serve_app.tools.stream_client import stream_audio

    run = asyncio.run(stream_audio(
        service.url, call.mono, 16_000, pace="lockstep", encoding="f32le", timeout_s=60,
        params={"model_version": "base", "segments": "true", "window_s": 2, "hop_s": 1}))
    assert run.error is None and run.result is not None, run.error
    assert run.ready["segments"] is True and len(run.windows) == int(call.duration_s)
    utterances = run.utterances
    assert [u["index"] for u in utterances] == list(range(len(utterances)))
    assert run.result["utterances"] == len(utterances)
    assert_spans_match([(u["start_s"], u["end_s"]) for u in utterances], call.turns)
    for utterance in utterances[:3]:
        samples = call.mono[round(utterance["start_s"] * 16_000):
                            round(utterance["end_s"] * 16_000)]
        assert_scores_equal(utterance, predicted(client, samples, "base"))


def test_cli_segments_a_folder_with_an_rttm_beside_a_recording(service, call, tmp_path):
    import csv
    import subprocess
    import sys

    folder = tmp_path / "calls"
    folder.mkdir()
    call.write(folder / "call.wav")
    (folder / "call.rttm").write_text(call.rttm())
    conversation.make(gaps=[0.5], script=[conversation.SCRIPT[1]]).write(folder / "memo.wav")
    out = tmp_path / "rows.csv"
    done = subprocess.run([sys.executable, "-m", "serve_app.tools.cli", "segments", str(folder),
                           "--url", service.url, "--model-version", "base", "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    calls = [r for r in rows if r["path"].endswith("call.wav")]
    memos = [r for r in rows if r["path"].endswith("memo.wav")]
    assert [r["speaker"] for r in calls] == [t.speaker for t in call.turns]  # from the RTTM
    assert len(memos) == 1 and memos[0]["speaker"] == ""  # VAD: one utterance, no speaker
    assert all(r["emotion"] and r["error"] == "" for r in rows)
    assert "2 recordings: 2 ok, 0 failed" in done.stderr
    assert "  agent: 3 segments" in done.stderr and "  unknown: 1 segments" in done.stderr
