"""Routing tables and shadow statistics, without a cluster: weighted and sticky choices,
the 'moves only the keys it must' property of the consistent hashing, validation, and the
shadow's comparisons and bounded queue."""

from __future__ import annotations

import asyncio
import math
import random

import pytest
from pydantic import ValidationError

from serve_app.config import RouterSettings
from serve_app.errors import ApiError
from serve_app.traffic.routing import Route, RoutingTable
from serve_app.traffic.shadow import Shadow, ShadowStats, compare
from serve_app.wire import Scores

VARIANTS = ["base", "large", "large_ft"]
KEYS = [f"user-{i}" for i in range(20_000)]


def within_binomial(count: int, n: int, p: float, z: float = 4.5) -> bool:
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p))


def table(aliases: dict, default: str = "large", seed: int = 0) -> RoutingTable:
    return RoutingTable(default, aliases, VARIANTS, rng=random.Random(seed))


def sticky(aliases: dict, keys=KEYS) -> dict[str, str]:
    routes = table(aliases)
    return {key: routes.resolve("canary", key).variant for key in keys}


def test_names_plain_aliases_and_the_default():
    routes = table({"latest": "large", "canary": {"large": 90, "large_ft": 10}})
    assert routes.resolve(None) == Route("large", "large", None)
    assert routes.resolve("latest") == Route("latest", "large", None)
    assert routes.resolve("base", "some-key") == Route("base", "base", None)
    assert routes.resolve("nope") is None
    assert routes.names == ["base", "canary", "large", "large_ft", "latest"]
    assert routes.fractions() == {"latest": {"large": 1.0},
                                  "canary": {"large": 0.9, "large_ft": 0.1}}
    # The default may be a weighted alias; its route says so.
    assert table({"canary": {"large_ft": 1}}, default="canary").resolve(None) == \
        Route("canary", "large_ft", "canary")


def test_targets_are_every_variant_a_name_may_reach():
    routes = table({"latest": "large", "canary": {"large": 90, "large_ft": 10, "base": 0}})
    assert routes.targets("canary") == ["large", "large_ft"]  # weight 0: never reached
    assert routes.targets("latest") == routes.targets(None) == ["large"]
    assert routes.targets("base") == ["base"]
    assert routes.targets("nope") is None


def test_weighted_draws_lie_within_binomial_bounds():
    routes = table({"canary": {"base": 0, "large": 70, "large_ft": 30}})
    draws = [routes.resolve("canary").variant for _ in range(20_000)]
    assert draws.count("base") == 0
    assert within_binomial(draws.count("large_ft"), len(draws), 0.3)
    assert all(routes.resolve("canary").routed_by == "canary" for _ in range(10))


def test_sticky_keys_keep_their_variant_and_split_by_weight():
    routes = table({"canary": {"large": 90, "large_ft": 10}})
    first = {key: routes.resolve("canary", key).variant for key in KEYS[:500]}
    for _ in range(3):
        assert {key: routes.resolve("canary", key).variant for key in first} == first
    # Another table (another replica, a restart) with the same weights agrees.
    assert sticky({"canary": {"large_ft": 10, "large": 90}}, KEYS[:500]) == first
    chosen = sticky({"canary": {"base": 20, "large": 50, "large_ft": 30}})
    for variant, share in (("base", 0.2), ("large", 0.5), ("large_ft", 0.3)):
        assert within_binomial(list(chosen.values()).count(variant), len(KEYS), share), variant


def test_raising_a_weight_moves_only_the_keys_it_must():
    before = sticky({"canary": {"large": 90, "large_ft": 10}})
    after = sticky({"canary": {"large": 90, "large_ft": 20}})
    moved = [key for key in KEYS if before[key] != after[key]]
    assert all((before[k], after[k]) == ("large", "large_ft") for k in moved)
    # large_ft's share goes from 10/100 to 20/110: exactly that many keys move, no more.
    assert within_binomial(len(moved), len(KEYS), 20 / 110 - 10 / 100)

    # Three variants: changing large_ft's weight never moves a key between base and large.
    three = {"base": 50, "large": 40, "large_ft": 10}
    start = sticky({"canary": three})
    for weight in (30, 0, 10):
        now = sticky({"canary": {**three, "large_ft": weight}})
        for key in KEYS:
            if start[key] != now[key]:
                assert "large_ft" in (start[key], now[key]), (key, start[key], now[key])
    assert now == start


def test_a_canary_ramp_only_ever_adds_keys():
    """0 -> 10 -> 50 -> 100 %: the keys on large_ft grow, each set holds the one before."""
    on_ft = []
    for share in (0, 10, 50, 100):
        chosen = sticky({"canary": {"large": 100 - share, "large_ft": share}})
        on_ft.append({key for key, variant in chosen.items() if variant == "large_ft"})
        assert within_binomial(len(on_ft[-1]), len(KEYS), share / 100) or share in (0, 100)
    assert on_ft[0] == set() and on_ft[-1] == set(KEYS)
    assert on_ft[0] <= on_ft[1] <= on_ft[2] <= on_ft[3]


@pytest.mark.parametrize("aliases, message", [
    ({"canary": {"large": -1, "large_ft": 10}}, "aliases.canary.large: weight -1.0"),
    ({"canary": {"large": float("nan")}}, "aliases.canary.large: weight nan"),
    ({"canary": {"large": 0, "large_ft": 0}}, "aliases.canary: give at least one"),
    ({"canary": {}}, "aliases.canary: name at least one target"),
    ({"canary": {"large": "lots"}}, "aliases.canary"),
])
def test_bad_weights_are_refused_naming_the_field(aliases, message):
    with pytest.raises(ValidationError, match=message.replace(".", r"\.")):
        RouterSettings(aliases=aliases)


