"""The GPU benchmark's dry run: `benchmarks.gpu --device cpu --quick`, end to end, in a process
where Ray, soundfile, soxr and the HTTP stack cannot be imported (the GPU machine has none of
them), so the script cannot rot between GPU runs."""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.gpu import VARIANTS, render

ABSENT = ("ray", "soundfile", "soxr", "fastapi", "httpx", "av")
# A module set to None in sys.modules raises ImportError on import, as a missing one would.
RUN = ("import sys; sys.modules.update(dict.fromkeys({absent!r})); "
       "from benchmarks.gpu import main; main(sys.argv[1:])")


def test_dry_run_writes_every_number_of_the_table(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, "-c", RUN.format(absent=ABSENT), "--device", "cpu", "--quick",
         "--threads", "1", "--workdir", str(tmp_path / "checkpoints"), "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    # The printed table is rendered from the JSON alone: the JSON holds all it shows.
    assert render(report) in done.stdout

    env = report["environment"]
    assert env["device"] == "cpu" and env["profile"] == "quick" and env["weights"] == "random"
    assert list(report["variants"]) == list(VARIANTS)
    for _name, v in report["variants"].items():
        fp32 = v["precision"] == "fp32"
        assert v["arch"] == "tiny" and v["params_m"] > 0 and v["dtype"] == (
            "float32" if fp32 else "bfloat16")
        assert v["load_s"] > 0 and v["first_predict_s"] > 0 and v["checkpoint_s"] >= 0
        assert v["memory_after_load"] is None and v["memory_peak"] is None  # GPU only
        assert [e["clip_s"] for e in v["latency"]] == [0.5, 1.0, 2.0]
        for e in v["latency"]:
            assert e["n"] == 3 and 0 < e["p50_ms"] <= e["p99_ms"]
        assert [e["batch"] for e in v["batches"]] == [1, 2, 4]
        for e in v["batches"]:
            assert e["clips_per_s"] > 0 and e["median_ms"] > 0
            # ~1 s clips: audio seconds per second is about clips per second
            assert 0.9 * e["clips_per_s"] < e["audio_s_per_s"] <= 1.01 * e["clips_per_s"]
            assert 0 <= e["max_diff_vs_single"] < (1e-5 if fp32 else 1e-2)
        assert v["batches"][0]["x_batch1"] == 1.0
        if fp32:
            assert v["funasr_max_diff"] < 1e-5
            assert v["cpu_fp32_max_diff"] < 1e-6 and v["cpu_fp32_top1_agreement"] == 1.0
        else:
            # bf16 autocast really ran: the engine differs from FunASR's fp32 inference
            assert 0 < v["funasr_max_diff"] < 0.05
            assert v["cpu_fp32_max_diff"] is None
    turbo = report["variants"]["turbo"]["vs_large"]
    assert turbo["clips"] == 4 and 0 <= turbo["top1_agreement"] <= 1
    assert 0 < turbo["max_diff"] < 0.05
