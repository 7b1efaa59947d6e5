"""The native engine's operations against the reference model (tests/engine_reference.py).

Each example builds guest memory (pseudo-random contents plus the example's own writes), runs
one descriptor through ``Engine.execute`` and through the model, and requires the same bytes
in every mapped region (completion records included), the same interrupts per vector and the
same software errors. Hypothesis draws sizes, alignments, overlaps, placements that run into
unmapped gaps or regions without the needed permission, flags (valid and not), reserved bytes,
DIF tags and batches; the example-based tests at the end reach every completion status.
"""

from __future__ import annotations

import dataclasses
import random
import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from tests import engine_reference as ref
from vdsa_server.device.descriptors import DsaCompletionRecord, DsaHwDesc
from vdsa_server.device.descriptors import DsaCompStatus as S
from vdsa_server.device.descriptors import DsaOpcode as Op
from vdsa_server.device.descriptors import IdxdOpFlag as F
from vdsa_server.device.engine_port import WqSettings
from vdsa_server.engine import Engine

NUM_MSIX = 8


@dataclass(frozen=True)
class Spec:
    """One DMA region of the test layout."""

    name: str
    iova: int
    size: int
    readable: bool = True
    writable: bool = True

    @property
    def end(self) -> int:
        return self.iova + self.size


# Above 4 GiB, so that an address truncated to 32 bits lands nowhere.
A = Spec("A", 0x1_0000_0000, 0x4000)  # then an unmapped gap
B = Spec("B", 0x1_0000_5000, 0x4000)  # then C: writes run into a read-only region
C = Spec("C", 0x1_0000_9000, 0x1000, writable=False)  # then D: reads run into a write-only one
D = Spec("D", 0x1_0000_A000, 0x1000, readable=False)  # then unmapped
# Completion records: slot k at COMP + 32 * k. The region ends 16 bytes into its last 32-byte
# slot and a read-only one follows, so that slot is a record only half writable.
COMP = Spec("COMP", 0x2_0000_0000, 0x1FF0)
COMP_RO = Spec("COMP_RO", 0x2_0000_1FF0, 0x1010, writable=False)
REGIONS = (A, B, C, D, COMP, COMP_RO)
GAP = A.end  # 0x1000 unmapped bytes

# WQ 0 takes whole DIF blocks of 4104 bytes; WQ 1 is for the limits.
WQS = {
    0: ref.WqSettings(index=0, max_transfer_size=0x4000, max_batch_size=16),
    1: ref.WqSettings(index=1, max_transfer_size=64, max_batch_size=4),
}
GRANTED = frozenset({1, 3, 6})


