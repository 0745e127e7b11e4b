// The page's logic: pick or record audio, call POST /v1/predict, draw the answer as SVG.
// The live mode (the microphone streamed to WS /v1/stream) is in live.js.
// Plain browser JavaScript, no build step and nothing fetched from elsewhere. URLs are
// relative to the page's <base>, which the server sets to the app's route prefix.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = {
  angry: "#d92d20", disgusted: "#669f2a", fearful: "#7a5af8", happy: "#f79009",
  neutral: "#667085", other: "#0ba5ec", sad: "#2f6fde", surprised: "#ee46bc", unknown: "#98a2b3",
};
const $ = (id) => document.getElementById(id);
let audio = null;  // {blob, name}: what the next request sends

// -- the API key (asked for when the API answers 401; kept for this tab only) -------------
const KEY_STORE = "emotion2vec-api-key";
let keyInMemory = null;  // where session storage is off

function storedKey() {
  try { return sessionStorage.getItem(KEY_STORE) ?? keyInMemory; } catch { return keyInMemory; }
}

function storeKey(key) {
  keyInMemory = key;
  try {
    if (key) sessionStorage.setItem(KEY_STORE, key); else sessionStorage.removeItem(KEY_STORE);
  } catch { /* storage off: the key stays in memory */ }
}

// fetch() with the key, if there is one; a 401 asks for a (new) key.
async function api(path, options = {}) {
  const key = storedKey();
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    storeKey(null);
    askForKey(key ? "The API key was refused. Enter a valid key." :
      "This service needs an API key.");
  }
  return response;
}

function askForKey(message) {
  $("key-message").textContent = message;
  $("key-form").hidden = false;
  $("api-key").focus();
}

function saveKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  storeKey(key);
  $("api-key").value = "";
  $("key-form").hidden = true;
  hideError();
  loadModels();
}

// -- audio in ---------------------------------------------------------------------------
function setAudio(blob, name) {
  audio = { blob, name };
  $("audio-name").textContent = `${name} (${(blob.size / 1024).toFixed(1)} KiB)`;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(blob);
  preview.hidden = false;
  $("submit").disabled = false;
}

// The recording goes up as the browser wrote it (webm/opus in Chromium, ogg/opus in Firefox,
// mp4/aac in Safari; the server decodes these), at 64 kb/s: a quarter of a 16 kHz WAV.
const RECORDING_SUFFIXES = { "audio/webm": "webm", "audio/ogg": "ogg", "audio/mp4": "m4a" };
function recordingName(mimeType) {
  return `recording.${RECORDING_SUFFIXES[mimeType.split(";")[0]] || "webm"}`;
}

