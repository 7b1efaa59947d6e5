"""Descriptors end to end: the real server and native engine, driven over the vfio-user socket by
our own client harness the way a guest driver drives a DSA.

The harness programs the device through BAR0 (GRPCFG, WQCFG, commands), submits descriptors as a
MOVDIR64B reaches the server (eight ascending 8-byte portal writes in BAR2), maps guest memory
from memfds and waits for MSI-X eventfds and completion records. The server runs its own trio
loop in a thread of its own, as it would in its own process: a server call that blocks (a drain,
a DMA unmap waiting for a descriptor) blocks only it, so every wait here stays bounded.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.conftest import vdsa_env
from tests.test_server import PCI_CAP_ID_EXP, capabilities
from vdsa_server.bench.serving import serving
from vdsa_server.client import GuestMemory, PciIrq, VfioUserClient
from vdsa_server.client.driver import (
    DESCRIPTOR_SIZE,
    PCI_COMMAND,
    RECORD_SIZE,
    SLOTS_PER_PORTAL,
    DsaDriver,
    make_descriptor,
    vector_of,
)
from vdsa_server.client.protocol import DmaMapFlag, IrqSetFlag
from vdsa_server.device.config import DeviceConfig
from vdsa_server.device.descriptors import (
    DSA_COMP_STATUS_WRITE,
    DsaCompletionRecord,
    DsaHwDesc,
)
from vdsa_server.device.descriptors import DsaCompStatus as S
from vdsa_server.device.descriptors import DsaOpcode as Op
from vdsa_server.device.descriptors import IdxdOpFlag as F
from vdsa_server.device.pci import PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, Bar
from vdsa_server.device.registers import (
    IDXD_CMD_OFFSET,
    IDXD_CMDSTS_OFFSET,
    IDXD_GENCTRL_OFFSET,
    IDXD_GENSTATS_OFFSET,
    IDXD_INTCAUSE_OFFSET,
    IDXD_SWERR_ACK,
    IDXD_SWERR_OFFSET,
    CmdStsReg,
    GenCtrlReg,
    GenStsReg,
    IdxdCmd,
    IdxdCmdstsErr,
    IdxdCommandReg,
    IdxdDeviceStatusState,
    IdxdIntc,
    IdxdPortal,
    SwErrReg,
)
from vdsa_server.engine import Engine
from vdsa_server.server import VdsaServer

MiB = 1 << 20
WAIT = 5.0  # bound of any single wait for the device
POLL = 0.001
# The PCI Express capability's registers (include/uapi/linux/pci_regs.h).
PCI_EXP_DEVCAP = 0x04
PCI_EXP_DEVCAP_FLR = 1 << 28
PCI_EXP_DEVCTL = 0x08
PCI_EXP_DEVCTL_BCR_FLR = 1 << 15

# Guest memory. MAIN holds completion records, batch lists and small buffers; the IOVA space
# right after it is unmapped, for faults.
MAIN = 0x1000_0000
MAIN_SIZE = 4 * MiB
MAIN_END = MAIN + MAIN_SIZE
RECORDS = MAIN  # 32-byte records, 2048 of them
LISTS = MAIN + 0x10000  # batch lists, 2048 descriptors
BUF_A = MAIN + 1 * MiB
BUF_B = MAIN + 2 * MiB
BUF_C = MAIN + 3 * MiB
UNMAPPED = 0x7000_0000
# Separate mappings some tests add: 2 MiB buffers for long-running work, a canary, and
# a page the device may only read.
BIG = 0x4000_0000
BIG_SIZE = 6 * MiB
BIG_SRC, BIG_DST, BIG_DST2 = BIG, BIG + 2 * MiB, BIG + 4 * MiB
CANARY = 0x5000_0000
CANARY_SIZE = 2 * MiB
READ_ONLY = 0x6000_0000

# Batches of 2 MiB copies that must outlast a few vfio-user round trips: about 0.4 s with the
# sanitized engine, 0.1 s with the release one.
LONG_BATCH = 256

RECORD = RECORDS  # the record a single descriptor uses unless told otherwise
NOTIFY = F.CRAV | F.RCR | F.RCI

# Topology the tests program: WQ 0 with two engines (so a drain descriptor really waits for
# another engine), WQs 1 and 2 with one engine each.
WQ_SIZES = {0: 64, 1: 32, 2: 16}
WQ_ENGINES = {0: (0, 1), 1: (2,), 2: (3,)}


VECTOR = vector_of(0)


def wq_operand(wq: int) -> int:
    """The operand of disable/drain/abort WQ: a bit in a set of 16 WQs, and the set."""
    return (1 << (wq % 16)) | ((wq // 16) << 16)


def record_at(index: int) -> int:
    return RECORDS + index * RECORD_SIZE


def descriptor(opcode: int, flags: int = NOTIFY, *, record: int = RECORD,
               vector: int = VECTOR, **fields: int) -> bytes:
    """A descriptor for ``opcode``; by default it asks for a record at ``record`` and an
    interrupt on ``vector``. ``fields`` are ``DsaHwDesc`` field names."""
    return make_descriptor(opcode, flags, record=record, vector=vector, **fields)


def big_memmove(dst: int, flags: int = 0, record: int = 0) -> bytes:
    """A 2 MiB copy out of BIG, the unit of long-running work."""
    return descriptor(Op.MEMMOVE, flags, record=record, src_addr=BIG_SRC, dst_addr=dst,
                      xfer_size=2 * MiB)


def pattern_bytes(pattern: int, size: int) -> bytes:
    return (pattern.to_bytes(8, "little") * (size // 8 + 1))[:size]


def noise(size: int, seed: int) -> bytes:
    """Deterministic bytes that differ at every offset from ``noise(size, other seed)``."""
    return bytes((seed + i * 7 + (i >> 8)) & 0xFF for i in range(size))


# --- CRCs, to check the engine's against ----------------------------------------------------------


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes, seed: int = 0) -> int:
    """CRC32C as RFC 3720 defines it, continuing from ``seed`` (a previous result)."""
    crc = ~seed & 0xFFFF_FFFF
    for byte in data:
        crc = CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return ~crc & 0xFFFF_FFFF


def crc16_t10dif(data: bytes) -> int:
    """The T10-DIF guard: CRC16, polynomial 0x8BB7, most significant bit first, seed 0."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8BB7 if crc & 0x8000 else crc << 1) & 0xFFFF
    return crc


def test_crc_helpers_match_published_check_values() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc16_t10dif(b"123456789") == 0xD0DB


DIF_BLOCK = 512  # DIF flags bits 1:0 = 0


def dif(block: bytes, app: int, ref: int) -> bytes:
    """The 8-byte DIF after ``block``: guard, application tag, reference tag, big-endian."""
    return struct.pack(">HHI", crc16_t10dif(block), app, ref)


def protected(blocks: Sequence[bytes], app: int, ref_seed: int) -> bytes:
    """Blocks each followed by its DIF, reference tags counting up from ``ref_seed``."""
    return b"".join(block + dif(block, app, ref_seed + i) for i, block in enumerate(blocks))


