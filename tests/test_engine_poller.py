"""The portal poller against native writer threads (native/bench/submitter.c, built here with
the sanitizers like the engine): slow, concurrent and rotating writers, a flooded WQ, WQ and
device commands and DMA unmaps while writers store, and writers that break the contract.
Every writer's wait for a slot is bounded and a timeout is counted, so that a poller that
stops taking slots fails a test instead of hanging it. test_mapped_portals.py has the
single-threaded cases."""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import random
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.test_engine import (
    COMPLETE,
    DATA,
    OP_MEMMOVE,
    OP_NOOP,
    RECORD,
    WQ_PORTALS,
    Rig,
    descriptor,
    long_batch,
)
from tests.test_mapped_portals import wait_until
from vdsa_server.bench.submitter import NativeSubmitter, WriterMode, WriterPlan, WriterResult
from vdsa_server.builds.engine_build import COMMON_FLAGS, COMPILER, HOSTREF_SOURCES, Variant
from vdsa_server.device.engine_port import WqSettings
from vdsa_server.engine import Engine

NUM_WQS = 3
BAR2_SIZE = 4 * WQ_PORTALS  # the fourth WQ's pages belong to no WQ
SLOTS = 0x1000 // 64  # a portal page's
LIMITED = 0x1000  # the portal page of a WQ the stock driver writes
LARGE = WqSettings(size=4096, priority=10, engines=0b1, max_transfer_size=2 << 20,
                   max_batch_size=1024)
COPY = 256  # bytes apart, the sources and destinations of the checked copies
COPIES = DATA + (32 << 20)  # their destinations
SLOT_WAIT = 5.0  # a writer's bound for one slot (it stops at the first timeout)


@pytest.fixture(scope="session")
def writers_library(tmp_path_factory: pytest.TempPathFactory) -> NativeSubmitter:
    """submitter.c alone, with the sanitized engine's flags."""
    out = tmp_path_factory.mktemp("submitter") / "libvdsa_submitter-sanitized.so"
    subprocess.run([COMPILER, *COMMON_FLAGS, *Variant.SANITIZED.flags, "-o", str(out),
                    str(HOSTREF_SOURCES / "submitter.c")], check=True)
    return NativeSubmitter(Path(out))


@dataclasses.dataclass
class Poller:
    rig: Rig
    bar: mmap.mmap
    address: int
    writers: NativeSubmitter

    @property
    def engine(self) -> Engine:
        return self.rig.engine

    def run(self, plans: Sequence[WriterPlan]) -> list[WriterResult]:
        """The writers, to the end (their waits are bounded)."""
        return self.writers.start_writers(self.address, plans).join()

    def qword0(self, offset: int) -> int:
        return int.from_bytes(self.bar[offset:offset + 8], "little")


@pytest.fixture
def poller(writers_library: NativeSubmitter) -> Iterator[Poller]:
    with Engine(num_wqs=NUM_WQS, num_msix=NUM_WQS + 1) as engine:
        bar = mmap.mmap(engine.map_portals(BAR2_SIZE), BAR2_SIZE)
        view = ctypes.c_char.from_buffer(bar)
        address = ctypes.addressof(view)
        del view
        try:
            # WQ 1 stays disabled; WQ 2, on an engine of its own, keeps the poller sweeping
            # when WQ 0 is disabled.
            engine.enable_wq(0, LARGE)
            engine.enable_wq(2, dataclasses.replace(LARGE, engines=0b100))
            yield Poller(Rig(engine), bar, address, writers_library)
        finally:
            bar.close()


def slot(wq: int, index: int, page: int = LIMITED) -> int:
    return wq * WQ_PORTALS + page + index % SLOTS * 64


def noops(first: int, count: int) -> bytes:
    """NOOPs with records first .. first + count - 1."""
    return b"".join(descriptor(OP_NOOP, COMPLETE, record=RECORD + 32 * i)
                    for i in range(first, first + count))


def copies(rig: Rig, first: int, count: int) -> bytes:
    """Memmoves whose every field depends on the index: source, destination, size and record
    of descriptor i belong to i alone, so one assembled from two descriptors copies the
    wrong bytes, to the wrong place, or completes the wrong record."""
    rng = random.Random(first)
    out = []
    for i in range(first, first + count):
        rig.put(DATA + i * COPY, rng.randbytes(COPY))
        out.append(descriptor(OP_MEMMOVE, COMPLETE, record=RECORD + 32 * i,
                              src=DATA + i * COPY, dst=COPIES + i * COPY, size=COPY - i % 7))
    return b"".join(out)


def copied(rig: Rig, i: int) -> bool:
    size = COPY - i % 7
    return rig.at(COPIES + i * COPY, size) == rig.at(DATA + i * COPY, size)


def assert_copied(rig: Rig, indices: Iterator[int] | range) -> None:
    for i in indices:
        assert rig.status(i) == 1, f"record {i}"
        assert copied(rig, i), f"copy {i}"


