"""An independent Python model of DSA 1.x descriptor execution, as native/engine/README.md
specifies it.

The model takes one descriptor (64 bytes, from a WQ) and runs it to completion against a
``GuestMemory``: the operation's effect on memory, the completion record, the interrupts and
the software errors. It is written for obviousness, not speed: memory is checked and touched a
unit at a time (a byte, an 8-byte word, a delta entry, a DIF block) in the order README.md
gives, and the CRCs are bitwise loops. tests/test_engine_ops.py compares the native engine with
it.

Where README.md leaves a detail open, the choice made here is marked *(model)*.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vdsa_server.device.descriptors import (
    DSA_COMP_STATUS_MASK,
    DSA_COMP_STATUS_WRITE,
    DsaCompletionRecord,
    DsaHwDesc,
)
from vdsa_server.device.descriptors import DsaCompStatus as S
from vdsa_server.device.descriptors import DsaOpcode as Op
from vdsa_server.device.descriptors import IdxdOpFlag as F

M16 = 0xFFFF
M32 = 0xFFFF_FFFF

# Operation-specific flag bits (descriptor flags 23:16), named after what README.md gives them.
OP16 = 1 << 16  # CRC: seed read from the seed address; DRAIN: readback address 1 valid
OP17 = 1 << 17  # CRC: no inversion or reflection of the CRC value; DRAIN: readback address 2
OP18 = 1 << 18  # CRC: data bits not reflected

DESCRIPTOR_SIZE = 64
RECORD_SIZE = 32
DELTA_ENTRY_SIZE = 10
DELTA_MAX_SIZE = 0x80000  # transfer size limit of CR_DELTA and AP_DELTA
DIF_SIZE = 8
DIF_BLOCK_SIZES = (512, 520, 4096, 4104)


# --- Guest memory ----------------------------------------------------------------------------


class Access(enum.Enum):
    READ = "read"
    WRITE = "write"
    MAPPED = "mapped"  # either permission (CFLUSH)


@dataclass
class Region:
    """One DMA mapping: ``data`` is guest memory from ``iova`` on."""

    iova: int
    data: bytearray
    readable: bool = True
    writable: bool = True

    @property
    def end(self) -> int:
        return self.iova + len(self.data)

    def allows(self, access: Access) -> bool:
        if access is Access.READ:
            return self.readable
        if access is Access.WRITE:
            return self.writable
        return self.readable or self.writable


class PageFault(Exception):
    """An access reached a byte it may not touch: ``addr`` is that byte's IOVA."""

    def __init__(self, addr: int, *, write: bool) -> None:
        super().__init__(f"page fault on {'write' if write else 'read'} at {addr:#x}")
        self.addr = addr
        self.write = write


class GuestMemory:
    """IOVA space made of non-overlapping regions; everything else is unmapped."""

    def __init__(self, regions: Iterable[Region] = ()) -> None:
        self.regions: list[Region] = []
        for region in regions:
            self.add(region)

    def add(self, region: Region) -> None:
        # Overlapping mappings would make "the" byte at an IOVA ambiguous.
        assert all(region.end <= r.iova or r.end <= region.iova for r in self.regions), region
        self.regions.append(region)

    def _region_at(self, addr: int) -> Region | None:
        return next((r for r in self.regions if r.iova <= addr < r.end), None)

    def first_inaccessible(self, addr: int, length: int, access: Access) -> int | None:
        """The lowest IOVA in [addr, addr + length) that ``access`` may not touch, if any."""
        pos, end = addr, addr + length
        while pos < end:
            region = self._region_at(pos)
            if region is None or not region.allows(access):
                return pos
            pos = region.end
        return None

    def check(self, addr: int, length: int, access: Access) -> None:
        bad = self.first_inaccessible(addr, length, access)
        if bad is not None:
            raise PageFault(bad, write=access is Access.WRITE)

    def read(self, addr: int, length: int) -> bytes:
        self.check(addr, length, Access.READ)
        out = bytearray()
        pos, end = addr, addr + length
        while pos < end:
            region = self._region_at(pos)
            assert region is not None
            take = min(region.end, end) - pos
            out += region.data[pos - region.iova : pos - region.iova + take]
            pos += take
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        self.check(addr, len(data), Access.WRITE)
        self.store(addr, data)

    def store(self, addr: int, data: bytes) -> None:
        """Writes as the guest's CPU would, whatever the DMA permissions (to set up tests)."""
        pos = 0
        while pos < len(data):
            region = self._region_at(addr + pos)
            assert region is not None
            take = min(region.end - (addr + pos), len(data) - pos)
            start = addr + pos - region.iova
            region.data[start : start + take] = data[pos : pos + take]
            pos += take


