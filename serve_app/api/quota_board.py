"""The board on which the Router's replicas share their quota notes
(serve_app/traffic/quota_share.py): Ray's key-value store in the GCS, on the head node, beside
the Serve controller's own state. No new process, and nothing on the request path: a background
task of each replica exchanges notes every `quota_sync_s`; one that cannot reach the board goes
on alone."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from serve_app.traffic.quota_share import QuotaShare

logger = logging.getLogger("ray.serve")

NAMESPACE = "emotion2vec-quotas"
EXCHANGE_TIMEOUT_S = 5.0  # an exchange that takes longer is given up (the next one tries again)


class GcsBoard:
    """One replica's view of the board: its own note, and the other replicas' of its app."""

    def __init__(self, app_name: str, replica: str):
        self.prefix = f"{app_name}/"
        self.name = self.prefix + replica

    def exchange(self, note: bytes) -> dict[str, bytes]:
        """Put this replica's note; the others' notes by name. Blocking (GCS calls)."""
        from ray.experimental import internal_kv as kv

        kv._internal_kv_put(self.name, note, overwrite=True, namespace=NAMESPACE)
        notes = {}
        for raw_name in kv._internal_kv_list(self.prefix, namespace=NAMESPACE):
            name = raw_name.decode()
            if name != self.name:
                value = kv._internal_kv_get(name, namespace=NAMESPACE)
                if value is not None:
                    notes[name] = value
        return notes

    def forget(self, names: list[str]) -> None:
        from ray.experimental import internal_kv as kv

        for name in names:
            kv._internal_kv_del(name, namespace=NAMESPACE)


async def share_quotas(share: QuotaShare, board: GcsBoard, interval_s: Callable[[], float]
                       ) -> None:
    """Forever: every interval_s() seconds, while some key has a quota, exchange notes. A
    failure is logged once (until an exchange works again); the replica goes on alone."""
    pending: asyncio.Future | None = None
    failing = False
    while True:
        await asyncio.sleep(interval_s())
        if not share.active or (pending is not None and not pending.done()):
            continue  # nothing to share, or a slow exchange still holds its thread
        try:
            pending = asyncio.ensure_future(asyncio.to_thread(board.exchange, share.note()))
            notes = await asyncio.wait_for(asyncio.shield(pending), EXCHANGE_TIMEOUT_S)
            drop = share.absorb(notes)
            if drop:
                await asyncio.wait_for(asyncio.to_thread(board.forget, drop),
                                       EXCHANGE_TIMEOUT_S)
            if failing:
                logger.info("quota exchange works again")
            failing = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not failing:
                logger.warning("quota exchange failed (%r): this router replica enforces the "
                               "quotas alone until it works again", exc)
            failing = True
