"""A vfio-user client harness: drives a vfio-user server over its UNIX socket, without QEMU.

It speaks the protocol itself (:mod:`vdsa_server.client.protocol`), independently of
libvfio-user, so that it can test vdsa's libvfio-user-based server and send malformed messages
on purpose.

Resource handling: :meth:`VfioUserClient.connect` owns what it opens: the socket, a nursery
running the receive loop, the eventfds it makes for interrupts and every file descriptor the
server sends (region mmap fds); all are closed when its block ends.  :class:`GuestMemory` belongs
to the caller and may outlive the connection.

Error handling: an error reply raises :class:`VfioUserError` (an ``OSError`` with the server's
errno, naming the command); every wait the harness does is bounded by the client's
``request_timeout`` and raises :class:`VfioUserTimeout` rather than hang (callers wanting a
tighter bound wrap a call in ``trio.fail_after``); a server that closes the connection or breaks
the framing makes every waiting and later request raise :class:`ConnectionClosed`.

Server-to-client DMA_READ/DMA_WRITE requests are answered by the receive loop from the mapped
:class:`GuestMemory`.  libvfio-user's server reads the reply to its DMA request as the very next
message on the socket, so no request may be sent while it waits for one: after an event that
makes the server do DMA, use :meth:`VfioUserClient.wait_served_dma` before the next request.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
import socket
from array import array
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType

import trio

from vdsa_server.client.protocol import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    HEADER_SIZE,
    Command,
    DeviceInfo,
    DmaAccess,
    DmaMapFlag,
    Header,
    HeaderFlag,
    IrqInfo,
    IrqSetFlag,
    MessageIds,
    ProtocolError,
    RegionInfo,
    VersionInfo,
    command_name,
    decode_device_info,
    decode_dma_access,
    decode_dma_unmap,
    decode_irq_info,
    decode_region_access,
    decode_region_info,
    decode_version,
    encode_device_get_info,
    encode_device_get_irq_info,
    encode_device_get_region_info,
    encode_dma_access,
    encode_dma_map,
    encode_dma_unmap,
    encode_error_reply,
    encode_message,
    encode_posted_region_write,
    encode_region_access,
    encode_reply,
    encode_set_irqs,
    encode_version,
)
from vdsa_server.log import get_logger
from vdsa_server.vfio import PciIrq, PciRegion

log = get_logger()

DEFAULT_REQUEST_TIMEOUT = 5.0
PIPELINE_WINDOW = 64  # requests in flight at once in request_many
CLIENT_MAX_MSG_FDS = 8
CLIENT_CAPABILITIES: Mapping[str, object] = MappingProxyType({
    "max_msg_fds": CLIENT_MAX_MSG_FDS,
    "max_data_xfer_size": DEFAULT_MAX_DATA_XFER_SIZE,
    "pgsizes": mmap.PAGESIZE,
})
# QEMU proposes 0.0; libvfio-user answers with min(proposed minor, its own).
PROTOCOL_VERSION = (0, 0)
# Room for the largest transfer the client allows plus any fixed part before the data.
MAX_INCOMING_PAYLOAD = DEFAULT_MAX_DATA_XFER_SIZE + 4096
# Room for Linux's SCM_MAX_FD descriptors: more never come with one message, none is cut off.
ANCILLARY_SPACE = socket.CMSG_SPACE(253 * array("i").itemsize)


class VfioUserClientError(Exception):
    """The harness could not complete an operation with the server."""


class VfioUserError(VfioUserClientError, OSError):
    """The server answered a command with an error reply; ``errno`` is the server's."""

    def __init__(self, command: int, errno_value: int) -> None:
        reason = os.strerror(errno_value) if errno_value else "no errno given"
        super().__init__(errno_value, f"{command_name(command)} failed: {reason}")
        self.command = command


class VfioUserTimeout(VfioUserClientError, TimeoutError):
    """A reply, an interrupt or a server DMA did not come within the client's time limit."""


class ConnectionClosed(VfioUserClientError):
    """The connection is gone: the server closed it, or a message broke the framing."""


