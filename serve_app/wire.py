"""What travels between the deployments: the router sends a variant an InferenceRequest (a
16 kHz mono float32 waveform and the options), the variant answers a VariantAnswer. Plain
dataclasses that Ray pickles as they are; no Ray and no torch here, so that the ingress, the
variant and the tools all read the same types.

The answer grows by adding fields with defaults at the end (a client of an older router
ignores what it does not read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from serve_app.errors import InvalidInput

if TYPE_CHECKING:  # numpy is imported where it is used: the CLI reads Granularity, quickly
    import numpy as np

TARGET_SR = 16_000  # what the model takes: every decoder and the stream resample to it
MIN_SAMPLES = 400   # the conv stem fails below 25 ms at TARGET_SR


class Granularity(StrEnum):
    UTTERANCE = "utterance"  # one embedding for the clip
    FRAME = "frame"          # one embedding per 20 ms frame, and an emotion timeline


@dataclass(frozen=True)
class InferenceOptions:
    granularity: Granularity = Granularity.UTTERANCE
    extract_embedding: bool = False
    # A label set (serve_app/labels.py: parsed English names); None: every label. The variant
    # refuses an unknown name (UnknownLabel) before any work.
    labels: tuple[str, ...] | None = None
    # A custom head (its labels replace the nine); None: the checkpoint's own head.
    head: HeadRef | None = None


@dataclass(frozen=True)
class InferenceRequest:
    waveform: np.ndarray  # float32, mono, TARGET_SR
    options: InferenceOptions = field(default_factory=InferenceOptions)


def check_waveform(waveform: object, max_audio_s: float) -> None:
    """InvalidInput unless `waveform` is what a variant can run: 1-D float32 at TARGET_SR,
    at least MIN_SAMPLES, at most max_audio_s, all finite."""
    import numpy as np

    if not isinstance(waveform, np.ndarray) or waveform.dtype != np.float32 \
            or waveform.ndim != 1:
        raise InvalidInput("expected a 1-D float32 numpy array at 16 kHz")
    if len(waveform) < MIN_SAMPLES:
        raise InvalidInput(f"at least {MIN_SAMPLES} samples are needed")
    if len(waveform) > max_audio_s * TARGET_SR:
        raise InvalidInput(f"longer than {max_audio_s:g} s")
    if not np.isfinite(waveform).all():
        raise InvalidInput("NaN or infinite samples")


@dataclass(frozen=True)
class Scores:
    """A variant's scores: its labels in the head's order, and the softmax in that order."""

    labels: list[str]
    scores: list[float]


@dataclass(frozen=True)
class TimelineWindow:
    """granularity=frame: the scores of the frames in [start_s, end_s)."""

    start_s: float
    end_s: float
    scores: list[float]
    logits: list[float] | None = None  # the head's raw float32 logits, the scores' order


@dataclass(frozen=True)
class ModelDescription:
    """Which model answered (the response's `model`)."""

    variant: str
    source: str   # a directory or a hub id, as configured
    weights: str  # "random" or "pretrained"
    dtype: str    # what the encoder computed in
    device: str


@dataclass(frozen=True)
class Timings:
    queue_ms: float      # in the variant, waiting for the model (and a batch)
    inference_ms: float  # the forward pass (a batch's, when batched)


@dataclass(frozen=True)
class VariantAnswer(Scores):
    model: ModelDescription
    timings: Timings
    embedding: np.ndarray | None = None        # (D,) utterance, (T, D) frame; when asked for
    timeline: list[TimelineWindow] | None = None  # granularity=frame
    # The head's raw float32 logits of the answer's labels (masked labels left out, never
    # -inf): Hugging Face's function_to_apply=sigmoid/none.
    logits: list[float] | None = None
    sha256: str | None = None  # of the checkpoint that answered: KServe's model version
    head: dict | None = None   # the custom head that scored it: name, revision, sha256


@dataclass(frozen=True)
class HeadRef:
    """A custom head a request is scored with (serve_app/heads): the router resolves
    `head=NAME[@REV]` to one revision; the variant reads the file at `uri` (once per replica,
    kept by sha256) and refuses it unless its content has that sha256."""

    name: str
    revision: int
    sha256: str
    uri: str

    def answer(self) -> dict:
        """The answer's `head`."""
        return {"name": self.name, "revision": self.revision, "sha256": self.sha256}
