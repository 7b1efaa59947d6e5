"""Mapped portals: BAR2 as a memfd the submitter writes and the engine's poller sweeps.  The
submitter here keeps the contract of native/engine/poller.c as vdsa's QEMU will: it waits
for qword 0 of the slot to be zero, stores qwords 7..1, then qword 0 (on x86, stores stay in
program order)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.test_engine import (
    COMPLETE,
    DATA,
    OP_BATCH,
    OP_MEMMOVE,
    OP_NOOP,
    RECORD,
    SETTINGS,
    WAIT,
    WQ_PORTALS,
    Rig,
    descriptor,
)
from tests.test_engine_protocol import server_thread
from vdsa_server.client import VfioUserClient
from vdsa_server.client.portals import MappedPortals
from vdsa_server.client.protocol import RegionInfoFlag
from vdsa_server.device.config import DeviceConfig, PortalMode
from vdsa_server.device.pci import Bar
from vdsa_server.engine import Engine

NUM_WQS = 4
BAR2_SIZE = NUM_WQS * WQ_PORTALS
SLOTS_PER_WQ = WQ_PORTALS // 64
BATCH_LIST = RECORD + 0x10000


class Portals(MappedPortals):
    """The submitter's view of BAR2, addressed by WQ and slot."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__(fd, size, WAIT)

    def qword0_of(self, wq: int, slot: int) -> int:
        return self.qword(wq * WQ_PORTALS + slot * 64)

    def submit_to(self, wq: int, data: bytes, slot: int = 0) -> None:
        self.submit(wq * WQ_PORTALS + slot * 64, data)


@pytest.fixture
def mapped() -> Iterator[tuple[Rig, Portals]]:
    with Engine(num_wqs=NUM_WQS, num_msix=NUM_WQS + 1) as engine:
        portals = Portals(engine.map_portals(BAR2_SIZE), BAR2_SIZE)
        try:
            engine.enable_wq(0, SETTINGS)
            yield Rig(engine), portals
        finally:
            portals.close()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def test_a_descriptor_written_to_a_slot_runs_and_the_slot_is_handed_back(
        mapped: tuple[Rig, Portals]) -> None:
    rig, portals = mapped
    rig.put(DATA, bytes(range(256)) * 16)
    portals.submit_to(0, rig.memmove(0, 4096), slot=9)
    assert rig.wait_status(0) == 1
    assert rig.at(DATA + (8 << 20), 4096) == bytes(range(256)) * 16
    assert portals.qword0_of(0, 9) == 0
    assert rig.engine.counters(0).submitted == 1


def test_many_descriptors_rotating_over_every_slot_all_complete(
        mapped: tuple[Rig, Portals]) -> None:
    """The stock driver's pattern: the next 64-byte slot each time, wrapping the page."""
    rig, portals = mapped
    count = 3 * SLOTS_PER_WQ
    for index in range(count):
        portals.submit_to(0, descriptor(OP_NOOP, COMPLETE, record=RECORD + 32 * index),
                       slot=index % SLOTS_PER_WQ)
        if index % SETTINGS.size == SETTINGS.size - 1:
            rig.wait_status(index)  # stay within the WQ, as a driver's credits do
    for index in range(count):
        assert rig.wait_status(index) == 1
    assert rig.engine.counters(0).submitted == count


def test_one_slot_written_again_and_again_loses_nothing(mapped: tuple[Rig, Portals]) -> None:
    """DPDK's pattern: every descriptor to the same address."""
    rig, portals = mapped
    for index in range(200):
        portals.submit_to(0, descriptor(OP_NOOP, COMPLETE, record=RECORD + 32 * index))
        rig.wait_status(index)
    assert rig.engine.counters(0).submitted == 200


def test_a_slot_without_qword_0_is_left_alone(mapped: tuple[Rig, Portals]) -> None:
    rig, portals = mapped
    slot = 3 * 64
    for q in range(1, 8):
        portals.store_raw(slot + 8 * q, 0xA5A5A5A5A5A5A5A5)
    time.sleep(0.05)
    assert rig.engine.counters(0).submitted == 0
    assert [portals.qword(slot + 8 * q) for q in range(1, 8)] == [0xA5A5A5A5A5A5A5A5] * 7


def test_slots_of_a_disabled_wq_are_taken_and_dropped(mapped: tuple[Rig, Portals]) -> None:
    rig, portals = mapped
    portals.submit_to(2, descriptor(OP_NOOP, COMPLETE, record=RECORD), slot=1)
    wait_until(lambda: rig.engine.counters(2).dropped_disabled == 1, "the drop was not counted")
    assert portals.qword0_of(2, 1) == 0
    assert rig.status(0) == 0


