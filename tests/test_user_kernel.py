"""The user's own kernel (`vdsa boot --kernel-image BZIMAGE --modules DIR`): the
checks of the image and of its modules tree, and boots of a kernel and a
modules tree given as plain paths, laid out as `make modules_install
INSTALL_MOD_PATH=DIR` leaves them. The kernel is a release's stock one,
copied out of its root, so that CI needs no kernel build."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.conftest import vdsa_env
from tests.test_boot_device import SCRIPTS
from vdsa_server.builds.debian_root import RELEASES, DebianRoot, build_root
from vdsa_server.builds.guest_image import DEFAULT_RELEASE, KernelFiles
from vdsa_server.builds.steps import BuildError
from vdsa_server.builds.user_kernel import build_user_guest, kernel_files, kernel_release


@pytest.fixture(scope="module")
def roots() -> dict[str, DebianRoot]:
    return {release: trio.run(build_root, release) for release in RELEASES}


def modules_install(root: DebianRoot, dest: Path, *, dmatest: bool,
                    version: str | None = None) -> Path:
    """``dest`` as modules_install would fill it with ``root``'s dma drivers (and dmatest)."""
    tree = dest / "lib" / "modules" / (version or root.kernel_version)
    shutil.copytree(root.modules / "kernel" / "drivers" / "dma",
                    tree / "kernel" / "drivers" / "dma")
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        shutil.copy(root.modules / name, tree / name)
    if dmatest:
        (tree / "extra").mkdir()
        shutil.copy(root.dmatest, tree / "extra" / "dmatest.ko")
    return dest


@pytest.mark.parametrize("release", RELEASES)
def test_release_string_from_the_setup_header(roots: dict[str, DebianRoot], release: str
                                              ) -> None:
    assert kernel_release(roots[release].kernel) == roots[release].kernel_version


@pytest.mark.parametrize("content", [b"", b"\0" * 4096, b"MZ" + b"x" * 1000,
                                     b"\x7fELF" + b"\0" * 2000])
def test_a_file_that_is_no_bzimage_is_refused(tmp_path: Path, content: bytes) -> None:
    image = tmp_path / "bzImage"
    image.write_bytes(content)
    with pytest.raises(BuildError, match="is not an x86 Linux kernel image"):
        kernel_release(image)


def test_a_missing_image_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="cannot read the kernel image"):
        kernel_release(tmp_path / "nothing")


def check(image: Path, modules: Path | None, tmp_path: Path) -> KernelFiles:
    return trio.run(kernel_files, image, modules, tmp_path)


def test_modules_of_another_kernel_are_refused(roots: dict[str, DebianRoot],
                                               tmp_path: Path) -> None:
    modules = modules_install(roots["bookworm"], tmp_path / "mods", dmatest=False)
    with pytest.raises(BuildError, match=re.escape(
            f"are for kernel {roots['bookworm'].kernel_version}, not "
            f"{roots['sid'].kernel_version}")):
        check(roots["sid"].kernel, modules, tmp_path)


def test_a_directory_without_a_modules_tree_is_refused(roots: dict[str, DebianRoot],
                                                       tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="holds no lib/modules/<release> tree"):
        check(roots["sid"].kernel, tmp_path, tmp_path)


def test_a_vermagic_mismatch_is_refused(roots: dict[str, DebianRoot], tmp_path: Path) -> None:
    # bookworm's modules renamed into sid's kernel's directory.
    modules = modules_install(roots["bookworm"], tmp_path / "mods", dmatest=True,
                              version=roots["sid"].kernel_version)
    with pytest.raises(BuildError, match=re.escape(
            f"built for ['{roots['bookworm'].kernel_version}']")):
        check(roots["sid"].kernel, modules, tmp_path)


def test_a_kernel_without_idxd_is_refused(roots: dict[str, DebianRoot], tmp_path: Path) -> None:
    modules = modules_install(roots["sid"], tmp_path / "mods", dmatest=False)
    shutil.rmtree(modules / "lib" / "modules" / roots["sid"].kernel_version / "kernel" /
                  "drivers" / "dma" / "idxd")
    with pytest.raises(BuildError, match="has no idxd driver"):
        check(roots["sid"].kernel, modules, tmp_path)


def test_idxd_built_in_is_accepted(roots: dict[str, DebianRoot], tmp_path: Path) -> None:
    modules = modules_install(roots["sid"], tmp_path / "mods", dmatest=False)
    tree = modules / "lib" / "modules" / roots["sid"].kernel_version
    shutil.rmtree(tree / "kernel" / "drivers" / "dma" / "idxd")
    with (tree / "modules.builtin").open("a") as f:
        f.write("kernel/drivers/dma/idxd/idxd.ko\n")
    found = check(roots["sid"].kernel, modules, tmp_path)
    assert found.dmatest is None


