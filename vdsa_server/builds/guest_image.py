"""The guest image: a Debian release's stock kernel (or the user's own) and a
busybox initramfs whose /init runs a script handed in from the host and
reports on the serial console, then powers off.

Built once per release into the cache (``vdsa build guest --kernel R``) from
that release's root (``debian_root``): its kernel, the idxd modules and their
dependencies (decompressed, as busybox's modprobe loads plain ``.ko`` files),
the drivers a user-space driver binds the function to (uio_pci_generic,
vfio-pci), the root's ``dmatest.ko``, its busybox and accel-config with its
libraries, and modules.dep made by its own depmod. Added to those: the static
programs of ``native/guest/`` (``movdir64b-test``, ``memcpy-bench``,
``portal-race``, ``hostile-guest``) and the two scripts of ``guest_files/``.

Beside the initramfs, where the userland root has DPDK (``DPDK_PACKAGES``),
an extra archive ``dpdk.cpio.gz``: ``dpdk-test``, the few drivers it needs for
``dmadev_autotest`` in DPDK's default driver directory, and their libraries as
the root resolves them (those the initramfs already has left out). Only the
boots that ask for it (``vdsa boot --with dpdk``) append it, so no other boot
unpacks it.

The console contract of ``guest_files/init``: every machine-readable line is
``@@vdsa@@ `` + one JSON object + ``\\n``, with the events ``boot`` (kernel),
``line`` (b64 of one output line of the script), ``result`` (name, b64; from
``vdsa-result``), ``dmesg`` (b64) and ``exit`` (status), then a power-off.
``line`` and ``result`` frames come from different processes, so their
relative order is not guaranteed.

The launcher appends the extras asked for and :func:`script_archive` to the
base initramfs; the kernel unpacks them all into the same root.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from vdsa_server.builds.cache import Artifact, artifact, tree_digest
from vdsa_server.builds.cpio import CpioWriter, normalize, pad4
from vdsa_server.builds.debian_root import (
    RELEASES,
    DebianRoot,
    DebianRootMissing,
    build_root,
    check_release,
    find_root,
    root_artifact,
)
from vdsa_server.builds.steps import BuildError, run_step
from vdsa_server.log import get_logger

log = get_logger()

# Bump when the image layout or the build changes in a way the other inputs miss.
FORMAT_VERSION = "3"
# The release a boot uses unless told: the newest whose stock driver passes the
# whole boot matrix (README, "Guest kernels").
DEFAULT_RELEASE = "sid"
WANTED_MODULES = ("idxd", "idxd_bus")
# The drivers that hand the function to a user-space driver (DPDK): copied with their
# dependencies where the kernel has them as modules (a user's kernel may not).
USER_SPACE_DRIVER_MODULES = ("uio_pci_generic", "vfio_pci", "vfio_iommu_type1")
ACCEL_CONFIG = "/usr/bin/accel-config"
# The image's /usr/bin programs built from native/guest/, with their sources.
GUEST_PROGRAMS = {
    "movdir64b-test": "movdir64b_test.c",
    "memcpy-bench": "memcpy_bench.c",
    "portal-race": "portal_race.c",
    "hostile-guest": "hostile_guest.c",
    "portal-bench": "portal_bench.c",
}

PACKAGE_DIR = Path(__file__).resolve().parent
GUEST_FILES = PACKAGE_DIR / "guest_files"
NATIVE_GUEST = PACKAGE_DIR.parents[1] / "native" / "guest"

KERNEL_FILE = "vmlinuz"
INITRAMFS_FILE = "initramfs.cpio.gz"
# The extra archives an image may have, by name, and their files.
DPDK = "dpdk"
EXTRA_FILES = {DPDK: "dpdk.cpio.gz"}
DPDK_TEST = "/usr/bin/dpdk-test"
# The drivers dmadev_autotest needs, loaded by EAL from its default driver directory (there
# beside only those dpdk-test is linked with anyway, so that EAL loads no other): the PCI
# bus, the mempool the test's mbuf pool uses and the idxd dmadev. Not the skeleton dmadev
# the test would add: it copies with a CPU thread of its own, which a loaded TCG guest may
# not run within the test's waits, and it exercises nothing of vdsa.
DPDK_DRIVERS = ("bus_pci", "mempool_ring", "dma_idxd")
DPDK_DRIVER_DIRS = "usr/lib/x86_64-linux-gnu/dpdk/pmds-*"
# glibc loads libgcc_s with dlopen when a thread exits (EAL's threads do), so ldd misses it.
DPDK_DLOPENED = ("/usr/lib/x86_64-linux-gnu/libgcc_s.so.1",)
INFO_FILE = "guest.json"
# The files of a modules tree that depmod reads besides the modules.
MODULES_METADATA = ("modules.order", "modules.builtin", "modules.builtin.modinfo")


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initramfs: Path
    kernel_version: str
    release: str | None = None  # the Debian release; None for the user's own kernel
    dmatest: bool = True  # whether the image has dmatest.ko
    # The archives a boot may append to the initramfs, by name (EXTRA_FILES).
    extras: Mapping[str, Path] = field(default_factory=dict)


class GuestImageMissing(RuntimeError):
    """The guest image is not in the cache (or its inputs cannot be determined)."""


@dataclass(frozen=True)
class KernelFiles:
    """A kernel to put in an image."""

    image: Path  # the bzImage
    version: str  # its release string, the name of its modules directory
    modules: Path | None  # its lib/modules/<version>, None when everything is built in
    dmatest: Path | None  # a dmatest.ko for it, None when it has none


async def capture(argv: Sequence[str | Path]) -> str:
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


def _files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise BuildError(f"missing source directory {directory}")
    return [p for p in directory.iterdir() if p.is_file()]


def source_inputs() -> dict[str, str]:
    """The project's own files that go into every image."""
    return {
        "guest_files": tree_digest(_files(GUEST_FILES)),
        "native_guest": tree_digest(_files(NATIVE_GUEST)),
    }


