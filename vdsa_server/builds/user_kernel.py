"""A guest image around the user's own kernel: a bzImage and, optionally, the
modules tree that ``make modules_install INSTALL_MOD_PATH=DIR`` leaves in DIR.

The userland (busybox, accel-config) comes from a Debian release's root. The
kernel's release string is read from the bzImage's setup header; the modules
must be those of that kernel (directory name and vermagic), and idxd must be
among them or built in. dmatest comes from the user's build when it has
CONFIG_DMATEST; otherwise the image records it as absent.

The image is cached like the others, keyed by the bzImage's content and the
modules tree's names, sizes and modification times (a full tree is hundreds
of MB; a rebuilt module changes its size or time).
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from pathlib import Path

import trio

from vdsa_server.builds.cache import artifact, file_digest
from vdsa_server.builds.debian_root import build_root
from vdsa_server.builds.guest_image import (
    DEFAULT_RELEASE,
    FORMAT_VERSION,
    GuestImage,
    KernelFiles,
    assemble_image,
    capture,
    decompress_module,
    load_image,
    module_index,
    source_inputs,
)
from vdsa_server.builds.steps import BuildError
from vdsa_server.log import get_logger

log = get_logger()

# The x86 boot protocol's setup header (Documentation/arch/x86/boot.rst).
BOOT_FLAG_OFFSET = 0x1FE
HEADER_MAGIC_OFFSET = 0x202
KERNEL_VERSION_POINTER = 0x20E
SETUP_HEADER_BASE = 0x200
# What modules.builtin lists for an idxd that is built in.
BUILTIN_IDXD = "kernel/drivers/dma/idxd/idxd.ko"


def kernel_release(image: Path) -> str:
    """The release string (``uname -r``) of a bzImage."""
    try:
        head = image.read_bytes()[:64 * 1024]
    except OSError as exc:
        raise BuildError(f"cannot read the kernel image {image}: {exc.strerror}") from exc
    if (len(head) < 0x210 or head[BOOT_FLAG_OFFSET:BOOT_FLAG_OFFSET + 2] != b"\x55\xaa"
            or head[HEADER_MAGIC_OFFSET:HEADER_MAGIC_OFFSET + 4] != b"HdrS"):
        raise BuildError(f"{image} is not an x86 Linux kernel image (bzImage): no boot "
                         "protocol header")
    (pointer,) = struct.unpack_from("<H", head, KERNEL_VERSION_POINTER)
    start = pointer + SETUP_HEADER_BASE
    end = head.find(b"\0", start)
    if pointer == 0 or end < 0:
        raise BuildError(f"{image} has no kernel version string in its setup header")
    words = head[start:end].decode(errors="replace").split()
    if not words:
        raise BuildError(f"{image} has an empty kernel version string")
    return words[0]


def _modules_tree(modules: Path, version: str) -> Path:
    tree = modules / "lib" / "modules" / version
    if tree.is_dir():
        return tree
    found = sorted(p.name for p in (modules / "lib" / "modules").glob("*") if p.is_dir())
    if found:
        raise BuildError(f"the modules in {modules} are for kernel {', '.join(found)}, not "
                         f"{version} (the kernel image's release)")
    raise BuildError(f"{modules} holds no lib/modules/<release> tree (give the directory "
                     "`make modules_install INSTALL_MOD_PATH=DIR` was run with)")


async def _vermagic(module: Path, work: Path) -> str:
    # A name of its own: builds of several user kernels may share the work directory.
    plain = work / f"vermagic-check.{uuid.uuid4().hex}.ko"
    decompress_module(module, plain)
    try:
        return (await capture(["modinfo", "-F", "vermagic", plain])).strip()
    finally:
        plain.unlink()


def _tree_stamp(tree: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in tree.rglob("*") if p.is_file()):
        stat = path.stat()
        h.update(f"{path.relative_to(tree)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return h.hexdigest()


async def kernel_files(image: Path, modules: Path | None, work: Path) -> KernelFiles:
    """The user's kernel, checked: its release, its modules tree, idxd and dmatest."""
    version = kernel_release(image)
    if modules is None:
        log.warning("user_kernel.no_modules", image=str(image), version=version,
                    meaning="idxd must be built in; dmatest is absent")
        return KernelFiles(image=image, version=version, modules=None, dmatest=None)
    tree = _modules_tree(modules, version)
    index = module_index(tree)
    builtin = tree / "modules.builtin"
    idxd_builtin = builtin.is_file() and BUILTIN_IDXD in builtin.read_text().split()
    if "idxd" not in index and not idxd_builtin:
        raise BuildError(f"kernel {version} has no idxd driver: neither a module in {tree} nor "
                         "built in (CONFIG_INTEL_IDXD)")
    for name in ("idxd", "dmatest"):
        if name in index:
            magic = await _vermagic(index[name], work)
            if magic.split()[:1] != [version]:
                raise BuildError(f"{index[name]} was built for {magic.split()[:1]} (vermagic "
                                 f"{magic!r}), not for the kernel image's {version}")
    dmatest = index.get("dmatest")
    if dmatest is None:
        log.warning("user_kernel.no_dmatest", version=version,
                    meaning="dmatest is absent from this kernel's modules (CONFIG_DMATEST)")
    return KernelFiles(image=image, version=version, modules=tree, dmatest=dmatest)


async def build_user_guest(image: Path, modules: Path | None, *,
                           userland: str = DEFAULT_RELEASE) -> GuestImage:
    """The image of the user's kernel, from the cache or built now."""
    root = await build_root(userland)
    work = root.path / "tmp"
    image = Path(await trio.Path(image).resolve())
    modules = Path(await trio.Path(modules).resolve()) if modules else None
    kernel = await kernel_files(image, modules, work)
    inputs = {
        "format": FORMAT_VERSION,
        "image": file_digest(kernel.image),
        "version": kernel.version,
        "modules": _tree_stamp(kernel.modules) if kernel.modules else "none",
        "userland": userland,
        **root.versions,
        **source_inputs(),
    }
    art = artifact("guest-user", inputs)
    if art.is_complete():
        log.info("guest.build.cached", path=str(art.path))
        return load_image(art.path)
    return await assemble_image(art, kernel, root, None)