async def poll_until(condition: Callable[[], bool]) -> None:
    """Poll as a driver polls a completion record: memory changes with no event to wait for."""
    with trio.fail_after(WAIT):
        while not condition():  # noqa: ASYNC110 - nothing to wait on but the memory
            await trio.sleep(POLL)


# --- The server, in a thread or a process of its own ---------------------------------------------


@contextlib.asynccontextmanager
async def server_thread(socket: Path, config: DeviceConfig) -> AsyncIterator[VdsaServer]:
    """A :class:`VdsaServer` serving ``socket`` from its own trio loop in its own thread."""
    server = VdsaServer(socket, config)
    here = trio.lowlevel.current_trio_token()
    there: list[trio.lowlevel.TrioToken] = []
    listening, stopped = trio.Event(), trio.Event()
    stop = trio.CancelScope()

    async def serve() -> None:
        there.append(trio.lowlevel.current_trio_token())
        with stop:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                here.run_sync_soon(listening.set)

    async def run() -> None:
        try:
            # Abandoned on cancel: a server stuck in the engine must not hang the test too.
            await trio.to_thread.run_sync(trio.run, serve, abandon_on_cancel=True)
        finally:
            stopped.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        with trio.fail_after(WAIT):
            await listening.wait()
        try:
            yield server
        finally:
            with contextlib.suppress(trio.RunFinishedError):  # it ended on its own
                there[0].run_sync_soon(stop.cancel)
            with trio.fail_after(WAIT):
                await stopped.wait()


@contextlib.asynccontextmanager
async def server_process(socket: Path, log: Path) -> AsyncIterator[trio.Process]:
    """`vdsa serve` in a process of its own, with the session's engine, for tests that could
    crash the server: they report it instead of taking pytest down. Its log goes to ``log``."""
    async with serving(socket, log, env=vdsa_env()) as process:
        yield process


async def server_log(log: Path) -> str:
    """The end of a server's log, for an assertion message."""
    return (await trio.Path(log).read_text())[-3000:]


# --- The guest's side -----------------------------------------------------------------------------


class Guest(DsaDriver):
    """The driver, with the tests' topology, the server's engine when it runs in this process,
    and one-descriptor round trips."""

    def __init__(self, server: VdsaServer | None, client: VfioUserClient,
                 memory: GuestMemory) -> None:
        super().__init__(client, memory, wait_limit=WAIT)
        self.server = server  # None when it runs in another process

    @property
    def engine(self) -> Engine:
        """The server's engine, for the counters a guest cannot see."""
        assert self.server is not None, "the server runs in another process"
        return self.server.engine

    async def set_up(self) -> None:
        await super().set_up()
        await self.configure()

    async def configure(self) -> None:
        """Groups and WQs, as the tests' topology has them; the device and WQ 0 enabled."""
        for group, wq in enumerate(sorted(WQ_SIZES)):
            await self.configure_wq(wq, WQ_SIZES[wq])
            await self.configure_group(group, 1 << wq, sum(1 << e for e in WQ_ENGINES[wq]))
        assert await self.command(IdxdCmd.ENABLE_DEVICE) is IdxdCmdstsErr.SUCCESS
        assert await self.command(IdxdCmd.ENABLE_WQ, 0) is IdxdCmdstsErr.SUCCESS

    async def swerr(self) -> SwErrReg:
        return SwErrReg.from_buffer_copy(
            await self.client.region_read(Bar.REGISTERS, IDXD_SWERR_OFFSET, RECORD_SIZE))

    def write_list(self, entries: Sequence[bytes], at: int = LISTS) -> None:
        """A batch's descriptor list, in guest memory."""
        self.memory.write(at, b"".join(entries))

    async def wait_record(self, record: int) -> DsaCompletionRecord:
        await poll_until(lambda: self.status(record) != 0)
        return self.record(record)

    async def run(self, desc: bytes, wq: int = 0,
                  portal: IdxdPortal = IdxdPortal.LIMITED_MSIX, slot: int | None = None
                  ) -> DsaCompletionRecord:
        """Submit ``desc`` (made by :func:`descriptor` with its defaults) and return its record,
        which must be complete when its one interrupt arrives."""
        parsed = DsaHwDesc.from_buffer_copy(desc)
        assert parsed.flags & NOTIFY == NOTIFY
        self.memory.write(parsed.completion_addr, bytes(RECORD_SIZE))
        await self.submit(desc, wq, portal, slot)
        assert await self.interrupt(parsed.int_handle) == 1
        assert self.status(parsed.completion_addr), "the interrupt came before the record"
        return self.record(parsed.completion_addr)


@contextlib.asynccontextmanager
async def connected_guest(socket: Path, server: VdsaServer | None) -> AsyncIterator[Guest]:
    async with VfioUserClient.connect(socket) as client:
        with GuestMemory(MAIN, MAIN_SIZE) as memory:
            guest = Guest(server, client, memory)
            await guest.set_up()
            yield guest


@pytest.fixture
async def guest(tmp_path: Path) -> AsyncIterator[Guest]:
    socket = tmp_path / "dsa.sock"
    async with server_thread(socket, DeviceConfig()) as server, \
            connected_guest(socket, server) as guest:
        yield guest


# --- Submission -----------------------------------------------------------------------------------


@pytest.mark.parametrize("portal", list(IdxdPortal))
async def test_every_portal_page_and_slot_takes_descriptors(guest: Guest,
                                                            portal: IdxdPortal) -> None:
    for slot in (0, 1, SLOTS_PER_PORTAL - 1):
        record = await guest.run(descriptor(Op.NOOP), portal=portal, slot=slot)
        assert record.status == S.SUCCESS


async def test_portal_writes_with_memory_decode_off_are_ignored(guest: Guest) -> None:
    command = await guest.client.config_read(PCI_COMMAND, 2)
    await guest.client.config_write(PCI_COMMAND, command & ~PCI_COMMAND_MEMORY, 2)
    ignored = record_at(1)
    guest.memory.write(ignored, bytes(RECORD_SIZE))
    await guest.submit(descriptor(Op.NOOP, record=ignored))
    await guest.client.config_write(PCI_COMMAND, command, 2)
    assert (await guest.run(descriptor(Op.NOOP))).status == S.SUCCESS
    assert guest.status(ignored) == 0
    assert guest.engine.counters(0).submitted == 1


# --- Every operation ------------------------------------------------------------------------------


async def test_noop(guest: Guest) -> None:
    record = await guest.run(descriptor(Op.NOOP))
    assert bytes(record) == bytes([S.SUCCESS]) + bytes(RECORD_SIZE - 1)


async def test_memmove(guest: Guest) -> None:
    data = noise(5000, 1)
    guest.memory.write(BUF_A, data)
    record = await guest.run(descriptor(Op.MEMMOVE, src_addr=BUF_A, dst_addr=BUF_B,
                                        xfer_size=len(data)))
    assert (record.status, record.result) == (S.SUCCESS, 0)
    assert guest.memory.read(BUF_B, len(data) + 1) == data + b"\0"


async def test_memmove_overlapping_upwards_copies_back_to_front(guest: Guest) -> None:
    data = noise(1000, 2)
    guest.memory.write(BUF_A, data)
    record = await guest.run(descriptor(Op.MEMMOVE, src_addr=BUF_A, dst_addr=BUF_A + 100,
                                        xfer_size=len(data)))
    assert (record.status, record.result) == (S.SUCCESS, 1)
    assert guest.memory.read(BUF_A, 1100) == data[:100] + data


