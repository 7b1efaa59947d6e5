"""The reference model (tests/engine_reference.py) alone, against known vectors and hand-built
expectations, so that the engine comparison in test_engine_ops.py compares with something
checked."""

from __future__ import annotations

import struct

import pytest

from tests import engine_reference as ref
from tests.engine_reference import OP16, OP17, OP18, Access, GuestMemory, PageFault, Region
from vdsa_server.device.descriptors import DsaCompletionRecord
from vdsa_server.device.descriptors import DsaCompStatus as S
from vdsa_server.device.descriptors import DsaOpcode as Op
from vdsa_server.device.descriptors import IdxdOpFlag as F

SRC = 0x10000  # 16 KiB read-write, unmapped after
DST = 0x20000  # 16 KiB read-write, unmapped after
RO = 0x30000  # 4 KiB read-only, then 4 KiB write-only
WO = 0x31000
COMP = 0x40000  # completion records and batch lists
REGION_SIZE = 0x4000

WQ = ref.WqSettings(index=3, max_transfer_size=0x10000, max_batch_size=8)
DEVICE = ref.DeviceSettings(num_msix=8)
RECORD = F.CRAV | F.RCR


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory([
        Region(SRC, bytearray(REGION_SIZE)),
        Region(DST, bytearray(REGION_SIZE)),
        Region(RO, bytearray(0x1000), writable=False),
        Region(WO, bytearray(0x1000), readable=False),
        Region(COMP, bytearray(0x1000)),
    ])


def run(mem: GuestMemory, desc: bytes, device: ref.DeviceSettings = DEVICE) -> ref.Outcome:
    return ref.execute(mem, WQ, device, desc)


def record(mem: GuestMemory, address: int = COMP) -> DsaCompletionRecord:
    return ref.read_record(mem, address)


# --- CRCs, against published check values and polynomial division ----------------------------

CHECK = b"123456789"


def gf2_mod(value: int, poly: int) -> int:
    """``value`` mod ``poly``, both polynomials over GF(2) as bit strings."""
    while value.bit_length() >= poly.bit_length():
        value ^= poly << (value.bit_length() - poly.bit_length())
    return value


def crc_by_division(data: bytes, register: int, poly: int, width: int) -> int:
    """A most-significant-bit-first CRC register after ``data``, by its definition:
    (register * x^bits + data * x^width) mod P."""
    bits = 8 * len(data)
    message = int.from_bytes(data, "big") if data else 0
    return gf2_mod((register << bits) ^ (message << width), (1 << width) | poly)


def test_crc32c_check_value() -> None:
    assert ref.crc32c(CHECK) == 0xE3069283


def test_crc16_t10dif_check_value() -> None:
    assert ref.crc16_t10dif(CHECK) == 0xD0DB


@pytest.mark.parametrize("seed", [0, 1, 0xDEADBEEF, 0xFFFFFFFF])
@pytest.mark.parametrize("data", [b"", CHECK, bytes(range(256))])
def test_crc32c_modes_by_division(data: bytes, seed: int) -> None:
    reflected = bytes(ref.reflect(b, 8) for b in data)
    inverted = ref.reflect(~seed & ref.M32, 32)
    poly, width = ref.CRC32C_POLY, 32
    assert ref.crc32c(data, seed) == ~ref.reflect(
        crc_by_division(reflected, inverted, poly, width), 32) & ref.M32
    assert ref.crc32c(data, seed, bypass_crc_reflection=True) == crc_by_division(
        reflected, seed, poly, width)
    assert ref.crc32c(data, seed, bypass_data_reflection=True) == ~ref.reflect(
        crc_by_division(data, inverted, poly, width), 32) & ref.M32
    assert ref.crc32c(data, seed, bypass_crc_reflection=True,
                      bypass_data_reflection=True) == crc_by_division(data, seed, poly, width)


@pytest.mark.parametrize(("crc_bypass", "data_bypass"),
                         [(False, False), (False, True), (True, False), (True, True)])
def test_crc32c_continues_from_its_seed(crc_bypass: bool, data_bypass: bool) -> None:
    def crc(data: bytes, seed: int) -> int:
        return ref.crc32c(data, seed, bypass_crc_reflection=crc_bypass,
                          bypass_data_reflection=data_bypass)

    a, b = b"hello, ", b"world"
    assert crc(a + b, 0) == crc(b, crc(a, 0))
    assert crc(a, 0) != crc(a, 1)


