"""The guest benchmark: in one boot with vdsa's own server, the kernel's dmatest copies memory
through the idxd dmaengine channel of the virtual DSA (whole-buffer copies, not verified), then the
same guest's CPU copies buffers of the same size with memcpy (``guest-scripts/bench.sh``, which
runs ``dmatest.sh`` in bench mode and ``native/guest/memcpy_bench.c``); then a user-space
submitter stores 64 B and 4 KiB memmoves into the portal at full rate beside the CPU's memcpy
of the same size (``native/guest/portal_bench.c``).

Both report KB/s with dmatest's KB of 1024 bytes; the measurements are in MB/s of 10^6 bytes.
Figures from a run that failed, lost copies or missed a result are an error, never figures.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import trio

from vdsa_server.bench.results import Measurement
from vdsa_server.bench.serving import process_cpu_seconds
from vdsa_server.builds.guest_image import GuestImage
from vdsa_server.device.config import DeviceConfig
from vdsa_server.launch import console
from vdsa_server.launch.launcher import BootSpec, GuestRun, Iommu, boot_served
from vdsa_server.log import get_logger
from vdsa_server.paths import QEMU_CONFIGS
from vdsa_server.server import VdsaServer

log = get_logger()

SCRIPTS = QEMU_CONFIGS / "guest-scripts"
# The whole boot takes about 20 s under TCG with the default plan.
BOOT_TIMEOUT = 300.0
# dmatest's KB (dmatest_KBs() in drivers/dma/dmatest.c divides bytes by 1024), memcpy-bench's too.
KB = 1024
MB = 1_000_000
CHANNEL = "dma0chan0"
DMATEST_FIGURES = ("threads", "tests", "failures", "iops", "kbps")
MEMCPY_FIGURES = ("size", "copies", "bytes", "seconds", "iops", "kbps")
PORTAL_SIZES = (64, 4096)
PORTAL_FIGURES = ("size", "window", "descriptors", "failed", "lost", "wrong_data", "seconds",
                  "rate", "memcpy_copies", "memcpy_seconds", "memcpy_rate")
LAST_LINES = 15
# dmatest.sh's results around the copies of its run: the channel just before ``run`` is
# written, the seconds just after the last thread's summary (within its 1 s poll).
DMATEST_STARTS = "bench.dmatest.channel"
DMATEST_ENDS = "bench.dmatest.seconds"
QEMU_COMM = "qemu-system-x86"


class GuestBenchError(RuntimeError):
    """The guest benchmark gave no trustworthy figures; the message says why and where the
    console log is."""


@dataclass(frozen=True)
class GuestBench:
    """One guest benchmark boot: its measurements, and the boot itself (``run.results``,
    ``run.console_log`` in the log directory, ``run.seconds`` of wall time)."""

    measurements: list[Measurement]
    run: GuestRun


@dataclass(frozen=True)
class Footprint:
    """What the host had spent at one moment of a bench boot."""

    at: float  # time.monotonic()
    vdsa_cpu: float  # seconds of this process: the server (its loop, libvfio-user, the
    # engine's threads) and the launcher reading the console
    qemu_cpu: float  # seconds of QEMU (its vCPU thread runs the guest's IOMMU driver too)
    dma_maps: int
    dma_unmaps: int


def qemu_cpu_seconds() -> float:
    """CPU time of the QEMU this process started (0 before it runs)."""
    total = 0.0
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == QEMU_COMM:
                    total += process_cpu_seconds(int(pid))
            except FileNotFoundError:
                continue  # gone between the listing and the read
    return total


def footprint(server: VdsaServer) -> Footprint:
    times = os.times()
    dma = server.engine.dma_counters()
    return Footprint(time.monotonic(), times.user + times.system, qemu_cpu_seconds(),
                     dma.maps, dma.unmaps)


@dataclass(frozen=True)
class GuestBenchPlan:
    """``threads`` dmatest threads of ``iterations`` copies, then ``copies`` CPU memcpys, all of
    ``size`` bytes; then ``portal_seconds`` of each portal submitter size and of its memcpy
    (0: none).  The defaults are bench.sh's: each half takes a few seconds under TCG."""

    threads: int = 4
    iterations: int = 2000
    size: int = 16384
    copies: int = 50000
    portal_seconds: int = 2

    def __post_init__(self) -> None:
        bad = [name for name, value in vars(self).items()
               if value < (0 if name == "portal_seconds" else 1)]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be positive: {self}")

    @property
    def script(self) -> bytes:
        """The guest script: bench.sh with this plan."""
        args = f"{self.threads} {self.iterations} {self.size} {self.copies} {self.portal_seconds}"
        return f"sh /vdsa/bench.sh {args}\n".encode()


