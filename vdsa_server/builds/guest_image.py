"""The guest image: Debian bookworm's stock kernel and a busybox initramfs
whose /init runs a script handed in from the host and reports on the serial
console, then powers off.

Built once per machine into the cache (``vdsa build guest``). The initramfs
holds busybox, accel-config with its libraries, the idxd modules and their
dependencies, an out-of-tree dmatest.ko (Debian's kernel lacks it), the
static programs of ``native/guest/`` (``movdir64b-test``, ``memcpy-bench``,
``portal-race``)
and the two scripts of ``guest_files/``.

The console contract of ``guest_files/init``: every machine-readable line is
``@@vdsa@@ `` + one JSON object + ``\\n``, with the events ``boot`` (kernel),
``line`` (b64 of one output line of the script), ``result`` (name, b64; from
``vdsa-result``), ``dmesg`` (b64) and ``exit`` (status), then a power-off.
``line`` and ``result`` frames come from different processes, so their
relative order is not guaranteed.

The launcher appends :func:`script_archive` to the base initramfs; the kernel
unpacks both into the same root.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from vdsa_server.builds.cache import Artifact, artifact, tree_digest
from vdsa_server.builds.cpio import CpioWriter, normalize, pad4
from vdsa_server.builds.steps import BuildError, run_step
from vdsa_server.log import get_logger

log = get_logger()

# Bump when the image layout or the build changes in a way the other inputs miss.
FORMAT_VERSION = "1"
# dmatest.c comes from linux-source-<series>, so the kernel must be of that series.
KERNEL_SERIES = "6.1"
KERNEL_META_PACKAGE = "linux-image-amd64"
WANTED_MODULES = ("idxd", "idxd_bus")
# Host binaries copied into the image; their versions are part of the cache key.
VERSIONED_PACKAGES = ("busybox-static", "accel-config", "libaccel-config1")
BUSYBOX = Path("/bin/busybox")
ACCEL_CONFIG = Path("/usr/bin/accel-config")
# The image's /usr/bin programs built from native/guest/, with their sources.
GUEST_PROGRAMS = {
    "movdir64b-test": "movdir64b_test.c",
    "memcpy-bench": "memcpy_bench.c",
    "portal-race": "portal_race.c",
}

PACKAGE_DIR = Path(__file__).resolve().parent
GUEST_FILES = PACKAGE_DIR / "guest_files"
NATIVE_GUEST = PACKAGE_DIR.parents[1] / "native" / "guest"

KERNEL_FILE = "vmlinuz"
INITRAMFS_FILE = "initramfs.cpio.gz"
INFO_FILE = "guest.json"


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initramfs: Path
    kernel_version: str


class GuestImageMissing(RuntimeError):
    """The guest image is not in the cache (or its inputs cannot be determined)."""


@dataclass(frozen=True)
class KernelPackage:
    name: str  # linux-image-6.1.0-NN-amd64
    version: str  # the Debian package version, e.g. 6.1.192-2

    @property
    def kernel_version(self) -> str:
        return self.name.removeprefix("linux-image-")


def _query(argv: Sequence[str]) -> str:
    """Stdout of a quick read-only command (synchronous: the cache key is
    computed outside trio too)."""
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "LC_ALL": "C"},
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        raise BuildError(f"{' '.join(argv)} failed: {detail}") from exc
    return done.stdout


async def _capture(argv: Sequence[str | Path]) -> str:
    """Stdout of a quick read-only command run during the build."""
    args = [str(a) for a in argv]
    done = await trio.run_process(
        args,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, "LC_ALL": "C"},
    )
    if done.returncode != 0:
        raise BuildError(f"{' '.join(args)} failed: {done.stderr.decode(errors='replace')}")
    return done.stdout.decode()


def resolve_kernel() -> KernelPackage:
    """The kernel package that ``linux-image-amd64`` currently points to.

    The meta package's candidate pins the exact version of the kernel package
    it depends on, so one (slow, ~0.7 s) apt-cache call gives both.
    """
    shown = _query(["apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE])
    series = re.escape(KERNEL_SERIES)
    pattern = rf"^Depends:.*\b(linux-image-{series}\.\d+-\d+-amd64) \(= ([^)\s]+)\)"
    match = re.search(pattern, shown, re.MULTILINE)
    if match is None:
        raise BuildError(
            f"{KERNEL_META_PACKAGE} does not depend on a {KERNEL_SERIES} kernel package:\n{shown}"
        )
    return KernelPackage(match[1], match[2])


def installed_version(package: str) -> str:
    return _query(["dpkg-query", "-W", "-f", "${Version}", package]).strip()


def _files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise BuildError(f"missing source directory {directory}")
    return [p for p in directory.iterdir() if p.is_file()]


def guest_inputs() -> dict[str, str]:
    kernel = resolve_kernel()
    inputs = {
        "format": FORMAT_VERSION,
        "kernel_package": kernel.name,
        "kernel_package_version": kernel.version,
        "guest_files": tree_digest(_files(GUEST_FILES)),
        "native_guest": tree_digest(_files(NATIVE_GUEST)),
    }
    for package in (*VERSIONED_PACKAGES, f"linux-source-{KERNEL_SERIES}"):
        inputs[package] = installed_version(package)
    return inputs


def guest_artifact() -> Artifact:
    return artifact("guest", guest_inputs())


def _load(path: Path) -> GuestImage:
    info = json.loads((path / INFO_FILE).read_text())
    return GuestImage(
        kernel=path / KERNEL_FILE,
        initramfs=path / INITRAMFS_FILE,
        kernel_version=str(info["kernel_version"]),
    )


def find_guest() -> GuestImage:
    try:
        art = guest_artifact()
    except BuildError as exc:
        raise GuestImageMissing(
            f"cannot determine the guest image's inputs ({exc}); "
            "run .ci/setup, then `vdsa build guest`"
        ) from exc
    if not art.is_complete():
        raise GuestImageMissing(f"no guest image at {art.path}; run `vdsa build guest`")
    return _load(art.path)


def script_archive(script: bytes, files: Mapping[str, bytes] | None = None) -> bytes:
    """An uncompressed newc archive with /vdsa/script (0755) and ``files``
    (0644) under /vdsa/, to be appended to the base initramfs."""
    buffer = io.BytesIO()
    writer = CpioWriter(buffer)
    writer.directory("vdsa")
    writer.file("vdsa/script", script, 0o755)
    made = {"vdsa"}
    for name, data in sorted((files or {}).items()):
        member = f"vdsa/{normalize(name)}"
        if member == "vdsa/script" or member in made:
            raise ValueError(f"extra file {name!r} clashes with another member of /vdsa")
        # The kernel creates no missing parent directories.
        parts = member.split("/")
        for depth in range(2, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in made:
                writer.directory(parent)
                made.add(parent)
        writer.file(member, data, 0o644)
        made.add(member)
    writer.finish()
    return buffer.getvalue()


@dataclass(frozen=True)
class _Build:
    kernel: KernelPackage
    work: Path  # scratch space, removed after a successful build
    logs: Path  # outside the artifact, so they survive a failed build
    downloads: Path

    @property
    def root(self) -> Path:
        """The initramfs tree."""
        return self.work / "root"

    @property
    def extracted(self) -> Path:
        return self.work / "kernel"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.kernel.kernel_version

    def log_file(self, step: str) -> Path:
        return self.logs / f"{step}.log"

    async def step(self, name: str, argv: Sequence[str | Path], cwd: Path | None = None) -> None:
        await run_step(f"guest-{name}", argv, log_file=self.log_file(name), cwd=cwd)


def _install(source: Path, dest: Path, mode: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)  # follows symlinks: the image gets the real file
    dest.chmod(mode)


async def _fetch_kernel(b: _Build) -> None:
    kernel = b.kernel
    b.downloads.mkdir(parents=True, exist_ok=True)
    deb = b.downloads / f"{kernel.name}_{kernel.version.replace(':', '%3a')}_amd64.deb"
    if not deb.is_file():
        # The sandbox user _apt cannot write into root's cache directory.
        await b.step(
            "kernel-download",
            [
                "apt-get",
                "download",
                "-o",
                "APT::Sandbox::User=root",
                f"{kernel.name}={kernel.version}",
            ],
            cwd=b.downloads,
        )
        if not deb.is_file():
            raise BuildError(f"apt-get download did not produce {deb}")
    await b.step("kernel-extract", ["dpkg", "-x", deb, b.extracted])
    log.info(
        "guest.build.kernel_extracted", package=kernel.name, version=kernel.version, deb=str(deb)
    )


async def _copy_modules(b: _Build) -> Path:
    """Copy WANTED_MODULES and their dependencies; return idxd.ko's source path."""
    source = b.extracted / "lib" / "modules" / b.kernel.kernel_version
    index: dict[str, Path] = {}
    for found in (source / "kernel").rglob("*.ko*"):
        index[found.name.split(".ko")[0].replace("-", "_")] = found
    selected: dict[str, Path] = {}
    pending = list(WANTED_MODULES)
    while pending:
        name = pending.pop()
        if name in selected:
            continue
        path = index.get(name)
        if path is None:
            raise BuildError(f"module {name} is not in {b.kernel.name}")
        # Debian's 6.1 kernels ship plain .ko files (CONFIG_MODULE_COMPRESS_NONE);
        # a compressed one would need a decompression step first.
        if path.suffix != ".ko":
            raise BuildError(f"module {path} is compressed; the image builder expects plain .ko")
        selected[name] = path
        depends = (await _capture(["modinfo", "-F", "depends", path])).strip()
        pending += [d.replace("-", "_") for d in depends.split(",") if d]
    for path in selected.values():
        _install(path, b.modules / path.relative_to(source), 0o644)
    # depmod reads these to order modules.dep and to know the built-in modules.
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (source / name).is_file():
            _install(source / name, b.modules / name, 0o644)
    log.info("guest.build.modules_selected", modules=sorted(selected))
    return selected["idxd"]


