"""The register file model against Linux 6.1 ``drivers/dma/idxd/registers.h``.

The header is kernel-internal; it compiles in userspace behind a small shim (kernel integer types,
``__packed``, ``BIT``, ``PAGE_SIZE``); tests/c_layouts.py compares every field's offset and
width with the compiled header.
"""

from __future__ import annotations

import ctypes
import itertools
import re
from enum import IntEnum, IntFlag
from pathlib import Path

import pytest

from tests.c_layouts import assert_layouts_match, c_enumerators, run_c
from vdsa_server.device import registers as r
from vdsa_server.device.descriptors import DsaCompStatus

SHIM = """\
#include <stdint.h>
#include <stdio.h>
#include <string.h>
typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
#define __packed __attribute__((packed))
#define BIT(n) (1UL << (n))
#define PAGE_SIZE 4096UL
#include "registers.h"

struct fake_idxd { unsigned int grpcfg_offset, wqcfg_offset, wqcfg_size; };
"""

# Each Python layout beside the C type it models.
LAYOUTS: dict[str, r.Layout] = {
    "union gen_cap_reg": r.GenCapReg,
    "union wq_cap_reg": r.WqCapReg,
    "union group_cap_reg": r.GroupCapReg,
    "union engine_cap_reg": r.EngineCapReg,
    "struct opcap": r.OpCap,
    "union offsets_reg": r.OffsetsReg,
    "union gencfg_reg": r.GenCfgReg,
    "union genctrl_reg": r.GenCtrlReg,
    "union gensts_reg": r.GenStsReg,
    "union idxd_command_reg": r.IdxdCommandReg,
    "union sw_err_reg": r.SwErrReg,
    "union msix_perm": r.MsixPerm,
    "union group_flags": r.GroupFlags,
    "struct grpcfg": r.GrpCfg,
    "union wqcfg": r.WqCfg,
    "union idxd_perfcap": r.IdxdPerfCap,
}

# Each Python enum beside the C enum tag (or "#define" group) and the prefix its members drop.
ENUMS: tuple[tuple[type[IntEnum] | type[IntFlag], str, str], ...] = (
    (r.IdxdDeviceStatusState, "enum idxd_device_status_state", "IDXD_DEVICE_STATE_"),
    (r.IdxdDeviceResetType, "enum idxd_device_reset_type", "IDXD_DEVICE_RESET_"),
    (r.IdxdCmd, "enum idxd_cmd", "IDXD_CMD_"),
    (r.IdxdCmdstsErr, "enum idxd_cmdsts_err", "IDXD_CMDSTS_"),
    (r.IdxdIntc, "#define", "IDXD_INTC_"),
)

# Fixed (BAR0-absolute) offsets precede this comment; the perfmon offsets after it are relative.
PERFMON_SECTION = "/* Following is performance monitor registers */"

TOPOLOGIES = (
    r.TableLayout(num_groups=1, num_wqs=1, num_msix=2),
    r.TableLayout(num_groups=4, num_wqs=8, num_msix=9),
    r.TableLayout(num_groups=3, num_wqs=5, num_msix=70, wqcfg_size_field=1),
)


@pytest.fixture(scope="session")
def registers_h(linux_src: Path) -> str:
    return (linux_src / "drivers/dma/idxd/registers.h").read_text()


def registers_c(linux_src: Path, tmp_path: Path, body: list[str]) -> dict[str, str]:
    return run_c(SHIM, linux_src / "drivers/dma/idxd", tmp_path, body)


def c_defines(header: str, prefix: str) -> dict[str, int]:
    """``#define``s of ``prefix`` in ``header``, with their values."""
    text = re.sub(r"/\*.*?\*/", "", header, flags=re.DOTALL)
    pattern = rf"#define\s+({prefix}\w+)\s+(0x[0-9a-fA-F]+|\d+)\s*$"
    return {m[1]: int(m[2], 0) for m in re.finditer(pattern, text, re.MULTILINE)}


