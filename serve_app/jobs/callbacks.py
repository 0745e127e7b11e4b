"""A job's callback: one POST to the client's URL when the job ends, signed, retried with
backoff, and sent only where the service allows. No Ray, no torch.

The signature header is `t=<unix time>,v1=<hex>`, HMAC-SHA256 with the job's secret over
`<t>.` + body: the receiver recomputes it, compares in constant time and refuses an old `t` (a
replayed delivery). Several `v1=` may be given (while a secret is rotated).

A callback URL lets a client make the service send requests, so its host must be on the
service's allow-list, and a host that resolves to an internal address (loopback, private,
link-local with the cloud metadata address, CGNAT...) only when the list names it exactly. The
check is made again before every attempt, and the attempt connects to the addresses that were
checked, not to a second DNS answer that could point elsewhere.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from serve_app.errors import ApiError

SIGNATURE_HEADER = "Emotion2vec-Signature"
USER_AGENT = "emotion2vec-serve"
MAX_URL_CHARS = 2048
MAX_SIGNATURE_CHARS = 4096
DEFAULT_PORTS = {"http": 80, "https": 443}
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_URL_CHARACTERS = re.compile(r"[!-~]+")   # printable ASCII: no space, control or other text
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class InvalidCallback(ValueError):
    """A callback URL the service will not call (422 invalid_callback). `by_dns`: refused
    for what its host resolves to, which may change (the others will not)."""

    def __init__(self, message: str, by_dns: bool = False):
        super().__init__(message)
        self.by_dns = by_dns

    def api_error(self) -> ApiError:
        return ApiError(422, "invalid_callback", str(self))


# -- signatures -----------------------------------------------------------------------------

def _digest(secret: str, body: bytes, timestamp: int) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header's value for `body` sent at `timestamp` (unix seconds)."""
    return f"t={timestamp},v1={_digest(secret, body, timestamp)}"


def verify(secret: str, header: str, body: bytes, tolerance_s: float = 300,
           now: float | None = None) -> bool:
    """Whether the header signs `body` with `secret`, at most tolerance_s from now (either
    way); any one of several v1= may match. A malformed header is False."""
    if not isinstance(header, str) or len(header) > MAX_SIGNATURE_CHARS:
        return False
    timestamps, signatures = [], []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            timestamps.append(value)
        elif key == "v1":
            signatures.append(value)
    if len(timestamps) != 1 or not _TIMESTAMP.fullmatch(timestamps[0]) or not signatures:
        return False
    timestamp = int(timestamps[0])
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = _digest(secret, body, timestamp).encode()
    # Every candidate compared: the time taken does not say which one matched
    matches = [hmac.compare_digest(expected, candidate.encode("utf-8", "replace"))
               for candidate in signatures]
    return any(matches)


# -- where a callback may go ----------------------------------------------------------------

@dataclass(frozen=True)
class CallbackTarget:
    """A checked callback URL: where to connect, and what to send as Host and TLS name."""
    scheme: str
    host: str
    port: int
    path: str                   # with the query
    addresses: tuple[str, ...]  # as resolved and checked


def _canonical_host(host: str) -> str:
    """Lower case, no trailing dot; an IP address in its canonical form."""
    host = host.lower().removesuffix(".")
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host


def _allowed_entry(text: str) -> tuple[str, int | None]:
    """'host', 'host:port', '[v6]:port', a bare IPv6 address or '*.domain[:port]' as
    (host or pattern, port or None); ValueError for anything else."""
    text, port = text.strip().lower(), None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"allowed callback host {text!r}: expected [IPv6]:port")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host = text
    if port is not None:
        if not _TIMESTAMP.fullmatch(port) or not 0 < int(port) < 65536:
            raise ValueError(f"allowed callback host {text!r}: a port is 1 to 65535")
        port = int(port)
    host = _canonical_host(host)
    name = host.removeprefix("*.")
    if not _HOST_NAME.fullmatch(name) and not _is_ip(name):
        raise ValueError(f"allowed callback host {text!r}: expected a host name, an IP "
                         "address or *.domain, each with an optional :port")
    return host, port


