"""Launcher checks that need no guest boot: profiles, QEMU discovery, firmware,
the capability probe against real QEMU binaries, and clear errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import trio

from vdsa_server.builds.guest_image import GuestImage
from vdsa_server.builds.qemu_build import cached_qemu_binary
from vdsa_server.builds.steps import BuildError, run_step
from vdsa_server.device.config import DeviceConfig
from vdsa_server.launch import launcher
from vdsa_server.launch.launcher import (
    BootSpec,
    FirmwareMissing,
    NoMovdir64b,
    QemuNotFound,
    QemuUnsuitable,
    ServerSocketMissing,
)

# Debian bookworm's own QEMU (7.2): real, but older than vfio-user-pci.
STOCK_QEMU = Path("/usr/bin/qemu-system-x86_64")


def test_profiles_point_at_existing_readconfig_files() -> None:
    profiles = launcher.load_profiles()
    assert {"tcg", "kvm"} <= profiles.keys()
    assert profiles["tcg"].accel == "tcg"
    assert profiles["kvm"].cpu == "host"
    for profile in profiles.values():
        text = profile.readconfig.read_text()
        assert 'qom-type = "memory-backend-memfd"' in text
        assert 'share = "on"' in text
        assert f'accel = "{profile.accel}"' in text


def test_explicit_qemu_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(QemuNotFound, match=r"no QEMU executable at .*nope \(from --qemu\)"):
        launcher.resolve_qemu(tmp_path / "nope")


def test_qemu_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VDSA_QEMU", str(tmp_path / "missing-qemu"))
    with pytest.raises(QemuNotFound, match=r"from \$VDSA_QEMU"):
        launcher.resolve_qemu()
    monkeypatch.setenv("VDSA_QEMU", str(cached_qemu_binary()))
    assert launcher.resolve_qemu() == cached_qemu_binary()


def test_missing_firmware_is_named(tmp_path: Path) -> None:
    (tmp_path / "bios-256k.bin").write_bytes(b"\0")
    with pytest.raises(FirmwareMissing, match=r"linuxboot_dma\.bin, kvmvapic\.bin"):
        launcher.check_firmware([tmp_path])
    launcher.check_firmware(launcher.DEFAULT_FIRMWARE_DIRS)


async def test_probe_of_vdsa_qemu() -> None:
    caps = await launcher.probe_qemu(cached_qemu_binary(), "tcg", "max")
    assert caps.version.startswith("10.2.")
    assert caps.has_vfio_user_pci
    assert caps.movdir64b
    plain = await launcher.probe_qemu(cached_qemu_binary(), "tcg", "qemu64")
    assert not plain.movdir64b


async def test_probe_of_unknown_cpu_model_is_clear() -> None:
    with pytest.raises(QemuUnsuitable, match="query-cpu-model-expansion failed"):
        await launcher.probe_qemu(cached_qemu_binary(), "tcg", "no-such-cpu")


async def test_cpu_model_without_movdir64b_is_refused(tmp_path: Path) -> None:
    spec = BootSpec(script=b"true", cpu="qemu64", log_dir=tmp_path)
    with pytest.raises(NoMovdir64b, match=r"-cpu qemu64 under tcg.*has no MOVDIR64B"):
        await launcher.boot(spec)
    assert not (tmp_path / "console.log").exists()


async def test_qemu_without_vfio_user_pci_is_refused(tmp_path: Path) -> None:
    assert await trio.Path(STOCK_QEMU).is_file(), "installed by .ci/setup (qemu-system-x86)"
    spec = BootSpec(script=b"true", qemu=STOCK_QEMU, log_dir=tmp_path)
    with pytest.raises(QemuUnsuitable, match=r"QEMU 7\.2\.\d+\) has no vfio-user-pci"):
        await launcher.boot(spec)


async def test_non_qemu_binary_is_refused(tmp_path: Path) -> None:
    spec = BootSpec(script=b"true", qemu=Path(shutil.which("false") or "/bin/false"),
                    log_dir=tmp_path)
    with pytest.raises(QemuUnsuitable, match="during its capability probe"):
        await launcher.boot(spec)


async def test_missing_server_socket(tmp_path: Path) -> None:
    spec = BootSpec(script=b"true", socket=tmp_path / "absent.sock", log_dir=tmp_path)
    with pytest.raises(ServerSocketMissing, match="no vfio-user server socket"):
        await launcher.boot(spec)


async def test_boot_with_server_needs_a_socket() -> None:
    with pytest.raises(ValueError, match=r"spec\.socket"):
        await launcher.boot_with_server(BootSpec(script=b"true\n"), DeviceConfig())


async def test_failed_build_step_names_its_log(tmp_path: Path) -> None:
    log_file = tmp_path / "step.log"
    with pytest.raises(BuildError, match=r"(?s)status 3.*step\.log.*went wrong"):
        await run_step("demo", ["sh", "-c", "echo went wrong; exit 3"], log_file=log_file)
    assert "went wrong" in log_file.read_text()


def host_has_movdir64b() -> bool:
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("flags"))
    return "movdir64b" in flags.split()


async def test_kvm_probe_follows_the_host_cpu(tmp_path: Path) -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm on this machine")
    caps = await launcher.probe_qemu(cached_qemu_binary(), "kvm", "host")
    assert caps.movdir64b == host_has_movdir64b()
    if not caps.movdir64b:
        spec = BootSpec(script=b"true", profile="kvm", log_dir=tmp_path)
        with pytest.raises(NoMovdir64b, match=r"-cpu host under kvm"):
            await launcher.boot(spec)


@pytest.mark.parametrize("iommu", list(launcher.Iommu))
def test_a_viommu_comes_before_the_device_with_caching_mode(iommu: launcher.Iommu) -> None:
    guest = GuestImage(kernel=Path("vmlinuz"), initramfs=Path("initrd"), kernel_version="6.1")
    argv = launcher.qemu_argv(Path("qemu"), launcher.load_profiles()["tcg"], "max", guest,
                              Path("initrd"), (), Path("dsa.sock"), iommu)
    devices = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-device"]
    assert devices[0].startswith("intel-iommu,caching-mode=on")
    assert '"driver":"vfio-user-pci"' in devices[1]
    assert ("x-scalable-mode=on" in devices[0]) == (iommu is launcher.Iommu.SCALABLE)
    cmdline = argv[argv.index("-append") + 1]
    assert "intel_iommu=on" in cmdline
    assert "iommu=nopt" in cmdline
    assert ("sm_on" in cmdline) == (iommu is launcher.Iommu.SCALABLE)


@pytest.mark.parametrize(("timeout", "script_timeout", "expected"), [
    (600.0, None, 540), (600.0, 42.5, 42), (20.0, None, 15), (120.0, 300.0, 300)])
def test_the_script_timeout_reaches_the_guest_init(timeout: float, script_timeout: float | None,
                                                   expected: int) -> None:
    spec = BootSpec(script=b"true", timeout=timeout, script_timeout=script_timeout)
    assert spec.script_seconds == expected


def test_kernel_args_follow_the_vdsa_options() -> None:
    guest = GuestImage(kernel=Path("vmlinuz"), initramfs=Path("initrd"), kernel_version="6.1")
    argv = launcher.qemu_argv(Path("qemu"), launcher.load_profiles()["tcg"], "max", guest,
                              Path("initrd"), (), None, launcher.Iommu.LEGACY,
                              ["slub_debug=FZPU", "vdsa.script_timeout=9"])
    cmdline = argv[argv.index("-append") + 1].split()
    assert cmdline[:4] == launcher.KERNEL_CMDLINE.split()
    assert cmdline[-2:] == ["slub_debug=FZPU", "vdsa.script_timeout=9"]
    assert cmdline.index("intel_iommu=on") < cmdline.index("slub_debug=FZPU")


def test_extras_follow_the_base_initramfs_in_the_order_asked() -> None:
    guest = GuestImage(kernel=Path("vmlinuz"), initramfs=Path("initrd"), kernel_version="7.2",
                       release="sid", extras={"dpdk": Path("dpdk.cpio.gz")})
    assert launcher.initramfs_archives(guest, ()) == [Path("initrd")]
    assert launcher.initramfs_archives(guest, ["dpdk"]) == [Path("initrd"), Path("dpdk.cpio.gz")]


def test_an_extra_the_image_lacks_is_named_before_qemu_starts(tmp_path: Path) -> None:
    guest = GuestImage(kernel=Path("vmlinuz"), initramfs=Path("initrd"), kernel_version="6.12",
                       release="trixie")
    with pytest.raises(launcher.LaunchError, match=r"trixie guest image has no dpdk archive"):
        launcher.initramfs_archives(guest, ["dpdk"])
    spec = BootSpec(script=b"true", guest=guest, extras=["dpdk"], log_dir=tmp_path,
                    qemu=cached_qemu_binary())
    with pytest.raises(launcher.LaunchError, match=r"no dpdk archive"):
        trio.run(launcher.boot, spec)
    assert not (tmp_path / "initrd.img").exists()
