"""The emulated DSA's configuration: topology, capabilities and, in read-only mode, the preset.

A configuration comes from a TOML file (:meth:`DeviceConfig.from_toml`) or from the defaults
(``DeviceConfig()``); :func:`load_config` picks one. The TOML keys are the field names below;
preset groups and WQs are ``[[group]]`` and ``[[wq]]`` tables. Every check lives in
``__post_init__``, so a configuration built in code is checked like a loaded one; a bad one
raises :class:`ConfigError` whose message starts with the offending field, e.g.
``wq[1].size: 300 exceeds total_wq_size 128``.

Limits come from the register widths in ``registers.py`` and from what the stock Linux 6.1 idxd
driver needs to use the device (see the comments at each check).
"""

from __future__ import annotations

import enum
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from vdsa_server.device.descriptors import DsaOpcode

MiB = 1 << 20

# Register field widths: WQCAP.num_wqs and GRPCAP.num_groups are 8 bits, WQCAP.total_wq_size and
# WQCFG.wq_size 16 bits; GRPCFG.engines is a 64-bit bitmap (narrower than ENGCAP.num_engines).
MAX_WQS = 0xFF
MAX_GROUPS = 0xFF
MAX_ENGINES = 64
MAX_READ_BUFFERS = 0xFF  # GRPCAP.total_rdbufs is 8 bits
MAX_TOTAL_WQ_SIZE = 0xFFFF
MAX_PRIORITY = 0xF  # WQCFG.priority is 4 bits; 0 is refused by Enable WQ
# GENCAP.max_xfer_shift is 5 bits and GENCAP.max_batch_shift 4 bits.
MAX_TRANSFER_SHIFT = 0x1F
MAX_BATCH_SHIFT = 0xF
# On a configurable device the driver gives every WQ these limits (WQ_DEFAULT_MAX_XFER,
# WQ_DEFAULT_MAX_BATCH in idxd.h) unless the user lowers them, and Enable WQ refuses a WQ whose
# limits exceed the device's: below them, `accel-config enable-wq` fails for WQs set up with
# defaults. A read-only configuration carries its own WQ limits.
DRIVER_WQ_DEFAULT_MAX_TRANSFER = 2 * MiB
DRIVER_WQ_DEFAULT_MAX_BATCH = 32
DEFAULT_PRIORITY = 10


class ConfigError(ValueError):
    """A configuration the device cannot have; the message starts with the field's name."""


class ConfigMode(enum.Enum):
    """Whether the guest configures groups and WQs (GENCAP.config_en) or gets a preset."""

    CONFIGURABLE = "configurable"
    READ_ONLY = "read-only"


class PortalMode(enum.Enum):
    """How descriptors reach the device through BAR2: ``trapped``, each store a vfio-user
    message that the engine reassembles; or ``mapped``, BAR2 shared memory that the client
    maps and the engine polls (the submitter waits for a slot to be free: see
    ``native/engine/poller.c``).  A client that does not map BAR2 is served by the trapped
    path either way."""

    TRAPPED = "trapped"
    MAPPED = "mapped"


class WqMode(enum.Enum):
    """WQ modes a preset may name; only dedicated is possible (see :class:`WqPreset`)."""

    DEDICATED = "dedicated"
    SHARED = "shared"


@dataclass(frozen=True)
class GroupPreset:
    """A group of a read-only configuration and the engines in it."""

    id: int
    engines: tuple[int, ...]


@dataclass(frozen=True)
class WqPreset:
    """A WQ of a read-only configuration.

    Only dedicated WQs: the 6.1 driver refuses a read-only configuration with a shared WQ
    (``idxd_wq_load_config``), and shared WQs need PASID and ENQCMD besides.
    ``max_transfer_size``/``max_batch_size`` of None mean the device's limits.
    """

    id: int
    group: int
    size: int
    priority: int = DEFAULT_PRIORITY
    mode: WqMode = WqMode.DEDICATED
    max_transfer_size: int | None = None
    max_batch_size: int | None = None


ALL_OPCODES = frozenset(DsaOpcode)


