"""`emotion2vec-serve predict`: send audio files to a running service and collect the results.
(`emotion2vec-serve stream FILE` streams one file over WS /v1/stream: see `stream --help`.)

Directories are searched (recursively) for audio files; requests go out concurrently; a
variant that answers 503 (loading, overloaded), or 429 (the API key's quota is spent), is asked
again after an exponential backoff that honours its Retry-After, a bounded number of times. So
is a request lost with a server that went away (500, 502 or 504, or a connection closed without
an answer: docs/high-availability.md): predict has no side effects. A timeout is not retried.
One JSON line (or CSV row) per file, in the order of the inputs, then a summary on stderr; the
exit status is 1 if any file failed. The API key: --api-key, or the environment variable
EMOTION2VEC_API_KEY.

`emotion2vec-serve segments FILE...`: whole recordings, emotion per utterance and per speaker
(serve_app/tools/segments_cli.py).
`emotion2vec-serve keys new KEY_ID`: make an API key for the service's config.
`emotion2vec-serve batch INPUT... --out DIR`: score archives on Ray Data (see `batch --help`).
`emotion2vec-serve export --format onnx --out DIR`: a variant's model as ONNX
(serve_app/tools/export.py).
`emotion2vec-serve heads train|evaluate`: custom heads on labelled clips (see `heads --help`).
`emotion2vec-serve jobs submit|status|results|cancel|list`: archives as jobs over HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import json
import os
import secrets
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from serve_app.tools import export as export_tool
from serve_app.tools import heads_cli, jobs_cli
from serve_app.tools.batch import job as batch_job
from serve_app.tools.client import HEAD_HELP, expand, post_with_retries
from serve_app.wire import Granularity, InferenceOptions

API_KEY_ENV = "EMOTION2VEC_API_KEY"
KEY_PREFIX = "e2v_"  # makes a leaked key easy to recognise (secret scanners)
LABELS_HELP = ("score only these labels, comma-separated (e.g. angry,happy,neutral,sad): the "
               "softmax over them alone; default: every label")
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


async def predict_file(client: httpx.AsyncClient, path: Path, params: dict[str, str],
                       tries: int, base_s: float, max_s: float) -> Outcome:
    outcome = Outcome(path=str(path))
    try:
        data = path.read_bytes()
    except OSError as exc:
        outcome.error = f"cannot read: {exc}"
        return outcome
    sent = await post_with_retries(client, "/v1/predict", {"file": (path.name, data)}, params,
                                   tries, base_s, max_s)
    outcome.attempts, outcome.error = sent.attempts, sent.error
    outcome.http_status = sent.response.status_code if sent.response is not None else None
    if sent.error is None:
        body = sent.response.json()
        outcome.status = "ok"
        for key in ("emotion", "confidence", "model_version", "request_id", "scores"):
            setattr(outcome, key, body.get(key))
        outcome.timeline = body.get("timeline")
    return outcome


async def predict_all(files: list[Path], args: argparse.Namespace,
                      progress: bool = True) -> list[Outcome]:
    from tqdm import tqdm

    params = {"granularity": args.granularity}
    if args.model_version:
        params["model_version"] = args.model_version
    if args.labels:
        params["labels"] = args.labels
    if args.head:
        params["head"] = args.head
    limit = asyncio.Semaphore(args.concurrency)
    timeout = httpx.Timeout(args.timeout, connect=min(10.0, args.timeout))
    limits = httpx.Limits(max_connections=args.concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with tqdm(total=len(files), unit="file", file=sys.stderr, disable=not progress) as bar:
        async with httpx.AsyncClient(base_url=args.url, timeout=timeout, limits=limits,
                                     headers=headers) as client:
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


STREAM_DOC = """Stream one audio file to WS /v1/stream and print the emotion windows as they
arrive, then the result for the whole file. The file is decoded here (soundfile; channels
averaged) and sent as float32 PCM at its own sample rate, at real-time pace; --fast sends each
window's audio as soon as the previous window's event has come back (no window is skipped).
Exit status 1 if the service answered with an error."""


def new_key(key_id: str, rpm: int | None, audio_spm: float | None) -> tuple[str, str]:
    """(a new API key, its line for the Router's api_keys or the api_keys_file)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    spec = {"sha256": hashlib.sha256(key.encode("ascii")).hexdigest(),
            "requests_per_minute": rpm, "audio_seconds_per_minute": audio_spm}
    return key, f"{key_id}: {json.dumps(spec)}"