# --- Settings and outcome --------------------------------------------------------------------


@dataclass(frozen=True)
class WqSettings:
    """What the model needs of the WQ that took the descriptor."""

    index: int
    max_transfer_size: int
    max_batch_size: int


@dataclass(frozen=True)
class DeviceSettings:
    num_msix: int
    opcodes: frozenset[int] = frozenset(Op)  # OPCAP
    interrupt_handles: bool = False  # handles must be granted
    granted_handles: frozenset[int] = frozenset()

    def handle_valid(self, handle: int) -> bool:
        return handle < self.num_msix and (
            not self.interrupt_handles or handle in self.granted_handles
        )


@dataclass(frozen=True)
class SoftwareError:
    """The fields of ``struct vdsa_swerr`` (native/engine/vdsa_engine.h)."""

    error: int
    operation: int
    wq: int
    fault_rw: int = 0
    batch: int = 0
    desc_valid: int = 1  # *(model)* every error the engine records comes from a descriptor
    batch_index: int = 0
    invalid_flags: int = 0
    fault_addr: int = 0


@dataclass
class Outcome:
    interrupts: list[int] = field(default_factory=list)  # MSI-X vectors, in the order raised
    errors: list[SoftwareError] = field(default_factory=list)
    # The descriptor's completion status (with the write-fault bit), recorded or not; for
    # tests to tell which path a descriptor took.
    status: int = 0


@dataclass(frozen=True)
class _Context:
    memory: GuestMemory
    wq: WqSettings
    device: DeviceSettings
    outcome: Outcome


# --- CRCs ------------------------------------------------------------------------------------

CRC32C_POLY = 0x1EDC6F41  # x^32 + ... in the most-significant-bit-first form
CRC16_T10DIF_POLY = 0x8BB7


def reflect(value: int, width: int) -> int:
    """``value``'s low ``width`` bits in reverse order."""
    return int(f"{value:0{width}b}"[::-1], 2)


def _crc_msb_first(data: bytes, register: int, poly: int, width: int) -> int:
    """The plain shift-register CRC: each byte enters at the top, most significant bit first."""
    top, mask = 1 << (width - 1), (1 << width) - 1
    for byte in data:
        register ^= byte << (width - 8)
        for _ in range(8):
            register = ((register << 1) ^ poly) & mask if register & top else (register << 1) & mask
    return register


def crc32c(
    data: bytes, seed: int = 0, *, bypass_crc_reflection: bool = False,
    bypass_data_reflection: bool = False,
) -> int:
    """CRCGEN's CRC. By default RFC 3720's CRC32C continuing from ``seed`` (a previous result):
    the register holds the seed inverted and reflected, data bytes enter least significant bit
    first, the result is reflected back and inverted. Op bit 17 drops the seed/result inversion
    and reflection, op bit 18 the data reflection."""
    register = seed if bypass_crc_reflection else reflect(~seed & M32, 32)
    if not bypass_data_reflection:
        data = bytes(reflect(b, 8) for b in data)
    register = _crc_msb_first(data, register, CRC32C_POLY, 32)
    return register if bypass_crc_reflection else ~reflect(register, 32) & M32


def crc16_t10dif(data: bytes, seed: int = 0) -> int:
    """The DIF guard's CRC: polynomial 0x8BB7, not reflected, no final inversion."""
    return _crc_msb_first(data, seed, CRC16_T10DIF_POLY, 16)


# --- Validation tables -----------------------------------------------------------------------

COMMON_FLAGS = F.CRAV | F.RCR | F.RCI
_TCS12 = F.ADDR1_TCS | F.ADDR2_TCS
_TCS123 = _TCS12 | F.ADDR3_TCS
_WRITES = F.CC | F.STORD | F.DRDBK  # flags of operations that write a destination
_CRC_BITS = OP16 | OP17 | OP18

