"""Fault cycles against one `vdsa serve` (sanitized engine), through `vdsa faults`: QEMU
killed with SIGKILL while the guest's dmatest has copies in flight, the guest reset under its
busy WQ from outside (QMP system_reset) and by its own kernel (Ctrl-Alt-Del), then 100
vfio-user client processes killed with 1 MiB copies in flight in the mapped portals.  Every
boot after a fault must pass its verified dmatest, every client its verified stream, and the
server must be back at its first fd count after each.

CI runs 5 QEMU kills (a boot each); `vdsa faults` runs 100 by default (README)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tests.conftest import CliBoot, run_cli
from vdsa_server.fuzz.target import SANITIZER_REPORT

pytestmark = pytest.mark.boot

QEMU_KILLS = 5
CLIENT_KILLS = 100


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> CliBoot:
    log_dir = tmp_path_factory.mktemp("faults")
    return run_cli("faults", "--qemu-kills", str(QEMU_KILLS), "--client-kills",
                   str(CLIENT_KILLS), log_dir=log_dir)


def server_log(boot: CliBoot) -> str:
    return (boot.log_dir / "server.log").read_text(errors="replace")


def test_every_cycle_is_survived_and_the_next_user_is_served(faults: CliBoot) -> None:
    report = faults.summary
    assert faults.returncode == 0, f"{report} (logs: {faults.log_dir})"
    assert report["qemu_kills"] == QEMU_KILLS
    assert report["reboots"] == ["system-reset", "ctrl-alt-del"]
    assert report["client_kills"] == CLIENT_KILLS
    assert report["final_boot_passed"] is True


def test_the_server_ends_where_it_began(faults: CliBoot) -> None:
    fds = faults.summary["server_fds"]
    assert fds["after"] == fds["baseline"], faults.summary
    log = server_log(faults)
    assert not SANITIZER_REPORT.search(log)
    # One connection per boot and per client, each closed.
    boots = QEMU_KILLS + 2 + 1
    assert log.count("connection.closed") == boots + CLIENT_KILLS


def test_a_reset_reaches_the_device_while_it_works(faults: CliBoot) -> None:
    """QEMU's device reset at system_reset (not a lost connection's) found the device enabled:
    it came while the copies were in flight.  (At Ctrl-Alt-Del the guest's driver disables
    the device in its shutdown hook before the reset.)"""
    lines = server_log(faults).splitlines()
    busy_resets = [first for first, second in itertools.pairwise(lines)
                   if "transport.reset" in first and "reason=device" in first
                   and "old_state=ENABLED" in second]
    assert len(busy_resets) >= 1, f"resets of the enabled device: {busy_resets}"


def test_boot_logs_are_kept(faults: CliBoot) -> None:
    for name in ("kill-0", "reboot-system-reset", "reboot-ctrl-alt-del", "final"):
        assert Path(faults.log_dir / name / "console.log").is_file(), name
