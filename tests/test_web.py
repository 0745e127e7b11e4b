"""The web page at / in a real headless Chromium against the test cluster, and the OpenAPI
description of the API.

The browser tests need Debian's chromium (`make test-tools` installs it) and the playwright
package; they are skipped when either is missing. Playwright drives the system browser
(`executable_path`), so no browser is downloaded.
"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from tests.conftest import REPO
from tests.head_files import head_bytes

EMOTIONS = ["angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised",
            "unknown"]
ARTIFACTS = REPO / "artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    # A fake microphone (a beep) that needs no permission prompt: tests the recording path.
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
]
TIMEOUT_MS = 60_000


# -- the page and its assets over plain HTTP ------------------------------------------------
def test_page_and_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # URLs relative to a <base> set to the app's route prefix ("/" here).
    assert '<base href="/">' in page.text
    assert '<script src="web/app.js">' in page.text and '"web/style.css"' in page.text
    script = client.get("/web/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "function recordingName" in script.text
    live = client.get("/web/live.js")
    assert live.status_code == 200 and "v1/stream" in live.text
    assert '<script src="web/live.js">' in page.text
    assert '<script src="web/heads.js">' in page.text
    assert "v1/heads" in client.get("/web/heads.js").text
    assert client.get("/web/style.css").headers["content-type"].startswith("text/css")
    for bad in ("/web/index.htm", "/web/..%2Frouter.py", "/web/router.py"):
        response = client.get(bad)
        assert response.status_code == 404, bad
        assert "def predict" not in response.text


# -- in the browser ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("chromium is not installed (make test-tools installs it)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS,
                                              headless=True, timeout=TIMEOUT_MS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser, service):
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(service.url + "/")
    # The version list comes from GET /v1/models: three variants and two aliases.
    page.wait_for_function("document.querySelectorAll('#model-version option').length >= 5")
    yield page
    context.close()
    assert errors == [], errors


def shown_result(page) -> dict:
    """Wait for a result, then the JSON the page shows."""
    page.wait_for_selector("#result:not([hidden])")
    page.wait_for_selector("#submit:not([disabled])")
    return json.loads(page.text_content("#raw"))


def test_versions_offered(page):
    options = page.eval_on_selector_all(
        "#model-version option", "els => els.map(e => [e.value, e.textContent, e.selected])")
    values = [value for value, _, _ in options]
    assert values == ["base", "large", "turbo", "latest", "fast"]
    assert [value for value, _, selected in options if selected] == ["large"]
    labels = {value: text for value, text, _ in options}
    assert "(default)" in labels["large"] and labels["fast"] == "fast → turbo"


def test_upload_shows_emotion_scores_and_model(page, clips):
    page.set_input_files("#file", str(clips["tone_16k_mono_wav"]))
    page.select_option("#model-version", "base")
    page.click("#submit")
    body = shown_result(page)
    assert body["model_version"] == "base" and body["granularity"] == "utterance"
    emotion = page.text_content("#emotion")
    assert emotion == body["emotion"] and emotion in EMOTIONS
    bars = page.eval_on_selector_all(
        "#bars rect.bar", "els => els.map(e => [e.dataset.emotion, +e.getAttribute('width')])")
    assert [name for name, _ in bars] == EMOTIONS
    widths = dict(bars)
    assert max(widths, key=widths.get) == body["emotion"]  # the longest bar is the answer
    assert page.is_hidden("#timeline-box")
    # The tiny test checkpoints have random weights: the page says so.
    assert page.is_visible("#warning")
    assert "Random weights" in page.text_content("#warning")
    assert "random" in page.text_content("#model-info")


def test_a_head_is_picked_shown_and_used(page, service, client, clips):
    """The head menu lists GET /v1/heads; picking one shows its metrics and confusion matrix
    as a picture, and the next recognition uses it."""
    variant = client.get("/v1/models").json()["variants"]["base"]
    labels = ["calm", "tense", "upset"]
    data = head_bytes("page-calls", variant["sha256"], variant["embedding_dim"], labels, seed=3)
    assert client.put("/v1/heads/page-calls", content=data).status_code == 201
    page.reload()
    page.wait_for_function("[...document.querySelectorAll('#head option')]"
                           ".some(o => o.value === 'page-calls')")
    page.select_option("#head", "page-calls")
    page.wait_for_function("document.querySelectorAll('#head-confusion rect.cell').length === 9")
    assert "UA 0.800" in page.text_content("#head-metrics")
    assert page.text_content("#head-title").startswith("page-calls @")
    page.set_input_files("#file", str(clips["tone_16k_mono_wav"]))
    page.select_option("#model-version", "base")
    page.click("#submit")
    body = shown_result(page)
    assert body["head"]["name"] == "page-calls" and list(body["scores"]) == labels
    bars = page.eval_on_selector_all("#bars rect.bar", "els => els.map(e => e.dataset.emotion)")
    assert bars == labels
    assert client.delete("/v1/heads/page-calls").status_code == 200


def test_frame_granularity_draws_the_timeline(page, clips):
    page.set_input_files("#file", str(clips["tone_5s_16k_wav"]))
    page.select_option("#model-version", "fast")
    page.select_option("#granularity", "frame")
    page.check("#embedding")
    page.click("#submit")
    body = shown_result(page)
    assert body["model_version"] == "turbo" and body["granularity"] == "frame"
    windows = body["timeline"]
    assert len(windows) == 9
    assert page.is_visible("#timeline")
    assert page.locator("#timeline circle.point").count() == len(windows)
    assert page.locator("#timeline rect.segment").count() == len(windows)
    assert page.locator("#timeline polyline.line").count() == len(EMOTIONS)
    assert page.locator("#bars rect.bar").count() == len(EMOTIONS)
    # The page shortens the embedding; the raw JSON otherwise is the response.
    assert "numbers: see the download" in body["embedding"]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-result.png"), full_page=True)
    assert (ARTIFACTS / "web-result.png").stat().st_size > 10_000


def test_microphone_recording_is_sent_as_recorded(page):
    """Chromium's MediaRecorder writes a streamed webm/opus (no duration in its header): it
    goes up as it is, and the server decodes it."""
    page.click("#record")
    page.wait_for_selector("#record.recording")
    page.wait_for_timeout(1500)
    page.click("#record")
    page.wait_for_function("document.getElementById('audio-name').textContent"
                           ".startsWith('recording.webm')")
    page.select_option("#model-version", "base")
    page.click("#submit")
    body = shown_result(page)
    assert body["audio"]["format"] == "WEBM/OPUS"
    assert body["audio"]["sample_rate"] == 48_000
    duration = body["audio"]["duration_s"]
    assert 1.0 <= duration <= 3.0
    kib = float(page.text_content("#audio-name").split("(")[1].split(" KiB")[0])
    assert kib * 1024 < duration * 32_000 / 3  # 64 kb/s: under a third of a 16 kHz WAV
    assert page.text_content("#emotion") in EMOTIONS


def test_live_mode_streams_the_microphone_and_draws_the_windows(page):
    """The fake microphone (a beep) streamed at the browser's own sample rate: window events
    arrive while it records, the timeline scrolls in, and Stop shows the stream's result."""
    page.select_option("#model-version", "base")
    page.click("#live")
    page.wait_for_selector("#live.recording")
    page.wait_for_function("document.querySelectorAll('#live-timeline circle.point').length >= 3")
    assert page.text_content("#live-emotion").split(" ")[0] in EMOTIONS
    assert page.text_content("#live-status").endswith("0 skipped")
    page.click("#live")
    page.wait_for_selector("#result:not([hidden])")
    page.wait_for_selector("#live:not(.recording)")
    body = json.loads(page.text_content("#raw"))
    assert body["type"] == "result" and body["model_version"] == "base"
    rate = page.evaluate("() => { const c = new AudioContext(); const r = c.sampleRate; "
                         "c.close(); return r; }")
    assert body["audio"] == {"duration_s": body["audio"]["duration_s"], "sample_rate": rate,
                             "channels": 1, "format": "pcm_s16le"}
    assert body["audio"]["duration_s"] >= 1.5 and body["windows"] >= 3
    assert page.locator("#live-timeline circle.point").count() == body["windows"]
    assert page.locator("#live-legend span").count() == len(EMOTIONS)
    assert page.text_content("#emotion") == body["emotion"]
    assert page.is_hidden("#error")
    assert page.text_content("#live-status").endswith("closed")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-live.png"), full_page=True)


