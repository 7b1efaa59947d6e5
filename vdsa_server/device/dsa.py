"""The emulated DSA 1.x function: its BAR0 register file, device commands and BAR2 portals.

BAR0 is one packed image (``bytearray``) that holds every register and table the guest can see;
reads are slices of it. Writes are split at register and table-entry boundaries and dispatched by
:data:`FIXED_REGISTERS` access type or by table, so any size at any offset works. State the
driver reads (GENSTS, CMDSTS, WQCFG.wq_state, ...) lives in the image and nowhere else.

Behaviour follows what Linux 6.1 ``drivers/dma/idxd`` relies on; where the driver is silent the
comments say "DSA spec" (the Intel DSA architecture specification as recalled, not re-checked)
or "guess". Descriptors never come here: BAR2 belongs to the native engine, which this model
drives through :class:`WqEngine` (enable, disable, drain, abort, reset). A command completes
inside the ``mmio_write`` that issues it, waiting for the engine where the command waits for
descriptors (disable, drain), so CMDSTS is never seen active and GENSTS never shows DRAIN.
"""

from __future__ import annotations

import bisect
import ctypes
import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vdsa_server.device.config import ConfigMode, DeviceConfig
from vdsa_server.device.engine_port import InterruptSink, SoftwareError, WqEngine, WqSettings
from vdsa_server.device.registers import (
    CMD_INT_HANDLE_IMS,
    DEVICE_VERSION_1,
    FIXED_REGISTERS,
    GRPCFG_SIZE,
    IDXD_CMDCAP_OFFSET,
    IDXD_CMDSTS_OFFSET,
    IDXD_ENGCAP_OFFSET,
    IDXD_GENCAP_OFFSET,
    IDXD_GENCFG_OFFSET,
    IDXD_GENCTRL_OFFSET,
    IDXD_GENSTATS_OFFSET,
    IDXD_GRPCAP_OFFSET,
    IDXD_INTCAUSE_OFFSET,
    IDXD_OPCAP_OFFSET,
    IDXD_PORTAL_SIZE,
    IDXD_SWERR_OFFSET,
    IDXD_TABLE_OFFSET,
    IDXD_VER_OFFSET,
    IDXD_WQCAP_OFFSET,
    MSIX_PERM_STRIDE,
    Access,
    CmdStsReg,
    EngineCapReg,
    GenCapReg,
    GenCfgReg,
    GenCtrlReg,
    GenStsReg,
    GroupCapReg,
    GroupFlags,
    GrpCfg,
    IdxdCmd,
    IdxdCmdstsErr,
    IdxdCommandReg,
    IdxdDeviceResetType,
    IdxdDeviceStatusState,
    IdxdIntc,
    IdxdWqMode,
    IdxdWqState,
    Layout,
    MmioRegister,
    MsixPerm,
    OpCap,
    SwErrReg,
    TableLayout,
    WqCapReg,
    WqCfg,
    field_mask,
    wq_bar_size,
)
from vdsa_server.log import get_logger

# PCI MSI-X: 16-byte table entries, one pending bit per vector in 64-bit PBA words. QEMU
# emulates both; they only need a place in BAR0 that nothing else uses.
MSIX_ENTRY_SIZE = 16
MSIX_PBA_WORD_BITS = 64
MSIX_ALIGNMENT = 0x1000

# Operand encodings from device.c: WQ commands other than Enable WQ take a 16-bit WQ mask with
# the index of the 16-WQ set above it; interrupt-handle commands take a 16-bit index or handle.
_WQ_SET_SIZE = 16
_WQ_SET_MASK = (1 << _WQ_SET_SIZE) - 1
_INT_HANDLE_MASK = CMD_INT_HANDLE_IMS - 1


