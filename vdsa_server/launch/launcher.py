"""Launching QEMU with the vdsa guest and, optionally, a vfio-user device.

One boot: check the QEMU binary, its firmware and that the guest CPU will have
MOVDIR64B; start QEMU with the guest kernel, the base initramfs plus the image's
extra archives the boot asks for (DPDK) and an archive holding the user's
script, and a ``vfio-user-pci`` device at the given socket;
stream and parse the serial console; and always stop QEMU, however the boot
ends (guest power-off, timeout, panic, cancellation).
"""

from __future__ import annotations

import enum
import json
import os
import signal
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from vdsa_server.builds.guest_image import GuestImage, find_guest, script_archive
from vdsa_server.builds.qemu_build import cached_qemu_binary
from vdsa_server.launch import console
from vdsa_server.launch.qmp import Monitor
from vdsa_server.log import get_logger
from vdsa_server.paths import QEMU_CONFIGS

if TYPE_CHECKING:
    from vdsa_server.device.config import DeviceConfig
    from vdsa_server.server import VdsaServer

log = get_logger()

DEFAULT_FIRMWARE_DIRS = (Path("/usr/share/qemu"), Path("/usr/share/seabios"))
# What a q35 direct-kernel boot loads: SeaBIOS, the Linux loader option ROM and
# the TPR-patching ROM that x86 machines load by default.
REQUIRED_FIRMWARE = ("bios-256k.bin", "linuxboot_dma.bin", "kvmvapic.bin")
# loglevel=1 keeps kernel messages off the console (scripts read dmesg) so they
# cannot interleave with frames; panic=-1 with -no-reboot turns a panic into exit;
# log_buf_len=4M keeps the messages the scripts count (dmatest prints a line per
# failed copy: 4 threads x 1000 failures are about 600 KB, four times the default;
# 7.2 adds about 4 bytes of record metadata per byte of log).
KERNEL_CMDLINE = "console=ttyS0 loglevel=1 panic=-1 log_buf_len=4M"
PROBE_TIMEOUT = 60.0
STOP_GRACE = 5.0
STDERR_TAIL = 40
# Where a boot's log directory keeps all QEMU printed on stderr.
QEMU_STDERR = "qemu-stderr.txt"
# How long a guest that has reported its script's end may take to power off.
POWER_OFF_GRACE = 10.0
# What the default script timeout leaves of the boot's for booting and reporting.
SCRIPT_TIMEOUT_MARGIN = 60.0
# The exit status a boot ended by a fault hook's kill reports, as a shell reports SIGKILL.
KILLED_STATUS = 128 + signal.SIGKILL


class LaunchError(RuntimeError):
    """A boot could not start or did not finish; the message says why."""


class QemuNotFound(LaunchError):
    pass


class QemuUnsuitable(LaunchError):
    """The QEMU binary runs but lacks what vdsa needs (vfio-user-pci, QMP)."""


class FirmwareMissing(LaunchError):
    pass


class NoMovdir64b(LaunchError):
    """The guest CPU would lack MOVDIR64B, so the stock idxd driver cannot load."""


class ServerSocketMissing(LaunchError):
    pass


class GuestBootTimeout(LaunchError):
    pass


class GuestPanic(LaunchError):
    pass


