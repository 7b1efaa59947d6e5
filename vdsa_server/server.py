"""The vfio-user server: one libvfio-user context exposing one DSA function,
driven by trio, serving one client at a time and outliving it.

Shape (as QEMU's own libvfio-user server): wait for the context's poll fd,
run the context until it has nothing left, re-attach when the client goes.

libvfio-user reads a connecting client's version handshake, and each message
body after its header, with blocking ``recv`` calls, so an untrusted peer that
stops half-way could stall the server forever.  Defences, each bounded by
``PEER_IO_TIMEOUT``:

- ``attach`` (accept + handshake) runs in a worker thread while the trio task
  that owns the context waits for it, so the context is still used by one
  thread at a time; if the handshake outlives the timeout, a watchdog shuts
  the new connection down, which ends the blocked ``recv`` and fails the
  attach.  (The watchdog reads the poll fd while the worker runs: a read of
  one integer, the only concurrent use of the context.)
- once attached, the connection gets receive and send timeouts, so a message
  whose body never comes is answered with an error reply instead of blocking
  ``run``.  (AF_UNIX sockets
  do not inherit these from the listening socket, unlike TCP ones.)

The descriptor path is native: the engine (:mod:`vdsa_server.engine`) registers
BAR2 and the DMA callbacks itself (so a vIOMMU guest's map and unmap of every page
cost no Python), executes descriptors on its own threads and triggers their
interrupts; ``attach`` and ``run`` go through its wrappers so that interrupts it
raises meanwhile wait until libvfio-user is done with the eventfds.  Python
configures it from the device model, forwards MSI-X masks, and turns the software
errors it reports into SWERR.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path

import trio

from vdsa_server.device.config import DeviceConfig, PortalMode
from vdsa_server.device.dsa import DsaDevice
from vdsa_server.device.pci import (
    PCI_CLASS_BASE_SYSTEM_PERIPHERAL,
    PCI_COMMAND_MEMORY,
    PCI_DEVICE_ID_INTEL_DSA_SPR0,
    PCI_EXP_CAP_VERSION,
    PCI_EXP_TYPE_RC_END,
    PCI_PROG_IF_NONE,
    PCI_SUBCLASS_OTHER,
    PCI_VENDOR_ID_INTEL,
    REVISION_ID,
    Bar,
    BarSpec,
    MsixSpec,
)
from vdsa_server.engine import Engine
from vdsa_server.log import get_logger
from vdsa_server.transport.access import SocketAccess, peer_credentials, private_umask
from vdsa_server.transport.libvfio_user import (
    CapHdr,
    CapId,
    Context,
    IrqType,
    LibVfioUser,
    MsixCap,
    PciType,
    PxCap,
    RegionFlag,
    RegionIndex,
    ResetType,
    VfuError,
    VfuInterrupted,
    VfuNotConnected,
    VfuWouldBlock,
    load_library,
)
from vdsa_server.transport.socket_path import claim_socket_path

# Logged once the device is set up and the socket listens: from then on its fds are those of
# a server waiting for its first client.
LISTENING_EVENT = "server.listening"
log = get_logger()

PEER_IO_TIMEOUT = 5.0
HANDSHAKE_POLL = 0.01
PCI_COMMAND_OFFSET = 0x04
PCI_REVISION_ID_OFFSET = 0x08
PCI_BASE_ADDRESS_0 = 0x10


def _set_peer_timeouts(connection_fd: int) -> None:
    """Receive/send timeouts that bound libvfio-user's blocking socket I/O."""
    seconds = int(PEER_IO_TIMEOUT)
    timeval = struct.pack("ll", seconds, int((PEER_IO_TIMEOUT - seconds) * 1e6))
    connection = socket.socket(fileno=connection_fd)
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    finally:
        connection.detach()


def _shut_down(connection_fd: int) -> None:
    connection = socket.socket(fileno=connection_fd)
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone: the handshake ended on its own
    finally:
        connection.detach()