# WQCFG bits the guest may write. Configurable: everything DSA 1.x defines except what a
# capability we do not advertise governs (ATS disable, occupancy interrupts). Read-only config:
# only PASID, PASID enable and privilege (DSA spec; idxd_wq_set_pasid writes them).
_WQCFG_CONFIGURABLE_FIELDS = (
    "wq_size", "wq_thresh", "mode", "bof", "wq_ats_disable", "priority", "pasid", "pasid_en",
    "priv", "max_xfer_shift", "max_batch_shift",
)
_WQCFG_READ_ONLY_FIELDS = ("pasid", "pasid_en", "priv")
# GRPFLAGS: only the traffic classes; read buffers and progress limits are not advertised.
_GRPFLAGS_FIELDS = ("tc_a", "tc_b")
_GRPFLAGS_READ_BUFFER_FIELDS = ("use_rdbuf_limit", "rdbufs_reserved", "rdbufs_allowed")
_MSIX_PERM_FIELDS = ("ignore", "pasid_en", "pasid")
# Group traffic classes the 6.1 driver programs for DSA 1.x (idxd_setup_groups).
_DEFAULT_TRAFFIC_CLASS = 1


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


_Completion = tuple[IdxdCmdstsErr, int]  # CMDSTS.err and CMDSTS.result


def _command_name(code: int) -> str:
    try:
        return IdxdCmd(code).name
    except ValueError:
        return f"#{code}"


def _align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _mask_bytes(mask: int, size: int) -> bytes:
    return mask.to_bytes(size, "little")


def _fields_mask(layout: Layout, names: tuple[str, ...]) -> int:
    mask = 0
    for name in names:
        mask |= field_mask(layout, name)
    return mask


