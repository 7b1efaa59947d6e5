"""The soak's verdict on its samples: growth after the warm-up fails, noise and warm-up do
not, and too few samples give no verdict."""

from __future__ import annotations

from collections.abc import Sequence

from vdsa_server.bench.serving import ProcessSample
from vdsa_server.reliability.drift import MiB, Series

LIMIT = 16 * MiB


def series(rss_mib: Sequence[float], fds: Sequence[int] | None = None) -> Series:
    found = Series()
    for index, rss in enumerate(rss_mib):
        found.add(float(index), ProcessSample(int(rss * MiB), (fds or [20] * len(rss_mib))[index]))
    return found


def test_a_flat_series_after_its_warm_up_passes() -> None:
    # The first quarter fills caches: 20 -> 60 MiB, then flat with noise and one spike.
    rss = [20, 40, 60, 60, 60, 60, 61, 59, 60, 60, 90, 60, 60, 61, 60, 59]
    drift = series(rss).drift()
    assert drift is not None
    assert drift.failures("server", LIMIT) == []
    assert drift.rss_peak == 90 * MiB


def test_steady_growth_after_the_warm_up_fails() -> None:
    drift = series([40 + 3 * minute for minute in range(16)]).drift()
    assert drift is not None
    assert drift.rss_drift > LIMIT
    assert "grew" in drift.failures("server", LIMIT)[0]


def test_an_fd_more_at_the_end_fails() -> None:
    fds = [20] * 12 + [21] * 4
    drift = series([40] * 16, fds).drift()
    assert drift is not None
    assert drift.failures("server", LIMIT) == ["server: open fds grew from 20 to 21"]


def test_a_reconnect_seen_in_one_sample_is_not_a_change() -> None:
    fds = [22] * 16
    fds[13] = 11
    drift = series([40] * 16, fds).drift()
    assert drift is not None
    assert drift.fd_growth == 0


def test_too_few_samples_give_no_verdict() -> None:
    assert series([40] * 6).drift() is None
    assert Series().drift() is None
