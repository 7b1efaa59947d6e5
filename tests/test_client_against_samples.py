"""The client harness against real vfio-user servers: libvfio-user's sample servers.

``gpio-pci-idio-16`` is a plain device (a 256-byte BAR2, one INTx vector, a migration region); it
waits for a new client after each disconnect.  ``server`` maps the DMA memory the client offers
and has a sparse-mmap BAR1; writing an absolute time to its 8-byte BAR0 arms a timer that
triggers INTx and then makes the server write 4 KiB of 'A' to the start of the first DMA region
and read it back, with DMA_WRITE/DMA_READ messages.  It exits when its DMA check fails, and when
its client disconnects.

Each server runs in the test's tmp_path with ``-v``; its log is shown if the test fails.
"""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from vdsa_server.builds.libvfio_user_build import cached_sample, libvfio_user_artifact
from vdsa_server.client import (
    Command,
    ConnectionClosed,
    GuestMemory,
    PciIrq,
    PciRegion,
    ServedDma,
    VfioUserClient,
    VfioUserError,
    VfioUserTimeout,
)
from vdsa_server.client.protocol import (
    HEADER_SIZE,
    DeviceFlag,
    DmaMapFlag,
    HeaderFlag,
    IrqInfoFlag,
    MessageType,
    RegionInfoFlag,
    SparseMmapArea,
    encode_device_get_info,
    encode_dma_map,
)

GPIO_VENDOR, GPIO_DEVICE = 0x494F, 0x0DC8
START_LIMIT = 10.0
# __SO_ACCEPTCON in /proc/net/unix's Flags column: the socket listens.
SO_ACCEPTCON = 0x10000
DMA_IOVA = 0x10_0000
DMA_SIZE = 4 * mmap.PAGESIZE
SAMPLE_DMA_SIZE = 4096  # samples/server.c do_dma_io()
# libvfio-user's migration region type (VFIO_REGION_TYPE_MIGRATION, _SUBTYPE_MIGRATION).
MIGRATION_REGION_TYPE = (3, 1)


@dataclass
class SampleServer:
    socket: Path
    process: trio.Process
    log: Path


def listening(path: Path) -> bool:
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8 and fields[7] == str(path):
            return bool(int(fields[3], 16) & SO_ACCEPTCON)
    return False


@asynccontextmanager
async def run_sample(name: str, tmp_path: Path,
                     request: pytest.FixtureRequest) -> AsyncIterator[SampleServer]:
    """Run the sample until the block ends, then kill it; it listens in ``tmp_path``."""
    binary = cached_sample(name)
    if not binary.is_file():
        pytest.fail(f"no {name} at {binary}; run `vdsa build libvfio-user`")
    socket, log = tmp_path / f"{name}.sock", tmp_path / f"{name}.log"
    request.node.user_properties.append(("console_log", str(log)))
    env = dict(os.environ, LD_LIBRARY_PATH=str(libvfio_user_artifact().path / "lib"))
    with log.open("wb") as sink:
        process = await trio.lowlevel.open_process(
            [str(binary), "-v", str(socket)], env=env, stdin=subprocess.DEVNULL, stdout=sink,
            stderr=subprocess.STDOUT)
        try:
            # The samples announce nothing when they listen: watch the kernel's socket table.
            with trio.fail_after(START_LIMIT):
                while not listening(socket):
                    assert process.poll() is None, f"{name} exited with {process.returncode}"
                    await trio.sleep(0.01)
            yield SampleServer(socket, process, log)
        finally:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


