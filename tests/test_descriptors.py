"""Descriptor and completion-record layouts against Linux 6.1 ``include/uapi/linux/idxd.h``:
tests/c_layouts.py compares every field's offset and width, union members included, with the
compiled header.
"""

from __future__ import annotations

import re
from enum import IntEnum
from pathlib import Path

import pytest

from tests.c_layouts import assert_layouts_match, c_enumerators, run_c
from vdsa_server.device import descriptors as d
from vdsa_server.device.registers import Layout, layout_fields

UAPI = Path("include/uapi/linux")

PRELUDE = """\
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "idxd.h"
"""

# Each Python layout beside the C type it models.
LAYOUTS: dict[str, Layout] = {
    "struct dsa_hw_desc": d.DsaHwDesc,
    "struct dsa_raw_desc": d.DsaRawDesc,
    "struct dsa_completion_record": d.DsaCompletionRecord,
    "struct dsa_raw_completion_record": d.DsaRawCompletionRecord,
}

# Each Python enum beside the C enum tag and the prefix its members drop.
ENUMS: tuple[tuple[type[IntEnum], str, str], ...] = (
    (d.DsaOpcode, "enum dsa_opcode", "DSA_OPCODE_"),
    (d.DsaCompStatus, "enum dsa_completion_status", "DSA_COMP_"),
)

CONSTANTS = ("DSA_COMP_STATUS_MASK", "DSA_COMP_STATUS_WRITE")


@pytest.fixture(scope="session")
def uapi_h(linux_src: Path) -> str:
    return (linux_src / "include/uapi/linux/idxd.h").read_text()


# --- Against the C header --------------------------------------------------------------------


def test_layouts_match_uapi(linux_src: Path, tmp_path: Path) -> None:
    assert_layouts_match(PRELUDE, linux_src / UAPI, tmp_path, LAYOUTS)


def test_every_uapi_field_is_modelled(uapi_h: str) -> None:
    """Each named member of the DSA structs, in any union arm, has a Python field."""
    text = re.sub(r"/\*.*?\*/", "", uapi_h, flags=re.DOTALL)
    for c_type, layout in LAYOUTS.items():
        body = re.search(rf"{c_type}\s*{{(.*?)\n}} __attribute__", text, re.DOTALL)
        assert body is not None, c_type
        c_names = set(re.findall(r"(\w+)(?:\[\d+\])?\s*(?::\s*\d+)?\s*;", body[1]))
        assert c_names == {f.path for f in layout_fields(layout)}, c_type


def test_constants_match_uapi(linux_src: Path, tmp_path: Path) -> None:
    body = [f'printf("{n}|%llu\\n", (unsigned long long)({n}));' for n in CONSTANTS]
    c = run_c(PRELUDE, linux_src / UAPI, tmp_path, body)
    assert {n: int(c[n]) for n in CONSTANTS} == {n: getattr(d, n) for n in CONSTANTS}


@pytest.mark.parametrize(
    ("py_enum", "tag", "prefix"), ENUMS, ids=lambda v: getattr(v, "__name__", v)
)
def test_enums_match_uapi(uapi_h: str, py_enum: type[IntEnum], tag: str, prefix: str) -> None:
    assert {f"{prefix}{m.name}": int(m) for m in py_enum} == c_enumerators(uapi_h, tag)


def test_op_flags_match_uapi(uapi_h: str) -> None:
    defined = re.findall(r"#define\s+IDXD_OP_FLAG_(\w+)\s+(0x[0-9a-fA-F]+)", uapi_h)
    dsa_flags = {name: int(value, 16) for name, value in defined if int(value, 16) <= 0xFFFF}
    assert {m.name: int(m) for m in d.IdxdOpFlag} == dsa_flags  # bits 16+ are IAX-only


# --- Layouts on their own --------------------------------------------------------------------


def test_memmove_descriptor_round_trip() -> None:
    desc = d.DsaHwDesc()
    desc.opcode = d.DsaOpcode.MEMMOVE
    desc.flags = d.IdxdOpFlag.CRAV | d.IdxdOpFlag.RCR | d.IdxdOpFlag.RCI
    desc.pasid = 0x12345
    desc.priv = 1
    desc.completion_addr = 0x1000
    desc.src_addr = 0x2000
    desc.dst_addr = 0x3000
    desc.xfer_size = 4096
    desc.int_handle = 3
    raw = d.DsaRawDesc.from_buffer_copy(bytes(desc))
    assert list(raw.field) == [
        0x12345 | 1 << 31 | (0x1C | 0x03 << 24) << 32,
        0x1000,
        0x2000,
        0x3000,
        4096 | 3 << 32,
        0,
        0,
        0,
    ]
    decoded = d.DsaHwDesc.from_buffer_copy(bytes(raw))
    assert d.DsaOpcode(decoded.opcode) is d.DsaOpcode.MEMMOVE
    assert d.IdxdOpFlag(decoded.flags) == d.IdxdOpFlag.CRAV | d.IdxdOpFlag.RCR | d.IdxdOpFlag.RCI


def test_descriptor_union_views_alias() -> None:
    desc = d.DsaHwDesc()
    desc.desc_list_addr = 0xABC0
    desc.desc_count = 8
    desc.crc_seed = 0xFFFF_FFFF
    assert (desc.src_addr, desc.xfer_size) == (0xABC0, 8)
    assert desc.max_delta_size == 0  # crc_seed shares bytes 40-43 with delta_addr, not 48
    assert desc.delta_addr == 0xFFFF_FFFF
    assert bytes(desc.op_specific)[:4] == b"\xff" * 4


def test_completion_record_round_trip() -> None:
    comp = d.DsaCompletionRecord()
    comp.status = d.DsaCompStatus.PAGE_FAULT_NOBOF | d.DSA_COMP_STATUS_WRITE
    comp.result = 1
    comp.bytes_completed = 0x800
    comp.fault_addr = 0xDEAD_0000
    comp.invalid_flags = 0x40
    raw = d.DsaRawCompletionRecord.from_buffer_copy(bytes(comp))
    assert list(raw.field) == [0x83 | 1 << 8 | 0x800 << 32, 0xDEAD_0000, 0x40, 0]
    assert comp.status & d.DSA_COMP_STATUS_MASK == d.DsaCompStatus.PAGE_FAULT_NOBOF
    assert comp.dif_status == 1


def test_delta_record_entry_is_packed() -> None:
    entries = (d.DsaDeltaRecordEntry * 2)(
        d.DsaDeltaRecordEntry(offset=1, data=0x1122334455667788),
        d.DsaDeltaRecordEntry(offset=0x10, data=0),
    )
    assert bytes(entries) == (
        b"\x01\x00\x88\x77\x66\x55\x44\x33\x22\x11" + b"\x10\x00" + b"\x00" * 8
    )
