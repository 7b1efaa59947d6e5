"""The checks `vdsa faults` makes after every cycle, against processes that fail them: a
server that keeps an fd its last client left, and one that has ended."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from vdsa_server.bench.serving import sample_process
from vdsa_server.builds.guest_image import GuestImage
from vdsa_server.reliability.faults import FaultError, FaultReport, _Cycles

# Opens one more fd when told to, as a server that leaks a client's would.
LEAKER = ("import os, sys, time; print('ready', flush=True); sys.stdin.readline(); "
          "os.open('/dev/null', os.O_RDONLY); print('leaked', flush=True); time.sleep(30)")


async def line_from(process: trio.Process) -> bytes:
    assert process.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        chunk = await process.stdout.receive_some()
        assert chunk, f"the child ended after {line!r}"
        line += chunk
    return line


async def cycles_of(process: trio.Process, tmp_path: Path) -> _Cycles:
    report = FaultReport(baseline=sample_process(process.pid))
    unused_guest = GuestImage(Path("bzImage"), Path("initramfs"), "none")
    return _Cycles(tmp_path / "sock", process, unused_guest, tmp_path, report)


async def test_an_fd_left_open_after_a_cycle_fails_it(tmp_path: Path) -> None:
    process = await trio.lowlevel.open_process([sys.executable, "-c", LEAKER],
                                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdin is not None
    try:
        assert await line_from(process) == b"ready\n"
        cycles = await cycles_of(process, tmp_path)
        await cycles.settled("the first check")
        await process.stdin.send_all(b"leak\n")
        assert await line_from(process) == b"leaked\n"
        with pytest.raises(FaultError, match="holds"):
            await cycles.settled("a cycle", limit=0.5)
    finally:
        process.kill()
        await process.wait()


async def test_a_server_that_ended_fails_the_cycle(tmp_path: Path) -> None:
    process = await trio.lowlevel.open_process([sys.executable, "-c", "import time; "
                                                "time.sleep(30)"])
    cycles = await cycles_of(process, tmp_path)
    process.kill()
    await process.wait()
    with pytest.raises(FaultError, match="ended"):
        await cycles.settled("a cycle")