def test_crc16_by_division() -> None:
    data = bytes(range(200))
    for seed in (0, 0xFFFF, 0x1234):
        assert ref.crc16_t10dif(data, seed) == crc_by_division(data, seed, 0x8BB7, 16)


# --- Guest memory ----------------------------------------------------------------------------


def test_memory_reports_first_inaccessible_byte(mem: GuestMemory) -> None:
    assert mem.first_inaccessible(SRC + REGION_SIZE - 4, 8, Access.READ) == SRC + REGION_SIZE
    assert mem.first_inaccessible(RO + 0xFF0, 0x20, Access.READ) == WO
    assert mem.first_inaccessible(RO + 0xFF0, 0x20, Access.WRITE) == RO + 0xFF0
    assert mem.first_inaccessible(RO + 0xFF0, 0x20, Access.MAPPED) is None
    with pytest.raises(PageFault) as fault:
        mem.write(RO + 5, b"x")
    assert (fault.value.addr, fault.value.write) == (RO + 5, True)


def test_memory_reads_and_writes_across_adjacent_regions() -> None:
    mem = GuestMemory([Region(0x1000, bytearray(4)), Region(0x1004, bytearray(4))])
    mem.write(0x1002, b"abcd")
    assert mem.read(0x1000, 8) == b"\0\0abcd\0\0"
    assert mem.regions[1].data == bytearray(b"cd\0\0")


def test_memory_refuses_overlapping_regions() -> None:
    with pytest.raises(AssertionError):
        GuestMemory([Region(0x1000, bytearray(8)), Region(0x1004, bytearray(8))])


# --- Validation order ------------------------------------------------------------------------


def test_noop_record_and_interrupt(mem: GuestMemory) -> None:
    mem.write(COMP, b"\xaa" * 32)
    out = run(mem, ref.descriptor(Op.NOOP, RECORD | F.RCI, completion_addr=COMP, int_handle=5))
    assert mem.read(COMP, 32) == b"\x01" + bytes(31)
    assert out == ref.Outcome(interrupts=[5], errors=[], status=S.SUCCESS)


def test_success_without_rcr_writes_no_record(mem: GuestMemory) -> None:
    out = run(mem, ref.descriptor(Op.NOOP, F.CRAV, completion_addr=COMP))
    assert mem.read(COMP, 32) == bytes(32)
    assert out == ref.Outcome(status=S.SUCCESS)


def test_misaligned_record_is_a_software_error_only(mem: GuestMemory) -> None:
    out = run(mem, ref.descriptor(Op.NOOP, RECORD | F.RCI, completion_addr=COMP + 8))
    assert out.interrupts == []
    assert out.errors == [ref.SoftwareError(error=S.CRA_ALIGN, operation=Op.NOOP, wq=3)]
    assert mem.read(COMP, 64) == bytes(64)


def test_rcr_without_crav(mem: GuestMemory) -> None:
    out = run(mem, ref.descriptor(0x7F, F.RCR))  # before the opcode check
    assert out.errors == [ref.SoftwareError(error=S.INVALID_FLAGS, operation=0x7F, wq=3,
                                            invalid_flags=F.RCR)]


@pytest.mark.parametrize(("opcode", "device"), [
    (0x0A, DEVICE),
    (0x7F, DEVICE),
    (Op.MEMMOVE, ref.DeviceSettings(num_msix=8, opcodes=frozenset({Op.NOOP}))),
])
def test_bad_opcode(mem: GuestMemory, opcode: int, device: ref.DeviceSettings) -> None:
    run(mem, ref.descriptor(opcode, RECORD | 0x800000, completion_addr=COMP), device)
    assert record(mem).status == S.BAD_OPCODE  # before the flags check


def test_invalid_flags_reported_in_record_and_swerr(mem: GuestMemory) -> None:
    run(mem, ref.descriptor(Op.NOOP, RECORD | F.CR | OP18, completion_addr=COMP))
    rec = record(mem)
    assert (rec.status, rec.invalid_flags) == (S.INVALID_FLAGS, F.CR | OP18)
    out = run(mem, ref.descriptor(Op.MEMFILL, F.ADDR1_TCS, xfer_size=1))
    assert out.errors == [ref.SoftwareError(error=S.INVALID_FLAGS, operation=Op.MEMFILL, wq=3,
                                            invalid_flags=F.ADDR1_TCS)]


