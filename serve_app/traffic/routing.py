"""Which variant answers a request: the router's routing table, built from its settings.

A requested model_version (or the default) is a variant, a plain alias (one variant), or a
weighted alias ({variant: weight}, a canary). A weighted alias picks per request:
- without a session key, at random by weight;
- with one (the X-Session-Key header), by weighted rendezvous hashing: each variant scores
  `weight / -ln(h)` with `h` a hash of (variant, key) in (0, 1), and the highest score wins.
  The choice depends only on the key, the variants and their weights (every router replica
  agrees, a restart changes nothing), each variant gets its weight's share of the keys, and
  changing one variant's weight moves keys only to it (raised) or away from it (lowered):
  never between the others.

No Ray, no HTTP: unit-tested on its own.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    name: str                # what was asked for (or the default): a variant or an alias
    variant: str             # the variant that answers
    routed_by: str | None    # the weighted alias that chose the variant; None otherwise


def key_hash(key: str, variant: str) -> float:
    """A uniform, stable hash of (variant, key) in the open interval (0, 1)."""
    digest = hashlib.blake2b(f"{variant}\x00{key}".encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2.0 ** 64


class RoutingTable:
    """Resolves model_version names to variants; built once per router configuration."""

    def __init__(self, default_version: str, aliases: Mapping[str, str | Mapping[str, float]],
                 variants: Sequence[str], rng: random.Random | None = None):
        self.default_version = default_version
        self.variants = list(variants)
        self.aliases = dict(aliases)
        # Weighted aliases, in their configured order, with weights as given (validated by
        # RouterSettings: finite, >= 0, one above 0).
        self._weighted = {alias: [(v, float(w)) for v, w in target.items()]
                          for alias, target in aliases.items() if not isinstance(target, str)}
        self._rng = rng or random.Random()

    @property
    def names(self) -> list[str]:
        """Every name a request may ask for."""
        return sorted([*self.variants, *self.aliases])

    def fractions(self) -> dict[str, dict[str, float]]:
        """Each alias's share of requests per variant (a plain alias: 1.0 to its variant)."""
        shares = {}
        for alias, target in self.aliases.items():
            if isinstance(target, str):
                shares[alias] = {target: 1.0}
            else:
                total = sum(weight for _, weight in self._weighted[alias])
                shares[alias] = {v: weight / total for v, weight in self._weighted[alias]}
        return shares

    def targets(self, requested: str | None) -> list[str] | None:
        """Every variant a name may route to (a weighted alias: those with a weight above 0),
        or None if no variant has that name."""
        name = requested or self.default_version
        if name in self._weighted:
            return [variant for variant, weight in self._weighted[name] if weight > 0]
        variant = self.aliases.get(name, name)
        return [variant] if variant in self.variants else None

    def resolve(self, requested: str | None, session_key: str | None = None) -> Route | None:
        """The route for a requested model_version, or None if no variant has that name."""
        name = requested or self.default_version
        if name in self._weighted:
            weights = self._weighted[name]
            variant = self._sticky(weights, session_key) if session_key else self._draw(weights)
            return Route(name, variant, name)
        variant = self.aliases.get(name, name)
        return Route(name, variant, None) if variant in self.variants else None

    def _draw(self, weights: list[tuple[str, float]]) -> str:
        point = self._rng.random() * sum(weight for _, weight in weights)
        for variant, weight in weights:
            if point < weight:
                return variant
            point -= weight
        return next(v for v, weight in reversed(weights) if weight > 0)  # float rounding

    @staticmethod
    def _sticky(weights: list[tuple[str, float]], key: str) -> str:
        return max((weight / -math.log(key_hash(key, variant)), variant)
                   for variant, weight in weights if weight > 0)[1]