@dataclass(frozen=True)
class Message:
    """A message from the server as received; the client owns (and closes) its ``fds``."""

    header: Header
    payload: bytes
    fds: tuple[int, ...] = ()


@dataclass(frozen=True)
class ServedDma:
    """A DMA_READ/DMA_WRITE request the harness answered; ``error`` is 0 or the errno replied."""

    command: Command
    address: int
    count: int
    error: int


class GuestMemory:
    """Guest RAM for DMA: a memfd, mapped here, placed at ``iova`` in the device's DMA space.

    Tests read and write it directly; :meth:`VfioUserClient.dma_map` shares it with the server
    (its fd goes with the DMA_MAP message unless ``share_fd=False``).
    """

    def __init__(self, iova: int, size: int, *, name: str = "vdsa-guest-memory") -> None:
        if size <= 0 or size % mmap.PAGESIZE or iova % mmap.PAGESIZE:
            raise ValueError(f"guest memory needs a page-aligned iova and size, got "
                             f"iova {iova:#x} size {size:#x}")
        self.iova = iova
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._map = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise

    def covers(self, iova: int, length: int) -> bool:
        return self.iova <= iova and iova + length <= self.iova + self.size

    def _offset(self, iova: int, length: int) -> int:
        if not self.covers(iova, length):
            raise ValueError(f"[{iova:#x}, {iova + length:#x}) is outside guest memory "
                             f"[{self.iova:#x}, {self.iova + self.size:#x})")
        return iova - self.iova

    def read(self, iova: int, length: int) -> bytes:
        start = self._offset(iova, length)
        return self._map[start:start + length]

    def write(self, iova: int, data: bytes) -> None:
        start = self._offset(iova, len(data))
        self._map[start:start + len(data)] = data

    def address(self, iova: int, length: int) -> int:
        """This process's address of ``[iova, iova + length)``, for native code working on
        the same pages as the device (benchmark references)."""
        start = self._offset(iova, length)
        view = ctypes.c_char.from_buffer(self._map, start)
        address = ctypes.addressof(view)
        del view  # an exported buffer would keep the mapping from closing
        return address

    @property
    def closed(self) -> bool:
        return self._map.closed

    def close(self) -> None:
        if not self._map.closed:
            self._map.close()
            os.close(self.fd)

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class IrqEventfd:
    """The eventfd the server signals for one interrupt vector (``index``, ``vector``).

    ``received`` counts the signals consumed so far; the eventfd adds up signals that arrive
    between reads, so one :meth:`wait` may return more than one.
    """

    def __init__(self, index: int, vector: int, wait_limit: float) -> None:
        self.index = index
        self.vector = vector
        self.wait_limit = wait_limit
        self.received = 0
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def poll(self) -> int:
        """Consume the signals pending now (0 if none) without waiting."""
        try:
            count = os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0
        self.received += count
        return count

    async def wait(self) -> int:
        """Wait for at least one signal and consume all pending; returns how many."""
        with trio.move_on_after(self.wait_limit):
            while True:
                await trio.lowlevel.wait_readable(self.fd)
                count = self.poll()
                if count:
                    return count
        raise VfioUserTimeout(f"no interrupt on IRQ index {self.index} vector {self.vector} "
                              f"within {self.wait_limit} s ({self.received} received so far)")

    def close(self) -> None:
        if self.fd >= 0:
            trio.lowlevel.notify_closing(self.fd)
            os.close(self.fd)
            self.fd = -1


@dataclass
class _Waiter:
    done: trio.Event = field(default_factory=trio.Event)
    reply: Message | None = None


@dataclass(frozen=True)
class _DmaMapping:
    memory: GuestMemory
    flags: DmaMapFlag


class _Refused(Exception):
    """A server request the harness answers with an error reply."""

    def __init__(self, errno_value: int) -> None:
        super().__init__(errno_value)
        self.errno = errno_value


async def _connect_when_listening(path: Path | str, limit: float) -> trio.socket.SocketType:
    """A connected socket, retrying while refused for up to ``limit`` seconds: the server's
    socket file exists a moment before it listens, and libvfio-user queues one connection
    while it serves another and refuses more."""
    deadline = trio.current_time() + limit
    while True:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(os.fspath(path))
            return sock
        except ConnectionRefusedError:
            sock.close()
            if trio.current_time() > deadline:
                raise
            await trio.sleep(0.005)
        except BaseException:
            sock.close()
            raise