async def test_memfill(guest: Guest) -> None:
    pattern = 0x0807_0605_0403_0201
    record = await guest.run(descriptor(Op.MEMFILL, pattern=pattern, dst_addr=BUF_B + 3,
                                        xfer_size=1003))
    assert record.status == S.SUCCESS
    assert guest.memory.read(BUF_B, 1008) == b"\0" * 3 + pattern_bytes(pattern, 1003) + b"\0" * 2


async def test_compare(guest: Guest) -> None:
    data = noise(3000, 3)
    guest.memory.write(BUF_A, data)
    guest.memory.write(BUF_B, data)
    compare = partial(descriptor, Op.COMPARE, src_addr=BUF_A, src2_addr=BUF_B, xfer_size=3000)
    record = await guest.run(compare())
    assert (record.status, record.result, record.bytes_completed) == (S.SUCCESS, 0, 0)
    guest.memory.write(BUF_B + 777, b"\xff")
    record = await guest.run(compare())
    assert (record.status, record.result, record.bytes_completed) == (S.SUCCESS, 1, 777)
    # Check result (CR): a result other than the expected one is a false predicate.
    record = await guest.run(compare(NOTIFY | F.CR, expected_res=0))
    assert (record.status, record.result) == (S.SUCCESS_PRED, 1)
    record = await guest.run(compare(NOTIFY | F.CR, expected_res=1))
    assert (record.status, record.result) == (S.SUCCESS, 1)


async def test_compare_pattern(guest: Guest) -> None:
    pattern = 0x1122_3344_5566_7788
    guest.memory.write(BUF_A, pattern_bytes(pattern, 1000))
    compval = partial(descriptor, Op.COMPVAL, src_addr=BUF_A, comp_pattern=pattern,
                      xfer_size=1000)
    record = await guest.run(compval())
    assert (record.status, record.result) == (S.SUCCESS, 0)
    guest.memory.write(BUF_A + 501, b"\0")
    record = await guest.run(compval())
    assert (record.status, record.result, record.bytes_completed) == (S.SUCCESS, 1, 501)


async def test_create_and_apply_delta(guest: Guest) -> None:
    size = 4096
    original = noise(size, 4)
    changed = bytearray(original)
    changed[3 * 8:4 * 8] = b"ABCDEFGH"
    changed[100 * 8 + 5] ^= 0xFF
    guest.memory.write(BUF_A, original)
    guest.memory.write(BUF_B, bytes(changed))
    delta = BUF_C
    create = partial(descriptor, Op.CR_DELTA, src_addr=BUF_A, src2_addr=BUF_B, xfer_size=size,
                     delta_addr=delta)
    record = await guest.run(create(max_delta_size=80))
    assert (record.status, record.result, record.delta_rec_size) == (S.SUCCESS, 1, 20)
    expected = [(3, changed[24:32]), (100, changed[800:808])]
    assert guest.memory.read(delta, 20) == b"".join(
        struct.pack("<H", word) + data for word, data in expected)
    # Room for one entry only: result 2, stopped at the word whose entry did not fit.
    record = await guest.run(create(max_delta_size=10))
    assert (record.status, record.result) == (S.SUCCESS, 2)
    assert (record.bytes_completed, record.delta_rec_size) == (100 * 8, 10)

    target = BUF_C + 0x10000
    guest.memory.write(target, original)
    record = await guest.run(descriptor(Op.AP_DELTA, src_addr=delta, dst_addr=target,
                                        xfer_size=size, delta_rec_size=20))
    assert (record.status, record.bytes_completed) == (S.SUCCESS, 20)
    assert guest.memory.read(target, size) == bytes(changed)

    guest.memory.write(BUF_B, original)
    record = await guest.run(create(max_delta_size=80))
    assert (record.status, record.result, record.delta_rec_size) == (S.SUCCESS, 0, 0)


async def test_dualcast(guest: Guest) -> None:
    data = noise(2500, 5)
    guest.memory.write(BUF_A, data)
    # Both destinations share address bits 11:0, as dualcast requires.
    record = await guest.run(descriptor(Op.DUALCAST, src_addr=BUF_A, dst_addr=BUF_B + 0x40,
                                        dest2=BUF_C + 0x40, xfer_size=len(data)))
    assert record.status == S.SUCCESS
    assert guest.memory.read(BUF_B + 0x40, len(data)) == data
    assert guest.memory.read(BUF_C + 0x40, len(data)) == data
    record = await guest.run(descriptor(Op.DUALCAST, src_addr=BUF_A, dst_addr=BUF_B,
                                        dest2=BUF_C + 8, xfer_size=len(data)))
    assert record.status == S.DCAST_ERR


async def test_crc_generation(guest: Guest) -> None:
    guest.memory.write(BUF_A, b"123456789")
    record = await guest.run(descriptor(Op.CRCGEN, src_addr=BUF_A, xfer_size=9))
    assert (record.status, record.crc_val) == (S.SUCCESS, 0xE3069283)
    data = noise(3000, 6)
    guest.memory.write(BUF_A, data)
    # A CRC continues from its seed: the CRC of the first part seeds the rest.
    first = crc32c(data[:1234])
    record = await guest.run(descriptor(Op.CRCGEN, src_addr=BUF_A + 1234, xfer_size=3000 - 1234,
                                        crc_seed=first))
    assert (record.status, record.crc_val) == (S.SUCCESS, crc32c(data))
    # Operation flag bit 16: the seed is read from memory.
    guest.memory.write(BUF_B, first.to_bytes(4, "little"))
    record = await guest.run(descriptor(Op.CRCGEN, NOTIFY | 1 << 16, src_addr=BUF_A + 1234,
                                        xfer_size=3000 - 1234, seed_addr=BUF_B))
    assert (record.status, record.crc_val) == (S.SUCCESS, crc32c(data))


async def test_copy_with_crc(guest: Guest) -> None:
    data = noise(4000, 7)
    guest.memory.write(BUF_A, data)
    record = await guest.run(descriptor(Op.COPY_CRC, src_addr=BUF_A, dst_addr=BUF_B,
                                        xfer_size=len(data), crc_seed=0))
    assert (record.status, record.crc_val) == (S.SUCCESS, crc32c(data))
    assert guest.memory.read(BUF_B, len(data) + 1) == data + b"\0"


def dif_blocks(count: int, seed: int) -> list[bytes]:
    return [noise(DIF_BLOCK, seed + i) for i in range(count)]


