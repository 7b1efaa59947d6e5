"""The client harness's vfio-user encoding and decoding, on its own and against the C headers.

The layouts and constants are compared with libvfio-user's ``include/vfio-user.h`` and
``libvfio-user.h`` (from the libvfio-user build) and the system's ``<linux/vfio.h>``.
"""

from __future__ import annotations

import errno
import json
import shutil
from enum import IntEnum, IntFlag
from pathlib import Path

import pytest

from tests.c_layouts import assert_layouts_match, c_enumerators, run_c
from vdsa_server.builds.libvfio_user_build import libvfio_user_artifact
from vdsa_server.client import protocol as p
from vdsa_server.device.registers import Layout
from vdsa_server.vfio import PciIrq, PciRegion

PRELUDE = """\
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "libvfio-user.h"
#include "vfio-user.h"
"""

LAYOUTS: dict[str, Layout] = {
    "struct vfio_user_header": p.VfioUserHeader,
    "struct vfio_user_version": p.VfioUserVersion,
    "struct vfio_user_device_info": p.VfioUserDeviceInfo,
    "struct vfio_region_info": p.VfioRegionInfo,
    "struct vfio_info_cap_header": p.VfioInfoCapHeader,
    "struct vfio_region_sparse_mmap_area": p.VfioRegionSparseMmapArea,
    "struct vfio_region_info_cap_sparse_mmap": p.VfioRegionInfoCapSparseMmap,
    "struct vfio_region_info_cap_type": p.VfioRegionInfoCapType,
    "struct vfio_irq_info": p.VfioIrqInfo,
    "struct vfio_irq_set": p.VfioIrqSet,
    "struct vfio_user_dma_map": p.VfioUserDmaMap,
    "struct vfio_user_dma_unmap": p.VfioUserDmaUnmap,
    "struct vfio_user_region_access": p.VfioUserRegionAccess,
    "struct vfio_user_dma_region_access": p.VfioUserDmaRegionAccess,
}

# Each Python enum beside the pattern that makes a member's C macro name.
MACROS: tuple[tuple[type[IntEnum] | type[IntFlag], str], ...] = (
    (p.MessageType, "VFIO_USER_F_TYPE_{}"),
    (p.DeviceFlag, "VFIO_DEVICE_FLAGS_{}"),
    (p.RegionInfoFlag, "VFIO_REGION_INFO_FLAG_{}"),
    (p.RegionCapId, "VFIO_REGION_INFO_CAP_{}"),
    (p.IrqInfoFlag, "VFIO_IRQ_INFO_{}"),
    (p.IrqSetFlag, "VFIO_IRQ_SET_{}"),
    (p.DmaMapFlag, "VFIO_USER_F_DMA_REGION_{}"),
    (p.DmaUnmapFlag, "VFIO_DMA_UNMAP_FLAG_{}"),
    (PciIrq, "VFIO_PCI_{}_IRQ_INDEX"),
)


def c_name(pattern: str, member: IntEnum | IntFlag) -> str:
    if member is PciRegion.MIGRATION:
        return "VFU_PCI_DEV_MIGR_REGION_IDX"
    return pattern.format(member.name)


@pytest.fixture(scope="module")
def include() -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: cannot compile the layout probe")
    headers = libvfio_user_artifact().path / "include"
    if not (headers / "vfio-user.h").is_file():
        pytest.fail(f"no vfio-user.h in {headers}; run `vdsa build libvfio-user`")
    return headers


# --- Against the C headers --------------------------------------------------------------------


def test_layouts_match_the_headers(include: Path, tmp_path: Path) -> None:
    assert_layouts_match(PRELUDE, include, tmp_path, LAYOUTS)


def test_constants_match_the_headers(include: Path, tmp_path: Path) -> None:
    enums = (*MACROS, (PciRegion, "VFIO_PCI_{}_REGION_INDEX"))
    names = {c_name(pattern, m): int(m) for py_enum, pattern in enums for m in py_enum}
    body = [f'printf("{n}|%llu\\n", (unsigned long long)({n}));' for n in names]
    c = run_c(PRELUDE, include, tmp_path, body)
    assert {n: int(c[n]) for n in names} == names


def test_commands_match_the_header(include: Path) -> None:
    """libvfio-user's header stops at DIRTY_PAGES; later commands come from the specification."""
    c = c_enumerators((include / "vfio-user.h").read_text(), "enum vfio_user_command")
    c.pop("VFIO_USER_MAX")
    assert c == {f"VFIO_USER_{m.name}": int(m) for m in p.Command if m <= p.Command.DIRTY_PAGES}


