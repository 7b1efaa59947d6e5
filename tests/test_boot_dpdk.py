"""Boot tests of DPDK as a second, independent client of the virtual DSA: DPDK's own
``dmadev_autotest`` (``dpdk-test``, from the default release's packages, appended to the
initramfs with ``vdsa boot --with dpdk``) drives the function through DPDK's idxd driver,
which configures the device itself over BAR0; the kernel's idxd driver is never loaded
(guest-scripts/dpdk-dmadev.sh).

Two modes: uio_pci_generic without a vIOMMU, IOVA as physical addresses, where DPDK runs no
error-handling test (a NULL address is a valid physical one); and vfio-pci behind the legacy
vIOMMU, IOVA as virtual addresses, where it does. One boot per mode
against a `vdsa serve` of its own, which must outlive it; the tests share the boot and report
the sub-tests that ran and that were skipped, and the boot's seconds, as user properties
(``dpdk_ran``, ``dpdk_skipped``, ``boot_seconds``)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import CliBoot, run_cli, vdsa_env
from tests.test_boot_device import SCRIPTS, results
from tests.test_boot_dmatest import KERNEL_TROUBLE, dmesg_lines

pytestmark = pytest.mark.boot

SCRIPT = SCRIPTS / "dpdk-dmadev.sh"
# The WQs DPDK's idxd driver sets up, each a dmadev the whole test runs on: all eight take
# four times as long (README, "DPDK").
QUEUES = 2
SERVER_START = 60.0
SERVER_STOP = 30.0


@dataclass(frozen=True)
class Mode:
    name: str
    options: tuple[str, ...]  # `vdsa boot` options
    runs: tuple[str, ...]  # dmadev_autotest runs in the boot
    iova: str  # EAL's IOVA mode


MODES = {
    "pa": Mode("pa", (), ("run1",), "PA"),
    "va": Mode("va", ("--iommu", "legacy"), ("run1",), "VA"),
}
IDXD_DEVICES = [f"0000:00:01.0-q{n}" for n in range(QUEUES)]
# dmadev_autotest of DPDK 25.11 on each idxd dmadev: the API suite, then the instance suite.
API_PASSED = {"test_dma_get_dev_id_by_name", "test_dma_is_valid_dev", "test_dma_count",
              "test_dma_info_get", "test_dma_configure", "test_dma_vchan_setup",
              "test_dma_start_stop", "test_dma_stats", "test_dma_dump", "test_dma_completed",
              "test_dma_completed_status"}
# One vchan (no reconfiguration to fewer), no scatter-gather, no enqueue/dequeue ops.
API_SKIPPED = {"test_dma_reconfigure", "test_dma_sg", "test_dma_ops_enq_deq"}
INSTANCE_PASSED = {"copy", "stop_start", "burst_capacity", "fill"}
# No scatter-gather, no SVA (the device cannot, README "A guest vIOMMU"), m2d_autofree only
# when asked for, no enqueue/dequeue ops.
INSTANCE_SKIPPED = {"sg_copy", "sva_copy", "m2d_autofree", "dma_enq_deq"}
# Error handling copies from address 0, which must fail: only with IOVA as VA.
ERROR_HANDLING = "error_handling"


def expected_cases(mode: Mode) -> dict[str, dict[tuple[str, str], str]]:
    """Each dmadev's sub-tests, (suite, case) to status, as they must be in ``mode``."""
    handled = "succeeded" if mode.iova == "VA" else "skipped"
    idxd = {**{("api", c): "succeeded" for c in API_PASSED},
            **{("api", c): "skipped" for c in API_SKIPPED},
            **{("instance", c): "succeeded" for c in INSTANCE_PASSED},
            **{("instance", c): "skipped" for c in INSTANCE_SKIPPED},
            ("instance", ERROR_HANDLING): handled}
    return {device: idxd for device in IDXD_DEVICES}


@dataclass(frozen=True)
class DpdkBoot:
    mode: Mode
    boot: CliBoot
    server_alive: bool  # `vdsa serve` still ran when the boot had ended
    server_status: int | None  # its exit status once stopped (SIGTERM)
    server_log: Path

    def context(self) -> str:
        return f"{self.boot.context()} (server log: {self.server_log})"


