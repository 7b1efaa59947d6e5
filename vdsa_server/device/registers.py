"""The DSA 1.x register file (BAR0) and work-queue portals (BAR2), as Linux 6.1 idxd uses them.

Source of truth: Linux 6.1 ``drivers/dma/idxd/registers.h`` for names, offsets and layouts, and
``init.c``/``device.c``/``irq.c`` for how the driver reads and writes each register.

Naming follows the header so that a kernel grep finds the Python twin:

* offsets and other ``#define`` constants keep their C names (``IDXD_GENCAP_OFFSET``);
* each C ``union``/``struct`` becomes a ctypes layout named after its C tag in CamelCase
  (``union gen_cap_reg`` -> ``GenCapReg``) with the C field names, reserved fields included;
  unions keep their raw integer view (``bits``) next to the bitfields;
* enum members drop the prefix their C names share (``IDXD_CMD_ENABLE_DEVICE`` ->
  ``IdxdCmd.ENABLE_DEVICE``); each enum's docstring names the prefix.

The fixed registers are described once, as data, in :data:`FIXED_REGISTERS`; the variable-size
tables (GRPCFG, WQCFG, MSI-X permissions) are placed for a topology by :class:`TableLayout`.
"""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Iterator
from dataclasses import dataclass

from vdsa_server.device.descriptors import DsaCompStatus

_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64

Layout = type[ctypes.Structure] | type[ctypes.Union]


# --- Layout introspection -------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutField:
    """One leaf field of a ctypes layout, addressed the way C code would address it."""

    path: str  # anonymous members are transparent, named ones add a dot: "flags.tc_a"
    size: int  # bytes of the field's ctypes type (of its storage unit, for a bitfield)
    bit_width: int | None  # None unless the field is a bitfield


def layout_fields(layout: Layout) -> Iterator[LayoutField]:
    """Yield the leaf fields of ``layout`` in declaration order, descending into members."""
    anonymous = set(getattr(layout, "_anonymous_", ()))
    for entry in layout._fields_:
        name, ctype = entry[0], entry[1]
        if issubclass(ctype, ctypes.Structure | ctypes.Union):
            prefix = "" if name in anonymous else f"{name}."
            for inner in layout_fields(ctype):
                yield LayoutField(prefix + inner.path, inner.size, inner.bit_width)
        else:
            bit_width = entry[2] if len(entry) == 3 else None
            yield LayoutField(name, ctypes.sizeof(ctype), bit_width)


def field_mask(layout: Layout, path: str) -> int:
    """The bits ``path`` occupies in ``layout``, as a little-endian integer over its bytes."""
    field = next((f for f in layout_fields(layout) if f.path == path), None)
    if field is None:
        raise KeyError(f"{layout.__name__} has no field {path!r}")
    value = layout()
    *parents, leaf = path.split(".")
    owner: ctypes.Structure | ctypes.Union = value
    for name in parents:
        owner = getattr(owner, name)
    if field.bit_width is not None:
        setattr(owner, leaf, (1 << field.bit_width) - 1)
    else:
        offset: int = getattr(type(owner), leaf).offset
        ctypes.memset(ctypes.addressof(owner) + offset, 0xFF, field.size)
    return int.from_bytes(bytes(value), "little")


# --- PCI and BARs ----------------------------------------------------------------------------

DEVICE_VERSION_1 = 0x100
DEVICE_VERSION_2 = 0x200

IDXD_MMIO_BAR = 0
IDXD_WQ_BAR = 2
IDXD_PORTAL_SIZE = 0x1000  # PAGE_SIZE on x86-64, the only architecture the driver binds on

# --- Capabilities (read-only) ----------------------------------------------------------------

IDXD_VER_OFFSET = 0x00
# registers.h puts the major version in bits 7:4, yet the driver compares the raw register
# against DEVICE_VERSION_1 (0x100): report 0x100, as DSA 1.0 hardware does.
IDXD_VER_MAJOR_MASK = 0xF0
IDXD_VER_MINOR_MASK = 0x0F


class _GenCapFields(ctypes.LittleEndianStructure):
    _fields_ = [
        ("block_on_fault", _u64, 1),
        ("overlap_copy", _u64, 1),
        ("cache_control_mem", _u64, 1),
        ("cache_control_cache", _u64, 1),
        ("cmd_cap", _u64, 1),
        ("rsvd", _u64, 3),
        ("dest_readback", _u64, 1),
        ("drain_readback", _u64, 1),
        ("rsvd2", _u64, 6),
        ("max_xfer_shift", _u64, 5),
        ("max_batch_shift", _u64, 4),
        ("max_ims_mult", _u64, 6),
        ("config_en", _u64, 1),
        ("rsvd3", _u64, 32),
    ]


