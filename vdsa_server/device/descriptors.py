"""DSA work descriptors and completion records, as Linux 6.1 ``include/uapi/linux/idxd.h`` has them.

Naming follows that header: each struct becomes a ctypes layout named after its C tag in
CamelCase (``struct dsa_hw_desc`` -> ``DsaHwDesc``) with the C field names; anonymous unions and
structs stay anonymous, so ``desc.xfer_size`` reads as in C. Enum members drop the prefix their C
names share (``DSA_OPCODE_MEMMOVE`` -> ``DsaOpcode.MEMMOVE``).

Only the DSA half of the header is here; the IAX descriptor, opcodes and statuses are left out.
The 6.1 header has neither DIF flag bit definitions nor event-log fields: the DIF flag bytes are
plain ``uint8`` fields below.
"""

from __future__ import annotations

import ctypes
import enum

_u8 = ctypes.c_uint8
_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64


class IdxdOpFlag(enum.IntFlag):
    """``IDXD_OP_FLAG_*``: descriptor flags common to all DSA operations."""

    FENCE = 0x0001
    BOF = 0x0002  # block on fault
    CRAV = 0x0004  # completion record address valid
    RCR = 0x0008  # request completion record
    RCI = 0x0010  # request completion interrupt
    CRSTS = 0x0020
    CR = 0x0080
    CC = 0x0100  # cache control: write the destination to cache
    ADDR1_TCS = 0x0200
    ADDR2_TCS = 0x0400
    ADDR3_TCS = 0x0800
    CR_TCS = 0x1000
    STORD = 0x2000
    DRDBK = 0x4000  # destination readback
    DSTS = 0x8000


class DsaOpcode(enum.IntEnum):
    """``enum dsa_opcode`` (``DSA_OPCODE_*``); OPCAP bit n advertises opcode n."""

    NOOP = 0x00
    BATCH = 0x01
    DRAIN = 0x02
    MEMMOVE = 0x03
    MEMFILL = 0x04
    COMPARE = 0x05
    COMPVAL = 0x06
    CR_DELTA = 0x07
    AP_DELTA = 0x08
    DUALCAST = 0x09
    CRCGEN = 0x10
    COPY_CRC = 0x11
    DIF_CHECK = 0x12
    DIF_INS = 0x13
    DIF_STRP = 0x14
    DIF_UPDT = 0x15
    CFLUSH = 0x20


class DsaCompStatus(enum.IntEnum):
    """``enum dsa_completion_status`` (``DSA_COMP_*``): the low 7 bits of a record's status."""

    NONE = 0x00  # not yet written: software polls for a non-zero status
    SUCCESS = 0x01
    SUCCESS_PRED = 0x02  # success with a false predicate (compare mismatch and the like)
    PAGE_FAULT_NOBOF = 0x03
    PAGE_FAULT_IR = 0x04
    BATCH_FAIL = 0x05
    BATCH_PAGE_FAULT = 0x06
    DR_OFFSET_NOINC = 0x07
    DR_OFFSET_ERANGE = 0x08
    DIF_ERR = 0x09
    BAD_OPCODE = 0x10
    INVALID_FLAGS = 0x11
    NOZERO_RESERVE = 0x12
    XFER_ERANGE = 0x13
    DESC_CNT_ERANGE = 0x14
    DR_ERANGE = 0x15
    OVERLAP_BUFFERS = 0x16
    DCAST_ERR = 0x17
    DESCLIST_ALIGN = 0x18
    INT_HANDLE_INVAL = 0x19
    CRA_XLAT = 0x1A
    CRA_ALIGN = 0x1B
    ADDR_ALIGN = 0x1C
    PRIV_BAD = 0x1D
    TRAFFIC_CLASS_CONF = 0x1E
    PFAULT_RDBA = 0x1F
    HW_ERR1 = 0x20
    HW_ERR_DRB = 0x21
    TRANSLATION_FAIL = 0x22


DSA_COMP_STATUS_MASK = 0x7F
DSA_COMP_STATUS_WRITE = 0x80  # with a page-fault status: the fault was on a write


# --- struct dsa_hw_desc ----------------------------------------------------------------------


class _DescSrc(ctypes.LittleEndianUnion):
    _fields_ = [
        ("src_addr", _u64),
        ("rdback_addr", _u64),
        ("pattern", _u64),
        ("desc_list_addr", _u64),  # batch
    ]


class _DescDst(ctypes.LittleEndianUnion):
    _fields_ = [
        ("dst_addr", _u64),
        ("rdback_addr2", _u64),
        ("src2_addr", _u64),
        ("comp_pattern", _u64),
    ]


class _DescSize(ctypes.LittleEndianUnion):
    _fields_ = [("xfer_size", _u32), ("desc_count", _u32)]  # desc_count: batch


