"""Shadow comparison: a copy of each request a primary variant answered goes to a shadow
variant in the background, and the two answers are compared; likewise between two revisions
of a custom head (settings.heads.shadow, NAME@REV -> NAME@REV), on the variant that answered.

The shadow never touches the primary's response: it starts after the primary answered, runs
as a task of its own with its own timeout, its failures are counted (and logged), and at most
`shadow_max_pending` shadow calls are in flight per router replica (more are dropped, and
counted). Requests that were refused never get here.

Answers are compared by English label name, so variants with different label sets can be
compared: top-1 is each variant's own answer (the `emotion` its response would carry); score
differences are over the labels both variants have.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from serve_app.config import RouterSettings
from serve_app.labels import emotion_fields
from serve_app.wire import HeadRef, InferenceOptions, InferenceRequest, Scores

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Comparison:
    primary_emotion: str
    shadow_emotion: str
    mean_abs_diff: float    # over the labels both answers have
    max_abs_diff: float

    @property
    def agree(self) -> bool:
        return self.primary_emotion == self.shadow_emotion


def compare(primary: Scores, shadow: Scores) -> Comparison:
    """Two variants' answers on the same audio, matched by English name."""
    ours = emotion_fields(primary.labels, primary.scores)
    theirs = emotion_fields(shadow.labels, shadow.scores)
    shared = [name for name in ours["scores"] if name in theirs["scores"]]
    if not shared:
        raise ValueError(f"no labels in common: {sorted(ours['scores'])} vs "
                         f"{sorted(theirs['scores'])}")
    diffs = [abs(ours["scores"][name] - theirs["scores"][name]) for name in shared]
    return Comparison(ours["emotion"], theirs["emotion"], float(np.mean(diffs)), max(diffs))


@dataclass
class ShadowStats:
    """One primary -> shadow pair's comparisons since the last change of routes or shadows."""

    target: str
    compared: int = 0
    dropped: int = 0
    errors: int = 0
    agreed: int = 0
    sum_mean_abs_diff: float = 0.0
    max_abs_diff: float = 0.0
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, comparison: Comparison) -> None:
        self.compared += 1
        self.agreed += comparison.agree
        self.sum_mean_abs_diff += comparison.mean_abs_diff
        self.max_abs_diff = max(self.max_abs_diff, comparison.max_abs_diff)
        row = self.confusion.setdefault(comparison.primary_emotion, {})
        row[comparison.shadow_emotion] = row.get(comparison.shadow_emotion, 0) + 1

    def snapshot(self) -> dict:
        compared = self.compared
        return {
            "target": self.target, "compared": compared, "dropped": self.dropped,
            "errors": self.errors,
            "top1_agreement": self.agreed / compared if compared else None,
            "mean_abs_score_diff": self.sum_mean_abs_diff / compared if compared else None,
            "max_abs_score_diff": self.max_abs_diff if compared else None,
            "confusion": {p: dict(row) for p, row in self.confusion.items()},
        }


# (primary, target, outcome: agree | disagree | error | dropped, max_abs_diff or None)
Recorder = Callable[[str, str, str, float | None], None]


class Shadow:
    """The shadow calls of one router replica, and their stats. `variants` is a
    serve_app.api.variant_client.Variants (its predict: deadline, retry, errors as ApiError)."""

    def __init__(self, variants, record: Recorder | None = None):
        self.variants = variants
        self.record = record or (lambda *_: None)
        self.pending = 0
        self._layout: tuple | None = None
        self._tasks: set[asyncio.Task] = set()  # strong references until each is done
        self.configure(RouterSettings())  # no shadows until the router's config names some

    def configure(self, settings: RouterSettings) -> None:
        """Apply the router's settings; the stats start over when routes or shadows change."""
        self.pairs = dict(settings.shadow)
        self.head_pairs = dict(settings.heads.shadow)
        self.timeout_s = settings.shadow_timeout_s
        self.max_pending = settings.shadow_max_pending
        layout = (settings.default_version, settings.aliases, settings.shadow,
                  settings.heads.aliases, settings.heads.shadow)
        if layout != self._layout:
            self._layout = layout
            self.stats = {p: ShadowStats(target)
                          for p, target in [*self.pairs.items(), *self.head_pairs.items()]}

    def snapshot(self) -> dict[str, dict]:
        return {primary: stats.snapshot() for primary, stats in self.stats.items()}

    def submit(self, primary: str, waveform: np.ndarray, answer: Scores,
               head: HeadRef | None = None) -> None:
        """After variant `primary` answered a request with `answer` (scored by `head`, which
        the shadow variant then uses too): shadow it, if configured and there is room.
        Returns at once; call it from the event loop."""
        target = self.pairs.get(primary)
        if target is not None:
            request = InferenceRequest(waveform, InferenceOptions(head=head))
            self._start(primary, target, answer,
                        lambda: self.variants.predict(target, request, self.timeout_s))

    def submit_head(self, variant: str, head: HeadRef, waveform: np.ndarray, answer: Scores,
                    resolve: Callable[[str], Awaitable[HeadRef]]) -> None:
        """After `variant` answered with custom head `head`: score the same audio with the
        head revision that shadows it (`resolve` turns NAME@REV into a HeadRef)."""
        primary = f"{head.name}@{head.revision}"
        target = self.head_pairs.get(primary)
        if target is None:
            return

        async def shadow_answer() -> Scores:
            options = InferenceOptions(head=await resolve(target))
            return await self.variants.predict(variant, InferenceRequest(waveform, options),
                                               self.timeout_s)

        self._start(primary, target, answer, shadow_answer)

    def _start(self, primary: str, target: str, answer: Scores,
               shadow_answer: Callable[[], Awaitable[Scores]]) -> None:
        stats = self.stats[primary]
        if self.pending >= self.max_pending:
            stats.dropped += 1
            self.record(primary, target, "dropped", None)
            return
        self.pending += 1
        answer = Scores(answer.labels, answer.scores)  # not the embedding: it may be large
        task = asyncio.get_running_loop().create_task(
            self._run(stats, primary, target, shadow_answer, answer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, stats: ShadowStats, primary: str, target: str,
                   shadow_answer: Callable[[], Awaitable[Scores]], answer: Scores) -> None:
        try:
            comparison = compare(answer, await shadow_answer())
        except Exception as exc:  # the shadow's failure is counted, never raised
            stats.errors += 1
            self.record(primary, target, "error", None)
            if stats.errors & (stats.errors - 1) == 0:  # the 1st, 2nd, 4th, ...: no log flood
                logger.warning("shadow %s -> %s failed (%d so far): %r", primary, target,
                               stats.errors, exc)
            return
        finally:
            self.pending -= 1
        stats.add(comparison)
        self.record(primary, target, "agree" if comparison.agree else "disagree",
                    comparison.max_abs_diff)