def _keys_new(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import yaml
    from pydantic import TypeAdapter, ValidationError

    from serve_app.config import ApiKeys, without_inputs

    key, line = new_key(args.key_id, args.rpm, args.audio_spm)
    try:
        TypeAdapter(ApiKeys).validate_python(yaml.safe_load(line))
    except ValidationError as exc:
        parser.error(without_inputs(exc))
    from serve_app.traffic.access import callback_secret

    print(f"API key for {args.key_id} (shown once: give it to its user now; only its sha256 "
          f"is kept):\n{key}\n\nIts job callbacks are signed with this secret (docs/jobs.md):"
          f"\n{callback_secret(key)}\n\nPut this line under the Router's user_config "
          f"`api_keys`, or in the file its `api_keys_file` names, then redeploy (or wait a few "
          f"seconds for the file):\n{line}")
    return 0


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
    predict.add_argument("--granularity", choices=[str(g) for g in Granularity],
                         default=str(InferenceOptions().granularity),
                         help="frame adds the emotion timeline to the JSONL output")
    predict.add_argument("--labels", default=None, help=LABELS_HELP)
    predict.add_argument("--head", default=None, help=HEAD_HELP)
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
    live = commands.add_parser("stream", help="stream one audio file and print the emotion "
                               "windows as they arrive", description=STREAM_DOC)
    live.add_argument("file", metavar="FILE")
    live.add_argument("--url", default="http://127.0.0.1:8000", help="the service")
    live.add_argument("--model-version", default=None,
                      help="a variant or an alias; default: the service's default")
    live.add_argument("--window-s", type=float, default=None,
                      help="window length; default: the service's")
    live.add_argument("--hop-s", type=float, default=None,
                      help="one window each hop; default: the service's")
    live.add_argument("--labels", default=None, help=LABELS_HELP)
    live.add_argument("--head", default=None, help=HEAD_HELP)
    live.add_argument("--vad", action="store_true",
                      help="windows without speech (the service's VAD) are not scored")
    live.add_argument("--fast", action="store_true",
                      help="do not wait for real time: send as fast as windows come back")
    live.add_argument("--chunk-s", type=float, default=0.1,
                      help="audio per message at real-time pace")
    live.add_argument("--jsonl", action="store_true", help="print the events as JSON lines")
    live.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                      help=f"the service's API key (default: ${API_KEY_ENV})")
    live.add_argument("--timeout", type=float, default=60.0,
                      help="seconds to wait for the service at each step")
    predict.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                         help=f"the service's API key (default: ${API_KEY_ENV})")
    from serve_app.tools import segments_cli  # it uses this module's helpers

    segments_cli.add_parser(commands, os.environ.get(API_KEY_ENV), API_KEY_ENV)
    batch_job.add_parser(commands)
    export_tool.add_parser(commands)
    heads_cli.add_parser(commands)
    jobs_cli.add_parser(commands)
    keys = commands.add_parser("keys", help="API keys for the service's config")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_commands.add_parser("new", help="make a key: prints it once, and its config line")
    new.add_argument("key_id", metavar="KEY_ID", help="the name logs and metrics show")
    new.add_argument("--rpm", type=int, default=None,
                     help="requests per minute (default: no limit)")
    new.add_argument("--audio-spm", type=float, default=None,
                     help="seconds of audio per minute (default: no limit)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "stream":
        if not Path(args.file).is_file():
            parser.error(f"no such file: {args.file}")
        if args.chunk_s <= 0 or args.timeout <= 0:
            parser.error("--chunk-s and --timeout must be positive")
        from serve_app.tools.stream_client import stream_main

        return stream_main(args)
    if args.command == "keys":
        return _keys_new(args, parser)
    if args.command == "segments":
        from serve_app.tools import segments_cli

        return segments_cli.main(args, parser)
    if args.command == "batch":
        return batch_job.main(args, parser)
    if args.command == "export":
        return export_tool.main(args, parser)
    if args.command == "heads":
        return heads_cli.main(args, parser)
    if args.command == "jobs":
        return jobs_cli.main(args, parser)
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
