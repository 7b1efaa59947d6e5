"""The native engine on its own (no vfio-user): portals and reassembly, WQ queues and
worker threads, drain/abort/disable while busy, DMA unmap while busy, interrupts and
software errors. The operations themselves are compared with a Python model in
test_engine_ops.py."""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator

import pytest
import trio

from vdsa_server.device.engine_port import WqSettings
from vdsa_server.engine import ENV_ENGINE, Engine, load_engine

MEMORY_IOVA = 0x1_0000_0000
MEMORY_SIZE = 64 << 20
RECORD = MEMORY_IOVA  # completion records, 32 bytes apart
DATA = MEMORY_IOVA + (1 << 20)
OP_NOOP, OP_BATCH, OP_DRAIN, OP_MEMMOVE, OP_MEMFILL = 0, 1, 2, 3, 4
CRAV, RCR, RCI, FENCE = 0x4, 0x8, 0x10, 0x1
COMPLETE = CRAV | RCR
SETTINGS = WqSettings(size=16, priority=10, engines=0b1, max_transfer_size=2 << 20,
                      max_batch_size=1024)
WQ_PORTALS = 0x4000  # four 4 KiB portal pages a WQ
WAIT = 10.0


def descriptor(opcode: int, flags: int, *, record: int = 0, src: int = 0, dst: int = 0,
               size: int = 0, handle: int = 0) -> bytes:
    return struct.pack("<IIQQQIHH24x", 0, flags | opcode << 24, record, src, dst, size,
                       handle, 0)


class Rig:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.memory = bytearray(MEMORY_SIZE)
        engine.dma_map(MEMORY_IOVA, self.memory)

    def at(self, iova: int, size: int) -> bytes:
        return bytes(self.memory[iova - MEMORY_IOVA : iova - MEMORY_IOVA + size])

    def put(self, iova: int, data: bytes) -> None:
        self.memory[iova - MEMORY_IOVA : iova - MEMORY_IOVA + len(data)] = data

    def status(self, index: int) -> int:
        return self.memory[index * 32]

    def wait_status(self, index: int) -> int:
        deadline = time.monotonic() + WAIT
        while not self.status(index):
            assert time.monotonic() < deadline, f"no completion record {index}"
            time.sleep(0.001)
        return self.status(index)

    def submit(self, wq: int, data: bytes, slot: int = 0) -> None:
        """A MOVDIR64B as QEMU delivers it: eight ascending 8-byte writes."""
        base = wq * WQ_PORTALS + slot * 64
        for at in range(0, 64, 8):
            self.engine.portal_write(base + at, data[at : at + 8])

    def memmove(self, index: int, size: int, flags: int = COMPLETE) -> bytes:
        return descriptor(OP_MEMMOVE, flags, record=RECORD + 32 * index, src=DATA,
                          dst=DATA + (8 << 20), size=size, handle=1)


@pytest.fixture
def rig() -> Iterator[Rig]:
    with Engine(num_wqs=4, num_msix=5) as engine:
        engine.enable_wq(0, SETTINGS)
        yield Rig(engine)


def test_the_session_runs_the_sanitized_engine() -> None:
    assert os.environ[ENV_ENGINE].endswith("libvdsa_engine-sanitized.so")
    assert load_engine().path.name == "libvdsa_engine-sanitized.so"


def test_portal_descriptors_run_on_the_worker(rig: Rig) -> None:
    rig.put(DATA, bytes(range(256)) * 16)
    rig.submit(0, rig.memmove(0, 4096, COMPLETE | RCI), slot=5)
    assert rig.wait_status(0) == 1
    assert rig.at(DATA + (8 << 20), 4096) == bytes(range(256)) * 16
    deadline = time.monotonic() + WAIT
    while rig.engine.irq_count(1) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert rig.engine.counters(0).submitted == 1


def test_torn_and_misplaced_writes_are_dropped(rig: Rig) -> None:
    data = descriptor(OP_NOOP, COMPLETE, record=RECORD)
    rig.engine.portal_write(0, data[:8])
    rig.engine.portal_write(16, data[16:24])  # skips bytes 8-15: the partial one is torn
    rig.engine.portal_write(24, data[24:])
    rig.engine.portal_write(64 - 8, data[:16])  # crosses into the next slot
    rig.engine.portal_write(128, data[:32])
    rig.engine.portal_write(128, data[:32])  # a new start over a partial one
    rig.engine.portal_write(128 + 32, data[32:])  # completes the second start
    assert rig.wait_status(0) == 1
    counters = rig.engine.counters(0)
    assert (counters.submitted, counters.dropped_torn) == (1, 3)