@pytest.mark.parametrize(("handle", "device", "valid"), [
    (7, DEVICE, True),
    (8, DEVICE, False),
    (2, ref.DeviceSettings(num_msix=8, interrupt_handles=True), False),
    (2, ref.DeviceSettings(num_msix=8, interrupt_handles=True,
                           granted_handles=frozenset({2})), True),
])
def test_interrupt_handle(mem: GuestMemory, handle: int, device: ref.DeviceSettings,
                          valid: bool) -> None:
    # A reserved byte set too: the handle check comes first.
    out = run(mem, ref.descriptor(Op.NOOP, RECORD | F.RCI, completion_addr=COMP,
                                  int_handle=handle, rsvd1=1), device)
    assert record(mem).status == (S.NOZERO_RESERVE if valid else S.INT_HANDLE_INVAL)
    assert out.interrupts == ([handle] if valid else [])


@pytest.mark.parametrize("offset", [38, 40, 63])
def test_reserved_bytes(mem: GuestMemory, offset: int) -> None:
    raw = bytearray(ref.descriptor(Op.MEMMOVE, RECORD, completion_addr=COMP, xfer_size=0))
    raw[offset] = 0x80
    run(mem, bytes(raw))
    assert record(mem).status == S.NOZERO_RESERVE  # before the transfer size check


def test_reserved_bits_follow_flags() -> None:
    assert (16, 0xFF) in ref.reserved_bits(Op.DRAIN, 0)
    assert (16, 0xFF) not in ref.reserved_bits(Op.DRAIN, OP16)
    assert (48, 0xFF) not in ref.reserved_bits(Op.CRCGEN, OP16)
    assert (42, 0xF0) in ref.reserved_bits(Op.DIF_UPDT, 0)


@pytest.mark.parametrize("size", [0, WQ.max_transfer_size + 1])
def test_transfer_size_range(mem: GuestMemory, size: int) -> None:
    run(mem, ref.descriptor(Op.MEMFILL, RECORD, completion_addr=COMP, xfer_size=size,
                            dst_addr=DST))
    assert record(mem).status == S.XFER_ERANGE


def test_error_without_record_is_a_software_error_with_interrupt(mem: GuestMemory) -> None:
    out = run(mem, ref.descriptor(Op.MEMFILL, F.RCI, int_handle=1, dst_addr=RO + 0xFF8,
                                  xfer_size=16))
    assert out.errors == [ref.SoftwareError(error=S.PAGE_FAULT_NOBOF, operation=Op.MEMFILL, wq=3,
                                            fault_rw=1, fault_addr=RO + 0xFF8)]
    assert out.interrupts == [1]


def test_unwritable_record(mem: GuestMemory) -> None:
    out = run(mem, ref.descriptor(Op.NOOP, RECORD | F.RCI, completion_addr=RO + 0xFE0))
    assert out == ref.Outcome(status=S.SUCCESS, errors=[ref.SoftwareError(
        error=S.CRA_XLAT, operation=Op.NOOP, wq=3, fault_rw=1, fault_addr=RO + 0xFE0)])


# --- Operations ------------------------------------------------------------------------------


def test_memmove_forward_overlap(mem: GuestMemory) -> None:
    mem.write(SRC, b"0123456789")
    run(mem, ref.descriptor(Op.MEMMOVE, RECORD, completion_addr=COMP, src_addr=SRC + 2,
                            dst_addr=SRC, xfer_size=8))
    assert mem.read(SRC, 10) == b"2345678989"
    assert (record(mem).status, record(mem).result) == (S.SUCCESS, 0)


def test_memmove_backward_overlap(mem: GuestMemory) -> None:
    mem.write(SRC, b"0123456789")
    run(mem, ref.descriptor(Op.MEMMOVE, RECORD, completion_addr=COMP, src_addr=SRC,
                            dst_addr=SRC + 2, xfer_size=8))
    assert mem.read(SRC, 10) == b"0101234567"
    assert record(mem).result == 1


def test_memmove_fault_forward(mem: GuestMemory) -> None:
    mem.store(RO + 0xFF0, bytes(range(16)))
    run(mem, ref.descriptor(Op.MEMMOVE, RECORD, completion_addr=COMP, src_addr=RO + 0xFF0,
                            dst_addr=DST, xfer_size=32))
    rec = record(mem)
    assert (rec.status, rec.bytes_completed, rec.fault_addr) == (S.PAGE_FAULT_NOBOF, 16, WO)
    assert mem.read(DST, 17) == bytes(range(16)) + b"\0"


