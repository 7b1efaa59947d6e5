"""The guest benchmark's reading of a finished boot (vdsa_server/bench/guest.py, ``measure``):
figures only from a run that did what was asked without a failure.  No QEMU needed; the boot
itself is tests/test_boot_bench.py."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import pytest

from vdsa_server.bench.guest import (
    DMATEST_ENDS,
    DMATEST_STARTS,
    Footprint,
    GuestBenchError,
    GuestBenchPlan,
    host_cost,
    iommu_cost,
    measure,
    portal_measurements,
)
from vdsa_server.launch.launcher import GuestRun, Iommu, QemuCapabilities

PLAN = GuestBenchPlan(threads=2, iterations=100, size=4096, copies=1000)
CONSOLE_LOG = Path("/logs/console.log")


def results(changed: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """What bench.sh reports for PLAN, with ``changed`` values (None: not reported)."""
    found = {
        "bench.check.modprobe": "pass", "bench.check.params": "pass",
        "bench.check.dmatest": "pass", "bench.check.memcpy": "pass",
        "bench.params": "threads_per_chan=2\niterations=100\ntest_buf_size=4096\ntimeout=3000\n"
                        "noverify=Y\nnorandom=Y\npolled=N",
        "bench.dmatest.channel": "dma0chan0", "bench.dmatest.threads": "2",
        "bench.dmatest.tests": "200", "bench.dmatest.failures": "0",
        "bench.dmatest.iops": "2000.00", "bench.dmatest.kbps": "8000",
        "bench.memcpy.size": "4096", "bench.memcpy.copies": "1000",
        "bench.memcpy.bytes": "4096000", "bench.memcpy.seconds": "0.010000",
        "bench.memcpy.iops": "100000.00", "bench.memcpy.kbps": "400000",
    }  # fmt: skip
    for name, value in (changed or {}).items():
        if value is None:
            del found[name]
        else:
            found[name] = value
    return found


def guest_run(found: dict[str, str], exit_status: int = 0) -> GuestRun:
    return GuestRun(kernel="6.1.0-test-amd64", lines=["last line of the script"], results=found,
                    dmesg="", exit_status=exit_status, console_log=CONSOLE_LOG, seconds=12.5,
                    qemu=QemuCapabilities("10.2.2", True, "max", True))


def test_a_good_run_gives_dmatest_beside_memcpy() -> None:
    measurement = measure(guest_run(results()), PLAN)
    assert measurement.group == "guest"
    assert measurement.case == "dmatest memcpy 4 KiB, no verify, 2 threads"
    assert (measurement.unit, measurement.reference) == ("MB/s", "guest CPU memcpy, 1 thread")
    # KB/s as dmatest counts them: KB = 1024 bytes.
    assert measurement.value == 8000 * 1024 / 1e6
    assert measurement.reference_value == 400000 * 1024 / 1e6
    assert measurement.extra == {
        "iops": 2000.0, "tests": 200.0, "failures": 0.0, "reference_iops": 100000.0,
        "reference_copies": 1000.0, "reference_seconds": 0.01,
    }  # fmt: skip


def test_a_size_that_is_not_whole_kib_is_named_in_bytes() -> None:
    plan = GuestBenchPlan(threads=2, iterations=100, size=1000, copies=1000)
    params = results()["bench.params"].replace("test_buf_size=4096", "test_buf_size=1000")
    found = results({"bench.memcpy.size": "1000", "bench.params": params})
    assert measure(guest_run(found), plan).case == "dmatest memcpy 1000 B, no verify, 2 threads"


@pytest.mark.parametrize(("exit_status", "changed", "message"), [
    (1, {}, "the script exited with status 1"),
    (1, {"bench.check.dmatest": "fail"}, "dmatest failed"),
    (1, {"bench.dmatest.failures": "3"}, "dmatest reported 3 failed copies"),
    # Failures are an error even if the script did not say so.
    (0, {"bench.dmatest.failures": "3"}, "dmatest reported 3 failed copies"),
    (0, {"bench.check.memcpy": "fail"}, "memcpy failed"),
])  # fmt: skip
def test_a_failed_run_gives_no_figures(exit_status: int, changed: dict[str, str],
                                       message: str) -> None:
    with pytest.raises(GuestBenchError, match=re.escape(message)) as raised:
        measure(guest_run(results(changed), exit_status), PLAN)
    assert str(CONSOLE_LOG) in str(raised.value)
    assert "last line of the script" in str(raised.value)


@pytest.mark.parametrize(("changed", "message"), [
    ({"bench.memcpy.kbps": None}, "bench.memcpy.kbps=None"),
    ({"bench.dmatest.iops": "fast"}, "bench.dmatest.iops='fast'"),
    ({"bench.dmatest.tests": "150"}, "dmatest tests 150.0 (expected 200)"),
    ({"bench.dmatest.threads": "1"}, "dmatest threads 1.0 (expected 2)"),
    ({"bench.dmatest.channel": "dma1chan0"}, "dmatest channel dma1chan0 (expected dma0chan0)"),
    ({"bench.params": "noverify=N\nnorandom=Y\ntest_buf_size=4096"}, "dmatest noverify N"),
    ({"bench.params": None}, "dmatest noverify None"),
    ({"bench.memcpy.size": "8192"}, "memcpy size 8192.0 (expected 4096)"),
    ({"bench.memcpy.copies": "10"}, "memcpy copies 10.0 (expected 1000)"),
])  # fmt: skip
def test_missing_or_unexpected_figures_are_an_error(changed: dict[str, str | None],
                                                    message: str) -> None:
    with pytest.raises(GuestBenchError, match=re.escape(message)) as raised:
        measure(guest_run(results(changed)), PLAN)
    assert str(CONSOLE_LOG) in str(raised.value)


@pytest.mark.parametrize("field", ["threads", "iterations", "size", "copies"])
def test_a_plan_needs_positive_counts(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be positive"):
        GuestBenchPlan(**{field: 0})


def test_the_plan_is_bench_sh_with_arguments() -> None:
    assert PLAN.script == b"sh /vdsa/bench.sh 2 100 4096 1000 2\n"


@pytest.mark.parametrize("mode", list(Iommu))
def test_the_viommu_cost_is_dmatest_behind_it_against_without(mode: Iommu) -> None:
    without = measure(guest_run(results()), PLAN)
    behind = measure(guest_run(results({"bench.dmatest.kbps": "2000",
                                        "bench.dmatest.iops": "500.00"})), PLAN, mode)
    assert behind.case == f"dmatest memcpy 4 KiB, no verify, 2 threads, behind the vIOMMU " \
                          f"({mode.value})"
    cost = iommu_cost(without, behind, mode)
    assert (cost.group, cost.case) == ("guest vIOMMU", f"dmatest behind the vIOMMU ({mode.value})")
    assert cost.reference == "the same dmatest without a vIOMMU"
    assert cost.ratio == 0.25
    assert cost.extra == {"iops": 500.0, "reference_iops": 2000.0}


MARKS = {DMATEST_STARTS: Footprint(at=10.0, vdsa_cpu=3.0, qemu_cpu=20.0, dma_maps=100,
                                   dma_unmaps=90),
         DMATEST_ENDS: Footprint(at=12.0, vdsa_cpu=3.4, qemu_cpu=23.0, dma_maps=1700,
                                 dma_unmaps=1690)}


def test_the_host_cost_of_a_copy_is_taken_between_dmatest_start_and_end() -> None:
    assert host_cost(MARKS, 200, where=guest_run(results())) == {
        "host_wall_us_per_copy": 10_000.0, "dma_maps_per_copy": 8.0,
        "dma_unmaps_per_copy": 8.0, "vdsa_cpu_us_per_copy": pytest.approx(2_000.0),
        "qemu_cpu_us_per_copy": 15_000.0}


@pytest.mark.parametrize("seen", [DMATEST_STARTS, DMATEST_ENDS])
def test_a_dmatest_not_seen_to_start_and_end_has_no_host_cost(seen: str) -> None:
    with pytest.raises(GuestBenchError, match="not seen to start and end"):
        host_cost({seen: MARKS[seen]}, 200, where=guest_run(results()))


def test_the_viommu_cost_carries_both_runs_host_cost() -> None:
    run = guest_run(results())
    without = measure(run, PLAN)
    without = dataclasses.replace(without, extra={**without.extra,
                                                  "vdsa_cpu_us_per_copy": 100.0})
    behind = dataclasses.replace(without, extra={**without.extra, **host_cost(MARKS, 200,
                                                                              where=run)})
    cost = iommu_cost(without, behind, Iommu.LEGACY)
    assert cost.extra["vdsa_cpu_us_per_copy"] == pytest.approx(2_000.0)
    assert cost.extra["reference_vdsa_cpu_us_per_copy"] == 100.0
    assert cost.extra["dma_maps_per_copy"] == 8.0


def portal_results(size: int, **changed: str) -> dict[str, str]:
    found = {"size": str(size), "window": "16", "descriptors": "30000", "failed": "0",
             "lost": "0", "wrong_data": "0", "seconds": "2.000", "rate": "15000",
             "memcpy_copies": "4000000", "memcpy_seconds": "2.000", "memcpy_rate": "2000000"}
    found.update(changed)
    return {f"bench.portal.{size}.{name}": value for name, value in found.items()}


def test_the_portal_submitter_gives_a_rate_beside_memcpy_at_each_size() -> None:
    found = results() | portal_results(64) | portal_results(4096)
    small, page = portal_measurements(guest_run(found), PLAN)
    assert small.case == "user-space submitter (resource2, MOVDIR64B), memmove 64 B"
    assert page.case == "user-space submitter (resource2, MOVDIR64B), memmove 4 KiB"
    assert (small.unit, small.value, small.reference_value) == ("descriptors/s", 15000, 2000000)


@pytest.mark.parametrize("changed", [{"lost": "1"}, {"failed": "2"}, {"wrong_data": "1"},
                                     {"descriptors": "0"}, {"rate": "fast"}])
def test_a_portal_run_that_lost_failed_or_miscopied_gives_no_figure(
        changed: dict[str, str]) -> None:
    found = results() | portal_results(64, **changed) | portal_results(4096)
    with pytest.raises(GuestBenchError, match="portal"):
        portal_measurements(guest_run(found), PLAN)


def test_no_portal_figures_when_the_plan_runs_none() -> None:
    plan = GuestBenchPlan(threads=2, iterations=100, size=4096, copies=1000, portal_seconds=0)
    assert portal_measurements(guest_run(results()), plan) == []
    assert plan.script.decode().split()[-1] == "0"
