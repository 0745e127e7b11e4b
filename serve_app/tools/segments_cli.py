"""`emotion2vec-serve segments`: whole recordings through POST /v1/segments, one row per
segment (path, index, start_s, end_s, speaker, emotion, confidence, score_*), and a
per-speaker summary on stderr.

Directories are searched (recursively) for audio files. A recording's segments: `--rttm F`
or `--segments F.json` (for one recording), or `NAME.rttm` beside `NAME.wav` (picked up by
itself); without either, the service finds the speech (VAD). Requests go out concurrently and
are retried on 503/429 as `predict` retries them; the exit status is 1 if any recording
failed.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from serve_app.tools.client import HEAD_HELP, expand, post_with_retries

ROW_FIELDS = ["path", "index", "start_s", "end_s", "speaker", "emotion", "confidence"]
ERROR_FIELDS = ["error", "request_id"]
SEGMENTS_DOC = __doc__


@dataclass
class Recording:
    """One audio file to send, and the segments file that goes with it, if any."""

    path: Path
    rttm: Path | None = None
    segments: Path | None = None  # JSON


@dataclass
class RecordingOutcome:
    path: str
    status: str = "failed"          # "ok" or "failed"
    http_status: int | None = None
    error: str | None = None
    request_id: str | None = None
    model_version: str | None = None
    segmentation: str | None = None  # "vad" or "given"
    attempts: int = 0
    segments: list[dict] = field(default_factory=list)
    speakers: dict[str, dict] = field(default_factory=dict)


def recordings(inputs: list[str], rttm: str | None = None,
               segments: str | None = None) -> list[Recording]:
    """The audio files (directories searched), each with its segments file: the one named
    on the command line (only with a single recording), else NAME.rttm beside it."""
    files = expand(inputs)
    if (rttm or segments) and len(files) != 1:
        raise ValueError(f"--rttm and --segments describe one recording; {len(files)} "
                         "audio files were given (put NAME.rttm beside each NAME.wav instead)")
    for given in (rttm, segments):
        if given and not Path(given).is_file():
            raise FileNotFoundError(f"no such file: {given}")
    found = []
    for path in files:
        beside = path.with_suffix(".rttm")
        found.append(Recording(
            path, Path(rttm) if rttm else (beside if not segments and beside.is_file()
                                           else None),
            Path(segments) if segments else None))
    return found


def _request_parts(recording: Recording, params: dict[str, str]) -> tuple[dict, dict]:
    files: dict[str, Any] = {"file": (recording.path.name, recording.path.read_bytes())}
    data = dict(params)
    if recording.rttm is not None:
        files["rttm"] = (recording.rttm.name, recording.rttm.read_bytes())
    if recording.segments is not None:
        data["segments"] = recording.segments.read_text(encoding="utf-8")
    return files, data


async def send(client: httpx.AsyncClient, recording: Recording, params: dict[str, str],
               tries: int, base_s: float, max_s: float) -> RecordingOutcome:
    outcome = RecordingOutcome(path=str(recording.path))
    try:
        files, data = _request_parts(recording, params)
    except (OSError, UnicodeDecodeError) as exc:
        outcome.error = f"cannot read: {exc}"
        return outcome
    sent = await post_with_retries(client, "/v1/segments", files, data, tries, base_s, max_s)
    outcome.attempts, outcome.error = sent.attempts, sent.error
    outcome.http_status = sent.response.status_code if sent.response is not None else None
    if sent.error is None:
        body = sent.response.json()
        outcome.status = "ok"
        for key in ("request_id", "model_version", "segmentation", "segments", "speakers"):
            setattr(outcome, key, body.get(key))
    return outcome


async def send_all(items: list[Recording], args: argparse.Namespace,
                   progress: bool = True) -> list[RecordingOutcome]:
    from tqdm import tqdm

    params = {"channels": "split"} if args.channels == "split" else {}
    for name in ("model_version", "head"):
        if getattr(args, name):
            params[name] = getattr(args, name)
    limit = asyncio.Semaphore(args.concurrency)
    timeout = httpx.Timeout(args.timeout, connect=min(10.0, args.timeout))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with tqdm(total=len(items), unit="recording", file=sys.stderr,
              disable=not progress) as bar:
        async with httpx.AsyncClient(base_url=args.url, timeout=timeout, headers=headers,
                                     limits=httpx.Limits(max_connections=args.concurrency)
                                     ) as client:
            async def one(item: Recording) -> RecordingOutcome:
                async with limit:
                    outcome = await send(client, item, params, args.tries, args.backoff,
                                         args.max_backoff)
                bar.update(1)
                return outcome

            return list(await asyncio.gather(*(one(item) for item in items)))


def rows(outcomes: list[RecordingOutcome]) -> tuple[list[str], list[dict]]:
    """The output's columns and rows: one per segment, one per failed recording."""
    emotions = list(dict.fromkeys(name for o in outcomes for s in o.segments
                                  for name in s.get("scores", {})))
    columns = ROW_FIELDS + [f"score_{name}" for name in emotions] + ERROR_FIELDS
    table = []
    for outcome in outcomes:
        if outcome.status != "ok":
            table.append({"path": outcome.path, "error": outcome.error})
            continue
        for segment in outcome.segments:
            row = {"path": outcome.path, **{key: segment.get(key) for key in ROW_FIELDS[1:]}}
            row.update({f"score_{name}": segment.get("scores", {}).get(name)
                        for name in emotions})
            row.update(error=None, request_id=outcome.request_id)
            table.append(row)
    return columns, table


