"""BAR0 of the emulated DSA: the register image and the rules for guest accesses.

BAR0 is one packed image (``bytearray``) that holds every register and table the guest can see;
reads are slices of it. Writes are split at register and table-entry boundaries and dispatched by
:data:`FIXED_REGISTERS` access type or by table, so any size at any offset works. State the
driver reads (GENSTS, CMDSTS, WQCFG.wq_state, ...) lives in the image and nowhere else; the
command state machine (:mod:`vdsa_server.device.commands`) changes it through this class, and a
whole write to CMD is handed to it.
"""

from __future__ import annotations

import bisect
import ctypes
import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vdsa_server.device.capabilities import Generation, capability_registers
from vdsa_server.device.config import ConfigMode, DeviceConfig
from vdsa_server.device.engine_port import SoftwareError
from vdsa_server.device.registers import (
    FIXED_REGISTERS,
    GRPCFG_SIZE,
    IDXD_CMDCAP_OFFSET,
    IDXD_CMDSTS_OFFSET,
    IDXD_GENCFG_OFFSET,
    IDXD_GENCTRL_OFFSET,
    IDXD_GENSTATS_OFFSET,
    IDXD_INTCAUSE_OFFSET,
    IDXD_PORTAL_SIZE,
    IDXD_SWERR_OFFSET,
    MSIX_PERM_STRIDE,
    Access,
    CmdStsReg,
    GenCfgReg,
    GenCtrlReg,
    GenStsReg,
    GroupFlags,
    GrpCfg,
    IdxdCommandReg,
    IdxdDeviceResetType,
    IdxdDeviceStatusState,
    IdxdIntc,
    IdxdWqMode,
    IdxdWqState,
    Layout,
    MmioRegister,
    MsixPerm,
    SwErrReg,
    TableLayout,
    WqCfg,
    field_mask,
)
from vdsa_server.log import get_logger

# PCI MSI-X: 16-byte table entries, one pending bit per vector in 64-bit PBA words. QEMU
# emulates both; they only need a place in BAR0 that nothing else uses.
MSIX_ENTRY_SIZE = 16
MSIX_PBA_WORD_BITS = 64
MSIX_ALIGNMENT = 0x1000


class _Kind(enum.Enum):
    REGISTER = enum.auto()
    GRPCFG = enum.auto()
    WQCFG = enum.auto()
    MSIX_PERM = enum.auto()
    MSIX_TABLE = enum.auto()  # the MSI-X table and PBA are QEMU's to emulate
    MSIX_PBA = enum.auto()


@dataclass(frozen=True)
class _Region:
    """A BAR0 span with one write behaviour: a fixed register, a table entry, or MSI-X."""

    start: int
    size: int
    kind: _Kind
    index: int = 0  # group, WQ or vector for table entries
    register: MmioRegister | None = None

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def name(self) -> str:
        if self.register is not None:
            return self.register.name
        if self.kind in (_Kind.GRPCFG, _Kind.WQCFG, _Kind.MSIX_PERM):
            return f"{self.kind.name}[{self.index}]"
        return self.kind.name


def _align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _mask_bytes(mask: int, size: int) -> bytes:
    return mask.to_bytes(size, "little")


def _fields_mask(layout: Layout, names: tuple[str, ...]) -> int:
    mask = 0
    for name in names:
        mask |= field_mask(layout, name)
    return mask


