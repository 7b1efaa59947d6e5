"""The DSA register model: registers, every device command and its errors, interrupts, portals,
and the register sequences the stock Linux 6.1 idxd driver performs."""

from __future__ import annotations

import random
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from structlog.testing import capture_logs

from vdsa_server.device.config import ConfigMode, DeviceConfig, GroupPreset, WqPreset
from vdsa_server.device.descriptors import DsaCompStatus, DsaOpcode
from vdsa_server.device.dsa import DsaDevice
from vdsa_server.device.engine_port import SoftwareError, WqSettings
from vdsa_server.device.registers import (
    CMD_INT_HANDLE_IMS,
    DEVICE_VERSION_1,
    FIXED_REGISTERS_END,
    GRPCFG_SIZE,
    GRPWQCFG_STRIDES,
    IDXD_CMD_OFFSET,
    IDXD_CMDCAP_OFFSET,
    IDXD_CMDSTS_ACTIVE,
    IDXD_CMDSTS_ERR_MASK,
    IDXD_CMDSTS_OFFSET,
    IDXD_CMDSTS_RES_SHIFT,
    IDXD_ENGCAP_OFFSET,
    IDXD_GENCAP_OFFSET,
    IDXD_GENCFG_OFFSET,
    IDXD_GENCTRL_OFFSET,
    IDXD_GENSTATS_OFFSET,
    IDXD_GRPCAP_OFFSET,
    IDXD_INTCAUSE_OFFSET,
    IDXD_OPCAP_OFFSET,
    IDXD_PORTAL_SIZE,
    IDXD_SWERR_ACK,
    IDXD_SWERR_OFFSET,
    IDXD_TABLE_MULT,
    IDXD_TABLE_OFFSET,
    IDXD_VER_OFFSET,
    IDXD_WQCAP_OFFSET,
    IDXD_WQCFG_MIN,
    MSIX_PERM_STRIDE,
    CmdStsReg,
    EngineCapReg,
    GenCapReg,
    GenCfgReg,
    GenCtrlReg,
    GenStsReg,
    GroupCapReg,
    GroupFlags,
    IdxdCmd,
    IdxdCmdstsErr,
    IdxdCommandReg,
    IdxdDeviceResetType,
    IdxdDeviceStatusState,
    IdxdIntc,
    IdxdWqMode,
    IdxdWqState,
    MsixPerm,
    OffsetsReg,
    SwErrReg,
    WqCapReg,
    WqCfg,
    field_mask,
)

MiB = 1 << 20
Log = MutableMapping[str, Any]


class RecordingIrq:
    """An InterruptSink that remembers the vectors raised."""

    def __init__(self) -> None:
        self.vectors: list[int] = []

    def trigger(self, vector: int) -> None:
        self.vectors.append(vector)

    def take(self) -> list[int]:
        taken, self.vectors = self.vectors, []
        return taken


