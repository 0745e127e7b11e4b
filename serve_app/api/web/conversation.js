// The conversation view: a whole recording through POST /v1/segments, drawn as one lane per
// speaker with each utterance coloured by its emotion; a click on an utterance shows its
// scores; the speakers' summary is a table. Uses app.js's helpers ($, api, el, drawBars,
// COLORS, showError, hideError, audio).
"use strict";

function conversationMode() { return $("conversation-mode").checked; }

async function submitConversation() {
  const form = new FormData();
  form.append("file", audio.blob, audio.name);
  if ($("model-version").value) form.append("model_version", $("model-version").value);
  const rttm = $("rttm").files[0];
  if (rttm) form.append("rttm", rttm, rttm.name);
  if ($("split-channels").checked) form.append("channels", "split");
  $("submit").disabled = true;
  $("status").textContent = "Scoring the recording utterance by utterance…";
  hideError();
  try {
    const response = await api("v1/segments", { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) {
      const error = body.error || {};
      throw new Error(`${response.status} ${error.code || ""}: ${error.message || response.statusText}`);
    }
    renderConversation(body);
    $("status").textContent = `${body.segments.length} utterances (${body.segmentation}) in ` +
      `${(body.timings_ms.total / 1000).toFixed(1)} s.`;
  } catch (err) {
    $("status").textContent = "";
    showError(err.message);
  } finally {
    $("submit").disabled = false;
  }
}

// Lanes: one per speaker, in the summary's order (who spoke first); time runs left to right.
function drawLanes(svg, body, onSelect) {
  const speakers = Object.keys(body.speakers);
  const width = 600, left = 90, right = 24, lane = 30, top = 4, axis = 22;
  const end = Math.max(body.audio.duration_s, ...body.segments.map((s) => s.end_s), 0.1);
  const x = (t) => left + (t / end) * (width - left - right);
  const height = top + speakers.length * lane + axis;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  speakers.forEach((name, i) => {
    const y = top + i * lane;
    svg.append(el("text", { x: left - 6, y: y + lane / 2 + 4, "text-anchor": "end" }, name));
    svg.append(el("line", { class: "axis", x1: left, y1: y + lane / 2, x2: width - right,
      y2: y + lane / 2, opacity: 0.3 }));
  });
  for (const segment of body.segments) {
    const row = speakers.indexOf(segment.speaker ?? "unknown");
    const rect = el("rect", {
      class: "utterance", "data-index": segment.index, "data-speaker": segment.speaker ?? "unknown",
      "data-emotion": segment.emotion, x: x(segment.start_s), y: top + row * lane + 4,
      width: Math.max(1.5, x(segment.end_s) - x(segment.start_s)), height: lane - 8, rx: 2,
      fill: COLORS[segment.emotion] || "#888",
    });
    rect.append(el("title", {}, `${segment.start_s.toFixed(2)}–${segment.end_s.toFixed(2)} s: ` +
      `${segment.emotion} ${segment.confidence.toFixed(2)}`));
    rect.addEventListener("click", () => onSelect(segment.index));
    svg.append(rect);
  }
  const ticks = Math.min(10, Math.max(1, Math.ceil(end)));
  const bottom = top + speakers.length * lane;
  svg.append(el("line", { class: "axis", x1: left, y1: bottom, x2: width - right, y2: bottom }));
  for (let i = 0; i <= ticks; i++) {
    const t = (end * i) / ticks;
    svg.append(el("text", { x: x(t), y: bottom + 16, "text-anchor": "middle" }, clock(t)));
  }
}

function clock(seconds) {
  const m = Math.floor(seconds / 60), s = seconds - 60 * m;
  return m ? `${m}:${s.toFixed(0).padStart(2, "0")}` : `${s.toFixed(1)} s`;
}

function drawSpeakers(table, speakers) {
  const head = document.createElement("tr");
  for (const title of ["speaker", "utterances", "speech", "emotion", "confidence"]) {
    head.append(Object.assign(document.createElement("th"), { textContent: title }));
  }
  const rows = Object.entries(speakers).map(([name, s]) => {
    const tr = document.createElement("tr");
    tr.dataset.speaker = name;
    const cells = [name, s.segments, clock(s.speech_s), s.emotion, s.confidence.toFixed(3)];
    for (const value of cells) {
      tr.append(Object.assign(document.createElement("td"), { textContent: String(value) }));
    }
    tr.children[3].style.color = COLORS[s.emotion] || "";
    return tr;
  });
  table.replaceChildren(head, ...rows);
}

function selectSegment(body, index) {
  const segment = body.segments[index];
  for (const rect of document.querySelectorAll("#lanes rect.utterance")) {
    rect.classList.toggle("selected", Number(rect.dataset.index) === index);
  }
  $("segment-box").hidden = false;
  $("segment-info").textContent = `Utterance ${index}: ${segment.speaker ?? "unknown"}, ` +
    `${segment.start_s.toFixed(2)}–${segment.end_s.toFixed(2)} s — ${segment.emotion} ` +
    `(${(segment.confidence * 100).toFixed(1)} %)`;
  drawBars($("segment-bars"), segment.scores, segment.emotion);
}

function renderConversation(body) {
  $("result").hidden = true;
  $("conversation").hidden = false;
  $("conversation-summary").textContent = `${body.segments.length} utterances, ` +
    `${Object.keys(body.speakers).length} speakers, ${clock(body.audio.duration_s)} of audio ` +
    `(${body.segmentation === "vad" ? "speech found by VAD" : "segments as given"}; ` +
    `${body.model_version}${body.model.weights === "random" ? ", random weights" : ""})`;
  drawLanes($("lanes"), body, (index) => selectSegment(body, index));
  drawSpeakers($("speakers"), body.speakers);
  $("segment-box").hidden = true;
  $("conversation-raw").textContent = JSON.stringify(body, null, 2);
}

$("conversation-mode").addEventListener("change", () => {
  $("conversation-options").hidden = !conversationMode();
  $("granularity").disabled = conversationMode();
});
