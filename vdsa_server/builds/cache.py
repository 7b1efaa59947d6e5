"""The build cache: slow outputs (QEMU, libvfio-user, the guest image) live
outside the repo, one directory per artifact, named by a hash of its inputs.

An artifact directory is built under a temporary name and renamed into place
only when complete, so an interrupted build never looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "vdsa-artifact.json"


def cache_root() -> Path:
    """``$VDSA_CACHE``, else ``$XDG_CACHE_HOME/vdsa``, else ``~/.cache/vdsa``."""
    explicit = os.environ.get("VDSA_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "vdsa"


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(paths: list[Path]) -> str:
    """Digest of several files by content and name, in a stable order."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.name.encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    """One cached build output, identified by its name and its inputs."""

    name: str
    inputs: Mapping[str, str]
    root: Path

    @property
    def key(self) -> str:
        blob = json.dumps(dict(sorted(self.inputs.items())), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def path(self) -> Path:
        return self.root / f"{self.name}-{self.key}"

    def is_complete(self) -> bool:
        return (self.path / MANIFEST).is_file()

    def _remove_abandoned(self) -> None:
        """Scratch directories of this artifact whose builder was killed (a SIGKILL skips
        the cleanup below)."""
        for scratch in self.root.glob(f".{self.name}-{self.key}.*.partial"):
            pid = scratch.name.removesuffix(".partial").rsplit(".", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(scratch, ignore_errors=True)

    @contextmanager
    def building(self) -> Iterator[Path]:
        """Yield a scratch directory; on success it becomes ``self.path``."""
        self.root.mkdir(parents=True, exist_ok=True)
        # One scratch directory per process: concurrent builds of one artifact must not
        # share (and delete) each other's half-built files.
        scratch = self.root / f".{self.name}-{self.key}.{os.getpid()}.partial"
        self._remove_abandoned()
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        try:
            yield scratch
            (scratch / MANIFEST).write_text(
                json.dumps({"name": self.name, "inputs": dict(self.inputs)}, indent=2) + "\n"
            )
            shutil.rmtree(self.path, ignore_errors=True)
            try:
                scratch.rename(self.path)
            except OSError:
                if not self.is_complete():
                    raise
                # Another process finished the same artifact meanwhile; keep its copy.
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def artifact(name: str, inputs: Mapping[str, str], root: Path | None = None) -> Artifact:
    return Artifact(name=name, inputs=dict(inputs), root=root or cache_root())
