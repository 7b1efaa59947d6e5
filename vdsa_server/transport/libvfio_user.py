"""ctypes binding to libvfio-user's server API (``include/libvfio-user.h``).

This module is a binding, nothing more: it declares the C API, checks the
library at load time, maps errno to exceptions and wraps one ``vfu_ctx_t`` in
:class:`Context`.  It holds no device logic and runs no event loop.

Contracts from the header and the library that every caller must respect:

* libvfio-user is not thread-safe per context.  All calls on one
  :class:`Context` must come from one thread, or be serialised by the caller.
  ``irq_trigger`` is an ``eventfd_write`` on an fd that a ``SET_IRQS`` message
  handled inside ``run()`` may close, so a worker thread that triggers
  interrupts needs its own synchronisation with ``run()``.
* Callbacks run synchronously inside ``run()``, ``attach()``,
  ``device_quiesced()``, DMA transfers and ``close()``, on the calling thread.
* The context is created with ``LIBVFIO_USER_FLAG_ATTACH_NB``: ``attach()`` and
  ``run()`` never wait for a client (but see :meth:`Context.attach`).

libvfio-user exports no version symbol; "this is not currently a stable API or
ABI".  The load-time check is therefore the symbol table below, and the struct
layouts are checked against the header by the test suite.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
import mmap
import os
import syslog
from _ctypes import CFuncPtr
from collections.abc import Callable, Sequence
from ctypes import (
    POINTER,
    c_bool,
    c_char,
    c_char_p,
    c_int,
    c_int64,
    c_size_t,
    c_ssize_t,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec

from vdsa_server.log import get_logger
from vdsa_server.vfio import PciIrq, PciRegion

ENV_LIBRARY = "VDSA_LIBVFIO_USER"

# ---------------------------------------------------------------------------
# Errors


class LibraryError(Exception):
    """libvfio-user cannot be used: missing, not loadable, or the wrong API."""


class LibraryNotFound(LibraryError):
    pass


class LibraryMismatch(LibraryError):
    pass


class VfuError(OSError):
    """A libvfio-user call failed; ``errno`` says why."""


class VfuWouldBlock(VfuError, BlockingIOError):
    """EAGAIN: ``attach()`` has no client to accept yet; wait on the poll fd."""


class VfuBusy(VfuError):
    """EBUSY: the device was asked to quiesce and has not finished."""


class VfuNotConnected(VfuError, ConnectionError):
    """ENOTCONN: the client went away; the context was reset, call ``attach()``."""


class VfuInterrupted(VfuError, InterruptedError):
    """EINTR: a system call inside libvfio-user was interrupted; retry."""


_ERRNO_CLASSES: dict[int, type[VfuError]] = {
    errno.EAGAIN: VfuWouldBlock,
    errno.EBUSY: VfuBusy,
    errno.ENOTCONN: VfuNotConnected,
    errno.EINTR: VfuInterrupted,
}


def error_from_errno(err: int, call: str) -> VfuError:
    cls = _ERRNO_CLASSES.get(err, VfuError)
    return cls(err, f"{call}: {os.strerror(err)}")


# ---------------------------------------------------------------------------
# Constants (values checked against the header by the tests)

_VFU_TRANS_SOCK = 0
_VFU_DEV_TYPE_PCI = 0
_LIBVFIO_USER_FLAG_ATTACH_NB = 1 << 0
_PCI_HEADER_TYPE_NORMAL = 0
PCI_CFG_SPACE_SIZE = 256
PCI_CFG_SPACE_EXP_SIZE = 4096


class PciType(enum.IntEnum):
    CONVENTIONAL = 0
    PCI_X_1 = 1
    PCI_X_2 = 2
    EXPRESS = 3


# libvfio-user's names for VFIO's indices (vfu_setup_region, vfu_setup_device_nr_irqs).
RegionIndex = PciRegion
IrqType = PciIrq


class RegionFlag(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1
    RW = READ | WRITE
    MEM = 1 << 2  # without it the region is an I/O BAR
    ALWAYS_CB = 1 << 3  # config space only: every access goes to the callback


class ResetType(enum.IntEnum):
    DEVICE = 0  # client asked for a device reset; the context stays valid
    LOST_CONN = 1  # client gone; the context is cleaned up after the callback
    PCI_FLR = 2  # function level reset written to config space


class CapFlag(enum.IntFlag):
    EXTENDED = 1 << 0
    CALLBACK = 1 << 1  # accesses go to the config-space region callback
    READONLY = 1 << 2


class CapId(enum.IntEnum):
    """The standard capabilities ``vfu_pci_add_capability`` accepts."""

    PM = 0x01
    VNDR = 0x09
    EXP = 0x10
    MSIX = 0x11


class ExtCapId(enum.IntEnum):
    """The extended capabilities ``vfu_pci_add_capability`` accepts."""

    DSN = 0x03
    VNDR = 0x0B


# ---------------------------------------------------------------------------
# Structures


class Iovec(ctypes.Structure):
    _fields_ = [("iov_base", c_void_p), ("iov_len", c_size_t)]


class DmaInfo(ctypes.Structure):
    """``vfu_dma_info_t``."""

    _fields_ = [
        ("iova", Iovec),
        ("vaddr", c_void_p),
        ("mapping", Iovec),
        ("page_size", c_size_t),
        ("prot", c_uint32),
    ]


class CapHdr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("id", c_uint8), ("next", c_uint8)]


class Mxc(ctypes.Structure):
    """MSI-X Message Control."""

    _pack_ = 1
    _fields_ = [
        ("ts", c_uint16, 11),  # table size - 1
        ("reserved", c_uint16, 3),
        ("fm", c_uint16, 1),
        ("mxe", c_uint16, 1),
    ]


class Mtab(ctypes.Structure):
    """MSI-X Table Offset/BIR; ``to`` is the byte offset >> 3."""

    _pack_ = 1
    _fields_ = [("tbir", c_uint32, 3), ("to", c_uint32, 29)]


class Mpba(ctypes.Structure):
    """MSI-X PBA Offset/BIR; ``pbao`` is the byte offset >> 3."""

    _pack_ = 1
    _fields_ = [("pbir", c_uint32, 3), ("pbao", c_uint32, 29)]


class MsixCap(ctypes.Structure):
    """``struct msixcap``; libvfio-user handles its config accesses itself."""

    _pack_ = 1
    _fields_ = [("hdr", CapHdr), ("mxc", Mxc), ("mtab", Mtab), ("mpba", Mpba)]


class PxCaps(ctypes.Structure):
    """PCI Express Capabilities register."""

    _pack_ = 1
    _fields_ = [
        ("ver", c_uint16, 4),
        ("dpt", c_uint16, 4),
        ("si", c_uint16, 1),
        ("imn", c_uint16, 5),
        ("res1", c_uint16, 2),
    ]


class PxDCap(ctypes.Structure):
    """PCI Express Device Capabilities register."""

    _pack_ = 1
    _fields_ = [
        ("mps", c_uint32, 3),
        ("pfs", c_uint32, 2),
        ("etfs", c_uint32, 1),
        ("l0sl", c_uint32, 3),
        ("l1l", c_uint32, 3),
        ("res1", c_uint32, 3),
        ("rer", c_uint32, 1),
        ("res2", c_uint32, 2),
        ("csplv", c_uint32, 8),
        ("cspls", c_uint32, 2),
        ("flrc", c_uint32, 1),
        ("res3", c_uint32, 3),
    ]


class PxDCap2(ctypes.Structure):
    """PCI Express Device Capabilities 2 register."""

    _pack_ = 1
    _fields_ = [
        ("ctrs", c_uint32, 4),
        ("ctds", c_uint32, 1),
        ("arifs", c_uint32, 1),
        ("aors", c_uint32, 1),
        ("aocs32", c_uint32, 1),
        ("aocs64", c_uint32, 1),
        ("ccs128", c_uint32, 1),
        ("nprpr", c_uint32, 1),
        ("ltrs", c_uint32, 1),
        ("tphcs", c_uint32, 2),
        ("obffs", c_uint32, 2),
        ("effs", c_uint32, 1),
        ("eetps", c_uint32, 1),
        ("meetp", c_uint32, 2),
        ("res1", c_uint32, 8),
    ]


class PxCap(ctypes.Structure):
    """``struct pxcap``: the PCI Express capability as libvfio-user lays it out
    (registers the header leaves opaque are plain integers here too)."""

    _pack_ = 1
    _fields_ = [
        ("hdr", CapHdr),
        ("pxcaps", PxCaps),
        ("pxdcap", PxDCap),
        ("pxdc", c_uint16),
        ("pxds", c_uint16),
        ("pxlcap", c_uint32),
        ("pxlc", c_uint16),
        ("pxls", c_uint16),
        ("pxscap", c_uint32),
        ("pxsc", c_uint16),
        ("pxss", c_uint16),
        ("pxrc", c_uint16),
        ("pxrcap", c_uint16),
        ("pxrs", c_uint32),
        ("pxdcap2", PxDCap2),
        ("pxdc2", c_uint16),
        ("pxds2", c_uint16),
        ("pxlcap2", c_uint32),
        ("pxlc2", c_uint16),
        ("pxls2", c_uint16),
        ("pxscap2", c_uint32),
        ("pxsc2", c_uint16),
        ("pxss2", c_uint16),
    ]


assert ctypes.sizeof(Iovec) == 16
assert ctypes.sizeof(DmaInfo) == 56
assert ctypes.sizeof(CapHdr) == 2
assert ctypes.sizeof(Mxc) == 2
assert ctypes.sizeof(Mtab) == 4
assert ctypes.sizeof(Mpba) == 4
assert ctypes.sizeof(MsixCap) == 12  # PCI_CAP_MSIX_SIZEOF
assert ctypes.sizeof(PxCaps) == 2
assert ctypes.sizeof(PxDCap) == 4
assert ctypes.sizeof(PxDCap2) == 4
assert ctypes.sizeof(PxCap) == 0x3C  # VFIO_USER_PCI_CAP_EXP_SIZEOF

# ---------------------------------------------------------------------------
# Callback types.  use_errno=True makes ctypes.set_errno() inside a callback
# become the C errno that libvfio-user reads after the callback returns.

LogFn = ctypes.CFUNCTYPE(None, c_void_p, c_int, c_char_p, use_errno=True)
RegionAccessFn = ctypes.CFUNCTYPE(
    c_ssize_t,
    c_void_p,  # vfu_ctx
    c_void_p,  # buf
    c_size_t,  # count
    c_int64,  # loff_t offset
    c_bool,  # is_write
    use_errno=True,
)
DmaFn = ctypes.CFUNCTYPE(None, c_void_p, POINTER(DmaInfo), use_errno=True)
IrqStateFn = ctypes.CFUNCTYPE(None, c_void_p, c_uint32, c_uint32, c_bool, use_errno=True)
ResetFn = ctypes.CFUNCTYPE(c_int, c_void_p, c_int, use_errno=True)
QuiesceFn = ctypes.CFUNCTYPE(c_int, c_void_p, use_errno=True)

# ---------------------------------------------------------------------------
# Signature table, applied in one loop by load_library().


def check_status(result: int, func: Any, _args: tuple[Any, ...]) -> int:
    """int and ssize_t calls: negative means failure with errno set."""
    if result < 0:
        raise error_from_errno(ctypes.get_errno(), func.__name__)
    return result


def _check_pointer(result: int | None, func: Any, _args: tuple[Any, ...]) -> int:
    """Pointer-returning calls: NULL means failure with errno set."""
    if not result:
        raise error_from_errno(ctypes.get_errno(), func.__name__)
    return result


def _check_sgl_count(result: int, func: Any, _args: tuple[Any, ...]) -> int:
    """vfu_addr_to_sgl: -1 is failure; below -1 encodes how many entries it
    needed (-x - 1), which the caller handles."""
    if result == -1:
        raise error_from_errno(ctypes.get_errno(), func.__name__)
    return result


_Errcheck = Callable[[Any, Any, tuple[Any, ...]], Any]

_CTX = c_void_p
_SIGNATURES: dict[str, tuple[Any, list[Any], _Errcheck | None]] = {
    # name: (restype, argtypes, errcheck)
    "dma_sg_size": (c_size_t, [], None),
    "vfu_create_ctx": (
        c_void_p,
        [c_int, c_char_p, c_int, c_void_p, c_int],
        _check_pointer,
    ),
    "vfu_destroy_ctx": (None, [_CTX], None),
    "vfu_realize_ctx": (c_int, [_CTX], check_status),
    "vfu_attach_ctx": (c_int, [_CTX], check_status),
    "vfu_run_ctx": (c_int, [_CTX], check_status),
    "vfu_get_poll_fd": (c_int, [_CTX], check_status),
    "vfu_get_private": (c_void_p, [_CTX], None),
    "vfu_setup_log": (c_int, [_CTX, LogFn, c_int], check_status),
    "vfu_pci_init": (c_int, [_CTX, c_int, c_int, c_int], check_status),
    "vfu_pci_set_id": (None, [_CTX, c_uint16, c_uint16, c_uint16, c_uint16], None),
    "vfu_pci_set_class": (None, [_CTX, c_uint8, c_uint8, c_uint8], None),
    "vfu_pci_get_config_space": (c_void_p, [_CTX], _check_pointer),
    "vfu_pci_add_capability": (
        c_ssize_t,
        [_CTX, c_size_t, c_int, c_void_p],
        check_status,
    ),
    # Returns 0 when not found, with errno set; Context.find_capability checks.
    "vfu_pci_find_capability": (c_size_t, [_CTX, c_bool, c_int], None),
    "vfu_setup_region": (
        c_int,
        [_CTX, c_int, c_size_t, RegionAccessFn, c_int, POINTER(Iovec), c_uint32, c_int, c_uint64],
        check_status,
    ),
    "vfu_setup_device_nr_irqs": (c_int, [_CTX, c_int, c_uint32], check_status),
    "vfu_setup_irq_state_callback": (c_int, [_CTX, c_int, IrqStateFn], check_status),
    "vfu_irq_trigger": (c_int, [_CTX, c_uint32], check_status),
    "vfu_setup_device_dma": (c_int, [_CTX, DmaFn, DmaFn], check_status),
    "vfu_addr_to_sgl": (
        c_int,
        [_CTX, c_void_p, c_size_t, c_void_p, c_size_t, c_int],
        _check_sgl_count,
    ),
    "vfu_sgl_read": (c_int, [_CTX, c_void_p, c_size_t, c_void_p], check_status),
    "vfu_sgl_write": (c_int, [_CTX, c_void_p, c_size_t, c_void_p], check_status),
    "vfu_sgl_get": (
        c_int,
        [_CTX, c_void_p, POINTER(Iovec), c_size_t, c_int],
        check_status,
    ),
    "vfu_sgl_put": (None, [_CTX, c_void_p, POINTER(Iovec), c_size_t], None),
    "vfu_setup_device_reset_cb": (c_int, [_CTX, ResetFn], check_status),
    "vfu_setup_device_quiesce_cb": (None, [_CTX, QuiesceFn], None),
    "vfu_device_quiesced": (c_int, [_CTX, c_int], check_status),
}


# ---------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class LibVfioUser:
    """A loaded libvfio-user whose every declared symbol is present."""

    path: Path
    cdll: ctypes.CDLL
    sg_size: int  # sizeof(dma_sg_t), opaque to callers


def _default_library_path() -> tuple[Path, str]:
    """The library to load and where that choice came from."""
    explicit = os.environ.get(ENV_LIBRARY)
    if explicit:
        return Path(explicit), f"${ENV_LIBRARY}"
    from vdsa_server.builds.libvfio_user_build import libvfio_user_artifact

    return libvfio_user_artifact().path / "lib" / "libvfio-user.so.0", "the build cache"


def declare_signatures(
    cdll: ctypes.CDLL, signatures: dict[str, tuple[Any, list[Any], Callable[..., int] | None]]
) -> None:
    """Set each function's restype, argtypes and errcheck from ``signatures``."""
    for name, (restype, argtypes, errcheck) in signatures.items():
        fn = getattr(cdll, name)
        fn.restype = restype
        fn.argtypes = argtypes
        if errcheck is not None:
            fn.errcheck = errcheck


