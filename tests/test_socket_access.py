"""Who can use the device: the socket file's mode and group (the kernel's barrier) and the
peer credentials the server checks (its own).  Peers of another user are real processes
running as ``nobody``."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.conftest import vdsa_env
from tests.test_server import PCI_VENDOR_ID, client_when_free
from vdsa_server.device.config import DeviceConfig
from vdsa_server.server import VdsaServer
from vdsa_server.transport.access import SocketAccess

NOBODY = 65534
NOGROUP = 65534

# A peer in the standard library only, so that it runs as any user: VERSION, then a read of
# the vendor id from config space.  Prints what it got, or how it was turned away.
PEER = r"""
import json, socket, struct, sys
def exactly(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data
def request(s, msg_id, cmd, payload):
    s.sendall(struct.pack("<HHIII", msg_id, cmd, 16 + len(payload), 0, 0) + payload)
    _, _, size, flags, error = struct.unpack("<HHIII", exactly(s, 16))
    body = exactly(s, size - 16)
    if flags & 0x20:
        raise OSError(error, "error reply")
    return body
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("connect-refused"); sys.exit()
version = struct.pack("<HH", 0, 1) + json.dumps({"capabilities": {}}).encode() + b"\0"
try:
    request(s, 0, 1, version)
    body = request(s, 1, 9, struct.pack("<QII", 0, 7, 2))
except (EOFError, ConnectionResetError, BrokenPipeError):
    print("cut-off"); sys.exit()
print("vendor", hex(int.from_bytes(body[16:18], "little")))
"""


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's own tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="vdsa-access-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def peer_as(uid: int, gid: int, sock: Path) -> str:
    done = subprocess.run(["python3", "-I", "-c", PEER, str(sock)], user=uid, group=gid,
                          extra_groups=[], capture_output=True, text=True, timeout=30,
                          check=True)
    return done.stdout.strip()


@asynccontextmanager
async def serving(sock: Path, access: SocketAccess) -> AsyncIterator[VdsaServer]:
    server = VdsaServer(sock, DeviceConfig(), access=access)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


async def peer_result(uid: int, gid: int, sock: Path) -> str:
    return await trio.to_thread.run_sync(peer_as, uid, gid, sock)


async def test_the_socket_is_0600_whatever_the_umask(open_dir: Path) -> None:
    sock = open_dir / "dsa.sock"
    previous = os.umask(0)
    try:
        async with serving(sock, SocketAccess()):
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600
            assert await peer_result(NOBODY, NOGROUP, sock) == "connect-refused"
    finally:
        os.umask(previous)


async def test_mode_and_group_open_the_socket_to_that_group(open_dir: Path) -> None:
    sock = open_dir / "dsa.sock"
    async with serving(sock, SocketAccess(mode=0o660, group=NOGROUP)) as server:
        info = sock.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, NOGROUP)
        assert await peer_result(NOBODY, NOGROUP, sock) == "vendor 0x8086"
        assert server.connections == 1


async def test_a_peer_that_is_not_allowed_is_cut_off(open_dir: Path) -> None:
    """The socket is open to all, so the kernel lets the peer in; its credentials do not."""
    sock = open_dir / "dsa.sock"
    async with serving(sock, SocketAccess(mode=0o666)) as server:
        for _ in range(3):
            assert await peer_result(NOBODY, NOGROUP, sock) == "cut-off"
        assert server.connections == 0
        with trio.fail_after(10):
            async with client_when_free(sock) as client:
                assert await client.config_read(PCI_VENDOR_ID, 2) == 0x8086
        assert server.connections == 1


@pytest.mark.parametrize("access", [SocketAccess(mode=0o666, uids=frozenset({NOBODY})),
                                    SocketAccess(mode=0o666, gids=frozenset({NOGROUP}))],
                         ids=["uid", "gid"])
async def test_an_allowed_uid_or_gid_is_served(open_dir: Path, access: SocketAccess) -> None:
    sock = open_dir / "dsa.sock"
    async with serving(sock, access) as server:
        assert await peer_result(NOBODY, NOGROUP, sock) == "vendor 0x8086"
        assert server.connections == 1


def test_a_mode_beyond_0777_is_refused() -> None:
    with pytest.raises(ValueError, match="beyond 0777"):
        SocketAccess(mode=0o4777)


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--socket-group", "no-such-group", "no group 'no-such-group'"),
    ("--allow-uid", "no-such-user", "no user 'no-such-user'"),
    ("--socket-mode", "0999", "not an octal mode"),
    ("--socket-mode", "01777", "not a mode between 0 and 0777"),
])
def test_serve_names_a_bad_access_option(tmp_path: Path, flag: str, value: str,
                                         message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "vdsa_server", "serve", "--socket",
                           str(tmp_path / "x.sock"), flag, value],
                          capture_output=True, text=True, timeout=60, check=False,
                          env=vdsa_env())
    assert done.returncode == 2
    assert message in done.stderr
    assert not (tmp_path / "x.sock").exists()