def test_mappings_are_checked_against_the_variants():
    good = RouterSettings(default_version="canary", aliases={"canary": {"large": 9,
                                                                        "large_ft": 1}},
                          shadow={"large": "large_ft"})
    good.check_against(VARIANTS)
    routes = RoutingTable(good.default_version, good.aliases, VARIANTS)
    assert routes.resolve("canary").variant in ("large", "large_ft")
    bad = [
        ({"aliases": {"canary": {"large": 9, "xl": 1}}}, "alias 'canary' points to 'xl'"),
        ({"default_version": "nope"}, "default_version 'nope'"),
        ({"shadow": {"xl": "large"}}, "shadow: 'xl'"),
        ({"shadow": {"large": "xl"}}, r"shadow\.large: 'xl'"),
        ({"shadow": {"large": "large"}}, "cannot shadow itself"),
    ]
    for fields, message in bad:
        with pytest.raises(ValueError, match=message):
            RouterSettings(**fields).check_against(VARIANTS)


LABELS = ["生气/angry", "开心/happy", "中立/neutral", "难过/sad"]


def test_comparisons_match_labels_by_english_name():
    primary = Scores(LABELS, [0.1, 0.6, 0.2, 0.1])
    # Another label set and order: "other" is not shared, "angry" is missing.
    shadow = Scores(["neutral", "other", "happy", "sad"], [0.5, 0.2, 0.25, 0.05])
    comparison = compare(primary, shadow)
    assert (comparison.primary_emotion, comparison.shadow_emotion) == ("happy", "neutral")
    assert not comparison.agree
    assert comparison.max_abs_diff == pytest.approx(0.35)
    assert comparison.mean_abs_diff == pytest.approx((0.35 + 0.3 + 0.05) / 3)
    with pytest.raises(ValueError, match="no labels in common"):
        compare(primary, Scores(["other"], [1.0]))


def test_stats_accumulate_agreement_differences_and_confusion():
    stats = ShadowStats("large_ft")
    assert stats.snapshot() == {"target": "large_ft", "compared": 0, "dropped": 0, "errors": 0,
                                "top1_agreement": None, "mean_abs_score_diff": None,
                                "max_abs_score_diff": None, "confusion": {}}
    answers = [([0.1, 0.6, 0.2, 0.1], [0.1, 0.5, 0.3, 0.1]),   # happy / happy, max 0.1
               ([0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]),   # angry / neutral, max 0.6
               ([0.1, 0.6, 0.2, 0.1], [0.2, 0.6, 0.1, 0.1])]   # happy / happy, max 0.1
    for ours, theirs in answers:
        stats.add(compare(Scores(LABELS, ours), Scores(LABELS, theirs)))
    snapshot = stats.snapshot()
    assert snapshot["compared"] == 3
    assert snapshot["top1_agreement"] == pytest.approx(2 / 3)
    assert snapshot["max_abs_score_diff"] == pytest.approx(0.6)
    assert snapshot["mean_abs_score_diff"] == pytest.approx((0.05 + 0.3 + 0.05) / 3)
    assert snapshot["confusion"] == {"happy": {"happy": 2}, "angry": {"neutral": 1}}


class SlowVariants:
    """Stands in for serve_app.api.variant_client.Variants: answers when released, or fails."""

    def __init__(self):
        self.release = asyncio.Event()
        self.calls: list[str] = []

    async def predict(self, variant, request, timeout_s):
        self.calls.append(variant)
        await asyncio.wait_for(self.release.wait(), timeout_s)
        if variant == "broken":
            raise ApiError(503, "model_error", "failed")
        return Scores(LABELS, [0.1, 0.6, 0.2, 0.1])


def test_shadow_queue_is_bounded_drops_are_counted_and_stats_reset():
    async def scenario():
        variants, recorded = SlowVariants(), []
        shadow = Shadow(variants, lambda *args: recorded.append(args))
        shadow.configure(RouterSettings(shadow={"large": "large_ft", "base": "broken"},
                                        shadow_max_pending=2))
        answer = Scores(LABELS, [0.7, 0.1, 0.1, 0.1])
        for _ in range(4):
            shadow.submit("large", None, answer)
        shadow.submit("large_ft", None, answer)  # not a primary: nothing happens
        assert variants.calls == []  # submit returned at once; the calls run as tasks
        await asyncio.sleep(0.01)
        assert shadow.pending == 2 and variants.calls == ["large_ft", "large_ft"]
        assert shadow.snapshot()["large"]["dropped"] == 2
        variants.release.set()
        await asyncio.sleep(0.05)
        assert shadow.pending == 0
        shadow.submit("base", None, answer)
        await asyncio.sleep(0.05)
        snapshot = shadow.snapshot()
        assert (snapshot["large"]["compared"], snapshot["large"]["top1_agreement"]) == (2, 0.0)
        assert snapshot["large"]["confusion"] == {"angry": {"happy": 2}}
        assert (snapshot["base"]["errors"], snapshot["base"]["compared"]) == (1, 0)
        assert sorted(outcome for _, _, outcome, _ in recorded) == [
            "disagree", "disagree", "dropped", "dropped", "error"]
        # The same layout again (a replica may be reconfigured twice) keeps the stats...
        shadow.configure(RouterSettings(shadow={"large": "large_ft", "base": "broken"},
                                        shadow_max_pending=4))
        assert shadow.snapshot()["large"]["compared"] == 2
        # ...a change of routes starts them over.
        shadow.configure(RouterSettings(shadow={"large": "large_ft"},
                                        aliases={"canary": {"large": 1, "large_ft": 1}}))
        assert shadow.snapshot() == {"large": ShadowStats("large_ft").snapshot()}

    asyncio.run(scenario())