def test_slots_and_portal_pages_assemble_independently(rig: Rig) -> None:
    first = descriptor(OP_NOOP, COMPLETE, record=RECORD)
    second = descriptor(OP_NOOP, COMPLETE, record=RECORD + 32)
    limited_portal = 0x1000
    rig.engine.portal_write(0, first[:32])
    rig.engine.portal_write(limited_portal, second[:32])
    rig.engine.portal_write(limited_portal + 32, second[32:])
    rig.engine.portal_write(32, first[32:])
    assert (rig.wait_status(0), rig.wait_status(1)) == (1, 1)


def test_disabled_and_missing_wqs_drop(rig: Rig) -> None:
    rig.submit(1, descriptor(OP_NOOP, COMPLETE, record=RECORD))
    with pytest.raises(OSError, match="Invalid argument"):
        rig.engine.portal_write(9 * WQ_PORTALS, bytes(8))
    time.sleep(0.05)
    assert rig.status(0) == 0
    assert rig.engine.counters(1).dropped_disabled == 1
    assert rig.engine.stray_descriptors() == 1


def test_a_full_wq_drops_what_does_not_fit() -> None:
    with Engine(num_wqs=1, num_msix=2) as engine:
        rig = Rig(engine)
        # A long batch holds the only engine while the two-entry WQ fills.
        engine.enable_wq(0, WqSettings(size=2, priority=1, engines=1,
                                       max_transfer_size=2 << 20, max_batch_size=1024))
        rig.put(DATA + (16 << 20), b"".join(
            rig.memmove(100, 2 << 20, 0) for _ in range(64)))
        rig.submit(0, descriptor(OP_BATCH, COMPLETE, record=RECORD, src=DATA + (16 << 20),
                                 size=64))
        time.sleep(0.01)
        for index in range(1, 5):
            rig.submit(0, descriptor(OP_NOOP, COMPLETE, record=RECORD + 32 * index))
        engine.drain_wq(0)
        counters = engine.counters(0)
        done = [rig.status(i) for i in range(1, 5)]
    assert counters.dropped_full >= 1
    assert done.count(1) == counters.submitted - 1
    assert counters.submitted + counters.dropped_full == 5


def long_batch(rig: Rig, index: int, entries: int = 256) -> bytes:
    """A batch of 2 MiB memmoves: tens of milliseconds of work."""
    rig.put(DATA + (16 << 20), b"".join(rig.memmove(200, 2 << 20, 0) for _ in range(entries)))
    return descriptor(OP_BATCH, COMPLETE, record=RECORD + 32 * index, src=DATA + (16 << 20),
                      size=entries)


def test_drain_waits_for_work_in_progress(rig: Rig) -> None:
    rig.submit(0, long_batch(rig, 0))
    rig.submit(0, descriptor(OP_NOOP, COMPLETE, record=RECORD + 32), slot=1)
    rig.engine.drain_wq(0)
    assert (rig.status(0), rig.status(1)) == (1, 1)


def three_engines() -> Engine:
    engine = Engine(num_wqs=1, num_msix=2)
    engine.enable_wq(0, WqSettings(size=16, priority=1, engines=0b111,
                                   max_transfer_size=2 << 20, max_batch_size=1024))
    return engine


def test_drain_descriptor_does_not_wait_for_later_ones() -> None:
    """A, a drain, then B, four times A's work, on three engines: the drain completes when A
    does, while B still runs (a guest that keeps submitting cannot hold a drain up)."""
    with three_engines() as engine:
        rig = Rig(engine)
        rig.submit(0, long_batch(rig, 0, entries=64))
        rig.submit(0, descriptor(OP_DRAIN, COMPLETE, record=RECORD + 32), slot=1)
        rig.submit(0, long_batch(rig, 2, entries=256), slot=2)
        assert rig.wait_status(1) == 1
        assert (rig.status(0), rig.status(2)) == (1, 0)
        assert rig.wait_status(2) == 1


async def test_drain_command_does_not_wait_for_later_work() -> None:
    with three_engines() as engine:
        rig = Rig(engine)
        rig.submit(0, long_batch(rig, 0, entries=512))
        async with trio.open_nursery() as nursery:
            drained = trio.Event()

            async def drain() -> None:
                await trio.to_thread.run_sync(engine.drain_wq, 0)
                drained.set()

            nursery.start_soon(drain)
            # Time for the drain's thread to take the lock and note what came before it;
            # B, twice A, then ends well after A.
            await trio.sleep(0.1)
            assert not rig.status(0), "A ended before B came: make it longer"
            rig.submit(0, long_batch(rig, 2, entries=1024), slot=2)
            await drained.wait()
            assert (rig.status(0), rig.status(2)) == (1, 0)
        assert rig.wait_status(2) == 1