class GenCapReg(ctypes.LittleEndianUnion):
    """``union gen_cap_reg``: GENCAP, general capabilities."""

    _anonymous_ = ("_f",)
    _fields_ = [("_f", _GenCapFields), ("bits", _u64)]
    block_on_fault: int
    overlap_copy: int
    cache_control_mem: int
    cache_control_cache: int
    cmd_cap: int  # CMDCAP is valid, and the driver reads it
    rsvd: int
    dest_readback: int
    drain_readback: int
    rsvd2: int
    max_xfer_shift: int
    max_batch_shift: int
    max_ims_mult: int
    config_en: int  # groups, WQs and engines are configurable (else read-only config)
    rsvd3: int
    bits: int


assert ctypes.sizeof(GenCapReg) == 8
IDXD_GENCAP_OFFSET = 0x10


class _WqCapFields(ctypes.LittleEndianStructure):
    _fields_ = [
        ("total_wq_size", _u64, 16),
        ("num_wqs", _u64, 8),
        ("wqcfg_size", _u64, 4),
        ("rsvd", _u64, 20),
        ("shared_mode", _u64, 1),
        ("dedicated_mode", _u64, 1),
        ("wq_ats_support", _u64, 1),
        ("priority", _u64, 1),
        ("occupancy", _u64, 1),
        ("occupancy_int", _u64, 1),
        ("op_config", _u64, 1),
        ("rsvd3", _u64, 9),
    ]


class WqCapReg(ctypes.LittleEndianUnion):
    """``union wq_cap_reg``: WQCAP, work-queue capabilities."""

    _anonymous_ = ("_f",)
    _fields_ = [("_f", _WqCapFields), ("bits", _u64)]
    total_wq_size: int
    num_wqs: int
    wqcfg_size: int  # a WQCFG entry is 1 << (wqcfg_size + IDXD_WQCFG_MIN) bytes
    rsvd: int
    shared_mode: int
    dedicated_mode: int
    wq_ats_support: int
    priority: int
    occupancy: int
    occupancy_int: int
    op_config: int
    rsvd3: int
    bits: int


assert ctypes.sizeof(WqCapReg) == 8
IDXD_WQCAP_OFFSET = 0x20
IDXD_WQCFG_MIN = 5


class _GroupCapFields(ctypes.LittleEndianStructure):
    _fields_ = [
        ("num_groups", _u64, 8),
        ("total_rdbufs", _u64, 8),
        ("rdbuf_ctrl", _u64, 1),
        ("rdbuf_limit", _u64, 1),
        ("progress_limit", _u64, 1),
        ("rsvd", _u64, 45),
    ]


class GroupCapReg(ctypes.LittleEndianUnion):
    """``union group_cap_reg``: GRPCAP, group capabilities."""

    _anonymous_ = ("_f",)
    _fields_ = [("_f", _GroupCapFields), ("bits", _u64)]
    num_groups: int
    total_rdbufs: int
    rdbuf_ctrl: int
    rdbuf_limit: int
    progress_limit: int
    rsvd: int
    bits: int


assert ctypes.sizeof(GroupCapReg) == 8
IDXD_GRPCAP_OFFSET = 0x30


class _EngineCapFields(ctypes.LittleEndianStructure):
    _fields_ = [("num_engines", _u64, 8), ("rsvd", _u64, 56)]


class EngineCapReg(ctypes.LittleEndianUnion):
    """``union engine_cap_reg``: ENGCAP, engine capabilities."""

    _anonymous_ = ("_f",)
    _fields_ = [("_f", _EngineCapFields), ("bits", _u64)]
    num_engines: int
    rsvd: int
    bits: int


assert ctypes.sizeof(EngineCapReg) == 8
IDXD_ENGCAP_OFFSET = 0x38

# OPCAP is a 256-bit bitmap: bit n set means opcode n is supported.
IDXD_OPCAP_NOOP = 0x0001
IDXD_OPCAP_BATCH = 0x0002
IDXD_OPCAP_MEMMOVE = 0x0008


class OpCap(ctypes.LittleEndianStructure):
    """``struct opcap``: OPCAP, supported operations, one bit per opcode."""

    _fields_ = [("bits", _u64 * 4)]
    bits: ctypes.Array[ctypes.c_uint64]


assert ctypes.sizeof(OpCap) == 32
IDXD_MAX_OPCAP_BITS = 256
IDXD_OPCAP_OFFSET = 0x40


class _OffsetsFields(ctypes.LittleEndianStructure):
    _fields_ = [
        ("grpcfg", _u64, 16),
        ("wqcfg", _u64, 16),
        ("msix_perm", _u64, 16),
        ("ims", _u64, 16),
        ("perfmon", _u64, 16),
        ("rsvd", _u64, 48),
    ]


