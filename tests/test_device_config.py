"""The device configuration: defaults, the example files, TOML round trips and every bad field."""

from __future__ import annotations

from pathlib import Path

import pytest

from vdsa_server.device.config import (
    ALL_OPCODES,
    ConfigError,
    ConfigMode,
    DeviceConfig,
    GroupPreset,
    WqMode,
    WqPreset,
    load_config,
)
from vdsa_server.device.descriptors import DsaOpcode
from vdsa_server.paths import QEMU_CONFIGS

DEVICES = QEMU_CONFIGS / "devices"

ONE_DWQ = """
mode = "read-only"
num_wqs = 2
num_engines = 2
num_groups = 2
total_wq_size = 32
[[group]]
id = 0
engines = [0]
[[wq]]
id = 0
group = 0
size = 16
"""


def test_defaults_make_a_useful_device() -> None:
    config = DeviceConfig()
    assert config.mode is ConfigMode.CONFIGURABLE
    assert (config.num_wqs, config.num_engines, config.num_groups) == (8, 4, 4)
    assert config.total_wq_size == 128
    assert config.max_transfer_size == 2 << 20
    assert config.max_transfer_shift == 21
    assert config.max_batch_size == 1024
    assert config.max_batch_shift == 10
    assert config.opcodes == frozenset(DsaOpcode)
    assert not config.interrupt_handles
    assert config.num_msix == 9
    assert (config.groups, config.wqs) == ((), ())


def test_default_example_is_the_defaults() -> None:
    assert DeviceConfig.from_toml(DEVICES / "default.toml") == DeviceConfig()


def test_load_config_reads_a_file_or_defaults() -> None:
    assert load_config(None) == DeviceConfig()
    assert load_config(DEVICES / "read-only-1dwq.toml").mode is ConfigMode.READ_ONLY


def test_read_only_example_is_one_dedicated_wq() -> None:
    config = DeviceConfig.from_toml(DEVICES / "read-only-1dwq.toml")
    assert config.mode is ConfigMode.READ_ONLY
    assert (config.num_wqs, config.num_engines, config.num_groups) == (1, 1, 1)
    assert config.groups == (GroupPreset(id=0, engines=(0,)),)
    assert config.wqs == (WqPreset(id=0, group=0, size=32, priority=10, mode=WqMode.DEDICATED),)
    assert config.opcodes == ALL_OPCODES


@pytest.mark.parametrize(
    "config",
    [
        DeviceConfig(),
        DeviceConfig.from_toml_text(ONE_DWQ),
        DeviceConfig(
            mode=ConfigMode.READ_ONLY, num_wqs=3, num_engines=3, num_groups=2,
            opcodes=frozenset({DsaOpcode.NOOP, DsaOpcode.MEMMOVE}), interrupt_handles=True,
            groups=(GroupPreset(1, (2, 0)), GroupPreset(0, ())),
            wqs=(WqPreset(2, 1, 8, 3, max_transfer_size=4096, max_batch_size=2),),
        ),
    ],
    ids=["default", "one-dwq", "everything"],
)
def test_to_toml_reads_back_equal(config: DeviceConfig) -> None:
    assert DeviceConfig.from_toml_text(config.to_toml()) == config


def test_read_only_devices_may_have_small_limits() -> None:
    """The driver's WQ defaults only matter where it writes them: on configurable devices."""
    config = DeviceConfig.from_toml_text("max_transfer_size = 4096\nmax_batch_size = 1" + ONE_DWQ)
    assert (config.max_transfer_shift, config.max_batch_shift) == (12, 0)


def test_missing_keys_take_defaults() -> None:
    assert DeviceConfig.from_toml_text("") == DeviceConfig()
    assert DeviceConfig.from_toml_text("num_wqs = 2").num_wqs == 2


def test_unreadable_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"^{missing}: "):
        DeviceConfig.from_toml(missing)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("num_wqs = = 3")
    with pytest.raises(ConfigError, match=f"^{path}: not valid TOML"):
        DeviceConfig.from_toml(path)