def fixed_offsets(header: str) -> dict[str, int]:
    fixed = header.split(PERFMON_SECTION)[0]
    pattern = r"#define\s+(IDXD_\w+_OFFSET)\s+(0x[0-9a-fA-F]+)"
    return {m[1]: int(m[2], 16) for m in re.finditer(pattern, fixed)}


# --- Against the C header --------------------------------------------------------------------


def test_layouts_match_registers_h(linux_src: Path, tmp_path: Path) -> None:
    assert_layouts_match(SHIM, linux_src / "drivers/dma/idxd", tmp_path, LAYOUTS)


def test_cmdsts_follows_the_driver_masks(linux_src: Path, tmp_path: Path) -> None:
    """registers.h's cmdsts_reg struct is padded to 6 bytes; the driver uses masks instead."""
    c = registers_c(linux_src, tmp_path, ['printf("sizeof|%zu\\n", sizeof(union cmdsts_reg));'])
    assert c["sizeof"] == "6"
    assert r.field_mask(r.CmdStsReg, "err") == r.IDXD_CMDSTS_ERR_MASK
    assert r.field_mask(r.CmdStsReg, "result") == 0xFFFF << r.IDXD_CMDSTS_RES_SHIFT
    assert r.field_mask(r.CmdStsReg, "active") == r.IDXD_CMDSTS_ACTIVE


def test_constants_match_registers_h(linux_src: Path, tmp_path: Path, registers_h: str) -> None:
    defined = set(re.findall(r"#define\s+(\w+)\s", registers_h))
    names = sorted(n for n in dir(r) if n in defined and isinstance(getattr(r, n), int))
    assert "IDXD_SWERR_ACK" in names  # the shared names were found
    body = [f'printf("{n}|%llu\\n", (unsigned long long)({n}));' for n in names]
    c = registers_c(linux_src, tmp_path, body)
    assert {n: getattr(r, n) for n in names} == {n: int(c[n]) for n in names}


@pytest.mark.parametrize(
    ("py_enum", "tag", "prefix"), ENUMS, ids=lambda v: getattr(v, "__name__", v)
)
def test_enums_match_registers_h(
    registers_h: str, py_enum: type[IntEnum] | type[IntFlag], tag: str, prefix: str
) -> None:
    python = {f"{prefix}{m.name}": int(m) for m in py_enum}
    c_values = (c_defines(registers_h, prefix) if tag == "#define"
                else c_enumerators(registers_h, tag))
    assert python == c_values


def test_wq_state_and_portal_enums_match_idxd_h(linux_src: Path) -> None:
    idxd_h = (linux_src / "drivers/dma/idxd/idxd.h").read_text()
    wq_states = {f"IDXD_WQ_{m.name}": int(m) for m in r.IdxdWqState}
    assert wq_states == c_enumerators(idxd_h, "enum idxd_wq_state")
    prot = c_enumerators(idxd_h, "enum idxd_portal_prot")
    assert prot == {
        "IDXD_PORTAL_UNLIMITED": r.IdxdPortal.UNLIMITED_MSIX,
        "IDXD_PORTAL_LIMITED": r.IdxdPortal.LIMITED_MSIX,
    }


def test_every_fixed_register_is_mapped(registers_h: str) -> None:
    offsets = fixed_offsets(registers_h)
    assert {name: getattr(r, name) for name in offsets} == offsets
    assert sorted(offsets.values()) == [reg.offset for reg in r.FIXED_REGISTERS]


