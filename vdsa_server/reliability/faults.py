"""Fault cycles against one `vdsa serve` process, which must outlive them all:

- QEMU killed with SIGKILL while the guest's dmatest has copies in flight; the next boot's
  verified dmatest must pass (each cycle's boot is the previous kill's "next boot");
- the guest reset under a busy WQ, from outside (QMP system_reset) and by the guest kernel
  itself (Ctrl-Alt-Del: its drivers' shutdown hooks run with the copies in flight); the boot
  after the reset must pass its verified dmatest;
- a vfio-user client process (victim.py) SIGKILLed with 1 MiB copies in flight in the mapped
  portals, after its own verified stream: cheap cycles, so that many fit in CI.

After every cycle the server's open fds must return to what it had before its first client
(a leaked DMA region or eventfd shows there), and its process must still be there.
"""

from __future__ import annotations

import enum
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from vdsa_server.bench.serving import ProcessSample, ServeError, sample_process, serving
from vdsa_server.builds.guest_image import GuestImage
from vdsa_server.launch import console
from vdsa_server.launch.launcher import BootSpec, GuestRun, Machine, boot
from vdsa_server.log import get_logger
from vdsa_server.paths import QEMU_CONFIGS
from vdsa_server.reliability import victim

log = get_logger()

SCRIPTS = QEMU_CONFIGS / "guest-scripts"
# dmatest.sh's verified first run (2 threads x 200 copies), then copies without end.
INFLIGHT_SCRIPT = "sh /vdsa/dmatest.sh 2 200 inflight\n"
FINAL_SCRIPT = "sh /vdsa/dmatest.sh 2 200 verify\n"
VERIFIED_RESULT = "dmatest.check.run1"
INFLIGHT_RESULT = "dmatest.inflight"
BOOT_TIMEOUT = 180.0
FD_SETTLE = 10.0  # seconds for the server to notice a dead peer and close its fds
VICTIM_START = 60.0
# A victim is killed this long after its check passed: its copies are then in flight.
KILL_DELAY = (0.02, 0.3)


def open_fd_targets(pid: int) -> list[str]:
    """What each of ``pid``'s fds is open on, for a report of the ones it kept."""
    targets = []
    for fd in sorted(Path(f"/proc/{pid}/fd").iterdir(), key=lambda path: int(path.name)):
        try:
            targets.append(f"{fd.name}->{fd.readlink()}")
        except FileNotFoundError:
            continue  # closed between the listing and the read
    return targets


class FaultError(Exception):
    """A cycle's check failed: the server died, leaked, or the next user found it broken."""


class Reboot(enum.Enum):
    """How a guest is reset under a busy WQ."""

    SYSTEM_RESET = "system-reset"
    CTRL_ALT_DEL = "ctrl-alt-del"

    async def apply(self, machine: Machine) -> None:
        if self is Reboot.SYSTEM_RESET:
            await machine.reset()
        else:
            await machine.ctrl_alt_del()


@dataclass(frozen=True)
class FaultPlan:
    qemu_kills: int = 10
    client_kills: int = 100
    reboots: tuple[Reboot, ...] = tuple(Reboot)
    seed: int = 0


@dataclass
class FaultReport:
    qemu_kills: int = 0
    reboots: list[str] = field(default_factory=list)
    client_kills: int = 0
    final_boot: bool = False
    boot_seconds: list[float] = field(default_factory=list)
    baseline: ProcessSample | None = None
    after: ProcessSample | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "qemu_kills": self.qemu_kills, "reboots": self.reboots,
            "client_kills": self.client_kills, "final_boot_passed": self.final_boot,
            "boot_seconds": {
                "boots": len(self.boot_seconds),
                "min": min(self.boot_seconds, default=0.0),
                "median": statistics.median(self.boot_seconds) if self.boot_seconds else 0.0,
                "max": max(self.boot_seconds, default=0.0)},
            "server_fds": {"baseline": self.baseline.open_fds if self.baseline else None,
                           "after": self.after.open_fds if self.after else None},
            "server_rss_bytes": {"baseline": self.baseline.rss_bytes if self.baseline else None,
                                 "after": self.after.rss_bytes if self.after else None},
            "seconds": round(self.seconds, 1),
        }