class OffsetsReg(ctypes.LittleEndianUnion):
    """``union offsets_reg``: OFFSETS, where the tables start, in IDXD_TABLE_MULT units.

    A zero ``perfmon`` (or ``ims``) offset means the block is absent.
    """

    _anonymous_ = ("_f",)
    _fields_ = [("_f", _OffsetsFields), ("bits", _u64 * 2)]
    grpcfg: int
    wqcfg: int
    msix_perm: int
    ims: int
    perfmon: int
    rsvd: int
    bits: ctypes.Array[ctypes.c_uint64]


assert ctypes.sizeof(OffsetsReg) == 16
IDXD_TABLE_OFFSET = 0x60
IDXD_TABLE_MULT = 0x100

# --- Configuration and control ---------------------------------------------------------------

IDXD_GENCFG_OFFSET = 0x80


class _GenCfgFields(ctypes.LittleEndianStructure):
    _fields_ = [
        ("rdbuf_limit", _u32, 8),
        ("rsvd", _u32, 4),
        ("user_int_en", _u32, 1),
        ("rsvd2", _u32, 19),
    ]


class GenCfgReg(ctypes.LittleEndianUnion):
    """``union gencfg_reg``: GENCFG, device-wide configuration."""

    _anonymous_ = ("_f",)
    _fields_ = [("_f", _GenCfgFields), ("bits", _u32)]
    rdbuf_limit: int
    rsvd: int
    user_int_en: int
    rsvd2: int
    bits: int


assert ctypes.sizeof(GenCfgReg) == 4

IDXD_GENCTRL_OFFSET = 0x88


class _GenCtrlFields(ctypes.LittleEndianStructure):
    _fields_ = [("softerr_int_en", _u32, 1), ("halt_int_en", _u32, 1), ("rsvd", _u32, 30)]


class GenCtrlReg(ctypes.LittleEndianUnion):
    """``union genctrl_reg``: GENCTRL, which error conditions raise the misc interrupt."""

    _anonymous_ = ("_f",)
    _fields_ = [("_f", _GenCtrlFields), ("bits", _u32)]
    softerr_int_en: int
    halt_int_en: int
    rsvd: int
    bits: int


assert ctypes.sizeof(GenCtrlReg) == 4


class GenCfgBit(enum.IntFlag):
    """Single-bit GENCFG fields (``rdbuf_limit`` is an 8-bit count, see :class:`GenCfgReg`)."""

    USER_INT_EN = field_mask(GenCfgReg, "user_int_en")


class GenCtrlBit(enum.IntFlag):
    """GENCTRL interrupt enables."""

    SOFTERR_INT_EN = field_mask(GenCtrlReg, "softerr_int_en")
    HALT_INT_EN = field_mask(GenCtrlReg, "halt_int_en")


IDXD_GENSTATS_OFFSET = 0x90


class _GenStsFields(ctypes.LittleEndianStructure):
    _fields_ = [("state", _u32, 2), ("reset_type", _u32, 2), ("rsvd", _u32, 28)]


class GenStsReg(ctypes.LittleEndianUnion):
    """``union gensts_reg``: GENSTS, device state and, when halted, the reset it needs."""

    _anonymous_ = ("_f",)
    _fields_ = [("_f", _GenStsFields), ("bits", _u32)]
    state: int  # IdxdDeviceStatusState
    reset_type: int  # IdxdDeviceResetType, meaningful in HALT
    rsvd: int
    bits: int


assert ctypes.sizeof(GenStsReg) == 4


class IdxdDeviceStatusState(enum.IntEnum):
    """``enum idxd_device_status_state`` (``IDXD_DEVICE_STATE_*``): GENSTS.state."""

    DISABLED = 0
    ENABLED = 1
    DRAIN = 2
    HALT = 3


class IdxdDeviceResetType(enum.IntEnum):
    """``enum idxd_device_reset_type`` (``IDXD_DEVICE_RESET_*``): GENSTS.reset_type in HALT.

    On SOFTWARE the driver re-initialises the device itself; on the others it gives up.
    """

    SOFTWARE = 0
    FLR = 1
    WARM = 2
    COLD = 3


IDXD_INTCAUSE_OFFSET = 0x98


class IdxdIntc(enum.IntFlag):
    """``IDXD_INTC_*``: INTCAUSE bits, write-1-to-clear, behind MSI-X vector 0."""

    ERR = 0x01  # a software error was logged in SWERR
    CMD = 0x02  # a command with int_req set has completed
    OCCUPY = 0x04
    PERFMON_OVFL = 0x08
    HALT_STATE = 0x10
    INT_HANDLE_REVOKED = 0x80000000


IDXD_CMD_OFFSET = 0xA0


class _CommandFields(ctypes.LittleEndianStructure):
    _fields_ = [
        ("operand", _u32, 20),
        ("cmd", _u32, 5),
        ("rsvd", _u32, 6),
        ("int_req", _u32, 1),
    ]


