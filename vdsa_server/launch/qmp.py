"""QMP, QEMU's machine protocol, on the UNIX socket of a running QEMU: what a boot's fault
hook uses to reset the machine from outside, as a host would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from vdsa_server.log import get_logger

log = get_logger()

CONNECT_TIMEOUT = 10.0
REPLY_TIMEOUT = 10.0


class QmpError(RuntimeError):
    """QEMU refused a command, or its monitor went away."""


class Monitor:
    """One QMP connection: the greeting and capability negotiation on open, then one command
    at a time.  Asynchronous events QEMU sends in between are logged and skipped."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._pending = b""

    @classmethod
    async def open(cls, path: Path) -> Monitor:
        # QEMU creates the socket while it starts: wait for it.
        with trio.fail_after(CONNECT_TIMEOUT):
            while True:
                try:
                    stream = await trio.open_unix_socket(str(path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    await trio.sleep(0.05)
        monitor = cls(stream)
        greeting = await monitor._message()
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting}")
        await monitor.execute("qmp_capabilities")
        return monitor

    async def _message(self) -> dict[str, Any]:
        with trio.fail_after(REPLY_TIMEOUT):
            while b"\n" not in self._pending:
                chunk = await self._stream.receive_some()
                if not chunk:
                    raise QmpError("QEMU closed its QMP socket")
                self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        await self._stream.send_all(json.dumps(request).encode() + b"\n")
        while True:
            reply = await self._message()
            if "event" in reply:
                log.info("qmp.event", name=reply["event"], data=reply.get("data"))
                continue
            if "error" in reply:
                raise QmpError(f"QMP {command} failed: {reply['error']}")
            return reply.get("return")

    async def aclose(self) -> None:
        await self._stream.aclose()
