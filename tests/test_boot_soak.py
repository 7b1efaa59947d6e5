"""A short soak (`vdsa soak --minutes 1`, release engine as users run it): verified dmatest
rounds in the default release's guest and checked harness streams, mapped and trapped, on two
servers whose memory and fds must not grow.  The README has a 60-minute run's figures."""

from __future__ import annotations

import pytest

from tests.conftest import CliBoot, run_cli

pytestmark = pytest.mark.boot


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> CliBoot:
    log_dir = tmp_path_factory.mktemp("soak")
    return run_cli("soak", "--minutes", "1", "--sample-seconds", "2", log_dir=log_dir)


def test_the_soak_passes(soak: CliBoot) -> None:
    report = soak.summary
    assert (soak.returncode, report["failures"]) == (0, []), f"logs: {soak.log_dir}"
    assert report["passed"] is True


def test_both_kinds_of_work_ran_checked(soak: CliBoot) -> None:
    guest, harness = soak.summary["guest"], soak.summary["harness"]
    assert guest["rounds"] >= 3, guest
    assert guest["verified_copies"] == guest["rounds"] * 2 * 2 * 500
    assert guest["copy_failures"] == 0
    # Mapped, then trapped portals: two connections at least.
    assert harness["connections"] >= 2, harness
    assert harness["descriptors"] > 10_000, harness


def test_growth_was_judged_on_both_servers(soak: CliBoot) -> None:
    for name in ("guest_server", "harness_server"):
        drift = soak.summary[name]
        assert drift is not None, name
        assert drift["samples"] >= 8, drift
        assert drift["fds_end"] <= drift["fds_start"]