class IdxdCommandReg(ctypes.LittleEndianUnion):
    """``union idxd_command_reg``: CMD; a write starts the command."""

    _anonymous_ = ("_f",)
    _fields_ = [("_f", _CommandFields), ("bits", _u32)]
    operand: int
    cmd: int  # IdxdCmd
    rsvd: int
    int_req: int  # raise IdxdIntc.CMD on completion
    bits: int


assert ctypes.sizeof(IdxdCommandReg) == 4


class IdxdCmd(enum.IntEnum):
    """``enum idxd_cmd`` (``IDXD_CMD_*``): CMD.cmd; CMDCAP bit n advertises command n."""

    ENABLE_DEVICE = 1
    DISABLE_DEVICE = 2
    DRAIN_ALL = 3
    ABORT_ALL = 4
    RESET_DEVICE = 5
    ENABLE_WQ = 6
    DISABLE_WQ = 7
    DRAIN_WQ = 8
    ABORT_WQ = 9
    RESET_WQ = 10
    DRAIN_PASID = 11
    ABORT_PASID = 12
    REQUEST_INT_HANDLE = 13
    RELEASE_INT_HANDLE = 14


# Operand bit of REQUEST/RELEASE_INT_HANDLE: the index is an IMS entry, not an MSI-X vector.
CMD_INT_HANDLE_IMS = 0x10000

IDXD_CMDSTS_OFFSET = 0xA8


class _CmdStsFields(ctypes.LittleEndianStructure):
    # Bits as the driver reads them, through IDXD_CMDSTS_ERR_MASK/RES_SHIFT/ACTIVE: err 7:0,
    # result 23:8, active 31. registers.h's own struct (u8 err; u16 result; u8 rsvd:7, active:1)
    # is not packed inside the packed union, so gcc pads it to 6 bytes with result at bits 31:16:
    # it disagrees with those masks, and the driver never uses its fields.
    _fields_ = [
        ("err", _u32, 8),
        ("result", _u32, 16),
        ("rsvd", _u32, 7),
        ("active", _u32, 1),
    ]


class CmdStsReg(ctypes.LittleEndianUnion):
    """``union cmdsts_reg``: CMDSTS, status of the last command; the driver polls ``active``."""

    _anonymous_ = ("_f",)
    _fields_ = [("_f", _CmdStsFields), ("bits", _u32)]
    err: int  # IdxdCmdstsErr
    result: int  # e.g. the handle granted by REQUEST_INT_HANDLE
    rsvd: int
    active: int
    bits: int


assert ctypes.sizeof(CmdStsReg) == 4
IDXD_CMDSTS_ACTIVE = 0x80000000
IDXD_CMDSTS_ERR_MASK = 0xFF
IDXD_CMDSTS_RES_SHIFT = 8


class IdxdCmdstsErr(enum.IntEnum):
    """``enum idxd_cmdsts_err`` (``IDXD_CMDSTS_*``): CMDSTS.err, grouped by command."""

    SUCCESS = 0
    INVAL_CMD = 0x01
    INVAL_WQIDX = 0x02
    HW_ERR = 0x03
    # enable device
    ERR_DEV_ENABLED = 0x10
    ERR_CONFIG = 0x11
    ERR_BUSMASTER_EN = 0x12
    ERR_PASID_INVAL = 0x13
    ERR_WQ_SIZE_ERANGE = 0x14
    ERR_GRP_CONFIG = 0x15
    ERR_GRP_CONFIG2 = 0x16
    ERR_GRP_CONFIG3 = 0x17
    ERR_GRP_CONFIG4 = 0x18
    # enable WQ
    ERR_DEV_NOTEN = 0x20
    ERR_WQ_ENABLED = 0x21
    ERR_WQ_SIZE = 0x22
    ERR_WQ_PRIOR = 0x23
    ERR_WQ_MODE = 0x24
    ERR_BOF_EN = 0x25
    ERR_PASID_EN = 0x26
    ERR_MAX_BATCH_SIZE = 0x27
    ERR_MAX_XFER_SIZE = 0x28
    # disable device
    ERR_DIS_DEV_EN = 0x31
    # disable, drain, abort or reset WQ
    ERR_DEV_NOT_EN = 0x32
    # request interrupt handle
    ERR_INVAL_INT_IDX = 0x41
    ERR_NO_HANDLE = 0x42


IDXD_CMDCAP_OFFSET = 0xB0  # 32-bit bitmap, bit n set: IdxdCmd n is supported

# --- Software error log ----------------------------------------------------------------------

IDXD_SWERR_OFFSET = 0xC0
IDXD_SWERR_VALID = 0x00000001
IDXD_SWERR_OVERFLOW = 0x00000002
IDXD_SWERR_ACK = IDXD_SWERR_VALID | IDXD_SWERR_OVERFLOW  # what the driver writes back to clear


