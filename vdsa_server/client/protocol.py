"""The vfio-user wire protocol as the client harness speaks it: pure encoding and decoding, no I/O.

Sources: QEMU ``docs/interop/vfio-user.rst`` (the specification), libvfio-user
``include/vfio-user.h`` and Linux ``include/uapi/linux/vfio.h`` (the struct layouts).

Naming follows those headers: each struct is a ctypes layout named after its C tag in CamelCase
(``struct vfio_user_dma_map`` -> ``VfioUserDmaMap``) with the C field names, and the test suite
checks every layout against the C headers.  Enum members drop the prefix their C names share
(``VFIO_IRQ_SET_DATA_EVENTFD`` -> ``IrqSetFlag.DATA_EVENTFD``).

All fields are in host byte order (the specification).  Decoders raise :class:`ProtocolError`
naming the message and what is wrong with it; encoders take values as they are, so that callers
can build malformed messages on purpose, and only refuse values that do not fit their field.

Where libvfio-user and the specification disagree, this module follows libvfio-user, which
vdsa's server is built on: a ``DMA_WRITE`` reply carries ``struct vfio_user_dma_region_access``
(a 64-bit count, 16 bytes), where the specification's table shows a 32-bit count.
"""

from __future__ import annotations

import ctypes
import enum
import json
import struct
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import TypeVar

_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64

HEADER_SIZE = 16
MAX_MSG_ID = 0xFFFF

# Capability defaults that apply when a peer's VERSION message leaves the capability out.
DEFAULT_MAX_MSG_FDS = 1
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
DEFAULT_MAX_DMA_MAPS = 0xFFFF
DEFAULT_PGSIZES = 4096


class ProtocolError(ValueError):
    """A message, or a value for one, breaks the vfio-user protocol."""


# --- Commands and flags -----------------------------------------------------------------------


class Command(enum.IntEnum):
    """``enum vfio_user_command`` (``VFIO_USER_*``), with the specification's later commands."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


def command_name(command: int) -> str:
    """``DEVICE_GET_INFO`` for a known command, ``command 99`` for any other number."""
    try:
        return Command(command).name
    except ValueError:
        return f"command {command}"


class MessageType(enum.IntEnum):
    """The header's type bits (``VFIO_USER_F_TYPE_*``)."""

    COMMAND = 0
    REPLY = 1


TYPE_MASK = 0xF
MESSAGE_TYPES = frozenset(MessageType)


class HeaderFlag(enum.IntFlag):
    """Header flag bits above the type bits."""

    NO_REPLY = 1 << 4
    ERROR = 1 << 5


# int() first: ~ on an IntFlag would only invert the flag's own bits.
RESERVED_FLAGS = 0xFFFFFFFF & ~int(TYPE_MASK | HeaderFlag.NO_REPLY | HeaderFlag.ERROR)


class DeviceFlag(enum.IntFlag):
    """``VFIO_DEVICE_FLAGS_*``."""

    RESET = 1 << 0
    PCI = 1 << 1


class RegionInfoFlag(enum.IntFlag):
    """``VFIO_REGION_INFO_FLAG_*``."""

    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class RegionCapId(enum.IntEnum):
    """``VFIO_REGION_INFO_CAP_*``."""

    SPARSE_MMAP = 1
    TYPE = 2


class IrqInfoFlag(enum.IntFlag):
    """``VFIO_IRQ_INFO_*``."""

    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlag(enum.IntFlag):
    """``VFIO_IRQ_SET_*``: one DATA_ and one ACTION_ bit per message."""

    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


class DmaMapFlag(enum.IntFlag):
    """``VFIO_USER_F_DMA_REGION_*``: what the server may do with the mapped memory."""

    READ = 1 << 0
    WRITE = 1 << 1


class DmaUnmapFlag(enum.IntFlag):
    """``VFIO_DMA_UNMAP_FLAG_*``."""

    GET_DIRTY_BITMAP = 1 << 0
    ALL = 1 << 1


# --- Layouts ----------------------------------------------------------------------------------


