"""Where the checkout's non-Python parts live (vdsa runs from an editable install)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
QEMU_CONFIGS = REPO_ROOT / "qemu-configs"
QEMU_PATCHES = QEMU_CONFIGS / "patches"
LIBVFIO_USER_PATCHES = QEMU_PATCHES / "libvfio-user"
NATIVE = REPO_ROOT / "native"


def require_checkout() -> None:
    """vdsa needs its checkout (qemu-configs/, native/): say so if it is missing."""
    if not QEMU_CONFIGS.is_dir():
        raise FileNotFoundError(
            f"{QEMU_CONFIGS} is missing: install vdsa from its checkout with `pip install -e .`"
        )
