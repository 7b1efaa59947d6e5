"""What each DSA generation advertises and lets the guest configure, as data.

A :class:`Generation` holds everything the device model does differently from one generation to
the next: the VERSION register, the GENCAP and WQCAP bits the generation fixes, the size of a
WQCFG entry, the commands CMDCAP offers, which WQCFG, GRPFLAGS and MSI-X permission fields the
guest may write, and what a preset group's traffic classes are. The rest of the capability
registers comes from the :class:`DeviceConfig` (topology, limits, opcodes). Only DSA 1.0 is
described today (:data:`DSA_1_0`); another generation is another entry of the same shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vdsa_server.device.config import ConfigMode, DeviceConfig
from vdsa_server.device.registers import (
    DEVICE_VERSION_1,
    IDXD_CMDCAP_OFFSET,
    IDXD_ENGCAP_OFFSET,
    IDXD_GENCAP_OFFSET,
    IDXD_GRPCAP_OFFSET,
    IDXD_OPCAP_OFFSET,
    IDXD_TABLE_OFFSET,
    IDXD_VER_OFFSET,
    IDXD_WQCAP_OFFSET,
    EngineCapReg,
    GenCapReg,
    GroupCapReg,
    IdxdCmd,
    OpCap,
    TableLayout,
    WqCapReg,
    layout_fields,
)

# Advertised only when DeviceConfig.interrupt_handles asks for them.
INT_HANDLE_COMMANDS = frozenset({IdxdCmd.REQUEST_INT_HANDLE, IdxdCmd.RELEASE_INT_HANDLE})


@dataclass(frozen=True)
class Generation:
    """One DSA generation, as the device model needs to know it."""

    name: str
    version: int  # the VERSION register
    gencap: Mapping[str, int]  # GENCAP fields the generation fixes, by name
    wqcap: Mapping[str, int]  # WQCAP fields likewise (wqcfg_size aside)
    wqcfg_size_field: int  # WQCAP.wqcfg_size: a WQCFG entry is 32 << wqcfg_size_field bytes
    commands: frozenset[IdxdCmd]  # CMDCAP, INT_HANDLE_COMMANDS aside
    wqcfg_fields: Mapping[ConfigMode, tuple[str, ...]]  # WQCFG fields the guest may write
    grpflags_fields: tuple[str, ...]  # GRPFLAGS fields the guest may write
    grpflags_read_buffer_fields: tuple[str, ...]  # ... and those with read buffers advertised
    msix_perm_fields: tuple[str, ...]  # MSI-X permission fields the guest may write
    traffic_class: int  # GRPFLAGS.tc_a and tc_b of a preset group

    def __post_init__(self) -> None:
        # setattr with a misspelt name would add a plain attribute to the ctypes value; the
        # field tuples need no check, field_mask refuses unknown names.
        for layout, fields in ((GenCapReg, self.gencap), (WqCapReg, self.wqcap)):
            unknown = sorted(set(fields) - {field.path for field in layout_fields(layout)})
            if unknown:
                raise KeyError(f"{layout.__name__} has no field {', '.join(unknown)}")


DSA_1_0 = Generation(
    name="DSA 1.0",
    version=DEVICE_VERSION_1,  # 0x100, as DSA 1.0 hardware reports (see IDXD_VER_OFFSET)
    gencap={
        # Block on fault is accepted, as DSA hardware does; guest memory that QEMU
        # maps never faults in a way blocking could resolve, so nothing ever blocks.
        "block_on_fault": 1,
        "overlap_copy": 1,  # memmove semantics, as DSA 1.0 hardware reports
        # The cache-control flag is a hint an emulator can always honour.
        "cache_control_mem": 1,
        "cache_control_cache": 1,
        "cmd_cap": 1,
    },
    wqcap={
        "dedicated_mode": 1,  # shared WQs need PASID and ENQCMD, which the guest lacks
        "priority": 1,
        # Per-WQ ATS disable, as DSA 1.x has; without an IOMMU there is no ATS to
        # disable, but accel-config's load-config writes the attribute regardless.
        "wq_ats_support": 1,
        "occupancy": 1,  # always 0: descriptors leave the WQ as they arrive
    },
    wqcfg_size_field=0,
    commands=frozenset(IdxdCmd) - INT_HANDLE_COMMANDS,
    wqcfg_fields={
        # Everything DSA 1.x defines except what a capability we do not advertise governs
        # (ATS disable, occupancy interrupts).
        ConfigMode.CONFIGURABLE: (
            "wq_size", "wq_thresh", "mode", "bof", "wq_ats_disable", "priority", "pasid",
            "pasid_en", "priv", "max_xfer_shift", "max_batch_shift",
        ),
        # Only PASID, PASID enable and privilege (DSA spec; idxd_wq_set_pasid writes them).
        ConfigMode.READ_ONLY: ("pasid", "pasid_en", "priv"),
    },
    # Only the traffic classes; read buffers and progress limits are not advertised.
    grpflags_fields=("tc_a", "tc_b"),
    grpflags_read_buffer_fields=("use_rdbuf_limit", "rdbufs_reserved", "rdbufs_allowed"),
    msix_perm_fields=("ignore", "pasid_en", "pasid"),
    traffic_class=1,  # what the 6.1 driver programs for DSA 1.x (idxd_setup_groups)
)


def capability_registers(
    config: DeviceConfig, generation: Generation, layout: TableLayout
) -> list[tuple[int, bytes]]:
    """The read-only identification and capability registers, as (offset, bytes)."""
    gencap = GenCapReg()
    for name, value in generation.gencap.items():
        setattr(gencap, name, value)
    gencap.max_xfer_shift = config.max_transfer_shift
    gencap.max_batch_shift = config.max_batch_shift
    gencap.config_en = int(config.mode is ConfigMode.CONFIGURABLE)

    wqcap = WqCapReg()
    for name, value in generation.wqcap.items():
        setattr(wqcap, name, value)
    wqcap.wqcfg_size = generation.wqcfg_size_field
    wqcap.total_wq_size = config.total_wq_size
    wqcap.num_wqs = config.num_wqs

    grpcap = GroupCapReg()
    grpcap.num_groups = config.num_groups
    grpcap.total_rdbufs = config.read_buffers
    grpcap.rdbuf_ctrl = grpcap.rdbuf_limit = int(config.read_buffers > 0)

    engcap = EngineCapReg()
    engcap.num_engines = config.num_engines

    opcap = OpCap()
    for opcode in config.opcodes:
        opcap.bits[opcode // 64] |= 1 << (opcode % 64)

    commands = generation.commands
    if config.interrupt_handles:
        commands |= INT_HANDLE_COMMANDS
    cmdcap = sum(1 << command for command in commands)

    return [
        (IDXD_VER_OFFSET, generation.version.to_bytes(4, "little")),
        (IDXD_GENCAP_OFFSET, bytes(gencap)),
        (IDXD_WQCAP_OFFSET, bytes(wqcap)),
        (IDXD_GRPCAP_OFFSET, bytes(grpcap)),
        (IDXD_ENGCAP_OFFSET, bytes(engcap)),
        (IDXD_OPCAP_OFFSET, bytes(opcap)),
        (IDXD_TABLE_OFFSET, bytes(layout.offsets_reg())),
        (IDXD_CMDCAP_OFFSET, cmdcap.to_bytes(4, "little")),
    ]