class _DescDelta(ctypes.LittleEndianStructure):
    _fields_ = [
        ("delta_addr", _u64),
        ("max_delta_size", _u32),
        ("delt_rsvd", _u32),
        ("expected_res_mask", _u8),
    ]


class _DescCrc(ctypes.LittleEndianStructure):
    _fields_ = [("crc_seed", _u32), ("crc_rsvd", _u32), ("seed_addr", _u64)]


class _DescDifCheck(ctypes.LittleEndianStructure):
    """DIF check or strip."""

    _fields_ = [
        ("src_dif_flags", _u8),
        ("dif_chk_res", _u8),
        ("dif_chk_flags", _u8),
        ("dif_chk_res2", _u8 * 5),
        ("chk_ref_tag_seed", _u32),
        ("chk_app_tag_mask", _u16),
        ("chk_app_tag_seed", _u16),
    ]


class _DescDifInsert(ctypes.LittleEndianStructure):
    _fields_ = [
        ("dif_ins_res", _u8),
        ("dest_dif_flag", _u8),
        ("dif_ins_flags", _u8),
        ("dif_ins_res2", _u8 * 13),
        ("ins_ref_tag_seed", _u32),
        ("ins_app_tag_mask", _u16),
        ("ins_app_tag_seed", _u16),
    ]


class _DescDifUpdate(ctypes.LittleEndianStructure):
    _fields_ = [
        ("src_upd_flags", _u8),
        ("upd_dest_flags", _u8),
        ("dif_upd_flags", _u8),
        ("dif_upd_res", _u8 * 5),
        ("src_ref_tag_seed", _u32),
        ("src_app_tag_mask", _u16),
        ("src_app_tag_seed", _u16),
        ("dest_ref_tag_seed", _u32),
        ("dest_app_tag_mask", _u16),
        ("dest_app_tag_seed", _u16),
    ]


class _DescOpSpecific(ctypes.LittleEndianUnion):
    _anonymous_ = ("_delta", "_crc", "_dif_chk", "_dif_ins", "_dif_upd")
    _fields_ = [
        ("expected_res", _u8),  # compare, compare pattern
        ("_delta", _DescDelta),  # create delta record
        ("delta_rec_size", _u32),  # apply delta record
        ("dest2", _u64),  # dualcast
        ("_crc", _DescCrc),
        ("_dif_chk", _DescDifCheck),
        ("_dif_ins", _DescDifInsert),
        ("_dif_upd", _DescDifUpdate),
        ("op_specific", _u8 * 24),
    ]


assert ctypes.sizeof(_DescOpSpecific) == 24


class DsaHwDesc(ctypes.LittleEndianStructure):
    """``struct dsa_hw_desc``: the 64-byte descriptor written to a portal or listed in a batch."""

    _anonymous_ = ("_src", "_dst", "_size", "_op")
    _fields_ = [
        ("pasid", _u32, 20),
        ("rsvd", _u32, 11),
        ("priv", _u32, 1),
        ("flags", _u32, 24),  # IdxdOpFlag
        ("opcode", _u32, 8),  # DsaOpcode
        ("completion_addr", _u64),
        ("_src", _DescSrc),
        ("_dst", _DescDst),
        ("_size", _DescSize),
        ("int_handle", _u16),
        ("rsvd1", _u16),
        ("_op", _DescOpSpecific),
    ]
    pasid: int
    rsvd: int
    priv: int
    flags: int
    opcode: int
    completion_addr: int
    src_addr: int
    rdback_addr: int
    pattern: int
    desc_list_addr: int
    dst_addr: int
    rdback_addr2: int
    src2_addr: int
    comp_pattern: int
    xfer_size: int
    desc_count: int
    int_handle: int
    rsvd1: int
    expected_res: int
    delta_addr: int
    max_delta_size: int
    delt_rsvd: int
    expected_res_mask: int
    delta_rec_size: int
    dest2: int
    crc_seed: int
    crc_rsvd: int
    seed_addr: int
    src_dif_flags: int
    dif_chk_res: int
    dif_chk_flags: int
    dif_chk_res2: ctypes.Array[ctypes.c_uint8]
    chk_ref_tag_seed: int
    chk_app_tag_mask: int
    chk_app_tag_seed: int
    dif_ins_res: int
    dest_dif_flag: int
    dif_ins_flags: int
    dif_ins_res2: ctypes.Array[ctypes.c_uint8]
    ins_ref_tag_seed: int
    ins_app_tag_mask: int
    ins_app_tag_seed: int
    src_upd_flags: int
    upd_dest_flags: int
    dif_upd_flags: int
    dif_upd_res: ctypes.Array[ctypes.c_uint8]
    src_ref_tag_seed: int
    src_app_tag_mask: int
    src_app_tag_seed: int
    dest_ref_tag_seed: int
    dest_app_tag_mask: int
    dest_app_tag_seed: int
    op_specific: ctypes.Array[ctypes.c_uint8]


