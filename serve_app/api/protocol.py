"""The HTTP protocol, declared: a pydantic model for every request's fields and every answer
of every route, from which the OpenAPI description is generated (serve_app/api/app.py); the
routes build their answers through these models, so what is served is what is declared.
No Ray, no torch.

Answers are open where the service adds facts over time (a variant's info, the model's
description): their declared fields are checked, more may come. KServe v2's are in
protocol_v2.py.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from serve_app.wire import Granularity

Scores = dict[str, float]  # by English label name, in the head's order


class Closed(BaseModel):
    """Every field declared: anything else is refused."""

    model_config = ConfigDict(extra="forbid")


class Open(BaseModel):
    """Its declared fields checked; more may come."""

    model_config = ConfigDict(extra="allow")


# -- errors -----------------------------------------------------------------------------------
class ErrorDetail(Open):
    code: str = Field(description="stable: what failed (docs/api.md#errors)")
    message: str


class ErrorBody(Closed):
    error: ErrorDetail


# -- request fields (a multipart form, or query parameters beside a raw body) -----------------
class PredictFields(Closed):
    model_version: str | None = Field(None, description="a variant (base, large, turbo) or an "
                                      "alias (see GET /v1/models); default: the router's "
                                      "default_version")
    granularity: Granularity = Field(Granularity.UTTERANCE, description="utterance: one "
                                     "embedding; frame: one per 20 ms frame, and an emotion "
                                     "timeline")
    extract_embedding: bool = Field(False, description="include the embedding")
    labels: str | None = Field(None, description="a label set: comma-separated label names "
                               "(e.g. angry,happy,neutral,sad); the softmax over them alone, "
                               "the other logits masked. Default: every label")
    head: str | None = Field(None, description="a custom head (GET /v1/heads): NAME, NAME@REV "
                             "or a head alias; its labels replace the nine. Default: the "
                             "checkpoint's own head")


class SegmentsFields(Closed):
    model_version: str | None = Field(None, description="a variant or an alias, as for "
                                      "POST /v1/predict; default: the router's default_version")
    extract_embedding: bool = Field(False, description="each segment carries its utterance "
                                    "embedding")
    labels: str | None = PredictFields.model_fields["labels"]
    head: str | None = PredictFields.model_fields["head"]
    channels: Literal["mix", "split"] = Field("mix", description="split: score each channel "
                                              "of a multi-channel call on its own (speakers "
                                              "ch0, ch1, ...); mix: channels averaged, as "
                                              "predict")
    segments: str | None = Field(None, description='JSON [{"start_s", "end_s", "speaker"}, '
                                 "...] (speaker optional); without segments or rttm, VAD finds "
                                 "the speech")


# -- answers ----------------------------------------------------------------------------------
class AudioInfo(Closed):
    duration_s: float
    sample_rate: int
    channels: int
    format: str


class ModelInfo(Open):
    """Which model answered (local paths cut to their last part)."""

    variant: str
    source: str | None = None
    weights: str | None = Field(None, description="random: generated weights, predictions "
                                "mean nothing")
    dtype: str | None = None
    device: str | None = None


class Emotion(Closed):
    emotion: str
    confidence: float
    scores: Scores


class LabelledEmotion(Emotion):
    label: str = Field(description="the head's own label (e.g. 开心/happy)")


class TimelineWindow(Emotion):
    start_s: float
    end_s: float


class PredictTimings(Closed):
    decode: float
    queue_and_inference: float
    inference: float
    total: float


class HeadUsed(Closed):
    """The custom head that scored an answer (one revision, exactly: its sha256)."""

    name: str
    revision: int
    sha256: str


class PredictionBody(LabelledEmotion):
    request_id: str
    model_version: str
    routed_by: str | None = Field(description="the weighted alias that chose the variant")
    head: HeadUsed | None = Field(None, description="the custom head that scored it; null: "
                                  "the checkpoint's own head")
    granularity: Granularity
    audio: AudioInfo
    model: ModelInfo
    timeline: list[TimelineWindow] | None = None
    embedding: list[float] | list[list[float]] | None = None


class Prediction(PredictionBody):
    """POST /v1/predict's answer."""

    timings_ms: PredictTimings


class SegmentRow(LabelledEmotion):
    index: int
    start_s: float
    end_s: float
    speaker: str | None
    channel: int | None = None
    embedding: list[float] | None = None


class SpeakerSummary(Emotion):
    segments: int
    speech_s: float


class SegmentTimings(Closed):
    decode: float
    vad: float
    queue_and_inference: float
    total: float


class SegmentsSummary(Closed):
    request_id: str
    model_version: str
    routed_by: str | None
    head: HeadUsed | None = None
    audio: AudioInfo
    model: ModelInfo
    segmentation: Literal["vad", "given"]
    speakers: dict[str, SpeakerSummary]
    timings_ms: SegmentTimings


class SegmentsAnswer(SegmentsSummary):
    segments: list[SegmentRow]


class SegmentLine(SegmentRow):
    """NDJSON: one line per segment as it finishes."""

    type: Literal["segment"] = "segment"


