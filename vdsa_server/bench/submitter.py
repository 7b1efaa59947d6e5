"""ctypes binding to the native submitters (``native/bench/submitter.h``): a stream of
descriptors stored into a mapped BAR2 by the slot handshake, timed and checked in C, and
writer threads that the engine tests turn loose on the poller."""

from __future__ import annotations

import ctypes
import enum
import errno
import os
from collections.abc import Sequence
from ctypes import POINTER, c_bool, c_int, c_uint8, c_uint32, c_uint64, c_void_p
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vdsa_server.bench.hostref import load_bench_library

DESCRIPTOR_SIZE = 64
RECORD_SIZE = 32


class _StreamPlan(ctypes.Structure):
    _fields_ = [("portal", c_void_p), ("slots", c_uint32), ("window", c_uint32),
                ("descriptor", c_uint8 * DESCRIPTOR_SIZE), ("records", c_void_p),
                ("records_iova", c_uint64), ("irq_fd", c_int), ("expected_status", c_uint8),
                ("duration_ns", c_uint64), ("wait_ns", c_uint64),
                ("latency_ns", POINTER(c_uint64)), ("latency_capacity", c_uint64)]


class _StreamResult(ctypes.Structure):
    _fields_ = [("completed", c_uint64), ("elapsed_ns", c_uint64), ("cpu_ns", c_uint64),
                ("samples", c_uint64), ("bad_status", c_uint8)]


class WriterMode(enum.IntEnum):
    """``enum vdsa_writer_mode``."""

    HANDSHAKE = 0
    SLOW = 1
    RAW = 2
    NO_QWORD0 = 3


class _WriterPlan(ctypes.Structure):
    _fields_ = [("bar", c_void_p), ("descriptors", c_void_p), ("offsets", POINTER(c_uint32)),
                ("count", c_uint32), ("mode", c_int), ("pause_ns", c_uint64),
                ("wait_ns", c_uint64), ("exclusive", c_bool)]


class _WriterResult(ctypes.Structure):
    _fields_ = [("written", c_uint64), ("timeouts", c_uint64)]


_SIGNATURES: dict[str, tuple[Any, list[Any], None]] = {
    "vdsa_submit_stream": (c_int, [POINTER(_StreamPlan), POINTER(_StreamResult)], None),
    "vdsa_writers_start": (c_void_p, [POINTER(_WriterPlan), c_uint32], None),
    "vdsa_writers_join": (None, [c_void_p, POINTER(_WriterResult)], None),
}


class SubmitError(OSError):
    """The stream stopped: a wait outlasted its bound, or a record had the wrong status."""


@dataclass(frozen=True)
class StreamPlan:
    """A stream into the slots from host address ``portal`` on (``slots`` of them, in turn),
    ``window`` descriptors in flight, each a copy of ``descriptor`` with its own completion
    record (``records``: host address, ``records_iova``: the device's). Completions are
    polled, or waited for on ``irq_fd`` when it is not negative."""

    portal: int
    slots: int
    window: int
    descriptor: bytes
    records: int
    records_iova: int
    seconds: float
    wait_limit: float
    irq_fd: int = -1
    expected_status: int = 1
    latencies: int = 0  # how many latencies to keep (0: none)


@dataclass(frozen=True)
class StreamOutcome:
    completed: int
    seconds: float
    cpu_seconds: float  # the submitting thread's
    latencies_us: list[float]


@dataclass(frozen=True)
class WriterPlan:
    """``descriptors[i]`` (64 bytes each) into the slot at BAR2 offset ``offsets[i]``."""

    descriptors: bytes
    offsets: Sequence[int]
    mode: WriterMode = WriterMode.HANDSHAKE
    pause_ns: int = 0
    wait_limit: float = 10.0
    exclusive: bool = False


@dataclass(frozen=True)
class WriterResult:
    written: int
    timeouts: int


class NativeSubmitter:
    """The loaded library (the bench's native library, or a build of submitter.c alone)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path, self._c = load_bench_library(path, _SIGNATURES)

    def stream(self, plan: StreamPlan) -> StreamOutcome:
        """Runs the stream in this thread (it blocks for ``plan.seconds``)."""
        if len(plan.descriptor) != DESCRIPTOR_SIZE:
            raise ValueError(f"a descriptor is {DESCRIPTOR_SIZE} bytes")
        samples = (c_uint64 * max(plan.latencies, 1))()
        c_plan = _StreamPlan(
            portal=plan.portal, slots=plan.slots, window=plan.window,
            records=plan.records, records_iova=plan.records_iova, irq_fd=plan.irq_fd,
            expected_status=plan.expected_status, duration_ns=int(plan.seconds * 1e9),
            wait_ns=int(plan.wait_limit * 1e9),
            latency_ns=samples if plan.latencies else None,
            latency_capacity=plan.latencies)
        ctypes.memmove(c_plan.descriptor, plan.descriptor, DESCRIPTOR_SIZE)
        out = _StreamResult()
        rc = int(self._c.vdsa_submit_stream(ctypes.byref(c_plan), ctypes.byref(out)))
        if rc == -errno.EIO:
            raise SubmitError(errno.EIO, f"completion status {out.bad_status:#x}, not "
                              f"{plan.expected_status:#x}, after {out.completed} completed")
        if rc < 0:
            raise SubmitError(-rc, f"native stream: {os.strerror(-rc)} after "
                              f"{out.completed} completed")
        return StreamOutcome(int(out.completed), out.elapsed_ns / 1e9, out.cpu_ns / 1e9,
                             [samples[i] / 1e3 for i in range(out.samples)])

    def start_writers(self, bar: int, plans: Sequence[WriterPlan]) -> Writers:
        """One thread a plan, writing into BAR2 at host address ``bar``; join them with
        :meth:`Writers.join`."""
        return Writers(self._c, bar, plans)


class Writers:
    """Writer threads in flight; the plans' buffers live here until :meth:`join`."""

    def __init__(self, c: ctypes.CDLL, bar: int, plans: Sequence[WriterPlan]) -> None:
        self._c = c
        self._keep: list[Any] = []
        c_plans = (_WriterPlan * len(plans))()
        for c_plan, plan in zip(c_plans, plans, strict=True):
            if len(plan.descriptors) != DESCRIPTOR_SIZE * len(plan.offsets):
                raise ValueError("one 64-byte descriptor an offset")
            descriptors = ctypes.create_string_buffer(plan.descriptors, len(plan.descriptors))
            offsets = (c_uint32 * len(plan.offsets))(*plan.offsets)
            self._keep += [descriptors, offsets]
            c_plan.bar, c_plan.descriptors = bar, ctypes.addressof(descriptors)
            c_plan.offsets, c_plan.count = offsets, len(plan.offsets)
            c_plan.mode, c_plan.pause_ns = plan.mode, plan.pause_ns
            c_plan.wait_ns, c_plan.exclusive = int(plan.wait_limit * 1e9), plan.exclusive
        self._plans = c_plans
        handle = c.vdsa_writers_start(c_plans, len(plans))
        if not handle:
            err = ctypes.get_errno()
            raise OSError(err, f"vdsa_writers_start: {os.strerror(err)}")
        self._handle: int | None = int(handle)

    def join(self) -> list[WriterResult]:
        """Waits for every writer (blocking); their results, in plan order."""
        if self._handle is None:
            raise ValueError("writers already joined")
        results = (_WriterResult * len(self._plans))()
        self._c.vdsa_writers_join(self._handle, results)
        self._handle = None
        self._keep.clear()
        return [WriterResult(int(r.written), int(r.timeouts)) for r in results]
