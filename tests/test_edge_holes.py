"""The edge's known holes, each sent the crafted input that opened it (or its scaled form),
with the 4xx, the bound or the charge asserted. No Ray cluster: the parsers, the quota notes,
the decoder's budget on their own, and POST /v1/segments through the request pipeline in this
process (tests/inprocess.py). The failover middleware's are in tests/test_failover.py."""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import json
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from pydantic import ValidationError

from serve_app.api import hf
from serve_app.api import kserve as kserve_routes
from serve_app.api import kserve_codec as codec
from serve_app.api.responses import save_result
from serve_app.api.segments import SegmentsRoute
from serve_app.api.upload import request_id
from serve_app.audio import sndfile
from serve_app.audio.waveform import Budget, Limits
from serve_app.config import ApiKeySpec, RouterSettings, SegmentSettings, VadSettings
from serve_app.errors import ApiError
from serve_app.metrics import SegmentMetrics
from serve_app.segments.cutting import cut_long
from serve_app.segments.spec import MAX_COVERAGE, parse_json
from serve_app.traffic.access import MAX_DEBT_CAPACITIES, AccessControl
from serve_app.traffic.quota_share import QuotaShare, read_note
from tests import inprocess
from tests.clips import tone


def _infer_body(inputs: list[dict]) -> bytes:
    return json.dumps({"inputs": inputs}).encode()


# -- 1. KServe shapes: bounded step by step ---------------------------------------------------
@pytest.mark.parametrize("shape", [[2**62] * 20000, [2**62] * 9, [2**62] * 8, [2**13] * 4,
                                   [1, 2**27]])
def test_a_huge_kserve_shape_is_refused_before_its_product(shape):
    body = _infer_body([{"name": "waveform", "datatype": "FP32", "shape": shape, "data": []}])
    with pytest.raises(ApiError) as refused:
        codec.parse_infer_request(body, None)
    assert (refused.value.status, refused.value.code) == (400, "invalid_tensor")
    limit = f"at most {codec.MAX_DIMS}" if len(shape) > codec.MAX_DIMS else "too large"
    assert limit in refused.value.message


# -- 5. what used to be a 500 ----------------------------------------------------------------
@pytest.mark.parametrize("body, header, code", [
    (b'{"inputs": [{"name": "waveform", "datatype": "FP32", "shape": [1], "data": [1'
     + b"0" * 400 + b"]}]}", None, "invalid_tensor"),
    (b'{"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1], '
     b'"data": ["\\ud800"]}]}', None, "malformed_json"),
    (b"[" * 100_000 + b"]" * 100_000, None, "malformed_json"),
    (b'{"inputs": []}', "\u00b2", "invalid_tensor"),
    (b'{"inputs": []}', "9" * 400, "invalid_tensor"),
])
def test_kserve_input_that_raised_is_a_400(body, header, code):
    with pytest.raises(ApiError) as refused:
        codec.parse_infer_request(body, header)
    assert (refused.value.status, refused.value.code) == (400, code)


@pytest.mark.parametrize("top_k", ["\u00b2", "9" * 400, "0", "-1", "1001"])
def test_hf_top_k_that_raised_is_a_422(top_k):
    with pytest.raises(ApiError) as refused:
        hf.parse_request(b"RIFF", None, {"top_k": top_k}, 1024)
    assert (refused.value.status, refused.value.code) == (422, "invalid_parameter")
    assert hf.parse_request(b"RIFF", None, {"top_k": " 3 "}, 1024).top_k == 3


@pytest.mark.parametrize("segments", [
    "[" * 100_000 + "]" * 100_000,
    '[{"start_s": 0, "end_s": 1' + "0" * 400 + "}]",
    '[{"start_s": 0, "end_s": 1, "speaker": "\\ud800"}]',
    '[{"start_s": 0, "end_s": NaN}]',
])
def test_segments_that_raised_are_a_422(segments):
    with pytest.raises(ApiError) as refused:
        parse_json(segments, 2000, 0.1)
    assert (refused.value.status, refused.value.code) == (422, "invalid_segments")


