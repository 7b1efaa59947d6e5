"""QEMU from Debian's source package, patched so that TCG executes MOVDIR64B.

Bookworm ships QEMU 7.2, which has no vfio-user client; Debian's own newer
binaries need trixie's libc.  So the ``qemu`` source package from sid is
downloaded (deb-src only, see .ci/setup), unpacked with Debian's patches
(one of them is needed to configure at all), patched with
qemu-configs/patches/*.patch and built for x86_64-softmmu only.
The same unpacked tree provides libvfio-user (subprojects/libvfio-user).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from vdsa_server.builds.cache import Artifact, artifact, cache_root, tree_digest
from vdsa_server.builds.steps import NINJA_PROGRESS, apply_patches, patch_files, run_step
from vdsa_server.log import get_logger
from vdsa_server.paths import QEMU_PATCHES, require_checkout

log = get_logger()

# The patch in qemu-configs/patches is written against this exact version.
QEMU_SOURCE_VERSION = "1:10.2.2+ds-1"

# Build-time Python tools that the +ds tarball does not bundle.
BUILD_TOOLS = ("meson==1.12.1", "pycotap==1.3.1")

CONFIGURE_FLAGS = (
    "--target-list=x86_64-softmmu",
    "--without-default-features",
    "--disable-docs",
    "--disable-tools",
    "--enable-slirp",
    "--enable-kvm",
    "--enable-tcg",
    "--disable-download",
    "--disable-install-blobs",
)

QEMU_BINARY = "qemu-system-x86_64"


@dataclass(frozen=True)
class QemuSource:
    tree: Path
    version: str


def build_tools_artifact() -> Artifact:
    return artifact("build-tools", {"requirements": " ".join(BUILD_TOOLS)})


def qemu_source_artifact() -> Artifact:
    return artifact("qemu-source", {"version": QEMU_SOURCE_VERSION})


def patches() -> list[Path]:
    require_checkout()
    return patch_files(QEMU_PATCHES)


def qemu_artifact() -> Artifact:
    return artifact(
        "qemu",
        {
            "version": QEMU_SOURCE_VERSION,
            "patches": tree_digest(patches()),
            "configure": " ".join(CONFIGURE_FLAGS),
            "tools": " ".join(BUILD_TOOLS),
        },
    )


def cached_qemu_binary() -> Path:
    return qemu_artifact().path / "bin" / QEMU_BINARY


async def ensure_build_tools() -> Path:
    """A virtualenv holding meson and pycotap; returns its python.

    The venv is built in a scratch directory and renamed, which breaks its
    scripts' shebangs, so callers run tools as ``python -m`` modules.
    """
    tools = build_tools_artifact()
    if not tools.is_complete():
        with tools.building() as scratch:
            logs = scratch / "build.log"
            await run_step("build-tools.venv", ["python3", "-m", "venv", scratch / "venv"],
                           log_file=logs)
            await run_step("build-tools.pip",
                           [scratch / "venv/bin/pip", "install", "-q", *BUILD_TOOLS],
                           log_file=logs)
    return tools.path / "venv" / "bin" / "python"


async def ensure_qemu_source() -> QemuSource:
    """The unpacked source package, Debian's patches applied, shared read-only."""
    source = qemu_source_artifact()
    if not source.is_complete():
        downloads = cache_root() / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        dsc = downloads / f"qemu_{QEMU_SOURCE_VERSION.split(':', 1)[-1]}.dsc"
        logs = cache_root() / "logs" / "qemu-source.log"
        if not dsc.is_file():
            await run_step("qemu-source.download",
                           ["apt-get", "source", "--download-only", f"qemu={QEMU_SOURCE_VERSION}"],
                           cwd=downloads, log_file=logs)
        with source.building() as scratch:
            await run_step("qemu-source.unpack", ["dpkg-source", "-x", dsc, scratch / "src"],
                           log_file=logs)
    log.info("qemu.source.ready", version=QEMU_SOURCE_VERSION)
    return QemuSource(tree=source.path / "src", version=QEMU_SOURCE_VERSION)


async def build_qemu(*, force: bool = False) -> Path:
    """Build (or reuse) the patched QEMU; returns the qemu-system-x86_64 path."""
    target = qemu_artifact()
    if target.is_complete() and not force:
        log.info("qemu.build.cached", path=str(target.path))
        return cached_qemu_binary()
    python = await ensure_build_tools()
    source = await ensure_qemu_source()
    with target.building() as scratch:
        logs = scratch / "build.log"
        tree = scratch / "src"
        # A private copy: patches and build products never touch the shared tree.
        await run_step("qemu.copy-source", ["cp", "-a", source.tree, tree], log_file=logs)
        await apply_patches("qemu", patches(), tree, log_file=logs)
        build_dir = tree / "build"
        build_dir.mkdir()
        await run_step("qemu.configure", ["../configure", f"--python={python}", *CONFIGURE_FLAGS],
                       cwd=build_dir, log_file=logs)
        await run_step("qemu.ninja", ["ninja", QEMU_BINARY], cwd=build_dir, log_file=logs,
                       progress=NINJA_PROGRESS)
        (scratch / "bin").mkdir()
        shutil.copy2(build_dir / QEMU_BINARY, scratch / "bin" / QEMU_BINARY)
        # Only the binary is kept: the tree is several hundred MB.
        shutil.rmtree(tree)
    log.info("qemu.build.done", path=str(target.path))
    return cached_qemu_binary()