# README.md "Flags allowed per opcode": the flags each opcode accepts besides COMMON_FLAGS.
EXTRA_FLAGS: dict[int, int] = {
    Op.NOOP: F.FENCE,
    Op.BATCH: F.ADDR1_TCS,
    Op.DRAIN: _TCS12 | OP16 | OP17,
    Op.MEMMOVE: F.FENCE | F.BOF | _WRITES | _TCS12,
    Op.MEMFILL: F.FENCE | F.BOF | _WRITES | F.ADDR2_TCS,
    Op.COMPARE: F.FENCE | F.BOF | F.CR | _TCS12,
    Op.COMPVAL: F.FENCE | F.BOF | F.CR | F.ADDR1_TCS,
    Op.CR_DELTA: F.FENCE | F.BOF | F.CR | _WRITES | _TCS123,
    Op.AP_DELTA: F.FENCE | F.BOF | _WRITES | _TCS12,
    Op.DUALCAST: F.FENCE | F.BOF | _WRITES | _TCS123,
    Op.CRCGEN: F.FENCE | F.BOF | F.ADDR1_TCS | F.ADDR3_TCS | _CRC_BITS,
    Op.COPY_CRC: F.FENCE | F.BOF | _WRITES | _TCS123 | _CRC_BITS,
    Op.DIF_CHECK: F.FENCE | F.BOF | F.ADDR1_TCS,
    Op.DIF_INS: F.FENCE | F.BOF | _WRITES | _TCS12,
    Op.DIF_STRP: F.FENCE | F.BOF | _WRITES | _TCS12,
    Op.DIF_UPDT: F.FENCE | F.BOF | _WRITES | _TCS12,
    Op.CFLUSH: F.FENCE | F.BOF | _WRITES | F.ADDR2_TCS,
}


def allowed_flags(opcode: int) -> int:
    # A plain int: ~ on an IntFlag would keep only the bits IdxdOpFlag names (not 23:16).
    return int(COMMON_FLAGS | EXTRA_FLAGS[opcode])


Reserved = list[tuple[int, int]]  # (descriptor byte offset, bits that must be zero)


def _span(first: int, last: int) -> Reserved:
    """Bytes first..last inclusive, as README.md writes ranges."""
    return [(i, 0xFF) for i in range(first, last + 1)]


def _bits(offset: int, bits: int) -> Reserved:
    return [(offset, bits)]


def reserved_bits(opcode: int, flags: int) -> Reserved:
    """README.md's reserved bytes (and bits) of a descriptor with this opcode and flags."""
    seed_address = [] if flags & OP16 else _span(48, 55)
    dif_flags = _bits(42, 0xF0)
    dst_dif_flags = _bits(41, 0x07)
    own: Reserved = {
        Op.NOOP: _span(16, 35) + _span(40, 63),
        Op.BATCH: _span(24, 31) + _span(40, 63),
        Op.DRAIN: ([] if flags & OP16 else _span(16, 23)) + ([] if flags & OP17 else _span(24, 31))
        + _span(32, 35) + _span(40, 63),
        Op.MEMMOVE: _span(40, 63),
        Op.MEMFILL: _span(40, 63),
        Op.COMPARE: _bits(40, 0xFE) + _span(41, 63),
        Op.COMPVAL: _bits(40, 0xFE) + _span(41, 63),
        Op.CR_DELTA: _span(52, 55) + _bits(56, 0xF8) + _span(57, 63),
        Op.AP_DELTA: _span(44, 63),
        Op.DUALCAST: _span(48, 63),
        Op.CRCGEN: _span(24, 31) + _span(44, 47) + _span(56, 63) + seed_address,
        Op.COPY_CRC: _span(44, 47) + _span(56, 63) + seed_address,
        Op.DIF_CHECK: _span(24, 31) + _span(41, 41) + _span(43, 47) + _span(56, 63) + dif_flags,
        Op.DIF_STRP: _span(41, 41) + _span(43, 47) + _span(56, 63) + dif_flags,
        Op.DIF_INS: _span(40, 40) + _span(43, 55) + dif_flags + dst_dif_flags,
        Op.DIF_UPDT: _span(43, 47) + dif_flags + dst_dif_flags,
        Op.CFLUSH: _span(16, 23) + _span(40, 63),
    }[Op(opcode)]
    return _span(38, 39) + own


# --- Completion records ----------------------------------------------------------------------


def _record(status: int, **fields: int) -> DsaCompletionRecord:
    """A record with every byte zero but ``status`` and ``fields``."""
    record = DsaCompletionRecord()
    record.status = status
    for name, value in fields.items():
        setattr(record, name, value)
    return record


def _faulted(record: DsaCompletionRecord, fault: PageFault, done: int) -> DsaCompletionRecord:
    record.status = S.PAGE_FAULT_NOBOF | (DSA_COMP_STATUS_WRITE if fault.write else 0)
    record.fault_addr = fault.addr
    record.bytes_completed = done
    return record


def overlap(a: int, a_size: int, b: int, b_size: int) -> bool:
    return a < b + b_size and b < a + a_size