// The microphone's stream, or null (and the reason shown) when it is not available.
async function openMicrophone() {
  try {
    return await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (err) {
    showError(`The microphone is not available: ${err.message}`);
    return null;
  }
}

let recorder = null;
async function toggleRecording() {
  const button = $("record");
  if (recorder && recorder.state === "recording") {
    recorder.stop();
    return;
  }
  const stream = await openMicrophone();
  if (!stream) return;
  const chunks = [];
  recorder = new MediaRecorder(stream, { audioBitsPerSecond: 64000 });
  recorder.ondataavailable = (event) => chunks.push(event.data);
  recorder.onstop = () => {
    stream.getTracks().forEach((track) => track.stop());
    button.textContent = "Record";
    button.classList.remove("recording");
    setAudio(new Blob(chunks, { type: recorder.mimeType }), recordingName(recorder.mimeType));
  };
  recorder.start();
  button.textContent = "Stop";
  button.classList.add("recording");
  hideError();
}

// -- the model list -----------------------------------------------------------------------
async function loadModels() {
  const select = $("model-version");
  try {
    const response = await api("v1/models");
    const models = await response.json();
    if (!response.ok) throw new Error(`${response.status} ${models.error?.code || ""}`);
    select.replaceChildren();
    for (const [name, info] of Object.entries(models.variants)) {
      const option = new Option(`${name}${name === models.default_version ? " (default)" : ""}` +
        ` — ${info.state}${info.weights === "random" ? ", random weights" : ""}`, name);
      option.selected = name === models.default_version;
      select.add(option);
    }
    for (const [alias, target] of Object.entries(models.aliases || {})) {
      const option = new Option(`${alias}${alias === models.default_version ? " (default)" : ""}` +
        ` → ${aliasTarget(target)}`, alias);
      option.selected = alias === models.default_version;
      select.add(option);
    }
  } catch (err) {
    select.replaceChildren(new Option("(server default)", ""));
    showError(`Could not list the models: ${err.message}`);
  }
}

// An alias names a variant, or a weighted set {variant: weight} (a canary): shown in percent.
function aliasTarget(target) {
  if (typeof target === "string") return target;
  const total = Object.values(target).reduce((sum, weight) => sum + weight, 0);
  return Object.entries(target)
    .map(([variant, weight]) => `${variant} ${Math.round((100 * weight) / total)} %`).join(", ");
}

// -- the request ----------------------------------------------------------------------------
async function submit(event) {
  event.preventDefault();
  if (!audio) return;
  if (conversationMode()) return submitConversation();  // conversation.js
  const form = new FormData();
  form.append("file", audio.blob, audio.name);
  if ($("model-version").value) form.append("model_version", $("model-version").value);
  if ($("head").value) form.append("head", $("head").value);  // heads.js
  form.append("granularity", $("granularity").value);
  form.append("extract_embedding", $("embedding").checked ? "true" : "false");
  $("submit").disabled = true;
  $("status").textContent = "Recognising…";
  hideError();
  try {
    const response = await api("v1/predict", { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) {
      const error = body.error || {};
      throw new Error(`${response.status} ${error.code || ""}: ${error.message || response.statusText}`);
    }
    render(body);
    $("status").textContent = `Done in ${body.timings_ms.total.toFixed(0)} ms.`;
  } catch (err) {
    $("status").textContent = "";
    showError(err.message);
  } finally {
    $("submit").disabled = false;
  }
}

function showError(message) { $("error").textContent = message; $("error").hidden = false; }
function hideError() { $("error").hidden = true; }

// -- drawing ----------------------------------------------------------------------------------
function el(name, attrs, text) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function drawBars(svg, scores, best) {
  const names = Object.keys(scores);
  const row = 24, left = 80, right = 60, width = 600;
  svg.setAttribute("viewBox", `0 0 ${width} ${names.length * row + 4}`);
  svg.replaceChildren();
  names.forEach((name, i) => {
    const y = i * row + 2, value = scores[name];
    svg.append(el("text", { x: left - 6, y: y + row / 2 + 4, "text-anchor": "end" }, name));
    svg.append(el("rect", {
      class: "bar", "data-emotion": name, x: left, y: y + 3, height: row - 6,
      width: Math.max(0.5, value * (width - left - right)), fill: COLORS[name] || "#888",
      opacity: name === best ? 1 : 0.55,
    }));
    svg.append(el("text", { x: left + value * (width - left - right) + 6, y: y + row / 2 + 4 },
      value.toFixed(3)));
  });
}

// span: draw only the last `span` seconds (the live view scrolls); 0: everything.
function drawTimeline(svg, allWindows, legend, span = 0) {
  const width = 600, height = 240, left = 36, right = 24, top = 10, strip = 14, bottom = 36;
  const plotBottom = height - bottom - strip - 6;
  const end = Math.max(...allWindows.map((w) => w.end_s), span, 0.02);
  const begin = span ? end - span : 0;
  const windows = allWindows.filter((w) => w.end_s > begin);
  const x = (t) => left + (Math.max(t, begin) - begin) / (end - begin) * (width - left - right);
  const y = (v) => top + (1 - v) * (plotBottom - top);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  svg.append(el("line", { class: "axis", x1: left, y1: plotBottom, x2: width - right, y2: plotBottom }));
  svg.append(el("line", { class: "axis", x1: left, y1: top, x2: left, y2: plotBottom }));
  for (const v of [0, 0.5, 1]) {
    svg.append(el("text", { x: left - 4, y: y(v) + 4, "text-anchor": "end" }, v.toFixed(1)));
  }
  const ticks = Math.min(10, Math.ceil(end - begin));
  for (let i = 0; i <= ticks; i++) {
    const t = begin + ((end - begin) * i) / ticks;
    svg.append(el("text", { x: x(t), y: height - 6, "text-anchor": "middle" }, `${t.toFixed(1)} s`));
  }
  const centre = (w) => (w.start_s + w.end_s) / 2;
  // One line per emotion: its score in each window, drawn at the window's centre.
  for (const name of Object.keys(windows[0].scores)) {
    const points = windows.map((w) => `${x(centre(w)).toFixed(1)},${y(w.scores[name]).toFixed(1)}`);
    svg.append(el("polyline", { class: "line", "data-emotion": name, points: points.join(" "),
      fill: "none", stroke: COLORS[name] || "#888", "stroke-width": 1.5 }));
  }
  // The leading emotion of each window: a point on its line and a band below the plot.
  // Windows overlap (hop < window): each band runs between the midpoints of window centres.
  windows.forEach((w, i) => {
    const colour = COLORS[w.emotion] || "#888";
    svg.append(el("circle", { class: "point", cx: x(centre(w)), cy: y(w.confidence), r: 3,
      fill: colour }));
    const from = i === 0 ? w.start_s : (centre(windows[i - 1]) + centre(w)) / 2;
    const to = i === windows.length - 1 ? w.end_s : (centre(w) + centre(windows[i + 1])) / 2;
    const band = el("rect", { class: "segment", x: x(from), y: plotBottom + 6,
      width: Math.max(1, x(to) - x(from)), height: strip, fill: colour, opacity: 0.8 });
    band.append(el("title", {}, `${w.start_s}–${w.end_s} s: ${w.emotion} ${w.confidence.toFixed(2)}`));
    svg.append(band);
  });
  legend.replaceChildren(...Object.keys(windows[0].scores).map((name) => {
    const item = document.createElement("span");
    item.style.setProperty("--c", COLORS[name] || "#888");
    item.textContent = name;
    return item;
  }));
}

function drawModel(body) {
  const model = body.model;
  const rows = [["version asked", $("model-version").value || "(default)"],
    ["served by", body.model_version + (body.routed_by ? ` (chosen by ${body.routed_by})` : "")],
    ...Object.entries(model),
    ["audio", `${body.audio.duration_s} s, ${body.audio.sample_rate} Hz, ` +
      `${body.audio.channels} ch, ${body.audio.format}`]];
  $("model-info").replaceChildren(...rows.map(([key, value]) => {
    const tr = document.createElement("tr");
    tr.append(Object.assign(document.createElement("td"), { textContent: key }),
      Object.assign(document.createElement("td"), { textContent: String(value) }));
    return tr;
  }));
  const warning = $("warning");
  warning.hidden = model.weights !== "random";
  warning.textContent = "Random weights: this variant serves a generated checkpoint, not a " +
    "trained model. Its predictions mean nothing.";
}

function render(body) {
  $("conversation").hidden = true;
  $("result").hidden = false;
  $("emotion").textContent = body.emotion;
  $("confidence").textContent = `(${(body.confidence * 100).toFixed(1)} %)`;
  drawBars($("bars"), body.scores, body.emotion);
  const hasTimeline = Array.isArray(body.timeline) && body.timeline.length > 0;
  $("timeline-box").hidden = !hasTimeline;
  if (hasTimeline) drawTimeline($("timeline"), body.timeline, $("legend"));
  drawModel(body);
  // The page shows embeddings shortened (they can be megabytes); the download has all of it.
  const shown = { ...body };
  if (Array.isArray(body.embedding)) {
    const shape = Array.isArray(body.embedding[0])
      ? `${body.embedding.length} x ${body.embedding[0].length}` : `${body.embedding.length}`;
    shown.embedding = `[${shape} numbers: see the download]`;
  }
  $("raw").textContent = JSON.stringify(shown, null, 2);
  const download = $("download");
  if (download.href) URL.revokeObjectURL(download.href);
  download.href = URL.createObjectURL(new Blob([JSON.stringify(body)], { type: "application/json" }));
}

// -- wiring -------------------------------------------------------------------------------------
function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) setAudio(file, file.name);
  });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) setAudio(file, file.name);
  });
  $("record").addEventListener("click", toggleRecording);
  if (!window.MediaRecorder || !navigator.mediaDevices) $("record").disabled = true;
  $("form").addEventListener("submit", submit);
  $("key-form").addEventListener("submit", saveKey);
  loadModels();
}

init();