async def test_dif_check(guest: Guest) -> None:
    blocks = dif_blocks(3, 8)
    guest.memory.write(BUF_A, protected(blocks, app=0x1234, ref_seed=100))
    check = partial(descriptor, Op.DIF_CHECK, src_addr=BUF_A, xfer_size=3 * (DIF_BLOCK + 8),
                    chk_ref_tag_seed=100, chk_app_tag_seed=0x1234)
    record = await guest.run(check())
    assert record.status == S.SUCCESS
    # The tags of the block after the last one.
    assert (record.dif_chk_ref_tag, record.dif_chk_app_tag) == (103, 0x1234)
    guest.memory.write(BUF_A + DIF_BLOCK + 8 + 17, b"\x00\x01")  # block 1's data
    record = await guest.run(check())
    assert (record.status, record.dif_status) == (S.DIF_ERR, 0x01)  # guard
    assert (record.bytes_completed, record.dif_chk_ref_tag) == (DIF_BLOCK + 8, 101)
    record = await guest.run(check(chk_ref_tag_seed=99))
    assert (record.status, record.dif_status, record.bytes_completed) == (S.DIF_ERR, 0x04, 0)


async def test_dif_insert(guest: Guest) -> None:
    blocks = dif_blocks(2, 9)
    guest.memory.write(BUF_A, b"".join(blocks))
    record = await guest.run(descriptor(
        Op.DIF_INS, src_addr=BUF_A, dst_addr=BUF_B, xfer_size=2 * DIF_BLOCK,
        ins_ref_tag_seed=7, ins_app_tag_seed=0x5678, ins_app_tag_mask=0x00FF))
    assert record.status == S.SUCCESS
    # The application tag is written with the masked bits clear.
    assert guest.memory.read(BUF_B, 2 * (DIF_BLOCK + 8)) == protected(blocks, 0x5600, 7)
    assert (record.dif_ins_ref_tag, record.dif_ins_app_tag) == (9, 0x5678)


async def test_dif_strip(guest: Guest) -> None:
    blocks = dif_blocks(2, 10)
    guest.memory.write(BUF_A, protected(blocks, app=0x0042, ref_seed=0))
    record = await guest.run(descriptor(
        Op.DIF_STRP, src_addr=BUF_A, dst_addr=BUF_B, xfer_size=2 * (DIF_BLOCK + 8),
        chk_app_tag_seed=0x0042))
    assert record.status == S.SUCCESS
    assert guest.memory.read(BUF_B, 2 * DIF_BLOCK + 1) == b"".join(blocks) + b"\0"


async def test_dif_update(guest: Guest) -> None:
    blocks = dif_blocks(2, 11)
    guest.memory.write(BUF_A, protected(blocks, app=0x1111, ref_seed=100))
    record = await guest.run(descriptor(
        Op.DIF_UPDT, src_addr=BUF_A, dst_addr=BUF_B, xfer_size=2 * (DIF_BLOCK + 8),
        src_ref_tag_seed=100, src_app_tag_seed=0x1111,
        dest_ref_tag_seed=500, dest_app_tag_seed=0x2222))
    assert record.status == S.SUCCESS
    assert guest.memory.read(BUF_B, 2 * (DIF_BLOCK + 8)) == protected(blocks, 0x2222, 500)
    assert (record.dif_upd_src_ref_tag, record.dif_upd_dest_ref_tag) == (102, 502)


async def test_cache_flush(guest: Guest) -> None:
    before = guest.memory.read(BUF_A, 8192)
    record = await guest.run(descriptor(Op.CFLUSH, dst_addr=BUF_A, xfer_size=8192))
    assert record.status == S.SUCCESS
    assert guest.memory.read(BUF_A, 8192) == before
    # Every byte must be mapped: the flush faults where the mapping ends, as a write.
    record = await guest.run(descriptor(Op.CFLUSH, dst_addr=MAIN_END - 64, xfer_size=128))
    assert (record.status, record.fault_addr, record.bytes_completed) == (
        S.PAGE_FAULT_NOBOF | DSA_COMP_STATUS_WRITE, MAIN_END, 64)


async def test_drain_descriptor_waits_for_earlier_descriptors(guest: Guest) -> None:
    """WQ 0 has two engines: the drain is taken by the second while the first still runs the
    batch submitted before it, and must not complete before that batch."""
    with GuestMemory(BIG, BIG_SIZE) as big:
        await guest.client.dma_map(big)
        batch = record_at(0x100)
        guest.memory.write(batch, bytes(RECORD_SIZE))
        guest.write_list([big_memmove(BIG_DST)] * LONG_BATCH)
        await guest.submit(descriptor(Op.BATCH, F.CRAV | F.RCR, record=batch,
                                      desc_list_addr=LISTS, desc_count=LONG_BATCH))
        drain = descriptor(Op.DRAIN)
        guest.memory.write(RECORD, bytes(RECORD_SIZE))
        await guest.submit(drain)
        assert not guest.status(batch), "the batch ended before the drain came: make it longer"
        assert await guest.interrupt(VECTOR) == 1
        assert guest.record(RECORD).status == S.SUCCESS
        assert guest.record(batch).status == S.SUCCESS, "the drain completed before the batch"


# --- Batches --------------------------------------------------------------------------------------


async def test_batch_runs_its_entries_in_order(guest: Guest) -> None:
    data = noise(4096, 12)
    guest.memory.write(BUF_A, data)
    guest.memory.write(BUF_C, bytes(256))
    entries = [
        descriptor(Op.MEMMOVE, 0, src_addr=BUF_A, dst_addr=BUF_B, xfer_size=4096),
        # A fence after a success holds nothing up; the compare sees the copy.
        descriptor(Op.COMPARE, F.FENCE | F.CRAV | F.RCR, record=record_at(1), src_addr=BUF_A,
                   src2_addr=BUF_B, xfer_size=4096),
        descriptor(Op.MEMFILL, F.CRAV | F.RCR | F.RCI, record=record_at(2), vector=2,
                   pattern=0xAA, dst_addr=BUF_C, xfer_size=256),
    ]
    for index in (1, 2):
        guest.memory.write(record_at(index), bytes(RECORD_SIZE))
    guest.write_list(entries)
    record = await guest.run(descriptor(Op.BATCH, desc_list_addr=LISTS, desc_count=3))
    assert (record.status, record.bytes_completed) == (S.SUCCESS, 3)
    assert (guest.record(record_at(1)).status, guest.record(record_at(1)).result) == (
        S.SUCCESS, 0)
    assert guest.record(record_at(2)).status == S.SUCCESS
    assert guest.vectors[2].poll() == 1  # the entry's own interrupt
    assert guest.memory.read(BUF_C, 16) == pattern_bytes(0xAA, 16)