class SummaryLine(SegmentsSummary):
    """NDJSON: the last line, once every segment is scored."""

    type: Literal["summary"] = "summary"
    segments: int


class ErrorLine(ErrorBody):
    """NDJSON: an error after the 200 (the line stream ends with it)."""

    type: Literal["error"] = "error"


# -- WS /v1/stream: the events a stream sends (JSON text messages) ----------------------------
class StreamLimits(Closed):
    max_stream_s: float
    max_session_s: float
    idle_timeout_s: float
    max_message_bytes: int


class StreamReady(Closed):
    type: Literal["ready"]
    request_id: str
    model_version: str
    routed_by: str | None
    head: HeadUsed | None = None
    sample_rate: int
    encoding: str
    segments: bool | None = None
    vad: bool | None = None
    window_s: float
    hop_s: float
    limits: StreamLimits


class StreamWindow(TimelineWindow):
    type: Literal["window"]
    speech: Literal[True] | None = Field(None, description="vad=true only: the VAD found "
                                         "speech in this window")
    skipped: int = Field(description="windows skipped before this one (the variant was busy)")


class StreamSilentWindow(Closed):
    """vad=true: a window in which the VAD found no speech, not scored."""

    type: Literal["window"]
    start_s: float
    end_s: float
    speech: Literal[False]
    skipped: int = Field(description="windows skipped before this one (the variant was busy)")


def _window_kind(event) -> str:
    speech = event.get("speech") if isinstance(event, dict) else getattr(event, "speech", None)
    return "silent" if speech is False else "scored"


# A window event is scored, or (vad=true) silent: told apart by its `speech`.
StreamWindowEvent = Annotated[Annotated[StreamWindow, Tag("scored")]
                              | Annotated[StreamSilentWindow, Tag("silent")],
                              Discriminator(_window_kind)]


class StreamUtterance(TimelineWindow):
    type: Literal["utterance"]
    index: int


class StreamResult(PredictionBody):
    type: Literal["result"]
    windows: int
    skipped: int
    utterances: int | None = None
    silent: int | None = Field(None, description="vad=true only: window events without speech "
                               "(counted in windows too)")


class StreamErrorEvent(ErrorBody):
    type: Literal["error"]


StreamEvent = Annotated[StreamReady | StreamWindowEvent | StreamUtterance | StreamResult
                        | StreamErrorEvent, Field(discriminator="type")]


class VariantInfo(Open):
    variant: str
    state: str = Field(description="ready, swapping, loading, unloading, unloaded, failed, "
                       "scaled_to_zero, waiting_for_config")
    error: str | None = None


class HeadsScheme(Closed):
    """How a request names a custom head (docs/heads.md)."""

    parameter: str
    model_name: str
    aliases: dict[str, str | dict[str, float]]
    list: str


class ModelsAnswer(Closed):
    default_version: str
    aliases: dict[str, str | dict[str, float]]
    variants: dict[str, VariantInfo]
    heads: HeadsScheme | None = None


class RolloutsAnswer(Closed):
    routes: dict[str, dict[str, float]] = Field(description="each alias's share of requests "
                                                "per variant")
    shadow: dict[str, dict] = Field(description="primary -> its shadow comparisons")


class HealthAnswer(Closed):
    status: Literal["ok"]
    variants: dict[str, str]
    replay_middleware: bool = Field(description="whether the proxy replays requests lost "
                                    "with a Router replica (docs/high-availability.md)")


class ReadyAnswer(Closed):
    ready: bool
    variants: dict[str, str]


class HfLabel(Closed):
    label: str
    score: float


class HfParameters(Closed):
    top_k: int | None = Field(None, ge=1, description="how many labels, highest first; "
                              "default: every label of the set")
    function_to_apply: Literal["softmax", "sigmoid", "none"] = Field(
        "softmax", description="softmax: predict's scores; sigmoid or none: over the head's "
        "raw logits")
    labels: str | None = PredictFields.model_fields["labels"]


class HfRequest(Closed):
    """Hugging Face's audio-classification JSON body (or send the audio as the raw body)."""

    inputs: str = Field(description="the audio file's base64 (a data: URL too)")
    parameters: HfParameters | None = None


def schema_of(model: type[BaseModel]) -> dict:
    """A model's JSON schema with its definitions inlined: an `openapi_extra` cannot carry
    `$defs` (a `#/$defs/...` reference resolves against the whole OpenAPI document)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, list):
            return [inline(item) for item in node]
        if not isinstance(node, dict):
            return node
        fields = {key: inline(value) for key, value in node.items() if key != "$ref"}
        if "$ref" in node:
            return {**inline(definitions[node["$ref"].rsplit("/", 1)[-1]]), **fields}
        return fields

    return inline(schema)


def json_or_raw_body(model: type[BaseModel], raw: str) -> dict:
    """An `openapi_extra` request body: `model` as JSON, or the audio as the raw body."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema_of(model)},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                "description": raw}}}}}


def errors(*statuses: int) -> dict:
    """The `responses` of a route: these statuses answer the one error shape."""
    return {status: {"model": ErrorBody} for status in statuses}
