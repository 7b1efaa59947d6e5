"""`vdsa serve` in a process of its own, as it runs beside QEMU, and what can be read of a
process from outside: its resident memory and open fds (for drift and leak checks)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from vdsa_server.builds.engine_build import Variant, engine_artifact, sanitizer_preload
from vdsa_server.builds.libvfio_user_build import cached_sanitized_library
from vdsa_server.engine import ENV_ENGINE
from vdsa_server.server import LISTENING_EVENT
from vdsa_server.transport.libvfio_user import ENV_LIBRARY

SERVER_START = 30.0  # seconds for `vdsa serve` to listen (Python, the engine, sanitizers)
LOG_TAIL = 3000  # characters of a failed server's log in the error
# The quarantine keeps freed memory from reuse to catch use-after-free; bounded, so that the
# memory-growth check sees the server's own growth and not ASan's.
ASAN_OPTIONS = "detect_leaks=0:quarantine_size_mb=16:abort_on_error=1"
UBSAN_OPTIONS = "halt_on_error=1:print_stacktrace=1"


class ServeError(Exception):
    """`vdsa serve` did not start, or its process is gone."""


def sanitized_environment() -> dict[str, str]:
    """This environment with the sanitized engine and libvfio-user, and the runtimes they
    need preloaded.  The engine finds libvfio-user through its RUNPATH; LD_LIBRARY_PATH comes
    first, so both it and the binding load the same sanitized copy."""
    library = cached_sanitized_library()
    return {
        **os.environ,
        ENV_ENGINE: str(engine_artifact().path / Variant.SANITIZED.filename),
        ENV_LIBRARY: str(library),
        "LD_LIBRARY_PATH": str(library.parent),
        "LD_PRELOAD": sanitizer_preload(),
        "ASAN_OPTIONS": ASAN_OPTIONS,
        "UBSAN_OPTIONS": UBSAN_OPTIONS,
    }


def release_environment() -> dict[str, str]:
    """This environment with the release engine and libvfio-user, and no sanitizer runtime:
    what a user's `vdsa serve` runs (memory figures mean nothing under ASan's quarantine)."""
    environment = {name: value for name, value in os.environ.items()
                   if name not in (ENV_LIBRARY, "LD_PRELOAD", "LD_LIBRARY_PATH")}
    environment[ENV_ENGINE] = str(engine_artifact().path / Variant.RELEASE.filename)
    return environment


@contextlib.asynccontextmanager
async def serving(socket: Path, log_file: Path, env: Mapping[str, str] | None = None,
                  options: Sequence[str] = ()) -> AsyncIterator[trio.Process]:
    """``vdsa serve --socket SOCKET OPTIONS`` in its own process (environment ``env``, default
    this one's); its log goes to ``log_file``. Leaving ends it: SIGTERM, SIGKILL after 5 s."""
    with log_file.open("w") as log_stream:
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(partial(
                trio.run_process,
                [sys.executable, "-m", "vdsa_server", "serve", "--socket", str(socket),
                 *options],
                check=False, stderr=log_stream, env=env))
            try:
                # Python, the engine (and sanitizers, in tests) load first: a slow start.
                with trio.fail_after(SERVER_START):
                    while not said_listening(log_file):
                        if process.returncode is not None:
                            raise ServeError(f"vdsa serve exited with {process.returncode}; "
                                             f"{log_tail(log_file)}")
                        await trio.sleep(0.01)
                yield process
            finally:
                nursery.cancel_scope.cancel()


def said_listening(log_file: Path) -> bool:
    """Whether the server has said it listens: its socket listens from before the device is
    set up (libvfio-user binds it when the context is created), so a sample of the server's
    fds taken then can miss some that it keeps for good, such as the portals' memfd."""
    return LISTENING_EVENT in log_file.read_text(errors="replace")


def log_tail(log_file: Path) -> str:
    text = log_file.read_text(errors="replace") if log_file.exists() else ""
    return f"the end of its log ({log_file}):\n{text[-LOG_TAIL:]}"


@dataclass(frozen=True)
class ProcessSample:
    rss_bytes: int
    open_fds: int


def sample_process(pid: int) -> ProcessSample:
    """Resident memory and open fds of ``pid``; ServeError if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        raise ServeError(f"process {pid} is gone") from None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return ProcessSample(int(line.split()[1]) * 1024, fds)
    raise ServeError(f"process {pid} has no VmRSS: it is exiting")


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of ``pid`` so far; FileNotFoundError if it is gone."""
    # Fields 14 and 15 (utime, stime) after the parenthesised command name.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
