"""Claiming a socket path: free, stale, live server, not a socket."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from vdsa_server.transport.socket_path import SocketPathTaken, claim_socket_path


def test_free_path_is_claimed(tmp_path: Path) -> None:
    claim_socket_path(tmp_path / "free.sock")


def test_stale_socket_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.close()
    assert path.is_socket()
    claim_socket_path(path)
    assert not path.exists()


def test_live_server_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        with pytest.raises(SocketPathTaken, match="another server is listening"):
            claim_socket_path(path)
    assert path.is_socket()


def test_regular_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file.sock"
    path.write_text("not a socket")
    with pytest.raises(SocketPathTaken, match="not a UNIX socket"):
        claim_socket_path(path)
    assert path.read_text() == "not a socket"