def test_header_flag_bits_match_the_bitfield(include: Path, tmp_path: Path) -> None:
    """The C header flags are a bitfield struct: the bits each field lands on, as one word."""
    body = [
        f"{{ struct vfio_user_header h; uint32_t word; memset(&h, 0, sizeof(h)); "
        f"h.flags.{field} = {value}; memcpy(&word, &h.flags, sizeof(word)); "
        f'printf("{field}|%u\\n", word); }}'
        for field, value in (("type", 1), ("no_reply", 1), ("error", 1))
    ]
    c = run_c(PRELUDE, include, tmp_path, body)
    assert {k: int(v) for k, v in c.items()} == {
        "type": int(p.MessageType.REPLY), "no_reply": int(p.HeaderFlag.NO_REPLY),
        "error": int(p.HeaderFlag.ERROR),
    }


# --- Header -----------------------------------------------------------------------------------


def test_header_round_trip() -> None:
    header = p.Header(0x1234, p.Command.REGION_WRITE, 40, p.MessageType.REPLY | p.HeaderFlag.ERROR,
                      errno.EINVAL)
    raw = header.encode()
    assert len(raw) == p.HEADER_SIZE
    assert raw[:4] == (0x1234).to_bytes(2, "little") + (10).to_bytes(2, "little")
    decoded = p.Header.decode(raw)
    assert decoded == header
    assert (decoded.is_reply, decoded.is_error, decoded.no_reply) == (True, True, False)


def test_message_size_counts_the_header() -> None:
    message = p.encode_message(7, p.Command.DEVICE_GET_INFO, b"x" * 16,
                               flags=p.HeaderFlag.NO_REPLY)
    header = p.Header.decode(message[:p.HEADER_SIZE])
    assert header.size == len(message) == 32
    assert (header.no_reply, header.is_reply) == (True, False)


def test_replies_echo_the_request() -> None:
    request = p.Header(9, p.Command.DMA_READ, 32)
    reply = p.Header.decode(p.encode_reply(request, b"data")[:p.HEADER_SIZE])
    assert (reply.msg_id, reply.command, reply.size, reply.is_reply, reply.is_error) == (
        9, p.Command.DMA_READ, 20, True, False)


def test_error_reply_is_the_header_alone() -> None:
    message = p.encode_error_reply(p.Header(3, p.Command.DMA_WRITE, 64), errno.EFAULT)
    assert len(message) == p.HEADER_SIZE
    reply = p.Header.decode(message)
    assert (reply.msg_id, reply.command, reply.is_reply, reply.is_error, reply.error) == (
        3, p.Command.DMA_WRITE, True, True, errno.EFAULT)


@pytest.mark.parametrize(
    ("field", "value"),
    [("msg_id", 0x10000), ("command", -1), ("size", 1 << 32), ("flags", 1 << 32)],
)
def test_header_values_must_fit_their_fields(field: str, value: int) -> None:
    fields = {"msg_id": 1, "command": 1, "size": 16, "flags": 0} | {field: value}
    with pytest.raises(ValueError, match="does not fit"):
        p.Header(**fields).encode()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\0" * 15, "15 bytes, expected 16"),
        (p.Header(1, 4, 8).encode(), "message size 8 is below"),
        (p.Header(1, 4, 16, flags=2).encode(), "unknown message type 2"),
        (p.Header(1, 4, 16, flags=1 << 8).encode(), "reserved flag bits"),
    ],
    ids=["short", "size-below-header", "bad-type", "reserved-flags"],
)
def test_malformed_headers_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(p.ProtocolError, match=message):
        p.Header.decode(raw)


def test_command_names() -> None:
    assert p.command_name(5) == "DEVICE_GET_REGION_INFO"
    assert p.command_name(99) == "command 99"


# --- Message ids ------------------------------------------------------------------------------


def test_message_ids_wrap_at_16_bits() -> None:
    ids = p.MessageIds(first=0xFFFE)
    assert [ids.allocate(()) for _ in range(3)] == [0xFFFE, 0xFFFF, 0]


def test_message_ids_skip_those_awaiting_replies() -> None:
    ids = p.MessageIds()
    assert ids.allocate({0, 1, 3}) == 2
    assert ids.allocate({3}) == 4


def test_message_ids_can_run_out() -> None:
    with pytest.raises(p.ProtocolError, match="all 65536"):
        p.MessageIds().allocate(range(0x10000))


# --- VERSION ----------------------------------------------------------------------------------


def test_version_carries_nul_terminated_json() -> None:
    payload = p.encode_version(0, 1, {"max_msg_fds": 8})
    assert payload[:4] == bytes([0, 0, 1, 0])
    assert payload.endswith(b"\0")
    assert json.loads(payload[4:-1]) == {"capabilities": {"max_msg_fds": 8}}
    assert p.encode_version(0, 0, None) == bytes(4)