def load_library(path: Path | None = None) -> LibVfioUser:
    """Load libvfio-user from ``path``, else ``$VDSA_LIBVFIO_USER``, else the
    build cache; declare every signature.  Fails here, not at first use."""
    source = "the path argument"
    if path is None:
        path, source = _default_library_path()
    if not path.is_file():
        raise LibraryNotFound(
            f"libvfio-user not found at {path} (from {source}); run `vdsa build libvfio-user` "
            f"or set {ENV_LIBRARY} to a built libvfio-user.so.0"
        )
    try:
        cdll = ctypes.CDLL(str(path), use_errno=True)
    except OSError as exc:
        raise LibraryMismatch(f"{path} cannot be loaded: {exc}") from exc
    missing = sorted(name for name in _SIGNATURES if not hasattr(cdll, name))
    if missing:
        raise LibraryMismatch(
            f"{path} is not the libvfio-user this binding expects; missing symbols: "
            + ", ".join(missing)
        )
    declare_signatures(cdll, _SIGNATURES)
    return LibVfioUser(path=path, cdll=cdll, sg_size=int(cdll.dma_sg_size()))


# ---------------------------------------------------------------------------
# Context

RegionAccess = Callable[[int, memoryview, bool], None]
"""``(offset, buf, is_write)``: fill ``buf`` on a read, consume it on a write.
``buf`` is C memory valid only during the call; raise ``OSError(errno, ...)``
to fail the access with that errno."""

