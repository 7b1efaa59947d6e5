"""A writer for newc ("070701") cpio archives, the format the kernel unpacks as
an initramfs.

Every entry is owned by root with mtime 0, so the same tree always packs to the
same bytes. The kernel also accepts several archives concatenated (compressed
or not) provided each uncompressed one starts at a 4-byte aligned offset;
:func:`pad4` gives that alignment to a file that precedes another archive.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _padding(length: int) -> bytes:
    return b"\0" * (-length % 4)


def pad4(stream: BinaryIO) -> None:
    """Write zero bytes up to the next multiple of 4 of the stream's position."""
    stream.write(_padding(stream.tell()))


def normalize(name: str) -> str:
    """An archive member name: relative, "/"-separated, without "." or ".." parts."""
    parts = [p for p in PurePosixPath(name).parts if p not in ("/", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"bad cpio member name {name!r}")
    return "/".join(parts)


class CpioWriter:
    """Appends entries to ``stream``; :meth:`finish` writes the trailer."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._ino = 0
        self._finished = False

    def _entry(self, name: str, mode: int, data: bytes, nlink: int) -> None:
        if self._finished:
            raise ValueError("cpio archive already finished")
        self._ino += 1
        encoded = name.encode() + b"\0"
        # ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        # rdevmajor, rdevminor, namesize, check
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        header = MAGIC + b"".join(b"%08X" % f for f in fields) + encoded
        self._stream.write(header + _padding(len(header)))
        self._stream.write(data + _padding(len(data)))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(normalize(name), stat.S_IFDIR | (mode & 0o7777), b"", 2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(normalize(name), stat.S_IFREG | (mode & 0o7777), data, 1)

    def symlink(self, name: str, target: str) -> None:
        self._entry(normalize(name), stat.S_IFLNK | 0o777, target.encode(), 1)

    def tree(self, root: Path, prefix: str = "") -> None:
        """Add everything below ``root`` (not ``root`` itself), each directory
        before its contents, in sorted order; modes come from the files."""
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            name = f"{prefix}/{entry.name}" if prefix else entry.name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                self.symlink(name, os.readlink(entry.path))
            elif stat.S_ISDIR(st.st_mode):
                self.directory(name, st.st_mode)
                self.tree(Path(entry.path), name)
            elif stat.S_ISREG(st.st_mode):
                self.file(name, Path(entry.path).read_bytes(), st.st_mode)
            else:
                raise ValueError(f"cannot archive {entry.path}: not a file, directory or symlink")

    def finish(self) -> None:
        self._entry(TRAILER, 0, b"", 1)
        self._finished = True