def _preset_tables(
    config: DeviceConfig, generation: Generation, layout: TableLayout
) -> tuple[list[bytes], list[bytes]]:
    """Power-on GRPCFG and WQCFG entries: zero when configurable, the preset when read-only."""
    groups = [bytes(GRPCFG_SIZE)] * config.num_groups
    wqs = [bytes(layout.wqcfg_size)] * config.num_wqs
    if config.mode is ConfigMode.CONFIGURABLE:
        return groups, wqs
    for preset in config.groups:
        grpcfg = GrpCfg()
        for wq in config.wqs:
            if wq.group == preset.id:
                grpcfg.wqs[wq.id // 64] |= 1 << (wq.id % 64)
        grpcfg.engines = sum(1 << engine for engine in preset.engines)
        grpcfg.flags.tc_a = generation.traffic_class
        grpcfg.flags.tc_b = generation.traffic_class
        groups[preset.id] = bytes(grpcfg).ljust(GRPCFG_SIZE, b"\0")
    for n in range(config.num_wqs):
        wqcfg = WqCfg()
        # The 6.1 driver refuses a read-only configuration in which any WQ, used or not, is
        # not dedicated (idxd_wq_load_config).
        wqcfg.mode = IdxdWqMode.DEDICATED
        wqcfg.max_xfer_shift = config.max_transfer_shift
        wqcfg.max_batch_shift = config.max_batch_shift
        preset_wq = next((w for w in config.wqs if w.id == n), None)
        if preset_wq is not None:
            wqcfg.wq_size = preset_wq.size
            wqcfg.priority = preset_wq.priority
            if preset_wq.max_transfer_size is not None:
                wqcfg.max_xfer_shift = preset_wq.max_transfer_size.bit_length() - 1
            if preset_wq.max_batch_size is not None:
                wqcfg.max_batch_shift = preset_wq.max_batch_size.bit_length() - 1
        wqs[n] = bytes(wqcfg)[: layout.wqcfg_size]
    return groups, wqs


class RegisterFile:
    """BAR0 of one DSA function: its layout, image and access rules.

    ``execute`` gets each whole write to CMD, after it is stored in the image.
    """

    def __init__(
        self,
        config: DeviceConfig,
        generation: Generation,
        execute: Callable[[IdxdCommandReg], None],
    ) -> None:
        self.config = config
        self._execute = execute
        self._log = get_logger()
        self.num_msix = config.num_msix
        self.layout = TableLayout(config.num_groups, config.num_wqs, self.num_msix,
                                  generation.wqcfg_size_field)
        self.msix_table_offset = _align_up(self.layout.end, MSIX_ALIGNMENT)
        self.msix_table_size = self.num_msix * MSIX_ENTRY_SIZE
        self.msix_pba_offset = _align_up(
            self.msix_table_offset + self.msix_table_size, MSIX_ALIGNMENT
        )
        self.msix_pba_size = -(-self.num_msix // MSIX_PBA_WORD_BITS) * MSIX_PBA_WORD_BITS // 8
        msix_end = self.msix_pba_offset + self.msix_pba_size
        self.bar0_size = max(IDXD_PORTAL_SIZE, 1 << (msix_end - 1).bit_length())

        self._capabilities = capability_registers(config, generation, self.layout)
        self._initial_grpcfg, self._initial_wqcfg = _preset_tables(config, generation,
                                                                   self.layout)
        self._regions = self._build_regions()
        self._region_starts = [region.start for region in self._regions]
        self._bar0 = bytearray(self.bar0_size)
        # Views into the image, for the command state machine.
        self.gencfg = GenCfgReg.from_buffer(self._bar0, IDXD_GENCFG_OFFSET)
        self.genctrl = GenCtrlReg.from_buffer(self._bar0, IDXD_GENCTRL_OFFSET)
        self.gensts = GenStsReg.from_buffer(self._bar0, IDXD_GENSTATS_OFFSET)
        self.intcause = ctypes.c_uint32.from_buffer(self._bar0, IDXD_INTCAUSE_OFFSET)
        self.cmdsts = CmdStsReg.from_buffer(self._bar0, IDXD_CMDSTS_OFFSET)
        self.cmdcap = ctypes.c_uint32.from_buffer(self._bar0, IDXD_CMDCAP_OFFSET)
        self.grpcfg = [
            GrpCfg.from_buffer(self._bar0, self.layout.grpwqcfg_offset(g, 0))
            for g in range(config.num_groups)
        ]
        self._swerr = SwErrReg.from_buffer(self._bar0, IDXD_SWERR_OFFSET)
        self._wqcfg_writable = _mask_bytes(
            _fields_mask(WqCfg, generation.wqcfg_fields[config.mode]), ctypes.sizeof(WqCfg)
        )
        self._grpcfg_writable = self._grpcfg_mask(generation)
        self._msix_perm_writable = _mask_bytes(
            _fields_mask(MsixPerm, generation.msix_perm_fields), MSIX_PERM_STRIDE
        )

    # --- State kept in the image -------------------------------------------------------------

    @property
    def state(self) -> IdxdDeviceStatusState:
        return IdxdDeviceStatusState(self.gensts.state)

    @property
    def reset_type(self) -> IdxdDeviceResetType:
        """GENSTS.reset_type: the reset a halted device needs."""
        return IdxdDeviceResetType(self.gensts.reset_type)

    def wq_state(self, wq: int) -> IdxdWqState:
        return IdxdWqState(self.wqcfg(wq).wq_state)

    def wqcfg(self, wq: int) -> WqCfg:
        """A copy of WQ ``wq``'s WQCFG entry."""
        start = self.layout.wqcfg_entry_offset(wq)
        entry = self._bar0[start : start + self.layout.wqcfg_size]
        return WqCfg.from_buffer_copy(bytes(entry).ljust(ctypes.sizeof(WqCfg), b"\0"))

    def store_wqcfg(self, wq: int, wqcfg: WqCfg) -> None:
        start = self.layout.wqcfg_entry_offset(wq)
        self._bar0[start : start + self.layout.wqcfg_size] = bytes(wqcfg)[
            : self.layout.wqcfg_size
        ]

    def restore_wqcfg(self, wq: int) -> None:
        """WQ ``wq``'s WQCFG entry as at power-on."""
        start = self.layout.wqcfg_entry_offset(wq)
        self._bar0[start : start + self.layout.wqcfg_size] = self._initial_wqcfg[wq]

    def power_on(self) -> None:
        """The image as at power-on: capabilities, presets, everything else zero."""
        self._bar0[:] = bytes(self.bar0_size)
        for offset, value in self._capabilities:
            self._bar0[offset : offset + len(value)] = value
        for g, entry in enumerate(self._initial_grpcfg):
            start = self.layout.grpwqcfg_offset(g, 0)
            self._bar0[start : start + GRPCFG_SIZE] = entry
        for n in range(self.config.num_wqs):
            self.restore_wqcfg(n)

    def record_software_error(self, error: int, wq: int | None = None,
                              detail: SoftwareError | None = None) -> bool:
        """Fill SWERR (or flag its overflow); True if the caller should raise vector 0."""
        if self._swerr.valid:
            self._swerr.overflow = 1
            self._log.warning("device.swerr_overflow", error=error, wq=wq)
            return False
        ctypes.memset(ctypes.addressof(self._swerr), 0, ctypes.sizeof(SwErrReg))
        self._swerr.valid = 1
        self._swerr.error = error
        if wq is not None:
            self._swerr.wq_idx_valid = 1
            self._swerr.wq_idx = wq
        if detail is not None:
            self._swerr.desc_valid = detail.desc_valid
            self._swerr.batch = detail.batch
            self._swerr.fault_rw = detail.fault_rw
            self._swerr.operation = detail.operation
            self._swerr.batch_idx = detail.batch_index
            self._swerr.invalid_flags = detail.invalid_flags
            self._swerr.fault_addr = detail.fault_addr
        self.intcause.value |= IdxdIntc.ERR
        self._log.warning("device.swerr", error=error, wq=wq)
        return bool(self.genctrl.softerr_int_en)

    # --- Guest accesses ----------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes of BAR0; holes and anything outside BAR0 read as zero."""
        out = bytearray(max(size, 0))
        low, high = max(offset, 0), min(offset + size, self.bar0_size)
        if offset < 0 or offset + size > self.bar0_size:
            self._log.warning("mmio.guest_error.out_of_bounds_read", offset=offset, size=size)
        if low < high:
            out[low - offset : high - offset] = self._bar0[low:high]
        self._log.debug("mmio.read", offset=offset, size=size,
                        value=hex(int.from_bytes(out, "little")))
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at BAR0 ``offset``: each register or table entry it covers reacts."""
        if not data:
            return
        if offset < 0 or offset + len(data) > self.bar0_size:
            self._log.warning("mmio.guest_error.out_of_bounds_write", offset=offset,
                              size=len(data), value=hex(int.from_bytes(data, "little")))
            return
        self._log.debug("mmio.write", offset=offset, size=len(data),
                        value=hex(int.from_bytes(data, "little")))
        for start, chunk, region in self._split(offset, data):
            if region is None:
                self._log.warning("mmio.guest_error.unmapped_write", offset=start,
                                  size=len(chunk), value=hex(int.from_bytes(chunk, "little")))
            elif region.register is not None:
                self._write_register(region, region.register, start, chunk)
            elif region.kind is _Kind.GRPCFG:
                self._write_grpcfg(region, start, chunk)
            elif region.kind is _Kind.WQCFG:
                self._write_wqcfg(region, start, chunk)
            elif region.kind is _Kind.MSIX_PERM:
                self._merge(region, start, chunk, self._msix_perm_writable)
            else:
                # QEMU owns the MSI-X table and PBA; a write here means the transport let one by.
                self._log.warning("mmio.unexpected_msix_write", offset=start, size=len(chunk))

    # --- Regions -----------------------------------------------------------------------------

    def _build_regions(self) -> list[_Region]:
        layout = self.layout
        regions = [_Region(r.offset, r.size, _Kind.REGISTER, register=r) for r in FIXED_REGISTERS]
        regions += [
            _Region(layout.grpwqcfg_offset(g, 0), GRPCFG_SIZE, _Kind.GRPCFG, g)
            for g in range(layout.num_groups)
        ]
        regions += [
            _Region(layout.wqcfg_entry_offset(n), layout.wqcfg_size, _Kind.WQCFG, n)
            for n in range(layout.num_wqs)
        ]
        regions += [
            _Region(layout.msix_perm_entry_offset(v), MSIX_PERM_STRIDE, _Kind.MSIX_PERM, v)
            for v in range(layout.num_msix)
        ]
        regions.append(_Region(self.msix_table_offset, self.msix_table_size, _Kind.MSIX_TABLE))
        regions.append(_Region(self.msix_pba_offset, self.msix_pba_size, _Kind.MSIX_PBA))
        return sorted(regions, key=lambda region: region.start)

    def _split(self, offset: int, data: bytes) -> Iterator[tuple[int, bytes, _Region | None]]:
        """Cut a write at region boundaries: (offset, bytes, region or None for a hole)."""
        end = offset + len(data)
        position = offset
        first = max(bisect.bisect_right(self._region_starts, offset) - 1, 0)
        for region in self._regions[first:]:
            if region.end <= position:
                continue
            if position >= end:
                return
            if region.start > position:
                stop = min(region.start, end)
                yield position, data[position - offset : stop - offset], None
                position = stop
                if position >= end:
                    return
            stop = min(region.end, end)
            yield position, data[position - offset : stop - offset], region
            position = stop
        if position < end:
            yield position, data[position - offset :], None

    def _grpcfg_mask(self, generation: Generation) -> bytes:
        if self.config.mode is ConfigMode.READ_ONLY:
            return bytes(GRPCFG_SIZE)
        mask = GrpCfg()
        for n in range(self.config.num_wqs):
            mask.wqs[n // 64] |= 1 << (n % 64)
        mask.engines = (1 << self.config.num_engines) - 1
        flags = generation.grpflags_fields
        if self.config.read_buffers:
            flags += generation.grpflags_read_buffer_fields
        mask.flags.bits = _fields_mask(GroupFlags, flags)
        return bytes(mask).ljust(GRPCFG_SIZE, b"\0")

    # --- Access rules ------------------------------------------------------------------------

    def _merge(self, region: _Region, start: int, chunk: bytes, writable: bytes) -> None:
        """Store the writable bits of ``chunk``; attempts to change other bits are logged."""
        denied = 0
        for i, byte in enumerate(chunk):
            position = start + i
            mask = writable[position - region.start]
            old = self._bar0[position]
            self._bar0[position] = (old & ~mask & 0xFF) | (byte & mask)
            denied |= (old ^ byte) & ~mask & 0xFF
        if denied:
            self._log.warning("mmio.guest_error.readonly_bits", register=region.name,
                              offset=start, size=len(chunk),
                              value=hex(int.from_bytes(chunk, "little")))

    def _locked_write(self, region: _Region, start: int, chunk: bytes, reason: str) -> None:
        """A write to registers the current state freezes: dropped, loud only if it differs."""
        current = self._bar0[start : start + len(chunk)]
        if current == chunk:
            # The 6.1 driver rewrites every group's and WQ's configuration when it enables a
            # WQ, including the frozen ones: an identical rewrite is routine.
            self._log.debug("mmio.write_ignored", register=region.name, offset=start,
                            size=len(chunk), reason=reason)
        else:
            self._log.warning("mmio.guest_error.locked_write", register=region.name,
                              offset=start, size=len(chunk),
                              value=hex(int.from_bytes(chunk, "little")), reason=reason)

    def _write_register(
        self, region: _Region, register: MmioRegister, start: int, chunk: bytes
    ) -> None:
        value = hex(int.from_bytes(chunk, "little"))
        if register.access is Access.RO:
            self._log.warning("mmio.guest_error.readonly_write", register=register.name,
                              offset=start, size=len(chunk), value=value)
        elif register.access is Access.RW:
            # GENCFG is writable only while the device is disabled (DSA spec).
            if register.offset == IDXD_GENCFG_OFFSET and (
                self.state is not IdxdDeviceStatusState.DISABLED
            ):
                self._locked_write(region, start, chunk, "device not disabled")
            else:
                self._merge(region, start, chunk,
                            _mask_bytes(register.write_mask, register.size))
        elif register.access is Access.W1C:
            clear = _mask_bytes(register.write_mask, register.size)
            for i, byte in enumerate(chunk):
                position = start + i
                self._bar0[position] &= ~(byte & clear[position - register.offset]) & 0xFF
            self._log.debug("mmio.write_1_to_clear", register=register.name, value=value)
        elif start != register.offset or len(chunk) != register.size:
            self._log.warning("mmio.guest_error.partial_command_write", offset=start,
                              size=len(chunk), value=value)
        else:
            self._bar0[start : start + len(chunk)] = chunk
            self._execute(IdxdCommandReg.from_buffer_copy(chunk))

    def _write_grpcfg(self, region: _Region, start: int, chunk: bytes) -> None:
        if self.config.mode is ConfigMode.READ_ONLY:
            self._log.warning("mmio.guest_error.readonly_write", register=region.name,
                              offset=start, size=len(chunk),
                              value=hex(int.from_bytes(chunk, "little")))
        elif self.state is not IdxdDeviceStatusState.DISABLED:
            # Group configuration is fixed while the device is enabled (DSA spec).
            self._locked_write(region, start, chunk, "device not disabled")
        else:
            self._merge(region, start, chunk, self._grpcfg_writable)

    def _write_wqcfg(self, region: _Region, start: int, chunk: bytes) -> None:
        if self.wq_state(region.index) is IdxdWqState.ENABLED:
            # A WQ's configuration is fixed while it is enabled (DSA spec).
            self._locked_write(region, start, chunk, "WQ enabled")
        else:
            self._merge(region, start, chunk, self._wqcfg_writable)
