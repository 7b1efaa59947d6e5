"""The Debian release roots that guest images are made from: names, the
resolution of paths inside a root, and the errors of a bad release, mirror or
package list, which must leave nothing half-built in the cache."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from vdsa_server.builds import debian_root
from vdsa_server.builds.debian_root import (
    RELEASES,
    DebianRootMissing,
    build_root,
    find_root,
    resolve_inside,
    root_artifact,
    sources,
)
from vdsa_server.builds.steps import BuildError


def test_releases_oldest_first() -> None:
    assert RELEASES == ("bookworm", "trixie", "sid")


def test_root_key_follows_release_mirror_and_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = {root_artifact(r).key for r in RELEASES}
    assert len(keys) == 3
    monkeypatch.setenv("VDSA_DEBIAN_MIRROR", "http://mirror.example/debian")
    assert root_artifact("sid").key not in keys
    keys.add(root_artifact("sid").key)
    monkeypatch.setattr(debian_root, "PACKAGES", (*debian_root.PACKAGES, "strace"))
    assert root_artifact("sid").key not in keys


def test_a_stable_release_has_its_updates_and_security_suites(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert sources("sid") == "deb http://deb.debian.org/debian sid main\n"
    assert sources("trixie").splitlines() == [
        "deb http://deb.debian.org/debian trixie main",
        "deb http://deb.debian.org/debian trixie-updates main",
        "deb http://deb.debian.org/debian-security trixie-security main",
    ]
    before = root_artifact("bookworm").key
    monkeypatch.setenv("VDSA_DEBIAN_SECURITY_MIRROR", "http://security.example/debian-security")
    assert "security.example" in sources("bookworm")
    assert root_artifact("bookworm").key != before


@pytest.mark.parametrize("name", ["jessie", "", "Trixie", "../sid", "stable"])
def test_unknown_release_is_refused_before_anything_is_made(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VDSA_CACHE", str(tmp_path))
    with pytest.raises(BuildError, match="unknown Debian release"):
        trio.run(build_root, name)
    assert list(tmp_path.iterdir()) == []


# None: the namespace this machine allows (private unless / is no mount point); False: the
# fallback, which works everywhere.
@pytest.mark.parametrize("private", [None, False], ids=["this-machine", "fallback"])
def test_commands_in_a_root_get_their_own_proc(tmp_path: Path, private: bool | None) -> None:
    root = tmp_path / "root"
    for directory in ("proc", "bin", "lib", "lib64", "usr"):
        (root / directory).mkdir(parents=True)
    # Just enough of a root for the host's static busybox to run in it.
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    argv = debian_root.in_root(root, "/bin/busybox", "cat", "/proc/self/stat", private=private)
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1] == "(busybox)"
    # Nothing stays mounted once the command is done.
    assert not os.path.ismount(root / "proc")


def test_missing_root_names_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VDSA_CACHE", str(tmp_path))
    with pytest.raises(DebianRootMissing, match="vdsa build guest --kernel trixie"):
        find_root("trixie")


def test_paths_resolve_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "lib").mkdir()
    (root / "usr" / "bin" / "tool").write_text("tool")
    (root / "usr" / "lib" / "libx.so.1.2").write_text("lib")
    (root / "bin").symlink_to("usr/bin")
    # An absolute link means the root's /usr/lib, never the host's.
    (root / "usr" / "lib" / "libx.so.1").symlink_to("/usr/lib/libx.so.1.2")
    (root / "lib").symlink_to("usr/lib")
    (root / "usr" / "lib" / "up").symlink_to("../../../../../usr/lib")
    assert resolve_inside(root, Path("/bin/tool")) == root / "usr" / "bin" / "tool"
    assert resolve_inside(root, Path("/lib/libx.so.1")) == root / "usr" / "lib" / "libx.so.1.2"
    assert resolve_inside(root, Path("/usr/lib/up/libx.so.1.2")) == (
        root / "usr" / "lib" / "libx.so.1.2")
    (root / "loop").symlink_to("/loop")
    with pytest.raises(BuildError, match="too many symlinks"):
        resolve_inside(root, Path("/loop"))


@pytest.fixture
def empty_mirror(tmp_path: Path) -> Iterator[str]:
    """An HTTP server with no Debian archive in it."""
    (tmp_path / "www").mkdir()
    server = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
         "--directory", str(tmp_path / "www")], stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        port = re.search(r"port (\d+)", banner)
        assert port, banner
        yield f"http://127.0.0.1:{port[1]}/debian"
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


def assert_nothing_left(cache: Path) -> None:
    left = [p.name for p in cache.iterdir() if p.name != "logs"]
    assert left == [], left


def test_a_mirror_without_the_release_is_a_clear_error(
        empty_mirror: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("VDSA_CACHE", str(cache))
    monkeypatch.setenv("VDSA_DEBIAN_MIRROR", empty_mirror)
    with pytest.raises(BuildError, match=r"root-trixie-debootstrap.*\n.*(?s:.*)Release"):
        trio.run(build_root, "trixie")
    assert_nothing_left(cache)


@pytest.mark.network
def test_a_package_the_mirror_lacks_is_named(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("VDSA_CACHE", str(cache))
    monkeypatch.setattr(debian_root, "PACKAGES", (*debian_root.PACKAGES, "vdsa-no-such-package"))
    with pytest.raises(BuildError, match=r"(?s)root-trixie-apt-install.*vdsa-no-such-package"):
        trio.run(build_root, "trixie")
    assert_nothing_left(cache)
