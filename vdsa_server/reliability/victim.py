"""A vfio-user client that is killed on purpose (``python -m vdsa_server.reliability.victim
SOCKET SERVER_PID``): it sets the device up as a driver does, maps BAR2, checks that a short
stream of memmoves through the mapped portal copies the right bytes, prints ``verified N``
and then keeps 1 MiB copies in flight until its parent SIGKILLs it."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import trio

from vdsa_server import log
from vdsa_server.bench.harness import (
    MEMORY,
    MEMORY_SIZE,
    SRC,
    WQ_SIZE,
    Bench,
    BenchError,
    BenchPlan,
    CpuClock,
    Work,
    dest,
)
from vdsa_server.bench.hostref import HostReference
from vdsa_server.client import GuestMemory, VfioUserClient
from vdsa_server.client.driver import DsaDriver
from vdsa_server.device.descriptors import DsaOpcode

VERIFIED = "verified"
CHECK_SIZE = 64 << 10
CHECK_SECONDS = 0.1
IN_FLIGHT_SIZE = 1 << 20
FOREVER = 3600.0


def memmove(size: int) -> Work:
    return Work(DsaOpcode.MEMMOVE, size, {"src_addr": SRC, "dst_addr": dest(0), "xfer_size": size})


async def main(socket: Path, server_pid: int) -> None:
    async with VfioUserClient.connect(socket) as client:
        with GuestMemory(MEMORY, MEMORY_SIZE) as memory:
            bench = Bench(DsaDriver(client, memory), CpuClock(server_pid), HostReference(),
                          BenchPlan(CHECK_SECONDS))
            await bench.set_up()
            async with bench.map_bar():
                memory.write(dest(0), bytes(CHECK_SIZE))
                result = await bench.native_stream(memmove(CHECK_SIZE), 0, WQ_SIZE,
                                                   CHECK_SECONDS)
                if memory.read(dest(0), CHECK_SIZE) != memory.read(SRC, CHECK_SIZE):
                    raise BenchError("the memmoves left the destination unlike the source")
                print(VERIFIED, result.completed, flush=True)
                await bench.native_stream(memmove(IN_FLIGHT_SIZE), 0, WQ_SIZE, FOREVER)


if __name__ == "__main__":
    # Log lines go to stderr (configure's default): stdout carries only the verified line.
    log.configure("console", logging.INFO)
    trio.run(main, Path(sys.argv[1]), int(sys.argv[2]))
