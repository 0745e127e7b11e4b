"""What each protocol adapter costs next to POST /v1/predict, side by side in one run.

Starts its own Ray cluster on 127.0.0.1, deploys a config (default configs/tiny.yaml: a tiny
model, so that the HTTP, parsing and decoding costs are what shows), and sends the same clip
through every entry, round-robin so that machine load falls on all alike:
  predict (multipart), HF raw body, HF JSON (base64, top_k), KServe v2 audio binary, v2 audio
  JSON (base64), v2 waveform binary, v2 waveform JSON;
and prints p50/p90 per entry and its ratio to predict's p50. Then, in this process, the
KServe codec alone on the clip's waveform as a JSON tensor and as a binary one.

    python benchmarks/protocols.py --seconds 5 --requests 30
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import time
from collections.abc import Callable

import httpx
import numpy as np
import soundfile

from benchmarks.results import add_results_dir, relative_config, write_result
from benchmarks.serve_latency import speech_clip
from serve_app.api.kserve_codec import HEADER_LENGTH, join_bytes, parse_infer_request
from serve_app.tools.cluster import load_app, local_serve


def v2_body(tensor: dict, raw: bytes | None) -> tuple[bytes, dict]:
    """A v2 request with one input: JSON, or its data as a binary tensor."""
    if raw is None:
        return json.dumps({"inputs": [tensor]}).encode(), {"content-type": "application/json"}
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + raw, {HEADER_LENGTH: str(len(header)),
                          "content-type": "application/octet-stream"}


def entries(wav: bytes, waveform: np.ndarray, variant: str) -> dict[str, Callable]:
    b64 = base64.b64encode(wav).decode()
    audio = {"name": "audio", "datatype": "BYTES", "shape": [1]}
    wave = {"name": "waveform", "datatype": "FP32", "shape": [len(waveform)]}
    bodies = {
        "v2 audio binary": v2_body(audio, join_bytes([wav])),
        "v2 audio JSON": v2_body({**audio, "data": [b64]}, None),
        "v2 waveform binary": v2_body(wave, waveform.astype("<f4").tobytes()),
        "v2 waveform JSON": v2_body({**wave, "data": waveform.tolist()}, None),
    }
    hf_json = json.dumps({"inputs": b64, "parameters": {"top_k": 3}}).encode()

    def post(path: str, **kwargs):
        return lambda http: http.post(path, **kwargs)

    calls = {
        "predict": post("/v1/predict", files={"file": ("clip.wav", wav)},
                        data={"model_version": variant}),
        "HF raw": post(f"/v1/audio-classification/{variant}", content=wav),
        "HF JSON": post(f"/v1/audio-classification/{variant}", content=hf_json,
                        headers={"content-type": "application/json"}),
    }
    for name, (body, headers) in bodies.items():
        calls[name] = post(f"/v2/models/{variant}/infer", content=body, headers=headers)
    return calls


def codec_ms(waveform: np.ndarray, repeats: int = 5) -> dict[str, float]:
    """The median time to parse the waveform as a JSON tensor and as a binary one."""
    wave = {"name": "waveform", "datatype": "FP32", "shape": [len(waveform)]}
    json_body, _ = v2_body({**wave, "data": waveform.tolist()}, None)
    binary_body, headers = v2_body(wave, waveform.astype("<f4").tobytes())
    times = {"JSON": [], "binary": []}
    for _ in range(repeats):
        for name, body, header in (("JSON", json_body, None),
                                   ("binary", binary_body, headers[HEADER_LENGTH])):
            started = time.perf_counter()
            parse_infer_request(body, header)
            times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in times.items()} | {
        "JSON bytes": len(json_body), "binary bytes": len(binary_body)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--variant", default="base")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=30, help="per entry")
    return add_results_dir(parser)


def main() -> None:
    args = _parser().parse_args()

    waveform = speech_clip(args.seconds)
    buffer = io.BytesIO()
    soundfile.write(buffer, waveform, 16_000, format="WAV", subtype="PCM_16")
    wav = buffer.getvalue()
    waveform, _ = soundfile.read(io.BytesIO(wav), dtype="float32")  # what predict decodes
    app = load_app(args.config, max_duration_s=max(30.0, args.seconds),
                   max_upload_bytes=max(2**21, 2 * len(wav)))
    with local_serve() as serve_handle:
        serve_handle.put(app)
        status = serve_handle.wait_for(app["name"], ("RUNNING", "DEPLOY_FAILED"), timeout_s=900)
        assert status.status == "RUNNING", status
        calls = entries(wav, waveform, args.variant)
        latencies: dict[str, list[float]] = {name: [] for name in calls}
        with httpx.Client(base_url=serve_handle.url, timeout=120) as http:
            for name, call in calls.items():  # one warm-up each; every entry must answer 200
                response = call(http)
                assert response.status_code == 200, (name, response.text[:300])
            for _ in range(args.requests):
                for name, call in calls.items():
                    started = time.perf_counter()
                    response = call(http)
                    latencies[name].append((time.perf_counter() - started) * 1000)
                    assert response.status_code == 200, (name, response.text[:300])
    base = statistics.median(latencies["predict"])
    print(f"{args.seconds:g} s clip ({len(wav)} bytes as wav), variant {args.variant} of "
          f"{args.config}, {args.requests} requests per entry, round-robin\n")
    print(f"{'entry':<20} {'p50 ms':>8} {'p90 ms':>8} {'p50 / predict':>14}")
    rows = []
    for name, values in latencies.items():
        p50 = statistics.median(values)
        print(f"{name:<20} {p50:8.1f} {np.percentile(values, 90):8.1f} {p50 / base:14.2f}")
        rows.append({"entry": name, "p50_ms": round(p50, 1),
                     "p90_ms": round(float(np.percentile(values, 90)), 1),
                     "ratio": round(p50 / base, 2)})
    codec = codec_ms(waveform)
    print(f"\nKServe codec in-process, {args.seconds:g} s waveform: JSON "
          f"{codec['JSON']:.1f} ms ({codec['JSON bytes']} bytes), binary "
          f"{codec['binary']:.2f} ms ({codec['binary bytes']} bytes)")
    write_result("protocols", {
        "benchmark": "protocols", "variant": args.variant, "clip_s": args.seconds,
        "requests": args.requests, "rows": rows,
        "codec": {"json_ms": round(codec["JSON"], 1),
                  "json_mb": round(codec["JSON bytes"] / 1e6, 2),
                  "binary_ms": round(codec["binary"], 2),
                  "binary_mb": round(codec["binary bytes"] / 1e6, 2)}},
        results_dir=args.results_dir, config=f"{relative_config(args.config)} ({args.variant})")


if __name__ == "__main__":
    main()
