"""The server under fuzzing: `vdsa serve` in its own process, with the sanitized engine and the
sanitized libvfio-user, and what can be read of it from outside (liveness, memory, fds, log)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from vdsa_server.bench.serving import (
    ProcessSample,
    ServeError,
    said_listening,
    sample_process,
    sanitized_environment,
)

START_LIMIT = 60.0
STOP_LIMIT = 10.0
SANITIZER_REPORT = re.compile(r"ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:")


class TargetDied(Exception):
    """The server process ended (a crash, a sanitizer abort, an exit)."""


class FuzzTarget:
    """``vdsa serve --socket SOCKET`` with its log in ``work_dir``; ``close()`` stops it
    (SIGTERM, then SIGKILL) and must be called."""

    def __init__(self, work_dir: Path) -> None:
        self.socket = work_dir / "vdsa.sock"
        self.log_path = work_dir / "server.log"
        self.socket.unlink(missing_ok=True)  # left by an earlier run: not this server's
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vdsa_server", "--log-format", "json", "serve",
             "--socket", str(self.socket)],
            stdout=subprocess.DEVNULL, stderr=self._log, env=sanitized_environment())
        deadline = time.monotonic() + START_LIMIT
        while not said_listening(self.log_path):
            self.check_alive()
            if time.monotonic() > deadline:
                self.close()
                raise TargetDied(f"vdsa serve did not listen within {START_LIMIT} s")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self, settle: float = 0.0) -> None:
        """Raise TargetDied if the server has ended.  ``settle``: after a failure seen from
        outside (a reset connection), the time to let a dying process finish, since its
        socket closes before its exit can be seen."""
        try:
            code = self.process.wait(settle) if settle else self.process.poll()
        except subprocess.TimeoutExpired:
            code = None
        if code is not None:
            raise TargetDied(f"vdsa serve ended with {code}; {self.describe_log()}")

    def sanitizer_report(self) -> str | None:
        text = self.log_path.read_text(errors="replace")
        found = SANITIZER_REPORT.search(text)
        return text[found.start():][:4000] if found else None

    def describe_log(self) -> str:
        report = self.sanitizer_report()
        if report:
            return f"sanitizer report:\n{report}"
        tail = self.log_path.read_text(errors="replace")[-3000:]
        return f"the end of its log ({self.log_path}):\n{tail}"

    def sample(self) -> ProcessSample:
        try:
            return sample_process(self.pid)
        except ServeError as exc:
            raise TargetDied(str(exc)) from None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_LIMIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> FuzzTarget:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
