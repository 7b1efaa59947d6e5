"""The DSA command state machine: the commands the guest writes to CMD, and the state changes
the device makes of its own accord (halt, reset).

Behaviour follows what Linux 6.1 ``drivers/dma/idxd`` relies on; where the driver is silent the
comments say "DSA spec" (the Intel DSA architecture specification as recalled, not re-checked)
or "guess". Descriptors never come here: BAR2 belongs to the native engine, which this machine
drives through :class:`WqEngine` (enable, disable, drain, abort, reset). A command completes
inside the register write that issues it, except where it waits for descriptors (Disable and
Drain WQ, Drain All, Disable Device): those never wait in the register write, since the
server's message loop must go on answering (a drain behind a long batch outlasts the client's
reply timeout). CMDSTS stays active until the engine's waits are over and :meth:`poll` sees it,
as on DSA, whose driver waits for the command interrupt or polls CMDSTS.active. GENSTS never
shows DRAIN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vdsa_server.device.config import DeviceConfig
from vdsa_server.device.engine_port import InterruptSink, WqEngine, WqSettings
from vdsa_server.device.register_file import RegisterFile
from vdsa_server.device.registers import (
    CMD_INT_HANDLE_IMS,
    IdxdCmd,
    IdxdCmdstsErr,
    IdxdCommandReg,
    IdxdDeviceResetType,
    IdxdDeviceStatusState,
    IdxdIntc,
    IdxdWqMode,
    IdxdWqState,
    WqCfg,
)
from vdsa_server.log import get_logger

# Operand encodings from device.c: WQ commands other than Enable WQ take a 16-bit WQ mask with
# the index of the 16-WQ set above it; interrupt-handle commands take a 16-bit index or handle.
_WQ_SET_SIZE = 16
_WQ_SET_MASK = (1 << _WQ_SET_SIZE) - 1
_INT_HANDLE_MASK = CMD_INT_HANDLE_IMS - 1

_Completion = tuple[IdxdCmdstsErr, int]  # CMDSTS.err and CMDSTS.result


@dataclass(frozen=True)
class _Waiting:
    """A command whose WQs still wait in the engine: ``finish`` completes it once none does."""

    wqs: tuple[int, ...]
    finish: Callable[[], _Completion]


_Outcome = _Completion | _Waiting


def _command_name(code: int) -> str:
    try:
        return IdxdCmd(code).name
    except ValueError:
        return f"#{code}"


class DeviceCommands:
    """The state machine of one device, acting on its register file and its engine."""

    def __init__(
        self,
        config: DeviceConfig,
        registers: RegisterFile,
        irq: InterruptSink,
        engine: WqEngine,
    ) -> None:
        self.config = config
        self._registers = registers
        self._irq = irq
        self._engine = engine
        self._log = get_logger()
        self._handlers: dict[int, Callable[[int], _Outcome]] = {
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
        self._active: tuple[IdxdCommandReg, _Waiting] | None = None

    def power_on(self) -> None:
        """Registers, interrupt handles and engine as at power-on."""
        self._registers.power_on()
        self._int_handles.clear()
        self._active = None
        self._engine.reset()

    def int_handle_vector(self, handle: int) -> int | None:
        """The MSI-X vector a descriptor's interrupt handle selects, None if it is invalid.

        Granted handles equal their vector; without REQUEST_INT_HANDLE in CMDCAP the driver
        puts the vector itself in descriptors.
        """
        if self.config.interrupt_handles:
            return handle if handle in self._int_handles else None
        return handle if 0 <= handle < self._registers.num_msix else None

    def halt(self, reset_type: IdxdDeviceResetType, error: int | None = None) -> None:
        """Enter HALT (for an unrecoverable error the engine hits); ``error`` goes to SWERR.

        All WQs stop. INTCAUSE gets HALT_STATE, raised on vector 0 if GENCTRL.halt_int_en;
        with ``error``, SWERR and INTCAUSE.ERR as for any software error. Only the reset
        ``reset_type`` names brings the device back (RESET_DEVICE for SOFTWARE, else FLR).
        """
        registers = self._registers
        notify = registers.record_software_error(error) if error is not None else False
        for wq in range(self.config.num_wqs):
            self._abort(wq)
            self._set_wq_state(wq, IdxdWqState.DISABLED, "halt")
        if self._active is not None:
            # Guess: a command still waiting for descriptors ends with the halt, as failed.
            command, _ = self._active
            self._active = None
            self._complete(command, IdxdCmdstsErr.HW_ERR, 0)
        self._set_state(IdxdDeviceStatusState.HALT, "halt")
        registers.gensts.reset_type = reset_type
        registers.intcause.value |= IdxdIntc.HALT_STATE
        self._log.error("device.halt", reset_type=reset_type.name, error=error)
        if notify or registers.genctrl.halt_int_en:
            self._irq.trigger(0)

    # --- CMD ---------------------------------------------------------------------------------

    def execute(self, command: IdxdCommandReg) -> None:
        """Run the command just written to CMD; CMDSTS and, with int_req, INTCAUSE report it,
        at once or, for one that waits for descriptors, when :meth:`poll` finds it done."""
        registers = self._registers
        code, operand = command.cmd, command.operand
        if self._active is not None:
            # The driver writes CMD only once CMDSTS.active is clear (DSA spec); guess: one
            # written before is dropped, and the active command goes on.
            self._log.warning("device.guest_error.command_while_active",
                              command=_command_name(code), operand=hex(operand),
                              active=_command_name(self._active[0].cmd))
            return
        handler = self._handlers.get(code)
        outcome: _Outcome
        if handler is None or not registers.cmdcap.value & (1 << code):
            outcome = IdxdCmdstsErr.INVAL_CMD, 0
        elif registers.state is IdxdDeviceStatusState.HALT and not (
            code == IdxdCmd.RESET_DEVICE and registers.reset_type is IdxdDeviceResetType.SOFTWARE
        ):
            # Guess: a halted device takes only the reset GENSTS asks for, and only when
            # that reset is RESET_DEVICE; the driver itself sends nothing while halted.
            outcome = IdxdCmdstsErr.HW_ERR, 0
        else:
            outcome = handler(operand)
        if isinstance(outcome, _Waiting):
            registers.cmdsts.bits = 0
            registers.cmdsts.active = 1
            self._active = command, outcome
            self._log.info("device.command_started", command=_command_name(code),
                           operand=hex(operand), wqs=list(outcome.wqs))
            self.poll()
        else:
            self._complete(command, *outcome)

    def poll(self) -> None:
        """Complete the active command if none of its WQs waits in the engine any more: the
        server calls this whenever the engine reports a wait over."""
        if self._active is None:
            return
        command, waiting = self._active
        if any(self._engine.waiting(wq) for wq in waiting.wqs):
            return
        self._active = None
        self._complete(command, *waiting.finish())

    def _complete(self, command: IdxdCommandReg, err: IdxdCmdstsErr, result: int) -> None:
        registers = self._registers
        code, operand = command.cmd, command.operand
        registers.cmdsts.bits = 0
        registers.cmdsts.err = err
        registers.cmdsts.result = result
        log = self._log.info if err is IdxdCmdstsErr.SUCCESS else self._log.warning
        log("device.command", command=_command_name(code), operand=hex(operand),
            int_req=command.int_req, status=err.name, result=result)
        if command.int_req:
            registers.intcause.value |= IdxdIntc.CMD
            self._irq.trigger(0)

    def _enable_device(self, _operand: int) -> _Completion:
        if self._registers.state is IdxdDeviceStatusState.ENABLED:
            return IdxdCmdstsErr.ERR_DEV_ENABLED, 0
        if self._registers.gencfg.rdbuf_limit > self.config.read_buffers:  # more than GRPCAP
            return IdxdCmdstsErr.ERR_CONFIG, 0
        claimed = sum(self._registers.wqcfg(n).wq_size for n in range(self.config.num_wqs))
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
        for grpcfg in self._registers.grpcfg:
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

    def _disable_device(self, _operand: int) -> _Outcome:
        if self._registers.state is not IdxdDeviceStatusState.ENABLED:
            return IdxdCmdstsErr.ERR_DIS_DEV_EN, 0
        return self._disable_wqs(
            self._enabled_wqs(), "disable device",
            lambda: self._set_state(IdxdDeviceStatusState.DISABLED, "disable device"))

    def _disable_wqs(self, wqs: Sequence[int], reason: str,
                     then: Callable[[], None] | None = None) -> _Waiting:
        """The WQs stop taking descriptors now and are DISABLED once their queues are done."""
        for wq in wqs:
            self._engine.start_disable(wq)

        def finish() -> _Completion:
            for wq in wqs:
                self._record_wq_state(wq, IdxdWqState.DISABLED, reason)
            if then is not None:
                then()
            return IdxdCmdstsErr.SUCCESS, 0

        return _Waiting(tuple(wqs), finish)

    def _drain_wqs(self, wqs: Sequence[int]) -> _Waiting:
        for wq in wqs:
            self._engine.start_drain(wq)
        return _Waiting(tuple(wqs), lambda: (IdxdCmdstsErr.SUCCESS, 0))

    def _enabled_wqs(self) -> list[int]:
        return [wq for wq in range(self.config.num_wqs)
                if self._registers.wq_state(wq) is IdxdWqState.ENABLED]

    def _drain_all(self, _operand: int) -> _Outcome:
        return self._drain_wqs(self._enabled_wqs())

    def _abort_all(self, _operand: int) -> _Completion:
        for wq in self._enabled_wqs():
            self._abort(wq)
        return IdxdCmdstsErr.SUCCESS, 0

    def _abort(self, wq: int) -> None:
        if self._registers.wq_state(wq) is IdxdWqState.ENABLED:
            self._engine.abort_wq(wq)

    def _reset_device(self, _operand: int) -> _Completion:
        old = self._registers.state
        self.power_on()
        self._log.info("device.reset", kind="reset-device command", old_state=old.name)
        return IdxdCmdstsErr.SUCCESS, 0

    def _enable_wq(self, operand: int) -> _Completion:
        if operand >= self.config.num_wqs:
            return IdxdCmdstsErr.INVAL_WQIDX, 0
        if self._registers.state is not IdxdDeviceStatusState.ENABLED:
            return IdxdCmdstsErr.ERR_DEV_NOTEN, 0
        wqcfg = self._registers.wqcfg(operand)
        error = self._check_wq(operand, wqcfg)
        if error is not None:
            return error, 0
        self._set_wq_state(operand, IdxdWqState.ENABLED, "enable WQ")
        return IdxdCmdstsErr.SUCCESS, 0

    def _check_wq(self, wq: int, wqcfg: WqCfg) -> IdxdCmdstsErr | None:
        """WQCFG checks at Enable WQ (DSA spec, in the order of the error codes)."""
        if wqcfg.wq_state == IdxdWqState.ENABLED:
            return IdxdCmdstsErr.ERR_WQ_ENABLED
        if not any(grpcfg.wqs[wq // 64] >> (wq % 64) & 1 for grpcfg in self._registers.grpcfg):
            # Guess: no Enable WQ code covers a WQ outside every group; reuse the group one.
            return IdxdCmdstsErr.ERR_GRP_CONFIG
        in_use = sum(self._registers.wqcfg(n).wq_size for n in self._enabled_wqs())
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
        if any(self._registers.wq_state(wq) is not IdxdWqState.ENABLED for wq in wqs):
            return IdxdCmdstsErr.ERR_DEV_NOT_EN
        return None

    def _on_selected(self, operand: int, action: Callable[[list[int]], _Outcome]) -> _Outcome:
        """Disable, drain, abort and reset WQ: check the selection, then act on it."""
        wqs = self._selected_wqs(operand)
        error = self._check_selected(wqs)
        if error is not None:
            return error, 0
        return action(wqs)

    @staticmethod
    def _each(action: Callable[[int], None]) -> Callable[[list[int]], _Outcome]:
        def act(wqs: list[int]) -> _Outcome:
            for wq in wqs:
                action(wq)
            return IdxdCmdstsErr.SUCCESS, 0
        return act

    def _disable_wq(self, operand: int) -> _Outcome:
        return self._on_selected(operand, lambda wqs: self._disable_wqs(wqs, "disable WQ"))

    def _drain_wq(self, operand: int) -> _Outcome:
        return self._on_selected(operand, self._drain_wqs)

    def _abort_wq(self, operand: int) -> _Outcome:
        return self._on_selected(operand, self._each(self._abort))

    def _reset_wq(self, operand: int) -> _Outcome:
        return self._on_selected(operand, self._each(self._reset_one_wq))

    def _reset_one_wq(self, wq: int) -> None:
        # Reset WQ disables the WQ and returns its WQCFG to the power-on value: the driver
        # relies on it, ORing the WQCFG it reads back into its fresh copy (DSA spec).
        self._abort(wq)
        self._set_wq_state(wq, IdxdWqState.DISABLED, "reset WQ")
        self._registers.restore_wqcfg(wq)

    def _drain_or_abort_pasid(self, _operand: int) -> _Completion:
        # No descriptor ever carries a PASID here (no PASID capability): nothing to wait for.
        return IdxdCmdstsErr.SUCCESS, 0

    def _request_int_handle(self, operand: int) -> _Completion:
        index = operand & _INT_HANDLE_MASK
        if operand & CMD_INT_HANDLE_IMS or index >= self._registers.num_msix:
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
        old = self._registers.state
        if old is not new:
            self._registers.gensts.state = new
            self._log.info("device.state", old=old.name, new=new.name, reason=reason)

    def _set_wq_state(self, wq: int, new: IdxdWqState, reason: str) -> None:
        wqcfg = self._registers.wqcfg(wq)
        if IdxdWqState(wqcfg.wq_state) is new:
            return
        if new is IdxdWqState.ENABLED:
            self._engine.enable_wq(wq, self._wq_settings(wq, wqcfg))
        else:
            self._engine.disable_wq(wq)
        self._record_wq_state(wq, new, reason)

    def _record_wq_state(self, wq: int, new: IdxdWqState, reason: str) -> None:
        """WQCFG.wq_state, for a change the engine has made."""
        wqcfg = self._registers.wqcfg(wq)
        old = IdxdWqState(wqcfg.wq_state)
        if old is new:
            return
        wqcfg.wq_state = new
        self._registers.store_wqcfg(wq, wqcfg)
        self._log.info("wq.state", wq=wq, old=old.name, new=new.name, reason=reason)

    def _wq_settings(self, wq: int, wqcfg: WqCfg) -> WqSettings:
        engines = next(grpcfg.engines for grpcfg in self._registers.grpcfg
                       if grpcfg.wqs[wq // 64] >> (wq % 64) & 1)
        return WqSettings(size=wqcfg.wq_size, priority=wqcfg.priority, engines=engines,
                          max_transfer_size=1 << wqcfg.max_xfer_shift,
                          max_batch_size=1 << wqcfg.max_batch_shift)