assert ctypes.sizeof(DsaHwDesc) == 64


class DsaRawDesc(ctypes.LittleEndianStructure):
    """``struct dsa_raw_desc``: a descriptor as eight qwords."""

    _fields_ = [("field", _u64 * 8)]
    field: ctypes.Array[ctypes.c_uint64]


assert ctypes.sizeof(DsaRawDesc) == 64


# --- struct dsa_completion_record ------------------------------------------------------------


class _CompResult(ctypes.LittleEndianUnion):
    _fields_ = [("result", _u8), ("dif_status", _u8)]


class _CompCommon(ctypes.LittleEndianStructure):
    _fields_ = [("invalid_flags", _u32, 24), ("rsvd2", _u32, 8)]


class _CompDifCheck(ctypes.LittleEndianStructure):
    """DIF check and strip."""

    _fields_ = [
        ("dif_chk_ref_tag", _u32),
        ("dif_chk_app_tag_mask", _u16),
        ("dif_chk_app_tag", _u16),
    ]


class _CompDifInsert(ctypes.LittleEndianStructure):
    _fields_ = [
        ("dif_ins_res", _u64),
        ("dif_ins_ref_tag", _u32),
        ("dif_ins_app_tag_mask", _u16),
        ("dif_ins_app_tag", _u16),
    ]


class _CompDifUpdate(ctypes.LittleEndianStructure):
    _fields_ = [
        ("dif_upd_src_ref_tag", _u32),
        ("dif_upd_src_app_tag_mask", _u16),
        ("dif_upd_src_app_tag", _u16),
        ("dif_upd_dest_ref_tag", _u32),
        ("dif_upd_dest_app_tag_mask", _u16),
        ("dif_upd_dest_app_tag", _u16),
    ]


class _CompOpSpecific(ctypes.LittleEndianUnion):
    _anonymous_ = ("_common", "_dif_chk", "_dif_ins", "_dif_upd")
    _fields_ = [
        ("_common", _CompCommon),
        ("delta_rec_size", _u32),
        ("crc_val", _u64),
        ("_dif_chk", _CompDifCheck),
        ("_dif_ins", _CompDifInsert),
        ("_dif_upd", _CompDifUpdate),
        ("op_specific", _u8 * 16),
    ]


assert ctypes.sizeof(_CompOpSpecific) == 16


class DsaCompletionRecord(ctypes.LittleEndianStructure):
    """``struct dsa_completion_record``: 32 bytes the device writes at completion_addr.

    Software polls ``status``, so the device must write it last.
    """

    _anonymous_ = ("_res", "_op")
    _fields_ = [
        ("status", _u8),  # DsaCompStatus, plus DSA_COMP_STATUS_WRITE on faults
        ("_res", _CompResult),
        ("rsvd", _u16),
        ("bytes_completed", _u32),
        ("fault_addr", _u64),
        ("_op", _CompOpSpecific),
    ]
    status: int
    result: int
    dif_status: int
    rsvd: int
    bytes_completed: int
    fault_addr: int
    invalid_flags: int
    rsvd2: int
    delta_rec_size: int
    crc_val: int
    dif_chk_ref_tag: int
    dif_chk_app_tag_mask: int
    dif_chk_app_tag: int
    dif_ins_res: int
    dif_ins_ref_tag: int
    dif_ins_app_tag_mask: int
    dif_ins_app_tag: int
    dif_upd_src_ref_tag: int
    dif_upd_src_app_tag_mask: int
    dif_upd_src_app_tag: int
    dif_upd_dest_ref_tag: int
    dif_upd_dest_app_tag_mask: int
    dif_upd_dest_app_tag: int
    op_specific: ctypes.Array[ctypes.c_uint8]


assert ctypes.sizeof(DsaCompletionRecord) == 32


class DsaRawCompletionRecord(ctypes.LittleEndianStructure):
    """``struct dsa_raw_completion_record``: a completion record as four qwords."""

    _fields_ = [("field", _u64 * 4)]
    field: ctypes.Array[ctypes.c_uint64]


assert ctypes.sizeof(DsaRawCompletionRecord) == 32


# --- Delta records ---------------------------------------------------------------------------


class DsaDeltaRecordEntry(ctypes.LittleEndianStructure):
    """One entry of the delta record that Create Delta Record writes and Apply Delta Record reads.

    Not in the 6.1 uapi header. Source: the Intel DSA architecture specification, Create Delta
    Record, as recalled (not re-checked against the text): entries are 10 bytes, packed, a
    16-bit offset of a differing 8-byte word (in units of 8 bytes) then that word's data from
    the second source; a delta record's size is a multiple of 10.
    """

    _pack_ = 1
    _fields_ = [("offset", _u16), ("data", _u64)]
    offset: int
    data: int


assert ctypes.sizeof(DsaDeltaRecordEntry) == 10
