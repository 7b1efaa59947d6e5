"""Benchmarks through the vfio-user protocol, without QEMU: ``vdsa serve`` in a process of its
own, driven by the client harness as the stock driver drives a DSA (each descriptor a MOVDIR64B's
eight posted portal writes, completions signalled by MSI-X or seen by polling the record), then
through the mapped BAR2 by a native submitter that stores descriptors as a guest's MOVDIR64B
does and polls or sleeps on the records. Each figure stands beside the host doing the same work
on the same buffers in this process, or, for batches and scaling, beside vdsa's own figure for
the plain case.

Every case checks its results (completion status, data, CRC values) as it goes: a figure from
wrong results is an error, not a figure.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from vdsa_server.bench.hostref import HostOp, HostReference
from vdsa_server.bench.results import Measurement
from vdsa_server.bench.serving import process_cpu_seconds, serving
from vdsa_server.bench.submitter import NativeSubmitter, StreamOutcome, StreamPlan
from vdsa_server.client import GuestMemory, VfioUserClient
from vdsa_server.client.driver import (
    RECORD_SIZE,
    SLOTS_PER_PORTAL,
    DsaDriver,
    make_descriptor,
    vector_of,
)
from vdsa_server.client.protocol import Command, DmaMapFlag, encode_dma_map, encode_dma_unmap
from vdsa_server.device.descriptors import (
    DsaCompletionRecord,
    DsaCompStatus,
    DsaOpcode,
    IdxdOpFlag,
)
from vdsa_server.device.pci import Bar
from vdsa_server.device.registers import IdxdCmd, IdxdPortal, wq_portal_offset
from vdsa_server.log import get_logger

log = get_logger()

KiB = 1 << 10
MiB = 1 << 20
GB = 1e9
DIF_BLOCK = 512
DIF_SIZE = 8

# Guest memory, one memfd shared with the server.
MEMORY = 0x1000_0000
MEMORY_SIZE = 24 * MiB
RECORDS = MEMORY  # 2048 records of 32 bytes, 256 for each of up to 8 streams
RECORDS_PER_STREAM = 256
LISTS = MEMORY + 64 * KiB  # batch descriptor lists
SRC = MEMORY + 1 * MiB  # 2 MiB of random bytes, the source of every case
PROTECTED = MEMORY + 3 * MiB  # SRC's first MiB with a DIF after each block (host-made)
EXPECTED = MEMORY + 5 * MiB  # what the host made of SRC, for the device's result to equal
DESTINATIONS = MEMORY + 8 * MiB  # one 4 MiB destination per WQ
DESTINATION_SIZE = 4 * MiB
# Pages QEMU maps one by one for a vIOMMU guest: in dest(3), at an IOVA nothing else uses.
DMA_MAP_PAGE = 4 * KiB
DMA_MAP_IOVA = 0x40_0000_0000
FILL_PATTERN = 0x5A5A_5A5A_5A5A_5A5A  # one repeated byte, so host memset does the same work

# Topology: WQ n in group n with engine n, all enabled; the default device has 4 engines.
WQS = 4
WQ_SIZE = 32
SCALING_WQS = (1, 2, 4)
BATCH_SIZE = 32
BATCH_UNIT = 4 * KiB
BATCH_WINDOW = 8
LATENCY_SIZE = 64
LATENCY_SAMPLES = 1 << 20
NOTIFY = IdxdOpFlag.CRAV | IdxdOpFlag.RCR | IdxdOpFlag.RCI
POLLED = IdxdOpFlag.CRAV | IdxdOpFlag.RCR
ZERO_RECORD = bytes(RECORD_SIZE)


class BenchError(Exception):
    """A benchmark could not run, or the device gave a wrong result."""


@dataclass(frozen=True)
class BenchPlan:
    """``seconds`` of measurement for each case and each reference."""

    seconds: float = 1.0

    @property
    def warm_up(self) -> float:
        return min(0.2, self.seconds / 4)


def dest(wq: int) -> int:
    return DESTINATIONS + wq * DESTINATION_SIZE


def protected_size(size: int) -> int:
    return size // DIF_BLOCK * (DIF_BLOCK + DIF_SIZE)


def _expect_success(record: DsaCompletionRecord) -> None:
    if record.status != DsaCompStatus.SUCCESS:
        raise BenchError(f"completion status {record.status:#x}, not success "
                         f"(bytes completed {record.bytes_completed}, fault address "
                         f"{record.fault_addr:#x})")


@dataclass(frozen=True)
class Work:
    """One kind of descriptor: how to make it for a record and vector, how to check its record,
    and the bytes it processes."""

    opcode: DsaOpcode
    size: int
    fields: dict[str, int]
    check: Callable[[DsaCompletionRecord], None] = _expect_success

    def descriptor(self, record: int, vector: int, flags: int = NOTIFY) -> bytes:
        return make_descriptor(self.opcode, flags, record=record, vector=vector, **self.fields)


@dataclass
class CpuClock:
    """CPU seconds of this process and of the server process."""

    server_pid: int

    def read(self) -> tuple[float, float]:
        times = os.times()
        return times.user + times.system, process_cpu_seconds(self.server_pid)


@dataclass(frozen=True)
class StreamResult:
    completed: int
    seconds: float
    client_cpu: float
    server_cpu: float

    def per_op_us(self, cpu: float) -> float:
        return cpu / self.completed * 1e6 if self.completed else 0.0


class MappedBar:
    """BAR2 mapped from the region fd the server offers (the fd stays the client's), and the
    native submitter that stores into it. ``close()`` unmaps it."""

    def __init__(self, fd: int, size: int, library: Path | None = None) -> None:
        self._map = mmap.mmap(fd, size)
        view = ctypes.c_char.from_buffer(self._map)
        self.address = ctypes.addressof(view)
        del view  # an exported buffer would keep the mapping from closing
        self.submitter = NativeSubmitter(library)

    def close(self) -> None:
        self._map.close()

    def __enter__(self) -> MappedBar:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class Bench:
    """The harness's side of the benchmarks: the driver, the server's CPU clock, the host
    reference and the guest memory they share."""

    def __init__(self, driver: DsaDriver, cpu: CpuClock, host: HostReference,
                 plan: BenchPlan) -> None:
        self.driver = driver
        self.memory = driver.memory
        self.cpu = cpu
        self.host = host
        self.plan = plan
        self.mapped: MappedBar | None = None

    def address(self, iova: int, size: int) -> int:
        return self.memory.address(iova, size)

    async def set_up(self) -> None:
        await self.driver.set_up()
        for wq in range(WQS):
            await self.driver.configure_wq(wq, WQ_SIZE)
            await self.driver.configure_group(wq, 1 << wq, 1 << wq)
        await self.driver.run_command(IdxdCmd.ENABLE_DEVICE)
        for wq in range(WQS):
            await self.driver.run_command(IdxdCmd.ENABLE_WQ, wq)
        self.memory.write(SRC, os.urandom(2 * MiB))
        self.host.time_ns(HostOp.DIF_INSERT, self.address(PROTECTED, protected_size(MiB)),
                          self.address(SRC, MiB), MiB, 1)

    # --- Streams of descriptors ---

    async def stream(self, wq: int, make: Callable[[int, int], bytes],
                     check: Callable[[DsaCompletionRecord], None], window: int,
                     seconds: float) -> StreamResult:
        """Keep ``window`` descriptors in flight on ``wq`` for ``seconds``, as a driver does:
        submit, sleep until the WQ's interrupt, reap the records that are done, refill.
        ``make(record, vector)`` builds each descriptor."""
        if window > min(WQ_SIZE, RECORDS_PER_STREAM):
            raise ValueError(f"a window of {window} exceeds the WQ or its records")
        driver, vector = self.driver, vector_of(wq)
        records = RECORDS + wq * RECORDS_PER_STREAM * RECORD_SIZE
        submitted = completed = 0
        clock = self.cpu.read()
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            open_for_more = time.perf_counter() < deadline
            while open_for_more and submitted - completed < window:
                record = records + submitted % window * RECORD_SIZE
                self.memory.write(record, ZERO_RECORD)
                await driver.submit(make(record, vector), wq)
                submitted += 1
            if completed == submitted:
                break
            await driver.interrupt(vector)
            while completed < submitted:
                record = records + completed % window * RECORD_SIZE
                if not driver.status(record):
                    break
                check(driver.record(record))
                completed += 1
        seconds = time.perf_counter() - start
        client_cpu, server_cpu = self.cpu.read()
        return StreamResult(completed, seconds, client_cpu - clock[0], server_cpu - clock[1])

    async def throughput(self, work: Work, wq: int = 0, window: int = WQ_SIZE,
                         seconds: float | None = None) -> StreamResult:
        """A warm-up, then ``seconds`` of ``work`` on ``wq``: through the mapped BAR by the
        native submitter once :meth:`map_bar` has run, else by this loop."""
        seconds = seconds or self.plan.seconds
        if self.mapped is not None:
            await self.native_stream(work, wq, window, self.plan.warm_up)
            return await self.native_stream(work, wq, window, seconds)

        def make(record: int, vector: int) -> bytes:
            return work.descriptor(record, vector)

        await self.stream(wq, make, work.check, window, self.plan.warm_up)
        return await self.stream(wq, make, work.check, window, seconds)

    # --- The mapped BAR and the native submitter ---

    @contextlib.asynccontextmanager
    async def map_bar(self) -> AsyncIterator[MappedBar]:
        """BAR2 mapped here from the server's fd, for the native submitter while inside."""
        info = await self.driver.client.device_get_region_info(Bar.PORTALS)
        if not info.fds:
            raise BenchError("the server offers BAR2 as no mappable region")
        # The host reference's library holds the submitter too: the same build, however long
        # the run (sources edited meanwhile would name another).
        with MappedBar(info.fds[0], info.size, self.host.path) as bar:
            self.mapped = bar
            try:
                yield bar
            finally:
                self.mapped = None

    def native_plan(self, work: Work, wq: int, window: int, seconds: float, *,
                    flags: int = POLLED, irq: bool = False, latencies: int = 0
                    ) -> StreamPlan:
        """``work`` on ``wq`` as the native submitter streams it: into the limited MSI-X
        portal, rotating over its slots as the stock driver does."""
        if self.mapped is None:
            raise BenchError("the native submitter needs the mapped BAR")
        records = RECORDS + wq * RECORDS_PER_STREAM * RECORD_SIZE
        vector = vector_of(wq)
        return StreamPlan(
            portal=self.mapped.address + wq_portal_offset(wq, IdxdPortal.LIMITED_MSIX),
            slots=SLOTS_PER_PORTAL, window=window,
            descriptor=work.descriptor(0, vector, flags),
            records=self.address(records, window * RECORD_SIZE), records_iova=records,
            seconds=seconds, wait_limit=self.driver.wait_limit,
            irq_fd=self.driver.vectors[vector].fd if irq else -1, latencies=latencies)

    async def native_stream(self, work: Work, wq: int, window: int,
                            seconds: float) -> StreamResult:
        """``window`` descriptors of ``work`` in flight for ``seconds``, submitted and reaped
        by the native submitter (its CPU time is the client's); every record's status is
        checked there, and the last window's records in full here."""
        if window > min(WQ_SIZE, RECORDS_PER_STREAM):
            raise ValueError(f"a window of {window} exceeds the WQ or its records")
        plan = self.native_plan(work, wq, window, seconds)
        clock = self.cpu.read()
        outcome = await self.run_native(plan)
        _, server_cpu = self.cpu.read()
        for index in range(min(window, outcome.completed)):
            work.check(self.driver.record(plan.records_iova + index * RECORD_SIZE))
        return StreamResult(outcome.completed, outcome.seconds, outcome.cpu_seconds,
                            server_cpu - clock[1])

    async def run_native(self, plan: StreamPlan) -> StreamOutcome:
        """The blocking C stream in a worker thread, so that trio's loop stays responsive."""
        if self.mapped is None:
            raise BenchError("the native submitter needs the mapped BAR")
        submitter = self.mapped.submitter
        return await trio.to_thread.run_sync(submitter.stream, plan)

    def host_rate(self, op: HostOp, dst: int, src: int, size: int) -> float:
        return self.host.rate(op, self.address(dst, size), self.address(src, size), size,
                              self.plan.seconds)


def _cpu_extra(result: StreamResult) -> dict[str, float]:
    return {"client_cpu_us_per_op": result.per_op_us(result.client_cpu),
            "server_cpu_us_per_op": result.per_op_us(result.server_cpu),
            "completed": result.completed}


def _size_label(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB" if size >= KiB \
        else f"{size} B"


def _rate_measurement(group: str, case: str, size: int, result: StreamResult,
                      reference: str, reference_ops: float) -> Measurement:
    ops = result.completed / result.seconds
    return Measurement(
        group=group, case=case, unit="GB/s", value=ops * size / GB, reference=reference,
        reference_value=reference_ops * size / GB,
        extra={"ops_per_s": ops, "reference_ops_per_s": reference_ops, **_cpu_extra(result)})


# --- The cases ----------------------------------------------------------------------------------


def _portal_suffix(bench: Bench) -> str:
    """Cases measured through mapped portals are named apart from the trapped ones."""
    return " (mapped)" if bench.mapped is not None else ""


async def memmove_cases(bench: Bench, sizes: Sequence[int]) -> list[Measurement]:
    measurements = []
    suffix = _portal_suffix(bench)
    for size in sizes:
        work = Work(DsaOpcode.MEMMOVE, size,
                    {"src_addr": SRC, "dst_addr": dest(0), "xfer_size": size})
        bench.memory.write(dest(0), bytes(size))
        result = await bench.throughput(work)
        if bench.memory.read(dest(0), size) != bench.memory.read(SRC, size):
            raise BenchError(f"memmove of {size} bytes: the destination differs from the source")
        reference = bench.host_rate(HostOp.MEMCPY, dest(1), SRC, size)
        measurements.append(_rate_measurement(f"memmove{suffix}",
                                              f"memmove {_size_label(size)}{suffix}", size,
                                              result, HostOp.MEMCPY.label, reference))
    return measurements


def _crc_check(expected: int) -> Callable[[DsaCompletionRecord], None]:
    def check(record: DsaCompletionRecord) -> None:
        _expect_success(record)
        if record.crc_val != expected:
            raise BenchError(f"CRC {record.crc_val:#x}, the host computed {expected:#x}")

    return check


def _compare_check(record: DsaCompletionRecord) -> None:
    _expect_success(record)
    if record.result != 0:
        raise BenchError(f"compare of equal buffers gave result {record.result}")


@dataclass(frozen=True)
class OperationCase:
    """A descriptor's work, the host's way of doing the same (from ``host_src`` to
    ``host_dst``), and a check of what the device left in memory."""

    name: str
    work: Work
    host_op: HostOp
    host_dst: int
    host_src: int
    verify: Callable[[], bool] = lambda: True


def checked_operations(bench: Bench, size: int) -> list[OperationCase]:
    """The operation cases at ``size``, with what their checks need prepared in memory: the
    host's CRC of SRC, and SRC's bytes in dest(1) for the compare."""
    bench.host.time_ns(HostOp.CRC32C, 0, bench.address(SRC, size), size, 1)
    crc = ~bench.host.result() & 0xFFFF_FFFF  # ISA-L's register is the uninverted CRC
    bench.memory.write(dest(1), bench.memory.read(SRC, size))
    return _operations(bench.memory, size, crc)


def _operations(memory: GuestMemory, size: int, crc: int) -> list[OperationCase]:
    expected_dif = memory.read(PROTECTED, protected_size(size))
    fill = bytes([FILL_PATTERN & 0xFF]) * size
    return [
        OperationCase("fill", Work(DsaOpcode.MEMFILL, size, {
            "pattern": FILL_PATTERN, "dst_addr": dest(0), "xfer_size": size}),
            HostOp.MEMSET, dest(0), SRC, lambda: memory.read(dest(0), size) == fill),
        OperationCase("compare", Work(DsaOpcode.COMPARE, size, {
            "src_addr": SRC, "src2_addr": dest(1), "xfer_size": size}, _compare_check),
            HostOp.MEMCMP, dest(1), SRC),
        OperationCase("CRC32C", Work(DsaOpcode.CRCGEN, size, {
            "src_addr": SRC, "xfer_size": size}, _crc_check(crc)),
            HostOp.CRC32C, dest(0), SRC),
        OperationCase("copy with CRC32C", Work(DsaOpcode.COPY_CRC, size, {
            "src_addr": SRC, "dst_addr": dest(0), "xfer_size": size}, _crc_check(crc)),
            HostOp.COPY_CRC32C, dest(0), SRC,
            lambda: memory.read(dest(0), size) == memory.read(SRC, size)),
        # The device's DIFs must be the host's (PROTECTED, made by set_up).
        OperationCase("DIF insert", Work(DsaOpcode.DIF_INS, size, {
            "src_addr": SRC, "dst_addr": dest(0), "xfer_size": size}),
            HostOp.DIF_INSERT, EXPECTED, SRC,
            lambda: memory.read(dest(0), len(expected_dif)) == expected_dif),
        OperationCase("DIF check", Work(DsaOpcode.DIF_CHECK, size, {
            "src_addr": PROTECTED, "xfer_size": protected_size(size)}),
            HostOp.DIF_CHECK, EXPECTED, PROTECTED),
    ]


async def operation_cases(bench: Bench, sizes: Sequence[int]) -> list[Measurement]:
    """Fill, compare, CRC32C, copy with CRC, DIF insert and DIF check, each against the host
    doing the same with glibc or ISA-L."""
    measurements = []
    memory = bench.memory
    suffix = _portal_suffix(bench)
    for size in sizes:
        for case in checked_operations(bench, size):
            memory.write(dest(0), bytes(protected_size(size) or size))
            result = await bench.throughput(case.work)
            if not case.verify():
                raise BenchError(f"{case.name} of {size} bytes: wrong data in the destination")
            reference = bench.host_rate(case.host_op, case.host_dst, case.host_src, size)
            if case.host_op is HostOp.DIF_CHECK and bench.host.result():
                raise BenchError("the host's DIF check failed on the host's own DIFs")
            measurements.append(_rate_measurement(
                f"operations{suffix}", f"{case.name} {_size_label(size)}{suffix}", size,
                result, case.host_op.label, reference))
    return measurements


async def _timed_requests(bench: Bench, one: Callable[[int], Awaitable[None]]) -> StreamResult:
    """``one(i)`` for i = 0, 1, ... for the plan's seconds, with both sides' CPU time."""
    done = 0
    clock = bench.cpu.read()
    start = time.perf_counter()
    deadline = start + bench.plan.seconds
    while time.perf_counter() < deadline:
        await one(done)
        done += 1
    seconds = time.perf_counter() - start
    client_cpu, server_cpu = bench.cpu.read()
    return StreamResult(done, seconds, client_cpu - clock[0], server_cpu - clock[1])


async def dma_map_case(bench: Bench) -> Measurement:
    """What a vIOMMU guest costs per page it maps for DMA: QEMU sends a DMA_MAP (with the
    guest-RAM fd) and later a DMA_UNMAP, one 4 KiB page each; here the pair against the
    cheapest round trip there is, a 4-byte config-space read, in the same run."""
    client, memory = bench.driver.client, bench.memory
    pages = DESTINATION_SIZE // DMA_MAP_PAGE

    async def pair(i: int) -> None:
        offset = dest(3) - memory.iova + i % pages * DMA_MAP_PAGE
        iova = DMA_MAP_IOVA + i % pages * DMA_MAP_PAGE
        await client.request(Command.DMA_MAP, encode_dma_map(
            iova, DMA_MAP_PAGE, DmaMapFlag.READ | DmaMapFlag.WRITE, offset), fds=[memory.fd])
        await client.request(Command.DMA_UNMAP, encode_dma_unmap(iova, DMA_MAP_PAGE))

    async def config_read(_i: int) -> None:
        await client.config_read(0, 4)

    pairs = await _timed_requests(bench, pair)
    reads = await _timed_requests(bench, config_read)
    return Measurement(
        group="vIOMMU", case="DMA_MAP + DMA_UNMAP of a 4 KiB page", unit="pairs/s",
        value=pairs.completed / pairs.seconds, reference="4-byte config-space read, reads/s",
        reference_value=reads.completed / reads.seconds,
        extra={**_cpu_extra(pairs),
               "reference_server_cpu_us_per_op": reads.per_op_us(reads.server_cpu)})


async def batch_case(bench: Bench) -> Measurement:
    """One batch of 32 x 4 KiB memmoves against the same 32 as single descriptors."""
    entries = b"".join(
        make_descriptor(DsaOpcode.MEMMOVE, 0, src_addr=SRC + i * BATCH_UNIT,
                        dst_addr=dest(0) + i * BATCH_UNIT, xfer_size=BATCH_UNIT)
        for i in range(BATCH_SIZE))
    for slot in range(BATCH_WINDOW):
        bench.memory.write(LISTS + slot * len(entries), entries)
    batch_bytes = BATCH_SIZE * BATCH_UNIT
    slots = iter(range(1 << 62))

    def make_batch(record: int, vector: int) -> bytes:
        slot = next(slots) % BATCH_WINDOW
        return make_descriptor(DsaOpcode.BATCH, NOTIFY, record=record, vector=vector,
                               desc_list_addr=LISTS + slot * len(entries),
                               desc_count=BATCH_SIZE)

    def check_batch(record: DsaCompletionRecord) -> None:
        _expect_success(record)
        if record.bytes_completed != BATCH_SIZE:
            raise BenchError(f"a batch completed {record.bytes_completed} of {BATCH_SIZE}")

    bench.memory.write(dest(0), bytes(batch_bytes))
    await bench.stream(0, make_batch, check_batch, BATCH_WINDOW, bench.plan.warm_up)
    batches = await bench.stream(0, make_batch, check_batch, BATCH_WINDOW, bench.plan.seconds)
    if bench.memory.read(dest(0), batch_bytes) != bench.memory.read(SRC, batch_bytes):
        raise BenchError("the batch's destination differs from its source")
    singles = await bench.throughput(Work(DsaOpcode.MEMMOVE, BATCH_UNIT, {
        "src_addr": SRC, "dst_addr": dest(0), "xfer_size": BATCH_UNIT}))
    singles_ops = singles.completed / singles.seconds / BATCH_SIZE
    return _rate_measurement("batch", f"batch of {BATCH_SIZE} x 4 KiB memmove", batch_bytes,
                             batches, f"{BATCH_SIZE} single 4 KiB memmoves", singles_ops)


LATENCY_WORK = Work(DsaOpcode.MEMMOVE, LATENCY_SIZE,
                    {"src_addr": SRC, "dst_addr": dest(0), "xfer_size": LATENCY_SIZE})
LATENCY_MODES = (("interrupt", NOTIFY), ("polling", POLLED))


def _latency_measurements(bench: Bench, mode: str, samples: Sequence[float],
                          host_us: float) -> list[Measurement]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    suffix = _portal_suffix(bench)
    return [Measurement(
        group=f"latency{suffix}", case=f"latency 64 B memmove, {mode}, {name}{suffix}",
        unit="us", value=value, reference=f"{HostOp.MEMCPY.label} of 64 B",
        reference_value=host_us, lower_is_better=True, extra={"samples": len(samples)})
        for name, value in (("p50", cuts[49]), ("p99", cuts[98]))]


async def latency_cases(bench: Bench) -> list[Measurement]:
    """Submission (the first portal write sent, or the slot's qword 0 stored) until the
    record is seen complete, one descriptor at a time: by its interrupt, and by polling the
    record without sleeping."""
    host_us = 1e6 / bench.host_rate(HostOp.MEMCPY, dest(1), SRC, LATENCY_SIZE)
    if bench.mapped is not None:
        return await _native_latency_cases(bench, host_us)
    driver, memory = bench.driver, bench.memory
    record, vector = RECORDS, vector_of(0)
    work = LATENCY_WORK
    measurements = []
    for mode, flags in LATENCY_MODES:
        desc = work.descriptor(record, vector, flags)
        samples: list[float] = []
        deadline = time.perf_counter() + bench.plan.seconds
        warm_until = time.perf_counter() + bench.plan.warm_up
        while time.perf_counter() < deadline or len(samples) < 2:
            memory.write(record, ZERO_RECORD)
            # A signal left from earlier work (a completion reaped before its interrupt came)
            # must not count as this one's; one that comes late anyway is waited past.
            driver.vectors[vector].poll()
            start = time.perf_counter_ns()
            await driver.submit(desc)
            if flags & IdxdOpFlag.RCI:
                while not driver.status(record):
                    await driver.interrupt(vector)
            else:
                _spin_until_complete(driver, record)
            end = time.perf_counter_ns()
            _expect_success(driver.record(record))
            if time.perf_counter() >= warm_until:
                samples.append((end - start) / 1e3)
        measurements += _latency_measurements(bench, mode, samples, host_us)
    return measurements


async def _native_latency_cases(bench: Bench, host_us: float) -> list[Measurement]:
    """The native submitter, one descriptor in flight: it sleeps on the vector's eventfd,
    or spins on the record."""
    measurements = []
    for mode, flags in LATENCY_MODES:
        irq = bool(flags & IdxdOpFlag.RCI)
        if irq:
            bench.driver.vectors[vector_of(0)].poll()  # nothing left from earlier work
        await bench.run_native(bench.native_plan(LATENCY_WORK, 0, 1, bench.plan.warm_up,
                                                 flags=flags, irq=irq))
        outcome = await bench.run_native(bench.native_plan(
            LATENCY_WORK, 0, 1, bench.plan.seconds, flags=flags, irq=irq,
            latencies=LATENCY_SAMPLES))
        if outcome.completed < 2:
            raise BenchError(f"{outcome.completed} latency samples ({mode})")
        measurements += _latency_measurements(bench, mode, outcome.latencies_us, host_us)
    return measurements


def _spin_until_complete(driver: DsaDriver, record: int) -> None:
    # A polling driver spins on the record; so does this, bounded like every wait.
    give_up = time.perf_counter() + driver.wait_limit
    while not driver.status(record):
        if time.perf_counter() > give_up:
            raise BenchError(f"no completion record within {driver.wait_limit} s")


async def _streams(bench: Bench, work: Sequence[Work]) -> StreamResult:
    """``work[n]`` streamed on WQ n, all at once, as one result. The CPU clocks are the
    processes' (every stream's reading covers all of them over about the same window),
    so the streams' readings are averaged, not added."""
    results: list[StreamResult] = []

    async def run(wq: int) -> None:
        results.append(await bench.throughput(work[wq], wq))

    async with trio.open_nursery() as nursery:
        for wq in range(len(work)):
            nursery.start_soon(run, wq)
    return StreamResult(sum(r.completed for r in results), max(r.seconds for r in results),
                        statistics.fmean(r.client_cpu for r in results),
                        statistics.fmean(r.server_cpu for r in results))


async def scaling_cases(bench: Bench, sizes: Sequence[int]) -> list[Measurement]:
    """The same memmove stream on 1, 2 and 4 WQs at once, each WQ with an engine of its own;
    the reference is the one-WQ figure."""
    measurements = []
    for size in sizes:
        work = [Work(DsaOpcode.MEMMOVE, size,
                     {"src_addr": SRC, "dst_addr": dest(wq), "xfer_size": size})
                for wq in range(WQS)]
        single_ops = 0.0
        for count in SCALING_WQS:
            total = await _streams(bench, work[:count])
            ops = total.completed / total.seconds
            single_ops = single_ops or ops
            measurements.append(_rate_measurement(
                "scaling", f"memmove {_size_label(size)} on {count} WQ{'s' * (count > 1)}",
                size, total, f"memmove {_size_label(size)} on 1 WQ", single_ops))
    return measurements


def notes(cpus: int) -> list[str]:
    """What the figures mean on this machine, printed and stored with them."""
    parallel_engines = max(cpus - 2, 0)
    return [
        "Trapped cases: each descriptor reaches the server as eight vfio-user messages, one "
        "for each 8-byte store of the guest's MOVDIR64B, as QEMU sends them: small transfers "
        "measure that path, large ones the engine's copy.",
        "(mapped) cases: a native submitter stores each descriptor into the mapped BAR2 as "
        "vdsa's QEMU MOVDIR64B does (wait for a free slot, qwords 7..1, then qword 0), over "
        "the 64 slots of the portal page in turn, and polls the completion records (or, for "
        "interrupt latency, sleeps on the vector's eventfd): no message per descriptor.",
        "client_cpu_us_per_op and server_cpu_us_per_op in the JSON split each descriptor's CPU "
        "time between the harness client (Python or the native submitter, standing in for "
        "QEMU) and `vdsa serve`.",
        f"This machine has {cpus} CPU{'s' * (cpus > 1)}. The harness client, the server's "
        f"vfio-user thread and one thread per engine share them, so at most "
        f"{parallel_engines} engine thread{'s' * (parallel_engines != 1)} can run beside the "
        f"two message threads: the 2- and 4-WQ figures show how the threads share "
        f"{cpus} CPU{'s' * (cpus > 1)}, not how DSA engines scale.",
        "Polling latency spins the client on a CPU; interrupt latency sleeps until the "
        "MSI-X eventfd fires.",
    ]


# --- The run ---------------------------------------------------------------------------------


async def run_harness(work_dir: Path, plan: BenchPlan) -> list[Measurement]:
    """Every harness case, in order, against a fresh server."""
    host = HostReference()
    socket = work_dir / "vdsa.sock"
    async with serving(socket, work_dir / "server.log") as process, \
            VfioUserClient.connect(socket) as client:
        with GuestMemory(MEMORY, MEMORY_SIZE) as memory:
            bench = Bench(DsaDriver(client, memory), CpuClock(process.pid), host, plan)
            await bench.set_up()
            measurements = await memmove_cases(bench, (64, 4 * KiB, 64 * KiB, MiB))
            measurements += await operation_cases(bench, (4 * KiB, MiB))
            measurements.append(await batch_case(bench))
            measurements.append(await dma_map_case(bench))
            measurements += await latency_cases(bench)
            measurements += await scaling_cases(bench, (64 * KiB, MiB))
            # The same work stored into the mapped BAR by native code, as a guest makes it.
            async with bench.map_bar():
                measurements += await memmove_cases(bench, (64, 4 * KiB, 64 * KiB, MiB))
                measurements += await operation_cases(bench, (4 * KiB, MiB))
                measurements += await latency_cases(bench)
    return measurements