def test_dmatest_is_taken_from_the_modules_when_built(roots: dict[str, DebianRoot],
                                                     tmp_path: Path) -> None:
    with_it = modules_install(roots["sid"], tmp_path / "with", dmatest=True)
    without = modules_install(roots["sid"], tmp_path / "without", dmatest=False)
    assert check(roots["sid"].kernel, with_it, tmp_path).dmatest is not None
    assert check(roots["sid"].kernel, without, tmp_path).dmatest is None


def test_the_image_is_cached_by_kernel_and_modules(roots: dict[str, DebianRoot],
                                                   tmp_path: Path) -> None:
    image = tmp_path / "bzImage"
    shutil.copy(roots["sid"].kernel, image)
    modules = modules_install(roots["sid"], tmp_path / "mods", dmatest=False)
    first = trio.run(build_user_guest, image, modules)
    assert (first.release, first.dmatest) == (None, False)
    assert first.kernel_version == roots["sid"].kernel_version
    again = trio.run(build_user_guest, image, modules)
    assert again.initramfs == first.initramfs
    with_dmatest = trio.run(build_user_guest, image,
                            modules_install(roots["sid"], tmp_path / "mods2", dmatest=True))
    assert with_dmatest.dmatest
    assert with_dmatest.initramfs != first.initramfs


def vdsa_boot(*args: str | Path, log_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vdsa_server", "boot", "--serve", *map(str, args),
         "--log-dir", str(log_dir)],
        capture_output=True, text=True, timeout=600, check=False, env=vdsa_env())


@pytest.fixture(scope="module")
def plain_kernel(roots: dict[str, DebianRoot], tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[Path, DebianRoot]:
    """The default release's kernel image as a plain file."""
    where = tmp_path_factory.mktemp("user-kernel")
    image = where / "bzImage"
    shutil.copy(roots[DEFAULT_RELEASE].kernel, image)
    return image, roots[DEFAULT_RELEASE]


@pytest.mark.boot
def test_boot_with_the_users_kernel_and_modules_runs_dmatest(
        plain_kernel: tuple[Path, DebianRoot], tmp_path: Path) -> None:
    image, root = plain_kernel
    modules = modules_install(root, tmp_path / "mods", dmatest=True)
    script = tmp_path / "script.sh"
    script.write_text("uname -r\nsh /vdsa/dmatest.sh 2 200\n")
    done = vdsa_boot("--kernel-image", image, "--modules", modules, "--script", script,
                     "--file", SCRIPTS / "dmatest.sh", log_dir=tmp_path / "logs")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("dmatest.run1.failures: 0") == 1, done.stdout
    assert "dmatest.run1.tests: 400" in done.stdout
    assert "no dmatest module" not in done.stderr


@pytest.mark.boot
def test_boot_without_dmatest_says_it_is_absent(plain_kernel: tuple[Path, DebianRoot],
                                                tmp_path: Path) -> None:
    image, root = plain_kernel
    modules = modules_install(root, tmp_path / "mods", dmatest=False)
    script = tmp_path / "script.sh"
    script.write_text("modprobe idxd && echo idxd loaded\nmodprobe dmatest || echo no dmatest\n")
    done = vdsa_boot("--kernel-image", image, "--modules", modules, "--script", script,
                     log_dir=tmp_path / "logs")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"kernel {root.kernel_version} has no dmatest module" in done.stderr
    log = (tmp_path / "logs" / "console.log").read_text()
    assert "[script] idxd loaded" in log
    assert "[script] no dmatest" in log


@pytest.mark.boot
def test_a_kernel_that_never_reaches_init_is_named(plain_kernel: tuple[Path, DebianRoot],
                                                   tmp_path: Path) -> None:
    image, root = plain_kernel
    script = tmp_path / "script.sh"
    script.write_text("true\n")
    # With no init in the initramfs the kernel looks for a root disk, finds none, panics.
    done = vdsa_boot("--kernel-image", image, "--kernel-arg", "rdinit=/vdsa-no-such-init",
                     "--script", script, "--timeout", "300", log_dir=tmp_path / "logs")
    assert done.returncode != 0
    assert f"kernel {root.kernel_version} never reached the image's /init" in done.stderr


def test_modules_without_a_kernel_image_are_refused(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("true\n")
    done = vdsa_boot("--modules", tmp_path, "--script", script, log_dir=tmp_path / "logs")
    assert done.returncode != 0
    assert "--modules needs --kernel-image" in done.stderr
