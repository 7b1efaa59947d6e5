"""The ``vdsa`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from vdsa_server import log as vdsa_log
from vdsa_server.builds.debian_root import RELEASES
from vdsa_server.builds.guest_image import DEFAULT_RELEASE, EXTRA_FILES
from vdsa_server.builds.steps import BuildError
from vdsa_server.launch import console
from vdsa_server.log import get_logger

if TYPE_CHECKING:
    from vdsa_server.builds.guest_image import GuestImage
    from vdsa_server.device.config import DeviceConfig
    from vdsa_server.launch.launcher import GuestRun
    from vdsa_server.server import VdsaServer

# Like `docker run`: 125 means vdsa itself failed, anything else is the script's.
EXIT_LAUNCH_ERROR = 125


def _add_logging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=("console", "json"), default="console",
                        help="structlog renderer for log lines on stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug-level logs")


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not an octal mode") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text} is not a mode between 0 and 0777")
    return mode


def _user(text: str) -> int:
    from vdsa_server.transport.access import user_id

    try:
        return user_id(text)
    except KeyError:
        raise argparse.ArgumentTypeError(f"no user {text!r}") from None


def _group(text: str) -> int:
    from vdsa_server.transport.access import group_id

    try:
        return group_id(text)
    except KeyError:
        raise argparse.ArgumentTypeError(f"no group {text!r}") from None


def _add_kernel(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernel", metavar="RELEASE", choices=RELEASES,
                        default=DEFAULT_RELEASE,
                        help="the guest of this Debian release, with its stock kernel "
                        f"({', '.join(RELEASES)}; default {DEFAULT_RELEASE})")


def _guest(args: argparse.Namespace) -> GuestImage:
    """The image a boot uses: the user's kernel, or the release's."""
    from vdsa_server.builds.guest_image import find_guest

    image: Path | None = getattr(args, "kernel_image", None)
    modules: Path | None = getattr(args, "modules", None)
    if image is None:
        if modules is not None:
            raise BuildError("--modules needs --kernel-image, the kernel they belong to")
        return find_guest(args.kernel)
    from vdsa_server.builds.user_kernel import build_user_guest

    guest = trio.run(build_user_guest, image, modules)
    if not guest.dmatest:
        print(f"vdsa: kernel {guest.kernel_version} has no dmatest module (CONFIG_DMATEST): "
              "dmatest is absent from this guest", file=sys.stderr)
    return guest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdsa", description=__doc__)
    _add_logging(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="build QEMU, libvfio-user, the descriptor engine and "
                           "the guest into the cache")
    build.add_argument("what", choices=("all", "qemu", "libvfio-user", "engine", "guest"),
                       nargs="?",
                       default="all")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument("--kernel", metavar="RELEASE", choices=(*RELEASES, "all"), default="all",
                       help="the guest of this Debian release only (default: all of "
                       f"{', '.join(RELEASES)})")

    boot = sub.add_parser("boot", help="boot the guest, run a script in it, print its results")
    boot.add_argument("--script", type=Path, required=True, help="shell script run in the guest")
    boot.add_argument("--file", type=Path, action="append", default=[],
                      help="extra file for the guest, placed at /vdsa/<name> (repeatable)")
    boot.add_argument("--socket", type=Path,
                      help="add a vfio-user-pci device connected to the server at this socket")
    boot.add_argument("--serve", action="store_true",
                      help="start vdsa's own DSA server for this boot (at --socket if given, "
                      "else in the log directory)")
    boot.add_argument("--config", type=Path, help="with --serve: device configuration (TOML)")
    boot.add_argument("--profile", default="tcg",
                      help="launch profile (qemu-configs/profiles.toml)")
    boot.add_argument("--cpu", help="guest CPU model instead of the profile's")
    boot.add_argument("--iommu", choices=["legacy", "scalable"],
                      help="put QEMU's intel-iommu (caching mode) in front of the device and "
                      "turn DMA remapping on in the guest (scalable: scalable mode)")
    boot.add_argument("--qemu", type=Path,
                      help="QEMU binary to use (default: $VDSA_QEMU, else vdsa's own build)")
    boot.add_argument("--firmware-dir", type=Path, action="append",
                      help="QEMU firmware directory (repeatable; default: Debian's)")
    _add_kernel(boot)
    boot.add_argument("--with", dest="extras", action="append", default=[],
                      choices=tuple(EXTRA_FILES), metavar="EXTRA",
                      help="append the guest image's extra archive EXTRA to its initramfs "
                      f"({', '.join(EXTRA_FILES)}: dpdk-test and its drivers)")
    boot.add_argument("--kernel-arg", action="append", default=[], metavar="ARG",
                      help="add ARG to the guest kernel's command line (repeatable)")
    boot.add_argument("--kernel-image", type=Path, metavar="BZIMAGE",
                      help="boot this kernel instead of a release's (the user's own build)")
    boot.add_argument("--modules", type=Path, metavar="DIR",
                      help="with --kernel-image: its modules, as `make modules_install "
                      "INSTALL_MOD_PATH=DIR` left them")
    boot.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole boot")
    boot.add_argument("--script-timeout", type=_positive, metavar="SECONDS",
                      help="seconds the guest lets the script run before it ends it and "
                      "reports (default: the boot's timeout less a minute)")
    boot.add_argument("--log-dir", type=Path, help="where console.log and dmesg.txt go")
    boot.add_argument("--json", action="store_true", help="print one JSON summary at the end")

    serve = sub.add_parser("serve", help="serve a virtual DSA to vfio-user clients (QEMU)")
    serve.add_argument("--socket", type=Path, required=True, help="UNIX socket to listen on")
    serve.add_argument("--config", type=Path, help="device configuration (TOML; default: "
                       "qemu-configs/devices/default.toml's values)")
    serve.add_argument("--once", action="store_true",
                       help="exit when the first client disconnects")
    serve.add_argument("--socket-mode", type=_octal_mode, default=0o600,
                       help="the socket file's mode, in octal (default 0600: only this user "
                       "can connect)")
    serve.add_argument("--socket-group", type=_group,
                       help="the socket file's group (name or gid); peers whose primary group "
                       "it is are allowed (with --socket-mode 0660, say, for QEMU's group)")
    serve.add_argument("--allow-uid", type=_user, action="append", default=[], metavar="USER",
                       help="also allow peers running as USER (name or uid; repeatable); this "
                       "user and root are always allowed")
    serve.add_argument("--allow-gid", type=_group, action="append", default=[], metavar="GROUP",
                       help="also allow peers whose primary group is GROUP (repeatable)")

    bench = sub.add_parser("bench", help="measure vdsa against the host's own speed for the "
                           "same work, through the vfio-user protocol (no QEMU); with --guest "
                           "also in a booted guest")
    bench.add_argument("--json", type=Path, help="write the machine, versions and every figure "
                       "and ratio to this JSON file")
    bench.add_argument("--plot", type=Path, help="write a PNG chart of the ratios to this file")
    bench.add_argument("--seconds", type=_positive, default=1.0,
                       help="measuring time of each case and of each reference (default 1)")
    bench.add_argument("--guest", action="store_true",
                       help="also boot guests: dmatest (no verify) on the idxd channel next to "
                       "the guest's CPU memcpy, then behind each vIOMMU mode")
    bench.add_argument("--log-dir", type=Path, help="where the server's and the guest's logs go")
    _add_kernel(bench)

    fuzz = sub.add_parser("fuzz", help="fuzz `vdsa serve` (sanitized engine and libvfio-user) "
                          "with a hostile vfio-user client for a while; exit 1 on any failure")
    fuzz.add_argument("--seconds", type=_positive, default=60.0,
                      help="how long to fuzz (whole rounds of examples; default 60)")
    fuzz.add_argument("--seed", type=int, default=0,
                      help="seed of the first round; round k uses seed + k (default 0)")
    fuzz.add_argument("--json", type=Path, help="write the report to this JSON file")
    fuzz.add_argument("--log-dir", type=Path, help="where the server's log goes")

    faults = sub.add_parser("faults", help="fault cycles against one `vdsa serve`: QEMU "
                            "killed with copies in flight, guests reset under a busy WQ, "
                            "clients killed mid-stream; every next user must pass its checks")
    faults.add_argument("--qemu-kills", type=int, default=100, metavar="N",
                        help="boots killed with SIGKILL while dmatest copies (default 100)")
    faults.add_argument("--client-kills", type=int, default=100, metavar="N",
                        help="vfio-user client processes killed with copies in flight in the "
                        "mapped portals (default 100)")
    faults.add_argument("--no-reboots", action="store_true",
                        help="skip the two resets under a busy WQ (system_reset, Ctrl-Alt-Del)")
    faults.add_argument("--seed", type=int, default=0, help="seed of the client kill delays")
    _add_kernel(faults)
    faults.add_argument("--log-dir", type=Path, help="where the server's and the boots' logs go")
    faults.add_argument("--json", action="store_true", help="print the report as JSON")

    soak = sub.add_parser("soak", help="for N minutes: verified dmatest in a guest and checked "
                          "harness streams, each on its own `vdsa serve`, whose memory and fds "
                          "are sampled; exit 1 on a failure or steady growth")
    soak.add_argument("--minutes", type=_positive, required=True, help="how long to soak")
    soak.add_argument("--engine", choices=("release", "sanitized"), default="release",
                      help="the servers' engine and libvfio-user (default release: memory "
                      "figures under ASan's quarantine say little)")
    soak.add_argument("--sample-seconds", type=_positive, default=5.0,
                      help="seconds between samples of the servers (default 5)")
    soak.add_argument("--max-drift-mib", type=_positive, default=16.0,
                      help="resident memory a server may gain after the warm-up (default 16)")
    _add_kernel(soak)
    soak.add_argument("--log-dir", type=Path, help="where the servers' and the guest's logs go")
    soak.add_argument("--json", action="store_true", help="print the report as JSON")

    demo = sub.add_parser("demo", help="the main job: serve a virtual DSA, boot a guest that "
                          "checks the platform, configures the DSA with the stock driver and "
                          "runs dmatest on it")
    demo.add_argument("--config", type=Path, help="device configuration (TOML)")
    _add_kernel(demo)
    demo.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole boot")
    demo.add_argument("--script-timeout", type=_positive, default=180.0, metavar="SECONDS",
                      help="seconds the guest lets the demo's scripts run (default 180; they "
                      "take about 20)")
    demo.add_argument("--log-dir", type=Path, help="where the logs and the socket go")
    demo.add_argument("--json", action="store_true", help="print one JSON summary at the end")
    return parser


async def _build(what: str, force: bool, kernel: str) -> None:
    from vdsa_server.builds.engine_build import build_engine
    from vdsa_server.builds.guest_image import build_guests
    from vdsa_server.builds.libvfio_user_build import build_libvfio_user
    from vdsa_server.builds.qemu_build import build_qemu

    if what in ("all", "libvfio-user"):
        await build_libvfio_user(force=force)
    if what in ("all", "engine"):
        await build_engine(force=force)
    if what in ("all", "qemu"):
        await build_qemu(force=force)
    if what in ("all", "guest"):
        await build_guests(RELEASES if kernel == "all" else (kernel,), force=force)


def _print_run(run: GuestRun, as_json: bool) -> None:
    if as_json:
        print(json.dumps({
            "exit_status": run.exit_status, "kernel": run.kernel, "lines": run.lines,
            "powered_off": run.powered_off,
            "results": run.results, "seconds": run.seconds, "console_log": str(run.console_log),
            "qemu_version": run.qemu.version, "cpu": run.qemu.cpu_model,
        }, indent=2))
        return
    for name, value in run.results.items():
        print(f"{name}: {value}")
    print(f"guest script exited with status {run.exit_status} after {run.seconds} s "
          f"(console log: {run.console_log})", file=sys.stderr)
    if not run.powered_off:
        print("the guest hung powering off after its script ended; QEMU was stopped",
              file=sys.stderr)


def _streamer(as_json: bool) -> Callable[[console.Event], None]:
    def stream(event: console.Event) -> None:
        if not as_json and isinstance(event, console.Line):
            print(event.text, flush=True)

    return stream


def _log_dir(chosen: Path | None, prefix: str) -> Path:
    """The user's --log-dir (created if needed), else a new temporary one."""
    if chosen is None:
        return Path(tempfile.mkdtemp(prefix=prefix))
    chosen.mkdir(parents=True, exist_ok=True)
    return chosen