@pytest.mark.parametrize("layout", TOPOLOGIES, ids=repr)
def test_table_offsets_match_driver_macros(
    linux_src: Path, tmp_path: Path, layout: r.TableLayout
) -> None:
    device = (
        f"struct fake_idxd d = {{ {layout.grpcfg_offset}, {layout.wqcfg_offset}, "
        f"{layout.wqcfg_size} }};"
    )
    body = ["{", device]
    for g in range(layout.num_groups):
        for ofs in range(r.GRPWQCFG_STRIDES):
            body.append(f'printf("wq {g} {ofs}|%u\\n", (unsigned)GRPWQCFG_OFFSET(&d, {g}, {ofs}));')
        body.append(f'printf("eng {g}|%u\\n", (unsigned)GRPENGCFG_OFFSET(&d, {g}));')
        body.append(f'printf("flg {g}|%u\\n", (unsigned)GRPFLGCFG_OFFSET(&d, {g}));')
    strides = layout.wqcfg_size // 4
    for n in range(layout.num_wqs):
        for ofs in range(strides):
            body.append(f'printf("wqcfg {n} {ofs}|%u\\n", (unsigned)WQCFG_OFFSET(&d, {n}, {ofs}));')
    body.append('printf("strides|%u\\n", (unsigned)WQCFG_STRIDES(&d));')
    body.append("}")
    c = {k: int(v) for k, v in registers_c(linux_src, tmp_path, body).items()}

    expected = {"strides": strides}
    for g in range(layout.num_groups):
        for ofs in range(r.GRPWQCFG_STRIDES):
            expected[f"wq {g} {ofs}"] = layout.grpwqcfg_offset(g, ofs)
        expected[f"eng {g}"] = layout.grpengcfg_offset(g)
        expected[f"flg {g}"] = layout.grpflgcfg_offset(g)
    for n in range(layout.num_wqs):
        for ofs in range(strides):
            expected[f"wqcfg {n} {ofs}"] = layout.wqcfg_entry_offset(n, ofs)
    assert c == expected


# --- Layouts on their own --------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout", [*LAYOUTS.values(), r.CmdStsReg], ids=lambda v: getattr(v, "__name__", v)
)
def test_named_fields_tile_each_register(layout: r.Layout) -> None:
    """Reserved fields are named, so the fields of each view cover its bytes exactly once."""
    view = layout._fields_[0][1] if issubclass(layout, ctypes.Union) else layout
    assert issubclass(view, ctypes.Structure)
    covered = 0
    for field in r.layout_fields(view):
        if field.path.endswith(".bits"):  # a nested union's raw view overlaps by design
            continue
        mask = r.field_mask(view, field.path)
        assert covered & mask == 0, f"{view.__name__}.{field.path} overlaps"
        covered |= mask
    assert covered == (1 << (8 * ctypes.sizeof(view))) - 1, f"{view.__name__} leaves bits unnamed"


def test_gencap_round_trip() -> None:
    reg = r.GenCapReg()
    reg.block_on_fault = 1
    reg.cmd_cap = 1
    reg.max_xfer_shift = 31
    reg.max_batch_shift = 10
    reg.config_en = 1
    assert reg.bits == 1 | 1 << 4 | 31 << 16 | 10 << 21 | 1 << 31
    assert r.GenCapReg(bits=1 << 31).config_en == 1


def test_wqcap_round_trip() -> None:
    reg = r.WqCapReg()
    reg.total_wq_size = 128
    reg.num_wqs = 8
    reg.wqcfg_size = 1
    reg.dedicated_mode = 1
    reg.op_config = 1
    assert reg.bits == 128 | 8 << 16 | 1 << 24 | 1 << 49 | 1 << 54
    assert r.WqCapReg(bits=1 << 48).shared_mode == 1


def test_wqcfg_round_trip() -> None:
    cfg = r.WqCfg()
    cfg.wq_size = 16
    cfg.wq_thresh = 4
    cfg.mode = r.IdxdWqMode.DEDICATED
    cfg.priority = 0xF
    cfg.pasid = 0xABCDE
    cfg.priv = 1
    cfg.max_xfer_shift = 21
    cfg.max_batch_shift = 5
    cfg.occupancy = 3
    cfg.wq_state = r.IdxdWqState.ENABLED
    cfg.op_config[3] = 1 << 63
    dwords = list(cfg.bits)
    assert dwords[:8] == [
        16,
        4,
        1 | 0xF << 4 | 0xABCDE << 8 | 1 << 29,
        21 | 5 << 5,
        0,
        0,
        3 | 1 << 30,
        0,
    ]
    assert dwords[8:] == [0] * 7 + [1 << 31]
    occupancy = r.WqCfg()
    occupancy.bits[r.WQCFG_OCCUP_IDX] = 0x8000_1234
    assert (occupancy.occupancy, occupancy.wq_state) == (0x1234, 2)


