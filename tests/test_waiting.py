"""tests/waiting.py itself: eventually's bound and report, and the Prometheus text parser."""

from __future__ import annotations

import math
import time
from http.server import BaseHTTPRequestHandler

import pytest

from tests.local_http import LocalServer
from tests.waiting import (
    Scrape,
    eventually,
    metric_samples,
    metric_total,
    parse_labels,
    wait_for_metrics,
)


def test_eventually_returns_the_first_truthy_value():
    values = iter([None, 0, [], {"ready": True}])
    assert eventually(lambda: next(values), "ready", timeout_s=5, interval_s=0) == {"ready": True}


def test_an_exception_is_not_yet_and_the_last_one_is_reported():
    calls = []

    def check():
        calls.append(1)
        raise KeyError(f"attempt {len(calls)}")

    began = time.monotonic()
    with pytest.raises(AssertionError) as failed:
        eventually(check, "the variant listed", timeout_s=0.3, interval_s=0.05)
    waited = time.monotonic() - began
    message = str(failed.value)
    assert message.startswith("the variant listed: not within 0.3 s")
    assert f"last exception: KeyError: 'attempt {len(calls)}'" in message
    assert isinstance(failed.value.__cause__, KeyError)
    assert len(calls) >= 2  # the first, and one at the deadline at least
    assert 0.3 <= waited < 3  # bounded: the deadline, plus one last check


def test_a_falsy_value_is_reported_and_the_message_can_be_computed_late():
    log = ["starting"]

    def check():
        log.append("still starting")
        return 0

    with pytest.raises(AssertionError, match=r"^/ready answers, log ends still starting: .*"
                                             r"last value: 0$"):
        eventually(check, lambda: f"/ready answers, log ends {log[-1]}", timeout_s=0.1)


def test_exceptions_not_retried_are_raised_at_once():
    calls = []

    def check():
        calls.append(1)
        raise ValueError("a sender failed")

    with pytest.raises(ValueError, match="a sender failed"):
        eventually(check, "requests answered", timeout_s=30, retry_on=())
    with pytest.raises(ValueError):
        eventually(check, "requests answered", timeout_s=30, retry_on=(KeyError,))
    assert len(calls) == 2


def test_keyboard_interrupt_is_never_swallowed():
    def check():
        raise KeyboardInterrupt

    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        eventually(check, "anything", timeout_s=30, retry_on=(BaseException,))
    assert time.monotonic() - began < 5


def test_the_bound_holds_for_a_long_interval():
    """The last sleep is cut at the deadline, and the check runs once more there."""
    calls = []
    began = time.monotonic()
    with pytest.raises(AssertionError, match="2 checks"):
        eventually(lambda: calls.append(time.monotonic()), "never", timeout_s=0.2,
                   interval_s=60)
    assert time.monotonic() - began < 2
    assert calls[1] - began >= 0.2


SAMPLE = """\
# HELP ray_emotion2vec_requests_total Prediction requests by route, variant and outcome
# TYPE ray_emotion2vec_requests_total counter
ray_emotion2vec_requests_total{Component="core_worker",application="emotion2vec",\
outcome="2xx",route="base",variant="base"} 3.0
ray_emotion2vec_requests_total{application="emotion2vec",outcome="2xx",route="fast",\
variant="turbo"} 2
ray_emotion2vec_requests_total{application="keys",outcome="4xx",route="none",variant="none"} 1e0
ray_emotion2vec_requests_total_extra{application="emotion2vec"} 100
# TYPE ray_emotion2vec_batch_size histogram
ray_emotion2vec_batch_size_bucket{le="1.0",variant="base"} 4.0
ray_emotion2vec_batch_size_bucket{le="+Inf",variant="base"} 5.0
ray_emotion2vec_batch_size_count{variant="base"} 5.0
ray_emotion2vec_batch_size_sum{variant="base"} 1.5e+01
ray_emotion2vec_backend{backend="torch",requested="openvino",variant="fallback"} 1.0 1712345678000
process_open_fds 12
odd{note="a \\"quoted\\" \\\\ value, with {braces}",le="+Inf",} NaN
"""


