"""Claiming a UNIX socket path for a vfio-user server."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

from vdsa_server.log import get_logger

log = get_logger()


class SocketPathTaken(RuntimeError):
    """Another server listens at the path, or the path is not a socket."""


def claim_socket_path(path: Path) -> None:
    """Make ``path`` free for a new listening socket.

    A live server there (a connect succeeds) or a non-socket file is refused;
    a stale socket left by a server that died is removed.
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketPathTaken(f"{path} exists and is not a UNIX socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("socket.stale_removed", path=str(path))
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise SocketPathTaken(f"another server is listening at {path}")