def _device_config(path: Path | None) -> DeviceConfig:
    from vdsa_server.device.config import DeviceConfig

    return DeviceConfig.from_toml(path) if path else DeviceConfig()


async def _serving(server: VdsaServer) -> None:
    """Run ``server`` until SIGINT/SIGTERM (or, with --once, its client leaves)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    get_logger().info("server.signal", signal=signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            await server.serve()
            nursery.cancel_scope.cancel()


def _serve(args: argparse.Namespace) -> int:
    from vdsa_server.server import VdsaServer
    from vdsa_server.transport.access import SocketAccess

    access = SocketAccess(mode=args.socket_mode, group=args.socket_group,
                          uids=frozenset(args.allow_uid), gids=frozenset(args.allow_gid))
    trio.run(_serving, VdsaServer(args.socket, _device_config(args.config), once=args.once,
                                  access=access))
    return 0


def _fuzz(args: argparse.Namespace) -> int:
    from vdsa_server.builds.engine_build import build_engine
    from vdsa_server.builds.libvfio_user_build import build_libvfio_user
    from vdsa_server.fuzz.run import run_fuzz

    trio.run(build_libvfio_user)
    trio.run(build_engine)
    log_dir = _log_dir(args.log_dir, "vdsa-fuzz-")
    report = run_fuzz(log_dir, seconds=args.seconds, base_seed=args.seed)
    print("\n".join(report.lines()))
    print(f"server log: {log_dir / 'server.log'}")
    if args.json:
        report.write_json(args.json)
    return 1 if report.failure else 0


def _boot(args: argparse.Namespace) -> int:
    from vdsa_server.launch.launcher import (
        DEFAULT_FIRMWARE_DIRS,
        BootSpec,
        Iommu,
        boot,
        boot_with_server,
    )

    log_dir = _log_dir(args.log_dir, "vdsa-boot-")
    socket = args.socket or (log_dir / "vdsa.sock" if args.serve else None)
    files = {path.name: path.read_bytes() for path in args.file}
    spec = BootSpec(
        script=args.script.read_bytes(), files=files, socket=socket, profile=args.profile,
        cpu=args.cpu, qemu=args.qemu, firmware_dirs=args.firmware_dir or DEFAULT_FIRMWARE_DIRS,
        timeout=args.timeout, log_dir=log_dir,
        iommu=Iommu(args.iommu) if args.iommu else None, guest=_guest(args),
        kernel_args=args.kernel_arg, script_timeout=args.script_timeout, extras=args.extras,
    )
    if args.serve:
        run = trio.run(boot_with_server, spec, _device_config(args.config), _streamer(args.json))
    else:
        run = trio.run(boot, spec, _streamer(args.json))
    _print_run(run, args.json)
    return run.exit_status


def _demo(args: argparse.Namespace) -> int:
    """vdsa's own server, and a guest that checks the platform, configures and
    enables the virtual DSA with the stock driver, and runs dmatest on it."""
    from vdsa_server.launch.launcher import BootSpec, boot_with_server
    from vdsa_server.paths import QEMU_CONFIGS

    scripts = QEMU_CONFIGS / "guest-scripts"
    log_dir = _log_dir(args.log_dir, "vdsa-demo-")
    files = {name: (scripts / name).read_bytes()
             for name in ("platform-check.sh", "dsa-configure.sh", "dmatest.sh")}
    spec = BootSpec(script=(scripts / "demo.sh").read_bytes(), files=files,
                    socket=log_dir / "vdsa.sock", log_dir=log_dir, timeout=args.timeout,
                    script_timeout=args.script_timeout, guest=_guest(args))
    run = trio.run(boot_with_server, spec, _device_config(args.config), _streamer(args.json))
    _print_run(run, args.json)
    states = run.results.get("states.enabled", "missing")
    print(f"guest: Debian {args.kernel}, kernel {run.kernel}", file=sys.stderr)
    print(f"virtual DSA in the guest: device and wq0.0 {states}", file=sys.stderr)
    for name in ("run1", "run2"):
        tests = run.results.get(f"dmatest.{name}.tests", "missing")
        failures = run.results.get(f"dmatest.{name}.failures", "missing")
        kbps = run.results.get(f"dmatest.{name}.kbps", "missing")
        print(f"dmatest {name} on the idxd channel: {tests} copies verified, "
              f"{failures} failures, {kbps} KB/s", file=sys.stderr)
    return run.exit_status


def _bench(args: argparse.Namespace) -> int:
    """Every harness benchmark, and with --guest the guest's, as a table, JSON and a chart."""
    from vdsa_server.bench.guest import iommu_cost, run_guest_bench
    from vdsa_server.bench.harness import BenchPlan, notes, run_harness
    from vdsa_server.bench.report import machine, report, table, versions, write_json, write_plot
    from vdsa_server.builds.libvfio_user_build import libvfio_user_artifact
    from vdsa_server.engine.native import load_engine
    from vdsa_server.launch.launcher import Iommu

    log_dir = _log_dir(args.log_dir, "vdsa-bench-")
    host = machine()
    extra_versions = {"engine": str(load_engine().path),
                      "libvfio-user": str(libvfio_user_artifact().path)}
    measurements = trio.run(run_harness, log_dir, BenchPlan(args.seconds))
    if args.guest:
        image = _guest(args)
        guest = trio.run(partial(run_guest_bench, log_dir / "guest", guest=image))
        measurements += guest.measurements
        for mode in Iommu:
            behind = trio.run(partial(run_guest_bench, log_dir / f"guest-iommu-{mode.value}",
                                      guest=image, iommu=mode))
            measurements += [*behind.measurements,
                             iommu_cost(guest.measurements[0], behind.measurements[0], mode)]
        extra_versions |= {"qemu": guest.run.qemu.version,
                           "guest_kernel": guest.run.kernel or "unknown"}
    found_versions = versions(extra_versions)
    meaning = notes(host["cpus"] or 1)
    document = report(measurements, {
        "machine": host, "versions": found_versions, "log_dir": str(log_dir),
        "plan": {"seconds": args.seconds, "guest": args.guest}, "notes": meaning})
    print(table(measurements))
    print("\n" + "\n".join(f"- {note}" for note in meaning))
    if args.json:
        write_json(args.json, document)
        print(f"figures: {args.json}", file=sys.stderr)
    if args.plot:
        write_plot(args.plot, measurements, f"vdsa {found_versions['git'][:12]} on "
                   f"{host['cpu']} ({host['cpus']} CPUs)")
        print(f"chart: {args.plot}", file=sys.stderr)
    return 0