BAD_TOML = [
    ("colour = 1", "colour: unknown key"),
    ('mode = "sometimes"', "mode: 'sometimes' is not one of"),
    ("mode = 1", "mode: expected str"),
    ("num_wqs = 0", "num_wqs: 0 is outside 1..255"),
    ("num_wqs = 256", "num_wqs: 256 is outside 1..255"),
    ('num_wqs = "8"', "num_wqs: expected an integer"),
    ("num_wqs = true", "num_wqs: expected an integer"),
    ("num_wqs = 1.5", "num_wqs: expected an integer"),
    ("num_engines = 65", "num_engines: 65 is outside 1..64"),
    ("num_groups = 0", "num_groups: 0 is outside 1..255"),
    ("total_wq_size = 0", "total_wq_size: 0 is outside 1..65535"),
    ("total_wq_size = 65536", "total_wq_size: 65536 is outside 1..65535"),
    ("max_transfer_size = 3000000", "max_transfer_size: 3000000 is not a power of two"),
    ("max_transfer_size = 0", "max_transfer_size: 0 is not a power of two"),
    ("max_transfer_size = 1048576", "max_transfer_size: 1048576 is below 2097152"),
    ("max_transfer_size = 4294967296", "max_transfer_size: 4294967296 exceeds 2147483648"),
    ("max_batch_size = 100", "max_batch_size: 100 is not a power of two"),
    ("max_batch_size = 16", "max_batch_size: 16 is below 32"),
    ("max_batch_size = 65536", "max_batch_size: 65536 exceeds 32768"),
    ("interrupt_handles = 1", "interrupt_handles: expected bool"),
    ('opcodes = "MEMMOVE"', "opcodes: expected list"),
    ("opcodes = []", "opcodes: at least one opcode"),
    ('opcodes = ["MEMMOVE", "XOR"]', "opcodes\\[1\\]: 'XOR' is not a DSA 1.x opcode"),
    ('opcodes = ["MEMMOVE", 3]', "opcodes\\[1\\]: expected str"),
    ('opcodes = ["NOOP", "NOOP"]', "opcodes\\[1\\]: NOOP is listed twice"),
    ("[[group]]\nid = 0\nengines = [0]", 'group: preset groups need mode = "read-only"'),
    ("[[wq]]\nid = 0\ngroup = 0\nsize = 1", 'wq: preset WQs need mode = "read-only"'),
    ("wq = 3", "wq: expected list"),
    ("wq = [1]", "wq\\[0\\]: expected dict"),
]

