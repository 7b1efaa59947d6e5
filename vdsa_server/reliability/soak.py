"""The soak: for N minutes, a guest runs verified dmatest rounds on one `vdsa serve` while the
harness streams checked operations into a second one (reconnecting every half minute, every
other connection through trapped portals), and both servers' resident memory and open fds are
sampled.  It fails on any copy failure, wrong result, kernel warning, a server that ends, or
growth (drift.py)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from vdsa_server.bench.harness import (
    MEMORY,
    MEMORY_SIZE,
    SRC,
    Bench,
    BenchError,
    BenchPlan,
    CpuClock,
    Work,
    checked_operations,
    dest,
)
from vdsa_server.bench.hostref import HostReference
from vdsa_server.bench.serving import ServeError, sample_process, serving
from vdsa_server.builds.guest_image import GuestImage
from vdsa_server.client import GuestMemory, VfioUserClient
from vdsa_server.client.driver import DsaDriver
from vdsa_server.device.descriptors import DsaOpcode
from vdsa_server.launch import console
from vdsa_server.launch.launcher import BootSpec, LaunchError, boot
from vdsa_server.log import get_logger
from vdsa_server.paths import QEMU_CONFIGS
from vdsa_server.reliability.drift import MiB, Series

log = get_logger()

SCRIPTS = QEMU_CONFIGS / "guest-scripts"
# Boot and power-off on top of the script's time; the script may run one round past it.
BOOT_MARGIN = 300.0
CASE_SECONDS = 0.5
CASE_SIZE = 64 << 10
DMATEST_THREADS = 2
DMATEST_ITERATIONS = 500


@dataclass(frozen=True)
class SoakPlan:
    minutes: float
    sample_seconds: float = 5.0
    reconnect_seconds: float = 30.0
    max_rss_drift: int = 16 * MiB


@dataclass
class SoakReport:
    plan: SoakPlan
    seconds: float = 0.0
    guest_rounds: int = 0
    guest_copies: int = 0
    guest_copy_failures: int = 0
    guest_exit_status: int | None = None
    guest_kernel: str | None = None
    harness_descriptors: int = 0
    harness_connections: int = 0
    guest_server: Series = field(default_factory=Series)
    harness_server: Series = field(default_factory=Series)
    failures: list[str] = field(default_factory=list)

    def judge(self) -> None:
        """Add the growth failures of both servers."""
        for name, series in (("guest's server", self.guest_server),
                             ("harness's server", self.harness_server)):
            drift = series.drift()
            if drift is None:
                self.failures.append(f"{name}: too few samples after the warm-up to judge "
                                     "growth: soak longer or sample more often")
            else:
                self.failures += drift.failures(name, self.plan.max_rss_drift)

    def as_dict(self) -> dict[str, Any]:
        def drift(series: Series) -> dict[str, Any] | None:
            found = series.drift()
            return found.as_dict() if found else None

        return {
            "minutes": self.plan.minutes, "seconds": round(self.seconds, 1),
            "guest": {"kernel": self.guest_kernel, "rounds": self.guest_rounds,
                      "verified_copies": self.guest_copies,
                      "copy_failures": self.guest_copy_failures,
                      "exit_status": self.guest_exit_status},
            "harness": {"descriptors": self.harness_descriptors,
                        "connections": self.harness_connections},
            "guest_server": drift(self.guest_server),
            "harness_server": drift(self.harness_server),
            "max_rss_drift_mib": self.plan.max_rss_drift / MiB,
            "failures": self.failures, "passed": not self.failures,
        }


def _count_dmatest(report: SoakReport) -> Any:
    """A console hook that adds up dmatest.sh's results as each round reports them."""

    def on_event(event: console.Event) -> None:
        if not isinstance(event, console.Result):
            return
        name, value = event.name, event.value
        if name.startswith("dmatest.run") and name.endswith(".tests"):
            report.guest_copies += int(value or 0)
        elif name.startswith("dmatest.run") and name.endswith(".failures"):
            report.guest_copy_failures += int(value or 0)
        elif name.startswith("dmatest.check.") and value != "pass":
            report.failures.append(f"guest: dmatest check {name} = {value}")
        elif name == "soak.round":
            report.guest_rounds = int(value)

    return on_event


