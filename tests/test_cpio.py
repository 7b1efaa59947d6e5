"""The newc writer, checked against GNU cpio and against the kernel's rules for
concatenated initramfs archives."""

from __future__ import annotations

import gzip
import io
import os
import stat
import subprocess
import zlib
from pathlib import Path

import pytest

from vdsa_server.builds.cpio import MAGIC, TRAILER, CpioWriter, normalize, pad4

HEADER_SIZE = 110


def archive(build: list[tuple[str, str, bytes | str, int]]) -> bytes:
    """Entries as (kind, name, data or target, mode)."""
    buffer = io.BytesIO()
    writer = CpioWriter(buffer)
    for kind, name, data, mode in build:
        if kind == "dir":
            writer.directory(name, mode)
        elif kind == "file":
            assert isinstance(data, bytes)
            writer.file(name, data, mode)
        else:
            assert isinstance(data, str)
            writer.symlink(name, data)
    writer.finish()
    return buffer.getvalue()


def extract(data: bytes, dest: Path) -> None:
    """Unpack with GNU cpio; -u lets a later archive replace a file, as the kernel does."""
    dest.mkdir(exist_ok=True)
    subprocess.run(
        ["cpio", "-i", "-d", "-u", "--quiet", "--no-absolute-filenames"],
        input=data,
        cwd=dest,
        check=True,
    )