class VfioUserClient:
    """One connection to a vfio-user server; made by :meth:`connect`."""

    def __init__(self, sock: trio.socket.SocketType, request_timeout: float,
                 max_data_xfer_size: int) -> None:
        self.request_timeout = request_timeout
        self.served_dma: list[ServedDma] = []
        self._sock = sock
        self._max_data_xfer_size = max_data_xfer_size
        self._ids = MessageIds()
        self._waiters: dict[int, _Waiter] = {}
        self._send_lock = trio.Lock()
        self._closed: str | None = None
        self._close_cause: BaseException | None = None
        self._closed_event = trio.Event()
        # Set, then replaced, each time the receive loop answers a server request.
        self._served = trio.Event()
        self._mappings: dict[tuple[int, int], _DmaMapping] = {}
        self._received_fds: list[int] = []
        self._irq_eventfds: list[IrqEventfd] = []
        self._server_version: VersionInfo | None = None

    # --- Connection ---------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        path: Path | str,
        *,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        version: tuple[int, int] = PROTOCOL_VERSION,
        capabilities: Mapping[str, object] | None = CLIENT_CAPABILITIES,
    ) -> AsyncIterator[VfioUserClient]:
        """Connect to the server listening at ``path`` and negotiate VERSION.

        ``request_timeout`` bounds each request and each wait for an interrupt, a server DMA
        or the close.  ``capabilities`` is the JSON capabilities object the client proposes
        (None sends no JSON at all).  The block runs with the receive loop in the background;
        on leaving it the connection and everything the client owns are closed.
        """
        xfer = capabilities.get("max_data_xfer_size") if capabilities else None
        sock = await _connect_when_listening(path, request_timeout)
        try:
            log.info("vfio_user_client.connect", path=str(path))
            client = cls(sock, request_timeout,
                         xfer if isinstance(xfer, int) else DEFAULT_MAX_DATA_XFER_SIZE)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client._receive_loop)
                    await client._negotiate(version, capabilities)
                    yield client
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # The nursery is ours: callers see their own exception, not a group of one.
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise
            finally:
                client._release()
        finally:
            sock.close()

    async def _negotiate(self, version: tuple[int, int],
                         capabilities: Mapping[str, object] | None) -> None:
        reply = await self.request(Command.VERSION, encode_version(*version, capabilities))
        server = decode_version(reply.payload)
        major, minor = version
        if server.major != major or server.minor > minor:
            raise ProtocolError(f"VERSION: server answered {server.major}.{server.minor} to "
                                f"{major}.{minor}")
        self._server_version = server
        log.info("vfio_user_client.version", major=server.major, minor=server.minor,
                 capabilities=dict(server.capabilities))

    @property
    def server_version(self) -> VersionInfo:
        """The server's VERSION reply (available once :meth:`connect` has negotiated)."""
        if self._server_version is None:
            raise RuntimeError("VERSION has not been negotiated yet")
        return self._server_version

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def wait_closed(self) -> None:
        """Wait for the server to close the connection (or for the framing to break)."""
        with trio.move_on_after(self.request_timeout):
            await self._closed_event.wait()
            return
        raise VfioUserTimeout(f"the server kept the connection open for {self.request_timeout} s")

    def _release(self) -> None:
        for vector in self._irq_eventfds:
            vector.close()
        for fd in self._received_fds:
            os.close(fd)
        self._irq_eventfds.clear()
        self._received_fds.clear()
        self._mappings.clear()
        self._mark_closed("the client closed the connection")

    def _mark_closed(self, reason: str, cause: BaseException | None = None) -> None:
        if self._closed is not None:
            return
        self._closed = reason
        self._close_cause = cause
        self._closed_event.set()
        self._served.set()
        for waiter in self._waiters.values():
            waiter.done.set()
        log.info("vfio_user_client.closed", reason=reason)

    def _connection_closed(self) -> ConnectionClosed:
        error = ConnectionClosed(f"connection closed: {self._closed}")
        error.__cause__ = self._close_cause
        return error

    # --- Receiving ----------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        try:
            while (message := await self._receive_message()) is not None:
                if message.header.is_reply:
                    self._deliver(message)
                else:
                    await self._serve(message)
        except (ProtocolError, OSError, ConnectionClosed) as exc:
            log.warning("vfio_user_client.connection_failed", error=str(exc))
            self._mark_closed(f"receive failed: {exc}", exc)
        else:
            self._mark_closed("the server closed the connection")

    async def _receive_message(self) -> Message | None:
        """The next whole message with its fds, or None at a clean end of the stream."""
        fds: list[int] = []
        try:
            raw = await self._receive_exactly(HEADER_SIZE, fds)
            if not raw:
                return None
            if len(raw) < HEADER_SIZE:
                raise ProtocolError(f"the server closed the connection {len(raw)} bytes into "
                                    "a message header")
            header = Header.decode(raw)
            what = f"{command_name(header.command)} msg_id {header.msg_id}"
            if header.size - HEADER_SIZE > MAX_INCOMING_PAYLOAD:
                raise ProtocolError(f"{what}: {header.size} bytes is more than the client "
                                    "accepts")
            payload = await self._receive_exactly(header.size - HEADER_SIZE, fds)
            if len(payload) < header.size - HEADER_SIZE:
                raise ProtocolError(f"{what}: the server closed the connection "
                                    f"{HEADER_SIZE + len(payload)} bytes into {header.size}")
        finally:
            # Every fd is the client's from here: closed with the connection, whatever happens.
            self._received_fds.extend(fds)
        return Message(header, payload, tuple(fds))

    async def _receive_exactly(self, length: int, fds: list[int]) -> bytes:
        """``length`` bytes, fewer only if the stream ends; fds that come along go to ``fds``."""
        chunks: list[bytes] = []
        received = 0
        while received < length:
            data, ancdata, flags, _ = await self._sock.recvmsg(
                length - received, ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC)
            for level, kind, item in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received_fds = array("i")
                    received_fds.frombytes(item[:len(item) - len(item) % received_fds.itemsize])
                    fds.extend(received_fds)
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError("file descriptors sent with a message were cut off")
            if not data:
                break
            chunks.append(data)
            received += len(data)
        return b"".join(chunks)

    def _deliver(self, reply: Message) -> None:
        waiter = self._waiters.get(reply.header.msg_id)
        if waiter is None or waiter.reply is not None:
            log.warning("vfio_user_client.reply.unmatched", msg_id=reply.header.msg_id,
                        command=command_name(reply.header.command))
            return
        waiter.reply = reply
        waiter.done.set()

    async def _serve(self, request: Message) -> None:
        """Answer a command the server sent: DMA_READ and DMA_WRITE, from guest memory."""
        header = request.header
        payload = b""
        address = count = 0
        try:
            if request.fds:
                raise _Refused(errno.EINVAL)
            if header.command == Command.DMA_READ:
                access = decode_dma_access(request.payload, "DMA_READ request")
                address, count = access.address, access.count
                payload = self._dma_read(access)
            elif header.command == Command.DMA_WRITE:
                access = decode_dma_access(request.payload, "DMA_WRITE request")
                address, count = access.address, access.count
                payload = self._dma_write(access)
            else:
                raise _Refused(errno.ENOSYS)
        except ProtocolError as exc:
            log.warning("vfio_user_client.server_request.malformed", error=str(exc))
            refused = errno.EINVAL
        except _Refused as exc:
            refused = exc.errno
        else:
            refused = 0
        log.debug("vfio_user_client.server_request", command=command_name(header.command),
                  msg_id=header.msg_id, address=address, count=count, errno=refused)
        if header.command in (Command.DMA_READ, Command.DMA_WRITE):
            self.served_dma.append(ServedDma(Command(header.command), address, count, refused))
        if not header.no_reply:
            await self._send(encode_error_reply(header, refused) if refused
                             else encode_reply(header, payload))
        self._served.set()
        self._served = trio.Event()

    def _memory_for(self, access: DmaAccess, needed: DmaMapFlag) -> GuestMemory:
        if access.count > self._max_data_xfer_size:
            raise _Refused(errno.E2BIG)
        for mapping in self._mappings.values():
            if not mapping.memory.closed and mapping.memory.covers(access.address, access.count):
                if needed not in mapping.flags:
                    raise _Refused(errno.EPERM)
                return mapping.memory
        raise _Refused(errno.EFAULT)

    def _dma_read(self, access: DmaAccess) -> bytes:
        if access.data:
            raise _Refused(errno.EINVAL)
        data = self._memory_for(access, DmaMapFlag.READ).read(access.address, access.count)
        return encode_dma_access(access.address, access.count, data)

    def _dma_write(self, access: DmaAccess) -> bytes:
        if len(access.data) != access.count:
            raise _Refused(errno.EINVAL)
        self._memory_for(access, DmaMapFlag.WRITE).write(access.address, access.data)
        return encode_dma_access(access.address, access.count)

    async def wait_served_dma(self, count: int) -> list[ServedDma]:
        """Wait until the harness has answered ``count`` server DMA requests in all; returns
        them.  Bounded by ``request_timeout``."""
        with trio.move_on_after(self.request_timeout):
            while len(self.served_dma) < count:
                if self._closed is not None:
                    raise self._connection_closed()
                await self._served.wait()
            return self.served_dma[:count]
        raise VfioUserTimeout(f"the server made {len(self.served_dma)} DMA requests within "
                              f"{self.request_timeout} s, not {count}")

    # --- Sending ------------------------------------------------------------------------------

    async def _send(self, message: bytes, fds: Sequence[int] = ()) -> None:
        """Send one whole message; messages never interleave on the socket."""
        await self._send_all([message], fds)

    async def _exchange(self, command: int, msg_id: int, message: bytes,
                        fds: Sequence[int]) -> Message:
        if msg_id in self._waiters:
            raise ValueError(f"message id {msg_id} is already awaiting a reply")
        waiter = _Waiter()
        self._waiters[msg_id] = waiter
        try:
            with trio.move_on_after(self.request_timeout) as scope:
                await self._send(message, fds)
                await waiter.done.wait()
        finally:
            del self._waiters[msg_id]
        if scope.cancelled_caught:
            log.warning("vfio_user_client.request.timeout", command=command_name(command),
                        msg_id=msg_id, limit=self.request_timeout)
            raise VfioUserTimeout(f"{command_name(command)} msg_id {msg_id}: no reply within "
                                  f"{self.request_timeout} s")
        if waiter.reply is None:
            raise self._connection_closed()
        return waiter.reply

    async def request(self, command: Command, payload: bytes = b"", *,
                      fds: Sequence[int] = ()) -> Message:
        """Send a command and return its reply; an error reply raises :class:`VfioUserError`."""
        msg_id = self._ids.allocate(self._waiters)
        reply = await self._exchange(command, msg_id, encode_message(msg_id, command, payload),
                                     fds)
        if reply.header.command != command:
            raise ProtocolError(f"{command.name} msg_id {msg_id}: the reply is for "
                                f"{command_name(reply.header.command)}")
        if reply.header.is_error:
            raise VfioUserError(command, reply.header.error)
        return reply

    async def request_many(self, command: Command, payloads: Iterable[bytes], *,
                           fds: Sequence[int] = (), window: int = PIPELINE_WINDOW) -> list[int]:
        """Send ``command`` once with each payload (and ``fds`` with each) without waiting for
        each reply in turn; returns each reply's errno (0: success) in order.  One request at a
        time costs a round trip each, and a vIOMMU guest makes hundreds of thousands of
        DMA_MAPs.  ``window`` requests go out back to back, then their replies come in: each
        side runs through many messages per wake-up instead of the two taking turns, and the
        fds in flight (counted against the sender's fd limit until the server reads them) stay
        bounded."""
        if window < 1:
            raise ValueError(f"a window of {window} requests")
        errnos: list[int] = []
        remaining = iter(payloads)
        while batch := list(itertools.islice(remaining, window)):
            pending: list[tuple[int, _Waiter]] = []
            try:
                for _ in batch:
                    msg_id = self._ids.allocate(self._waiters)
                    pending.append((msg_id, self._waiters.setdefault(msg_id, _Waiter())))
                with trio.move_on_after(self.request_timeout) as scope:
                    await self._send_all([encode_message(msg_id, command, payload)
                                          for (msg_id, _), payload in zip(pending, batch,
                                                                          strict=True)], fds)
                    for _, waiter in pending:
                        if not waiter.done.is_set():
                            await waiter.done.wait()
            finally:
                for msg_id, _ in pending:
                    del self._waiters[msg_id]
            if scope.cancelled_caught:
                raise VfioUserTimeout(f"{command_name(command)}: {len(batch)} requests not "
                                      f"answered within {self.request_timeout} s")
            errnos.extend(self._reply_errno(command, msg_id, waiter)
                          for msg_id, waiter in pending)
        return errnos

    def _reply_errno(self, command: Command, msg_id: int, waiter: _Waiter) -> int:
        if waiter.reply is None:
            raise self._connection_closed()
        if waiter.reply.header.command != command:
            raise ProtocolError(f"{command.name} msg_id {msg_id}: the reply is for "
                                f"{command_name(waiter.reply.header.command)}")
        return waiter.reply.header.error if waiter.reply.header.is_error else 0

    async def _send_all(self, messages: Sequence[bytes], fds: Sequence[int]) -> None:
        """Send whole messages back to back, each with ``fds``, without a trip through trio's
        scheduler for each: a copy of the socket sends them as fast as the kernel takes them,
        and waits only when it takes no more."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds).tobytes())] \
            if fds else []
        async with self._send_lock:
            if self._closed is not None:
                raise self._connection_closed()
            with socket.socket(fileno=os.dup(self._sock.fileno())) as raw:
                raw.setblocking(False)
                for message in messages:
                    sent = 0
                    try:
                        while sent < len(message):
                            try:
                                sent += raw.sendmsg([memoryview(message)[sent:]],
                                                    [] if sent else ancillary)
                            except BlockingIOError:
                                await trio.lowlevel.wait_writable(raw)
                    except OSError as exc:
                        self._mark_closed(f"send failed: {exc}", exc)
                        raise self._connection_closed() from exc
                    except BaseException:
                        if sent:
                            # A cut-off message leaves the server reading our next one as
                            # its tail.
                            self._mark_closed("a send was interrupted mid-message")
                        raise

    async def post(self, command: Command, payload: bytes = b"", *,
                   fds: Sequence[int] = ()) -> None:
        """Send a command with the No_reply flag: the server answers nothing, not even errors."""
        msg_id = self._ids.allocate(self._waiters)
        await self._send(encode_message(msg_id, command, payload, flags=HeaderFlag.NO_REPLY), fds)

    async def send_raw(
        self,
        command: int,
        payload: bytes = b"",
        *,
        msg_id: int | None = None,
        flags: int = 0,
        error: int = 0,
        size: int | None = None,
        fds: Sequence[int] = (),
        expect_reply: bool = True,
    ) -> Message | None:
        """Send any message, malformed ones included, and return the reply as received.

        ``size`` overrides the header's message size (default: the true size) and ``flags`` is
        the raw flags word.  An error reply is returned, not raised; a server that closes the
        connection instead raises :class:`ConnectionClosed`.  With ``expect_reply=False``
        nothing is awaited and None is returned.
        """
        if msg_id is None:
            msg_id = self._ids.allocate(self._waiters)
        true_size = HEADER_SIZE + len(payload)
        message = Header(msg_id, command, true_size if size is None else size, flags,
                         error).encode() + payload
        if not expect_reply:
            await self._send(message, fds)
            return None
        return await self._exchange(command, msg_id, message, fds)

    # --- Device -------------------------------------------------------------------------------

    async def device_get_info(self) -> DeviceInfo:
        reply = await self.request(Command.DEVICE_GET_INFO, encode_device_get_info())
        return decode_device_info(reply.payload)

    async def device_get_region_info(self, index: int) -> RegionInfo:
        """The region's info with its capabilities; asks again with the argsz the server
        names when the first answer had no room for them."""
        reply = await self.request(Command.DEVICE_GET_REGION_INFO,
                                   encode_device_get_region_info(index))
        info = decode_region_info(reply.payload)
        if info.argsz > len(reply.payload):
            reply = await self.request(Command.DEVICE_GET_REGION_INFO,
                                       encode_device_get_region_info(index, info.argsz))
            info = decode_region_info(reply.payload)
        if info.index != index:
            raise ProtocolError(f"DEVICE_GET_REGION_INFO for region {index} answered for "
                                f"region {info.index}")
        return RegionInfo(info.index, info.flags, info.size, info.offset, info.argsz,
                          info.capability_ids, info.sparse_mmap, info.region_type, reply.fds)

    async def device_get_irq_info(self, index: int) -> IrqInfo:
        reply = await self.request(Command.DEVICE_GET_IRQ_INFO, encode_device_get_irq_info(index))
        return decode_irq_info(reply.payload)

    async def device_reset(self) -> None:
        await self.request(Command.DEVICE_RESET)

    # --- Regions ------------------------------------------------------------------------------

    def _transfers(self, offset: int, count: int) -> list[tuple[int, int]]:
        """(offset, count) pieces no larger than the server's max_data_xfer_size."""
        limit = self.server_version.max_data_xfer_size
        return [(offset + start, min(limit, count - start)) for start in range(0, count, limit)]

    async def region_read(self, region: int, offset: int, count: int) -> bytes:
        data: list[bytes] = []
        for piece_offset, piece_count in self._transfers(offset, count):
            reply = await self.request(Command.REGION_READ,
                                       encode_region_access(region, piece_offset, piece_count))
            access = decode_region_access(reply.payload, "REGION_READ reply")
            if (access.region, access.offset, access.count, len(access.data)) != (
                    region, piece_offset, piece_count, piece_count):
                raise ProtocolError(
                    f"REGION_READ of region {region} [{piece_offset:#x}+{piece_count}] answered "
                    f"for region {access.region} [{access.offset:#x}+{access.count}] with "
                    f"{len(access.data)} bytes")
            data.append(access.data)
        return b"".join(data)

    async def region_write(self, region: int, offset: int, data: bytes, *,
                           posted: bool = False) -> None:
        """Write ``data``; ``posted`` sets No_reply as QEMU does for BAR writes, so the server
        reports nothing back, not even a failure."""
        for piece_offset, piece_count in self._transfers(offset, len(data)):
            start = piece_offset - offset
            payload = encode_region_access(region, piece_offset, piece_count,
                                           data[start:start + piece_count])
            if posted:
                await self.post(Command.REGION_WRITE, payload)
                continue
            reply = await self.request(Command.REGION_WRITE, payload)
            access = decode_region_access(reply.payload, "REGION_WRITE reply")
            if (access.region, access.offset, access.count) != (region, piece_offset,
                                                                piece_count):
                raise ProtocolError(
                    f"REGION_WRITE of region {region} [{piece_offset:#x}+{piece_count}] "
                    f"answered for region {access.region} [{access.offset:#x}+{access.count}]")

    async def post_region_writes(self, region: int,
                                 writes: Sequence[tuple[int, bytes]]) -> None:
        """Posted writes of ``(offset, data)`` in one send, back to back as a burst of CPU
        stores reaches the server (a MOVDIR64B is eight): still one message per write."""
        limit = self.server_version.max_data_xfer_size
        messages = []
        for offset, data in writes:
            if len(data) > limit:
                raise ValueError(f"a {len(data)}-byte write exceeds the server's "
                                 f"max_data_xfer_size {limit}")
            messages.append(encode_posted_region_write(self._ids.allocate(self._waiters),
                                                       region, offset, data))
        await self._send(b"".join(messages))

    async def read(self, region: int, offset: int, size: int) -> int:
        """A ``size``-byte little-endian (PCI byte order) value from ``region``."""
        return int.from_bytes(await self.region_read(region, offset, size), "little")

    async def write(self, region: int, offset: int, value: int, size: int, *,
                    posted: bool = False) -> None:
        await self.region_write(region, offset, value.to_bytes(size, "little"), posted=posted)

    async def read32(self, region: int, offset: int) -> int:
        return await self.read(region, offset, 4)

    async def read64(self, region: int, offset: int) -> int:
        return await self.read(region, offset, 8)

    async def write32(self, region: int, offset: int, value: int, *,
                      posted: bool = False) -> None:
        await self.write(region, offset, value, 4, posted=posted)

    async def write64(self, region: int, offset: int, value: int, *,
                      posted: bool = False) -> None:
        await self.write(region, offset, value, 8, posted=posted)

    async def config_read(self, offset: int, size: int) -> int:
        return await self.read(PciRegion.CONFIG, offset, size)

    async def config_write(self, offset: int, value: int, size: int) -> None:
        await self.write(PciRegion.CONFIG, offset, value, size)

    # --- DMA ----------------------------------------------------------------------------------

    async def dma_map(self, memory: GuestMemory, *, share_fd: bool = True,
                      flags: DmaMapFlag = DmaMapFlag.READ | DmaMapFlag.WRITE) -> None:
        """Map ``memory`` at its iova.  Without ``share_fd`` the server cannot mmap it and must
        use DMA_READ/DMA_WRITE messages, which the harness answers from ``memory``."""
        key = (memory.iova, memory.size)
        previous = self._mappings.get(key)
        # Registered first: the server may send DMA requests as soon as it has the mapping.
        self._mappings[key] = _DmaMapping(memory, flags)
        try:
            await self.request(Command.DMA_MAP, encode_dma_map(memory.iova, memory.size, flags),
                               fds=[memory.fd] if share_fd else ())
        except BaseException:
            if previous is None:
                del self._mappings[key]
            else:
                self._mappings[key] = previous
            raise

    async def dma_unmap(self, memory: GuestMemory) -> None:
        reply = await self.request(Command.DMA_UNMAP, encode_dma_unmap(memory.iova, memory.size))
        echoed = decode_dma_unmap(reply.payload)
        if (echoed.addr, echoed.size) != (memory.iova, memory.size):
            raise ProtocolError(f"DMA_UNMAP of [{memory.iova:#x}+{memory.size:#x}] answered for "
                                f"[{echoed.addr:#x}+{echoed.size:#x}]")
        self._mappings.pop((memory.iova, memory.size), None)

    # --- Interrupts ---------------------------------------------------------------------------

    async def set_irqs(self, index: int, start: int, count: int, flags: IrqSetFlag, *,
                       fds: Sequence[int] = (), data: bytes = b"") -> None:
        await self.request(Command.DEVICE_SET_IRQS,
                           encode_set_irqs(index, start, count, flags, data), fds=fds)

    async def enable_irqs(self, index: int, count: int, *, start: int = 0) -> list[IrqEventfd]:
        """Give vectors ``start`` to ``start + count - 1`` of IRQ ``index`` an eventfd each to
        signal on trigger, in as many messages as the server's max_msg_fds requires."""
        vectors = [IrqEventfd(index, start + i, self.request_timeout) for i in range(count)]
        self._irq_eventfds.extend(vectors)
        per_message = max(1, self.server_version.max_msg_fds)
        for first in range(0, count, per_message):
            chunk = vectors[first:first + per_message]
            await self.set_irqs(index, start + first, len(chunk),
                                IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER,
                                fds=[vector.fd for vector in chunk])
        return vectors

    async def enable_msix(self, count: int) -> list[IrqEventfd]:
        return await self.enable_irqs(PciIrq.MSIX, count)

    async def trigger_irqs(self, index: int, start: int, count: int) -> None:
        """Ask the server to trigger the vectors itself (DATA_NONE | ACTION_TRIGGER)."""
        await self.set_irqs(index, start, count,
                            IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER)

    async def disable_irqs(self, index: int) -> None:
        """Drop every eventfd of IRQ ``index`` (count 0 with DATA_NONE | ACTION_TRIGGER)."""
        await self.set_irqs(index, 0, 0, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER)
