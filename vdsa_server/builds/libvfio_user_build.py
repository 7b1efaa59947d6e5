"""libvfio-user as a shared library, from subprojects/libvfio-user of the same
QEMU source package (it is packaged nowhere else), with
qemu-configs/patches/libvfio-user/*.patch applied (their reasons are in each
patch's message).  The sample servers are kept too: gpio-pci-idio-16 proves the
vfio-user path before our own device exists.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vdsa_server.builds.cache import Artifact, artifact, tree_digest
from vdsa_server.builds.qemu_build import (
    BUILD_TOOLS,
    QEMU_SOURCE_VERSION,
    ensure_build_tools,
    ensure_qemu_source,
)
from vdsa_server.builds.steps import NINJA_PROGRESS, apply_patches, patch_files, run_step
from vdsa_server.log import get_logger
from vdsa_server.paths import LIBVFIO_USER_PATCHES, require_checkout

log = get_logger()

MESON_OPTIONS = ("--buildtype=release", "-Ddebug-logs=disabled")
# A second build for the protocol fuzzer: its findings in libvfio-user's own message parsing
# abort the server instead of passing unseen.
SANITIZED_OPTIONS = ("-Db_sanitize=address,undefined", "-Db_lundef=false")
SONAME = "libvfio-user.so.0"
SANITIZED_LIB_DIR = "lib-sanitized"
# gpio-pci-idio-16 for the boot test and the client harness; server for DMA tests.
SAMPLES = ("gpio-pci-idio-16", "server")


def patches() -> list[Path]:
    require_checkout()
    return patch_files(LIBVFIO_USER_PATCHES)


def libvfio_user_artifact() -> Artifact:
    return artifact(
        "libvfio-user",
        {
            "qemu-source": QEMU_SOURCE_VERSION,
            "patches": tree_digest(patches()),
            "meson-options": " ".join(MESON_OPTIONS),
            "sanitized-options": " ".join(SANITIZED_OPTIONS),
            "tools": " ".join(BUILD_TOOLS),
        },
    )


def cached_sample(name: str) -> Path:
    return libvfio_user_artifact().path / "bin" / name


def cached_sanitized_library() -> Path:
    """The ASan + UBSan build of the library (it needs the sanitizer runtimes preloaded)."""
    return libvfio_user_artifact().path / SANITIZED_LIB_DIR / SONAME


async def build_libvfio_user(*, force: bool = False) -> Path:
    """Build (or reuse) libvfio-user; returns the artifact directory
    (``lib/libvfio-user.so.0``, ``include/``, ``bin/<sample>``)."""
    target = libvfio_user_artifact()
    if target.is_complete() and not force:
        log.info("libvfio_user.build.cached", path=str(target.path))
        return target.path
    python = await ensure_build_tools()
    source = await ensure_qemu_source()
    with target.building() as scratch:
        logs = scratch / "build.log"
        tree = scratch / "src"
        build_dir = scratch / "build"
        # A private copy: the patches never touch the shared source tree.
        await run_step("libvfio-user.copy-source",
                       ["cp", "-a", source.tree / "subprojects/libvfio-user", tree], log_file=logs)
        await apply_patches("libvfio-user", patches(), tree, log_file=logs)
        await run_step("libvfio-user.meson",
                       [python, "-m", "mesonbuild.mesonmain", "setup", build_dir, tree,
                        *MESON_OPTIONS],
                       log_file=logs)
        await run_step("libvfio-user.ninja", ["ninja", "-C", build_dir], log_file=logs,
                       progress=NINJA_PROGRESS)
        _copy_library(build_dir, scratch / "lib")
        sanitized_dir = scratch / "build-sanitized"
        await run_step("libvfio-user.meson-sanitized",
                       [python, "-m", "mesonbuild.mesonmain", "setup", sanitized_dir, tree,
                        *MESON_OPTIONS, *SANITIZED_OPTIONS],
                       log_file=logs)
        await run_step("libvfio-user.ninja-sanitized", ["ninja", "-C", sanitized_dir],
                       log_file=logs, progress=NINJA_PROGRESS)
        _copy_library(sanitized_dir, scratch / SANITIZED_LIB_DIR)
        shutil.rmtree(sanitized_dir)
        shutil.copytree(tree / "include", scratch / "include")
        (scratch / "bin").mkdir()
        for sample in SAMPLES:
            shutil.copy2(build_dir / "samples" / sample, scratch / "bin" / sample)
        shutil.rmtree(build_dir)
        shutil.rmtree(tree)
    log.info("libvfio_user.build.done", path=str(target.path))
    return target.path


def _copy_library(build_dir: Path, lib: Path) -> None:
    lib.mkdir()
    for built in (build_dir / "lib").glob("libvfio-user.so*"):
        if built.is_file() or built.is_symlink():
            shutil.copy2(built, lib / built.name, follow_symlinks=False)
