"""Property-based tests (Hypothesis) of the HTTP edge's pure parsers: whatever a client sends,
each parser returns a value or raises its one documented error (a ValueError, or an ApiError
with a 4xx status and its code), and what it accepts round-trips. No Ray cluster, no network.
The session's Hypothesis profile (derandomized, no deadline) is set in tests/conftest.py."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import struct

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from serve_app.api import hf
from serve_app.api import kserve_codec as codec
from serve_app.api.upload import FORM_OVERHEAD, is_urlencoded_form, parse_bool
from serve_app.config import ApiKeySpec, RouterSettings
from serve_app.errors import AccessDenied, ApiError
from serve_app.segments.spec import (
    END_TOLERANCE_S,
    MAX_COVERAGE,
    MAX_SPEAKER_CHARS,
    InvalidSegments,
    SegmentSpec,
    Span,
    check_coverage,
    parse_json,
    parse_rttm,
    to_spans,
)
from serve_app.traffic.access import AccessControl
from serve_app.traffic.quota_share import (
    FUTURE_S,
    MAX_TOTAL,
    STALE_S,
    QuotaShare,
    read_note,
)
from serve_app.untrusted import finite_float, load_json, whole_number
from serve_app.wire import MIN_SAMPLES, TARGET_SR

# -- strategies ------------------------------------------------------------------------------
SCALARS = (st.none() | st.booleans() | st.integers()
           | st.floats(allow_nan=False, allow_infinity=False) | st.text())
# JSON-able values that json.dumps writes and json.loads reads back equal (no NaN: NaN != NaN)
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner,
                                                                         max_size=4),
    max_leaves=12)
# What a parsed client document may hold: NaN and Infinity too (Python's json reads them)
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12)
LONE_SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
VISIBLE_ASCII = "".join(chr(c) for c in range(0x21, 0x7F))


def _strings(document):
    """Every string in a document, keys too."""
    stack, found = [document], []
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
    return found


def _assert_api_error(exc: ApiError, status: int | None = None, code: str | None = None):
    assert 400 <= exc.status < 500, (exc.status, exc.code, exc.message)
    if status is not None:
        assert exc.status == status, (exc.status, exc.code, exc.message)
    if code is not None:
        assert exc.code == code, (exc.status, exc.code, exc.message)


@st.composite
def documents_with_a_lone_surrogate(draw):
    """A JSON-able document with one string (a value or a key, at some depth) that holds a
    lone surrogate."""
    bad = draw(st.text(max_size=5)) + draw(LONE_SURROGATES) + draw(st.text(max_size=5))
    base = draw(JSON_VALUES)
    place = draw(st.sampled_from(["top", "list", "value", "key", "deep"]))
    return {"top": bad, "list": [base, bad], "value": {"k": bad, "other": base},
            "key": {bad: base}, "deep": [{"a": [base, {"b": [bad]}]}]}[place]


# -- 1. serve_app/untrusted.py ----------------------------------------------------------------
JSONISH_TEXT = st.text('[]{}":,0123456789.eE-+ \\udc8aINfinityNa\xe9\ud83d', max_size=24)


@given(st.binary() | st.text() | JSONISH_TEXT | JSONISH_TEXT.map(
    lambda text: text.encode("utf-8", "replace")))
def test_load_json_returns_or_raises_value_error(data):
    try:
        document = load_json(data)
    except ValueError:
        return
    for text in _strings(document):
        text.encode("utf-8")


@given(st.sampled_from([(b"[", b"]"), (b"{\"a\":", b"}"), (b"[{\"a\":", b"}]")]),
       st.integers(1, 100) | st.integers(1, 20_000), st.booleans())
def test_load_json_refuses_deep_nesting_with_value_error(brackets, depth, closed):
    opener, closer = brackets
    data = opener * depth + b"0" + (closer * depth if closed else b"")
    try:
        document = load_json(data)
    except ValueError as exc:  # never RecursionError
        assert not closed or "nested too deeply" in str(exc)
        return
    assert closed
    levels = 0
    while isinstance(document, (list, dict)):
        document = document[0] if isinstance(document, list) else document["a"]
        levels += 1
    assert document == 0 and levels == depth * (opener.count(b"[") + opener.count(b"{"))


@given(JSON_VALUES, st.booleans(), st.booleans())
def test_load_json_round_trips_json_dumps(value, ensure_ascii, as_bytes):
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    assert load_json(text.encode("utf-8") if as_bytes else text) == value


@given(documents_with_a_lone_surrogate(), st.booleans())
def test_load_json_refuses_lone_surrogate_escapes(document, as_bytes):
    text = json.dumps(document, ensure_ascii=True)  # the surrogate as a \\udXXX escape
    assert re.search(r"\\u[dD][89a-fA-F]", text)
    with pytest.raises(ValueError, match="surrogate"):
        load_json(text.encode("ascii") if as_bytes else text)


@given(documents_with_a_lone_surrogate())
def test_load_json_refuses_a_lone_surrogate_in_a_text_document(document):
    text = json.dumps(document, ensure_ascii=False)  # the surrogate itself, in the str
    with pytest.raises(ValueError, match="surrogate"):
        load_json(text)


@given(st.text(st.characters(min_codepoint=0x10000), min_size=1, max_size=4), JSON_VALUES)
def test_load_json_accepts_surrogate_pairs(astral, base):
    text = json.dumps([base, astral])  # each astral character as a \\ud8xx\\udcxx pair
    assert load_json(text.encode("ascii")) == [base, astral]


@given(documents_with_a_lone_surrogate(),
       st.sampled_from(["utf-8-surrogatepass", "utf-16", "utf-16-le", "utf-16-be", "utf-32"]))
def test_load_json_refuses_lone_surrogates_in_any_encoding(document, encoding):
    if encoding == "utf-8-surrogatepass":
        data = json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")
    else:
        data = json.dumps(document, ensure_ascii=True).encode(encoding)
    with pytest.raises(ValueError):
        load_json(data)


WHOLE_NUMBER_TEXT = (
    st.text()
    | st.text("0123456789", max_size=22)
    | st.builds(lambda before, digits, after: before + digits + after,
                st.sampled_from(["", " ", "\t", "\n", "\u00a0", "\u3000", "+", "-", "0x"]),
                st.text("0123456789", max_size=22),
                st.sampled_from(["", " ", "\r\n", "\u2003", ".0", "_0", "e3"]))
    | st.text("0123456789²٣\uff11\u07c0 _+-", max_size=6))


@given(WHOLE_NUMBER_TEXT, st.integers(0, 10**20))
def test_whole_number_takes_exactly_ascii_digits_up_to_maximum(text, maximum):
    stripped = text.strip()
    expected = (int(stripped) if re.fullmatch(r"[0-9]{1,18}", stripped, flags=re.ASCII)
                and int(stripped) <= maximum else None)
    try:
        got = whole_number(text, "n", maximum)
    except ValueError as exc:
        assert expected is None, (text, maximum, exc)
        assert "n must be a whole number" in str(exc)
        return
    assert type(got) is int
    assert got == expected
    assert 0 <= got <= maximum


UNICODE_DIGITS = ["²", "٣", "\uff11\uff12", "\u07c0", "৪২", "1²", "³3"]  # all str.isdigit()


@given(st.sampled_from(UNICODE_DIGITS), st.integers(0, 10**18))
def test_whole_number_refuses_unicode_digits(text, maximum):
    assert text.isdigit()  # what str.isdigit() would have let through
    with pytest.raises(ValueError):
        whole_number(text, "n", maximum)


BIG_INTS = st.integers(0, 5000).map(lambda e: 10**e) | st.integers(0, 1100).map(lambda e: -(2**e))


@given(ANY_JSON | st.integers() | BIG_INTS | st.floats())
def test_finite_float_raises_only_value_error(value):
    try:
        number = finite_float(value, "x")
    except ValueError:
        ok = False
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                ok = math.isfinite(float(value))
            except OverflowError:
                pass
        assert not ok, value  # refused only what is not a finite number
        return
    assert not isinstance(value, bool) and isinstance(value, (int, float))
    assert type(number) is float and math.isfinite(number)
    assert number == float(value)


# -- 2. serve_app/segments/spec.py ------------------------------------------------------------
MIN_DURATIONS = st.sampled_from([MIN_SAMPLES / TARGET_SR, 0.1, 0.25, 1.0])


def _specs_ok(specs, max_segments: int, min_duration_s: float) -> None:
    assert isinstance(specs, list) and 1 <= len(specs) <= max_segments
    for spec in specs:
        assert isinstance(spec, SegmentSpec)
        assert math.isfinite(spec.start_s) and 0 <= spec.start_s <= spec.end_s
        assert spec.end_s - spec.start_s >= min_duration_s - 1e-9
        if spec.speaker is not None:
            assert spec.speaker == spec.speaker.strip()
            assert 1 <= len(spec.speaker) <= MAX_SPEAKER_CHARS
            spec.speaker.encode("utf-8")


def _invalid_segments(exc: ApiError) -> None:
    assert isinstance(exc, InvalidSegments)
    _assert_api_error(exc, 422, "invalid_segments")


VALID_ITEM = st.builds(lambda start, length: {"start_s": start, "end_s": start + length},
                       st.floats(0, 100) | st.integers(0, 100), st.floats(1.0, 10.0))
SEGMENT_ITEMS = st.lists(
    VALID_ITEM | VALID_ITEM | VALID_ITEM.map(lambda item: {**item, "speaker": " s "})
    | st.fixed_dictionaries({}, optional={
        "start_s": st.floats() | st.integers() | ANY_JSON,
        "end_s": st.floats() | st.integers() | ANY_JSON,
        "speaker": st.text() | ANY_JSON,
        "other": ANY_JSON}) | ANY_JSON,
    max_size=5)


@given(st.text() | st.builds(json.dumps, SEGMENT_ITEMS | ANY_JSON), st.integers(1, 6),
       MIN_DURATIONS)
def test_parse_json_raises_only_invalid_segments(text, max_segments, min_duration_s):
    try:
        specs = parse_json(text, max_segments, min_duration_s)
    except ApiError as exc:
        _invalid_segments(exc)
        return
    _specs_ok(specs, max_segments, min_duration_s)


SPEAKER_TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1,
                       max_size=MAX_SPEAKER_CHARS).filter(lambda s: s.strip() == s and s)


@st.composite
def valid_segments(draw, min_duration_s: float):
    items = []
    for _ in range(draw(st.integers(1, 8))):
        start = draw(st.floats(0, 1e5) | st.integers(0, 10**5))
        end = start + draw(st.floats(min_duration_s, 1e4))
        item = {"start_s": start, "end_s": end}
        speaker = draw(st.none() | SPEAKER_TEXT.map(lambda s: " " + s)
                       | st.builds(lambda s, pad: pad + s + pad, SPEAKER_TEXT,
                                   st.sampled_from(["", " ", "\t", "\u3000"])))
        if speaker is not None or draw(st.booleans()):
            item["speaker"] = speaker
        items.append(item)
    return items


@given(st.data(), MIN_DURATIONS)
def test_parse_json_returns_valid_segments_in_order(data, min_duration_s):
    items = data.draw(valid_segments(min_duration_s))
    specs = parse_json(json.dumps(items), len(items) + data.draw(st.integers(0, 3)),
                       min_duration_s)
    assert len(specs) == len(items)
    for index, (spec, item) in enumerate(zip(specs, items)):
        assert spec.start_s == float(item["start_s"]) and type(spec.start_s) is float
        assert spec.end_s == float(item["end_s"])
        speaker = item.get("speaker")
        assert spec.speaker == (speaker.strip() if speaker is not None else None)
        assert spec.where == {"index": index}


@given(st.data(), MIN_DURATIONS)
def test_parse_json_refuses_more_than_max_segments(data, min_duration_s):
    items = data.draw(valid_segments(min_duration_s))
    assume(len(items) >= 2)
    max_segments = data.draw(st.integers(1, len(items) - 1))
    with pytest.raises(InvalidSegments) as caught:
        parse_json(json.dumps(items), max_segments, min_duration_s)
    _invalid_segments(caught.value)
    assert caught.value.details == {"index": max_segments}
    assert "max_segments" in caught.value.message


RTTM_LINES = st.sampled_from(["SPEAKER f 1 0.5 2 <NA> <NA> spk <NA> <NA>", ";;", "",
                              "SPEAKER f 1 3 1 x x b", "SPEAKER f 1 3 1 x x b\x85c"])
RTTM_TEXT = st.text() | st.lists(
    RTTM_LINES | RTTM_LINES
    | st.lists(st.sampled_from(["SPEAKER", "f", "g", "1", "0.5", "nan", "inf", "-1", "1e308",
                                "<NA>", "spk", "\x00", "a" * 70]) | st.text(max_size=6),
               max_size=11).map(" ".join),
    max_size=6).map("\n".join)


@given(RTTM_TEXT, st.integers(1, 6), MIN_DURATIONS)
def test_parse_rttm_raises_only_invalid_segments(text, max_segments, min_duration_s):
    try:
        specs = parse_rttm(text, max_segments, min_duration_s)
    except ApiError as exc:
        _invalid_segments(exc)
        return
    _specs_ok(specs, max_segments, min_duration_s)
    for spec in specs:
        assert set(spec.where) == {"line"}


RTTM_TOKEN = st.text(st.characters(blacklist_categories=("Cc", "Cs"))
                     .filter(lambda c: not c.isspace()), min_size=1, max_size=MAX_SPEAKER_CHARS)
RTTM_OTHER_LINES = st.sampled_from(["", ";; a comment", "SPKR-INFO f 1 <NA> <NA> <NA> unknown a",
                                    "   ", "LEXEME f 1 0.5 0.2 hi word a <NA> <NA>"])


@st.composite
def rttm_files(draw, min_duration_s: float):
    """(text, file id, [(line number, start text, duration text, speaker)])."""
    file_id = draw(RTTM_TOKEN)
    lines, turns = [], []
    min_ms = math.ceil(min_duration_s * 1000)
    for _ in range(draw(st.integers(1, 6))):
        lines.extend(draw(st.lists(RTTM_OTHER_LINES, max_size=2)))
        start = f"{draw(st.integers(0, 10**7)) / 1000:.3f}"
        duration = f"{draw(st.integers(min_ms, 10**6)) / 1000:.3f}"
        speaker = draw(RTTM_TOKEN)
        lines.append(f"SPEAKER {file_id} 1 {start} {duration} <NA> <NA> {speaker} <NA> <NA>")
        turns.append((len(lines), start, duration, speaker))
    return "\n".join(lines) + draw(st.sampled_from(["", "\n", "\r\n"])), file_id, turns


@given(st.data(), MIN_DURATIONS)
def test_parse_rttm_round_trips_speaker_lines(data, min_duration_s):
    text, _, turns = data.draw(rttm_files(min_duration_s))
    specs = parse_rttm(text, len(turns), min_duration_s)
    assert len(specs) == len(turns)
    for spec, (line, start, duration, speaker) in zip(specs, turns):
        assert spec.start_s == float(start)
        assert spec.end_s == round(float(start) + float(duration), 6)
        assert spec.speaker == speaker
        assert spec.where == {"line": line}


@given(st.data(), MIN_DURATIONS)
def test_parse_rttm_refuses_a_second_file_id(data, min_duration_s):
    text, file_id, turns = data.draw(rttm_files(min_duration_s))
    other = data.draw(RTTM_TOKEN.filter(lambda t: t != file_id))
    lines = text.splitlines()
    at = data.draw(st.integers(turns[0][0], len(lines)))  # after the first SPEAKER line
    lines.insert(at, f"SPEAKER {other} 1 0.000 5.000 <NA> <NA> spk <NA> <NA>")
    with pytest.raises(InvalidSegments) as caught:
        parse_rttm("\n".join(lines), len(turns) + 1, min_duration_s)
    _invalid_segments(caught.value)
    assert caught.value.details == {"line": at + 1}
    assert repr(other[:64]) in caught.value.message


@st.composite
def given_specs(draw, min_duration_s: float, samples: int):
    duration_s = samples / TARGET_SR
    specs = []
    for index in range(draw(st.integers(1, 4))):
        start = draw(st.floats(0, duration_s / 2) | st.floats(0, duration_s + 2 * END_TOLERANCE_S))
        end = start + draw(st.floats(min_duration_s, min_duration_s + 1.0)
                           | st.floats(min_duration_s, duration_s + 1.0))
        speaker = draw(st.just("ch0") | st.sampled_from(["ch0", "ch1", "ch2", "agent"])
                       | st.none())
        specs.append(SegmentSpec(start, end, speaker, {"index": index}))
    return specs


@given(st.data(), MIN_DURATIONS, st.integers(MIN_SAMPLES, 30 * TARGET_SR),
       st.floats(1.0, 60.0), st.none() | st.integers(1, 3))
def test_to_spans_stay_within_the_audio(data, min_duration_s, samples, max_duration_s,
                                        channels):
    specs = data.draw(given_specs(min_duration_s, samples))
    try:
        spans = to_spans(specs, samples, min_duration_s, max_duration_s, channels)
    except ApiError as exc:
        _invalid_segments(exc)
        assert set(exc.details) == {"index"}
        return
    assert not any(spec.end_s > samples / TARGET_SR + END_TOLERANCE_S for spec in specs)
    assert len(spans) == len(specs)
    assert spans == sorted(spans, key=lambda span: (span.start_s, span.end_s))
    for span in spans:
        assert 0 <= span.start < span.end <= samples
        assert span.end - span.start >= round(min_duration_s * TARGET_SR)
        assert span.end - span.start <= max_duration_s * TARGET_SR
        assert span.end_s <= round(samples / TARGET_SR, 6)
        if channels is not None:
            assert 0 <= span.channel < channels and span.speaker == f"ch{span.channel}"


@st.composite
def spans_of(draw, samples: int):
    spans = []
    for _ in range(draw(st.integers(0, 12))):
        start = draw(st.integers(0, samples // 4) | st.integers(0, samples - 1))
        end = draw(st.integers(start + 1, samples))
        spans.append(Span(start, end, start / TARGET_SR, end / TARGET_SR))
    return spans


@given(st.data(), st.integers(1, 4000), st.integers(1, 4))
def test_check_coverage_refuses_exactly_past_max_coverage(data, samples, channels):
    spans = data.draw(spans_of(samples))
    covered = sum(span.end - span.start for span in spans)
    try:
        check_coverage(spans, samples, channels)
    except ApiError as exc:
        _invalid_segments(exc)
        assert covered > MAX_COVERAGE * samples * channels
        return
    assert covered <= MAX_COVERAGE * samples * channels


# -- 3. serve_app/api/kserve_codec.py ---------------------------------------------------------
HEADER_LENGTHS = st.none() | st.text(max_size=8) | st.integers(-2, 80).map(str)


@given(st.binary(max_size=200), HEADER_LENGTHS)
def test_parse_infer_request_raises_only_4xx_on_bytes(body, header_length):
    try:
        codec.parse_infer_request(body, header_length)
    except ApiError as exc:
        _assert_api_error(exc, 400)


HASHABLE_JSON = (st.sampled_from(list(codec.OUTPUTS)) | st.none() | st.booleans()
                 | st.integers() | st.floats() | st.text())
TENSOR_SPECS = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["audio", "waveform", "x"]) | ANY_JSON,
    "datatype": st.sampled_from(["FP32", "BYTES", "INT8"]) | ANY_JSON,
    "shape": st.lists(st.integers(-1, 4), max_size=3) | ANY_JSON,
    "data": st.lists(st.floats() | st.integers() | st.text(max_size=4)
                     | st.lists(st.floats(), max_size=3), max_size=6) | ANY_JSON,
    "parameters": st.fixed_dictionaries({}, optional={
        "binary_data_size": st.integers(-1, 40) | ANY_JSON,
        "shared_memory_region": st.text(max_size=3)}) | ANY_JSON,
}) | ANY_JSON
INFER_DOCUMENTS = st.fixed_dictionaries({}, optional={
    "inputs": st.lists(TENSOR_SPECS, max_size=3) | ANY_JSON,
    "outputs": st.lists(st.fixed_dictionaries({}, optional={
        "name": HASHABLE_JSON,
        "parameters": st.fixed_dictionaries({}, optional={
            "binary_data": ANY_JSON, "classification": ANY_JSON}) | ANY_JSON}) | SCALARS,
        max_size=3) | SCALARS,
    "parameters": st.dictionaries(st.sampled_from(list(codec.PARAMETERS)) | st.text(max_size=3),
                                  ANY_JSON, max_size=3) | ANY_JSON,
    "id": ANY_JSON,
})


@given(INFER_DOCUMENTS, st.binary(max_size=48), st.booleans())
def test_parse_infer_request_raises_only_4xx_on_documents(document, tail, binary):
    header = json.dumps(document).encode()
    try:
        if binary:
            codec.parse_infer_request(header + tail, str(len(header)))
        else:
            codec.parse_infer_request(header, None)
    except ApiError as exc:
        _assert_api_error(exc, 400)


@given(st.lists(ANY_JSON, max_size=3) | st.dictionaries(st.text(), ANY_JSON, max_size=3))
def test_parse_infer_request_refuses_any_output_name(name):
    body = json.dumps({"inputs": [], "outputs": [{"name": name}]}).encode()
    with pytest.raises(ApiError) as caught:
        codec.parse_infer_request(body, None)
    _assert_api_error(caught.value, 400, "unknown_output")


@given(st.text(max_size=4), LONE_SURROGATES,
       st.sampled_from(["utf-8-surrogatepass", "utf-16", "utf-32"]))
def test_parse_infer_request_refuses_lone_surrogates(text, surrogate, encoding):
    document = {"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1],
                            "data": [text + surrogate]}]}
    if encoding == "utf-8-surrogatepass":
        body = json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")
    else:
        body = json.dumps(document).encode(encoding)
    with pytest.raises(ApiError) as caught:
        codec.parse_infer_request(body, None)
    _assert_api_error(caught.value, 400, "malformed_json")


@given(st.lists(st.binary(max_size=20), max_size=8))
def test_split_bytes_inverts_join_bytes(elements):
    assert codec.split_bytes(codec.join_bytes(elements), len(elements), "x") == elements


@given(st.lists(st.binary(max_size=20), min_size=1, max_size=6), st.integers(1, 3))
def test_split_bytes_refuses_truncated_data(elements, cut):
    raw = codec.join_bytes(elements)
    assume(cut <= len(raw))
    with pytest.raises(ApiError) as caught:
        codec.split_bytes(raw[:-cut], len(elements), "x")
    _assert_api_error(caught.value, 400, "invalid_tensor")


FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@given(st.lists(FLOAT32, max_size=64), st.sampled_from(["flat", "row", "row-nested"]))
def test_json_fp32_tensor_round_trips(values, layout):
    shape = [len(values)] if layout == "flat" else [1, len(values)]
    data = [values] if layout == "row-nested" else values
    body = json.dumps({"inputs": [{"name": "waveform", "datatype": "FP32", "shape": shape,
                                   "data": data}]}).encode()
    tensor = codec.parse_infer_request(body, None).inputs["waveform"]
    assert tensor.shape == shape and not tensor.binary
    assert tensor.data.dtype == np.float32
    np.testing.assert_array_equal(tensor.data, np.asarray(values, dtype=np.float32))
    assert codec.model_input(codec.parse_infer_request(body, None), 10).waveform.size == len(
        values)


@given(st.lists(FLOAT32, max_size=64))
def test_binary_fp32_tensor_round_trips(values):
    raw = np.asarray(values, dtype="<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "waveform", "datatype": "FP32",
                                     "shape": [1, len(values)],
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    tensor = codec.parse_infer_request(header + raw, str(len(header))).inputs["waveform"]
    assert tensor.binary
    np.testing.assert_array_equal(tensor.data, np.asarray(values, dtype=np.float32))


DIMS = st.integers(0, 4) | st.integers(0, 2**63) | st.sampled_from(
    [codec.MAX_ELEMENTS, codec.MAX_ELEMENTS + 1, 2**13, 2**14, 2**26, 2**63])


@given(st.lists(DIMS, max_size=12))
def test_tensor_shapes_are_bounded(shape):
    prefix, too_large = 1, False
    for dim in shape:  # a dimension or a running product past the bound, in order
        prefix *= dim
        too_large = too_large or dim > codec.MAX_ELEMENTS or prefix > codec.MAX_ELEMENTS
    refused = len(shape) > codec.MAX_DIMS or too_large
    count = math.prod(shape)
    assert refused or count <= codec.MAX_ELEMENTS  # a product past the bound is never taken
    data = [0.0] * count if not refused and count <= 4096 else []
    body = json.dumps({"inputs": [{"name": "waveform", "datatype": "FP32", "shape": shape,
                                   "data": data}]}).encode()
    try:
        request = codec.parse_infer_request(body, None)
    except ApiError as exc:
        _assert_api_error(exc, 400, "invalid_tensor")
        assert refused or len(data) != count, (shape, exc.message)
        if not refused:
            assert f"0 values for shape {shape}" in exc.message
        return
    assert not refused and request.inputs["waveform"].shape == shape


# -- 4. serve_app/traffic/quota_share.py ------------------------------------------------------
NOW = st.floats(0, 4e9) | st.integers(0, 4 * 10**9)


def _note_ok(note, now: float, at) -> None:
    assert note is not None
    spent, levels = note
    assert -FUTURE_S <= now - at <= STALE_S
    for amounts, low in ((spent, 0.0), (levels, -MAX_TOTAL)):
        for slot, amount in amounts.items():
            assert "/" in slot
            assert type(amount) is float and math.isfinite(amount)
            assert low <= amount <= MAX_TOTAL


@given(st.binary(max_size=200), NOW)
def test_read_note_of_bytes_is_none_or_a_valid_note(raw, now):
    note = read_note(raw, now)
    if note is not None:
        _note_ok(note, now, json.loads(raw)["at"])


AMOUNTS = (st.floats(0, 1e6) | st.floats(-1e6, 1e6) | st.integers(0, 10**6) | st.floats()
           | st.integers(-10**13, 10**13) | SCALARS
           | st.sampled_from([MAX_TOTAL, -MAX_TOTAL, MAX_TOTAL * 1.0001, 10**12, 10**12 + 1,
                              10**400, True]))
SLOTS = st.sampled_from(["k/requests", "k.v-2/audio_seconds", "a/b/c", "k"]) | st.text(max_size=6)


@st.composite
def notes(draw, now):
    """A note-shaped document; `at` near `now` more often than not."""
    at = draw(st.floats(-200, 200).map(lambda d: now - d)
              | st.integers(-200, 200).map(lambda d: now - d)
              | st.sampled_from([now - STALE_S, now + FUTURE_S, now - STALE_S - 1e-3])
              | st.floats(allow_nan=True) | SCALARS)
    fields = {"at": at,
              "spent": st.dictionaries(SLOTS, AMOUNTS, max_size=3) | ANY_JSON,
              "levels": st.dictionaries(SLOTS, AMOUNTS, max_size=3) | ANY_JSON}
    keep = draw(st.just(set(fields)) | st.sets(st.sampled_from(sorted(fields)), min_size=2))
    return {name: (value if name == "at" else draw(value))
            for name, value in fields.items() if name in keep}


def _note_expected(document, now) -> bool:
    """An independent reading of what read_note accepts."""
    at = document.get("at")
    if isinstance(at, bool) or not isinstance(at, (int, float)):
        return False
    if isinstance(at, float) and not math.isfinite(at):
        return False
    if abs(at) > 1e300 or not -FUTURE_S <= now - at <= STALE_S:
        return False
    for name, low in (("spent", 0), ("levels", -MAX_TOTAL)):
        amounts = document.get(name)
        if not isinstance(amounts, dict):
            return False
        for slot, amount in amounts.items():
            if "/" not in slot or isinstance(amount, bool) or not isinstance(amount,
                                                                               (int, float)):
                return False
            if not (low <= amount <= MAX_TOTAL):  # NaN: False; big ints compare exactly
                return False
    return True


@given(st.data(), NOW)
def test_read_note_of_documents_believes_exactly_a_valid_note(data, now):
    document = data.draw(notes(now))
    raw = json.dumps(document).encode()
    note = read_note(raw, now)
    assert (note is not None) == _note_expected(document, now), (document, note)
    if note is not None:
        _note_ok(note, now, document["at"])
        assert note == ({k: float(v) for k, v in document["spent"].items()},
                        {k: float(v) for k, v in document["levels"].items()})


@given(st.integers(1024, 4000).map(lambda e: 2**e) | st.integers(309, 4000).map(
    lambda e: -(10**e)), NOW)
def test_read_note_drops_a_huge_integer_time(at, now):
    raw = json.dumps({"at": at, "spent": {}, "levels": {}}).encode()
    assert read_note(raw, now) is None


KEY_IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,15}", fullmatch=True).filter(
    lambda k: k not in ("anonymous", "invalid"))


@st.composite
def gates(draw):
    """A real AccessControl with keys and quotas, after a run of requests, charges, debits
    and lowered levels on a clock of the test's; the clock."""
    clock = [float(draw(st.integers(0, 4 * 10**9)))]
    ids = draw(st.lists(KEY_IDS, min_size=1, max_size=3, unique=True))
    keys = {key_id: f"secret-{index}" for index, key_id in enumerate(ids)}
    specs = {key_id: ApiKeySpec(
        sha256=hashlib.sha256(secret.encode()).hexdigest(),
        requests_per_minute=draw(st.none() | st.integers(1, 10**6)),
        audio_seconds_per_minute=draw(st.none() | st.floats(0.1, 1e6)))
        for key_id, secret in keys.items()}
    access = AccessControl(clock=lambda: clock[0])
    access.configure(RouterSettings(api_keys=specs,
                                    quota_window_s=draw(st.floats(1.0, 3600.0))))
    for _ in range(draw(st.integers(0, 12))):
        key_id = draw(st.sampled_from(ids))
        action = draw(st.sampled_from(["admit", "charge", "debit", "lower", "wait"]))
        if action == "admit":
            try:
                access.admit({"Authorization": f"Bearer {keys[key_id]}"})
            except AccessDenied as exc:
                assert exc.status == 429
        elif action == "charge":
            access.charge_audio(key_id, draw(st.floats(0, 3600)))
        elif action == "debit":
            access.debit(key_id, draw(st.sampled_from(["requests", "audio_seconds"])),
                         draw(st.floats(0, 1e6)))
        elif action == "lower":
            access.lower_to(key_id, draw(st.sampled_from(["requests", "audio_seconds"])),
                            draw(st.floats(-1e7, 1e7)))
        else:
            clock[0] += draw(st.floats(0, 600))
    return access, clock