def test_grpcfg_round_trip() -> None:
    cfg = r.GrpCfg()
    cfg.wqs[0] = 0b101
    cfg.engines = 0b11
    cfg.flags.tc_b = 1
    cfg.flags.rdbufs_allowed = 0x60
    raw = bytes(cfg)
    assert int.from_bytes(raw[0:8], "little") == 0b101
    assert int.from_bytes(raw[32:40], "little") == 0b11
    assert int.from_bytes(raw[40:48], "little") == 1 << 3 | 0x60 << 20
    assert cfg.flags.bits == 1 << 3 | 0x60 << 20


def test_command_round_trip() -> None:
    cmd = r.IdxdCommandReg()
    cmd.cmd = r.IdxdCmd.REQUEST_INT_HANDLE
    cmd.operand = 3 | r.CMD_INT_HANDLE_IMS
    cmd.int_req = 1
    assert cmd.bits == 3 | 1 << 16 | 13 << 20 | 1 << 31
    decoded = r.IdxdCommandReg(bits=cmd.bits)
    assert (decoded.cmd, decoded.operand, decoded.int_req) == (13, 0x10003, 1)


def test_cmdsts_round_trip() -> None:
    sts = r.CmdStsReg()
    sts.err = r.IdxdCmdstsErr.ERR_NO_HANDLE
    sts.result = 0xBEEF
    sts.active = 1
    assert sts.bits == 0x42 | 0xBEEF << r.IDXD_CMDSTS_RES_SHIFT | r.IDXD_CMDSTS_ACTIVE
    assert sts.bits & r.IDXD_CMDSTS_ERR_MASK == r.IdxdCmdstsErr.ERR_NO_HANDLE


def test_swerr_round_trip() -> None:
    err = r.SwErrReg()
    err.valid = 1
    err.wq_idx_valid = 1
    err.error = r.SwErrCode.BAD_OPCODE
    err.wq_idx = 2
    err.operation = 0x55
    err.batch_idx = 7
    err.invalid_flags = 0x40
    err.fault_addr = 0x1000
    assert list(err.bits) == [
        1 | 1 << 3 | 0x10 << 8 | 2 << 16 | 0x55 << 32,
        7 | 0x40 << 32,
        0x1000,
        0,
    ]
    assert err.bits[0] & r.IDXD_SWERR_ACK == r.IDXD_SWERR_VALID
    assert r.SwErrCode is DsaCompStatus


def test_control_bits_derive_from_layouts() -> None:
    assert int(r.GenCtrlBit.SOFTERR_INT_EN) == 1
    assert int(r.GenCtrlBit.HALT_INT_EN) == 2
    assert int(r.GenCfgBit.USER_INT_EN) == 1 << 12


# --- The fixed MMIO map ----------------------------------------------------------------------


def test_fixed_registers_are_sorted_and_disjoint() -> None:
    regs = r.FIXED_REGISTERS
    assert [reg.offset for reg in regs] == sorted(reg.offset for reg in regs)
    for before, after in itertools.pairwise(regs):
        assert before.offset + before.size <= after.offset, (before.name, after.name)
    assert len({reg.name for reg in regs}) == len(regs)


@pytest.mark.parametrize("reg", r.FIXED_REGISTERS, ids=lambda reg: reg.name)
def test_fixed_register_entry_is_consistent(reg: r.MmioRegister) -> None:
    assert reg.size in (4, 8, 16, 32)
    assert reg.offset % min(reg.size, 8) == 0  # the driver's 32/64-bit accesses stay aligned
    if reg.layout is not None:
        assert ctypes.sizeof(reg.layout) == reg.size
    assert (reg.write_mask == 0) == (reg.access is r.Access.RO)
    assert reg.write_mask < 1 << (8 * reg.size)


def test_write_masks() -> None:
    by_name = {reg.name: reg for reg in r.FIXED_REGISTERS}
    assert by_name["GENCFG"].write_mask == 0x10FF
    assert by_name["GENCTRL"].write_mask == 0x3
    assert by_name["INTCAUSE"].write_mask == 0x8000_001F
    assert by_name["SWERR"].write_mask == r.IDXD_SWERR_ACK
    assert by_name["CMD"].access is r.Access.CMD