def test_version_defaults_apply_to_absent_capabilities() -> None:
    version = p.decode_version(p.encode_version(0, 0, None))
    assert (version.max_msg_fds, version.max_data_xfer_size, version.max_dma_maps,
            version.pgsizes, version.migration_pgsize) == (1, 1 << 20, 0xFFFF, 4096, None)


def test_version_capabilities_are_read() -> None:
    caps = {"max_msg_fds": 8, "max_data_xfer_size": 4096, "pgsizes": 0x201000,
            "max_dma_maps": 16, "migration": {"pgsize": 4096}, "future": [1]}
    version = p.decode_version(p.encode_version(0, 1, caps))
    assert (version.minor, version.max_msg_fds, version.max_data_xfer_size, version.pgsizes,
            version.max_dma_maps, version.migration_pgsize) == (1, 8, 4096, 0x201000, 16, 4096)
    assert version.capabilities == caps


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\0\0", "too short"),
        (bytes(4) + b"{}", "not NUL-terminated"),
        (bytes(4) + b"{\0", "not UTF-8 JSON"),
        (bytes(4) + b"[]\0", "list, not an object"),
        (bytes(4) + b'{"capabilities": 3}\0', "not an object"),
        (p.encode_version(0, 0, {"max_msg_fds": "8"}), "max_msg_fds is '8'"),
        (p.encode_version(0, 0, {"max_msg_fds": True}), "max_msg_fds is True"),
        (p.encode_version(0, 0, {"pgsizes": -4096}), "pgsizes is -4096"),
        (p.encode_version(0, 0, {"migration": 4096}), "migration is 4096"),
        (p.encode_version(0, 0, {"migration": {"pgsize": None}}), "pgsize is None"),
    ],
)
def test_malformed_versions_are_refused(payload: bytes, message: str) -> None:
    with pytest.raises(p.ProtocolError, match=message):
        p.decode_version(payload)


# --- Device, region and IRQ information -------------------------------------------------------


def test_device_info() -> None:
    request = p.VfioUserDeviceInfo.from_buffer_copy(p.encode_device_get_info())
    assert (request.argsz, request.flags, request.num_regions, request.num_irqs) == (16, 0, 0, 0)
    reply = bytes(p.VfioUserDeviceInfo(16, 3, 10, 5))
    assert p.decode_device_info(reply) == p.DeviceInfo(
        p.DeviceFlag.RESET | p.DeviceFlag.PCI, 10, 5)
    with pytest.raises(p.ProtocolError, match="DEVICE_GET_INFO reply: 12 bytes"):
        p.decode_device_info(reply[:12])


def region_info_with_caps(*caps: bytes, cap_offset: int = 32, flags: int = 0xF) -> bytes:
    size = 32 + sum(map(len, caps))
    return bytes(p.VfioRegionInfo(size, flags, 1, cap_offset, 0x3000, 0x1000)) + b"".join(caps)


def sparse_cap(next_offset: int, *areas: tuple[int, int], nr_areas: int | None = None) -> bytes:
    header = p.VfioInfoCapHeader(p.RegionCapId.SPARSE_MMAP, 1, next_offset)
    count = len(areas) if nr_areas is None else nr_areas
    return bytes(p.VfioRegionInfoCapSparseMmap(header, count)) + b"".join(
        bytes(p.VfioRegionSparseMmapArea(offset, size)) for offset, size in areas)


def type_cap(next_offset: int) -> bytes:
    return bytes(p.VfioRegionInfoCapType(p.VfioInfoCapHeader(p.RegionCapId.TYPE, 1, next_offset),
                                         3, 1))


def test_region_info_with_a_capability_chain() -> None:
    # A type capability at 32 pointing to a sparse mmap one at 48, as libvfio-user lays out its
    # migration region.
    payload = region_info_with_caps(type_cap(48), sparse_cap(0, (0, 0x1000), (0x2000, 0x1000)))
    info = p.decode_region_info(payload)
    assert (info.index, info.size, info.offset, info.argsz) == (1, 0x3000, 0x1000, len(payload))
    assert info.flags == p.RegionInfoFlag.READ | p.RegionInfoFlag.WRITE | p.RegionInfoFlag.MMAP \
        | p.RegionInfoFlag.CAPS
    assert info.capability_ids == (p.RegionCapId.TYPE, p.RegionCapId.SPARSE_MMAP)
    assert info.region_type == (3, 1)
    assert info.sparse_mmap == (p.SparseMmapArea(0, 0x1000), p.SparseMmapArea(0x2000, 0x1000))


def test_region_info_without_the_caps_flag_has_no_capabilities() -> None:
    info = p.decode_region_info(region_info_with_caps(type_cap(0), flags=0x3))
    assert (info.capability_ids, info.region_type, info.sparse_mmap) == ((), None, None)


