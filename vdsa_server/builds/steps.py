"""Running the external commands of a build: output to a log file, progress
lines on the console for long steps, and a failure that names the log."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import trio

from vdsa_server.log import get_logger

log = get_logger()

# ninja prints "[done/total] ..." for every edge it runs.
NINJA_PROGRESS = re.compile(rb"^\[(\d+)/(\d+)\]")


class BuildError(RuntimeError):
    """A build step failed; the message names the command and its log."""


async def run_step(
    name: str,
    argv: Sequence[str | Path],
    *,
    log_file: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    progress: re.Pattern[bytes] | None = None,
) -> None:
    """Run one command to completion, appending its output to ``log_file``.

    With ``progress`` (a pattern with "done" and "total" groups), the step
    reports its percentage about every 10 % so a long build shows it is alive.
    """
    args = [str(a) for a in argv]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log.info("build.step.start", step=name, argv=args, log=str(log_file))
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    last_decile = -1
    tail: list[bytes] = []
    with log_file.open("ab") as sink:
        sink.write(f"\n$ {' '.join(args)}\n".encode())
        proc = await trio.lowlevel.open_process(
            args,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            assert proc.stdout is not None
            pending = b""
            async for chunk in proc.stdout:
                sink.write(chunk)
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    tail = [*tail[-19:], line]
                    match = progress.match(line) if progress else None
                    if match:
                        done, total = int(match[1]), int(match[2])
                        decile = done * 10 // max(total, 1)
                        if decile > last_decile:
                            last_decile = decile
                            log.info("build.step.progress", step=name, done=done, total=total)
            status = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
    elapsed = round(time.monotonic() - started, 1)
    if status != 0:
        log.error("build.step.failed", step=name, status=status, seconds=elapsed, log=str(log_file))
        excerpt = b"\n".join(tail).decode(errors="replace")
        raise BuildError(
            f"build step {name!r} failed with status {status}: {' '.join(args)}\n"
            f"last output lines (full log: {log_file}):\n{excerpt}"
        )
    log.info("build.step.done", step=name, seconds=elapsed)


def patch_files(directory: Path) -> list[Path]:
    """The ``*.patch`` files of ``directory``, in the name order they apply in."""
    return sorted(directory.glob("*.patch"))


async def apply_patches(component: str, patches: Sequence[Path], tree: Path, *,
                        log_file: Path) -> None:
    for patch in patches:
        await run_step(f"{component}.patch.{patch.name}",
                       ["patch", "-p1", "--forward", "-i", patch], cwd=tree, log_file=log_file)
