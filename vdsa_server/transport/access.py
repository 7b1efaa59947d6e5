"""Who may use the device: the listening socket's mode and group, and each peer's
credentials.

Two barriers.  The kernel lets a process connect to a UNIX socket only if it may write the
socket file, so the mode and group decide who can reach the server at all; the socket is
created under a private umask, so it is never wider than 0600 before :meth:`SocketAccess.apply`
sets what was asked.  Then each connected peer's credentials (``SO_PEERCRED``: the uid, primary
gid and pid it had when it connected) are checked against the allowed uids and gids, and a
peer that is not allowed is cut off with a log line.

vfio-user gives the device to one client at a time: a peer that connects, completes the
handshake and then does nothing holds it until it hangs up.  These two barriers are the way to
limit who can do that.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODE = 0o600
_PRIVATE_UMASK = 0o177  # a new socket file is at most rw for its owner
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(connection_fd: int) -> PeerCredentials:
    connection = socket.socket(fileno=connection_fd)
    try:
        raw = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    finally:
        connection.detach()
    return PeerCredentials(*_UCRED.unpack(raw))


def user_id(name: str) -> int:
    """A uid given as a number or a user name."""
    return int(name) if name.isdigit() else pwd.getpwnam(name).pw_uid


def group_id(name: str) -> int:
    """A gid given as a number or a group name."""
    return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid


@dataclass(frozen=True)
class SocketAccess:
    """The socket file's ``mode`` and ``group``, and the peers allowed to use the device: the
    server's own user and root always (root can reach the process anyway), ``uids``, and any
    peer whose primary group is ``group`` or one of ``gids``."""

    mode: int = DEFAULT_MODE
    group: int | None = None
    uids: frozenset[int] = field(default_factory=frozenset)
    gids: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.mode & ~0o777:
            raise ValueError(f"socket mode {self.mode:#o} has bits beyond 0777")

    @property
    def allowed_uids(self) -> frozenset[int]:
        return self.uids | {0, os.geteuid()}

    @property
    def allowed_gids(self) -> frozenset[int]:
        return self.gids | ({self.group} if self.group is not None else set())

    def permits(self, peer: PeerCredentials) -> bool:
        return peer.uid in self.allowed_uids or peer.gid in self.allowed_gids

    def apply(self, path: Path) -> None:
        """Give the socket file its group, then its mode (in that order: the mode may open it
        to the group)."""
        if self.group is not None:
            os.chown(path, -1, self.group)
        os.chmod(path, self.mode)


@contextmanager
def private_umask() -> Iterator[None]:
    """Files created inside are at most 0600.  The umask is per process: hold it only around
    the call that creates the socket."""
    previous = os.umask(_PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(previous)