def all_taken(p: Poller, wq: int) -> bool:
    return not any(p.qword0(o) for o in range(wq * WQ_PORTALS, (wq + 1) * WQ_PORTALS, 64))


def drain(p: Poller, wq: int = 0) -> None:
    """Every descriptor written so far to the WQ's slots has been taken, and has run."""
    wait_until(lambda: all_taken(p, wq), f"WQ {wq}: a slot not taken")
    p.engine.drain_wq(wq)


def no_timeouts(results: Sequence[WriterResult], plans: Sequence[WriterPlan]) -> None:
    assert results == [WriterResult(len(plan.offsets), 0) for plan in plans]


def assert_each_ran_once(p: Poller, plans: Sequence[WriterPlan], count: int) -> None:
    """The writers' copies 0 .. count - 1, on WQ 0, all written, taken, run right, once."""
    no_timeouts(p.run(plans), plans)
    drain(p)
    assert_copied(p.rig, range(count))
    c = p.engine.counters(0)
    assert (c.submitted, c.completed, c.errors, c.dropped_full) == (count, count, 0, 0)


# --- Writers that keep the contract ---------------------------------------------------------


def test_a_slow_writer_is_never_taken_half_written(poller: Poller) -> None:
    """Qwords 1..7 stored 100 us apart, qword 0 last, again and again into one slot: each
    descriptor runs once, whole, with its own fields."""
    plans = [WriterPlan(copies(poller.rig, 0, 40), [slot(0, 0)] * 40, WriterMode.SLOW,
                        pause_ns=100_000, wait_limit=SLOT_WAIT)]
    assert_each_ran_once(poller, plans, 40)


def test_writers_sharing_one_slot_lose_nothing_and_run_nothing_twice(poller: Poller) -> None:
    """Four writers on one address, each MOVDIR64B a step of its own (as QEMU runs it, with
    the other vCPUs stopped): DPDK's pattern from several CPUs."""
    plans = [WriterPlan(copies(poller.rig, 300 * k, 300), [slot(0, 7)] * 300, exclusive=True,
                        wait_limit=SLOT_WAIT) for k in range(4)]
    assert_each_ran_once(poller, plans, 1200)


def test_writers_rotating_over_the_slots_lose_nothing(poller: Poller) -> None:
    """The stock driver's pattern from four CPUs (each takes the next of the page's 64 slots
    in turn), beside two writers with slots of their own in another page that need no turn."""
    rig = poller.rig
    rotating = [WriterPlan(copies(rig, 300 * k, 300), [slot(0, 4 * i + k) for i in range(300)],
                           exclusive=True, wait_limit=SLOT_WAIT) for k in range(4)]
    own = [WriterPlan(copies(rig, 1200 + 300 * k, 300),
                      [slot(0, 32 * k + i % 32, page=0) for i in range(300)],
                      wait_limit=SLOT_WAIT) for k in range(2)]
    assert_each_ran_once(poller, rotating + own, 1800)


def test_a_flooded_wq_drops_and_counts_what_does_not_fit(poller: Poller) -> None:
    """WQ 1 holds four descriptors and its engine is busy with a long batch: of 600 NOOPs from
    three writers, each completes or is dropped and counted, and none runs twice."""
    rig, engine = poller.rig, poller.engine
    engine.enable_wq(1, dataclasses.replace(LARGE, size=4, engines=0b10))
    batch = [WriterPlan(long_batch(rig, 1000), [slot(1, 0)], wait_limit=SLOT_WAIT)]
    no_timeouts(poller.run(batch), batch)
    plans = [WriterPlan(noops(200 * k, 200), [slot(1, 1 + 3 * i + k) for i in range(200)],
                        exclusive=True, wait_limit=SLOT_WAIT) for k in range(3)]
    no_timeouts(poller.run(plans), plans)
    drain(poller, 1)
    counters = engine.counters(1)
    done = [rig.status(i) for i in range(600)]
    assert counters.submitted + counters.dropped_full == 601
    assert counters.dropped_full > 0
    assert done.count(1) == counters.submitted - 1 == counters.completed - 1
    assert set(done) <= {0, 1}
    assert rig.status(1000) == 1


# --- Commands and unmaps while writers store --------------------------------------------------