def _predicate(record: DsaCompletionRecord, flags: int, accepted: bool) -> DsaCompletionRecord:
    """CR (check result): SUCCESS_PRED when the result is not the one the descriptor expects."""
    if flags & F.CR and not accepted:
        record.status = S.SUCCESS_PRED
    return record


# --- Operations ------------------------------------------------------------------------------
#
# Each takes the context and the descriptor, whose transfer size (if it has one) has passed the
# common range check, and returns the completion record. *(model)* bytes_completed is set only
# where README.md defines it (a fault, COMPARE/COMPVAL, CR_DELTA's overflow, AP_DELTA, BATCH,
# DIF_ERR); a successful MEMMOVE, MEMFILL, DUALCAST, CRC, DIF or CFLUSH leaves it 0, as
# "bytes other than the ones the operation defines are zero".

Operation = Callable[[_Context, DsaHwDesc], DsaCompletionRecord]


def _noop(ctx: _Context, d: DsaHwDesc) -> DsaCompletionRecord:
    return _record(S.SUCCESS)


def _memmove(ctx: _Context, d: DsaHwDesc) -> DsaCompletionRecord:
    mem, src, dst, size = ctx.memory, d.src_addr, d.dst_addr, d.xfer_size
    backward = src < dst < src + size
    record = _record(S.SUCCESS, result=int(backward))
    offsets = range(size - 1, -1, -1) if backward else range(size)
    for done, i in enumerate(offsets):
        try:
            byte = mem.read(src + i, 1)
            mem.write(dst + i, byte)
        except PageFault as fault:
            return _faulted(record, fault, done)
    return record


def _memfill(ctx: _Context, d: DsaHwDesc) -> DsaCompletionRecord:
    pattern = d.pattern.to_bytes(8, "little")
    record = _record(S.SUCCESS)
    for i in range(d.xfer_size):
        try:
            ctx.memory.write(d.dst_addr + i, pattern[i % 8 : i % 8 + 1])
        except PageFault as fault:
            return _faulted(record, fault, i)
    return record


def _compare(ctx: _Context, d: DsaHwDesc) -> DsaCompletionRecord:
    mem = ctx.memory
    pattern = d.comp_pattern.to_bytes(8, "little")
    record = _record(S.SUCCESS)
    for i in range(d.xfer_size):
        try:
            a = mem.read(d.src_addr + i, 1)[0]
            b = pattern[i % 8] if d.opcode == Op.COMPVAL else mem.read(d.src2_addr + i, 1)[0]
        except PageFault as fault:
            return _faulted(record, fault, i)
        if a != b:
            record.result, record.bytes_completed = 1, i
            break
    return _predicate(record, d.flags, record.result == d.expected_res & 1)