class _SwErrFields(ctypes.LittleEndianStructure):
    _fields_ = [
        # qword 0
        ("valid", _u64, 1),
        ("overflow", _u64, 1),
        ("desc_valid", _u64, 1),
        ("wq_idx_valid", _u64, 1),
        ("batch", _u64, 1),
        ("fault_rw", _u64, 1),
        ("priv", _u64, 1),
        ("rsvd", _u64, 1),
        ("error", _u64, 8),
        ("wq_idx", _u64, 8),
        ("rsvd2", _u64, 8),
        ("operation", _u64, 8),
        ("pasid", _u64, 20),
        ("rsvd3", _u64, 4),
        # qword 1
        ("batch_idx", _u64, 16),
        ("rsvd4", _u64, 16),
        ("invalid_flags", _u64, 32),
        # qwords 2 and 3
        ("fault_addr", _u64),
        ("rsvd5", _u64),
    ]


class SwErrReg(ctypes.LittleEndianUnion):
    """``union sw_err_reg``: SWERR, the first software error not yet acknowledged."""

    _anonymous_ = ("_f",)
    _fields_ = [("_f", _SwErrFields), ("bits", _u64 * 4)]
    valid: int
    overflow: int  # another error happened while valid was set
    desc_valid: int
    wq_idx_valid: int
    batch: int
    fault_rw: int
    priv: int
    rsvd: int
    error: int  # SwErrCode
    wq_idx: int
    rsvd2: int
    operation: int
    pasid: int
    rsvd3: int
    batch_idx: int
    rsvd4: int
    invalid_flags: int
    fault_addr: int
    rsvd5: int
    bits: ctypes.Array[ctypes.c_uint64]


assert ctypes.sizeof(SwErrReg) == 32

# SWERR.error shares the completion-status code space: idxd.h reserves 0xff as a software
# status "that will never appear in completion status and only SWERR register".
SwErrCode = DsaCompStatus

# --- Tables: group configuration -------------------------------------------------------------


class _GroupFlagsFields(ctypes.LittleEndianStructure):
    _fields_ = [
        ("tc_a", _u64, 3),
        ("tc_b", _u64, 3),
        ("rsvd", _u64, 1),
        ("use_rdbuf_limit", _u64, 1),
        ("rdbufs_reserved", _u64, 8),
        ("rsvd2", _u64, 4),
        ("rdbufs_allowed", _u64, 8),
        ("rsvd3", _u64, 4),
        ("desc_progress_limit", _u64, 2),
        ("rsvd4", _u64, 2),
        ("batch_progress_limit", _u64, 2),
        ("rsvd5", _u64, 26),
    ]


class GroupFlags(ctypes.LittleEndianUnion):
    """``union group_flags``: GRPFLAGS, the third register of a GRPCFG entry."""

    _anonymous_ = ("_f",)
    _fields_ = [("_f", _GroupFlagsFields), ("bits", _u64)]
    tc_a: int
    tc_b: int
    rsvd: int
    use_rdbuf_limit: int
    rdbufs_reserved: int
    rsvd2: int
    rdbufs_allowed: int
    rsvd3: int
    desc_progress_limit: int
    rsvd4: int
    batch_progress_limit: int
    rsvd5: int
    bits: int


assert ctypes.sizeof(GroupFlags) == 8


class GrpCfg(ctypes.LittleEndianStructure):
    """``struct grpcfg``: one GRPCFG entry; entries are GRPCFG_SIZE apart, the rest reserved."""

    _fields_ = [("wqs", _u64 * 4), ("engines", _u64), ("flags", GroupFlags)]
    wqs: ctypes.Array[ctypes.c_uint64]  # bitmap of the WQs in the group, WQ n is bit n % 64
    engines: int  # bitmap of the engines in the group
    flags: GroupFlags


assert ctypes.sizeof(GrpCfg) == 48
GRPCFG_SIZE = 64
GRPWQCFG_STRIDES = 4

# --- Tables: work-queue configuration --------------------------------------------------------


class _WqCfgFields(ctypes.LittleEndianStructure):
    _fields_ = [
        # dword 0
        ("wq_size", _u16),
        ("rsvd", _u16),
        # dword 1
        ("wq_thresh", _u16),
        ("rsvd1", _u16),
        # dword 2
        ("mode", _u32, 1),
        ("bof", _u32, 1),
        ("wq_ats_disable", _u32, 1),
        ("rsvd2", _u32, 1),
        ("priority", _u32, 4),
        ("pasid", _u32, 20),
        ("pasid_en", _u32, 1),
        ("priv", _u32, 1),
        ("rsvd3", _u32, 2),
        # dword 3
        ("max_xfer_shift", _u32, 5),
        ("max_batch_shift", _u32, 4),
        ("rsvd4", _u32, 23),
        # dword 4
        ("occupancy_inth", _u16),
        ("occupancy_table_sel", _u16, 1),
        ("rsvd5", _u16, 15),
        # dword 5
        ("occupancy_limit", _u16),
        ("occupancy_int_en", _u16, 1),
        ("rsvd6", _u16, 15),
        # dword 6
        ("occupancy", _u16),
        ("occupancy_int", _u16, 1),
        ("rsvd7", _u16, 12),
        ("mode_support", _u16, 1),
        ("wq_state", _u16, 2),
        # dword 7
        ("rsvd8", _u32),
        # dwords 8-15: only present when WQCAP.wqcfg_size makes entries 64 bytes (DSA 2.0)
        ("op_config", _u64 * 4),
    ]