def test_a_descriptor_written_while_every_wq_is_disabled_never_runs(
        mapped: tuple[Rig, Portals]) -> None:
    """With no WQ enabled the poller sleeps and sweeps nothing, so the descriptor stays in its
    slot; enabling the WQ drops it (as DSA dropped it at the portal) instead of running it,
    long after its submitter gave it up and freed its buffers."""
    rig, portals = mapped
    rig.engine.disable_wq(0)
    time.sleep(0.1)  # past the poller's spinning: asleep until a WQ is enabled
    portals.submit_to(0, descriptor(OP_NOOP, COMPLETE, record=RECORD), slot=5)
    time.sleep(0.05)
    rig.engine.enable_wq(0, SETTINGS)
    portals.submit_to(0, descriptor(OP_NOOP, COMPLETE, record=RECORD + 32), slot=6)
    assert rig.wait_status(1) == 1
    assert rig.status(0) == 0
    assert portals.qword0_of(0, 5) == 0
    counters = rig.engine.counters(0)
    assert (counters.dropped_disabled, counters.submitted) == (1, 1)


def test_a_full_wq_drops_what_does_not_fit(mapped: tuple[Rig, Portals]) -> None:
    rig, portals = mapped
    rig.engine.disable_wq(0)
    rig.engine.enable_wq(0, dataclasses.replace(SETTINGS, size=1))
    # Work that outlasts the submissions: a batch of 64 copies of 2 MiB.
    copy = descriptor(OP_MEMMOVE, 0, src=DATA, dst=DATA + (8 << 20), size=2 << 20)
    rig.put(BATCH_LIST, copy * 64)
    long_copy = descriptor(OP_BATCH, COMPLETE, record=RECORD, src=BATCH_LIST, size=64)
    for index in range(20):
        portals.submit_to(0, long_copy if index == 0 else descriptor(
            OP_NOOP, COMPLETE, record=RECORD + 32 * index), slot=index % SLOTS_PER_WQ)
    wait_until(lambda: portals.qword0_of(0, 19) == 0, "the last slot was not taken")
    counters = rig.engine.counters(0)
    assert counters.submitted + counters.dropped_full == 20
    assert counters.dropped_full > 0


def test_an_idle_poller_sleeps_and_an_enable_wakes_it(mapped: tuple[Rig, Portals]) -> None:
    rig, portals = mapped
    wait_until(lambda: rig.engine.portal_sleeps() > 20, "the idle poller never slept")
    rig.engine.enable_wq(1, SETTINGS)
    portals.submit_to(1, descriptor(OP_NOOP, COMPLETE, record=RECORD))
    assert rig.wait_status(0) == 1


def test_map_portals_refuses_a_bar_too_small_for_the_wqs() -> None:
    with Engine(num_wqs=NUM_WQS, num_msix=NUM_WQS + 1) as engine, \
            pytest.raises(OSError, match="Invalid argument"):
        engine.map_portals(BAR2_SIZE - WQ_PORTALS)


async def test_a_client_maps_bar2_and_submits_through_memory_and_messages(
        tmp_path: Path) -> None:
    """One server, both paths at once: stores into the mapped BAR, and region writes."""
    from tests.test_engine_protocol import RECORD as GUEST_RECORD
    from tests.test_engine_protocol import connected_guest
    from tests.test_engine_protocol import descriptor as guest_descriptor
    from vdsa_server.device.descriptors import DsaOpcode

    sock = tmp_path / "dsa.sock"
    config = DeviceConfig(portals=PortalMode.MAPPED)
    async with server_thread(sock, config) as server, connected_guest(sock, server) as guest:
        client: VfioUserClient = guest.client
        info = await client.device_get_region_info(Bar.PORTALS)
        assert RegionInfoFlag.MMAP in info.flags
        assert info.sparse_mmap is not None
        assert [(a.offset, a.size) for a in info.sparse_mmap] == [(0, info.size)]
        assert info.fds
        portals = Portals(info.fds[0], info.size)  # the client closes its fds itself
        try:
            noop = guest_descriptor(DsaOpcode.NOOP)
            guest.memory.write(GUEST_RECORD, bytes(32))
            portals.submit_to(0, noop, slot=4)
            assert await guest.interrupt(1) == 1
            assert guest.status(GUEST_RECORD) == 1
            trapped = await guest.run(noop)
            assert trapped.status == 1
        finally:
            portals.close()
