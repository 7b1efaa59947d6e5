"""One benchmark figure and the reference it is compared with."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Measurement:
    """``value`` of ``case`` in ``unit``, beside ``reference_value`` of ``reference`` (the same
    work done without vdsa, measured in the same run). ``extra`` holds further figures of the
    same measurement (operations per second, counts), by name."""

    group: str
    case: str
    unit: str
    value: float
    reference: str
    reference_value: float
    lower_is_better: bool = False
    extra: Mapping[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """``value / reference_value``: the share of the reference's speed that vdsa reaches for
        rates, how many times the reference's time it takes for latencies."""
        return self.value / self.reference_value if self.reference_value else float("inf")

    def as_json(self) -> dict[str, Any]:
        return {
            "group": self.group, "case": self.case, "unit": self.unit, "value": self.value,
            "reference": self.reference, "reference_value": self.reference_value,
            "ratio": self.ratio, "lower_is_better": self.lower_is_better,
            "extra": dict(self.extra),
        }