def test_drain_descriptor_waits_for_earlier_ones() -> None:
    with Engine(num_wqs=1, num_msix=2) as engine:
        rig = Rig(engine)
        engine.enable_wq(0, WqSettings(size=16, priority=1, engines=0b11,
                                       max_transfer_size=2 << 20, max_batch_size=1024))
        rig.submit(0, long_batch(rig, 0))
        rig.submit(0, descriptor(OP_DRAIN, COMPLETE, record=RECORD + 32), slot=1)
        assert rig.wait_status(1) == 1
        assert rig.status(0) == 1  # the second engine took the drain, yet it waited


def test_abort_stops_a_batch_and_drops_the_queue(rig: Rig) -> None:
    rig.submit(0, long_batch(rig, 0, entries=1024))
    rig.submit(0, descriptor(OP_NOOP, COMPLETE, record=RECORD + 32), slot=1)
    time.sleep(0.01)
    started = time.monotonic()
    rig.engine.abort_wq(0)
    assert time.monotonic() - started < 2.0
    assert (rig.status(0), rig.status(1)) == (0, 0)  # abandoned: no records
    rig.submit(0, descriptor(OP_NOOP, COMPLETE, record=RECORD + 64), slot=2)
    assert rig.wait_status(2) == 1  # the WQ still works


def test_disable_finishes_queued_work(rig: Rig) -> None:
    rig.submit(0, long_batch(rig, 0, entries=16))
    rig.submit(0, descriptor(OP_NOOP, COMPLETE, record=RECORD + 32), slot=1)
    rig.engine.disable_wq(0)
    assert (rig.status(0), rig.status(1)) == (1, 1)
    rig.submit(0, descriptor(OP_NOOP, COMPLETE, record=RECORD + 64), slot=2)
    assert rig.engine.counters(0).dropped_disabled == 1


async def wait_command_fd(engine: Engine) -> None:
    with trio.fail_after(WAIT):
        await trio.lowlevel.wait_readable(engine.command_fd)
    os.read(engine.command_fd, 8)


def batch_then_noop(engine: Engine, entries: int) -> Rig:
    """One engine, WQ 0 enabled: a batch (record 0) runs, a NOOP (record 1) waits behind it."""
    rig = Rig(engine)
    engine.enable_wq(0, SETTINGS)
    rig.submit(0, long_batch(rig, 0, entries=entries))
    rig.submit(0, descriptor(OP_NOOP, COMPLETE, record=RECORD + 32), slot=1)
    return rig


async def test_a_started_disable_returns_at_once_and_the_workers_finish_the_queue() -> None:
    """disable_start returns while the batch and the NOOP are left, takes no more descriptors,
    and the eventfd says when the queue is done."""
    with Engine(num_wqs=1, num_msix=2) as engine:
        rig = batch_then_noop(engine, 256)
        engine.start_disable(0)
        assert engine.waiting(0)
        assert (rig.status(0), rig.status(1)) == (0, 0), "the batch ended: make it longer"
        rig.submit(0, descriptor(OP_NOOP, COMPLETE, record=RECORD + 64), slot=2)
        assert engine.counters(0).dropped_disabled == 1
        with pytest.raises(OSError, match="busy"):
            engine.enable_wq(0, SETTINGS)
        await wait_command_fd(engine)
        assert not engine.waiting(0)
        assert (rig.status(0), rig.status(1), rig.status(2)) == (1, 1, 0)
        engine.enable_wq(0, SETTINGS)  # a WQ whose disable is over enables again
        rig.submit(0, descriptor(OP_NOOP, COMPLETE, record=RECORD + 96), slot=3)
        assert rig.wait_status(3) == 1


async def test_a_started_drain_ends_with_earlier_work_and_an_abort_ends_it_at_once() -> None:
    with three_engines() as engine:
        rig = Rig(engine)
        rig.submit(0, long_batch(rig, 0, entries=64))
        engine.start_drain(0)
        rig.submit(0, long_batch(rig, 2, entries=1024), slot=2)  # after the drain: not waited for
        assert engine.waiting(0)
        await wait_command_fd(engine)
        assert (engine.waiting(0), rig.status(0), rig.status(2)) == (False, 1, 0)
        engine.start_drain(0)  # now the long one is before it
        assert engine.waiting(0)
        engine.abort_wq(0)
        await wait_command_fd(engine)
        assert not engine.waiting(0)
        assert rig.status(2) == 0  # abandoned


async def test_a_reset_ends_a_started_disable() -> None:
    with Engine(num_wqs=1, num_msix=2) as engine:
        rig = batch_then_noop(engine, 1024)
        engine.start_disable(0)
        engine.reset()
        assert not engine.waiting(0)
        await wait_command_fd(engine)
        assert rig.status(1) == 0  # dropped by the reset, not run
        engine.enable_wq(0, SETTINGS)


