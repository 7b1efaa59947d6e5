"""A Debian release's root: the tree that one guest image is made from.

For each release (bookworm, trixie, sid) ``debootstrap`` makes a minimal root
in the cache, and the release's own apt installs in it the kernel that
``linux-image-amd64`` points to, its headers and compiler, busybox, kmod and
accel-config (and, for the releases of ``DPDK_PACKAGES``, DPDK's test program and
drivers). Then ``dmatest.ko``, which no Debian kernel ships
(CONFIG_DMATEST is off), is built in the root from the matching
``linux-source`` package with the release's compiler, and checked against the
kernel's own modules by vermagic.

The root is an artifact keyed by the release, the mirror and what is asked of
it; what apt chose (the kernel, the userland versions) is recorded in
``root.json`` and keys the guest image made from it. A release's newer kernel
reaches vdsa by rebuilding its root (``vdsa build guest --kernel R --force``).
"""

from __future__ import annotations

import functools
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

from vdsa_server.builds.cache import Artifact, artifact
from vdsa_server.builds.steps import BuildError, run_step
from vdsa_server.log import get_logger

log = get_logger()

# Oldest first; the boot matrix runs on each.
RELEASES = ("bookworm", "trixie", "sid")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
ENV_MIRROR = "VDSA_DEBIAN_MIRROR"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
ENV_SECURITY_MIRROR = "VDSA_DEBIAN_SECURITY_MIRROR"
# The rolling release has no updates or security suites; a stable one's current
# kernel is often only in them.
ROLLING = "sid"
# Bump when the root's layout or its build changes in a way the other inputs miss.
FORMAT_VERSION = "3"
# linux-headers-amd64 brings the release's compiler; make and xz-utils build and unpack.
PACKAGES = ("linux-image-amd64", "linux-headers-amd64", "busybox-static", "kmod",
            "accel-config", "make", "xz-utils")
# The userland the image copies, whose versions key the image.
USERLAND_PACKAGES = ("busybox-static", "kmod", "accel-config", "libaccel-config1")
# The releases whose images have DPDK for the DPDK boots (guest_image.DPDK): dpdk-dev has
# dpdk-test, and the drivers it loads are named by their ABI (it pulls in every driver anyway,
# through libdpdk-dev).  The image ships dpdk-test only in an archive of its own.
DPDK_PACKAGES = {
    "bookworm": ("dpdk-dev", "librte-dma-idxd23", "librte-mempool-ring23"),
    "sid": ("dpdk-dev", "librte-dma-idxd26", "librte-mempool-ring26"),
}
# The one of them whose version keys the image.
DPDK_VERSION_PACKAGE = "dpdk-dev"
INFO_FILE = "root.json"
TREE = "tree"
DMATEST_DIR = Path("usr/src/vdsa-dmatest")
# sid's Release file can be older than its Valid-Until; signatures are still checked.
APT_CONF = 'Acquire::Check-Valid-Until "false";\n'
# Documentation and translations are never used in a guest root.
DPKG_EXCLUDES = ("path-exclude=/usr/share/doc/*\n"
                 "path-exclude=/usr/share/man/*\n"
                 "path-exclude=/usr/share/locale/*\n")


class DebianRootMissing(RuntimeError):
    """A release's root is not in the cache."""


@dataclass(frozen=True)
class DebianRoot:
    release: str
    path: Path  # the root directory (the chroot)
    kernel_version: str  # uname -r, e.g. 6.12.117+deb13-amd64
    kernel_package_version: str
    versions: Mapping[str, str]  # USERLAND_PACKAGES, the compiler, and dpdk-dev if it has it

    @property
    def has_dpdk(self) -> bool:
        return DPDK_VERSION_PACKAGE in self.versions

    @property
    def kernel(self) -> Path:
        return self.path / "boot" / f"vmlinuz-{self.kernel_version}"

    @property
    def modules(self) -> Path:
        return self.path / "lib" / "modules" / self.kernel_version

    @property
    def dmatest(self) -> Path:
        return self.path / DMATEST_DIR / "dmatest.ko"

    def inside(self, path: str | Path) -> Path:
        """The host path of ``path`` as the root sees it, with its symlinks followed
        inside the root (an absolute link points into the root, not into the host)."""
        return resolve_inside(self.path, Path(path))


def resolve_inside(root: Path, path: Path, *, depth: int = 0) -> Path:
    if depth > 40:
        raise BuildError(f"too many symlinks resolving {path} in {root}")
    current = root
    parts = [p for p in path.parts if p not in ("/", "")]
    for index, part in enumerate(parts):
        if part == "..":
            current = current.parent if current != root else root
            continue
        candidate = current / part
        if candidate.is_symlink():
            target = Path(os.readlink(candidate))
            rest = Path(*parts[index + 1:]) if index + 1 < len(parts) else Path()
            base = Path("/") if target.is_absolute() else current.relative_to(root)
            return resolve_inside(root, Path("/") / base / target / rest, depth=depth + 1)
        current = candidate
    return current