# Each entry replaces ONE_DWQ's [[wq]] and [[group]] tables (or amends the device keys).
READ_ONLY = 'mode = "read-only"\nnum_wqs = 2\nnum_engines = 2\nnum_groups = 2\ntotal_wq_size = 32\n'
GROUP0 = "[[group]]\nid = 0\nengines = [0]\n"
BAD_PRESETS = [
    ("", 'wq: mode = "read-only" needs at least one preset WQ'),
    (GROUP0 + "[[wq]]\ngroup = 0\nsize = 1", "wq\\[0\\].id: missing"),
    (GROUP0 + "[[wq]]\nid = 0\nsize = 1", "wq\\[0\\].group: missing"),
    (GROUP0 + "[[wq]]\nid = 0\ngroup = 0", "wq\\[0\\].size: missing"),
    (GROUP0 + "[[wq]]\nid = 0\ngroup = 0\nsize = 1\ncolour = 2", "wq\\[0\\].colour: unknown key"),
    (GROUP0 + "[[wq]]\nid = 2\ngroup = 0\nsize = 1", "wq\\[0\\].id: 2 is outside 0..1"),
    (GROUP0 + "[[wq]]\nid = 0\ngroup = 0\nsize = 1\n[[wq]]\nid = 0\ngroup = 0\nsize = 1",
     "wq\\[1\\].id: WQ 0 is listed twice"),
    (GROUP0 + '[[wq]]\nid = 0\ngroup = 0\nsize = 1\nmode = "shared"',
     "wq\\[0\\].mode: only dedicated WQs are supported"),
    (GROUP0 + '[[wq]]\nid = 0\ngroup = 0\nsize = 1\nmode = "both"',
     "wq\\[0\\].mode: 'both' is not one of"),
    (GROUP0 + "[[wq]]\nid = 0\ngroup = 1\nsize = 1",
     "wq\\[0\\].group: group 1 is not a listed \\[\\[group\\]\\]"),
    ("[[group]]\nid = 0\nengines = []\n[[wq]]\nid = 0\ngroup = 0\nsize = 1",
     "wq\\[0\\].group: group 0 has no engines"),
    (GROUP0 + "[[wq]]\nid = 0\ngroup = 0\nsize = 0", "wq\\[0\\].size: 0 is below 1"),
    (GROUP0 + "[[wq]]\nid = 0\ngroup = 0\nsize = 300",
     "wq\\[0\\].size: 300 exceeds total_wq_size 32"),
    (GROUP0 + "[[wq]]\nid = 0\ngroup = 0\nsize = 20\n[[wq]]\nid = 1\ngroup = 0\nsize = 20",
     "wq\\[1\\].size: the WQ sizes add up to 40, more than total_wq_size 32"),
    (GROUP0 + "[[wq]]\nid = 0\ngroup = 0\nsize = 1\npriority = 0",
     "wq\\[0\\].priority: 0 is outside 1..15"),
    (GROUP0 + "[[wq]]\nid = 0\ngroup = 0\nsize = 1\npriority = 16",
     "wq\\[0\\].priority: 16 is outside 1..15"),
    (GROUP0 + "[[wq]]\nid = 0\ngroup = 0\nsize = 1\nmax_transfer_size = 4194304",
     "wq\\[0\\].max_transfer_size: 4194304 exceeds 2097152"),
    (GROUP0 + "[[wq]]\nid = 0\ngroup = 0\nsize = 1\nmax_transfer_size = 3",
     "wq\\[0\\].max_transfer_size: 3 is not a power of two"),
    (GROUP0 + "[[wq]]\nid = 0\ngroup = 0\nsize = 1\nmax_batch_size = 2048",
     "wq\\[0\\].max_batch_size: 2048 exceeds 1024"),
    (GROUP0 + '[[wq]]\nid = 0\ngroup = 0\nsize = "1"', "wq\\[0\\].size: expected an integer"),
    ("[[group]]\nengines = [0]", "group\\[0\\].id: missing"),
    ("[[group]]\nid = 0", "group\\[0\\].engines: missing"),
    ("[[group]]\nid = 0\nengines = [0]\nwqs = [0]", "group\\[0\\].wqs: unknown key"),
    ("[[group]]\nid = 0\nengines = 0", "group\\[0\\].engines: expected list"),
    ('[[group]]\nid = 0\nengines = ["0"]', "group\\[0\\].engines\\[0\\]: expected an integer"),
    ("[[group]]\nid = 2\nengines = [0]", "group\\[0\\].id: 2 is outside 0..1"),
    (GROUP0 + GROUP0, "group\\[1\\].id: group 0 is listed twice"),
    ("[[group]]\nid = 0\nengines = [2]", "group\\[0\\].engines: 2 is outside 0..1"),
    (GROUP0 + "[[group]]\nid = 1\nengines = [1, 0]",
     "group\\[1\\].engines: engine 0 is already in group 0"),
]


@pytest.mark.parametrize(("text", "message"), BAD_TOML, ids=[m for _, m in BAD_TOML])
def test_bad_device_keys_name_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        DeviceConfig.from_toml_text(text)


@pytest.mark.parametrize(("tables", "message"), BAD_PRESETS, ids=[m for _, m in BAD_PRESETS])
def test_bad_presets_name_the_field(tables: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        DeviceConfig.from_toml_text(READ_ONLY + tables)


def test_configs_built_in_code_are_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"^wq\[0\].size: 300 exceeds total_wq_size 128$"):
        DeviceConfig(
            mode=ConfigMode.READ_ONLY, groups=(GroupPreset(0, (0,)),),
            wqs=(WqPreset(id=0, group=0, size=300),),
        )
    with pytest.raises(ConfigError, match=r"^opcodes: "):
        DeviceConfig(opcodes=frozenset())