class RecordingEngine:
    """A WqEngine that remembers how the device drove it (the engine itself has its tests).
    The WQs in ``busy`` have descriptors left: a drain or disable started on them waits."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.busy: set[int] = set()

    def enable_wq(self, wq: int, settings: WqSettings) -> None:
        self.calls.append(("enable", wq, settings))

    def disable_wq(self, wq: int) -> None:
        self.calls.append(("disable", wq))

    def start_disable(self, wq: int) -> None:
        self.calls.append(("start_disable", wq))

    def start_drain(self, wq: int) -> None:
        self.calls.append(("start_drain", wq))

    def waiting(self, wq: int) -> bool:
        return wq in self.busy

    def abort_wq(self, wq: int) -> None:
        self.calls.append(("abort", wq))

    def reset(self) -> None:
        self.calls.append(("reset",))

    def set_int_handle(self, handle: int, granted: bool) -> None:
        self.calls.append(("int_handle", handle, granted))

    def take(self) -> list[tuple[object, ...]]:
        taken, self.calls = self.calls, []
        return taken


@dataclass
class Rig:
    """A device with recording sinks and the guest's register accessors."""

    device: DsaDevice
    irq: RecordingIrq = field(default_factory=RecordingIrq)
    engine: RecordingEngine = field(default_factory=RecordingEngine)

    def state(self) -> IdxdDeviceStatusState:
        """GENSTS.state (a call, so that mypy does not narrow it between commands)."""
        return self.device.state

    def read(self, offset: int, size: int = 4) -> int:
        data = self.device.mmio_read(offset, size)
        assert len(data) == size
        return int.from_bytes(data, "little")

    def write(self, offset: int, value: int, size: int = 4) -> None:
        self.device.mmio_write(offset, value.to_bytes(size, "little"))

    def cmdsts(self) -> CmdStsReg:
        status = CmdStsReg()
        status.bits = self.read(IDXD_CMDSTS_OFFSET)
        return status

    def command(self, cmd: int, operand: int = 0, *, int_req: bool = True) -> CmdStsReg:
        """Issue a command; with int_req, check and acknowledge its completion interrupt."""
        reg = IdxdCommandReg()
        reg.cmd, reg.operand, reg.int_req = cmd, operand, int(int_req)
        self.write(IDXD_CMD_OFFSET, reg.bits)
        status = self.cmdsts()
        assert not status.active
        if int_req:
            assert self.irq.take() == [0]
            assert self.read(IDXD_INTCAUSE_OFFSET) & IdxdIntc.CMD
            self.write(IDXD_INTCAUSE_OFFSET, IdxdIntc.CMD)
        else:
            assert self.irq.take() == []
        return status

    def err(self, cmd: int, operand: int = 0) -> IdxdCmdstsErr:
        return IdxdCmdstsErr(self.command(cmd, operand).err)

    def wqcfg_offset(self, wq: int, dword: int = 0) -> int:
        return self.device.layout.wqcfg_entry_offset(wq, dword)

    def set_wq(self, wq: int, **values: int) -> None:
        """Write WQCFG dword by dword, as idxd_wq_config_write does."""
        wqcfg = self.device.wq_config(wq)
        for name, value in values.items():
            setattr(wqcfg, name, value)
        for dword in range(self.device.layout.wqcfg_size // 4):
            self.write(self.wqcfg_offset(wq, dword), wqcfg.bits[dword])

    def good_wq(self, wq: int, **overrides: int) -> None:
        values = {"wq_size": 16, "priority": 10, "mode": IdxdWqMode.DEDICATED,
                  "max_xfer_shift": 21, "max_batch_shift": 5} | overrides
        self.set_wq(wq, **values)

    def set_group(self, group: int, wqs: tuple[int, ...] = (), engines: tuple[int, ...] = ()
                  ) -> None:
        layout = self.device.layout
        for stride in range(GRPWQCFG_STRIDES):
            bitmap = sum(1 << (w % 64) for w in wqs if w // 64 == stride)
            self.write(layout.grpwqcfg_offset(group, stride), bitmap, 8)
        self.write(layout.grpengcfg_offset(group), sum(1 << e for e in engines), 8)

    def enable_device_with_wq0(self) -> None:
        self.good_wq(0)
        self.set_group(0, wqs=(0,), engines=(0,))
        assert self.err(IdxdCmd.ENABLE_DEVICE) is IdxdCmdstsErr.SUCCESS

    def enable_wq0(self) -> None:
        self.enable_device_with_wq0()
        assert self.err(IdxdCmd.ENABLE_WQ, 0) is IdxdCmdstsErr.SUCCESS


def make_rig(config: DeviceConfig | None = None) -> Rig:
    irq, engine = RecordingIrq(), RecordingEngine()
    device = DsaDevice(config or DeviceConfig(), irq, engine)
    return Rig(device, irq, engine)


@pytest.fixture
def rig() -> Rig:
    return make_rig()


def wq_operand(wq: int) -> int:
    """The operand device.c builds for disable/drain/abort/reset WQ."""
    return (1 << (wq % 16)) | ((wq // 16) << 16)


def events(logs: list[Log], prefix: str) -> list[Log]:
    return [entry for entry in logs if str(entry["event"]).startswith(prefix)]


READ_ONLY = DeviceConfig(
    mode=ConfigMode.READ_ONLY, num_wqs=2, num_engines=2, num_groups=2, total_wq_size=32,
    groups=(GroupPreset(0, (0, 1)),),
    wqs=(WqPreset(id=0, group=0, size=24, priority=7, max_transfer_size=4096),),
)


# --- BAR geometry and capabilities --------------------------------------------------------------


@pytest.mark.parametrize("config", [DeviceConfig(), READ_ONLY, DeviceConfig(num_wqs=200)],
                         ids=["default", "read-only", "200-wqs"])
def test_bars_are_powers_of_two_with_msix_above_the_tables(config: DeviceConfig) -> None:
    device = make_rig(config).device
    assert device.bar0_size & (device.bar0_size - 1) == 0
    assert device.bar2_size & (device.bar2_size - 1) == 0
    assert device.bar2_size >= config.num_wqs * 4 * IDXD_PORTAL_SIZE
    assert device.num_msix == config.num_wqs + 1
    assert device.msix_table_offset % 0x1000 == 0
    assert device.msix_pba_offset % 0x1000 == 0
    assert device.msix_table_offset >= device.layout.end
    assert device.msix_pba_offset >= device.msix_table_offset + 16 * device.num_msix
    assert device.msix_pba_offset + -(-device.num_msix // 64) * 8 <= device.bar0_size


def test_capabilities_describe_the_config(rig: Rig) -> None:
    config = rig.device.config
    assert rig.read(IDXD_VER_OFFSET) == DEVICE_VERSION_1
    gencap = GenCapReg()
    gencap.bits = rig.read(IDXD_GENCAP_OFFSET, 8)
    assert gencap.cmd_cap == 1
    assert gencap.config_en == 1
    assert gencap.block_on_fault == 1
    assert gencap.max_ims_mult == 0
    assert 1 << gencap.max_xfer_shift == config.max_transfer_size
    assert 1 << gencap.max_batch_shift == config.max_batch_size
    wqcap = WqCapReg()
    wqcap.bits = rig.read(IDXD_WQCAP_OFFSET, 8)
    assert (wqcap.num_wqs, wqcap.total_wq_size) == (config.num_wqs, config.total_wq_size)
    assert 1 << (wqcap.wqcfg_size + IDXD_WQCFG_MIN) == 32
    assert (wqcap.dedicated_mode, wqcap.shared_mode, wqcap.op_config) == (1, 0, 0)
    assert (wqcap.priority, wqcap.occupancy, wqcap.wq_ats_support) == (1, 1, 1)
    grpcap = GroupCapReg()
    grpcap.bits = rig.read(IDXD_GRPCAP_OFFSET, 8)
    assert grpcap.num_groups == config.num_groups
    engcap = EngineCapReg()
    engcap.bits = rig.read(IDXD_ENGCAP_OFFSET, 8)
    assert engcap.num_engines == config.num_engines
    opcap = rig.read(IDXD_OPCAP_OFFSET, 32)
    assert {op for op in range(256) if opcap >> op & 1} == set(map(int, DsaOpcode))
    offsets = OffsetsReg.from_buffer_copy(rig.device.mmio_read(IDXD_TABLE_OFFSET, 16))
    assert bytes(offsets) == bytes(rig.device.layout.offsets_reg())
    assert offsets.perfmon == offsets.ims == 0
    cmdcap = rig.read(IDXD_CMDCAP_OFFSET)
    assert cmdcap == sum(1 << c for c in IdxdCmd) & ~(
        (1 << IdxdCmd.REQUEST_INT_HANDLE) | (1 << IdxdCmd.RELEASE_INT_HANDLE))


def test_cmdcap_offers_interrupt_handles_when_configured() -> None:
    rig = make_rig(DeviceConfig(interrupt_handles=True))
    assert rig.read(IDXD_CMDCAP_OFFSET) == sum(1 << c for c in IdxdCmd)


def test_opcap_lists_only_the_configured_opcodes() -> None:
    rig = make_rig(DeviceConfig(opcodes=frozenset({DsaOpcode.MEMMOVE, DsaOpcode.CFLUSH})))
    assert rig.read(IDXD_OPCAP_OFFSET, 32) == (1 << DsaOpcode.MEMMOVE) | (1 << DsaOpcode.CFLUSH)


def test_read_only_config_is_preset_in_the_tables() -> None:
    rig = make_rig(READ_ONLY)
    gencap = GenCapReg()
    gencap.bits = rig.read(IDXD_GENCAP_OFFSET, 8)
    assert gencap.config_en == 0
    layout = rig.device.layout
    assert rig.read(layout.grpwqcfg_offset(0, 0), 8) == 0b01
    assert rig.read(layout.grpengcfg_offset(0), 8) == 0b11
    flags = GroupFlags()
    flags.bits = rig.read(layout.grpflgcfg_offset(0), 8)
    assert (flags.tc_a, flags.tc_b) == (1, 1)
    assert rig.read(layout.grpwqcfg_offset(1, 0), 8) == 0
    wq0, wq1 = rig.device.wq_config(0), rig.device.wq_config(1)
    assert (wq0.wq_size, wq0.priority, wq0.mode, wq0.pasid_en) == (24, 7, 1, 0)
    assert (wq0.max_xfer_shift, wq0.max_batch_shift) == (12, 10)
    # Even the unused WQ reads dedicated: idxd_wq_load_config refuses anything else.
    assert (wq1.wq_size, wq1.mode) == (0, 1)


# --- Generic reads and writes -------------------------------------------------------------------


def test_reads_of_holes_and_beyond_bar0_are_zero(rig: Rig) -> None:
    assert rig.read(0x04, 4) == 0  # between VERSION and GENCAP
    assert rig.read(IDXD_CMD_OFFSET + 4, 4) == 0
    assert rig.read(FIXED_REGISTERS_END, 8) == 0
    assert rig.read(rig.device.msix_table_offset, 16) == 0
    assert rig.read(rig.device.msix_pba_offset, 8) == 0
    assert rig.read(rig.device.bar0_size - 2, 8) == 0
    assert rig.device.mmio_read(-4, 8) == bytes(4) + DEVICE_VERSION_1.to_bytes(4, "little")
    assert rig.device.mmio_read(0, 0) == b""


def test_sub_register_and_straddling_reads(rig: Rig) -> None:
    gencap = rig.read(IDXD_GENCAP_OFFSET, 8)
    assert rig.read(IDXD_GENCAP_OFFSET, 4) | rig.read(IDXD_GENCAP_OFFSET + 4, 4) << 32 == gencap
    assert rig.read(IDXD_GENCAP_OFFSET + 3, 1) == gencap >> 24 & 0xFF
    whole = rig.read(0, 0x100)
    assert rig.read(0x0E, 4) == whole >> (8 * 0x0E) & 0xFFFF_FFFF


def test_readonly_write_is_ignored_and_logged(rig: Rig) -> None:
    before = rig.read(IDXD_GENCAP_OFFSET, 8)
    with capture_logs() as logs:
        rig.write(IDXD_GENCAP_OFFSET + 2, 0xBEEF, 2)
    assert rig.read(IDXD_GENCAP_OFFSET, 8) == before
    [entry] = events(logs, "mmio.guest_error.readonly_write")
    assert (entry["register"], entry["offset"], entry["size"], entry["value"]) == (
        "GENCAP", IDXD_GENCAP_OFFSET + 2, 2, "0xbeef")


def test_writes_to_holes_and_outside_bar0_change_nothing(rig: Rig) -> None:
    image = rig.device.mmio_read(0, rig.device.bar0_size)
    with capture_logs() as logs:
        rig.write(0x04, 0xFFFF_FFFF)
        rig.write(rig.device.bar0_size - 4, 0xFFFF_FFFF, 8)
        rig.device.mmio_write(-1, b"\xff\xff")
        rig.device.mmio_write(0x08, b"")
    assert rig.device.mmio_read(0, rig.device.bar0_size) == image
    assert len(events(logs, "mmio.guest_error.unmapped_write")) == 1
    assert len(events(logs, "mmio.guest_error.out_of_bounds_write")) == 2


def test_msix_table_writes_are_not_ours(rig: Rig) -> None:
    with capture_logs() as logs:
        rig.write(rig.device.msix_table_offset, 0x1234_5678)
        rig.write(rig.device.msix_pba_offset, 1)
    assert rig.read(rig.device.msix_table_offset) == 0
    assert rig.read(rig.device.msix_pba_offset) == 0
    assert len(events(logs, "mmio.unexpected_msix_write")) == 2


def test_genctrl_is_read_write_within_its_mask(rig: Rig) -> None:
    rig.write(IDXD_GENCTRL_OFFSET, 0xFFFF_FFFF)
    genctrl = GenCtrlReg()
    genctrl.bits = rig.read(IDXD_GENCTRL_OFFSET)
    assert (genctrl.softerr_int_en, genctrl.halt_int_en, genctrl.rsvd) == (1, 1, 0)
    rig.write(IDXD_GENCTRL_OFFSET, 0x1, 1)
    assert rig.read(IDXD_GENCTRL_OFFSET) == 0x1


def test_gencfg_is_writable_only_while_the_device_is_disabled(rig: Rig) -> None:
    user_int_en = field_mask(GenCfgReg, "user_int_en")
    rig.write(IDXD_GENCFG_OFFSET, user_int_en)
    assert rig.read(IDXD_GENCFG_OFFSET) == user_int_en
    rig.write(IDXD_GENCFG_OFFSET, 0)
    rig.enable_device_with_wq0()
    with capture_logs() as logs:
        rig.write(IDXD_GENCFG_OFFSET, user_int_en)
    assert rig.read(IDXD_GENCFG_OFFSET) == 0
    assert events(logs, "mmio.guest_error.locked_write")


def test_intcause_is_write_1_to_clear(rig: Rig) -> None:
    rig.write(IDXD_CMD_OFFSET, IdxdCommandReg(cmd=IdxdCmd.DRAIN_ALL, int_req=1).bits)
    assert rig.irq.take() == [0]
    rig.device.report_software_error(DsaCompStatus.BAD_OPCODE)
    assert rig.read(IDXD_INTCAUSE_OFFSET) == IdxdIntc.CMD | IdxdIntc.ERR
    rig.write(IDXD_INTCAUSE_OFFSET, 0)
    assert rig.read(IDXD_INTCAUSE_OFFSET) == IdxdIntc.CMD | IdxdIntc.ERR
    rig.write(IDXD_INTCAUSE_OFFSET, IdxdIntc.ERR, 1)
    assert rig.read(IDXD_INTCAUSE_OFFSET) == IdxdIntc.CMD


# --- Software errors ----------------------------------------------------------------------------


def read_swerr(rig: Rig) -> SwErrReg:
    return SwErrReg.from_buffer_copy(rig.device.mmio_read(IDXD_SWERR_OFFSET, 32))


def test_software_error_is_logged_once_then_overflows(rig: Rig) -> None:
    rig.device.report_software_error(DsaCompStatus.BAD_OPCODE, wq=3)
    assert rig.irq.take() == []  # GENCTRL.softerr_int_en is 0
    swerr = read_swerr(rig)
    assert (swerr.valid, swerr.overflow, swerr.error) == (1, 0, DsaCompStatus.BAD_OPCODE)
    assert (swerr.wq_idx_valid, swerr.wq_idx) == (1, 3)
    rig.write(IDXD_GENCTRL_OFFSET, GenCtrlReg(softerr_int_en=1).bits)
    rig.device.report_software_error(DsaCompStatus.XFER_ERANGE)
    swerr = read_swerr(rig)
    assert (swerr.valid, swerr.overflow, swerr.error) == (1, 1, DsaCompStatus.BAD_OPCODE)
    assert rig.irq.take() == []  # an overflow adds no interrupt
    # The driver's acknowledgement: qword 0 & IDXD_SWERR_ACK written back (irq.c).
    rig.write(IDXD_SWERR_OFFSET, read_swerr(rig).bits[0] & IDXD_SWERR_ACK, 8)
    assert (read_swerr(rig).valid, read_swerr(rig).overflow) == (0, 0)
    rig.device.report_software_error(DsaCompStatus.XFER_ERANGE)
    assert rig.irq.take() == [0]
    swerr = read_swerr(rig)
    assert (swerr.valid, swerr.error, swerr.wq_idx_valid) == (1, DsaCompStatus.XFER_ERANGE, 0)


# --- Commands -----------------------------------------------------------------------------------


def test_command_without_int_req_raises_no_interrupt(rig: Rig) -> None:
    assert rig.command(IdxdCmd.DRAIN_ALL, int_req=False).err == IdxdCmdstsErr.SUCCESS
    assert rig.read(IDXD_INTCAUSE_OFFSET) == 0


def test_command_register_reads_back_and_partial_writes_are_ignored(rig: Rig) -> None:
    enable = IdxdCommandReg(cmd=IdxdCmd.ENABLE_DEVICE, int_req=1).bits
    with capture_logs() as logs:
        rig.write(IDXD_CMD_OFFSET + 3, enable >> 24, 1)
    assert rig.irq.take() == []
    assert rig.state() is IdxdDeviceStatusState.DISABLED
    assert events(logs, "mmio.guest_error.partial_command_write")
    rig.command(IdxdCmd.DRAIN_ALL, 5, int_req=False)
    reg = IdxdCommandReg()
    reg.bits = rig.read(IDXD_CMD_OFFSET)
    assert (reg.cmd, reg.operand) == (IdxdCmd.DRAIN_ALL, 5)


def test_a_64_bit_write_over_cmd_runs_the_command(rig: Rig) -> None:
    rig.write(IDXD_CMD_OFFSET, IdxdCommandReg(cmd=IdxdCmd.DRAIN_ALL, int_req=1).bits, 8)
    assert rig.irq.take() == [0]


@pytest.mark.parametrize("code", [0, 15, 31])
def test_unknown_commands_are_invalid(rig: Rig, code: int) -> None:
    with capture_logs() as logs:
        assert rig.err(code) is IdxdCmdstsErr.INVAL_CMD
    [entry] = events(logs, "device.command")
    assert entry["command"] == f"#{code}"


def test_unadvertised_int_handle_commands_are_invalid(rig: Rig) -> None:
    assert rig.err(IdxdCmd.REQUEST_INT_HANDLE, 1) is IdxdCmdstsErr.INVAL_CMD
    assert rig.err(IdxdCmd.RELEASE_INT_HANDLE, 1) is IdxdCmdstsErr.INVAL_CMD


def test_enable_and_disable_device(rig: Rig) -> None:
    with capture_logs() as logs:
        rig.enable_device_with_wq0()
    assert rig.state() is IdxdDeviceStatusState.ENABLED
    assert GenStsReg(bits=rig.read(IDXD_GENSTATS_OFFSET)).state == IdxdDeviceStatusState.ENABLED
    [state] = events(logs, "device.state")
    assert (state["old"], state["new"]) == ("DISABLED", "ENABLED")
    [command] = events(logs, "device.command")
    assert (command["command"], command["status"]) == ("ENABLE_DEVICE", "SUCCESS")
    assert rig.err(IdxdCmd.ENABLE_DEVICE) is IdxdCmdstsErr.ERR_DEV_ENABLED
    assert rig.err(IdxdCmd.ENABLE_WQ, 0) is IdxdCmdstsErr.SUCCESS
    assert rig.err(IdxdCmd.DISABLE_DEVICE) is IdxdCmdstsErr.SUCCESS
    assert rig.state() is IdxdDeviceStatusState.DISABLED
    assert rig.device.wq_state(0) is IdxdWqState.DISABLED
    assert rig.err(IdxdCmd.DISABLE_DEVICE) is IdxdCmdstsErr.ERR_DIS_DEV_EN
    assert rig.device.wq_config(0).wq_size == 16  # disabling keeps the configuration


def test_enable_device_refuses_a_bad_gencfg(rig: Rig) -> None:
    rig.write(IDXD_GENCFG_OFFSET, GenCfgReg(rdbuf_limit=200).bits)  # GRPCAP offers 96
    assert rig.err(IdxdCmd.ENABLE_DEVICE) is IdxdCmdstsErr.ERR_CONFIG
    rig.write(IDXD_GENCFG_OFFSET, GenCfgReg(rdbuf_limit=96).bits)
    assert rig.err(IdxdCmd.ENABLE_DEVICE) is IdxdCmdstsErr.SUCCESS


def test_enable_device_refuses_too_large_wqs(rig: Rig) -> None:
    rig.good_wq(0, wq_size=100)
    rig.good_wq(1, wq_size=29)
    assert rig.err(IdxdCmd.ENABLE_DEVICE) is IdxdCmdstsErr.ERR_WQ_SIZE_ERANGE
    rig.good_wq(1, wq_size=28)
    assert rig.err(IdxdCmd.ENABLE_DEVICE) is IdxdCmdstsErr.SUCCESS


@pytest.mark.parametrize(
    ("groups", "expected"),
    [
        ({0: ((0,), (0,)), 1: ((0,), (1,))}, IdxdCmdstsErr.ERR_GRP_CONFIG),
        ({0: ((0,), (0,)), 1: ((1,), (0,))}, IdxdCmdstsErr.ERR_GRP_CONFIG2),
        ({0: ((0,), (0,)), 1: ((1,), ())}, IdxdCmdstsErr.ERR_GRP_CONFIG3),
        ({0: ((0,), (0, 1)), 1: ((), (2,))}, IdxdCmdstsErr.SUCCESS),  # idle engines are fine
        ({}, IdxdCmdstsErr.SUCCESS),
    ],
    ids=["wq-twice", "engine-twice", "no-engine", "idle-engine", "empty"],
)
def test_enable_device_checks_the_groups(
    rig: Rig, groups: dict[int, tuple[tuple[int, ...], tuple[int, ...]]],
    expected: IdxdCmdstsErr,
) -> None:
    for group, (wqs, engines) in groups.items():
        rig.set_group(group, wqs, engines)
    assert rig.err(IdxdCmd.ENABLE_DEVICE) is expected


def test_group_bits_beyond_the_topology_are_reserved(rig: Rig) -> None:
    layout = rig.device.layout
    with capture_logs() as logs:
        rig.write(layout.grpwqcfg_offset(0, 0), 0xFFFF, 8)
        rig.write(layout.grpwqcfg_offset(0, 1), 0xFFFF, 8)
        rig.write(layout.grpengcfg_offset(0), 0xFF, 8)
        rig.write(layout.grpflgcfg_offset(0), 0xFFFF_FFFF_FFFF_FFFF, 8)
        rig.write(layout.grpwqcfg_offset(0, 0) + 48, 0xFFFF_FFFF, 4)
    assert rig.read(layout.grpwqcfg_offset(0, 0), 8) == 0xFF
    assert rig.read(layout.grpwqcfg_offset(0, 1), 8) == 0
    assert rig.read(layout.grpengcfg_offset(0), 8) == 0x0F
    writable = 0
    for name in ("tc_a", "tc_b", "use_rdbuf_limit", "rdbufs_reserved", "rdbufs_allowed"):
        writable |= field_mask(GroupFlags, name)
    assert rig.read(layout.grpflgcfg_offset(0), 8) == writable
    assert rig.read(layout.grpwqcfg_offset(0, 0) + 48, 16) == 0
    assert len(events(logs, "mmio.guest_error.readonly_bits")) == 5


def test_grpcfg_is_frozen_while_the_device_is_enabled(rig: Rig) -> None:
    rig.enable_device_with_wq0()
    layout = rig.device.layout
    with capture_logs() as logs:
        rig.write(layout.grpengcfg_offset(0), 0b1, 8)  # the driver's identical rewrite
        rig.write(layout.grpwqcfg_offset(0, 0), 0b11, 8)
    assert rig.read(layout.grpwqcfg_offset(0, 0), 8) == 0b1
    assert [e["event"] for e in logs if e["log_level"] != "debug"] == [
        "mmio.guest_error.locked_write"]
    assert rig.err(IdxdCmd.DISABLE_DEVICE) is IdxdCmdstsErr.SUCCESS
    rig.write(layout.grpwqcfg_offset(0, 0), 0b11, 8)
    assert rig.read(layout.grpwqcfg_offset(0, 0), 8) == 0b11


def test_reset_device_returns_to_power_on(rig: Rig) -> None:
    power_on = rig.device.mmio_read(0, rig.device.bar0_size)
    rig.write(IDXD_GENCTRL_OFFSET, 0b11)
    rig.write(rig.device.layout.msix_perm_entry_offset(1), field_mask(MsixPerm, "ignore"))
    rig.enable_wq0()
    rig.device.report_software_error(DsaCompStatus.BAD_OPCODE)
    rig.irq.take()
    with capture_logs() as logs:
        assert rig.err(IdxdCmd.RESET_DEVICE) is IdxdCmdstsErr.SUCCESS
    assert rig.state() is IdxdDeviceStatusState.DISABLED
    image = bytearray(rig.device.mmio_read(0, rig.device.bar0_size))
    image[IDXD_CMD_OFFSET : IDXD_CMD_OFFSET + 8] = bytes(8)  # the command and its status
    assert bytes(image) == power_on
    [reset] = events(logs, "device.reset")
    assert reset["old_state"] == "ENABLED"


def test_drain_and_abort_all_and_pasid_succeed(rig: Rig) -> None:
    for cmd in (IdxdCmd.DRAIN_ALL, IdxdCmd.ABORT_ALL, IdxdCmd.DRAIN_PASID, IdxdCmd.ABORT_PASID):
        assert rig.err(cmd, 0x12345) is IdxdCmdstsErr.SUCCESS
    rig.enable_wq0()
    for cmd in (IdxdCmd.DRAIN_ALL, IdxdCmd.ABORT_ALL, IdxdCmd.DRAIN_PASID, IdxdCmd.ABORT_PASID):
        assert rig.err(cmd, 1) is IdxdCmdstsErr.SUCCESS
    assert rig.device.wq_state(0) is IdxdWqState.ENABLED


def test_enable_wq(rig: Rig) -> None:
    rig.enable_device_with_wq0()
    with capture_logs() as logs:
        assert rig.err(IdxdCmd.ENABLE_WQ, 0) is IdxdCmdstsErr.SUCCESS
    assert rig.device.wq_state(0) is IdxdWqState.ENABLED
    dword6 = WqCfg()
    dword6.bits[6] = rig.read(rig.wqcfg_offset(0, 6))
    assert dword6.wq_state == IdxdWqState.ENABLED
    [state] = events(logs, "wq.state")
    assert (state["wq"], state["old"], state["new"]) == (0, "DISABLED", "ENABLED")
    assert rig.err(IdxdCmd.ENABLE_WQ, 0) is IdxdCmdstsErr.ERR_WQ_ENABLED
    assert rig.err(IdxdCmd.ENABLE_WQ, 8) is IdxdCmdstsErr.INVAL_WQIDX


def test_enable_wq_needs_an_enabled_device(rig: Rig) -> None:
    rig.good_wq(0)
    rig.set_group(0, (0,), (0,))
    assert rig.err(IdxdCmd.ENABLE_WQ, 0) is IdxdCmdstsErr.ERR_DEV_NOTEN


@pytest.mark.parametrize(
    ("wqcfg", "expected"),
    [
        ({"wq_size": 0}, IdxdCmdstsErr.ERR_WQ_SIZE),
        ({"priority": 0}, IdxdCmdstsErr.ERR_WQ_PRIOR),
        ({"mode": IdxdWqMode.SHARED}, IdxdCmdstsErr.ERR_WQ_MODE),
        ({"bof": 1}, IdxdCmdstsErr.SUCCESS),
        ({"pasid_en": 1, "pasid": 5}, IdxdCmdstsErr.ERR_PASID_EN),
        ({"max_batch_shift": 11}, IdxdCmdstsErr.ERR_MAX_BATCH_SIZE),
        ({"max_xfer_shift": 22}, IdxdCmdstsErr.ERR_MAX_XFER_SIZE),
        ({"priv": 1, "max_batch_shift": 10, "max_xfer_shift": 21}, IdxdCmdstsErr.SUCCESS),
    ],
    ids=lambda v: v.name if isinstance(v, IdxdCmdstsErr) else ",".join(v),
)
def test_enable_wq_checks_its_configuration(
    rig: Rig, wqcfg: dict[str, int], expected: IdxdCmdstsErr
) -> None:
    rig.enable_device_with_wq0()
    rig.good_wq(0, **wqcfg)
    assert rig.err(IdxdCmd.ENABLE_WQ, 0) is expected


def test_enable_wq_outside_every_group_fails(rig: Rig) -> None:
    rig.enable_device_with_wq0()
    rig.good_wq(1)
    assert rig.err(IdxdCmd.ENABLE_WQ, 1) is IdxdCmdstsErr.ERR_GRP_CONFIG


def test_enabled_wqs_share_total_wq_size(rig: Rig) -> None:
    rig.good_wq(0, wq_size=100)
    rig.good_wq(1, wq_size=28)
    rig.set_group(0, (0, 1), (0,))
    assert rig.err(IdxdCmd.ENABLE_DEVICE) is IdxdCmdstsErr.SUCCESS
    assert rig.err(IdxdCmd.ENABLE_WQ, 0) is IdxdCmdstsErr.SUCCESS
    rig.good_wq(1, wq_size=29)  # WQCFG of a disabled WQ stays writable
    assert rig.err(IdxdCmd.ENABLE_WQ, 1) is IdxdCmdstsErr.ERR_WQ_SIZE
    rig.good_wq(1, wq_size=28)
    assert rig.err(IdxdCmd.ENABLE_WQ, 1) is IdxdCmdstsErr.SUCCESS


def test_wqcfg_is_frozen_while_the_wq_is_enabled(rig: Rig) -> None:
    rig.enable_wq0()
    before = rig.device.wq_config(0)
    with capture_logs() as logs:
        rig.write(rig.wqcfg_offset(0), 3)
        rig.write(rig.wqcfg_offset(0, 2), before.bits[2])  # identical: routine for the driver
    assert bytes(rig.device.wq_config(0)) == bytes(before)
    assert [e["event"] for e in logs if e["log_level"] != "debug"] == [
        "mmio.guest_error.locked_write"]


def test_wqcfg_read_only_fields_keep_their_value(rig: Rig) -> None:
    rig.enable_wq0()
    rig.err(IdxdCmd.DISABLE_WQ, wq_operand(0))
    with capture_logs() as logs:
        rig.write(rig.wqcfg_offset(0, 6), 0xFFFF_FFFF)
        rig.write(rig.wqcfg_offset(0, 4), 0xFFFF_FFFF, 8)
        rig.write(rig.wqcfg_offset(0, 2), 0xFFFF_FFFF)
    wqcfg = rig.device.wq_config(0)
    assert (wqcfg.occupancy, wqcfg.wq_state, wqcfg.occupancy_limit) == (
        0, IdxdWqState.DISABLED, 0)
    assert (wqcfg.priority, wqcfg.pasid, wqcfg.mode, wqcfg.priv, wqcfg.wq_ats_disable) == (
        15, 0xFFFFF, 1, 1, 1)
    assert len(events(logs, "mmio.guest_error.readonly_bits")) == 3


@pytest.mark.parametrize("cmd", [IdxdCmd.DISABLE_WQ, IdxdCmd.DRAIN_WQ, IdxdCmd.ABORT_WQ,
                                 IdxdCmd.RESET_WQ])
def test_wq_commands_need_existing_enabled_wqs(rig: Rig, cmd: IdxdCmd) -> None:
    assert rig.err(cmd, wq_operand(0)) is IdxdCmdstsErr.ERR_DEV_NOT_EN
    rig.enable_wq0()
    assert rig.err(cmd, wq_operand(8)) is IdxdCmdstsErr.INVAL_WQIDX
    assert rig.err(cmd, wq_operand(16)) is IdxdCmdstsErr.INVAL_WQIDX
    assert rig.err(cmd, wq_operand(0) | wq_operand(1)) is IdxdCmdstsErr.ERR_DEV_NOT_EN
    assert rig.device.wq_state(0) is IdxdWqState.ENABLED
    assert rig.err(cmd, wq_operand(0)) is IdxdCmdstsErr.SUCCESS


def test_disable_wq_keeps_and_reset_wq_clears_the_configuration(rig: Rig) -> None:
    rig.enable_wq0()
    assert rig.err(IdxdCmd.DISABLE_WQ, wq_operand(0)) is IdxdCmdstsErr.SUCCESS
    assert rig.device.wq_state(0) is IdxdWqState.DISABLED
    assert rig.device.wq_config(0).wq_size == 16
    assert rig.err(IdxdCmd.ENABLE_WQ, 0) is IdxdCmdstsErr.SUCCESS
    assert rig.err(IdxdCmd.RESET_WQ, wq_operand(0)) is IdxdCmdstsErr.SUCCESS
    assert rig.device.wq_state(0) is IdxdWqState.DISABLED
    assert bytes(rig.device.wq_config(0)) == bytes(WqCfg())


def test_wq_commands_address_wqs_beyond_16_by_set() -> None:
    rig = make_rig(DeviceConfig(num_wqs=20))
    rig.good_wq(17)
    rig.good_wq(3)
    rig.set_group(0, (3, 17), (0,))
    assert rig.err(IdxdCmd.ENABLE_DEVICE) is IdxdCmdstsErr.SUCCESS
    assert rig.err(IdxdCmd.ENABLE_WQ, 17) is IdxdCmdstsErr.SUCCESS
    assert rig.err(IdxdCmd.ENABLE_WQ, 3) is IdxdCmdstsErr.SUCCESS
    assert rig.err(IdxdCmd.DISABLE_WQ, wq_operand(17)) is IdxdCmdstsErr.SUCCESS
    assert rig.device.wq_state(17) is IdxdWqState.DISABLED
    assert rig.device.wq_state(3) is IdxdWqState.ENABLED


def test_interrupt_handles() -> None:
    rig = make_rig(DeviceConfig(interrupt_handles=True))
    status = rig.command(IdxdCmd.REQUEST_INT_HANDLE, 3)
    assert (status.err, status.result) == (IdxdCmdstsErr.SUCCESS, 3)
    assert status.bits == 3 << IDXD_CMDSTS_RES_SHIFT  # where device.c finds the handle
    assert rig.device.int_handle_vector(3) == 3
    assert rig.device.int_handle_vector(4) is None
    assert rig.err(IdxdCmd.REQUEST_INT_HANDLE, 9) is IdxdCmdstsErr.ERR_INVAL_INT_IDX
    assert rig.err(IdxdCmd.REQUEST_INT_HANDLE, 2 | CMD_INT_HANDLE_IMS) is (
        IdxdCmdstsErr.ERR_INVAL_INT_IDX)
    # Release is polled, without int_req (idxd_device_release_int_handle).
    assert rig.command(IdxdCmd.RELEASE_INT_HANDLE, 3, int_req=False).err == IdxdCmdstsErr.SUCCESS
    assert rig.device.int_handle_vector(3) is None
    assert rig.err(IdxdCmd.RELEASE_INT_HANDLE, 3) is IdxdCmdstsErr.ERR_INVAL_INT_IDX
    assert rig.err(IdxdCmd.RELEASE_INT_HANDLE, 3 | CMD_INT_HANDLE_IMS) is (
        IdxdCmdstsErr.ERR_INVAL_INT_IDX)
    rig.command(IdxdCmd.REQUEST_INT_HANDLE, 1)
    rig.device.reset()
    assert rig.device.int_handle_vector(1) is None


def test_without_int_handles_descriptors_name_the_vector(rig: Rig) -> None:
    assert rig.device.int_handle_vector(8) == 8
    assert rig.device.int_handle_vector(9) is None


def test_msix_permissions_keep_the_driver_written_fields(rig: Rig) -> None:
    entry = rig.device.layout.msix_perm_entry_offset(2)
    assert entry == rig.device.layout.msix_perm_entry_offset(0) + 2 * MSIX_PERM_STRIDE
    perm = MsixPerm(pasid=0x1234, pasid_en=1)
    rig.write(entry, perm.bits | 0xF00)
    rig.write(entry + 4, 0xFFFF_FFFF)
    assert rig.read(entry, 8) == perm.bits
    rig.write(entry, 0)  # idxd_device_clear_perm_entry
    assert rig.read(entry, 8) == 0


# --- Halt and resets ----------------------------------------------------------------------------


def test_halt_needing_software_reset(rig: Rig) -> None:
    rig.enable_wq0()
    rig.write(IDXD_GENCTRL_OFFSET, GenCtrlReg(halt_int_en=1).bits)
    with capture_logs() as logs:
        rig.device.halt(IdxdDeviceResetType.SOFTWARE)
    assert rig.irq.take() == [0]
    assert rig.read(IDXD_INTCAUSE_OFFSET) == IdxdIntc.HALT_STATE
    gensts = GenStsReg(bits=rig.read(IDXD_GENSTATS_OFFSET))
    assert (gensts.state, gensts.reset_type) == (IdxdDeviceStatusState.HALT,
                                                 IdxdDeviceResetType.SOFTWARE)
    assert rig.device.wq_state(0) is IdxdWqState.DISABLED
    assert events(logs, "device.halt")
    assert read_swerr(rig).valid == 0
    assert rig.err(IdxdCmd.ENABLE_DEVICE) is IdxdCmdstsErr.HW_ERR
    assert rig.err(IdxdCmd.DRAIN_ALL) is IdxdCmdstsErr.HW_ERR
    assert rig.err(IdxdCmd.RESET_DEVICE) is IdxdCmdstsErr.SUCCESS
    assert rig.state() is IdxdDeviceStatusState.DISABLED


def test_halt_needing_flr_takes_no_reset_command(rig: Rig) -> None:
    rig.write(IDXD_GENCTRL_OFFSET, GenCtrlReg(softerr_int_en=1).bits)
    rig.device.halt(IdxdDeviceResetType.FLR, error=DsaCompStatus.HW_ERR1)
    assert rig.irq.take() == [0]  # one interrupt, for the software error (halt_int_en is 0)
    assert rig.read(IDXD_INTCAUSE_OFFSET) == IdxdIntc.HALT_STATE | IdxdIntc.ERR
    assert read_swerr(rig).error == DsaCompStatus.HW_ERR1
    assert rig.device.reset_type is IdxdDeviceResetType.FLR
    assert rig.err(IdxdCmd.RESET_DEVICE) is IdxdCmdstsErr.HW_ERR
    assert rig.state() is IdxdDeviceStatusState.HALT
    rig.device.reset()
    assert rig.state() is IdxdDeviceStatusState.DISABLED
    assert rig.read(IDXD_INTCAUSE_OFFSET) == 0
    assert read_swerr(rig).valid == 0


def test_halt_without_interrupt_enables_is_silent(rig: Rig) -> None:
    rig.device.halt(IdxdDeviceResetType.WARM, error=DsaCompStatus.HW_ERR1)
    assert rig.irq.take() == []


def test_function_level_reset_restores_power_on(rig: Rig) -> None:
    power_on = rig.device.mmio_read(0, rig.device.bar0_size)
    rig.write(IDXD_GENCTRL_OFFSET, 0b11)
    rig.enable_wq0()
    rig.device.report_software_error(DsaCompStatus.BAD_OPCODE)
    with capture_logs() as logs:
        rig.device.reset()
    assert rig.device.mmio_read(0, rig.device.bar0_size) == power_on
    assert events(logs, "device.reset")


def test_read_only_config_survives_resets() -> None:
    rig = make_rig(READ_ONLY)
    preset = bytes(rig.device.wq_config(0))
    rig.set_wq(0, pasid=5, pasid_en=1)
    assert (rig.device.wq_config(0).pasid, rig.device.wq_config(0).pasid_en) == (5, 1)
    assert rig.err(IdxdCmd.ENABLE_DEVICE) is IdxdCmdstsErr.SUCCESS
    rig.set_wq(0, pasid_en=0)
    assert rig.err(IdxdCmd.ENABLE_WQ, 0) is IdxdCmdstsErr.SUCCESS
    assert rig.err(IdxdCmd.RESET_WQ, wq_operand(0)) is IdxdCmdstsErr.SUCCESS
    assert bytes(rig.device.wq_config(0)) == preset
    assert rig.err(IdxdCmd.RESET_DEVICE) is IdxdCmdstsErr.SUCCESS
    assert bytes(rig.device.wq_config(0)) == preset
    assert rig.read(rig.device.layout.grpengcfg_offset(0), 8) == 0b11


def test_read_only_config_refuses_configuration_writes() -> None:
    rig = make_rig(READ_ONLY)
    layout = rig.device.layout
    with capture_logs() as logs:
        rig.write(layout.grpwqcfg_offset(0, 0), 0b11, 8)
        rig.write(rig.wqcfg_offset(0), 8)
        rig.write(rig.wqcfg_offset(0, 2), 0)  # mode and priority may not change either
    assert rig.read(layout.grpwqcfg_offset(0, 0), 8) == 0b01
    assert (rig.device.wq_config(0).wq_size, rig.device.wq_config(0).priority) == (24, 7)
    assert [e["event"] for e in logs if e["log_level"] != "debug"] == [
        "mmio.guest_error.readonly_write", "mmio.guest_error.readonly_bits",
        "mmio.guest_error.readonly_bits"]


# --- The descriptor engine, as commands drive it ----------------------------------------------


def test_enable_wq_hands_the_engine_the_wq_and_its_group(rig: Rig) -> None:
    rig.good_wq(0, wq_size=24, priority=7, max_xfer_shift=16, max_batch_shift=4)
    rig.set_group(0, wqs=(0,), engines=(1, 2))
    rig.err(IdxdCmd.ENABLE_DEVICE)
    rig.engine.take()
    assert rig.err(IdxdCmd.ENABLE_WQ, 0) is IdxdCmdstsErr.SUCCESS
    assert rig.engine.take() == [("enable", 0, WqSettings(
        size=24, priority=7, engines=0b110, max_transfer_size=1 << 16, max_batch_size=16))]


def test_a_refused_enable_wq_leaves_the_engine_alone(rig: Rig) -> None:
    rig.enable_device_with_wq0()
    rig.good_wq(1, priority=0)
    rig.engine.take()
    assert rig.err(IdxdCmd.ENABLE_WQ, 1) is IdxdCmdstsErr.ERR_GRP_CONFIG
    assert rig.engine.take() == []


def test_wq_commands_reach_the_engine(rig: Rig) -> None:
    rig.enable_wq0()
    rig.engine.take()
    for command in (IdxdCmd.DRAIN_WQ, IdxdCmd.ABORT_WQ, IdxdCmd.DRAIN_ALL, IdxdCmd.ABORT_ALL):
        assert rig.err(command, wq_operand(0)) is IdxdCmdstsErr.SUCCESS
    assert rig.engine.take() == [("start_drain", 0), ("abort", 0), ("start_drain", 0),
                                 ("abort", 0)]
    # Reset WQ abandons what is queued, then disables.
    assert rig.err(IdxdCmd.RESET_WQ, wq_operand(0)) is IdxdCmdstsErr.SUCCESS
    assert rig.engine.take() == [("abort", 0), ("disable", 0)]


def test_disable_device_disables_enabled_wqs_only(rig: Rig) -> None:
    rig.enable_wq0()
    rig.engine.take()
    assert rig.err(IdxdCmd.DISABLE_DEVICE) is IdxdCmdstsErr.SUCCESS
    assert rig.engine.take() == [("start_disable", 0)]


def issue(rig: Rig, cmd: int, operand: int = 0) -> None:
    """Write CMD with int_req and return without looking at CMDSTS."""
    reg = IdxdCommandReg()
    reg.cmd, reg.operand, reg.int_req = cmd, operand, 1
    rig.write(IDXD_CMD_OFFSET, reg.bits)


@pytest.mark.parametrize("cmd", [IdxdCmd.DRAIN_WQ, IdxdCmd.DISABLE_WQ, IdxdCmd.DRAIN_ALL,
                                 IdxdCmd.DISABLE_DEVICE])
def test_a_command_waiting_for_descriptors_stays_active_until_the_engine_is_done(
        rig: Rig, cmd: IdxdCmd) -> None:
    """The register write returns at once (the server's loop goes on); CMDSTS is active, no
    interrupt, WQ and device states unchanged, until the engine's wait is over."""
    rig.enable_wq0()
    rig.engine.busy.add(0)
    issue(rig, cmd, wq_operand(0))
    for _ in range(3):
        rig.device.poll_commands()  # a wait over on some other WQ changes nothing
        assert rig.cmdsts().active
        assert rig.irq.take() == []
        assert rig.device.wq_state(0) is IdxdWqState.ENABLED
        assert rig.state() is IdxdDeviceStatusState.ENABLED
    rig.engine.busy.clear()
    rig.device.poll_commands()
    status = rig.cmdsts()
    assert (status.active, status.err) == (0, IdxdCmdstsErr.SUCCESS)
    assert rig.irq.take() == [0]
    assert rig.read(IDXD_INTCAUSE_OFFSET) & IdxdIntc.CMD
    disabled = cmd in (IdxdCmd.DISABLE_WQ, IdxdCmd.DISABLE_DEVICE)
    assert (rig.device.wq_state(0) is IdxdWqState.DISABLED) == disabled
    assert (rig.state() is IdxdDeviceStatusState.DISABLED) == (cmd is IdxdCmd.DISABLE_DEVICE)


def test_a_command_written_while_one_is_active_is_dropped(rig: Rig) -> None:
    rig.enable_wq0()
    rig.engine.busy.add(0)
    issue(rig, IdxdCmd.DRAIN_WQ, wq_operand(0))
    rig.engine.take()
    issue(rig, IdxdCmd.ABORT_WQ, wq_operand(0))
    assert rig.engine.take() == []
    assert rig.cmdsts().active
    rig.engine.busy.clear()
    rig.device.poll_commands()
    assert (rig.cmdsts().active, rig.irq.take()) == (0, [0])
    rig.write(IDXD_INTCAUSE_OFFSET, IdxdIntc.CMD)
    assert rig.err(IdxdCmd.ABORT_WQ, wq_operand(0)) is IdxdCmdstsErr.SUCCESS


def test_a_reset_ends_an_active_command_and_a_halt_fails_it(rig: Rig) -> None:
    rig.enable_wq0()
    rig.engine.busy.add(0)
    issue(rig, IdxdCmd.DISABLE_WQ, wq_operand(0))
    rig.device.reset()
    assert rig.cmdsts().bits == 0
    rig.device.poll_commands()
    assert (rig.cmdsts().bits, rig.irq.take()) == (0, [])
    rig.enable_wq0()
    issue(rig, IdxdCmd.DRAIN_WQ, wq_operand(0))
    rig.device.halt(IdxdDeviceResetType.SOFTWARE)
    status = rig.cmdsts()
    assert (status.active, status.err) == (0, IdxdCmdstsErr.HW_ERR)
    assert 0 in rig.irq.take()


def test_resets_reset_the_engine(rig: Rig) -> None:
    rig.enable_wq0()
    rig.engine.take()
    rig.err(IdxdCmd.RESET_DEVICE)
    rig.device.reset()
    assert rig.engine.take() == [("reset",), ("reset",)]


def test_halt_aborts_and_disables_wqs(rig: Rig) -> None:
    rig.enable_wq0()
    rig.engine.take()
    rig.device.halt(IdxdDeviceResetType.SOFTWARE)
    assert rig.engine.take() == [("abort", 0), ("disable", 0)]


def test_engine_errors_fill_swerr(rig: Rig) -> None:
    rig.write(IDXD_GENCTRL_OFFSET, 0b01)  # softerr_int_en
    rig.device.report_engine_error(SoftwareError(
        error=0x1A, operation=3, wq=2, fault_rw=1, batch=1, desc_valid=1, batch_index=5,
        invalid_flags=0, fault_addr=0x1234_5000))
    swerr = read_swerr(rig)
    assert (swerr.valid, swerr.error, swerr.operation, swerr.wq_idx_valid, swerr.wq_idx) == (
        1, 0x1A, 3, 1, 2)
    assert (swerr.batch, swerr.batch_idx, swerr.fault_rw, swerr.fault_addr) == (
        1, 5, 1, 0x1234_5000)
    assert rig.irq.take() == [0]


# --- The stock Linux 6.1 driver, replayed -------------------------------------------------------


@dataclass
class SysfsWq:
    """What accel-config writes under /sys/bus/dsa/devices/wqX.Y (the driver's struct idxd_wq)."""

    group: int | None = None
    size: int = 0
    priority: int = 0
    dedicated: bool = False
    kernel: bool = False
    max_xfer_bytes: int = 2 * MiB  # WQ_DEFAULT_MAX_XFER
    max_batch_size: int = 32  # WQ_DEFAULT_MAX_BATCH
    threshold: int = 0


class StockDriver:
    """The register accesses of Linux 6.1 ``drivers/dma/idxd``, in the driver's order.

    Each method names the driver function it replays. Interrupts are handled the way
    ``idxd_misc_thread`` does; a command with int_req must complete through vector 0.
    """

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.wqs: list[SysfsWq] = []
        self.engine_group: dict[int, int] = {}
        self.enabled_wqs: set[int] = set()
        self.device_enabled = False
        self.int_handles: dict[int, int] = {}
        self.shadow: list[WqCfg] = []

    def read32(self, offset: int) -> int:
        return self.rig.read(offset, 4)

    def read64(self, offset: int) -> int:
        return self.rig.read(offset, 8)

    def write32(self, offset: int, value: int) -> None:
        self.rig.write(offset, value, 4)

    def write64(self, offset: int, value: int) -> None:
        self.rig.write(offset, value, 8)

    # registers.h macros, on the offsets the driver read from OFFSETS
    def wqcfg(self, wq: int, dword: int) -> int:
        return self.wqcfg_offset + wq * self.wqcfg_size + 4 * dword

    def grpwqcfg(self, group: int, stride: int) -> int:
        return self.grpcfg_offset + group * GRPCFG_SIZE + 8 * stride

    def grpengcfg(self, group: int) -> int:
        return self.grpcfg_offset + group * GRPCFG_SIZE + 32

    def grpflgcfg(self, group: int) -> int:
        return self.grpcfg_offset + group * GRPCFG_SIZE + 40

    def halted(self) -> bool:
        return GenStsReg(bits=self.read32(IDXD_GENSTATS_OFFSET)).state == (
            IdxdDeviceStatusState.HALT)

    def misc_thread(self) -> int:
        """idxd_misc_thread on vector 0: acknowledge INTCAUSE, process it; returns the causes."""
        assert self.rig.irq.take() == [0]
        seen = 0
        cause = self.read32(IDXD_INTCAUSE_OFFSET)
        if cause:
            self.write32(IDXD_INTCAUSE_OFFSET, cause)
        while cause:
            seen |= cause
            assert not cause & IdxdIntc.HALT_STATE
            if cause & IdxdIntc.ERR:
                swerr = [self.read64(IDXD_SWERR_OFFSET + 8 * i) for i in range(4)]
                self.write64(IDXD_SWERR_OFFSET, swerr[0] & IDXD_SWERR_ACK)
            cause = self.read32(IDXD_INTCAUSE_OFFSET)
            if cause:
                self.write32(IDXD_INTCAUSE_OFFSET, cause)
        return seen

    def cmd_exec(self, cmd: IdxdCmd, operand: int = 0) -> int:
        """idxd_cmd_exec: send with int_req, sleep until vector 0 says CMD, read CMDSTS."""
        if self.halted():
            return IdxdCmdstsErr.HW_ERR
        reg = IdxdCommandReg()
        reg.cmd, reg.operand, reg.int_req = cmd, operand, 1
        self.write32(IDXD_CMD_OFFSET, reg.bits)
        assert self.misc_thread() & IdxdIntc.CMD
        return self.read32(IDXD_CMDSTS_OFFSET)

    def poll_command(self, cmd: IdxdCmd, operand: int = 0) -> int:
        """idxd_device_init_reset and idxd_device_release_int_handle: no int_req, poll."""
        reg = IdxdCommandReg()
        reg.cmd, reg.operand = cmd, operand
        self.write32(IDXD_CMD_OFFSET, reg.bits)
        while self.read32(IDXD_CMDSTS_OFFSET) & IDXD_CMDSTS_ACTIVE:
            pass
        assert self.rig.irq.take() == []
        return self.read32(IDXD_CMDSTS_OFFSET)

    def probe(self) -> None:
        """idxd_pci_probe -> idxd_probe."""
        assert self.read32(IDXD_VER_OFFSET) == DEVICE_VERSION_1
        assert not self.halted()  # idxd_device_init_reset
        self.poll_command(IdxdCmd.RESET_DEVICE)
        gencap = GenCapReg(bits=self.read64(IDXD_GENCAP_OFFSET))  # idxd_read_caps
        cmd_cap = self.read32(IDXD_CMDCAP_OFFSET) if gencap.cmd_cap else 0
        self.request_int_handles = bool(cmd_cap & (1 << IdxdCmd.REQUEST_INT_HANDLE))
        self.configurable = bool(gencap.config_en)
        grpcap = GroupCapReg(bits=self.read64(IDXD_GRPCAP_OFFSET))
        self.max_groups, self.max_rdbufs = grpcap.num_groups, grpcap.total_rdbufs
        self.max_engines = EngineCapReg(bits=self.read64(IDXD_ENGCAP_OFFSET)).num_engines
        wqcap = WqCapReg(bits=self.read64(IDXD_WQCAP_OFFSET))
        self.max_wqs = wqcap.num_wqs
        self.wqcfg_size = 1 << (wqcap.wqcfg_size + IDXD_WQCFG_MIN)
        opcap = [self.read64(IDXD_OPCAP_OFFSET + 8 * i) for i in range(4)]
        assert opcap[0] & (1 << DsaOpcode.MEMMOVE)  # dma.c offers DMA_MEMCPY on this bit
        offsets = OffsetsReg()  # idxd_read_table_offsets
        offsets.bits[0] = self.read64(IDXD_TABLE_OFFSET)
        offsets.bits[1] = self.read64(IDXD_TABLE_OFFSET + 8)
        self.grpcfg_offset = offsets.grpcfg * IDXD_TABLE_MULT
        self.wqcfg_offset = offsets.wqcfg * IDXD_TABLE_MULT
        self.msix_perm_offset = offsets.msix_perm * IDXD_TABLE_MULT
        assert offsets.perfmon == 0  # perfmon_pmu_init gives up quietly
        self.wqs = [SysfsWq() for _ in range(self.max_wqs)]
        self.shadow = [WqCfg() for _ in range(self.max_wqs)]
        if not self.configurable:
            self.load_config()
        self.unmask_error_interrupts()  # idxd_setup_interrupts

    def unmask_error_interrupts(self) -> None:
        genctrl = GenCtrlReg(bits=self.read32(IDXD_GENCTRL_OFFSET))
        genctrl.softerr_int_en = genctrl.halt_int_en = 1
        self.write32(IDXD_GENCTRL_OFFSET, genctrl.bits)

    def load_config(self) -> None:
        """idxd_device_load_config, for a read-only configuration."""
        self.read32(IDXD_GENCFG_OFFSET)
        for group in range(self.max_groups):  # idxd_group_load_config
            for stride in range(GRPWQCFG_STRIDES):
                bitmap = self.read64(self.grpwqcfg(group, stride))
                if stride * 64 >= self.max_wqs:
                    break
                for bit in range(64):
                    if stride * 64 + bit < self.max_wqs and bitmap >> bit & 1:
                        self.wqs[stride * 64 + bit].group = group
            engines = self.read64(self.grpengcfg(group))
            for engine in range(self.max_engines):
                if engines >> engine & 1:
                    self.engine_group[engine] = group
            self.read64(self.grpflgcfg(group))
        for wq, sysfs in enumerate(self.wqs):  # idxd_wq_load_config
            data = self.rig.device.mmio_read(self.wqcfg(wq, 0), self.wqcfg_size)  # memcpy_fromio
            wqcfg = WqCfg.from_buffer_copy(data.ljust(64, b"\0"))
            assert wqcfg.mode == 1, "the driver would fail the probe"
            assert not wqcfg.pasid_en, "the driver would fail the probe"
            sysfs.size, sysfs.threshold, sysfs.dedicated = wqcfg.wq_size, wqcfg.wq_thresh, True
            sysfs.priority = wqcfg.priority
            sysfs.max_xfer_bytes = 1 << wqcfg.max_xfer_shift
            sysfs.max_batch_size = 1 << wqcfg.max_batch_shift

    def device_config(self) -> None:
        """idxd_device_config: WQ bitmaps, engine bitmaps, flags, then WQCFG and GRPCFG."""
        group_wqs = [[0] * GRPWQCFG_STRIDES for _ in range(self.max_groups)]
        for wq, sysfs in enumerate(self.wqs):  # idxd_wqs_setup
            if sysfs.group is not None:
                group_wqs[sysfs.group][wq // 64] |= 1 << (wq % 64)
        assert any(any(words) for words in group_wqs)
        group_engines = [0] * self.max_groups  # idxd_engines_setup
        for engine, group in self.engine_group.items():
            group_engines[group] |= 1 << engine
        assert any(group_engines)
        flags = GroupFlags(tc_a=1, tc_b=1, rdbufs_allowed=self.max_rdbufs)
        for wq, sysfs in enumerate(self.wqs):  # idxd_wqs_config_write
            if sysfs.group is not None:
                self.wq_config_write(wq, sysfs)
        self.read32(IDXD_GENCFG_OFFSET)  # idxd_groups_config_write
        for group in range(self.max_groups):
            for stride in range(GRPWQCFG_STRIDES):
                self.write64(self.grpwqcfg(group, stride), group_wqs[group][stride])
                self.read64(self.grpwqcfg(group, stride))
            self.write64(self.grpengcfg(group), group_engines[group])
            self.read64(self.grpengcfg(group))
            self.write64(self.grpflgcfg(group), flags.bits)
            self.read64(self.grpflgcfg(group))

    def wq_config_write(self, wq: int, sysfs: SysfsWq) -> None:
        """idxd_wq_config_write: OR the hardware WQCFG into the copy, set fields, write back."""
        shadow = self.shadow[wq]
        strides = self.wqcfg_size // 4
        for dword in range(strides):
            shadow.bits[dword] |= self.read32(self.wqcfg(wq, dword))
        if sysfs.size == 0 and sysfs.kernel:
            sysfs.size = 16  # WQ_DEFAULT_QUEUE_DEPTH
        shadow.wq_size, shadow.wq_thresh = sysfs.size, sysfs.threshold
        if sysfs.dedicated:
            shadow.mode = 1
        shadow.priority = sysfs.priority
        shadow.max_xfer_shift = sysfs.max_xfer_bytes.bit_length() - 1
        shadow.max_batch_shift = sysfs.max_batch_size.bit_length() - 1
        for dword in range(strides):
            self.write32(self.wqcfg(wq, dword), shadow.bits[dword])
            self.read32(self.wqcfg(wq, dword))

    def enable_device(self) -> None:
        """idxd_device_drv_probe: configure, then idxd_device_enable."""
        if self.configurable:
            self.device_config()
        assert GenStsReg(bits=self.read32(IDXD_GENSTATS_OFFSET)).state != (
            IdxdDeviceStatusState.ENABLED)
        status = self.cmd_exec(IdxdCmd.ENABLE_DEVICE)
        assert status in (IdxdCmdstsErr.SUCCESS, IdxdCmdstsErr.ERR_DEV_ENABLED), hex(status)
        self.device_enabled = True

    def enable_wq(self, wq: int) -> None:
        """drv_enable_wq for a kernel WQ (dmaengine)."""
        sysfs = self.wqs[wq]
        assert self.device_enabled
        assert sysfs.group is not None
        if self.configurable:
            offset = self.wqcfg(wq, 2)  # __idxd_wq_set_priv_locked
            wqcfg = WqCfg()
            wqcfg.bits[2] = self.read32(offset)
            wqcfg.priv = 1
            self.shadow[wq].bits[2] = wqcfg.bits[2]
            self.write32(offset, wqcfg.bits[2])
            self.device_config()
        status = self.cmd_exec(IdxdCmd.ENABLE_WQ, wq)  # idxd_wq_enable
        assert status in (IdxdCmdstsErr.SUCCESS, IdxdCmdstsErr.ERR_WQ_ENABLED), hex(status)
        self.enabled_wqs.add(wq)
        vector = wq + 1  # idxd_wq_request_irq; no PASID, so no MSI-X permission entry
        if self.request_int_handles:
            status = self.cmd_exec(IdxdCmd.REQUEST_INT_HANDLE, vector)
            assert status & IDXD_CMDSTS_ERR_MASK == IdxdCmdstsErr.SUCCESS
            self.int_handles[wq] = (status >> IDXD_CMDSTS_RES_SHIFT) & 0xFFFF
        else:
            self.int_handles[wq] = vector

    def disable_wq(self, wq: int) -> None:
        """drv_disable_wq: drain, free the interrupt, reset the WQ."""
        assert self.cmd_exec(IdxdCmd.DRAIN_WQ, wq_operand(wq)) == IdxdCmdstsErr.SUCCESS
        if self.request_int_handles:  # idxd_wq_free_irq
            status = self.poll_command(IdxdCmd.RELEASE_INT_HANDLE, self.int_handles[wq])
            assert status & IDXD_CMDSTS_ERR_MASK == IdxdCmdstsErr.SUCCESS
        self.write32(self.msix_perm_offset + (wq + 1) * MSIX_PERM_STRIDE, 0)
        assert self.cmd_exec(IdxdCmd.RESET_WQ, wq_operand(wq)) == IdxdCmdstsErr.SUCCESS
        self.shadow[wq] = WqCfg()  # idxd_wq_disable_cleanup
        self.enabled_wqs.discard(wq)

    def disable_device(self) -> None:
        """idxd_device_drv_remove: WQs, idxd_device_disable, then (configurable) a reset."""
        for wq in sorted(self.enabled_wqs):
            self.disable_wq(wq)
        if GenStsReg(bits=self.read32(IDXD_GENSTATS_OFFSET)).state == (
            IdxdDeviceStatusState.ENABLED
        ):
            status = self.cmd_exec(IdxdCmd.DISABLE_DEVICE)
            assert status == IdxdCmdstsErr.SUCCESS or status & IdxdCmdstsErr.ERR_DIS_DEV_EN
        self.device_enabled = False
        if self.configurable:
            self.clear_state()
            assert self.cmd_exec(IdxdCmd.RESET_DEVICE) == IdxdCmdstsErr.SUCCESS
            self.unmask_error_interrupts()

    def clear_state(self) -> None:
        """idxd_device_clear_state on a configurable device: sysfs configuration is gone."""
        self.wqs = [SysfsWq() for _ in range(self.max_wqs)]
        self.shadow = [WqCfg() for _ in range(self.max_wqs)]
        self.engine_group = {}


def kernel_wq(group: int, size: int = 0, priority: int = 10) -> SysfsWq:
    """accel-config config-wq --group-id --mode=dedicated --priority --type=kernel --name=..."""
    return SysfsWq(group=group, size=size, priority=priority, dedicated=True, kernel=True)


@pytest.fixture
def guest_errors() -> Iterator[list[Log]]:
    """Every guest error logged during the test; a stock driver should cause none."""
    with capture_logs() as logs:
        yield logs
    assert [e for e in logs if ".guest_error." in str(e["event"])] == []


@pytest.mark.usefixtures("guest_errors")
@pytest.mark.parametrize("interrupt_handles", [False, True], ids=["msix", "int-handles"])
def test_stock_driver_configurable_flow(interrupt_handles: bool) -> None:
    rig = make_rig(DeviceConfig(interrupt_handles=interrupt_handles))
    driver = StockDriver(rig)
    driver.probe()
    assert driver.configurable
    assert driver.max_wqs == 8
    assert rig.read(IDXD_GENCTRL_OFFSET) == 0b11
    # accel-config config-wq / config-engine, then enable-device and enable-wq
    driver.wqs[0] = kernel_wq(group=0, size=16)
    driver.wqs[1] = kernel_wq(group=1)  # size left to the driver's default
    driver.engine_group = {0: 0, 1: 1, 2: 1}
    driver.enable_device()
    assert rig.state() is IdxdDeviceStatusState.ENABLED
    driver.enable_wq(0)
    driver.enable_wq(1)
    assert [rig.device.wq_state(n) for n in range(3)] == [
        IdxdWqState.ENABLED, IdxdWqState.ENABLED, IdxdWqState.DISABLED]
    wq0 = rig.device.wq_config(0)
    assert (wq0.wq_size, wq0.mode, wq0.priority, wq0.priv) == (16, 1, 10, 1)
    assert (wq0.max_xfer_shift, wq0.max_batch_shift) == (21, 5)
    assert rig.device.wq_config(1).wq_size == 16
    assert rig.device.int_handle_vector(driver.int_handles[1]) == 2
    # accel-config disable-wq, reconfigure with a smaller size, enable-wq again: Reset WQ must
    # have cleared WQCFG, or the driver's OR of the old value would make the size 24.
    driver.disable_wq(0)
    assert rig.device.wq_state(0) is IdxdWqState.DISABLED
    driver.wqs[0] = kernel_wq(group=0, size=8, priority=3)
    driver.enable_wq(0)
    assert (rig.device.wq_config(0).wq_size, rig.device.wq_config(0).priority) == (8, 3)
    assert [c for c in rig.engine.calls if c[0] == "enable"][-1] == ("enable", 0, WqSettings(
        size=8, priority=3, engines=1, max_transfer_size=2 << 20, max_batch_size=32))
    # accel-config disable-device, then a fresh configuration.
    driver.disable_device()
    assert rig.state() is IdxdDeviceStatusState.DISABLED
    assert rig.device.wq_config(0).wq_size == 0
    assert rig.read(IDXD_GENCTRL_OFFSET) == 0b11
    driver.wqs[3] = kernel_wq(group=2, size=64)
    driver.engine_group = {3: 2}
    driver.enable_device()
    driver.enable_wq(3)
    assert rig.device.wq_state(3) is IdxdWqState.ENABLED
    assert rig.irq.take() == []


@pytest.mark.usefixtures("guest_errors")
def test_stock_driver_read_only_flow() -> None:
    rig = make_rig(READ_ONLY)
    driver = StockDriver(rig)
    driver.probe()
    assert not driver.configurable
    assert driver.wqs[0].group == 0
    assert driver.wqs[1].group is None
    assert driver.engine_group == {0: 0, 1: 0}
    assert (driver.wqs[0].size, driver.wqs[0].priority) == (24, 7)
    assert driver.wqs[0].max_xfer_bytes == 4096
    driver.enable_device()
    driver.enable_wq(0)
    assert rig.device.wq_state(0) is IdxdWqState.ENABLED
    driver.disable_wq(0)
    driver.enable_wq(0)
    assert rig.device.wq_state(0) is IdxdWqState.ENABLED
    driver.disable_device()
    assert rig.state() is IdxdDeviceStatusState.DISABLED
    driver.enable_device()
    driver.enable_wq(0)


@pytest.mark.usefixtures("guest_errors")
def test_stock_driver_probes_after_a_halt_and_flr() -> None:
    rig = make_rig()
    StockDriver(rig).probe()
    rig.device.halt(IdxdDeviceResetType.FLR)
    rig.irq.take()
    assert StockDriver(rig).halted()  # idxd_device_init_reset would refuse to probe
    rig.device.reset()
    driver = StockDriver(rig)
    driver.probe()
    driver.wqs[0] = kernel_wq(group=0)
    driver.engine_group = {0: 0}
    driver.enable_device()
    driver.enable_wq(0)


def test_driver_enable_wq_fails_on_priority_zero() -> None:
    """accel-config without --priority: the driver writes priority 0 and Enable WQ refuses."""
    rig = make_rig()
    driver = StockDriver(rig)
    driver.probe()
    driver.wqs[0] = kernel_wq(group=0, size=16, priority=0)
    driver.engine_group = {0: 0}
    driver.enable_device()
    with pytest.raises(AssertionError, match=hex(IdxdCmdstsErr.ERR_WQ_PRIOR)):
        driver.enable_wq(0)


# --- Robustness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [DeviceConfig(interrupt_handles=True), READ_ONLY],
                         ids=["configurable", "read-only"])
def test_any_access_at_any_offset_never_raises(config: DeviceConfig) -> None:
    rig = make_rig(config)
    device = rig.device
    rng = random.Random(0xD5A)
    sizes = (1, 2, 3, 4, 5, 7, 8, 16, 64)
    with capture_logs():
        for offset in range(-8, device.layout.end + 64):
            for size in sizes:
                device.mmio_read(offset, size)
                device.mmio_write(offset, rng.randbytes(size))
        edges = (device.msix_table_offset, device.msix_pba_offset, device.bar0_size)
        for edge in edges:
            for offset in range(edge - 16, edge + 16):
                for size in sizes:
                    device.mmio_read(offset, size)
                    device.mmio_write(offset, bytes([0xFF]) * size)
        for _ in range(5000):
            offset = rng.randrange(-16, device.bar0_size + 16)
            size = rng.choice((*sizes, 0, 200))
            device.mmio_read(offset, size)
            device.mmio_write(offset, rng.randbytes(size))
            if rng.random() < 0.2:
                command = IdxdCommandReg(bits=rng.getrandbits(32))
                command.cmd = rng.choice(list(IdxdCmd))
                device.mmio_write(IDXD_CMD_OFFSET, command.bits.to_bytes(4, "little"))
        device.halt(IdxdDeviceResetType.SOFTWARE, error=0xFF)
        for size in sizes:
            device.mmio_write(IDXD_CMD_OFFSET, rng.randbytes(size))
        device.reset()
    assert all(0 <= vector < device.num_msix for vector in rig.irq.vectors)
