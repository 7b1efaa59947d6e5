"""The ctypes binding to libvfio-user: loading, layouts against the header, and
a real context driven as far as it goes without a client."""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import shutil
import stat
import subprocess
from _ctypes import CFuncPtr
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from vdsa_server.builds.libvfio_user_build import libvfio_user_artifact
from vdsa_server.transport import libvfio_user as lvu
from vdsa_server.transport.libvfio_user import (
    CapHdr,
    CapId,
    Context,
    DmaInfo,
    DmaRegion,
    IrqType,
    LibraryMismatch,
    LibraryNotFound,
    LibVfioUser,
    Mpba,
    MsixCap,
    Mtab,
    Mxc,
    PciType,
    PxCap,
    PxCaps,
    RegionFlag,
    RegionIndex,
    ResetType,
    VfuError,
    VfuNotConnected,
    VfuWouldBlock,
    load_library,
)

ENV_INCLUDE = "VDSA_LIBVFIO_USER_INCLUDE"
DSA_VENDOR, DSA_DEVICE = 0x8086, 0x0B25
DSA_CLASS = (0x08, 0x80, 0x00)  # base system peripheral, other


@pytest.fixture(scope="module")
def lib() -> LibVfioUser:
    return load_library()


# -- loading ------------------------------------------------------------------


