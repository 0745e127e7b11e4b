"""The recordings people have, through the real service: each format with its duration, the
same samples from both decoders, bombs, files with no audio, truncated and corrupt files,
playlists that point elsewhere, and fuzzed m4a and webm through the decoder workers."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import threading
import time

import av
import av.logging
import numpy as np
import pytest
import soundfile
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.audio import ffmpeg as audio_av
from serve_app.audio import sndfile
from serve_app.audio.pool import DecodePool
from serve_app.audio.waveform import Limits
from serve_app.errors import ApiError
from tests import media
from tests.media import FORMATS, Spec
from tests.traffic import Background
from tests.waiting import eventually

SECONDS = 2.0
LIMITS = Limits(max_duration_s=120)  # the router's default cap


@pytest.fixture(scope="module")
def recordings() -> dict[str, bytes]:
    return {name: media.encode(spec, SECONDS) for name, (spec, _) in FORMATS.items()}


def post(client, body: bytes, name: str = "recording.wav"):
    """Every file goes up named .wav and typed audio/wav: the decoder goes by content."""
    return client.post("/v1/predict", files={"file": (name, body, "audio/wav")},
                       data={"model_version": "base"})


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_is_served_with_its_duration(client, recordings, name):
    spec, reported = FORMATS[name]
    response = post(client, recordings[name])
    assert response.status_code == 200, response.text
    info = response.json()["audio"]
    assert info["format"] == reported
    assert (info["sample_rate"], info["channels"]) == (spec.rate, spec.channels)
    # Codecs add priming and pad their last frame: within 50 ms of the encoded 2 s.
    assert abs(info["duration_s"] - SECONDS) <= 0.05, info


@pytest.mark.parametrize("fmt,subtype,rate,channels,tolerance", [
    ("WAV", "PCM_16", 16_000, 1, 0.0),
    ("WAV", "PCM_24", 8_000, 2, 0.0),
    ("WAV", "FLOAT", 22_050, 1, 0.0),
    ("FLAC", None, 44_100, 2, 0.0),
    ("MP3", "MPEG_LAYER_III", 48_000, 1, 1e-5),  # mpg123 and FFmpeg's mp3 decoder
    ("OGG", "OPUS", 48_000, 1, 1e-5),
    ("OGG", "VORBIS", 22_050, 1, 2e-3),          # libvorbis and FFmpeg's own vorbis decoder
])
def test_files_both_decoders_read_give_the_same_waveform(fmt, subtype, rate, channels,
                                                         tolerance):
    data = _wav(media.tone(1.5, rate, channels).T, rate, fmt, subtype)
    by_sndfile = sndfile.decode_sndfile(data, LIMITS)
    by_ffmpeg = audio_av.decode(data, LIMITS)
    assert (by_ffmpeg.sample_rate, by_ffmpeg.channels) == (rate, channels)
    assert by_ffmpeg.format.startswith(by_sndfile.format + "/")
    common = min(len(by_sndfile.waveform), len(by_ffmpeg.waveform))
    if fmt == "OGG" and subtype == "VORBIS":
        # FFmpeg trims the last Vorbis page differently (±15 ms); the resampler's end differs.
        assert abs(by_ffmpeg.duration_s - by_sndfile.duration_s) <= 0.02
        common -= 800
    else:
        assert by_ffmpeg.duration_s == by_sndfile.duration_s
    difference = np.abs(by_sndfile.waveform[:common] - by_ffmpeg.waveform[:common]).max()
    assert difference <= tolerance
    if tolerance == 0.0:
        assert np.array_equal(by_sndfile.waveform, by_ffmpeg.waveform)


def _wav(samples: np.ndarray, rate: int = 16_000, fmt: str = "WAV",
         subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def _forged_rate(rate: int) -> bytes:
    data = bytearray(_wav(np.zeros(8000, np.float32)))
    data[24:28] = rate.to_bytes(4, "little")  # the fmt chunk's sample rate
    return bytes(data)


@pytest.mark.parametrize("body,status,code", [
    (b"", 422, "empty_audio"),
    (_wav(np.zeros(1, np.float32)), 422, "audio_too_short"),
    (_wav(np.full(16_000, np.nan, np.float32), subtype="FLOAT"), 422, "invalid_samples"),
    (_wav(np.zeros(1600 * 40, np.float32).reshape(1600, 40)), 422, "too_many_channels"),
    (_forged_rate(500), 422, "unsupported_sample_rate"),
    (_forged_rate(4_000_000_000), 415, "unsupported_audio"),
    (_wav(np.zeros(16_000 * 121, np.float32)), 413, "audio_too_long"),
    (_wav(np.zeros(8_000 * 600, np.float32), 8_000, "FLAC"), 413, "audio_too_long"),
])
def test_both_decoders_refuse_alike(body, status, code):
    for decoder in (sndfile.decode_sndfile, audio_av.decode):
        with pytest.raises(ApiError) as refused:
            decoder(body, LIMITS)
        assert (refused.value.status, refused.value.code) == (status, code), decoder


def _video_only_mp4() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        video = out.add_stream("mpeg4", rate=10)
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        for index in range(10):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            frame.pts = index
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
    return buffer.getvalue()


def test_a_file_without_audio_gets_its_own_code(client):
    response = post(client, _video_only_mp4(), "video.mp4")
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "no_audio_stream"


def test_video_streams_are_never_decoded(recordings):
    """The video track is refused a decoder even while FFmpeg probes the streams, and the
    audio track after it is the one decoded."""
    previous = av.logging.get_level()
    av.logging.set_level(av.logging.VERBOSE)
    try:
        with av.logging.Capture() as logs:
            decoded = audio_av.decode(recordings["mp4_video_aac"], LIMITS)
    finally:
        av.logging.set_level(previous)
    assert decoded.format == "MP4/AAC" and abs(decoded.duration_s - SECONDS) <= 0.05
    refused = [message for _, name, message in logs if name == "mpeg4"]
    assert refused and all("not on whitelist" in message for message in refused), logs


def test_audio_codecs_outside_the_allow_list_are_refused():
    data = media.encode(Spec("mov", "adpcm_ima_qt", 16_000), 1.0)
    with av.open(io.BytesIO(data)) as unguarded:  # FFmpeg on its own decodes it
        assert unguarded.streams.audio[0].codec_context.name == "adpcm_ima_qt"
    with pytest.raises(ApiError) as refused:
        audio_av.decode(data, LIMITS)
    assert refused.value.status == 415 and "'adpcm_ima_qt' is not supported" in \
        refused.value.message


def _corrupt(data: bytes) -> bytes:
    damaged = bytearray(data)
    middle = len(damaged) // 3
    damaged[middle:middle + 200] = bytes(b ^ 0x5A for b in damaged[middle:middle + 200])
    return bytes(damaged)


@pytest.mark.parametrize("name,cut", [
    ("m4a_aac", lambda d: d[:len(d) // 2]),         # the index (moov) at the end is lost
    ("m4a_aac", lambda d: d[:int(len(d) * 0.95)]),
    ("3gp_amr", lambda d: d[:int(len(d) * 0.9)]),
    ("webm_opus", lambda d: d[:len(d) // 2]),       # its header says 2 s: 1 s is missing
    ("mkv_vorbis", lambda d: d[:len(d) // 10]),
    ("adts_aac", lambda d: d[:len(d) // 2 + 7]),    # cut inside a frame
    ("amr", lambda d: d[:len(d) // 2 + 5]),
    ("m4a_aac", _corrupt),
    ("webm_opus", _corrupt),
    ("mkv_vorbis", _corrupt),
])
def test_truncated_and_corrupt_files_get_415(client, recordings, name, cut):
    response = post(client, cut(recordings[name]))
    assert response.status_code == 415, response.text
    assert response.json()["error"]["code"] == "unsupported_audio"


# name: (spec, seconds of silence, whether the demuxer knows the duration before decoding:
# from the header, or for fragmented mp4 from every fragment's header)
BOMBS = {
    "m4a_aac": (Spec("ipod", "aac", 8_000), 3600, True),
    "mp4_fragmented_aac": (Spec("mp4", "aac", 8_000, options={
        "movflags": "frag_keyframe+empty_moov+skip_trailer"}), 3600, True),
    "adts_aac": (Spec("adts", "aac", 8_000), 3600, False),
    "webm_opus": (Spec("webm", "libopus", 48_000, codec_options={"frame_duration": "120"}),
                  3600, True),
    "webm_opus_streamed": (Spec("webm", "libopus", 48_000, options={"live": "1"},
                                codec_options={"frame_duration": "120"}), 3600, False),
    "mkv_vorbis": (FORMATS["mkv_vorbis"][0], 600, True),
    "wma": (Spec("asf", "wmav2", 22_050, bit_rate=32_000), 300, True),
    "amr": (Spec("amr", "libopencore_amrnb", 8_000, bit_rate=4_750), 600, False),
    "3gp_amr": (Spec("3gp", "libopencore_amrnb", 8_000, bit_rate=4_750), 600, True),
}


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    return {name: media.bomb(spec, seconds) for name, (spec, seconds, _) in BOMBS.items()}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_bombs_are_refused_quickly(client, bombs, name):
    _, _, declared = BOMBS[name]
    data = bombs[name]
    assert len(data) < 2 * 2**20  # under the test service's upload cap: it must decode
    response = post(client, data)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "audio_too_long"
    # In process, with the default 120 s cap: the CPU time spent before the refusal.
    started = time.thread_time()
    with pytest.raises(ApiError) as refused:
        audio_av.decode(data, LIMITS)
    cpu_s = time.thread_time() - started
    assert refused.value.code == "audio_too_long"
    assert cpu_s < 0.5, cpu_s
    # Refused from the declared duration before decoding, or while decoding.
    assert ("lasts over the limit" not in refused.value.message) == declared


def test_decoded_bytes_and_decode_time_are_capped(recordings):
    stereo = recordings["mov_aac"]  # 2 s, 48 kHz, 2 channels: 768 kB of float32
    with pytest.raises(ApiError) as too_big:
        audio_av.decode(stereo, Limits(120, max_decoded_bytes=2**18))
    assert (too_big.value.status, too_big.value.code) == (413, "decoded_too_large")
    with pytest.raises(ApiError) as too_slow:
        audio_av.decode(stereo, Limits(120, max_decode_s=1e-6))
    assert (too_slow.value.status, too_slow.value.code) == (413, "decode_too_slow")


# -- files that point elsewhere ---------------------------------------------------------------
def _playlists(target: str) -> dict[str, bytes]:
    return {
        "ffconcat": f"ffconcat version 1.0\nfile {target}\n".encode(),
        "ffconcat_url": f"ffconcat version 1.0\nfile 'file:{target}'\n".encode(),
        "m3u8": f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:3.0,\n{target}\n"
                "#EXT-X-ENDLIST\n".encode(),
    }


def test_playlists_are_refused_by_the_service(client, tmp_path):
    secret = tmp_path / "secret.wav"
    soundfile.write(secret, media.tone(3.0, 16_000)[0], 16_000)
    for name, body in _playlists(str(secret)).items():
        response = post(client, body, "list.m3u8")
        assert response.status_code == 415, (name, response.text)


def test_nothing_a_playlist_names_is_opened(tmp_path, monkeypatch):
    """A concat list naming a file beside the process: FFmpeg on its own reads it (the control);
    the decoder refuses, and a FIFO of that name is never opened for reading."""
    monkeypatch.chdir(tmp_path)
    soundfile.write(tmp_path / "real.wav", media.tone(3.0, 16_000)[0], 16_000)
    with av.open(io.BytesIO(_playlists("real.wav")["ffconcat"])) as unguarded:
        assert unguarded.format.name == "concat"
        assert sum(f.samples for f in unguarded.decode(audio=0)) == 48_000
    # The protocol allow-list alone refuses it, even with the concat demuxer allowed.
    with pytest.raises(av.FFmpegError):
        av.open(io.BytesIO(_playlists("real.wav")["ffconcat"]),
                container_options=audio_av.container_options(("concat", "wav")))

    os.mkfifo(tmp_path / "pipe.wav")
    opened = threading.Event()

    def attempt() -> list[int]:
        outcomes = []
        for body in _playlists("pipe.wav").values():
            try:
                audio_av.decode(body, LIMITS)
                outcomes.append(200)
            except ApiError as exc:
                outcomes.append(exc.status)
        return outcomes

    def poll() -> None:
        try:  # succeeds only while a reader has the FIFO open (and then lets it go on)
            os.close(os.open(tmp_path / "pipe.wav", os.O_WRONLY | os.O_NONBLOCK))
            opened.set()
        except OSError as exc:
            assert exc.errno == errno.ENXIO

    decoding = Background(attempt)

    def decoded() -> bool:
        poll()
        return decoding.done()

    eventually(decoded, "the playlists decoded", 60, interval_s=0.01, retry_on=())
    poll()
    outcomes = decoding.result(timeout_s=0)
    assert not opened.is_set()
    assert outcomes == [415, 415, 415]


# -- fuzzing, through the worker processes --------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_pool():
    loop = asyncio.new_event_loop()
    pool = DecodePool(1)
    yield loop, pool
    loop.run_until_complete(pool.close())
    loop.close()


def _fuzz(fuzz_pool, seed: bytes, flips, cut) -> None:
    loop, pool = fuzz_pool
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    data = bytes(data[: max(1, len(data) - cut)])
    before = pool.failures
    try:
        decoded = loop.run_until_complete(pool.decode(data, Limits(30, max_decode_s=2.0)))
    except ApiError as exc:
        assert 400 <= exc.status < 500, exc.body()
    else:
        assert np.isfinite(decoded.waveform).all() and decoded.duration_s <= 30
    assert pool.failures == before, "a decode worker crashed or hung"


_FUZZ = settings(max_examples=120)  # the rest from the profile (tests/conftest.py)
_MUTATIONS = (st.lists(st.tuples(st.integers(0, 40_000), st.integers(0, 255)), max_size=16),
              st.integers(0, 20_000))
_M4A = media.encode(FORMATS["m4a_aac"][0], 1.0)
_WEBM = media.encode(FORMATS["webm_opus"][0], 1.0)


@_FUZZ
@given(*_MUTATIONS)
def test_fuzz_mutated_m4a(fuzz_pool, flips, cut):
    _fuzz(fuzz_pool, _M4A, flips, cut)


@_FUZZ
@given(*_MUTATIONS)
def test_fuzz_mutated_webm(fuzz_pool, flips, cut):
    _fuzz(fuzz_pool, _WEBM, flips, cut)
