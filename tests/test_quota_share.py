"""Quotas across router replicas (serve_app/traffic/quota_share.py), without Ray: replicas of
AccessControl on one clock of the test's own, exchanging notes through a dict as board."""

from __future__ import annotations

import hashlib
import json

import pytest

from serve_app.config import RouterSettings
from serve_app.traffic.access import AccessControl, AccessDenied
from serve_app.traffic.quota_share import STALE_S, QuotaShare

KEY = "k-ops"
HEADERS = {"Authorization": f"Bearer {KEY}"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Replica:
    """One router replica: its gate, its side of the exchange, its name on the board."""

    def __init__(self, name: str, clock: Clock, **quota):
        self.name = name
        self.gate = AccessControl(clock)
        self.gate.configure(RouterSettings(api_keys={"ops": {
            "sha256": hashlib.sha256(KEY.encode()).hexdigest(), **quota}}, quota_window_s=60))
        self.share = QuotaShare(self.gate, clock)

    def exchange(self, board: dict[str, bytes]) -> None:
        board[self.name] = self.share.note()
        for name in self.share.absorb({n: v for n, v in board.items() if n != self.name}):
            board.pop(name, None)

    def admit(self) -> bool:
        try:
            self.gate.admit(HEADERS)
            return True
        except AccessDenied as exc:
            assert exc.status == 429
            return False


def run(replicas: list[Replica], clock: Clock, seconds: float, share_of, sync_s: float | None,
        board: dict, attempts_per_s: int = 20) -> int:
    """Requests at a steady pace for `seconds`, each to the replica share_of(i) picks; every
    replica exchanges every sync_s (None: never). The number admitted."""
    step = 1.0 / attempts_per_s
    admitted, next_sync = 0, clock.now
    for i in range(round(seconds * attempts_per_s)):  # bounded: a fixed number of steps
        clock.now += step
        if sync_s is not None and clock.now >= next_sync:
            for replica in replicas:
                replica.exchange(board)
            next_sync = clock.now + sync_s
        admitted += replicas[share_of(i)].admit()
    return admitted


@pytest.mark.parametrize("share_of", [lambda i: i % 2, lambda i: 0 if i % 10 else 1],
                         ids=["even", "skewed-90-10"])
def test_two_replicas_hold_one_quota(share_of):
    """60 requests a minute: after the first burst, a minute at 20 attempts a second admits
    ~60 whether the proxy splits the key's requests evenly or not; without the exchange each
    replica admits its own 60."""
    clock, board = Clock(), {}
    replicas = [Replica(n, clock, requests_per_minute=60) for n in ("a", "b")]
    run(replicas, clock, 10, share_of, 0.5, board)  # the initial burst, drained
    admitted = run(replicas, clock, 60, share_of, 0.5, board)
    assert 48 <= admitted <= 72, admitted

    alone_clock, alone_board = Clock(), {}
    alone = [Replica(n, alone_clock, requests_per_minute=60) for n in ("a", "b")]
    run(alone, alone_clock, 10, lambda i: i % 2, None, alone_board)
    assert run(alone, alone_clock, 60, lambda i: i % 2, None, alone_board) >= 110


def test_one_replica_is_unchanged_by_the_exchange():
    clock, board = Clock(), {}
    replicas = [Replica("a", clock, requests_per_minute=60)]
    run(replicas, clock, 10, lambda i: 0, 0.5, board)
    assert 58 <= run(replicas, clock, 60, lambda i: 0, 0.5, board) <= 62


def test_audio_spent_on_one_replica_is_taken_from_the_other():
    clock, board = Clock(), {}
    a, b = (Replica(n, clock, audio_seconds_per_minute=30) for n in ("a", "b"))
    for replica in (a, b):
        replica.exchange(board)  # both joined
    assert a.admit()
    a.gate.charge_audio("ops", 40.0)  # 10 s beyond the 30 s balance: a debt
    b.exchange(board)
    assert b.admit()  # b has not seen it yet
    a.exchange(board)
    b.exchange(board)
    with pytest.raises(AccessDenied) as denied:
        b.gate.admit(HEADERS)
    assert denied.value.headers["X-RateLimit-Resource"] == "audio_seconds"
    assert 19 <= int(denied.value.headers["Retry-After"]) <= 21  # 10 s of debt at 0.5 s/s
    clock.now += 21
    assert b.admit()


def test_a_late_replica_starts_from_the_others_balance_not_a_full_bucket():
    clock, board = Clock(), {}
    a = Replica("a", clock, requests_per_minute=60)
    a.exchange(board)
    while a.admit():  # the whole burst
        clock.now += 0.01
    a.exchange(board)
    late = Replica("late", clock, requests_per_minute=60)
    late.exchange(board)
    assert not late.admit()


def test_a_replica_that_comes_later_counts_all_it_spent():
    clock, board = Clock(), {}
    a = Replica("a", clock, requests_per_minute=60)
    a.exchange(board)
    b = Replica("b", clock, requests_per_minute=60)
    for _ in range(20):
        assert b.admit()  # before b's first exchange: its own full bucket
    b.exchange(board)
    a.exchange(board)
    assert a.gate.levels()[("ops", "requests")] == pytest.approx(40, abs=0.5)


def test_stale_and_unreadable_notes_are_dropped_and_ignored():
    clock, board = Clock(), {}
    a = Replica("a", clock, requests_per_minute=60)
    a.exchange(board)
    board["gone"] = json.dumps({"at": clock.now - STALE_S - 1, "spent": {"ops/requests": 500.0},
                                "levels": {"ops/requests": -500.0}}).encode()
    board["garbage"] = b"not json"
    a.exchange(board)
    assert set(board) == {"a"}
    assert a.gate.levels()[("ops", "requests")] == pytest.approx(60)


def test_without_quotas_there_is_nothing_to_share():
    gate = AccessControl(Clock())
    gate.configure(RouterSettings())
    assert not QuotaShare(gate).active