@pytest.fixture(scope="module", params=list(MODES))
def dpdk(tmp_path_factory: pytest.TempPathFactory,
         request: pytest.FixtureRequest) -> DpdkBoot:
    mode = MODES[request.param]
    log_dir = tmp_path_factory.mktemp(f"dpdk-{mode.name}")
    socket = log_dir / "vdsa.sock"
    server_log = log_dir / "server.log"
    wrapper = log_dir / f"dpdk-{mode.name}.sh"
    wrapper.write_text(f"sh /vdsa/{SCRIPT.name} {mode.name} {len(mode.runs)} {QUEUES}\n")
    with server_log.open("w") as log_stream:
        server = subprocess.Popen(
            [sys.executable, "-m", "vdsa_server", "--log-format", "json", "serve", "--socket",
             str(socket)], stdout=subprocess.DEVNULL, stderr=log_stream, env=vdsa_env())
        try:
            deadline = time.monotonic() + SERVER_START
            while not socket.is_socket():
                assert server.poll() is None, f"vdsa serve exited; see {server_log}"
                assert time.monotonic() < deadline, f"vdsa serve did not listen; {server_log}"
                time.sleep(0.1)
            boot = run_cli("boot", "--socket", str(socket), *mode.options, "--with", "dpdk",
                           "--script", str(wrapper), "--file", str(SCRIPT), log_dir=log_dir)
            alive = server.poll() is None
        finally:
            server.terminate()
            try:
                server.wait(SERVER_STOP)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    return DpdkBoot(mode, boot, alive, server.returncode, server_log)


def cases(dpdk: DpdkBoot, run: str) -> dict[str, dict[tuple[str, str], str]]:
    """A run's sub-tests: each dmadev's (suite, case) to the status DPDK printed."""
    found: dict[str, dict[tuple[str, str], str]] = {}
    for line in results(dpdk.boot).get(f"dpdk.{run}.cases", "").splitlines():
        device, suite, case, status = line.split()
        found.setdefault(device, {})[(suite, case)] = status
    return found


def test_the_function_is_handed_to_dpdk_as_the_mode_asks(
        dpdk: DpdkBoot, record_property: Callable[[str, object], None]) -> None:
    found = results(dpdk.boot)
    steps = ["archive", "function", "hugepages", "modprobe", "bind",
             *(["iommu_group"] if dpdk.mode.iova == "VA" else [])]
    assert {step: found.get(f"dpdk.check.{step}") for step in steps} == dict.fromkeys(
        steps, "pass"), dpdk.context()
    assert found["dpdk.mode"] == dpdk.mode.name
    record_property("boot_seconds", dpdk.boot.summary["seconds"])
    for run in dpdk.mode.runs:
        assert found.get(f"dpdk.{run}.iova") == dpdk.mode.iova, dpdk.context()


def test_dmadev_autotest_says_test_ok(dpdk: DpdkBoot) -> None:
    found = results(dpdk.boot)
    verdicts = {run: (found.get(f"dpdk.{run}.status"), found.get(f"dpdk.{run}.exit"))
                for run in dpdk.mode.runs}
    assert verdicts == dict.fromkeys(dpdk.mode.runs, ("ok", "0")), dpdk.context()
    assert dpdk.boot.returncode == 0, dpdk.context()


def test_every_wq_is_a_dmadev_and_each_runs_what_it_must(
        dpdk: DpdkBoot, record_property: Callable[[str, object], None]) -> None:
    expected = expected_cases(dpdk.mode)
    for run in dpdk.mode.runs:
        devices = results(dpdk.boot).get(f"dpdk.{run}.devices", "").split()[1::2]
        assert devices == list(expected), dpdk.context()
        assert cases(dpdk, run) == expected, dpdk.context()
    run = dpdk.mode.runs[0]
    for status, name in (("succeeded", "dpdk_ran"), ("skipped", "dpdk_skipped")):
        record_property(name, sorted(f"{device} {suite} {case}"
                                     for device, found in cases(dpdk, run).items()
                                     for (suite, case), value in found.items()
                                     if value == status))


def test_dpdk_says_why_it_skipped(dpdk: DpdkBoot) -> None:
    for run in dpdk.mode.runs:
        skips = results(dpdk.boot).get(f"dpdk.{run}.skips", "").splitlines()
        sva = [n for n in range(QUEUES)
               if any(f"DMA Dev {n}: device does not support SVA" in s for s in skips)]
        assert sva == list(range(QUEUES)), skips
        not_va = [n for n in range(QUEUES)
                  if any(f"DMA Dev {n}: DPDK not in VA mode, skipping error handling" in s
                         for s in skips)]
        assert not_va == (list(range(QUEUES)) if dpdk.mode.iova == "PA" else []), skips


def test_the_guest_kernel_stays_quiet_and_never_loads_idxd(dpdk: DpdkBoot) -> None:
    lines = dmesg_lines(dpdk.boot)
    trouble = [line for line in lines
               if any(mark in line for mark in (*KERNEL_TROUBLE, "DMAR: DRHD: handling fault"))]
    assert not trouble, f"{trouble} {dpdk.context()}"
    assert not [line for line in lines if line.startswith("idxd ")], dpdk.context()


def test_the_server_outlives_the_boot(dpdk: DpdkBoot) -> None:
    assert dpdk.server_alive, dpdk.context()
    assert dpdk.server_status == 0, dpdk.context()
