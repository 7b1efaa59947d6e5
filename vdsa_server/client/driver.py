"""A guest driver in miniature: drives the virtual DSA over vfio-user the way the stock idxd
driver does (memory decode and bus mastering, MSI-X, groups, WQs, device commands, portal
writes, completion records), for the protocol tests and ``vdsa bench``."""

from __future__ import annotations

import itertools

import trio

from vdsa_server.client.client import GuestMemory, IrqEventfd, VfioUserClient
from vdsa_server.client.portals import MappedPortals
from vdsa_server.client.protocol import RegionInfoFlag
from vdsa_server.device.descriptors import DsaCompletionRecord, DsaHwDesc, IdxdOpFlag
from vdsa_server.device.pci import PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, Bar
from vdsa_server.device.registers import (
    GRPCFG_SIZE,
    IDXD_CMD_OFFSET,
    IDXD_CMDSTS_OFFSET,
    IDXD_INTCAUSE_OFFSET,
    IDXD_TABLE_MULT,
    IDXD_TABLE_OFFSET,
    IDXD_WQCAP_OFFSET,
    IDXD_WQCFG_MIN,
    CmdStsReg,
    IdxdCmd,
    IdxdCmdstsErr,
    IdxdCommandReg,
    IdxdIntc,
    IdxdPortal,
    IdxdWqMode,
    OffsetsReg,
    WqCapReg,
    WqCfg,
    wq_portal_offset,
)
from vdsa_server.vfio import PciIrq

PCI_COMMAND = 0x04
DESCRIPTOR_SIZE = 64
RECORD_SIZE = 32
SLOTS_PER_PORTAL = 0x1000 // DESCRIPTOR_SIZE
MOVDIR64B_STORE = 8  # QEMU delivers a MOVDIR64B to a trapped BAR as eight 8-byte writes
# GRPCFG: the WQ bitmap at +0, the engine bitmap at +32.
GRPCFG_ENGINES = 32


class DriverError(Exception):
    """The device did not do what the driver asked of it."""


def make_descriptor(opcode: int, flags: int, *, record: int = 0, vector: int = 0,
                    **fields: int) -> bytes:
    """A descriptor: ``record`` as its completion record address if ``flags`` has CRAV,
    ``vector`` as its interrupt handle if RCI, and ``fields`` by ``DsaHwDesc`` field name."""
    desc = DsaHwDesc()
    desc.opcode = opcode
    desc.flags = flags
    if flags & IdxdOpFlag.CRAV:
        desc.completion_addr = record
    if flags & IdxdOpFlag.RCI:
        desc.int_handle = vector
    for name, value in fields.items():
        setattr(desc, name, value)
    return bytes(desc)


def vector_of(wq: int) -> int:
    """The MSI-X vector the stock driver gives WQ ``wq``'s completions (0 is device events)."""
    return wq + 1


