"""Submitting into a mapped BAR2, as a guest's MOVDIR64B reaches vdsa's mapped portals: the
slot handshake of native/engine/poller.c, from the submitter's side (wait until qword 0 of
the slot is zero, store qwords 7..1, then qword 0; on x86 stores stay in program order)."""

from __future__ import annotations

import ctypes
import mmap
import time

DESCRIPTOR_SIZE = 64
QWORDS = DESCRIPTOR_SIZE // 8


class SlotBusy(TimeoutError):
    """The server did not take the last descriptor of a slot in time."""


class MappedPortals:
    """BAR2 mapped from its region fd (the caller keeps or closes the fd: the mapping holds
    the file).  ``close()`` unmaps it."""

    def __init__(self, fd: int, size: int, wait_limit: float) -> None:
        self._map = mmap.mmap(fd, size)
        self._qwords = (ctypes.c_uint64 * (size // 8)).from_buffer(self._map)
        self.wait_limit = wait_limit

    def qword(self, offset: int) -> int:
        return int(self._qwords[offset // 8])

    def store_raw(self, offset: int, value: int) -> None:
        """One qword, outside the handshake (for tests of what the poller ignores)."""
        self._qwords[offset // 8] = value

    def submit(self, offset: int, descriptor: bytes) -> None:
        if len(descriptor) != DESCRIPTOR_SIZE or offset % DESCRIPTOR_SIZE:
            raise ValueError("a descriptor is 64 bytes, at a 64-byte slot")
        first = offset // 8
        deadline = time.monotonic() + self.wait_limit
        while self._qwords[first]:
            if time.monotonic() > deadline:
                raise SlotBusy(f"portal slot at {offset:#x} still busy after "
                               f"{self.wait_limit} s")
        words = [int.from_bytes(descriptor[i:i + 8], "little")
                 for i in range(0, DESCRIPTOR_SIZE, 8)]
        for q in range(QWORDS - 1, 0, -1):
            self._qwords[first + q] = words[q]
        self._qwords[first] = words[0]

    def close(self) -> None:
        del self._qwords
        self._map.close()