@pytest.mark.parametrize("command", ["disable", "drain", "abort", "reset"])
def test_commands_while_writers_store(poller: Poller, command: str) -> None:
    """Two writers rotate over WQ 0's page while the WQ is disabled (then enabled again),
    drained, aborted, or the device reset (then WQ 0 enabled again): every descriptor is run
    once or dropped and counted, nothing waits past its bound, and the WQ works after."""
    rig, engine = poller.rig, poller.engine
    count = 1500
    plans = [WriterPlan(copies(rig, count * k, count),
                        [slot(0, 2 * i + k) for i in range(count)], exclusive=True,
                        wait_limit=SLOT_WAIT) for k in range(2)]
    writers = poller.writers.start_writers(poller.address, plans)
    wait_until(lambda: rig.status(0) != 0, "nothing ran")
    if command == "disable":
        engine.disable_wq(0)
        assert engine.counters(0).completed == engine.counters(0).submitted
        engine.enable_wq(0, LARGE)
    elif command == "drain":
        engine.drain_wq(0)
    elif command == "abort":
        engine.abort_wq(0)
    else:
        engine.reset()
        engine.enable_wq(0, LARGE)
    no_timeouts(writers.join(), plans)
    drain(poller)
    counters = engine.counters(0)
    done = [rig.status(i) for i in range(2 * count)]
    assert set(done) <= {0, 1}
    assert_copied(rig, (i for i in range(2 * count) if done[i]))
    assert counters.submitted + counters.dropped_disabled + counters.dropped_full == 2 * count
    assert done.count(1) == counters.completed - counters.errors
    if command in ("disable", "drain"):
        assert counters.completed == counters.submitted
    last = [WriterPlan(copies(rig, 2 * count, 1), [slot(0, 0)], wait_limit=SLOT_WAIT)]
    no_timeouts(poller.run(last), last)
    assert rig.wait_status(2 * count) == 1


def test_dma_unmap_while_writers_store(poller: Poller) -> None:
    """Copies within a region of their own, one slot per writer so that each writer's
    descriptors run in its order: the region is unmapped, then freed, while they run. Each
    writer's copies succeed up to the unmap and fault after it, and nothing touches the freed
    pages (they are no longer mapped in this process: a touch would crash it)."""
    rig, engine = poller.rig, poller.engine
    iova, size, count = 0x3_0000_0000, 4 << 20, 400
    region = mmap.mmap(-1, size)
    view = ctypes.c_char.from_buffer(region)
    engine.dma_map_address(iova, size, ctypes.addressof(view))
    del view
    plans = [WriterPlan(b"".join(
        descriptor(OP_MEMMOVE, COMPLETE, record=RECORD + 32 * (count * k + i),
                   src=iova, dst=iova + (2 << 20), size=1 << 20) for i in range(count)),
        [slot(0, k)] * count, wait_limit=SLOT_WAIT) for k in range(2)]
    writers = poller.writers.start_writers(poller.address, plans)
    wait_until(lambda: rig.status(0) != 0, "nothing ran")
    engine.dma_unmap(iova, size)
    region.close()
    no_timeouts(writers.join(), plans)
    drain(poller)
    read_fault = 0x03
    for k in range(2):
        done = [rig.status(count * k + i) for i in range(count)]
        succeeded = done.index(read_fault) if read_fault in done else count
        assert done == [1] * succeeded + [read_fault] * (count - succeeded), k
    assert engine.counters(0).submitted == 2 * count


# --- Writers that break the contract ----------------------------------------------------------


def test_garbage_and_partial_descriptors_are_dropped_or_fail(poller: Poller) -> None:
    """Random bytes stored with no wait into slots of an enabled WQ, of a disabled one and of
    no WQ, beside descriptors never finished (no qword 0) and well-formed ones sent to the
    disabled WQ: garbage is taken and fails or is dropped and counted, an unfinished slot is
    left alone, and the engine goes on working."""
    rig, engine = poller.rig, poller.engine
    rng = random.Random(10)
    count = 500

    def garbage(wq: int) -> WriterPlan:
        return WriterPlan(rng.randbytes(64 * count), [slot(wq, i) for i in range(count)],
                          WriterMode.RAW)

    unfinished = WriterPlan(noops(0, 4), [slot(0, i, page=0) for i in range(4)],
                            WriterMode.NO_QWORD0)
    to_disabled = WriterPlan(noops(0, count), [slot(1, i, page=0) for i in range(count)],
                             wait_limit=SLOT_WAIT)
    plans = [garbage(0), garbage(1), garbage(3), unfinished, to_disabled]
    results = poller.run(plans)
    assert [r.timeouts for r in results] == [0] * len(plans)
    # Slots of a disabled WQ, or of no WQ, are swept every 64th sweep: wait for them.
    wait_until(lambda: all_taken(poller, 1) and all_taken(poller, 3), "slots not taken")
    drain(poller)
    enabled, disabled = engine.counters(0), engine.counters(1)
    assert 0 < enabled.submitted <= count
    assert enabled.completed == enabled.submitted
    assert enabled.errors > 0
    assert disabled.submitted == 0
    assert count < disabled.dropped_disabled <= 2 * count
    assert 0 < engine.stray_descriptors() <= count
    for i in range(4):
        at = slot(0, i, page=0)
        assert poller.bar[at + 8:at + 64] == noops(0, 4)[64 * i + 8:64 * (i + 1)]
    last = [WriterPlan(copies(rig, 0, 1), [slot(0, 9)], wait_limit=SLOT_WAIT)]
    no_timeouts(poller.run(last), last)
    assert rig.wait_status(0) == 1