def check_release(release: str) -> None:
    if release not in RELEASES:
        raise BuildError(f"unknown Debian release {release!r}; vdsa builds guests of "
                         f"{', '.join(RELEASES)}")


def mirror() -> str:
    return os.environ.get(ENV_MIRROR) or DEFAULT_MIRROR


def sources(release: str) -> str:
    """The root's apt sources: the release, and for a stable one its updates and security
    suites."""
    lines = [f"deb {mirror()} {release} main"]
    if release != ROLLING:
        security = os.environ.get(ENV_SECURITY_MIRROR) or DEFAULT_SECURITY_MIRROR
        lines += [f"deb {mirror()} {release}-updates main",
                  f"deb {security} {release}-security main"]
    return "\n".join(lines) + "\n"


def release_packages(release: str) -> tuple[str, ...]:
    """What apt installs in the release's root."""
    return (*PACKAGES, *DPDK_PACKAGES.get(release, ()))


def root_artifact(release: str) -> Artifact:
    check_release(release)
    return artifact(f"debian-root-{release}", {
        "format": FORMAT_VERSION,
        "release": release,
        "mirror": mirror(),
        "sources": sources(release),
        "packages": " ".join(release_packages(release)),
    })


def _load(art: Artifact) -> DebianRoot:
    info = json.loads((art.path / INFO_FILE).read_text())
    return DebianRoot(
        release=str(info["release"]),
        path=art.path / TREE,
        kernel_version=str(info["kernel_version"]),
        kernel_package_version=str(info["kernel_package_version"]),
        versions={str(k): str(v) for k, v in info["versions"].items()},
    )


def find_root(release: str) -> DebianRoot:
    art = root_artifact(release)
    if not art.is_complete():
        raise DebianRootMissing(f"no {release} root at {art.path}; run "
                                f"`vdsa build guest --kernel {release}`")
    return _load(art)


@dataclass(frozen=True)
class _Build:
    release: str
    root: Path
    logs: Path

    async def step(self, name: str, argv: Sequence[str | Path],
                   env: Mapping[str, str] | None = None) -> None:
        await run_step(f"root-{self.release}-{name}", argv, log_file=self.logs / f"{name}.log",
                       env=env)

    async def chroot(self, name: str, *argv: str) -> None:
        # INITRD=No: the kernel's hooks (initramfs-tools, dracut) skip making an initrd,
        # which the guest image does not use.
        await self.step(name, in_root(self.root, *argv),
                        env={"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C", "INITRD": "No"})

    async def capture(self, *argv: str) -> str:
        done = await trio.run_process(in_root(self.root, *argv), capture_stdout=True,
                                      capture_stderr=True, check=False,
                                      env={**os.environ, "LC_ALL": "C"})
        if done.returncode != 0:
            raise BuildError(f"in the {self.release} root, {' '.join(argv)} failed: "
                             f"{done.stderr.decode(errors='replace').strip()}")
        return done.stdout.decode()

    async def version(self, package: str) -> str:
        return (await self.capture("dpkg-query", "-W", "-f", "${Version}", package)).strip()


@functools.cache
def private_mount_namespaces() -> bool:
    """Whether unshare can make a new mount namespace private here: not where / is no mount
    point (vdsa itself in a chroot or a container)."""
    done = subprocess.run(["unshare", "--mount", "--", "true"], capture_output=True, check=False)
    return done.returncode == 0


def in_root(root: Path, *argv: str, private: bool | None = None) -> list[str]:
    """``argv`` run in ``root`` with its own /proc (the kernel build's objtool and apt
    read it), mounted in a private mount namespace that ends with the command.

    Where the namespace cannot be private (``private_mount_namespaces``), the mount keeps
    the inherited propagation and is undone when the command ends."""
    if private if private is not None else private_mount_namespaces():
        return ["unshare", "--mount", "--", "sh", "-c",
                'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"', str(root), *argv]
    return ["unshare", "--mount", "--propagation", "unchanged", "--", "sh", "-c",
            'mount -t proc proc "$0/proc" || exit; chroot "$0" "$@"; status=$?; '
            'umount "$0/proc"; exit $status', str(root), *argv]


def _kernel_version(root: Path) -> str:
    """The one kernel the root has, with its image and its modules."""
    found = sorted(p.name for p in (root / "lib" / "modules").iterdir()
                   if (root / "boot" / f"vmlinuz-{p.name}").is_file())
    if len(found) != 1:
        raise BuildError(f"expected one kernel in {root}, found {found}")
    return found[0]