@given(gates())
def test_a_real_note_is_always_believed_at_once(gate):
    access, clock = gate
    share = QuotaShare(access, clock=lambda: clock[0])
    note = read_note(share.note(), clock[0])
    _note_ok(note, clock[0], clock[0])
    spent, levels = note
    assert spent == {f"{key}/{resource}": total for (key, resource), total in
                     access.spent.items()}
    assert levels == {f"{key}/{resource}": level for (key, resource), level in
                      access.levels().items()}


# -- 5. serve_app/api/upload.py ---------------------------------------------------------------
FIELD_NAMES = st.lists(st.from_regex(r"[a-z_]{1,16}", fullmatch=True), min_size=1, max_size=5,
                       unique=True).map(tuple)


@given(st.binary(min_size=4, max_size=4), st.binary(max_size=200), FIELD_NAMES)
def test_a_riff_wave_body_is_never_a_form(size, rest, fields):
    assert not is_urlencoded_form(b"RIFF" + size + b"WAVE" + rest, fields)


@given(st.integers(0, 2**32 - 1), st.integers(1, 2), st.integers(8000, 48000), FIELD_NAMES)
def test_a_wav_header_is_never_a_form(size, channels, rate, fields):
    header = (b"RIFF" + struct.pack("<I", size) + b"WAVEfmt "
              + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * 2 * channels,
                            2 * channels, 16) + b"data")
    assert not is_urlencoded_form(header, fields)