async def run_guest_bench(
    log_dir: Path, plan: GuestBenchPlan | None = None, *, config: DeviceConfig | None = None,
    boot_timeout: float = BOOT_TIMEOUT, on_event: Callable[[console.Event], None] | None = None,
    guest: GuestImage | None = None, iommu: Iommu | None = None,
) -> GuestBench:
    """Boot the guest with vdsa's own server (``config``, default the default device) and run
    ``plan`` (default :class:`GuestBenchPlan`'s): dmatest's unverified copies on the idxd channel,
    then the CPU's memcpys.  The boot's logs (console.log, dmesg.txt, qemu-argv.json) and the
    server's socket go to ``log_dir``; ``on_event`` sees the console's events as they come;
    the boot may take ``boot_timeout`` seconds; ``guest`` is the image booted (default: the
    default release's); ``iommu`` puts a vIOMMU in front of the device.  ``log_dir`` is
    created if needed.

    Raises GuestBenchError if the guest script fails, dmatest reports failures or a figure is
    missing, and what :func:`~vdsa_server.launch.launcher.boot` raises if the boot does.
    """
    plan = plan or GuestBenchPlan()
    if iommu is not None:
        # The portal submitter writes guest-physical addresses, which a vIOMMU would fault.
        plan = dataclasses.replace(plan, portal_seconds=0)
    # The server's socket goes there before the launcher would create it.
    await trio.Path(log_dir).mkdir(parents=True, exist_ok=True)
    files = {name: (SCRIPTS / name).read_bytes() for name in ("bench.sh", "dmatest.sh")}
    socket = log_dir / "vdsa.sock"
    spec = BootSpec(script=plan.script, files=files, socket=socket,
                    log_dir=log_dir, timeout=boot_timeout, guest=guest, iommu=iommu)
    log.info("bench.guest.start", threads=plan.threads, iterations=plan.iterations,
             size=plan.size, copies=plan.copies, log_dir=str(log_dir))
    server = VdsaServer(socket, config or DeviceConfig())
    marks: dict[str, Footprint] = {}

    def watch(event: console.Event) -> None:
        if isinstance(event, console.Result) and event.name in (DMATEST_STARTS, DMATEST_ENDS):
            marks[event.name] = footprint(server)
        if on_event is not None:
            on_event(event)

    run = await boot_served(spec, server, watch)
    measurement = measure(run, plan, iommu)
    measurement = dataclasses.replace(measurement, extra={
        **measurement.extra, **host_cost(marks, float(measurement.extra["tests"]), where=run)})
    portals = portal_measurements(run, plan)
    log.info("bench.guest.done", dmatest_mb_s=round(measurement.value, 1),
             memcpy_mb_s=round(measurement.reference_value, 1),
             portal_rates=[round(m.value) for m in portals], boot_seconds=run.seconds,
             console_log=str(run.console_log))
    return GuestBench([measurement, *portals], run)


def measure(run: GuestRun, plan: GuestBenchPlan, iommu: Iommu | None = None) -> Measurement:
    """The measurement of a finished bench boot, after checking that it did what ``plan``
    asked without a failure."""
    where = f"(console log: {run.console_log})"
    problems = [f"{name.removeprefix('bench.check.')} failed" for name, value
                in run.results.items() if name.startswith("bench.check.") and value != "pass"]
    failures = run.results.get("bench.dmatest.failures", "0")
    if failures != "0":
        problems.append(f"dmatest reported {failures} failed copies")
    if run.exit_status != 0:
        problems.append(f"the script exited with status {run.exit_status}")
    if problems:
        lines = "\n".join(run.lines[-LAST_LINES:])
        raise GuestBenchError(f"the guest bench failed: {'; '.join(problems)} {where}; "
                              f"its last lines:\n{lines}")
    dmatest = _figures(run, "bench.dmatest", DMATEST_FIGURES, where)
    memcpy = _figures(run, "bench.memcpy", MEMCPY_FIGURES, where)
    params = {key: value for key, _, value in (
        line.partition("=") for line in run.results.get("bench.params", "").splitlines())}
    expected: dict[str, tuple[object, object]] = {
        "dmatest channel": (run.results.get("bench.dmatest.channel"), CHANNEL),
        "dmatest noverify": (params.get("noverify"), "Y"),
        "dmatest norandom": (params.get("norandom"), "Y"),
        "dmatest buffer size": (params.get("test_buf_size"), str(plan.size)),
        "dmatest threads": (dmatest["threads"], plan.threads),
        "dmatest tests": (dmatest["tests"], plan.threads * plan.iterations),
        "memcpy size": (memcpy["size"], plan.size),
        "memcpy copies": (memcpy["copies"], plan.copies),
    }
    wrong = [f"{what} {got} (expected {want})" for what, (got, want) in expected.items()
             if got != want]
    if wrong:
        raise GuestBenchError(f"the guest bench did not run as asked: {'; '.join(wrong)} {where}")
    size_label = f"{plan.size // KB} KiB" if plan.size % KB == 0 else f"{plan.size} B"
    behind = f", behind the vIOMMU ({iommu.value})" if iommu else ""
    return Measurement(
        group="guest",
        case=f"dmatest memcpy {size_label}, no verify, {plan.threads} threads{behind}",
        unit="MB/s", value=dmatest["kbps"] * KB / MB,
        reference="guest CPU memcpy, 1 thread", reference_value=memcpy["kbps"] * KB / MB,
        extra={"iops": dmatest["iops"], "tests": dmatest["tests"],
               "failures": dmatest["failures"], "reference_iops": memcpy["iops"],
               "reference_copies": memcpy["copies"], "reference_seconds": memcpy["seconds"]},
    )