@dataclass(frozen=True)
class DeviceConfig:
    """Topology and capabilities of the emulated DSA 1.x function."""

    mode: ConfigMode = ConfigMode.CONFIGURABLE
    portals: PortalMode = PortalMode.MAPPED
    num_wqs: int = 8
    num_engines: int = 4
    num_groups: int = 4
    total_wq_size: int = 128
    max_transfer_size: int = 2 * MiB
    max_batch_size: int = 1024
    opcodes: frozenset[DsaOpcode] = ALL_OPCODES
    interrupt_handles: bool = False  # advertise REQUEST/RELEASE_INT_HANDLE in CMDCAP
    # GRPCAP.total_rdbufs; 0 advertises no read-buffer control.  accel-config's
    # load-config writes read_buffer_limit, which the driver refuses without it.
    read_buffers: int = 96
    groups: tuple[GroupPreset, ...] = ()
    wqs: tuple[WqPreset, ...] = ()

    def __post_init__(self) -> None:
        _check_range("num_wqs", self.num_wqs, 1, MAX_WQS)
        _check_range("num_engines", self.num_engines, 1, MAX_ENGINES)
        _check_range("num_groups", self.num_groups, 1, MAX_GROUPS)
        _check_range("total_wq_size", self.total_wq_size, 1, MAX_TOTAL_WQ_SIZE)
        _check_range("read_buffers", self.read_buffers, 0, MAX_READ_BUFFERS)
        configurable = self.mode is ConfigMode.CONFIGURABLE
        _check_power_of_two(
            "max_transfer_size", self.max_transfer_size,
            DRIVER_WQ_DEFAULT_MAX_TRANSFER if configurable else 1, 1 << MAX_TRANSFER_SHIFT,
        )
        _check_power_of_two(
            "max_batch_size", self.max_batch_size,
            DRIVER_WQ_DEFAULT_MAX_BATCH if configurable else 1, 1 << MAX_BATCH_SHIFT,
        )
        if not self.opcodes:
            raise ConfigError("opcodes: at least one opcode is needed")
        if configurable:
            if self.groups:
                raise ConfigError('group: preset groups need mode = "read-only"')
            if self.wqs:
                raise ConfigError('wq: preset WQs need mode = "read-only"')
        else:
            self._check_preset()

    @property
    def max_transfer_shift(self) -> int:
        return self.max_transfer_size.bit_length() - 1

    @property
    def max_batch_shift(self) -> int:
        return self.max_batch_size.bit_length() - 1

    @property
    def num_msix(self) -> int:
        """MSI-X vectors: 0 for device events, n + 1 for WQ n (the 6.1 driver's layout)."""
        return self.num_wqs + 1

    def _check_preset(self) -> None:
        group_ids: set[int] = set()
        engine_owner: dict[int, int] = {}
        for i, group in enumerate(self.groups):
            name = f"group[{i}]"
            _check_range(f"{name}.id", group.id, 0, self.num_groups - 1)
            if group.id in group_ids:
                raise ConfigError(f"{name}.id: group {group.id} is listed twice")
            group_ids.add(group.id)
            for engine in group.engines:
                _check_range(f"{name}.engines", engine, 0, self.num_engines - 1)
                if engine in engine_owner:
                    raise ConfigError(
                        f"{name}.engines: engine {engine} is already in group "
                        f"{engine_owner[engine]}"
                    )
                engine_owner[engine] = group.id
        if not self.wqs:
            raise ConfigError('wq: mode = "read-only" needs at least one preset WQ')
        wq_ids: set[int] = set()
        claimed = 0
        for i, wq in enumerate(self.wqs):
            name = f"wq[{i}]"
            _check_range(f"{name}.id", wq.id, 0, self.num_wqs - 1)
            if wq.id in wq_ids:
                raise ConfigError(f"{name}.id: WQ {wq.id} is listed twice")
            wq_ids.add(wq.id)
            if wq.mode is not WqMode.DEDICATED:
                raise ConfigError(
                    f"{name}.mode: only dedicated WQs are supported (the 6.1 driver refuses "
                    "shared WQs in a read-only configuration)"
                )
            if wq.group not in group_ids:
                raise ConfigError(f"{name}.group: group {wq.group} is not a listed [[group]]")
            if not next(g for g in self.groups if g.id == wq.group).engines:
                raise ConfigError(f"{name}.group: group {wq.group} has no engines")
            if wq.size < 1:
                raise ConfigError(f"{name}.size: {wq.size} is below 1")
            if wq.size > self.total_wq_size:
                raise ConfigError(
                    f"{name}.size: {wq.size} exceeds total_wq_size {self.total_wq_size}"
                )
            claimed += wq.size
            if claimed > self.total_wq_size:
                raise ConfigError(
                    f"{name}.size: the WQ sizes add up to {claimed}, more than total_wq_size "
                    f"{self.total_wq_size}"
                )
            _check_range(f"{name}.priority", wq.priority, 1, MAX_PRIORITY)
            if wq.max_transfer_size is not None:
                _check_power_of_two(
                    f"{name}.max_transfer_size", wq.max_transfer_size, 1,
                    self.max_transfer_size,
                )
            if wq.max_batch_size is not None:
                _check_power_of_two(
                    f"{name}.max_batch_size", wq.max_batch_size, 1, self.max_batch_size
                )

    # --- TOML ------------------------------------------------------------------------------

    @classmethod
    def from_toml(cls, path: Path) -> DeviceConfig:
        """Load ``path``; a file that is not valid TOML raises ConfigError naming it."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from exc
        return cls.from_toml_text(text, source=str(path))

    @classmethod
    def from_toml_text(cls, text: str, *, source: str = "<config>") -> DeviceConfig:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
        return cls.from_mapping(document)

    @classmethod
    def from_mapping(cls, document: Mapping[str, Any]) -> DeviceConfig:
        """Build from parsed TOML: unknown keys and wrong types are errors, missing keys default."""
        scalars = {f.name for f in fields(cls)} - {"groups", "wqs"}
        _check_keys("", document, scalars | {"group", "wq"})
        values: dict[str, Any] = {}
        for key, value in document.items():
            match key:
                case "mode":
                    values["mode"] = _enum_value(key, value, ConfigMode)
                case "portals":
                    values["portals"] = _enum_value(key, value, PortalMode)
                case "opcodes":
                    values["opcodes"] = _opcodes(value)
                case "interrupt_handles":
                    values["interrupt_handles"] = _typed(key, value, bool)
                case "group":
                    values["groups"] = tuple(
                        _group(f"group[{i}]", item) for i, item in enumerate(_tables(key, value))
                    )
                case "wq":
                    values["wqs"] = tuple(
                        _wq(f"wq[{i}]", item) for i, item in enumerate(_tables(key, value))
                    )
                case _:
                    values[key] = _integer(key, value)
        return cls(**values)

    def to_toml(self) -> str:
        """This configuration as TOML that :meth:`from_toml_text` reads back to an equal one."""
        lines = [
            f'mode = "{self.mode.value}"',
            f'portals = "{self.portals.value}"',
            f"num_wqs = {self.num_wqs}",
            f"num_engines = {self.num_engines}",
            f"num_groups = {self.num_groups}",
            f"total_wq_size = {self.total_wq_size}",
            f"max_transfer_size = {self.max_transfer_size}",
            f"max_batch_size = {self.max_batch_size}",
            f"interrupt_handles = {'true' if self.interrupt_handles else 'false'}",
            f"read_buffers = {self.read_buffers}",
            "opcodes = [" + ", ".join(f'"{op.name}"' for op in sorted(self.opcodes)) + "]",
        ]
        for group in self.groups:
            lines += ["", "[[group]]", f"id = {group.id}",
                      "engines = [" + ", ".join(map(str, group.engines)) + "]"]
        for wq in self.wqs:
            lines += ["", "[[wq]]", f"id = {wq.id}", f"group = {wq.group}", f"size = {wq.size}",
                      f"priority = {wq.priority}", f'mode = "{wq.mode.value}"']
            if wq.max_transfer_size is not None:
                lines.append(f"max_transfer_size = {wq.max_transfer_size}")
            if wq.max_batch_size is not None:
                lines.append(f"max_batch_size = {wq.max_batch_size}")
        return "\n".join(lines) + "\n"


def load_config(path: Path | None) -> DeviceConfig:
    """The configuration in the TOML file ``path``, or the defaults without one."""
    return DeviceConfig() if path is None else DeviceConfig.from_toml(path)


# --- Checks and parsing helpers ----------------------------------------------------------------

_T = TypeVar("_T")
_E = TypeVar("_E", bound=enum.Enum)


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name}: {value} is outside {low}..{high}")


def _check_power_of_two(name: str, value: int, low: int, high: int) -> None:
    if value < 1 or value & (value - 1):
        raise ConfigError(f"{name}: {value} is not a power of two")
    if value < low:
        raise ConfigError(
            f"{name}: {value} is below {low}, the limit the driver gives each WQ by default"
        )
    if value > high:
        raise ConfigError(f"{name}: {value} exceeds {high}")


def _check_keys(prefix: str, table: Mapping[str, Any], known: Collection[str]) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(known))})")


def _typed(name: str, value: object, kind: type[_T]) -> _T:
    if not isinstance(value, kind):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}")
    return value


def _integer(name: str, value: object) -> int:
    # TOML booleans are Python bools, which are ints: refuse them as numbers.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    return value


def _enum_value(name: str, value: object, kind: type[_E]) -> _E:
    text = _typed(name, value, str)
    for member in kind:
        if member.value == text:
            return member
    choices = ", ".join(f'"{m.value}"' for m in kind)
    raise ConfigError(f"{name}: {text!r} is not one of {choices}")


def _opcodes(value: object) -> frozenset[DsaOpcode]:
    names = _typed("opcodes", value, list)
    chosen: set[DsaOpcode] = set()
    for i, name in enumerate(names):
        text = _typed(f"opcodes[{i}]", name, str)
        if text not in DsaOpcode.__members__:
            valid = ", ".join(DsaOpcode.__members__)
            raise ConfigError(f"opcodes[{i}]: {text!r} is not a DSA 1.x opcode ({valid})")
        opcode = DsaOpcode[text]
        if opcode in chosen:
            raise ConfigError(f"opcodes[{i}]: {text} is listed twice")
        chosen.add(opcode)
    return frozenset(chosen)


def _tables(name: str, value: object) -> list[Mapping[str, Any]]:
    items = _typed(name, value, list)
    for i, item in enumerate(items):
        _typed(f"{name}[{i}]", item, dict)
    return items


def _field(
    prefix: str, table: Mapping[str, Any], key: str, parse: Callable[[str, object], _T]
) -> _T:
    if key not in table:
        raise ConfigError(f"{prefix}.{key}: missing")
    return parse(f"{prefix}.{key}", table[key])


def _group(prefix: str, table: Mapping[str, Any]) -> GroupPreset:
    _check_keys(f"{prefix}.", table, ("id", "engines"))
    engines = _field(prefix, table, "engines", lambda n, v: _typed(n, v, list))
    return GroupPreset(
        id=_field(prefix, table, "id", _integer),
        engines=tuple(_integer(f"{prefix}.engines[{i}]", e) for i, e in enumerate(engines)),
    )


def _wq(prefix: str, table: Mapping[str, Any]) -> WqPreset:
    _check_keys(f"{prefix}.", table, [f.name for f in fields(WqPreset)])
    optional: dict[str, Any] = {}
    if "priority" in table:
        optional["priority"] = _integer(f"{prefix}.priority", table["priority"])
    if "mode" in table:
        optional["mode"] = _enum_value(f"{prefix}.mode", table["mode"], WqMode)
    for key in ("max_transfer_size", "max_batch_size"):
        if key in table:
            optional[key] = _integer(f"{prefix}.{key}", table[key])
    return WqPreset(
        id=_field(prefix, table, "id", _integer),
        group=_field(prefix, table, "group", _integer),
        size=_field(prefix, table, "size", _integer),
        **optional,
    )
