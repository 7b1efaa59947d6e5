"""The device's side of its two native partners: what a descriptor engine must do for the
device's commands, what it tells the device back (software errors), and where interrupts go.
The engine (:mod:`vdsa_server.engine`) implements these; the device model never imports it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class WqSettings:
    """What the engine needs of an enabled WQ's WQCFG and GRPCFG."""

    size: int
    priority: int
    engines: int  # bitmap of the engines of the WQ's group
    max_transfer_size: int
    max_batch_size: int


@dataclass(frozen=True)
class SoftwareError:
    """One error for SWERR, as ``struct vdsa_swerr``."""

    error: int
    operation: int
    wq: int
    fault_rw: int
    batch: int
    desc_valid: int
    batch_index: int
    invalid_flags: int
    fault_addr: int



class InterruptSink(Protocol):
    """Where the device raises MSI-X interrupts."""

    def trigger(self, vector: int) -> None:
        """Raise MSI-X ``vector``: 0 for device events, n + 1 for WQ n."""


class WqEngine(Protocol):
    """The descriptor engine, as the device's commands drive it."""

    def enable_wq(self, wq: int, settings: WqSettings) -> None:
        """Start taking descriptors for ``wq``."""

    def disable_wq(self, wq: int) -> None:
        """Stop taking descriptors; return when those taken are done."""

    def start_disable(self, wq: int) -> None:
        """Stop taking descriptors and return at once; those taken still run, and
        ``waiting`` is true until they are done."""

    def start_drain(self, wq: int) -> None:
        """Return at once; ``waiting`` is true until every descriptor taken so far is done."""

    def waiting(self, wq: int) -> bool:
        """Whether a drain or disable started on ``wq`` is still waiting for descriptors."""

    def abort_wq(self, wq: int) -> None:
        """Drop queued descriptors; return when those in progress have stopped."""

    def reset(self) -> None:
        """Every WQ disabled, queues dropped, interrupt handles released."""

    def set_int_handle(self, handle: int, granted: bool) -> None:
        """Grant or release an interrupt handle for descriptors."""
