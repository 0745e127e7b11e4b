"""Bounded waits and Prometheus scrapes, shared by the tests.

`eventually(check, what)` calls `check()` until it returns a truthy value (and returns it); past
the deadline it fails naming `what`, the time waited and the last value or exception `check`
gave. A check can say why it is not done yet with an assertion: the last one is what a timeout
reports.

`scrape(metrics_url)` reads the Prometheus text endpoint once; `.samples(name, **labels)` are the
samples of one metric whose labels include these, `.require(...)` the same but at least one,
`.total(...)` their sum (at least one).
`wait_for_metrics(metrics_url, (name, labels), ...)` waits until each has a sample."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

T = TypeVar("T")

Labels = tuple[tuple[str, str], ...]  # a sample's labels, sorted by name


def eventually(check: Callable[[], T], what: str | Callable[[], str], timeout_s: float = 60.0,
               interval_s: float = 0.25,
               retry_on: tuple[type[BaseException], ...] = (Exception,)) -> T:
    """Call check() every interval_s until it returns a truthy value, and return that value.

    An exception of a `retry_on` type raised by check counts as "not yet"; any other one is
    raised at once (`retry_on=()`: every exception is). KeyboardInterrupt is never swallowed.
    check is called at least once, and once more at the deadline; after that an AssertionError
    names `what` (a string, or a callable giving one when the time is up: a log's end), the time
    waited and the last value check returned or the last exception it raised. A check that
    blocks is bounded by its own timeouts only (an HTTP request's, a recv's)."""
    started = time.monotonic()
    deadline = started + timeout_s
    calls = 0
    last: Any = None
    error: BaseException | None = None
    while True:
        calls += 1
        try:
            value = check()
        except retry_on as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            error = exc
        else:
            if value:
                return value
            last, error = value, None
        now = time.monotonic()
        if now >= deadline:
            break
        time.sleep(min(max(interval_s, 0.0), deadline - now))
    name = what() if callable(what) else what
    seen = (f"last exception: {type(error).__name__}: {error}" if error is not None
            else f"last value: {last!r}")
    raise AssertionError(f"{name}: not within {timeout_s:g} s ({calls} checks in "
                         f"{time.monotonic() - started:.1f} s); {seen}") from error


# -- Prometheus -----------------------------------------------------------------------------
_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>.*)\})?"
                     r"\s+(?P<value>\S+)(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_value(text: str) -> float:
    """A sample's value: a float in any notation (1, 2.5, 1e-05, 1.5E+06), +Inf, -Inf, NaN."""
    return float(text)


def parse_labels(text: str) -> Labels:
    labels, position = {}, 0
    while position < len(text.rstrip(", \t")):
        match = _LABEL.match(text, position)
        if match is None:
            raise ValueError(f"labels not in the text format: {{{text}}}")
        labels[match[1]] = re.sub(r"\\[\\\"n]", lambda m: _ESCAPES[m[0]], match[2])
        position = match.end()
    return tuple(sorted(labels.items()))


@dataclass(frozen=True)
class Scrape:
    """One read of a Prometheus text endpoint."""
    text: str

    def lines(self) -> list[tuple[str, Labels, float]]:
        """Every sample: (name, labels, value); comments (# HELP, # TYPE) and blanks left out."""
        found = []
        for line in self.text.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            match = _SAMPLE.match(line.strip())
            if match is None:
                raise ValueError(f"not a sample line: {line!r}")
            found.append((match["name"], parse_labels(match["labels"] or ""),
                          parse_value(match["value"])))
        return found

    def samples(self, name: str, **labels: str) -> dict[Labels, float]:
        """The samples of the metric `name` (exactly: a histogram's `_bucket`, `_count`, `_sum`
        are metrics of their own) whose labels include these."""
        wanted = set(labels.items())
        return {found: value for metric, found, value in self.lines()
                if metric == name and wanted <= set(found)}

    def require(self, name: str, **labels: str) -> dict[Labels, float]:
        """samples(name, **labels), with at least one: an AssertionError naming the samples of
        `name` there are otherwise."""
        samples = self.samples(name, **labels)
        if not samples:
            raise AssertionError(f"no sample of {name} with {labels}; its samples: "
                                 f"{self.samples(name) or 'none'}")
        return samples

    def total(self, name: str, **labels: str) -> float:
        """The sum of samples(name, **labels); an AssertionError when there is none (a counter
        that was never exported is not a counter at 0)."""
        return sum(self.require(name, **labels).values())

    def names(self) -> set[str]:
        return {name for name, _, _ in self.lines()}


def scrape(metrics_url: str, timeout_s: float = 10.0) -> Scrape:
    response = httpx.get(metrics_url, timeout=timeout_s)
    response.raise_for_status()
    return Scrape(response.text)


def metric_samples(metrics_url: str, name: str, **labels: str) -> dict[Labels, float]:
    """One scrape: the samples of `name` whose labels include these ({labels: value})."""
    return scrape(metrics_url).samples(name, **labels)


def metric_total(metrics_url: str, name: str, **labels: str) -> float:
    """One scrape: the sum of those samples (an AssertionError when there is none)."""
    return scrape(metrics_url).total(name, **labels)


def wait_for_metrics(metrics_url: str, *wanted: tuple[str, dict[str, str]],
                     timeout_s: float = 60.0, interval_s: float = 2.0) -> Scrape:
    """Scrape until every (name, labels) in `wanted` has a sample; that scrape."""
    def complete() -> Scrape:
        scraped = scrape(metrics_url)
        missing = [(name, labels) for name, labels in wanted
                   if not scraped.samples(name, **labels)]
        if missing:
            seen = sorted(name for name in scraped.names() if name.startswith("ray_emotion2vec"))
            raise AssertionError(f"missing {missing}; ray_emotion2vec metrics seen: {seen}")
        return scraped

    return eventually(complete, "the metrics on the Prometheus endpoint", timeout_s, interval_s)