async def test_batch_with_a_failing_entry_and_a_fence_after_it(guest: Guest) -> None:
    data = noise(512, 13)
    guest.memory.write(BUF_A, data)
    guest.memory.write(BUF_C, bytes(64))
    entries = [
        descriptor(Op.MEMMOVE, F.CRAV | F.RCR, record=record_at(1), src_addr=BUF_A,
                   dst_addr=BUF_B, xfer_size=512),
        descriptor(Op.MEMMOVE, F.CRAV | F.RCR, record=record_at(2), src_addr=UNMAPPED,
                   dst_addr=BUF_B + 0x1000, xfer_size=512),
        # Not fenced: runs despite the failure before it.
        descriptor(Op.NOOP, F.CRAV | F.RCR | F.RCI, record=record_at(3), vector=2),
        # Fenced after a failure: abandoned, and so is everything after it.
        descriptor(Op.MEMFILL, F.FENCE | F.CRAV | F.RCR | F.RCI, record=record_at(4),
                   vector=3, pattern=0x55, dst_addr=BUF_C, xfer_size=64),
        descriptor(Op.NOOP, F.CRAV | F.RCR | F.RCI, record=record_at(5), vector=3),
    ]
    for index in range(1, 6):
        guest.memory.write(record_at(index), bytes(RECORD_SIZE))
    guest.write_list(entries)
    record = await guest.run(descriptor(Op.BATCH, desc_list_addr=LISTS, desc_count=5))
    assert (record.status, record.bytes_completed) == (S.BATCH_FAIL, 3)
    assert guest.record(record_at(1)).status == S.SUCCESS
    assert guest.memory.read(BUF_B, 512) == data
    failed = guest.record(record_at(2))
    assert (failed.status, failed.fault_addr, failed.bytes_completed) == (
        S.PAGE_FAULT_NOBOF, UNMAPPED, 0)
    assert guest.record(record_at(3)).status == S.SUCCESS
    assert guest.vectors[2].poll() == 1
    assert guest.status(record_at(4)) == guest.status(record_at(5)) == 0
    assert guest.vectors[3].poll() == 0
    assert guest.memory.read(BUF_C, 64) == bytes(64)


async def test_batch_checks_its_list(guest: Guest) -> None:
    batch = partial(descriptor, Op.BATCH, desc_list_addr=LISTS)
    assert (await guest.run(batch(desc_count=1))).status == S.DESC_CNT_ERANGE
    assert (await guest.run(batch(desc_count=1025))).status == S.DESC_CNT_ERANGE
    assert (await guest.run(batch(desc_list_addr=LISTS + 32, desc_count=2))).status == (
        S.DESCLIST_ALIGN)
    # A list running off the mapping: the entry that cannot be read stops the batch.
    last = MAIN_END - DESCRIPTOR_SIZE
    guest.memory.write(last, descriptor(Op.NOOP, 0))
    record = await guest.run(batch(desc_list_addr=last, desc_count=2))
    assert (record.status, record.fault_addr) == (S.BATCH_PAGE_FAULT, MAIN_END)
    guest.write_list([descriptor(Op.NOOP, 0), descriptor(Op.BATCH, 0)])
    record = await guest.run(batch(desc_count=2))
    assert record.status == S.BATCH_FAIL


# --- Faults and software errors -------------------------------------------------------------------


async def test_faults_report_address_and_progress(guest: Guest) -> None:
    data = noise(4096, 14)
    guest.memory.write(MAIN_END - 4096, data)
    # The source runs off the end of the mapping 100 bytes in.
    record = await guest.run(descriptor(Op.MEMMOVE, src_addr=MAIN_END - 100, dst_addr=BUF_B,
                                        xfer_size=300))
    assert (record.status, record.fault_addr, record.bytes_completed) == (
        S.PAGE_FAULT_NOBOF, MAIN_END, 100)
    assert guest.memory.read(BUF_B, 101) == data[-100:] + b"\0"
    # The destination does, 64 bytes in: a fault on a write.
    record = await guest.run(descriptor(Op.MEMMOVE, src_addr=BUF_A, dst_addr=MAIN_END - 64,
                                        xfer_size=256))
    assert (record.status, record.fault_addr, record.bytes_completed) == (
        S.PAGE_FAULT_NOBOF | DSA_COMP_STATUS_WRITE, MAIN_END, 64)
    record = await guest.run(descriptor(Op.MEMFILL, dst_addr=UNMAPPED, xfer_size=8))
    assert (record.status, record.fault_addr, record.bytes_completed) == (
        S.PAGE_FAULT_NOBOF | DSA_COMP_STATUS_WRITE, UNMAPPED, 0)


async def test_read_only_mapping_faults_on_writes(guest: Guest) -> None:
    with GuestMemory(READ_ONLY, 0x1000) as read_only:
        read_only.write(READ_ONLY, noise(64, 15))
        await guest.client.dma_map(read_only, flags=DmaMapFlag.READ)
        record = await guest.run(descriptor(Op.MEMMOVE, src_addr=READ_ONLY, dst_addr=BUF_B,
                                            xfer_size=64))
        assert record.status == S.SUCCESS
        assert guest.memory.read(BUF_B, 64) == noise(64, 15)
        record = await guest.run(descriptor(Op.MEMFILL, dst_addr=READ_ONLY, xfer_size=64))
        assert (record.status, record.fault_addr) == (
            S.PAGE_FAULT_NOBOF | DSA_COMP_STATUS_WRITE, READ_ONLY)
        assert read_only.read(READ_ONLY, 64) == noise(64, 15)


async def wait_swerr(guest: Guest) -> SwErrReg:
    """SWERR once valid: the server fills it from the engine's error queue in its own time."""
    with trio.fail_after(WAIT):
        while True:
            swerr = await guest.swerr()
            if swerr.valid:
                return swerr
            await trio.sleep(POLL)


async def test_failure_without_a_record_goes_to_swerr(guest: Guest) -> None:
    # GENCTRL.softerr_int_en clear: SWERR is filled, vector 0 stays quiet.
    await guest.submit(descriptor(Op.MEMMOVE, 0, src_addr=UNMAPPED, dst_addr=BUF_B,
                                  xfer_size=64))
    swerr = await wait_swerr(guest)
    assert (swerr.error, swerr.operation, swerr.fault_addr) == (
        S.PAGE_FAULT_NOBOF, Op.MEMMOVE, UNMAPPED)
    assert (swerr.desc_valid, swerr.wq_idx_valid, swerr.wq_idx) == (1, 1, 0)
    assert (swerr.batch, swerr.fault_rw, swerr.overflow) == (0, 0, 0)
    assert await guest.read32(IDXD_INTCAUSE_OFFSET) & IdxdIntc.ERR
    assert guest.vectors[0].poll() == 0
    # The driver's acknowledgement, then with softerr_int_en: vector 0 reports the next one,
    # a write fault of a batch entry that has no record of its own.
    await guest.write64(IDXD_SWERR_OFFSET, swerr.bits[0] & IDXD_SWERR_ACK)
    await guest.write32(IDXD_INTCAUSE_OFFSET, IdxdIntc.ERR)
    await guest.write32(IDXD_GENCTRL_OFFSET, GenCtrlReg(softerr_int_en=1).bits)
    assert not (await guest.swerr()).valid
    guest.write_list([descriptor(Op.NOOP, 0),
                      descriptor(Op.MEMFILL, 0, dst_addr=UNMAPPED + 8, xfer_size=8)])
    record = await guest.run(descriptor(Op.BATCH, desc_list_addr=LISTS, desc_count=2))
    assert record.status == S.BATCH_FAIL
    assert await guest.interrupt(0) == 1
    assert await guest.read32(IDXD_INTCAUSE_OFFSET) & IdxdIntc.ERR
    swerr = await guest.swerr()
    assert (swerr.valid, swerr.error, swerr.operation, swerr.fault_addr, swerr.fault_rw) == (
        1, S.PAGE_FAULT_NOBOF, Op.MEMFILL, UNMAPPED + 8, 1)
    assert (swerr.batch, swerr.batch_idx, swerr.wq_idx) == (1, 1, 0)