def test_a_big_kserve_body_is_parsed_off_the_event_loop():
    samples = [0.125] * 400_000  # ~3.6 MB of JSON text
    body = _infer_body([{"name": "waveform", "datatype": "FP32", "shape": [len(samples)],
                         "data": samples}])
    assert len(body) > kserve_routes.PROCESS_PARSE_BYTES

    async def main() -> tuple[codec.InferRequest, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.02)
        before = ticks
        parsed = await kserve_routes.parse(body, None)
        ticker.cancel()
        return parsed, ticks - before

    parsed, ticks = asyncio.run(main())
    assert parsed.inputs["waveform"].data.shape == (400_000,)
    assert ticks >= 3, f"the event loop ticked {ticks} times while the body was parsed"
    bad = body.replace(b'"FP32"', b'"INT8"')  # refused in the worker: the same 400 here

    with pytest.raises(ApiError) as refused:
        asyncio.run(kserve_routes.parse(bad, None))
    assert (refused.value.status, refused.value.code) == (400, "invalid_tensor")


# -- 3. channels=split: the budget counts what will be allocated ------------------------------
def test_split_budget_counts_the_channels_at_16_khz():
    limits = SegmentSettings(max_split_channels=32).decode_limits(
        RouterSettings().decode_limits(), split=True)
    # The crafted file: 32 channels at 1 kHz for 30 min (57.6 MB as 8-bit WAV) passed every
    # cap counted at the file's rate, then took ~3.7 GB in the router.
    with pytest.raises(ApiError) as refused:
        Budget(limits, 1000, 32, time.monotonic()).check_frames(1800 * 1000)
    assert (refused.value.status, refused.value.code) == (413, "decoded_too_large")
    # What the caps promise still fits: 48 kHz stereo of the longest recording, kept apart.
    Budget(limits, 48_000, 2, time.monotonic()).check_frames(1800 * 48_000)


def _wav(channels: int, rate: int, seconds: float, subtype: str = "PCM_U8") -> bytes:
    samples = np.tile(tone(seconds, rate)[:, None], (1, channels)) * 0.5
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, subtype=subtype, format="WAV")
    return buffer.getvalue()


def test_split_decode_is_refused_from_the_header_before_reading():
    data = _wav(4, 1000, 60)  # 240 KB of 8-bit samples; 20 MB once kept apart at 16 kHz
    limits = Limits(120, max_decoded_bytes=8 * 2**20, keep_channels=True)
    with pytest.raises(ApiError) as refused:
        sndfile.decode_sndfile(data, limits)
    assert refused.value.code == "decoded_too_large"
    mixed = sndfile.decode_sndfile(data, Limits(120, max_decoded_bytes=8 * 2**20))
    assert mixed.channels == 4 and len(mixed.waveform) == 60 * 16_000


def test_split_holds_at_most_max_split_channels():
    limits = SegmentSettings().decode_limits(RouterSettings().decode_limits(), split=True)
    with pytest.raises(ApiError) as refused:
        sndfile.decode_sndfile(_wav(9, 8000, 1), limits)
    assert (refused.value.status, refused.value.code) == (422, "too_many_channels")
    assert sndfile.decode_sndfile(_wav(8, 8000, 1), limits).channel_waveforms.shape[0] == 8


# -- 2. segments: the quota pays for what is scored ------------------------------------------
KEY = "k-segments-test"


@pytest.fixture(scope="module")
def segments_app(tmp_path_factory):
    """POST /v1/segments in this process, its key with an audio quota to read the charge."""
    loop = asyncio.new_event_loop()
    checkpoint = inprocess.tiny_checkpoint(tmp_path_factory.mktemp("checkpoints"))
    settings = RouterSettings(default_version="base", decode_workers=0, api_keys={
        "meter": ApiKeySpec(sha256=hashlib.sha256(KEY.encode()).hexdigest(),
                            audio_seconds_per_minute=100_000)})
    pipeline = loop.run_until_complete(inprocess.local_pipeline(checkpoint, settings))
    route = SegmentsRoute(pipeline, None, SegmentMetrics())
    yield loop, pipeline, route
    loop.run_until_complete(inprocess.close_pipeline(pipeline))
    loop.close()


def _post_segments(app, data: bytes, segments: list, **fields):
    loop, pipeline, route = app
    body, content_type = inprocess.multipart(
        {"segments": json.dumps(segments), **fields}, {"file": ("call.wav", data)})
    before = pipeline.access.spent.get(("meter", "audio_seconds"), 0.0)
    try:
        response = loop.run_until_complete(route.handle(inprocess.request(
            "/v1/segments", body, headers={"content-type": content_type,
                                           "authorization": f"Bearer {KEY}"})))
        outcome = (response.status_code, inprocess.body_of(response))
    except ApiError as exc:
        outcome = (exc.status, exc.body())
    return outcome, pipeline.access.spent.get(("meter", "audio_seconds"), 0.0) - before


