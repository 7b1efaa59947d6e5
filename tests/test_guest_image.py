"""The guest image builder: its scripts, cache key, script archive and, built
once per machine (about ten seconds), the image's contents. No QEMU needed."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import trio

from vdsa_server.builds import guest_image
from vdsa_server.builds.debian_root import DPDK_PACKAGES, RELEASES, DebianRoot, build_root
from vdsa_server.builds.guest_image import (
    DPDK,
    DPDK_DRIVERS,
    DPDK_TEST,
    GUEST_FILES,
    GUEST_PROGRAMS,
    NATIVE_GUEST,
    USER_SPACE_DRIVER_MODULES,
    GuestImageMissing,
    build_guest,
    find_guest,
    guest_artifact,
    guest_program_argv,
    script_archive,
)

MARK = b"@@vdsa@@ "


def cpio_members(data: bytes) -> list[str]:
    done = subprocess.run(["cpio", "-t", "--quiet"], input=data, capture_output=True, check=True)
    return done.stdout.decode().splitlines()


def cpio_extract(data: bytes, dest: Path) -> None:
    dest.mkdir(exist_ok=True)
    subprocess.run(["cpio", "-i", "-d", "-u", "--quiet"], input=data, cwd=dest, check=True)


def gunzip_archive(path: Path) -> bytes:
    """A gzipped archive the launcher appends another to: 4-byte aligned, zeros after."""
    blob = path.read_bytes()
    assert len(blob) % 4 == 0
    inflater = zlib.decompressobj(wbits=31)
    archive = inflater.decompress(blob)
    assert inflater.eof
    assert inflater.unused_data.strip(b"\0") == b""
    return archive


@pytest.mark.parametrize("script", ["init", "vdsa-result"])
def test_scripts_parse_under_busybox(script: str) -> None:
    done = subprocess.run(["busybox", "sh", "-n", GUEST_FILES / script], capture_output=True)
    assert done.returncode == 0, done.stderr


def vdsa_result(
    console: Path, *args: str, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["busybox", "sh", GUEST_FILES / "vdsa-result", *args],
        input=stdin,
        capture_output=True,
        env={"VDSA_CONSOLE": str(console), "PATH": "/usr/bin:/bin"},
    )


def result_frame(name: str, value: bytes) -> bytes:
    b64 = base64.b64encode(value).decode()
    return MARK + f'{{"event":"result","name":"{name}","b64":"{b64}"}}\n'.encode()


def test_result_from_arguments(tmp_path: Path) -> None:
    console = tmp_path / "console"
    console.write_bytes(b"earlier output\n")
    done = vdsa_result(console, "stats.copy:1-ok_X", "a", "b  c")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    # Appended (a tty has no position, a test file must keep what it had).
    assert console.read_bytes() == b"earlier output\n" + result_frame(
        "stats.copy:1-ok_X", b"a b  c"
    )


def test_result_from_stdin_keeps_every_byte(tmp_path: Path) -> None:
    console = tmp_path / "console"
    value = bytes(range(256)) * 40 + b"\n\n"
    done = vdsa_result(console, "blob", stdin=value)
    assert done.returncode == 0, done.stderr
    frame = console.read_bytes()
    assert frame == result_frame("blob", value)
    assert json.loads(frame[len(MARK) :])["name"] == "blob"


def test_result_with_an_empty_value(tmp_path: Path) -> None:
    console = tmp_path / "console"
    assert vdsa_result(console, "empty", "").returncode == 0
    assert console.read_bytes() == result_frame("empty", b"")


@pytest.mark.parametrize("name", ["", "a b", "a/b", "x\ny", "ü", "a;b", '"q"', "$(id)", "*"])
def test_result_rejects_bad_names(tmp_path: Path, name: str) -> None:
    console = tmp_path / "console"
    done = vdsa_result(console, name, "value")
    assert done.returncode == 2
    assert b"invalid name" in done.stderr
    assert not console.exists()


def test_result_needs_a_name(tmp_path: Path) -> None:
    done = vdsa_result(tmp_path / "console", stdin=b"x")
    assert done.returncode == 2
    assert b"usage" in done.stderr


def test_result_reports_an_unwritable_console(tmp_path: Path) -> None:
    done = vdsa_result(tmp_path / "missing" / "console", "name", "value")
    assert done.returncode == 1
    assert b"cannot write" in done.stderr


class FakeRoot:
    """Stands in for a release's root and points the builder at copies of its sources."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.guest_files = tmp_path / "guest_files"
        self.native = tmp_path / "native"
        shutil.copytree(GUEST_FILES, self.guest_files)
        shutil.copytree(NATIVE_GUEST, self.native)
        self.kernel_version = "6.12.117+deb13-amd64"
        self.package_version = "6.12.117-1"
        self.versions = {"busybox-static": "1:1.37.0-6", "kmod": "34.2-2",
                         "accel-config": "4.1.8-1", "libaccel-config1": "4.1.8-1",
                         "compiler": "x86_64-linux-gnu-gcc-14 (Debian 14.2.0-19) 14.2.0"}
        monkeypatch.setattr(guest_image, "GUEST_FILES", self.guest_files)
        monkeypatch.setattr(guest_image, "NATIVE_GUEST", self.native)
        monkeypatch.setattr(guest_image, "find_root", self.root)
        monkeypatch.setenv("VDSA_CACHE", str(tmp_path / "cache"))

    def root(self, release: str) -> DebianRoot:
        return DebianRoot(release=release, path=Path("/nonexistent"),
                          kernel_version=self.kernel_version,
                          kernel_package_version=self.package_version,
                          versions=dict(self.versions))


