"""The README's tour ("Try it"), run as written against the test app: the clip-making line,
every `curl` line and the command-line client's lines, with the host and port replaced by the
test service's. A command that does not answer as the README shows fails here."""

from __future__ import annotations

import csv
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.test_docs import split_code

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_URL = "http://127.0.0.1:8000"
CLI = ".venv/bin/emotion2vec-serve"
# `batch` runs a Ray Data job on configs/cpu.yaml's own models (minutes of both cores), not
# against the service: tests/test_batch.py runs it on the tiny config.
NOT_RUN = {"batch"}


def tour_commands() -> list[list[str]]:
    """The commands of the README's code blocks under "Try it", continuation lines joined,
    comments dropped: the python line, the curl lines and the CLI lines."""
    _, code = split_code(README.read_text(encoding="utf-8"))
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "## Try it")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("## "))
    commands, pending = [], ""
    for line in code[start:end]:
        if not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        argv = shlex.split(pending, comments=True)
        pending = ""
        if argv[:1] in (["curl"], [CLI]) or argv[:2] == ["python3", "-c"]:
            commands.append(argv)
    return commands


def readme_answer() -> dict:
    """The predict answer the README shows (its `…` placeholders made JSON)."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"```json\n(.*?)```", text, re.S).group(1)
    return json.loads(block.replace('"…"', '"x"'))


def run(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_the_tour_has_its_commands():
    commands = [argv[0] for argv in tour_commands()]
    assert commands.count("curl") >= 5 and commands.count(CLI) >= 3, commands
    assert commands[0] == "python3", "the clip is made first"


def test_every_tour_command_answers_as_the_readme_shows(service, tmp_path):
    shown = readme_answer()
    ran, problems = [], []
    for readme_argv in tour_commands():
        command = shlex.join(readme_argv)
        argv = [arg.replace(README_URL, service.url) for arg in readme_argv]
        if argv[0] == "python3":
            result = run([sys.executable, *argv[1:]], tmp_path)
            assert result.returncode == 0, result.stderr
            for folder in ("recordings", "calls"):  # what the CLI lines name
                (tmp_path / folder).mkdir(exist_ok=True)
                (tmp_path / folder / "clip.wav").write_bytes((tmp_path / "clip.wav").read_bytes())
            ran.append(command)
        elif argv[0] == "curl":
            problems += check_curl(argv, command, shown, tmp_path)
            ran.append(command)
        elif argv[1] not in NOT_RUN:
            problems += check_cli(argv, command, service.url, tmp_path)
            ran.append(command)
    assert ran and ran[0].startswith("python3"), "the clip is made first: " + "\n".join(ran)
    assert not problems, "README commands that do not answer as shown:\n" + "\n".join(problems)


def check_curl(argv: list[str], command: str, shown: dict, cwd: Path) -> list[str]:
    body = cwd / "body.json"
    result = run([argv[0], "-sS", "--max-time", "60", "-o", str(body), "-w", "%{http_code}",
                  *argv[1:]], cwd)
    if result.returncode != 0 or result.stdout != "200":
        return [f"{command}\n    -> curl exit {result.returncode}, HTTP {result.stdout}: "
                f"{body.read_text()[:300] if body.exists() else result.stderr}"]
    answer = json.loads(body.read_text())
    if "/v1/predict" in command:
        missing = sorted(set(shown) - set(answer))
        missing += [f"{key}.{inner}" for key, value in shown.items() if isinstance(value, dict)
                    for inner in sorted(set(value) - set(answer.get(key, {})))]
        if missing:
            return [f"{command}\n    -> the answer lacks what the README shows: {missing}"]
        if "extract_embedding=true" in command and not answer.get("embedding"):
            return [f"{command}\n    -> no embedding"]
        if "granularity=frame" in command and not answer.get("timeline"):
            return [f"{command}\n    -> no timeline"]
    elif "/v1/segments" in command and not isinstance(answer.get("segments"), list):
        return [f"{command}\n    -> no segments: {answer}"]
    elif "/v1/models" in command and not answer.get("variants"):
        return [f"{command}\n    -> no variants: {answer}"]
    return []


def check_cli(argv: list[str], command: str, url: str, cwd: Path) -> list[str]:
    result = run([sys.executable, "-m", "serve_app.tools.cli", *argv[1:], "--url", url,
                  "--no-progress" if argv[1] != "stream" else "--jsonl"], cwd, timeout=300)
    if result.returncode != 0:
        return [f"{command}\n    -> exit {result.returncode}: {result.stderr[-500:]}"]
    if "--out" in argv:
        out = cwd / argv[argv.index("--out") + 1]
        rows = list(csv.DictReader(out.open()))
        # predict: a row per file; segments: a row per utterance (a tone may hold none)
        if (argv[1] == "predict" and not rows) or any(
                row.get("status", "ok") != "ok" or row.get("error") for row in rows):
            return [f"{command}\n    -> rows not ok: {rows[:3]}"]
    elif not result.stdout.strip():
        return [f"{command}\n    -> printed nothing"]
    return []