def test_overlapping_segments_are_charged_as_scored(segments_app):
    clip = _wav(1, 16_000, 2.0, "PCM_16")
    (status, answer), charged = _post_segments(segments_app, clip,
                                               [{"start_s": 0, "end_s": 2}] * 2)
    assert status == 200 and len(answer["segments"]) == 2, answer
    assert charged == pytest.approx(4.0)
    (status, _), charged = _post_segments(segments_app, clip, [{"start_s": 0, "end_s": 1}])
    assert status == 200 and charged == pytest.approx(2.0)  # the decode: never below it


def test_split_channels_are_charged_each(segments_app):
    stereo = _wav(2, 16_000, 2.0, "PCM_16")
    (status, answer), charged = _post_segments(
        segments_app, stereo, [{"start_s": 0, "end_s": 1, "speaker": "ch0"},
                               {"start_s": 1, "end_s": 2, "speaker": "ch1"}], channels="split")
    assert status == 200, answer
    assert charged == pytest.approx(4.0)  # two channels analysed apart


def test_repeated_segments_are_refused(segments_app):
    clip = _wav(1, 16_000, 2.0, "PCM_16")
    # The crafted request: one span repeated 2,000 times (scaled: 2 s, not 120 s).
    (status, answer), charged = _post_segments(segments_app, clip,
                                               [{"start_s": 0, "end_s": 2}] * 2000)
    assert (status, answer["error"]["code"]) == (422, "invalid_segments"), answer
    assert f"more than {MAX_COVERAGE:g} times" in answer["error"]["message"]
    assert charged == pytest.approx(2.0)  # the decode alone: nothing was scored


# -- 4. quota notes from the board are checked before they count -----------------------------
def _note(at, spent, levels=None) -> bytes:
    return json.dumps({"at": at, "spent": spent, "levels": levels or {}}).encode()


@pytest.mark.parametrize("raw", [
    _note(1000.0, {"k/requests": "abc"}),
    _note(1000.0, {"k/requests": float("inf")}),
    _note(1000.0, {"k/requests": -5}),
    _note(1000.0, {"k/requests": 1e300}),
    _note(float("nan"), {"k/requests": 1}),
    _note(1000.0 + 3600, {"k/requests": 1}),
    _note(1000.0 - 3600, {"k/requests": 1}),
    _note(1000.0, {"k/requests": 1}, {"k/requests": float("-inf")}),
    _note(1000.0, {"norequests": 1}),
    b"[1, 2]", b"{", b"[" * 100_000,
])
def test_a_note_no_replica_writes_is_dropped(raw):
    assert read_note(raw, now=1000.0) is None


def test_a_bad_note_debits_nothing_and_the_honest_ones_still_count():
    clock = [1000.0]
    access = AccessControl(clock=lambda: clock[0])
    access.configure(RouterSettings(api_keys={"k": ApiKeySpec(
        sha256="ab" * 32, requests_per_minute=60)}))
    share = QuotaShare(access, clock=lambda: clock[0])
    assert share.absorb({}) == []  # joined
    honest = {"r2": _note(clock[0], {"k/requests": 5})}
    bad = {"r3": _note(clock[0], {"k/requests": float("inf")}),
           "r4": _note(clock[0], {"k/requests": "lots"})}
    for _ in range(3):  # the same notes again: debited once
        assert sorted(share.absorb({**honest, **bad})) == ["r3", "r4"]
    assert access.levels()[("k", "requests")] == pytest.approx(60 - 5)


def test_a_bucket_debt_is_bounded():
    access = AccessControl(clock=lambda: 0.0)
    access.configure(RouterSettings(api_keys={"k": ApiKeySpec(
        sha256="cd" * 32, audio_seconds_per_minute=60)}))
    access.debit("k", "audio_seconds", 1e15)
    access.lower_to("k", "audio_seconds", -1e15)
    assert access.levels()[("k", "audio_seconds")] == -MAX_DEBT_CAPACITIES * 60


# -- 7. the failover middleware keeps only what it may replay: tests/test_failover.py --------