def test_register_at() -> None:
    assert r.register_at(0x00) is r.FIXED_REGISTERS[0]
    swerr = r.register_at(r.IDXD_SWERR_OFFSET + 31)
    assert swerr is not None
    assert swerr.name == "SWERR"
    assert r.register_at(0x08) is None  # hole between VERSION and GENCAP
    assert r.register_at(r.FIXED_REGISTERS_END) is None


# --- Tables ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", TOPOLOGIES, ids=repr)
def test_tables_are_placed_after_fixed_registers(layout: r.TableLayout) -> None:
    offsets = layout.offsets_reg()
    assert offsets.grpcfg * r.IDXD_TABLE_MULT == layout.grpcfg_offset >= r.FIXED_REGISTERS_END
    assert offsets.wqcfg * r.IDXD_TABLE_MULT == layout.wqcfg_offset
    assert offsets.msix_perm * r.IDXD_TABLE_MULT == layout.msix_perm_offset
    assert (offsets.ims, offsets.perfmon) == (0, 0)
    assert layout.grpcfg_offset + layout.num_groups * r.GRPCFG_SIZE <= layout.wqcfg_offset
    assert layout.wqcfg_offset + layout.num_wqs * layout.wqcfg_size <= layout.msix_perm_offset
    assert layout.end <= layout.bar0_size
    assert layout.bar0_size & (layout.bar0_size - 1) == 0


@pytest.mark.parametrize("layout", TOPOLOGIES, ids=repr)
def test_locate_inverts_entry_offsets(layout: r.TableLayout) -> None:
    for g in range(layout.num_groups):
        assert layout.locate(layout.grpflgcfg_offset(g)) == r.TableSlot(r.Table.GRPCFG, g, 40)
    for n in range(layout.num_wqs):
        slot = r.TableSlot(r.Table.WQCFG, n, 4 * r.WQCFG_PASID_IDX)
        assert layout.locate(layout.wqcfg_entry_offset(n, r.WQCFG_PASID_IDX)) == slot
    for v in range(layout.num_msix):
        assert layout.locate(layout.msix_perm_entry_offset(v)) == r.TableSlot(
            r.Table.MSIX_PERM, v, 0
        )
    assert layout.locate(r.IDXD_CMD_OFFSET) is None
    assert layout.locate(layout.end) is None


def test_grpcfg_driver_offsets_match_struct() -> None:
    def byte_offset(path: str) -> int:
        mask = r.field_mask(r.GrpCfg, path)
        return ((mask & -mask).bit_length() - 1) // 8

    layout = TOPOLOGIES[0]
    assert layout.grpengcfg_offset(0) - layout.grpcfg_offset == byte_offset("engines")
    assert layout.grpflgcfg_offset(0) - layout.grpcfg_offset == byte_offset("flags.bits")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_groups": 0, "num_wqs": 1, "num_msix": 1},
        {"num_groups": 1, "num_wqs": 256, "num_msix": 1},
        {"num_groups": 1, "num_wqs": 1, "num_msix": 0},
        {"num_groups": 1, "num_wqs": 1, "num_msix": 1, "wqcfg_size_field": 16},
    ],
)
def test_table_layout_rejects_unencodable_topologies(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=r"outside|< 1"):
        r.TableLayout(**kwargs)


# --- BAR2 portals ----------------------------------------------------------------------------


def test_portal_offsets() -> None:
    # idxd_get_wq_portal_full_offset: ((wq_id * 4) << PAGE_SHIFT) + prot * 0x1000
    assert r.wq_portal_offset(0, r.IdxdPortal.LIMITED_MSIX) == 0x1000
    assert r.wq_portal_offset(1, r.IdxdPortal.UNLIMITED_MSIX) == 0x4000
    assert r.wq_portal_offset(2, r.IdxdPortal.LIMITED_IMS) == 0xB000


def test_wq_bar_size() -> None:
    assert r.wq_bar_size(1) == 0x4000
    assert r.wq_bar_size(3) == 0x10000
    assert r.wq_bar_size(4) == 0x10000