def test_short_region_info_reply_names_the_size_it_needs() -> None:
    """A server answers a too-small argsz with the fixed part and the argsz it needs."""
    payload = bytes(p.VfioRegionInfo(80, 0x7, 1, 0, 0x3000, 0))
    info = p.decode_region_info(payload)
    assert info.argsz == 80 > len(payload)
    assert info.capability_ids == ()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (bytes(31), "31 bytes, too short for VfioRegionInfo"),
        (region_info_with_caps(type_cap(0), cap_offset=8), "points into the region info"),
        (region_info_with_caps(type_cap(32)), "loops back to offset 32"),
        (region_info_with_caps(type_cap(0), cap_offset=44), "capability: 48 bytes, too short"),
        (region_info_with_caps(type_cap(0)[:12]), "type capability: 44 bytes"),
        (region_info_with_caps(sparse_cap(0, (0, 0x1000), nr_areas=2)),
         "2 sparse mmap areas run past"),
        (region_info_with_caps(type_cap(64)), "capability: 48 bytes, too short"),
    ],
    ids=["short", "cap-in-info", "loop", "cap-past-end", "cap-cut-off", "areas-past-end",
         "next-past-end"],
)
def test_malformed_region_info_is_refused(payload: bytes, message: str) -> None:
    with pytest.raises(p.ProtocolError, match=message):
        p.decode_region_info(payload)


def test_irq_info() -> None:
    request = p.VfioIrqInfo.from_buffer_copy(p.encode_device_get_irq_info(PciIrq.MSIX))
    assert (request.argsz, request.index) == (16, 2)
    info = p.decode_irq_info(bytes(p.VfioIrqInfo(16, 1, 2, 9)))
    assert info == p.IrqInfo(PciIrq.MSIX, p.IrqInfoFlag.EVENTFD, 9)


def test_set_irqs_argsz_counts_bool_data_not_eventfds() -> None:
    flags = p.IrqSetFlag.DATA_BOOL | p.IrqSetFlag.ACTION_TRIGGER
    payload = p.encode_set_irqs(PciIrq.MSIX, 2, 3, flags, bytes([1, 0, 1]))
    irq_set = p.VfioIrqSet.from_buffer_copy(payload)
    assert (irq_set.argsz, irq_set.flags, irq_set.index, irq_set.start, irq_set.count) == (
        23, flags, 2, 2, 3)
    eventfds = p.encode_set_irqs(0, 0, 8, p.IrqSetFlag.DATA_EVENTFD)
    assert p.VfioIrqSet.from_buffer_copy(eventfds).argsz == len(eventfds) == 20


# --- DMA and region transfers -----------------------------------------------------------------


def test_dma_map_and_unmap() -> None:
    mapped = p.VfioUserDmaMap.from_buffer_copy(p.encode_dma_map(0x10000, 0x4000, 3, offset=0x1000))
    assert (mapped.argsz, mapped.flags, mapped.offset, mapped.addr, mapped.size) == (
        32, 3, 0x1000, 0x10000, 0x4000)
    unmap = p.encode_dma_unmap(0x10000, 0x4000)
    assert len(unmap) == 24
    echoed = p.decode_dma_unmap(unmap)
    assert (echoed.argsz, echoed.flags, echoed.addr, echoed.size) == (24, 0, 0x10000, 0x4000)


def test_region_access_round_trip() -> None:
    payload = p.encode_region_access(PciRegion.BAR2, 0x40, 4, b"\x01\x02\x03\x04")
    assert len(payload) == 20
    assert p.decode_region_access(payload, "REGION_WRITE") == p.RegionAccess(
        2, 0x40, 4, b"\x01\x02\x03\x04")
    with pytest.raises(p.ProtocolError, match="REGION_READ reply: 8 bytes"):
        p.decode_region_access(payload[:8], "REGION_READ reply")


def test_dma_access_has_a_64_bit_count() -> None:
    payload = p.encode_dma_access(0x1000, 1 << 32, b"")
    assert len(payload) == 16
    assert p.decode_dma_access(payload, "DMA_WRITE reply") == p.DmaAccess(0x1000, 1 << 32)
    with pytest.raises(p.ProtocolError, match="DMA_READ request: 12 bytes"):
        p.decode_dma_access(payload[:12], "DMA_READ request")


@pytest.mark.parametrize("data", [b"\x01" * 8, b"", bytes(range(64))])
def test_posted_region_write_fast_path_encodes_what_the_layouts_do(data: bytes) -> None:
    by_layouts = p.encode_message(0xBEEF, p.Command.REGION_WRITE,
                                  p.encode_region_access(2, 0x1238, len(data), data),
                                  flags=p.HeaderFlag.NO_REPLY)
    assert p.encode_posted_region_write(0xBEEF, 2, 0x1238, data) == by_layouts