def guest_inputs(release: str) -> dict[str, str]:
    root = find_root(release)
    return {
        "format": FORMAT_VERSION,
        "release": release,
        "root": root_artifact(release).key,
        "kernel_version": root.kernel_version,
        "kernel_package_version": root.kernel_package_version,
        **root.versions,
        **source_inputs(),
    }


def guest_artifact(release: str) -> Artifact:
    return artifact(f"guest-{release}", guest_inputs(release))


def load_image(path: Path) -> GuestImage:
    info = json.loads((path / INFO_FILE).read_text())
    release = info.get("release")
    return GuestImage(
        kernel=path / KERNEL_FILE,
        initramfs=path / INITRAMFS_FILE,
        kernel_version=str(info["kernel_version"]),
        release=None if release is None else str(release),
        dmatest=bool(info["dmatest"]),
        extras={str(name): path / str(file) for name, file in info.get("extras", {}).items()},
    )


def find_guest(release: str = DEFAULT_RELEASE) -> GuestImage:
    try:
        check_release(release)
        art = guest_artifact(release)
    except (BuildError, DebianRootMissing) as exc:
        raise GuestImageMissing(
            f"no {release} guest image ({exc}); run .ci/setup, or "
            f"`vdsa build guest --kernel {release}`"
        ) from exc
    if not art.is_complete():
        raise GuestImageMissing(
            f"no {release} guest image at {art.path}; run `vdsa build guest --kernel {release}`")
    return load_image(art.path)


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
    kernel: KernelFiles
    userland: DebianRoot
    work: Path  # scratch space inside the userland root, so that its tools can reach it
    logs: Path  # outside the artifact, so they survive a failed build

    @property
    def tree(self) -> Path:
        """The initramfs tree."""
        return self.work / "tree"

    @property
    def modules(self) -> Path:
        return self.tree / "lib" / "modules" / self.kernel.version

    @property
    def dpdk_tree(self) -> Path:
        """The DPDK archive's tree."""
        return self.work / "dpdk-tree"

    def in_root(self, path: Path) -> str:
        """``path`` (under the userland root) as a command run in that root names it."""
        return "/" + str(path.relative_to(self.userland.path))

    async def step(self, name: str, argv: Sequence[str | Path]) -> None:
        await run_step(f"guest-{name}", argv, log_file=self.logs / f"{name}.log")


def _install(source: Path, dest: Path, mode: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)  # follows symlinks: the image gets the real file
    dest.chmod(mode)


def module_name(path: Path) -> str:
    return path.name.split(".ko")[0].replace("-", "_")


