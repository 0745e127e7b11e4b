"""What the client commands share (`predict`, `segments`, `batch`): finding the audio files
named on the command line, and posting to the service with retries. No server code here."""

from __future__ import annotations

import asyncio
import email.utils
import glob
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au",
                  ".caf", ".w64", ".rf64",  # libsndfile's
                  ".m4a", ".mp4", ".mov", ".3gp", ".3g2", ".webm", ".mkv", ".mka", ".aac",
                  ".wma", ".amr"}  # FFmpeg's
# 500/502/504: what a proxy or load balancer answers for a replica or pod that died mid-request
RETRY_STATUSES = {429, 500, 502, 503, 504}
# the --head flag of predict, segments and stream
HEAD_HELP = ("a custom head: NAME, NAME@REV or a head alias (GET /v1/heads); its labels "
             "replace the nine (default: the model's own head)")


def expand(inputs: list[str]) -> list[Path]:
    """Files as given (any name), the audio files under each directory, sorted, and what a
    glob pattern matches (its directories searched likewise)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists() and glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no file matches {item}")
            files.extend(expand(matches))
        elif path.is_dir():
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


def error_text(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{response.status_code} {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code}: {response.text[:200]}"


@dataclass
class Sent:
    """What posting one request, with retries, came to."""
    response: httpx.Response | None  # the last answer; None when the last try got none
    error: str | None                # why it did not succeed; None on a 200
    attempts: int


async def post_with_retries(client: httpx.AsyncClient, route: str, files: dict,
                            data: dict[str, str], tries: int, base_s: float,
                            max_s: float) -> Sent:
    """POST, sent again (with backoff, honouring Retry-After) after 429/500/502/503/504, a
    refused connection, or a connection dropped mid-answer (its server went away: predict and
    segments have no side effects); never after a timeout (the server may still be working)."""
    error = None
    for attempt in range(tries):
        response, retry_after = None, None
        try:
            response = await client.post(route, files=files, data=data)
        except httpx.ConnectError as exc:  # nothing was sent: safe to try again
            error = f"cannot connect: {exc}"
        except httpx.TimeoutException as exc:  # the server may be busy: not asked again
            return Sent(None, f"{type(exc).__name__}: {exc}", attempt + 1)
        except httpx.TransportError as exc:  # the connection dropped: its server went away
            error = f"{type(exc).__name__}: {exc}"
        except httpx.HTTPError as exc:
            return Sent(None, f"{type(exc).__name__}: {exc}", attempt + 1)
        else:
            if response.status_code == 200:
                return Sent(response, None, attempt + 1)
            error = error_text(response)
            if response.status_code not in RETRY_STATUSES:
                return Sent(response, error, attempt + 1)
            retry_after = response.headers.get("retry-after")
        if attempt + 1 < tries:
            await asyncio.sleep(backoff_delay(attempt, retry_after, base_s, max_s))
    return Sent(response, error, tries)
