"""ctypes binding to the host reference library (``native/bench/hostref.h``): the same work as
a descriptor, done by glibc or ISA-L in this process, timed in C."""

from __future__ import annotations

import ctypes
import enum
import errno
import time
from collections.abc import Mapping
from ctypes import c_int, c_int64, c_size_t, c_uint64, c_void_p
from pathlib import Path
from typing import Any

from vdsa_server.transport.libvfio_user import declare_signatures

_SIGNATURES: dict[str, tuple[Any, list[Any], None]] = {
    "vdsa_hostref_time": (c_int64, [c_int, c_void_p, c_void_p, c_size_t, c_uint64], None),
    "vdsa_hostref_result": (c_uint64, [], None),
}


class HostOp(enum.IntEnum):
    """``enum vdsa_hostref_op``, with what each does."""

    MEMCPY = 0
    MEMSET = 1
    MEMCMP = 2
    CRC32C = 3
    COPY_CRC32C = 4
    DIF_INSERT = 5
    DIF_CHECK = 6

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    HostOp.MEMCPY: "host memcpy", HostOp.MEMSET: "host memset", HostOp.MEMCMP: "host memcmp",
    HostOp.CRC32C: "host ISA-L crc32_iscsi",
    HostOp.COPY_CRC32C: "host memcpy + ISA-L crc32_iscsi",
    HostOp.DIF_INSERT: "host memcpy + ISA-L crc16_t10dif per block",
    HostOp.DIF_CHECK: "host ISA-L crc16_t10dif per block + tag compare",
}


def load_bench_library(path: Path | None, signatures: Mapping[str, tuple[Any, list[Any], None]]
                       ) -> tuple[Path, ctypes.CDLL]:
    """The bench's native library (``native/bench``) from ``path``, else the build cache, with
    ``signatures`` declared."""
    if path is None:
        from vdsa_server.builds.engine_build import HOSTREF_FILENAME, engine_artifact

        path = engine_artifact().path / HOSTREF_FILENAME
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"the bench's native library not found at "
                                f"{path}: run `vdsa build engine`")
    cdll = ctypes.CDLL(str(path), use_errno=True)
    declare_signatures(cdll, dict(signatures))
    return path, cdll


class HostReference:
    """The loaded library. Addresses are this process's (see ``GuestMemory.address``)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path, self._c = load_bench_library(path, _SIGNATURES)

    def time_ns(self, op: HostOp, dst: int, src: int, size: int, iterations: int) -> int:
        """Nanoseconds that ``iterations`` runs of ``op`` over ``size`` bytes took."""
        elapsed = int(self._c.vdsa_hostref_time(op, dst, src, size, iterations))
        if elapsed < 0:
            raise ValueError(f"{op.name} cannot run over {size} bytes")
        return elapsed

    def rate(self, op: HostOp, dst: int, src: int, size: int, seconds: float) -> float:
        """Runs of ``op`` per second, over at least ``seconds`` of runs (and a warm-up run)."""
        self.time_ns(op, dst, src, size, 1)
        iterations = 1
        deadline = time.monotonic() + 10 * seconds
        while True:
            elapsed = self.time_ns(op, dst, src, size, iterations)
            if elapsed >= seconds * 1e9 or time.monotonic() > deadline:
                return iterations * 1e9 / max(elapsed, 1)
            # Aim a little past the target so the next round is usually the last.
            target = iterations * 1.2 * seconds * 1e9 / max(elapsed, 1)
            iterations = max(iterations * 2, int(target))

    def result(self) -> int:
        """The last compare, CRC32C or DIF check's result."""
        return int(self._c.vdsa_hostref_result())
