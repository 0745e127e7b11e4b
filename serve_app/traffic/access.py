"""Access control: API keys and per-key quotas. Pure logic (no Ray, no web framework): the
router calls `AccessControl.admit()` first on every /v1 route, before it reads a body; the
stream calls it with its WebSocket's headers and `api_key` query parameter.

- Keys are configured by their sha256 (`emotion2vec-serve keys new` makes one). A presented key
  is hashed and compared with every configured digest by hmac.compare_digest, with no early
  exit. Keys are never stored, logged or echoed: logs and metrics carry the key id.
- Quotas are token buckets per key, one for requests and one for seconds of audio, refilled
  continuously at the per-minute rate; `quota_window_s` sets how much may be spent at once.
  A request needs a request token and a positive audio balance. Audio is charged after
  decoding: the request that crosses the audio quota is served in full, and its excess is a
  debt the key's next requests wait out (429 with Retry-After). A refused request costs nothing.
- The buckets live in each router replica, which also counts what each key spent there
  (`spent`); serve_app/traffic/quota_share.py takes the other replicas' spending from them
  (`debit`), so that a key's quotas hold across N replicas instead of N times over. A redeploy
  keeps a key's buckets while its limits stay the same.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import TypeAdapter, ValidationError

from serve_app.config import ApiKeys, ApiKeySpec, RouterSettings, without_inputs
from serve_app.errors import AccessDenied, ApiError

logger = logging.getLogger("ray.serve")

ANONYMOUS = "anonymous"  # the key label while access control is off
INVALID = "invalid"      # the label of every refused key: metric labels stay those of the config
FILE_CHECK_S = 5.0       # a changed api_keys_file is read again within this long
AUDIO_ENTRY_S = 0.001    # "a positive audio balance": at least a millisecond left
# The deepest debt a bucket holds, in bucket capacities: deeper than any one request makes
# (a 30 min recording on a 30 s/min key is 60), and a bound on what another replica's note
# can take.
MAX_DEBT_CAPACITIES = 100
_KEY = re.compile(r"^[\x21-\x7e]{1,256}$")  # visible ASCII, as a header carries it
_CHALLENGE = 'Bearer realm="emotion2vec-serve"'
_KEYS_FILE = TypeAdapter(ApiKeys)


@dataclass
class Admission:
    """An admitted request: whose key (None while access control is off), and the
    X-RateLimit-* headers for its response."""

    key_id: str | None
    headers: dict[str, str]

    @property
    def label(self) -> str:
        return self.key_id or ANONYMOUS


@dataclass
class Bucket:
    """A token bucket: up to `capacity`, refilled at `rate` a second; a request needs `entry`.
    Audio is charged after the fact, so the level may fall below zero."""

    resource: str  # "requests" or "audio_seconds"
    capacity: float
    rate: float
    entry: float
    level: float
    updated: float

    @classmethod
    def full(cls, resource: str, per_minute: float, window_s: float, entry: float,
             now: float) -> Bucket:
        capacity = max(entry, per_minute * window_s / 60)
        return cls(resource, capacity, per_minute / 60, entry, capacity, now)

    def shape(self) -> tuple:
        return self.resource, self.capacity, self.rate

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, amount: float) -> None:
        """Spend `amount`; the level may go below zero, down to MAX_DEBT_CAPACITIES."""
        self.level = max(self.level - amount, -MAX_DEBT_CAPACITIES * self.capacity)

    def wait_s(self) -> float:
        """Seconds until this bucket admits a request again."""
        return max(0.0, (self.entry - self.level) / self.rate)

    def headers(self) -> dict[str, str]:
        def number(value: float) -> str:  # whole requests; audio to a tenth of a second
            value = max(0.0, value)
            return str(math.floor(value + 1e-9)) if self.resource == "requests" \
                else f"{math.floor(value * 10 + 1e-9) / 10:g}"

        return {"X-RateLimit-Limit": number(self.capacity),
                "X-RateLimit-Remaining": number(self.level),
                "X-RateLimit-Reset": str(math.ceil((self.capacity - self.level) / self.rate)),
                "X-RateLimit-Resource": self.resource}


def _buckets(spec: ApiKeySpec, window_s: float, now: float) -> list[Bucket]:
    buckets = []
    if spec.requests_per_minute:
        buckets.append(Bucket.full("requests", spec.requests_per_minute, window_s, 1.0, now))
    if spec.audio_seconds_per_minute:
        buckets.append(Bucket.full("audio_seconds", spec.audio_seconds_per_minute, window_s,
                                   AUDIO_ENTRY_S, now))
    return buckets


def _stamp(path: Path) -> tuple | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def read_keys_file(path: Path) -> tuple[dict[str, ApiKeySpec], tuple | None]:
    """(keys, the file's stamp) from a YAML or JSON file shaped as `api_keys`; ValueError naming
    the file and what is wrong with it."""
    stamp = _stamp(path)  # before reading: a change while reading is seen next time
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"api_keys_file {path}: cannot read it ({exc.strerror}). Put in it "
                         "the lines `emotion2vec-serve keys new KEY_ID` prints") from None
    try:
        data = yaml.safe_load(text)  # JSON is YAML too
        return _KEYS_FILE.validate_python({} if data is None else data), stamp
    except yaml.YAMLError as exc:
        raise ValueError(f"api_keys_file {path}: not YAML or JSON: {exc}") from None
    except ValidationError as exc:
        raise ValueError(f"api_keys_file {path}: {without_inputs(exc)}") from None


def _merge(inline: dict[str, ApiKeySpec], from_file: dict[str, ApiKeySpec],
           path: Path | None) -> dict[str, ApiKeySpec]:
    both = sorted(inline.keys() & from_file.keys())
    if both:
        raise ValueError(f"API key ids {both} are both in api_keys and in {path}")
    table = {**inline, **from_file}
    if len({spec.sha256 for spec in table.values()}) != len(table):
        raise ValueError("two API key ids have the same sha256 (one key for two ids)")
    return table


def presented_key(headers: Mapping[str, str], query_api_key: str | None) -> str | None:
    """The key a request carries: `Authorization: Bearer KEY`, else `X-API-Key: KEY`, else the
    query parameter (the stream's alone). "" when the Authorization header is not Bearer."""
    lowered = {name.lower(): value for name, value in headers.items()}
    authorization = lowered.get("authorization")
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer":
            return token.strip()
    if "x-api-key" in lowered:
        return lowered["x-api-key"].strip()
    if query_api_key is not None:
        return query_api_key
    return "" if authorization is not None else None


def callback_secret(key: str) -> str:
    """The secret that signs a key's job callbacks (docs/jobs.md): derived from the key, so
    that only the Router that sees the key and its holder know it, and nothing is stored
    beside the key's sha256. `emotion2vec-serve keys new` prints it with the key."""
    return hmac.new(key.encode(), b"emotion2vec-serve job callbacks", hashlib.sha256).hexdigest()


class AccessControl:
    """The key table and the buckets of one router replica."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 on_file_state: Callable[[str], None] = lambda state: None):
        self._clock = clock
        self._on_file_state = on_file_state  # "ok", "missing" or "invalid" (a metric)
        self._buckets: dict[str, list[Bucket]] = {}
        # (key id, resource) -> all that this replica has charged the key, since it started
        self.spent: dict[tuple[str, str], float] = {}
        self.configure(RouterSettings())  # open (no keys) until the router's config names some

    @property
    def enabled(self) -> bool:
        """On when keys are configured inline or a key file is named (even an empty one)."""
        return bool(self._inline) or self._file is not None

    def configure(self, settings: RouterSettings) -> None:
        """Take the keys of a new user_config. A missing or invalid key file, or ambiguous
        keys, raise ValueError and change nothing: such a config is refused, not served open."""
        path = Path(settings.api_keys_file).expanduser() if settings.api_keys_file else None
        from_file, stamp = read_keys_file(path) if path else ({}, None)
        table = _merge(settings.api_keys, from_file, path)
        self._inline, self._file, self._window_s = settings.api_keys, path, settings.quota_window_s
        self._install(table, stamp)
        self._on_file_state("ok" if path else "none")

    def _install(self, table: dict[str, ApiKeySpec], stamp: tuple | None) -> None:
        now = self._clock()
        buckets = {}
        for key_id, spec in table.items():
            fresh, old = _buckets(spec, self._window_s, now), self._buckets.get(key_id)
            keep = old is not None and [b.shape() for b in old] == [b.shape() for b in fresh]
            buckets[key_id] = old if keep else fresh
        self._digests = {key_id: bytes.fromhex(spec.sha256) for key_id, spec in table.items()}
        self._head_writers = {key_id for key_id, spec in table.items() if spec.heads == "write"}
        self._specs = table
        self._buckets = buckets
        self._file_stamp, self._next_file_check = stamp, now + FILE_CHECK_S

    def _reread_file_if_changed(self) -> None:
        """A key file edited in place applies within FILE_CHECK_S; a broken one is logged and
        the keys read before stay in force."""
        now = self._clock()
        if self._file is None or now < self._next_file_check:
            return
        self._next_file_check = now + FILE_CHECK_S
        stamp = _stamp(self._file)
        if stamp == self._file_stamp:
            return
        if stamp is None:
            # Removed: its keys are revoked (fail closed) until the file is back.
            self._install(dict(self._inline), None)
            logger.error("api_keys_file %s is gone: its keys are revoked until it is back",
                         self._file)
            self._on_file_state("missing")
            return
        try:
            from_file, stamp = read_keys_file(self._file)
            self._install(_merge(self._inline, from_file, self._file), stamp)
            logger.info("API keys re-read from %s: %d keys", self._file, len(self._digests))
            self._on_file_state("ok")
        except ValueError as exc:
            # A typo neither opens nor closes the service: the last good keys stay.
            self._file_stamp = stamp  # logged once per change of the file
            logger.error("%s; the keys read before stay in force", exc)
            self._on_file_state("invalid")

    @staticmethod
    def _refuse(message: str, presented: bool = True) -> AccessDenied:
        challenge = _CHALLENGE + (', error="invalid_token"' if presented else "")
        return AccessDenied(401, "unauthorized", message, INVALID,
                            {"WWW-Authenticate": challenge})

    def authenticate(self, headers: Mapping[str, str],
                     query_api_key: str | None = None) -> str | None:
        """The id of the caller's key (None while access control is off), or AccessDenied 401
        for a missing, malformed or unknown key."""
        self._reread_file_if_changed()
        if not self.enabled:
            return None
        key = presented_key(headers, query_api_key)
        if key is None:
            raise self._refuse("an API key is required: send the header `Authorization: "
                               "Bearer KEY` or `X-API-Key: KEY`", presented=False)
        if not _KEY.fullmatch(key):
            raise self._refuse("the API key is malformed: send `Authorization: Bearer KEY` "
                               "with the key as it was given (1 to 256 visible characters)")
        digest = hashlib.sha256(key.encode("ascii")).digest()
        found = None
        for key_id, expected in self._digests.items():  # all of them: the time is the same
            if hmac.compare_digest(digest, expected):
                found = key_id
        if found is None:
            raise self._refuse("the API key is not valid")
        return found

    def admit(self, headers: Mapping[str, str], query_api_key: str | None = None,
              audio: bool = True) -> Admission:
        """Authenticate, then take one request from the key's quotas: AccessDenied 401, or 429
        with Retry-After and X-RateLimit-* when a quota is spent (nothing is charged then).
        `audio=False`: a request that scores no audio (a job's status) needs no audio balance."""
        key_id = self.authenticate(headers, query_api_key)
        if key_id is None:
            return Admission(None, {})
        buckets = self._refilled(key_id)
        spent = [bucket for bucket in buckets if bucket.level < bucket.entry
                 and (audio or bucket.resource != "audio_seconds")]
        if spent:
            raise self._over_quota(key_id, max(spent, key=Bucket.wait_s))
        for bucket in buckets:
            if bucket.resource == "requests":
                bucket.level -= 1
                self._count(key_id, "requests", 1.0)
        tightest = min(buckets, key=lambda b: b.level / b.capacity, default=None)
        return Admission(key_id, tightest.headers() if tightest else {})

    def check_heads_write(self, admission: Admission) -> None:
        """403 forbidden unless the admitted key may register and delete heads (its config
        line says `heads: write`); with no keys configured, anyone may."""
        if self.enabled and admission.key_id not in self._head_writers:
            raise ApiError(403, "forbidden", f"key {admission.label!r} may not change heads: "
                           "its config line needs `heads: write`")

    def spec(self, key_id: str | None) -> ApiKeySpec | None:
        """A key's config line (its quotas), for a job that charges the key on its own."""
        return None if key_id is None else self._specs.get(key_id)

    def check_audio(self, key_id: str | None) -> None:
        """AccessDenied 429 while the key's audio balance is spent (for a stream, before each
        piece's model work)."""
        for bucket in self._refilled(key_id):
            if bucket.resource == "audio_seconds" and bucket.level < bucket.entry:
                raise self._over_quota(key_id, bucket)

    def charge_audio(self, key_id: str | None, seconds: float) -> None:
        """Charge decoded audio to the key; the balance may go below zero."""
        for bucket in self._refilled(key_id):
            if bucket.resource == "audio_seconds":
                bucket.take(seconds)
                self._count(key_id, "audio_seconds", seconds)

    def _count(self, key_id: str, resource: str, amount: float) -> None:
        self.spent[key_id, resource] = self.spent.get((key_id, resource), 0.0) + amount

    def debit(self, key_id: str, resource: str, amount: float) -> None:
        """What the key spent elsewhere (another router replica), taken from its bucket here;
        the level may go below zero: a debt later requests wait out."""
        for bucket in self._refilled(key_id):
            if bucket.resource == resource:
                bucket.take(amount)

    def levels(self) -> dict[tuple[str, str], float]:
        """Each quota's current level: (key id, resource) -> tokens left (may be negative)."""
        return {(key_id, bucket.resource): bucket.level
                for key_id in self._buckets for bucket in self._refilled(key_id)}

    def lower_to(self, key_id: str, resource: str, level: float) -> None:
        """Lower a quota's level to `level` if it is above (a replica that starts late takes
        the others' balance instead of a full bucket)."""
        for bucket in self._refilled(key_id):
            if bucket.resource == resource and level < bucket.level:
                bucket.take(bucket.level - level)

    def _refilled(self, key_id: str | None) -> list[Bucket]:
        buckets = self._buckets.get(key_id, []) if key_id is not None else []
        now = self._clock()
        for bucket in buckets:
            bucket.refill(now)
        return buckets

    def _over_quota(self, key_id: str, bucket: Bucket) -> AccessDenied:
        retry = max(1, math.ceil(bucket.wait_s()))
        what = "requests" if bucket.resource == "requests" else "seconds of audio"
        return AccessDenied(
            429, "rate_limited", f"API key {key_id!r} is over its quota of "
            f"{bucket.rate * 60:g} {what} per minute; retry in {retry} s", key_id,
            {**bucket.headers(), "Retry-After": str(retry)})
