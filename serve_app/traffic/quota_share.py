"""Quotas that hold across router replicas. Pure logic (no Ray, no HTTP).

Each router replica admits requests from its own token buckets (serve_app/traffic/access.py):
the request path stays local and fast. In the background, every `quota_sync_s`, it exchanges a
note with the other replicas of its app through a shared board (serve_app/api/quota_board.py):
- its note says what each key has spent at this replica since it started (running totals) and
  the current level of each of its buckets;
- from the others' notes it takes what each key spent there since its last look out of its own
  buckets.
So every replica's buckets follow the key's spending on all of them, whichever replica the
proxy picks (it prefers one on its own node: shares are rarely even). A key can overshoot by
what the other replicas admit within one exchange interval; the overshoot becomes a debt that
is paid back before the key is admitted again, so the rate over a minute holds. A replica that
joins late takes the lowest balance the others report instead of a full bucket. While the
board cannot be reached, each replica goes on alone (a key gets up to N times its quota) and
catches up with the others' spending at the next exchange that works.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable

from serve_app.traffic.access import AccessControl
from serve_app.untrusted import finite_float

STALE_S = 120.0  # a note not refreshed for this long belongs to a replica that is gone
FUTURE_S = 30.0  # clocks of nodes differ by less; a note from further ahead is not believed
MAX_TOTAL = 1e12  # far above any key's spending in a replica's life
MAX_SLOTS = 100_000  # (key, resource) pairs in one note


def _slot(key_id: str, resource: str) -> str:
    return f"{key_id}/{resource}"  # key ids have no "/" (config.KEY_ID)


def _unslot(slot: str) -> tuple[str, str]:
    key_id, _, resource = slot.rpartition("/")
    return key_id, resource


def _amounts(value, low: float) -> dict[str, float] | None:
    """A note's {slot: amount}, each slot a key id and resource, each amount a finite number
    in [low, MAX_TOTAL]; None when anything is off."""
    if not isinstance(value, dict) or len(value) > MAX_SLOTS:
        return None
    amounts = {}
    for slot, amount in value.items():
        if "/" not in slot or isinstance(amount, bool) or not isinstance(amount, (int, float)):
            return None
        amount = float(amount) if abs(amount) <= MAX_TOTAL else math.nan
        if not low <= amount <= MAX_TOTAL:  # NaN fails too
            return None
        amounts[slot] = amount
    return amounts


def read_note(raw: bytes, now: float) -> tuple[dict[str, float], dict[str, float]] | None:
    """Another replica's note as (spent totals, levels), or None when it is unreadable,
    stale, from the future, or holds a value no replica writes. A note is believed whole or
    not at all: one that is not cannot debit anything."""
    try:
        note = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(note, dict):
        return None
    try:
        at = finite_float(note.get("at"), "at")
    except ValueError:
        return None
    if not -FUTURE_S <= now - at <= STALE_S:
        return None
    spent = _amounts(note.get("spent"), 0.0)
    levels = _amounts(note.get("levels"), -MAX_TOTAL)
    return None if spent is None or levels is None else (spent, levels)


class QuotaShare:
    """One router replica's side of the exchange: its note, and the others' spending taken
    from its buckets."""

    def __init__(self, access: AccessControl, clock: Callable[[], float] = time.time):
        self.access = access
        self._clock = clock  # wall clock: notes come from other processes and nodes
        self._seen: dict[str, dict[str, float]] = {}  # other replica -> its totals, last look
        self._joined = False

    @property
    def active(self) -> bool:
        """Whether there is anything to share: some key has a quota."""
        return bool(self.access.levels())

    def note(self) -> bytes:
        """This replica's note for the board."""
        spent = {_slot(*slot): total for slot, total in self.access.spent.items()}
        levels = {_slot(*slot): level for slot, level in self.access.levels().items()}
        return json.dumps({"at": self._clock(), "spent": spent, "levels": levels}).encode()

    def absorb(self, notes: dict[str, bytes]) -> list[str]:
        """Take the spending the other replicas' notes show since the last look (their names
        -> notes; this replica's own left out) from this replica's buckets. Returns the names of
        the notes that are stale or unreadable, for the board to drop."""
        now, drop, fresh = self._clock(), [], {}
        for name, raw in notes.items():
            note = read_note(raw, now)
            if note is None:
                drop.append(name)
            else:
                fresh[name] = note
        if not self._joined:
            # First look: what the others spent before is already in their levels.
            self._take_lowest({name: levels for name, (_, levels) in fresh.items()})
            self._joined = True
        else:
            for name, (spent, _) in fresh.items():
                self._debit(self._seen.get(name, {}), spent)
        self._seen = {name: spent for name, (spent, _) in fresh.items()}
        return drop

    def _debit(self, before: dict[str, float], spent: dict[str, float]) -> None:
        for slot, total in spent.items():
            delta = total - before.get(slot, 0.0)
            if delta < 0:  # the same name started again from zero
                delta = total
            if delta > 0:
                self.access.debit(*_unslot(slot), delta)

    def _take_lowest(self, levels_by_replica: dict[str, dict[str, float]]) -> None:
        lowest: dict[str, float] = {}
        for levels in levels_by_replica.values():
            for slot, level in levels.items():
                lowest[slot] = min(level, lowest.get(slot, level))
        for slot, level in lowest.items():
            self.access.lower_to(*_unslot(slot), level)
