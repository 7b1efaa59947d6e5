"""Samples of a server process over a soak, and the verdict on them: does its memory or its
fd count keep growing once it has warmed up?

Growth is judged between the first and the last quarter of the samples after the warm-up
(the first quarter of the run, when allocators and caches fill): resident memory by the
medians of the two quarters (one sample's spike is not growth), fds by their maxima (a
sample taken while a client reconnects sees fewer)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from vdsa_server.bench.serving import ProcessSample

MiB = 1 << 20
WARM_UP_FRACTION = 0.25
MIN_SAMPLES = 8  # after the warm-up: two per quarter


@dataclass(frozen=True)
class Sample:
    seconds: float
    process: ProcessSample


@dataclass(frozen=True)
class Drift:
    samples: int
    rss_start: int
    rss_end: int
    rss_peak: int
    fds_start: int
    fds_end: int

    @property
    def rss_drift(self) -> int:
        return self.rss_end - self.rss_start

    @property
    def fd_growth(self) -> int:
        return self.fds_end - self.fds_start

    def failures(self, name: str, max_rss_drift: int) -> list[str]:
        found = []
        if self.rss_drift > max_rss_drift:
            found.append(f"{name}: resident memory grew {self.rss_drift / MiB:.1f} MiB after "
                         f"the warm-up (limit {max_rss_drift / MiB:.1f} MiB)")
        if self.fd_growth > 0:
            found.append(f"{name}: open fds grew from {self.fds_start} to {self.fds_end}")
        return found

    def as_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "rss_start_mib": round(self.rss_start / MiB, 2),
                "rss_end_mib": round(self.rss_end / MiB, 2),
                "rss_peak_mib": round(self.rss_peak / MiB, 2),
                "rss_drift_mib": round(self.rss_drift / MiB, 2),
                "fds_start": self.fds_start, "fds_end": self.fds_end}


@dataclass
class Series:
    """One process's samples, in time order."""

    samples: list[Sample] = field(default_factory=list)

    def add(self, seconds: float, process: ProcessSample) -> None:
        self.samples.append(Sample(seconds, process))

    def drift(self) -> Drift | None:
        """The growth after the warm-up; None when too few samples came after it."""
        if not self.samples:
            return None
        warm = self.samples[-1].seconds * WARM_UP_FRACTION
        after = [sample.process for sample in self.samples if sample.seconds >= warm]
        if len(after) < MIN_SAMPLES:
            return None
        quarter = len(after) // 4
        first, last = after[:quarter], after[-quarter:]
        return Drift(
            samples=len(after),
            rss_start=int(statistics.median(s.rss_bytes for s in first)),
            rss_end=int(statistics.median(s.rss_bytes for s in last)),
            rss_peak=max(s.process.rss_bytes for s in self.samples),
            fds_start=max(s.open_fds for s in first),
            fds_end=max(s.open_fds for s in last),
        )