async def _build_dmatest(b: _Build, reference_module: Path) -> None:
    kver = b.kernel.kernel_version
    tarball = Path(f"/usr/src/linux-source-{KERNEL_SERIES}.tar.xz")
    headers = Path(f"/usr/src/linux-headers-{kver}")
    for needed, package in (
        (tarball, f"linux-source-{KERNEL_SERIES}"),
        (headers, f"linux-headers-{kver}"),
    ):
        if not needed.exists():
            raise BuildError(f"{needed} is missing: install {package} (.ci/setup does)")
    src = b.work / "dmatest"
    src.mkdir(parents=True)
    await b.step(
        "dmatest-source",
        [
            "tar",
            "-xJf",
            tarball,
            "-C",
            src,
            "--strip-components=3",
            "--occurrence=1",
            f"linux-source-{KERNEL_SERIES}/drivers/dma/dmatest.c",
        ],
    )
    (src / "Kbuild").write_text("obj-m := dmatest.o\n")
    await b.step(
        "dmatest-build", ["make", "-C", headers, f"M={src}", f"-j{os.cpu_count() or 1}", "modules"]
    )
    built = (await _capture(["modinfo", "-F", "vermagic", src / "dmatest.ko"])).strip()
    expected = (await _capture(["modinfo", "-F", "vermagic", reference_module])).strip()
    if built != expected:
        raise BuildError(f"dmatest.ko has vermagic {built!r}, the kernel's modules {expected!r}")
    dest = b.modules / "extra" / "dmatest.ko"
    dest.parent.mkdir(parents=True, exist_ok=True)
    await b.step("dmatest-strip", ["strip", "--strip-debug", "-o", dest, src / "dmatest.ko"])
    log.info("guest.build.dmatest_built", vermagic=built)


