"""Boot test of MOVDIR64B's atomicity towards the device: two vCPUs submit NOOP descriptors into
the same portal slot at once (guest-scripts/portal-race.sh, native/guest/portal_race.c), as the
6.1 idxd driver can make them do.  Under multi-threaded TCG, the eight portal writes of one vCPU's
MOVDIR64B could interleave with the other's, and the server dropped the torn descriptors: QEMU
without the fix in qemu-configs/patches/ loses some in every boot (measured: 10 of 10).  With
mapped portals the MOVDIR64B waits for the server to empty the slot; a wait that only spun for
20 ms dropped about 1 descriptor in 2,000 on a loaded host, hence the case beside busy loops.
Every descriptor must complete.

One boot per case of the matrix through `vdsa boot --serve`, shared by the tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import pytest

from tests.conftest import RELEASE_PORTALS, CliBoot, portal_config, run_cli
from tests.test_boot_device import SCRIPTS, results
from tests.test_boot_dmatest import KERNEL_TROUBLE, dmesg_lines
from vdsa_server.builds.guest_image import DEFAULT_RELEASE
from vdsa_server.device.config import PortalMode

pytestmark = pytest.mark.boot

# portal-race.sh's default: descriptors each thread submits.
ITERATIONS = 1000
THREADS = 2


# The default release with mapped portals again, beside one busy loop per host CPU: the
# server's poller then has to win its CPU back from them while QEMU waits on a slot.
LOADED = (DEFAULT_RELEASE, PortalMode.MAPPED, "loaded")
CASES = [*((release, mode, "") for release, mode in RELEASE_PORTALS), LOADED]


@contextmanager
def busy_host() -> Iterator[None]:
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
             for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


@pytest.fixture(scope="module", params=CASES,
                ids=lambda case: "-".join(filter(None, (case[0], case[1].value, case[2]))))
def race(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> CliBoot:
    """One boot per release and portal mode: with mapped portals the two vCPUs' MOVDIR64Bs
    meet in the slot handshake instead of in the engine's reassembly."""
    release, mode, load = request.param
    log_dir = tmp_path_factory.mktemp(f"portal-race-{release}-{mode.value}{load}")
    with busy_host() if load else nullcontext():
        return run_cli("boot", "--serve", *portal_config(mode, log_dir),
                       "--script", str(SCRIPTS / "portal-race.sh"),
                       "--file", str(SCRIPTS / "dmatest.sh"), log_dir=log_dir, release=release)


def figures(boot: CliBoot) -> dict[str, str]:
    prefix = "portal_race."
    return {name.removeprefix(prefix): value for name, value in results(boot).items()
            if name.startswith(prefix)}


def test_wq_is_set_up_for_the_program(race: CliBoot) -> None:
    found = results(race)
    checks = {name: value for name, value in found.items() if name.startswith("setup.check.")}
    steps = ("modprobe", "configure", "enable")
    assert checks == {f"setup.check.{step}": "pass" for step in steps}, race.context()
    # The program found the DSA function on the guest's PCI bus.
    assert re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]",
                        figures(race).get("device", "")), race.context()


def test_every_descriptor_completes_on_both_cpus(race: CliBoot) -> None:
    found = figures(race)
    assert found.get("iterations") == str(ITERATIONS), f"{found} {race.context()}"
    per_thread = {t: {key: found.get(f"thread{t}.{key}")
                      for key in ("cpu", "submitted", "completed", "failed", "lost")}
                  for t in range(THREADS)}
    expected = {t: {"cpu": str(t), "submitted": str(ITERATIONS), "completed": str(ITERATIONS),
                    "failed": "0", "lost": "0"} for t in range(THREADS)}
    assert per_thread == expected, race.context()
    assert (found["lost"], found["status"]) == ("0", "0"), race.context()
    assert race.returncode == 0, race.context()


def test_kernel_stays_quiet(race: CliBoot) -> None:
    trouble = [line for line in dmesg_lines(race) if any(mark in line for mark in KERNEL_TROUBLE)]
    assert not trouble, f"{trouble} {race.context()}"