IrqStateCallback = Callable[[int, int, bool], None]
"""``(start, count, masked)``: the client masked or unmasked vectors."""

ResetCallback = Callable[[ResetType], None]

QuiesceCallback = Callable[[], bool]
"""True: quiesced now.  False: still quiescing (the binding answers EBUSY);
call :meth:`Context.device_quiesced` when done."""


# Slots: the server keeps one for each region, and a vIOMMU guest has hundreds of thousands.
@dataclass(frozen=True, slots=True)
class DmaRegion:
    """A guest DMA region from ``vfu_dma_info_t``.  ``vaddr`` (and the other
    mapping fields) are set only when the client passed an fd for it, i.e. the
    guest RAM is shared (``share=on``)."""

    iova: int
    length: int
    vaddr: int | None
    mapping_base: int | None
    mapping_length: int
    page_size: int
    prot: int

    @classmethod
    def from_info(cls, info: DmaInfo) -> DmaRegion:
        return cls(
            iova=info.iova.iov_base or 0,
            length=info.iova.iov_len,
            vaddr=info.vaddr,
            mapping_base=info.mapping.iov_base,
            mapping_length=info.mapping.iov_len,
            page_size=info.page_size,
            prot=info.prot,
        )


DmaCallback = Callable[[DmaRegion], None]