async def _copy_accel_config(b: _Build) -> None:
    ldd = await _capture(["ldd", ACCEL_CONFIG])
    if "not found" in ldd:
        raise BuildError(f"{ACCEL_CONFIG} has unresolved libraries:\n{ldd}")
    libraries = re.findall(r"(/\S+) \(0x", ldd)
    loaders = re.findall(r"^\s*(/\S+) \(0x", ldd, re.MULTILINE)
    if len(loaders) != 1:
        raise BuildError(f"cannot find the dynamic loader of {ACCEL_CONFIG} in:\n{ldd}")
    for path in (str(ACCEL_CONFIG), *libraries):
        _install(Path(path), b.root / path.lstrip("/"), 0o755)
    # accel-config itself refuses to run without the idxd module, so check
    # instead that the loader resolves every library inside the tree alone.
    await b.step("accel-config-check", ["chroot", b.root, loaders[0], "--list", ACCEL_CONFIG])
    log.info("guest.build.accel_config_copied", libraries=libraries)


def guest_program_argv(source: Path, dest: Path) -> list[str | Path]:
    """How a program of native/guest/ is compiled: static, as the image has only the libraries
    accel-config needs, and warnings as errors."""
    return ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", dest, source]


async def _compile_guest_programs(b: _Build) -> None:
    for program, source in GUEST_PROGRAMS.items():
        dest = b.root / "usr" / "bin" / program
        dest.parent.mkdir(parents=True, exist_ok=True)
        await b.step(program, guest_program_argv(NATIVE_GUEST / source, dest))


