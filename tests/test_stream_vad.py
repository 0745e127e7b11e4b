"""WS /v1/stream?vad=true: windows in which the VAD finds no speech are sent without scores
(and counted), windows with speech score exactly as on a stream without vad=true; the
parameter parses as the others do, and is refused where no VAD is deployed."""

from __future__ import annotations

import numpy as np
import pytest
from starlette.testclient import TestClient

from serve_app.api import stream_protocol as protocol
from serve_app.api.stream_vad import vad_refusal
from serve_app.config import RouterSettings
from tests import conversation, inprocess
from tests.clips import espeak_available
from tests.conftest import APP_NAME
from tests.test_stream import close_code, lockstep, open_stream, refused
from tests.waiting import eventually, scrape

SAME = 1e-5
SILENT_KEYS = {"type", "start_s", "end_s", "speech", "skipped"}


def test_vad_is_a_flag_off_by_default():
    settings = RouterSettings()
    assert protocol.parse_params({}, settings).vad is False
    assert protocol.parse_params({"vad": "true"}, settings).vad is True
    assert protocol.parse_params({"vad": "0"}, settings).vad is False
    with pytest.raises(protocol.StreamError) as refusal:
        protocol.parse_params({"vad": "maybe"}, settings)
    assert (refusal.value.close_code, refusal.value.code) == (1008, "invalid_parameter")
    assert "vad" in refusal.value.message


def test_asking_for_vad_without_a_vad_deployment_is_refused():
    params = protocol.parse_params({"vad": "true", "segments": "true"}, RouterSettings())
    error = vad_refusal(params, None)
    assert (error.close_code, error.code) == (1008, "vad_not_deployed")
    assert error.message.startswith("segments=true and vad=true needs the VAD deployment")
    assert vad_refusal(protocol.parse_params({}, RouterSettings()), None) is None


def test_vad_true_is_refused_by_an_app_without_vad(tmp_path):
    """The whole app as the Router builds it, with no VAD deployment: the same error event and
    close code as segments=true."""
    checkpoint = inprocess.tiny_checkpoint(tmp_path)
    with inprocess.local_service(checkpoint, RouterSettings(default_version="base",
                                                            decode_workers=0)) as (_, app), \
            TestClient(app) as client:
        for query in ("vad=true", "segments=true"):
            with client.websocket_connect(f"/v1/stream?{query}") as ws:
                event = ws.receive_json()
                assert event["type"] == "error", event
                assert event["error"]["code"] == "vad_not_deployed"
                assert event["error"]["message"].startswith(query)
                closed = ws.receive()
            assert closed["type"] == "websocket.close" and closed["code"] == 1008


def test_a_bad_vad_value_is_refused_as_other_parameters(service):
    event, closed = refused(service.url, vad="maybe")
    assert event["error"]["code"] == "invalid_parameter" and "vad" in event["error"]["message"]
    assert closed == 1008


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
def test_silent_windows_are_not_scored_and_speech_windows_score_as_without_vad(service):
    rate, noise = conversation.RATE, np.random.default_rng(7)
    speech = conversation.speech("agent", conversation.SCRIPT[0][1])
    raw = np.concatenate([np.zeros(2 * rate, np.float32), speech,
                          np.zeros(rate // 2, np.float32)])
    raw = (raw + noise.standard_normal(len(raw)) * conversation.NOISE_STD).astype(np.float32)
    params = {"model_version": "base", "encoding": "f32le", "window_s": 1.0, "hop_s": 0.5}
    runs = {}
    for vad in (False, True):
        with open_stream(service.url, **params, **({"vad": "true"} if vad else {})) as (
                ws, ready):
            assert ready.get("vad") is (True if vad else None)
            runs[vad] = lockstep(ws, raw, rate, 0.5)
            assert close_code(ws) == 1000
    *plain, plain_result = runs[False]
    *gated, result = runs[True]
    assert all("speech" not in window for window in plain)  # nothing changes without vad
    assert [(w["start_s"], w["end_s"]) for w in gated] == [(w["start_s"], w["end_s"])
                                                           for w in plain]
    silent = [w for w in gated if w["speech"] is False]
    spoken = [(w, p) for w, p in zip(gated, plain, strict=True) if w["speech"] is True]
    assert len(silent) + len(spoken) == len(gated)
    # The first 2 s are noise alone; the middle of the speech is speech.
    assert [w["end_s"] for w in gated[:4]] == [0.5, 1.0, 1.5, 2.0]
    assert all(w["speech"] is False for w in gated[:4]), gated[:4]
    middle = 2.0 + len(speech) / rate / 2
    assert any(w["start_s"] <= middle <= w["end_s"] for w, _ in spoken), gated
    for window in silent:
        assert set(window) == SILENT_KEYS and window["skipped"] == 0, window
    for window, same in spoken:
        assert window["emotion"] == same["emotion"]
        np.testing.assert_allclose(list(window["scores"].values()),
                                   list(same["scores"].values()), atol=SAME, rtol=0)
    assert (result["windows"], result["silent"], result["skipped"]) == (len(gated),
                                                                        len(silent), 0)
    assert "silent" not in plain_result
    np.testing.assert_allclose(list(result["scores"].values()),
                               list(plain_result["scores"].values()), atol=SAME, rtol=0)

    def counted():
        scraped = scrape(service.cluster.metrics_url)
        total = scraped.total("ray_emotion2vec_stream_silent_windows_total",
                              application=APP_NAME, variant="base")
        assert total >= len(silent), total
        return total
    eventually(counted, "the silent windows counted", 60, interval_s=1)


def test_the_cli_prints_windows_without_speech(service, tmp_path):
    """`emotion2vec-serve stream --vad`: a window without speech is a line of its own."""
    import subprocess
    import sys

    import soundfile

    path = tmp_path / "quiet.wav"
    soundfile.write(path, np.zeros(16_000 * 2, np.float32), 16_000, subtype="FLOAT")
    done = subprocess.run(
        [sys.executable, "-m", "serve_app.tools.cli", "stream", str(path), "--url", service.url,
         "--vad", "--fast", "--model-version", "base", "--window-s", "1", "--hop-s", "1"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert sum("(no speech)" in line for line in lines) == 2, lines
    assert "2 windows, 0 skipped, 2 without speech" in lines[-1], lines