async def test_an_unwritable_record_address_goes_to_swerr(guest: Guest) -> None:
    await guest.write32(IDXD_GENCTRL_OFFSET, GenCtrlReg(softerr_int_en=1).bits)
    await guest.submit(descriptor(Op.NOOP, record=UNMAPPED))
    assert await guest.interrupt(0) == 1
    swerr = await guest.swerr()
    assert (swerr.valid, swerr.error, swerr.fault_addr) == (1, S.CRA_XLAT, UNMAPPED)
    # No record, no completion interrupt: the next descriptor's is the only one.
    assert (await guest.run(descriptor(Op.NOOP))).status == S.SUCCESS


# --- WQs ------------------------------------------------------------------------------------------


async def test_wqs_of_different_groups_each_complete_their_descriptors(guest: Guest) -> None:
    """WQs 0, 1 and 2 are in groups of their own, each served by its own engines: every
    descriptor completes by itself, without a later submission to wake its engine."""
    for wq in (1, 2):
        assert await guest.command(IdxdCmd.ENABLE_WQ, wq) is IdxdCmdstsErr.SUCCESS
    for wq in (0, 1, 2, 2, 1, 0, 2, 0, 1) * 3:
        record = await guest.run(descriptor(Op.NOOP, vector=vector_of(wq)), wq=wq)
        assert record.status == S.SUCCESS


async def test_submissions_to_a_disabled_wq_are_dropped(guest: Guest) -> None:
    engine = guest.engine
    # WQ 2 is configured but not enabled.
    record_2 = record_at(2)
    await guest.submit(descriptor(Op.NOOP, record=record_2, vector=vector_of(2)), wq=2)
    # WQ 0 was enabled: disable it and submit again.
    assert await guest.command(IdxdCmd.DISABLE_WQ, wq_operand(0)) is IdxdCmdstsErr.SUCCESS
    record_0 = record_at(1)
    guest.memory.write(record_0, bytes(RECORD_SIZE))
    await guest.submit(descriptor(Op.NOOP, record=record_0), wq=0)
    # A non-posted request behind the posted portal writes: they have all been handled.
    await guest.read32(IDXD_CMDSTS_OFFSET)
    assert (engine.counters(2).dropped_disabled, engine.counters(2).submitted) == (1, 0)
    assert engine.counters(0).dropped_disabled == 1
    # Enabled again, each WQ completes what it is given, and nothing of what was dropped.
    assert await guest.command(IdxdCmd.ENABLE_WQ, 2) is IdxdCmdstsErr.SUCCESS
    assert await guest.command(IdxdCmd.ENABLE_WQ, 0) is IdxdCmdstsErr.SUCCESS
    assert (await guest.run(descriptor(Op.NOOP, vector=vector_of(2)), wq=2)).status == (
        S.SUCCESS)
    assert (await guest.run(descriptor(Op.NOOP))).status == S.SUCCESS
    assert guest.status(record_0) == guest.status(record_2) == 0
    assert guest.vectors[vector_of(2)].poll() == 0
    # A completion is counted just after its record and interrupt: wait for the count.
    await poll_until(lambda: engine.counters(2).completed + engine.counters(0).completed >= 2)
    assert engine.counters(2).completed == engine.counters(0).completed == 1


async def test_submissions_beyond_the_wq_size_are_dropped(guest: Guest) -> None:
    """WQ 2 has one engine, busy with a long batch: the WQ takes as many descriptors as its
    size and drops the rest."""
    wq, size, extra = 2, WQ_SIZES[2], 4
    records = [record_at(i) for i in range(size + extra)]
    batch, started = record_at(100), record_at(101)
    assert await guest.command(IdxdCmd.ENABLE_WQ, wq) is IdxdCmdstsErr.SUCCESS
    with GuestMemory(BIG, BIG_SIZE) as big:
        await guest.client.dma_map(big)
        guest.memory.write(RECORDS, bytes(102 * RECORD_SIZE))
        guest.write_list([big_memmove(BIG_DST, F.CRAV | F.RCR, started)]
                         + [big_memmove(BIG_DST)] * (LONG_BATCH - 1))
        await guest.submit(descriptor(Op.BATCH, F.CRAV | F.RCR, record=batch,
                                      desc_list_addr=LISTS, desc_count=LONG_BATCH), wq=wq)
        await guest.wait_record(started)  # taken from the WQ: all its entries are free
        for at in records:
            await guest.submit(descriptor(Op.NOOP, F.CRAV | F.RCR, record=at), wq=wq)
        await guest.read32(IDXD_CMDSTS_OFFSET)  # behind the posted writes: all handled
        assert not guest.status(batch), "the batch ended too soon: make it longer"
        assert guest.engine.counters(wq).dropped_full == extra
        for at in records[:size]:
            assert (await guest.wait_record(at)).status == S.SUCCESS
        assert guest.record(batch).status == S.SUCCESS
        assert not any(map(guest.status, records[size:]))


async def test_drain_wq_waits_for_descriptors_in_flight(guest: Guest) -> None:
    """Two batches of 2 MiB copies run on WQ 0's two engines; Drain WQ returns only once both
    are complete."""
    count = LONG_BATCH
    batches = (record_at(1000), record_at(1001))
    with GuestMemory(BIG, BIG_SIZE) as big:
        await guest.client.dma_map(big)
        for n, (record, dst) in enumerate(zip(batches, (BIG_DST, BIG_DST2), strict=True)):
            started = record_at(1002 + n)
            for at in (record, started):
                guest.memory.write(at, bytes(RECORD_SIZE))
            entries = [big_memmove(dst, F.CRAV | F.RCR, started)]
            entries += [big_memmove(dst)] * (count - 1)
            guest.write_list(entries, LISTS + n * count * DESCRIPTOR_SIZE)
            await guest.submit(descriptor(Op.BATCH, F.CRAV | F.RCR, record=record,
                                          desc_list_addr=LISTS + n * count * DESCRIPTOR_SIZE,
                                          desc_count=count))
        await guest.wait_record(record_at(1002))
        assert not any(map(guest.status, batches)), "the batches ended too soon: make them longer"
        assert await guest.command(IdxdCmd.DRAIN_WQ, wq_operand(0)) is IdxdCmdstsErr.SUCCESS
        for record in batches:
            assert (guest.record(record).status, guest.record(record).bytes_completed) == (
                S.SUCCESS, count)
        assert (await guest.run(descriptor(Op.NOOP))).status == S.SUCCESS