def _cr_delta(ctx: _Context, d: DsaHwDesc) -> DsaCompletionRecord:
    mem, size = ctx.memory, d.xfer_size
    if size % 8 or size > DELTA_MAX_SIZE:
        return _record(S.XFER_ERANGE)
    if d.src_addr % 8 or d.src2_addr % 8 or d.delta_addr % 8:
        return _record(S.ADDR_ALIGN)
    if d.max_delta_size == 0 or d.max_delta_size % DELTA_ENTRY_SIZE:
        return _record(S.DR_ERANGE)
    record = _record(S.SUCCESS)
    for k in range(size // 8):
        try:
            # *(model)* the unit is the word, as the block is for DIF: source 1's word is
            # checked whole before source 2's.
            word1 = mem.read(d.src_addr + 8 * k, 8)
            word2 = mem.read(d.src2_addr + 8 * k, 8)
            if word1 == word2:
                continue
            if record.delta_rec_size + DELTA_ENTRY_SIZE > d.max_delta_size:
                record.result, record.bytes_completed = 2, 8 * k
                break
            # *(model)* an entry is written whole or not at all.
            mem.write(d.delta_addr + record.delta_rec_size, k.to_bytes(2, "little") + word2)
        except PageFault as fault:
            record.result = int(record.delta_rec_size > 0)
            return _faulted(record, fault, 8 * k)
        record.delta_rec_size += DELTA_ENTRY_SIZE
        record.result = 1
    return _predicate(record, d.flags, bool(d.expected_res_mask >> record.result & 1))


def _ap_delta(ctx: _Context, d: DsaHwDesc) -> DsaCompletionRecord:
    mem, size, record_size = ctx.memory, d.xfer_size, d.delta_rec_size
    if size % 8 or size > DELTA_MAX_SIZE:
        return _record(S.XFER_ERANGE)
    if record_size == 0 or record_size % DELTA_ENTRY_SIZE:
        return _record(S.DR_ERANGE)
    # The descriptor's field at 16 is the delta record address (DsaHwDesc calls it src_addr).
    if d.dst_addr % 8 or d.src_addr % 8:
        return _record(S.ADDR_ALIGN)
    if overlap(d.src_addr, record_size, d.dst_addr, size):
        return _record(S.OVERLAP_BUFFERS)
    record = _record(S.SUCCESS)
    previous = -1
    for n in range(record_size // DELTA_ENTRY_SIZE):
        done = n * DELTA_ENTRY_SIZE
        try:
            entry = mem.read(d.src_addr + done, DELTA_ENTRY_SIZE)
        except PageFault as fault:
            return _faulted(record, fault, done)
        offset = int.from_bytes(entry[:2], "little")
        if offset <= previous:
            return _record(S.DR_OFFSET_NOINC, bytes_completed=done)
        if 8 * offset + 8 > size:
            return _record(S.DR_OFFSET_ERANGE, bytes_completed=done)
        try:
            mem.write(d.dst_addr + 8 * offset, entry[2:])
        except PageFault as fault:
            return _faulted(record, fault, done)
        previous = offset
    record.bytes_completed = record_size
    return record


def _dualcast(ctx: _Context, d: DsaHwDesc) -> DsaCompletionRecord:
    mem, src, dst1, dst2, size = ctx.memory, d.src_addr, d.dst_addr, d.dest2, d.xfer_size
    if (dst1 ^ dst2) & 0xFFF:
        return _record(S.DCAST_ERR)
    if overlap(src, size, dst1, size) or overlap(src, size, dst2, size) or overlap(
        dst1, size, dst2, size
    ):
        return _record(S.OVERLAP_BUFFERS)
    record = _record(S.SUCCESS)
    for i in range(size):
        try:
            # *(model)* all three bytes of an offset are checked before either write.
            mem.check(src + i, 1, Access.READ)
            mem.check(dst1 + i, 1, Access.WRITE)
            mem.check(dst2 + i, 1, Access.WRITE)
        except PageFault as fault:
            return _faulted(record, fault, i)
        byte = mem.read(src + i, 1)
        mem.write(dst1 + i, byte)
        mem.write(dst2 + i, byte)
    return record


def _crc(ctx: _Context, d: DsaHwDesc) -> DsaCompletionRecord:
    mem, size, copy = ctx.memory, d.xfer_size, d.opcode == Op.COPY_CRC
    if d.flags & OP16 and d.seed_addr % 4:
        return _record(S.ADDR_ALIGN)
    # *(model)* COPY_CRC is "CRCGEN plus dst", so CRCGEN's seed alignment check comes first.
    if copy and overlap(d.src_addr, size, d.dst_addr, size):
        return _record(S.OVERLAP_BUFFERS)
    record = _record(S.SUCCESS)
    if d.flags & OP16:
        try:
            seed = int.from_bytes(mem.read(d.seed_addr, 4), "little")
        except PageFault as fault:
            # *(model)* no seed, no CRC: crc_val stays 0.
            return _faulted(record, fault, 0)
    else:
        seed = d.crc_seed
    data = bytearray()
    for i in range(size):
        try:
            byte = mem.read(d.src_addr + i, 1)
            if copy:
                mem.write(d.dst_addr + i, byte)
        except PageFault as fault:
            _faulted(record, fault, i)
            break
        data += byte
    record.crc_val = crc32c(bytes(data), seed, bypass_crc_reflection=bool(d.flags & OP17),
                            bypass_data_reflection=bool(d.flags & OP18))
    return record


def _cflush(ctx: _Context, d: DsaHwDesc) -> DsaCompletionRecord:
    bad = ctx.memory.first_inaccessible(d.dst_addr, d.xfer_size, Access.MAPPED)
    if bad is None:
        return _record(S.SUCCESS)
    # *(model)* the flushed range is the destination: a fault on it is a fault on a write.
    return _faulted(_record(S.SUCCESS), PageFault(bad, write=True), bad - d.dst_addr)


# --- DIF -------------------------------------------------------------------------------------

SRC_ALL_F_ERROR = 0x01  # source DIF flags
SRC_ALL_F_DETECT = 0x02
SRC_APP_F_DETECT = 0x04
SRC_APP_REF_F_DETECT = 0x08
INCREMENTING_APP = 0x10  # source and destination DIF flags
SRC_GUARD_CHECK_DISABLE = 0x20
SRC_REF_CHECK_DISABLE = 0x40
FIXED_REF = 0x80  # source and destination DIF flags
DST_APP_PASS = 0x08  # destination DIF flags
DST_GUARD_PASS = 0x20
DST_REF_PASS = 0x40
DIF_SEED_FFFF = 0x04  # DIF flags
DIF_GUARD_INVERTED = 0x08

DIF_GUARD_ERROR = 0x01  # error bits (record byte 1)
DIF_APP_ERROR = 0x02
DIF_REF_ERROR = 0x04
DIF_ALL_F_ERROR = 0x08


@dataclass(frozen=True)
class DifTags:
    """A tag seed set and how the tags advance from block to block."""

    ref_seed: int
    app_mask: int
    app_seed: int
    flags: int  # the source or destination DIF flags

    def ref(self, block: int) -> int:
        return self.ref_seed if self.flags & FIXED_REF else (self.ref_seed + block) & M32

    def app(self, block: int) -> int:
        return (self.app_seed + block) & M16 if self.flags & INCREMENTING_APP else self.app_seed


def dif_guard(block: bytes, dif_flags: int) -> int:
    guard = crc16_t10dif(block, M16 if dif_flags & DIF_SEED_FFFF else 0)
    return guard ^ M16 if dif_flags & DIF_GUARD_INVERTED else guard


def dif_errors(block: bytes, dif: bytes, dif_flags: int, tags: DifTags, index: int) -> int:
    """The error bits of checking block number ``index`` and its 8-byte DIF."""
    guard, app, ref = struct.unpack(">HHI", dif)
    flags = tags.flags
    all_f_error = SRC_ALL_F_ERROR | SRC_ALL_F_DETECT
    if flags & all_f_error == all_f_error and dif == b"\xff" * DIF_SIZE:
        return DIF_ALL_F_ERROR
    if (flags & SRC_APP_REF_F_DETECT and app == M16 and ref == M32) or (
        flags & SRC_APP_F_DETECT and app == M16
    ):
        return 0
    errors = 0
    if not flags & SRC_GUARD_CHECK_DISABLE and guard != dif_guard(block, dif_flags):
        errors |= DIF_GUARD_ERROR
    if (app ^ tags.app(index)) & ~tags.app_mask & M16:
        errors |= DIF_APP_ERROR
    if not flags & SRC_REF_CHECK_DISABLE and ref != tags.ref(index):
        errors |= DIF_REF_ERROR
    return errors


def make_dif(block: bytes, dif_flags: int, tags: DifTags, index: int) -> bytes:
    """The DIF DIF_INS appends to block number ``index``."""
    app = tags.app(index) & ~tags.app_mask & M16
    return struct.pack(">HHI", dif_guard(block, dif_flags), app, tags.ref(index))


def _set_dif_tags(
    record: DsaCompletionRecord, opcode: int, src: DifTags | None, dst: DifTags | None,
    index: int,
) -> None:
    """The record's tag fields, for processing at block ``index``."""
    if src is not None:
        ref, mask, app = src.ref(index), src.app_mask, src.app(index)
        if opcode == Op.DIF_UPDT:
            record.dif_upd_src_ref_tag = ref
            record.dif_upd_src_app_tag_mask = mask
            record.dif_upd_src_app_tag = app
        else:
            record.dif_chk_ref_tag = ref
            record.dif_chk_app_tag_mask = mask
            record.dif_chk_app_tag = app
    if dst is not None:
        # Insert's fields and update's destination fields are the same bytes (24, 28, 30).
        record.dif_ins_ref_tag = dst.ref(index)
        record.dif_ins_app_tag_mask = dst.app_mask
        record.dif_ins_app_tag = dst.app(index)


def _dif(ctx: _Context, d: DsaHwDesc) -> DsaCompletionRecord:
    mem, opcode, size = ctx.memory, d.opcode, d.xfer_size
    checks = opcode != Op.DIF_INS  # the source carries DIFs
    dif_flags = d.dif_upd_flags  # byte 42 in all four layouts
    block_size = DIF_BLOCK_SIZES[dif_flags & 0x03]
    src_step = block_size + DIF_SIZE if checks else block_size
    dst_step = {
        Op.DIF_CHECK: 0,
        Op.DIF_STRP: block_size,
        Op.DIF_INS: block_size + DIF_SIZE,
        Op.DIF_UPDT: block_size + DIF_SIZE,
    }[Op(opcode)]
    if size % src_step:
        return _record(S.XFER_ERANGE)
    blocks = size // src_step
    if dst_step and overlap(d.src_addr, size, d.dst_addr, blocks * dst_step):
        return _record(S.OVERLAP_BUFFERS)
    # Check and strip take the source tags at 48/52/54, as update does; insert and update take
    # the destination tags at 56/60/62.
    src_tags = (
        DifTags(d.src_ref_tag_seed, d.src_app_tag_mask, d.src_app_tag_seed, d.src_upd_flags)
        if checks else None
    )
    dst_tags = (
        DifTags(d.dest_ref_tag_seed, d.dest_app_tag_mask, d.dest_app_tag_seed, d.upd_dest_flags)
        if opcode in (Op.DIF_INS, Op.DIF_UPDT) else None
    )
    record = _record(S.SUCCESS)
    for b in range(blocks):
        _set_dif_tags(record, opcode, src_tags, dst_tags, b)
        src, dst = d.src_addr + b * src_step, d.dst_addr + b * dst_step
        try:
            data = mem.read(src, src_step)
            mem.check(dst, dst_step, Access.WRITE)
        except PageFault as fault:
            return _faulted(record, fault, b * src_step)
        block, dif = data[:block_size], data[block_size:]
        if src_tags is not None:
            errors = dif_errors(block, dif, dif_flags, src_tags, b)
            if errors:
                record.status, record.dif_status, record.bytes_completed = (
                    S.DIF_ERR, errors, b * src_step)
                return record
        if opcode == Op.DIF_STRP:
            mem.write(dst, block)
        elif opcode == Op.DIF_INS:
            assert dst_tags is not None
            mem.write(dst, block + make_dif(block, dif_flags, dst_tags, b))
        elif opcode == Op.DIF_UPDT:
            assert dst_tags is not None
            mem.write(dst, block + _updated_dif(block, dif, dif_flags, dst_tags, b))
    _set_dif_tags(record, opcode, src_tags, dst_tags, blocks)
    return record


def _updated_dif(block: bytes, dif: bytes, dif_flags: int, tags: DifTags, index: int) -> bytes:
    """DIF_UPDT's destination DIF: the source's, with each field not passed through rewritten."""
    guard, app, ref = struct.unpack(">HHI", dif)
    if not tags.flags & DST_GUARD_PASS:
        guard = dif_guard(block, dif_flags)
    if not tags.flags & DST_APP_PASS:
        # *(model)* masked as DIF_INS masks it.
        app = tags.app(index) & ~tags.app_mask & M16
    if not tags.flags & DST_REF_PASS:
        ref = tags.ref(index)
    return struct.pack(">HHI", guard, app, ref)


# --- BATCH -----------------------------------------------------------------------------------


def _batch(ctx: _Context, d: DsaHwDesc) -> DsaCompletionRecord:
    count, address = d.desc_count, d.desc_list_addr
    if not 2 <= count <= ctx.wq.max_batch_size:
        return _record(S.DESC_CNT_ERANGE)
    if address % DESCRIPTOR_SIZE:
        return _record(S.DESCLIST_ALIGN)
    processed, failed = 0, False
    for index in range(count):
        try:
            entry = ctx.memory.read(address + index * DESCRIPTOR_SIZE, DESCRIPTOR_SIZE)
        except PageFault as fault:
            return _record(S.BATCH_PAGE_FAULT, bytes_completed=processed, fault_addr=fault.addr)
        if failed and DsaHwDesc.from_buffer_copy(entry).flags & F.FENCE:
            break  # abandoned, with every entry after it
        status = _run(ctx, entry, batch_index=index)
        processed += 1
        failed |= status != S.SUCCESS
    return _record(S.BATCH_FAIL if failed else S.SUCCESS, bytes_completed=processed)


OPERATIONS: dict[int, Operation] = {
    Op.NOOP: _noop,
    Op.BATCH: _batch,
    Op.DRAIN: _noop,  # nothing is ever in flight in a synchronous model
    Op.MEMMOVE: _memmove,
    Op.MEMFILL: _memfill,
    Op.COMPARE: _compare,
    Op.COMPVAL: _compare,
    Op.CR_DELTA: _cr_delta,
    Op.AP_DELTA: _ap_delta,
    Op.DUALCAST: _dualcast,
    Op.CRCGEN: _crc,
    Op.COPY_CRC: _crc,
    Op.DIF_CHECK: _dif,
    Op.DIF_INS: _dif,
    Op.DIF_STRP: _dif,
    Op.DIF_UPDT: _dif,
    Op.CFLUSH: _cflush,
}

NO_TRANSFER_SIZE = frozenset({Op.NOOP, Op.BATCH, Op.DRAIN})


# --- One descriptor --------------------------------------------------------------------------


def _validate_and_run(
    ctx: _Context, d: DsaHwDesc, raw: bytes, in_batch: bool
) -> DsaCompletionRecord:
    """README.md's checks 3 to 8."""
    opcode, flags = d.opcode, d.flags
    if (
        opcode not in OPERATIONS
        or opcode not in ctx.device.opcodes
        or (in_batch and opcode in (Op.BATCH, Op.DRAIN))
    ):
        return _record(S.BAD_OPCODE)
    invalid = flags & ~allowed_flags(opcode)
    if invalid:
        return _record(S.INVALID_FLAGS, invalid_flags=invalid)
    if flags & F.RCI and not ctx.device.handle_valid(d.int_handle):
        return _record(S.INT_HANDLE_INVAL)
    if any(raw[offset] & bits for offset, bits in reserved_bits(opcode, flags)):
        return _record(S.NOZERO_RESERVE)
    if opcode not in NO_TRANSFER_SIZE and not 1 <= d.xfer_size <= ctx.wq.max_transfer_size:
        return _record(S.XFER_ERANGE)
    return OPERATIONS[opcode](ctx, d)


def _run(ctx: _Context, raw: bytes, batch_index: int | None = None) -> int:
    """Runs one descriptor from the WQ (``batch_index`` None) or from a batch list; returns its
    status (what a batch counts and fences on)."""
    d = DsaHwDesc.from_buffer_copy(raw)
    flags = d.flags

    def software_error(
        error: int, *, fault_rw: bool = False, fault_addr: int = 0, invalid_flags: int = 0
    ) -> int:
        ctx.outcome.errors.append(SoftwareError(
            error=error, operation=d.opcode, wq=ctx.wq.index, fault_rw=int(fault_rw),
            batch=int(batch_index is not None), batch_index=batch_index or 0,
            invalid_flags=invalid_flags, fault_addr=fault_addr,
        ))
        return error

    if flags & F.CRAV and d.completion_addr % RECORD_SIZE:
        return software_error(S.CRA_ALIGN)
    if flags & F.RCR and not flags & F.CRAV:
        # *(model)* the offending flag is RCR.
        return software_error(S.INVALID_FLAGS, invalid_flags=F.RCR)
    record = _validate_and_run(ctx, d, raw, batch_index is not None)
    if batch_index is None:
        ctx.outcome.status = record.status
    status = record.status & DSA_COMP_STATUS_MASK
    if flags & F.CRAV and (flags & F.RCR or status != S.SUCCESS):
        bad = ctx.memory.first_inaccessible(d.completion_addr, RECORD_SIZE, Access.WRITE)
        if bad is not None:
            # *(model)* the record write is what faulted; the descriptor keeps its own status
            # for the batch around it.
            software_error(S.CRA_XLAT, fault_rw=True, fault_addr=bad)
            return status
        ctx.memory.write(d.completion_addr, bytes(record))
    elif not flags & F.CRAV and status not in (S.SUCCESS, S.SUCCESS_PRED):
        software_error(status, fault_rw=bool(record.status & DSA_COMP_STATUS_WRITE),
                       fault_addr=record.fault_addr,
                       invalid_flags=record.invalid_flags if status == S.INVALID_FLAGS else 0)
    if flags & F.RCI and ctx.device.handle_valid(d.int_handle):
        ctx.outcome.interrupts.append(d.int_handle)
    return status


def execute(
    memory: GuestMemory, wq_settings: WqSettings, device_settings: DeviceSettings,
    descriptor: bytes,
) -> Outcome:
    """Runs ``descriptor``, taken from WQ ``wq_settings.index``, to completion: mutates
    ``memory`` (completion records included) and returns the interrupts and software errors."""
    assert len(descriptor) == DESCRIPTOR_SIZE
    outcome = Outcome()
    status = _run(_Context(memory, wq_settings, device_settings, outcome), bytes(descriptor))
    outcome.status = outcome.status or status  # checks 1 and 2 run no operation
    return outcome



# --- For the tests ---------------------------------------------------------------------------


def descriptor(opcode: int, flags: int = 0, **fields: int) -> bytes:
    """A descriptor with ``fields`` named as in ``DsaHwDesc``; everything else zero."""
    d = DsaHwDesc()
    d.opcode, d.flags = opcode, flags
    for name, value in fields.items():
        setattr(d, name, value)
    return bytes(d)


def read_record(memory: GuestMemory, address: int) -> DsaCompletionRecord:
    return DsaCompletionRecord.from_buffer_copy(memory.read(address, RECORD_SIZE))