class DsaDriver:
    """One client's view of the device: registers, commands, portals and interrupts.
    ``memory`` is mapped for DMA by :meth:`set_up`."""

    def __init__(self, client: VfioUserClient, memory: GuestMemory, *,
                 wait_limit: float = 5.0) -> None:
        self.client = client
        self.memory = memory
        self.wait_limit = wait_limit
        self.vectors: list[IrqEventfd] = []
        self._slots = itertools.count()
        self._grpcfg = self._wqcfg = self._wqcfg_size = 0
        self.portals: MappedPortals | None = None

    async def map_portals(self) -> None:
        """Submit from now on by storing into BAR2 mapped from the server's fd, as a guest
        does with mapped portals; ``unmap_portals`` goes back to region writes."""
        info = await self.client.device_get_region_info(Bar.PORTALS)
        if RegionInfoFlag.MMAP not in info.flags or not info.fds:
            raise DriverError("the server offers BAR2 as no mappable region")
        self.portals = MappedPortals(info.fds[0], info.size, self.wait_limit)

    def unmap_portals(self) -> None:
        if self.portals is not None:
            self.portals.close()
            self.portals = None

    async def set_up(self) -> None:
        """Memory decode and bus mastering, every MSI-X vector, the table offsets, DMA."""
        command = await self.client.config_read(PCI_COMMAND, 2)
        await self.client.config_write(
            PCI_COMMAND, command | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 2)
        info = await self.client.device_get_irq_info(PciIrq.MSIX)
        self.vectors = await self.client.enable_msix(info.count)
        offsets = OffsetsReg()
        offsets.bits[0] = await self.read64(IDXD_TABLE_OFFSET)
        offsets.bits[1] = await self.read64(IDXD_TABLE_OFFSET + 8)
        self._grpcfg = offsets.grpcfg * IDXD_TABLE_MULT
        self._wqcfg = offsets.wqcfg * IDXD_TABLE_MULT
        wqcap = WqCapReg(bits=await self.read64(IDXD_WQCAP_OFFSET))
        self._wqcfg_size = 1 << (wqcap.wqcfg_size + IDXD_WQCFG_MIN)
        await self.client.dma_map(self.memory)

    # --- Registers ---

    async def read32(self, offset: int) -> int:
        return await self.client.read32(Bar.REGISTERS, offset)

    async def read64(self, offset: int) -> int:
        return await self.client.read64(Bar.REGISTERS, offset)

    async def write32(self, offset: int, value: int) -> None:
        await self.client.write32(Bar.REGISTERS, offset, value)

    async def write64(self, offset: int, value: int) -> None:
        await self.client.write64(Bar.REGISTERS, offset, value)

    async def configure_wq(self, wq: int, size: int, *, priority: int = 10,
                           max_xfer_shift: int = 21, max_batch_shift: int = 10) -> None:
        """WQ ``wq`` as a dedicated WQ of ``size`` entries (2 MiB transfers and batches of
        1024 descriptors at most unless told otherwise)."""
        wqcfg = WqCfg()
        wqcfg.wq_size, wqcfg.priority, wqcfg.mode = size, priority, IdxdWqMode.DEDICATED
        wqcfg.max_xfer_shift, wqcfg.max_batch_shift = max_xfer_shift, max_batch_shift
        for dword in range(self._wqcfg_size // 4):
            await self.write32(self._wqcfg + wq * self._wqcfg_size + 4 * dword,
                               wqcfg.bits[dword])

    async def configure_group(self, group: int, wqs: int, engines: int) -> None:
        """Group ``group`` with the WQs and engines of two bitmaps."""
        await self.write64(self._grpcfg + group * GRPCFG_SIZE, wqs)
        await self.write64(self._grpcfg + group * GRPCFG_SIZE + GRPCFG_ENGINES, engines)

    async def command(self, cmd: IdxdCmd, operand: int = 0) -> IdxdCmdstsErr:
        return IdxdCmdstsErr((await self.command_status(cmd, operand)).err)

    async def command_status(self, cmd: IdxdCmd, operand: int = 0) -> CmdStsReg:
        """Run a device command as idxd_cmd_exec does: int_req, vector 0, CMDSTS."""
        command = IdxdCommandReg(cmd=cmd, operand=operand, int_req=1)
        await self.write32(IDXD_CMD_OFFSET, command.bits)
        if (signals := await self.interrupt(0)) != 1:
            raise DriverError(f"{cmd.name}: {signals} interrupts on vector 0, not 1")
        cause = await self.read32(IDXD_INTCAUSE_OFFSET)
        if not cause & IdxdIntc.CMD:
            raise DriverError(f"{cmd.name}: INTCAUSE {cause:#x} without the command bit")
        await self.write32(IDXD_INTCAUSE_OFFSET, cause)
        status = CmdStsReg(bits=await self.read32(IDXD_CMDSTS_OFFSET))
        if status.active:
            raise DriverError(f"{cmd.name}: CMDSTS still active after its interrupt")
        return status

    async def run_command(self, cmd: IdxdCmd, operand: int = 0) -> None:
        """A command that must succeed."""
        if (err := await self.command(cmd, operand)) is not IdxdCmdstsErr.SUCCESS:
            raise DriverError(f"{cmd.name} {operand:#x} failed: {err.name}")

    # --- Descriptors ---

    async def submit(self, desc: bytes, wq: int = 0,
                     portal: IdxdPortal = IdxdPortal.LIMITED_MSIX, slot: int | None = None
                     ) -> None:
        """A MOVDIR64B: eight ascending 8-byte writes into one 64-byte portal slot, posted
        (No_reply) as QEMU posts BAR writes, or with mapped portals the slot handshake in
        memory. Slots are used in turn unless one is given."""
        if len(desc) != DESCRIPTOR_SIZE:
            raise ValueError(f"a descriptor is {DESCRIPTOR_SIZE} bytes, not {len(desc)}")
        if slot is None:
            slot = next(self._slots) % SLOTS_PER_PORTAL
        offset = wq_portal_offset(wq, portal) + slot * DESCRIPTOR_SIZE
        if self.portals is not None:
            self.portals.submit(offset, desc)
            return
        await self.client.post_region_writes(
            Bar.PORTALS, [(offset + i, desc[i:i + MOVDIR64B_STORE])
                          for i in range(0, DESCRIPTOR_SIZE, MOVDIR64B_STORE)])

    async def interrupt(self, vector: int) -> int:
        """Wait for MSI-X ``vector``; how many signals it had (they add up)."""
        with trio.fail_after(self.wait_limit):
            return await self.vectors[vector].wait()

    def status(self, record: int) -> int:
        """The status byte of the completion record at ``record`` (0 while pending)."""
        return self.memory.read(record, 1)[0]

    def record(self, record: int) -> DsaCompletionRecord:
        return DsaCompletionRecord.from_buffer_copy(self.memory.read(record, RECORD_SIZE))