@pytest.mark.parametrize("cmd", [IdxdCmd.DRAIN_WQ, IdxdCmd.DISABLE_WQ], ids=lambda c: c.name)
async def test_a_command_waiting_for_a_long_batch_leaves_the_server_answering(
        guest: Guest, cmd: IdxdCmd) -> None:
    """A batch of 2 MiB copies runs on WQ 1's one engine, a NOOP queued behind it. Drain or
    Disable WQ must not wait in the server's message loop (a vfio-user client times out on a
    reply after 5 s and drops the connection): while the batch runs, BAR0 reads are answered
    and show CMDSTS active; the command completes, with its interrupt, once the batch is done."""
    wq, count = 1, 4 * LONG_BATCH
    batch, behind = record_at(2000), record_at(2001)
    assert await guest.command(IdxdCmd.ENABLE_WQ, wq) is IdxdCmdstsErr.SUCCESS
    with GuestMemory(BIG, BIG_SIZE) as big:
        await guest.client.dma_map(big)
        guest.write_list([big_memmove(BIG_DST)] * count)
        await guest.submit(descriptor(Op.BATCH, F.CRAV | F.RCR, record=batch,
                                      desc_list_addr=LISTS, desc_count=count), wq)
        await guest.submit(descriptor(Op.NOOP, F.CRAV | F.RCR, record=behind), wq, slot=1)
        await guest.write32(IDXD_CMD_OFFSET,
                            IdxdCommandReg(cmd=cmd, operand=wq_operand(wq), int_req=1).bits)
        answered_during = 0
        while not guest.status(batch):
            status = CmdStsReg(bits=await guest.read32(IDXD_CMDSTS_OFFSET))
            if guest.status(batch):
                break  # the batch may have ended after the read was answered
            assert status.active, "the command completed before the batch it waits for"
            answered_during += 1
        assert answered_during > 0, "no BAR0 read was answered while the command waited"
        assert await guest.interrupt(0) == 1
        assert await guest.read32(IDXD_INTCAUSE_OFFSET) & IdxdIntc.CMD
        await guest.write32(IDXD_INTCAUSE_OFFSET, IdxdIntc.CMD)
        status = CmdStsReg(bits=await guest.read32(IDXD_CMDSTS_OFFSET))
        assert (status.active, status.err) == (0, IdxdCmdstsErr.SUCCESS)
        assert (guest.record(batch).status, guest.record(batch).bytes_completed) == (
            S.SUCCESS, count)
        assert guest.record(behind).status == S.SUCCESS
    state = guest.engine.counters(wq)
    assert (state.submitted, state.completed) == (2, 2)
    # The WQ is usable (drained) or can be enabled again (disabled).
    if cmd is IdxdCmd.DISABLE_WQ:
        assert await guest.command(IdxdCmd.ENABLE_WQ, wq) is IdxdCmdstsErr.SUCCESS
    assert (await guest.run(descriptor(Op.NOOP, vector=vector_of(wq)), wq)).status == S.SUCCESS


async def test_abort_wq_stops_what_is_in_flight_and_drops_what_is_queued(guest: Guest) -> None:
    """WQ 1 has one engine: a batch of 2 MiB copies runs while two more wait behind it. Abort WQ
    stops the running one between entries and drops the others; none completes."""
    wq, count = 1, 1024
    vector = vector_of(wq)
    entry_records = [record_at(i) for i in range(count)]
    batches = [record_at(count + i) for i in range(3)]
    assert await guest.command(IdxdCmd.ENABLE_WQ, wq) is IdxdCmdstsErr.SUCCESS
    with GuestMemory(BIG, BIG_SIZE) as big:
        await guest.client.dma_map(big)
        guest.memory.write(RECORDS, bytes((count + 3) * RECORD_SIZE))
        guest.write_list([big_memmove(BIG_DST, F.CRAV | F.RCR, at) for at in entry_records])
        for batch in batches:
            await guest.submit(descriptor(Op.BATCH, record=batch, vector=vector,
                                          desc_list_addr=LISTS, desc_count=count), wq=wq)
        await guest.wait_record(entry_records[0])
        assert await guest.command(IdxdCmd.ABORT_WQ, wq_operand(wq)) is IdxdCmdstsErr.SUCCESS
        done = sum(1 for at in entry_records if guest.status(at))
        assert done < count, "the first batch ended before the abort: make it longer"
        snapshot = guest.memory.read(RECORDS, (count + 3) * RECORD_SIZE)
        # The WQ stays enabled and usable; nothing of the aborted work shows up meanwhile.
        record = await guest.run(descriptor(Op.NOOP, record=record_at(2000), vector=vector),
                                 wq=wq)
        assert record.status == S.SUCCESS
        await trio.sleep(0.05)  # time for stray work to show
        assert guest.memory.read(RECORDS, (count + 3) * RECORD_SIZE) == snapshot
        assert not any(map(guest.status, batches))
        assert all(guest.status(at) == S.SUCCESS for at in entry_records[:done])
        assert guest.vectors[vector].poll() == 0


async def test_device_reset_stops_what_is_in_flight(guest: Guest) -> None:
    """A vfio-user DEVICE_RESET (a function-level reset) while a long batch runs: the reset
    returns once it has stopped, nothing completes afterwards, and the device comes back
    disabled and ready to be configured again."""
    count = 1024
    entry_records = [record_at(i) for i in range(count)]
    batch = record_at(count)
    with GuestMemory(BIG, BIG_SIZE) as big:
        await guest.client.dma_map(big)
        guest.memory.write(RECORDS, bytes((count + 1) * RECORD_SIZE))
        guest.write_list([big_memmove(BIG_DST, F.CRAV | F.RCR, at) for at in entry_records])
        await guest.submit(descriptor(Op.BATCH, record=batch, desc_list_addr=LISTS,
                                      desc_count=count))
        await guest.wait_record(entry_records[0])
        await guest.client.device_reset()
        snapshot = guest.memory.read(RECORDS, (count + 1) * RECORD_SIZE)
        assert not guest.status(batch)
        assert not guest.status(entry_records[-1]), "the batch ended before the reset"
        assert GenStsReg(bits=await guest.read32(IDXD_GENSTATS_OFFSET)).state == (
            IdxdDeviceStatusState.DISABLED)
        await guest.configure()
        assert (await guest.run(descriptor(Op.NOOP, record=record_at(2000)))).status == (
            S.SUCCESS)
        await trio.sleep(0.05)  # time for stray work to show
        assert guest.memory.read(RECORDS, (count + 1) * RECORD_SIZE) == snapshot
        assert guest.vectors[VECTOR].poll() == 0


async def test_function_level_reset_is_advertised_and_resets_the_function(guest: Guest) -> None:
    """The PCIe capability says FLR capable, as DSA's does; Initiate FLR in Device Control
    stops the work, returns the device to disabled and the Command register to zero, and
    the function can be set up again."""
    pcie = (await capabilities(guest.client))[PCI_CAP_ID_EXP]
    assert await guest.client.config_read(pcie + PCI_EXP_DEVCAP, 4) & PCI_EXP_DEVCAP_FLR
    assert (await guest.run(descriptor(Op.NOOP))).status == S.SUCCESS
    await guest.client.config_write(pcie + PCI_EXP_DEVCTL, PCI_EXP_DEVCTL_BCR_FLR, 2)
    assert await guest.client.config_read(PCI_COMMAND, 2) == 0
    # What a driver does after an FLR: decode and bus mastering back, then its configuration
    # (DMA maps are the IOMMU's, not the function's: they stay).
    await guest.client.config_write(PCI_COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER,
                                    2)
    assert GenStsReg(bits=await guest.read32(IDXD_GENSTATS_OFFSET)).state == (
        IdxdDeviceStatusState.DISABLED)
    await guest.configure()
    assert GenStsReg(bits=await guest.read32(IDXD_GENSTATS_OFFSET)).state == (
        IdxdDeviceStatusState.ENABLED)
    assert (await guest.run(descriptor(Op.NOOP, record=record_at(1)))).status == S.SUCCESS


