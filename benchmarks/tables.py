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
         REPO / "benchmarks" / "README.md"]
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
    lines = [f"Measured {result['date']} with `{result['command']}` on {result['config']}; "
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


RENDERERS = {"suite": render_suite, "stream": render_stream}


def render(name: str) -> str:
    result = json.loads((RESULTS / name).read_text(encoding="utf-8"))
    return "\n".join(RENDERERS[result["benchmark"]](result)) + "\n"


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