async def _link_busybox_applets(b: _Build) -> int:
    """Symlink every applet to /bin/busybox, except where the tree has a real program."""
    listing = await _capture([b.root / "bin" / "busybox", "--list-full"])
    made = 0
    for rel in listing.split():
        link = b.root / rel
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
        made += 1
    return made


def _normalize_modes(root: Path) -> None:
    """Directories 0755 and files 0755 or 0644 whatever the umask, except the
    conventional /tmp and /root."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            Path(dirpath, name).chmod(0o755)
        for name in filenames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                path.chmod(0o755 if path.stat().st_mode & 0o111 else 0o644)
    (root / "tmp").chmod(0o1777)
    (root / "root").chmod(0o700)


async def _assemble(b: _Build, out: Path) -> None:
    root = b.root
    # Mount points, HOME and the directory the script archive fills.
    for directory in ("dev", "proc", "sys", "tmp", "run", "root", "vdsa"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    await _fetch_kernel(b)
    _install(b.extracted / "boot" / f"vmlinuz-{b.kernel.kernel_version}", out / KERNEL_FILE, 0o644)
    idxd = await _copy_modules(b)
    await _build_dmatest(b, idxd)
    _install(BUSYBOX, root / "bin" / "busybox", 0o755)
    await _copy_accel_config(b)
    await _compile_guest_programs(b)
    _install(GUEST_FILES / "init", root / "init", 0o755)
    _install(GUEST_FILES / "vdsa-result", root / "usr" / "bin" / "vdsa-result", 0o755)
    # Debian's kernel package ships no modules.dep; modprobe needs it.
    await b.step("depmod", ["depmod", "-b", root, b.kernel.kernel_version])
    links = await _link_busybox_applets(b)
    log.info("guest.build.busybox_linked", applets=links)
    _normalize_modes(root)

    cpio = b.work / "initramfs.cpio"
    with cpio.open("wb") as stream:
        writer = CpioWriter(stream)
        writer.tree(root)
        writer.finish()
    uncompressed = cpio.stat().st_size
    await b.step("gzip", ["gzip", "-9", "-n", cpio])
    shutil.move(b.work / "initramfs.cpio.gz", out / INITRAMFS_FILE)
    # The launcher appends an uncompressed archive, which the kernel only
    # recognises at a 4-byte aligned offset.
    with (out / INITRAMFS_FILE).open("ab") as stream:
        pad4(stream)
    (out / INFO_FILE).write_text(
        json.dumps(
            {
                "kernel_version": b.kernel.kernel_version,
                "kernel_package": b.kernel.name,
                "kernel_package_version": b.kernel.version,
            },
            indent=2,
        )
        + "\n"
    )
    log.info(
        "guest.build.packed",
        initramfs_bytes=(out / INITRAMFS_FILE).stat().st_size,
        uncompressed_bytes=uncompressed,
    )


async def build_guest(*, force: bool = False) -> GuestImage:
    """Build the guest image unless the cache has it (or ``force``); return it."""
    art = guest_artifact()
    kernel = KernelPackage(art.inputs["kernel_package"], art.inputs["kernel_package_version"])
    log.info(
        "guest.build.kernel_resolved",
        package=kernel.name,
        version=kernel.version,
        kernel_version=kernel.kernel_version,
    )
    if art.is_complete() and not force:
        log.info("guest.build.cached", path=str(art.path))
        return _load(art.path)
    started = time.monotonic()
    b = _Build(
        kernel=kernel,
        work=art.root / "work" / f"{art.name}-{art.key}",
        logs=art.root / "logs" / f"{art.name}-{art.key}",
        downloads=art.root / "downloads",
    )
    shutil.rmtree(b.work, ignore_errors=True)
    b.work.mkdir(parents=True)
    log.info("guest.build.start", key=art.key, work=str(b.work), logs=str(b.logs))
    with art.building() as out:
        await _assemble(b, out)
    # Kept after a failure for inspection; hundreds of MB once done.
    shutil.rmtree(b.work, ignore_errors=True)
    log.info("guest.build.done", path=str(art.path), seconds=round(time.monotonic() - started, 1))
    return _load(art.path)