class WqCfg(ctypes.LittleEndianUnion):
    """``union wqcfg``: one WQCFG entry, accessed by the driver as 32-bit dwords (``bits``).

    On DSA 1.x an entry is 32 bytes (WQCAP.wqcfg_size == 0): dwords 0-7 only.
    """

    _anonymous_ = ("_f",)
    _fields_ = [("_f", _WqCfgFields), ("bits", _u32 * 16)]
    wq_size: int
    rsvd: int
    wq_thresh: int
    rsvd1: int
    mode: int  # IdxdWqMode
    bof: int
    wq_ats_disable: int
    rsvd2: int
    priority: int
    pasid: int
    pasid_en: int
    priv: int
    rsvd3: int
    max_xfer_shift: int
    max_batch_shift: int
    rsvd4: int
    occupancy_inth: int
    occupancy_table_sel: int
    rsvd5: int
    occupancy_limit: int
    occupancy_int_en: int
    rsvd6: int
    occupancy: int
    occupancy_int: int
    rsvd7: int
    mode_support: int
    wq_state: int  # IdxdWqState, read-only to the driver
    rsvd8: int
    op_config: ctypes.Array[ctypes.c_uint64]
    bits: ctypes.Array[ctypes.c_uint32]


assert ctypes.sizeof(WqCfg) == 64
WQCFG_PASID_IDX = 2
WQCFG_PRIVL_IDX = 2
WQCFG_OCCUP_IDX = 6
WQCFG_OCCUP_MASK = 0xFFFF


class IdxdWqMode(enum.IntEnum):
    """WQCFG.mode; registers.h comments it "shared or dedicated", device.c sets 1 for dedicated."""

    SHARED = 0
    DEDICATED = 1


class IdxdWqState(enum.IntEnum):
    """``enum idxd_wq_state`` (``IDXD_WQ_*``): WQCFG.wq_state."""

    DISABLED = 0
    ENABLED = 1


# --- Tables: MSI-X permissions ---------------------------------------------------------------


class _MsixPermFields(ctypes.LittleEndianStructure):
    _fields_ = [
        ("rsvd", _u32, 2),
        ("ignore", _u32, 1),
        ("pasid_en", _u32, 1),
        ("rsvd2", _u32, 8),
        ("pasid", _u32, 20),
    ]


class MsixPerm(ctypes.LittleEndianUnion):
    """``union msix_perm``: low dword of the MSI-X permission entry for one vector."""

    _anonymous_ = ("_f",)
    _fields_ = [("_f", _MsixPermFields), ("bits", _u32)]
    rsvd: int
    ignore: int
    pasid_en: int
    rsvd2: int
    pasid: int
    bits: int


assert ctypes.sizeof(MsixPerm) == 4
# Not named in registers.h: device.c open-codes "msix_perm_offset + ie->id * 8".
MSIX_PERM_STRIDE = 8

# --- Performance monitoring (advertised absent: OFFSETS.perfmon == 0) ------------------------

IDXD_PERFCAP_OFFSET = 0x0  # relative to the perfmon block


class _PerfCapFields(ctypes.LittleEndianStructure):
    _fields_ = [
        ("num_perf_counter", _u64, 6),
        ("rsvd1", _u64, 2),
        ("counter_width", _u64, 8),
        ("num_event_category", _u64, 4),
        ("global_event_category", _u64, 16),
        ("filter", _u64, 8),
        ("rsvd2", _u64, 8),
        ("cap_per_counter", _u64, 1),
        ("writeable_counter", _u64, 1),
        ("counter_freeze", _u64, 1),
        ("overflow_interrupt", _u64, 1),
        ("rsvd3", _u64, 8),
    ]


class IdxdPerfCap(ctypes.LittleEndianUnion):
    """``union idxd_perfcap``: PERFCAP; the driver skips perfmon when num_perf_counter is 0."""

    _anonymous_ = ("_f",)
    _fields_ = [("_f", _PerfCapFields), ("bits", _u64)]
    num_perf_counter: int
    rsvd1: int
    counter_width: int
    num_event_category: int
    global_event_category: int
    filter: int
    rsvd2: int
    cap_per_counter: int
    writeable_counter: int
    counter_freeze: int
    overflow_interrupt: int
    rsvd3: int
    bits: int


assert ctypes.sizeof(IdxdPerfCap) == 8

# --- The fixed MMIO map ----------------------------------------------------------------------