def test_memmove_fault_backward_is_the_highest_byte(mem: GuestMemory) -> None:
    # dst inside (src, src + size), the last 6 destination bytes beyond the region.
    src, dst = SRC + REGION_SIZE - 20, SRC + REGION_SIZE - 10
    mem.write(src, bytes(range(1, 21)))
    run(mem, ref.descriptor(Op.MEMMOVE, RECORD, completion_addr=COMP, src_addr=src,
                            dst_addr=dst, xfer_size=16))
    rec = record(mem)
    assert (rec.status, rec.result, rec.bytes_completed, rec.fault_addr) == (
        S.PAGE_FAULT_NOBOF | 0x80, 1, 0, dst + 15)


def test_memfill_pattern_and_write_fault(mem: GuestMemory) -> None:
    run(mem, ref.descriptor(Op.MEMFILL, RECORD, completion_addr=COMP, pattern=0x0807060504030201,
                            dst_addr=DST + REGION_SIZE - 11, xfer_size=20))
    assert mem.read(DST + REGION_SIZE - 11, 11) == bytes([1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3])
    rec = record(mem)
    assert (rec.status, rec.bytes_completed, rec.fault_addr) == (
        S.PAGE_FAULT_NOBOF | 0x80, 11, DST + REGION_SIZE)


@pytest.mark.parametrize(("flags", "expected", "status"), [
    (0, 0, S.SUCCESS),
    (F.CR, 1, S.SUCCESS),
    (F.CR, 0, S.SUCCESS_PRED),
])
def test_compare(mem: GuestMemory, flags: int, expected: int, status: int) -> None:
    mem.write(SRC, b"abcdefgh")
    mem.write(DST, b"abcdXfgh")
    run(mem, ref.descriptor(Op.COMPARE, RECORD | flags, completion_addr=COMP, src_addr=SRC,
                            src2_addr=DST, xfer_size=8, expected_res=expected))
    rec = record(mem)
    assert (rec.status, rec.result, rec.bytes_completed) == (status, 1, 4)


def test_compare_equal(mem: GuestMemory) -> None:
    run(mem, ref.descriptor(Op.COMPARE, RECORD | F.CR, completion_addr=COMP, src_addr=SRC,
                            src2_addr=DST, xfer_size=100, expected_res=1))
    rec = record(mem)
    assert (rec.status, rec.result, rec.bytes_completed) == (S.SUCCESS_PRED, 0, 0)


def test_compare_fault_on_second_source(mem: GuestMemory) -> None:
    run(mem, ref.descriptor(Op.COMPARE, RECORD, completion_addr=COMP, src_addr=SRC,
                            src2_addr=WO - 3, xfer_size=8))
    rec = record(mem)
    assert (rec.status, rec.result, rec.bytes_completed, rec.fault_addr) == (
        S.PAGE_FAULT_NOBOF, 0, 3, WO)


def test_compval(mem: GuestMemory) -> None:
    mem.write(SRC, b"abcdefghabcdefgX")
    run(mem, ref.descriptor(Op.COMPVAL, RECORD, completion_addr=COMP, src_addr=SRC,
                            comp_pattern=int.from_bytes(b"abcdefgh", "little"), xfer_size=16))
    rec = record(mem)
    assert (rec.status, rec.result, rec.bytes_completed) == (S.SUCCESS, 1, 15)


WORDS1 = [0x1111, 0x2222, 0x3333, 0x4444]
WORDS2 = [0x1111, 0xAAAA, 0x3333, 0xBBBB]
DELTA = COMP + 0x800


def _delta_sources(mem: GuestMemory) -> None:
    mem.write(SRC, struct.pack("<4Q", *WORDS1))
    mem.write(DST, struct.pack("<4Q", *WORDS2))


def test_cr_delta_record(mem: GuestMemory) -> None:
    _delta_sources(mem)
    run(mem, ref.descriptor(Op.CR_DELTA, RECORD | F.CR, completion_addr=COMP, src_addr=SRC,
                            src2_addr=DST, xfer_size=32, delta_addr=DELTA, max_delta_size=40,
                            expected_res_mask=0b001))
    assert mem.read(DELTA, 20) == struct.pack("<HQHQ", 1, 0xAAAA, 3, 0xBBBB)
    rec = record(mem)
    assert (rec.status, rec.result, rec.delta_rec_size, rec.bytes_completed) == (
        S.SUCCESS_PRED, 1, 20, 0)


def test_cr_delta_overflow(mem: GuestMemory) -> None:
    _delta_sources(mem)
    run(mem, ref.descriptor(Op.CR_DELTA, RECORD, completion_addr=COMP, src_addr=SRC,
                            src2_addr=DST, xfer_size=32, delta_addr=DELTA, max_delta_size=10))
    rec = record(mem)
    assert (rec.status, rec.result, rec.delta_rec_size, rec.bytes_completed) == (
        S.SUCCESS, 2, 10, 24)