class Sgl:
    """Scatter/gather entries for one guest range, from
    :meth:`Context.addr_to_sgl`.  The entries are opaque ``dma_sg_t``."""

    def __init__(self, entries: ctypes.Array[c_char], count: int, length: int) -> None:
        self.entries = entries
        self.count = count
        self.length = length
        self.iov: ctypes.Array[Iovec] | None = None  # set between sgl_get and sgl_put


_P = ParamSpec("_P")


def _byte_view(address: int, size: int) -> memoryview:
    """Writable unsigned-byte view of C memory (cast: ctypes exports "<B",
    which memoryview cannot slice-assign)."""
    return memoryview((c_uint8 * size).from_address(address)).cast("B")


class Context:
    """One libvfio-user PCI device context on a UNIX socket, non-blocking.

    Create it, set the device up (``pci_init``, ``pci_set_id``, capabilities,
    regions, IRQs, DMA, reset and quiesce callbacks), ``realize()``, then drive
    it from the event loop with ``get_poll_fd()``, ``attach()`` and ``run()``.

    Every Python callback given to the context is kept alive until ``close()``
    has destroyed the C context.  A callback never lets an exception reach C:
    an ``Exception`` is logged (``vfu.callback.exception``) and turned into the
    failure value libvfio-user expects (-1 with errno: the ``OSError``'s errno,
    else EIO); a ``BaseException`` such as ``KeyboardInterrupt`` is also answered
    with -1 and is re-raised once the C call that ran the callback returns.

    Not thread-safe: see the module docstring.
    """

    def __init__(
        self, lib: LibVfioUser, socket_path: Path, *, log_level: int = syslog.LOG_INFO,
        private: int | None = None,
    ) -> None:
        """``vfu_create_ctx``: binds and listens on ``socket_path`` at once
        (EADDRINUSE if it exists).  ``log_level`` is a syslog level; library
        messages up to it are logged as ``vfu.log`` events.  ``private`` is the
        context's private pointer, for native callbacks (``vfu_get_private``)."""
        self._lib = lib
        self._c = lib.cdll
        self.socket_path = socket_path
        self._log = get_logger(socket=str(socket_path))
        self._callbacks: dict[str, CFuncPtr] = {}
        self._deferred: BaseException | None = None
        self._config_space: memoryview | None = None
        self._handle: int | None = int(
            self._c.vfu_create_ctx(
                _VFU_TRANS_SOCK,
                os.fsencode(socket_path),
                _LIBVFIO_USER_FLAG_ATTACH_NB,
                private,
                _VFU_DEV_TYPE_PCI,
            )
        )
        try:
            log_fn = LogFn(self._void_guard("log", self._on_log))
            self._call(self._c.vfu_setup_log, self._ctx, log_fn, log_level)
            self._keep("log", log_fn)
        except BaseException:
            self.close()
            raise

    # -- lifetime ---------------------------------------------------------

    def __enter__(self) -> Context:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._handle is None

    def close(self) -> None:
        """``vfu_destroy_ctx``, then drop the callbacks and remove the socket
        file (libvfio-user closes the socket but leaves the file).  Idempotent.

        Per the header, the device must already be quiesced: the quiesce
        callback is not called, but the DMA-unregister and reset
        (``LOST_CONN``) callbacks may be, during this call.  Region fds passed
        to ``setup_region`` stay open: they belong to the caller.
        """
        handle, self._handle = self._handle, None
        if handle is None:
            return
        self._config_space = None
        try:
            self._call(self._c.vfu_destroy_ctx, handle)
        finally:
            self._callbacks.clear()
            self.socket_path.unlink(missing_ok=True)

    # -- transport ----------------------------------------------------------

    def realize(self) -> None:
        """``vfu_realize_ctx``: finalise the device; required before ``attach()``.
        Set IRQ counts and regions before: realize sizes the IRQ table and
        writes the BAR types into config space from them."""
        self._call(self._c.vfu_realize_ctx, self._ctx)

    def attach(self) -> None:
        """``vfu_attach_ctx``: accept a client.

        Raises :class:`VfuWouldBlock` (EAGAIN) while no client is connecting:
        wait for ``get_poll_fd()`` to become readable and retry.  After success
        the poll fd is a different fd (the connection): fetch it again.  Note
        that once a client is accepted, the version negotiation reads from it
        blocking; a vfio-user client sends its version first, so this is short.
        """
        self._call(self._c.vfu_attach_ctx, self._ctx)

    def attach_via(self, attach_ctx: Callable[[], int]) -> None:
        """:meth:`attach`, through a C wrapper that calls ``vfu_attach_ctx`` on
        this context (the descriptor engine's, which holds its interrupts back
        meanwhile); ``attach_ctx`` raises like the binding's own calls."""
        self._call(attach_ctx)

    def get_poll_fd(self) -> int:
        """``vfu_get_poll_fd``: the fd to wait on for readability.  It changes
        after a successful ``attach()`` and after ``run()`` raises
        :class:`VfuNotConnected`; call this again in both cases."""
        return int(self._call(self._c.vfu_get_poll_fd, self._ctx))

    def run(self) -> int:
        """``vfu_run_ctx``: handle at most one pending request; return how many
        were handled (0 when nothing was waiting).  Callbacks run inside.

        Raises :class:`VfuNotConnected` (ENOTCONN) when the client closed the
        connection (the context has been reset: call ``attach()`` again), and
        :class:`VfuBusy` (EBUSY) while the device is quiescing (again on every
        call until ``device_quiesced()``).  Other errnos are possible.
        """
        return int(self._call(self._c.vfu_run_ctx, self._ctx))

    def run_via(self, run_ctx: Callable[[], int]) -> int:
        """:meth:`run`, through a C wrapper that calls ``vfu_run_ctx`` on this
        context (see :meth:`attach_via`)."""
        return int(self._call(run_ctx))

    @property
    def pointer(self) -> int:
        """The ``vfu_ctx_t *``, for native code that registers its own callbacks."""
        return self._ctx

    # -- PCI configuration space -------------------------------------------

    def pci_init(self, pci_type: PciType = PciType.EXPRESS) -> None:
        """``vfu_pci_init`` with header type 0 (the only one supported); once
        per context.  Allocates config space: 4096 bytes for PCI Express and
        PCI-X mode 2, else 256."""
        self._call(self._c.vfu_pci_init, self._ctx, pci_type, _PCI_HEADER_TYPE_NORMAL, 0)
        size = (
            PCI_CFG_SPACE_EXP_SIZE
            if pci_type in (PciType.EXPRESS, PciType.PCI_X_2)
            else PCI_CFG_SPACE_SIZE
        )
        address = int(self._call(self._c.vfu_pci_get_config_space, self._ctx))
        self._config_space = _byte_view(address, size)

    @property
    def config_space(self) -> memoryview:
        """The device's config space as writable bytes
        (``vfu_pci_get_config_space``).  libvfio-user serves the standard
        header and its known capabilities from this memory.  Valid until
        ``close()``; do not keep it beyond."""
        if self._config_space is None:
            raise RuntimeError("config space exists only after pci_init()")
        return self._config_space

    def pci_set_id(
        self, vendor: int, device: int, subsystem_vendor: int = 0, subsystem: int = 0
    ) -> None:
        """``vfu_pci_set_id``: mandatory after ``pci_init``."""
        self._require_pci("vfu_pci_set_id")
        self._call(self._c.vfu_pci_set_id, self._ctx, vendor, device, subsystem_vendor, subsystem)

    def pci_set_class(self, base: int, sub: int, prog_if: int) -> None:
        """``vfu_pci_set_class``; the class code is zero otherwise."""
        self._require_pci("vfu_pci_set_class")
        self._call(self._c.vfu_pci_set_class, self._ctx, base, sub, prog_if)

    def add_capability(self, cap: ctypes.Structure | bytes, *, pos: int = 0, flags: int = 0) -> int:
        """``vfu_pci_add_capability``: copy ``cap`` (starting with its header,
        ``next`` ignored) into config space at ``pos`` (0: anywhere) and link
        it; return its offset.  Only the ids in :class:`CapId` and
        :class:`ExtCapId` are accepted (ENOTSUP otherwise); PM, EXP and MSIX are
        then handled by libvfio-user itself.  ``CapFlag.CALLBACK`` needs a
        config-space region callback set up first."""
        self._require_pci("vfu_pci_add_capability")
        data = ctypes.create_string_buffer(bytes(cap))
        return int(self._call(self._c.vfu_pci_add_capability, self._ctx, pos, flags, data))

    def find_capability(self, cap_id: int, *, extended: bool = False) -> int | None:
        """``vfu_pci_find_capability``: the offset of the first capability
        with this id, or None."""
        self._require_pci("vfu_pci_find_capability")
        ctypes.set_errno(0)
        offset = int(self._call(self._c.vfu_pci_find_capability, self._ctx, extended, cap_id))
        if offset:
            return offset
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            return None
        raise error_from_errno(err, "vfu_pci_find_capability")

    # -- regions --------------------------------------------------------------

    def setup_region(
        self,
        index: RegionIndex,
        size: int,
        flags: RegionFlag,
        access: RegionAccess | None = None,
        *,
        mmap_areas: Sequence[tuple[int, int]] = (),
        fd: int = -1,
        offset: int = 0,
    ) -> None:
        """``vfu_setup_region``.

        ``flags`` needs READ and/or WRITE; a memory BAR needs ``MEM``, or the
        client maps it as I/O ports.  ``access`` handles client
        ``REGION_READ``/``REGION_WRITE`` messages.  With an ``fd``, the region
        (or only the ``(offset, length)`` ``mmap_areas`` within it) is
        mappable by the client, whose accesses there reach no callback; the
        client can in fact map any part of the fd.  The fd stays owned by the
        caller.  For the config-space region the size is ignored, the standard
        header and known capabilities never reach ``access``, and without
        ``access`` other reads are memcpy and writes fail.
        """
        slot = f"region.{RegionIndex(index).name}"
        c_access = RegionAccessFn()  # NULL: ctypes refuses None for a CFUNCTYPE argument
        if access is not None:
            c_access = RegionAccessFn(self._errno_guard(slot, self._region_access(access)))
        areas = None
        if mmap_areas:
            areas = (Iovec * len(mmap_areas))(*(Iovec(base, length) for base, length in mmap_areas))
        # libvfio-user copies the areas; only the callback must outlive this call.
        self._call(
            self._c.vfu_setup_region,
            self._ctx,
            index,
            size,
            c_access,
            flags,
            areas,
            len(mmap_areas),
            fd,
            offset,
        )
        self._keep(slot, c_access)

    @staticmethod
    def _region_access(access: RegionAccess) -> Callable[[int | None, int, int, int, bool], int]:
        def body(_ctx: int | None, buf: int, count: int, offset: int, is_write: bool) -> int:
            view = _byte_view(buf, count)
            try:
                access(offset, view, is_write)
            finally:
                view.release()  # the C buffer dies when we return
            return count

        return body

    # -- interrupts -----------------------------------------------------------

    def set_irq_count(self, irq_type: IrqType, count: int) -> None:
        """``vfu_setup_device_nr_irqs``; by default there is one ERR and one REQ
        IRQ and no others.  Must precede ``realize()``."""
        self._call(self._c.vfu_setup_device_nr_irqs, self._ctx, irq_type, count)

    def set_irq_state_callback(self, irq_type: IrqType, callback: IrqStateCallback) -> None:
        """``vfu_setup_irq_state_callback``: told when the client masks or
        unmasks vectors of this type."""

        def body(_ctx: int | None, start: int, count: int, mask: bool) -> None:
            callback(start, count, mask)

        slot = f"irq_state.{IrqType(irq_type).name}"
        c_fn = IrqStateFn(self._void_guard(slot, body))
        self._call(self._c.vfu_setup_irq_state_callback, self._ctx, irq_type, c_fn)
        self._keep(slot, c_fn)

    def irq_trigger(self, subindex: int) -> None:
        """``vfu_irq_trigger``: signal vector ``subindex`` of whichever IRQ type
        the client enabled (INTx or MSI/MSI-X).  ENOENT if the client has not
        given an eventfd for it.  It writes an eventfd that ``run()`` may close
        while handling SET_IRQS: do not call it from another thread unguarded."""
        self._call(self._c.vfu_irq_trigger, self._ctx, subindex)

    # -- DMA ------------------------------------------------------------------

    def setup_dma(self, register: DmaCallback | None, unregister: DmaCallback | None) -> None:
        """``vfu_setup_device_dma``: without it guest memory is unreachable.

        Both callbacks run only while the device is quiesced.  ``unregister``
        must drop every reference into the region before returning; it is
        required for ``sgl_get`` (direct mappings).  Without client fds (guest
        RAM not shared) DMA goes through ``sgl_read``/``sgl_write`` messages.
        """
        c_register = self._dma_fn("dma_register", register)
        c_unregister = self._dma_fn("dma_unregister", unregister)
        self._call(self._c.vfu_setup_device_dma, self._ctx, c_register, c_unregister)
        self._keep("dma_register", c_register)
        self._keep("dma_unregister", c_unregister)

    def _dma_fn(self, name: str, callback: DmaCallback | None) -> CFuncPtr:
        if callback is None:
            return DmaFn()  # NULL

        def body(_ctx: int | None, info: ctypes._Pointer[DmaInfo]) -> None:
            callback(DmaRegion.from_info(info.contents))

        return DmaFn(self._void_guard(name, body))

    def addr_to_sgl(
        self,
        dma_addr: int,
        length: int,
        prot: int = mmap.PROT_READ | mmap.PROT_WRITE,
        max_segments: int = 1,
    ) -> Sgl:
        """``vfu_addr_to_sgl``: translate a guest range.  ENOENT if it is not
        in a registered DMA region, EACCES on a protection mismatch.  A range
        spanning DMA regions needs several entries; the array grows to fit.
        A quiesced device must not call this except from a callback."""
        while True:
            entries = ctypes.create_string_buffer(max_segments * self._lib.sg_size)
            count = int(
                self._call(
                    self._c.vfu_addr_to_sgl,
                    self._ctx,
                    dma_addr,
                    length,
                    entries,
                    max_segments,
                    prot,
                )
            )
            if count >= 0:
                return Sgl(entries, count, length)
            max_segments = -count - 1

    def sgl_read(self, sgl: Sgl) -> bytes:
        """``vfu_sgl_read``: copy guest memory via DMA_READ messages.  Blocks
        for the client's reply; one entry only (ENOTSUP otherwise).  Never call
        it while a quiesce is pending: libvfio-user asserts."""
        data = ctypes.create_string_buffer(sgl.length)
        self._call(self._c.vfu_sgl_read, self._ctx, sgl.entries, sgl.count, data)
        return data.raw

    def sgl_write(self, sgl: Sgl, data: bytes) -> None:
        """``vfu_sgl_write``: the DMA_WRITE counterpart of ``sgl_read``; same
        constraints.  ``data`` must be exactly the range's length."""
        if len(data) != sgl.length:
            raise ValueError(f"sgl covers {sgl.length} bytes, got {len(data)}")
        buffer = ctypes.create_string_buffer(data, len(data))
        self._call(self._c.vfu_sgl_write, self._ctx, sgl.entries, sgl.count, buffer)

    def sgl_get(self, sgl: Sgl) -> list[memoryview]:
        """``vfu_sgl_get``: map the entries into this process; one writable
        view per entry.  Needs an unregister callback and client fds.  The views
        are valid until ``sgl_put`` or the region's unregister callback."""
        iov = (Iovec * sgl.count)()
        self._call(self._c.vfu_sgl_get, self._ctx, sgl.entries, iov, sgl.count, 0)
        sgl.iov = iov
        return [_byte_view(entry.iov_base, entry.iov_len) for entry in iov]

    def sgl_put(self, sgl: Sgl) -> None:
        """``vfu_sgl_put``: release a ``sgl_get`` mapping (marks it dirty)."""
        if sgl.iov is None:
            raise ValueError("sgl_put without sgl_get")
        self._call(self._c.vfu_sgl_put, self._ctx, sgl.entries, sgl.iov, sgl.count)
        sgl.iov = None

    # -- reset and quiesce -----------------------------------------------------

    def set_reset_callback(self, callback: ResetCallback) -> None:
        """``vfu_setup_device_reset_cb``: the callback must complete or cancel
        all use of IRQs and guest memory before returning.  It runs only while
        the device is quiesced."""

        def body(_ctx: int | None, reset_type: int) -> int:
            callback(ResetType(reset_type))
            return 0

        c_fn = ResetFn(self._errno_guard("reset", body))
        self._call(self._c.vfu_setup_device_reset_cb, self._ctx, c_fn)
        self._keep("reset", c_fn)

    def set_quiesce_callback(self, callback: QuiesceCallback) -> None:
        """``vfu_setup_device_quiesce_cb``.

        libvfio-user asks the device to quiesce before DMA map/unmap, device
        reset (including FLR) and on disconnect.  Return True if quiesced at
        once; False to finish later: ``run()`` then raises :class:`VfuBusy`
        until ``device_quiesced()`` is called.  A quiesced device must not call
        ``addr_to_sgl``/``sgl_*`` except from a callback; it may be given DMA
        register/unregister and reset callbacks meanwhile.  It is unquiesced
        when the ``run()`` or ``device_quiesced()`` call returns.
        """

        def body(_ctx: int | None) -> int:
            if callback():
                return 0
            ctypes.set_errno(errno.EBUSY)
            return -1

        c_fn = QuiesceFn(self._errno_guard("quiesce", body))
        self._call(self._c.vfu_setup_device_quiesce_cb, self._ctx, c_fn)
        self._keep("quiesce", c_fn)

    def device_quiesced(self, error: int = 0) -> None:
        """``vfu_device_quiesced``: finish a quiesce the callback deferred.
        ``error`` 0 completes the pending operation (its callbacks run inside
        this call); an errno fails it and the device is reset.  EINVAL if no
        quiesce is pending."""
        self._call(self._c.vfu_device_quiesced, self._ctx, error)

    # -- plumbing ---------------------------------------------------------------

    @property
    def _ctx(self) -> int:
        if self._handle is None:
            raise ValueError("libvfio-user context is closed")
        return self._handle

    def _require_pci(self, call: str) -> None:
        # These calls dereference the config space without checking it exists.
        if self._config_space is None:
            raise RuntimeError(f"{call} needs pci_init() first")

    def _keep(self, slot: str, c_fn: CFuncPtr) -> None:
        """Hold ``c_fn`` for as long as C may call it (the slot's last setter wins)."""
        if c_fn:
            self._callbacks[slot] = c_fn
        else:
            self._callbacks.pop(slot, None)

    def _call(self, fn: Any, *args: object) -> Any:
        """Call into C, then re-raise a BaseException a callback deferred."""
        try:
            return fn(*args)
        finally:
            deferred, self._deferred = self._deferred, None
            if deferred is not None:
                raise deferred

    def _absorb(self, callback: str, exc: BaseException) -> int:
        """Log a callback's exception; return the errno to report to C."""
        if isinstance(exc, OSError) and exc.errno:
            err = exc.errno
        elif isinstance(exc, Exception):
            err = errno.EIO
        else:
            err = errno.ECANCELED
            if self._deferred is None:
                self._deferred = exc
        self._log.error("vfu.callback.exception", callback=callback, errno=err, exc_info=exc)
        return err

    def _errno_guard(self, callback: str, body: Callable[_P, int]) -> Callable[_P, int]:
        """For callbacks whose failure is -1 with errno set."""

        def guarded(*args: _P.args, **kwargs: _P.kwargs) -> int:
            try:
                return body(*args, **kwargs)
            except BaseException as exc:  # nothing may unwind into C
                ctypes.set_errno(self._absorb(callback, exc))
                return -1

        return guarded

    def _void_guard(self, callback: str, body: Callable[_P, None]) -> Callable[_P, None]:
        """For callbacks that cannot report failure."""

        def guarded(*args: _P.args, **kwargs: _P.kwargs) -> None:
            try:
                body(*args, **kwargs)
            except BaseException as exc:  # nothing may unwind into C
                self._absorb(callback, exc)

        return guarded

    def _on_log(self, _ctx: int | None, level: int, message: bytes | None) -> None:
        text = message.decode(errors="replace") if message else ""
        py_level = _SYSLOG_TO_LOGGING.get(level, logging.DEBUG)
        self._log.log(py_level, "vfu.log", msg=text, syslog_level=level)


_SYSLOG_TO_LOGGING = {
    syslog.LOG_EMERG: logging.CRITICAL,
    syslog.LOG_ALERT: logging.CRITICAL,
    syslog.LOG_CRIT: logging.CRITICAL,
    syslog.LOG_ERR: logging.ERROR,
    syslog.LOG_WARNING: logging.WARNING,
    syslog.LOG_NOTICE: logging.INFO,
    syslog.LOG_INFO: logging.INFO,
    syslog.LOG_DEBUG: logging.DEBUG,
}