class VfioUserHeader(ctypes.Structure):
    """``struct vfio_user_header``; ``flags`` is the C bitfield struct read as one word."""

    _pack_ = 1
    _fields_ = [
        ("msg_id", _u16),
        ("cmd", _u16),
        ("msg_size", _u32),
        ("flags", _u32),
        ("error_no", _u32),
    ]
    msg_id: int
    cmd: int
    msg_size: int
    flags: int
    error_no: int


assert ctypes.sizeof(VfioUserHeader) == HEADER_SIZE


class VfioUserVersion(ctypes.Structure):
    """``struct vfio_user_version``; the JSON capabilities follow, NUL-terminated."""

    _pack_ = 1
    _fields_ = [("major", _u16), ("minor", _u16)]
    major: int
    minor: int


assert ctypes.sizeof(VfioUserVersion) == 4


class VfioUserDeviceInfo(ctypes.Structure):
    """``struct vfio_user_device_info``."""

    _pack_ = 1
    _fields_ = [("argsz", _u32), ("flags", _u32), ("num_regions", _u32), ("num_irqs", _u32)]
    argsz: int
    flags: int
    num_regions: int
    num_irqs: int


assert ctypes.sizeof(VfioUserDeviceInfo) == 16


class VfioRegionInfo(ctypes.Structure):
    """``struct vfio_region_info``; capabilities follow at ``cap_offset``."""

    _pack_ = 1
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("index", _u32),
        ("cap_offset", _u32),
        ("size", _u64),
        ("offset", _u64),
    ]
    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int


assert ctypes.sizeof(VfioRegionInfo) == 32


class VfioInfoCapHeader(ctypes.Structure):
    """``struct vfio_info_cap_header``; ``next`` counts from the start of the region info."""

    _pack_ = 1
    _fields_ = [("id", _u16), ("version", _u16), ("next", _u32)]
    id: int
    version: int
    next: int


assert ctypes.sizeof(VfioInfoCapHeader) == 8


class VfioRegionSparseMmapArea(ctypes.Structure):
    """``struct vfio_region_sparse_mmap_area``."""

    _pack_ = 1
    _fields_ = [("offset", _u64), ("size", _u64)]
    offset: int
    size: int


assert ctypes.sizeof(VfioRegionSparseMmapArea) == 16


class VfioRegionInfoCapSparseMmap(ctypes.Structure):
    """``struct vfio_region_info_cap_sparse_mmap``; ``nr_areas`` areas follow."""

    _pack_ = 1
    _fields_ = [("header", VfioInfoCapHeader), ("nr_areas", _u32), ("reserved", _u32)]
    header: VfioInfoCapHeader
    nr_areas: int
    reserved: int


assert ctypes.sizeof(VfioRegionInfoCapSparseMmap) == 16


class VfioRegionInfoCapType(ctypes.Structure):
    """``struct vfio_region_info_cap_type``."""

    _pack_ = 1
    _fields_ = [("header", VfioInfoCapHeader), ("type", _u32), ("subtype", _u32)]
    header: VfioInfoCapHeader
    type: int
    subtype: int


assert ctypes.sizeof(VfioRegionInfoCapType) == 16


class VfioIrqInfo(ctypes.Structure):
    """``struct vfio_irq_info``."""

    _pack_ = 1
    _fields_ = [("argsz", _u32), ("flags", _u32), ("index", _u32), ("count", _u32)]
    argsz: int
    flags: int
    index: int
    count: int


assert ctypes.sizeof(VfioIrqInfo) == 16


class VfioIrqSet(ctypes.Structure):
    """``struct vfio_irq_set``; DATA_BOOL bytes follow, eventfds travel as SCM_RIGHTS."""

    _pack_ = 1
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("index", _u32),
        ("start", _u32),
        ("count", _u32),
    ]
    argsz: int
    flags: int
    index: int
    start: int
    count: int


assert ctypes.sizeof(VfioIrqSet) == 20


