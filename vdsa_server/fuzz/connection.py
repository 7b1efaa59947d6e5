"""One hostile client connection: blocking, bounded by a timeout, sending any bytes with any
file descriptors and reading replies as they come.  The fuzzer drives one at a time, so
nothing here runs concurrently."""

from __future__ import annotations

import socket
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from vdsa_server.client.protocol import (
    HEADER_SIZE,
    Command,
    Header,
    ProtocolError,
    encode_message,
    encode_version,
)

REPLY_LIMIT = 10.0  # longer than the server's own 5 s limit on a stalled peer


class ServerHung(Exception):
    """No reply within REPLY_LIMIT."""


class Dropped(Exception):
    """The server closed the connection."""


@dataclass(frozen=True)
class Reply:
    header: Header
    payload: bytes

    @property
    def errno(self) -> int:
        """0 for a success reply."""
        return self.header.error if self.header.is_error else 0


class Connection:
    def __init__(self, path: Path) -> None:
        """Connect, retrying while refused: libvfio-user queues one connection while it still
        serves the one before, and refuses any more."""
        deadline = time.monotonic() + REPLY_LIMIT
        while True:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(REPLY_LIMIT)
            try:
                self._sock.connect(str(path))
                return
            except ConnectionRefusedError:
                self._sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
            except BaseException:
                self._sock.close()
                raise

    def handshake(self) -> Reply:
        reply = self.exchange(0, Command.VERSION, encode_message(
            0, Command.VERSION, encode_version(0, 0, {"max_msg_fds": 8})))
        if reply.errno:
            raise ProtocolError(f"VERSION refused with errno {reply.errno}")
        return reply

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        try:
            if fds:
                rights = array("i", fds).tobytes()
                sent = self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                    rights)])
            else:
                sent = 0
            if sent < len(data):
                self._sock.sendall(data[sent:])
        except (BrokenPipeError, ConnectionResetError) as gone:
            raise Dropped(str(gone)) from gone
        except TimeoutError as stuck:
            raise ServerHung("the server stopped reading") from stuck

    def _exactly(self, length: int) -> bytes:
        data = b""
        while len(data) < length:
            try:
                chunk = self._sock.recv(length - len(data))
            except ConnectionResetError as gone:
                raise Dropped(str(gone)) from gone
            except TimeoutError as stuck:
                raise ServerHung(f"no reply within {REPLY_LIMIT} s") from stuck
            if not chunk:
                raise Dropped("end of file")
            data += chunk
        return data

    def receive(self) -> Reply:
        header = Header.decode(self._exactly(HEADER_SIZE))
        return Reply(header, self._exactly(header.size - HEADER_SIZE))

    def exchange(self, msg_id: int, command: int, message: bytes,
                 fds: Sequence[int] = ()) -> Reply:
        """Send ``message`` and read its reply, which must be a reply to it."""
        self.send(message, fds)
        reply = self.receive()
        if (reply.header.msg_id, reply.header.command) != (msg_id, command) \
                or not reply.header.is_reply:
            raise ProtocolError(f"the reply to msg_id {msg_id} command {command} is "
                                f"{reply.header}")
        return reply

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