@pytest.mark.parametrize(("fields", "status"), [
    ({"xfer_size": 12}, S.XFER_ERANGE),
    ({"src2_addr": DST + 4}, S.ADDR_ALIGN),
    ({"max_delta_size": 15}, S.DR_ERANGE),
])
def test_cr_delta_checks(mem: GuestMemory, fields: dict[str, int], status: int) -> None:
    args = {"src_addr": SRC, "src2_addr": DST, "xfer_size": 32, "delta_addr": DELTA,
            "max_delta_size": 40} | fields
    run(mem, ref.descriptor(Op.CR_DELTA, RECORD, completion_addr=COMP, **args))
    assert record(mem).status == status


def test_ap_delta_applies_the_record(mem: GuestMemory) -> None:
    _delta_sources(mem)
    mem.write(DELTA, struct.pack("<HQHQ", 1, 0xAAAA, 3, 0xBBBB))
    run(mem, ref.descriptor(Op.AP_DELTA, RECORD, completion_addr=COMP, src_addr=DELTA,
                            dst_addr=SRC, xfer_size=32, delta_rec_size=20))
    assert mem.read(SRC, 32) == mem.read(DST, 32)
    assert (record(mem).status, record(mem).bytes_completed) == (S.SUCCESS, 20)


@pytest.mark.parametrize(("entries", "size", "status"), [
    ((3, 1), 32, S.DR_OFFSET_NOINC),
    ((1, 1), 32, S.DR_OFFSET_NOINC),
    ((1, 4), 32, S.DR_OFFSET_ERANGE),
])
def test_ap_delta_offsets(mem: GuestMemory, entries: tuple[int, int], size: int,
                          status: int) -> None:
    mem.write(DELTA, struct.pack("<HQHQ", entries[0], 0xAAAA, entries[1], 0xBBBB))
    run(mem, ref.descriptor(Op.AP_DELTA, RECORD, completion_addr=COMP, src_addr=DELTA,
                            dst_addr=SRC, xfer_size=size, delta_rec_size=20))
    assert (record(mem).status, record(mem).bytes_completed) == (status, 10)
    assert mem.read(SRC + 8 * entries[0], 8) == struct.pack("<Q", 0xAAAA)


def test_ap_delta_record_overlapping_destination(mem: GuestMemory) -> None:
    run(mem, ref.descriptor(Op.AP_DELTA, RECORD, completion_addr=COMP, src_addr=SRC + 24,
                            dst_addr=SRC, xfer_size=32, delta_rec_size=10))
    assert record(mem).status == S.OVERLAP_BUFFERS


def test_dualcast(mem: GuestMemory) -> None:
    mem.write(SRC, b"dualcast")
    run(mem, ref.descriptor(Op.DUALCAST, RECORD, completion_addr=COMP, src_addr=SRC,
                            dst_addr=DST + 0x10, dest2=DST + 0x1010, xfer_size=8))
    assert mem.read(DST + 0x10, 8) == mem.read(DST + 0x1010, 8) == b"dualcast"
    run(mem, ref.descriptor(Op.DUALCAST, RECORD, completion_addr=COMP, src_addr=SRC,
                            dst_addr=DST, dest2=DST + 0x1010, xfer_size=8))
    assert record(mem).status == S.DCAST_ERR


def test_dualcast_second_destination_fault_leaves_the_offset_unwritten(mem: GuestMemory) -> None:
    mem.write(SRC, b"abcdefgh")
    run(mem, ref.descriptor(Op.DUALCAST, RECORD, completion_addr=COMP, src_addr=SRC,
                            dst_addr=DST + 0x3FFC, dest2=RO + 0xFFC, xfer_size=8))
    rec = record(mem)
    assert (rec.status, rec.bytes_completed, rec.fault_addr) == (
        S.PAGE_FAULT_NOBOF | 0x80, 0, RO + 0xFFC)
    assert mem.read(DST + 0x3FFC, 4) == bytes(4)


def test_crcgen_seed_from_descriptor_and_memory(mem: GuestMemory) -> None:
    mem.write(SRC, CHECK)
    first = ref.crc32c(CHECK[:4])
    mem.write(DST, first.to_bytes(4, "little"))
    run(mem, ref.descriptor(Op.CRCGEN, RECORD | OP16, completion_addr=COMP, src_addr=SRC + 4,
                            xfer_size=5, seed_addr=DST))
    assert record(mem).crc_val == 0xE3069283
    run(mem, ref.descriptor(Op.CRCGEN, RECORD, completion_addr=COMP, src_addr=SRC + 4,
                            xfer_size=5, crc_seed=first))
    assert record(mem).crc_val == 0xE3069283


