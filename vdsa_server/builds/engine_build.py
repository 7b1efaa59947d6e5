"""The native descriptor engine (``native/engine``), built by vdsa itself into
the cache: a release build and a sanitized one (ASan + UBSan) for the tests;
and beside it the host reference library of ``vdsa bench`` (``native/bench``).
Warnings are errors in all of them."""

from __future__ import annotations

import enum
import subprocess

from vdsa_server.builds.cache import Artifact, artifact, tree_digest
from vdsa_server.builds.libvfio_user_build import build_libvfio_user, libvfio_user_artifact
from vdsa_server.builds.steps import run_step
from vdsa_server.log import get_logger
from vdsa_server.paths import NATIVE

log = get_logger()

ENGINE_SOURCES = NATIVE / "engine"
HOSTREF_SOURCES = NATIVE / "bench"
HOSTREF_FILENAME = "libvdsa_hostref.so"
COMPILER = "cc"
WARNINGS = ("-Wall", "-Wextra", "-Werror", "-Wshadow", "-Wstrict-prototypes",
            "-Wmissing-prototypes")
COMMON_FLAGS = ("-std=gnu11", "-g", "-fPIC", "-shared", "-pthread", *WARNINGS)
LIBRARIES = ("-l:libvfio-user.so.0", "-lisal")


class Variant(enum.Enum):
    """RELEASE for the server; SANITIZED for the test run (the process that loads it
    needs the sanitizer runtimes preloaded: see :func:`sanitizer_preload`)."""

    RELEASE = "release"
    SANITIZED = "sanitized"

    @property
    def flags(self) -> tuple[str, ...]:
        if self is Variant.RELEASE:
            return ("-O2",)
        return ("-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                "-fno-sanitize-recover=undefined")

    @property
    def filename(self) -> str:
        return f"libvdsa_engine-{self.value}.so"


def _compiler_version() -> str:
    done = subprocess.run([COMPILER, "--version"], capture_output=True, text=True, check=True)
    return done.stdout.splitlines()[0]


def engine_artifact() -> Artifact:
    sources = sorted([*ENGINE_SOURCES.glob("*.[ch]"), *HOSTREF_SOURCES.glob("*.[ch]")])
    return artifact(
        "engine",
        {
            "sources": tree_digest(sources),
            "compiler": _compiler_version(),
            "flags": " ".join(COMMON_FLAGS + LIBRARIES)
            + "".join(f" {v.value}: {' '.join(v.flags)}" for v in Variant),
            "libvfio-user": libvfio_user_artifact().key,
        },
    )


async def build_engine(*, force: bool = False) -> Artifact:
    """Build (or reuse) both variants of the engine, and the host reference library."""
    target = engine_artifact()
    if target.is_complete() and not force:
        log.info("engine.build.cached", path=str(target.path))
        return target
    vfu = libvfio_user_artifact()
    if not vfu.is_complete():
        await build_libvfio_user()
    lib_dir = vfu.path / "lib"
    with target.building() as scratch:
        for variant in Variant:
            await run_step(
                f"engine.{variant.value}",
                [COMPILER, *COMMON_FLAGS, *variant.flags, f"-I{vfu.path / 'include'}",
                 "-o", scratch / variant.filename, *sorted(ENGINE_SOURCES.glob("*.c")),
                 f"-L{lib_dir}", *LIBRARIES, f"-Wl,-rpath,{lib_dir}"],
                log_file=scratch / "build.log",
            )
        await run_step(
            "engine.hostref",
            [COMPILER, *COMMON_FLAGS, *Variant.RELEASE.flags, "-o", scratch / HOSTREF_FILENAME,
             *sorted(HOSTREF_SOURCES.glob("*.c")), "-lisal"],
            log_file=scratch / "build.log",
        )
    log.info("engine.build.done", path=str(target.path))
    return target


def sanitizer_preload() -> str:
    """LD_PRELOAD value for a process that loads the sanitized engine: the ASan runtime
    must come first in the initial library list, and UBSan's with it."""
    runtimes = []
    for name in ("libasan.so", "libubsan.so"):
        done = subprocess.run([COMPILER, f"-print-file-name={name}"], capture_output=True,
                              text=True, check=True)
        runtimes.append(done.stdout.strip())
    return " ".join(runtimes)
