// The page's live mode: the microphone -> 16-bit PCM -> WS /v1/stream; each window event is
// added to a scrolling timeline, and the stream's result is shown as a prediction is.
// Uses app.js's helpers ($, openMicrophone, drawTimeline, render, showError, hideError).
"use strict";

const LIVE_SPAN_S = 20;     // the live timeline shows the last 20 s
const LIVE_MESSAGE_S = 0.1; // audio per message
// Copies each block of microphone samples out of the audio thread.
const CAPTURE = `registerProcessor("pcm-capture", class extends AudioWorkletProcessor {
  process(inputs) { if (inputs[0][0]) this.port.postMessage(inputs[0][0].slice(0)); return true; }
});`;
let live = null;  // {socket, context, media, blocks, queued, windows, skipped, failed}

function toPcm16(blocks, length) {
  const pcm = new Int16Array(length);
  let offset = 0;
  for (const block of blocks) {
    for (let i = 0; i < block.length; i++) {
      pcm[offset++] = Math.max(-32768, Math.min(32767, Math.round(block[i] * 32768)));
    }
  }
  return pcm.buffer;
}

function sendQueued() {
  if (!live || !live.queued || live.socket.readyState !== WebSocket.OPEN) return;
  live.socket.send(toPcm16(live.blocks, live.queued));
  live.blocks = [];
  live.queued = 0;
}

function liveStatus(text) { $("live-status").textContent = text; }

async function startLive() {
  hideError();
  const media = await openMicrophone();
  if (!media) return;
  const context = new AudioContext();
  const capture = URL.createObjectURL(new Blob([CAPTURE], { type: "text/javascript" }));
  await context.audioWorklet.addModule(capture);
  URL.revokeObjectURL(capture);
  const params = new URLSearchParams({ sample_rate: String(context.sampleRate),
    encoding: "pcm_s16le" });
  if ($("model-version").value) params.set("model_version", $("model-version").value);
  // Browsers cannot set headers on a WebSocket: the key goes as a query parameter.
  const key = storedKey();
  if (key) params.set("api_key", key);
  const url = new URL(`v1/stream?${params}`, document.baseURI);  // under the route prefix
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(url);
  live = { socket, context, media, blocks: [], queued: 0, windows: [], skipped: 0, failed: false };
  socket.onopen = () => {
    const node = new AudioWorkletNode(context, "pcm-capture");
    node.port.onmessage = (event) => {
      if (!live || live.socket !== socket) return;
      live.blocks.push(event.data);
      live.queued += event.data.length;
      if (live.queued >= context.sampleRate * LIVE_MESSAGE_S) sendQueued();
    };
    const mute = context.createGain();  // keeps the graph pulling samples, plays nothing
    mute.gain.value = 0;
    context.createMediaStreamSource(media).connect(node).connect(mute).connect(context.destination);
  };
  socket.onmessage = (message) => onLiveEvent(JSON.parse(message.data));
  socket.onclose = (event) => onLiveClosed(event, socket);
  $("live").textContent = "Stop";
  $("live").classList.add("recording");
  $("live-box").hidden = false;
  $("live-emotion").textContent = "";
  $("live-timeline").replaceChildren();
  liveStatus("connecting…");
}

function releaseMicrophone() {
  if (!live || !live.media) return;
  live.media.getTracks().forEach((track) => track.stop());
  live.context.close();
  live.media = null;
}

function stopLive() {
  sendQueued();
  releaseMicrophone();
  if (live.socket.readyState === WebSocket.OPEN) {
    live.socket.send(JSON.stringify({ type: "end" }));
    liveStatus("waiting for the result…");
  }
}

function onLiveEvent(event) {
  if (event.type === "ready") {
    liveStatus(`${event.model_version}, ${event.window_s} s windows every ${event.hop_s} s`);
  } else if (event.type === "window") {
    live.windows.push(event);
    live.skipped += event.skipped;
    $("live-emotion").textContent = `${event.emotion} (${(event.confidence * 100).toFixed(0)} %)`;
    drawTimeline($("live-timeline"), live.windows, $("live-legend"), LIVE_SPAN_S);
    liveStatus(`${live.windows.length} windows, ${live.skipped} skipped`);
  } else if (event.type === "result") {
    render(event);
    $("status").textContent = `Live stream of ${event.audio.duration_s} s: ` +
      `${event.windows} windows, ${event.skipped} skipped.`;
  } else if (event.type === "error") {
    live.failed = true;
    showError(`${event.error.code}: ${event.error.message}`);
    if (event.error.code === "unauthorized") {
      storeKey(null);
      askForKey("This service needs an API key.");
    }
  }
}

function onLiveClosed(event, socket) {
  if (!live || live.socket !== socket) return;
  releaseMicrophone();
  if (event.code !== 1000 && !live.failed) showError(`The stream closed (code ${event.code}).`);
  liveStatus(`${live.windows.length} windows, ${live.skipped} skipped; closed`);
  $("live").textContent = "Live";
  $("live").classList.remove("recording");
  live = null;
}

function toggleLive() {
  if (live && live.media) stopLive();
  else if (!live) startLive();
}

$("live").addEventListener("click", toggleLive);
if (!window.AudioWorkletNode || !navigator.mediaDevices) $("live").disabled = true;
