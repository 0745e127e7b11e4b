"""The docs' tables of measured numbers, rendered from the result files in benchmarks/results/.

A page holds a rendered table between `<!-- results: FILE.json -->` and `<!-- /results -->`;
`python -m benchmarks.tables` says which pages differ from their files, `--write` rewrites them.
tests/test_docs.py checks that every page holds exactly what its file renders."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PAGES = [REPO / "docs" / "performance.md", REPO / "docs" / "cpu.md",
         REPO / "benchmarks" / "README.md", REPO / "docs" / "protocols.md",
         REPO / "docs" / "batch.md", REPO / "docs" / "segments.md",
         REPO / "docs" / "streaming.md", REPO / "docs" / "rollouts.md", REPO / "docs" / "heads.md",
         REPO / "docs" / "high-availability.md", REPO / "docs" / "jobs.md"]
BLOCK = re.compile(r"(<!-- results: (?P<file>[\w.-]+\.json) -->\n)(?P<body>.*?)(<!-- /results -->)",
                   re.S)


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows)]


def caption(result: dict) -> list[str]:
    date = result["date"]
    when = date if date[:1].isdigit() else f"(date {date})"
    lines = [f"Measured {when} with `{result['command']}` on {result['config']}; "
             f"CPU: {result['cpu_flags']}."]
    if result.get("note"):
        lines.append(f"({result['note']}.)")
    return lines


def render_suite(result: dict) -> list[str]:
    served = [[r["variant"], r["backend"], r["naive_p50_ms"], r["inproc_p50_ms"], r["http_p50_ms"],
               r["http_p99_ms"]] for r in result["served"]]
    clients = result["clients"]
    rows = [[r["variant"], r["backend"], r["batch"], r["clips_per_s"], r["x_eager"],
             r["audio_s_per_s"], r["p50_ms"], r["p99_ms"], r["failed"]] for r in clients["rows"]]
    return [*caption(result), f"A {result['clip']} clip, p50/p99 in ms:", "",
            *table(["variant", "backend", "naive p50", "in-process p50", "HTTP p50", "HTTP p99"],
                   served),
            "", f"{clients['count']} concurrent clients, {clients['seconds']} s each (x eager: "
            "clips/s over eager torch unbatched):", "",
            *table(["variant", "backend", "batch", "clips/s", "x eager", "audio s/s", "p50 ms",
                    "p99 ms", "failed"], rows)]


def render_stream(result: dict) -> list[str]:
    rows = [[r["variant"], r["streams"], r["windows"], r["skipped"], r["failed"], r["p50_ms"],
             r["p99_ms"]] for r in result["rows"]]
    held = ", ".join(f"{name} {count}" for name, count in
                     result["most_streams_without_skipping"].items())
    return [*caption(result), f"{result['stream']}; lag of each result behind its audio:", "",
            *table(["variant", "streams", "windows", "skipped", "failed", "p50 ms", "p99 ms"],
                   rows),
            "", f"Most real-time streams without a skipped window: {held}."]


def render_stream_bound(result: dict) -> list[str]:
    hop, nice = f"{result['hop_s']:g} s", result.get("replica_nice")
    rows = [{**row, "engine": f"{row['backend']} {row['dtype']}, {row['threads']} threads",
             "cores": " / ".join(shown(row.get(key), ".2f") for key in
                                 ("replica_cores", "path_cores", "ray_cores", "others_cores"))}
            for row in result["rows"]]
    spec = [("variant", "variant", None), ("engine", "engine", None),
            ("in-process ms/window", "engine_ms", ".0f"),
            ("in-process windows/s", "engine_per_s", ".2f"),
            ("in-process cores", "engine_cores", ".2f"),
            *([(f"at nice {nice}", "engine_niced_per_s", ".2f")] if nice else []),
            ("streams", "streams", None), ("served windows/s", "served_per_s", ".2f"),
            ("served / in-process", "ratio", ".2f"),
            *([(f"served / at nice {nice}", "ratio_niced", ".2f")] if nice else []),
            ("replica ms/window", "replica_ms", ".0f"), ("replica busy", "replica_busy", ".2f"),
            ("cores: replica / stream path / Ray / others", "cores", None),
            (f"real-time streams, hop {hop}", "realtime_streams", None),
            ("real-time streams, hop 1 s", "realtime_streams_hop1", None)]
    loads = ", ".join(f"{minute[0]:g}" for minute in result["load_average"])
    niced = (f" At nice {nice}: the same in-process run at the replica's niceness (Ray starts "
             "its workers at 15), before the first served run and after the last." if nice
             else "")
    return [*caption(result),
            f"{result['window_s']:g} s windows every {hop}. In-process: "
            f"{result['engine_windows']} windows back to back"
            + (f" (at most {result['engine_s']:g} s)" if result.get("engine_s") else "")
            + " on the variant's engine and "
            "settings, in a process of its own while the service idles, before the served runs "
            f"and after each ({result.get('rounds', 1)} rounds; the means).{niced} Served: "
            "real-time streams, each with at most one window in flight (the others skipped), "
            "enough to keep the variant busy; window events with scores per second over "
            f"{result['period_s']:g} s after a {result['warmup_s']:g} s warm-up (goal: served / "
            f"in-process >= {result['goal']:g}). Replica ms/window: the variant's own forward "
            "time meanwhile (its inference-latency metric); busy: served windows/s x that. "
            "In-process cores: the engine's CPU time over its wall time. "
            "Cores: CPU used over the served periods by the replica, by the stream path (the "
            "proxy, the Router and the streams' client), by Ray's other processes of the run and "
            "by processes outside it. "
            "Real-time streams: floor(served windows/s x hop). Load average (1 min) at the "
            f"start and after each variant: {loads}.", "", *columns(spec, rows)]


def shown(value, spec: str | None = None) -> str:
    """A cell: "-" for a number not measured (or not recorded), text as it is, a number in
    spec (or as cell() gives it)."""
    if value is None:
        return "-"
    if isinstance(value, str) or spec is None:
        return cell(value)
    return format(value, spec)


def columns(spec: list[tuple[str, str, str | None]], rows: list[dict]) -> list[str]:
    """A table of rows (dicts) from (header, key, format) columns."""
    return table([header for header, _, _ in spec],
                 [[shown(row.get(key), fmt) for _, key, fmt in spec] for row in rows])


def render_cold_start(result: dict) -> list[str]:
    spec = [("arch", "arch", None), ("model.pt MB", "model_mb", ".0f"),
            ("weights MB", "weights_mb", ".0f"), ("loader", "loader", None),
            ("load s", "load_s", ".2f"), ("ready s", "ready_s", ".2f"),
            ("peak RSS added MB", "peak_added_mb", ".0f"), ("x weights", "x_weights", ".2f"),
            ("file-backed MB", "file_backed_mb", ".0f")]
    return [*caption(result), "", *columns(spec, result["rows"])]


def render_long_audio(result: dict) -> list[str]:
    spec = [("clip s", "clip_s", ".0f"),
            (f"windowed {result['window_s']:g} s: peak MB", "windowed_mb", ".0f"),
            ("windowed: s", "windowed_s", ".2f"), ("whole clip: peak MB", "whole_mb", ".0f"),
            ("whole clip: s", "whole_s", ".2f")]
    return [*caption(result), f"{result['arch']}, {result['threads']} threads; peak RSS added "
            "by one prediction, and its time:", "", *columns(spec, result["rows"])]


def render_load(result: dict) -> list[str]:
    spec = [("clients", "clients", None), ("sent", "sent", None), ("ok", "ok", None),
            ("503", "503", None), ("other", "other", None), ("p50 ms", "p50_ms", ".0f"),
            ("p99 ms", "p99_ms", ".0f"), ("ok/s", "ok_per_s", ".1f")]
    return [*caption(result), f"{result['variant']}, {result['clip_s']:g} s clips, "
            f"{result['stage_s']:g} s per stage:", "", *columns(spec, result["rows"])]


def wall_cpu(pair: list | None) -> str:
    return "-" if pair is None else f"{pair[0]:.1f} / {pair[1]:.1f}"


def render_decode_formats(result: dict) -> list[str]:
    decode = [[r["format"], f"{r['kb']:.1f}", wall_cpu(r["libsndfile"]), wall_cpu(r["thread"]),
               wall_cpu(r["worker"])] for r in result["decode"]]
    lines = [*caption(result), f"A {result['clip_s']:g} s clip; median wall / CPU ms per decode, "
             f"{result['reps']} each:", "",
             *table(["format", "kB", "libsndfile", "FFmpeg, thread", "FFmpeg, worker"], decode)]
    if result.get("throughput"):
        spec = [("upload", "upload", None), ("ok", "ok", None), ("other", "other", None),
                ("req/s", "req_per_s", ".1f"), ("p50 ms", "p50_ms", ".0f"),
                ("p99 ms", "p99_ms", ".0f"), ("decode p50 ms", "decode_p50_ms", ".1f")]
        lines += ["", f"Router throughput, {result['clients']} concurrent clients, "
                  f"{result['service']}:", "", *columns(spec, result["throughput"])]
    return lines


def span(values: list[float], spec: str) -> str:
    low, high = format(min(values), spec), format(max(values), spec)
    return low if low == high else f"{low}-{high}"


def render_hot_swap(result: dict) -> list[str]:
    spec = [("phase", "phase", None), ("ok", "ok", None), ("p50 ms", "p50_ms", ".0f"),
            ("p99 ms", "p99_ms", ".0f")]
    rss = result["rss_mb"]
    return [*caption(result),
            f"{result['clients']} clients for {result['seconds']:g} s, {result['clip_s']:g} s "
            f"clips to {result['variant']}, swapped {len(result['swap_replica_s'])} times: "
            f"{result['failed']} of {result['sent']} requests failed; each swap took "
            f"{span(result['swap_replica_s'], '.1f')} s in the replica (load and warm-up), "
            f"{span(result['swap_deploy_s'], '.1f')} s from `serve deploy` to serving; the "
            f"replica's RSS {shown(rss['before'], '.0f')} MB before, "
            f"{shown(rss['during_max'], '.0f')} MB at most during, "
            f"{shown(rss['after'], '.0f')} MB after.", "", *columns(spec, result["phases"])]


def render_shadow(result: dict) -> list[str]:
    spec = [("mode", "mode", None), ("requests", "requests", None), ("p50 ms", "p50_ms", ".0f"),
            ("p99 ms", "p99_ms", ".0f")]
    agree = result["top1_agreement"]
    return [*caption(result),
            f"Primary {result['primary']}, shadow {result['shadow']}; {result['rounds']} "
            f"interleaved rounds of {result['requests']} requests per mode; shadow / no shadow: "
            f"p50 {result['p50_ratio']:.2f}x, p99 {result['p99_ratio']:.2f}x; shadow calls "
            f"compared {result['compared']}, dropped {result['dropped']}, errors "
            f"{result['errors']}, top-1 agreement {shown(agree, '.0%')}.", "",
            *columns(spec, result["modes"])]


def render_heads(result: dict) -> list[str]:
    spec = [("mode", "mode", None), ("requests", "requests", None), ("p50 ms", "p50_ms", ".0f"),
            ("p99 ms", "p99_ms", ".0f"), ("p50 / plain", "p50_ratio", ".3f")]
    return [*caption(result),
            f"Variant {result['variant']}, a {result['clip_s']:g} s clip; {result['rounds']} "
            f"interleaved rounds of {result['requests']} sequential requests per mode; "
            f"{result['heads']} heads registered, max_resident_heads "
            f"{result['max_resident_heads']} (head files read: {result['head_file_loads']}); "
            f"cycling / one head: p50 {result['cycling_over_one_head_p50']:.3f}x.", "",
            *columns(spec, result["modes"])]


def render_jobs(result: dict) -> list[str]:
    spec = [("path", "path", None), ("files/s", "files_per_s", ".2f"), ("wall s", "wall_s", ".1f"),
            ("first row s", "first_row_s", ".1f")]
    rounds = result["rounds"]
    return [*caption(result),
            f"{result['files']} clips of {result['clip_s']}, variant {result['variant']}; both "
            f"with one engine actor of {result['num_cpus']:g} CPU and decode tasks of "
            f"{result['decode_cpus']:g} CPU, beside the idle service; "
            f"{f'{rounds} rounds (medians)' if rounds > 1 else 'one round'}; job / batch: "
            f"{result['job_over_batch']:.2f}x files/s (goal {result['goal']:g}x); first row: "
            "the job's first readable page, from its POST; batch's, as its summary says, from "
            "its pipeline's start; the job's first row counted in its status after "
            f"{shown(result['first_count_s'], '.1f')} s; "
            f"other processes used {result['other_cores']:.2f} cores on average (load average "
            f"{result['load_average_at_start']:g} at the start).", "",
            *columns(spec, result["rows"])]


def render_heads_training(result: dict) -> list[str]:
    spec = [("run", "run", None), ("wall s", "wall_s", ".1f"),
            ("embeddings s", "embedding_s", ".1f"), ("job s", "job_s", ".1f"),
            ("fit s", "fit_s", ".2f"), ("clips/s", "clips_per_s", ".1f"),
            ("after first rows, clips/s", "then_clips_per_s", ".1f"), ("CPU s", "cpu_s", ".0f"),
            ("other processes, cores", "other_cores", ".2f"), ("cache", "cache", None)]
    lines = [*caption(result),
             f"{result['clips']} clips of {result['clip_s']}, variant {result['variant']}; a "
             f"{result['kind']} head, {result['folds']} folds by voice (UA "
             f"{result['ua']:.3f}, shuffled-label control {result['control_ua']:.3f}); the "
             f"job's engine actor on {result['num_cpus']:g} CPU. clips/s: the clips over the "
             "embedding seconds (heads train) or the job's own seconds (batch); extraction / "
             f"batch: {result['extraction_over_batch']:.2f}. CPU s: the CPU time of the run's "
             "processes and the cluster's; other processes: the cores they used meanwhile.",
             "",
             *columns(spec, result["rows"])]
    agreed = result.get("agreement")
    if agreed:
        lines += ["", f"turbo with large's head ({agreed['voices']}), {agreed['clips']} "
                  f"clips, both engines in the benchmark's process: the same label on "
                  f"{agreed['same_label']:.1%} of clips, max |score difference| "
                  f"{agreed['max_score_diff']:.1e} (mean {agreed['mean_score_diff']:.1e}); "
                  f"UA large {agreed['ua_large']:.3f}, turbo {agreed['ua_turbo']:.3f}. The "
                  f"checkpoint's nine-class head on the same passes: the same label on "
                  f"{agreed['nine_class']['same_label']:.1%}, max |score difference| "
                  f"{agreed['nine_class']['max_score_diff']:.1e}; the embeddings' least cosine "
                  f"similarity {agreed['min_embedding_cosine']:.6f}. Per clip (median): "
                  + ", ".join(f"{name} {e['backend']} {e['dtype']} {e['ms_per_clip']:.0f} "
                              "ms/clip" for name, e in agreed["engines"].items()) + "."]
    return lines


def render_serve_latency(result: dict) -> list[str]:
    spec = [("variant", "variant", None), ("HTTP p50 ms", "http_p50_ms", ".0f"),
            ("HTTP p99 ms", "http_p99_ms", ".0f"), ("in-process p50 ms", "inproc_p50_ms", ".0f"),
            ("ratio", "ratio", ".2f"), ("in-process p50 ms (quiet)", "quiet_p50_ms", ".0f"),
            ("ratio (quiet)", "quiet_ratio", ".2f")]
    return [*caption(result), f"Time to ready: {result['ready_s']:.1f} s ({result['ready_note']});"
            f" a {result['clip_s']:g} s clip, {result['requests']} sequential requests per "
            "variant:", "", *columns(spec, result["rows"])]


def render_cpu(result: dict) -> list[str]:
    """benchmarks.cpu: whichever of its stages ran (speed, fidelity, cold)."""
    lines = caption(result)
    if result.get("speed"):
        speed = result["speed"]
        spec = [("arch", "arch", None), ("backend", "backend", None),
                ("precision", "precision", None), ("ms", "ms", ".0f"),
                ("vs eager fp32", "vs_eager", ".2f"), ("cpu ms", "cpu_ms", ".0f"),
                ("cpu vs eager", "cpu_vs_eager", ".2f"),
                (f"batch {speed['batch']}: ms/clip", "batch_ms_per_clip", ".0f"),
                ("batched/single", "batched_vs_single", ".2f")]
        lines += ["", f"Speed: a {speed['clip_s']:g} s clip, in-process, {speed['threads']} "
                  f"threads, median of {speed['rounds']} interleaved rounds:", "",
                  *columns(spec, speed["rows"])]
    if result.get("fidelity"):
        spec = [("arch", "arch", None), ("backend", "backend", None),
                ("precision", "precision", None), ("against", "against", None),
                ("max score diff", "max_score_diff", ".2e"),
                ("max emb diff", "max_emb_diff", ".2e"), ("min cosine", "min_cosine", ".6f"),
                ("top-1 agree", "top1", None), ("min margin", "min_margin", ".2e")]
        if any("top1_speech" in row for row in result["fidelity"]["rows"]):
            spec.insert(-1, ("speech top-1", "top1_speech", None))
        lines += ["", f"Fidelity over {result['fidelity']['clips']} clips:", "",
                  *columns(spec, result["fidelity"]["rows"])]
    if result.get("cold"):
        cold = result["cold"]
        spec = [("arch", "arch", None), ("backend", "backend", None),
                ("precision", "precision", None), ("cache", "cache", None),
                ("ready s", "ready_s", ".1f"), ("RSS MB", "rss_mb", ".0f"),
                ("peak MB", "peak_mb", ".0f"), ("RSS vs eager", "rss_vs_eager", ".2f")]
        title = "Time to a warm engine (fresh process each) and RSS after a 5 s predict:"
        if "swap_rss_mb" in cold["rows"][0]:  # since the published format and hot swap rows
            spec = [*spec[:5], ("vs eager", "ready_vs_eager", ".2f"), spec[5], spec[7],
                    spec[6], ("peak vs eager", "peak_vs_eager", ".2f"),
                    ("after a swap MB", "swap_rss_mb", ".0f"),
                    ("swap vs eager", "swap_vs_eager", ".2f")]
            title = (f"On the {cold['checkpoint']}: time to a warm engine (fresh process "
                     "each), RSS after a 5 s predict, the peak while loading (against eager's "
                     "RSS), and RSS after a hot swap to a second engine:")
        lines += ["", title, "", *columns(spec, cold["rows"])]
    return lines


def render_fidelity_tests(result: dict) -> list[str]:
    spec = [("comparison", "comparison", None), ("max score diff", "max_score_diff", None),
            ("min embedding cosine", "min_cosine", None), ("top-1 agreement", "top1", None),
            ("smallest top-1 margin", "min_margin", None)]
    return [*caption(result), "", *columns(spec, result["rows"])]


def render_protocols(result: dict) -> list[str]:
    spec = [("entry", "entry", None), ("p50 ms", "p50_ms", ".1f"), ("p90 ms", "p90_ms", ".1f"),
            ("p50 / predict", "ratio", ".2f")]
    codec = result["codec"]
    return [*caption(result), f"A {result['clip_s']:g} s clip, {result['requests']} requests "
            "per entry, round-robin:", "", *columns(spec, result["rows"]), "",
            f"The codec alone on a {result['clip_s']:g} s waveform: JSON {codec['json_ms']:.1f} ms"
            f" ({codec['json_mb']:.2f} MB), binary {codec['binary_ms']:.2f} ms "
            f"({codec['binary_mb']:.2f} MB)."]


def render_batch(result: dict) -> list[str]:
    spec = [("path", "path", None), ("files/s", "files_per_s", ".2f"),
            ("x engine", "x_engine", ".2f")]
    first = result["first_rows"]
    peaks = ", ".join(f"{kind} {mb:.0f} MB" for kind, mb in result["peak_rss_mb"].items())
    return [*caption(result), f"{result['files']} files of {result['clip_s']}:", "",
            *columns(spec, result["rows"]), "",
            f"- batch: first {first['rows']} rows after {first['s']:.1f} s (the engine's start), "
            f"then {first['then_files_per_s']:.2f} files/s ({first['then_x_engine']:.2f} x "
            "engine)",
            f"- batch peak RSS: {peaks}",
            *(f"- {tiny['files']} tiny files: {tiny['files_per_s']:.1f} files/s, driver peak "
              f"RSS {tiny['driver_mb']:.0f} MB" for tiny in result["tiny"])]


def render_segments(result: dict) -> list[str]:
    rows = [[f"{r['in_flight']}" + (" (sequential)" if r["in_flight"] == 1 else ""),
             f"{r['batch']}" + (" (padded passes)" if r["batch"] > 1 else ""), r["segments"],
             f"{r['total_s']:.1f}", f"{r['rtf']:.3f}", f"{r['segments_per_s']:.1f}",
             f"{r['vad_s']:.1f}", f"{r['vad_pct']:.1f} %", f"{r['router_mb']:.0f}",
             f"{r['replica_mb']:.0f}"] for r in result["rows"]]
    call = result["call"]
    return [*caption(result), f"{call[:1].upper()}{call[1:]}:", "",
            *table(["segments in flight", "variant batch", "segments", "total s", "RTF",
                    "segments/s", "VAD s", "VAD share", "router peak MB", "replica peak MB"],
                   rows)]


def render_ha(result: dict) -> list[str]:
    def joined(runs: list[dict], show) -> str:
        return ", ".join(show(run) for run in runs)

    rows = []
    for row in result["rows"]:
        runs, replay = row["runs"], row["replay"]
        mode = ("off (Serve alone)" if not replay
                else f"on, {len(runs)} runs" if len(runs) > 1 else "on")
        lost = joined(runs, lambda r: f"{r['lost']}" + (f" ({r['lost_as']})"
                                                          if r.get("lost_as") else ""))
        replayed = joined(runs, lambda r: "n/a" if r["replayed"] is None
                          else str(r["replayed"])) if replay else "-"
        rows.append([row["routers"], mode, joined(runs, lambda r: str(r["answers"])), lost,
                     replayed, joined(runs, lambda r: f"{r['back_s']:.1f}") + " s",
                     joined(runs, lambda r: f"{r['no_200_s']['base']:.1f}") + " s / "
                     + joined(runs, lambda r: f"{r['no_200_s']['large']:.1f}") + " s"])
    return [*caption(result), "", *table(
        ["routers", "proxy replay", "answers", "lost (not 200)", "replayed",
         "every variant serves again after", "longest wait for a 200: base / large"], rows)]


def gpu_lines(report: dict) -> list[str]:
    """benchmarks.gpu's table from its JSON report alone, without its heading line and goals."""
    variants = report["variants"]

    def num(value, fmt: str, width: int) -> str:
        return f"{'-':>{width}}" if value is None else format(value, f">{width}{fmt}")

    def mib(memory: dict | None, key: str) -> str:
        return num(None if memory is None else memory[key], ".0f", 9)

    lines = ["variant  arch   params  dtype     ckpt s  load s  1st s  "
             "GPU MiB: loaded alloc  reserved  peak alloc  reserved"]
    for name, v in variants.items():
        lines.append(f"{name:<8} {v['arch']:<6} {v['params_m']:>5.1f}M  {v['dtype']:<9} "
                     f"{v['checkpoint_s']:>6.1f}  {v['load_s']:>6.2f}  {v['first_predict_s']:>5.2f}"
                     f"  {mib(v['memory_after_load'], 'allocated_mib'):>21} "
                     f"{mib(v['memory_after_load'], 'reserved_mib')} "
                     f"{mib(v['memory_peak'], 'allocated_mib'):>11} "
                     f"{mib(v['memory_peak'], 'reserved_mib')}")
    clips = [entry["clip_s"] for entry in next(iter(variants.values()))["latency"]]
    lines.append("latency ms (p50/p99)  "
                 + "".join(f"{format(s, 'g') + ' s clip':>18}" for s in clips))
    for name, v in variants.items():
        cells = ["{:.1f}/{:.1f}".format(e["p50_ms"], e["p99_ms"]) for e in v["latency"]]
        lines.append(f"{name:<22}" + "".join(f"{cell:>18}" for cell in cells))
    lines.append("padded batches  clip s  batch  median ms   clips/s  audio s/s  x batch 1  "
                 "max diff vs single")
    for name, v in variants.items():
        for e in v["batches"]:
            lines.append(f"{name:<15} {report['batch_clip_s']:>6g}  {e['batch']:>5}  "
                         f"{e['median_ms']:>9.1f}  {e['clips_per_s']:>8.1f}  "
                         f"{e['audio_s_per_s']:>9.1f}  {e['x_batch1']:>9.2f}  "
                         f"{e['max_diff_vs_single']:>18.2e}")
    lines.append("max score diff   engine vs FunASR inference   device vs CPU fp32 (top-1 agree)")
    for name, v in variants.items():
        agree = v["cpu_fp32_top1_agreement"]
        lines.append(f"{name:<16} {v['funasr_max_diff']:>28.2e}   "
                     f"{num(v['cpu_fp32_max_diff'], '.2e', 18)}"
                     f"{'' if agree is None else f' ({agree:.0%})'}")
    turbo = variants.get("turbo", {}).get("vs_large")
    if turbo:
        lines.append(f"turbo vs large over {turbo['clips']} clips: top-1 agreement "
                     f"{turbo['top1_agreement']:.0%}, max score diff {turbo['max_diff']:.2e}")
    return lines