def test_crcgen_fault_reports_the_crc_so_far(mem: GuestMemory) -> None:
    mem.store(RO + 0xFFC, b"1234")
    run(mem, ref.descriptor(Op.CRCGEN, RECORD | OP17, completion_addr=COMP, src_addr=RO + 0xFFC,
                            xfer_size=9))
    rec = record(mem)
    assert (rec.status, rec.bytes_completed, rec.fault_addr) == (S.PAGE_FAULT_NOBOF, 4, WO)
    assert rec.crc_val == ref.crc32c(b"1234", bypass_crc_reflection=True)


def test_crcgen_seed_address_checks(mem: GuestMemory) -> None:
    run(mem, ref.descriptor(Op.CRCGEN, RECORD | OP16, completion_addr=COMP, src_addr=SRC,
                            xfer_size=9, seed_addr=DST + 2))
    assert record(mem).status == S.ADDR_ALIGN
    run(mem, ref.descriptor(Op.CRCGEN, RECORD | OP16, completion_addr=COMP, src_addr=SRC,
                            xfer_size=9, seed_addr=WO))
    rec = record(mem)
    assert (rec.status, rec.bytes_completed, rec.fault_addr) == (S.PAGE_FAULT_NOBOF, 0, WO)


def test_copy_crc(mem: GuestMemory) -> None:
    mem.write(SRC, CHECK)
    run(mem, ref.descriptor(Op.COPY_CRC, RECORD | OP18, completion_addr=COMP, src_addr=SRC,
                            dst_addr=DST, xfer_size=9))
    assert mem.read(DST, 9) == CHECK
    assert record(mem).crc_val == ref.crc32c(CHECK, bypass_data_reflection=True)
    run(mem, ref.descriptor(Op.COPY_CRC, RECORD, completion_addr=COMP, src_addr=SRC,
                            dst_addr=SRC + 8, xfer_size=9))
    assert record(mem).status == S.OVERLAP_BUFFERS


def test_cflush(mem: GuestMemory) -> None:
    run(mem, ref.descriptor(Op.CFLUSH, RECORD, completion_addr=COMP, dst_addr=RO, xfer_size=0x2000))
    assert record(mem).status == S.SUCCESS
    run(mem, ref.descriptor(Op.CFLUSH, RECORD, completion_addr=COMP, dst_addr=WO + 0xF00,
                            xfer_size=0x200))
    rec = record(mem)
    assert (rec.status, rec.bytes_completed, rec.fault_addr) == (
        S.PAGE_FAULT_NOBOF | 0x80, 0x100, WO + 0x1000)


# --- DIF -------------------------------------------------------------------------------------

BLOCK = bytes(range(256)) * 2  # 512 bytes


def test_dif_guard_flags() -> None:
    assert ref.dif_guard(BLOCK, ref.DIF_SEED_FFFF) == ref.crc16_t10dif(BLOCK, 0xFFFF)
    assert ref.dif_guard(bytes(512), 0) == 0
    assert ref.dif_guard(bytes(512), ref.DIF_GUARD_INVERTED) == 0xFFFF


def test_dif_insert_then_check_then_strip(mem: GuestMemory) -> None:
    mem.write(SRC, BLOCK + BLOCK[::-1])
    dif_flags, dst_flags = ref.DIF_SEED_FFFF, ref.INCREMENTING_APP
    run(mem, ref.descriptor(Op.DIF_INS, RECORD, completion_addr=COMP, src_addr=SRC, dst_addr=DST,
                            xfer_size=1024, dif_ins_flags=dif_flags, dest_dif_flag=dst_flags,
                            ins_ref_tag_seed=0xFFFFFFFF, ins_app_tag_mask=0x00F0,
                            ins_app_tag_seed=0x1234))
    rec = record(mem)
    assert (rec.status, rec.dif_ins_ref_tag, rec.dif_ins_app_tag_mask, rec.dif_ins_app_tag) == (
        S.SUCCESS, 1, 0x00F0, 0x1236)
    dif0 = mem.read(DST + 512, 8)
    guard = ref.crc16_t10dif(BLOCK, 0xFFFF)
    assert dif0 == struct.pack(">HHI", guard, 0x1204, 0xFFFFFFFF)
    assert mem.read(DST + 520 + 512 + 2, 6) == struct.pack(">HI", 0x1205, 0)
    check = {"src_addr": DST, "xfer_size": 1040, "dif_chk_flags": dif_flags,
             "src_dif_flags": ref.INCREMENTING_APP, "chk_ref_tag_seed": 0xFFFFFFFF,
             "chk_app_tag_mask": 0x00F0, "chk_app_tag_seed": 0x1234}
    run(mem, ref.descriptor(Op.DIF_CHECK, RECORD, completion_addr=COMP, **check))
    rec = record(mem)
    assert (rec.status, rec.dif_chk_ref_tag, rec.dif_chk_app_tag) == (S.SUCCESS, 1, 0x1236)
    run(mem, ref.descriptor(Op.DIF_STRP, RECORD, completion_addr=COMP, dst_addr=SRC + 0x2000,
                            **check))
    assert mem.read(SRC + 0x2000, 1024) == mem.read(SRC, 1024)