# -- 8. VAD settings that cannot terminate ---------------------------------------------------
def test_vad_settings_whose_pieces_cannot_fit_are_refused():
    with pytest.raises(ValidationError, match="min_speech_s"):
        VadSettings(min_speech_s=10, max_segment_s=5)


def test_cut_long_always_advances():
    waveform = np.zeros(100_000, np.float32)
    pieces = cut_long([(0, 100_000)], waveform, max_samples=16_000, min_samples=40_000)
    assert pieces[0][0] == 0 and pieces[-1][1] == 100_000
    assert all(end > start for start, end in pieces)
    assert all(b[0] == a[1] for a, b in itertools.pairwise(pieces))


# -- 9. request ids on disk ------------------------------------------------------------------
def test_a_repeated_request_id_is_saved_beside_the_first(tmp_path: Path):
    first = save_result(str(tmp_path), "retry-1", {"n": 1}, None)
    second = save_result(str(tmp_path), "retry-1", {"n": 2}, np.zeros(3, np.float32))
    assert first.name == "retry-1" and second.name == "retry-1.2"
    assert json.loads((first / "result.json").read_text()) == {"n": 1}
    assert (second / "embedding.npy").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["retry-1", "retry-1.2"]  # no staging


def test_a_request_id_with_a_trailing_newline_is_replaced():
    class Connection:
        def __init__(self, given: str):
            self.headers = {"x-request-id": given}

    assert request_id(Connection("abc\n")) != "abc\n"
    assert request_id(Connection("abc")) == "abc"


# -- 10. the key file ------------------------------------------------------------------------
def test_removing_the_key_file_revokes_its_keys(tmp_path: Path):
    clock, states = [0.0], []
    key_file = tmp_path / "keys.json"
    key_file.write_text(json.dumps({"filed": {"sha256": hashlib.sha256(b"k-1").hexdigest()}}))
    access = AccessControl(clock=lambda: clock[0], on_file_state=states.append)
    access.configure(RouterSettings(api_keys_file=str(key_file)))
    bearer = {"authorization": "Bearer k-1"}
    assert access.admit(bearer).key_id == "filed"
    key_file.unlink()
    clock[0] += 10
    with pytest.raises(ApiError) as refused:
        access.admit(bearer)
    assert refused.value.status == 401 and states[-1] == "missing"
    with pytest.raises(ApiError):
        access.admit({})  # every request, not only that key's
    key_file.write_text("filed: {sha256: nope")  # back, but broken: still refused, loudly
    clock[0] += 10
    with pytest.raises(ApiError):
        access.admit(bearer)
    assert states[-1] == "invalid"
    key_file.write_text(json.dumps({"filed": {"sha256": hashlib.sha256(b"k-1").hexdigest()}}))
    clock[0] += 10
    assert access.admit(bearer).key_id == "filed" and states[-1] == "ok"


def test_a_broken_key_file_keeps_the_last_good_keys(tmp_path: Path):
    clock, states = [0.0], []
    key_file = tmp_path / "keys.yaml"
    key_file.write_text(f"filed: {{sha256: {hashlib.sha256(b'k-2').hexdigest()}}}\n")
    access = AccessControl(clock=lambda: clock[0], on_file_state=states.append)
    access.configure(RouterSettings(api_keys_file=str(key_file)))
    key_file.write_text("filed: [not, a, spec\n")
    clock[0] += 10
    assert access.admit({"x-api-key": "k-2"}).key_id == "filed"
    assert states[-1] == "invalid"


# -- curl --data-binary @clip.wav: audio under curl's default content type -------------------
def test_audio_sent_as_urlencoded_is_the_raw_body():
    from serve_app.api.routes import PREDICT
    from serve_app.api.upload import read_upload

    clip = _wav(1, 16_000, 0.5, "PCM_16")
    urlencoded = {"content-type": "application/x-www-form-urlencoded"}
    sent = asyncio.run(read_upload(inprocess.request(
        "/v1/predict", clip, headers=urlencoded, query={"model_version": "base"}), PREDICT,
        2**20))
    assert sent.data == clip and sent.params == {"model_version": "base"}
    with pytest.raises(ApiError) as refused:  # a real form of the fields: no audio in it
        asyncio.run(read_upload(inprocess.request(
            "/v1/predict", b"model_version=base&granularity=frame", headers=urlencoded),
            PREDICT, 2**20))
    assert (refused.value.status, refused.value.code) == (422, "missing_file")
