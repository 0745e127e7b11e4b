"""POST /v1/segments on a long two-speaker recording (tests/conversation.py: two espeak-ng
voices, known turns, noise under), through a local Ray cluster on 127.0.0.1 running the
config: total time, real-time factor, segments per second, the VAD's share, and the router's
and the variant replica's peak RSS, for segments scored one at a time (sequential) and
several in flight, with the variant batching them into padded passes or not.

Peak RSS is each process's high-water mark (VmHWM, read from /proc: the cluster runs on this
machine), before and after the runs: the router holds the upload and the decoded recording.

    python -m benchmarks.segments                       # configs/cpu.yaml, 10 minutes, large
    python -m benchmarks.segments --config configs/tiny.yaml --seconds 120 --variant base
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import httpx

from benchmarks.results import add_results_dir, relative_config, write_result
from serve_app.tools.cluster import load_app, local_serve
from tests import conversation

REPO = Path(__file__).resolve().parents[1]
# (segments in flight per recording, the variant's max_batch_size)
RUNS = [(1, 1), (8, 1), (8, 8)]


def peak_rss_mb(title: str) -> float | None:
    """VmHWM of the process whose title (Ray's `ray::ServeReplica:app:Deployment`) is this."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if title not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            continue
    return None


def one_run(url: str, data: bytes, variant: str, timeout_s: float) -> dict:
    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/segments", files={"file": ("call.wav", data)},
                          data={"model_version": variant}, timeout=timeout_s)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return {"elapsed_s": elapsed, **response.json()}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu.yaml"))
    parser.add_argument("--seconds", type=float, default=600.0, help="recording length")
    parser.add_argument("--variant", default="large")
    parser.add_argument("--runs", default=",".join(f"{f}x{b}" for f, b in RUNS),
                        help="in-flight x max_batch_size per run")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    return add_results_dir(parser)


def main() -> None:
    args = _parser().parse_args()
    call = conversation.tile(conversation.make(), args.seconds)
    data = call.wav_bytes()
    app = load_app(args.config, segments={"max_recording_bytes": len(data) + 2**20})
    app_name = app["name"]
    print(f"{args.config}, {args.variant}: a {call.duration_s / 60:.1f}-minute two-speaker call "
          f"({len(call.turns)} turns, 16 kHz mono WAV, {len(data) / 2**20:.1f} MB); VAD finds "
          "the speech")
    print(f"{'in flight':>9} {'batch':>5} {'segments':>8} {'total s':>8} {'RTF':>6} "
          f"{'seg/s':>6} {'VAD s':>6} {'VAD %':>6} {'router MB':>9} {'replica MB':>10}")
    rows, before = [], None
    router_title = f"ServeReplica:{app_name}:Router"
    variant_title = f"ServeReplica:{app_name}:{args.variant}"
    with local_serve() as serve_handle:
        for run in args.runs.split(","):
            in_flight, batch = (int(n) for n in run.split("x"))
            for deployment in app["deployments"]:
                if deployment["name"] == "Router":
                    deployment["user_config"]["segments"]["segments_in_flight"] = in_flight
                elif deployment["name"] == args.variant:
                    deployment["user_config"].update(max_batch_size=batch,
                                                     max_batch_audio_s=8 * 20.0)
            serve_handle.put(app)
            serve_handle.wait_for(app_name, ("RUNNING",), timeout_s=900)
            time.sleep(2)  # a reconfigure lands in place; let it settle
            if run == args.runs.split(",")[0]:
                before = {"router_mb": round(peak_rss_mb(router_title) or 0),
                          "replica_mb": round(peak_rss_mb(variant_title) or 0)}
                print(f"{'(before)':>9} {'':>5} {'':>8} {'':>8} {'':>6} {'':>6} {'':>6} {'':>6} "
                      f"{peak_rss_mb(router_title) or 0:9.0f} "
                      f"{peak_rss_mb(variant_title) or 0:10.0f}", flush=True)
            result = one_run(serve_handle.url, data, args.variant, args.timeout)
            segments, vad_s = len(result["segments"]), result["timings_ms"]["vad"] / 1000
            total = result["elapsed_s"]
            print(f"{in_flight:9d} {batch:5d} {segments:8d} {total:8.1f} "
                  f"{total / call.duration_s:6.3f} {segments / total:6.1f} {vad_s:6.1f} "
                  f"{100 * vad_s / total:5.1f}% {peak_rss_mb(router_title) or 0:9.0f} "
                  f"{peak_rss_mb(variant_title) or 0:10.0f}", flush=True)
            rows.append({"in_flight": in_flight, "batch": batch, "segments": segments,
                         "total_s": round(total, 1), "rtf": round(total / call.duration_s, 3),
                         "segments_per_s": round(segments / total, 1), "vad_s": round(vad_s, 1),
                         "vad_pct": round(100 * vad_s / total, 1),
                         "router_mb": round(peak_rss_mb(router_title) or 0),
                         "replica_mb": round(peak_rss_mb(variant_title) or 0)})
    print("RTF: total time / audio duration. MB: peak RSS (VmHWM) so far of the router and of "
          "the variant's replica.")
    write_result("segments", {
        "benchmark": "segments",
        "call": f"a {call.duration_s / 60:.1f}-minute two-speaker call, {len(call.turns)} turns",
        "before": before, "rows": rows},
        results_dir=args.results_dir, config=f"{relative_config(args.config)} ({args.variant})")


if __name__ == "__main__":
    main()
