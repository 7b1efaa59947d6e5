"""Parsing the guest's serial console.

The guest's init (builds/guest_files/init) writes machine-readable lines as
``@@vdsa@@ `` + one JSON object; everything else on the console is kernel or
firmware output, kept for the log.  Payloads travel base64-encoded so that a
script's output can never be mistaken for, or break, a frame.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

from vdsa_server.log import get_logger

log = get_logger()

MARKER = "@@vdsa@@ "
PANIC_PATTERN = "Kernel panic"


@dataclass(frozen=True)
class Boot:
    kernel: str


@dataclass(frozen=True)
class Line:
    text: str


@dataclass(frozen=True)
class Result:
    name: str
    value: str


@dataclass(frozen=True)
class Dmesg:
    text: str


@dataclass(frozen=True)
class Exit:
    status: int


@dataclass(frozen=True)
class Raw:
    """A console line that is not a frame (kernel, firmware, a corrupt frame)."""

    text: str


Event = Boot | Line | Result | Dmesg | Exit | Raw


def _b64(obj: dict[str, object], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"{key} is not a string")
    return base64.b64decode(value, validate=True).decode("utf-8", errors="replace")


def parse_line(text: str) -> Event:
    """Turn one console line (without its line ending) into an event."""
    start = text.find(MARKER)
    if start < 0:
        return Raw(text)
    payload = text[start + len(MARKER):]
    try:
        obj = json.loads(payload)
        if not isinstance(obj, dict):
            raise ValueError("frame is not an object")
        kind = obj.get("event")
        if kind == "boot":
            return Boot(kernel=str(obj["kernel"]))
        if kind == "line":
            return Line(_b64(obj, "b64"))
        if kind == "result":
            return Result(name=str(obj["name"]), value=_b64(obj, "b64"))
        if kind == "dmesg":
            return Dmesg(_b64(obj, "b64"))
        if kind == "exit":
            status = obj["status"]
            if not isinstance(status, int):
                raise ValueError("status is not an integer")
            return Exit(status)
        raise ValueError(f"unknown event {kind!r}")
    except (ValueError, KeyError, binascii.Error) as exc:
        # Kernel output can interleave with a frame; keep the text, flag it.
        log.warning("console.frame.corrupt", error=str(exc), line=text[:200])
        return Raw(text)


@dataclass
class Transcript:
    """Everything the guest reported during one boot, in arrival order."""

    kernel: str | None = None
    lines: list[str] = field(default_factory=list)
    results: dict[str, str] = field(default_factory=dict)
    dmesg: str = ""
    exit_status: int | None = None
    panicked: bool = False
    boots: int = 0  # more than one when the guest was reset

    def add(self, event: Event) -> None:
        match event:
            case Boot(kernel):
                self.kernel = kernel
                self.boots += 1
            case Line(text):
                self.lines.append(text)
            case Result(name, value):
                self.results[name] = value
            case Dmesg(text):
                self.dmesg = text
            case Exit(status):
                self.exit_status = status
            case Raw(text):
                if PANIC_PATTERN in text:
                    self.panicked = True


class LineSplitter:
    """Reassembles console lines from arbitrary byte chunks (CRLF or LF)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes | bytearray) -> list[str]:
        self._pending += chunk
        *complete, self._pending = self._pending.split(b"\n")
        return [line.rstrip(b"\r").decode("utf-8", errors="replace") for line in complete]

    def flush(self) -> list[str]:
        rest, self._pending = self._pending, b""
        return [rest.rstrip(b"\r").decode("utf-8", errors="replace")] if rest else []
