"""Peers that try to end, wedge or trick the server: each must leave it serving the next
client.  The first two triggers were found by hand and by fuzzing: with libvfio-user as
shipped, each made `vdsa serve` exit (EBADF on a socket that a reset had closed)."""

from __future__ import annotations

import array
import errno
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.test_server import PCI_VENDOR_ID, client_when_free, running_server
from vdsa_server.client.protocol import (
    HEADER_SIZE,
    Command,
    Header,
    MessageType,
    encode_message,
    encode_region_access,
    encode_version,
)
from vdsa_server.server import VdsaServer
from vdsa_server.vfio import PciRegion

CONFIG_REGION = PciRegion.CONFIG
NO_SUCH_REGION = 99
ROUNDS = 3  # each trigger is repeated: one survival could be luck of timing
WAIT = 10.0


async def _receive_exactly(peer: trio.socket.SocketType, length: int) -> bytes:
    data = b""
    while len(data) < length:
        chunk = await peer.recv(length - len(data))
        assert chunk, "the server closed the connection during the handshake"
        data += chunk
    return data


@asynccontextmanager
async def handshaken_peer(path: Path) -> AsyncIterator[trio.socket.SocketType]:
    """A raw connection past VERSION, closed on leaving (without reading anything more)."""
    peer = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with peer:
        await peer.connect(str(path))
        await peer.send(encode_message(0, Command.VERSION, encode_version(0, 1, {})))
        header = Header.decode(await _receive_exactly(peer, HEADER_SIZE))
        await _receive_exactly(peer, header.size - HEADER_SIZE)
        assert not header.is_error
        yield peer


async def still_serves(path: Path, server: VdsaServer, before: int) -> None:
    """The server took the hostile peer and then a good client, ``before`` being its count of
    connections before the peer."""
    with trio.fail_after(WAIT):
        async with client_when_free(path) as client:
            assert await client.config_read(PCI_VENDOR_ID, 2) == 0x8086
    assert server.connections == before + 2


def refused_message(kind: str, msg_id: int) -> bytes:
    """A message that gets an error reply: refused by its header (before any handler runs),
    or by the command's handler."""
    if kind == "reply-type":
        return Header(msg_id, Command.DEVICE_GET_INFO, HEADER_SIZE + 16,
                      flags=MessageType.REPLY).encode() + bytes(16)
    if kind == "no-payload":
        return Header(msg_id, Command.DEVICE_GET_INFO, HEADER_SIZE).encode()
    return encode_message(msg_id, Command.REGION_READ,
                          encode_region_access(NO_SUCH_REGION, 0, 4))


async def survives_hang_ups_after(sock: Path, sent: bytes) -> None:
    """A peer sends ``sent`` after the handshake and hangs up without reading anything;
    ROUNDS times, each followed by a client that must be served."""
    async with running_server(sock) as server:
        for _ in range(ROUNDS):
            before = server.connections
            async with handshaken_peer(sock) as peer:
                await peer.send(sent)
            await still_serves(sock, server, before)


@pytest.mark.parametrize("kind", ["reply-type", "no-payload", "no-such-region"])
@pytest.mark.parametrize("messages", [1, 2, 3, 5])
async def test_hang_up_on_unread_error_replies(tmp_path: Path, kind: str, messages: int) -> None:
    await survives_hang_ups_after(tmp_path / "dsa.sock", b"".join(
        refused_message(kind, msg_id) for msg_id in range(1, messages + 1)))


@pytest.mark.parametrize("sent", [0, 4, 15])
async def test_hang_up_inside_a_message_body(tmp_path: Path, sent: int) -> None:
    """The header announces a 16-byte body; ``sent`` bytes of it come, then the hang-up."""
    message = encode_message(1, Command.REGION_READ, encode_region_access(CONFIG_REGION, 0, 4))
    await survives_hang_ups_after(tmp_path / "dsa.sock", message[:HEADER_SIZE + sent])


async def test_hang_up_after_good_messages_with_unread_replies(tmp_path: Path) -> None:
    message = encode_message(1, Command.REGION_READ, encode_region_access(CONFIG_REGION, 0, 4))
    await survives_hang_ups_after(tmp_path / "dsa.sock", message * 20)


async def test_zero_byte_region_access_is_refused(tmp_path: Path) -> None:
    """Every REGION_READ reply echoes the access before its data; one of 0 bytes has nothing
    to move and is an error, not an empty success."""
    sock = tmp_path / "dsa.sock"
    async with running_server(sock), client_when_free(sock) as client:
        for command in (Command.REGION_READ, Command.REGION_WRITE):
            reply = await client.send_raw(command, encode_region_access(CONFIG_REGION, 0, 0))
            assert reply is not None
            assert reply.header.is_error
            assert reply.header.error == errno.EINVAL
        assert await client.config_read(PCI_VENDOR_ID, 2) == 0x8086


def fds_open_on(name: str) -> int:
    """This process's fds open on the memfd called ``name`` (the server runs here)."""
    return sum(os.readlink(f"/proc/self/fd/{fd}") == f"/memfd:{name} (deleted)"
               for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))


SCM_MAX_FD = 253  # the most fds Linux passes in one message


@pytest.mark.parametrize("fds", [1, SCM_MAX_FD])
@pytest.mark.parametrize("sent", [1, 8, HEADER_SIZE - 1])
async def test_fds_that_come_with_a_short_header_are_closed(tmp_path: Path, fds: int,
                                                            sent: int) -> None:
    """A peer that sends part of a header with fds and hangs up: libvfio-user took the fds
    and then refused the header, so the fds stayed open in the server; every such
    connection cost it up to 253, and a few dozen of them used up its fd limit."""
    sock = tmp_path / "dsa.sock"
    name = "short-header-fds"
    memory = os.memfd_create(name)
    try:
        header = encode_message(1, Command.DMA_MAP, bytes(32))[:sent]
        async with running_server(sock) as server:
            for _ in range(ROUNDS):
                before = server.connections
                async with handshaken_peer(sock) as peer:
                    await peer.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   array.array("i", [memory] * fds))])
                await still_serves(sock, server, before)
                assert fds_open_on(name) == 1  # this test's own
    finally:
        os.close(memory)