def render_gpu(result: dict) -> list[str]:
    return [*caption(result), "", "```", *gpu_lines(result), "```"]


RENDERERS = {"suite": render_suite, "stream": render_stream, "cold_start": render_cold_start,
             "long_audio": render_long_audio, "load": render_load,
             "decode_formats": render_decode_formats, "hot_swap": render_hot_swap,
             "shadow": render_shadow, "serve_latency": render_serve_latency, "cpu": render_cpu,
             "fidelity_tests": render_fidelity_tests, "protocols": render_protocols,
             "batch": render_batch, "segments": render_segments, "ha": render_ha,
             "gpu": render_gpu, "heads": render_heads, "jobs": render_jobs,
             "heads_training": render_heads_training, "stream_bound": render_stream_bound}


def render_result(result: dict) -> str:
    return "\n".join(RENDERERS[result["benchmark"]](result)) + "\n"


def render(name: str, results: Path | None = None) -> str:
    return render_result(json.loads(((results or RESULTS) / name).read_text(encoding="utf-8")))


def blocks(text: str) -> list[tuple[str, str]]:
    """(result file, the page's body) of every results block of a page."""
    return [(m.group("file"), m.group("body")) for m in BLOCK.finditer(text)]


def rewrite(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("file")) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the pages' tables")
    args = parser.parse_args(argv)
    stale = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        if rewrite(text) != text:
            stale.append(str(page.relative_to(REPO) if page.is_relative_to(REPO) else page))
            if args.write:
                page.write_text(rewrite(text), encoding="utf-8")
    print(("rewrote: " if args.write else "differ from their results: ") + ", ".join(stale)
          if stale else "every table matches its results file")
    return 1 if stale and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