class VfioUserDmaMap(ctypes.Structure):
    """``struct vfio_user_dma_map``; the memory's fd, if shared, travels as SCM_RIGHTS."""

    _pack_ = 1
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("offset", _u64),
        ("addr", _u64),
        ("size", _u64),
    ]
    argsz: int
    flags: int
    offset: int
    addr: int
    size: int


assert ctypes.sizeof(VfioUserDmaMap) == 32


class VfioUserDmaUnmap(ctypes.Structure):
    """``struct vfio_user_dma_unmap`` without the dirty bitmap that may follow."""

    _pack_ = 1
    _fields_ = [("argsz", _u32), ("flags", _u32), ("addr", _u64), ("size", _u64)]
    argsz: int
    flags: int
    addr: int
    size: int


assert ctypes.sizeof(VfioUserDmaUnmap) == 24


class VfioUserRegionAccess(ctypes.Structure):
    """``struct vfio_user_region_access``: REGION_READ/WRITE; the data follows."""

    _pack_ = 1
    _fields_ = [("offset", _u64), ("region", _u32), ("count", _u32)]
    offset: int
    region: int
    count: int


assert ctypes.sizeof(VfioUserRegionAccess) == 16


class VfioUserDmaRegionAccess(ctypes.Structure):
    """``struct vfio_user_dma_region_access``: DMA_READ/WRITE; the data follows."""

    _pack_ = 1
    _fields_ = [("addr", _u64), ("count", _u64)]
    addr: int
    count: int


assert ctypes.sizeof(VfioUserDmaRegionAccess) == 16

_Layout = TypeVar("_Layout", bound=ctypes.Structure)


def _unpack(layout: type[_Layout], payload: bytes, what: str, offset: int = 0) -> _Layout:
    """``layout`` read from ``payload`` at ``offset``, or a ProtocolError naming ``what``."""
    needed = offset + ctypes.sizeof(layout)
    if len(payload) < needed:
        raise ProtocolError(
            f"{what}: {len(payload)} bytes, too short for {layout.__name__} "
            f"({ctypes.sizeof(layout)} bytes at offset {offset})")
    return layout.from_buffer_copy(payload, offset)


def _check_fits(value: int, bits: int, what: str) -> None:
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{what} {value} does not fit in {bits} bits")


# --- Header -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """A message header, decoded; ``flags`` holds the type bits and the flag bits as sent."""

    msg_id: int
    command: int
    size: int
    flags: int = 0
    error: int = 0

    @property
    def message_type(self) -> int:
        return self.flags & TYPE_MASK

    @property
    def is_reply(self) -> bool:
        return self.message_type == MessageType.REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & HeaderFlag.ERROR)

    def encode(self) -> bytes:
        _check_fits(self.msg_id, 16, "message id")
        _check_fits(self.command, 16, "command")
        _check_fits(self.size, 32, "message size")
        _check_fits(self.flags, 32, "flags")
        _check_fits(self.error, 32, "error")
        return bytes(VfioUserHeader(self.msg_id, self.command, self.size, self.flags, self.error))

    @classmethod
    def decode(cls, data: bytes) -> Header:
        """The header in ``data`` (exactly 16 bytes), checked for a valid size, type and flags."""
        if len(data) != HEADER_SIZE:
            raise ProtocolError(f"header: {len(data)} bytes, expected {HEADER_SIZE}")
        raw = VfioUserHeader.from_buffer_copy(data)
        header = cls(raw.msg_id, raw.cmd, raw.msg_size, raw.flags, raw.error_no)
        # Worded only when wrong: a bulk of DMA_MAP replies decodes hundreds of thousands.
        if header.size < HEADER_SIZE:
            problem = f"message size {header.size} is below the header's 16"
        elif header.message_type not in MESSAGE_TYPES:
            problem = f"unknown message type {header.message_type}"
        elif header.flags & RESERVED_FLAGS:
            problem = f"reserved flag bits set ({header.flags:#x})"
        else:
            return header
        raise ProtocolError(f"header of {command_name(header.command)} msg_id {header.msg_id}: "
                            f"{problem}")