def write(outcomes: list[RecordingOutcome], out: TextIO, as_csv: bool) -> None:
    columns, table = rows(outcomes)
    if as_csv:
        writer = csv.writer(out)
        writer.writerow(columns)
        for row in table:
            writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
    else:
        for row in table:
            out.write(json.dumps({c: row.get(c) for c in columns}) + "\n")


def summary(outcomes: list[RecordingOutcome]) -> str:
    ok = [o for o in outcomes if o.status == "ok"]
    lines = [f"{len(outcomes)} recordings: {len(ok)} ok, {len(outcomes) - len(ok)} failed"]
    for outcome in outcomes:
        if outcome.status != "ok":
            lines.append(f"{outcome.path}: {outcome.error}")
            continue
        lines.append(f"{outcome.path}: {len(outcome.segments)} segments "
                     f"({outcome.segmentation}, {outcome.model_version})")
        for name, speaker in outcome.speakers.items():
            lines.append(f"  {name}: {speaker['segments']} segments, {speaker['speech_s']:.1f} "
                         f"s of speech, {speaker['emotion']} {speaker['confidence']:.3f}")
    return "\n".join(lines)


def add_parser(commands, api_key_default: str | None, api_key_env: str) -> None:
    parser = commands.add_parser(
        "segments", help="emotion per utterance and per speaker over whole recordings",
        description=SEGMENTS_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR")
    given = parser.add_mutually_exclusive_group()
    given.add_argument("--rttm", default=None, help="the recording's turns, as RTTM")
    given.add_argument("--segments", default=None,
                       help='the recording\'s segments, as JSON [{"start_s", "end_s", '
                       '"speaker"}, ...]')
    parser.add_argument("--channels", choices=["mix", "split"], default="mix",
                        help="split: score each channel of a 2-channel call on its own "
                        "(speakers ch0, ch1)")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service")
    parser.add_argument("--model-version", default=None,
                        help="a variant or an alias; default: the service's default")
    parser.add_argument("--head", default=None, help=HEAD_HELP)
    parser.add_argument("--out", default="-", help="results file: .jsonl or .csv (default: "
                        "JSON lines on stdout)")
    parser.add_argument("--concurrency", type=int, default=2, help="recordings at once")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds per recording")
    parser.add_argument("--tries", type=int, default=5,
                        help="attempts per recording when the service answers 503 or 429")
    parser.add_argument("--backoff", type=float, default=1.0,
                        help="first retry delay in seconds, doubled each time")
    parser.add_argument("--max-backoff", type=float, default=60.0, help="longest retry delay")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--api-key", default=api_key_default,
                        help=f"the service's API key (default: ${api_key_env})")


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.concurrency < 1 or args.tries < 1 or args.timeout <= 0:
        parser.error("--concurrency and --tries must be at least 1, --timeout positive")
    if args.out != "-" and Path(args.out).suffix.lower() not in (".jsonl", ".csv"):
        parser.error("--out must end in .jsonl or .csv")
    try:
        items = recordings(args.inputs, args.rttm, args.segments)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    if not items:
        parser.error("no audio files found")
    outcomes = asyncio.run(send_all(items, args, progress=not args.no_progress))
    if args.out == "-":
        write(outcomes, sys.stdout, as_csv=False)
    else:
        with open(args.out, "w", newline="", encoding="utf-8") as out:
            write(outcomes, out, as_csv=args.out.lower().endswith(".csv"))
    print(summary(outcomes), file=sys.stderr)
    return 0 if all(o.status == "ok" for o in outcomes) else 1
