"""Boot test of the guest benchmark (vdsa_server/bench/guest.py, guest-scripts/bench.sh): dmatest's
unverified whole-buffer copies on the idxd channel, then the guest CPU's memcpy of the same size,
in one boot.  Speed is never asserted; that the figures come from the run asked for, and agree
with each other, is.

One small boot, shared by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.test_boot_dmatest import CHANNEL, KERNEL_TROUBLE, SUMMARY
from vdsa_server.bench.guest import KB, MB, GuestBench, GuestBenchPlan, run_guest_bench
from vdsa_server.launch.launcher import QEMU_STDERR

pytestmark = pytest.mark.boot

# Not dmatest's default buffer size, so that the size is seen to reach both halves.
PLAN = GuestBenchPlan(threads=2, iterations=300, size=8192, copies=5000, portal_seconds=1)
# dmatest's figures are whole KB/s and rates with two decimals, summed over the threads.
TOLERANCE = 0.01


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> GuestBench:
    # A log directory that does not exist yet: run_guest_bench makes it.
    return trio.run(run_guest_bench, tmp_path_factory.mktemp("bench") / "logs", PLAN)


def context(bench: GuestBench) -> str:
    return f"(console log: {bench.run.console_log})"


def test_dmatest_ran_on_the_idxd_channel_without_verification(bench: GuestBench) -> None:
    results = bench.run.results
    assert bench.run.exit_status == 0, context(bench)
    checks = {name: value for name, value in results.items() if name.startswith("bench.check.")}
    assert set(checks) >= {"bench.check.modprobe", "bench.check.configure", "bench.check.enable",
                           "bench.check.params", "bench.check.dmatest", "bench.check.memcpy",
                           "bench.check.portal_64", "bench.check.portal_4096"}
    assert set(checks.values()) == {"pass"}, checks
    assert results["bench.dma_channels"].split() == [CHANNEL]
    assert results["bench.dmatest.channel"] == CHANNEL
    params = dict(line.split("=", 1) for line in results["bench.params"].splitlines())
    assert params["noverify"] == "Y"
    assert params["norandom"] == "Y"
    assert params["test_buf_size"] == str(PLAN.size)
    assert params["threads_per_chan"] == str(PLAN.threads)
    assert params["iterations"] == str(PLAN.iterations)


def test_every_copy_completes_without_failure(bench: GuestBench) -> None:
    lines = bench.run.results["bench.dmatest.summary"].splitlines()
    summaries = [SUMMARY.fullmatch(line) for line in lines]
    assert summaries, context(bench)
    assert all(summaries), lines
    by_thread = {m["thread"]: (int(m["tests"]), int(m["failures"]), int(m["status"]))
                 for m in summaries if m}
    assert by_thread == {f"{CHANNEL}-copy{n}": (PLAN.iterations, 0, 0)
                         for n in range(PLAN.threads)}, lines
    dmesg = [line.split("] ", 1)[-1] for line in bench.run.dmesg.splitlines()]
    failed = [line for line in dmesg if line.startswith("dmatest: ") and ": result #" in line]
    assert not failed, failed[:10]
    trouble = [line for line in dmesg if any(mark in line for mark in KERNEL_TROUBLE)]
    assert not trouble, trouble


def test_figures_are_positive_and_consistent(bench: GuestBench) -> None:
    measurement = bench.measurements[0]
    assert (measurement.group, measurement.unit) == ("guest", "MB/s")
    assert measurement.case == "dmatest memcpy 8 KiB, no verify, 2 threads"
    extra = measurement.extra
    assert (extra["tests"], extra["failures"]) == (PLAN.threads * PLAN.iterations, 0)
    assert measurement.value > 0
    assert measurement.reference_value > 0
    # Every copy is the whole buffer, so bytes per second are copies per second times its size.
    assert measurement.value == pytest.approx(extra["iops"] * PLAN.size / MB, rel=TOLERANCE)
    assert measurement.reference_value == pytest.approx(
        extra["reference_iops"] * PLAN.size / MB, rel=TOLERANCE)
    results = bench.run.results
    assert int(results["bench.memcpy.bytes"]) == PLAN.copies * PLAN.size
    assert int(results["bench.memcpy.kbps"]) == pytest.approx(
        PLAN.copies * PLAN.size / KB / float(results["bench.memcpy.seconds"]), rel=TOLERANCE)


def test_the_portal_submitter_ran_at_both_sizes_beside_memcpy(bench: GuestBench) -> None:
    portals = bench.measurements[1:]
    assert [m.case for m in portals] == [
        "user-space submitter (resource2, MOVDIR64B), memmove 64 B",
        "user-space submitter (resource2, MOVDIR64B), memmove 4 KiB"]
    for measurement in portals:
        assert measurement.unit == "descriptors/s"
        assert measurement.value > 0
        assert measurement.reference_value > 0
        # Rate is what completed over the time it took.
        assert measurement.value == pytest.approx(
            measurement.extra["descriptors"] / measurement.extra["seconds"], rel=TOLERANCE)
        assert measurement.extra["seconds"] >= PLAN.portal_seconds


def test_logs_stay_in_the_log_dir(bench: GuestBench) -> None:
    log_dir: Path = bench.run.console_log.parent
    assert "bench.memcpy.kbps" in bench.run.console_log.read_text()
    assert (log_dir / "dmesg.txt").read_text() == bench.run.dmesg
    assert (log_dir / QEMU_STDERR).is_file()