def encode_message(msg_id: int, command: int, payload: bytes = b"", *, flags: int = 0,
                   error: int = 0) -> bytes:
    """A whole message: the header, with the size of ``payload`` added, then ``payload``."""
    return Header(msg_id, command, HEADER_SIZE + len(payload), flags, error).encode() + payload


def encode_reply(request: Header, payload: bytes = b"") -> bytes:
    """A successful reply to ``request``: same id and command, the REPLY type."""
    return encode_message(request.msg_id, request.command, payload, flags=MessageType.REPLY)


def encode_error_reply(request: Header, errno_value: int) -> bytes:
    """An error reply to ``request``: the header alone, as the specification requires."""
    return encode_message(request.msg_id, request.command,
                          flags=MessageType.REPLY | HeaderFlag.ERROR, error=errno_value)


class MessageIds:
    """Message ids for one sender: 16 bits, wrapping, never one still awaiting its reply."""

    def __init__(self, first: int = 0) -> None:
        _check_fits(first, 16, "message id")
        self._next = first

    def allocate(self, in_use: Container[int]) -> int:
        for _ in range(MAX_MSG_ID + 1):
            candidate = self._next
            self._next = (self._next + 1) & MAX_MSG_ID
            if candidate not in in_use:
                return candidate
        raise ProtocolError("all 65536 message ids are awaiting replies")


# --- VERSION ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionInfo:
    """A VERSION message's content, with the specification's defaults for absent capabilities."""

    major: int
    minor: int
    capabilities: Mapping[str, object]
    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    pgsizes: int = DEFAULT_PGSIZES
    migration_pgsize: int | None = None


def encode_version(major: int, minor: int, capabilities: Mapping[str, object] | None) -> bytes:
    """A VERSION payload; ``capabilities`` becomes ``{"capabilities": ...}``, NUL-terminated."""
    _check_fits(major, 16, "major version")
    _check_fits(minor, 16, "minor version")
    head = bytes(VfioUserVersion(major, minor))
    if capabilities is None:
        return head
    return head + json.dumps({"capabilities": dict(capabilities)}).encode() + b"\0"


def _count(capabilities: Mapping[str, object], name: str, default: int, what: str) -> int:
    value = capabilities.get(name, default)
    # bool is an int subclass, but JSON true is not a number.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{what}: capability {name} is {value!r}, not a count")
    return value