def test_the_parser_reads_samples_by_name_and_labels():
    scraped = Scrape(SAMPLE)
    both = scraped.samples("ray_emotion2vec_requests_total", application="emotion2vec")
    assert sorted(both.values()) == [2.0, 3.0]  # not the _extra metric, not the keys app
    assert scraped.total("ray_emotion2vec_requests_total", outcome="2xx") == 5.0
    assert scraped.total("ray_emotion2vec_requests_total", variant="none") == 1.0
    assert scraped.samples("ray_emotion2vec_requests_total", route="base") == {(
        ("Component", "core_worker"), ("application", "emotion2vec"), ("outcome", "2xx"),
        ("route", "base"), ("variant", "base")): 3.0}
    assert scraped.samples("ray_emotion2vec_batch_size", variant="base") == {}
    assert scraped.total("ray_emotion2vec_batch_size_sum") == 15.0
    buckets = scraped.samples("ray_emotion2vec_batch_size_bucket", le="+Inf")
    assert list(buckets.values()) == [5.0]
    assert scraped.total("ray_emotion2vec_backend", requested="openvino") == 1.0  # a timestamp
    assert scraped.total("process_open_fds") == 12
    odd = scraped.samples("odd")
    assert math.isnan(next(iter(odd.values())))
    assert dict(next(iter(odd)))["note"] == 'a "quoted" \\ value, with {braces}'
    assert "ray_emotion2vec_batch_size_count" in scraped.names()


def test_a_metric_with_no_sample_is_not_zero():
    scraped = Scrape(SAMPLE)
    with pytest.raises(AssertionError, match="no sample of ray_emotion2vec_requests_total with "
                                             r"\{'variant': 'large'\}; its samples: \{"):
        scraped.total("ray_emotion2vec_requests_total", variant="large")
    with pytest.raises(AssertionError, match="its samples: none"):
        scraped.total("ray_emotion2vec_streams_active")
    with pytest.raises(AssertionError, match="no sample of ray_emotion2vec_backend"):
        scraped.require("ray_emotion2vec_backend", backend="openvino")
    assert scraped.require("ray_emotion2vec_backend", backend="torch") == \
        scraped.samples("ray_emotion2vec_backend")


def test_lines_outside_the_text_format_are_refused():
    with pytest.raises(ValueError, match="not a sample line"):
        Scrape("ray_emotion2vec_requests_total{outcome=\"2xx\"}\n").lines()
    with pytest.raises(ValueError, match="labels not in the text format"):
        parse_labels('outcome=2xx')
    assert parse_labels("") == ()


def test_the_endpoint_is_scraped_once_per_call_and_waited_for():
    """A endpoint whose counter appears on its third scrape."""
    scrapes = []

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self):
            scrapes.append(self.path)
            body = SAMPLE + ('late_total{key="alpha"} 2\n' if len(scrapes) >= 3 else "")
            self.send_response(200)
            self.send_header("content-type", "text/plain; version=0.0.4")
            self.send_header("content-length", str(len(body.encode())))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    with LocalServer(Metrics) as server:
        url = server.url + "/metrics"
        assert metric_samples(url, "late_total") == {}
        with pytest.raises(AssertionError, match="no sample of late_total"):
            metric_total(url, "late_total", key="alpha")
        scraped = wait_for_metrics(url, ("late_total", {"key": "alpha"}),
                                   ("ray_emotion2vec_batch_size_bucket", {"le": "+Inf"}),
                                   timeout_s=10, interval_s=0.01)
        assert scraped.total("late_total") == 2.0
        assert metric_total(url, "ray_emotion2vec_requests_total", application="keys") == 1.0
        with pytest.raises(AssertionError, match=r"^the metrics on the Prometheus endpoint: "
                           r"not within 0.1 s .*missing \[\('never_total', \{\}\)\]"):
            wait_for_metrics(url, ("never_total", {}), timeout_s=0.1, interval_s=0.01)
    assert set(scrapes) == {"/metrics"} and len(scrapes) >= 6