async def _install_packages(b: _Build) -> None:
    (b.root / "etc" / "apt" / "sources.list").write_text(sources(b.release))
    (b.root / "etc" / "apt" / "apt.conf.d" / "99vdsa").write_text(APT_CONF)
    (b.root / "etc" / "dpkg" / "dpkg.cfg.d" / "99vdsa").write_text(DPKG_EXCLUDES)
    await b.chroot("apt-update", "apt-get", "update")
    await b.chroot("apt-install", "apt-get", "install", "-y", "--no-install-recommends",
                   *release_packages(b.release))


async def _build_dmatest(b: _Build, kver: str, package_version: str) -> None:
    """dmatest.c from the kernel's own linux-source package, built against its headers."""
    series = ".".join(kver.split(".")[:2])
    source_package = f"linux-source-{series}"
    work = b.root / DMATEST_DIR
    work.mkdir(parents=True)
    # apt-get download writes into the current directory, inside the root.
    await b.chroot("source-download", "sh", "-c",
                   f'cd /{DMATEST_DIR} && apt-get download '
                   f'"{source_package}={package_version}"')
    debs = list(work.glob(f"{source_package}_*.deb"))
    if len(debs) != 1:
        raise BuildError(f"apt-get download of {source_package}={package_version} left {debs}")
    member = f"{source_package}/drivers/dma/dmatest.c"
    await b.step("dmatest-source", [
        "sh", "-c",
        f'dpkg-deb --fsys-tarfile "$1" | tar -xO ./usr/src/{source_package}.tar.xz '
        f'| tar -xJ -C "$2" --strip-components=3 --occurrence=1 {member}; '
        # tar stops reading at the member, so the pipe's writers see EPIPE.
        f'test -s "$2/dmatest.c"',
        "extract", str(debs[0]), str(work)])
    debs[0].unlink()
    (work / "Kbuild").write_text("obj-m := dmatest.o\n")
    await b.chroot("dmatest-build", "make", "-C", f"/usr/src/linux-headers-{kver}",
                   f"M=/{DMATEST_DIR}", f"-j{os.cpu_count() or 1}", "modules")
    built = (await b.capture("modinfo", "-F", "vermagic", f"/{DMATEST_DIR}/dmatest.ko")).strip()
    idxd = await b.capture("modinfo", "-k", kver, "-F", "vermagic", "idxd")
    if built != idxd.strip():
        raise BuildError(f"dmatest.ko has vermagic {built!r}, the kernel's idxd {idxd.strip()!r}")
    log.info("root.dmatest_built", release=b.release, vermagic=built)


async def _compiler(b: _Build, kver: str) -> dict[str, str]:
    """The compiler the kernel was built with, as the root has it (kbuild calls it)."""
    config = (b.root / "usr" / "src" / f"linux-headers-{kver}" / ".config").read_text()
    match = re.search(r'^CONFIG_CC_VERSION_TEXT="(\S+)', config, re.MULTILINE)
    if match is None:
        raise BuildError(f"linux-headers-{kver}/.config names no compiler")
    return {"compiler": (await b.capture(match[1], "--version")).splitlines()[0]}


async def _assemble(b: _Build, out: Path) -> None:
    await b.step("debootstrap", ["debootstrap", "--variant=minbase", b.release, b.root,
                                 mirror()])
    await _install_packages(b)
    kver = _kernel_version(b.root)
    package_version = await b.version(f"linux-image-{kver}")
    await _build_dmatest(b, kver, package_version)
    versions = {p: await b.version(p) for p in USERLAND_PACKAGES}
    if b.release in DPDK_PACKAGES:
        versions[DPDK_VERSION_PACKAGE] = await b.version(DPDK_VERSION_PACKAGE)
    versions.update(await _compiler(b, kver))
    await b.chroot("apt-clean", "apt-get", "clean")
    (out / INFO_FILE).write_text(json.dumps({
        "release": b.release,
        "kernel_version": kver,
        "kernel_package_version": package_version,
        "versions": versions,
    }, indent=2) + "\n")
    log.info("root.ready", release=b.release, kernel_version=kver,
             kernel_package_version=package_version, **versions)


async def build_root(release: str, *, force: bool = False) -> DebianRoot:
    """The release's root from the cache, or built now (or anew with ``force``)."""
    art = root_artifact(release)
    if art.is_complete() and not force:
        log.info("root.cached", release=release, path=str(art.path))
        return _load(art)
    started = time.monotonic()
    logs = art.root / "logs" / f"{art.name}-{art.key}"
    shutil.rmtree(logs, ignore_errors=True)
    log.info("root.build.start", release=release, mirror=mirror(), logs=str(logs))
    with art.building() as out:
        await _assemble(_Build(release=release, root=out / TREE, logs=logs), out)
    log.info("root.build.done", release=release, path=str(art.path),
             seconds=round(time.monotonic() - started, 1))
    return _load(art)
