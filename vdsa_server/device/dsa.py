"""The emulated DSA function, composed: its register file (BAR0), its command state machine and
its generation's capabilities. BAR2 (the portals) belongs to the native engine.

:mod:`~vdsa_server.device.register_file` holds the image and the access rules,
:mod:`~vdsa_server.device.commands` the commands and state changes, and
:mod:`~vdsa_server.device.capabilities` what the generation advertises.
"""

from __future__ import annotations

from vdsa_server.device.capabilities import DSA_1_0
from vdsa_server.device.commands import DeviceCommands
from vdsa_server.device.config import DeviceConfig
from vdsa_server.device.engine_port import InterruptSink, SoftwareError, WqEngine
from vdsa_server.device.register_file import RegisterFile
from vdsa_server.device.registers import (
    IdxdCommandReg,
    IdxdDeviceResetType,
    IdxdDeviceStatusState,
    IdxdWqState,
    WqCfg,
    wq_bar_size,
)
from vdsa_server.log import get_logger


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
        self._log = get_logger()
        self._registers = RegisterFile(config, DSA_1_0, self._execute)
        self._commands = DeviceCommands(config, self._registers, irq, engine)
        self.layout = self._registers.layout
        self.num_msix = self._registers.num_msix
        self.msix_table_offset = self._registers.msix_table_offset
        self.msix_pba_offset = self._registers.msix_pba_offset
        self.bar0_size = self._registers.bar0_size
        self.bar2_size = wq_bar_size(config.num_wqs)
        self._commands.power_on()

    def _execute(self, command: IdxdCommandReg) -> None:
        self._commands.execute(command)

    def poll_commands(self) -> None:
        """Complete a command that waited for descriptors, if the engine's waits are over."""
        self._commands.poll()

    # --- Public state ------------------------------------------------------------------------

    @property
    def state(self) -> IdxdDeviceStatusState:
        return self._registers.state

    @property
    def reset_type(self) -> IdxdDeviceResetType:
        """GENSTS.reset_type: the reset a halted device needs."""
        return self._registers.reset_type

    def wq_state(self, wq: int) -> IdxdWqState:
        return self._registers.wq_state(wq)

    def wq_config(self, wq: int) -> WqCfg:
        """A copy of WQ ``wq``'s WQCFG entry."""
        return self._registers.wqcfg(wq)

    def int_handle_vector(self, handle: int) -> int | None:
        """The MSI-X vector a descriptor's interrupt handle selects, None if it is invalid."""
        return self._commands.int_handle_vector(handle)

    # --- BAR0 --------------------------------------------------------------------------------

    def mmio_read(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes of BAR0; holes and anything outside BAR0 read as zero."""
        return self._registers.read(offset, size)

    def mmio_write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at BAR0 ``offset``: each register or table entry it covers reacts."""
        self._registers.write(offset, data)

    # --- Resets and errors -------------------------------------------------------------------

    def reset(self) -> None:
        """Function-level reset (FLR, vfio-user DEVICE_RESET, client gone): power-on state."""
        old = self.state
        self._commands.power_on()
        self._log.info("device.reset", kind="function-level", old_state=old.name)

    def halt(self, reset_type: IdxdDeviceResetType, error: int | None = None) -> None:
        """Enter HALT for an unrecoverable error: see :meth:`DeviceCommands.halt`."""
        self._commands.halt(reset_type, error)

    def report_software_error(self, error: int, wq: int | None = None) -> None:
        """Log a software error in SWERR and raise it on vector 0 if GENCTRL asks for it."""
        if self._registers.record_software_error(error, wq):
            self._irq.trigger(0)

    def report_engine_error(self, error: SoftwareError) -> None:
        """A descriptor error the engine could not put in a completion record."""
        if self._registers.record_software_error(error.error, error.wq, error):
            self._irq.trigger(0)