def _faults(args: argparse.Namespace) -> int:
    from vdsa_server.reliability.faults import FaultError, FaultPlan, Reboot, run_faults

    plan = FaultPlan(qemu_kills=args.qemu_kills, client_kills=args.client_kills,
                     reboots=() if args.no_reboots else tuple(Reboot), seed=args.seed)
    log_dir = _log_dir(args.log_dir, "vdsa-faults-")
    report = None
    try:
        report = trio.run(run_faults, plan, _guest(args), log_dir)
    except* FaultError as failed:
        for leaf in _leaves(failed):
            print(f"vdsa faults: FAILED: {leaf}", file=sys.stderr)
    if report is None:
        print(f"logs: {log_dir}", file=sys.stderr)
        return 1
    figures = report.as_dict()
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for name, value in figures.items():
            print(f"{name}: {value}")
    print(f"logs: {log_dir}", file=sys.stderr)
    return 0


def _soak(args: argparse.Namespace) -> int:
    from vdsa_server.bench.serving import release_environment, sanitized_environment
    from vdsa_server.reliability.drift import MiB
    from vdsa_server.reliability.soak import SoakPlan, run_soak

    plan = SoakPlan(minutes=args.minutes, sample_seconds=args.sample_seconds,
                    max_rss_drift=int(args.max_drift_mib * MiB))
    env = release_environment() if args.engine == "release" else sanitized_environment()
    log_dir = _log_dir(args.log_dir, "vdsa-soak-")
    report = trio.run(run_soak, plan, _guest(args), log_dir, env).as_dict()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, value in report.items():
            print(f"{name}: {value}")
    for failure in report["failures"]:
        print(f"vdsa soak: FAILED: {failure}", file=sys.stderr)
    print(f"logs: {log_dir}", file=sys.stderr)
    return 0 if report["passed"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    vdsa_log.configure(args.log_format, logging.DEBUG if args.verbose else logging.INFO)
    from vdsa_server.bench.guest import GuestBenchError
    from vdsa_server.bench.harness import BenchError
    from vdsa_server.bench.serving import ServeError
    from vdsa_server.builds.guest_image import GuestImageMissing
    from vdsa_server.device.config import ConfigError
    from vdsa_server.launch.launcher import LaunchError
    from vdsa_server.launch.sample_server import SampleServerError
    from vdsa_server.transport.libvfio_user import LibraryError
    from vdsa_server.transport.socket_path import SocketPathTaken

    expected = (LaunchError, BuildError, GuestImageMissing, SampleServerError, SocketPathTaken,
                ConfigError, LibraryError, OSError, BenchError, GuestBenchError, ServeError)
    try:
        if args.command == "build":
            trio.run(_build, args.what, args.force, args.kernel)
            return 0
        if args.command == "demo":
            return _demo(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "fuzz":
            return _fuzz(args)
        if args.command == "faults":
            return _faults(args)
        if args.command == "soak":
            return _soak(args)
        return _boot(args)
    except KeyboardInterrupt:
        return 128 + 2
    except BaseException as exc:
        # trio's nurseries wrap errors in groups; what the user needs is the leaves.
        leaves = _leaves(exc)
        if not all(isinstance(leaf, expected) for leaf in leaves):
            raise
        for leaf in leaves:
            print(f"vdsa: error: {leaf}", file=sys.stderr)
        return EXIT_LAUNCH_ERROR


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]

