"""The vfio-user server through our own client harness (no QEMU): the PCI
function's config space, BARs, MSI-X, DMA registration, the connection life
cycle and hostile peers."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.conftest import vdsa_env
from vdsa_server import server as server_module
from vdsa_server.client import ConnectionClosed, GuestMemory, VfioUserClient, VfioUserError
from vdsa_server.client.protocol import Command, IrqSetFlag
from vdsa_server.device import registers as r
from vdsa_server.device.config import DeviceConfig
from vdsa_server.device.pci import PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, Bar
from vdsa_server.engine import DmaCounters, EngineDmaRegion
from vdsa_server.engine.native import PROT_READ, PROT_WRITE
from vdsa_server.server import VdsaServer
from vdsa_server.transport.socket_path import SocketPathTaken

CONFIG_REGION = 7
PCI_VENDOR_ID = 0x00
PCI_COMMAND = 0x04
PCI_CLASS_REVISION = 0x08
PCI_BASE_ADDRESS_0 = 0x10
PCI_CAPABILITY_LIST = 0x34
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11
PCI_IRQ_MSIX = 2


@asynccontextmanager
async def running_server(path: Path, *, once: bool = False,
                         config: DeviceConfig | None = None) -> AsyncIterator[VdsaServer]:
    server = VdsaServer(path, config or DeviceConfig(), once=once)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client_for(path: Path) -> AsyncIterator[VfioUserClient]:
    async with VfioUserClient.connect(path) as client:
        yield client


@asynccontextmanager
async def client_when_free(path: Path) -> AsyncIterator[VfioUserClient]:
    """libvfio-user queues one pending connection; while a peer holds that
    place, a connect is refused, so keep trying (bounded by the caller)."""
    while True:
        stack = AsyncExitStack()
        try:
            client = await stack.enter_async_context(VfioUserClient.connect(path))
        except (ConnectionClosed, OSError):
            await stack.aclose()
            await trio.sleep(0.05)
            continue
        async with stack:
            yield client
        return


async def enable_memory(client: VfioUserClient) -> None:
    command = await client.config_read(PCI_COMMAND, 2)
    await client.config_write(PCI_COMMAND, command | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 2)


async def capabilities(client: VfioUserClient) -> dict[int, int]:
    found = {}
    pos = await client.config_read(PCI_CAPABILITY_LIST, 1)
    while pos:
        header = await client.config_read(pos, 2)
        found[header & 0xFF] = pos
        pos = header >> 8
    return found


async def test_identity_and_class(tmp_path: Path) -> None:
    sock = tmp_path / "dsa.sock"
    async with running_server(sock), client_for(sock) as client:
        ids = await client.config_read(PCI_VENDOR_ID, 4)
        assert ids & 0xFFFF == 0x8086
        assert ids >> 16 == 0x0B25
        class_rev = await client.config_read(PCI_CLASS_REVISION, 4)
        assert class_rev >> 8 == 0x088000
        # Read-only identity: libvfio-user refuses the write with an error reply.
        with pytest.raises(VfioUserError) as refused:
            await client.config_write(PCI_VENDOR_ID, 0x1234, 2)
        assert refused.value.errno == errno.EINVAL
        assert await client.config_read(PCI_VENDOR_ID, 2) == 0x8086


async def test_bars_are_64_bit_and_size_like_hardware(tmp_path: Path) -> None:
    sock = tmp_path / "dsa.sock"
    async with running_server(sock) as server, client_for(sock) as client:
        for bar, size in ((Bar.REGISTERS, server.device.bar0_size),
                          (Bar.PORTALS, server.device.bar2_size)):
            offset = PCI_BASE_ADDRESS_0 + 4 * bar
            low = await client.config_read(offset, 4)
            assert low & 0x7 == 0x4, f"BAR{bar} is not a 64-bit memory BAR"
            await client.config_write(offset, 0xFFFFFFFF, 4)
            sized = await client.config_read(offset, 4)
            assert (~(sized & ~0xF) + 1) & 0xFFFFFFFF == size
            info = await client.device_get_region_info(bar)
            assert info.size == size


async def test_capabilities_msix_and_pcie(tmp_path: Path) -> None:
    sock = tmp_path / "dsa.sock"
    async with running_server(sock) as server, client_for(sock) as client:
        caps = await capabilities(client)
        assert PCI_CAP_ID_EXP in caps
        assert PCI_CAP_ID_MSIX in caps
        msix = caps[PCI_CAP_ID_MSIX]
        control = await client.config_read(msix + 2, 2)
        assert (control & 0x7FF) + 1 == server.device.num_msix
        assert server.device.num_msix >= server.config.num_wqs + 1
        table = await client.config_read(msix + 4, 4)
        assert table & 0x7 == Bar.REGISTERS
        assert table & ~0x7 == server.device.msix_table_offset
        pcie = caps[PCI_CAP_ID_EXP]
        flags = await client.config_read(pcie + 2, 2)
        assert (flags >> 4) & 0xF == 0x9  # root complex integrated endpoint


async def test_command_register_gates_mmio(tmp_path: Path) -> None:
    sock = tmp_path / "dsa.sock"
    async with running_server(sock), client_for(sock) as client:
        assert await client.read32(Bar.REGISTERS, r.IDXD_VER_OFFSET) == 0xFFFFFFFF
        await enable_memory(client)
        assert await client.read32(Bar.REGISTERS, r.IDXD_VER_OFFSET) == 0x100


async def test_any_access_size_at_any_offset_is_answered(tmp_path: Path) -> None:
    sock = tmp_path / "dsa.sock"
    async with running_server(sock) as server, client_for(sock) as client:
        await enable_memory(client)
        for size in (1, 2, 3, 4, 8, 16):
            for offset in (0, 1, 0x7, r.IDXD_GENCAP_OFFSET + 3, server.device.bar0_size - size):
                data = await client.region_read(Bar.REGISTERS, offset, size)
                assert len(data) == size
                await client.region_write(Bar.REGISTERS, offset, data)
        assert await client.read32(Bar.REGISTERS, r.IDXD_VER_OFFSET) == 0x100


async def test_device_command_raises_msix_vector_0(tmp_path: Path) -> None:
    sock = tmp_path / "dsa.sock"
    async with running_server(sock) as server, client_for(sock) as client:
        await enable_memory(client)
        vectors = await client.enable_msix(server.device.num_msix)
        cmd = r.IdxdCommandReg()
        cmd.cmd = r.IdxdCmd.ENABLE_DEVICE
        cmd.int_req = 1
        await client.write32(Bar.REGISTERS, r.IDXD_CMD_OFFSET, int.from_bytes(bytes(cmd), "little"))
        assert await vectors[0].wait() >= 1
        status = await client.read32(Bar.REGISTERS, r.IDXD_CMDSTS_OFFSET)
        assert status & r.IDXD_CMDSTS_ACTIVE == 0


async def test_masked_vector_keeps_its_interrupt_pending(tmp_path: Path) -> None:
    sock = tmp_path / "dsa.sock"
    async with running_server(sock) as server, client_for(sock) as client:
        await enable_memory(client)
        vectors = await client.enable_msix(server.device.num_msix)
        await client.set_irqs(PCI_IRQ_MSIX, 0, 1, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_MASK)
        cmd = r.IdxdCommandReg()
        cmd.cmd = r.IdxdCmd.ENABLE_DEVICE
        cmd.int_req = 1
        await client.write32(Bar.REGISTERS, r.IDXD_CMD_OFFSET, int.from_bytes(bytes(cmd), "little"))
        assert vectors[0].poll() == 0
        await client.set_irqs(PCI_IRQ_MSIX, 0, 1,
                              IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK)
        assert await vectors[0].wait() == 1


async def test_the_engine_takes_the_clients_maps_and_unmaps(tmp_path: Path) -> None:
    sock = tmp_path / "dsa.sock"
    async with running_server(sock) as server, client_for(sock) as client:
        with GuestMemory(iova=0x1000_0000, size=1 << 20) as memory, \
                GuestMemory(iova=0x2000_0000, size=1 << 12) as unshared:
            await client.dma_map(memory)
            await client.dma_map(unshared, share_fd=False)
            # Without an fd there is nothing to reach: libvfio-user keeps it, the engine not.
            assert server.engine.dma_regions() == [
                EngineDmaRegion(0x1000_0000, 1 << 20, PROT_READ | PROT_WRITE)]
            await client.dma_unmap(memory)
            await client.dma_unmap(unshared)
            assert server.engine.dma_regions() == []
            assert server.engine.dma_counters() == DmaCounters(
                maps=2, unmaps=2, unreachable=1, map_failures=0)


async def test_server_outlives_its_client_and_resets_the_device(tmp_path: Path) -> None:
    sock = tmp_path / "dsa.sock"
    async with running_server(sock) as server:
        async with client_for(sock) as client:
            await enable_memory(client)
            await client.write32(Bar.REGISTERS, r.IDXD_CMD_OFFSET, r.IdxdCmd.ENABLE_DEVICE << 20)
            gensts = await client.read32(Bar.REGISTERS, r.IDXD_GENSTATS_OFFSET)
            assert gensts & 0x3 == r.IdxdDeviceStatusState.ENABLED
        async with client_for(sock) as client:
            await enable_memory(client)
            gensts = await client.read32(Bar.REGISTERS, r.IDXD_GENSTATS_OFFSET)
            assert gensts & 0x3 == r.IdxdDeviceStatusState.DISABLED
        assert server.connections == 2


async def test_once_ends_after_the_first_client(tmp_path: Path) -> None:
    sock = tmp_path / "dsa.sock"
    server = VdsaServer(sock, DeviceConfig(), once=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        async with client_for(sock):
            pass
    assert not sock.exists()


async def test_silent_peer_is_dropped_and_service_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "PEER_IO_TIMEOUT", 0.5)
    sock = tmp_path / "dsa.sock"
    async with running_server(sock) as server:
        silent = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await silent.connect(str(sock))
        with trio.fail_after(10):
            async with client_when_free(sock) as client:
                assert await client.config_read(PCI_VENDOR_ID, 2) == 0x8086
        silent.close()
        assert server.connections == 1


async def test_message_whose_body_never_comes_gets_an_error_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "PEER_IO_TIMEOUT", 0.5)
    sock = tmp_path / "dsa.sock"
    async with running_server(sock), client_for(sock) as client:
        with trio.fail_after(10):
            # A REGION_READ header announcing a 32-byte message, then nothing.
            reply = await client.send_raw(Command.REGION_READ, size=32)
        assert reply is not None
        assert reply.header.error != 0
        assert await client.config_read(PCI_VENDOR_ID, 2) == 0x8086


async def test_garbage_from_a_client_is_survived(tmp_path: Path) -> None:
    sock = tmp_path / "dsa.sock"
    async with running_server(sock):
        garbage = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await garbage.connect(str(sock))
        await garbage.send(os.urandom(4096))
        garbage.close()
        with trio.fail_after(10):
            async with client_when_free(sock) as client:
                assert await client.config_read(PCI_VENDOR_ID, 2) == 0x8086


async def test_taken_socket_is_refused(tmp_path: Path) -> None:
    sock = tmp_path / "dsa.sock"
    async with running_server(sock):
        with pytest.raises(SocketPathTaken):
            await VdsaServer(sock, DeviceConfig()).serve()


def test_serve_command_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    sock = tmp_path / "dsa.sock"
    proc = subprocess.Popen([sys.executable, "-m", "vdsa_server", "--log-format", "json", "serve",
                             "--socket", str(sock)], stderr=subprocess.PIPE, text=True,
                            env=vdsa_env())
    try:
        for _ in range(200):
            if sock.exists():
                break
            try:
                proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            pytest.fail(f"vdsa serve exited early: {proc.stderr.read() if proc.stderr else ''}")
        assert sock.is_socket()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert not sock.exists()
    assert '"event": "server.signal"' in stderr


def test_serve_command_names_a_bad_config_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("num_wqs = 0\n")
    done = subprocess.run([sys.executable, "-m", "vdsa_server", "serve", "--socket",
                           str(tmp_path / "x.sock"), "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False,
                          env=vdsa_env())
    assert done.returncode == 125
    assert "num_wqs" in done.stderr