def _dif_source(mem: GuestMemory, difs: list[bytes]) -> None:
    for i, dif in enumerate(difs):
        mem.write(SRC + i * 520, BLOCK + dif)


def test_dif_check_errors_at_second_block(mem: GuestMemory) -> None:
    good = struct.pack(">HHI", ref.crc16_t10dif(BLOCK), 7, 100)
    bad = struct.pack(">HHI", 0, 8, 100)  # guard, app wrong; ref right for a fixed tag
    _dif_source(mem, [good, bad])
    run(mem, ref.descriptor(Op.DIF_CHECK, RECORD, completion_addr=COMP, src_addr=SRC,
                            xfer_size=1040, src_dif_flags=ref.FIXED_REF, chk_ref_tag_seed=100,
                            chk_app_tag_seed=7, chk_app_tag_mask=0xFFF0))
    rec = record(mem)
    assert (rec.status, rec.dif_status, rec.bytes_completed, rec.dif_chk_ref_tag) == (
        S.DIF_ERR, ref.DIF_GUARD_ERROR | ref.DIF_APP_ERROR, 520, 100)


@pytest.mark.parametrize(("src_flags", "dif", "errors"), [
    (0x03, b"\xff" * 8, ref.DIF_ALL_F_ERROR),
    (0x02, b"\xff" * 8, ref.DIF_GUARD_ERROR | ref.DIF_APP_ERROR | ref.DIF_REF_ERROR),
    (0x04, b"\0\0\xff\xff\0\0\0\0", 0),
    (0x08, b"\0\0\xff\xff\0\0\0\0", ref.DIF_GUARD_ERROR | ref.DIF_APP_ERROR | ref.DIF_REF_ERROR),
    (0x08, b"\0\0\xff\xff\xff\xff\xff\xff", 0),
    (0x60, b"\0\0\0\x05\0\0\0\0", ref.DIF_APP_ERROR),
])
def test_dif_f_detect_and_disables(src_flags: int, dif: bytes, errors: int) -> None:
    tags = ref.DifTags(ref_seed=9, app_mask=0, app_seed=6, flags=src_flags)
    assert ref.dif_errors(BLOCK, dif, 0, tags, 0) == errors


def test_dif_update(mem: GuestMemory) -> None:
    # A wrong source guard, not checked: the destination's is computed afresh.
    _dif_source(mem, [struct.pack(">HHI", 0xBEEF, 1, 50)])
    run(mem, ref.descriptor(Op.DIF_UPDT, RECORD, completion_addr=COMP, src_addr=SRC, dst_addr=DST,
                            xfer_size=520, src_ref_tag_seed=50, src_app_tag_seed=1,
                            src_upd_flags=ref.SRC_GUARD_CHECK_DISABLE,
                            upd_dest_flags=ref.DST_APP_PASS, dif_upd_flags=ref.DIF_GUARD_INVERTED,
                            dest_ref_tag_seed=0x77, dest_app_tag_seed=0x99))
    assert mem.read(DST, 520) == BLOCK + struct.pack(">HHI", ref.crc16_t10dif(BLOCK) ^ 0xFFFF,
                                                     1, 0x77)
    rec = record(mem)
    assert (rec.dif_upd_src_ref_tag, rec.dif_upd_dest_ref_tag, rec.dif_upd_dest_app_tag) == (
        51, 0x78, 0x99)


def test_dif_block_fault_before_any_byte_of_it(mem: GuestMemory) -> None:
    mem.write(SRC, BLOCK * 2)
    run(mem, ref.descriptor(Op.DIF_INS, RECORD, completion_addr=COMP, src_addr=SRC,
                            dst_addr=DST + REGION_SIZE - 1000, xfer_size=1024))
    rec = record(mem)
    assert (rec.status, rec.bytes_completed, rec.fault_addr, rec.dif_ins_ref_tag) == (
        S.PAGE_FAULT_NOBOF | 0x80, 512, DST + REGION_SIZE, 1)
    assert mem.read(DST + REGION_SIZE - 480, 480) == bytes(480)


