"""ctypes binding to the native descriptor engine (``native/engine/vdsa_engine.h``).

Python configures the engine and reads from it; descriptors never come through here
except through :meth:`Engine.execute` and :meth:`Engine.portal_write`, which tests and
benchmarks use to drive the engine without a vfio-user client.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Collection
from ctypes import POINTER, c_bool, c_int, c_uint8, c_uint16, c_uint32, c_uint64, c_void_p
from dataclasses import dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any

from vdsa_server.device.descriptors import DsaOpcode
from vdsa_server.device.engine_port import SoftwareError, WqSettings
from vdsa_server.transport.libvfio_user import check_status, declare_signatures

ENV_ENGINE = "VDSA_ENGINE"
ALL_OPCODES: frozenset[int] = frozenset(int(op) for op in DsaOpcode)
# native/engine/vdsa_engine.h
MAX_WQS = 64
MAX_MSIX = 2048
DESCRIPTOR_SIZE = 64
PROT_READ = 1
PROT_WRITE = 2


class EngineError(OSError):
    """An engine call failed; errno as the C call returned it."""


class _EngineConfig(ctypes.Structure):
    _fields_ = [("num_wqs", c_uint32), ("num_msix", c_uint32), ("opcap", c_uint64 * 4),
                ("interrupt_handles", c_bool)]


class _WqConfig(ctypes.Structure):
    _fields_ = [("size", c_uint32), ("priority", c_uint32), ("engines", c_uint64),
                ("max_transfer_size", c_uint32), ("max_batch_size", c_uint32)]


class _SwErr(ctypes.Structure):
    _fields_ = [("error", c_uint8), ("operation", c_uint8), ("wq", c_uint8),
                ("fault_rw", c_uint8), ("batch", c_uint8), ("desc_valid", c_uint8),
                ("batch_index", c_uint16), ("invalid_flags", c_uint32),
                ("fault_addr", c_uint64)]


class _Counters(ctypes.Structure):
    _fields_ = [("submitted", c_uint64), ("completed", c_uint64),
                ("dropped_disabled", c_uint64), ("dropped_full", c_uint64),
                ("dropped_torn", c_uint64), ("errors", c_uint64)]


class _DmaRegion(ctypes.Structure):
    _fields_ = [("iova", c_uint64), ("length", c_uint64), ("prot", c_uint32)]


class _DmaCounters(ctypes.Structure):
    _fields_ = [("maps", c_uint64), ("unmaps", c_uint64), ("unreachable", c_uint64),
                ("map_failures", c_uint64)]


@dataclass(frozen=True)
class EngineDmaRegion:
    iova: int
    length: int
    prot: int  # PROT_READ | PROT_WRITE


@dataclass(frozen=True)
class DmaCounters:
    """What the engine's DMA callbacks did with the client's maps and unmaps."""
    maps: int
    unmaps: int
    unreachable: int  # mapped without an fd: nothing the engine can reach, so they fault
    map_failures: int  # the engine had no memory for them: they fault too


@dataclass(frozen=True)
class WqCounters:
    submitted: int
    completed: int
    dropped_disabled: int
    dropped_full: int
    dropped_torn: int
    errors: int


def _check_errno(result: int, func: Any, _args: tuple[Any, ...]) -> int:
    """Engine calls return 0 or -errno."""
    if result < 0:
        raise EngineError(-result, f"{func.__name__}: {os.strerror(-result)}")
    return result


_ENGINE = c_void_p
_SIGNATURES: dict[str, tuple[Any, list[Any], Callable[..., int] | None]] = {
    "vdsa_engine_create": (c_void_p, [POINTER(_EngineConfig)], None),
    "vdsa_engine_destroy": (None, [_ENGINE], None),
    "vdsa_engine_attach_vfu": (c_int, [_ENGINE, c_void_p, c_uint32], _check_errno),
    "vdsa_engine_map_portals": (c_int, [_ENGINE, c_uint32], _check_errno),
    "vdsa_engine_portal_sleeps": (c_uint64, [_ENGINE], None),
    "vdsa_engine_stray_descriptors": (c_uint64, [_ENGINE], None),
    "vdsa_engine_vfu_attach": (c_int, [_ENGINE], check_status),
    "vdsa_engine_vfu_run": (c_int, [_ENGINE], check_status),
    "vdsa_engine_portal_write": (c_int, [_ENGINE, c_uint64, c_void_p, c_uint32], _check_errno),
    "vdsa_engine_dma_map": (c_int, [_ENGINE, c_uint64, c_uint64, c_void_p, c_uint32],
                            _check_errno),
    "vdsa_engine_dma_unmap": (c_int, [_ENGINE, c_uint64, c_uint64], _check_errno),
    "vdsa_engine_wq_enable": (c_int, [_ENGINE, c_uint32, POINTER(_WqConfig)], _check_errno),
    "vdsa_engine_wq_disable": (c_int, [_ENGINE, c_uint32], _check_errno),
    "vdsa_engine_wq_drain": (c_int, [_ENGINE, c_uint32], _check_errno),
    "vdsa_engine_wq_abort": (c_int, [_ENGINE, c_uint32], _check_errno),
    "vdsa_engine_wq_disable_start": (c_int, [_ENGINE, c_uint32], _check_errno),
    "vdsa_engine_wq_drain_start": (c_int, [_ENGINE, c_uint32], _check_errno),
    "vdsa_engine_wq_waiting": (c_int, [_ENGINE, c_uint32], _check_errno),
    "vdsa_engine_command_fd": (c_int, [_ENGINE], None),
    "vdsa_engine_reset": (None, [_ENGINE], None),
    "vdsa_engine_get_counters": (c_int, [_ENGINE, c_uint32, POINTER(_Counters)],
                                 _check_errno),
    "vdsa_engine_dma_regions": (c_uint64, [_ENGINE, POINTER(_DmaRegion), c_uint64], None),
    "vdsa_engine_get_dma_counters": (None, [_ENGINE, POINTER(_DmaCounters)], None),
    "vdsa_engine_execute": (c_int, [_ENGINE, c_uint32, c_void_p], _check_errno),
    "vdsa_engine_set_int_handle": (c_int, [_ENGINE, c_uint32, c_bool], _check_errno),
    "vdsa_engine_irq_mask": (None, [_ENGINE, c_uint32, c_uint32, c_bool], None),
    "vdsa_engine_irq_trigger": (None, [_ENGINE, c_uint32], None),
    "vdsa_engine_irq_reset": (None, [_ENGINE], None),
    "vdsa_engine_irq_count": (c_uint64, [_ENGINE, c_uint32], None),
    "vdsa_engine_error_fd": (c_int, [_ENGINE], None),
    "vdsa_engine_pop_error": (c_int, [_ENGINE, POINTER(_SwErr)], None),
}


@dataclass(frozen=True)
class EngineLibrary:
    path: Path
    cdll: ctypes.CDLL


def _default_path() -> Path:
    explicit = os.environ.get(ENV_ENGINE)
    if explicit:
        return Path(explicit)
    from vdsa_server.builds.engine_build import Variant, engine_artifact

    return engine_artifact().path / Variant.RELEASE.filename


def load_engine(path: Path | None = None) -> EngineLibrary:
    """Load the engine from ``path``, else ``$VDSA_ENGINE``, else the build cache."""
    path = path or _default_path()
    if not path.is_file():
        raise FileNotFoundError(
            errno.ENOENT, f"descriptor engine not found at {path}: run `vdsa build engine` "
            f"or set {ENV_ENGINE}")
    cdll = ctypes.CDLL(str(path), use_errno=True)
    declare_signatures(cdll, _SIGNATURES)
    return EngineLibrary(path=path, cdll=cdll)


_library: EngineLibrary | None = None


def _shared_library() -> EngineLibrary:
    global _library
    if _library is None:
        _library = load_engine()
    return _library


def _from_struct(cls: type[Any], struct: ctypes.Structure) -> Any:
    return cls(**{f.name: int(getattr(struct, f.name)) for f in fields(cls)})


class Engine:
    """One engine instance: the WQs, engines, interrupts and guest memory of one device."""

    def __init__(self, *, num_wqs: int, num_msix: int,
                 opcodes: Collection[int] = ALL_OPCODES, interrupt_handles: bool = False,
                 library: EngineLibrary | None = None) -> None:
        if not 0 < num_wqs <= MAX_WQS or not 0 < num_msix <= MAX_MSIX:
            raise ValueError(f"engine limits: 1..{MAX_WQS} WQs, 1..{MAX_MSIX} vectors")
        self._lib = library or _shared_library()
        self._c = self._lib.cdll
        config = _EngineConfig(num_wqs=num_wqs, num_msix=num_msix,
                               interrupt_handles=interrupt_handles)
        for opcode in opcodes:
            config.opcap[opcode // 64] |= 1 << (opcode % 64)
        handle = self._c.vdsa_engine_create(ctypes.byref(config))
        if not handle:
            raise EngineError(errno.ENOMEM, "vdsa_engine_create failed")
        self._handle: int | None = int(handle)
        self.num_wqs = num_wqs
        self.num_msix = num_msix
        # Buffers mapped by dma_map, kept alive while the engine may touch them.
        self._buffers: dict[int, tuple[int, object]] = {}

    def close(self) -> None:
        """Stop the workers (they finish the descriptor in hand) and free the engine."""
        if self._handle is not None:
            self._c.vdsa_engine_destroy(self._handle)
            self._handle = None
            self._buffers.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def handle(self) -> int:
        """The ``struct vdsa_engine *``: the private pointer of the context it attaches to."""
        return self._e

    @property
    def _e(self) -> int:
        if self._handle is None:
            raise ValueError("engine is closed")
        return self._handle

    # --- vfio-user ---

    def map_portals(self, bar2_size: int) -> int:
        """BAR2 as a sealed memfd that the engine's poller sweeps; before ``attach_vfu``.
        Returns the memfd, which the engine owns (a client maps it)."""
        return int(self._c.vdsa_engine_map_portals(self._e, bar2_size))

    def portal_sleeps(self) -> int:
        """Times the portal poller slept: its idle cost."""
        return int(self._c.vdsa_engine_portal_sleeps(self._e))

    def stray_descriptors(self) -> int:
        """Descriptors written to the portals of no WQ (past the last WQ's pages): dropped."""
        return int(self._c.vdsa_engine_stray_descriptors(self._e))

    def attach_vfu(self, ctx_pointer: int, bar2_size: int) -> None:
        """Own BAR2 of the libvfio-user context (mappable if ``map_portals`` came first),
        take its DMA maps and unmaps (in C: a vIOMMU guest sends a pair per page) and
        trigger its interrupts."""
        self._c.vdsa_engine_attach_vfu(self._e, ctx_pointer, bar2_size)

    def vfu_attach(self) -> int:
        return int(self._c.vdsa_engine_vfu_attach(self._e))

    def vfu_run(self) -> int:
        return int(self._c.vdsa_engine_vfu_run(self._e))

    def portal_write(self, offset: int, data: bytes) -> None:
        """A BAR2 write, as libvfio-user would pass it to the engine."""
        self._c.vdsa_engine_portal_write(self._e, offset, data, len(data))

    # --- guest memory ---

    def dma_map(self, iova: int, buffer: Any, *, readable: bool = True,
                writable: bool = True) -> None:
        """Map a writable buffer (bytearray, mmap, ctypes array) at ``iova``."""
        length = memoryview(buffer).nbytes
        address = ctypes.addressof((ctypes.c_char * length).from_buffer(buffer))
        self.dma_map_address(iova, length, address, readable=readable, writable=writable)
        self._buffers[iova] = (length, buffer)

    def dma_map_address(self, iova: int, length: int, address: int, *, readable: bool = True,
                        writable: bool = True) -> None:
        """Map ``length`` bytes at host ``address`` (owned by the caller) at ``iova``."""
        prot = (PROT_READ if readable else 0) | (PROT_WRITE if writable else 0)
        self._c.vdsa_engine_dma_map(self._e, iova, length, address, prot)

    def dma_unmap(self, iova: int, length: int) -> None:
        """Unmap; returns once no descriptor in progress can touch the range."""
        self._c.vdsa_engine_dma_unmap(self._e, iova, length)
        self._buffers.pop(iova, None)

    def dma_regions(self) -> list[EngineDmaRegion]:
        """The regions the engine translates, in IOVA order."""
        count = int(self._c.vdsa_engine_dma_regions(self._e, None, 0))
        while True:
            out = (_DmaRegion * count)()
            now = int(self._c.vdsa_engine_dma_regions(self._e, out, count))
            if now <= count:  # else a map came in between: ask again with room for it
                return [EngineDmaRegion(r.iova, r.length, r.prot) for r in out[:now]]
            count = now

    def dma_counters(self) -> DmaCounters:
        out = _DmaCounters()
        self._c.vdsa_engine_get_dma_counters(self._e, ctypes.byref(out))
        result: DmaCounters = _from_struct(DmaCounters, out)
        return result

    # --- WQs ---

    def enable_wq(self, wq: int, settings: WqSettings) -> None:
        config = _WqConfig(size=settings.size, priority=settings.priority,
                           engines=settings.engines,
                           max_transfer_size=settings.max_transfer_size,
                           max_batch_size=settings.max_batch_size)
        self._c.vdsa_engine_wq_enable(self._e, wq, ctypes.byref(config))

    def disable_wq(self, wq: int) -> None:
        self._c.vdsa_engine_wq_disable(self._e, wq)

    def drain_wq(self, wq: int) -> None:
        self._c.vdsa_engine_wq_drain(self._e, wq)

    def abort_wq(self, wq: int) -> None:
        self._c.vdsa_engine_wq_abort(self._e, wq)

    def start_disable(self, wq: int) -> None:
        self._c.vdsa_engine_wq_disable_start(self._e, wq)

    def start_drain(self, wq: int) -> None:
        self._c.vdsa_engine_wq_drain_start(self._e, wq)

    def waiting(self, wq: int) -> bool:
        return bool(self._c.vdsa_engine_wq_waiting(self._e, wq))

    @property
    def command_fd(self) -> int:
        """An eventfd, written when a WQ's started drain or disable is over."""
        return int(self._c.vdsa_engine_command_fd(self._e))

    def reset(self) -> None:
        self._c.vdsa_engine_reset(self._e)

    def counters(self, wq: int) -> WqCounters:
        out = _Counters()
        self._c.vdsa_engine_get_counters(self._e, wq, ctypes.byref(out))
        result: WqCounters = _from_struct(WqCounters, out)
        return result

    def execute(self, wq: int, descriptor: bytes) -> None:
        """Run one descriptor in this thread as WQ ``wq``'s engine would."""
        if len(descriptor) != DESCRIPTOR_SIZE:
            raise ValueError(f"a descriptor is {DESCRIPTOR_SIZE} bytes, not {len(descriptor)}")
        self._c.vdsa_engine_execute(self._e, wq, descriptor)

    # --- interrupts and errors ---

    def set_int_handle(self, handle: int, granted: bool) -> None:
        self._c.vdsa_engine_set_int_handle(self._e, handle, granted)

    def irq_mask(self, start: int, count: int, masked: bool) -> None:
        self._c.vdsa_engine_irq_mask(self._e, start, count, masked)

    def trigger(self, vector: int) -> None:
        """Raise MSI-X ``vector`` (held while masked, dropped if the client wired none)."""
        self._c.vdsa_engine_irq_trigger(self._e, vector)

    def irq_reset(self) -> None:
        self._c.vdsa_engine_irq_reset(self._e)

    def irq_count(self, vector: int) -> int:
        return int(self._c.vdsa_engine_irq_count(self._e, vector))

    @property
    def error_fd(self) -> int:
        """An eventfd, readable while software errors wait to be popped."""
        return int(self._c.vdsa_engine_error_fd(self._e))

    def pop_errors(self) -> list[SoftwareError]:
        found: list[SoftwareError] = []
        record = _SwErr()
        while self._c.vdsa_engine_pop_error(self._e, ctypes.byref(record)):
            found.append(_from_struct(SoftwareError, record))
        return found
