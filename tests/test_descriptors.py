"""Descriptor and completion-record layouts against Linux 6.1 ``include/uapi/linux/idxd.h``.

A generated C program, compiled against the uapi header, sets each field of each struct to
all-ones and prints the resulting bytes, so every field's offset and width is compared, union
members included. The header comes from the installed linux-source-6.1 tarball, extracted once
into the pytest cache; without it or without gcc those tests skip.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from enum import IntEnum
from pathlib import Path

import pytest

from vdsa_server.device import descriptors as d
from vdsa_server.device.registers import Layout, field_mask, layout_fields

LINUX_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
LINUX_TOP = "linux-source-6.1"
HEADERS = (
    "drivers/dma/idxd/registers.h",
    "drivers/dma/idxd/idxd.h",
    "include/uapi/linux/idxd.h",
)

PRELUDE = """\
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "idxd.h"

static void dump(const char *key, const void *p, size_t n)
{
    const unsigned char *b = p;
    printf("%s|", key);
    while (n--)
        printf("%02x", b[n]);
    printf("\\n");
}
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
def linux_src(pytestconfig: pytest.Config) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    root = pytestconfig.cache.mkdir("linux-6.1-idxd")
    if not all((root / LINUX_TOP / h).is_file() for h in HEADERS):
        if not LINUX_TARBALL.is_file():
            pytest.skip(f"{LINUX_TARBALL} missing (apt-get install linux-source-6.1)")
        members = [f"{LINUX_TOP}/{h}" for h in HEADERS]
        subprocess.run(["tar", "-xJf", LINUX_TARBALL, "-C", root, *members], check=True)
    return root / LINUX_TOP


@pytest.fixture(scope="session")
def uapi_h(linux_src: Path) -> str:
    return (linux_src / "include/uapi/linux/idxd.h").read_text()


def run_c(linux_src: Path, tmp_path: Path, body: list[str]) -> dict[str, str]:
    """Compile ``body`` as main() against the uapi header; return its key|value lines."""
    source = tmp_path / "probe.c"
    source.write_text(PRELUDE + "int main(void)\n{\n" + "\n".join(body) + "\nreturn 0;\n}\n")
    binary = tmp_path / "probe"
    include = linux_src / "include/uapi/linux"
    subprocess.run(["gcc", "-w", f"-I{include}", source, "-o", binary], check=True)
    output = subprocess.run([binary], check=True, capture_output=True, text=True).stdout
    return dict(line.rsplit("|", 1) for line in output.splitlines())


def c_enumerators(header: str, tag: str) -> dict[str, int]:
    """Enumerators of ``tag`` in ``header`` with their values."""
    text = re.sub(r"/\*.*?\*/", "", header, flags=re.DOTALL)
    body = re.search(rf"{tag}\s*{{(.*?)}};", text, re.DOTALL)
    assert body is not None, tag
    values: dict[str, int] = {}
    value = -1
    for item in filter(None, (i.strip() for i in body[1].split(","))):
        name, _, explicit = (part.strip() for part in item.partition("="))
        value = int(explicit, 0) if explicit else value + 1
        values[name] = value
    return values


def mask_probe(c_type: str, layout: Layout) -> list[str]:
    """C statements printing sizeof and, per field, the bytes with only that field all-ones."""
    lines = [f'printf("{c_type}|sizeof|%zu\\n", sizeof({c_type}));']
    for field in layout_fields(layout):
        if field.bit_width is None:
            fill = f"memset((void *)&x.{field.path}, 0xff, sizeof(x.{field.path}));"
        else:
            fill = f"x.{field.path} = -1;"
        lines.append(
            f"{{ {c_type} x; memset(&x, 0, sizeof(x)); {fill} "
            f'dump("{c_type}|{field.path}", &x, sizeof(x)); }}'
        )
    return lines


# --- Against the C header --------------------------------------------------------------------


def test_layouts_match_uapi(linux_src: Path, tmp_path: Path) -> None:
    body = [line for c_type, layout in LAYOUTS.items() for line in mask_probe(c_type, layout)]
    c = run_c(linux_src, tmp_path, body)
    for c_type, layout in LAYOUTS.items():
        assert int(c[f"{c_type}|sizeof"]) == ctypes.sizeof(layout), c_type
        for field in layout_fields(layout):
            c_mask = int(c[f"{c_type}|{field.path}"], 16)
            assert field_mask(layout, field.path) == c_mask, f"{c_type}.{field.path}"


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
    c = run_c(linux_src, tmp_path, body)
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
