"""One way for every benchmark to write its result file: benchmarks/results/NAME-DATE.json.

`write_result(name, payload, config=...)` adds the date (UTC day), the command line as run
(`python -m benchmarks.X ...`), the config and the CPU's flags to the payload (which names its
renderer in benchmarks/tables.py under "benchmark") and writes it; `add_results_dir(parser)`
gives a benchmark its `--results-dir` option. Standard library only: benchmarks.gpu runs on
machines that have little else."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
REQUIRED = ("benchmark", "date", "command", "config", "cpu_flags")


def add_results_dir(parser: argparse.ArgumentParser, default: Path | None = RESULTS,
                    note: str = "") -> argparse.ArgumentParser:
    parser.add_argument("--results-dir", type=Path, default=default,
                        help="where the result file (NAME-DATE.json) is written "
                             f"(default: benchmarks/results{note})")
    return parser


def command_line(argv: list[str] | None = None) -> str:
    """`python -m benchmarks.X ARGS` as this process was started."""
    argv = sys.argv if argv is None else argv
    module = Path(argv[0]).stem if argv and argv[0] not in ("", "-c", "-m") else "?"
    return " ".join(["python", "-m", f"benchmarks.{module}", *map(shlex.quote, argv[1:])])


def openvino_capabilities() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    try:
        return " ".join(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:
        return None


def cpu_flags(cpuinfo: str | None = None) -> str:
    """The CPU in words: machine, cores, model, which of FLAGS it has and lacks, and OpenVINO's
    OPTIMIZATION_CAPABILITIES where openvino imports."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    present = set(fields.get("flags", "").split())
    model = fields.get("model name")
    words = f"{platform.machine()}, {os.cpu_count()} cores" + (f" ({model})" if model else "")
    if present:
        have = [flag for flag in FLAGS if flag in present]
        lack = [flag for flag in FLAGS if flag not in present]
        words += f"; has: {', '.join(have) or 'none of ' + ', '.join(FLAGS)}"
        if lack and have:
            words += f"; lacks: {', '.join(lack)}"
    else:
        words += "; flags not readable"
    capabilities = openvino_capabilities()
    if capabilities:
        words += f" (OpenVINO: {capabilities})"
    return words


def result_path(results_dir: Path, name: str, date: str) -> Path:
    """NAME-DATE.json, or NAME-DATE-2.json ... when a run of the same day is already there."""
    path, count = results_dir / f"{name}-{date}.json", 1
    while path.exists():
        count += 1
        path = results_dir / f"{name}-{date}-{count}.json"
    return path


def write_result(name: str, payload: dict, *, config: str, results_dir: Path | None = None,
                 argv: list[str] | None = None, cpuinfo: str | None = None) -> Path:
    """Write payload with date, command, config and cpu_flags; returns the file's path."""
    date = datetime.datetime.now(datetime.UTC).date().isoformat()
    result = {"benchmark": payload.get("benchmark", name), "date": date,
              "command": command_line(argv), "config": str(config),
              "cpu_flags": cpu_flags(cpuinfo), **payload}
    missing = [key for key in REQUIRED if not result.get(key)]
    if missing:
        raise ValueError(f"result {name}: no {missing}")
    directory = Path(results_dir or RESULTS)
    directory.mkdir(parents=True, exist_ok=True)
    path = result_path(directory, name, date)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def relative_config(path: str) -> str:
    """A config path as the docs name it (relative to the repository where it is inside)."""
    resolved, repo = Path(path).resolve(), RESULTS.parents[1]
    return str(resolved.relative_to(repo)) if resolved.is_relative_to(repo) else str(path)