def check_allowed_hosts(entries: list[str]) -> None:
    """ValueError for an entry of the allow-list that could never match (for the settings)."""
    for entry in entries:
        _allowed_entry(entry)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _match(host: str, port: int, allowed_hosts: list[str]) -> str | None:
    """'exact' when an entry names the host, 'wildcard' when only a *.domain covers it."""
    found = None
    for entry in allowed_hosts:
        pattern, entry_port = _allowed_entry(entry)
        if entry_port not in (None, port):
            continue
        if pattern == host:
            return "exact"
        if pattern.startswith("*.") and host.endswith(pattern[1:]) and not _is_ip(host):
            found = "wildcard"
    return found


def internal_reason(address: str) -> str | None:
    """Why an address is not a public one (loopback, private...), or None for a public one.
    An IPv6 address that carries an IPv4 one (mapped, 6to4, NAT64) is judged by it too."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or \
            (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None and (reason := internal_reason(str(embedded))):
            return f"{reason} (inside the IPv6 address {ip})"
    for is_it, reason in ((ip.is_loopback, "loopback"),
                          (ip.is_unspecified, "unspecified"),
                          (ip.is_link_local, "link-local (the cloud metadata address is one)"),
                          (ip.is_private, "private"),
                          (ip.version == 4 and ip in _CGNAT, "shared (CGNAT, 100.64.0.0/10)"),
                          (ip.is_multicast, "multicast"),
                          (ip.is_reserved, "reserved"),
                          (not ip.is_global, "not a public address")):
        if is_it:
            return reason
    return None


def callback_target(url: str, allowed_hosts: list[str], resolve=socket.getaddrinfo
                    ) -> CallbackTarget:
    """The checked target of a callback URL; InvalidCallback says what is wrong."""
    if not allowed_hosts:
        raise InvalidCallback("callbacks are off on this service: its list of allowed "
                              "callback hosts is empty")
    if not isinstance(url, str) or not 0 < len(url) <= MAX_URL_CHARS:
        raise InvalidCallback(f"callback_url must be a URL of at most {MAX_URL_CHARS} characters")
    if not _URL_CHARACTERS.fullmatch(url):
        raise InvalidCallback("callback_url must be printable ASCII, without spaces (a host "
                              "in its xn-- form, the rest percent-encoded)")
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise InvalidCallback(f"callback_url must be http or https, not {parts.scheme!r}")
    if "@" in parts.netloc:
        raise InvalidCallback("callback_url must not carry a user name or password")
    try:
        port = parts.port
    except ValueError:
        raise InvalidCallback("callback_url has an invalid port") from None
    if port == 0:
        raise InvalidCallback("callback_url has an invalid port")
    port = port or DEFAULT_PORTS[parts.scheme]
    host = _canonical_host(parts.hostname or "")
    if not _HOST_NAME.fullmatch(host) and not _is_ip(host):
        raise InvalidCallback(f"callback_url's host {host[:80]!r} is not a host name or IP "
                              "address")
    match = _match(host, port, allowed_hosts)
    if match is None:
        raise InvalidCallback(f"callback host {host}:{port} is not among this service's "
                              "allowed callback hosts")
    try:
        answers = resolve(host, port, type=socket.SOCK_STREAM)
        addresses = tuple(dict.fromkeys(str(answer[4][0]) for answer in answers))
    except (OSError, UnicodeError, ValueError) as exc:
        raise InvalidCallback(f"callback host {host} does not resolve: {exc}", True) from None
    if not addresses:
        raise InvalidCallback(f"callback host {host} does not resolve", True)
    for address in addresses if match == "wildcard" else ():
        reason = internal_reason(address)
        if reason:
            raise InvalidCallback(f"callback host {host} resolves to {address}, {reason}: "
                                  "allowed only when the allowed callback hosts name it "
                                  "exactly", True)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return CallbackTarget(parts.scheme, host, port, path, addresses)


def check_callback_url(url: str, allowed_hosts: list[str], resolve=socket.getaddrinfo) -> None:
    """InvalidCallback unless the service may call `url` (see callback_target)."""
    callback_target(url, allowed_hosts, resolve)


# -- delivery -------------------------------------------------------------------------------

@dataclass
class Attempt:
    """One delivery attempt, as the job's status records it."""
    at: str                # ISO 8601 UTC
    status: int | None     # the HTTP status, None when no answer came
    error: str | None      # None for a 2xx
    duration_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP or HTTPS to the checked addresses, Host and TLS server name from the URL, the
    whole exchange bounded by a deadline: per-operation timeouts alone let a server that
    sends a byte at a time hold an attempt for ever, so a watchdog shuts the socket down."""

    def __init__(self, target: CallbackTarget, timeout_s: float):
        super().__init__(target.host, target.port, timeout=timeout_s)
        self.default_port = DEFAULT_PORTS[target.scheme]  # no ":443" in the Host header
        self.target, self.timeout_s = target, timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.watchdog: threading.Timer | None = None
        self.handle: socket.socket | None = None
        self.cut = False

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"timed out after {self.timeout_s:g} s")
        return left

    def connect(self) -> None:
        error: OSError = OSError("no address")
        for address in self.target.addresses:
            try:
                sock = socket.create_connection((address, self.port), self._left())
                break
            except OSError as exc:
                error = exc
        else:
            raise error
        self.sock = sock   # closed by close(), whatever happens next
        # Its own descriptor, so that TLS wrapping (which detaches `sock`) leaves it usable
        self.handle = sock.dup()
        self.watchdog = threading.Timer(self._left(), self._cut)
        self.watchdog.daemon = True
        self.watchdog.start()
        if self.target.scheme == "https":
            context = ssl.create_default_context()
            self.sock = context.wrap_socket(sock, server_hostname=self.host)

    def _cut(self) -> None:
        self.cut = True
        try:
            self.handle.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # closed meanwhile

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
        if self.handle is not None:
            self.handle.close()
        super().close()


def _attempt(url: str, body: bytes, secret: str, allowed_hosts: list[str], timeout_s: float,
             resolve) -> tuple[Attempt, bool]:
    """The attempt, and whether another one could do better."""
    at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    started = time.monotonic()
    status = error = connection = None
    again = True
    try:
        target = callback_target(url, allowed_hosts, resolve)  # again: DNS may have changed
        connection = _PinnedConnection(target, timeout_s)
        connection.request("POST", target.path, body=body, headers={
            "Content-Type": "application/json", "User-Agent": USER_AGENT,
            SIGNATURE_HEADER: sign(secret, body, int(time.time())), "Connection": "close"})
        response = connection.getresponse()
        status = response.status
        if not 200 <= status < 300:
            redirect = " (a redirect: not followed)" if 300 <= status < 400 else ""
            error = f"HTTP {status}{redirect}"
    except InvalidCallback as exc:
        error, again = str(exc), exc.by_dns
    except (OSError, http.client.HTTPException) as exc:
        timed_out = isinstance(exc, TimeoutError) or (connection is not None and connection.cut)
        error = f"timed out after {timeout_s:g} s" if timed_out else \
            f"{type(exc).__name__}: {exc}"[:300]
    finally:
        if connection is not None:
            connection.close()
    return Attempt(at, status, error, round((time.monotonic() - started) * 1000, 1)), again


def deliver(url: str, body: bytes, secret: str, *, allowed_hosts: list[str], attempts: int = 5,
            timeout_s: float = 10.0, backoff_s: float = 1.0, max_backoff_s: float = 60.0,
            on_attempt: Callable[[Attempt], None] = lambda a: None, sleep=time.sleep,
            resolve=socket.getaddrinfo) -> bool:
    """POST `body` (JSON) to `url`, signed with `secret`, until a 2xx (True) or `attempts`
    attempts (False), waiting backoff_s, then twice as long each time up to max_backoff_s.
    Each attempt takes at most about timeout_s, follows no redirect, and is reported to
    on_attempt. A URL refused for what DNS cannot change (not allowed, callbacks off) is
    not tried again. Synchronous: the job driver calls it at the end of a job."""
    if attempts < 1 or timeout_s <= 0:
        raise ValueError("attempts must be 1 or more and timeout_s above 0")
    wait = min(backoff_s, max_backoff_s)
    for number in range(1, attempts + 1):
        attempt, again = _attempt(url, body, secret, allowed_hosts, timeout_s, resolve)
        on_attempt(attempt)
        if attempt.error is None:
            return True
        if not again:
            return False
        if number < attempts:
            sleep(wait)
            wait = min(wait * 2, max_backoff_s)
    return False