def test_cache_key_follows_every_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = FakeRoot(tmp_path, monkeypatch)
    keys = [guest_artifact("trixie").key]

    def assert_new_key() -> None:
        key = guest_artifact("trixie").key
        assert key not in keys
        keys.append(key)

    assert guest_artifact("trixie").key == keys[0]
    assert guest_artifact("sid").key not in keys
    root.kernel_version = "6.12.118+deb13-amd64"
    assert_new_key()
    root.package_version = "6.12.118-1"
    assert_new_key()
    for package in list(root.versions):
        root.versions[package] += "+b1"
        assert_new_key()
    monkeypatch.setenv("VDSA_DEBIAN_MIRROR", "http://mirror.example/debian")
    assert_new_key()
    with (root.guest_files / "init").open("a") as f:
        f.write("# changed\n")
    assert_new_key()
    for source in (*GUEST_PROGRAMS.values(), "guest_program.h"):
        (root.native / source).write_text("/* changed */\n")
        assert_new_key()
    monkeypatch.setattr(guest_image, "FORMAT_VERSION", "test")
    assert_new_key()


def test_find_guest_without_an_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VDSA_CACHE", str(tmp_path))
    with pytest.raises(GuestImageMissing, match="vdsa build guest --kernel trixie"):
        find_guest("trixie")
    with pytest.raises(GuestImageMissing, match="unknown Debian release 'jessie'"):
        find_guest("jessie")
    assert list(tmp_path.iterdir()) == []


def test_script_archive(tmp_path: Path) -> None:
    data = script_archive(b"echo hi\n", {"input.bin": b"\0\1\2", "sub/dir/f": b"deep"})
    assert len(data) % 4 == 0
    cpio_extract(data, tmp_path / "out")
    vdsa = tmp_path / "out" / "vdsa"
    assert (vdsa / "script").read_bytes() == b"echo hi\n"
    assert (vdsa / "script").stat().st_mode & 0o7777 == 0o755
    assert (vdsa / "input.bin").read_bytes() == b"\0\1\2"
    assert (vdsa / "input.bin").stat().st_mode & 0o7777 == 0o644
    assert (vdsa / "sub" / "dir" / "f").read_bytes() == b"deep"
    # Each directory precedes its contents: the kernel does not create parents.
    assert cpio_members(data) == [
        "vdsa", "vdsa/script", "vdsa/input.bin", "vdsa/sub", "vdsa/sub/dir", "vdsa/sub/dir/f",
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["script", "/script", "../x", "", "a/../../b"])
def test_script_archive_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - two messages, both mean "bad name"
        script_archive(b"", {name: b""})


def compile_guest_program(program: str, tmp_path: Path) -> Path:
    """A program of native/guest/ built as the image builds it, to run on the host."""
    binary = tmp_path / program
    subprocess.run(guest_program_argv(NATIVE_GUEST / GUEST_PROGRAMS[program], binary),
                   check=True)
    return binary


def test_movdir64b_test_builds_and_checks_cpuid(tmp_path: Path) -> None:
    binary = compile_guest_program("movdir64b-test", tmp_path)
    done = subprocess.run([binary], capture_output=True, text=True)
    if "movdir64b" in Path("/proc/cpuinfo").read_text().split():
        assert done.returncode == 0, done.stdout
        assert done.stdout.splitlines() == [
            "movdir64b-test: cpuid ok",
            "movdir64b-test: copy ok",
            "movdir64b-test: misaligned-gp ok",
        ]
    else:
        # Without the CPUID bit the instruction must not run at all.
        assert done.returncode == 2
        assert done.stdout.startswith("movdir64b-test: cpuid: MOVDIR64B not supported")
        assert len(done.stdout.splitlines()) == 1