class QemuExited(LaunchError):
    """QEMU ended before the guest reported the end of its script."""

    def __init__(self, message: str, *, returncode: int | None, argv: Sequence[str],
                 stderr: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.argv = list(argv)
        self.stderr = stderr


@dataclass(frozen=True)
class Profile:
    name: str
    readconfig: Path
    accel: str
    cpu: str
    description: str


def load_profiles(path: Path | None = None) -> dict[str, Profile]:
    source = path or QEMU_CONFIGS / "profiles.toml"
    data = tomllib.loads(source.read_text())
    profiles = {}
    for name, entry in data["profiles"].items():
        profiles[name] = Profile(
            name=name,
            readconfig=source.parent / entry["readconfig"],
            accel=entry["accel"],
            cpu=entry["cpu"],
            description=entry.get("description", ""),
        )
    return profiles


def resolve_qemu(explicit: Path | None = None) -> Path:
    """The QEMU to run: ``explicit`` (``--qemu``), else ``$VDSA_QEMU``, else our build."""
    env = os.environ.get("VDSA_QEMU")
    candidate = explicit or (Path(env) if env else None) or cached_qemu_binary()
    origin = "--qemu" if explicit else "$VDSA_QEMU" if env else "the vdsa build cache"
    if not candidate.is_file() or not os.access(candidate, os.X_OK):
        hint = "" if explicit or env else " (run `vdsa build qemu`)"
        raise QemuNotFound(f"no QEMU executable at {candidate} (from {origin}){hint}")
    return candidate


def check_firmware(dirs: Sequence[Path]) -> None:
    missing = [name for name in REQUIRED_FIRMWARE if not any((d / name).is_file() for d in dirs)]
    if missing:
        raise FirmwareMissing(
            f"firmware {', '.join(missing)} not found in {', '.join(map(str, dirs))}; "
            "install Debian's seabios and qemu-system-data, or pass --firmware-dir"
        )


@dataclass(frozen=True)
class QemuCapabilities:
    version: str
    has_vfio_user_pci: bool
    cpu_model: str
    movdir64b: bool


async def _qmp_session(argv: Sequence[str], commands: Sequence[dict[str, Any]]) -> list[Any]:
    """Run QEMU with QMP on stdio, send ``commands`` after the handshake and
    return their results in order; an error reply raises QemuUnsuitable."""
    script = [{"execute": "qmp_capabilities"}, *commands, {"execute": "quit"}]
    payload = "".join(json.dumps(c) + "\n" for c in script).encode()
    try:
        with trio.fail_after(PROBE_TIMEOUT):
            done = await trio.run_process(list(argv), stdin=payload, capture_stdout=True,
                                          capture_stderr=True, check=False)
    except trio.TooSlowError:
        raise QemuUnsuitable(f"QEMU did not answer QMP within {PROBE_TIMEOUT:.0f} s: "
                             f"{' '.join(argv)}") from None
    replies = []
    for raw in done.stdout.decode(errors="replace").splitlines():
        try:
            msg = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if "return" in msg or "error" in msg:
            replies.append(msg)
    if len(replies) < len(script) - 1:
        raise QemuUnsuitable(
            f"QEMU exited with status {done.returncode} during its capability probe: "
            f"{' '.join(argv)}\n{done.stderr.decode(errors='replace').strip()}"
        )
    results = []
    for command, reply in zip(commands, replies[1:], strict=False):
        if "error" in reply:
            raise QemuUnsuitable(f"QMP {command['execute']} failed: {reply['error']}")
        results.append(reply["return"])
    return results


async def probe_qemu(qemu: Path, accel: str, cpu: str) -> QemuCapabilities:
    """Ask QEMU itself (through QMP, with no machine) for its version, whether it
    has vfio-user-pci, and whether ``cpu`` under ``accel`` has MOVDIR64B."""
    argv = [str(qemu), "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", "none", "-accel", accel, "-qmp", "stdio"]
    version, types, expansion = await _qmp_session(argv, [
        {"execute": "query-version"},
        {"execute": "qom-list-types", "arguments": {"implements": "pci-device"}},
        {"execute": "query-cpu-model-expansion",
         "arguments": {"type": "full", "model": {"name": cpu}}},
    ])
    qemu_version = version["qemu"]
    caps = QemuCapabilities(
        version=f"{qemu_version['major']}.{qemu_version['minor']}.{qemu_version['micro']}",
        has_vfio_user_pci=any(t["name"] == "vfio-user-pci" for t in types),
        cpu_model=cpu,
        movdir64b=bool(expansion["model"]["props"].get("movdir64b", False)),
    )
    log.info("qemu.probe", qemu=str(qemu), accel=accel, version=caps.version, cpu=cpu,
             vfio_user_pci=caps.has_vfio_user_pci, movdir64b=caps.movdir64b)
    return caps


def check_server_socket(path: Path) -> None:
    if not path.exists():
        raise ServerSocketMissing(f"no vfio-user server socket at {path}")
    if not path.is_socket():
        raise ServerSocketMissing(f"{path} exists but is not a UNIX socket")


class Iommu(enum.Enum):
    """A guest vIOMMU (QEMU's intel-iommu) in front of the vfio-user device: ``legacy``
    (second-level translation) or ``scalable`` (scalable mode, with PASID)."""

    LEGACY = "legacy"
    SCALABLE = "scalable"

    @property
    def device(self) -> str:
        # Caching mode makes the guest report every mapping, which QEMU needs in order to
        # pass the maps to a vfio device (without it QEMU aborts when the guest enables DMA
        # remapping).  It must come before the vfio-user device.
        options = "intel-iommu,caching-mode=on,intremap=on"
        if self is Iommu.SCALABLE:
            options += ",x-scalable-mode=on,x-pasid-mode=on"
        return options

    @property
    def kernel_options(self) -> str:
        # iommu=nopt: DMA goes through the IOMMU for kernel drivers too, not passed through.
        if self is Iommu.SCALABLE:
            return "intel_iommu=on,sm_on iommu=nopt"
        return "intel_iommu=on iommu=nopt"


@dataclass
class BootSpec:
    """What to boot.  ``socket`` adds a vfio-user-pci device connected to the
    server listening there; ``cpu`` overrides the profile's CPU model."""

    script: bytes
    files: Mapping[str, bytes] = field(default_factory=dict)
    socket: Path | None = None
    profile: str = "tcg"
    cpu: str | None = None
    qemu: Path | None = None
    firmware_dirs: Sequence[Path] = DEFAULT_FIRMWARE_DIRS
    timeout: float = 600.0
    log_dir: Path | None = None
    guest: GuestImage | None = None
    iommu: Iommu | None = None
    kernel_args: Sequence[str] = ()  # added to the kernel command line
    # Seconds the guest's /init lets the script run before it ends it and reports (default:
    # the boot's timeout less SCRIPT_TIMEOUT_MARGIN, or less a quarter of a short one).
    script_timeout: float | None = None
    # The guest image's extra archives (guest_image.EXTRA_FILES) appended to its initramfs.
    extras: Sequence[str] = ()

    @property
    def script_seconds(self) -> int:
        margin = min(SCRIPT_TIMEOUT_MARGIN, self.timeout / 4)
        return max(1, int(self.script_timeout or self.timeout - margin))


@dataclass(frozen=True)
class GuestRun:
    """A finished boot: what the guest's script printed and reported."""

    kernel: str | None
    lines: list[str]
    results: dict[str, str]
    dmesg: str
    exit_status: int
    console_log: Path
    seconds: float
    qemu: QemuCapabilities
    # False when the guest hung in its power-off after reporting (a wedged driver's
    # shutdown hook) and QEMU was stopped instead.
    powered_off: bool = True
    # True when a fault hook killed QEMU (exit_status is then KILLED_STATUS unless the script
    # had reported its own); boots counts the kernel's starts of /init, resets included.
    killed: bool = False
    boots: int = 1


class Machine:
    """The running QEMU of one boot, as a fault hook acts on it: killed as a crash ends it,
    or reset from outside (QMP system_reset) as a host resets a guest."""

    def __init__(self, proc: trio.Process, qmp_socket: Path) -> None:
        self._proc = proc
        self._qmp_socket = qmp_socket
        self._monitor: Monitor | None = None
        self.killed = False

    def kill(self) -> None:
        self.killed = True
        if self._proc.returncode is None:
            self._proc.kill()

    async def reset(self) -> None:
        """A reset from outside: the guest kernel gets no say, the device a reset."""
        await (await self._qmp()).execute("system_reset")

    async def ctrl_alt_del(self) -> None:
        """Ctrl-Alt-Del on the keyboard: the guest kernel restarts itself, running its drivers'
        shutdown hooks on the way."""
        keys = [{"type": "qcode", "data": key} for key in ("ctrl", "alt", "delete")]
        await (await self._qmp()).execute("send-key", {"keys": keys})

    async def _qmp(self) -> Monitor:
        if self._monitor is None:
            self._monitor = await Monitor.open(self._qmp_socket)
        return self._monitor

    async def aclose(self) -> None:
        if self._monitor is not None:
            await self._monitor.aclose()


# Called with every console event of a boot, in order, while the guest runs.
FaultHook = Callable[[console.Event, Machine], Awaitable[None]]


def initramfs_archives(guest: GuestImage, extras: Sequence[str]) -> list[Path]:
    """The archives of a boot's initramfs, in order: the base one and the extras asked for."""
    missing = [name for name in extras if name not in guest.extras]
    if missing:
        which = (f"the {guest.release} guest image" if guest.release
                 else f"the guest image of kernel {guest.kernel_version}")
        raise LaunchError(f"{which} has no {', '.join(missing)} archive (it has "
                          f"{', '.join(guest.extras) or 'none'}; DPDK is in the images of "
                          "the releases whose roots have it)")
    return [guest.initramfs, *(guest.extras[name] for name in extras)]


def qemu_argv(qemu: Path, profile: Profile, cpu: str, guest: GuestImage, initrd: Path,
              firmware_dirs: Sequence[Path], socket: Path | None,
              iommu: Iommu | None = None, kernel_args: Sequence[str] = (),
              qmp: Path | None = None) -> list[str]:
    """QEMU's command line.  ``qmp``: a QMP socket for a fault hook, which may also reset the
    guest, so the guest's own reboots (and its panics) then reboot it too."""
    argv = [str(qemu), "-no-user-config", "-nodefaults", "-readconfig", str(profile.readconfig),
            "-cpu", cpu, "-display", "none", "-nic", "none"]
    # -no-reboot turns every reset into an exit, QMP's system_reset included.
    argv += ["-qmp", f"unix:{qmp},server=on,wait=off"] if qmp else ["-no-reboot"]
    for directory in firmware_dirs:
        argv += ["-L", str(directory)]
    options = [KERNEL_CMDLINE, *([iommu.kernel_options] if iommu else []), *kernel_args]
    cmdline = " ".join(options)
    argv += ["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
             "-kernel", str(guest.kernel), "-initrd", str(initrd), "-append", cmdline]
    if iommu is not None:
        argv += ["-device", iommu.device]
    if socket is not None:
        device = {"driver": "vfio-user-pci", "id": "vdsa0",
                  "socket": {"type": "unix", "path": str(socket)}}
        argv += ["-device", json.dumps(device, separators=(",", ":"))]
    return argv


async def _stop(proc: trio.Process) -> None:
    """SIGTERM (QEMU exits cleanly on it), then SIGKILL; always awaited."""
    with trio.CancelScope(shield=True):
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_GRACE):
                await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def boot(spec: BootSpec, on_event: Callable[[console.Event], None] | None = None,
               faults: FaultHook | None = None) -> GuestRun:
    """Boot the guest, run ``spec.script`` in it and return what it reported.  ``faults``
    sees every console event with the running machine, to kill or reset it (fault tests).

    Raises a LaunchError subclass for every way a boot can fail before the
    script's exit status is known, unless the hook killed QEMU; QEMU is stopped on every
    path out.
    """
    profiles = load_profiles()
    if spec.profile not in profiles:
        raise LaunchError(f"unknown profile {spec.profile!r}; known: {', '.join(profiles)}")
    profile = profiles[spec.profile]
    cpu = spec.cpu or profile.cpu
    qemu = resolve_qemu(spec.qemu)
    check_firmware(spec.firmware_dirs)
    if spec.socket is not None:
        check_server_socket(spec.socket)
    guest = spec.guest or find_guest()
    archives = initramfs_archives(guest, spec.extras)
    caps = await probe_qemu(qemu, profile.accel, cpu)
    if not caps.has_vfio_user_pci:
        raise QemuUnsuitable(f"{qemu} (QEMU {caps.version}) has no vfio-user-pci device; "
                             "vdsa needs QEMU 10.1 or later built with vfio-user support")
    if not caps.movdir64b:
        raise NoMovdir64b(
            f"the guest CPU (-cpu {cpu} under {profile.accel}, QEMU {caps.version} at {qemu}) "
            "has no MOVDIR64B, which the stock idxd driver requires; use vdsa's patched QEMU "
            "with the tcg profile, or KVM on a host CPU that has MOVDIR64B"
        )

    log_dir = spec.log_dir or Path(tempfile.mkdtemp(prefix="vdsa-boot-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    console_log = log_dir / "console.log"
    initrd = log_dir / "initrd.img"
    initrd.write_bytes(b"".join(path.read_bytes() for path in archives)
                       + script_archive(spec.script, spec.files))
    qmp_socket = log_dir / "qmp.sock" if faults else None
    argv = qemu_argv(qemu, profile, cpu, guest, initrd, spec.firmware_dirs, spec.socket,
                     spec.iommu, [*spec.kernel_args, f"vdsa.script_timeout={spec.script_seconds}"],
                     qmp_socket)
    (log_dir / "qemu-argv.json").write_text(json.dumps(argv, indent=1) + "\n")

    transcript = console.Transcript()
    script_ended = trio.Event()
    powered_off = True
    stderr_tail: list[str] = []
    started = time.monotonic()
    log.info("qemu.start", profile=profile.name, cpu=cpu, socket=str(spec.socket),
             console_log=str(console_log))
    proc = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    machine = Machine(proc, log_dir / "qmp.sock")
    fault_events, pending_faults = trio.open_memory_channel[console.Event](float("inf"))

    async def read_console(sink: Any) -> None:
        assert proc.stdout is not None
        splitter = console.LineSplitter()
        async for chunk in proc.stdout:
            for text in splitter.feed(chunk):
                handle(text, sink)
        for text in splitter.flush():
            handle(text, sink)

    def handle(text: str, sink: Any) -> None:
        event = console.parse_line(text)
        transcript.add(event)
        match event:
            case console.Raw(raw):
                sink.write(raw + "\n")
            case console.Line(line):
                sink.write(f"[script] {line}\n")
            case console.Result(name, value):
                sink.write(f"[result] {name} = {value}\n")
            case console.Boot(kernel):
                sink.write(f"[vdsa] guest kernel {kernel} started its init\n")
            case console.Exit(status):
                sink.write(f"[vdsa] script exited with status {status}\n")
                script_ended.set()
            case console.Dmesg(text):
                (log_dir / "dmesg.txt").write_text(text)
        sink.flush()
        if on_event is not None:
            on_event(event)
        if faults is not None:
            # A panicking guest would reboot for ever once resets are allowed.
            if transcript.panicked:
                machine.kill()
            fault_events.send_nowait(event)

    async def run_faults() -> None:
        assert faults is not None
        async for event in pending_faults:
            if proc.returncode is None:
                await faults(event, machine)

    async def read_stderr(sink: Any) -> None:
        assert proc.stderr is not None
        splitter = console.LineSplitter()
        async for chunk in proc.stderr:
            for text in splitter.feed(chunk):
                stderr_tail.append(text)
                del stderr_tail[:-STDERR_TAIL]
                log.warning("qemu.stderr", line=text)
                sink.write(text + "\n")
                sink.flush()

    async def bound_power_off() -> None:
        nonlocal powered_off
        await script_ended.wait()
        with trio.move_on_after(POWER_OFF_GRACE):
            await proc.wait()
            return
        powered_off = False
        log.warning("guest.power_off_hung", seconds=POWER_OFF_GRACE,
                    meaning="the script's results are in; QEMU is stopped")
        proc.kill()

    try:
        with (console_log.open("w") as sink, (log_dir / QEMU_STDERR).open("w") as errors,
              trio.fail_after(spec.timeout)):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_console, sink)
                nursery.start_soon(read_stderr, errors)
                async with trio.open_nursery() as watch:
                    watch.start_soon(bound_power_off)
                    if faults is not None:
                        watch.start_soon(run_faults)
                    await proc.wait()
                    watch.cancel_scope.cancel()
    except trio.TooSlowError:
        raise GuestBootTimeout(
            f"the guest did not finish within {spec.timeout:.0f} s "
            f"({_progress(transcript, guest)}); console log: {console_log}"
        ) from None
    finally:
        await _stop(proc)
        with trio.CancelScope(shield=True):
            await machine.aclose()
    seconds = round(time.monotonic() - started, 1)
    log.info("qemu.exit", returncode=proc.returncode, seconds=seconds,
             script_status=transcript.exit_status)

    if transcript.panicked:
        raise GuestPanic(f"the guest kernel panicked ({_progress(transcript, guest)}); "
                         f"console log: {console_log}")
    exit_status = transcript.exit_status
    if exit_status is None and machine.killed:
        exit_status = KILLED_STATUS
    if exit_status is None:
        raise QemuExited(
            f"QEMU exited with status {proc.returncode} before the guest script finished "
            f"({_progress(transcript, guest)}); "
            f"console log: {console_log}\ncommand: {' '.join(argv)}\n" + "\n".join(stderr_tail),
            returncode=proc.returncode, argv=argv, stderr="\n".join(stderr_tail),
        )
    return GuestRun(kernel=transcript.kernel, lines=transcript.lines, results=transcript.results,
                    dmesg=transcript.dmesg, exit_status=exit_status,
                    console_log=console_log, seconds=seconds, qemu=caps,
                    powered_off=powered_off, killed=machine.killed, boots=transcript.boots)


def _progress(transcript: console.Transcript, guest: GuestImage) -> str:
    """How far a boot that did not finish got."""
    if transcript.kernel is None:
        return f"kernel {guest.kernel_version} never reached the image's /init"
    return f"exit reported: {transcript.exit_status is not None}"


async def boot_with_server(spec: BootSpec, config: DeviceConfig,
                           stream: Callable[[console.Event], None] | None = None) -> GuestRun:
    """Boot with vdsa's own server, configured by ``config``, listening at ``spec.socket`` for
    the boot."""
    # Imported here: it loads libvfio-user and the engine, which plain boots do not need.
    from vdsa_server.server import VdsaServer

    if spec.socket is None:
        raise ValueError("boot_with_server needs spec.socket, where its server listens")
    return await boot_served(spec, VdsaServer(spec.socket, config), stream)


async def boot_served(spec: BootSpec, server: VdsaServer,
                      stream: Callable[[console.Event], None] | None = None) -> GuestRun:
    """Boot against ``server`` (listening at ``spec.socket``), serving for the boot only: a
    caller that keeps the server can read its engine as the guest runs."""
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        run = await boot(spec, stream)
        nursery.cancel_scope.cancel()
    return run