def decode_version(payload: bytes) -> VersionInfo:
    what = "VERSION"
    version = _unpack(VfioUserVersion, payload, what)
    text = payload[ctypes.sizeof(VfioUserVersion):]
    if not text:
        return VersionInfo(version.major, version.minor, {})
    if not text.endswith(b"\0"):
        raise ProtocolError(f"{what}: the JSON capabilities are not NUL-terminated")
    try:
        document = json.loads(text[:-1].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{what}: the capabilities are not UTF-8 JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ProtocolError(f"{what}: the JSON is {type(document).__name__}, not an object")
    capabilities = document.get("capabilities", {})
    if not isinstance(capabilities, dict):
        raise ProtocolError(f"{what}: capabilities is {capabilities!r}, not an object")
    migration = capabilities.get("migration")
    if migration is not None and not isinstance(migration, dict):
        raise ProtocolError(f"{what}: capability migration is {migration!r}, not an object")
    return VersionInfo(
        major=version.major,
        minor=version.minor,
        capabilities=capabilities,
        max_msg_fds=_count(capabilities, "max_msg_fds", DEFAULT_MAX_MSG_FDS, what),
        max_data_xfer_size=_count(capabilities, "max_data_xfer_size",
                                  DEFAULT_MAX_DATA_XFER_SIZE, what),
        max_dma_maps=_count(capabilities, "max_dma_maps", DEFAULT_MAX_DMA_MAPS, what),
        pgsizes=_count(capabilities, "pgsizes", DEFAULT_PGSIZES, what),
        migration_pgsize=(None if migration is None or "pgsize" not in migration
                          else _count(migration, "pgsize", 0, f"{what} migration")),
    )


# --- Device, region and IRQ information -------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    flags: DeviceFlag
    num_regions: int
    num_irqs: int


def encode_device_get_info() -> bytes:
    return bytes(VfioUserDeviceInfo(argsz=ctypes.sizeof(VfioUserDeviceInfo)))


def decode_device_info(payload: bytes) -> DeviceInfo:
    info = _unpack(VfioUserDeviceInfo, payload, "DEVICE_GET_INFO reply")
    return DeviceInfo(DeviceFlag(info.flags), info.num_regions, info.num_irqs)


@dataclass(frozen=True)
class SparseMmapArea:
    """A part of a region the client may mmap, relative to the region's ``offset``."""

    offset: int
    size: int


@dataclass(frozen=True)
class RegionInfo:
    """A DEVICE_GET_REGION_INFO reply.

    ``argsz`` is the reply size the server needs for the whole answer: larger than the request's
    argsz means the capabilities (and the mmap fds) were left out.  ``fds`` are the file
    descriptors that came with the reply (libvfio-user sends one per sparse area, all the same
    file); the client that received them closes them.
    """

    index: int
    flags: RegionInfoFlag
    size: int
    offset: int
    argsz: int
    capability_ids: tuple[int, ...] = ()
    sparse_mmap: tuple[SparseMmapArea, ...] | None = None
    region_type: tuple[int, int] | None = None  # (type, subtype) from VFIO_REGION_INFO_CAP_TYPE
    fds: tuple[int, ...] = ()


def encode_device_get_region_info(index: int, argsz: int = ctypes.sizeof(VfioRegionInfo)) -> bytes:
    return bytes(VfioRegionInfo(argsz=argsz, index=index))


def decode_region_info(payload: bytes) -> RegionInfo:
    """The region info in ``payload`` with its capability chain, each capability bounds-checked."""
    what = "DEVICE_GET_REGION_INFO reply"
    info = _unpack(VfioRegionInfo, payload, what)
    capability_ids: list[int] = []
    sparse: tuple[SparseMmapArea, ...] | None = None
    region_type: tuple[int, int] | None = None
    offset = info.cap_offset if info.flags & RegionInfoFlag.CAPS else 0
    visited: set[int] = set()
    while offset:
        if offset < ctypes.sizeof(VfioRegionInfo):
            raise ProtocolError(f"{what}: capability offset {offset} points into the region info")
        if offset in visited:
            raise ProtocolError(f"{what}: the capability chain loops back to offset {offset}")
        visited.add(offset)
        cap = _unpack(VfioInfoCapHeader, payload, f"{what} capability", offset)
        if cap.id == RegionCapId.SPARSE_MMAP:
            sparse = _decode_sparse_mmap(payload, offset, what)
        elif cap.id == RegionCapId.TYPE:
            typed = _unpack(VfioRegionInfoCapType, payload, f"{what} type capability", offset)
            region_type = (typed.type, typed.subtype)
        capability_ids.append(cap.id)
        offset = cap.next
    return RegionInfo(info.index, RegionInfoFlag(info.flags), info.size, info.offset, info.argsz,
                      tuple(capability_ids), sparse, region_type)


def _decode_sparse_mmap(payload: bytes, offset: int, what: str) -> tuple[SparseMmapArea, ...]:
    sparse = _unpack(VfioRegionInfoCapSparseMmap, payload, f"{what} sparse mmap capability",
                     offset)
    first = offset + ctypes.sizeof(VfioRegionInfoCapSparseMmap)
    area_size = ctypes.sizeof(VfioRegionSparseMmapArea)
    if first + sparse.nr_areas * area_size > len(payload):
        raise ProtocolError(f"{what}: {sparse.nr_areas} sparse mmap areas run past the "
                            f"reply's {len(payload)} bytes")
    areas = (VfioRegionSparseMmapArea.from_buffer_copy(payload, first + i * area_size)
             for i in range(sparse.nr_areas))
    return tuple(SparseMmapArea(area.offset, area.size) for area in areas)


@dataclass(frozen=True)
class IrqInfo:
    index: int
    flags: IrqInfoFlag
    count: int


def encode_device_get_irq_info(index: int) -> bytes:
    return bytes(VfioIrqInfo(argsz=ctypes.sizeof(VfioIrqInfo), index=index))


def decode_irq_info(payload: bytes) -> IrqInfo:
    info = _unpack(VfioIrqInfo, payload, "DEVICE_GET_IRQ_INFO reply")
    return IrqInfo(info.index, IrqInfoFlag(info.flags), info.count)


def encode_set_irqs(index: int, start: int, count: int, flags: int, data: bytes = b"") -> bytes:
    """A DEVICE_SET_IRQS payload; ``data`` holds DATA_BOOL bytes (eventfds go as SCM_RIGHTS)."""
    argsz = ctypes.sizeof(VfioIrqSet) + len(data)
    return bytes(VfioIrqSet(argsz, flags, index, start, count)) + data


# --- DMA mappings -----------------------------------------------------------------------------


def encode_dma_map(address: int, size: int, flags: int, offset: int = 0) -> bytes:
    """A DMA_MAP payload; ``offset`` is into the fd sent with it (zero without one)."""
    return bytes(VfioUserDmaMap(ctypes.sizeof(VfioUserDmaMap), flags, offset, address, size))


def encode_dma_unmap(address: int, size: int, flags: int = 0) -> bytes:
    return bytes(VfioUserDmaUnmap(ctypes.sizeof(VfioUserDmaUnmap), flags, address, size))


def decode_dma_unmap(payload: bytes) -> VfioUserDmaUnmap:
    return _unpack(VfioUserDmaUnmap, payload, "DMA_UNMAP reply")


# --- Region and DMA data transfers ------------------------------------------------------------


@dataclass(frozen=True)
class RegionAccess:
    """A REGION_READ/WRITE request or reply; ``data`` is what follows the fixed part."""

    region: int
    offset: int
    count: int
    data: bytes = b""


def encode_region_access(region: int, offset: int, count: int, data: bytes = b"") -> bytes:
    return bytes(VfioUserRegionAccess(offset, region, count)) + data


# A posted REGION_WRITE's header and fixed part in one pack: the benchmarks send eight per
# descriptor, and building them from the ctypes layouts cost more than the send.
_POSTED_WRITE = struct.Struct("<HHIIIQII")
assert _POSTED_WRITE.size == ctypes.sizeof(VfioUserHeader) + ctypes.sizeof(VfioUserRegionAccess)


def encode_posted_region_write(msg_id: int, region: int, offset: int, data: bytes) -> bytes:
    """A whole REGION_WRITE message with No_reply, as :func:`encode_message` of
    :func:`encode_region_access` with ``flags=HeaderFlag.NO_REPLY`` makes it."""
    return _POSTED_WRITE.pack(msg_id, Command.REGION_WRITE, _POSTED_WRITE.size + len(data),
                              HeaderFlag.NO_REPLY, 0, offset, region, len(data)) + data


def decode_region_access(payload: bytes, what: str) -> RegionAccess:
    access = _unpack(VfioUserRegionAccess, payload, what)
    return RegionAccess(access.region, access.offset, access.count,
                        payload[ctypes.sizeof(VfioUserRegionAccess):])


@dataclass(frozen=True)
class DmaAccess:
    """A DMA_READ/WRITE request or reply; ``data`` is what follows the fixed part."""

    address: int
    count: int
    data: bytes = b""


def encode_dma_access(address: int, count: int, data: bytes = b"") -> bytes:
    return bytes(VfioUserDmaRegionAccess(address, count)) + data


def decode_dma_access(payload: bytes, what: str) -> DmaAccess:
    access = _unpack(VfioUserDmaRegionAccess, payload, what)
    return DmaAccess(access.addr, access.count, payload[ctypes.sizeof(VfioUserDmaRegionAccess):])