@pytest.fixture
async def gpio(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[SampleServer]:
    async with run_sample("gpio-pci-idio-16", tmp_path, request) as server:
        yield server


@pytest.fixture
async def sample(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[SampleServer]:
    async with run_sample("server", tmp_path, request) as server:
        yield server


def maps_memfd(process: trio.Process, memory_name: str) -> bool:
    """Whether ``process`` has the memfd named ``memory_name`` mapped."""
    return f"/memfd:{memory_name} (deleted)" in Path(f"/proc/{process.pid}/maps").read_text()


# --- gpio-pci-idio-16 -------------------------------------------------------------------------


async def test_version_negotiation(gpio: SampleServer) -> None:
    async with VfioUserClient.connect(gpio.socket) as client:
        version = client.server_version
        assert (version.major, version.minor) == (0, 0)
        assert (version.max_msg_fds, version.max_data_xfer_size) == (8, 1 << 20)
        assert version.migration_pgsize == mmap.PAGESIZE


async def test_server_answers_with_at_most_the_proposed_minor(gpio: SampleServer) -> None:
    async with VfioUserClient.connect(gpio.socket, version=(0, 7)) as client:
        assert (client.server_version.major, client.server_version.minor) == (0, 1)


async def test_unsupported_major_is_refused(gpio: SampleServer) -> None:
    with pytest.raises(VfioUserError, match="VERSION failed") as refused:
        async with VfioUserClient.connect(gpio.socket, version=(1, 0)):
            pass
    assert refused.value.errno == errno.EINVAL
    with trio.fail_after(START_LIMIT):
        assert await gpio.process.wait() != 0  # the sample gives up when an attach fails


async def test_device_info(gpio: SampleServer) -> None:
    async with VfioUserClient.connect(gpio.socket) as client:
        info = await client.device_get_info()
    # libvfio-user always reports its 10 PCI regions (BAR0-5, ROM, config, VGA, migration) and
    # 5 IRQ types, used or not.
    assert (info.flags, info.num_regions, info.num_irqs) == (
        DeviceFlag.RESET | DeviceFlag.PCI, 10, 5)


async def test_config_space_ids(gpio: SampleServer) -> None:
    async with VfioUserClient.connect(gpio.socket) as client:
        assert await client.config_read(0, 2) == GPIO_VENDOR
        assert await client.config_read(2, 2) == GPIO_DEVICE
        assert await client.read32(PciRegion.CONFIG, 0) == GPIO_DEVICE << 16 | GPIO_VENDOR


async def test_bar2_info_read_and_write(gpio: SampleServer) -> None:
    async with VfioUserClient.connect(gpio.socket) as client:
        info = await client.device_get_region_info(PciRegion.BAR2)
        assert (info.size, info.flags, info.fds) == (
            0x100, RegionInfoFlag.READ | RegionInfoFlag.WRITE, ())
        # The sample's input pins: offset 0 reads a counter that moves every third read.
        assert [await client.read(PciRegion.BAR2, 0, 1) for _ in range(4)] == [0, 0, 0, 1]
        await client.write32(PciRegion.BAR2, 0, 0x12345678)


async def test_migration_region_type_needs_a_second_query(gpio: SampleServer) -> None:
    """The first query's argsz has no room for capabilities: the client asks again."""
    async with VfioUserClient.connect(gpio.socket) as client:
        info = await client.device_get_region_info(PciRegion.MIGRATION)
    assert info.argsz > 32
    assert RegionInfoFlag.CAPS in info.flags
    assert info.region_type == MIGRATION_REGION_TYPE


async def test_posted_writes_get_no_reply_even_when_they_fail(gpio: SampleServer) -> None:
    with capture_logs() as logs:
        async with VfioUserClient.connect(gpio.socket) as client:
            await client.write32(PciRegion.BAR2, 0, 1, posted=True)
            await client.region_write(42, 0, b"\0" * 4, posted=True)
            # Commands are handled in order: this reply comes after both writes were handled.
            assert (await client.device_get_info()).num_regions == 10
    assert [e for e in logs if e["event"] == "vfio_user_client.reply.unmatched"] == []


async def test_irq_info(gpio: SampleServer) -> None:
    async with VfioUserClient.connect(gpio.socket) as client:
        intx = await client.device_get_irq_info(PciIrq.INTX)
        msix = await client.device_get_irq_info(PciIrq.MSIX)
    assert (intx.index, intx.flags, intx.count) == (PciIrq.INTX, IrqInfoFlag.EVENTFD, 1)
    assert (msix.index, msix.count) == (PciIrq.MSIX, 0)


async def test_interrupt_through_an_eventfd(gpio: SampleServer) -> None:
    async with VfioUserClient.connect(gpio.socket) as client:
        (intx,) = await client.enable_irqs(PciIrq.INTX, 1)
        assert intx.poll() == 0
        # DATA_NONE | ACTION_TRIGGER: the server signals the vector's eventfd itself.
        await client.trigger_irqs(PciIrq.INTX, 0, 1)
        assert await intx.wait() == 1
        await client.trigger_irqs(PciIrq.INTX, 0, 1)
        await client.trigger_irqs(PciIrq.INTX, 0, 1)
        assert await intx.wait() == 2  # the eventfd adds up signals between reads
        assert intx.received == 3
        await client.disable_irqs(PciIrq.INTX)


async def test_msix_on_a_device_without_msix_is_refused(gpio: SampleServer) -> None:
    async with VfioUserClient.connect(gpio.socket) as client:
        with pytest.raises(VfioUserError, match="DEVICE_SET_IRQS failed") as refused:
            await client.enable_msix(1)
    assert refused.value.errno == errno.EINVAL


async def test_bad_region_index_gets_an_error_reply(gpio: SampleServer) -> None:
    async with VfioUserClient.connect(gpio.socket) as client:
        with pytest.raises(VfioUserError, match="DEVICE_GET_REGION_INFO") as info:
            await client.device_get_region_info(42)
        with pytest.raises(VfioUserError, match="REGION_READ") as read:
            await client.region_read(42, 0, 4)
        assert (info.value.errno, read.value.errno) == (errno.EINVAL, errno.EINVAL)
        assert (await client.device_get_info()).num_regions == 10


@pytest.mark.parametrize(
    ("payload", "size"),
    [
        (b"", 8),  # smaller than the header itself
        (b"", HEADER_SIZE),  # DEVICE_GET_INFO without its argsz
        (encode_device_get_info(), HEADER_SIZE + 32),  # more than is sent
    ],
    ids=["below-header", "no-payload", "size-beyond-data"],
)
async def test_bad_message_size_gets_an_error_reply(gpio: SampleServer, payload: bytes,
                                                    size: int) -> None:
    async with VfioUserClient.connect(gpio.socket) as client:
        reply = await client.send_raw(Command.DEVICE_GET_INFO, payload, msg_id=0x4242, size=size)
        assert reply is not None
        header = reply.header
        assert (header.msg_id, header.command, header.is_reply, header.is_error, header.error,
                reply.payload) == (0x4242, Command.DEVICE_GET_INFO, True, True, errno.EINVAL, b"")
        assert (await client.device_get_info()).num_regions == 10


@pytest.mark.parametrize(
    ("command", "flags"),
    [(99, 0), (Command.DEVICE_GET_INFO, MessageType.REPLY)],
    ids=["unknown-command", "reply-sent-as-command"],
)
async def test_malformed_commands_get_an_error_reply(gpio: SampleServer, command: int,
                                                     flags: int) -> None:
    async with VfioUserClient.connect(gpio.socket) as client:
        reply = await client.send_raw(command, encode_device_get_info(), flags=flags)
        assert reply is not None
        assert (reply.header.command, reply.header.is_error, reply.header.error) == (
            command, True, errno.EINVAL)


async def test_a_request_without_reply_times_out(gpio: SampleServer) -> None:
    async with VfioUserClient.connect(gpio.socket, request_timeout=0.5) as client:
        with pytest.raises(VfioUserTimeout, match="DEVICE_GET_INFO msg_id 7: no reply"):
            await client.send_raw(Command.DEVICE_GET_INFO, encode_device_get_info(), msg_id=7,
                                  flags=HeaderFlag.NO_REPLY)
        assert (await client.device_get_info()).num_regions == 10


async def test_server_gone_closes_the_connection(gpio: SampleServer) -> None:
    async with VfioUserClient.connect(gpio.socket) as client:
        gpio.process.kill()
        await client.wait_closed()
        with pytest.raises(ConnectionClosed, match="the server closed the connection"):
            await client.device_get_info()


# --- libvfio-user's sample server -------------------------------------------------------------


async def test_sparse_mmap_region_comes_with_its_fds(sample: SampleServer) -> None:
    async with VfioUserClient.connect(sample.socket) as client:
        info = await client.device_get_region_info(PciRegion.BAR1)
        assert info.flags == (RegionInfoFlag.READ | RegionInfoFlag.WRITE | RegionInfoFlag.MMAP
                              | RegionInfoFlag.CAPS)
        assert info.sparse_mmap == (SparseMmapArea(0, 0x1000), SparseMmapArea(0x2000, 0x1000))
        assert len(info.fds) == 2  # one per area, both the same file
        area = info.sparse_mmap[1]
        with mmap.mmap(info.fds[1], area.size, offset=info.offset + area.offset) as bar1:
            await client.region_write(PciRegion.BAR1, area.offset, b"vdsa")
            assert bar1[:4] == b"vdsa"
            await client.region_write(PciRegion.BAR1, area.offset + 4, b"-posted", posted=True)
            await client.device_get_info()  # handled after the posted write
            assert bar1[:11] == b"vdsa-posted"


@pytest.mark.parametrize("share_fd", [True, False], ids=["memfd-shared", "messages-only"])
async def test_server_dma_reaches_guest_memory(sample: SampleServer, tmp_path: Path,
                                               share_fd: bool) -> None:
    name = f"vdsa-{tmp_path.name}"
    with GuestMemory(DMA_IOVA, DMA_SIZE, name=name) as memory:
        async with VfioUserClient.connect(sample.socket) as client:
            await client.dma_map(memory, share_fd=share_fd)
            assert maps_memfd(sample.process, name) == share_fd
            (intx,) = await client.enable_irqs(PciIrq.INTX, 1)
            # The sample arms a timer for this absolute time; a whole second ahead at least,
            # as it counts in seconds and a zero delay would disarm the timer.
            await client.write64(PciRegion.BAR0, 0, int(time.time()) + 2)
            assert await intx.wait() == 1
            # The server's DMA follows its interrupt; it must be answered before our next
            # request, which it would otherwise read as the reply it waits for.
            assert await client.wait_served_dma(2) == [
                ServedDma(Command.DMA_WRITE, DMA_IOVA, SAMPLE_DMA_SIZE, 0),
                ServedDma(Command.DMA_READ, DMA_IOVA, SAMPLE_DMA_SIZE, 0),
            ]
            assert memory.read(DMA_IOVA, SAMPLE_DMA_SIZE) == b"A" * SAMPLE_DMA_SIZE
            assert memory.read(DMA_IOVA + SAMPLE_DMA_SIZE, 1) == b"\0"
            assert (await client.device_get_info()).num_regions == 10
            assert sample.process.poll() is None, "the sample exits when its DMA check fails"
            await client.dma_unmap(memory)
            assert not maps_memfd(sample.process, name)  # released before the reply


async def test_server_dma_outside_guest_memory_gets_efault(sample: SampleServer) -> None:
    async with VfioUserClient.connect(sample.socket) as client:
        # A mapping the server knows of and the harness has no memory for.
        await client.request(Command.DMA_MAP, encode_dma_map(DMA_IOVA, DMA_SIZE,
                                                             DmaMapFlag.READ | DmaMapFlag.WRITE))
        (intx,) = await client.enable_irqs(PciIrq.INTX, 1)
        await client.write64(PciRegion.BAR0, 0, int(time.time()) + 2)
        await intx.wait()
        assert await client.wait_served_dma(1) == [
            ServedDma(Command.DMA_WRITE, DMA_IOVA, SAMPLE_DMA_SIZE, errno.EFAULT)]
        await client.wait_closed()
    with trio.fail_after(START_LIMIT):
        assert await sample.process.wait() == 1  # samples/server.c: "vfu_sgl_write failed"


async def test_dma_map_conflicts_and_repeated_unmap(sample: SampleServer) -> None:
    with GuestMemory(DMA_IOVA, DMA_SIZE) as memory, \
            GuestMemory(DMA_IOVA + mmap.PAGESIZE, mmap.PAGESIZE) as overlapping:
        async with VfioUserClient.connect(sample.socket) as client:
            await client.dma_map(memory)
            # The specification asks for EEXIST when a map covers an existing one, the same
            # one included (vdsa's libvfio-user patch 0002; as shipped it accepted a repeat).
            for again in (memory, overlapping):
                with pytest.raises(VfioUserError, match="DMA_MAP failed") as overlap:
                    await client.dma_map(again)
                assert overlap.value.errno == errno.EEXIST
            await client.dma_unmap(memory)
            # Nothing mapped there any more: success, as VFIO's type1 answers (patch 0005).
            await client.dma_unmap(memory)


async def test_device_reset(sample: SampleServer) -> None:
    async with VfioUserClient.connect(sample.socket) as client:
        await client.device_reset()
        assert DeviceFlag.RESET in (await client.device_get_info()).flags
    assert "device reset callback" in sample.log.read_text()