@dataclass(frozen=True)
class Case:
    """One descriptor, the memory it expects (written over the random contents), its WQ."""

    descriptor: bytes
    writes: tuple[tuple[int, bytes], ...] = ()
    wq: int = 0
    seed: int = 0  # of the random contents

    def __repr__(self) -> str:
        # Short: the writes can be kilobytes (print_blob=True gives the exact example).
        writes = ", ".join(f"{len(data)} bytes at {address:#x}" for address, data in self.writes)
        return f"Case(WQ {self.wq}, {_describe(self.descriptor)}, writes: {writes or 'none'})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """What Hypothesis prints a falsifying example with."""
        printer.text(repr(self))


@dataclass
class Rig:
    """An engine with the layout mapped, and the model's view of the same device."""

    engine: Engine
    buffers: list[bytearray]
    device: ref.DeviceSettings

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Hypothesis prints fixtures with a falsifying example: not the 64 KiB of buffers."""
        printer.text(f"Rig({self.device})")


def _rig(device: ref.DeviceSettings) -> Iterator[Rig]:
    with Engine(num_wqs=len(WQS), num_msix=device.num_msix, opcodes=device.opcodes,
                interrupt_handles=device.interrupt_handles) as engine:
        for index, wq in WQS.items():
            engine.enable_wq(index, WqSettings(
                size=16, priority=1, engines=1, max_transfer_size=wq.max_transfer_size,
                max_batch_size=wq.max_batch_size))
        for handle in device.granted_handles:
            engine.set_int_handle(handle, True)
        buffers = [bytearray(spec.size) for spec in REGIONS]
        for spec, buffer in zip(REGIONS, buffers, strict=True):
            engine.dma_map(spec.iova, buffer, readable=spec.readable, writable=spec.writable)
        yield Rig(engine, buffers, device)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    yield from _rig(ref.DeviceSettings(num_msix=NUM_MSIX))


@pytest.fixture(scope="module")
def handles_rig() -> Iterator[Rig]:
    """Interrupt handles advertised; GRANTED granted."""
    yield from _rig(ref.DeviceSettings(num_msix=NUM_MSIX, interrupt_handles=True,
                                       granted_handles=GRANTED))


@pytest.fixture(scope="module")
def few_ops_rig() -> Iterator[Rig]:
    """OPCAP without MEMMOVE, CRCGEN and the DIF operations."""
    opcodes = frozenset(Op) - {Op.MEMMOVE, Op.CRCGEN, Op.DIF_CHECK, Op.DIF_INS, Op.DIF_STRP,
                               Op.DIF_UPDT}
    yield from _rig(ref.DeviceSettings(num_msix=NUM_MSIX, opcodes=opcodes))


# --- Running and comparing -------------------------------------------------------------------


def _describe(raw: bytes) -> str:
    d = DsaHwDesc.from_buffer_copy(raw)
    name = Op(d.opcode).name if d.opcode in set(Op) else f"opcode {d.opcode:#x}"
    words = " ".join(f"{w:016x}" for w in struct.unpack("<8Q", raw))
    return f"{name} flags={d.flags:#08x} qwords={words}"


def _record_diff(address: int, engine: bytes, model: bytes) -> str:
    """The fields in which two 32-byte records at ``address`` differ."""
    e, m = DsaCompletionRecord.from_buffer_copy(engine), DsaCompletionRecord.from_buffer_copy(model)
    names = ("status", "result", "bytes_completed", "fault_addr")
    diffs = [f"{n}: engine {getattr(e, n):#x} model {getattr(m, n):#x}"
             for n in names if getattr(e, n) != getattr(m, n)]
    if bytes(e.op_specific) != bytes(m.op_specific):
        diffs.append(f"bytes 16-31: engine {bytes(e.op_specific).hex()} "
                     f"model {bytes(m.op_specific).hex()}")
    return f"record at {address:#x}: " + "; ".join(diffs)


def _memory_diff(spec: Spec, engine: bytes, model: bytes) -> str:
    first = next(i for i in range(spec.size) if engine[i] != model[i])
    last = max(i for i in range(spec.size) if engine[i] != model[i])
    text = (f"region {spec.name}: bytes differ from {spec.iova + first:#x} to "
            f"{spec.iova + last:#x}; engine {engine[first:first + 16].hex()} "
            f"model {model[first:first + 16].hex()}")
    if spec is COMP:
        slot = first - first % ref.RECORD_SIZE
        text += "\n" + _record_diff(spec.iova + slot, engine[slot:slot + 32],
                                    model[slot:slot + 32])
    return text


def _memory(case: Case) -> ref.GuestMemory:
    rnd = random.Random(case.seed)
    memory = ref.GuestMemory(
        ref.Region(s.iova, bytearray(rnd.randbytes(s.size)), s.readable, s.writable)
        for s in REGIONS)
    for address, data in case.writes:
        # Only the mapped part: a buffer may be placed to run off its region.
        for region in memory.regions:
            low, high = max(address, region.iova), min(address + len(data), region.end)
            if low < high:
                memory.store(low, data[low - address : high - address])
    return memory


@dataclass(frozen=True)
class Result:
    """What the model did (the engine did the same)."""

    outcome: ref.Outcome
    memory: ref.GuestMemory


def check(rig: Rig, case: Case) -> Result:
    """Runs ``case`` on the engine and the model; fails on any difference."""
    memory = _memory(case)
    for buffer, region in zip(rig.buffers, memory.regions, strict=True):
        buffer[:] = region.data
    engine = rig.engine
    engine.pop_errors()
    irqs_before = [engine.irq_count(v) for v in range(NUM_MSIX)]
    engine.execute(case.wq, case.descriptor)
    outcome = ref.execute(memory, WQS[case.wq], rig.device, case.descriptor)

    problems = []
    engine_errors = [dataclasses.asdict(e) for e in engine.pop_errors()]
    model_errors = [dataclasses.asdict(e) for e in outcome.errors]
    if engine_errors != model_errors:
        problems.append(f"software errors: engine {engine_errors} model {model_errors}")
    engine_irqs = {v: engine.irq_count(v) - irqs_before[v] for v in range(NUM_MSIX)}
    model_irqs = Counter(outcome.interrupts)
    if {v: n for v, n in engine_irqs.items() if n} != dict(model_irqs):
        problems.append(f"interrupts per vector: engine {engine_irqs} model {dict(model_irqs)}")
    for spec, buffer, region in zip(REGIONS, rig.buffers, memory.regions, strict=True):
        if buffer != region.data:
            problems.append(_memory_diff(spec, bytes(buffer), bytes(region.data)))
    assert not problems, f"WQ {case.wq} {_describe(case.descriptor)}\n" + "\n".join(problems)
    if currently_in_test_context():  # for --hypothesis-show-statistics
        event(S(outcome.status & 0x7F).name + (" (write)" if outcome.status & 0x80 else "")
              + "".join(f", then {S(e.error).name}" for e in outcome.errors
                        if not e.batch and e.error != outcome.status & 0x7F))
    return Result(outcome, memory)



def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- Strategies: placements and the fields every descriptor has ------------------------------

Draw = st.DrawFn
PLACEMENTS = ("inside",) * 6 + ("edge", "edge", "read-only", "write-only", "gap")


@st.composite
def buffer(draw: Draw, size: int, align: int = 1) -> int:
    """An IOVA for a buffer of ``size`` bytes: mostly inside a read-write region, sometimes
    running off one (into a gap, a read-only or a write-only region) or in the wrong one."""
    kind = draw(st.sampled_from(PLACEMENTS))
    if kind == "gap":
        address = GAP + draw(st.integers(0, 0xFFF))
    else:
        region = {"read-only": C, "write-only": D}.get(kind) or draw(st.sampled_from([A, B]))
        if kind == "edge":
            region = draw(st.sampled_from([A, B, C, D]))
            offset = region.size - draw(st.integers(0, min(size, region.size)))
        else:
            # Spread out: st.integers alone favours its bounds, and buffers of one example
            # would all start at a region's first byte.
            offset = draw(st.integers(0, 0xFFFFF)) % (max(0, region.size - size) + 1)
        address = region.iova + offset
    return address - address % align


def rarely(draw: Draw, n: int) -> bool:
    """True once in ``n`` draws or so (st.integers favours its bounds too much for this)."""
    return draw(st.sampled_from([False] * (n - 1) + [True]))


def sizes(top: int = 96) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(1, top), st.integers(0, 0x400))


# Flags whose meaning an operation's strategy chooses itself; the rest of an opcode's allowed
# flags are drawn at random (they must change nothing but FENCE in a batch).
SEMANTIC_FLAGS = int(F.CR) | ref.OP16 | ref.OP17 | ref.OP18
ALL_FLAG_BITS = 0xFFFFFF


@st.composite
def completion(draw: Draw, opcode: int, slot: int) -> dict[str, int]:
    """Flags and the common fields: completion record, interrupt, dword 0 (ignored)."""
    record = COMP.iova + ref.RECORD_SIZE * slot
    how = draw(st.sampled_from(["record"] * 12 + ["crav"] * 2 + ["none"] * 2 + [
        "misaligned", "read-only", "half", "rcr-only"]))
    flags, address = {
        "record": (F.CRAV | F.RCR, record),
        "crav": (F.CRAV, record),
        "none": (0, 0),
        "misaligned": (F.CRAV | F.RCR, record + draw(st.integers(1, 31))),
        "read-only": (F.CRAV | F.RCR, COMP_RO.iova + 0x10 + 32 * draw(st.integers(0, 7))),
        "half": (F.CRAV | F.RCR, COMP.end - 16),
        "rcr-only": (F.RCR, record),
    }[how]
    if draw(st.booleans()):
        flags |= F.RCI
    handle = draw(st.integers(0, 0xFFFF) if rarely(draw, 10) else st.integers(0, NUM_MSIX - 1))
    extra = ref.EXTRA_FLAGS.get(opcode, 0) & ~SEMANTIC_FLAGS
    flags |= draw(st.integers(0, ALL_FLAG_BITS)) & extra
    if rarely(draw, 20):  # a flag the opcode does not allow
        flags |= 1 << draw(st.integers(0, 23))
    return {"flags": flags, "completion_addr": address, "int_handle": handle,
            "pasid": draw(st.integers(0, 0xFFFFF)), "priv": draw(st.integers(0, 1))}


@st.composite
def make_case(draw: Draw, opcode: int, fields: dict[str, int],
              writes: Sequence[tuple[int, bytes]] = (), *, op_flags: int = 0, slot: int = 0,
              wq: int | None = None) -> Case:
    """The descriptor with ``fields``, random common fields, and now and then a reserved bit
    set."""
    common = draw(completion(opcode, slot))
    common["flags"] |= op_flags
    raw = bytearray(ref.descriptor(opcode, **(common | fields)))
    if opcode in ref.EXTRA_FLAGS and rarely(draw, 16):
        offset, bits = draw(st.sampled_from(ref.reserved_bits(opcode, common["flags"])))
        raw[offset] |= 1 << draw(st.sampled_from([b for b in range(8) if bits >> b & 1]))
    if wq is None:
        wq = draw(st.sampled_from([0] * 7 + [1]))
    return Case(bytes(raw), tuple(writes), wq, draw(st.integers(0, 2**32)))


def content(draw: Draw, size: int) -> bytes:
    return random.Random(draw(st.integers(0, 2**32))).randbytes(size)


# --- Strategies per operation ----------------------------------------------------------------


@st.composite
def memmove_case(draw: Draw, slot: int = 0) -> Case:
    size = draw(sizes())
    src = draw(buffer(size))
    if draw(st.booleans()):
        dst = src + draw(st.integers(-size - 1, size + 1))  # overlapping, either way
    else:
        dst = draw(buffer(size))
    return draw(make_case(Op.MEMMOVE, {"src_addr": src, "dst_addr": dst, "xfer_size": size},
                          slot=slot))


@st.composite
def memfill_case(draw: Draw, slot: int = 0) -> Case:
    size = draw(sizes())
    fields = {"pattern": draw(st.integers(0, 2**64 - 1)), "dst_addr": draw(buffer(size)),
              "xfer_size": size}
    return draw(make_case(Op.MEMFILL, fields, slot=slot))


@st.composite
def compare_case(draw: Draw, slot: int = 0) -> Case:
    size = draw(sizes())
    src1, src2 = draw(buffer(size)), draw(buffer(size))
    data = content(draw, size)
    changed = bytearray(data)
    if size and draw(st.booleans()):
        changed[draw(st.integers(0, size - 1))] ^= 1 << draw(st.integers(0, 7))
    fields = {"src_addr": src1, "src2_addr": src2, "xfer_size": size,
              "expected_res": draw(st.integers(0, 1))}
    return draw(make_case(Op.COMPARE, fields, [(src1, data), (src2, bytes(changed))],
                          op_flags=draw(st.sampled_from([0, F.CR])), slot=slot))


@st.composite
def compval_case(draw: Draw) -> Case:
    size = draw(sizes())
    src = draw(buffer(size))
    pattern = draw(st.integers(0, 2**64 - 1))
    data = bytearray((pattern.to_bytes(8, "little") * (size // 8 + 1))[:size])
    if size and draw(st.booleans()):
        data[draw(st.integers(0, size - 1))] ^= 0x80
    fields = {"src_addr": src, "comp_pattern": pattern, "xfer_size": size,
              "expected_res": draw(st.integers(0, 1))}
    return draw(make_case(Op.COMPVAL, fields, [(src, bytes(data))],
                          op_flags=draw(st.sampled_from([0, F.CR]))))


def _odd(draw: Draw, good: int, bad: Sequence[int]) -> int:
    """``good`` mostly, one of ``bad`` now and then."""
    return draw(st.sampled_from([good] * 8 + list(bad)))


@st.composite
def cr_delta_case(draw: Draw) -> Case:
    words = draw(st.integers(1, 24))
    size = _odd(draw, 8 * words, [8 * words + 4, 0x80008])
    src1 = draw(buffer(size, 8)) + _odd(draw, 0, [4])
    src2 = draw(buffer(size, 8))
    data = bytearray(content(draw, 8 * words))
    first = bytes(data)
    for k in draw(st.lists(st.integers(0, words - 1), max_size=words)):
        data[8 * k + draw(st.integers(0, 7))] ^= 0xFF
    entries = sum(first[8 * k:8 * k + 8] != data[8 * k:8 * k + 8] for k in range(words))
    max_delta = _odd(draw, 10 * draw(st.integers(1, max(1, entries + 1))), [0, 15, 25])
    fields = {"src_addr": src1, "src2_addr": src2, "xfer_size": size,
              "delta_addr": draw(buffer(max_delta, 8)) + _odd(draw, 0, [2]),
              "max_delta_size": max_delta, "expected_res_mask": draw(st.integers(0, 7))}
    return draw(make_case(Op.CR_DELTA, fields, [(src1, first), (src2, bytes(data))],
                          op_flags=draw(st.sampled_from([0, F.CR]))))


@st.composite
def ap_delta_case(draw: Draw) -> Case:
    words = draw(st.integers(1, 24))
    size = _odd(draw, 8 * words, [8 * words + 1, 0x80008])
    offsets = sorted(draw(st.sets(st.integers(0, words - 1), min_size=1, max_size=words)))
    how = draw(st.sampled_from(["increasing"] * 5 + ["repeated", "inserted"]))
    if how == "repeated":
        at = draw(st.integers(0, len(offsets) - 1))
        offsets.insert(at, offsets[at])
    elif how == "inserted":  # out of order or out of range, likely
        offsets.insert(draw(st.integers(0, len(offsets))),
                       draw(st.sampled_from([0, words - 1, words, 0xFFFF])))
    delta = b"".join(struct.pack("<HQ", k, draw(st.integers(0, 2**64 - 1))) for k in offsets)
    record_size = _odd(draw, len(delta), [0, len(delta) - 3, len(delta) + 10])
    dst = draw(buffer(size, 8)) + _odd(draw, 0, [4])
    if rarely(draw, 8):
        record = dst + 8 * draw(st.integers(0, words))  # overlapping the destination
    else:
        record = draw(buffer(record_size, 8))
    fields = {"src_addr": record, "dst_addr": dst, "xfer_size": size,
              "delta_rec_size": record_size}
    return draw(make_case(Op.AP_DELTA, fields, [(record, delta)]))


@st.composite
def dualcast_case(draw: Draw) -> Case:
    size = draw(sizes())
    src, dst1 = draw(buffer(size)), draw(buffer(size))
    how = draw(st.sampled_from(["page"] * 6 + ["any", "overlap"]))
    if how == "page":  # the same offset in another 4 KiB page, possibly another region
        dst2 = dst1 + 0x1000 * draw(st.sampled_from([-5, -2, -1, 1, 2, 5]))
    elif how == "overlap":
        dst2 = src + 0x1000 * draw(st.integers(-1, 1))
    else:
        dst2 = draw(buffer(size))
    fields = {"src_addr": src, "dst_addr": dst1, "dest2": dst2, "xfer_size": size}
    return draw(make_case(Op.DUALCAST, fields))


@st.composite
def crc_case(draw: Draw, opcode: int, slot: int = 0) -> Case:
    size = draw(sizes())
    op_flags = draw(st.integers(0, 7)) << 16
    src = draw(buffer(size))
    fields = {"src_addr": src, "xfer_size": size}
    writes: list[tuple[int, bytes]] = []
    if opcode == Op.COPY_CRC:
        fields["dst_addr"] = src + size // 2 if rarely(draw, 6) else draw(buffer(size))
    if op_flags & ref.OP16:
        fields["seed_addr"] = draw(buffer(4, 4)) + _odd(draw, 0, [1, 2])
        writes.append((fields["seed_addr"], struct.pack("<I", draw(st.integers(0, ref.M32)))))
    if not op_flags & ref.OP16 or draw(st.booleans()):  # the field unused with op bit 16
        fields["crc_seed"] = draw(st.one_of(st.sampled_from([0, ref.M32]),
                                           st.integers(0, ref.M32)))
    return draw(make_case(opcode, fields, writes, op_flags=op_flags, slot=slot))


def _tag_seeds(draw: Draw) -> tuple[int, int, int]:
    """(ref seed, app mask, app seed), near the wrap-arounds often."""
    ref_seed = draw(st.one_of(st.sampled_from([0, ref.M32 - 1, ref.M32]), st.integers(0, ref.M32)))
    mask = draw(st.one_of(st.sampled_from([0, 0xFFFF, 0xFF00]), st.integers(0, 0xFFFF)))
    app = draw(st.one_of(st.sampled_from([0, 0xFFFE, 0xFFFF]), st.integers(0, 0xFFFF)))
    return ref_seed, mask, app


def _dif_source(draw: Draw, blocks: int, block_size: int, dif_flags: int,
                tags: ref.DifTags) -> bytes:
    """Blocks with their DIFs: mostly right, some with a field wrong or all ones."""
    out = bytearray()
    for b in range(blocks):
        block = content(draw, block_size)
        dif = bytearray(ref.make_dif(block, dif_flags, tags, b))
        # make_dif masks the app tag as insert does; the check ignores the masked bits anyway.
        fault = draw(st.sampled_from(["none"] * 4 + ["guard", "app", "ref", "all-f", "all-f",
                                                     "app-f", "app-ref-f"]))
        if fault in ("guard", "app", "ref"):
            dif[{"guard": 0, "app": 2, "ref": 4}[fault]] ^= 1 << draw(st.integers(0, 7))
        elif fault == "all-f":
            dif[:] = b"\xff" * 8
        elif fault == "app-f":
            dif[2:4] = b"\xff\xff"
        elif fault == "app-ref-f":
            dif[2:8] = b"\xff" * 6
        out += block + dif
    return bytes(out)


@st.composite
def dif_case(draw: Draw, opcode: int) -> Case:
    size_index = draw(st.sampled_from([0, 1] * 3 + [2, 3]))
    block_size = ref.DIF_BLOCK_SIZES[size_index]
    blocks = draw(st.integers(1, 3 if block_size < 1000 else 2))
    dif_flags = size_index | draw(st.integers(0, 3)) << 2
    # The F-detect bits (3:0) in their meaningful combinations, the rest at random.
    src_flags = draw(st.sampled_from([0, 1, 2, 3, 4, 6, 8, 0xA, 0xC, 0xF])) | (
        draw(st.integers(0, 15)) << 4)
    dst_flags = draw(st.integers(0, 0x1F)) << 3
    ref_seed, mask, app = _tag_seeds(draw)
    checks = opcode != Op.DIF_INS
    src_step = block_size + ref.DIF_SIZE if checks else block_size
    dst_step = {Op.DIF_CHECK: 0, Op.DIF_STRP: block_size, Op.DIF_INS: src_step + ref.DIF_SIZE,
                Op.DIF_UPDT: src_step}[Op(opcode)]
    size = blocks * src_step + _odd(draw, 0, [1, -8, block_size])
    src = draw(buffer(size))
    fields = {"src_addr": src, "xfer_size": size}
    if dst_step:
        dst_size = blocks * dst_step
        where = draw(st.sampled_from(["apart"] * 4 + ["overlap", "before", "after"]))
        fields["dst_addr"] = {
            "apart": lambda: draw(buffer(dst_size)),
            "overlap": lambda: src + draw(st.integers(-64, 64)),
            # Just clear of the source or one byte into it, either side: the destination's
            # own size decides which.
            "before": lambda: src - dst_size + draw(st.integers(0, 1)),
            "after": lambda: src + size - draw(st.integers(0, 1)),
        }[where]()
    writes: list[tuple[int, bytes]] = []
    if checks:
        tags = ref.DifTags(ref_seed, mask, app, src_flags)
        writes.append((src, _dif_source(draw, blocks, block_size, dif_flags, tags)))
    if opcode == Op.DIF_INS:
        fields |= {"dest_dif_flag": dst_flags, "dif_ins_flags": dif_flags,
                   "ins_ref_tag_seed": ref_seed, "ins_app_tag_mask": mask, "ins_app_tag_seed": app}
    else:
        fields |= {"src_upd_flags": src_flags, "dif_upd_flags": dif_flags,
                   "src_ref_tag_seed": ref_seed, "src_app_tag_mask": mask,
                   "src_app_tag_seed": app}
    if opcode == Op.DIF_UPDT:
        dst_ref, dst_mask, dst_app = _tag_seeds(draw)
        fields |= {"upd_dest_flags": dst_flags, "dest_ref_tag_seed": dst_ref,
                   "dest_app_tag_mask": dst_mask, "dest_app_tag_seed": dst_app}
    return draw(make_case(opcode, fields, writes, wq=0))


@st.composite
def cflush_case(draw: Draw) -> Case:
    size = draw(st.one_of(sizes(), st.integers(1, 0x3000)))
    return draw(make_case(Op.CFLUSH, {"dst_addr": draw(buffer(size)), "xfer_size": size}))


@st.composite
def noop_drain_case(draw: Draw) -> Case:
    opcode = draw(st.sampled_from([Op.NOOP, Op.DRAIN]))
    fields: dict[str, int] = {}
    op_flags = 0
    if opcode == Op.DRAIN:
        op_flags = draw(st.integers(0, 3)) << 16  # readback addresses valid
        if op_flags & ref.OP16:
            fields["rdback_addr"] = draw(st.integers(0, 2**64 - 1))
        if op_flags & ref.OP17:
            fields["rdback_addr2"] = draw(st.integers(0, 2**64 - 1))
    return draw(make_case(opcode, fields, op_flags=op_flags))


@st.composite
def batch_entry(draw: Draw, slot: int) -> Case:
    not_in_a_batch: int = draw(st.sampled_from([Op.BATCH, Op.DRAIN, 0x0A, 0xFF]))
    return draw(st.one_of([
        memfill_case(slot), memmove_case(slot), compare_case(slot), crc_case(Op.CRCGEN, slot),
        make_case(Op.NOOP, {}, slot=slot), make_case(not_in_a_batch, {}, slot=slot),
    ]))


@st.composite
def batch_case(draw: Draw) -> Case:
    entries = [draw(batch_entry(i + 1)) for i in range(draw(st.integers(2, 6)))]
    wq = draw(st.sampled_from([0, 0, 0, 1]))
    count = _odd(draw, len(entries), [1, len(entries) + 1, WQS[wq].max_batch_size + 1])
    if rarely(draw, 4):
        address = draw(buffer(64 * count, 64)) + _odd(draw, 0, [32])
    else:
        address = draw(st.sampled_from([A, B])).iova + 64 * draw(st.integers(0, 16))
    writes: list[tuple[int, bytes]] = []
    for entry in entries:
        writes += entry.writes
    writes.append((address, b"".join(e.descriptor for e in entries)))
    fields = {"desc_list_addr": address, "desc_count": count}
    return draw(make_case(Op.BATCH, fields, writes, wq=wq))


# --- Property tests --------------------------------------------------------------------------


@fuzz(300)
@given(case=memmove_case())
def test_memmove(rig: Rig, case: Case) -> None:
    check(rig, case)


@fuzz(150)
@given(case=memfill_case())
def test_memfill(rig: Rig, case: Case) -> None:
    check(rig, case)


@fuzz(200)
@given(case=compare_case())
def test_compare(rig: Rig, case: Case) -> None:
    check(rig, case)


@fuzz(150)
@given(case=compval_case())
def test_compval(rig: Rig, case: Case) -> None:
    check(rig, case)


@fuzz(250)
@given(case=cr_delta_case())
def test_cr_delta(rig: Rig, case: Case) -> None:
    check(rig, case)


@fuzz(250)
@given(case=ap_delta_case())
def test_ap_delta(rig: Rig, case: Case) -> None:
    check(rig, case)


@fuzz(200)
@given(case=dualcast_case())
def test_dualcast(rig: Rig, case: Case) -> None:
    check(rig, case)


@fuzz(200)
@given(case=crc_case(Op.CRCGEN))
def test_crcgen(rig: Rig, case: Case) -> None:
    check(rig, case)


@fuzz(200)
@given(case=crc_case(Op.COPY_CRC))
def test_copy_crc(rig: Rig, case: Case) -> None:
    check(rig, case)


@pytest.mark.parametrize("opcode", [Op.DIF_CHECK, Op.DIF_INS, Op.DIF_STRP, Op.DIF_UPDT])
def test_dif(rig: Rig, opcode: int) -> None:
    @fuzz(120)
    @given(case=dif_case(opcode))
    def run(case: Case) -> None:
        check(rig, case)

    run()


@fuzz(100)
@given(case=cflush_case())
def test_cflush(rig: Rig, case: Case) -> None:
    check(rig, case)


@fuzz(100)
@given(case=noop_drain_case())
def test_noop_and_drain(rig: Rig, case: Case) -> None:
    check(rig, case)


@fuzz(250)
@given(case=batch_case())
def test_batch(rig: Rig, case: Case) -> None:
    check(rig, case)


@fuzz(150)
@given(case=st.one_of(memfill_case(), noop_drain_case(), crc_case(Op.COPY_CRC)))
def test_interrupt_handles(handles_rig: Rig, case: Case) -> None:
    check(handles_rig, case)


@fuzz(100)
@given(case=st.one_of(memmove_case(), memfill_case(), crc_case(Op.CRCGEN), dif_case(Op.DIF_INS),
                      batch_case()))
def test_opcodes_outside_opcap(few_ops_rig: Rig, case: Case) -> None:
    check(few_ops_rig, case)


@st.composite
def arbitrary_case(draw: Draw) -> Case:
    """Random bytes, with the flags and the record address often made plausible so that more
    than the first checks are reached."""
    d = DsaHwDesc.from_buffer_copy(draw(st.binary(min_size=64, max_size=64)))
    d.opcode = draw(st.one_of(st.sampled_from(list(Op)), st.integers(0, 0xFF)))
    if draw(st.booleans()):
        d.flags &= ref.allowed_flags(d.opcode) if d.opcode in ref.EXTRA_FLAGS else 0
    if draw(st.booleans()):
        d.completion_addr = COMP.iova + 32 * draw(st.integers(0, 3))
    if draw(st.booleans()):
        d.int_handle = draw(st.integers(0, NUM_MSIX))
    return Case(bytes(d), wq=draw(st.sampled_from([0, 1])), seed=draw(st.integers(0, 2**32)))


@fuzz(400)
@given(case=arbitrary_case())
def test_arbitrary_descriptors(rig: Rig, case: Case) -> None:
    """Almost all fail a check, and must fail the same one."""
    check(rig, case)


# --- Every status, by example ----------------------------------------------------------------

RECORD = F.CRAV | F.RCR
AT = COMP.iova  # the record


def _case(opcode: int, flags: int = RECORD, writes: Sequence[tuple[int, bytes]] = (),
          wq: int = 0, **fields: int) -> Case:
    fields.setdefault("completion_addr", AT)
    return Case(ref.descriptor(opcode, flags, **fields), tuple(writes), wq)


def _batch(entries: Sequence[bytes], **fields: int) -> Case:
    address = A.iova + 0x1000
    fields = {"desc_list_addr": address, "desc_count": len(entries)} | fields
    return _case(Op.BATCH, writes=[(address, b"".join(entries))], **fields)


_FILL = ref.descriptor(Op.MEMFILL, dst_addr=B.iova, xfer_size=8)
_BAD = ref.descriptor(Op.MEMFILL, dst_addr=B.iova, xfer_size=0)
_DELTA = struct.pack("<HQHQ", 2, 7, 1, 9)
_DIF_BLOCKS = bytes(520)  # all zero: guard 0, app 0, ref 0

STATUS_EXAMPLES: dict[int, Case] = {
    S.SUCCESS: _case(Op.MEMMOVE, src_addr=A.iova, dst_addr=B.iova, xfer_size=100),
    S.SUCCESS_PRED: _case(Op.COMPARE, RECORD | F.CR, src_addr=A.iova, src2_addr=B.iova,
                          xfer_size=64),
    S.PAGE_FAULT_NOBOF: _case(Op.MEMMOVE, RECORD | F.BOF, src_addr=A.end - 10, dst_addr=B.iova,
                              xfer_size=20),
    S.BATCH_FAIL: _batch([_FILL, _BAD]),
    S.BATCH_PAGE_FAULT: _batch([_FILL], desc_list_addr=A.end - 64, desc_count=2),
    S.DR_OFFSET_NOINC: _case(Op.AP_DELTA, writes=[(A.iova, _DELTA)], src_addr=A.iova,
                             dst_addr=B.iova, xfer_size=64, delta_rec_size=20),
    S.DR_OFFSET_ERANGE: _case(Op.AP_DELTA, writes=[(A.iova, _DELTA)], src_addr=A.iova,
                              dst_addr=B.iova, xfer_size=16, delta_rec_size=10),
    S.DIF_ERR: _case(Op.DIF_CHECK, writes=[(A.iova, _DIF_BLOCKS)], src_addr=A.iova,
                     xfer_size=520, chk_ref_tag_seed=5),
    S.BAD_OPCODE: _case(0x0A),
    S.INVALID_FLAGS: _case(Op.NOOP, RECORD | F.BOF),
    S.NOZERO_RESERVE: _case(Op.NOOP, xfer_size=1),
    S.XFER_ERANGE: _case(Op.MEMFILL, wq=1, dst_addr=B.iova, xfer_size=65),
    S.DESC_CNT_ERANGE: _batch([_FILL] * 5, desc_count=17),
    S.DR_ERANGE: _case(Op.CR_DELTA, src_addr=A.iova, src2_addr=B.iova, xfer_size=8,
                       delta_addr=B.iova + 0x100, max_delta_size=11),
    S.OVERLAP_BUFFERS: _case(Op.COPY_CRC, src_addr=A.iova, dst_addr=A.iova + 4, xfer_size=8),
    S.DCAST_ERR: _case(Op.DUALCAST, src_addr=A.iova, dst_addr=B.iova, dest2=B.iova + 0x1008,
                       xfer_size=8),
    S.DESCLIST_ALIGN: _batch([_FILL] * 2, desc_list_addr=A.iova + 0x1020),
    S.INT_HANDLE_INVAL: _case(Op.NOOP, RECORD | F.RCI, int_handle=NUM_MSIX),
    S.CRA_XLAT: _case(Op.NOOP, completion_addr=COMP_RO.iova + 0x10),
    S.CRA_ALIGN: _case(Op.NOOP, completion_addr=AT + 4),
    S.ADDR_ALIGN: _case(Op.CRCGEN, RECORD | ref.OP16, src_addr=A.iova, xfer_size=8,
                        seed_addr=A.iova + 2),
}


@pytest.mark.parametrize("status", STATUS_EXAMPLES, ids=lambda s: S(s).name)
def test_status(rig: Rig, status: int) -> None:
    outcome = check(rig, STATUS_EXAMPLES[status]).outcome
    assert status in {outcome.status & 0x7F} | {e.error for e in outcome.errors}


# A descriptor per opcode that runs to SUCCESS, for test_every_operand_bit.
_BASELINES: dict[int, Case] = {
    Op.NOOP: _case(Op.NOOP),
    Op.BATCH: _batch([ref.descriptor(Op.NOOP)] * 2),
    Op.DRAIN: _case(Op.DRAIN),
    Op.MEMMOVE: _case(Op.MEMMOVE, src_addr=A.iova, dst_addr=B.iova, xfer_size=16),
    Op.MEMFILL: _case(Op.MEMFILL, pattern=0x1122334455667788, dst_addr=B.iova, xfer_size=16),
    Op.COMPARE: _case(Op.COMPARE, src_addr=A.iova, src2_addr=B.iova, xfer_size=16,
                      expected_res=1),
    Op.COMPVAL: _case(Op.COMPVAL, src_addr=A.iova, comp_pattern=7, xfer_size=16),
    Op.CR_DELTA: _case(Op.CR_DELTA, src_addr=A.iova, src2_addr=B.iova, xfer_size=16,
                       delta_addr=B.iova + 0x100, max_delta_size=20, expected_res_mask=1),
    Op.AP_DELTA: _case(Op.AP_DELTA, writes=[(A.iova + 0x100, struct.pack("<HQHQ", 1, 7, 2, 9))],
                       src_addr=A.iova + 0x100,
                       dst_addr=B.iova, xfer_size=24, delta_rec_size=20),
    Op.DUALCAST: _case(Op.DUALCAST, src_addr=A.iova, dst_addr=B.iova, dest2=B.iova + 0x1000,
                       xfer_size=16),
    Op.CRCGEN: _case(Op.CRCGEN, src_addr=A.iova, xfer_size=16, crc_seed=5),
    Op.COPY_CRC: _case(Op.COPY_CRC, src_addr=A.iova, dst_addr=B.iova, xfer_size=16),
    Op.DIF_CHECK: _case(Op.DIF_CHECK, writes=[(A.iova, _DIF_BLOCKS)], src_addr=A.iova,
                        xfer_size=520),
    Op.DIF_INS: _case(Op.DIF_INS, src_addr=A.iova, dst_addr=B.iova, xfer_size=512),
    Op.DIF_STRP: _case(Op.DIF_STRP, writes=[(A.iova, _DIF_BLOCKS)], src_addr=A.iova,
                       dst_addr=B.iova, xfer_size=520),
    Op.DIF_UPDT: _case(Op.DIF_UPDT, writes=[(A.iova, _DIF_BLOCKS)], src_addr=A.iova,
                       dst_addr=B.iova, xfer_size=520),
    Op.CFLUSH: _case(Op.CFLUSH, dst_addr=B.iova, xfer_size=16),
}


@pytest.mark.parametrize("opcode", _BASELINES, ids=lambda op: Op(op).name)
def test_every_operand_bit(rig: Rig, opcode: int) -> None:
    """Each bit of bytes 16-63 flipped in turn: reserved ones must be refused, and every other
    one must change the outcome as the model says."""
    base = _BASELINES[opcode]
    assert check(rig, base).outcome.status == S.SUCCESS
    for bit in range(16 * 8, 64 * 8):
        raw = bytearray(base.descriptor)
        raw[bit // 8] ^= 1 << bit % 8
        check(rig, dataclasses.replace(base, descriptor=bytes(raw)))


def test_fenced_batch_abandons_entries(rig: Rig) -> None:
    fenced = ref.descriptor(Op.MEMFILL, F.FENCE | F.RCI, dst_addr=B.iova, xfer_size=8,
                            int_handle=2)
    outcome = check(rig, _batch([_FILL, _BAD, _FILL, fenced, _FILL])).outcome
    assert [e.batch_index for e in outcome.errors] == [1]  # _BAD, with no record
    assert outcome.interrupts == []
    assert ref.read_record(check(rig, _batch([_FILL, _BAD, _FILL, fenced])).memory,
                           AT).bytes_completed == 3


def test_interrupt_on_granted_handle_only(handles_rig: Rig) -> None:
    for handle in range(NUM_MSIX):
        outcome = check(handles_rig, _case(Op.NOOP, F.CRAV | F.RCR | F.RCI, int_handle=handle))
        assert outcome.outcome.interrupts == ([handle] if handle in GRANTED else [])