FORM_VALUES = st.text(VISIBLE_ASCII.replace("&", ""), max_size=20)


@st.composite
def forms(draw, fields):
    pairs = draw(st.lists(st.tuples(st.sampled_from(fields), FORM_VALUES), min_size=1,
                          max_size=6))
    return "&".join(f"{name}={value}" for name, value in pairs).encode("ascii")


@given(st.data(), FIELD_NAMES)
def test_a_form_of_the_fields_is_a_form(data, fields):
    assert is_urlencoded_form(data.draw(forms(fields)), fields)


@given(st.data(), FIELD_NAMES,
       st.integers(0, 255).filter(lambda b: not 0x21 <= b <= 0x7E).map(lambda b: bytes([b])))
def test_a_body_with_an_invisible_byte_is_never_a_form(data, fields, bad):
    form = data.draw(forms(fields))
    at = data.draw(st.integers(0, len(form)))
    assert not is_urlencoded_form(form[:at] + bad + form[at:], fields)


@given(st.data(), FIELD_NAMES)
def test_a_form_with_another_field_is_not_a_form(data, fields):
    form = data.draw(forms(fields))
    other = data.draw(st.from_regex(r"[A-Za-z_]{1,16}", fullmatch=True).filter(
        lambda name: name not in fields))
    value = data.draw(FORM_VALUES)
    pieces = [form, f"{other}={value}".encode()]
    if data.draw(st.booleans()):
        pieces.reverse()
    assert not is_urlencoded_form(b"&".join(pieces), fields)


