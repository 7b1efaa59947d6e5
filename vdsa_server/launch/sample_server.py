"""libvfio-user's gpio-pci-idio-16 sample server, built with libvfio-user.

It proves the vfio-user path (QEMU's client, the socket, libvfio-user) end to
end without vdsa's own device: the guest sees its PCI function 494f:0dc8.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from vdsa_server.builds.libvfio_user_build import cached_sample, libvfio_user_artifact
from vdsa_server.log import get_logger
from vdsa_server.transport.socket_path import claim_socket_path

log = get_logger()

SAMPLE = "gpio-pci-idio-16"
# samples/gpio-pci-idio-16.c gives its function this vendor:device pair.
SAMPLE_FUNCTION = "0x494f:0x0dc8"
START_TIMEOUT = 10.0


class SampleServerError(RuntimeError):
    pass


@asynccontextmanager
async def sample_server(socket: Path, log_file: Path) -> AsyncIterator[trio.Process]:
    """Run the sample listening at ``socket`` until the block ends; its output
    goes to ``log_file``.  The socket path is claimed first (a live server
    there is an error, a stale socket is removed)."""
    binary = cached_sample(SAMPLE)
    if not binary.is_file():
        raise SampleServerError(f"no {SAMPLE} at {binary}; run `vdsa build libvfio-user`")
    claim_socket_path(socket)
    env = dict(os.environ, LD_LIBRARY_PATH=str(libvfio_user_artifact().path / "lib"))
    with log_file.open("wb") as sink:
        proc = await trio.lowlevel.open_process(
            [str(binary), str(socket)], env=env, stdin=subprocess.DEVNULL, stdout=sink,
            stderr=subprocess.STDOUT)
        log.info("sample_server.start", socket=str(socket), pid=proc.pid, log=str(log_file))
        try:
            with trio.fail_after(START_TIMEOUT):
                while not await trio.Path(socket).exists():
                    if proc.poll() is not None:
                        raise SampleServerError(
                            f"{SAMPLE} exited with status {proc.returncode}; see {log_file}")
                    await trio.sleep(0.05)
            yield proc
        finally:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
            await trio.Path(socket).unlink(missing_ok=True)
            log.info("sample_server.stop", socket=str(socket))