@pytest.mark.parametrize(("opcode", "size"), [(Op.DIF_INS, 520), (Op.DIF_STRP, 512)])
def test_dif_size_must_be_whole_blocks(mem: GuestMemory, opcode: int, size: int) -> None:
    run(mem, ref.descriptor(opcode, RECORD, completion_addr=COMP, src_addr=SRC, dst_addr=DST,
                            xfer_size=size))
    assert record(mem).status == S.XFER_ERANGE


# --- BATCH -----------------------------------------------------------------------------------

LIST = COMP + 0x400


def _batch(mem: GuestMemory, entries: list[bytes], count: int | None = None,
           flags: int = RECORD) -> ref.Outcome:
    for i, entry in enumerate(entries):
        mem.write(LIST + 64 * i, entry)
    return run(mem, ref.descriptor(Op.BATCH, flags, completion_addr=COMP,
                                   desc_list_addr=LIST, desc_count=count or len(entries)))


def _fill(i: int, flags: int = 0, size: int = 8) -> bytes:
    return ref.descriptor(Op.MEMFILL, flags | F.CRAV | F.RCR | F.RCI,
                          completion_addr=COMP + 32 * (i + 1), pattern=i + 1,
                          dst_addr=DST + 16 * i, xfer_size=size, int_handle=i)


def test_batch_success(mem: GuestMemory) -> None:
    out = _batch(mem, [_fill(0), _fill(1), _fill(2)])
    assert (record(mem).status, record(mem).bytes_completed) == (S.SUCCESS, 3)
    assert out.interrupts == [0, 1, 2]
    assert mem.read(DST + 32, 1) == b"\x03"


def test_batch_fence_abandons_the_rest(mem: GuestMemory) -> None:
    entries = [_fill(0, size=0), _fill(1), _fill(2, F.FENCE), _fill(3)]
    out = _batch(mem, entries)
    assert (record(mem).status, record(mem).bytes_completed) == (S.BATCH_FAIL, 2)
    assert [record(mem, COMP + 32 * (i + 1)).status for i in range(4)] == [
        S.XFER_ERANGE, S.SUCCESS, 0, 0]
    assert out.interrupts == [0, 1]


def test_batch_inside_batch_and_drain_are_bad_opcodes(mem: GuestMemory) -> None:
    inner = ref.descriptor(Op.DRAIN, F.CRAV, completion_addr=COMP + 32)
    out = _batch(mem, [inner, ref.descriptor(Op.BATCH)], flags=F.CRAV)
    assert record(mem, COMP + 32).status == S.BAD_OPCODE
    assert out.errors == [ref.SoftwareError(error=S.BAD_OPCODE, operation=Op.BATCH, wq=3,
                                            batch=1, batch_index=1)]
    assert record(mem).status == S.BATCH_FAIL


def test_batch_list_fault(mem: GuestMemory) -> None:
    list_address = COMP + 0x1000 - 64
    mem.write(list_address, _fill(0))
    out = run(mem, ref.descriptor(Op.BATCH, 0, desc_list_addr=list_address, desc_count=3))
    assert out.errors == [ref.SoftwareError(error=S.BATCH_PAGE_FAULT, operation=Op.BATCH, wq=3,
                                            fault_addr=COMP + 0x1000)]


@pytest.mark.parametrize(("count", "address", "status"), [
    (1, LIST, S.DESC_CNT_ERANGE),
    (9, LIST, S.DESC_CNT_ERANGE),
    (2, LIST + 32, S.DESCLIST_ALIGN),
])
def test_batch_checks(mem: GuestMemory, count: int, address: int, status: int) -> None:
    run(mem, ref.descriptor(Op.BATCH, RECORD, completion_addr=COMP, desc_list_addr=address,
                            desc_count=count))
    assert record(mem).status == status


def test_drain_with_readback_addresses(mem: GuestMemory) -> None:
    run(mem, ref.descriptor(Op.DRAIN, RECORD | OP16, completion_addr=COMP, rdback_addr=SRC))
    assert record(mem).status == S.SUCCESS
    run(mem, ref.descriptor(Op.DRAIN, RECORD, completion_addr=COMP, rdback_addr=SRC))
    assert record(mem).status == S.NOZERO_RESERVE
