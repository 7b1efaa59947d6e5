"""Boot tests of the virtual DSA moving data for each release's stock idxd
driver: the kernel's dmatest client copies memory through the dmaengine channel
of a dedicated kernel WQ and verifies every copy, before and after the WQ is
disabled and enabled again (guest-scripts/dmatest.sh).

One boot per case of the matrix through `vdsa boot --serve`, shared by the tests."""

from __future__ import annotations

import re

import pytest

from tests.conftest import RELEASE_PORTALS, CliBoot, portal_config, release_portal_id, run_cli
from tests.kernel_bugs import EVL_FREE_NULL_DEREF, expect_bug
from tests.test_boot_device import EXPECTED_IDXD_LINES, SCRIPTS, results

pytestmark = pytest.mark.boot

# dmatest.sh's defaults: threads on the channel, and copies per thread.
THREADS = 4
ITERATIONS = 1000
RUNS = ("run1", "run2")
CHANNEL = "dma0chan0"
# dmatest's line at the end of each thread (drivers/dma/dmatest.c, dmatest_func).
SUMMARY = re.compile(
    r"dmatest: (?P<thread>\S+): summary (?P<tests>\d+) tests, (?P<failures>\d+) failures "
    r"[\d.]+ iops \d+ KB/s \((?P<status>-?\d+)\)"
)
# What the kernel prints on a WARN, a BUG or an oops.
KERNEL_TROUBLE = ("WARNING:", "BUG:", "Oops", "Call Trace:")


@pytest.fixture(scope="module", params=RELEASE_PORTALS, ids=release_portal_id)
def dmatest(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> CliBoot:
    """One boot per release and portal mode: the guest's MOVDIR64Bs trapped as messages, or
    stored into the mapped BAR that the engine polls."""
    release, mode = request.param
    log_dir = tmp_path_factory.mktemp(f"dmatest-{release}-{mode.value}")
    return run_cli("boot", "--serve", *portal_config(mode, log_dir),
                   "--script", str(SCRIPTS / "dmatest.sh"), log_dir=log_dir, release=release)


def assert_checks_pass(boot: CliBoot, *names: str) -> None:
    failed = [n for n in names if results(boot).get(f"dmatest.check.{n}") != "pass"]
    assert not failed, f"failed checks {failed}; output: {boot.summary['lines']} {boot.context()}"


def dmesg_lines(boot: CliBoot) -> list[str]:
    """The guest's kernel log at the end of the script, without timestamps."""
    text = (boot.log_dir / "dmesg.txt").read_text()
    return [line.split("] ", 1)[-1] for line in text.splitlines()]


def test_dmatest_uses_the_idxd_channel_with_the_requested_parameters(dmatest: CliBoot) -> None:
    assert_checks_pass(dmatest, "modprobe", "configure", "enable", "params")
    found = results(dmatest)
    assert found["dmatest.dma_channels"].split() == [CHANNEL]
    params = dict(line.split("=", 1) for line in found["dmatest.params"].splitlines())
    assert params["threads_per_chan"] == str(THREADS)
    assert params["iterations"] == str(ITERATIONS)
    assert params["noverify"] == "N"
    for run in RUNS:
        assert_checks_pass(dmatest, f"{run}.channel")
        assert found[f"dmatest.{run}.channel"] == CHANNEL


@pytest.mark.parametrize("run", RUNS)
def test_every_copy_completes_and_verifies(dmatest: CliBoot, run: str) -> None:
    found = results(dmatest)
    lines = found.get(f"dmatest.{run}.summary", "").splitlines()
    summaries = [SUMMARY.fullmatch(line) for line in lines]
    assert summaries, f"no dmatest summary for {run} {dmatest.context()}"
    assert all(summaries), f"unexpected summary lines {lines} {dmatest.context()}"
    by_thread = {m["thread"]: (int(m["tests"]), int(m["failures"]), int(m["status"]))
                 for m in summaries if m}
    assert by_thread == {f"{CHANNEL}-copy{n}": (ITERATIONS, 0, 0) for n in range(THREADS)}, (
        f"{lines} {dmatest.context()}")
    # The script's own totals, from which it decides its exit status.
    assert found[f"dmatest.{run}.tests"] == str(THREADS * ITERATIONS)
    assert found[f"dmatest.{run}.failures"] == "0"
    assert_checks_pass(dmatest, run)


def test_wq_disables_and_enables_again_between_runs(dmatest: CliBoot,
                                                    request: pytest.FixtureRequest) -> None:
    expect_bug(request, dmatest.release, dmatest.dmesg_file, EVL_FREE_NULL_DEREF)
    assert_checks_pass(dmatest, "run1", "disable_wq", "reenable_wq", "run2", "disable")
    assert dmatest.returncode == 0


def test_no_copy_fails_and_the_kernel_stays_quiet(dmatest: CliBoot,
                                                   request: pytest.FixtureRequest) -> None:
    expect_bug(request, dmatest.release, dmatest.dmesg_file, EVL_FREE_NULL_DEREF)
    lines = dmesg_lines(dmatest)
    # dmatest logs a "result" line only for a failed copy (verbose is off).
    failed = [line for line in lines if line.startswith("dmatest: ") and ": result #" in line]
    assert not failed, f"{failed[:10]} {dmatest.context()}"
    trouble = [line for line in lines if any(mark in line for mark in KERNEL_TROUBLE)]
    assert not trouble, f"{trouble} {dmatest.context()}"
    for line in lines:
        if re.search(r"idxd|dsa\d", line):
            assert line.removeprefix("idxd 0000:00:01.0: ") in EXPECTED_IDXD_LINES, line