def host_cost(marks: dict[str, Footprint], copies: float, *, where: GuestRun
              ) -> dict[str, float]:
    """Where the host's time went during dmatest's ``copies`` copies, a copy: wall time, DMA
    maps and unmaps, and the CPU of vdsa and of QEMU."""
    if DMATEST_STARTS not in marks or DMATEST_ENDS not in marks or copies <= 0:
        raise GuestBenchError(f"dmatest's run was not seen to start and end, or made no "
                              f"copies (console log: {where.console_log})")
    start, end = marks[DMATEST_STARTS], marks[DMATEST_ENDS]
    return {
        "host_wall_us_per_copy": (end.at - start.at) * 1e6 / copies,
        "dma_maps_per_copy": (end.dma_maps - start.dma_maps) / copies,
        "dma_unmaps_per_copy": (end.dma_unmaps - start.dma_unmaps) / copies,
        "vdsa_cpu_us_per_copy": (end.vdsa_cpu - start.vdsa_cpu) * 1e6 / copies,
        "qemu_cpu_us_per_copy": (end.qemu_cpu - start.qemu_cpu) * 1e6 / copies,
    }


def portal_measurements(run: GuestRun, plan: GuestBenchPlan) -> list[Measurement]:
    """The portal submitter's figures of a finished bench boot (none if the plan ran none);
    ``measure`` has checked the run's steps."""
    if not plan.portal_seconds:
        return []
    where = f"(console log: {run.console_log})"
    measurements = []
    for size in PORTAL_SIZES:
        found = _figures(run, f"bench.portal.{size}", PORTAL_FIGURES, where)
        bad = {name: found[name] for name in ("failed", "lost", "wrong_data") if found[name]}
        if bad or found["size"] != size or not found["descriptors"]:
            raise GuestBenchError(f"the portal submitter at {size} B did not run cleanly: "
                                  f"{found} {where}")
        label = f"{size // KB} KiB" if size >= KB else f"{size} B"
        measurements.append(Measurement(
            group="guest", case=f"user-space submitter (resource2, MOVDIR64B), memmove {label}",
            unit="descriptors/s", value=found["rate"],
            reference=f"guest CPU memcpy {label}, copies/s", reference_value=found["memcpy_rate"],
            extra={"descriptors": found["descriptors"], "window": found["window"],
                   "seconds": found["seconds"], "reference_copies": found["memcpy_copies"]}))
    return measurements


def iommu_cost(without: Measurement, behind: Measurement, iommu: Iommu) -> Measurement:
    """dmatest behind a vIOMMU against the same dmatest without one, measured in the same
    run: the share of the throughput that the vIOMMU's maps and unmaps leave."""
    return Measurement(
        group="guest vIOMMU", case=f"dmatest behind the vIOMMU ({iommu.value})", unit="MB/s",
        value=behind.value, reference="the same dmatest without a vIOMMU",
        reference_value=without.value,
        extra={"iops": behind.extra["iops"], "reference_iops": without.extra["iops"],
               **{key: value for key, value in behind.extra.items() if "_per_copy" in key},
               **{f"reference_{key}": value for key, value in without.extra.items()
                  if "_per_copy" in key}})


def _figures(run: GuestRun, prefix: str, names: Iterable[str], where: str) -> dict[str, float]:
    """The numbers the guest reported as ``prefix.NAME``; any missing or not a number is an
    error."""
    figures: dict[str, float] = {}
    missing = []
    for name in names:
        try:
            figures[name] = float(run.results[f"{prefix}.{name}"])
        except (KeyError, ValueError):
            missing.append(f"{prefix}.{name}={run.results.get(f'{prefix}.{name}')!r}")
    if missing:
        raise GuestBenchError(f"the guest bench reported no number for {', '.join(missing)} "
                              f"{where}")
    return figures
