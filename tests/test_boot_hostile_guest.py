"""Boot test of a hostile guest (guest-scripts/hostile-guest.sh, native/guest/hostile_guest.c):
10,000 random valid, invalid and record-less descriptors with a fixed seed, torn portal writes
and writes to BAR0's read-only registers, with canaries around every page the program owns.
Every valid descriptor must do exactly its work, no invalid one may succeed, nothing may be
written outside what a descriptor asked for, and afterwards the stock driver's dmatest must
still run on the device.  A control run with the WQ disabled must report its descriptors lost.

One boot per portal mode, on the default release."""

from __future__ import annotations

import pytest

from tests.conftest import CliBoot, portal_config, run_cli
from tests.test_boot_device import SCRIPTS, results
from tests.test_boot_dmatest import KERNEL_TROUBLE, dmesg_lines
from vdsa_server.device.config import PortalMode

pytestmark = pytest.mark.boot

SEED = 1
COUNT = 10_000


@pytest.fixture(scope="module", params=list(PortalMode), ids=lambda mode: mode.value)
def hostile(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> CliBoot:
    log_dir = tmp_path_factory.mktemp(f"hostile-{request.param.value}")
    script = log_dir / "script.sh"
    script.write_text(f"sh /vdsa/hostile-guest.sh {SEED} {COUNT}\n")
    return run_cli("boot", "--serve", *portal_config(request.param, log_dir),
                   "--script", str(script), "--file", str(SCRIPTS / "hostile-guest.sh"),
                   "--file", str(SCRIPTS / "dmatest.sh"), log_dir=log_dir)


def figures(boot: CliBoot, prefix: str = "hostile.") -> dict[str, str]:
    return {name.removeprefix(prefix): value for name, value in results(boot).items()
            if name.startswith(prefix)}


def test_every_descriptor_gets_what_dsa_defines(hostile: CliBoot) -> None:
    found = figures(hostile)
    assert found.get("descriptors") == str(COUNT), f"{found} {hostile.context()}"
    counts = {name: int(found[name]) for name in (
        "valid", "valid_ok", "invalid", "invalid_rejected", "no_record", "lost",
        "torn_stores", "bar0_writes", "stray_writes", "wrong_results", "invalid_succeeded",
        "register_changes")}
    assert counts["valid"] + counts["invalid"] + counts["no_record"] == COUNT
    assert counts["valid_ok"] == counts["valid"] > COUNT // 3, hostile.context()
    assert counts["invalid_rejected"] == counts["invalid"] > COUNT // 3, hostile.context()
    assert min(counts["no_record"], counts["torn_stores"], counts["bar0_writes"]) > 0
    findings = {name: counts[name] for name in (
        "lost", "stray_writes", "wrong_results", "invalid_succeeded", "register_changes")}
    assert findings == dict.fromkeys(findings, 0), f"{hostile.summary['lines']} {hostile.context()}"
    assert found["status"] == "0"


def test_the_checks_can_fail(hostile: CliBoot) -> None:
    control = figures(hostile, "hostile_control.")
    assert control.get("status") == "1", f"{control} {hostile.context()}"
    assert int(control["lost"]) > 0


def test_the_device_still_works_for_the_driver(hostile: CliBoot) -> None:
    found = results(hostile)
    for run in ("run1", "run2"):
        assert (found.get(f"dmatest.{run}.tests"), found.get(f"dmatest.{run}.failures")) == (
            "500", "0"), hostile.context()
    assert hostile.returncode == 0, hostile.context()


def test_the_kernel_stays_up(hostile: CliBoot) -> None:
    # The driver reports the device's software errors (err[0..3]); a WARN, BUG or oops is a
    # finding.
    trouble = [line for line in dmesg_lines(hostile)
               if any(mark in line for mark in KERNEL_TROUBLE)]
    assert not trouble, f"{trouble} {hostile.context()}"