@pytest.fixture(scope="module")
def memcpy_bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_guest_program("memcpy-bench", tmp_path_factory.mktemp("memcpy-bench"))


def test_memcpy_bench_reports_its_figures(memcpy_bench: Path) -> None:
    done = subprocess.run([memcpy_bench, "4096", "100000"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    figures = dict(line.split(" ") for line in done.stdout.splitlines())
    assert list(figures) == ["size", "copies", "bytes", "seconds", "iops", "kbps"]
    assert (figures["size"], figures["copies"], figures["bytes"]) == ("4096", "100000", "409600000")
    seconds = float(figures["seconds"])
    assert seconds > 0
    # Rounded to microseconds, so compared within 1%.
    assert float(figures["iops"]) == pytest.approx(100000 / seconds, rel=0.01)
    # KB as dmatest counts it, 1024 bytes; whole KB/s, as dmatest prints them.
    assert int(figures["kbps"]) == pytest.approx(400000 / seconds, rel=0.01)


@pytest.mark.parametrize("args", [
    [], ["4096"], ["4096", "10", "1"], ["0", "10"], ["4096", "0"], ["-1", "10"], [" 4096", "10"],
    ["4096", "10x"], ["99999999999999999999", "1"], ["4294967296", "4294967296"],
])  # fmt: skip
def test_memcpy_bench_refuses_bad_arguments(memcpy_bench: Path, args: list[str]) -> None:
    done = subprocess.run([memcpy_bench, *args], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(("usage: memcpy-bench", "memcpy-bench: "))


@pytest.fixture(scope="module")
def hostile_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_guest_program("hostile-guest", tmp_path_factory.mktemp("hostile-guest"))


@pytest.mark.parametrize("args", [[], ["1"], ["1", "10", "1"], ["0", "10"], ["1", "0"],
                                  ["-1", "10"], ["1", "10x"]])
def test_hostile_guest_refuses_bad_arguments(hostile_guest: Path, args: list[str]) -> None:
    done = subprocess.run([hostile_guest, *args], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(("usage: hostile-guest", "hostile-guest: "))


def test_hostile_guest_needs_a_dsa_function(hostile_guest: Path) -> None:
    done = subprocess.run([hostile_guest, "1", "10"], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (3, "")
    assert done.stderr.startswith("hostile-guest: no 8086:0b25 function")


@pytest.fixture(scope="module")
def portal_race(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_guest_program("portal-race", tmp_path_factory.mktemp("portal-race"))


@pytest.mark.parametrize("args", [[], ["10", "1"], ["0"], ["-1"], [" 10"], ["10x"]])
def test_portal_race_refuses_bad_arguments(portal_race: Path, args: list[str]) -> None:
    done = subprocess.run([portal_race, *args], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(("usage: portal-race", "portal-race: "))


def test_portal_race_needs_a_dsa_function(portal_race: Path) -> None:
    devices = Path("/sys/bus/pci/devices")
    ids = {((d / "vendor").read_text().strip(), (d / "device").read_text().strip())
           for d in devices.iterdir()}
    if ("0x8086", "0x0b25") in ids:
        pytest.skip("this host has a DSA function")
    done = subprocess.run([portal_race, "10"], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (3, "")
    assert done.stderr == f"portal-race: no 8086:0b25 function in {devices}\n"


@pytest.mark.parametrize("release", RELEASES)
def test_built_image_contents(tmp_path: Path, release: str) -> None:
    image = trio.run(build_guest, release)
    root = trio.run(build_root, release)
    kver = image.kernel_version
    assert (image.release, kver, image.dmatest) == (release, root.kernel_version, True)
    assert image.kernel.read_bytes() == root.kernel.read_bytes()
    # The launcher appends an uncompressed archive: it must start 4-byte aligned.
    archive = gunzip_archive(image.initramfs)

    names = set(cpio_members(archive))
    # The release's own accel-config and libraries, as its loader resolves them.
    ldd = subprocess.run(["chroot", root.path, "ldd", "/usr/bin/accel-config"],
                         capture_output=True, text=True, check=True)
    libraries = re.findall(r"(/\S+) \(0x", ldd.stdout)
    assert len(libraries) >= 3
    modules = f"lib/modules/{kver}"
    expected = {
        "init", "bin/busybox", "bin/sh", "sbin/modprobe", "bin/base64", "bin/dd",
        "usr/bin/accel-config", "usr/bin/vdsa-result",
        *(f"usr/bin/{program}" for program in GUEST_PROGRAMS),
        f"{modules}/kernel/drivers/dma/idxd/idxd.ko",
        f"{modules}/kernel/drivers/dma/idxd/idxd_bus.ko",
        f"{modules}/extra/dmatest.ko", f"{modules}/modules.dep",
        "proc", "sys", "dev", "tmp", "run", "root", "vdsa",
        *(lib.lstrip("/") for lib in libraries),
    }  # fmt: skip
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if n.endswith((".ko.xz", ".ko.zst", ".ko.gz"))]
    # The drivers DPDK binds the function to, for every release; DPDK itself only in its
    # own archive.
    modules_copied = {guest_image.module_name(Path(n)) for n in names if n.endswith(".ko")}
    assert set(USER_SPACE_DRIVER_MODULES) <= modules_copied, modules_copied
    assert DPDK_TEST.lstrip("/") not in names
    assert set(image.extras) == ({DPDK} if release in DPDK_PACKAGES else set())

    cpio_extract(archive, tmp_path / "root")
    tree = tmp_path / "root"
    assert (tree / "bin" / "busybox").read_bytes() == root.inside("/bin/busybox").read_bytes()
    assert (tree / "usr/bin/accel-config").read_bytes() == root.inside(
        "/usr/bin/accel-config").read_bytes()
    dep = (tree / modules / "modules.dep").read_text()
    assert "kernel/drivers/dma/idxd/idxd.ko: kernel/drivers/dma/idxd/idxd_bus.ko" in dep
    assert "extra/dmatest.ko:" in dep
    for module in ("kernel/drivers/dma/idxd/idxd.ko", "extra/dmatest.ko"):
        vermagic = subprocess.run(["modinfo", "-F", "vermagic", tree / modules / module],
                                  capture_output=True, text=True, check=True).stdout
        assert vermagic.split()[0] == kver
    assert (tree / "init").read_bytes() == (GUEST_FILES / "init").read_bytes()
    assert (tree / "tmp").stat().st_mode & 0o7777 == 0o1777
    # The build leaves no scratch space in the root.
    assert not list((root.path / "tmp").glob("vdsa-image.*"))


@pytest.mark.parametrize("release", sorted(DPDK_PACKAGES))
def test_dpdk_archive_contents(tmp_path: Path, release: str) -> None:
    image = trio.run(build_guest, release)
    root = trio.run(build_root, release)
    base = gunzip_archive(image.initramfs)
    dpdk = gunzip_archive(image.extras[DPDK])
    base_names = set(cpio_members(base))
    names = set(cpio_members(dpdk))
    assert DPDK_TEST.lstrip("/") in names
    # Nothing the initramfs has is there again, but the directories both fill.
    tree = tmp_path / "root"
    cpio_extract(base, tree)
    assert not [n for n in names & base_names if not (tree / n).is_dir()]
    cpio_extract(dpdk, tree)
    assert (tree / DPDK_TEST.lstrip("/")).read_bytes() == root.inside(DPDK_TEST).read_bytes()
    # EAL loads every driver in its directory: only those asked for, and those dpdk-test is
    # linked with anyway (each the one file that its other names point to).
    driver_dirs = list((tree / "usr/lib/x86_64-linux-gnu/dpdk").iterdir())
    assert len(driver_dirs) == 1
    ldd = subprocess.run(["chroot", root.path, "ldd", DPDK_TEST], capture_output=True,
                         text=True, check=True).stdout
    linked = {Path(path).name.split(".so")[0] for path in re.findall(r"(/\S+) \(0x", ldd)}
    present = {p.name.split(".so")[0].removeprefix("librte_") for p in driver_dirs[0].iterdir()}
    assert {*DPDK_DRIVERS} <= present
    assert present - {*DPDK_DRIVERS} <= {name.removeprefix("librte_") for name in linked}
    # The guest's loader finds every library of dpdk-test and of the drivers in that root.
    programs = [DPDK_TEST, *(f"/{p.relative_to(tree)}" for p in driver_dirs[0].iterdir())]
    for program in programs:
        done = subprocess.run(["chroot", tree, "/lib64/ld-linux-x86-64.so.2", "--list", program],
                              capture_output=True, text=True)
        assert done.returncode == 0, (program, done.stderr)
        assert "not found" not in done.stdout, (program, done.stdout)
