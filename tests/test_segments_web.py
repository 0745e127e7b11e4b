"""The page's conversation view in a real headless Chromium against the test cluster: a
two-voice call with its RTTM through POST /v1/segments, drawn as lanes (see test_web.py for
the browser set-up)."""

from __future__ import annotations

import json

import pytest

from tests import conversation
from tests.clips import espeak_available
from tests.test_web import ARTIFACTS, EMOTIONS, browser, page  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")


def test_conversation_view_draws_a_lane_per_speaker(page, tmp_path):  # noqa: F811
    call = conversation.make()
    audio = call.write(tmp_path / "call.wav")
    (tmp_path / "call.rttm").write_text(call.rttm())
    page.check("#conversation-mode")
    assert page.is_visible("#rttm") and page.is_disabled("#granularity")
    page.set_input_files("#file", str(audio))
    page.set_input_files("#rttm", str(tmp_path / "call.rttm"))
    page.select_option("#model-version", "base")
    page.click("#submit")
    page.wait_for_selector("#conversation:not([hidden])")
    page.wait_for_selector("#submit:not([disabled])")
    body = json.loads(page.text_content("#conversation-raw"))
    assert body["segmentation"] == "given" and list(body["speakers"]) == ["agent", "customer"]
    assert page.is_hidden("#result") and page.is_hidden("#error")
    lanes = page.eval_on_selector_all(
        "#lanes rect.utterance",
        "els => els.map(e => [e.dataset.speaker, e.dataset.emotion, e.getAttribute('fill')])")
    assert [speaker for speaker, _, _ in lanes] == [t.speaker for t in call.turns]
    assert [emotion for _, emotion, _ in lanes] == [s["emotion"] for s in body["segments"]]
    # one colour per emotion: the same emotion, the same colour
    assert len({(e, fill) for _, e, fill in lanes}) == len({e for _, e, _ in lanes})
    # a click on an utterance shows its scores
    page.click("#lanes rect.utterance[data-index='3']")
    assert page.is_visible("#segment-box")
    assert page.text_content("#segment-info").startswith("Utterance 3: customer")
    bars = page.eval_on_selector_all(
        "#segment-bars rect.bar", "els => els.map(e => [e.dataset.emotion, "
        "+e.getAttribute('width')])")
    assert [name for name, _ in bars] == EMOTIONS
    widths = dict(bars)
    assert max(widths, key=widths.get) == body["segments"][3]["emotion"]
    assert page.locator("#lanes rect.utterance.selected").count() == 1
    speakers = page.eval_on_selector_all(
        "#speakers tr[data-speaker]", "els => els.map(e => [e.dataset.speaker, "
        "e.children[1].textContent, e.children[3].textContent])")
    assert speakers == [[name, str(s["segments"]), s["emotion"]]
                        for name, s in body["speakers"].items()]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-conversation.png"), full_page=True)