def test_a_form_past_the_overhead_is_not_a_form():
    assert is_urlencoded_form(b"labels=" + b"a" * (FORM_OVERHEAD - 7), ("labels",))
    assert not is_urlencoded_form(b"labels=" + b"a" * (FORM_OVERHEAD - 6), ("labels",))


TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


@st.composite
def spelled(draw, words):
    word = draw(st.sampled_from(words))
    cased = "".join(c.upper() if draw(st.booleans()) else c for c in word)
    pad = st.sampled_from(["", " ", "\t", "\n ", "\u00a0", "\u3000"])
    return draw(pad) + cased + draw(pad)


@given(st.none() | spelled(TRUE_WORDS) | spelled(FALSE_WORDS)
       | st.text(max_size=8) | st.text("truefalsyonf01 TRUEFALSYON", max_size=6))
def test_parse_bool_takes_exactly_the_documented_spellings(value):
    word = "" if value is None else value.strip()
    expected = (True if word.lower() in TRUE_WORDS and word.isascii()
                else False if word.lower() in FALSE_WORDS and word.isascii() else None)
    try:
        got = parse_bool("flag", value)
    except ApiError as exc:
        assert expected is None, (value, exc.message)
        _assert_api_error(exc, 422, "invalid_parameter")
        return
    assert got is expected, value