def walk(root: Path) -> dict[str, tuple[int, bytes | str]]:
    """name -> (st_mode, contents or symlink target) for everything below root."""
    found: dict[str, tuple[int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                found[rel] = (st.st_mode, os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                found[rel] = (st.st_mode, path.read_bytes())
            else:
                found[rel] = (st.st_mode, b"")
    return found


def members(data: bytes) -> list[tuple[int, dict[str, int], str, bytes]]:
    """Parse one newc archive strictly: (offset, fields, name, data) up to and
    including the trailer, checking the 4-byte alignment of every part."""
    names = (
        "ino",
        "mode",
        "uid",
        "gid",
        "nlink",
        "mtime",
        "filesize",
        "devmajor",
        "devminor",
        "rdevmajor",
        "rdevminor",
        "namesize",
        "check",
    )
    out = []
    offset = 0
    while True:
        assert offset % 4 == 0
        assert data[offset : offset + 6] == MAGIC
        raw = data[offset + 6 : offset + HEADER_SIZE]
        fields = {n: int(raw[i * 8 : i * 8 + 8], 16) for i, n in enumerate(names)}
        name_end = offset + HEADER_SIZE + fields["namesize"]
        assert data[name_end - 1] == 0
        name = data[offset + HEADER_SIZE : name_end - 1].decode()
        body_start = name_end + (-name_end % 4)
        assert data[name_end:body_start] == b"\0" * (body_start - name_end)
        body_end = body_start + fields["filesize"]
        out.append((offset, fields, name, data[body_start:body_end]))
        offset = body_end + (-body_end % 4)
        assert data[body_end:offset] == b"\0" * (offset - body_end)
        if name == TRAILER:
            return out


def archive_length(data: bytes) -> int:
    """Bytes that the newc archive at the start of ``data`` occupies, with padding."""
    offset, fields, _, _ = members(data)[-1]
    end = offset + HEADER_SIZE + fields["namesize"]
    return end + (-end % 4)


def kernel_segments(blob: bytes) -> list[bytes]:
    """Split an initrd the way the kernel's unpack_to_rootfs does: NUL padding
    between archives, an uncompressed archive only at a 4-byte aligned offset,
    a compressed one (here gzip) continuing right after its stream."""
    segments = []
    offset = 0
    while offset < len(blob):
        if blob[offset] == 0:
            offset += 1
        elif blob.startswith(MAGIC, offset):
            assert offset % 4 == 0, f"uncompressed archive at unaligned offset {offset}"
            length = archive_length(blob[offset:])
            segments.append(blob[offset : offset + length])
            offset += length
        else:
            assert blob.startswith(b"\x1f\x8b", offset), f"unknown data at offset {offset}"
            inflater = zlib.decompressobj(wbits=31)
            segments.append(inflater.decompress(blob[offset:]))
            assert inflater.eof
            offset = len(blob) - len(inflater.unused_data)
    return segments


SAMPLE: list[tuple[str, str, bytes | str, int]] = [
    ("dir", "bin", b"", 0o755),
    ("file", "bin/tool", b"#!/bin/sh\necho hi\n", 0o755),
    ("dir", "etc", b"", 0o700),
    ("file", "etc/empty", b"", 0o644),
    ("file", "etc/secret", b"s3cret", 0o600),
    ("file", "etc/setuid", b"x", 0o4755),
    ("link", "etc/tool", "/bin/tool", 0),
    ("link", "etc/relative", "../bin/tool", 0),
    ("dir", "deep", b"", 0o755),
    ("dir", "deep/er", b"", 0o755),
    *[("file", f"deep/er/pad{n}", bytes(range(n)) * 3, 0o644) for n in range(8)],
    ("file", "binary", bytes(range(256)) * 33, 0o644),
]


def test_round_trip_through_cpio(tmp_path: Path) -> None:
    extract(archive(SAMPLE), tmp_path / "out")
    found = walk(tmp_path / "out")
    assert sorted(found) == sorted(name for _, name, _, _ in SAMPLE)
    for kind, name, data, mode in SAMPLE:
        st_mode, contents = found[name]
        if kind == "link":
            assert stat.S_ISLNK(st_mode)
            assert contents == data
        else:
            assert stat.S_ISDIR(st_mode) == (kind == "dir"), name
            assert stat.S_IMODE(st_mode) == mode, name
            if kind == "file":
                assert contents == data, name


def test_tree_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    extract(archive(SAMPLE), src)
    buffer = io.BytesIO()
    writer = CpioWriter(buffer)
    writer.tree(src)
    writer.finish()
    extract(buffer.getvalue(), tmp_path / "copy")
    assert walk(tmp_path / "copy") == walk(src)
    # Directories come before their contents.
    names = [name for _, _, name, _ in members(buffer.getvalue())]
    assert names.index("deep") < names.index("deep/er") < names.index("deep/er/pad0")


def test_tree_refuses_special_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="not a file"):
        CpioWriter(io.BytesIO()).tree(tmp_path)


def test_newc_layout_and_trailer() -> None:
    data = archive(SAMPLE)
    parsed = members(data)
    assert len(data) % 4 == 0
    assert archive_length(data) == len(data)
    _, last_fields, last_name, _ = parsed[-1]
    assert last_name == TRAILER
    assert last_fields["mode"] == 0
    assert last_fields["filesize"] == 0
    inodes = [fields["ino"] for _, fields, _, _ in parsed]
    assert len(set(inodes)) == len(inodes)
    for _, fields, name, body in parsed[:-1]:
        assert (fields["uid"], fields["gid"], fields["mtime"]) == (0, 0, 0), name
        assert fields["filesize"] == len(body)
    # Same entries, same bytes.
    assert archive(SAMPLE) == data


def test_names_are_normalized() -> None:
    assert normalize("/vdsa//script") == "vdsa/script"
    assert normalize("./a/./b") == "a/b"
    for bad in ("", "/", "..", "a/../../b"):
        with pytest.raises(ValueError, match="bad cpio member name"):
            normalize(bad)


def test_finished_archive_takes_no_more_entries() -> None:
    writer = CpioWriter(io.BytesIO())
    writer.finish()
    with pytest.raises(ValueError, match="finished"):
        writer.file("late", b"")


def test_concatenated_archives_extract_both(tmp_path: Path) -> None:
    first = archive(
        [
            ("dir", "a", b"", 0o755),
            ("file", "a/one", b"1", 0o644),
            ("file", "shared", b"old", 0o644),
        ]
    )
    second = archive(
        [
            ("dir", "b", b"", 0o755),
            ("file", "b/two", b"22", 0o755),
            ("file", "shared", b"new", 0o644),
        ]
    )
    compressed = io.BytesIO()
    compressed.write(gzip.compress(first, mtime=0))
    pad4(compressed)
    for blob in (first + second, compressed.getvalue() + second):
        segments = kernel_segments(blob)
        assert segments == [first, second]
        out = tmp_path / f"out{len(blob)}"
        for segment in segments:
            extract(segment, out)
        found = walk(out)
        assert found["a/one"][1] == b"1"
        assert found["b/two"][1] == b"22"
        assert found["shared"][1] == b"new"


def test_unpadded_compressed_archive_breaks_the_next_one() -> None:
    first = archive([("file", "x", b"x", 0o644)])
    compressed = gzip.compress(first, mtime=0)
    if len(compressed) % 4 == 0:
        compressed += b"\0"  # misalign on purpose: padding is what this checks
    with pytest.raises(AssertionError, match="unaligned"):
        kernel_segments(compressed + first)
