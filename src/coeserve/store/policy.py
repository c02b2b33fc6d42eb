"""Eviction policies, one per tier, chosen by name from `POLICIES` (the names are the CLI's choices).

A policy hears of every use of an expert (`touch`) and, asked for `order(candidates)`, ranks the
evictable experts, first to go first. The store only offers candidates that are not pinned."""
from __future__ import annotations

import math
from typing import Callable


class Policy:
    def __init__(self, cost: Callable[[str], float] | None = None):
        self.cost = cost or (lambda name: 1.0)  # seconds to bring the expert back into this tier
        self.clock = 0
        self.last: dict[str, int] = {}

    def touch(self, name: str) -> None:
        self.clock += 1
        self.last[name] = self.clock

    def forget(self, name: str) -> None:
        self.last.pop(name, None)

    def order(self, candidates: list[str]) -> list[str]:  # pragma: no cover - subclasses define it
        raise NotImplementedError


class LRU(Policy):
    """Least recently used goes first."""

    def order(self, candidates: list[str]) -> list[str]:
        return sorted(candidates, key=lambda n: self.last.get(n, 0))


class CostAware(Policy):
    """Lowest (recent demand × cost to bring back) goes first. Demand is a count of uses decaying with
    a half-life of `half_life` uses of any expert, so a burst fades; cost is the expert's reload time
    from the tier below, so a large expert held only here outlives a small one with the same demand."""

    def __init__(self, cost: Callable[[str], float] | None = None, half_life: float = 64.0):
        super().__init__(cost)
        self.rate = math.log(2) / half_life
        self.demand: dict[str, tuple[float, int]] = {}  # name → (decayed count, clock at last update)

    def touch(self, name: str) -> None:
        super().touch(name)
        self.demand[name] = (self._demand(name) + 1.0, self.clock)

    def forget(self, name: str) -> None:
        super().forget(name)
        self.demand.pop(name, None)

    def _demand(self, name: str) -> float:
        d, at = self.demand.get(name, (0.0, self.clock))
        return d * math.exp(-self.rate * (self.clock - at))

    def order(self, candidates: list[str]) -> list[str]:
        return sorted(candidates, key=lambda n: (self._demand(n) * self.cost(n), self.last.get(n, 0)))


POLICIES: dict[str, type[Policy]] = {"lru": LRU, "cost": CostAware}


def make_policy(name: str, cost: Callable[[str], float] | None = None) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r} (choose from {', '.join(POLICIES)})")
    return POLICIES[name](cost)