def _capability_registers(config: DeviceConfig, layout: TableLayout) -> list[tuple[int, bytes]]:
    """The read-only identification and capability registers, as (offset, bytes)."""
    gencap = GenCapReg()
    gencap.overlap_copy = 1  # memmove semantics, as DSA 1.0 hardware reports
    gencap.cache_control_mem = 1  # the cache-control flag is a hint an emulator can always honour
    gencap.cache_control_cache = 1
    gencap.cmd_cap = 1
    # Block on fault is accepted, as DSA hardware does; guest memory that QEMU
    # maps never faults in a way blocking could resolve, so nothing ever blocks.
    gencap.block_on_fault = 1
    gencap.max_xfer_shift = config.max_transfer_shift
    gencap.max_batch_shift = config.max_batch_shift
    gencap.config_en = int(config.mode is ConfigMode.CONFIGURABLE)

    wqcap = WqCapReg()
    wqcap.total_wq_size = config.total_wq_size
    wqcap.num_wqs = config.num_wqs
    wqcap.dedicated_mode = 1  # shared WQs need PASID and ENQCMD, which the guest lacks
    wqcap.priority = 1
    # Per-WQ ATS disable, as DSA 1.x has; without an IOMMU there is no ATS to
    # disable, but accel-config's load-config writes the attribute regardless.
    wqcap.wq_ats_support = 1
    wqcap.occupancy = 1  # always 0: descriptors leave the WQ as they arrive

    grpcap = GroupCapReg()
    grpcap.num_groups = config.num_groups
    grpcap.total_rdbufs = config.read_buffers
    grpcap.rdbuf_ctrl = grpcap.rdbuf_limit = int(config.read_buffers > 0)

    engcap = EngineCapReg()
    engcap.num_engines = config.num_engines

    opcap = OpCap()
    for opcode in config.opcodes:
        opcap.bits[opcode // 64] |= 1 << (opcode % 64)

    commands = set(IdxdCmd) - {IdxdCmd.REQUEST_INT_HANDLE, IdxdCmd.RELEASE_INT_HANDLE}
    if config.interrupt_handles:
        commands |= {IdxdCmd.REQUEST_INT_HANDLE, IdxdCmd.RELEASE_INT_HANDLE}
    cmdcap = sum(1 << command for command in commands)

    return [
        (IDXD_VER_OFFSET, DEVICE_VERSION_1.to_bytes(4, "little")),
        (IDXD_GENCAP_OFFSET, bytes(gencap)),
        (IDXD_WQCAP_OFFSET, bytes(wqcap)),
        (IDXD_GRPCAP_OFFSET, bytes(grpcap)),
        (IDXD_ENGCAP_OFFSET, bytes(engcap)),
        (IDXD_OPCAP_OFFSET, bytes(opcap)),
        (IDXD_TABLE_OFFSET, bytes(layout.offsets_reg())),
        (IDXD_CMDCAP_OFFSET, cmdcap.to_bytes(4, "little")),
    ]


def _preset_tables(config: DeviceConfig, layout: TableLayout) -> tuple[list[bytes], list[bytes]]:
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
        grpcfg.flags.tc_a = _DEFAULT_TRAFFIC_CLASS
        grpcfg.flags.tc_b = _DEFAULT_TRAFFIC_CLASS
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


class DsaDevice:
    """One emulated DSA 1.x PCI function (8086:0b25), as its guest driver sees it."""

    def __init__(
        self,
        config: DeviceConfig,
        irq: InterruptSink,
        engine: WqEngine,
    ) -> None:
        self.config = config
        self._irq = irq
        self._engine = engine
        self._log = get_logger()
        self.num_msix = config.num_msix
        self.layout = TableLayout(config.num_groups, config.num_wqs, self.num_msix)
        self.msix_table_offset = _align_up(self.layout.end, MSIX_ALIGNMENT)
        self.msix_table_size = self.num_msix * MSIX_ENTRY_SIZE
        self.msix_pba_offset = _align_up(
            self.msix_table_offset + self.msix_table_size, MSIX_ALIGNMENT
        )
        self.msix_pba_size = -(-self.num_msix // MSIX_PBA_WORD_BITS) * MSIX_PBA_WORD_BITS // 8
        msix_end = self.msix_pba_offset + self.msix_pba_size
        self.bar0_size = max(IDXD_PORTAL_SIZE, 1 << (msix_end - 1).bit_length())
        self.bar2_size = wq_bar_size(config.num_wqs)

        self._capabilities = _capability_registers(config, self.layout)
        self._initial_grpcfg, self._initial_wqcfg = _preset_tables(config, self.layout)
        self._regions = self._build_regions()
        self._region_starts = [region.start for region in self._regions]
        self._bar0 = bytearray(self.bar0_size)
        self._gencfg = GenCfgReg.from_buffer(self._bar0, IDXD_GENCFG_OFFSET)
        self._genctrl = GenCtrlReg.from_buffer(self._bar0, IDXD_GENCTRL_OFFSET)
        self._gensts = GenStsReg.from_buffer(self._bar0, IDXD_GENSTATS_OFFSET)
        self._intcause = ctypes.c_uint32.from_buffer(self._bar0, IDXD_INTCAUSE_OFFSET)
        self._cmdsts = CmdStsReg.from_buffer(self._bar0, IDXD_CMDSTS_OFFSET)
        self._cmdcap = ctypes.c_uint32.from_buffer(self._bar0, IDXD_CMDCAP_OFFSET)
        self._swerr = SwErrReg.from_buffer(self._bar0, IDXD_SWERR_OFFSET)
        self._grpcfg = [
            GrpCfg.from_buffer(self._bar0, self.layout.grpwqcfg_offset(g, 0))
            for g in range(config.num_groups)
        ]
        self._wqcfg_writable = _mask_bytes(
            _fields_mask(WqCfg, _WQCFG_CONFIGURABLE_FIELDS
                         if config.mode is ConfigMode.CONFIGURABLE else _WQCFG_READ_ONLY_FIELDS),
            ctypes.sizeof(WqCfg),
        )
        self._grpcfg_writable = self._grpcfg_mask()
        self._msix_perm_writable = _mask_bytes(
            _fields_mask(MsixPerm, _MSIX_PERM_FIELDS), MSIX_PERM_STRIDE
        )
        self._commands: dict[int, Callable[[int], _Completion]] = {
            IdxdCmd.ENABLE_DEVICE: self._enable_device,
            IdxdCmd.DISABLE_DEVICE: self._disable_device,
            IdxdCmd.DRAIN_ALL: self._drain_all,
            IdxdCmd.ABORT_ALL: self._abort_all,
            IdxdCmd.RESET_DEVICE: self._reset_device,
            IdxdCmd.ENABLE_WQ: self._enable_wq,
            IdxdCmd.DISABLE_WQ: self._disable_wq,
            IdxdCmd.DRAIN_WQ: self._drain_wq,
            IdxdCmd.ABORT_WQ: self._abort_wq,
            IdxdCmd.RESET_WQ: self._reset_wq,
            IdxdCmd.DRAIN_PASID: self._drain_or_abort_pasid,
            IdxdCmd.ABORT_PASID: self._drain_or_abort_pasid,
            IdxdCmd.REQUEST_INT_HANDLE: self._request_int_handle,
            IdxdCmd.RELEASE_INT_HANDLE: self._release_int_handle,
        }
        self._int_handles: set[int] = set()
        self._power_on()

    # --- Public state ------------------------------------------------------------------------

    @property
    def state(self) -> IdxdDeviceStatusState:
        return IdxdDeviceStatusState(self._gensts.state)

    @property
    def reset_type(self) -> IdxdDeviceResetType:
        """GENSTS.reset_type: the reset a halted device needs."""
        return IdxdDeviceResetType(self._gensts.reset_type)

    def wq_state(self, wq: int) -> IdxdWqState:
        return IdxdWqState(self._wqcfg(wq).wq_state)

    def wq_config(self, wq: int) -> WqCfg:
        """A copy of WQ ``wq``'s WQCFG entry."""
        return self._wqcfg(wq)

    def int_handle_vector(self, handle: int) -> int | None:
        """The MSI-X vector a descriptor's interrupt handle selects, None if it is invalid.

        Granted handles equal their vector; without REQUEST_INT_HANDLE in CMDCAP the driver
        puts the vector itself in descriptors.
        """
        if self.config.interrupt_handles:
            return handle if handle in self._int_handles else None
        return handle if 0 <= handle < self.num_msix else None

    # --- BAR0 --------------------------------------------------------------------------------

    def mmio_read(self, offset: int, size: int) -> bytes:
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

    def mmio_write(self, offset: int, data: bytes) -> None:
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

    # --- Resets and errors -------------------------------------------------------------------

    def reset(self) -> None:
        """Function-level reset (FLR, vfio-user DEVICE_RESET, client gone): power-on state."""
        old = self.state
        self._power_on()
        self._log.info("device.reset", kind="function-level", old_state=old.name)

    def halt(self, reset_type: IdxdDeviceResetType, error: int | None = None) -> None:
        """Enter HALT (for an unrecoverable error the engine hits); ``error`` goes to SWERR.

        All WQs stop. INTCAUSE gets HALT_STATE, raised on vector 0 if GENCTRL.halt_int_en;
        with ``error``, SWERR and INTCAUSE.ERR as for any software error. Only the reset
        ``reset_type`` names brings the device back (RESET_DEVICE for SOFTWARE, else FLR).
        """
        notify = self._record_software_error(error) if error is not None else False
        for wq in range(self.config.num_wqs):
            self._abort(wq)
            self._set_wq_state(wq, IdxdWqState.DISABLED, "halt")
        self._set_state(IdxdDeviceStatusState.HALT, "halt")
        self._gensts.reset_type = reset_type
        self._intcause.value |= IdxdIntc.HALT_STATE
        self._log.error("device.halt", reset_type=reset_type.name, error=error)
        if notify or self._genctrl.halt_int_en:
            self._irq.trigger(0)

    def report_software_error(self, error: int, wq: int | None = None) -> None:
        """Log a software error in SWERR and raise it on vector 0 if GENCTRL asks for it."""
        if self._record_software_error(error, wq):
            self._irq.trigger(0)

    def report_engine_error(self, error: SoftwareError) -> None:
        """A descriptor error the engine could not put in a completion record."""
        if self._record_software_error(error.error, error.wq, error):
            self._irq.trigger(0)

    # --- Image and regions -------------------------------------------------------------------

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

    def _power_on(self) -> None:
        self._bar0[:] = bytes(self.bar0_size)
        for offset, value in self._capabilities:
            self._bar0[offset : offset + len(value)] = value
        for g, entry in enumerate(self._initial_grpcfg):
            start = self.layout.grpwqcfg_offset(g, 0)
            self._bar0[start : start + GRPCFG_SIZE] = entry
        for n in range(self.config.num_wqs):
            self._restore_wqcfg(n)
        self._int_handles.clear()
        self._engine.reset()

    def _wqcfg(self, wq: int) -> WqCfg:
        start = self.layout.wqcfg_entry_offset(wq)
        entry = self._bar0[start : start + self.layout.wqcfg_size]
        return WqCfg.from_buffer_copy(bytes(entry).ljust(ctypes.sizeof(WqCfg), b"\0"))

    def _restore_wqcfg(self, wq: int) -> None:
        start = self.layout.wqcfg_entry_offset(wq)
        self._bar0[start : start + self.layout.wqcfg_size] = self._initial_wqcfg[wq]

    def _grpcfg_mask(self) -> bytes:
        if self.config.mode is ConfigMode.READ_ONLY:
            return bytes(GRPCFG_SIZE)
        mask = GrpCfg()
        for n in range(self.config.num_wqs):
            mask.wqs[n // 64] |= 1 << (n % 64)
        mask.engines = (1 << self.config.num_engines) - 1
        flags: tuple[str, ...] = _GRPFLAGS_FIELDS
        if self.config.read_buffers:
            flags += _GRPFLAGS_READ_BUFFER_FIELDS
        mask.flags.bits = _fields_mask(GroupFlags, flags)
        return bytes(mask).ljust(GRPCFG_SIZE, b"\0")

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

    # --- Register writes ---------------------------------------------------------------------

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

    # --- Commands ----------------------------------------------------------------------------

    def _execute(self, command: IdxdCommandReg) -> None:
        code, operand = command.cmd, command.operand
        handler = self._commands.get(code)
        if handler is None or not self._cmdcap.value & (1 << code):
            err, result = IdxdCmdstsErr.INVAL_CMD, 0
        elif self.state is IdxdDeviceStatusState.HALT and not (
            code == IdxdCmd.RESET_DEVICE and self.reset_type is IdxdDeviceResetType.SOFTWARE
        ):
            # Guess: a halted device takes only the reset GENSTS asks for, and only when
            # that reset is RESET_DEVICE; the driver itself sends nothing while halted.
            err, result = IdxdCmdstsErr.HW_ERR, 0
        else:
            err, result = handler(operand)
        self._cmdsts.bits = 0
        self._cmdsts.err = err
        self._cmdsts.result = result
        log = self._log.info if err is IdxdCmdstsErr.SUCCESS else self._log.warning
        log("device.command", command=_command_name(code), operand=hex(operand),
            int_req=command.int_req, status=err.name, result=result)
        if command.int_req:
            self._intcause.value |= IdxdIntc.CMD
            self._irq.trigger(0)

    def _enable_device(self, _operand: int) -> _Completion:
        if self.state is IdxdDeviceStatusState.ENABLED:
            return IdxdCmdstsErr.ERR_DEV_ENABLED, 0
        if self._gencfg.rdbuf_limit > self.config.read_buffers:  # more than GRPCAP offers
            return IdxdCmdstsErr.ERR_CONFIG, 0
        claimed = sum(self._wqcfg(n).wq_size for n in range(self.config.num_wqs))
        if claimed > self.config.total_wq_size:
            return IdxdCmdstsErr.ERR_WQ_SIZE_ERANGE, 0
        group_error = self._check_groups()
        if group_error is not None:
            return group_error, 0
        self._set_state(IdxdDeviceStatusState.ENABLED, "enable device")
        return IdxdCmdstsErr.SUCCESS, 0

    def _check_groups(self) -> IdxdCmdstsErr | None:
        """GRPCFG checks at Enable Device. DSA spec for what is checked; which of the four
        ERR_GRP_CONFIG codes reports which problem is a guess."""
        wq_seen = engine_seen = 0
        for grpcfg in self._grpcfg:
            wqs = sum(word << (64 * i) for i, word in enumerate(grpcfg.wqs))
            if wqs & wq_seen:
                return IdxdCmdstsErr.ERR_GRP_CONFIG  # a WQ in more than one group
            if grpcfg.engines & engine_seen:
                return IdxdCmdstsErr.ERR_GRP_CONFIG2  # an engine in more than one group
            if wqs and not grpcfg.engines:
                return IdxdCmdstsErr.ERR_GRP_CONFIG3  # WQs with no engine to serve them
            wq_seen |= wqs
            engine_seen |= grpcfg.engines
        return None

    def _disable_device(self, _operand: int) -> _Completion:
        if self.state is not IdxdDeviceStatusState.ENABLED:
            return IdxdCmdstsErr.ERR_DIS_DEV_EN, 0
        for wq in range(self.config.num_wqs):
            self._set_wq_state(wq, IdxdWqState.DISABLED, "disable device")
        self._set_state(IdxdDeviceStatusState.DISABLED, "disable device")
        return IdxdCmdstsErr.SUCCESS, 0

    def _enabled_wqs(self) -> list[int]:
        return [wq for wq in range(self.config.num_wqs)
                if self.wq_state(wq) is IdxdWqState.ENABLED]

    def _drain_all(self, _operand: int) -> _Completion:
        for wq in self._enabled_wqs():
            self._engine.drain_wq(wq)
        return IdxdCmdstsErr.SUCCESS, 0

    def _abort_all(self, _operand: int) -> _Completion:
        for wq in self._enabled_wqs():
            self._abort(wq)
        return IdxdCmdstsErr.SUCCESS, 0

    def _abort(self, wq: int) -> None:
        if self.wq_state(wq) is IdxdWqState.ENABLED:
            self._engine.abort_wq(wq)

    def _reset_device(self, _operand: int) -> _Completion:
        old = self.state
        self._power_on()
        self._log.info("device.reset", kind="reset-device command", old_state=old.name)
        return IdxdCmdstsErr.SUCCESS, 0

    def _enable_wq(self, operand: int) -> _Completion:
        if operand >= self.config.num_wqs:
            return IdxdCmdstsErr.INVAL_WQIDX, 0
        if self.state is not IdxdDeviceStatusState.ENABLED:
            return IdxdCmdstsErr.ERR_DEV_NOTEN, 0
        wqcfg = self._wqcfg(operand)
        error = self._check_wq(operand, wqcfg)
        if error is not None:
            return error, 0
        self._set_wq_state(operand, IdxdWqState.ENABLED, "enable WQ")
        return IdxdCmdstsErr.SUCCESS, 0

    def _check_wq(self, wq: int, wqcfg: WqCfg) -> IdxdCmdstsErr | None:
        """WQCFG checks at Enable WQ (DSA spec, in the order of the error codes)."""
        if wqcfg.wq_state == IdxdWqState.ENABLED:
            return IdxdCmdstsErr.ERR_WQ_ENABLED
        if not any(grpcfg.wqs[wq // 64] >> (wq % 64) & 1 for grpcfg in self._grpcfg):
            # Guess: no Enable WQ code covers a WQ outside every group; reuse the group one.
            return IdxdCmdstsErr.ERR_GRP_CONFIG
        in_use = sum(self._wqcfg(n).wq_size for n in range(self.config.num_wqs)
                     if self.wq_state(n) is IdxdWqState.ENABLED)
        if wqcfg.wq_size == 0 or in_use + wqcfg.wq_size > self.config.total_wq_size:
            return IdxdCmdstsErr.ERR_WQ_SIZE
        if wqcfg.priority == 0:  # accel-config: priorities range from 1 to 15
            return IdxdCmdstsErr.ERR_WQ_PRIOR
        if wqcfg.mode != IdxdWqMode.DEDICATED:  # WQCAP advertises dedicated mode only
            return IdxdCmdstsErr.ERR_WQ_MODE
        if wqcfg.pasid_en:  # the function has no PASID capability
            return IdxdCmdstsErr.ERR_PASID_EN
        if wqcfg.max_batch_shift > self.config.max_batch_shift:
            return IdxdCmdstsErr.ERR_MAX_BATCH_SIZE
        if wqcfg.max_xfer_shift > self.config.max_transfer_shift:
            return IdxdCmdstsErr.ERR_MAX_XFER_SIZE
        return None

    def _selected_wqs(self, operand: int) -> list[int]:
        base = (operand >> _WQ_SET_SIZE) * _WQ_SET_SIZE
        return [base + bit for bit in range(_WQ_SET_SIZE) if operand & _WQ_SET_MASK & (1 << bit)]

    def _check_selected(self, wqs: list[int]) -> IdxdCmdstsErr | None:
        """Disable, drain, abort and reset WQ need every selected WQ to exist and be enabled
        (registers.h groups ERR_DEV_NOT_EN under those four commands)."""
        if any(wq >= self.config.num_wqs for wq in wqs):
            return IdxdCmdstsErr.INVAL_WQIDX
        if any(self.wq_state(wq) is not IdxdWqState.ENABLED for wq in wqs):
            return IdxdCmdstsErr.ERR_DEV_NOT_EN
        return None

    def _on_selected(self, operand: int, action: Callable[[int], None]) -> _Completion:
        """Disable, drain, abort and reset WQ: check the selection, then act on each WQ."""
        wqs = self._selected_wqs(operand)
        error = self._check_selected(wqs)
        if error is not None:
            return error, 0
        for wq in wqs:
            action(wq)
        return IdxdCmdstsErr.SUCCESS, 0

    def _disable_wq(self, operand: int) -> _Completion:
        return self._on_selected(
            operand, lambda wq: self._set_wq_state(wq, IdxdWqState.DISABLED, "disable WQ"))

    def _drain_wq(self, operand: int) -> _Completion:
        return self._on_selected(operand, self._engine.drain_wq)

    def _abort_wq(self, operand: int) -> _Completion:
        return self._on_selected(operand, self._abort)

    def _reset_wq(self, operand: int) -> _Completion:
        return self._on_selected(operand, self._reset_one_wq)

    def _reset_one_wq(self, wq: int) -> None:
        # Reset WQ disables the WQ and returns its WQCFG to the power-on value: the driver
        # relies on it, ORing the WQCFG it reads back into its fresh copy (DSA spec).
        self._abort(wq)
        self._set_wq_state(wq, IdxdWqState.DISABLED, "reset WQ")
        self._restore_wqcfg(wq)

    def _drain_or_abort_pasid(self, _operand: int) -> _Completion:
        # No descriptor ever carries a PASID here (no PASID capability): nothing to wait for.
        return IdxdCmdstsErr.SUCCESS, 0

    def _request_int_handle(self, operand: int) -> _Completion:
        index = operand & _INT_HANDLE_MASK
        if operand & CMD_INT_HANDLE_IMS or index >= self.num_msix:
            return IdxdCmdstsErr.ERR_INVAL_INT_IDX, 0  # no IMS (GENCAP.max_ims_mult is 0)
        self._int_handles.add(index)
        self._engine.set_int_handle(index, True)
        return IdxdCmdstsErr.SUCCESS, index

    def _release_int_handle(self, operand: int) -> _Completion:
        handle = operand & _INT_HANDLE_MASK
        if operand & CMD_INT_HANDLE_IMS or handle not in self._int_handles:
            # Guess: 6.1's enum has no release-specific code; the index error is the closest.
            return IdxdCmdstsErr.ERR_INVAL_INT_IDX, 0
        self._int_handles.discard(handle)
        self._engine.set_int_handle(handle, False)
        return IdxdCmdstsErr.SUCCESS, 0

    # --- State changes -----------------------------------------------------------------------

    def _set_state(self, new: IdxdDeviceStatusState, reason: str) -> None:
        old = self.state
        if old is not new:
            self._gensts.state = new
            self._log.info("device.state", old=old.name, new=new.name, reason=reason)

    def _set_wq_state(self, wq: int, new: IdxdWqState, reason: str) -> None:
        wqcfg = self._wqcfg(wq)
        old = IdxdWqState(wqcfg.wq_state)
        if old is new:
            return
        if new is IdxdWqState.ENABLED:
            self._engine.enable_wq(wq, self._wq_settings(wq, wqcfg))
        else:
            self._engine.disable_wq(wq)
        wqcfg.wq_state = new
        start = self.layout.wqcfg_entry_offset(wq)
        self._bar0[start : start + self.layout.wqcfg_size] = bytes(wqcfg)[
            : self.layout.wqcfg_size
        ]
        self._log.info("wq.state", wq=wq, old=old.name, new=new.name, reason=reason)

    def _wq_settings(self, wq: int, wqcfg: WqCfg) -> WqSettings:
        engines = next(grpcfg.engines for grpcfg in self._grpcfg
                       if grpcfg.wqs[wq // 64] >> (wq % 64) & 1)
        return WqSettings(size=wqcfg.wq_size, priority=wqcfg.priority, engines=engines,
                          max_transfer_size=1 << wqcfg.max_xfer_shift,
                          max_batch_size=1 << wqcfg.max_batch_shift)

    def _record_software_error(self, error: int, wq: int | None = None,
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
        self._intcause.value |= IdxdIntc.ERR
        self._log.warning("device.swerr", error=error, wq=wq)
        return bool(self._genctrl.softerr_int_en)