def decompress_module(source: Path, dest: Path) -> None:
    """A module file as the kernel loads it: plain ELF, whatever the tree compressed it with."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    match source.name.rsplit(".ko", 1)[-1]:
        case "":
            shutil.copyfile(source, dest)
        case ".xz":
            dest.write_bytes(lzma.decompress(source.read_bytes()))
        case ".gz":
            dest.write_bytes(gzip.decompress(source.read_bytes()))
        case ".zst":
            with dest.open("wb") as out:
                subprocess.run(["zstd", "-dc", source], stdout=out, check=True)
        case other:
            raise BuildError(f"module {source} has an unknown compression {other!r}")
    dest.chmod(0o644)


def module_index(modules: Path) -> dict[str, Path]:
    """Every module of a lib/modules/<release> tree (kernel/, and extra/ or updates/ where
    modules built out of tree go), by name."""
    return {module_name(p): p for p in modules.rglob("*.ko*")}


async def _copy_modules(b: _Build) -> list[str]:
    """Copy WANTED_MODULES, the USER_SPACE_DRIVER_MODULES the tree has, and their
    dependencies, decompressed."""
    source = b.kernel.modules
    if source is None:
        return []
    index = module_index(source)
    absent = [name for name in USER_SPACE_DRIVER_MODULES if name not in index]
    if absent:
        log.warning("guest.build.modules_absent", modules=absent,
                    meaning="DPDK cannot bind the function with these drivers in this guest")
    selected: list[str] = []
    pending = [*WANTED_MODULES, *(name for name in USER_SPACE_DRIVER_MODULES if name in index)]
    while pending:
        name = pending.pop()
        if name in selected:
            continue
        path = index.get(name)
        if path is None:
            raise BuildError(f"module {name} is not in {source}")
        dest = b.modules / path.relative_to(source).with_name(f"{module_name(path)}.ko")
        decompress_module(path, dest)
        selected.append(name)
        depends = (await capture(["modinfo", "-F", "depends", dest])).strip()
        pending += [d.replace("-", "_") for d in depends.split(",") if d]
    for name in MODULES_METADATA:
        if (source / name).is_file():
            _install(source / name, b.modules / name, 0o644)
    log.info("guest.build.modules_selected", modules=sorted(selected))
    return selected


async def _libraries(b: _Build, program: str) -> tuple[list[str], str]:
    """The libraries ``program`` (a path in the userland root) loads, as the root's ldd
    resolves them, and its dynamic loader."""
    ldd = await capture(["chroot", b.userland.path, "ldd", program])
    if "not found" in ldd:
        raise BuildError(f"{program} has unresolved libraries:\n{ldd}")
    libraries = re.findall(r"(/\S+) \(0x", ldd)
    loaders = re.findall(r"^\s*(/\S+) \(0x", ldd, re.MULTILINE)
    if len(loaders) != 1:
        raise BuildError(f"cannot find the dynamic loader of {program} in:\n{ldd}")
    return libraries, loaders[0]


async def _copy_accel_config(b: _Build) -> None:
    libraries, loader = await _libraries(b, ACCEL_CONFIG)
    for path in (ACCEL_CONFIG, *libraries):
        _install(b.userland.inside(path), b.tree / path.lstrip("/"), 0o755)
    # accel-config itself refuses to run without the idxd module, so check
    # instead that the loader resolves every library inside the tree alone.
    await b.step("accel-config-check", ["chroot", b.tree, loader, "--list", ACCEL_CONFIG])
    log.info("guest.build.accel_config_copied", libraries=libraries)


def guest_program_argv(source: Path, dest: Path) -> list[str | Path]:
    """How a program of native/guest/ is compiled: static, as the image has only the libraries
    accel-config needs, and warnings as errors."""
    return ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", dest, source]


async def _compile_guest_programs(b: _Build) -> None:
    for program, source in GUEST_PROGRAMS.items():
        dest = b.tree / "usr" / "bin" / program
        dest.parent.mkdir(parents=True, exist_ok=True)
        await b.step(program, guest_program_argv(NATIVE_GUEST / source, dest))


async def _link_busybox_applets(b: _Build) -> int:
    """Symlink every applet to /bin/busybox, except where the tree has a real program."""
    listing = await capture([b.tree / "bin" / "busybox", "--list-full"])
    made = 0
    for rel in listing.split():
        link = b.tree / rel
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
        made += 1
    return made


def _normalize_modes(root: Path) -> None:
    """Directories 0755 and files 0755 or 0644 whatever the umask."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            Path(dirpath, name).chmod(0o755)
        for name in filenames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                path.chmod(0o755 if path.stat().st_mode & 0o111 else 0o644)


