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


class Aliases:
    """Names that stand for a target (a plain alias) or for a weighted set of targets (a
    canary), picked per request as this module's docstring says. Variants and head revisions
    (serve_app/heads) are routed by the same rule."""

    def __init__(self, aliases: Mapping[str, str | Mapping[str, float]],
                 rng: random.Random | None = None):
        self.aliases = dict(aliases)
        # Weighted aliases, in their configured order, with weights as given (validated by
        # the settings: finite, >= 0, one above 0).
        self._weighted = {alias: [(t, float(w)) for t, w in target.items()]
                          for alias, target in aliases.items() if not isinstance(target, str)}
        self._rng = rng or random.Random()

    def __contains__(self, name: str) -> bool:
        return name in self.aliases

    def is_weighted(self, name: str) -> bool:
        return name in self._weighted

    def fractions(self) -> dict[str, dict[str, float]]:
        """Each alias's share of requests per target (a plain alias: 1.0 to its target)."""
        shares = {}
        for alias, target in self.aliases.items():
            if isinstance(target, str):
                shares[alias] = {target: 1.0}
            else:
                total = sum(weight for _, weight in self._weighted[alias])
                shares[alias] = {t: weight / total for t, weight in self._weighted[alias]}
        return shares

    def targets(self, name: str) -> list[str]:
        """Every target an alias may route to (weighted: those with a weight above 0)."""
        if name in self._weighted:
            return [target for target, weight in self._weighted[name] if weight > 0]
        return [self.aliases[name]]

    def pick(self, name: str, session_key: str | None = None) -> str:
        """The target of an alias for one request: by weight, sticky per session key."""
        if name not in self._weighted:
            return self.aliases[name]
        weights = self._weighted[name]
        return self._sticky(weights, session_key) if session_key else self._draw(weights)

    def _draw(self, weights: list[tuple[str, float]]) -> str:
        point = self._rng.random() * sum(weight for _, weight in weights)
        for target, weight in weights:
            if point < weight:
                return target
            point -= weight
        return next(t for t, weight in reversed(weights) if weight > 0)  # float rounding

    @staticmethod
    def _sticky(weights: list[tuple[str, float]], key: str) -> str:
        return max((weight / -math.log(key_hash(key, target)), target)
                   for target, weight in weights if weight > 0)[1]


class RoutingTable:
    """Resolves model_version names to variants; built once per router configuration."""

    def __init__(self, default_version: str, aliases: Mapping[str, str | Mapping[str, float]],
                 variants: Sequence[str], rng: random.Random | None = None):
        self.default_version = default_version
        self.variants = list(variants)
        self.aliases = Aliases(aliases, rng)

    @property
    def names(self) -> list[str]:
        """Every name a request may ask for."""
        return sorted([*self.variants, *self.aliases.aliases])

    def fractions(self) -> dict[str, dict[str, float]]:
        """Each alias's share of requests per variant (a plain alias: 1.0 to its variant)."""
        return self.aliases.fractions()

    def targets(self, requested: str | None) -> list[str] | None:
        """Every variant a name may route to (a weighted alias: those with a weight above 0),
        or None if no variant has that name."""
        name = requested or self.default_version
        targets = self.aliases.targets(name) if name in self.aliases else [name]
        return targets if all(t in self.variants for t in targets) else None

    def resolve(self, requested: str | None, session_key: str | None = None) -> Route | None:
        """The route for a requested model_version, or None if no variant has that name."""
        name = requested or self.default_version
        routed_by = name if self.aliases.is_weighted(name) else None
        variant = self.aliases.pick(name, session_key) if name in self.aliases else name
        return Route(name, variant, routed_by) if variant in self.variants else None
