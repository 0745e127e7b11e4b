"""Label names shared by the model side and the HTTP side (no torch, no Ray), and label sets:
a request's `labels` parameter, which restricts the softmax to a subset of the head's classes
(the others masked, as FunASR masks the labels whose token starts with "unuse")."""

from __future__ import annotations

from collections.abc import Sequence

from serve_app.errors import ApiError

UNUSED_PREFIX = "unuse"   # FunASR's convention: such a token is never scored
MAX_LABELS_TEXT = 1024    # a `labels` parameter longer than this is refused unread


def english_name(label: str) -> str:
    """FunASR's '生气/angry' -> 'angry'; '<unk>' -> 'unknown'."""
    if label == "<unk>":
        return "unknown"
    return label.rsplit("/", 1)[-1]


def usable(labels: Sequence[str]) -> list[int]:
    """Head indices of every label FunASR scores (all but the unused ones), head order."""
    return [i for i, label in enumerate(labels) if not label.startswith(UNUSED_PREFIX)]


def valid_names(labels: Sequence[str]) -> list[str]:
    """The English names a label set may use for a head with these labels, head order."""
    return [english_name(labels[i]) for i in usable(labels)]


class UnknownLabel(ValueError):
    """A requested label is not one of the model's. Raised on the model side (it knows the
    labels); plain constructor arguments, so that it crosses Ray intact."""

    def __init__(self, unknown: list[str], valid: list[str]):
        super().__init__(unknown, valid)
        self.unknown, self.valid = unknown, valid

    def __str__(self) -> str:
        return f"unknown labels {self.unknown}; valid: {self.valid}"

    def api_error(self) -> ApiError:
        return ApiError(400, "unknown_label", str(self), valid=self.valid)


def parse_label_set(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """A request's `labels`: comma-separated English names ("angry,happy,neutral,sad") or a
    list of them (JSON bodies). Names are trimmed and lower-cased; FunASR's own tokens
    ("开心/happy") are taken by their English part; repeats count once; order does not matter
    (scores keep the head's order). None or empty: every label."""
    if value is None:
        return None
    if isinstance(value, str):
        if len(value) > MAX_LABELS_TEXT:
            raise ApiError(422, "invalid_parameter",
                           f"labels is longer than {MAX_LABELS_TEXT} characters")
        names = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value):
        names = list(value)
        if sum(len(name) + 1 for name in names) > MAX_LABELS_TEXT:
            raise ApiError(422, "invalid_parameter",
                           f"labels is longer than {MAX_LABELS_TEXT} characters")
    else:
        raise ApiError(422, "invalid_parameter",
                       "labels must be comma-separated label names, or a list of them")
    wanted = [english_name(name.strip()).lower() for name in names if name.strip()]
    return tuple(dict.fromkeys(wanted)) or None


def select(requested: Sequence[str] | None, labels: Sequence[str]) -> tuple[int, ...]:
    """Head indices (head order) of a parsed label set for a head with these labels; None: all
    usable labels. UnknownLabel lists the valid names when any requested one is not there."""
    keep = usable(labels)
    if requested is None:
        return tuple(keep)
    by_name = {english_name(labels[i]).lower(): i for i in keep}
    unknown = [name for name in requested if name not in by_name]
    if unknown:
        raise UnknownLabel(unknown, valid_names(labels))
    chosen = {by_name[name] for name in requested}
    return tuple(i for i in keep if i in chosen)


def emotion_fields(labels: Sequence[str], scores: Sequence[float]) -> dict:
    """emotion, label, confidence and the scores by English name, for one set of scores: how
    every answer (predict, segments, streams, batch rows) shows a head's output."""
    best = max(range(len(scores)), key=scores.__getitem__)  # the first of equals, as argmax
    return {
        "emotion": english_name(labels[best]),
        "label": labels[best],
        "confidence": scores[best],
        "scores": {english_name(label): score for label, score in zip(labels, scores)},
    }