def test_errors_are_shown(page, tmp_path):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("these are not samples")
    page.set_input_files("#file", str(not_audio))
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    assert "415 unsupported_audio" in page.text_content("#error")
    assert page.is_hidden("#result")


def test_the_page_asks_for_a_key_and_sends_it(browser, keyed, clips):
    """The app with keys on, under its route prefix: the API answers 401, the page asks for a
    key, refuses a wrong one, and with the right one lists the models and recognises."""
    page_html = httpx.get(keyed.url, timeout=30, follow_redirects=True)  # /keys -> /keys/
    assert str(page_html.url) == keyed.url + "/"
    assert '<base href="/keys/">' in page_html.text
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(keyed.url)
    page.wait_for_selector("#key-form:not([hidden])")
    assert "needs an API key" in page.text_content("#key-message")
    page.fill("#api-key", "e2v_not-the-key")
    page.click("#key-save")
    page.wait_for_function("document.getElementById('key-message').textContent"
                           ".includes('refused')")
    assert page.is_visible("#key-form")
    page.fill("#api-key", keyed.keys["web"])
    page.click("#key-save")
    listed = "document.querySelector('#model-version option[value=base]') !== null"
    page.wait_for_function(listed)
    assert page.is_hidden("#key-form") and page.is_hidden("#error")
    assert page.evaluate("sessionStorage.getItem('emotion2vec-api-key')") == keyed.keys["web"]
    page.set_input_files("#file", str(clips["tone_16k_mono_wav"]))
    page.click("#submit")
    body = shown_result(page)
    assert body["model_version"] == "base" and body["model"]["source"] == "tiny-seed1"
    page.reload()  # the key stays for the tab: no question this time
    page.wait_for_function(listed)
    assert page.is_hidden("#key-form")
    context.close()
    assert errors == [], errors