def test_load_from_env(lib: LibVfioUser, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(lvu.ENV_LIBRARY, str(lib.path))
    assert load_library().path == lib.path
    assert lib.sg_size > 0


def test_missing_file_names_path_env_and_build_command(tmp_path: Path) -> None:
    missing = tmp_path / "libvfio-user.so.0"
    with pytest.raises(LibraryNotFound) as info:
        load_library(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "VDSA_LIBVFIO_USER" in message
    assert "vdsa build libvfio-user" in message


def test_missing_file_from_env_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere.so"
    monkeypatch.setenv(lvu.ENV_LIBRARY, str(missing))
    with pytest.raises(LibraryNotFound, match=r"\$VDSA_LIBVFIO_USER"):
        load_library()


def _mapped_libc() -> Path:
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith("/libc.so.6"):
            return Path(line.split()[-1])
    pytest.skip("libc.so.6 is not mapped into this process")


def test_other_library_reports_missing_symbols() -> None:
    with pytest.raises(LibraryMismatch) as info:
        load_library(_mapped_libc())
    assert "vfu_create_ctx" in str(info.value)
    assert "vfu_sgl_read" in str(info.value)


def test_non_library_file_is_a_mismatch(tmp_path: Path) -> None:
    bogus = tmp_path / "libvfio-user.so.0"
    bogus.write_text("not an ELF file\n")
    with pytest.raises(LibraryMismatch, match="cannot be loaded"):
        load_library(bogus)


# -- layouts and constants against the header ------------------------------------

STRUCTS: dict[type[ctypes.Structure], str] = {
    lvu.Iovec: "struct iovec",
    DmaInfo: "vfu_dma_info_t",
    CapHdr: "struct cap_hdr",
    MsixCap: "struct msixcap",
    PxCap: "struct pxcap",
}

# C names of every enum member (by pattern) and of the private constants.
ENUM_PATTERNS: dict[type[enum.Enum], str] = {
    PciType: "VFU_PCI_TYPE_{}",
    RegionIndex: "VFU_PCI_DEV_{}_REGION_IDX",
    RegionFlag: "VFU_REGION_FLAG_{}",
    IrqType: "VFU_DEV_{}_IRQ",
    ResetType: "VFU_RESET_{}",
    lvu.CapFlag: "VFU_CAP_FLAG_{}",
    CapId: "PCI_CAP_ID_{}",
    lvu.ExtCapId: "PCI_EXT_CAP_ID_{}",
}
# libvfio-user abbreviates two of VFIO's region names.
C_MEMBER_NAMES: dict[tuple[type[enum.Enum], str], str] = {
    (RegionIndex, "CONFIG"): "CFG", (RegionIndex, "MIGRATION"): "MIGR"}
CONSTANTS: dict[str, int] = {
    "VFU_TRANS_SOCK": lvu._VFU_TRANS_SOCK,
    "VFU_DEV_TYPE_PCI": lvu._VFU_DEV_TYPE_PCI,
    "LIBVFIO_USER_FLAG_ATTACH_NB": lvu._LIBVFIO_USER_FLAG_ATTACH_NB,
    "PCI_HEADER_TYPE_NORMAL": lvu._PCI_HEADER_TYPE_NORMAL,
    "PCI_CFG_SPACE_SIZE": lvu.PCI_CFG_SPACE_SIZE,
    "PCI_CFG_SPACE_EXP_SIZE": lvu.PCI_CFG_SPACE_EXP_SIZE,
}


def _leaves(cls: type[ctypes.Structure], prefix: str = "") -> Iterator[tuple[str, int, int | None]]:
    """(member path, offset, bit width or None) for every scalar member."""
    for field in cls._fields_:
        name, ctype = field[0], field[1]
        offset = getattr(cls, name).offset
        if isinstance(ctype, type) and issubclass(ctype, ctypes.Structure):
            for path, inner, bits in _leaves(ctype, f"{prefix}{name}."):
                yield path, offset + inner, bits
        else:
            yield f"{prefix}{name}", offset, field[2] if len(field) == 3 else None


def _enum_constants() -> dict[str, int]:
    values = dict(CONSTANTS)
    for cls, pattern in ENUM_PATTERNS.items():
        # __members__, unlike iteration, includes multi-bit flags such as RW.
        for name, member in cls.__members__.items():
            values[pattern.format(C_MEMBER_NAMES.get((cls, name), name))] = int(member.value)
    return values


def _c_probe_source() -> str:
    lines = [
        "#include <stdbool.h>",
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <string.h>",
        '#include "libvfio-user.h"',
        "static void dump(const char *key, const void *p, size_t n) {",
        '    printf("%s ", key);',
        '    for (size_t i = 0; i < n; i++) printf("%02x", ((const unsigned char *)p)[i]);',
        '    printf("\\n");',
        "}",
        "int main(void) {",
        "    unsigned long long ones = ~0ULL;",
    ]
    for cls, c_type in STRUCTS.items():
        name = cls.__name__
        lines.append(f'    printf("size.{name} %zu\\n", sizeof({c_type}));')
        for path, _offset, bits in _leaves(cls):
            key = f"{name}.{path}"
            if bits is None:
                lines.append(f'    printf("offset.{key} %zu\\n", offsetof({c_type}, {path}));')
                lines.append(f'    printf("width.{key} %zu\\n", sizeof((({c_type} *)0)->{path}));')
            else:
                # Bit-fields have no offsetof: set one to all ones and compare bytes.
                lines.append(
                    f"    {{ {c_type} v; memset(&v, 0, sizeof v); v.{path} = ones;"
                    f' dump("bits.{key}", &v, sizeof v); }}'
                )
    for c_name in _enum_constants():
        lines.append(f'    printf("const.{c_name} %lld\\n", (long long)({c_name}));')
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


def _python_layout() -> dict[str, str]:
    layout: dict[str, str] = {}
    for cls in STRUCTS:
        name = cls.__name__
        layout[f"size.{name}"] = str(ctypes.sizeof(cls))
        for path, offset, bits in _leaves(cls):
            key = f"{name}.{path}"
            if bits is None:
                *parents, leaf = path.split(".")
                owner = cls
                for part in parents:
                    owner = _field_type(owner, part)
                layout[f"offset.{key}"] = str(offset)
                layout[f"width.{key}"] = str(getattr(owner, leaf).size)
            else:
                value = cls()
                target: ctypes.Structure = value
                *parents, leaf = path.split(".")
                for part in parents:
                    target = getattr(target, part)
                setattr(target, leaf, (1 << bits) - 1)
                layout[f"bits.{key}"] = bytes(value).hex()
    for c_name, number in _enum_constants().items():
        layout[f"const.{c_name}"] = str(number)
    return layout


def _field_type(cls: type[ctypes.Structure], name: str) -> type[ctypes.Structure]:
    for field in cls._fields_:
        ctype = field[1]
        if field[0] == name and issubclass(ctype, ctypes.Structure):
            return ctype
    raise KeyError(name)


@pytest.fixture(scope="module")
def header_dir(lib: LibVfioUser) -> Path:
    """``$VDSA_LIBVFIO_USER_INCLUDE``, else ``include/`` beside the library's
    ``lib/`` (the build artifact's layout), else the build artifact's."""
    explicit = os.environ.get(ENV_INCLUDE)
    candidates = (
        [Path(explicit)]
        if explicit
        else [lib.path.parent.parent / "include", libvfio_user_artifact().path / "include"]
    )
    for candidate in candidates:
        if (candidate / "libvfio-user.h").is_file():
            return candidate
    pytest.fail(
        f"libvfio-user.h not found in {', '.join(map(str, candidates))}; "
        f"set {ENV_INCLUDE} to the directory holding it"
    )


def test_layouts_and_constants_match_the_header(header_dir: Path, tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: cannot compile the layout probe against the header")
    source = tmp_path / "probe.c"
    source.write_text(_c_probe_source())
    binary = tmp_path / "probe"
    compiled = subprocess.run(
        [gcc, "-std=gnu11", "-I", str(header_dir), "-o", str(binary), str(source)],
        capture_output=True,
        text=True,
    )
    assert compiled.returncode == 0, compiled.stderr
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    from_c = dict(line.split(" ", 1) for line in output.splitlines())
    from_python = _python_layout()
    assert from_python.keys() == from_c.keys()
    mismatches = {k: (from_python[k], from_c[k]) for k in from_c if from_python[k] != from_c[k]}
    assert mismatches == {}


# -- a real context -----------------------------------------------------------------


class Recorder:
    """Device-side callbacks that record what they were called with."""

    def __init__(self) -> None:
        self.accesses: list[tuple[int, int, bool]] = []
        self.dma: list[tuple[str, DmaRegion]] = []
        self.resets: list[ResetType] = []
        self.quiesce_now = True

    def bar(self, offset: int, buf: memoryview, is_write: bool) -> None:
        self.accesses.append((offset, len(buf), is_write))
        if not is_write:
            buf[:] = bytes(range(len(buf)))

    def register(self, region: DmaRegion) -> None:
        self.dma.append(("register", region))

    def unregister(self, region: DmaRegion) -> None:
        self.dma.append(("unregister", region))

    def reset(self, reset_type: ResetType) -> None:
        self.resets.append(reset_type)

    def quiesce(self) -> bool:
        return self.quiesce_now


MSIX_VECTORS = 9


def build_device(ctx: Context, device: Recorder) -> tuple[int, int]:
    """The set-up sequence of a DSA-like function; returns (PCIe, MSI-X) offsets."""
    ctx.pci_init(PciType.EXPRESS)
    ctx.pci_set_id(DSA_VENDOR, DSA_DEVICE)
    ctx.pci_set_class(*DSA_CLASS)
    px = ctx.add_capability(PxCap(hdr=CapHdr(id=CapId.EXP), pxcaps=PxCaps(ver=2)))
    msix = ctx.add_capability(
        MsixCap(
            hdr=CapHdr(id=CapId.MSIX),
            mxc=Mxc(ts=MSIX_VECTORS - 1),
            mtab=Mtab(tbir=0, to=0x2000 >> 3),
            mpba=Mpba(pbir=0, pbao=0x3000 >> 3),
        )
    )
    mem_rw = RegionFlag.RW | RegionFlag.MEM
    ctx.setup_region(RegionIndex.BAR0, 0x10000, mem_rw, device.bar)
    ctx.setup_region(RegionIndex.BAR2, 0x20000, mem_rw, device.bar)
    ctx.set_irq_count(IrqType.MSIX, MSIX_VECTORS)
    ctx.set_irq_state_callback(IrqType.MSIX, lambda start, count, masked: None)
    ctx.setup_dma(device.register, device.unregister)
    ctx.set_reset_callback(device.reset)
    ctx.set_quiesce_callback(device.quiesce)
    ctx.realize()
    return px, msix


def test_context_set_up_realize_and_close(lib: LibVfioUser, tmp_path: Path) -> None:
    socket_path = tmp_path / "vdsa.sock"
    device = Recorder()
    with Context(lib, socket_path) as ctx:
        assert stat.S_ISSOCK(socket_path.stat().st_mode)
        build_device(ctx, device)

        with pytest.raises(VfuWouldBlock) as info:
            ctx.attach()
        assert info.value.errno == errno.EAGAIN
        assert isinstance(info.value, BlockingIOError)

        listen_fd = ctx.get_poll_fd()
        assert stat.S_ISSOCK(os.fstat(listen_fd).st_mode)
        with pytest.raises(VfuNotConnected):
            ctx.run()
    assert ctx.closed
    assert not socket_path.exists()
    assert ctx._callbacks == {}
    with pytest.raises(OSError, match=os.strerror(errno.EBADF)):
        os.fstat(listen_fd)  # the listening socket is closed
    with pytest.raises(ValueError, match="closed"):
        ctx.get_poll_fd()
    ctx.close()  # idempotent


def test_config_space_view_reads_and_writes_library_memory(
    lib: LibVfioUser, tmp_path: Path
) -> None:
    with Context(lib, tmp_path / "vdsa.sock") as ctx:
        px, msix = build_device(ctx, Recorder())
        cfg = ctx.config_space
        assert len(cfg) == lvu.PCI_CFG_SPACE_EXP_SIZE
        assert int.from_bytes(cfg[0x00:0x02], "little") == DSA_VENDOR
        assert int.from_bytes(cfg[0x02:0x04], "little") == DSA_DEVICE
        assert bytes(cfg[0x09:0x0C]) == bytes(reversed(DSA_CLASS))
        assert cfg[0x06] & 0x10  # status: capabilities list
        assert cfg[0x34] == px  # first capability
        assert (cfg[px], cfg[px + 1]) == (CapId.EXP, msix)
        assert cfg[0x10] & 0x1 == 0  # BAR0 is memory, not I/O
        assert ctx.find_capability(CapId.EXP) == px
        assert ctx.find_capability(CapId.MSIX) == msix
        assert ctx.find_capability(CapId.PM) is None

        cfg[msix] = CapId.VNDR  # the library reads what the view writes
        assert ctx.find_capability(CapId.MSIX) is None
        cfg[msix] = CapId.MSIX
        assert ctx.find_capability(CapId.MSIX) == msix


def test_pci_calls_before_pci_init_are_refused(lib: LibVfioUser, tmp_path: Path) -> None:
    with Context(lib, tmp_path / "vdsa.sock") as ctx:
        with pytest.raises(RuntimeError, match="pci_init"):
            ctx.pci_set_id(DSA_VENDOR, DSA_DEVICE)
        with pytest.raises(RuntimeError, match="pci_init"):
            _ = ctx.config_space


def test_errno_becomes_exceptions(lib: LibVfioUser, tmp_path: Path) -> None:
    with Context(lib, tmp_path / "vdsa.sock") as ctx:
        build_device(ctx, Recorder())
        with pytest.raises(VfuError) as no_dma:
            ctx.addr_to_sgl(0x1000, 64)
        assert no_dma.value.errno == errno.ENOENT
        with pytest.raises(VfuError) as no_eventfd:
            ctx.irq_trigger(0)
        assert no_eventfd.value.errno == errno.ENOENT
        with pytest.raises(VfuError) as not_pending:
            ctx.device_quiesced(0)
        assert not_pending.value.errno == errno.EINVAL
        with pytest.raises(VfuError) as bad_flags:
            ctx.setup_region(RegionIndex.BAR4, 0x1000, RegionFlag.MEM)
        assert bad_flags.value.errno == errno.EINVAL
        assert lib.cdll.vfu_get_private(ctx._ctx) is None


def test_existing_socket_path_is_refused_and_kept(lib: LibVfioUser, tmp_path: Path) -> None:
    taken = tmp_path / "taken.sock"
    taken.write_text("")
    with pytest.raises(VfuError) as info:
        Context(lib, taken)
    assert info.value.errno == errno.EADDRINUSE
    assert taken.exists()


def test_library_log_lines_reach_structlog(lib: LibVfioUser, tmp_path: Path) -> None:
    with (
        capture_logs() as logs,
        Context(lib, tmp_path / "vdsa.sock") as ctx,
        pytest.raises(VfuError),
    ):
        ctx.setup_region(RegionIndex.BAR4, 0x1000, RegionFlag.MEM)  # no READ/WRITE flag
    lines = [entry for entry in logs if entry["event"] == "vfu.log"]
    assert any("invalid region flags" in entry["msg"] for entry in lines)
    assert all(entry["log_level"] == "error" for entry in lines if "invalid" in entry["msg"])


# -- callbacks called the way C calls them ----------------------------------------------


def _call_c(fn: CFuncPtr, *args: object) -> tuple[int, int]:
    ctypes.set_errno(0)
    result = int(fn(*args))
    return result, ctypes.get_errno()


def test_region_callback_fills_the_c_buffer(lib: LibVfioUser, tmp_path: Path) -> None:
    device = Recorder()
    with Context(lib, tmp_path / "vdsa.sock") as ctx:
        build_device(ctx, device)
        buf = ctypes.create_string_buffer(8)
        result, _ = _call_c(
            ctx._callbacks["region.BAR0"], None, ctypes.addressof(buf), 8, 0x40, False
        )
        assert result == 8
        assert buf.raw == bytes(range(8))
        assert device.accesses == [(0x40, 8, False)]


def test_callback_exceptions_become_minus_one_and_errno(lib: LibVfioUser, tmp_path: Path) -> None:
    def broken(offset: int, buf: memoryview, is_write: bool) -> None:
        raise RuntimeError("device model bug")

    def refused(offset: int, buf: memoryview, is_write: bool) -> None:
        raise OSError(errno.EINVAL, "offset not implemented")

    with capture_logs() as logs, Context(lib, tmp_path / "vdsa.sock") as ctx:
        build_device(ctx, Recorder())
        ctx.setup_region(RegionIndex.BAR0, 0x10000, RegionFlag.RW | RegionFlag.MEM, broken)
        ctx.setup_region(RegionIndex.BAR2, 0x20000, RegionFlag.RW | RegionFlag.MEM, refused)
        buf = ctypes.create_string_buffer(4)
        address = ctypes.addressof(buf)

        bar0 = ctx._callbacks["region.BAR0"]
        assert _call_c(bar0, None, address, 4, 0, True) == (-1, errno.EIO)
        bar2 = ctx._callbacks["region.BAR2"]
        assert _call_c(bar2, None, address, 4, 0, True) == (-1, errno.EINVAL)
        # An unknown reset type raises inside the binding: still -1, never an unwind.
        assert _call_c(ctx._callbacks["reset"], None, 99) == (-1, errno.EIO)
    failures = [entry for entry in logs if entry["event"] == "vfu.callback.exception"]
    assert [entry["callback"] for entry in failures] == ["region.BAR0", "region.BAR2", "reset"]


def test_quiesce_later_answers_ebusy(lib: LibVfioUser, tmp_path: Path) -> None:
    device = Recorder()
    with Context(lib, tmp_path / "vdsa.sock") as ctx:
        build_device(ctx, device)
        quiesce = ctx._callbacks["quiesce"]
        assert _call_c(quiesce, None) == (0, 0)
        device.quiesce_now = False
        assert _call_c(quiesce, None) == (-1, errno.EBUSY)


def test_dma_and_reset_callbacks_get_python_values(lib: LibVfioUser, tmp_path: Path) -> None:
    device = Recorder()
    with Context(lib, tmp_path / "vdsa.sock") as ctx:
        build_device(ctx, device)
        info = DmaInfo()
        info.iova = lvu.Iovec(0x100000, 0x200000)
        info.page_size = 4096
        info.prot = 3
        ctx._callbacks["dma_register"](None, ctypes.pointer(info))
        assert _call_c(ctx._callbacks["reset"], None, ResetType.PCI_FLR) == (0, 0)
    region = DmaRegion(
        iova=0x100000,
        length=0x200000,
        vaddr=None,
        mapping_base=None,
        mapping_length=0,
        page_size=4096,
        prot=3,
    )
    assert device.dma == [("register", region)]
    # close() resets the context: the device hears of the lost connection.
    assert device.resets == [ResetType.PCI_FLR, ResetType.LOST_CONN]


def test_base_exception_in_callback_is_reraised_after_c_returns(
    lib: LibVfioUser, tmp_path: Path
) -> None:
    def interrupted(offset: int, buf: memoryview, is_write: bool) -> None:
        raise KeyboardInterrupt

    with capture_logs(), Context(lib, tmp_path / "vdsa.sock") as ctx:
        build_device(ctx, Recorder())
        ctx.setup_region(RegionIndex.BAR0, 0x10000, RegionFlag.RW | RegionFlag.MEM, interrupted)
        buf = ctypes.create_string_buffer(4)
        bar0 = ctx._callbacks["region.BAR0"]
        assert _call_c(bar0, None, ctypes.addressof(buf), 4, 0, False) == (-1, errno.ECANCELED)
        with pytest.raises(KeyboardInterrupt):
            ctx.get_poll_fd()
        ctx.get_poll_fd()  # raised once only