async def _fill_tree(b: _Build) -> None:
    tree = b.tree
    # Mount points, HOME and the directory the script archive fills.
    for directory in ("dev", "proc", "sys", "tmp", "run", "root", "vdsa"):
        (tree / directory).mkdir(parents=True, exist_ok=True)
    await _copy_modules(b)
    if b.kernel.dmatest is not None:
        b.modules.joinpath("extra").mkdir(parents=True, exist_ok=True)
        await b.step("dmatest-strip", ["strip", "--strip-debug", "-o",
                                       b.modules / "extra" / "dmatest.ko", b.kernel.dmatest])
    _install(b.userland.inside("/bin/busybox"), tree / "bin" / "busybox", 0o755)
    await _copy_accel_config(b)
    await _compile_guest_programs(b)
    _install(GUEST_FILES / "init", tree / "init", 0o755)
    _install(GUEST_FILES / "vdsa-result", tree / "usr" / "bin" / "vdsa-result", 0o755)
    if b.kernel.modules is not None:
        # The release's own depmod; busybox's modprobe reads the modules.dep it writes.
        await b.step("depmod", ["chroot", b.userland.path, "depmod", "-b", b.in_root(tree),
                                b.kernel.version])
    links = await _link_busybox_applets(b)
    log.info("guest.build.busybox_linked", applets=links)
    _normalize_modes(tree)
    # The conventional modes of /tmp and /root.
    (tree / "tmp").chmod(0o1777)
    (tree / "root").chmod(0o700)


def _copy_resolved(b: _Build, path: str) -> None:
    """``path`` of the userland root into the DPDK tree, unless the initramfs has it: the
    file it resolves to, at its real path, and ``path`` a symlink to that where they differ.
    So every name of a library is one file in the guest, and EAL's dlopen of a driver that
    dpdk-test is also linked with finds it already loaded (a second copy would register the
    driver twice)."""
    name = path.lstrip("/")
    if os.path.lexists(b.tree / name):
        return
    real = b.userland.inside(path).relative_to(b.userland.path)
    if not os.path.lexists(b.tree / real) and not os.path.lexists(b.dpdk_tree / real):
        _install(b.userland.path / real, b.dpdk_tree / real, 0o755)
    link = b.dpdk_tree / name
    if Path(name) != real and not os.path.lexists(link):
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f"/{real}")


async def _fill_dpdk_tree(b: _Build) -> None:
    """dpdk-test, DPDK_DRIVERS in the root's driver directory, and what they load."""
    root = b.userland.path
    found = sorted(root.glob(DPDK_DRIVER_DIRS))
    if len(found) != 1:
        raise BuildError(f"expected one DPDK driver directory {DPDK_DRIVER_DIRS} in {root}, "
                         f"found {[str(p) for p in found]}")
    drivers: list[str] = []
    for driver in DPDK_DRIVERS:
        entries = sorted(found[0].glob(f"librte_{driver}.so*"))
        if not entries:
            raise BuildError(f"DPDK driver {driver} is not in {found[0]}")
        drivers += [f"/{entry.relative_to(root)}" for entry in entries]
    libraries, loader = await _libraries(b, DPDK_TEST)
    for driver in drivers:
        libraries += (await _libraries(b, driver))[0]
    for path in sorted({DPDK_TEST, *drivers, *libraries, *DPDK_DLOPENED}):
        _copy_resolved(b, path)
    _normalize_modes(b.dpdk_tree)
    # The loader resolves every library of dpdk-test and the drivers in the guest's root: the
    # initramfs with this archive unpacked over it.
    merged = b.work / "dpdk-check"
    shutil.copytree(b.tree, merged, symlinks=True)
    shutil.copytree(b.dpdk_tree, merged, symlinks=True, dirs_exist_ok=True)
    for index, program in enumerate((DPDK_TEST, *drivers)):
        await b.step(f"dpdk-check-{index}", ["chroot", merged, loader, "--list", program])
    shutil.rmtree(merged)
    log.info("guest.build.dpdk_copied", drivers=drivers, libraries=len(set(libraries)))


