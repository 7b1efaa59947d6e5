"""Shared fixtures: booting the real guest, and libvfio-user's sample server.

Boot tests keep each boot's console log in the test's tmp_path; when a test
fails, the report shows the log's path and its last lines.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from vdsa_server.platform.launcher import BootSpec, GuestRun, boot
from vdsa_server.platform.libvfio_user_build import cached_sample, libvfio_user_artifact
from vdsa_server.transport.socket_path import claim_socket_path

BootGuest = Callable[..., Awaitable[GuestRun]]
CONSOLE_TAIL = 60


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    report = yield
    if report.failed:
        for key, value in item.user_properties:
            if key == "console_log" and Path(str(value)).is_file():
                tail = Path(str(value)).read_text(errors="replace").splitlines()[-CONSOLE_TAIL:]
                report.sections.append((f"console log {value}", "\n".join(tail)))
    return report


@pytest.fixture
def boot_guest(tmp_path: Path, request: pytest.FixtureRequest) -> BootGuest:
    """Boot the guest with a script; returns the GuestRun."""

    async def run(script: str, *, name: str = "boot", **options: Any) -> GuestRun:
        log_dir = tmp_path / name
        request.node.user_properties.append(("console_log", str(log_dir / "console.log")))
        return await boot(BootSpec(script=script.encode(), log_dir=log_dir, **options))

    return run


@asynccontextmanager
async def sample_server(socket: Path, log_file: Path) -> AsyncIterator[trio.Process]:
    """libvfio-user's gpio-pci-idio-16 sample listening at ``socket``."""
    claim_socket_path(socket)
    env = dict(os.environ, LD_LIBRARY_PATH=str(libvfio_user_artifact().path / "lib"))
    with log_file.open("wb") as sink:
        proc = await trio.lowlevel.open_process(
            [str(cached_sample("gpio-pci-idio-16")), str(socket)],
            env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
        try:
            with trio.fail_after(10):
                while not socket.exists():
                    if proc.poll() is not None:
                        raise RuntimeError(f"sample server exited: {log_file.read_text()}")
                    await trio.sleep(0.05)
            yield proc
        finally:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
