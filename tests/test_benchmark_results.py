"""The benchmarks' result files (benchmarks/results/): each says when, how and where it was
measured, each is shown in one page block or linked from a page as an older run, every
benchmark that prints a table takes --results-dir, and what write_result writes renders.
Fast: no cluster, no benchmark run."""

from __future__ import annotations

import importlib
import json
import re

import pytest

from benchmarks import results, tables

# Every benchmark that prints a table (batch_parity prints lines, no table).
TABLE_BENCHMARKS = ["batch", "cold_start", "cpu", "decode_formats", "gpu", "ha", "heads",
                    "heads_training", "hot_swap", "jobs", "load", "long_audio", "protocols",
                    "segments",
                    "serve_latency", "shadow", "stream", "stream_bound", "suite"]
FILES = sorted(tables.RESULTS.glob("*.json"))
LINK = re.compile(r"\]\((?:[./\w-]*/)?results/(?P<file>[\w.-]+\.json)\)")


def pages_text() -> dict[str, str]:
    pages = {*tables.PAGES, *(tables.REPO / "docs").glob("*.md"), tables.REPO / "README.md"}
    return {str(page): page.read_text(encoding="utf-8") for page in pages if page.exists()}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_result_says_when_how_and_where(path):
    result = json.loads(path.read_text(encoding="utf-8"))
    for key in results.REQUIRED:
        assert isinstance(result.get(key), str) and result[key], (path.name, key)
    assert result["benchmark"] in tables.RENDERERS, path.name
    assert tables.render(path.name)  # its renderer reads it


def test_every_result_is_in_one_block_or_linked_as_an_older_run():
    texts = pages_text()
    rendered: dict[str, list[str]] = {}
    for page in tables.PAGES:
        for name, _ in tables.blocks(page.read_text(encoding="utf-8")):
            rendered.setdefault(name, []).append(page.name)
    linked = {m.group("file") for text in texts.values() for m in LINK.finditer(text)}
    twice = {name: where for name, where in rendered.items() if len(where) > 1}
    assert not twice, f"rendered in more than one block: {twice}"
    missing = [p.name for p in FILES if p.name not in rendered and p.name not in linked]
    assert not missing, f"neither rendered in a page block nor linked from a page: {missing}"
    unknown = [name for name in rendered if not (tables.RESULTS / name).exists()]
    assert not unknown, unknown


@pytest.mark.parametrize("module", TABLE_BENCHMARKS)
def test_every_table_benchmark_takes_results_dir(module, tmp_path):
    parser = importlib.import_module(f"benchmarks.{module}")._parser()
    dests = {action.dest: action for action in parser._actions}
    assert "results_dir" in dests, module
    args = parser.parse_args(["--results-dir", str(tmp_path)])
    assert str(args.results_dir) == str(tmp_path)


CPUINFO = ("processor\t: 0\nmodel name\t: Test CPU\n"
           "flags\t\t: fpu sse avx avx2 avx512f avx512_vnni\n\nprocessor\t: 1\n")


def test_cpu_flags_names_what_the_cpu_has_and_lacks(monkeypatch):
    monkeypatch.setattr(results, "openvino_capabilities", lambda: "FP32 INT8")
    words = results.cpu_flags(CPUINFO)
    assert "Test CPU" in words and "has: avx2, avx512f, avx512_vnni" in words
    assert "lacks: avx512_bf16, amx_tile, amx_bf16" in words and "(OpenVINO: FP32 INT8)" in words


def test_write_result_round_trips_through_its_renderer(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "openvino_capabilities", lambda: None)
    payload = json.loads((tables.RESULTS / "cpu-stream-hop1-2026-12-01.json").read_text())
    for key in ("date", "command", "config", "cpu_flags"):
        payload.pop(key)
    argv = ["/repo/benchmarks/stream.py", "--variants", "large", "--hop", "1"]
    path = results.write_result("cpu-stream", payload, config="configs/cpu.yaml",
                                results_dir=tmp_path, argv=argv, cpuinfo=CPUINFO)
    written = json.loads(path.read_text(encoding="utf-8"))
    assert path.name == f"cpu-stream-{written['date']}.json"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", written["date"])
    assert written["command"] == "python -m benchmarks.stream --variants large --hop 1"
    assert written["config"] == "configs/cpu.yaml" and "avx2" in written["cpu_flags"]
    body = tables.render(path.name, tmp_path)
    assert body == tables.render_result(written)
    assert "| large | 1 | 20 | 0 | 0 | 603 | 711 |" in body
    assert f"Measured {written['date']} with `{written['command']}`" in body
    again = results.write_result("cpu-stream", payload, config="c", results_dir=tmp_path,
                                 argv=argv, cpuinfo=CPUINFO)
    assert again != path and path.exists()  # a second run that day does not overwrite