async def _pack_tree(b: _Build, tree: Path, out: Path, name: str) -> None:
    """``tree`` as the gzipped newc archive ``name`` in ``out``."""
    dest = out / name
    cpio = b.work / name.removesuffix(".gz")
    with cpio.open("wb") as stream:
        writer = CpioWriter(stream)
        writer.tree(tree)
        writer.finish()
    uncompressed = cpio.stat().st_size
    await b.step(f"gzip-{cpio.stem}", ["gzip", "-9", "-n", cpio])
    shutil.move(cpio.with_name(dest.name), dest)
    # Another archive follows it; the kernel only recognises an uncompressed one at a
    # 4-byte aligned offset.
    with dest.open("ab") as stream:
        pad4(stream)
    log.info("guest.build.packed", archive=name, bytes=dest.stat().st_size,
             uncompressed_bytes=uncompressed)


async def _pack(b: _Build, out: Path, release: str | None, extras: Sequence[str]) -> None:
    await _pack_tree(b, b.tree, out, INITRAMFS_FILE)
    trees = {DPDK: b.dpdk_tree}
    for name in extras:
        await _pack_tree(b, trees[name], out, EXTRA_FILES[name])
    _install(b.kernel.image, out / KERNEL_FILE, 0o644)
    (out / INFO_FILE).write_text(json.dumps({
        "kernel_version": b.kernel.version,
        "release": release,
        "userland": b.userland.release,
        "dmatest": b.kernel.dmatest is not None,
        "extras": {name: EXTRA_FILES[name] for name in extras},
    }, indent=2) + "\n")


async def assemble_image(art: Artifact, kernel: KernelFiles, userland: DebianRoot,
                         release: str | None) -> GuestImage:
    """Build ``art`` as the image of ``kernel`` with ``userland``'s tools; return it."""
    started = time.monotonic()
    b = _Build(kernel=kernel, userland=userland,
               work=userland.path / "tmp" / f"vdsa-image.{uuid.uuid4().hex}",
               logs=art.root / "logs" / f"{art.name}-{art.key}")
    shutil.rmtree(b.logs, ignore_errors=True)
    b.work.mkdir(parents=True)
    log.info("guest.build.start", name=art.name, key=art.key, kernel=kernel.version,
             userland=userland.release, logs=str(b.logs))
    try:
        with art.building() as out:
            await _fill_tree(b)
            extras = []
            if userland.has_dpdk:
                await _fill_dpdk_tree(b)
                extras.append(DPDK)
            await _pack(b, out, release, extras)
    finally:
        shutil.rmtree(b.work, ignore_errors=True)
    log.info("guest.build.done", path=str(art.path), seconds=round(time.monotonic() - started, 1))
    return load_image(art.path)


def release_kernel(root: DebianRoot) -> KernelFiles:
    return KernelFiles(image=root.kernel, version=root.kernel_version, modules=root.modules,
                       dmatest=root.dmatest)


async def build_guest(release: str = DEFAULT_RELEASE, *, force: bool = False) -> GuestImage:
    """The release's guest image from the cache, or built now with its root (``force``:
    both anew)."""
    root = await build_root(release, force=force)
    art = guest_artifact(release)
    log.info("guest.build.kernel_resolved", release=release, kernel_version=root.kernel_version,
             kernel_package_version=root.kernel_package_version)
    if art.is_complete() and not force:
        log.info("guest.build.cached", path=str(art.path))
        return load_image(art.path)
    return await assemble_image(art, release_kernel(root), root, release)


async def build_guests(releases: Sequence[str] = RELEASES, *, force: bool = False
                       ) -> dict[str, GuestImage]:
    """Several releases' images, built side by side (their downloads and their compiles
    overlap)."""
    for release in releases:
        check_release(release)
    built: dict[str, GuestImage] = {}

    async def one(release: str) -> None:
        built[release] = await build_guest(release, force=force)

    async with trio.open_nursery() as nursery:
        for release in releases:
            nursery.start_soon(one, release)
    return {release: built[release] for release in releases}