def test_an_idle_wq_ends_a_started_wait_at_once(rig: Rig) -> None:
    rig.engine.start_drain(0)
    assert not rig.engine.waiting(0)
    rig.engine.start_disable(0)
    assert not rig.engine.waiting(0)
    assert os.read(rig.engine.command_fd, 8) == (2).to_bytes(8, "little")


def test_dma_unmap_waits_for_the_descriptor_in_progress(rig: Rig) -> None:
    scratch = bytearray(2 << 20)
    scratch_iova = 0x2_0000_0000
    rig.engine.dma_map(scratch_iova, scratch)
    rig.put(DATA + (16 << 20), b"".join(
        descriptor(OP_MEMFILL, 0, src=0x5A5A_5A5A_5A5A_5A5A, dst=scratch_iova, size=2 << 20)
        for _ in range(512)))
    rig.submit(0, descriptor(OP_BATCH, COMPLETE, record=RECORD, src=DATA + (16 << 20),
                             size=512))
    time.sleep(0.01)
    rig.engine.dma_unmap(scratch_iova, len(scratch))
    scratch[:] = bytes(len(scratch))
    rig.engine.drain_wq(0)
    # Nothing was written after the unmap returned, and the batch saw the region go.
    assert scratch == bytes(len(scratch))
    assert rig.status(0) == 0x05  # BATCH_FAIL: the entries after the unmap faulted


def test_interrupts_wait_while_masked(rig: Rig) -> None:
    rig.engine.irq_mask(1, 1, True)
    rig.engine.execute(0, rig.memmove(0, 64, COMPLETE | RCI))
    assert rig.engine.irq_count(1) == 1  # raised, held as pending
    rig.engine.irq_mask(1, 1, False)
    rig.engine.trigger(4)
    rig.engine.trigger(5)  # beyond the vectors: ignored
    assert [rig.engine.irq_count(v) for v in range(5)] == [0, 1, 0, 0, 1]


def test_interrupt_handles_must_be_granted() -> None:
    with Engine(num_wqs=1, num_msix=3, interrupt_handles=True) as engine:
        rig = Rig(engine)
        engine.enable_wq(0, SETTINGS)
        engine.execute(0, rig.memmove(0, 64, COMPLETE | RCI))
        assert rig.status(0) == 0x19  # INT_HANDLE_INVAL
        engine.set_int_handle(1, True)
        engine.execute(0, rig.memmove(1, 64, COMPLETE | RCI))
        assert (rig.status(1), engine.irq_count(1)) == (1, 1)


def test_errors_without_a_record_are_queued_for_swerr(rig: Rig) -> None:
    rig.engine.execute(0, descriptor(0x30, 0))
    rig.engine.execute(0, descriptor(OP_NOOP, RCR))  # RCR without CRAV
    rig.engine.execute(0, descriptor(OP_NOOP, COMPLETE, record=RECORD + 8))  # misaligned
    # The eventfd counts the errors pushed.
    assert int.from_bytes(os.read(rig.engine.error_fd, 8), "little") == 3
    errors = rig.engine.pop_errors()
    assert [(e.error, e.operation) for e in errors] == [(0x10, 0x30), (0x11, 0), (0x1B, 0)]
    assert rig.engine.pop_errors() == []


def test_workers_serve_wqs_concurrently() -> None:
    with Engine(num_wqs=2, num_msix=3) as engine:
        rig = Rig(engine)
        engine.enable_wq(0, WqSettings(16, 5, 0b01, 2 << 20, 1024))
        engine.enable_wq(1, WqSettings(16, 5, 0b10, 2 << 20, 1024))
        rig.submit(0, long_batch(rig, 0, entries=512))
        time.sleep(0.01)
        started = time.monotonic()
        rig.submit(1, descriptor(OP_NOOP, COMPLETE, record=RECORD + 32))
        rig.wait_status(1)
        latency = time.monotonic() - started
        still_busy = rig.status(0) == 0
        engine.abort_wq(0)
    # WQ 1's own engine took its descriptor while WQ 0's batch still ran.
    assert still_busy, f"batch finished first (noop latency {latency:.3f} s)"


def test_execute_from_threads_is_safe(rig: Rig) -> None:
    def work(index: int) -> None:
        for round_ in range(50):
            rig.engine.execute(0, descriptor(OP_MEMFILL, COMPLETE, record=RECORD + 32 * index,
                                             src=round_, dst=DATA + index * 4096, size=4096))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [rig.status(i) for i in range(4)] == [1, 1, 1, 1]
    assert rig.engine.counters(0).completed == 200