# -- 6. serve_app/api/hf.py -------------------------------------------------------------------
HF_PARAMETER_VALUES = (st.integers(-2, 1002) | st.text(max_size=6)
                       | st.sampled_from(["softmax", "sigmoid", "none", "5", " 3 ", "²"])
                       | st.lists(st.text(max_size=8), max_size=3) | ANY_JSON)
HF_VALID_BODIES = st.fixed_dictionaries(
    {"inputs": st.binary(min_size=1, max_size=12).map(lambda b: base64.b64encode(b).decode())},
    optional={"parameters": st.fixed_dictionaries({}, optional={
        "top_k": st.integers(0, 1001) | st.just("4"),
        "function_to_apply": st.sampled_from([*hf.FUNCTIONS, "relu"]),
        "labels": st.sampled_from(["angry,happy", "", "a" * 1025, ["sad", " 开心/happy "]])})})
HF_BODIES = HF_VALID_BODIES | HF_VALID_BODIES | st.fixed_dictionaries({}, optional={
    "inputs": st.sampled_from(["UklGRg==", "data:audio/wav;base64,UklGRg==", "", "@@", "٣"])
    | st.text(max_size=12) | ANY_JSON,
    "parameters": st.dictionaries(st.sampled_from(list(hf.PARAMETERS)) | st.text(max_size=3),
                                  HF_PARAMETER_VALUES, max_size=3) | ANY_JSON,
    "extra": ANY_JSON,
}) | ANY_JSON
HF_QUERIES = st.dictionaries(st.sampled_from(list(hf.PARAMETERS))
                             | st.sampled_from(list(hf.PARAMETERS)) | st.text(max_size=4),
                             st.text(max_size=10) | st.sampled_from(["3", "sigmoid", "a,b"]),
                             max_size=3)


@given(HF_BODIES.map(lambda d: json.dumps(d).encode()) | st.binary(max_size=64), HF_QUERIES,
       st.integers(0, 16) | st.just(1000))
def test_hf_parse_request_raises_only_4xx(body, query, max_upload_bytes):
    try:
        request = hf.parse_request(body, "application/json", query, max_upload_bytes)
    except ApiError as exc:
        _assert_api_error(exc)
        return
    assert isinstance(request, hf.HfRequest)
    assert len(request.audio) <= max_upload_bytes
    assert request.function_to_apply in hf.FUNCTIONS
    assert request.top_k is None or 1 <= request.top_k <= hf.MAX_TOP_K

