"""Bugs of stock Debian kernels that vdsa's device exposes, and how a boot test
says that one of them, and nothing else, made it fail.

A test whose boot runs a step that a known bug breaks on some releases calls
:func:`expect_bug` first. On those releases the test becomes an expected
failure that must fail by :class:`KernelBugHit`, raised when the bug's
signature is in the guest's dmesg, with the matching lines as evidence; a
failure of any other kind stays a failure, and a pass (the bug fixed in a new
kernel) fails strictly, so the list is kept true. Elsewhere nothing changes.
The README's "Kernel bugs found with vdsa" lists the same bugs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

EVIDENCE_LINES = 12


@dataclass(frozen=True)
class KernelBug:
    name: str
    releases: frozenset[str]
    summary: str
    signature: re.Pattern[str]  # searched in dmesg, across lines


class KernelBugHit(AssertionError):
    """A known kernel bug showed in the guest's dmesg."""


EVL_FREE_NULL_DEREF = KernelBug(
    name="idxd-evl-free-null-deref",
    releases=frozenset({"trixie"}),
    summary=("6.12: idxd_device_drv_remove() calls idxd_device_evl_free() unconditionally; on a "
             "device without an event log (DSA 1.0) idxd->evl is NULL and mutex_lock() "
             "dereferences it when dsa0 is disabled or unbound"),
    signature=re.compile(r"BUG: kernel NULL pointer dereference(?s:.){0,3000}?"
                         r"idxd_device_evl_free"),
)

UNBIND_WHILE_ENABLED_UAF = KernelBug(
    name="idxd-remove-use-after-free",
    releases=frozenset({"bookworm", "trixie", "sid"}),
    summary=("6.1, 6.12 and 7.2: idxd_remove() with dsa0 still enabled unregisters and frees the "
             "WQs, then idxd_device_drv_remove() prints a freed WQ's name (dev_warn): with "
             "slub_debug's poisoning a general protection fault on 0x6b6b6b6b6b6b6b6b, "
             "without it a read of freed memory"),
    signature=re.compile(r"general protection fault, probably for non-canonical address "
                         r"0x6b6b6b6b6b6b6b6b(?s:.){0,3000}?idxd_device_drv_remove"),
)

KNOWN_BUGS = (EVL_FREE_NULL_DEREF, UNBIND_WHILE_ENABLED_UAF)  # the README lists them in this order


def evidence(dmesg: str, match: re.Match[str]) -> str:
    start = dmesg.rfind("\n", 0, match.start()) + 1
    return "\n".join(dmesg[start:].splitlines()[:EVIDENCE_LINES])


def raise_if_hit(dmesg: str, bug: KernelBug) -> None:
    match = bug.signature.search(dmesg)
    if match is not None:
        raise KernelBugHit(f"{bug.name}: {bug.summary}\nevidence from the guest's dmesg:\n"
                           f"{evidence(dmesg, match)}")


def expect_bug(request: pytest.FixtureRequest, release: str, dmesg_file: Path,
               bug: KernelBug) -> None:
    """Mark the calling test as ``bug``'s expected failure on its releases, and fail it with
    the evidence when the bug showed in the boot's dmesg."""
    if release not in bug.releases:
        return
    request.applymarker(pytest.mark.xfail(raises=KernelBugHit, strict=True,
                                          reason=f"{release}'s kernel: {bug.summary}"))
    dmesg = dmesg_file.read_text(errors="replace") if dmesg_file.is_file() else ""
    raise_if_hit(dmesg, bug)