# --- DMA unmap while busy -------------------------------------------------------------------------


@pytest.mark.parametrize("portals", ["trapped", "mapped"])
async def test_dma_unmap_while_busy(tmp_path: Path, portals: str) -> None:
    """A long batch alternates 2 MiB copies inside BIG with 2 MiB fills of CANARY, each entry
    with a record in MAIN. CANARY, then BIG, is unmapped while it runs: each unmap completes,
    the entries after it fault, and once it has returned the engine never writes the region.
    The server runs in a process of its own: a write after the unmap would crash it. The
    batch and the descriptors after it are submitted through region writes, or stored into the
    mapped BAR."""
    socket, log = tmp_path / "dsa.sock", tmp_path / "server.log"
    async with server_process(socket, log) as server, connected_guest(socket, None) as guest:
        try:
            if portals == "mapped":
                await guest.map_portals()
            await unmap_while_busy(guest)
        finally:
            guest.unmap_portals()
            # Reported over whatever else failed: a crash is what this test is about.
            assert server.returncode is None, f"the server died:\n{await server_log(log)}"


async def unmap_while_busy(guest: Guest) -> None:
    count = 512
    entry_records = [record_at(i) for i in range(count)]
    batch = record_at(count)
    patterns = (0x1111_1111_1111_1111, 0x2222_2222_2222_2222)
    entries = []
    for i, at in enumerate(entry_records):
        if i % 2:
            # Consecutive fills differ: a fill after the unmap could not go unnoticed.
            entries.append(descriptor(Op.MEMFILL, F.CRAV | F.RCR, record=at,
                                      pattern=patterns[i // 2 % 2], dst_addr=CANARY,
                                      xfer_size=CANARY_SIZE))
        else:
            entries.append(big_memmove(BIG_DST, F.CRAV | F.RCR, at))
    with GuestMemory(BIG, BIG_SIZE) as big, GuestMemory(CANARY, CANARY_SIZE) as canary:
        await guest.client.dma_map(big)
        await guest.client.dma_map(canary)
        guest.memory.write(RECORDS, bytes((count + 1) * RECORD_SIZE))
        guest.write_list(entries)
        await guest.submit(descriptor(Op.BATCH, record=batch, desc_list_addr=LISTS,
                                      desc_count=count))
        await guest.wait_record(entry_records[20])
        with trio.fail_after(1):
            await guest.client.dma_unmap(canary)
        after_unmap = canary.read(CANARY, CANARY_SIZE)
        # The copies are slower than the fills: the batch still runs when BIG goes.
        assert not guest.status(batch), "the batch ended before the unmaps: make it longer"
        with trio.fail_after(1):
            await guest.client.dma_unmap(big)
        assert await guest.interrupt(VECTOR) == 1
        record = guest.record(batch)
        assert (record.status, record.bytes_completed) == (S.BATCH_FAIL, count)
        assert canary.read(CANARY, CANARY_SIZE) == after_unmap

        # Each kind of entry succeeds up to its region's unmap and faults from then on.
        results = [guest.record(at) for at in entry_records]
        for kind, fault in ((0, (S.PAGE_FAULT_NOBOF, BIG_SRC)),
                            (1, (S.PAGE_FAULT_NOBOF | DSA_COMP_STATUS_WRITE, CANARY))):
            outcomes = [(r.status, r.fault_addr) for r in results[kind::2]]
            succeeded = outcomes.index(fault)
            assert outcomes == [(S.SUCCESS, 0)] * succeeded + [fault] * (
                len(outcomes) - succeeded)
        # The canary holds what the last successful fill wrote.
        last_fill = max(i for i in range(1, count, 2) if results[i].status == S.SUCCESS)
        assert after_unmap == pattern_bytes(patterns[last_fill // 2 % 2], CANARY_SIZE)

        # The server lives on: later descriptors on the unmapped range fault.
        record = await guest.run(big_memmove(BIG_DST, NOTIFY, RECORD))
        assert (record.status, record.fault_addr) == (S.PAGE_FAULT_NOBOF, BIG_SRC)
        assert (await guest.run(descriptor(Op.MEMMOVE, src_addr=BUF_A, dst_addr=BUF_B,
                                           xfer_size=64))).status == S.SUCCESS


# --- Interrupts -----------------------------------------------------------------------------------


async def test_interrupt_handles_must_be_granted(tmp_path: Path) -> None:
    """With interrupt handles advertised, a descriptor names a handle the driver obtained
    with REQUEST_INT_HANDLE; any other is invalid, and so is a released one."""
    socket = tmp_path / "dsa.sock"
    async with server_thread(socket, DeviceConfig(interrupt_handles=True)) as server, \
            connected_guest(socket, server) as guest:
        ungranted = descriptor(Op.NOOP)
        guest.memory.write(RECORD, bytes(RECORD_SIZE))
        await guest.submit(ungranted)
        assert (await guest.wait_record(RECORD)).status == S.INT_HANDLE_INVAL
        status = await guest.command_status(IdxdCmd.REQUEST_INT_HANDLE, VECTOR)
        assert status.err == IdxdCmdstsErr.SUCCESS
        # The handle raises the vector it was requested for (and only that interrupt).
        guest.memory.write(RECORD, bytes(RECORD_SIZE))
        await guest.submit(descriptor(Op.NOOP, vector=status.result))
        assert await guest.interrupt(VECTOR) == 1
        assert guest.record(RECORD).status == S.SUCCESS
        assert await guest.command(IdxdCmd.RELEASE_INT_HANDLE, status.result) is (
            IdxdCmdstsErr.SUCCESS)
        guest.memory.write(RECORD, bytes(RECORD_SIZE))
        await guest.submit(descriptor(Op.NOOP, vector=status.result))
        assert (await guest.wait_record(RECORD)).status == S.INT_HANDLE_INVAL
        assert guest.vectors[VECTOR].poll() == 0


async def test_masked_vector_holds_its_interrupt_until_unmasked(guest: Guest) -> None:
    engine = guest.engine
    raised = engine.irq_count(VECTOR)
    await guest.client.set_irqs(PciIrq.MSIX, VECTOR, 1,
                                IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_MASK)
    for index in (1, 2):
        guest.memory.write(record_at(index), bytes(RECORD_SIZE))
        await guest.submit(descriptor(Op.NOOP, record=record_at(index)))
        assert (await guest.wait_record(record_at(index))).status == S.SUCCESS
    await poll_until(lambda: engine.irq_count(VECTOR) == raised + 2)
    assert guest.vectors[VECTOR].poll() == 0
    # Other vectors are not held.
    assert (await guest.run(descriptor(Op.NOOP, vector=2))).status == S.SUCCESS
    await guest.client.set_irqs(PciIrq.MSIX, VECTOR, 1,
                                IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK)
    # One pending bit: the two interrupts raised while masked arrive as one message.
    assert await guest.interrupt(VECTOR) == 1
    assert (await guest.run(descriptor(Op.NOOP))).status == S.SUCCESS
