"""Shared fixtures: booting the real guest, through the API or the `vdsa` CLI.

Boot tests keep each boot's console log in the test's tmp_path; when a test
fails, the report shows the log's path and its last lines.

The whole session runs with the sanitized (ASan + UBSan) native engine: at
configure time this module builds it (cached) and re-executes pytest with the
sanitizer runtimes preloaded and ``$VDSA_ENGINE`` pointing at it, so the
in-process engine, the `vdsa` servers the tests start and the guest boots all
use it.  A sanitizer finding aborts the process that made it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.c_layouts import extract_headers
from vdsa_server.builds.debian_root import RELEASES
from vdsa_server.builds.guest_image import DEFAULT_RELEASE
from vdsa_server.device.config import PortalMode
from vdsa_server.launch.launcher import BootSpec, GuestRun, boot

BootGuest = Callable[..., Awaitable[GuestRun]]
CONSOLE_TAIL = 60
SANITIZED_SESSION = "VDSA_SANITIZED_SESSION"
SANITIZER_PRELOAD = "VDSA_SANITIZER_PRELOAD"


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get(SANITIZED_SESSION) == "1":
        # The runtimes are in this process now; other programs the tests run (ldd, cc,
        # QEMU) get them only through vdsa_env().
        os.environ[SANITIZER_PRELOAD] = os.environ.pop("LD_PRELOAD", "")
        return
    import trio

    from vdsa_server.builds.engine_build import Variant, build_engine, sanitizer_preload
    from vdsa_server.engine import ENV_ENGINE

    engine = trio.run(build_engine)
    os.environ.update({
        SANITIZED_SESSION: "1",
        ENV_ENGINE: str(engine.path / Variant.SANITIZED.filename),
        "LD_PRELOAD": sanitizer_preload(),
        # Python itself leaks by design at exit; the engine's leaks are not tracked.
        "ASAN_OPTIONS": "detect_leaks=0",
        "UBSAN_OPTIONS": "print_stacktrace=1",
    })
    # Give the real stdout/stderr back before the new process inherits them.
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.stop_global_capturing()
    os.execv(sys.executable, sys.orig_argv)


def pytest_xdist_setupnodes(config: pytest.Config, specs: list[Any]) -> None:
    """xdist's workers start from this process's environment: give them the sanitizer
    runtimes at exec time, as the re-execution gave this process (they then take them out of
    their own environment in pytest_configure)."""
    os.environ["LD_PRELOAD"] = os.environ.get(SANITIZER_PRELOAD, "")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.failed:
        for key, value in item.user_properties:
            if key == "console_log" and Path(str(value)).is_file():
                tail = Path(str(value)).read_text(errors="replace").splitlines()[-CONSOLE_TAIL:]
                report.sections.append((f"console log {value}", "\n".join(tail)))
    return report


@pytest.fixture
def boot_guest(tmp_path: Path, request: pytest.FixtureRequest) -> BootGuest:
    """Boot the guest with a script; returns the GuestRun."""

    async def run(script: str, *, name: str = "boot", **options: Any) -> GuestRun:
        log_dir = tmp_path / name
        request.node.user_properties.append(("console_log", str(log_dir / "console.log")))
        return await boot(BootSpec(script=script.encode(), log_dir=log_dir, **options))

    return run


@pytest.fixture(scope="session")
def linux_src(pytestconfig: pytest.Config) -> Path:
    """Linux 6.1's idxd headers (registers.h, idxd.h, uapi idxd.h), from
    linux-source-6.1, which .ci/setup installs."""
    return extract_headers(pytestconfig.cache.mkdir("linux-6.1-idxd"))


@dataclass(frozen=True)
class CliBoot:
    returncode: int
    summary: dict[str, Any]
    log_dir: Path
    release: str

    def context(self) -> str:
        return f"(console log: {self.log_dir / 'console.log'})"

    @property
    def dmesg_file(self) -> Path:
        return self.log_dir / "dmesg.txt"


def vdsa_env() -> dict[str, str]:
    """The environment for a `vdsa` process: it loads the sanitized engine, so it needs
    the sanitizer runtimes preloaded."""
    return {**os.environ, "LD_PRELOAD": os.environ.get(SANITIZER_PRELOAD, "")}


# The boot matrix of the data-path tests: every release with the default mapped portals, and
# the trapped path on the default release (the portal path is the server's, not the kernel's).
RELEASE_PORTALS = [*((release, PortalMode.MAPPED) for release in RELEASES),
                   (DEFAULT_RELEASE, PortalMode.TRAPPED)]


def release_portal_id(case: tuple[str, PortalMode]) -> str:
    return f"{case[0]}-{case[1].value}"


def portal_config(mode: PortalMode, directory: Path) -> list[str]:
    """`vdsa boot --serve` options for a device whose portals are ``mode``."""
    path = directory / f"portals-{mode.value}.toml"
    path.write_text(f'portals = "{mode.value}"\n')
    return ["--config", str(path)]


def run_cli(*args: str, log_dir: Path, release: str = DEFAULT_RELEASE) -> CliBoot:
    """`vdsa ARGS --kernel RELEASE`, with its JSON summary."""
    done = subprocess.run(
        [sys.executable, "-m", "vdsa_server", *args, "--kernel", release, "--json",
         "--log-dir", str(log_dir)],
        capture_output=True, text=True, timeout=900, check=False, env=vdsa_env(),
    )
    assert done.stdout.strip(), f"no JSON from vdsa {args[0]}; stderr:\n{done.stderr}"
    return CliBoot(done.returncode, json.loads(done.stdout), log_dir, release)
