"""`emotion2vec-serve predict`: send audio files to a running service and collect the results.

Directories are searched (recursively) for audio files; requests go out concurrently; a
variant that answers 503 (loading, overloaded) is asked again after an exponential backoff
that honours its Retry-After, a bounded number of times. One JSON line (or CSV row) per file,
in the order of the inputs, then a summary on stderr; the exit status is 1 if any file failed.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import email.utils
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au",
                  ".caf", ".w64", ".rf64",  # libsndfile's
                  ".m4a", ".mp4", ".mov", ".3gp", ".3g2", ".webm", ".mkv", ".mka", ".aac",
                  ".wma", ".amr"}  # FFmpeg's
RETRY_STATUSES = {503}
FIELDS = ["path", "status", "http_status", "emotion", "confidence", "model_version", "error",
          "request_id"]


@dataclass
class Outcome:
    path: str
    status: str = "failed"            # "ok" or "failed"
    http_status: int | None = None
    emotion: str | None = None
    confidence: float | None = None
    model_version: str | None = None
    error: str | None = None
    request_id: str | None = None
    attempts: int = 0
    scores: dict[str, float] = field(default_factory=dict)
    timeline: list[dict] | None = None


def expand(inputs: list[str]) -> list[Path]:
    """Files as given (any name), and the audio files under each directory, sorted."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*")
                                if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or directory: {item}")
    return list(dict.fromkeys(files))  # a file named twice is sent once


def retry_after_s(value: str | None, now: float | None = None) -> float:
    """Retry-After as seconds: a number of seconds or an HTTP date; 0 when absent or bad."""
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, when - (time.time() if now is None else now))


def backoff_delay(attempt: int, retry_after: str | None, base_s: float, max_s: float) -> float:
    """Seconds to wait before try `attempt + 1`: base * 2**attempt, at least what the server
    asked for, at most max_s."""
    return min(max_s, max(base_s * 2 ** attempt, retry_after_s(retry_after)))


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{response.status_code} {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code}: {response.text[:200]}"


async def predict_file(client: httpx.AsyncClient, path: Path, params: dict[str, str],
                       tries: int, base_s: float, max_s: float) -> Outcome:
    outcome = Outcome(path=str(path))
    try:
        data = path.read_bytes()
    except OSError as exc:
        outcome.error = f"cannot read: {exc}"
        return outcome
    for attempt in range(tries):
        outcome.attempts = attempt + 1
        retry_after = None
        try:
            response = await client.post("/v1/predict", files={"file": (path.name, data)},
                                         data=params)
        except httpx.ConnectError as exc:  # nothing was sent: safe to try again
            outcome.http_status, outcome.error = None, f"cannot connect: {exc}"
        except httpx.HTTPError as exc:  # a timeout, a dropped answer: the server may be busy
            outcome.http_status, outcome.error = None, f"{type(exc).__name__}: {exc}"
            return outcome
        else:
            outcome.http_status = response.status_code
            if response.status_code == 200:
                body = response.json()
                outcome.status, outcome.error = "ok", None
                for key in ("emotion", "confidence", "model_version", "request_id", "scores"):
                    setattr(outcome, key, body.get(key))
                outcome.timeline = body.get("timeline")
                return outcome
            outcome.error = _error_text(response)
            if response.status_code not in RETRY_STATUSES:
                return outcome
            retry_after = response.headers.get("retry-after")
        if attempt + 1 < tries:
            await asyncio.sleep(backoff_delay(attempt, retry_after, base_s, max_s))
    return outcome


async def predict_all(files: list[Path], args: argparse.Namespace,
                      progress: bool = True) -> list[Outcome]:
    from tqdm import tqdm

    params = {"granularity": args.granularity}
    if args.model_version:
        params["model_version"] = args.model_version
    limit = asyncio.Semaphore(args.concurrency)
    timeout = httpx.Timeout(args.timeout, connect=min(10.0, args.timeout))
    limits = httpx.Limits(max_connections=args.concurrency)
    with tqdm(total=len(files), unit="file", file=sys.stderr, disable=not progress) as bar:
        async with httpx.AsyncClient(base_url=args.url, timeout=timeout, limits=limits) as client:
            async def one(path: Path) -> Outcome:
                async with limit:
                    outcome = await predict_file(client, path, params, args.tries,
                                                 args.backoff, args.max_backoff)
                bar.update(1)
                return outcome

            return list(await asyncio.gather(*(one(path) for path in files)))


def write_jsonl(outcomes: list[Outcome], out: TextIO) -> None:
    for outcome in outcomes:
        row = asdict(outcome)
        if row["timeline"] is None:
            del row["timeline"]
        out.write(json.dumps(row) + "\n")


def write_csv(outcomes: list[Outcome], out: TextIO) -> None:
    """One column per score (`score_happy`, ...), in the service's order."""
    emotions = list(dict.fromkeys(name for o in outcomes for name in o.scores))
    writer = csv.writer(out)
    writer.writerow(FIELDS + [f"score_{name}" for name in emotions])
    for outcome in outcomes:
        row: list[Any] = [getattr(outcome, key) for key in FIELDS]
        writer.writerow(["" if v is None else v for v in row]
                        + [outcome.scores.get(name, "") for name in emotions])


def summary(outcomes: list[Outcome]) -> str:
    ok = [o for o in outcomes if o.status == "ok"]
    failed = [o for o in outcomes if o.status != "ok"]
    lines = [f"{len(outcomes)} files: {len(ok)} ok, {len(failed)} failed"]
    counts = Counter(o.emotion for o in ok)
    if counts:
        lines.append("emotions: " + ", ".join(f"{name} {n}" for name, n in counts.most_common()))
    if failed:
        lines.append("failures:")
        lines.extend(f"  {o.path}: {o.error}" for o in failed)
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emotion2vec-serve",
                                     description="Client of an emotion2vec-serve service.")
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="recognise the emotion in audio files",
                                  description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR")
    predict.add_argument("--url", default="http://127.0.0.1:8000", help="the service")
    predict.add_argument("--model-version", default=None,
                         help="a variant or an alias; default: the service's default")
    predict.add_argument("--granularity", choices=["utterance", "frame"], default="utterance",
                         help="frame adds the emotion timeline to the JSONL output")
    predict.add_argument("--out", default="-",
                         help="results file: .jsonl or .csv (default: JSON lines on stdout)")
    predict.add_argument("--concurrency", type=int, default=4, help="requests at once")
    predict.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    predict.add_argument("--tries", type=int, default=5,
                         help="attempts per file when the service answers 503")
    predict.add_argument("--backoff", type=float, default=0.5,
                         help="first retry delay in seconds, doubled each time")
    predict.add_argument("--max-backoff", type=float, default=30.0, help="longest retry delay")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.tries < 1 or args.timeout <= 0:
        parser.error("--concurrency and --tries must be at least 1, --timeout positive")
    if args.out != "-" and Path(args.out).suffix.lower() not in (".jsonl", ".csv"):
        parser.error("--out must end in .jsonl or .csv")
    try:
        files = expand(args.inputs)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    if not files:
        parser.error("no audio files found")
    outcomes = asyncio.run(predict_all(files, args, progress=not args.no_progress))
    if args.out == "-":
        write_jsonl(outcomes, sys.stdout)
    else:
        with open(args.out, "w", newline="", encoding="utf-8") as out:
            (write_csv if args.out.lower().endswith(".csv") else write_jsonl)(outcomes, out)
    print(summary(outcomes), file=sys.stderr)
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