async def _guest(report: SoakReport, socket: Path, guest: GuestImage, log_dir: Path,
                 seconds: float) -> None:
    script = (f"sh /vdsa/soak.sh {int(seconds)} {DMATEST_THREADS} "
              f"{DMATEST_ITERATIONS}\n")
    spec = BootSpec(script=script.encode(), socket=socket, guest=guest,
                    files={name: (SCRIPTS / name).read_bytes()
                           for name in ("soak.sh", "dmatest.sh")},
                    log_dir=log_dir / "guest", timeout=seconds + BOOT_MARGIN,
                    script_timeout=seconds + BOOT_MARGIN / 2)
    try:
        run = await boot(spec, _count_dmatest(report))
    except LaunchError as exc:
        report.failures.append(f"guest: {exc}")
        return
    report.guest_exit_status = run.exit_status
    report.guest_kernel = run.kernel
    if run.exit_status != 0:
        report.failures.append(f"guest: soak.sh exited with {run.exit_status} "
                               f"(console log: {run.console_log})")
    if report.guest_copy_failures:
        report.failures.append(f"guest: {report.guest_copy_failures} dmatest copies failed")


async def _checked_cases(bench: Bench, report: SoakReport) -> None:
    """One memmove and every operation, each for CASE_SECONDS, their data checked."""
    memmove = Work(DsaOpcode.MEMMOVE, CASE_SIZE,
                   {"src_addr": SRC, "dst_addr": dest(0), "xfer_size": CASE_SIZE})
    bench.memory.write(dest(0), bytes(CASE_SIZE))
    result = await bench.throughput(memmove)
    if bench.memory.read(dest(0), CASE_SIZE) != bench.memory.read(SRC, CASE_SIZE):
        raise BenchError("memmove: the destination differs from the source")
    report.harness_descriptors += result.completed
    for case in checked_operations(bench, CASE_SIZE):
        bench.memory.write(dest(0), bytes(2 * CASE_SIZE))
        result = await bench.throughput(case.work)
        if not case.verify():
            raise BenchError(f"{case.name}: wrong data in the destination")
        report.harness_descriptors += result.completed


async def _harness(report: SoakReport, socket: Path, server_pid: int, deadline: float,
                   plan: SoakPlan) -> None:
    try:
        # Loaded once: an hour's connections use the build that was current at the start.
        host = HostReference()
        while time.monotonic() < deadline:
            until = min(deadline, time.monotonic() + plan.reconnect_seconds)
            async with VfioUserClient.connect(socket) as client:
                with GuestMemory(MEMORY, MEMORY_SIZE) as memory:
                    bench = Bench(DsaDriver(client, memory), CpuClock(server_pid), host,
                                  BenchPlan(CASE_SECONDS))
                    await bench.set_up()
                    if report.harness_connections % 2:
                        while time.monotonic() < until:
                            await _checked_cases(bench, report)
                    else:
                        async with bench.map_bar():
                            while time.monotonic() < until:
                                await _checked_cases(bench, report)
            report.harness_connections += 1
    except (BenchError, OSError) as exc:
        report.failures.append(f"harness: {exc}")


async def run_soak(plan: SoakPlan, guest: GuestImage, log_dir: Path,
                   env: Mapping[str, str] | None = None) -> SoakReport:
    """The soak; its failures are in the report (and passed is False), not raised."""
    report = SoakReport(plan)
    seconds = plan.minutes * 60
    guest_socket, harness_socket = log_dir / "guest.sock", log_dir / "harness.sock"
    started = time.monotonic()
    async with serving(guest_socket, log_dir / "guest-server.log", env) as guest_server, \
            serving(harness_socket, log_dir / "harness-server.log", env) as harness_server:
        done = trio.Event()

        async def sample() -> None:
            while not done.is_set():
                now = time.monotonic() - started
                try:
                    report.guest_server.add(now, sample_process(guest_server.pid))
                    report.harness_server.add(now, sample_process(harness_server.pid))
                except ServeError as exc:
                    report.failures.append(f"a server ended during the soak: {exc}")
                    return
                with trio.move_on_after(plan.sample_seconds):
                    await done.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            async with trio.open_nursery() as work:
                work.start_soon(_guest, report, guest_socket, guest, log_dir, seconds)
                work.start_soon(_harness, report, harness_socket, harness_server.pid,
                                started + seconds, plan)
            done.set()
        for name, process in (("guest's", guest_server), ("harness's", harness_server)):
            if process.returncode is not None:
                report.failures.append(f"the {name} server ended with {process.returncode}")
    report.seconds = time.monotonic() - started
    report.judge()
    log.info("soak.done", seconds=round(report.seconds), failures=len(report.failures))
    return report