class Access(enum.Enum):
    """How a register reacts to a guest write."""

    RO = "read-only"  # writes are guest errors and ignored
    RW = "read-write"  # write_mask bits take the written value
    W1C = "write-1-to-clear"  # write_mask bits written as 1 are cleared
    CMD = "command"  # the write is a command for the device model to execute


@dataclass(frozen=True)
class MmioRegister:
    """One fixed BAR0 register: where it is, how wide, and how writes behave."""

    name: str
    offset: int
    size: int
    access: Access
    write_mask: int = 0  # over the register's bytes, little-endian; 0 for RO
    layout: Layout | None = None


FIXED_REGISTERS: tuple[MmioRegister, ...] = (
    MmioRegister("VERSION", IDXD_VER_OFFSET, 4, Access.RO),
    MmioRegister("GENCAP", IDXD_GENCAP_OFFSET, 8, Access.RO, layout=GenCapReg),
    MmioRegister("WQCAP", IDXD_WQCAP_OFFSET, 8, Access.RO, layout=WqCapReg),
    MmioRegister("GRPCAP", IDXD_GRPCAP_OFFSET, 8, Access.RO, layout=GroupCapReg),
    MmioRegister("ENGCAP", IDXD_ENGCAP_OFFSET, 8, Access.RO, layout=EngineCapReg),
    MmioRegister("OPCAP", IDXD_OPCAP_OFFSET, 32, Access.RO, layout=OpCap),
    MmioRegister("OFFSETS", IDXD_TABLE_OFFSET, 16, Access.RO, layout=OffsetsReg),
    MmioRegister(
        "GENCFG",
        IDXD_GENCFG_OFFSET,
        4,
        Access.RW,
        field_mask(GenCfgReg, "rdbuf_limit") | int(GenCfgBit.USER_INT_EN),
        GenCfgReg,
    ),
    MmioRegister(
        "GENCTRL",
        IDXD_GENCTRL_OFFSET,
        4,
        Access.RW,
        int(GenCtrlBit.SOFTERR_INT_EN | GenCtrlBit.HALT_INT_EN),
        GenCtrlReg,
    ),
    MmioRegister("GENSTS", IDXD_GENSTATS_OFFSET, 4, Access.RO, layout=GenStsReg),
    MmioRegister("INTCAUSE", IDXD_INTCAUSE_OFFSET, 4, Access.W1C, sum(IdxdIntc)),
    MmioRegister("CMD", IDXD_CMD_OFFSET, 4, Access.CMD, 0xFFFF_FFFF, IdxdCommandReg),
    MmioRegister("CMDSTS", IDXD_CMDSTS_OFFSET, 4, Access.RO, layout=CmdStsReg),
    MmioRegister("CMDCAP", IDXD_CMDCAP_OFFSET, 4, Access.RO),
    MmioRegister("SWERR", IDXD_SWERR_OFFSET, 32, Access.W1C, IDXD_SWERR_ACK, SwErrReg),
)

FIXED_REGISTERS_END = max(r.offset + r.size for r in FIXED_REGISTERS)


def register_at(offset: int) -> MmioRegister | None:
    """The fixed register containing BAR0 byte ``offset``, if any."""
    return next((r for r in FIXED_REGISTERS if r.offset <= offset < r.offset + r.size), None)


# --- The variable tables for one topology ----------------------------------------------------


class Table(enum.Enum):
    """The per-object BAR0 tables OFFSETS points at."""

    GRPCFG = "GRPCFG"
    WQCFG = "WQCFG"
    MSIX_PERM = "MSIX_PERM"


@dataclass(frozen=True)
class TableSlot:
    """A BAR0 offset resolved to a table entry."""

    table: Table
    index: int  # group, WQ, or MSI-X vector
    inner: int  # byte offset inside the entry