class VdsaServer:
    """Serves a virtual DSA at ``socket_path`` until cancelled (or, with
    ``once``, until its first client leaves).

    Resources: the socket path is claimed at start (a live server there is an
    error, a stale socket is removed) and removed on every way out; the
    libvfio-user context is destroyed on every way out.
    """

    def __init__(self, socket_path: Path, config: DeviceConfig, *,
                 lib: LibVfioUser | None = None, once: bool = False,
                 access: SocketAccess | None = None) -> None:
        self.socket_path = socket_path
        self.config = config
        self.once = once
        self.access = access or SocketAccess()
        self._lib = lib
        self.engine = Engine(num_wqs=config.num_wqs, num_msix=config.num_msix,
                             opcodes=config.opcodes, interrupt_handles=config.interrupt_handles)
        self.device = DsaDevice(config, self.engine, self.engine)
        self.connections = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        claim_socket_path(self.socket_path)
        lib = self._lib or load_library()
        try:
            with private_umask():
                context = Context(lib, self.socket_path, private=self.engine.handle)
            with context as ctx:
                self.access.apply(self.socket_path)
                self._set_up(ctx)
                ctx.realize()
                log.info(LISTENING_EVENT, socket=str(self.socket_path),
                         wqs=self.config.num_wqs, mode=self.config.mode.value,
                         socket_mode=oct(self.access.mode),
                         allowed_uids=sorted(self.access.allowed_uids),
                         allowed_gids=sorted(self.access.allowed_gids))
                task_status.started()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._report_software_errors)
                    nursery.start_soon(self._complete_commands)
                    while True:
                        await self._accept(ctx)
                        await self._serve_client(ctx)
                        if self.once:
                            nursery.cancel_scope.cancel()
                            return
        finally:
            # The context is gone: no callback can reach the engine any more.
            self.engine.close()
            self.socket_path.unlink(missing_ok=True)
            log.info("server.stopped", socket=str(self.socket_path))

    def _set_up(self, ctx: Context) -> None:
        device = self.device
        ctx.pci_init(PciType.EXPRESS)
        ctx.pci_set_id(PCI_VENDOR_ID_INTEL, PCI_DEVICE_ID_INTEL_DSA_SPR0,
                       PCI_VENDOR_ID_INTEL, 0)
        ctx.pci_set_class(PCI_CLASS_BASE_SYSTEM_PERIPHERAL, PCI_SUBCLASS_OTHER, PCI_PROG_IF_NONE)
        config = ctx.config_space
        config[PCI_REVISION_ID_OFFSET] = REVISION_ID

        bars = (BarSpec(Bar.REGISTERS, device.bar0_size, prefetchable=False),
                BarSpec(Bar.PORTALS, device.bar2_size, prefetchable=True))
        ctx.setup_region(RegionIndex(Bar.REGISTERS), device.bar0_size,
                         RegionFlag.RW | RegionFlag.MEM, self._bar0_access)
        if self.config.portals is PortalMode.MAPPED:
            self.engine.map_portals(device.bar2_size)
        self.engine.attach_vfu(ctx.pointer, device.bar2_size)
        for bar in bars:
            offset = PCI_BASE_ADDRESS_0 + 4 * bar.index
            config[offset:offset + 4] = bar.type_bits.to_bytes(4, "little")

        pcie = PxCap()
        pcie.hdr = CapHdr(id=CapId.EXP)
        pcie.pxcaps.ver = PCI_EXP_CAP_VERSION
        pcie.pxcaps.dpt = PCI_EXP_TYPE_RC_END
        # Function Level Reset, as DSA has it: a guest's vfio-pci resets the function
        # between users with it (libvfio-user calls the reset callback).
        pcie.pxdcap.flrc = 1
        ctx.add_capability(pcie)

        msix = MsixSpec(vectors=device.num_msix, table_offset=device.msix_table_offset,
                        pba_offset=device.msix_pba_offset)
        cap = MsixCap()
        cap.hdr = CapHdr(id=CapId.MSIX)
        cap.mxc.ts = msix.vectors - 1
        cap.mtab.tbir = msix.bar
        cap.mtab.to = msix.table_offset >> 3
        cap.mpba.pbir = msix.bar
        cap.mpba.pbao = msix.pba_offset >> 3
        ctx.add_capability(cap)
        ctx.set_irq_count(IrqType.MSIX, msix.vectors)
        ctx.set_irq_state_callback(IrqType.MSIX, self._irq_state)

        ctx.set_reset_callback(self._reset)
        # Quiescent at once: a DMA unmap waits inside the engine for descriptors in
        # progress (its own fence), and a reset stops them before returning.
        ctx.set_quiesce_callback(lambda: True)
        self._ctx = ctx

    def _memory_decode_enabled(self) -> bool:
        command = self._ctx.config_space[PCI_COMMAND_OFFSET]
        return bool(command & PCI_COMMAND_MEMORY)

    def _bar0_access(self, offset: int, buf: memoryview, is_write: bool) -> None:
        if not self._memory_decode_enabled():
            self._undecoded(Bar.REGISTERS, offset, buf, is_write)
        elif is_write:
            self.device.mmio_write(offset, bytes(buf))
        else:
            buf[:] = self.device.mmio_read(offset, len(buf))

    @staticmethod
    def _undecoded(bar: Bar, offset: int, buf: memoryview, is_write: bool) -> None:
        """Memory decode is off (PCI_COMMAND.MEM clear): the function does not
        claim the access; reads see all ones (a master abort), writes vanish."""
        log.warning("mmio.guest_error.decode_disabled", bar=int(bar), offset=offset,
                    size=len(buf), write=is_write)
        if not is_write:
            buf[:] = b"\xff" * len(buf)

    def _irq_state(self, start: int, count: int, masked: bool) -> None:
        log.info("irq.mask" if masked else "irq.unmask", start=start, count=count)
        self.engine.irq_mask(start, count, masked)

    def _reset(self, reset_type: ResetType) -> None:
        log.info("transport.reset", reason=reset_type.name.lower())
        self.engine.irq_reset()
        self.device.reset()
        if reset_type is ResetType.PCI_FLR:
            # An FLR also returns the Command register to its reset value: no decode, no
            # bus mastering, until the guest's driver enables them again.
            config = self._ctx.config_space
            config[PCI_COMMAND_OFFSET:PCI_COMMAND_OFFSET + 2] = bytes(2)

    async def _report_software_errors(self) -> None:
        """Descriptor errors with no completion record to go to become SWERR."""
        fd = self.engine.error_fd
        while True:
            await trio.lowlevel.wait_readable(fd)
            os.read(fd, 8)  # the eventfd's count; the queue is the record
            for error in self.engine.pop_errors():
                log.warning("desc.software_error", error=error.error, wq=error.wq,
                            operation=error.operation, batch=error.batch,
                            batch_index=error.batch_index, fault_addr=hex(error.fault_addr))
                self.device.report_engine_error(error)

    async def _complete_commands(self) -> None:
        """Device commands that wait for descriptors complete here, off the message loop."""
        fd = self.engine.command_fd
        while True:
            await trio.lowlevel.wait_readable(fd)
            os.read(fd, 8)  # the eventfd's count; the engine's WQ states are the record
            self.device.poll_commands()

    async def _accept(self, ctx: Context) -> None:
        listen_fd = ctx.get_poll_fd()
        while True:
            await trio.lowlevel.wait_readable(listen_fd)
            try:
                await self._attach(ctx, listen_fd)
            except VfuWouldBlock:
                continue  # the connecting peer went away before accept
            except VfuError as exc:
                # The peer failed the handshake (bad version, silence); drop it.
                log.warning("connection.rejected", errno=exc.errno,
                            error=errno.errorcode.get(exc.errno or 0, "?"))
                continue
            connection_fd = ctx.get_poll_fd()
            peer = peer_credentials(connection_fd)
            if not self.access.permits(peer):
                log.warning("connection.refused_peer", pid=peer.pid, uid=peer.uid, gid=peer.gid)
                self._drop_connection(ctx, connection_fd)
                continue
            _set_peer_timeouts(connection_fd)
            self.connections += 1
            log.info("connection.accepted", connection=self.connections, pid=peer.pid,
                     uid=peer.uid, gid=peer.gid)
            return

    def _drop_connection(self, ctx: Context, connection_fd: int) -> None:
        """Hang up on the connected peer without handling anything it sent: its socket is
        replaced by one that reads end-of-file, which libvfio-user takes for a hang-up and
        answers with a reset (closing that stand-in)."""
        ended, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        other.close()
        try:
            os.dup2(ended.fileno(), connection_fd)
        finally:
            ended.close()
        try:
            ctx.run_via(self.engine.vfu_run)
        except VfuNotConnected:
            return
        raise RuntimeError("libvfio-user did not drop a connection that reads end-of-file")

    async def _attach(self, ctx: Context, listen_fd: int) -> None:
        """``ctx.attach`` in a worker thread, never outliving PEER_IO_TIMEOUT
        nor a cancellation: either ends any handshake still in progress."""
        finished = trio.Event()

        async def watchdog() -> None:
            try:
                with trio.move_on_after(PEER_IO_TIMEOUT):
                    await finished.wait()
            finally:
                with trio.CancelScope(shield=True):
                    await end_pending_handshake()

        async def end_pending_handshake() -> None:
            # The worker may not have accepted yet: keep looking until it returns.
            shut = -1
            while not finished.is_set():
                fd = ctx.get_poll_fd()
                if fd not in (listen_fd, shut):
                    log.warning("connection.handshake_abandoned", seconds=PEER_IO_TIMEOUT)
                    _shut_down(fd)
                    shut = fd
                await trio.sleep(HANDSHAKE_POLL)

        failure: VfuError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog)
            try:
                await trio.to_thread.run_sync(ctx.attach_via, self.engine.vfu_attach)
            except VfuError as exc:
                failure = exc  # raised bare below, not wrapped in the nursery's group
            finally:
                finished.set()
        if failure is not None:
            raise failure

    async def _serve_client(self, ctx: Context) -> None:
        fd = ctx.get_poll_fd()
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                # One call: the engine handles a burst of messages in it; any left over keep
                # the fd readable, so the next wait returns at once.
                ctx.run_via(self.engine.vfu_run)
            except VfuInterrupted:
                continue
            except VfuNotConnected:
                dma = self.engine.dma_counters()
                log.info("connection.closed", connection=self.connections, dma_maps=dma.maps,
                         dma_unmaps=dma.unmaps, dma_unreachable=dma.unreachable,
                         dma_map_failures=dma.map_failures)
                return
            except VfuError as exc:
                # libvfio-user has already answered or dropped the message; a
                # peer it gave up on shows up as ENOTCONN on the next run.
                log.warning("connection.protocol_error", errno=exc.errno,
                            error=errno.errorcode.get(exc.errno or 0, "?"))
