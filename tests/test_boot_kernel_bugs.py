"""The steps that stock kernels have mishandled, taken on every release's kernel
(guest-scripts/kernel-bug-steps.sh): unbinding idxd while dsa0 is enabled, and
disabling dsa0. Each must leave the guest's kernel clean and the device
usable; where a known bug of that kernel breaks it (tests/kernel_bugs.py),
the test is that kernel's expected failure and shows the oops as evidence.

The unbind boots with slub_debug's poisoning, which turns 6.1's
use-after-free into a report instead of silent corruption."""

from __future__ import annotations

import pytest

from tests.conftest import CliBoot, run_cli
from tests.kernel_bugs import EVL_FREE_NULL_DEREF, UNBIND_WHILE_ENABLED_UAF, expect_bug
from tests.test_boot_device import SCRIPTS, assert_checks_pass, results
from tests.test_boot_dmatest import KERNEL_TROUBLE, dmesg_lines
from vdsa_server.builds.debian_root import RELEASES

pytestmark = pytest.mark.boot

# F: sanity checks, Z: red zones, P: poisoning, U: owner tracking.
SLUB_DEBUG = "slub_debug=FZPU"
# The steps take a few seconds under TCG.
STUCK_SCRIPT_SECONDS = 30


def step_boot(tmp_path_factory: pytest.TempPathFactory, release: str, step: str,
              *kernel_args: str) -> CliBoot:
    log_dir = tmp_path_factory.mktemp(f"kernel-bug-{step}-{release}")
    script = log_dir / "step.sh"
    script.write_text(f"sh /vdsa/kernel-bug-steps.sh {step}\n")
    extra = [arg for kernel_arg in kernel_args for arg in ("--kernel-arg", kernel_arg)]
    # A step that oopses under a lock leaves the next one stuck; the guest ends the script.
    return run_cli("boot", "--serve", "--script", str(script), *extra,
                   "--script-timeout", str(STUCK_SCRIPT_SECONDS),
                   "--file", str(SCRIPTS / "kernel-bug-steps.sh"), log_dir=log_dir,
                   release=release)


@pytest.fixture(scope="module", params=RELEASES)
def unbound(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> CliBoot:
    return step_boot(tmp_path_factory, request.param, "unbind", SLUB_DEBUG)


@pytest.fixture(scope="module", params=RELEASES)
def disabled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> CliBoot:
    return step_boot(tmp_path_factory, request.param, "disable")


def assert_kernel_clean(boot: CliBoot) -> None:
    trouble = [line for line in dmesg_lines(boot) if any(mark in line for mark in KERNEL_TROUBLE)]
    assert not trouble, f"{trouble[:12]} {boot.context()}"


def test_unbind_while_enabled_then_rebind(unbound: CliBoot, request: pytest.FixtureRequest
                                          ) -> None:
    expect_bug(request, unbound.release, unbound.dmesg_file, UNBIND_WHILE_ENABLED_UAF)
    expect_bug(request, unbound.release, unbound.dmesg_file, EVL_FREE_NULL_DEREF)
    assert_checks_pass(unbound, "modprobe_idxd", "enable", "unbind", "rebind", "dsa0_back")
    assert_kernel_clean(unbound)
    assert unbound.summary["powered_off"], unbound.context()
    assert unbound.returncode == 0


def test_disable_device(disabled: CliBoot, request: pytest.FixtureRequest) -> None:
    expect_bug(request, disabled.release, disabled.dmesg_file, EVL_FREE_NULL_DEREF)
    assert_checks_pass(disabled, "modprobe_idxd", "enable", "disable")
    assert results(disabled)["dsa0.state"] == "disabled"
    assert_kernel_clean(disabled)
    assert disabled.summary["powered_off"], disabled.context()
    assert disabled.returncode == 0