class _Cycles:
    """The server, the guest and the report that every cycle shares."""

    def __init__(self, socket: Path, server: trio.Process, guest: GuestImage, log_dir: Path,
                 report: FaultReport) -> None:
        self.socket = socket
        self.server = server
        self.guest = guest
        self.log_dir = log_dir
        self.report = report
        self.files = {"dmatest.sh": (SCRIPTS / "dmatest.sh").read_bytes()}

    def spec(self, script: str, name: str) -> BootSpec:
        return BootSpec(script=script.encode(), files=self.files, socket=self.socket,
                        guest=self.guest, log_dir=self.log_dir / name, timeout=BOOT_TIMEOUT)

    async def boot(self, script: str, name: str,
                   act: Callable[[int, Machine], Awaitable[None]]) -> tuple[GuestRun, list[str]]:
        """Boot ``script``; at the n-th (from 1) report of copies in flight, ``act(n,
        machine)``.  Returns the run and each boot's verified-run result, in order."""
        verified: list[str] = []
        inflight = 0

        async def hook(event: console.Event, machine: Machine) -> None:
            nonlocal inflight
            if isinstance(event, console.Result):
                if event.name == VERIFIED_RESULT:
                    verified.append(event.value)
                elif event.name == INFLIGHT_RESULT:
                    inflight += 1
                    await act(inflight, machine)

        run = await boot(self.spec(script, name), faults=hook)
        self.report.boot_seconds.append(run.seconds)
        if any(value != "pass" for value in verified):
            raise FaultError(f"boot {name}: a verified dmatest run failed ({verified}); "
                             f"console log: {run.console_log}")
        return run, verified

    async def settled(self, what: str, limit: float = FD_SETTLE) -> None:
        """Wait until the server's fds are back at the baseline, else FaultError."""
        assert self.report.baseline is not None
        deadline = time.monotonic() + limit
        while True:
            if self.server.returncode is not None:
                raise FaultError(f"vdsa serve ended with {self.server.returncode} after {what}")
            sample = sample_process(self.server.pid)
            if sample.open_fds <= self.report.baseline.open_fds:
                self.report.after = sample
                return
            if time.monotonic() > deadline:
                raise FaultError(f"after {what} the server holds {sample.open_fds} fds, "
                                 f"{self.report.baseline.open_fds} before its first client: "
                                 f"{', '.join(open_fd_targets(self.server.pid))}")
            await trio.sleep(0.05)

    async def qemu_kill(self, cycle: int) -> None:
        async def kill(_count: int, machine: Machine) -> None:
            machine.kill()

        run, verified = await self.boot(INFLIGHT_SCRIPT, f"kill-{cycle}", kill)
        if not run.killed or verified != ["pass"]:
            raise FaultError(f"kill cycle {cycle}: copies never got in flight (verified "
                             f"{verified}, exit {run.exit_status}); console log: "
                             f"{run.console_log}")
        await self.settled(f"QEMU kill {cycle}")
        self.report.qemu_kills += 1
        log.info("faults.qemu_killed", cycle=cycle, seconds=run.seconds)

    async def reboot(self, how: Reboot) -> None:
        async def reset_then_kill(count: int, machine: Machine) -> None:
            if count == 1:
                await how.apply(machine)
            else:
                machine.kill()

        run, verified = await self.boot(INFLIGHT_SCRIPT, f"reboot-{how.value}",
                                        reset_then_kill)
        if run.boots != 2 or verified != ["pass", "pass"]:
            raise FaultError(f"{how.value} under a busy WQ: {run.boots} boots, verified runs "
                             f"{verified}; console log: {run.console_log}")
        await self.settled(f"the {how.value} boot")
        self.report.reboots.append(how.value)
        log.info("faults.rebooted", how=how.value, seconds=run.seconds)

    async def client_kill(self, cycle: int, rng: random.Random) -> None:
        argv = [sys.executable, "-m", victim.__name__, str(self.socket), str(self.server.pid)]
        stderr = self.log_dir / "victim-stderr.txt"
        with stderr.open("a") as errors:
            process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE,
                                                       stderr=errors)
        assert process.stdout is not None
        try:
            with trio.move_on_after(VICTIM_START):
                line = b""
                while not line.endswith(b"\n"):
                    chunk = await process.stdout.receive_some()
                    if not chunk:
                        break
                    line += chunk
            if not line.startswith(victim.VERIFIED.encode()):
                raise FaultError(f"client cycle {cycle}: the client's check did not pass "
                                 f"({line!r}; its stderr: {stderr})")
            await trio.sleep(rng.uniform(*KILL_DELAY))
        finally:
            with trio.CancelScope(shield=True):
                process.send_signal(signal.SIGKILL)
                await process.wait()
                await process.stdout.aclose()
        await self.settled(f"client kill {cycle}")
        self.report.client_kills += 1


async def _no_action(_count: int, _machine: Machine) -> None:
    """The last boot reports no copies in flight: nothing to do."""


async def run_faults(plan: FaultPlan, guest: GuestImage, log_dir: Path,
                     env: Mapping[str, str] | None = None) -> FaultReport:
    """Every cycle of ``plan`` against one `vdsa serve` (environment ``env``), then a last
    boot whose verified dmatest must pass; FaultError at the first failure."""
    report = FaultReport()
    started = time.monotonic()
    socket = log_dir / "vdsa.sock"
    async with serving(socket, log_dir / "server.log", env) as server:
        report.baseline = sample_process(server.pid)
        cycles = _Cycles(socket, server, guest, log_dir, report)
        try:
            for cycle in range(plan.qemu_kills):
                await cycles.qemu_kill(cycle)
            for how in plan.reboots:
                await cycles.reboot(how)
            rng = random.Random(plan.seed)
            for cycle in range(plan.client_kills):
                await cycles.client_kill(cycle, rng)
            run, _ = await cycles.boot(FINAL_SCRIPT, "final", _no_action)
            if run.exit_status != 0:
                raise FaultError(f"the last boot's dmatest failed (exit {run.exit_status}); "
                                 f"console log: {run.console_log}")
            report.final_boot = True
            await cycles.settled("the last boot")
        except ServeError as exc:
            raise FaultError(f"the server is gone: {exc}") from None
    report.seconds = time.monotonic() - started
    return report