def _align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _pow2_at_least(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


@dataclass(frozen=True)
class TableLayout:
    """Where the GRPCFG, WQCFG and MSI-X permission tables sit in BAR0 for one topology.

    The tables follow the fixed registers in that order, each starting on an IDXD_TABLE_MULT
    boundary as OFFSETS requires. IMS and perfmon are absent (offset 0). The offset methods
    mirror the driver's macros, so the device model decodes exactly what the driver writes.
    """

    num_groups: int
    num_wqs: int
    num_msix: int  # MSI-X vectors, one permission entry each
    wqcfg_size_field: int = 0  # WQCAP.wqcfg_size; 0 gives the 32-byte DSA 1.x entry

    def __post_init__(self) -> None:
        # Bounds are the widths of GRPCAP.num_groups, WQCAP.num_wqs and WQCAP.wqcfg_size.
        if not 1 <= self.num_groups <= 0xFF:
            raise ValueError(f"num_groups {self.num_groups} outside 1..255")
        if not 1 <= self.num_wqs <= 0xFF:
            raise ValueError(f"num_wqs {self.num_wqs} outside 1..255")
        if self.num_msix < 1:
            raise ValueError(f"num_msix {self.num_msix} < 1")
        if not 0 <= self.wqcfg_size_field <= 0xF:
            raise ValueError(f"wqcfg_size_field {self.wqcfg_size_field} outside 0..15")

    @property
    def wqcfg_size(self) -> int:
        """Bytes per WQCFG entry, as init.c derives it from WQCAP."""
        return 1 << (self.wqcfg_size_field + IDXD_WQCFG_MIN)

    @property
    def grpcfg_offset(self) -> int:
        return _align_up(FIXED_REGISTERS_END, IDXD_TABLE_MULT)

    @property
    def wqcfg_offset(self) -> int:
        return _align_up(self.grpcfg_offset + self.num_groups * GRPCFG_SIZE, IDXD_TABLE_MULT)

    @property
    def msix_perm_offset(self) -> int:
        return _align_up(self.wqcfg_offset + self.num_wqs * self.wqcfg_size, IDXD_TABLE_MULT)

    @property
    def end(self) -> int:
        """First byte past the last table."""
        return self.msix_perm_offset + self.num_msix * MSIX_PERM_STRIDE

    @property
    def bar0_size(self) -> int:
        """BAR0 size: a power of two (PCI), at least a page so it can be mapped."""
        return max(IDXD_PORTAL_SIZE, _pow2_at_least(self.end))

    def offsets_reg(self) -> OffsetsReg:
        """The OFFSETS register value advertising this layout."""
        reg = OffsetsReg()
        reg.grpcfg = self.grpcfg_offset // IDXD_TABLE_MULT
        reg.wqcfg = self.wqcfg_offset // IDXD_TABLE_MULT
        reg.msix_perm = self.msix_perm_offset // IDXD_TABLE_MULT
        return reg

    def grpwqcfg_offset(self, group: int, ofs: int) -> int:
        """``GRPWQCFG_OFFSET``: qword ``ofs`` of the WQ bitmap of ``group``."""
        return self.grpcfg_offset + group * GRPCFG_SIZE + 8 * ofs

    def grpengcfg_offset(self, group: int) -> int:
        """``GRPENGCFG_OFFSET``: the engine bitmap of ``group``."""
        return self.grpcfg_offset + group * GRPCFG_SIZE + 32

    def grpflgcfg_offset(self, group: int) -> int:
        """``GRPFLGCFG_OFFSET``: the flags of ``group``."""
        return self.grpcfg_offset + group * GRPCFG_SIZE + 40

    def wqcfg_entry_offset(self, wq: int, ofs: int = 0) -> int:
        """``WQCFG_OFFSET``: dword ``ofs`` of the WQCFG entry of ``wq``."""
        return self.wqcfg_offset + wq * self.wqcfg_size + 4 * ofs

    def msix_perm_entry_offset(self, vector: int) -> int:
        """The MSI-X permission entry of ``vector``, as device.c addresses it."""
        return self.msix_perm_offset + vector * MSIX_PERM_STRIDE

    def locate(self, offset: int) -> TableSlot | None:
        """The table entry containing BAR0 byte ``offset``, or None outside every entry."""
        spans = (
            (Table.GRPCFG, self.grpcfg_offset, GRPCFG_SIZE, self.num_groups),
            (Table.WQCFG, self.wqcfg_offset, self.wqcfg_size, self.num_wqs),
            (Table.MSIX_PERM, self.msix_perm_offset, MSIX_PERM_STRIDE, self.num_msix),
        )
        for table, start, stride, count in spans:
            if start <= offset < start + stride * count:
                index, inner = divmod(offset - start, stride)
                return TableSlot(table, index, inner)
        return None


# --- BAR2: work-queue portals ----------------------------------------------------------------


class IdxdPortal(enum.IntEnum):
    """The four portal pages of a WQ, in BAR2 order.

    The driver's ``enum idxd_portal_prot`` names only the first two (UNLIMITED = 0,
    LIMITED = 1) and maps only the limited MSI-X portal; the IMS pair follows them.
    """

    UNLIMITED_MSIX = 0
    LIMITED_MSIX = 1
    UNLIMITED_IMS = 2
    LIMITED_IMS = 3


IDXD_PORTALS_PER_WQ = len(IdxdPortal)


def wq_portal_offset(wq: int, portal: IdxdPortal) -> int:
    """BAR2 offset of a portal page, as ``idxd_get_wq_portal_full_offset`` computes it."""
    return (wq * IDXD_PORTALS_PER_WQ + portal) * IDXD_PORTAL_SIZE


def wq_bar_size(num_wqs: int) -> int:
    """BAR2 size for ``num_wqs`` WQs: every portal page, rounded up to a power of two."""
    return _pow2_at_least(num_wqs * IDXD_PORTALS_PER_WQ * IDXD_PORTAL_SIZE)
